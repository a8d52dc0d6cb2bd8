/* A GOT-relative load: R_X86_64_GOTPCREL, or REX_GOTPCRELX when relaxable. */
	.text
	.globl	bad_gotpcrel
bad_gotpcrel:
	movq	bad_gotpcrel@GOTPCREL(%rip), %rax
	ret
