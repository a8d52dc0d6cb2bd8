; SSE, AVX and x87 arithmetic with results that are exact (IEEE basic
; operations and square roots only: rcpps/rsqrtps and x87 transcendentals
; are implementation-specific, so they are not used), printed as
; checksums; the AVX path computes the same vectors with 256-bit VEX code
; and must give the same bytes as SSE.  Then the register state
; (XMM0-7/15, the YMM upper halves when AVX is on, MXCSR, the x87 control
; word) must survive system calls, timer interrupts and a forked child
; doing the same with other values.
;
; Output: the same on every CPU except the line "avx: yes" / "avx: no"
; (CPUID.1:ECX.AVX and OSXSAVE, and XCR0 enabling x87|SSE|AVX state).

%include "lib.inc"

%define N 32
%ifdef ARCH64
%define NXMM 16
%else
%define NXMM 8
%endif
; Guest TSC cycles spent spinning between system-call bursts: ten rounds
; of this cross several 10 ms timer ticks.
%define SPIN_CYCLES 5000000
%define CPUID1_ECX_OSXSAVE (1 << 27)
%define CPUID1_ECX_AVX (1 << 28)
%define XCR0_SSE_AVX 6

section .data
align 32
absmask: times 8 dd 0x7fffffff
three:	times 8 dd 3.0
one_s:	dd 1.0
three_s: dd 3.0
one_d:	dq 1.0
three_d: dq 3.0

section .bss
alignb 32
A:	resd N
B:	resd N
C_sse:	resd N
D_sse:	resq N
E_sse:	resd N
C_avx:	resd N
D_avx:	resq N
pattern: resb 32 * NXMM
saved:	resb 32 * NXMM
x87res:	resb 16
scratch: resd 4
have_avx: resd 1
seed:	resd 1
rounds:	resd 1
t0:	resd 1

section .text
global _start

; checksum: eax = hash of xCX dwords at xSI.
checksum:
	push xSI
	push xCX
	push xDX
	mov eax, 0x811c9dc5
.next:
	rol eax, 5
	xor eax, [xSI]
	imul eax, eax, 0x01000193
	add xSI, 4
	dec xCX
	jnz .next
	pop xDX
	pop xCX
	pop xSI
	ret

_start:
	; inputs: small integers, exact as floats
	xor ecx, ecx
.gen:
	imul eax, ecx, 37
	xor edx, edx
	mov ebx, 101
	div ebx
	sub edx, 50
	cvtsi2ss xmm0, edx
	lea xDI, [A]
	movss [xDI + xCX * 4], xmm0
	imul eax, ecx, 53
	xor edx, edx
	mov ebx, 89
	div ebx
	inc edx
	cvtsi2ss xmm0, edx
	lea xDI, [B]
	movss [xDI + xCX * 4], xmm0
	inc ecx
	cmp ecx, N
	jb .gen

	; SSE: C = sqrt(|A*B + A|) / (B + 3), D = C*C + A in double
	xor esi, esi
.sse:
	lea xDI, [A]
	movaps xmm0, [xDI + xSI * 4]
	lea xDI, [B]
	movaps xmm1, [xDI + xSI * 4]
	movaps xmm2, xmm0
	mulps xmm2, xmm1
	addps xmm2, xmm0
	andps xmm2, [absmask]
	sqrtps xmm2, xmm2
	movaps xmm3, xmm1
	addps xmm3, [three]
	divps xmm2, xmm3
	lea xDI, [C_sse]
	movaps [xDI + xSI * 4], xmm2
	cvtps2pd xmm4, xmm2
	movhlps xmm5, xmm2
	cvtps2pd xmm5, xmm5
	cvtps2pd xmm6, xmm0
	movhlps xmm7, xmm0
	cvtps2pd xmm7, xmm7
	mulpd xmm4, xmm4
	addpd xmm4, xmm6
	mulpd xmm5, xmm5
	addpd xmm5, xmm7
	lea xDI, [D_sse]
	movapd [xDI + xSI * 8], xmm4
	movapd [xDI + xSI * 8 + 16], xmm5
	; integer: products, shifts, compares, packs, sums of differences
	lea xDI, [A]
	movdqa xmm0, [xDI + xSI * 4]
	lea xDI, [B]
	movdqa xmm1, [xDI + xSI * 4]
	movdqa xmm2, xmm0
	pmuludq xmm2, xmm1
	pshufd xmm3, xmm0, 0xb1
	pshufd xmm4, xmm1, 0xb1
	pmuludq xmm3, xmm4
	paddq xmm2, xmm3
	psllq xmm3, 7
	pxor xmm2, xmm3
	movdqa xmm5, xmm0
	pcmpgtd xmm5, xmm1
	pand xmm5, xmm1
	paddd xmm2, xmm5
	movdqa xmm6, xmm0
	packssdw xmm6, xmm1
	pmaddwd xmm6, xmm6
	paddd xmm2, xmm6
	psadbw xmm0, xmm1
	paddq xmm2, xmm0
	lea xDI, [E_sse]
	movdqa [xDI + xSI * 4], xmm2
	add esi, 4
	cmp esi, N
	jb .sse

	PRINT "sse float "
	lea xSI, [C_sse]
	mov ecx, N
	call checksum
	PUTHEX eax
	PRINT " double "
	lea xSI, [D_sse]
	mov ecx, 2 * N
	call checksum
	PUTHEX eax
	PRINT " integer "
	lea xSI, [E_sse]
	mov ecx, N
	call checksum
	PUTHEX eax
	PRINT 10

	; rounding modes: MXCSR.RC round down, x87 RC round up
	stmxcsr [scratch]
	mov eax, [scratch]
	and eax, ~(3 << 13)
	or eax, 1 << 13
	mov [scratch + 4], eax
	ldmxcsr [scratch + 4]
	movss xmm0, [one_s]
	divss xmm0, [three_s]
	movsd xmm1, [one_d]
	divsd xmm1, [three_d]
	ldmxcsr [scratch]
	movss [scratch + 8], xmm0
	PRINT "round down 1/3: single "
	PUTHEX [scratch + 8]
	movsd [x87res], xmm1
	PRINT " double "
	PUTHEX [x87res + 4]
	PUTHEX [x87res]
	PRINT 10
	fninit
	fnstcw [scratch]
	and word [scratch], ~(3 << 10)
	or word [scratch], 2 << 10
	fldcw [scratch]
	fld1
	fld dword [three_s]
	fdivp st1, st0
	fstp dword [scratch + 8]
	PRINT "x87 round up 1/3: single "
	PUTHEX [scratch + 8]
	PRINT 10

	; x87: sqrt of the sum of D*D + 1/(|D|+1) over all D, in extended precision
	fninit
	fldz
	xor ecx, ecx
.x87:
	lea xSI, [D_sse]
	fld qword [xSI + xCX * 8]
	fld st0
	fmul st0, st0
	fxch st1
	fabs
	fld1
	faddp st1, st0
	fld1
	fdivrp st1, st0
	faddp st1, st0
	faddp st1, st0
	inc ecx
	cmp ecx, N
	jb .x87
	fsqrt
	fstp tword [x87res]
	PRINT "x87 extended "
	movzx eax, word [x87res + 8]
	PUTHEX eax
	PUTHEX [x87res + 4]
	PUTHEX [x87res]
	PRINT 10

	; AVX
	mov dword [have_avx], 0
	mov eax, 1
	cpuid
	and ecx, CPUID1_ECX_OSXSAVE | CPUID1_ECX_AVX
	cmp ecx, CPUID1_ECX_OSXSAVE | CPUID1_ECX_AVX
	jne .no_avx
	xor ecx, ecx
	xgetbv
	and eax, XCR0_SSE_AVX
	cmp eax, XCR0_SSE_AVX
	jne .no_avx
	mov dword [have_avx], 1
	xor esi, esi
.avx:
	lea xDI, [A]
	vmovaps ymm0, [xDI + xSI * 4]
	lea xDI, [B]
	vmovaps ymm1, [xDI + xSI * 4]
	vmulps ymm2, ymm0, ymm1
	vaddps ymm2, ymm2, ymm0
	vandps ymm2, ymm2, [absmask]
	vsqrtps ymm2, ymm2
	vaddps ymm3, ymm1, [three]
	vdivps ymm2, ymm2, ymm3
	lea xDI, [C_avx]
	vmovaps [xDI + xSI * 4], ymm2
	vcvtps2pd ymm4, xmm2
	vextractf128 xmm5, ymm2, 1
	vcvtps2pd ymm5, xmm5
	vcvtps2pd ymm6, xmm0
	vextractf128 xmm7, ymm0, 1
	vcvtps2pd ymm7, xmm7
	vmulpd ymm4, ymm4, ymm4
	vaddpd ymm4, ymm4, ymm6
	vmulpd ymm5, ymm5, ymm5
	vaddpd ymm5, ymm5, ymm7
	lea xDI, [D_avx]
	vmovapd [xDI + xSI * 8], ymm4
	vmovapd [xDI + xSI * 8 + 32], ymm5
	add esi, 8
	cmp esi, N
	jb .avx
	vzeroupper
	lea xSI, [C_sse]
	lea xDI, [C_avx]
	mov ecx, 4 * N
	repe cmpsb
	ASSERT e, "AVX float results differ from SSE"
	lea xSI, [D_sse]
	lea xDI, [D_avx]
	mov ecx, 8 * N
	repe cmpsb
	ASSERT e, "AVX double results differ from SSE"
	PRINT "avx: yes", 10
	jmp .state
.no_avx:
	PRINT "avx: no", 10

.state:
	FLUSH
	SYS SYS_fork
	test xAX, xAX
	ASSERT ns, "fork"
	mov xBX, xAX
	mov dword [seed], 1
	test xAX, xAX
	jnz .seeded
	mov dword [seed], 2
.seeded:
	call state_check
	test xBX, xBX
	jnz .parent
	test eax, eax
	jnz .child_bad
	EXIT 0
.child_bad:
	EXIT 1
.parent:
	test eax, eax
	ASSERT z, "register state changed across system calls or timer interrupts"
	lea xCX, [wait_status]
%ifdef ARCH64
	SYS SYS_wait4, rbx, rcx, 0, 0
%else
	SYS SYS_wait4, ebx, ecx, 0, 0
%endif
	test xAX, xAX
	ASSERT ns, "wait4"
	cmp dword [wait_status], 0
	ASSERT e, "the forked child's register state changed"
	PRINT "state: vector registers, mxcsr and x87 control word kept across system calls, timer interrupts and fork", 10
	EXIT 0

; state_check: loads registers from a pattern made of [seed], makes
; system calls and spins through timer ticks, then compares; eax = 0 if
; everything held.
state_check:
	mov ecx, 8 * NXMM
	lea xDI, [pattern]
	mov edx, [seed]
	imul edx, edx, 0x01010101
.fill:
	mov eax, ecx
	shl eax, 16
	xor eax, edx
	mov [xDI], eax
	add xDI, 4
	dec ecx
	jnz .fill
	lea xSI, [pattern]
	cmp dword [have_avx], 0
	je .load_sse
%assign k 0
%rep NXMM
	vmovdqu ymm %+ k, [xSI + 32 * k]
%assign k k + 1
%endrep
	jmp .loaded
.load_sse:
%assign k 0
%rep NXMM
	movdqu xmm %+ k, [xSI + 32 * k]
%assign k k + 1
%endrep
.loaded:
	; MXCSR rounding control and x87 rounding control from the seed
	mov eax, [seed]
	shl eax, 13
	or eax, 0x1f80
	mov [scratch], eax
	ldmxcsr [scratch]
	fninit
	mov eax, [seed]
	shl eax, 10
	or eax, 0x037f
	mov [scratch + 4], eax
	fldcw [scratch + 4]

	mov dword [rounds], 10
.round:
	mov ebp, 200
.calls:
	SYS SYS_getpid
	dec ebp
	jnz .calls
	rdtsc
	mov [t0], eax
.spin:
	rdtsc
	sub eax, [t0]
	cmp eax, SPIN_CYCLES
	jb .spin
	dec dword [rounds]
	jnz .round

	lea xDI, [saved]
	cmp dword [have_avx], 0
	je .store_sse
%assign k 0
%rep NXMM
	vmovdqu [xDI + 32 * k], ymm %+ k
%assign k k + 1
%endrep
	vzeroupper
	jmp .compare
.store_sse:
	; without AVX only the low halves are state: copy the pattern's upper ones
%assign k 0
%rep NXMM
	movdqu [xDI + 32 * k], xmm %+ k
%assign k k + 1
%endrep
%assign k 0
%rep NXMM
	movdqu xmm0, [xSI + 32 * k + 16]
	movdqu [xDI + 32 * k + 16], xmm0
%assign k k + 1
%endrep
.compare:
	lea xSI, [pattern]
	lea xDI, [saved]
	mov ecx, 32 * NXMM
	repe cmpsb
	jne .bad
	stmxcsr [scratch + 8]
	mov eax, [scratch + 8]
	cmp eax, [scratch]
	jne .bad
	fnstcw [scratch + 12]
	movzx eax, word [scratch + 12]
	cmp eax, [scratch + 4]
	jne .bad
	xor eax, eax
	ret
.bad:
	mov eax, 1
	ret
