	.text
	.globl	bad_x87
bad_x87:
	fninit
	ret
