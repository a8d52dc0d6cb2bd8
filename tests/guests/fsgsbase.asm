; The FS/GS base instructions at ring 3 (amd64 only: they raise #UD
; outside 64-bit mode).  Run only when CPUID.(EAX=7,ECX=0):EBX[0]
; (FSGSBASE) is set, where Linux (5.9 and later) sets CR4.FSGSBASE; the
; first line says which ("fsgsbase: yes" / "fsgsbase: no": the suite
; expects what the -cpu model has).  Checked:
;   - a fresh process reads 0 from both bases (under the monitor the GS
;     base register must never hold the host kernel's per-CPU pointer);
;   - bases set with arch_prctl read back with RDFSBASE/RDGSBASE;
;   - bases written with WRFSBASE/WRGSBASE are used by %fs:/%gs: loads,
;     survive system calls and timer ticks (the kernel, or the monitor's
;     exit path, reads them back), and arch_prctl(ARCH_GET_*) returns them.
; Printed: the CPUID line, then one line per check that held.

%include "lib.inc"

%define SPIN_CYCLES 20000000
%define ARCH_SET_GS 0x1001
%define ARCH_SET_FS 0x1002
%define ARCH_GET_FS 0x1003
%define ARCH_GET_GS 0x1004
%define CPUID7_EBX_FSGSBASE 1

section .data
align 16
tls1:	dd 0x11111111, 0x11112222
tls2:	dd 0x22221111, 0x22222222
tls3:	dd 0x33331111, 0x33332222
tls4:	dd 0x44441111, 0x44442222

section .bss
got:	resq 1

section .text
global _start

; spin: SPIN_CYCLES of TSC time with no system call (timer ticks land here).
spin:
	rdtsc
	mov ebx, eax
.wait:
	rdtsc
	sub eax, ebx
	cmp eax, SPIN_CYCLES
	jb .wait
	ret

_start:
	xor ecx, ecx
	mov eax, 7
	cpuid
	test ebx, CPUID7_EBX_FSGSBASE
	jnz .have
	PRINT "fsgsbase: no", 10
	EXIT 0
.have:
	PRINT "fsgsbase: yes", 10

	rdgsbase rax
	test rax, rax
	ASSERT z, "a fresh process's GS base is not 0"
	rdfsbase rax
	test rax, rax
	ASSERT z, "a fresh process's FS base is not 0"
	PRINT "fresh bases: 0", 10

	lea rsi, [tls1]
	SYS SYS_arch_prctl, ARCH_SET_FS, rsi
	test rax, rax
	ASSERT z, "ARCH_SET_FS"
	lea rsi, [tls2]
	SYS SYS_arch_prctl, ARCH_SET_GS, rsi
	test rax, rax
	ASSERT z, "ARCH_SET_GS"
	rdfsbase rax
	lea rdx, [tls1]
	cmp rax, rdx
	ASSERT e, "RDFSBASE after ARCH_SET_FS"
	rdgsbase rax
	lea rdx, [tls2]
	cmp rax, rdx
	ASSERT e, "RDGSBASE after ARCH_SET_GS"
	PRINT "arch_prctl bases read back", 10

	lea rax, [tls3]
	wrfsbase rax
	lea rax, [tls4]
	wrgsbase rax
	cmp dword [fs:0], 0x33331111
	ASSERT e, "load through %fs: after WRFSBASE"
	cmp dword [gs:4], 0x44442222
	ASSERT e, "load through %gs: after WRGSBASE"
	mov ebp, 1000
.calls:
	SYS SYS_getpid
	dec ebp
	jnz .calls
	call spin
	rdfsbase rax
	lea rdx, [tls3]
	cmp rax, rdx
	ASSERT e, "WRFSBASE value lost across system calls or ticks"
	rdgsbase rax
	lea rdx, [tls4]
	cmp rax, rdx
	ASSERT e, "WRGSBASE value lost across system calls or ticks"
	cmp dword [gs:0], 0x44441111
	ASSERT e, "load through %gs: after system calls"
	lea rsi, [got]
	SYS SYS_arch_prctl, ARCH_GET_FS, rsi
	test rax, rax
	ASSERT z, "ARCH_GET_FS"
	lea rax, [tls3]
	cmp rax, [got]
	ASSERT e, "ARCH_GET_FS after WRFSBASE"
	lea rsi, [got]
	SYS SYS_arch_prctl, ARCH_GET_GS, rsi
	test rax, rax
	ASSERT z, "ARCH_GET_GS"
	lea rax, [tls4]
	cmp rax, [got]
	ASSERT e, "ARCH_GET_GS after WRGSBASE"
	PRINT "written bases kept across 1000 system calls and a spin", 10
	EXIT 0
