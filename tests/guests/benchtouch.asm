; Benchmark (tests/testbed/bench): touches 64 MiB of fresh anonymous
; memory, one write per 4 KiB page, so every write is the page's first
; access: one page fault per page.  Exits 0; prints nothing.

%include "lib.inc"

%define SIZE (64 << 20)
%define PAGE 4096

section .text
global _start
_start:
	MMAP 0, SIZE, PROT_READ | PROT_WRITE, 0
	cmp xAX, -4096
	ASSERT b, "mmap of 64 MiB"
	mov xDI, xAX
	mov xBP, SIZE / PAGE
.touch:
	mov byte [xDI], 1
	add xDI, PAGE
	dec xBP
	jnz .touch
	EXIT 0
