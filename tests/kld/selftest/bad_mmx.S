	.text
	.globl	bad_mmx
bad_mmx:
	paddb	%mm1, %mm0
	ret
