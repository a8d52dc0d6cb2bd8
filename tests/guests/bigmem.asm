; Huge mappings and mremap.
;   map     mmap 64 MiB anonymous, write a word at both ends of every page,
;           read them all back
;   grow    mremap to 96 MiB (MREMAP_MAYMOVE): the old 64 MiB keep their
;           contents wherever the mapping went, the new 32 MiB are zero and
;           writable
;   shrink  mremap to 16 MiB: in place, the first 16 MiB unchanged
;   move    mremap(MREMAP_MAYMOVE | MREMAP_FIXED) onto another mapping:
;           contents follow; the old range is gone (mprotect on it fails
;           with ENOMEM, a child reading it gets SIGSEGV)
; Printed: page counts and results, no addresses.

%include "lib.inc"

%define PAGE 4096
%define BIG (64 << 20)
%define GROWN (96 << 20)
%define SHRUNK (16 << 20)

section .bss
base:	resq 1
target:	resq 1
old:	resq 1

section .text
global _start

; fill: pages [ecx, ecx + edx) of the mapping at xDI (page ecx at
; xDI + ecx * PAGE): word 0 = tag(page), last word = ~page.
fill:
	push xAX
	push xCX
	push xDX
	push xSI
.page:
	mov eax, ecx
	shl xAX, 12
	lea xSI, [xDI + xAX]
	imul eax, ecx, 0x9e3779b1
	xor eax, 0x5a5a5a5a
	mov [xSI], eax
	mov eax, ecx
	not eax
	mov [xSI + PAGE - 4], eax
	inc ecx
	dec edx
	jnz .page
	pop xSI
	pop xDX
	pop xCX
	pop xAX
	ret

; verify: as fill, with xSI; eax = number of pages that differ.
verify:
	push xCX
	push xDX
	push xDI
	push xBX
	xor ebx, ebx
.page:
	mov eax, ecx
	shl xAX, 12
	lea xDI, [xSI + xAX]
	imul eax, ecx, 0x9e3779b1
	xor eax, 0x5a5a5a5a
	cmp [xDI], eax
	jne .bad
	mov eax, ecx
	not eax
	cmp [xDI + PAGE - 4], eax
	je .next
.bad:
	inc ebx
.next:
	inc ecx
	dec edx
	jnz .page
	mov eax, ebx
	pop xBX
	pop xDI
	pop xDX
	pop xCX
	ret

; zero_pages: eax = number of pages in [ecx, ecx + edx) at xSI with a
; nonzero first or last word.
zero_pages:
	push xCX
	push xDX
	push xDI
	push xBX
	xor ebx, ebx
.page:
	mov eax, ecx
	shl xAX, 12
	lea xDI, [xSI + xAX]
	mov eax, [xDI]
	or eax, [xDI + PAGE - 4]
	jz .next
	inc ebx
.next:
	inc ecx
	dec edx
	jnz .page
	mov eax, ebx
	pop xBX
	pop xDI
	pop xDX
	pop xCX
	ret

read_old:
	mov xAX, [old]
	mov eax, [xAX]
	EXIT SURVIVED

_start:
	MMAP 0, BIG, PROT_READ | PROT_WRITE, 0
	cmp xAX, -4096
	ASSERT b, "mmap 64 MiB"
	mov [base], xAX
	mov xDI, xAX
	xor ecx, ecx
	mov edx, BIG / PAGE
	call fill
	mov xSI, [base]
	call verify
	PRINT "map: "
	PUTDEC BIG / PAGE
	PRINT " pages written, "
	PUTDEC xAX
	PRINT " differ", 10

	SYS SYS_mremap, [base], BIG, GROWN, MREMAP_MAYMOVE
	cmp xAX, -4096
	ASSERT b, "mremap grow"
	mov [base], xAX
	mov xSI, xAX
	mov ecx, BIG / PAGE
	mov edx, (GROWN - BIG) / PAGE
	call zero_pages
	PRINT "grow: "
	PUTDEC xAX
	PRINT " new pages not zero, "
	mov xDI, [base]
	call fill
	xor ecx, ecx
	mov edx, GROWN / PAGE
	call verify
	PUTDEC GROWN / PAGE
	PRINT " pages checked, "
	PUTDEC xAX
	PRINT " differ", 10

	SYS SYS_mremap, [base], GROWN, SHRUNK, 0
	cmp xAX, [base]
	ASSERT e, "mremap shrink did not stay in place"
	mov xSI, xAX
	xor ecx, ecx
	mov edx, SHRUNK / PAGE
	call verify
	PRINT "shrink: in place, "
	PUTDEC SHRUNK / PAGE
	PRINT " pages checked, "
	PUTDEC xAX
	PRINT " differ", 10
	; the released tail is unmapped
	mov xAX, [base]
	add xAX, SHRUNK
	mov [old], xAX
	SYS SYS_mprotect, [old], PAGE, PROT_READ
	PRINT "shrink: mprotect of the released tail "
	PUTSDEC xAX
	PRINT 10

	MMAP 0, SHRUNK, PROT_READ, 0
	cmp xAX, -4096
	ASSERT b, "mmap target"
	mov [target], xAX
%ifdef ARCH64
	SYS SYS_mremap, [base], SHRUNK, SHRUNK, MREMAP_MAYMOVE | MREMAP_FIXED, [target]
%else
	SYS SYS_mremap, [base], SHRUNK, SHRUNK, MREMAP_MAYMOVE | MREMAP_FIXED, [target]
%endif
	cmp xAX, [target]
	ASSERT e, "mremap move to the target"
	mov xSI, xAX
	xor ecx, ecx
	mov edx, SHRUNK / PAGE
	call verify
	PRINT "move: "
	PUTDEC SHRUNK / PAGE
	PRINT " pages checked, "
	PUTDEC xAX
	PRINT " differ", 10
	mov xAX, [base]
	mov [old], xAX
	SYS SYS_mprotect, [old], PAGE, PROT_READ
	PRINT "move: mprotect of the old range "
	PUTSDEC xAX
	PRINT ", child reading it: "
	lea xAX, [read_old]
	call run_child
	call put_status
	PRINT 10
	SYS SYS_munmap, [target], SHRUNK
	PRINT "munmap "
	PUTSDEC xAX
	PRINT 10
	EXIT 0
