; Benchmark (tests/testbed/bench): two processes, each with its own page
; tables (fork), each making CALLS getpid calls.  With the runner's
; --switch-every N the testbed's scheduler alternates between them every
; N calls, so the CPU (native or the monitor) switches guest CR3 that
; often.  The parent waits for the child; exits 0 when the child did.

%include "lib.inc"

%define CALLS 100000

section .bss
child:	resq 1

section .text
global _start
_start:
	SYS SYS_fork
	test xAX, xAX
	ASSERT ns, "fork"
	mov [child], xAX
	mov xBP, CALLS
.loop:
	SYS SYS_getpid
	dec xBP
	jnz .loop
	mov xAX, [child]
	test xAX, xAX
	jz .done
	lea xCX, [wait_status]
%ifdef ARCH64
	SYS SYS_wait4, rax, rcx, 0, 0
%else
	SYS SYS_wait4, eax, ecx, 0, 0
%endif
	test xAX, xAX
	ASSERT ns, "wait4"
	mov eax, [wait_status]
	test eax, eax
	ASSERT z, "the child's status"
.done:
	EXIT 0
