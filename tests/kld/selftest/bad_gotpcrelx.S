/* An indirect call through the GOT: R_X86_64_GOTPCRELX. */
	.text
	.globl	bad_gotpcrelx
bad_gotpcrelx:
	call	*bad_gotpcrelx@GOTPCREL(%rip)
	ret
