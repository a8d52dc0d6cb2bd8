/* AVX state without a register operand. */
	.text
	.globl	bad_vzeroupper
bad_vzeroupper:
	vzeroupper
	ret
