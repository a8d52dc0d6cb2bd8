//! Signals of the FreeBSD process, as far as a client of `/dev/kqemu` can
//! observe them (sys/kern/kern_sig.c, kern_time.c, sys/amd64/amd64/
//! exec_machdep.c, sigtramp.S): `sigaction(2)`, `sigprocmask(2)`,
//! `kill(2)` to itself, `setitimer(2)` ITIMER_REAL, and delivery on the way
//! back to user mode through the amd64 signal frame, the sigcode
//! trampoline and `sigreturn(2)`.
//!
//! A signal posted while the thread is inside the module (the interval
//! timer fires on a tick the module handed back) sets TDA_SIG in `td_ast`
//! (tdsendsignal → signotify), so the module's `should_yield` ends the
//! EXEC with KQEMU_RET_INTR; the ioctl returns and the handler runs before
//! the thread is back in user code (ast → postsig → sendsig), as on
//! FreeBSD. Not modelled: sigaltstack, the extended (XSAVE) FPU state in
//! the frame, stop/continue signals, other processes, other itimers.

use super::kpi;
use super::layout::Layout;
use crate::log;
use alloc::vec;
use alloc::vec::Vec;
use core::arch::asm;
use kqemu_client::mm::{Mm, Placement};
use kqemu_client::{GuestRam, UserContext};

/// Register indices of UserContext::regs (kqemu order).
const RCX: usize = 1;
const RDX: usize = 2;
const RSP: usize = 4;
const RSI: usize = 6;
const RDI: usize = 7;
/// sendsig skips the amd64 ABI's red zone below the interrupted RSP.
const RED_ZONE: u64 = 128;
/// sendsig clears PSL_T and PSL_D for the handler (machine/psl.h).
const PSL_T: u64 = 1 << 8;
const PSL_D: u64 = 1 << 10;
/// SIG_DFL and SIG_IGN (sys/signal.h).
const SIG_DFL: u64 = 0;
const SIG_IGN: u64 = 1;
/// Signals whose default action is to do nothing (sigproptbl,
/// SIGPROP_IGNORE): SIGURG, SIGCONT, SIGCHLD, SIGIO, SIGWINCH, SIGINFO,
/// SIGTHR. Every other one of this model terminates the process.
const DEFAULT_IGNORED: [u32; 7] = [16, 19, 20, 23, 28, 29, 32];
/// The process's pid and credentials (the personality's one process).
const PID: i32 = 1;
const UID: u32 = 0;
/// `sigreturn` returns without touching the restored registers
/// (EJUSTRETURN, sys/sys/errno.h, kernel only).
pub const EJUSTRETURN: i32 = -2;
/// PROT_READ | PROT_WRITE, PROT_READ | PROT_EXEC (sys/sys/mman.h).
const PROT_RW: u32 = 0x3;
const PROT_RX: u32 = 0x5;
/// sys/sys/syscall.h.
const SYS_SIGRETURN: u32 = 417;
/// FXSAVE legacy-area offsets and power-on values (SDM vol. 1, 10.5.1,
/// 8.1.5, 10.2.3): the state a handler starts with (fpstate_drop).
const FCW_INIT: u16 = 0x037f;
const MXCSR_OFFSET: usize = 24;
const MXCSR_INIT: u32 = 0x1f80;
/// One second in microseconds.
const USEC: u64 = 1_000_000;
/// `struct itimerval { struct timeval it_interval, it_value; }` and
/// `struct timeval { time_t tv_sec; suseconds_t tv_usec; }` on amd64
/// (sys/sys/time.h, _timeval.h): 16 bytes each.
const IT_INTERVAL: u64 = 0;
const IT_VALUE: u64 = 16;

#[derive(Clone, Copy, Default)]
struct Action {
    handler: u64,
    flags: u32,
    mask: u128,
}

#[derive(Clone, Copy, Default)]
struct Info {
    code: i32,
    pid: i32,
    uid: u32,
}

struct State {
    layout: &'static Layout,
    actions: Vec<Action>,
    infos: Vec<Info>,
    blocked: u128,
    pending: u128,
    /// ITIMER_REAL: TSC deadline and interval in cycles (0: disarmed / one-shot).
    itimer: Option<(u64, u64)>,
    tsc_khz: u64,
    /// The process's sigcode (its "shared page"), 0 before exec.
    sigcode: u64,
    /// sigaction(2) was used: the run reports the signal counts.
    used: bool,
    posted: u64,
    delivered: u64,
    sigreturns: u64,
}

static STATE: spin::Mutex<Option<State>> = spin::Mutex::new(None);

/// Runs `f` on the signal state; None before the process exists.
/// Interrupt context (the tick) comes here too: the personality never
/// holds this lock while user or module code runs, and those are the only
/// times a tick is taken.
fn try_with<R>(f: impl FnOnce(&mut State, &'static Layout) -> R) -> Option<R> {
    let Some(mut guard) = STATE.try_lock() else {
        crate::fail(format_args!("FreeBSD personality: re-entrant signal state"))
    };
    let state = guard.as_mut()?;
    let layout = state.layout;
    Some(f(state, layout))
}

/// As try_with, for the system calls (made only by a process).
fn with<R>(f: impl FnOnce(&mut State, &'static Layout) -> R) -> R {
    try_with(f)
        .unwrap_or_else(|| crate::fail(format_args!("FreeBSD personality: signals before exec")))
}

fn bit(sig: u32) -> u128 {
    1u128 << (sig - 1)
}

/// Signals SIGKILL and SIGSTOP can be neither caught nor blocked.
fn uncatchable(l: &Layout) -> u128 {
    bit(l.SIGKILL as u32) | bit(l.SIGSTOP as u32)
}

fn get<const N: usize>(bytes: &[u8], at: u64) -> [u8; N] {
    let at = at as usize;
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[at..at + N]);
    out
}

fn put(bytes: &mut [u8], at: u64, value: &[u8]) {
    let at = at as usize;
    bytes[at..at + value.len()].copy_from_slice(value);
}

/// The sigcode of sys/amd64/amd64/sigtramp.S, assembled: call the
/// handler through the frame's first word, then sigreturn(&sf_uc); `hlt`
/// (a #GP at ring 3) if sigreturn ever returns.
fn sigcode(l: &Layout) -> Vec<u8> {
    let mut code = vec![0xff, 0x14, 0x24]; // call *(%rsp)
    code.extend_from_slice(&[0x48, 0x8d, 0x7c, 0x24, l.sigframe_sf_uc as u8]); // lea sf_uc(%rsp),%rdi
    code.extend_from_slice(&[0x6a, 0x00]); // pushq $0 (the fake return address)
    code.extend_from_slice(&[0x48, 0xc7, 0xc0]); // mov $SYS_sigreturn,%rax
    code.extend_from_slice(&SYS_SIGRETURN.to_le_bytes());
    code.extend_from_slice(&[0x0f, 0x05, 0xf4, 0xeb, 0xfd]); // syscall; 0: hlt; jmp 0b
    code
}

/// exec: fresh dispositions, and the sigcode mapped read/execute in the
/// new address space (FreeBSD's shared page holds it).
pub fn exec(mm: &mut Mm, ram: &mut GuestRam, tsc_khz: u64) -> Result<(), kqemu_client::Errno> {
    let l = kpi::with(|k| k.layout);
    if l.sigframe_sf_uc >= 0x80 {
        crate::fail(format_args!("sigcode: sf_uc offset does not fit a disp8"));
    }
    let page = kpi::PAGE_SIZE;
    let base = mm.map_region(ram, Placement::Hint(0), page, PROT_RW)?;
    mm.write(ram, base, &sigcode(l))?;
    mm.protect(ram, base, page, PROT_RX)?;
    *STATE.lock() = Some(State {
        layout: l,
        actions: vec![Action::default(); l._SIG_MAXSIG as usize],
        infos: vec![Info::default(); l._SIG_MAXSIG as usize],
        blocked: 0,
        pending: 0,
        itimer: None,
        tsc_khz: tsc_khz.max(1),
        sigcode: base,
        used: false,
        posted: 0,
        delivered: 0,
        sigreturns: 0,
    });
    Ok(())
}

/// The process is gone: its timer and pending signals with it (the
/// counts stay for the end-of-run check).
pub fn exit() {
    try_with(|st, _| {
        st.itimer = None;
        st.pending = 0;
    });
}

/// tdsendsignal: a signal set to be ignored is dropped; otherwise it is
/// pending, and when not blocked the thread gets TDA_SIG (signotify).
fn post(st: &mut State, l: &Layout, sig: u32, info: Info) {
    let i = (sig - 1) as usize;
    if st.actions[i].handler == SIG_IGN
        || (st.actions[i].handler == SIG_DFL && DEFAULT_IGNORED.contains(&sig))
    {
        return;
    }
    st.pending |= bit(sig);
    st.infos[i] = info;
    st.posted += 1;
    if st.blocked & bit(sig) == 0 {
        super::cpu::signal_ast(l);
    }
}

/// The clock: an expired ITIMER_REAL sends SIGALRM (realitexpire →
/// kern_psignal, si_code SI_KERNEL) and re-arms with its interval. Called
/// from the tick (also inside the module) and on every way into the kernel.
pub fn clock() {
    let now = crate::x86::rdtsc();
    try_with(|st, l| {
        let Some((deadline, interval)) = st.itimer else {
            return;
        };
        if now < deadline {
            return;
        }
        st.itimer = (interval != 0).then(|| (now + interval, interval));
        let info = Info {
            code: l.SI_KERNEL as i32,
            pid: 0,
            uid: 0,
        };
        post(st, l, l.SIGALRM as u32, info);
    });
}

fn read_set(bytes: &[u8]) -> u128 {
    u128::from_le_bytes(get::<16>(bytes, 0))
}

/// sigaction(2): `act` (if any) replaces the disposition of `sig` after the
/// old one is stored at `oact` (if any).
pub fn sigaction(
    mm: &mut Mm,
    ram: &mut GuestRam,
    sig: u64,
    act: u64,
    oact: u64,
) -> Result<u64, i32> {
    with(|st, l| {
        let einval = l.EINVAL as i32;
        let efault = l.EFAULT as i32;
        if sig == 0 || sig > l._SIG_MAXSIG {
            return Err(einval);
        }
        let sig = sig as u32;
        let size = l.sizeof_sigaction as usize;
        let new = if act != 0 {
            let mut b = vec![0u8; size];
            mm.read(ram, act, &mut b).map_err(|_| efault)?;
            Some(Action {
                handler: u64::from_le_bytes(get(&b, 0)),
                flags: u32::from_le_bytes(get(&b, l.sigaction_sa_flags)),
                mask: read_set(&b[l.sigaction_sa_mask as usize..]),
            })
        } else {
            None
        };
        if let Some(a) = new {
            if bit(sig) & uncatchable(l) != 0 && a.handler != SIG_DFL {
                return Err(einval);
            }
        }
        let i = (sig - 1) as usize;
        if oact != 0 {
            let old = st.actions[i];
            let mut b = vec![0u8; size];
            put(&mut b, 0, &old.handler.to_le_bytes());
            put(&mut b, l.sigaction_sa_flags, &old.flags.to_le_bytes());
            put(&mut b, l.sigaction_sa_mask, &old.mask.to_le_bytes());
            mm.write(ram, oact, &b).map_err(|_| efault)?;
        }
        if let Some(a) = new {
            st.actions[i] = a;
            st.used = true;
            // Setting SIG_IGN (or SIG_DFL of an ignored-by-default signal)
            // discards it when pending (kern_sigaction).
            if a.handler == SIG_IGN || (a.handler == SIG_DFL && DEFAULT_IGNORED.contains(&sig)) {
                st.pending &= !bit(sig);
            }
        }
        Ok(0)
    })
}

/// sigprocmask(2): SIG_BLOCK, SIG_UNBLOCK, SIG_SETMASK; SIGKILL and
/// SIGSTOP stay unblocked. An unblocked pending signal is delivered on
/// the way back.
pub fn sigprocmask(
    mm: &mut Mm,
    ram: &mut GuestRam,
    how: u64,
    set: u64,
    oset: u64,
) -> Result<u64, i32> {
    with(|st, l| {
        let efault = l.EFAULT as i32;
        let old = st.blocked;
        if set != 0 {
            let mut b = [0u8; 16];
            mm.read(ram, set, &mut b).map_err(|_| efault)?;
            let s = read_set(&b);
            st.blocked = match how {
                h if h == l.SIG_BLOCK => old | s,
                h if h == l.SIG_UNBLOCK => old & !s,
                h if h == l.SIG_SETMASK => s,
                _ => return Err(l.EINVAL as i32),
            } & !uncatchable(l);
        }
        if oset != 0 {
            mm.write(ram, oset, &old.to_le_bytes())
                .map_err(|_| efault)?;
        }
        if st.pending & !st.blocked != 0 {
            super::cpu::signal_ast(l);
        }
        Ok(0)
    })
}

/// kill(2) of this process, by its pid: si_code SI_USER with the
/// sender's pid and uid; signal 0 only checks the pid. The process is pid
/// 1, which killpg1 skips, so a process group (0, -1, -pgid) or any other
/// pid finds no process: ESRCH.
pub fn kill(pid: u64, sig: u64) -> Result<u64, i32> {
    with(|st, l| {
        if sig > l._SIG_MAXSIG {
            return Err(l.EINVAL as i32);
        }
        if pid as i64 != i64::from(PID) {
            return Err(l.ESRCH as i32);
        }
        if sig != 0 {
            let info = Info {
                code: l.SI_USER as i32,
                pid: PID,
                uid: UID,
            };
            post(st, l, sig as u32, info);
        }
        Ok(0)
    })
}

/// A `struct timeval` of an itimerval in TSC cycles; EINVAL when out of
/// range (itimerfix, and kern_setitimer's INT32_MAX / 2 seconds).
fn timeval(b: &[u8], at: u64, tsc_khz: u64, einval: i32) -> Result<u64, i32> {
    let sec = i64::from_le_bytes(get(b, at));
    let usec = i64::from_le_bytes(get(b, at + 8));
    if sec < 0 || !(0..USEC as i64).contains(&usec) || sec > i64::from(i32::MAX / 2) {
        return Err(einval);
    }
    let cycles_per_sec = tsc_khz.saturating_mul(1000);
    Ok((sec as u64)
        .saturating_mul(cycles_per_sec)
        .saturating_add(usec as u64 * tsc_khz / 1000))
}

fn put_timeval(b: &mut [u8], at: u64, cycles: u64, tsc_khz: u64) {
    let usec = u128::from(cycles) * 1000 / u128::from(tsc_khz);
    put(b, at, &((usec / u128::from(USEC)) as i64).to_le_bytes());
    put(b, at + 8, &((usec % u128::from(USEC)) as i64).to_le_bytes());
}

/// setitimer(2) of ITIMER_REAL (`struct itimerval { it_interval;
/// it_value; }`): a zero value disarms; the old timer goes to `old`. The
/// virtual and profiling timers are not modelled (EINVAL, with a log line).
pub fn setitimer(
    mm: &mut Mm,
    ram: &mut GuestRam,
    which: u64,
    new: u64,
    old: u64,
) -> Result<u64, i32> {
    with(|st, l| {
        let (einval, efault) = (l.EINVAL as i32, l.EFAULT as i32);
        if which > l.ITIMER_PROF {
            return Err(einval);
        }
        if which != l.ITIMER_REAL {
            log!("kld: setitimer({which}) is not modelled, only ITIMER_REAL: EINVAL");
            return Err(einval);
        }
        let size = l.sizeof_itimerval as usize;
        let next = if new != 0 {
            let mut b = vec![0u8; size];
            mm.read(ram, new, &mut b).map_err(|_| efault)?;
            // kern_setitimer: the interval counts only with a value.
            let value = timeval(&b, IT_VALUE, st.tsc_khz, einval)?;
            let interval = match value {
                0 => 0,
                _ => timeval(&b, IT_INTERVAL, st.tsc_khz, einval)?,
            };
            Some((value != 0).then(|| (crate::x86::rdtsc() + value, interval)))
        } else {
            None
        };
        if old != 0 {
            let mut b = vec![0u8; size];
            if let Some((deadline, interval)) = st.itimer {
                let left = deadline.saturating_sub(crate::x86::rdtsc()).max(1);
                put_timeval(&mut b, IT_INTERVAL, interval, st.tsc_khz);
                put_timeval(&mut b, IT_VALUE, left, st.tsc_khz);
            }
            mm.write(ram, old, &b).map_err(|_| efault)?;
        }
        if let Some(timer) = next {
            st.itimer = timer;
        }
        Ok(0)
    })
}

#[repr(C, align(16))]
struct FxArea([u8; 512]);

/// The live FPU registers hold the process's state (the testbed's kernel
/// is soft-float, and the module leaves the user state live after EXEC).
fn fxsave(area: &mut FxArea) {
    // SAFETY: a 16-aligned 512-byte area; CR4.OSFXSR is set and CR0.TS is
    // clear on the way back to user mode (cpu::after_ioctl).
    unsafe { asm!("fxsave64 [{}]", in(reg) area.0.as_mut_ptr(), options(nostack)) };
}

fn fxrstor(area: &FxArea) {
    // SAFETY: as in fxsave; reserved MXCSR bits are checked by the callers.
    unsafe { asm!("fxrstor64 [{}]", in(reg) area.0.as_ptr(), options(nostack, readonly)) };
}

fn initial_fpu() -> FxArea {
    let mut a = FxArea([0; 512]);
    a.0[..2].copy_from_slice(&FCW_INIT.to_le_bytes());
    a.0[MXCSR_OFFSET..MXCSR_OFFSET + 4].copy_from_slice(&MXCSR_INIT.to_le_bytes());
    a
}

/// mcontext offset of each register of UserContext::regs (kqemu order).
fn register_offsets(l: &Layout) -> [u64; 16] {
    [
        l.mc_rax, l.mc_rcx, l.mc_rdx, l.mc_rbx, l.mc_rsp, l.mc_rbp, l.mc_rsi, l.mc_rdi, l.mc_r8,
        l.mc_r9, l.mc_r10, l.mc_r11, l.mc_r12, l.mc_r13, l.mc_r14, l.mc_r15,
    ]
}

/// What the way back to user mode decided.
pub enum Delivery {
    /// Back to user code (with any handler frames pushed).
    Resume,
    /// The process is killed by this signal (its default action, or a
    /// frame that could not be written: SIGILL as sigexit does).
    Killed(i32),
}

/// ast → postsig: every pending unblocked signal, lowest first; a handler
/// gets sendsig's frame.
pub fn deliver(mm: &mut Mm, ram: &mut GuestRam, ctx: &mut UserContext) -> Delivery {
    try_with(|st, l| {
        for _ in 0..l._SIG_MAXSIG {
            let ready = st.pending & !st.blocked;
            if ready == 0 {
                break;
            }
            let sig = ready.trailing_zeros() + 1;
            st.pending &= !bit(sig);
            let action = st.actions[(sig - 1) as usize];
            match action.handler {
                SIG_IGN => continue,
                SIG_DFL if DEFAULT_IGNORED.contains(&sig) => continue,
                SIG_DFL => {
                    log!("kld: pid 1 killed by signal {sig} (default action)");
                    return Delivery::Killed(sig as i32);
                }
                _ => {}
            }
            if send(st, l, sig, action, mm, ram, ctx).is_err() {
                log!(
                    "kld: pid 1: signal {sig} frame not writable at rsp {:#x}: SIGILL",
                    ctx.regs[RSP]
                );
                return Delivery::Killed(4);
            }
        }
        Delivery::Resume
    })
    .unwrap_or(Delivery::Resume)
}

/// sendsig (amd64): the frame below the red zone, 16-byte aligned, the
/// handler's arguments in RDI RSI RDX (RCX: si_addr), RIP at the sigcode.
fn send(
    st: &mut State,
    l: &Layout,
    sig: u32,
    action: Action,
    mm: &mut Mm,
    ram: &mut GuestRam,
    ctx: &mut UserContext,
) -> Result<(), ()> {
    let size = l.sizeof_sigframe;
    let sfp = (ctx.regs[RSP].wrapping_sub(RED_ZONE).wrapping_sub(size)) & !0xf;
    let mut frame = vec![0u8; size as usize];
    let uc = l.sigframe_sf_uc;
    let mc = uc + l.uc_mcontext;
    put(&mut frame, 0, &action.handler.to_le_bytes());
    put(&mut frame, uc + l.uc_sigmask, &st.blocked.to_le_bytes());
    put(
        &mut frame,
        uc + l.uc_stack_ss_flags,
        &(l.SS_DISABLE as i32).to_le_bytes(),
    );
    for (i, off) in register_offsets(l).into_iter().enumerate() {
        put(&mut frame, mc + off, &ctx.regs[i].to_le_bytes());
    }
    put(
        &mut frame,
        mc + l.mc_flags,
        &(l._MC_HASBASES as u32).to_le_bytes(),
    );
    put(&mut frame, mc + l.mc_rip, &ctx.rip.to_le_bytes());
    let cs = u64::from(crate::cpu::user_code_selector(false));
    put(&mut frame, mc + l.mc_cs, &cs.to_le_bytes());
    put(&mut frame, mc + l.mc_rflags, &ctx.rflags.to_le_bytes());
    put(
        &mut frame,
        mc + l.mc_ss,
        &u64::from(crate::cpu::user_data_selector()).to_le_bytes(),
    );
    put(&mut frame, mc + l.mc_len, &l.sizeof_mcontext.to_le_bytes());
    put(
        &mut frame,
        mc + l.mc_fpformat,
        &l._MC_FPFMT_XMM.to_le_bytes(),
    );
    put(
        &mut frame,
        mc + l.mc_ownedfp,
        &l._MC_FPOWNED_FPU.to_le_bytes(),
    );
    let mut fpu = FxArea([0; 512]);
    fxsave(&mut fpu);
    put(&mut frame, mc + l.mc_fpstate, &fpu.0);
    put(&mut frame, mc + l.mc_fsbase, &ctx.fs_base.to_le_bytes());
    put(&mut frame, mc + l.mc_gsbase, &ctx.gs_base.to_le_bytes());
    let info = st.infos[(sig - 1) as usize];
    let siginfo = action.flags & l.SA_SIGINFO as u32 != 0;
    if siginfo {
        let si = l.sigframe_sf_si;
        put(&mut frame, si + l.si_signo, &(sig as i32).to_le_bytes());
        put(&mut frame, si + l.si_code, &info.code.to_le_bytes());
        put(&mut frame, si + l.si_pid, &info.pid.to_le_bytes());
        put(&mut frame, si + l.si_uid, &info.uid.to_le_bytes());
    }
    mm.write(ram, sfp, &frame).map_err(|_| ())?;
    ctx.regs[RDI] = u64::from(sig);
    ctx.regs[RSI] = if siginfo {
        sfp + l.sigframe_sf_si
    } else {
        info.code as u64
    };
    ctx.regs[RDX] = sfp + uc;
    // si_addr: no fault address for these signals.
    ctx.regs[RCX] = 0;
    ctx.regs[RSP] = sfp;
    ctx.rip = st.sigcode;
    ctx.rflags &= !(PSL_T | PSL_D);
    // The handler starts with a clean FPU (fpstate_drop).
    fxrstor(&initial_fpu());
    st.blocked |= action.mask
        | if action.flags & l.SA_NODEFER as u32 == 0 {
            bit(sig)
        } else {
            0
        };
    st.blocked &= !uncatchable(l);
    if action.flags & l.SA_RESETHAND as u32 != 0 {
        st.actions[(sig - 1) as usize] = Action::default();
    }
    st.delivered += 1;
    Ok(())
}

/// sigreturn(2): the registers, FPU state and signal mask of the
/// ucontext at `ucp`; EINVAL for an rflags change outside PSL_USERCHANGE,
/// a CS that is not a user selector, a wrong mc_len or flags, or a bad FPU
/// image (sys_sigreturn, set_fpcontext). On success EJUSTRETURN.
pub fn sigreturn(
    mm: &mut Mm,
    ram: &mut GuestRam,
    ctx: &mut UserContext,
    ucp: u64,
) -> Result<u64, i32> {
    with(|st, l| {
        let (einval, efault) = (l.EINVAL as i32, l.EFAULT as i32);
        let mut uc = vec![0u8; l.sizeof_ucontext as usize];
        mm.read(ram, ucp, &mut uc).map_err(|_| efault)?;
        let mc = l.uc_mcontext;
        let r64 = |off: u64| u64::from_le_bytes(get(&uc, mc + off));
        let rflags = r64(l.mc_rflags);
        let flags = u64::from(u32::from_le_bytes(get(&uc, mc + l.mc_flags)));
        if (rflags ^ ctx.rflags) & !l.PSL_USERCHANGE != 0 {
            log!("kld: sigreturn: rflags {rflags:#x} changes protected bits: EINVAL");
            return Err(einval);
        }
        if r64(l.mc_cs) & 3 != 3
            || r64(l.mc_len) != l.sizeof_mcontext
            || flags & !l._MC_FLAG_MASK != 0
        {
            log!("kld: sigreturn: bad cs, mc_len or mc_flags: EINVAL");
            return Err(einval);
        }
        let format = r64(l.mc_fpformat);
        let owned = r64(l.mc_ownedfp);
        let fpu = if owned == l._MC_FPOWNED_NONE {
            initial_fpu()
        } else if format == l._MC_FPFMT_XMM {
            let mut a = FxArea([0; 512]);
            a.0.copy_from_slice(
                &uc[(mc + l.mc_fpstate) as usize..(mc + l.mc_fpstate) as usize + 512],
            );
            // fpusetregs masks MXCSR with cpu_mxcsr_mask; a reserved bit
            // would make fxrstor fault in the kernel.
            let mxcsr = u32::from_le_bytes(get(&a.0, MXCSR_OFFSET as u64));
            if mxcsr & 0xffff_0000 != 0 {
                return Err(einval);
            }
            a
        } else {
            return Err(einval);
        };
        for (i, off) in register_offsets(l).into_iter().enumerate() {
            ctx.regs[i] = r64(off);
        }
        ctx.rip = r64(l.mc_rip);
        ctx.rflags = rflags;
        if flags & l._MC_HASBASES != 0 {
            ctx.fs_base = r64(l.mc_fsbase);
            ctx.gs_base = r64(l.mc_gsbase);
        }
        fxrstor(&fpu);
        st.blocked = read_set(&uc[l.uc_sigmask as usize..]) & !uncatchable(l);
        st.sigreturns += 1;
        if st.pending & !st.blocked != 0 {
            super::cpu::signal_ast(l);
        }
        Ok(0)
    })
}

/// For the end-of-run check: (posted, delivered, sigreturns), when the
/// process used sigaction(2).
pub fn summary() -> Option<(u64, u64, u64)> {
    try_with(|st, _| st.used.then_some((st.posted, st.delivered, st.sigreturns))).flatten()
}
