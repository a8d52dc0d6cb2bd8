//! `kqemu-run --signal-close PATH`: the error path of issue 7 where the
//! descriptor is closed by a second flow of control while a guest runs —
//! here a signal handler (sigaction(2), setitimer(2), sigreturn through
//! the kernel's sigcode, FreeBSD amd64 calling convention).
//!
//! First `kill(2)` to this process checks the signal machinery itself: the
//! SA_SIGINFO handler runs before kill returns, with the siginfo FreeBSD
//! fills for SI_USER, a 16-byte aligned ucontext, a clean FPU, and
//! sigreturn gives back the interrupted FPU state (MXCSR). Then an
//! ITIMER_REAL timer interrupts PATH (a guest that spins forever, run
//! through KQEMU_EXEC by the client core as in `--linux`): the SIGALRM
//! handler closes `/dev/kqemu` when it finds itself on the way back from
//! an EXEC ioctl (else it re-arms the timer). The pending signal set
//! TDA_SIG in `td_ast`, so that EXEC ended normally (KQEMU_RET_INTR), and
//! FreeBSD runs the handler after the ioctl returned (ast → postsig): the
//! close drops the last reference and the cdevpriv destructor runs in it;
//! the next EXEC and any ioctl answer EBADF, and the module unloads (no
//! instance left).
//!
//! `kqemu-run --thread-close PATH`: the same with a second thread
//! (thr_new(2)) instead of the handler. While the first thread is inside
//! the EXEC ioctl (FreeBSD preempts it there), the second one's EXEC on
//! the same descriptor answers EBUSY and its close(2) returns at once;
//! the running EXEC finishes normally, the destructor runs when that
//! ioctl drops the last file reference, and the module unloads.
//!
//! The handlers and the second thread make only system calls and touch
//! only atomics and their own stack (the heap of main.rs is not
//! reentrant).

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::arch::asm;
use core::ffi::CStr;
use core::fmt::Write;
use core::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, Ordering};

use kqemu::abi::{KqemuCpuState, KQEMU_EXEC, KQEMU_GET_VERSION, KQEMU_RET_INTR};
use kqemu_run::{run_linux, FxArea, GuestSystem, Line, LinuxRun, System, STATUS_RUNNER_FAILED};

use super::{cpu_features, syscall, FreeBsd, FreeBsdConsole};

/// System call numbers (sys/sys/syscall.h).
const SYS_CLOSE: u64 = 6;
const SYS_GETPID: u64 = 20;
const SYS_KILL: u64 = 37;
const SYS_IOCTL: u64 = 54;
const SYS_SETITIMER: u64 = 83;
const SYS_SCHED_YIELD: u64 = 331;
const SYS_SIGPROCMASK: u64 = 340;
const SYS_SIGACTION: u64 = 416;
const SYS_THR_EXIT: u64 = 431;
const SYS_THR_NEW: u64 = 455;
/// sys/sys/signal.h, sys/sys/time.h.
const SIGALRM: u64 = 14;
const SIGUSR1: u64 = 30;
const SA_SIGINFO: i32 = 0x40;
const SI_USER: i32 = 0x10001;
const ITIMER_REAL: u64 = 0;
const SIG_BLOCK: u64 = 1;
const SIG_UNBLOCK: u64 = 2;
/// EBADF, EBUSY (sys/sys/errno.h).
const EBADF: i32 = 9;
const EBUSY: i32 = 16;
/// The second thread's stack, and how often it yields waiting for the
/// first to be inside EXEC.
const THREAD_STACK: u64 = 64 << 10;
const YIELDS_MAX: u32 = 100_000;
/// siginfo_t: si_signo, si_code, si_pid (sys/sys/signal.h, amd64).
const SI_SIGNO: usize = 0;
const SI_CODE: usize = 8;
const SI_PID: usize = 12;
/// MXCSR: the power-on value, and with RC = round toward zero (SDM
/// Vol. 1 10.2.3), and round up.
const MXCSR_INIT: u32 = 0x1f80;
const MXCSR_TRUNCATE: u32 = 0x7f80;
const MXCSR_UP: u32 = 0x5f80;
/// The first timer, and the re-armed ones, in microseconds.
const FIRST_ALARM_US: i64 = 30_000;
const REARM_US: i64 = 10_000;

/// `struct sigaction` (sys/sys/signal.h, amd64): handler, sa_flags,
/// sa_mask; 32 bytes.
#[repr(C)]
struct SigAction {
    handler: u64,
    flags: i32,
    mask: [u32; 4],
}

/// What the SIGUSR1 handler saw.
static USR1_RUNS: AtomicU32 = AtomicU32::new(0);
static USR1_ARG: AtomicI32 = AtomicI32::new(0);
static USR1_SIGNO: AtomicI32 = AtomicI32::new(0);
static USR1_CODE: AtomicI32 = AtomicI32::new(0);
static USR1_PID: AtomicI32 = AtomicI32::new(0);
static USR1_UCONTEXT: AtomicU64 = AtomicU64::new(0);
static USR1_MXCSR: AtomicU32 = AtomicU32::new(0);

/// The descriptor of /dev/kqemu, the EXEC flag and what the SIGALRM
/// handler did.
static DEVICE_FD: AtomicI32 = AtomicI32::new(-1);
static IN_EXEC: AtomicBool = AtomicBool::new(false);
static CLOSED: AtomicBool = AtomicBool::new(false);
static CLOSE_ERROR: AtomicI32 = AtomicI32::new(-1);
static REARMS: AtomicU32 = AtomicU32::new(0);

fn mxcsr() -> u32 {
    let mut v: u32 = 0;
    // SAFETY: stmxcsr stores 4 bytes into `v`.
    unsafe { asm!("stmxcsr [{}]", in(reg) &mut v, options(nostack)) };
    v
}

fn set_mxcsr(v: u32) {
    // SAFETY: the values used here have no reserved bit set.
    unsafe { asm!("ldmxcsr [{}]", in(reg) &v, options(nostack, readonly)) };
}

fn sigaction(sig: u64, handler: extern "C" fn(i32, *const u8, *mut u8)) -> Result<u64, i32> {
    let act = SigAction {
        handler: handler as usize as u64,
        flags: SA_SIGINFO,
        mask: [0; 4],
    };
    let mut old = SigAction {
        handler: u64::MAX,
        flags: -1,
        mask: [0; 4],
    };
    syscall(
        SYS_SIGACTION,
        [
            sig,
            &act as *const SigAction as u64,
            &mut old as *mut SigAction as u64,
            0,
            0,
            0,
        ],
    )?;
    Ok(old.handler)
}

/// sigprocmask(how, {sig}); the old mask's word of `sig`.
fn sigprocmask(how: u64, sig: u64) -> Result<u32, i32> {
    // sigset_t: 4 words, signal n is bit (n - 1) % 32 of word (n - 1) / 32.
    let mut set = [0u32; 4];
    set[((sig - 1) / 32) as usize] = 1 << ((sig - 1) % 32);
    let mut old = [0u32; 4];
    syscall(
        SYS_SIGPROCMASK,
        [how, set.as_ptr() as u64, old.as_mut_ptr() as u64, 0, 0, 0],
    )?;
    Ok(old[((sig - 1) / 32) as usize])
}

/// setitimer(ITIMER_REAL) one-shot after `usec` microseconds.
fn alarm_in(usec: i64) -> Result<u64, i32> {
    // struct itimerval: it_interval, it_value (struct timeval each).
    let value: [i64; 4] = [0, 0, usec / 1_000_000, usec % 1_000_000];
    syscall(
        SYS_SETITIMER,
        [ITIMER_REAL, value.as_ptr() as u64, 0, 0, 0, 0],
    )
}

extern "C" fn on_usr1(sig: i32, info: *const u8, uc: *mut u8) {
    USR1_MXCSR.store(mxcsr(), Ordering::SeqCst);
    // A different rounding mode: sigreturn must bring the old one back.
    set_mxcsr(MXCSR_UP);
    // SAFETY: the kernel passes a siginfo_t (SA_SIGINFO).
    let (signo, code, pid) = unsafe {
        (
            info.add(SI_SIGNO).cast::<i32>().read(),
            info.add(SI_CODE).cast::<i32>().read(),
            info.add(SI_PID).cast::<i32>().read(),
        )
    };
    USR1_ARG.store(sig, Ordering::SeqCst);
    USR1_SIGNO.store(signo, Ordering::SeqCst);
    USR1_CODE.store(code, Ordering::SeqCst);
    USR1_PID.store(pid, Ordering::SeqCst);
    USR1_UCONTEXT.store(uc as u64, Ordering::SeqCst);
    USR1_RUNS.fetch_add(1, Ordering::SeqCst);
}

extern "C" fn on_alarm(_sig: i32, _info: *const u8, _uc: *mut u8) {
    let fd = DEVICE_FD.load(Ordering::SeqCst);
    if fd >= 0 && IN_EXEC.load(Ordering::SeqCst) && !CLOSED.load(Ordering::SeqCst) {
        let error = syscall(SYS_CLOSE, [fd as u64, 0, 0, 0, 0, 0]).map_or_else(|e| e, |_| 0);
        CLOSE_ERROR.store(error, Ordering::SeqCst);
        CLOSED.store(true, Ordering::SeqCst);
    } else if !CLOSED.load(Ordering::SeqCst) {
        // Not on the way back from an EXEC: try again.
        REARMS.fetch_add(1, Ordering::SeqCst);
        let _ = alarm_in(REARM_US);
    }
}

/// `struct thr_param` (sys/sys/thr.h, amd64): 104 bytes.
#[repr(C)]
struct ThrParam {
    start_func: u64,
    arg: u64,
    stack_base: u64,
    stack_size: u64,
    tls_base: u64,
    tls_size: u64,
    child_tid: u64,
    parent_tid: u64,
    flags: i32,
    rtp: u64,
    spare: [u64; 3],
}

/// What the second thread did.
static THREAD_EXEC_ERROR: AtomicI32 = AtomicI32::new(-1);
static THREAD_CLOSE_ERROR: AtomicI32 = AtomicI32::new(-1);
static THREAD_SAW_EXEC: AtomicBool = AtomicBool::new(false);
static THREAD_DONE: AtomicU64 = AtomicU64::new(0);

/// The second thread: waits (sched_yield) until the first is inside the
/// EXEC ioctl, then EXEC and close on the same descriptor, then thr_exit.
extern "C" fn second_thread(_arg: u64) {
    for _ in 0..YIELDS_MAX {
        if IN_EXEC.load(Ordering::SeqCst) {
            break;
        }
        let _ = syscall(SYS_SCHED_YIELD, [0; 6]);
    }
    let fd = DEVICE_FD.load(Ordering::SeqCst);
    if IN_EXEC.load(Ordering::SeqCst) && fd >= 0 {
        THREAD_SAW_EXEC.store(true, Ordering::SeqCst);
        let mut state = KqemuCpuState::default();
        let exec = syscall(
            SYS_IOCTL,
            [
                fd as u64,
                u64::from(KQEMU_EXEC),
                &mut state as *mut KqemuCpuState as u64,
                0,
                0,
                0,
            ],
        );
        THREAD_EXEC_ERROR.store(exec.map_or_else(|e| e, |_| 0), Ordering::SeqCst);
        let close = syscall(SYS_CLOSE, [fd as u64, 0, 0, 0, 0, 0]);
        THREAD_CLOSE_ERROR.store(close.map_or_else(|e| e, |_| 0), Ordering::SeqCst);
        CLOSED.store(true, Ordering::SeqCst);
    }
    let _ = syscall(SYS_THR_EXIT, [THREAD_DONE.as_ptr() as u64, 0, 0, 0, 0, 0]);
    // SAFETY: thr_exit does not return; if it did, stop here.
    unsafe { asm!("ud2", options(noreturn)) }
}

/// The FreeBSD system calls, watching the descriptor and the EXECs.
#[derive(Default)]
struct Probe {
    execs: u64,
    /// The EXEC the handler closed the descriptor in: its number, result
    /// and retval.
    interrupted: Option<(u64, Result<i32, i32>, i32)>,
    /// The first EXEC after that.
    after: Option<Result<i32, i32>>,
}

impl System for Probe {
    fn open(&mut self, path: &CStr, flags: i32) -> Result<i32, i32> {
        let fd = FreeBsd.open(path, flags)?;
        if path.to_bytes() == b"/dev/kqemu" {
            DEVICE_FD.store(fd, Ordering::SeqCst);
        }
        Ok(fd)
    }

    fn close(&mut self, fd: i32) -> Result<(), i32> {
        FreeBsd.close(fd)
    }

    fn ioctl(&mut self, fd: i32, cmd: u32, arg: *mut u8) -> Result<i32, i32> {
        FreeBsd.ioctl(fd, cmd, arg)
    }

    fn mmap_shared_anon(&mut self, len: u64) -> Result<u64, i32> {
        FreeBsd.mmap_shared_anon(len)
    }

    fn munmap(&mut self, addr: u64, len: u64) -> Result<(), i32> {
        FreeBsd.munmap(addr, len)
    }

    fn kldfind(&mut self, name: &CStr) -> Result<i32, i32> {
        FreeBsd.kldfind(name)
    }

    fn kldunload(&mut self, fileid: i32) -> Result<(), i32> {
        FreeBsd.kldunload(fileid)
    }

    fn print(&mut self, bytes: &[u8]) {
        FreeBsd.print(bytes)
    }

    fn cycles(&mut self) -> u64 {
        FreeBsd.cycles()
    }
}

impl GuestSystem for Probe {
    fn read_file(&mut self, path: &CStr, max: usize) -> Result<Vec<u8>, i32> {
        FreeBsd.read_file(path, max)
    }

    fn write_fd(&mut self, fd: i32, bytes: &[u8]) {
        FreeBsd.write_fd(fd, bytes)
    }

    fn exec(&mut self, fd: i32, state: &mut KqemuCpuState, fpu: &mut FxArea) -> Result<i32, i32> {
        let closed_before = CLOSED.load(Ordering::SeqCst);
        IN_EXEC.store(true, Ordering::SeqCst);
        let result = FreeBsd.exec(fd, state, fpu);
        IN_EXEC.store(false, Ordering::SeqCst);
        self.execs += 1;
        if closed_before {
            self.after.get_or_insert(result);
        } else if CLOSED.load(Ordering::SeqCst) {
            self.interrupted = Some((self.execs, result, state.retval));
        }
        result
    }
}

struct Report {
    passed: u32,
    failed: u32,
}

impl Report {
    fn check(&mut self, ok: bool, name: &str, detail: core::fmt::Arguments<'_>) {
        let mut line = Line::default();
        let _ = writeln!(
            line,
            "{} {name}: {detail}",
            if ok { "PASS" } else { "FAIL" }
        );
        FreeBsd.print(line.as_bytes());
        if ok {
            self.passed += 1;
        } else {
            self.failed += 1;
        }
    }
}

/// kill(2) to this process with an SA_SIGINFO handler.
fn kill_check(r: &mut Report) {
    let installed = sigaction(SIGUSR1, on_usr1);
    r.check(
        installed == Ok(0),
        "sigaction-usr1",
        format_args!("{installed:?} (old handler SIG_DFL = 0)"),
    );
    let pid = syscall(SYS_GETPID, [0; 6]).map_or(-1, |p| p as i32);
    set_mxcsr(MXCSR_TRUNCATE);
    let killed = syscall(SYS_KILL, [pid as u64, SIGUSR1, 0, 0, 0, 0]);
    let after = mxcsr();
    set_mxcsr(MXCSR_INIT);
    let runs = USR1_RUNS.load(Ordering::SeqCst);
    let (arg, signo, code, from) = (
        USR1_ARG.load(Ordering::SeqCst),
        USR1_SIGNO.load(Ordering::SeqCst),
        USR1_CODE.load(Ordering::SeqCst),
        USR1_PID.load(Ordering::SeqCst),
    );
    let uc = USR1_UCONTEXT.load(Ordering::SeqCst);
    let entry_mxcsr = USR1_MXCSR.load(Ordering::SeqCst);
    r.check(
        killed.is_ok()
            && runs == 1
            && arg == SIGUSR1 as i32
            && signo == arg
            && code == SI_USER
            && from == pid,
        "signal-kill",
        format_args!(
            "kill({pid}, SIGUSR1) {killed:?}; handler ran {runs} time(s) before kill returned, \
             signo {arg}, si_signo {signo}, si_code {code:#x}, si_pid {from}"
        ),
    );
    // A blocked signal stays pending; unblocking it delivers it before
    // sigprocmask returns.
    let blocked = sigprocmask(SIG_BLOCK, SIGUSR1);
    let killed = syscall(SYS_KILL, [pid as u64, SIGUSR1, 0, 0, 0, 0]);
    let runs_blocked = USR1_RUNS.load(Ordering::SeqCst);
    let unblocked = sigprocmask(SIG_UNBLOCK, SIGUSR1);
    let runs_unblocked = USR1_RUNS.load(Ordering::SeqCst);
    let usr1_bit = 1u32 << (SIGUSR1 - 1);
    r.check(
        blocked == Ok(0)
            && killed.is_ok()
            && runs_blocked == runs
            && unblocked == Ok(usr1_bit)
            && runs_unblocked == runs + 1,
        "signal-blocked",
        format_args!(
            "SIG_BLOCK {blocked:?}, kill {killed:?}: {} run(s) while blocked; SIG_UNBLOCK \
             {unblocked:x?} (old mask word): {} run(s) before it returned",
            runs_blocked - runs,
            runs_unblocked - runs_blocked
        ),
    );
    r.check(
        uc != 0 && uc.is_multiple_of(16) && entry_mxcsr == MXCSR_INIT && after == MXCSR_TRUNCATE,
        "sigreturn",
        format_args!(
            "ucontext {uc:#x}; MXCSR {entry_mxcsr:#x} in the handler, {after:#x} after \
             sigreturn (was {MXCSR_TRUNCATE:#x})"
        ),
    );
}

/// `--signal-close PATH`; exit status 0 when every check passed.
pub fn signal_close(path: &CStr) -> i32 {
    let mut r = Report {
        passed: 0,
        failed: 0,
    };
    kill_check(&mut r);
    let installed = sigaction(SIGALRM, on_alarm);
    r.check(
        installed == Ok(0),
        "sigaction-alrm",
        format_args!("{installed:?} (old handler SIG_DFL = 0)"),
    );
    let armed = alarm_in(FIRST_ALARM_US);
    r.check(
        armed == Ok(0),
        "setitimer",
        format_args!("ITIMER_REAL in {FIRST_ALARM_US} us: {armed:?}"),
    );
    let status = run_spin(path);
    let fd = DEVICE_FD.load(Ordering::SeqCst);
    let close_error = CLOSE_ERROR.load(Ordering::SeqCst);
    r.check(
        CLOSED.load(Ordering::SeqCst) && close_error == 0,
        "signal-close-in-exec",
        format_args!(
            "SIGALRM handler closed fd {fd} on the way back from EXEC #{} (error {close_error}); \
             {} re-arm(s) outside EXEC",
            status.1.interrupted.map_or(0, |i| i.0),
            REARMS.load(Ordering::SeqCst)
        ),
    );
    let interrupted = status.1.interrupted;
    r.check(
        matches!(interrupted, Some((_, Ok(_), KQEMU_RET_INTR))),
        "exec-interrupted",
        format_args!(
            "that EXEC: {:?}, retval {:#x} (KQEMU_RET_INTR {KQEMU_RET_INTR:#x})",
            interrupted.map(|i| i.1),
            interrupted.map_or(0, |i| i.2)
        ),
    );
    after_close_checks(&mut r, status, "kldunload-after-signal-close")
}

/// Runs the spin guest PATH through the client core (as `--linux`) with
/// the Probe; its status and what the Probe saw.
fn run_spin(path: &CStr) -> (i32, Probe) {
    let mut probe = Probe::default();
    let Ok(program) = path.to_str() else {
        return (STATUS_RUNNER_FAILED, probe);
    };
    let files = [path];
    let argv = [program];
    let run = LinuxRun {
        files: &files,
        argv: &argv,
        envp: &[],
        ram_file: None,
    };
    let console = FreeBsdConsole {
        // SAFETY: RDTSC (CR4.TSD clear on FreeBSD).
        seed: unsafe { core::arch::x86_64::_rdtsc() } | 1,
    };
    let status = run_linux(&mut probe, Box::new(console), cpu_features(), &run);
    (status, probe)
}

/// After the descriptor was closed inside an EXEC: the next EXEC and
/// GET_VERSION answer EBADF, the module unloads; the summary line; exit
/// status 0 when every check passed.
fn after_close_checks(r: &mut Report, (status, probe): (i32, Probe), unload: &str) -> i32 {
    let fd = DEVICE_FD.load(Ordering::SeqCst);
    r.check(
        probe.after == Some(Err(EBADF)) && status == STATUS_RUNNER_FAILED,
        "exec-after-close",
        format_args!(
            "next EXEC {:?} (EBADF {EBADF}); the run ended with status {status}; {} EXECs",
            probe.after, probe.execs
        ),
    );
    let mut version = 0u32;
    let ioctl = FreeBsd.ioctl(fd, KQEMU_GET_VERSION, (&mut version as *mut u32).cast());
    r.check(
        ioctl == Err(EBADF),
        "ioctl-after-close",
        format_args!("GET_VERSION on fd {fd}: {ioctl:?}"),
    );
    let unloaded = FreeBsd
        .kldfind(c"kqemu")
        .and_then(|id| FreeBsd.kldunload(id));
    r.check(
        unloaded.is_ok(),
        unload,
        format_args!("{unloaded:?} (EBUSY while an instance lives)"),
    );
    let mut line = Line::default();
    let _ = writeln!(line, "kqemu-run: {} passed, {} failed", r.passed, r.failed);
    FreeBsd.print(line.as_bytes());
    i32::from(r.failed != 0)
}

/// `--thread-close PATH`; exit status 0 when every check passed.
pub fn thread_close(path: &CStr) -> i32 {
    let mut r = Report {
        passed: 0,
        failed: 0,
    };
    let stack = FreeBsd.mmap_shared_anon(THREAD_STACK);
    let (mut child, mut parent) = (0i64, 0i64);
    let param = ThrParam {
        start_func: second_thread as *const () as u64,
        arg: 0,
        stack_base: stack.unwrap_or(0),
        stack_size: THREAD_STACK,
        tls_base: 0,
        tls_size: 0,
        child_tid: &mut child as *mut i64 as u64,
        parent_tid: &mut parent as *mut i64 as u64,
        flags: 0,
        rtp: 0,
        spare: [0; 3],
    };
    let made = match stack {
        Ok(_) => syscall(
            SYS_THR_NEW,
            [
                &param as *const ThrParam as u64,
                core::mem::size_of::<ThrParam>() as u64,
                0,
                0,
                0,
                0,
            ],
        ),
        Err(e) => Err(e),
    };
    // Read back through volatile loads: the kernel wrote them.
    // SAFETY: locals of this function.
    let (child, parent) = unsafe {
        (
            core::ptr::read_volatile(&child),
            core::ptr::read_volatile(&parent),
        )
    };
    r.check(
        made == Ok(0) && child > 100_000 && child == parent,
        "thr-new",
        format_args!("{made:?}; child tid {child}, parent's copy {parent}"),
    );
    let status = run_spin(path);
    let (exec, close) = (
        THREAD_EXEC_ERROR.load(Ordering::SeqCst),
        THREAD_CLOSE_ERROR.load(Ordering::SeqCst),
    );
    let saw = THREAD_SAW_EXEC.load(Ordering::SeqCst);
    r.check(
        saw && exec == EBUSY,
        "exec-second-thread-busy",
        format_args!("second thread ran inside the first's EXEC: {saw}; its EXEC: error {exec} (EBUSY {EBUSY})"),
    );
    let interrupted = status.1.interrupted;
    r.check(
        saw && close == 0 && matches!(interrupted, Some((_, Ok(_), _))),
        "close-during-exec",
        format_args!(
            "second thread's close: error {close}; the first's EXEC #{} then returned {:?}, retval {:#x}",
            interrupted.map_or(0, |i| i.0),
            interrupted.map(|i| i.1),
            interrupted.map_or(0, |i| i.2)
        ),
    );
    let done = THREAD_DONE.load(Ordering::SeqCst);
    r.check(
        done == 1,
        "thr-exit",
        format_args!("the second thread's state word: {done}"),
    );
    after_close_checks(&mut r, status, "kldunload-after-thread-close")
}
