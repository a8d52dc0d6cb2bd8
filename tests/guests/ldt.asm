; LDT segments made with modify_ldt (the monitor loads a shadow LDT for
; every run and fills it from the guest OS's LDT, issue 6).  Entries
; (func 0x11 unless said):
;   0  base `area_a`, limit 0xfff (bytes), writable, 32-bit, useable
;   1  base `area_b`, limit 1 page (limit_in_pages), writable, 32-bit
;   2  base `area_c`, limit 0xff, read-only (read_exec_only), 32-bit
;   5  base `area_b`, limit 0xfff, writable: the LDT grows to 6 entries,
;      3 and 4 stay empty
; Checks:
;   read          modify_ldt func 0 before any entry (0 bytes) and after
;                 three (bytecount bytes; the attributes of each entry)
;   gs, fs        entry 0 in GS and 1 in FS: selectors read back, loads
;                 through each reach its base
;   ds, es (ss)   i386: each loaded with entry 0, reads and stores through
;                 it (a push and pop through SS); amd64: DS and ES hold
;                 entries 0 and 2 (their bases do not apply in 64-bit mode)
;   lsl, lar      limits and access rights of entries 0, 1, 2 while loaded
;   verr, verw    entry 0 readable and writable, 2 readable only
;   change        entry 0 rebased to `area_c` (limit 0xff) between two
;                 loads: the next load reaches the new base
;   sparse        entry 5: loads; the empty entry 3 has no limit (LSL)
;   across calls  entry 0 in GS and 1 in FS across 100 system calls
;   fork          the child has the parent's LDT and clears entry 1 (old
;                 mode, base and limit 0): its load of 1 then faults
;                 (SIGSEGV); the parent's entry 1 is unchanged
;   children      `mov ds` of the empty entry 3 and of an index past the
;                 LDT's limit, i386 `mov ss` of read-only entry 2: SIGSEGV
; No selector is read back after a system call: x86_64 Linux keeps the
; selector an amd64 program loaded into FS or GS, the client core keeps
; only the base.

%include "lib.inc"

%define MAGIC_A 0xaaaa0001
%define MAGIC_B 0xbbbb0002
%define MAGIC_C 0xcccc0003
%define CALLS 100
; LDT selectors: index * 8, TI (4), RPL 3.
%define SEL0 0x07
%define SEL1 0x0f
%define SEL2 0x17
%define SEL3 0x1f
%define SEL5 0x2f
%define PAST_SEL 0x147
; ESP while SS is entry 0: inside `area_a`.
%define STACK_TOP 0x800
%define READ_BYTES 64
%define FUNC_READ 0
%define FUNC_WRITE_OLD 1
%define FUNC_WRITE 0x11

; modify_ldt(func, desc, 16), which must succeed.
%macro LDT_WRITE 2
%ifdef ARCH64
	lea rsi, [%2]
	SYS SYS_modify_ldt, %1, rsi, 16
%else
	SYS SYS_modify_ldt, %1, %2, 16
%endif
	test xAX, xAX
	ASSERT z, "modify_ldt write"
%endmacro

; modify_ldt(0, ldt_buf, READ_BYTES); the result in xAX.
%macro LDT_READ 0
%ifdef ARCH64
	lea rsi, [ldt_buf]
	SYS SYS_modify_ldt, FUNC_READ, rsi, READ_BYTES
%else
	SYS SYS_modify_ldt, FUNC_READ, ldt_buf, READ_BYTES
%endif
%endmacro

; ES back to what the program started with (PRINT stores through it on i386).
%macro ES_BACK 0
%ifdef ARCH64
	xor eax, eax
%else
	mov ax, [cs:flat]
%endif
	mov es, ax
%endmacro

section .data
align 16
area_a:	dd MAGIC_A
	times 1023 dd 0
area_b:	dd MAGIC_B
	times 1023 dd 0
area_c:	dd MAGIC_C
	times 63 dd 0
; struct user_desc: entry, base, limit, flags
desc0:	dd 0, area_a, 0xfff, 0x41
desc1:	dd 1, area_b, 0, 0x11
desc2:	dd 2, area_c, 0xff, 0x09
desc5:	dd 5, area_b, 0xfff, 0x41
desc0c:	dd 0, area_c, 0xff, 0x41
desc1z:	dd 1, 0, 0, 0x01

section .bss
ldt_buf: resb READ_BYTES
results: resd 8
flat:	resd 1
saved_sp: resd 1

section .text
global _start
_start:
	mov ax, ds
	mov [flat], eax
%ifndef ARCH64
	mov [saved_sp], esp
%endif

	; read
	LDT_READ
	PRINT "read without an LDT: "
	PUTSDEC xAX
	PRINT 10
	LDT_WRITE FUNC_WRITE, desc0
	LDT_WRITE FUNC_WRITE, desc1
	LDT_WRITE FUNC_WRITE, desc2
	LDT_READ
	PRINT "read: "
	PUTSDEC xAX
	PRINT 10, "attributes:"
	xor ecx, ecx
.attributes:
	mov eax, [ldt_buf + xCX * 8 + 4]
	and eax, 0x00f0ff00
	PRINT " "
	PUTHEX eax
	inc ecx
	cmp ecx, READ_BYTES / 8
	jb .attributes
	PRINT 10

	; gs, fs: one EXEC loads both (no system call between)
	mov eax, SEL0
	mov gs, ax
	mov eax, SEL1
	mov fs, ax
	mov ecx, [gs:0]
	mov edx, [fs:0]
	mov ax, gs
	mov bx, fs
	cmp ecx, MAGIC_A
	ASSERT e, "gs: load through gs"
	cmp edx, MAGIC_B
	ASSERT e, "fs: load through fs"
	cmp ax, SEL0
	ASSERT e, "gs: selector"
	cmp bx, SEL1
	ASSERT e, "fs: selector"
	PRINT "gs, fs: ok", 10

%ifdef ARCH64
	; ds, es: loaded and read back, then null again
	mov eax, SEL0
	mov ds, ax
	mov eax, SEL2
	mov es, ax
	mov ecx, [area_a]
	mov ax, ds
	mov bx, es
	xor edx, edx
	mov ds, dx
	mov es, dx
	cmp ecx, MAGIC_A
	ASSERT e, "ds: a flat load"
	cmp ax, SEL0
	ASSERT e, "ds: selector"
	cmp bx, SEL2
	ASSERT e, "es: selector"
	PRINT "ds, es: ok", 10
%else
	; ds, es, ss: each loaded with entry 0 in the same EXEC, then flat
	DATA_SEGMENT_CHECKS32 SEL0
%endif

	; lsl, lar, verr, verw: 0 in GS, 1 in FS, 2 in ES while examined
	mov eax, SEL0
	mov gs, ax
	mov eax, SEL1
	mov fs, ax
	mov eax, SEL2
	mov es, ax
	xor ebx, ebx
	mov ecx, SEL0
	lsl eax, ecx
	mov [results], eax
	lar eax, ecx
	mov [results + 4], eax
	setz bl
	verr cx
	setz bh
	shl ebx, 8
	verw cx
	setz bl
	mov ecx, SEL1
	lsl eax, ecx
	mov [results + 8], eax
	lar eax, ecx
	mov [results + 12], eax
	mov ecx, SEL2
	lsl eax, ecx
	mov [results + 16], eax
	lar eax, ecx
	mov [results + 20], eax
	xor edx, edx
	verr cx
	setz dl
	shl edx, 8
	verw cx
	setz dl
	ES_BACK
	cmp ebx, 0x010101
	ASSERT e, "lar, verr, verw of entry 0"
	cmp edx, 0x0100
	ASSERT e, "verr, verw of entry 2"
	xor ecx, ecx
.lsl_lar:
	PRINT "lsl "
	PUTDEC xCX
	PRINT ": "
	mov eax, [results + xCX * 8]
	PUTHEX eax
	PRINT ", lar: "
	mov eax, [results + xCX * 8 + 4]
	and eax, 0x00ffff00
	PUTHEX eax
	PRINT 10
	inc ecx
	cmp ecx, 3
	jb .lsl_lar
	PRINT "verr, verw: ok", 10

	; change: entry 0 rebased between two loads
	xor eax, eax
	mov gs, ax
	LDT_WRITE FUNC_WRITE, desc0c
	mov eax, SEL0
	mov gs, ax
	mov ecx, [gs:0]
	mov edx, SEL0
	lsl ebx, edx
	cmp ecx, MAGIC_C
	ASSERT e, "change: the new base"
	cmp ebx, 0xff
	ASSERT e, "change: the new limit"
	PRINT "change: ok", 10

	; sparse
	LDT_WRITE FUNC_WRITE, desc5
	mov eax, SEL5
	mov gs, ax
	mov ecx, [gs:0]
	mov edx, SEL3
	xor ebx, ebx
	lsl eax, edx
	setz bl
	cmp ecx, MAGIC_B
	ASSERT e, "sparse: load through entry 5"
	test ebx, ebx
	ASSERT z, "sparse: entry 3 has no limit"
	LDT_READ
	PRINT "sparse: ok, read: "
	PUTSDEC xAX
	PRINT 10

	; across calls: 0 (base `area_c` now) in GS, 1 in FS
	mov eax, SEL0
	mov gs, ax
	mov eax, SEL1
	mov fs, ax
	mov ebp, CALLS
	xor edi, edi
.call:
	SYS SYS_getpid
	cmp dword [gs:0], MAGIC_C
	jne .calls_bad
	cmp dword [fs:0], MAGIC_B
	jne .calls_bad
	dec ebp
	jnz .call
	jmp .calls_done
.calls_bad:
	mov edi, 1
.calls_done:
	test edi, edi
	ASSERT z, "across calls: a segment changed"
	PRINT "across calls: ok", 10

	; fork
	mov eax, fork_child
	call run_child
	PRINT "fork child: "
	call put_status
	PRINT 10
	xor eax, eax
	mov gs, ax
	mov eax, SEL1
	mov gs, ax
	cmp dword [gs:0], MAGIC_B
	ASSERT e, "fork: the parent's entry 1"
	PRINT "fork parent: ok", 10

	mov eax, empty_ds
	call run_child
	PRINT "mov ds empty entry: "
	call put_status
	PRINT 10
	mov eax, past_ds
	call run_child
	PRINT "mov ds past the limit: "
	call put_status
	PRINT 10
%ifndef ARCH64
	mov eax, readonly_ss
	call run_child
	PRINT "mov ss read-only: "
	call put_status
	PRINT 10
%endif
	EXIT 0

fork_child:
	mov eax, SEL1
	mov gs, ax
	cmp dword [gs:0], MAGIC_B
	jne .bad
	xor eax, eax
	mov gs, ax
	LDT_WRITE FUNC_WRITE_OLD, desc1z
	mov eax, SEL1
	mov gs, ax
	ret
.bad:
	EXIT 2

empty_ds:
	mov eax, SEL3
	mov ds, ax
	ret

past_ds:
	mov eax, PAST_SEL
	mov ds, ax
	ret

%ifndef ARCH64
readonly_ss:
	mov eax, SEL2
	mov ss, ax
	ret
%endif
