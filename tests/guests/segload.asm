; Loads of GDT selectors other than those the program started with (the
; monitor fills its shadow GDT from the guest OS's GDT for them, issue 6).
; i386: three set_thread_area entries, each with its own base and limit:
;   A  base `area_a`, limit 0xfff (bytes), writable, 32-bit, useable
;   B  base `area_b`, limit 1 page (limit_in_pages), writable, 32-bit
;   C  base `area_c`, limit 0xff, read-only (read_exec_only), 32-bit
;   gs, fs        `mov gs` A and `mov fs` B: selectors read back, loads
;                 through each reach its base
;   swap          1000 rounds of GS and FS swapped between A and B with no
;                 system call between: every load reaches the right base
;   ds, es, ss    each loaded with A (a push and pop through SS), then the
;                 flat selector again
;   lsl, lar      limits and access rights of A, B and C while loaded
;   verr, verw    A readable and writable, C readable and not writable
;   read-only     C in GS, a load through it
;   rebase        A loaded and dropped, then set_thread_area gives it the
;                 base of C: the next load of A reaches C's base (the
;                 guest OS's table is read again after a system call)
;   across calls  A in GS and B in FS across 100 system calls
;   children      `mov ss` of C (read-only: #GP), `mov ds` of an index
;                 past the GDT limit and of one whose entry is empty or a
;                 system descriptor (#GP): SIGSEGV 11
; amd64: 64-bit code has no set_thread_area; only the children that load
; an empty entry and an index past the limit into DS.
; No selector value is printed: entry numbers differ between an x86_64
; host (12) and i386 Linux (6).

%include "lib.inc"

%define MAGIC_A 0xaaaa0001
%define MAGIC_B 0xbbbb0002
%define MAGIC_C 0xcccc0003
%define ROUNDS 1000
%define CALLS 100
; ESP while SS is A: inside `area_a`.
%define STACK_TOP 0x800
; Index 9: empty in the guest OS of the monitor and kld modes, the upper
; half of the TSS on Linux and the TSS in native mode (a system descriptor
; either way).  Index 0x200: past the limit of every GDT here.
%define EMPTY_SEL 0x4b
%define PAST_SEL 0x1003

section .data
align 16
area_a:	dd MAGIC_A
	times 1023 dd 0
area_b:	dd MAGIC_B
	times 1023 dd 0
area_c:	dd MAGIC_C
	times 63 dd 0
; struct user_desc: entry (-1: any free one), base, limit, flags
%ifndef ARCH64
desc_a:	dd -1, area_a, 0xfff, 0x41
desc_b:	dd -1, area_b, 0, 0x11
desc_c:	dd -1, area_c, 0xff, 0x09
; A again with C's base (entry number filled in)
desc_a2: dd 0, area_c, 0xff, 0x41
%endif

section .bss
sel_a:	resd 1
sel_b:	resd 1
sel_c:	resd 1
flat:	resd 1
saved_sp: resd 1

section .text
global _start
_start:
%ifdef ARCH64
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
	EXIT 0

empty_ds:
	mov eax, EMPTY_SEL
	mov ds, ax
	ret

past_ds:
	mov eax, PAST_SEL
	mov ds, ax
	ret
%else
	SYS SYS_set_thread_area, desc_a
	test eax, eax
	ASSERT z, "set_thread_area A"
	SYS SYS_set_thread_area, desc_b
	test eax, eax
	ASSERT z, "set_thread_area B"
	SYS SYS_set_thread_area, desc_c
	test eax, eax
	ASSERT z, "set_thread_area C"
	mov eax, [desc_a]
	lea eax, [eax * 8 + 3]
	mov [sel_a], eax
	mov eax, [desc_b]
	lea eax, [eax * 8 + 3]
	mov [sel_b], eax
	mov eax, [desc_c]
	lea eax, [eax * 8 + 3]
	mov [sel_c], eax
	mov ax, ds
	mov [flat], eax
	mov [saved_sp], esp

	; gs, fs: one EXEC loads both (no system call between)
	mov eax, [sel_a]
	mov gs, ax
	mov eax, [sel_b]
	mov fs, ax
	mov ecx, [gs:0]
	mov edx, [fs:0]
	mov ax, gs
	mov bx, fs
	cmp ecx, MAGIC_A
	ASSERT e, "gs: load through gs"
	cmp edx, MAGIC_B
	ASSERT e, "fs: load through fs"
	cmp ax, [sel_a]
	ASSERT e, "gs: selector"
	cmp bx, [sel_b]
	ASSERT e, "fs: selector"
	PRINT "gs, fs: ok", 10

	; swap
	xor eax, eax
	mov gs, ax
	mov fs, ax
	mov ebp, ROUNDS
	xor edi, edi
.swap:
	mov eax, [sel_a]
	mov gs, ax
	mov eax, [sel_b]
	mov fs, ax
	cmp dword [gs:0], MAGIC_A
	jne .swap_bad
	cmp dword [fs:0], MAGIC_B
	jne .swap_bad
	mov eax, [sel_b]
	mov gs, ax
	mov eax, [sel_a]
	mov fs, ax
	cmp dword [gs:0], MAGIC_B
	jne .swap_bad
	cmp dword [fs:0], MAGIC_A
	jne .swap_bad
	dec ebp
	jnz .swap
	jmp .swap_done
.swap_bad:
	mov edi, 1
.swap_done:
	test edi, edi
	ASSERT z, "swap: a load reached the wrong base"
	PRINT "swap: ok", 10

	; ds, es, ss: each loaded with A in the same EXEC, then flat again
	DATA_SEGMENT_CHECKS32 [sel_a]

	; lsl, lar: A in GS, B in FS, C in ES while they are examined
	mov eax, [sel_a]
	mov gs, ax
	mov eax, [sel_b]
	mov fs, ax
	mov eax, [sel_c]
	mov es, ax
	mov ecx, [sel_a]
	lsl esi, ecx
	setz bl
	lar edi, ecx
	setz bh
	mov ecx, [sel_b]
	lsl ebp, ecx
	setz dl
	lar ecx, ecx
	setz dh
	mov ax, [flat]
	mov es, ax
	cmp bx, 0x0101
	ASSERT e, "lsl/lar A: ZF"
	cmp dx, 0x0101
	ASSERT e, "lsl/lar B: ZF"
	PRINT "lsl A: "
	PUTHEX esi
	PRINT ", lar A: "
	and edi, 0x00ffff00
	PUTHEX edi
	PRINT 10, "lsl B: "
	PUTHEX ebp
	PRINT ", lar B: "
	and ecx, 0x00ffff00
	PUTHEX ecx
	PRINT 10
	mov eax, [sel_c]
	mov es, ax
	mov ecx, eax
	lsl esi, ecx
	setz bl
	lar edi, ecx
	setz bh
	mov ax, [flat]
	mov es, ax
	cmp bx, 0x0101
	ASSERT e, "lsl/lar C: ZF"
	PRINT "lsl C: "
	PUTHEX esi
	PRINT ", lar C: "
	and edi, 0x00ffff00
	PUTHEX edi
	PRINT 10

	; verr, verw (A in GS, C in ES)
	mov eax, [sel_c]
	mov es, ax
	xor ebx, ebx
	mov ecx, [sel_a]
	verr cx
	setz bl
	verw cx
	setz bh
	mov ecx, [sel_c]
	xor edx, edx
	verr cx
	setz dl
	verw cx
	setz dh
	mov ax, [flat]
	mov es, ax
	cmp bx, 0x0101
	ASSERT e, "verr/verw A"
	cmp dx, 0x0001
	ASSERT e, "verr/verw C"
	PRINT "verr, verw: ok", 10

	; read-only C in GS
	mov eax, [sel_c]
	mov gs, ax
	mov ecx, [gs:0]
	mov ax, gs
	cmp ecx, MAGIC_C
	ASSERT e, "read-only: load through gs"
	cmp ax, [sel_c]
	ASSERT e, "read-only: selector"
	PRINT "read-only: ok", 10

	; rebase
	mov eax, [sel_a]
	mov gs, ax
	mov ecx, [gs:0]
	xor eax, eax
	mov gs, ax
	cmp ecx, MAGIC_A
	ASSERT e, "rebase: load through A"
	mov eax, [desc_a]
	mov [desc_a2], eax
	SYS SYS_set_thread_area, desc_a2
	test eax, eax
	ASSERT z, "set_thread_area A again"
	mov eax, [sel_a]
	mov gs, ax
	mov ecx, [gs:0]
	cmp ecx, MAGIC_C
	ASSERT e, "rebase: A reaches its new base"
	PRINT "rebase: ok", 10

	; across calls: A (its first base again) in GS, B in FS
	SYS SYS_set_thread_area, desc_a
	test eax, eax
	ASSERT z, "set_thread_area A restored"
	mov eax, [sel_a]
	mov gs, ax
	mov eax, [sel_b]
	mov fs, ax
	mov esi, CALLS
	xor edi, edi
.call:
	mov eax, SYS_getpid
	int 0x80
	cmp dword [gs:0], MAGIC_A
	jne .calls_bad
	cmp dword [fs:0], MAGIC_B
	jne .calls_bad
	dec esi
	jnz .call
	jmp .calls_done
.calls_bad:
	mov edi, 1
.calls_done:
	test edi, edi
	ASSERT z, "across calls: a segment changed"
	PRINT "across calls: ok", 10

	mov eax, readonly_ss
	call run_child
	PRINT "mov ss read-only: "
	call put_status
	PRINT 10
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
	EXIT 0

readonly_ss:
	mov eax, [sel_c]
	mov ss, ax
	ret

empty_ds:
	mov eax, EMPTY_SEL
	mov ds, ax
	ret

past_ds:
	mov eax, PAST_SEL
	mov ds, ax
	ret
%endif
