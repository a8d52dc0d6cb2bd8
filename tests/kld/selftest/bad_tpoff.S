/* Thread-local storage: R_X86_64_TPOFF32 (no TLS in the kernel). */
	.section .tbss,"awT",@nobits
	.p2align 3
bad_tls:
	.zero	8
	.text
	.globl	bad_tpoff
bad_tpoff:
	movq	%fs:bad_tls@TPOFF, %rax
	ret
