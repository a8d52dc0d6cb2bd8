/* R_X86_64_32: a zero-extended 32-bit absolute address. */
	.text
	.globl	bad_r32
bad_r32:
	movl	$bad_r32, %eax
	ret
