; The stack at the top of the 32-bit user space (i386 only): two pages
; mapped just below 0xC0000000 (the i386 Linux 3 GiB limit, which is the
; testbed's) and ESP moved to 0xC0000000 itself.  With that stack:
; 200 nested calls, a system call, write(2) of a buffer that ends at the
; last byte below 0xC0000000, a pipe read into that buffer, and a fork
; whose child checks the top words.  Last, a mapping *at* 0xC0000000: an
; x86_64 Linux host gives a 32-bit program 4 GiB, so it succeeds there
; ("map at c0000000: ok"); under a 3 GiB limit it fails (-ENOMEM, -12).

%include "lib.inc"

%ifdef ARCH64
%error "stacktop.asm is i386 only"
%endif

%define TOP 0xc0000000
%define DEPTH 200

section .rodata
message: db "written from the top of the 3 GiB space", 10
message_len equ $ - message

section .bss
saved_esp: resd 1
fds:	resd 2

section .text
global _start

; recurse: ecx levels deep, each pushing its level; returns the sum.
recurse:
	test ecx, ecx
	jz .bottom
	push ecx
	dec ecx
	call recurse
	pop ecx
	add eax, ecx
	ret
.bottom:
	xor eax, eax
	ret

child:
	cmp dword [TOP - 4], 0xc0ffee
	jne .bad
	push dword 0x1234
	pop eax
	cmp eax, 0x1234
	jne .bad
	EXIT 0
.bad:
	EXIT 1

_start:
	MMAP TOP - 8192, 8192, PROT_READ | PROT_WRITE, MAP_FIXED
	cmp eax, TOP - 8192
	ASSERT e, "mmap below 0xc0000000"
	mov [saved_esp], esp
	mov esp, TOP
	mov ecx, DEPTH
	call recurse
	PRINT "calls: depth "
	PUTDEC DEPTH
	PRINT ", sum "
	PUTDEC eax
	PRINT 10
	cmp esp, TOP
	ASSERT e, "esp not back at the top"
	SYS SYS_getpid
	test eax, eax
	ASSERT g, "getpid with esp at the top"
	cmp esp, TOP
	ASSERT e, "esp changed by the system call"
	PRINT "syscall: esp at 0xc0000000 kept", 10
	FLUSH
	; write(2) from a buffer whose last byte is at TOP - 1
	mov esi, message
	mov edi, TOP - message_len
	mov ecx, message_len
	rep movsb
	SYS SYS_write, 1, TOP - message_len, message_len
	cmp eax, message_len
	ASSERT e, "write from the top"
	; a pipe read into the same buffer
	mov edi, TOP - message_len
	mov ecx, message_len
	xor eax, eax
	rep stosb
	SYS SYS_pipe, fds
	test eax, eax
	ASSERT z, "pipe"
	SYS SYS_write, [fds + 4], message, message_len
	cmp eax, message_len
	ASSERT e, "write to the pipe"
	SYS SYS_read, [fds], TOP - message_len, message_len
	cmp eax, message_len
	ASSERT e, "read from the pipe"
	mov esi, message
	mov edi, TOP - message_len
	mov ecx, message_len
	repe cmpsb
	ASSERT e, "pipe data read into the top differs"
	PRINT "pipe: read into the last bytes below 0xc0000000", 10
	; the top word holds a marker the child must see; the stack goes on below it
	mov dword [TOP - 4], 0xc0ffee
	mov esp, TOP - 4
	mov eax, child
	call run_child
	PRINT "fork: child "
	call put_status
	PRINT 10
	mov esp, [saved_esp]
	MMAP TOP, 4096, PROT_READ | PROT_WRITE, MAP_FIXED
	PRINT "map at c0000000: "
	cmp eax, TOP
	jne .refused
	PRINT "ok", 10
	EXIT 0
.refused:
	PUTSDEC eax
	PRINT 10
	EXIT 0
