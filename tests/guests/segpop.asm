; `pop Sreg` (i386 only: `pop ds/es/ss` do not exist in 64-bit mode).
;   pop gs, pop fs    of a set_thread_area entry: the selector reads back,
;                     loads through the segment see the entry's base, ESP
;                     moved by 4
;   o16 pop gs        the same with a 16-bit pop (ESP moved by 2)
;   pop fs            of the null selector
;   pop ds            of a selector past the GDT: #GP, SIGSEGV 11
;   pop ss            of the null selector: #GP(0), SIGSEGV 11
; The faulting ones run in forked children.  Printed: one line per check.

%include "lib.inc"

%ifdef ARCH64
%error "segpop is an i386 program"
%endif

%define MAGIC 0x5eed1234

section .data
align 16
tls:	dd MAGIC, 0, 0, 0
; struct user_desc: entry (-1: any free one), base, limit, flags
; (seg_32bit | limit_in_pages | useable)
desc:	dd -1, tls, 0xfffff, 0x51

section .bss
sel:	resd 1

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
	mov esi, esp

	push dword [sel]
	pop gs
	cmp esp, esi
	ASSERT e, "pop gs moved ESP by 4"
	mov ax, gs
	cmp ax, [sel]
	ASSERT e, "pop gs: selector"
	cmp dword [gs:0], MAGIC
	ASSERT e, "pop gs: load through gs"
	PRINT "pop gs: ok", 10

	push dword [sel]
	pop fs
	cmp esp, esi
	ASSERT e, "pop fs moved ESP by 4"
	mov ax, fs
	cmp ax, [sel]
	ASSERT e, "pop fs: selector"
	cmp dword [fs:0], MAGIC
	ASSERT e, "pop fs: load through fs"
	PRINT "pop fs: ok", 10

	xor eax, eax
	mov gs, ax
	push word [sel]
	db 0x66, 0x0f, 0xa9	; o16 pop gs
	cmp esp, esi
	ASSERT e, "o16 pop gs moved ESP by 2"
	mov ax, gs
	cmp ax, [sel]
	ASSERT e, "o16 pop gs: selector"
	cmp dword [gs:0], MAGIC
	ASSERT e, "o16 pop gs: load through gs"
	PRINT "o16 pop gs: ok", 10

	push dword 0
	pop fs
	cmp esp, esi
	ASSERT e, "pop fs null moved ESP by 4"
	mov ax, fs
	test ax, ax
	ASSERT z, "pop fs null: selector"
	PRINT "pop fs null: ok", 10

	mov eax, bad_ds
	call run_child
	PRINT "pop ds 0xfffb: "
	call put_status
	PRINT 10
	mov eax, null_ss
	call run_child
	PRINT "pop ss 0: "
	call put_status
	PRINT 10
	EXIT 0

bad_ds:
	push dword 0xfffb
	pop ds
	ret

null_ss:
	push dword 0
	pop ss
	ret
