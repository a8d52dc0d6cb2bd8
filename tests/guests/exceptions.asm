; Every exception vector a user program can raise, one case per vector and
; way of raising it.  `exceptions` runs each case in a forked child and
; prints "<case>: signal N" (or "exit N" when the child exited); with a
; case name as argument, the program runs that case itself, so its own
; exit status is 128 + the signal.
;
; Expected on Linux (arch/x86/kernel/traps.c picks the signal):
;   de-div        #DE  div by zero                           SIGFPE  8
;   de-idiv       #DE  INT_MIN / -1 overflows                SIGFPE  8
;   db-tf         #DB  TF set with popf, single step         SIGTRAP 5
;   db-tf-sys     #DB  TF set across a system call           SIGTRAP 5
;   db-icebp      #DB  icebp (0xf1)                          SIGTRAP 5
;   bp-int3       #BP  int3 (0xcc)                           SIGTRAP 5
;   bp-int-3      #BP  int 3 (0xcd 0x03)                     SIGTRAP 5
;   of-into       #OF  into with OF=1 (i386; amd64: #UD)     SIGSEGV 11 (amd64 SIGILL 4)
;   br-bound      #BR  bound out of range (i386 only)        SIGSEGV 11
;   ud-ud2        #UD  ud2                                   SIGILL  4
;   ud-lock       #UD  lock prefix on nop                    SIGILL  4
;   np-ldt        #NP  load DS from a not-present LDT entry  SIGBUS  7
;                      (modify_ldt; exit errno if it fails)
;   np-tls        #NP  the same through set_thread_area; Linux refuses
;                      not-present TLS entries               exit 22 (EINVAL; amd64:
;                      38, ENOSYS: x86_64 has no set_thread_area)
;   ss-ldt        #SS  load SS from a not-present LDT entry  SIGBUS  7
;   ss-tls        #SS  the same through set_thread_area      exit 22 / 38 as np-tls
;   ss-limit      #SS  push below a 4 KiB stack segment      SIGBUS  7 (i386 only)
;   ss-noncanon   #SS  push with a non-canonical RSP         SIGBUS  7 (amd64 only)
;   gp-selector   #GP  load DS with a selector past the GDT  SIGSEGV 11
;   gp-no-ldt     #GP  load DS from the LDT when none is set SIGSEGV 11
;   gp-far-null   #GP  far jump to the null selector         SIGSEGV 11
;   gp-int81      #GP  int 0x81 (a DPL-0 gate)               SIGSEGV 11
;   gp-hlt        #GP  hlt at CPL 3                          SIGSEGV 11
;   gp-noncanon   #GP  load from a non-canonical address     SIGSEGV 11 (amd64 only)
;   pf-read       #PF  load from address 0                   SIGSEGV 11
;   pf-write      #PF  store into the program's text         SIGSEGV 11
;   pf-exec       #PF  call into a PROT_READ|PROT_WRITE page SIGSEGV 11 (needs NX)
;   ac-align      #AC  misaligned load with EFLAGS.AC=1      SIGBUS  7 (needs CR0.AM,
;                      which Linux sets; without it the load succeeds: exit 99)
;   mf-x87        #MF  unmasked x87 divide by zero + fwait   SIGFPE  8
;   xm-sse        #XM  unmasked SSE divide by zero           SIGFPE  8
;   syscall32     #UD  syscall from 32-bit code (i386 only;  SIGILL  4
;                      Intel CPUs and Linux on them)

%include "lib.inc"

%ifdef ARCH64
%define DW dq
%else
%define DW dd
%endif

; CASE name: a table entry (name, code) and the code's label.
%macro CASE 1
[section .rodata]
%%name:	db %1, 0
[section .cases]
	DW %%name, %%code
__?SECT?__
%%code:
%endmacro

section .cases
cases_start:

section .data
bounds:	dd 0, 10
farptr:	dd 0
	dw 0
align 16
one:	dd 1.0
zero:	dd 0.0
; struct user_desc for modify_ldt and set_thread_area (asm/ldt.h).
desc:	dd 0		; entry_number
	dd 0		; base_addr
	dd 0xfffff	; limit
	dd 0		; seg_32bit, contents, read_exec_only, limit_in_pages,
			; seg_not_present, useable (bits 0, 1-2, 3, 4, 5, 6)
%define DESC_SEG_32BIT 1
%define DESC_LIMIT_IN_PAGES (1 << 4)
%define DESC_SEG_NOT_PRESENT (1 << 5)
%define DESC_USEABLE (1 << 6)
%define EFLAGS_TF 0x100
%define EFLAGS_AC 0x40000

section .bss
alignb 16
scratch: resb 64
small_stack: resb 8192

section .text
global _start
_start:
	mov [initial_sp], xSP
	mov xAX, [xSP]
	cmp xAX, 2
	jb .all
	mov xDI, [xSP + 2 * W]
	lea xBX, [cases_start]
.find:
	lea xAX, [cases_end]
	cmp xBX, xAX
	jae .unknown
	mov xSI, [xBX]
	call streq
	je .found
	add xBX, 2 * W
	jmp .find
.found:
	call [xBX + W]
	EXIT SURVIVED
.unknown:
	PRINT "unknown case", 10
	EXIT 2
.all:
	lea xBX, [cases_start]
.each:
	lea xAX, [cases_end]
	cmp xBX, xAX
	jae .done
	mov xSI, [xBX]
	call put_cstr
	PRINT ": "
	mov xAX, [xBX + W]
	call run_child
	call put_status
	PRINT 10
	add xBX, 2 * W
	jmp .each
.done:
	EXIT 0

; Exits with the errno of a failed system call in xAX.
exit_errno:
	neg xAX
	EXIT xAX

; Writes `desc` (flags in ecx) to LDT entry 0; returns the selector in eax.
set_ldt0:
	mov dword [desc], 0
	mov dword [desc + 12], ecx
%ifdef ARCH64
	lea rsi, [desc]
	SYS SYS_modify_ldt, 1, rsi, 16
%else
	SYS SYS_modify_ldt, 1, desc, 16
%endif
	test xAX, xAX
	jnz exit_errno
	mov eax, 0x7		; index 0, TI=1 (LDT), RPL 3
	ret

; Installs `desc` (flags in ecx) as a TLS entry; returns the selector in eax.
set_tls:
	mov dword [desc], -1
	mov dword [desc + 12], ecx
%ifdef ARCH64
	lea rdi, [desc]
	SYS SYS_set_thread_area, rdi
%else
	SYS SYS_set_thread_area, desc
%endif
	test xAX, xAX
	jnz exit_errno
	mov eax, [desc]
	shl eax, 3
	or eax, 3
	ret

CASE "de-div"
	xor ecx, ecx
	mov eax, 1
	xor edx, edx
	div ecx
	ret

CASE "de-idiv"
	mov eax, 0x80000000
	cdq
	mov ecx, -1
	idiv ecx
	ret

CASE "db-tf"
	pushf
	or WPTR [xSP], EFLAGS_TF
	popf
	nop
	nop
	ret

CASE "db-tf-sys"
	pushf
	or WPTR [xSP], EFLAGS_TF
	popf
	SYS SYS_getpid
	nop
	ret

CASE "db-icebp"
	db 0xf1
	ret

CASE "bp-int3"
	int3
	ret

CASE "bp-int-3"
	db 0xcd, 0x03
	ret

CASE "of-into"
	mov al, 0x7f
	add al, 1
	db 0xce			; into (#UD in 64-bit mode)
	ret

%ifndef ARCH64
CASE "br-bound"
	mov eax, 20
	bound eax, [bounds]
	ret
%endif

CASE "ud-ud2"
	ud2
	ret

CASE "ud-lock"
	db 0xf0, 0x90		; lock nop
	ret

CASE "np-ldt"
	mov ecx, DESC_SEG_32BIT | DESC_LIMIT_IN_PAGES | DESC_SEG_NOT_PRESENT | DESC_USEABLE
	call set_ldt0
	mov ds, ax
	ret

CASE "np-tls"
	mov ecx, DESC_SEG_32BIT | DESC_LIMIT_IN_PAGES | DESC_SEG_NOT_PRESENT | DESC_USEABLE
	call set_tls
	mov ds, ax
	ret

CASE "ss-ldt"
	mov ecx, DESC_SEG_32BIT | DESC_LIMIT_IN_PAGES | DESC_SEG_NOT_PRESENT | DESC_USEABLE
	call set_ldt0
	mov ss, ax
	ret

CASE "ss-tls"
	mov ecx, DESC_SEG_32BIT | DESC_LIMIT_IN_PAGES | DESC_SEG_NOT_PRESENT | DESC_USEABLE
	call set_tls
	mov ss, ax
	ret

%ifdef ARCH64
CASE "ss-noncanon"
	mov rsp, 0x8000000000000000
	push rax
	ret
%else
CASE "ss-limit"
	; A 4 KiB expand-up 32-bit stack segment over small_stack: the push
	; at ESP 0x2000 writes at 0x1ffc, past the limit.
	mov dword [desc + 4], small_stack
	mov dword [desc + 8], 0xfff
	mov ecx, DESC_SEG_32BIT | DESC_USEABLE
	call set_tls
	mov ss, ax
	mov esp, 0x2000
	push eax
	ret
%endif

CASE "gp-selector"
	mov eax, 0xfffb
	mov ds, ax
	ret

CASE "gp-no-ldt"
	mov eax, 0x0f		; LDT index 1, RPL 3; no LDT was set up
	mov ds, ax
	ret

CASE "gp-far-null"
	jmp far [farptr]
	ret

CASE "gp-int81"
	int 0x81
	ret

CASE "gp-hlt"
	hlt
	ret

%ifdef ARCH64
CASE "gp-noncanon"
	mov rax, 0x8000000000000000
	mov eax, [rax]
	ret
%endif

CASE "pf-read"
	xor eax, eax
	mov eax, [xAX]
	ret

CASE "pf-write"
	lea xAX, [_start]
	mov byte [xAX], 0xcc
	ret

CASE "pf-exec"
	MMAP 0, 4096, PROT_READ | PROT_WRITE, 0
	cmp xAX, -4096
	jae exit_errno
	mov byte [xAX], 0xc3	; ret
	call xAX
	ret

CASE "ac-align"
	pushf
	or WPTR [xSP], EFLAGS_AC
	popf
	lea xAX, [scratch]
	mov eax, [xAX + 1]
	EXIT SURVIVED

CASE "mf-x87"
	fninit
	fnstcw [scratch]
	and word [scratch], ~4	; unmask ZE
	fldcw [scratch]
	fld1
	fldz
	fdivp st1, st0		; 1/0: pending, unmasked
	fwait			; #MF here
	ret

CASE "xm-sse"
	stmxcsr [scratch]
	and dword [scratch], ~(1 << 9)	; unmask ZM
	ldmxcsr [scratch]
	movss xmm0, [one]
	divss xmm0, [zero]
	ret

%ifndef ARCH64
CASE "syscall32"
	mov eax, SYS_getpid
	syscall
	ret
%endif

section .cases
cases_end:
