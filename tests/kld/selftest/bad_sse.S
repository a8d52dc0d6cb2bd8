	.text
	.globl	bad_sse
bad_sse:
	addps	%xmm1, %xmm0
	ret
