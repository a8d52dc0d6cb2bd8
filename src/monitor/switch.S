/*
 * The world switch: entry into guest code at ring 3 and every way back.
 * Included by switch.rs through global_asm! (AT&T syntax); the numbers
 * named A_* (offsets in struct SwitchArea), MSR_* and VECTOR_STUB_SIZE
 * come from there as `const` operands.
 *
 * Everything here is position independent: branches are relative, data is
 * reached through registers only, so the pages can run at the address the
 * host loaded them at, in the host's address space and in the shadow one,
 * where the switcher maps them at the same virtual addresses
 * (ARCHITECTURE.md "Where the monitor lives"). The section is page aligned
 * and padded to whole pages so that no other host code shares its pages.
 *
 * Order of the table switches (why an NMI at any instruction boundary finds
 * a working IDT, GDT, TSS and stack):
 * - the monitor IDT's gates name the monitor's own 64-bit code selector M,
 *   near the top of the monitor GDT where guests have no descriptors; the
 *   host IDT's gates name the host's CS. The monitor GDT holds a copy of
 *   the host's CS descriptor at the host CS's index whenever the host IDT
 *   may be loaded or CS may hold the host's selector: entry loads the
 *   monitor GDT, TSS and IDT running on the host's CS, far-returns to M,
 *   and only then puts the guest's descriptor at that index (a guest
 *   selector with the host CS's index then loads natively, e.g. Linux's
 *   __USER32_CS 0x23 on FreeBSD, whose kernel CS is 0x20); the exit, on M,
 *   puts the copy back, far-returns to the host's CS, and loads the host
 *   IDT before the host GDT (which has no M). Windows: host IDT + monitor
 *   GDT (copy present), monitor IDT + monitor GDT (M present; CS the copy
 *   or M), host IDT + host GDT; never the monitor IDT with the host GDT;
 * - SS is null while anything but the host's tables is loaded (an IRETQ to
 *   CPL 0 accepts a null SS in 64-bit mode);
 * - the monitor IDT is loaded only while the monitor TSS is (its gates all
 *   use IST stacks, whose top word names the switch area), and the host IDT
 *   meets the monitor TSS only with the host's GS base loaded and the
 *   host's per-CPU pointer at the top of every IST stack (FreeBSD's NMI,
 *   MC and DB handlers read it there, struct nmi_pcpu);
 * - the monitor's pages are mapped at the same address in both address
 *   spaces, so the CR3 switch can sit anywhere in between.
 */

/* FS and GS bases from the area (%rbx) at offsets `fs` and `gs`: with
 * WRFSBASE/WRGSBASE when F_FSGSBASE says CR4 allows them on both sides of
 * the switch, else through the MSRs. Clobbers RAX, RCX, RDX. */
.macro write_fs_gs_bases fs, gs
    testq ${F_FSGSBASE}, {A_FLAGS}(%rbx)
    jz 1f
    movq \fs(%rbx), %rax
    wrfsbase %rax
    movq \gs(%rbx), %rax
    wrgsbase %rax
    jmp 2f
1:
    movl ${MSR_FS_BASE}, %ecx
    movl \fs(%rbx), %eax
    movl \fs+4(%rbx), %edx
    wrmsr
    movl ${MSR_GS_BASE}, %ecx
    movl \gs(%rbx), %eax
    movl \gs+4(%rbx), %edx
    wrmsr
2:
.endm

    .section .text.kqemu_switch, "ax", @progbits
    .balign 4096
    .globl kqemu_switch_text_start
kqemu_switch_text_start:

/*
 * void kqemu_switch_run(struct SwitchArea *area)   (System V: %rdi)
 * Called with host interrupts disabled. Returns after the guest exited;
 * the exit is described in the area.
 */
    .globl kqemu_switch_run
kqemu_switch_run:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    pushfq
    cli
    movq %rdi, %rbx
    movq %rsp, {A_HOST_RSP}(%rbx)

    /* Host state the run changes. */
    movq %cr3, %rax
    movq %rax, {A_HOST_CR3}(%rbx)
    sgdt {A_HOST_GDTR}+6(%rbx)
    sidt {A_HOST_IDTR}+6(%rbx)
    sldt {A_HOST_LDTR}(%rbx)
    str {A_HOST_TR}(%rbx)
    movw %ds, {A_HOST_DS}(%rbx)
    movw %es, {A_HOST_ES}(%rbx)
    movw %fs, {A_HOST_FS}(%rbx)
    movw %gs, {A_HOST_GS}(%rbx)
    movw %ss, {A_HOST_SS}(%rbx)
    /* RDFSBASE and friends when CR4.FSGSBASE is set on both sides of the
     * switch (they #UD without it, SDM Vol. 2B RDFSBASE): cheaper than
     * RDMSR/WRMSR. */
    testq ${F_FSGSBASE}, {A_FLAGS}(%rbx)
    jz 1f
    rdfsbase %rax
    movq %rax, {A_HOST_FS_BASE}(%rbx)
    jmp 2f
1:
    movl ${MSR_FS_BASE}, %ecx
    rdmsr
    movl %eax, {A_HOST_FS_BASE}(%rbx)
    movl %edx, {A_HOST_FS_BASE}+4(%rbx)
2:
    /* The host's GS base is in the area already (switch.rs reads it for
     * the IST stacks). */

    /* No host breakpoint may fire in guest mode (it would reach the guest
     * as its own #DB): DR7 is 0 while the guest runs. Written only when
     * set: a write to DR7 is costly on some CPUs and hypervisors. */
    movq %dr7, %rax
    movq %rax, {A_HOST_DR7}(%rbx)
    testq ${DR7_ENABLE_MASK}, %rax
    jz 1f
    xorl %eax, %eax
    movq %rax, %dr7
1:
    /* DR6: the processor sets its status bits on a #DB and never clears
     * them (SDM Vol. 3B 18.2.3), so a guest's single step or ICEBP would
     * leave them for the host's next #DB to misread. Saved here, cleared
     * for the run only when some are set (a DR6 write is costly where a
     * read is not), so that after an exit through vector 1 they are the
     * guest's alone; restored by the exit when the run may have changed
     * it. */
    movq %dr6, %rax
    movq %rax, {A_HOST_DR6}(%rbx)
    testq ${DR6_STATUS}, %rax
    jz 1f
    movl ${DR6_INIT}, %eax
    movq %rax, %dr6
1:

    /* SYSENTER_CS = 0 while the guest runs: SYSENTER then raises #GP
     * instead of entering the host at ring 0 (SDM Vol. 2B SYSENTER). */
    movl ${MSR_SYSENTER_CS}, %ecx
    rdmsr
    movl %eax, {A_HOST_SYSENTER_CS}(%rbx)
    testl %eax, %eax
    jz 1f
    xorl %eax, %eax
    xorl %edx, %edx
    wrmsr
1:
    /* EFER for the guest (SCE clear: SYSCALL raises #UD). */
    movl ${MSR_EFER}, %ecx
    movl {A_GUEST_EFER}(%rbx), %eax
    movl {A_GUEST_EFER}+4(%rbx), %edx
    wrmsr
    movq {A_GUEST_CR4}(%rbx), %rax
    cmpq {A_HOST_CR4}(%rbx), %rax
    je 1f
    movq %rax, %cr4
1:
    movq {A_GUEST_CR0}(%rbx), %rax
    cmpq {A_HOST_CR0}(%rbx), %rax
    je 1f
    movq %rax, %cr0
1:
    xorl %eax, %eax
    movw %ax, %ss

    lgdt {A_MON_GDTR}+6(%rbx)
    ltr {A_MON_TR}(%rbx)
    lidt {A_MON_IDTR}+6(%rbx)
    /* Onto M (a far return at the same privilege pops RIP, then CS: SDM
     * Vol. 2B RET), then the guest's descriptor at the host CS's index:
     * from here to the exit's far return nothing names the host's CS. */
    leaq 1f(%rip), %rax
    pushq {A_MON_CS}(%rbx)
    pushq %rax
    lretq
1:
    movq {A_HOST_CS_SLOT}(%rbx), %rcx
    movq {A_GUEST_AT_HOST_CS}(%rbx), %rax
    movq %rax, (%rcx)
    /* The shadow LDT before the guest's data selectors, which may be LDT
     * selectors. LLDT reads its descriptor from the monitor GDT (loaded
     * above) and nothing of the LDT itself: the CPU reads the table only
     * on a load of an LDT selector, through the shadow CR3 (the table's
     * page is mapped there like the GDT's). Host handlers never load LDT
     * selectors, so an NMI or machine check on either side of it finds
     * nothing it needs changed; the exit loads the host's LDTR after
     * the host's GDT (whose descriptor it names) and TSS. */
    lldt {A_MON_LDTR}(%rbx)
    movq {A_SHADOW_CR3}(%rbx), %rax
    movq %rax, %cr3

    /* A fault from here to the IRETQ (a descriptor the CPU refuses) comes
     * back through the exit path as a ring-0 event: the run fails. */
    movw {A_GUEST_DS}(%rbx), %ds
    movw {A_GUEST_ES}(%rbx), %es
    movw {A_GUEST_FS}(%rbx), %fs
    movw {A_GUEST_GS}(%rbx), %gs
    /* Both bases always: a null selector load leaves the base as it was
     * (SDM Vol. 3A 3.4.4), and the guest must never run with the host's
     * (GS: the kernel's per-CPU pointer, which a guest RDGSBASE would
     * read). */
    write_fs_gs_bases {A_GUEST_FS_BASE}, {A_GUEST_GS_BASE}
    movq %rbx, %rsp
    movq 8(%rsp), %rcx
    movq 16(%rsp), %rdx
    movq 24(%rsp), %rbx
    movq 40(%rsp), %rbp
    movq 48(%rsp), %rsi
    movq 56(%rsp), %rdi
    movq 64(%rsp), %r8
    movq 72(%rsp), %r9
    movq 80(%rsp), %r10
    movq 88(%rsp), %r11
    movq 96(%rsp), %r12
    movq 104(%rsp), %r13
    movq 112(%rsp), %r14
    movq 120(%rsp), %r15
    movq 0(%rsp), %rax
    leaq {A_GUEST_RIP}(%rsp), %rsp
    /* MDS: VERW with a memory operand overwrites the CPU's buffers when
     * it enumerates MD_CLEAR (Intel's MDS guidance: the last thing before
     * returning to less privileged code; FreeBSD does it on its own return
     * to user mode, which this entry bypasses). The TEST's flags do not
     * matter: IRETQ loads the guest's RFLAGS. */
    testq ${F_VERW}, {A_FLAGS}-{A_GUEST_RIP}(%rsp)
    jz 1f
    verw {A_VERW_SELECTOR}-{A_GUEST_RIP}(%rsp)
1:
    iretq

/*
 * Exits. Every gate uses an IST stack whose top word holds the host's
 * per-CPU pointer and the word above it the switch area. On entry to the
 * common code: 0(%rsp) vector, 8 error code, 16 RIP, 24 CS, 32 RFLAGS,
 * 40 RSP, 48 SS, 56 host per-CPU pointer, 64 area.
 */
kqemu_switch_exit_common:
    testb $3, 24(%rsp)
    jz 2f
    /* From guest code (CPL 3). */
    pushq %rax
    movq 72(%rsp), %rax
    movq %rcx, 8(%rax)
    movq %rdx, 16(%rax)
    movq %rbx, 24(%rax)
    movq %rbp, 40(%rax)
    movq %rsi, 48(%rax)
    movq %rdi, 56(%rax)
    movq %r8, 64(%rax)
    movq %r9, 72(%rax)
    movq %r10, 80(%rax)
    movq %r11, 88(%rax)
    movq %r12, 96(%rax)
    movq %r13, 104(%rax)
    movq %r14, 112(%rax)
    movq %r15, 120(%rax)
    popq %rcx
    movq %rcx, 0(%rax)
    movq %rax, %rbx
    movq 0(%rsp), %rax
    movq %rax, {A_EXIT_VECTOR}(%rbx)
    movq 8(%rsp), %rax
    movq %rax, {A_EXIT_ERROR}(%rbx)
    movq 16(%rsp), %rax
    movq %rax, {A_GUEST_RIP}(%rbx)
    movq 24(%rsp), %rax
    movq %rax, {A_GUEST_RIP}+8(%rbx)
    movq 32(%rsp), %rax
    movq %rax, {A_GUEST_RIP}+16(%rbx)
    movq 40(%rsp), %rax
    movq %rax, {A_GUEST_RIP}+24(%rbx)
    movq 48(%rsp), %rax
    movq %rax, {A_GUEST_RIP}+32(%rbx)
    movq %cr2, %rax
    movq %rax, {A_EXIT_CR2}(%rbx)
    movq $0, {A_EXIT_KIND}(%rbx)
    movw %ds, {A_GUEST_DS}(%rbx)
    movw %es, {A_GUEST_ES}(%rbx)
    movw %fs, {A_GUEST_FS}(%rbx)
    movw %gs, {A_GUEST_GS}(%rbx)
    testq ${F_FSGSBASE}, {A_FLAGS}(%rbx)
    jz 1f
    rdfsbase %rax
    movq %rax, {A_GUEST_FS_BASE}(%rbx)
    rdgsbase %rax
    movq %rax, {A_GUEST_GS_BASE}(%rbx)
    jmp 6f
1:
    movl ${MSR_FS_BASE}, %ecx
    rdmsr
    movl %eax, {A_GUEST_FS_BASE}(%rbx)
    movl %edx, {A_GUEST_FS_BASE}+4(%rbx)
    movl ${MSR_GS_BASE}, %ecx
    rdmsr
    movl %eax, {A_GUEST_GS_BASE}(%rbx)
    movl %edx, {A_GUEST_GS_BASE}+4(%rbx)
6:
    /* #UD and #GP: the monitor decides from the first two bytes at CS:RIP
     * (syscall, int n...). They are read here, through the mapping the
     * CPU just fetched them from, while the shadow tables are loaded:
     * reading them later from the host means walking the shadow tables
     * and touching the guest page through the host's mappings, several
     * more pages per exit. Both bytes on RIP's page only; a fault (an
     * instruction fetch that failed, e.g. past CS's limit) is caught by
     * the fixup at 2: below and leaves the bytes to the host. */
    movq $0, {A_EXIT_CODE_LEN}(%rbx)
    testq ${F_READ_CODE}, {A_FLAGS}(%rbx)
    jz 5f
    cmpq $6, {A_EXIT_VECTOR}(%rbx)
    je 1f
    cmpq $13, {A_EXIT_VECTOR}(%rbx)
    jne 5f
1:
    movq {A_GUEST_RIP}(%rbx), %rsi
    addq {A_CODE_BASE}(%rbx), %rsi
    andq {A_CODE_MASK}(%rbx), %rsi
    movl %esi, %eax
    andl $0xfff, %eax
    cmpl $0xfff, %eax
    je 5f
    movq $1, {A_READING_CODE}(%rbx)
    testq ${F_STAC}, {A_FLAGS}(%rbx)
    jz 8f
    /* SMAP: a supervisor read of a user page needs EFLAGS.AC, for that
     * read only (a TCG host keeps separate TLB entries while AC is set). */
    stac
    movzwl (%rsi), %eax
    clac
    jmp 9f
8:
    movzwl (%rsi), %eax
9:
    movw %ax, {A_EXIT_CODE}(%rbx)
    movq $2, {A_EXIT_CODE_LEN}(%rbx)
7:  /* Resumed here, AC clear, by the fixup when the read faulted. */
    movq $0, {A_READING_CODE}(%rbx)
    jmp 5f

2:  /* At CPL 0: inside the switch itself. */
    cmpq $2, 0(%rsp)
    je 3f
    cmpq $18, 0(%rsp)
    je 3f
    movq 64(%rsp), %rbx
    testq $1, {A_READING_CODE}(%rbx)
    jz 1f
    /* The read of the guest's code above faulted: resume after it with
     * AC clear (the STAC before it), on this stack (the fault's frame
     * took the place of the exit's, which is copied out already; nothing
     * below reads it). A jump, not IRETQ: an NMI noted in the exit so far
     * keeps NMIs blocked until the host's handler gets it (see 3: below). */
    testq ${F_STAC}, {A_FLAGS}(%rbx)
    jz 7b
    clac
    jmp 7b
1:  /* A fault while loading the guest's state: the run fails. */
    movq 0(%rsp), %rax
    movq %rax, {A_EXIT_VECTOR}(%rbx)
    movq 8(%rsp), %rax
    movq %rax, {A_EXIT_ERROR}(%rbx)
    movq 16(%rsp), %rax
    movq %rax, {A_EXIT_FAULT_RIP}(%rbx)
    movq $1, {A_EXIT_KIND}(%rbx)
    jmp 5f
3:  /* NMI or machine check in the switch (the monitor IDT is loaded). It
     * goes to the host after the switch back, and until the host's own
     * NMI handler runs NMIs must stay blocked: the host's handler gets it
     * through `int $2` on its IST stack, and a second NMI while that
     * handler runs would restart the same IST stack over its frame
     * (FreeBSD's handler is not reentrant). The processor blocks NMIs
     * from the delivery of an NMI until the next IRET, and only IRET
     * unblocks them (SDM Vol. 3A 6.7.1); so no IRETQ here: the entry is
     * abandoned for an exit, and the exit resumes through POPFQ+LRETQ.
     * The same for a machine check: its delivery does not block NMIs, but
     * an IRETQ after it would unblock the ones an NMI exit (the guest's,
     * or one noted here) blocked: the frame of that exit on the NMI stack
     * could then be overwritten by the next NMI while it is read. */
    pushq %rax
    pushq %rcx
    /* 0 RCX, 8 RAX, 16 vector, 24 error code, 32 RIP, 40 CS, 48 RFLAGS,
     * 56 RSP, 64 SS, 72 host per-CPU pointer, 80 area. */
    movq 80(%rsp), %rax
    leaq kqemu_switch_exit_common(%rip), %rcx
    cmpq %rcx, 32(%rsp)
    jae 4f
    /* In the entry: nothing of the guest ran, its state in the area is
     * intact; the exit reports the vector as if the guest had been
     * interrupted (kind 2) and the monitor enters again after the host
     * handled it. Everything the entry changed so far the exit restores
     * (it does the same after a fault there, kind 1). */
    movq %rax, %rbx
    movq 16(%rsp), %rax
    movq %rax, {A_EXIT_VECTOR}(%rbx)
    movq $0, {A_EXIT_ERROR}(%rbx)
    movq $2, {A_EXIT_KIND}(%rbx)
    jmp 5f
4:  /* In the exit: noted (bit 0 NMI, bit 1 machine check), then back to
     * the interrupted instruction. Its RAX, RFLAGS, RIP and CS go below
     * its RSP, which is an IST stack of this block or the area's
     * far-return frame (room below for this and a machine check on top of
     * it): the monitor IDT is loaded only while the exit runs on those,
     * and it keeps nothing below RSP. POPFQ restores
     * the flags and AC the interrupted code had (an LRETQ to the same
     * privilege pops RIP and CS only, SDM Vol. 2B RET). */
    movl $1, %ecx
    cmpq $2, 16(%rsp)
    je 6f
    movl $2, %ecx
6:
    orq %rcx, {A_PENDING}(%rax)
    movq 56(%rsp), %rax
    subq $32, %rax
    movq 8(%rsp), %rcx
    movq %rcx, 0(%rax)
    movq 48(%rsp), %rcx
    movq %rcx, 8(%rax)
    movq 32(%rsp), %rcx
    movq %rcx, 16(%rax)
    movq 40(%rsp), %rcx
    movq %rcx, 24(%rax)
    popq %rcx
    movq %rax, %rsp
    popq %rax
    popfq
    lretq

5:  /* Back to the host: %rbx = area, interrupts disabled. CS is M, or
     * the host's after a fault, NMI or machine check before the entry's
     * far return: the copy goes back first either way, then CS is the
     * host's.
     * The far return's two words go on the area's own far-return frame
     * (a page every exit touches anyway), which has room below them for
     * the return frames of an NMI and a machine check noted at 3: while
     * %rsp points at it; the host's stack is no choice, it is not mapped
     * under the shadow CR3 still loaded here. The exit's stack is back in
     * %rsp right after: nothing below reads what it held. */
    movq {A_HOST_CS_SLOT}(%rbx), %rcx
    movq {A_HOST_CS_DESC}(%rbx), %rax
    movq %rax, (%rcx)
    movq %rsp, %rdx
    leaq {A_FAR_FRAME_END}(%rbx), %rsp
    leaq 1f(%rip), %rax
    pushq {A_HOST_CS}(%rbx)
    pushq %rax
    lretq
1:
    movq %rdx, %rsp
    movq {A_HOST_CR3}(%rbx), %rax
    movq %rax, %cr3
    movl ${MSR_EFER}, %ecx
    movl {A_HOST_EFER}(%rbx), %eax
    movl {A_HOST_EFER}+4(%rbx), %edx
    wrmsr
    movl {A_HOST_SYSENTER_CS}(%rbx), %eax
    testl %eax, %eax
    jz 1f
    movl ${MSR_SYSENTER_CS}, %ecx
    xorl %edx, %edx
    wrmsr
1:
    movq {A_HOST_CR4}(%rbx), %rax
    cmpq {A_GUEST_CR4}(%rbx), %rax
    je 1f
    movq %rax, %cr4
1:
    movq {A_HOST_CR0}(%rbx), %rax
    cmpq {A_GUEST_CR0}(%rbx), %rax
    je 1f
    movq %rax, %cr0
1:
    /* The host's GS base before the host's IDT (whose handlers may meet
     * the monitor TSS until the LTR below); the guest's selectors stay
     * loaded until the host's GDT is. CR4 is the host's again: F_FSGSBASE
     * says it has FSGSBASE. */
    testq ${F_FSGSBASE}, {A_FLAGS}(%rbx)
    jz 1f
    movq {A_HOST_GS_BASE}(%rbx), %rax
    wrgsbase %rax
    jmp 2f
1:
    movl ${MSR_GS_BASE}, %ecx
    movl {A_HOST_GS_BASE}(%rbx), %eax
    movl {A_HOST_GS_BASE}+4(%rbx), %edx
    wrmsr
2:
    /* The host's IDT before the host's GDT: the monitor IDT's gates name
     * M, which the host's GDT lacks. */
    lidt {A_HOST_IDTR}+6(%rbx)
    lgdt {A_HOST_GDTR}+6(%rbx)
    /* The host's TSS next, so that the host's IDT meets the monitor TSS
     * only with the host's GS base. Its descriptor is busy since its own
     * LTR: clear the busy bit of this CPU's descriptor, or LTR faults
     * (SDM Vol. 3A 7.2.2). */
    movq {A_HOST_GDTR}+8(%rbx), %rax
    movzwl {A_HOST_TR}(%rbx), %ecx
    andl $0xfff8, %ecx
    andb $0xfd, 5(%rax,%rcx)
    ltr {A_HOST_TR}(%rbx)
    lldt {A_HOST_LDTR}(%rbx)
    movw {A_HOST_SS}(%rbx), %ss
    movw {A_HOST_DS}(%rbx), %ds
    movw {A_HOST_ES}(%rbx), %es
    movw {A_HOST_FS}(%rbx), %fs
    movw {A_HOST_GS}(%rbx), %gs
    /* The selector loads may have replaced the bases (a non-null one
     * from its descriptor, a null one on some CPUs). */
    write_fs_gs_bases {A_HOST_FS_BASE}, {A_HOST_GS_BASE}
    /* DR6 back to the host's value when a #DB (the guest's, or one in
     * the switch) or the entry changed it; the guest's bits go to the
     * area first. */
    cmpq $1, {A_EXIT_VECTOR}(%rbx)
    jne 1f
    movq %dr6, %rax
    andl ${DR6_STATUS}, %eax
    movq %rax, {A_EXIT_DR6}(%rbx)
    jmp 2f
1:
    testq ${DR6_STATUS}, {A_HOST_DR6}(%rbx)
    jz 3f
2:
    movq {A_HOST_DR6}(%rbx), %rax
    movq %rax, %dr6
3:
    /* Host breakpoints last: a hit now finds the host's own tables. */
    movq {A_HOST_DR7}(%rbx), %rax
    testq ${DR7_ENABLE_MASK}, %rax
    jz 1f
    movq %rax, %dr7
1:
    movq {A_HOST_RSP}(%rbx), %rsp
    popfq
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret

/* One stub per vector, VECTOR_STUB_SIZE bytes apart. The CPU pushes an
 * error code for 8, 10-14, 17, 21, 29 and 30 (SDM Vol. 3A 6.15); the
 * others push 0 in its place. */
    .balign {VECTOR_STUB_SIZE}
    .globl kqemu_switch_vectors
kqemu_switch_vectors:
    .set vector, 0
    .rept 256
    .balign {VECTOR_STUB_SIZE}
    .if vector < 32
    .if (({ERROR_CODE_VECTORS} >> vector) & 1) == 0
    pushq $0
    .endif
    .else
    pushq $0
    .endif
    pushq $vector
    jmp kqemu_switch_exit_common
    .set vector, vector + 1
    .endr

    .balign 4096
    .globl kqemu_switch_text_end
kqemu_switch_text_end:
    .text
