; System calls in tight loops: amd64 `syscall`, i386 `int 0x80`.
;   getpid  100000 calls; every result equal to the first; every register
;           but the ones the ABI clobbers holds its value (amd64: all but
;           rax, rcx, r11; rcx = the return address and r11 = RFLAGS, as
;           the syscall instruction sets them; i386: all but eax), and
;           CF/DF set before the call are still set after it
;   umask   10000 calls, each returns the mask the previous call set
;   enosys  10000 calls of an unknown number return -ENOSYS
; The suite divides the run's cycles by the calls for a cost per call.

%include "lib.inc"

%define CALLS 100000
%define SMALL_CALLS 10000
%define UNKNOWN_SYSCALL 1000
%define EFLAGS_CF 0x001
%define EFLAGS_DF 0x400

section .bss
first:	resq 1
count:	resd 1
flags:	resq 1

section .text
global _start
_start:
	SYS SYS_getpid
	mov [first], xAX
	mov dword [count], CALLS
%ifdef ARCH64
	mov rbx, 0x0b0b0b0b0b0b0b0b
	mov rbp, 0x0c0c0c0c0c0c0c0c
	mov rdi, 0x0d0d0d0d0d0d0d0d
	mov rsi, 0x0e0e0e0e0e0e0e0e
	mov rdx, 0x0f0f0f0f0f0f0f0f
	mov r8, 0x0808080808080808
	mov r9, 0x0909090909090909
	mov r10, 0x0a0a0a0a0a0a0a0a
	mov r12, 0x1212121212121212
	mov r13, 0x1313131313131313
	mov r14, 0x1414141414141414
	mov r15, 0x1515151515151515
.loop:
	mov eax, SYS_getpid
	std
	stc
	syscall
.after:
	pushf
	pop qword [flags]
	cld
	cmp rax, [first]
	jne .bad_result
	lea rax, [.after]
	cmp rcx, rax
	jne .bad_rcx
	mov rax, [flags]
	and eax, EFLAGS_CF | EFLAGS_DF
	cmp eax, EFLAGS_CF | EFLAGS_DF
	jne .bad_flags
	mov rax, r11
	and eax, EFLAGS_CF | EFLAGS_DF
	cmp eax, EFLAGS_CF | EFLAGS_DF
	jne .bad_r11
	mov rax, 0x0b0b0b0b0b0b0b0b
	cmp rbx, rax
	jne .bad_regs
	mov rax, 0x0c0c0c0c0c0c0c0c
	cmp rbp, rax
	jne .bad_regs
	mov rax, 0x0d0d0d0d0d0d0d0d
	cmp rdi, rax
	jne .bad_regs
	mov rax, 0x0e0e0e0e0e0e0e0e
	cmp rsi, rax
	jne .bad_regs
	mov rax, 0x0f0f0f0f0f0f0f0f
	cmp rdx, rax
	jne .bad_regs
	mov rax, 0x0808080808080808
	cmp r8, rax
	jne .bad_regs
	mov rax, 0x0909090909090909
	cmp r9, rax
	jne .bad_regs
	mov rax, 0x0a0a0a0a0a0a0a0a
	cmp r10, rax
	jne .bad_regs
	mov rax, 0x1212121212121212
	cmp r12, rax
	jne .bad_regs
	mov rax, 0x1313131313131313
	cmp r13, rax
	jne .bad_regs
	mov rax, 0x1414141414141414
	cmp r14, rax
	jne .bad_regs
	mov rax, 0x1515151515151515
	cmp r15, rax
	jne .bad_regs
%else
	mov ebx, 0x0b0b0b0b
	mov ecx, 0x0c0c0c0c
	mov edx, 0x0d0d0d0d
	mov esi, 0x0e0e0e0e
	mov edi, 0x0f0f0f0f
	mov ebp, 0x10101010
.loop:
	mov eax, SYS_getpid
	std
	stc
	int 0x80
	pushf
	pop dword [flags]
	cld
	cmp eax, [first]
	jne .bad_result
	mov eax, [flags]
	and eax, EFLAGS_CF | EFLAGS_DF
	cmp eax, EFLAGS_CF | EFLAGS_DF
	jne .bad_flags
	cmp ebx, 0x0b0b0b0b
	jne .bad_regs
	cmp ecx, 0x0c0c0c0c
	jne .bad_regs
	cmp edx, 0x0d0d0d0d
	jne .bad_regs
	cmp esi, 0x0e0e0e0e
	jne .bad_regs
	cmp edi, 0x0f0f0f0f
	jne .bad_regs
	cmp ebp, 0x10101010
	jne .bad_regs
%endif
	dec dword [count]
	jnz .loop
	PRINT "getpid: "
	PUTDEC CALLS
	PRINT " calls, same result, registers and CF/DF preserved"
%ifdef ARCH64
	PRINT ", rcx = return address, r11 = rflags"
%endif
	PRINT 10

	; umask: each call returns the previous mask
	SYS SYS_umask, 0
	mov dword [count], 1
.umask:
	mov eax, [count]
	and eax, 0o777
	SYS SYS_umask, xAX
	mov ecx, [count]
	dec ecx
	and ecx, 0o777
	cmp eax, ecx
	ASSERT e, "umask did not return the previous mask"
	inc dword [count]
	cmp dword [count], SMALL_CALLS
	jbe .umask
	PRINT "umask: "
	PUTDEC SMALL_CALLS
	PRINT " calls, each returned the previous mask", 10

	mov dword [count], SMALL_CALLS
.enosys:
	SYS UNKNOWN_SYSCALL
	cmp xAX, -38
	ASSERT e, "an unknown system call did not return -ENOSYS"
	dec dword [count]
	jnz .enosys
	PRINT "enosys: "
	PUTDEC SMALL_CALLS
	PRINT " calls of number "
	PUTDEC UNKNOWN_SYSCALL
	PRINT " returned -38", 10
	EXIT 0

.bad_result:
	cld
	PRINT "FAIL: getpid returned another value", 10
	EXIT 1
.bad_flags:
	PRINT "FAIL: CF or DF lost across the system call", 10
	EXIT 1
.bad_regs:
	PRINT "FAIL: a preserved register changed across the system call", 10
	EXIT 1
%ifdef ARCH64
.bad_rcx:
	PRINT "FAIL: rcx is not the return address after syscall", 10
	EXIT 1
.bad_r11:
	PRINT "FAIL: r11 does not hold RFLAGS after syscall", 10
	EXIT 1
%endif
