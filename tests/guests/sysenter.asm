; sysenter from a 32-bit program (i386 only), the way the vDSO's
; __kernel_vsyscall does it: push ecx, edx, ebp; ebp = esp; sysenter.
; Linux returns to the vDSO's landing pad, which pops ebp, edx, ecx and
; returns to the caller (the same pops follow the sysenter here, for a
; kernel that returns right after it).  Expected: on Linux (Intel CPU)
; both lines and exit 0; the testbed sets no SYSENTER MSRs, so natively
; the instruction raises #GP: only the first line and SIGSEGV (139).
; Under the monitor the client must get KQEMU_RET_SYSCALL as kqemu gives it.

%include "lib.inc"

%ifdef ARCH64
%error "sysenter.asm is i386 only"
%endif

section .text
global _start
_start:
	PRINT "sysenter: getpid through the vDSO convention", 10
	FLUSH
	call vsyscall
	test eax, eax
	ASSERT g, "sysenter getpid returned an error"
	PRINT "sysenter: returned a pid", 10
	EXIT 0

vsyscall:
	push ecx
	push edx
	push ebp
	mov ebp, esp
	mov eax, SYS_getpid
	sysenter
	pop ebp
	pop edx
	pop ecx
	ret
