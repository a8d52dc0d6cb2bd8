//! Trap entry and exit: the IDT stubs, the SYSCALL entry, and the switch
//! into ring 3 and back.
//!
//! The kernel runs with interrupts off on its boot stack. [`enter_user`]
//! saves the kernel's callee-saved registers, loads the guest registers
//! from [`USER_FRAME`] and `iretq`s. Every trap from ring 3 (exception,
//! interrupt, `int 0x80`, `syscall`) lands on the TSS's RSP0 stack, whose
//! top *is* [`USER_FRAME`]: the stub pushes the general registers below
//! the hardware frame, then resumes the kernel right after its call to
//! [`enter_user`]. The kernel then reads the whole user state from
//! [`USER_FRAME`]. Traps taken in ring 0 are kernel bugs and end the run,
//! as do NMI, #DF and #MC, which run on their own IST stacks; during an
//! NMI storm (nmi.rs) the NMI handler counts and returns instead.

use core::arch::global_asm;

/// Selectors of the kernel's GDT (see [`crate::cpu`]).
pub const KERNEL_CS: u16 = 0x08;
pub const KERNEL_DS: u16 = 0x10;
pub const USER_CS32: u16 = 0x18 | 3;
pub const USER_DS: u16 = 0x20 | 3;
pub const USER_CS64: u16 = 0x28 | 3;

/// Pseudo vector the SYSCALL entry reports (above every IDT vector).
pub const VECTOR_SYSCALL: u64 = 0x100;
/// The LAPIC timer's vector and the LAPIC spurious vector.
pub const VECTOR_TIMER: u64 = 0x20;
pub const VECTOR_SPURIOUS: u64 = 0xff;
/// Linux i386 system calls.
pub const VECTOR_INT80: u64 = 0x80;

/// Exceptions that push an error code (SDM vol. 3, table 6-1): #DF, #TS,
/// #NP, #SS, #GP, #PF, #AC, #CP, #VC, #SX.
const ERROR_CODE_VECTORS: [u64; 10] = [8, 10, 11, 12, 13, 14, 17, 21, 29, 30];

/// Saved state of a trapped ring-3 context, laid out as the stubs push it:
/// general registers (RAX lowest), vector, error code, then the hardware
/// `iretq` frame.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct TrapFrame {
    pub rax: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rbx: u64,
    pub rbp: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

const FRAME_SIZE: usize = core::mem::size_of::<TrapFrame>();
const _: () = assert!(FRAME_SIZE == 176 && FRAME_SIZE.is_multiple_of(16));
const FRAME_CS_OFFSET: usize = core::mem::offset_of!(TrapFrame, cs);
/// Offset of the saved RSP from the hardware part of the frame (RIP).
const HW_FRAME_RSP_OFFSET: usize =
    core::mem::offset_of!(TrapFrame, rsp) - core::mem::offset_of!(TrapFrame, rip);

/// The RSP0 stack: room for a few nested words below the frame, then the
/// frame at the top (RSP0 is 16-aligned so the CPU pushes without padding).
const RSP0_STACK_SIZE: usize = 4096;

#[repr(C, align(16))]
pub struct Rsp0Stack(pub [u8; RSP0_STACK_SIZE]);

#[no_mangle]
pub static mut RSP0_STACK: Rsp0Stack = Rsp0Stack([0; RSP0_STACK_SIZE]);

/// Address of the top of the RSP0 stack, for the TSS.
pub fn rsp0_top() -> u64 {
    (&raw const RSP0_STACK) as u64 + RSP0_STACK_SIZE as u64
}

/// The ring-3 register state: written by the kernel before
/// [`enter_user`], by the CPU and the stubs on a trap from ring 3.
pub fn user_frame() -> *mut TrapFrame {
    (rsp0_top() - FRAME_SIZE as u64) as *mut TrapFrame
}

extern "C" {
    /// Enters ring 3 with the state in [`user_frame`]; returns when the
    /// program traps, with [`user_frame`] holding its state and the vector.
    pub fn enter_user();
    /// The same, leaving through `sysretq` to 64-bit mode: the frame's RCX
    /// must equal its canonical RIP and R11 its RFLAGS (IF set, TF clear).
    pub fn enter_user_sysret();
    /// The 256 IDT entry stubs, 16 bytes apart.
    static trap_stubs: u8;
    /// The SYSCALL entry point (IA32_LSTAR).
    pub fn syscall_entry();
}

/// Address of the stub for `vector`.
pub fn stub_address(vector: usize) -> u64 {
    (&raw const trap_stubs) as u64 + 16 * vector as u64
}

global_asm!(
    r#"
    .section .bss.trap, "aw", @nobits
    .p2align 3
    kernel_resume_rsp: .skip 8
    syscall_user_rsp: .skip 8

    .text
    .p2align 4
    .globl trap_stubs
    trap_stubs:
    .set vec, 0
    .rept 256
    .p2align 4
    .if (vec == {e0}) || (vec == {e1}) || (vec == {e2}) || (vec == {e3}) || (vec == {e4}) || (vec == {e5}) || (vec == {e6}) || (vec == {e7}) || (vec == {e8}) || (vec == {e9})
    .else
    push $0
    .endif
    push $vec
    .if vec == 2
    jmp trap_nmi
    .elseif (vec == 8) || (vec == 18)
    jmp trap_ist
    .else
    jmp trap_common
    .endif
    .set vec, vec + 1
    .endr

    .p2align 4
    .globl syscall_entry
    syscall_entry:
    mov %rsp, syscall_user_rsp(%rip)
    movabs ${rsp0}, %rsp
    add ${rsp0_size}, %rsp
    push ${user_ds}
    push syscall_user_rsp(%rip)
    push %r11
    push ${user_cs64}
    push %rcx
    push $0
    push ${vsyscall}
    jmp trap_common

    .macro push_regs
    push %r15
    push %r14
    push %r13
    push %r12
    push %r11
    push %r10
    push %r9
    push %r8
    push %rdi
    push %rsi
    push %rbp
    push %rbx
    push %rdx
    push %rcx
    push %rax
    .endm

    .macro pop_regs
    pop %rax
    pop %rcx
    pop %rdx
    pop %rbx
    pop %rbp
    pop %rsi
    pop %rdi
    pop %r8
    pop %r9
    pop %r10
    pop %r11
    pop %r12
    pop %r13
    pop %r14
    pop %r15
    .endm

    trap_common:
    cld
    push_regs
    testb $3, {cs_off}(%rsp)
    jz 1f
    /* From ring 3: the frame sits at the top of RSP0; resume the kernel. */
    mov kernel_resume_rsp(%rip), %rsp
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %rbp
    pop %rbx
    ret
1:
    mov %rsp, %rdi
    call {kernel_trap}
    pop_regs
    add $16, %rsp
    iretq

    trap_ist:
    cld
    push_regs
    mov %rsp, %rdi
    call {fatal_trap}
    ud2

    /* NMI, on IST1: the per-CPU word sits right above the hardware frame
       (nmi.rs). Nothing here touches the stack the NMI interrupted. */
    trap_nmi:
    cld
    push_regs
    mov %rsp, %rdi
    call {nmi_trap}
    pop_regs
    add $16, %rsp
    iretq

    .macro save_kernel
    push %rbx
    push %rbp
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, kernel_resume_rsp(%rip)
    movabs ${rsp0}, %rsp
    add ${frame_start}, %rsp
    pop_regs
    add $16, %rsp
    .endm

    .globl enter_user
    enter_user:
    save_kernel
    iretq

    /* SYSRET loads RIP from RCX and RFLAGS from R11, CS/SS from STAR. */
    .globl enter_user_sysret
    enter_user_sysret:
    save_kernel
    mov {rsp_off}(%rsp), %rsp
    sysretq
    "#,
    e0 = const ERROR_CODE_VECTORS[0],
    e1 = const ERROR_CODE_VECTORS[1],
    e2 = const ERROR_CODE_VECTORS[2],
    e3 = const ERROR_CODE_VECTORS[3],
    e4 = const ERROR_CODE_VECTORS[4],
    e5 = const ERROR_CODE_VECTORS[5],
    e6 = const ERROR_CODE_VECTORS[6],
    e7 = const ERROR_CODE_VECTORS[7],
    e8 = const ERROR_CODE_VECTORS[8],
    e9 = const ERROR_CODE_VECTORS[9],
    rsp0 = sym RSP0_STACK,
    rsp0_size = const RSP0_STACK_SIZE,
    frame_start = const RSP0_STACK_SIZE - FRAME_SIZE,
    rsp_off = const HW_FRAME_RSP_OFFSET,
    user_ds = const USER_DS,
    user_cs64 = const USER_CS64,
    vsyscall = const VECTOR_SYSCALL,
    cs_off = const FRAME_CS_OFFSET,
    kernel_trap = sym kernel_trap,
    fatal_trap = sym fatal_trap,
    nmi_trap = sym nmi_trap,
    options(att_syntax)
);

/// A trap taken in ring 0 (not NMI/#DF/#MC). The kernel runs with
/// interrupts off, so only a spurious LAPIC interrupt is expected; any
/// exception is a testbed bug and ends the run.
extern "C" fn kernel_trap(frame: &mut TrapFrame) {
    if frame.vector == VECTOR_SPURIOUS {
        return;
    }
    // Monitor mode: an interrupt that arrived while guest code ran,
    // handed over by the monitor with `int n` after its switch back.
    if frame.vector >= 32 {
        crate::monitor::host_interrupt(frame.vector);
        return;
    }
    report_fatal("kernel trap", frame);
}

/// #DF, #MC: print and fail, whatever ring they came from.
extern "C" fn fatal_trap(frame: &mut TrapFrame) -> ! {
    report_fatal("fatal trap", frame);
}

/// NMI: counted during an NMI storm (nmi.rs), else fatal like #DF and #MC.
extern "C" fn nmi_trap(frame: &mut TrapFrame) {
    let above = (frame as *const TrapFrame).wrapping_add(1) as *const u64;
    // SAFETY: the word above the hardware frame is the per-CPU word of
    // the IST stack this handler runs on (nmi.rs), or, without a storm,
    // the first word past this kernel's NMI stack (cpu.rs: the bottom of
    // the next IST stack), mapped; only read.
    let pcpu = unsafe { above.read() };
    if !crate::nmi::host_nmi(frame, pcpu) {
        report_fatal("fatal trap", frame);
    }
}

fn report_fatal(what: &str, f: &TrapFrame) -> ! {
    crate::log!(
        "testbed: {what}: vector {} error {:#x} rip {:#x} cs {:#x} rflags {:#x} rsp {:#x} cr2 {:#x}",
        f.vector,
        f.error_code,
        f.rip,
        f.cs,
        f.rflags,
        f.rsp,
        crate::x86::read_cr2()
    );
    crate::log!(
        "testbed: rax {:#x} rbx {:#x} rcx {:#x} rdx {:#x} rsi {:#x} rdi {:#x} rbp {:#x}",
        f.rax,
        f.rbx,
        f.rcx,
        f.rdx,
        f.rsi,
        f.rdi,
        f.rbp
    );
    crate::exit::failure()
}
