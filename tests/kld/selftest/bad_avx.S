	.text
	.globl	bad_avx
bad_avx:
	vpxor	%ymm0, %ymm0, %ymm0
	ret
