/*
 * Instructions the fpu-instructions check must NOT flag: saving/restoring
 * the whole FPU state (the allow-list) and integer-side instructions that
 * share names or encodings with SSE (fences, prefetch, non-temporal integer
 * store, crc32, popcnt, clflush).
 */
	.text
	.globl	fpu_state_ok
fpu_state_ok:
	fxsave	(%rdi)
	fxrstor	(%rdi)
	fxsave64 (%rdi)
	fxrstor64 (%rdi)
	xsave	(%rdi)
	xsave64	(%rdi)
	xsaveopt (%rdi)
	xsavec	(%rdi)
	xsaves	(%rdi)
	xrstor	(%rdi)
	xrstor64 (%rdi)
	xrstors	(%rdi)
	xgetbv
	mfence
	lfence
	sfence
	prefetchnta (%rdi)
	clflush	(%rdi)
	movnti	%rax, (%rdi)
	crc32q	%rax, %rax
	popcntq	%rax, %rax
	movq	%fs:0, %rax
	ret
