//! The CPU side of the KPI: critical sections (`critical_enter_KBI`,
//! `critical_exit_KBI`, sys/kern/kern_switch.c), the FPU owner (`fpudna`,
//! sys/amd64/amd64/fpu.c), `pmap_kextract` (sys/amd64/amd64/pmap.c), and
//! the scheduler's marks on the thread (`td_owepreempt`, `td_ast`) that the
//! module's `should_yield` reads.
//!
//! These run inside the module's EXEC path and (the tick) in interrupt
//! context, so they touch the thread and pcpu through their addresses,
//! never through the kernel lock.

use super::kpi::{peek, poke};
use super::layout::Layout;
use crate::{fail, x86};
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// The personality's one thread and pcpu, and its layout; 0 before boot.
static THREAD: AtomicU64 = AtomicU64::new(0);
static PCPU: AtomicU64 = AtomicU64::new(0);
static LAYOUT: AtomicU64 = AtomicU64::new(0);
/// PCPU(cpuid) as last set (`testbed.cpuid`, 0 by default).
static CPUID: AtomicU32 = AtomicU32::new(0);
/// The CPU indices the thread moves through, one per ioctl
/// ([`set_cpuids`]); `CPUIDS_LEN` of them are set.
pub const MAX_CPUIDS: usize = 4;
static CPUIDS: [AtomicU32; MAX_CPUIDS] = [const { AtomicU32::new(0) }; MAX_CPUIDS];
static CPUIDS_LEN: AtomicU64 = AtomicU64::new(0);

/// Counters for the end-of-run check.
static ENTERED: AtomicU64 = AtomicU64::new(0);
static LEFT: AtomicU64 = AtomicU64::new(0);
static DEFERRED_PREEMPTIONS: AtomicU64 = AtomicU64::new(0);
static FPUDNA_CALLS: AtomicU64 = AtomicU64::new(0);
static TICKS: AtomicU64 = AtomicU64::new(0);
static ASTS: AtomicU64 = AtomicU64::new(0);
static IOCTLS: AtomicU64 = AtomicU64::new(0);

/// Every this many timer ticks taken inside the module the thread's time
/// slice is over: the tick sets TDA_SCHED in `td_ast` (sched_clock →
/// ast_sched_locked), so the module must go back to user mode
/// (KQEMU_RET_INTR) for the reschedule.
const SLICE_TICKS: u64 = 4;
/// CR0.TS (SDM vol. 3A, 2.5).
const CR0_TS: u64 = 1 << 3;
/// FreeBSD's kernel half starts here (VM_MIN_KERNEL_ADDRESS, machine/vmparam.h).
const KERNEL_HALF: u64 = 0xffff_8000_0000_0000;
const PTE_P: u64 = 1 << 0;
const PTE_PS: u64 = 1 << 7;
const PTE_FRAME: u64 = 0x000f_ffff_ffff_f000;

/// What the run's end reports (`critical-sections` check).
pub struct Summary {
    pub cpuid: u32,
    /// What [`set_cpuid`] made it.
    pub cpuid_set: u32,
    pub critnest: u32,
    pub owepreempt: u8,
    pub entered: u64,
    pub left: u64,
    pub deferred: u64,
    pub fpudna: u64,
    pub ticks: u64,
    pub asts: u64,
}

pub fn boot(layout: &'static Layout, pcpu: u64, thread: u64) {
    LAYOUT.store(layout as *const Layout as u64, Ordering::Relaxed);
    PCPU.store(pcpu, Ordering::Relaxed);
    // The user thread owns the FPU from the start: FreeBSD 14/15 switch
    // the FPU eagerly (fpu_activate_sw), so a running user thread is
    // PCPU(fpcurthread). PCPU(cpuid) is 0 (the boot CPU), already zero.
    // SAFETY: the boot's zeroed pcpu block, offsets from the headers.
    unsafe { poke(pcpu + layout.pcpu_pc_fpcurthread, thread) };
    THREAD.store(thread, Ordering::Release);
}

/// Makes this the CPU with index `cpuids[0]` (PCPU(cpuid), which the
/// module reads in kqemu_cpu_enter): a host with more CPUs than the
/// module has switcher blocks (`testbed.cpuid`). With more indices, each
/// ioctl runs on the next one, as a thread the scheduler migrates between
/// ioctls. At most [`MAX_CPUIDS`] are kept.
pub fn set_cpuids(cpuids: &[u32]) {
    let cpuids = &cpuids[..cpuids.len().min(MAX_CPUIDS)];
    for (slot, &cpuid) in CPUIDS.iter().zip(cpuids) {
        slot.store(cpuid, Ordering::Relaxed);
    }
    CPUIDS_LEN.store(cpuids.len() as u64, Ordering::Relaxed);
    set_cpuid(cpuids.first().copied().unwrap_or(0));
}

fn set_cpuid(cpuid: u32) {
    let (l, pcpu, _) = booted();
    // SAFETY: the personality's pcpu block; pc_cpuid is a u_int.
    unsafe { poke(pcpu + l.pcpu_pc_cpuid, cpuid) };
    CPUID.store(cpuid, Ordering::Relaxed);
}

fn parts() -> Option<(&'static Layout, u64, u64)> {
    let td = THREAD.load(Ordering::Acquire);
    if td == 0 {
        return None;
    }
    // SAFETY: LAYOUT was set from a 'static Layout before THREAD.
    let l = unsafe { &*(LAYOUT.load(Ordering::Relaxed) as *const Layout) };
    Some((l, PCPU.load(Ordering::Relaxed), td))
}

fn booted() -> (&'static Layout, u64, u64) {
    parts().unwrap_or_else(|| fail(format_args!("FreeBSD personality: CPU KPI before boot")))
}

fn critnest(l: &Layout, td: u64) -> u32 {
    // SAFETY: the personality's thread block.
    unsafe { peek::<u32>(td + l.thread_td_critnest) }
}

/// critical_enter(): td_critnest++; no preemption until the last exit.
pub extern "C" fn critical_enter_kbi() {
    let (l, _, td) = booted();
    // SAFETY: the personality's thread block.
    unsafe { poke::<u32>(td + l.thread_td_critnest, critnest(l, td) + 1) };
    ENTERED.fetch_add(1, Ordering::Relaxed);
}

/// critical_exit(): the last exit runs the preemption a tick deferred
/// (critical_exit_preempt: the thread is switched out and back here).
pub extern "C" fn critical_exit_kbi() {
    let (l, _, td) = booted();
    let n = critnest(l, td);
    if n == 0 {
        fail(format_args!("panic: critical_exit: td_critnest == 0"));
    }
    // SAFETY: the personality's thread block.
    let preempt = unsafe {
        poke::<u32>(td + l.thread_td_critnest, n - 1);
        let owed = n == 1 && peek::<u8>(td + l.thread_td_owepreempt) != 0;
        if owed {
            poke::<u8>(td + l.thread_td_owepreempt, 0);
            DEFERRED_PREEMPTIONS.fetch_add(1, Ordering::Relaxed);
        }
        owed
    };
    LEFT.fetch_add(1, Ordering::Relaxed);
    if preempt {
        super::threads::preempt();
    }
}

/// fpudna(): makes curthread's FPU state live and clears CR0.TS. The
/// testbed's kernel never touches the FPU registers (soft-float), so the
/// state the pcb would hold is still in them: loading it is a no-op.
pub extern "C" fn fpudna() {
    let (l, pcpu, td) = booted();
    FPUDNA_CALLS.fetch_add(1, Ordering::Relaxed);
    // SAFETY: the personality's pcpu block.
    let owner: u64 = unsafe { peek(pcpu + l.pcpu_pc_fpcurthread) };
    if owner != td && owner != 0 {
        fail(format_args!(
            "panic: fpudna: fpcurthread = {owner:#x}, curthread = {td:#x}"
        ));
    }
    // SAFETY: as above; clearing TS re-enables the FPU for this thread.
    unsafe {
        poke(pcpu + l.pcpu_pc_fpcurthread, td);
        x86::write_cr0(x86::read_cr0() & !CR0_TS);
    }
}

/// pmap_kextract(va): kernel addresses through the kernel's page tables
/// (module image, kernel image, DMAP); 0 when unmapped or in the user half
/// (the kernel pmap maps nothing there).
pub extern "C" fn pmap_kextract(va: u64) -> u64 {
    if va < KERNEL_HALF {
        return 0;
    }
    let mut table = x86::read_cr3() & PTE_FRAME;
    // Levels PML4, PDPT, PD, PT: index shifts 39, 30, 21, 12.
    for shift in [39u32, 30, 21, 12] {
        let index = (va >> shift) & 511;
        // SAFETY: page-table pages are reached through the DMAP.
        let entry: u64 = unsafe { peek(crate::mem::phys_to_virt(table) + index * 8) };
        if entry & PTE_P == 0 {
            return 0;
        }
        let page_mask = (1u64 << shift) - 1;
        if shift == 12 || ((shift == 30 || shift == 21) && entry & PTE_PS != 0) {
            return (entry & PTE_FRAME & !page_mask) | (va & page_mask);
        }
        table = entry & PTE_FRAME;
    }
    0
}

/// A timer interrupt the module handed back while guest code ran: the
/// scheduler wants to preempt. Inside a critical section that is deferred
/// to the last critical_exit (td_owepreempt); every SLICE_TICKS the slice
/// ends and TDA_SCHED is posted for the return to user mode.
pub fn tick() {
    let Some((l, _, td)) = parts() else {
        return;
    };
    let ticks = TICKS.fetch_add(1, Ordering::Relaxed) + 1;
    // SAFETY: the personality's thread block; the module is not inside a
    // KPI call when it re-raises an interrupt.
    unsafe {
        if critnest(l, td) > 0 {
            poke::<u8>(td + l.thread_td_owepreempt, 1);
        }
        if ticks.is_multiple_of(SLICE_TICKS) {
            let ast: i32 = peek(td + l.thread_td_ast);
            poke::<i32>(td + l.thread_td_ast, ast | (1 << l.TDA_SCHED));
        }
    }
}

/// cpu_switch: `td` is curthread now, and owns the FPU (eager switching;
/// threads.rs switched the registers).
pub fn set_curthread(td: u64) {
    let (l, pcpu, _) = booted();
    // SAFETY: the personality's pcpu block and a live struct thread.
    unsafe {
        poke(pcpu + l.pcpu_pc_curthread, td);
        poke(pcpu + l.pcpu_pc_fpcurthread, td);
    }
    THREAD.store(td, Ordering::Release);
}

/// signotify: a signal the thread can take is pending, so TDA_SIG goes
/// into `td_ast` (ast_sched); the module's `should_yield` sees it and the
/// signal is delivered on the way back to user mode.
pub fn signal_ast(l: &Layout) {
    let Some((_, _, td)) = parts() else {
        return;
    };
    // SAFETY: the personality's thread block; this also runs in the tick,
    // when the module is not inside a KPI call.
    unsafe {
        let ast: i32 = peek(td + l.thread_td_ast);
        poke::<i32>(td + l.thread_td_ast, ast | (1 << l.TDA_SIG));
    }
}

/// Before a device ioctl: every second one finds the thread's FPU state
/// saved to its pcb and CR0.TS set (as after fpuexit(), or a hypervisor
/// setting TS, fpudna()'s comment), so the module must use fpudna() before
/// running guest code on the FPU.
pub fn before_ioctl() {
    let (l, pcpu, _) = booted();
    let n = IOCTLS.fetch_add(1, Ordering::Relaxed);
    let cpuids = CPUIDS_LEN.load(Ordering::Relaxed);
    if cpuids > 1 {
        set_cpuid(CPUIDS[(n % cpuids) as usize].load(Ordering::Relaxed));
    }
    if n % 2 == 1 {
        // SAFETY: the personality's pcpu; the testbed's kernel and the
        // module (check-kld's fpu-instructions) use no FPU instruction
        // until fpudna() clears TS.
        unsafe {
            poke::<u64>(pcpu + l.pcpu_pc_fpcurthread, 0);
            x86::write_cr0(x86::read_cr0() | CR0_TS);
        }
    }
}

/// After a device ioctl: if the module did not take the FPU, the state is
/// still "in the pcb" and the next user FPU instruction would fault it in
/// (fpudna from trap()); the testbed does that now, since its ring-3 runner
/// does not handle #NM.
pub fn after_ioctl() {
    if x86::read_cr0() & CR0_TS != 0 {
        let (l, pcpu, td) = booted();
        // SAFETY: as in fpudna.
        unsafe {
            poke(pcpu + l.pcpu_pc_fpcurthread, td);
            x86::write_cr0(x86::read_cr0() & !CR0_TS);
        }
    }
}

/// userret(): no critical section may be held, a deferred preemption has
/// run, and the pending ASTs run now (ast() clears td_ast).
pub fn return_to_user() {
    let Some((l, _, td)) = parts() else {
        return;
    };
    let n = critnest(l, td);
    if n != 0 {
        fail(format_args!(
            "panic: userret: Returning in a critical section (td_critnest {n})"
        ));
    }
    // SAFETY: the personality's thread block.
    unsafe {
        if peek::<i32>(td + l.thread_td_ast) != 0 {
            poke::<i32>(td + l.thread_td_ast, 0);
            ASTS.fetch_add(1, Ordering::Relaxed);
        }
    }
}

pub fn summary() -> Summary {
    let (l, pcpu, td) = booted();
    Summary {
        // SAFETY: the personality's pcpu block.
        cpuid: unsafe { peek(pcpu + l.pcpu_pc_cpuid) },
        cpuid_set: CPUID.load(Ordering::Relaxed),
        critnest: critnest(l, td),
        // SAFETY: the personality's thread block.
        owepreempt: unsafe { peek(td + l.thread_td_owepreempt) },
        entered: ENTERED.load(Ordering::Relaxed),
        left: LEFT.load(Ordering::Relaxed),
        deferred: DEFERRED_PREEMPTIONS.load(Ordering::Relaxed),
        fpudna: FPUDNA_CALLS.load(Ordering::Relaxed),
        ticks: TICKS.load(Ordering::Relaxed),
        asts: ASTS.load(Ordering::Relaxed),
    }
}
