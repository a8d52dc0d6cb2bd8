; A guest that spins forever without a system call or a fault: only the
; timer can take the CPU back.  Natively the testbed stops it at its time
; limit with SIGXCPU (status 152), as Linux does at RLIMIT_CPU; the
; monitor must return KQEMU_RET_INTR to its client and never hang.

%include "lib.inc"

section .text
global _start
_start:
	xor eax, eax
.spin:
	inc eax
	jmp .spin
