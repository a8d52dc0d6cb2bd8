; i386 programs that load DS, ES and SS themselves: a set_thread_area
; entry whose base is `area` (4 KiB, byte granular), so every access
; through such a register shows which segment it used.
;   ds, es, ss    each loaded alone with `mov`: the selector reads back,
;                 loads and stores (a push for SS) reach `area`
;   es null       a null ES stays null across a system call
;   across calls  all three loaded, kept across 10 rounds of 100 system
;                 calls and SPIN_CYCLES of spinning (timer ticks)
;   fork          the child of a fork made with all three loaded has them
;   pop           `pop ds`, `pop es`, `pop ss` of the entry
;   cleared       children clear the entry while it is loaded (Linux
;                 reloads DS, ES and SS on the way back to user mode): DS
;                 reads back null (exit 0), a load through it then faults
;                 and so does the return with SS loaded (SIGSEGV 11)
; Before anything is printed the flat selector is loaded again from a
; copy read through CS (a flat readable code segment).  Printed: one line
; per check.  No selector value is printed: the entry number differs
; between an x86_64 host (12) and i386 Linux (6).

%include "lib.inc"

%ifdef ARCH64
%error "dataseg is an i386 program"
%endif

%define MAGIC 0x0da7a5e9
%define SPIN_CYCLES 5000000
; ESP while SS is the entry: inside `area`.
%define STACK_TOP 0x800

section .data
align 16
area:	dd MAGIC
	times 1023 dd 0
; struct user_desc: entry (-1: any free one), base, limit, flags
; (seg_32bit | useable; byte-granular limit)
desc:	dd -1, area, 0xfff, 0x41
; the same entry cleared (read_exec_only | seg_not_present, Linux's
; LDT_empty); its number is filled in
empty:	dd 0, 0, 0, 0x28

section .bss
sel:	resd 1
flat:	resd 1
saved_sp: resd 1

; FLAT: DS, ES, SS flat again and ESP from saved_sp (clobbers eax).
%macro FLAT 0
	mov ax, [cs:flat]
	mov ds, ax
	mov es, ax
	mov ss, ax
	mov esp, [cs:saved_sp]
%endmacro

; CHECK_ALL: edi = 0 when DS, ES and SS hold the entry and reach `area`
; (the push at STACK_TOP too), else 1 (clobbers eax; needs ESP = STACK_TOP).
%macro CHECK_ALL 0
	mov edi, 1
	mov ax, ds
	cmp ax, [cs:sel]
	jne %%done
	mov ax, es
	cmp ax, [cs:sel]
	jne %%done
	mov ax, ss
	cmp ax, [cs:sel]
	jne %%done
	cmp dword [0], MAGIC
	jne %%done
	cmp dword [es:0], MAGIC
	jne %%done
	push dword 0x600df00d
	pop eax
	cmp dword [cs:area + STACK_TOP - 4], 0x600df00d
	jne %%done
	mov dword [STACK_TOP - 4], 0
	cmp esp, STACK_TOP
	jne %%done
	xor edi, edi
%%done:
%endmacro

section .text
global _start
_start:
	SYS SYS_set_thread_area, desc
	test eax, eax
	ASSERT z, "set_thread_area"
	mov eax, [desc]
	shl eax, 3
	or eax, 3
	mov [sel], eax
	mov ax, ds
	mov [flat], eax
	mov [saved_sp], esp

	; ds
	mov eax, [sel]
	mov ds, ax
	mov ecx, [0]
	mov dword [8], 0x1234
	mov dx, ds
	FLAT
	cmp ecx, MAGIC
	ASSERT e, "ds: load through ds"
	cmp dx, [sel]
	ASSERT e, "ds: selector"
	cmp dword [area + 8], 0x1234
	ASSERT e, "ds: store through ds"
	PRINT "ds: ok", 10

	; es (a string store uses ES:EDI)
	mov eax, [sel]
	mov es, ax
	mov ecx, [es:0]
	mov dword [es:12], 0x5678
	mov edi, 16
	mov eax, 0xabcd
	stosd
	mov dx, es
	FLAT
	cmp ecx, MAGIC
	ASSERT e, "es: load through es"
	cmp dx, [sel]
	ASSERT e, "es: selector"
	cmp dword [area + 12], 0x5678
	ASSERT e, "es: store through es"
	cmp dword [area + 16], 0xabcd
	ASSERT e, "es: stosd"
	PRINT "es: ok", 10

	; ss
	mov eax, [sel]
	mov ss, ax
	mov esp, STACK_TOP
	push dword 0x4242
	mov ecx, [esp]
	pop ebx
	mov edx, esp
	mov si, ss
	FLAT
	cmp ebx, 0x4242
	ASSERT e, "ss: pop"
	cmp ecx, 0x4242
	ASSERT e, "ss: load through ss"
	cmp edx, STACK_TOP
	ASSERT e, "ss: esp"
	cmp si, [sel]
	ASSERT e, "ss: selector"
	cmp dword [area + STACK_TOP - 4], 0x4242
	ASSERT e, "ss: push through ss"
	PRINT "ss: ok", 10

	; es null, across a system call
	xor eax, eax
	mov es, ax
	SYS SYS_getpid
	mov dx, es
	FLAT
	test dx, dx
	ASSERT z, "es null: kept across a system call"
	PRINT "es null: ok", 10

	; all three, across system calls and timer ticks
	mov eax, [sel]
	mov ds, ax
	mov es, ax
	mov ss, ax
	mov esp, STACK_TOP
	mov ebp, 10
.round:
	mov esi, 100
.call:
	mov eax, SYS_getpid
	int 0x80
	dec esi
	jnz .call
	xor ecx, ecx
.spin:
	inc ecx
	cmp ecx, SPIN_CYCLES
	jb .spin
	CHECK_ALL
	test edi, edi
	jnz .rounds_done
	dec ebp
	jnz .round
.rounds_done:
	FLAT
	test edi, edi
	ASSERT z, "across calls: segments changed"
	PRINT "across calls and ticks: ok", 10

	; fork with all three loaded
	FLUSH
	mov eax, [sel]
	mov ds, ax
	mov es, ax
	mov ss, ax
	mov esp, STACK_TOP
	mov eax, SYS_fork
	int 0x80
	test eax, eax
	jnz .parent
	CHECK_ALL
	mov ebx, edi
	mov eax, SYS_exit_group
	int 0x80
.parent:
	mov ebx, eax
	FLAT
	test ebx, ebx
	ASSERT g, "fork"
	SYS SYS_wait4, ebx, wait_status, 0, 0
	test eax, eax
	ASSERT g, "wait4"
	cmp dword [wait_status], 0
	ASSERT e, "fork: the child's segments"
	PRINT "fork: ok", 10

	; pop ds, pop es, pop ss (pop reads the old SS, then loads the new)
	push dword [sel]
	push dword [sel]
	push dword [sel]
	pop ds
	pop es
	pop ss
	mov ebx, esp
	mov ecx, [0]
	mov edx, [es:0]
	mov edi, 1
	mov ax, ds
	cmp ax, [cs:sel]
	jne .popped
	mov ax, es
	cmp ax, [cs:sel]
	jne .popped
	mov ax, ss
	cmp ax, [cs:sel]
	jne .popped
	xor edi, edi
.popped:
	FLAT
	test edi, edi
	ASSERT z, "pop: selectors"
	cmp ebx, [saved_sp]
	ASSERT e, "pop: esp"
	cmp ecx, MAGIC
	ASSERT e, "pop ds: load through ds"
	cmp edx, MAGIC
	ASSERT e, "pop es: load through es"
	PRINT "pop ds, es, ss: ok", 10

	mov eax, [desc]
	mov [empty], eax
	mov eax, ds_cleared
	call run_child
	PRINT "ds cleared: "
	call put_status
	PRINT 10
	mov eax, ds_cleared_load
	call run_child
	PRINT "ds cleared, then a load: "
	call put_status
	PRINT 10
	mov eax, ss_cleared
	call run_child
	PRINT "ss cleared: "
	call put_status
	PRINT 10
	EXIT 0

; Children: exit with DS's selector after clearing the entry DS holds;
; the same, then a load through DS; clearing the entry SS holds.
ds_cleared:
	mov eax, [sel]
	mov ds, ax
	SYS SYS_set_thread_area, empty
	mov bx, ds
	movzx ebx, bx
	mov eax, SYS_exit_group
	int 0x80

ds_cleared_load:
	mov eax, [sel]
	mov ds, ax
	SYS SYS_set_thread_area, empty
	mov eax, [0]
	SYS SYS_exit_group, SURVIVED

ss_cleared:
	mov eax, [sel]
	mov ss, ax
	SYS SYS_set_thread_area, empty
	SYS SYS_exit_group, SURVIVED
