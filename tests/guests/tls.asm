; Thread-local storage through FS and GS.
;   amd64: arch_prctl(ARCH_SET_FS / ARCH_SET_GS) and loads through %fs:
;          and %gs:, ARCH_GET_FS / ARCH_GET_GS, a base change;
;   i386:  set_thread_area (entry -1: the kernel picks a free slot) loaded
;          into %gs and %fs, get_thread_area, a base change of the entry
;          %gs holds without reloading %gs (Linux reloads the selector,
;          arch/x86/kernel/tls.c), and clearing that entry (%gs becomes 0).
; Both: the bases survive system calls, timer interrupts and fork (the
; child reads its bases and writes through them into its own copy).
; Printed: the values read.  The i386 slot number is printed on its own
; line ("tls entry: N"): 12 on an x86_64 Linux host, 6 on i386 Linux.

%include "lib.inc"

%define SPIN_CYCLES 5000000
%define ARCH_SET_GS 0x1001
%define ARCH_SET_FS 0x1002
%define ARCH_GET_FS 0x1003
%define ARCH_GET_GS 0x1004

section .data
align 16
tls1:	dd 0x11111111, 0x11112222, 0, 0
tls2:	dd 0x22221111, 0x22222222, 0, 0
tls3:	dd 0x33331111, 0x33332222, 0, 0
; struct user_desc (asm/ldt.h): entry, base, limit, flags
; (seg_32bit | limit_in_pages | useable)
desc:	dd -1, 0, 0xfffff, 0x51

section .bss
got:	resq 1
entry_gs: resd 1
entry_fs: resd 1
t0:	resd 1

section .text
global _start

; spin_and_call: 10 rounds of 100 system calls and SPIN_CYCLES of spinning.
spin_and_call:
	push xBP
	push xBX
	mov ebx, 10
.round:
	mov ebp, 100
.calls:
	SYS SYS_getpid
	dec ebp
	jnz .calls
	rdtsc
	mov [t0], eax
.spin:
	rdtsc
	sub eax, [t0]
	cmp eax, SPIN_CYCLES
	jb .spin
	dec ebx
	jnz .round
	pop xBX
	pop xBP
	ret

; print_tls: "fs:0 X gs:0 Y" from the current segment bases.
print_tls:
	PRINT "fs:0 "
	PUTHEX [fs:0]
	PRINT " fs:4 "
	PUTHEX [fs:4]
	PRINT " gs:0 "
	PUTHEX [gs:0]
	PRINT " gs:4 "
	PUTHEX [gs:4]
	PRINT 10
	ret

; child: checks its bases, writes through them (into its own copy)
child:
	cmp dword [fs:0], 0x11111111
	jne .bad
	cmp dword [gs:0], 0x33331111
	jne .bad
	mov dword [fs:8], 0xc41d
	mov dword [gs:8], 0xc41d
	EXIT 0
.bad:
	EXIT 1

_start:
%ifdef ARCH64
	lea rsi, [tls1]
	SYS SYS_arch_prctl, ARCH_SET_FS, rsi
	test rax, rax
	ASSERT z, "ARCH_SET_FS"
	lea rsi, [tls2]
	SYS SYS_arch_prctl, ARCH_SET_GS, rsi
	test rax, rax
	ASSERT z, "ARCH_SET_GS"
	call print_tls
	lea rsi, [got]
	SYS SYS_arch_prctl, ARCH_GET_FS, rsi
	test rax, rax
	ASSERT z, "ARCH_GET_FS"
	lea rax, [tls1]
	cmp rax, [got]
	ASSERT e, "ARCH_GET_FS returned another base"
	lea rsi, [got]
	SYS SYS_arch_prctl, ARCH_GET_GS, rsi
	test rax, rax
	ASSERT z, "ARCH_GET_GS"
	lea rax, [tls2]
	cmp rax, [got]
	ASSERT e, "ARCH_GET_GS returned another base"
	PRINT "get: both bases read back", 10
	lea rsi, [tls3]
	SYS SYS_arch_prctl, ARCH_SET_GS, rsi
	test rax, rax
	ASSERT z, "ARCH_SET_GS again"
	PRINT "gs base changed: "
	call print_tls
%else
	mov dword [desc + 4], tls2
	SYS SYS_set_thread_area, desc
	test eax, eax
	ASSERT z, "set_thread_area for gs"
	mov eax, [desc]
	mov [entry_gs], eax
	PRINT "tls entry: "
	PUTDEC eax
	PRINT 10
	shl eax, 3
	or eax, 3
	mov gs, ax
	mov dword [desc], -1
	mov dword [desc + 4], tls1
	SYS SYS_set_thread_area, desc
	test eax, eax
	ASSERT z, "set_thread_area for fs"
	mov eax, [desc]
	mov [entry_fs], eax
	sub eax, [entry_gs]
	PRINT "second entry: first + "
	PUTDEC eax
	PRINT 10
	mov eax, [entry_fs]
	shl eax, 3
	or eax, 3
	mov fs, ax
	call print_tls
	; get_thread_area of the gs entry
	mov eax, [entry_gs]
	mov [desc], eax
	mov dword [desc + 4], 0
	SYS SYS_get_thread_area, desc
	test eax, eax
	ASSERT z, "get_thread_area"
	cmp dword [desc + 4], tls2
	ASSERT e, "get_thread_area returned another base"
	PRINT "get: base read back", 10
	; new base for the entry %gs holds, %gs not reloaded by the program
	mov eax, [entry_gs]
	mov [desc], eax
	mov dword [desc + 4], tls3
	SYS SYS_set_thread_area, desc
	test eax, eax
	ASSERT z, "set_thread_area on the loaded entry"
	PRINT "gs base changed: "
	call print_tls
%endif
	call spin_and_call
	PRINT "after system calls and timer ticks: "
	call print_tls
	lea xAX, [child]
	call run_child
	PRINT "child: "
	call put_status
	PRINT 10
	PRINT "parent after the child wrote through its bases: "
	PUTHEX [tls1 + 8]
	PRINT " "
	PUTHEX [tls3 + 8]
	PRINT 10
%ifndef ARCH64
	; clear the entry %gs holds: Linux reloads %gs, which becomes null
	mov eax, [entry_gs]
	mov [desc], eax
	mov dword [desc + 4], 0
	mov dword [desc + 8], 0
	mov dword [desc + 12], 0x28	; read_exec_only | seg_not_present: empty
	SYS SYS_set_thread_area, desc
	test eax, eax
	ASSERT z, "set_thread_area clearing the entry"
	mov eax, gs
	PRINT "gs after clearing its entry: "
	PUTHEX eax
	PRINT 10
%endif
	EXIT 0
