; Self-modifying code: every rewrite of code must be executed as written.
;   rewrite   an immediate rewritten 1000 times in a RWX page, the code
;             run after each rewrite (a translator or a shadow page must
;             notice each write to a page it has executed)
;   self      code that patches the instruction right after the store
;             (SDM vol. 3, 11.6: the store is seen by the next fetch)
;   loop      a loop that patches the immediate of its own add every
;             iteration, 300 iterations
;   mprotect  W^X: write in a RW page, mprotect RX, run, back to RW,
;             rewrite, RX, run
;   remap     munmap a code page and map a fresh page at the same address
;             (new contents must be executed, the old ones forgotten);
;             mremap a code page to another address and map a new page at
;             the old one; both run their own code
; Writing the code through a second (MAP_SHARED) mapping of the same
; page is not covered: the testbed's memory layer has no shared aliases.

%include "lib.inc"

%define MOV_EAX_IMM32 0xb8
%define RET 0xc3
%define REWRITES 1000
%define LOOP_ITERATIONS 300

section .bss
page:	resq 1
page2:	resq 1
page3:	resq 1
target:	resq 1
sum:	resd 1
count:	resd 1

section .text
global _start

; write_ret_imm: code "mov eax, ecx; ret" at xDI.
write_ret_imm:
	mov byte [xDI], MOV_EAX_IMM32
	mov [xDI + 1], ecx
	mov byte [xDI + 5], RET
	ret

; copy: xCX bytes from xSI to xDI.
copy:
	push xSI
	push xDI
	push xCX
	rep movsb
	pop xCX
	pop xDI
	pop xSI
	ret

_start:
	; rewrite
	MMAP 0, 8192, PROT_READ | PROT_WRITE | PROT_EXEC, 0
	cmp xAX, -4096
	ASSERT b, "mmap RWX"
	mov [page], xAX
	mov dword [sum], 0
	mov dword [count], 0
.rewrite:
	imul ecx, [count], 0x9e3779b1
	mov xDI, [page]
	call write_ret_imm
	call xDI
	imul ecx, [count], 0x9e3779b1
	cmp eax, ecx
	ASSERT e, "rewritten immediate not executed"
	add [sum], eax
	rol dword [sum], 3
	inc dword [count]
	cmp dword [count], REWRITES
	jb .rewrite
	PRINT "rewrite: "
	PUTDEC REWRITES
	PRINT " versions, sum "
	PUTHEX [sum]
	PRINT 10

	; self: three fresh copies, each patches itself once
	mov dword [count], 0
.self:
	lea xSI, [tmpl_self]
	mov xDI, [page]
	add xDI, 256
	mov xCX, tmpl_self_end - tmpl_self
	call copy
	xor eax, eax
	call xDI
	cmp eax, 0x42
	ASSERT e, "store to the next instruction not seen"
	inc dword [count]
	cmp dword [count], 3
	jb .self
	PRINT "self: patched instruction executed 3 times", 10

	; loop
	lea xSI, [tmpl_loop]
	mov xDI, [page]
	add xDI, 4096 + 64
	mov xCX, tmpl_loop_end - tmpl_loop
	call copy
	mov ecx, LOOP_ITERATIONS
	call xDI
	PRINT "loop: "
	PUTDEC LOOP_ITERATIONS
	PRINT " self-patching iterations, sum "
	PUTHEX eax
	PRINT 10
	; again from the code as the loop left it
	mov ecx, LOOP_ITERATIONS
	call xDI
	PRINT "loop: second run from the patched code, sum "
	PUTHEX eax
	PRINT 10

	; mprotect
	MMAP 0, 4096, PROT_READ | PROT_WRITE, 0
	cmp xAX, -4096
	ASSERT b, "mmap RW"
	mov [page2], xAX
	mov xDI, xAX
	mov ecx, 0x1111
	call write_ret_imm
	SYS SYS_mprotect, [page2], 4096, PROT_READ | PROT_EXEC
	test xAX, xAX
	ASSERT z, "mprotect RX"
	call [page2]
	mov [sum], eax
	SYS SYS_mprotect, [page2], 4096, PROT_READ | PROT_WRITE
	test xAX, xAX
	ASSERT z, "mprotect RW"
	mov xDI, [page2]
	mov ecx, 0x2222
	call write_ret_imm
	SYS SYS_mprotect, [page2], 4096, PROT_READ | PROT_EXEC
	test xAX, xAX
	ASSERT z, "mprotect RX again"
	call [page2]
	PRINT "mprotect: "
	PUTHEX [sum]
	PRINT " then "
	PUTHEX eax
	PRINT 10

	; remap: a fresh page at the same address
	SYS SYS_munmap, [page2], 4096
	test xAX, xAX
	ASSERT z, "munmap"
	MMAP [page2], 4096, PROT_READ | PROT_WRITE | PROT_EXEC, MAP_FIXED
	cmp xAX, [page2]
	ASSERT e, "mmap MAP_FIXED at the old address"
	mov xDI, xAX
	movzx eax, byte [xDI]
	test eax, eax
	ASSERT z, "a fresh anonymous page is not zero"
	mov ecx, 0x3333
	call write_ret_imm
	call [page2]
	PRINT "remap: fresh page at the old address runs "
	PUTHEX eax
	PRINT 10

	; remap: mremap a code page elsewhere, new page at the old address
	MMAP 0, 4096, PROT_READ | PROT_WRITE | PROT_EXEC, 0
	cmp xAX, -4096
	ASSERT b, "mmap page3"
	mov [page3], xAX
	mov xDI, xAX
	mov ecx, 0x4444
	call write_ret_imm
	call [page3]
	cmp eax, 0x4444
	ASSERT e, "page3 code"
	MMAP 0, 4096, PROT_READ, 0
	cmp xAX, -4096
	ASSERT b, "mmap target"
	mov [target], xAX
%ifdef ARCH64
	SYS SYS_mremap, [page3], 4096, 4096, MREMAP_MAYMOVE | MREMAP_FIXED, [target]
%else
	SYS SYS_mremap, [page3], 4096, 4096, MREMAP_MAYMOVE | MREMAP_FIXED, [target]
%endif
	cmp xAX, [target]
	ASSERT e, "mremap to the target"
	MMAP [page3], 4096, PROT_READ | PROT_WRITE | PROT_EXEC, MAP_FIXED
	cmp xAX, [page3]
	ASSERT e, "mmap at the old address of the moved page"
	mov xDI, xAX
	mov ecx, 0x5555
	call write_ret_imm
	call [target]
	mov [sum], eax
	call [page3]
	PRINT "remap: moved page runs "
	PUTHEX [sum]
	PRINT ", new page at its old address runs "
	PUTHEX eax
	PRINT 10
	EXIT 0

; Templates, copied into the RWX page and run there (position-independent).
tmpl_self:
%ifdef ARCH64
	mov byte [rel .patched + 1], 0x42
.patched:
	mov al, 0x11
	ret
%else
	call .here
.here:
	pop edx
	mov byte [edx + .patched + 1 - .here], 0x42
.patched:
	mov al, 0x11
	ret
%endif
tmpl_self_end:

; ecx iterations; returns the sum of the immediates the add executed.
tmpl_loop:
%ifndef ARCH64
	call .here
.here:
	pop edx
%endif
	xor eax, eax
.top:
.add:
	add eax, strict byte 1
%ifdef ARCH64
	inc byte [rel .add + 2]
%else
	inc byte [edx + .add + 2 - .here]
%endif
	dec ecx
	jnz .top
	ret
tmpl_loop_end:
