; Testbed self-test guests: each misbehaves in one way (or exits cleanly);
; the suite (tests/testbed/suite) checks the status the testbed reports.
;
; Build: nasm -f elf64 -DARCH64 -DTEST=<name> (amd64) or -f elf32 (i386),
; then link statically with ld.lld -e _start.  Tests:
;   exit42    exit(42)                                   -> 42
;   hello     write "hello from the testbed\n", exit 0    -> 0, stdout
;   hlt cli   privileged instructions                     -> SIGSEGV (139)
;   movcr3    mov to CR3                                  -> SIGSEGV
;   outb      port I/O with IOPL 0                        -> SIGSEGV
;   intn      int 0x81 (a DPL-0 gate)                     -> SIGSEGV
;   unmapped  load from an unmapped page                  -> SIGSEGV
;   kread     load from the kernel's address space        -> SIGSEGV
;   kjump     jump into the kernel (amd64: KERNBASE;      -> SIGSEGV
;             i386: far jump to the kernel code selector)
;   div0      divide by zero                              -> SIGFPE (136)
;   ud2       undefined opcode                            -> SIGILL (132)
;   int3      breakpoint                                  -> SIGTRAP (133)
;   loop      spin forever (the timer must take it back)  -> SIGXCPU (152)
;   fpu       SSE registers survive 20000 system calls    -> 0
;             and timer interrupts (1 if they did not)
;   fpufork   parent and child each keep their own XMM    -> 0
;             value while the timer switches between them
;   getpid    100000 getpid calls (the demo prints        -> 0
;             cycles per call)

%ifdef ARCH64
bits 64
%define SYS_WRITE 1
%define SYS_GETPID 39
%define SYS_EXIT 60
%define SYS_FORK 57
%define SYS_WAIT4 61
%macro exit 1
	mov edi, %1
	mov eax, SYS_EXIT
	syscall
%endmacro
%macro sys_getpid 0
	mov eax, SYS_GETPID
	syscall
%endmacro
%else
bits 32
%define SYS_EXIT 1
%define SYS_WRITE 4
%define SYS_GETPID 20
%define SYS_FORK 2
%define SYS_WAIT4 114
%macro exit 1
	mov ebx, %1
	mov eax, SYS_EXIT
	int 0x80
%endmacro
%macro sys_getpid 0
	mov eax, SYS_GETPID
	int 0x80
%endmacro
%endif

; Reached only when the misbehaviour did not stop the program.
%define SURVIVED 99

section .data
message: db "hello from the testbed", 10
message_len equ $ - message
pattern: dd 0x01234567, 0x89abcdef, 0xdeadbeef, 0x5a5aa5a5
pattern2: dd 0x76543210, 0xfedcba98, 0x0badf00d, 0xa5a55a5a
result: times 4 dd 0
status: dd 0
forkret: dd 0

section .text
global _start
_start:
%ifidn TEST, exit42
	exit 42
%elifidn TEST, hello
%ifdef ARCH64
	mov eax, SYS_WRITE
	mov edi, 1
	lea rsi, [rel message]
	mov edx, message_len
	syscall
%else
	mov eax, SYS_WRITE
	mov ebx, 1
	mov ecx, message
	mov edx, message_len
	int 0x80
%endif
	exit 0
%elifidn TEST, hlt
	hlt
%elifidn TEST, cli
	cli
%elifidn TEST, movcr3
	xor eax, eax
%ifdef ARCH64
	mov cr3, rax
%else
	mov cr3, eax
%endif
%elifidn TEST, outb
	mov al, 0x33
	out 0x80, al
%elifidn TEST, intn
	int 0x81
%elifidn TEST, unmapped
	mov eax, [0x0dead000]
%elifidn TEST, kread
%ifdef ARCH64
	mov rax, 0xfffff80000100000
	mov rax, [rax]
%else
	mov eax, [0xfffff000]
%endif
%elifidn TEST, kjump
%ifdef ARCH64
	mov rax, 0xffffffff80100000
	jmp rax
%else
	jmp 0x08:0x00100000
%endif
%elifidn TEST, div0
	xor ecx, ecx
	mov eax, 1
	xor edx, edx
	div ecx
%elifidn TEST, ud2
	ud2
%elifidn TEST, int3
	int3
%elifidn TEST, loop
.spin:
	jmp .spin
%elifidn TEST, getpid
%ifdef ARCH64
	mov r12d, 100000
.call:
	sys_getpid
	dec r12d
%else
	mov esi, 100000
.call:
	sys_getpid
	dec esi
%endif
	jnz .call
	exit 0
%elifidn TEST, fpufork
	mov eax, SYS_FORK
%ifdef ARCH64
	syscall
	mov [rel forkret], eax
	lea rbx, [rel pattern]
	lea rcx, [rel pattern2]
	test eax, eax
	cmovz rbx, rcx
	movdqu xmm0, [rbx]
	mov r12d, 20000
%else
	int 0x80
	mov [forkret], eax
	mov ebp, pattern
	mov ecx, pattern2
	test eax, eax
	cmovz ebp, ecx
	movdqu xmm0, [ebp]
	mov esi, 20000
%endif
.fork_again:
	sys_getpid
	mov ecx, 2000
.fork_burn:
	dec ecx
	jnz .fork_burn
%ifdef ARCH64
	dec r12d
%else
	dec esi
%endif
	jnz .fork_again
%ifdef ARCH64
	movdqu [rel result], xmm0
	mov rsi, rbx
	lea rdi, [rel result]
%else
	movdqu [result], xmm0
	mov esi, ebp
	mov edi, result
%endif
	mov ecx, 16
	repe cmpsb
	jne .fork_bad
	; the child (fork returned 0) is done; the parent also checks it
%ifdef ARCH64
	cmp dword [rel forkret], 0
	je .fork_good
	mov edi, -1
	lea rsi, [rel status]
	xor edx, edx
	xor r10d, r10d
	mov eax, SYS_WAIT4
	syscall
	cmp dword [rel status], 0
%else
	cmp dword [forkret], 0
	je .fork_good
	mov ebx, -1
	mov ecx, status
	xor edx, edx
	xor esi, esi
	mov eax, SYS_WAIT4
	int 0x80
	cmp dword [status], 0
%endif
	jne .fork_bad
.fork_good:
	exit 0
.fork_bad:
	exit 1
%elifidn TEST, fpu
%ifdef ARCH64
	movdqu xmm0, [rel pattern]
	mov r12d, 20000
%else
	movdqu xmm0, [pattern]
	mov esi, 20000
%endif
.again:
	sys_getpid
	; burn a little time so timer interrupts land in ring 3 too
	mov ecx, 2000
.burn:
	dec ecx
	jnz .burn
%ifdef ARCH64
	dec r12d
%else
	dec esi
%endif
	jnz .again
%ifdef ARCH64
	movdqu [rel result], xmm0
	lea rsi, [rel pattern]
	lea rdi, [rel result]
%else
	movdqu [result], xmm0
	mov esi, pattern
	mov edi, result
%endif
	mov ecx, 16
	repe cmpsb
	jne .bad
	exit 0
.bad:
	exit 1
%else
%error "unknown TEST"
%endif
	exit SURVIVED
