/* Loads MXCSR: not on the save/restore allow-list. */
	.text
	.globl	bad_ldmxcsr
bad_ldmxcsr:
	ldmxcsr	(%rdi)
	ret
