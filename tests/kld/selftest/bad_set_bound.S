/* A linker-set bound for a set the module does not have. */
	.weak	__start_set_nosuch_set
	.text
	.globl	bad_set_bound
bad_set_bound:
	movq	$__start_set_nosuch_set, %rax
	ret
