//! The FreeBSD process: a static FreeBSD/amd64 program loaded by the
//! client core's ELF loader into its own address space, run at ring 3 by
//! the testbed's [`UserCpu`], its FreeBSD system calls served here
//! (numbers of sys/sys/syscall.h; result in RAX, error = errno in RAX with
//! the carry flag set, sys/amd64/amd64/vm_machdep.c cpu_set_syscall_retval).

use super::signal::{self, Delivery};
use super::{devfs, kpi, sysctl, threads, unload, Checks, KldRun, Loaded, MODULE_FILEID};
use crate::channel::Channel;
use crate::log;
use crate::user::UserCpu;
use crate::x86;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;
use kqemu_client::loader::{self, AddressSpaceSpec, StackInfo};
use kqemu_client::mm::{Mm, Placement};
use kqemu_client::{Arch, Errno, GuestRam, MemFs, PagingFormat, Trap, UserContext};

/// System call numbers (sys/sys/syscall.h).
const SYS_EXIT: u64 = 1;
const SYS_READ: u64 = 3;
const SYS_WRITE: u64 = 4;
const SYS_OPEN: u64 = 5;
const SYS_CLOSE: u64 = 6;
const SYS_GETPID: u64 = 20;
const SYS_KILL: u64 = 37;
const SYS_IOCTL: u64 = 54;
const SYS_MUNMAP: u64 = 73;
const SYS_SETITIMER: u64 = 83;
const SYS_CLOCK_GETTIME: u64 = 232;
const SYS_SCHED_YIELD: u64 = 331;
const SYS_KLDUNLOAD: u64 = 305;
const SYS_KLDFIND: u64 = 306;
const SYS_SIGPROCMASK: u64 = 340;
const SYS_SIGACTION: u64 = 416;
const SYS_SIGRETURN: u64 = 417;
const SYS_THR_EXIT: u64 = 431;
const SYS_THR_SELF: u64 = 432;
const SYS_THR_NEW: u64 = 455;
const SYS_MMAP: u64 = 477;

/// sys/sys/mman.h.
const MAP_SHARED: u64 = 0x1;
const MAP_PRIVATE: u64 = 0x2;
const MAP_FIXED: u64 = 0x10;
const MAP_ANON: u64 = 0x1000;
const PROT_MASK: u64 = 0x7;
/// RFLAGS at exec: IF and the always-one bit 1 (exec_setregs, PSL_USER).
const RFLAGS_INITIAL: u64 = 0x202;
/// RFLAGS.CF: the error flag of a FreeBSD system call.
const RFLAGS_CF: u64 = 1;
/// Register indices of UserContext::regs (kqemu order).
const RAX: usize = 0;
const RDX: usize = 2;
const RSP: usize = 4;
const RSI: usize = 6;
const RDI: usize = 7;
const R8: usize = 8;
const R9: usize = 9;
const R10: usize = 10;
/// Longest path open(2) takes (MAXPATHLEN).
const MAXPATHLEN: usize = 1024;
/// Largest read/write served in one call.
const IO_CHUNK: u64 = 1 << 20;
/// Signals for a process killed by a CPU exception (sys/sys/signal.h).
const SIGILL: i32 = 4;
const SIGTRAP: i32 = 5;
const SIGFPE: i32 = 8;
const SIGBUS: i32 = 10;
const SIGSEGV: i32 = 11;
const SIGXCPU: i32 = 24;
const SIGSYS: i32 = 12;
/// The most traps one time slice of another thread takes (it ends at that
/// thread's next tick, 100 Hz, long before).
const SLICE_TRAPS_MAX: u32 = 1_000_000;

enum Fd {
    Stdin,
    Stdout,
    Stderr,
    Device(u32),
    /// A regular file of the guest archive, read-only: its bytes and the
    /// file offset.
    File(Vec<u8>, usize),
}

pub struct Process<'r, 'c> {
    run: &'c KldRun<'c>,
    ram: GuestRam<'r>,
    channel: Rc<RefCell<Channel>>,
    fds: Vec<Option<Fd>>,
    mm: Option<Mm>,
    exit: Option<i32>,
    flush: bool,
    /// The ring-3 runner and the address space it runs.
    cpu: Option<UserCpu>,
    cr3: u64,
    /// Another thread's slice is over (its tick, sched_yield), or that
    /// thread called thr_exit.
    slice_over: bool,
    thread_exited: bool,
    /// The process was killed (128 + signal) while another thread ran.
    killed: Option<i32>,
}

/// The signal of a CPU exception at ring 3 (trap_pfault, trap()).
fn exception_signal(vector: u8) -> i32 {
    match vector {
        0 | 16 | 19 => SIGFPE,
        1 | 3 => SIGTRAP,
        6 => SIGILL,
        17 => SIGBUS,
        _ => SIGSEGV,
    }
}

/// A system call's result: value, or FreeBSD errno.
type SysResult = Result<u64, i32>;

fn errno(e: Errno) -> i32 {
    // The client core speaks Linux errno; the values used here (EPERM
    // ... ERANGE, 1..34) are the same on FreeBSD, except EAGAIN/EDEADLK.
    match e.0 {
        11 => 35,
        35 => 11,
        n => n,
    }
}

impl<'r, 'c> Process<'r, 'c> {
    pub fn new(run: &'c KldRun<'c>, ram: GuestRam<'r>, channel: Rc<RefCell<Channel>>) -> Self {
        Process {
            run,
            ram,
            channel,
            fds: vec![Some(Fd::Stdin), Some(Fd::Stdout), Some(Fd::Stderr)],
            mm: None,
            exit: None,
            flush: false,
            cpu: None,
            cr3: 0,
            slice_over: false,
            thread_exited: false,
            killed: None,
        }
    }

    fn output(&mut self, stderr: bool, bytes: &[u8]) {
        if self
            .channel
            .borrow_mut()
            .guest_output(stderr, bytes)
            .is_err()
        {
            crate::fail(format_args!("the host channel is stuck"));
        }
    }

    /// Runs argv[0] to its end; returns (status, cycles).
    pub fn run(
        &mut self,
        fs: &MemFs,
        loaded: &mut Option<Loaded>,
        checks: &mut Checks,
    ) -> (i32, u64) {
        let config = self.run.config;
        let path = config.argv.first().map_or("", String::as_str);
        let Some(bytes) = fs.read_file(path) else {
            self.output(
                true,
                alloc::format!("kld: cannot start {path}: no such file\n").as_bytes(),
            );
            return (127, 0);
        };
        let elf = match kqemu_client::elf::parse(bytes) {
            Ok(elf) if elf.arch == Arch::Amd64 => elf,
            _ => {
                self.output(
                    true,
                    alloc::format!("kld: {path}: not an amd64 ELF executable\n").as_bytes(),
                );
                return (126, 0);
            }
        };
        let argv: Vec<Vec<u8>> = config.argv.iter().map(|a| a.as_bytes().to_vec()).collect();
        let envp: Vec<Vec<u8>> = config.envp.iter().map(|a| a.as_bytes().to_vec()).collect();
        let spec = AddressSpaceSpec {
            format: PagingFormat::Long4,
            nx: self.run.features.nx,
            kernel_entries: &self.run.space.upper_entries,
        };
        let info = StackInfo {
            execfn: path.as_bytes(),
            random: [0x5a; 16],
            hwcap: 0,
        };
        let image = match loader::load(&mut self.ram, spec, &elf, &argv, &envp, &info) {
            Ok(image) => image,
            Err(e) => {
                self.output(
                    true,
                    alloc::format!("kld: cannot load {path}: errno {}\n", e.0).as_bytes(),
                );
                return (126, 0);
            }
        };
        let mut ctx = UserContext {
            rip: image.entry,
            rflags: RFLAGS_INITIAL,
            ..UserContext::default()
        };
        ctx.regs[RSP] = image.sp;
        // exec_setregs (amd64): RDI points at argc too.
        ctx.regs[RDI] = image.sp;
        let cr3 = image.mm.cr3();
        self.mm = Some(image.mm);
        let tsc_khz = self.run.clock.tsc_khz;
        let (mm, ram) = self.mm();
        if let Err(e) = signal::exec(mm, ram, tsc_khz) {
            log!("kld: no room for the sigcode page: errno {}", e.0);
            return (126, 0);
        }
        let main_td = kpi::with(|k| {
            k.cr3 = cr3;
            k.thread.addr
        });
        threads::exec(self.run.features, main_td);
        self.cpu = Some(UserCpu::new(self.run.features));
        self.cr3 = cr3;
        let limit = self.run.clock.ms_to_cycles(config.time_limit_ms);
        let start = x86::rdtsc();
        let mut status = 0;
        // Bounded by the time limit, checked on every trap (the LAPIC
        // timer interrupts ring 3 at 100 Hz).
        while self.exit.is_none() {
            if x86::rdtsc() - start > limit {
                log!("kld: time limit reached: killed (SIGXCPU)");
                status = 128 + SIGXCPU;
                break;
            }
            let trap = self.user(&mut ctx);
            match trap {
                Trap::Syscall => {
                    self.syscall(&mut ctx, fs, loaded, checks);
                    status = self.deliver_signals(&mut ctx);
                }
                Trap::Timer => {
                    signal::clock();
                    status = self.deliver_signals(&mut ctx);
                    super::cpu::return_to_user();
                    // The slice is over: another thread may run.
                    self.other_slice(fs, loaded, checks);
                }
                Trap::Int80 => status = 128 + SIGSEGV,
                Trap::Exception {
                    vector,
                    error_code,
                    cr2,
                } => {
                    let signal = exception_signal(vector);
                    log!(
                        "kld: pid 1 killed by exception {vector} (error {error_code:#x}, cr2 {cr2:#x}) at {:#x}",
                        ctx.rip
                    );
                    status = 128 + signal;
                }
            }
            if let Some(killed) = self.killed.take() {
                status = killed;
            }
            if status != 0 {
                break;
            }
        }
        let cycles = x86::rdtsc() - start;
        let status = self.exit.unwrap_or(status);
        self.exit_files();
        signal::exit();
        threads::exit();
        if let Some(mm) = self.mm.take() {
            mm.destroy(&mut self.ram);
        }
        kpi::with(|k| k.cr3 = 0);
        log!("kld: pid 1 status {status}, {cycles} cycles");
        (status, cycles)
    }

    /// Runs the current thread's `ctx` at ring 3 until it traps. The FPU
    /// key is the process: threads.rs switches the FPU between threads.
    fn user(&mut self, ctx: &mut UserContext) -> Trap {
        let flush = core::mem::take(&mut self.flush);
        let clock = self.run.clock;
        let Some(cpu) = self.cpu.as_mut() else {
            crate::fail(format_args!("kld: user mode without a runner"))
        };
        cpu.run(1, Arch::Amd64, self.cr3, flush, ctx, clock)
    }

    /// Another thread's time slice (threads.rs): its user code and system
    /// calls until its next tick, sched_yield or thr_exit, or the end of
    /// the process.
    fn other_slice(&mut self, fs: &MemFs, loaded: &mut Option<Loaded>, checks: &mut Checks) {
        let Some((tid, mut ctx)) = threads::slice_begin() else {
            return;
        };
        self.slice_over = false;
        self.thread_exited = false;
        for _ in 0..SLICE_TRAPS_MAX {
            match self.user(&mut ctx) {
                Trap::Syscall => {
                    self.syscall(&mut ctx, fs, loaded, checks);
                    let status = self.deliver_signals(&mut ctx);
                    if status != 0 {
                        self.killed = Some(status);
                    }
                }
                Trap::Timer => {
                    signal::clock();
                    super::cpu::return_to_user();
                    self.slice_over = true;
                }
                Trap::Int80 => self.killed = Some(128 + SIGSEGV),
                Trap::Exception { vector, .. } => {
                    log!(
                        "kld: thread {tid} killed the process by exception {vector} at {:#x}",
                        ctx.rip
                    );
                    self.killed = Some(128 + exception_signal(vector));
                }
            }
            if self.slice_over || self.thread_exited || self.exit.is_some() || self.killed.is_some()
            {
                break;
            }
        }
        threads::slice_end(ctx, self.thread_exited);
    }

    /// thr_exit(2): `*state` = 1 (for the thread waiting on it) and the
    /// thread is gone; the last thread's thr_exit is exit(0) (exit1).
    fn thr_exit(&mut self, state: u64) -> SysResult {
        if threads::in_slice() {
            if state != 0 {
                let (mm, ram) = self.mm();
                // kern_thr_exit ignores a fault here.
                let _ = mm.write(ram, state, &1u64.to_le_bytes());
            }
            self.thread_exited = true;
        } else if threads::others() == 0 {
            self.exit = Some(0);
        } else {
            log!("kld: thr_exit of the first thread while others live is not modelled: SIGSYS");
            self.killed = Some(128 + SIGSYS);
        }
        Ok(0)
    }

    /// On the way back to user mode (ast): pending signals reach their
    /// handlers; 128 + signal when one kills the process.
    fn deliver_signals(&mut self, ctx: &mut UserContext) -> i32 {
        if self.exit.is_some() {
            return 0;
        }
        let (mm, ram) = self.mm();
        match signal::deliver(mm, ram, ctx) {
            Delivery::Resume => 0,
            Delivery::Killed(sig) => 128 + sig,
        }
    }

    /// exit1: every descriptor is closed (cdevpriv destructors run).
    fn exit_files(&mut self) {
        for fd in 0..self.fds.len() {
            if let Some(Fd::Device(id)) = self.fds[fd].take() {
                devfs::close(id);
            }
        }
    }

    fn syscall(
        &mut self,
        ctx: &mut UserContext,
        fs: &MemFs,
        loaded: &mut Option<Loaded>,
        checks: &mut Checks,
    ) {
        kpi::enter_kernel();
        signal::clock();
        let r = ctx.regs;
        let args = [r[RDI], r[RSI], r[RDX], r[R10], r[R8], r[R9]];
        let number = r[RAX];
        let result = match number {
            SYS_EXIT => {
                self.exit = Some((args[0] & 0xff) as i32);
                Ok(0)
            }
            SYS_READ => self.read(args),
            SYS_WRITE => self.write(args),
            SYS_OPEN => self.open(args, fs),
            SYS_CLOSE => self.close(args),
            SYS_GETPID => Ok(1),
            SYS_IOCTL => self.ioctl(args, fs, loaded, checks),
            SYS_MUNMAP => self.munmap(args),
            SYS_CLOCK_GETTIME => self.clock_gettime(args),
            SYS_KLDFIND => self.kldfind(args, loaded),
            SYS_KLDUNLOAD => self.kldunload(args, loaded, checks),
            SYS_MMAP => self.mmap(args),
            SYS_KILL => signal::kill(args[0], args[1]),
            SYS_THR_NEW => {
                let (mm, ram) = self.mm();
                threads::thr_new(mm, ram, args[0], args[1])
            }
            SYS_THR_SELF => {
                let tid = threads::current_tid();
                let (mm, ram) = self.mm();
                mm.write(ram, args[0], &tid.to_le_bytes())
                    .map(|()| 0)
                    .map_err(errno)
            }
            SYS_THR_EXIT => self.thr_exit(args[0]),
            SYS_SCHED_YIELD => {
                if threads::in_slice() {
                    self.slice_over = true;
                } else {
                    self.other_slice(fs, loaded, checks);
                }
                Ok(0)
            }
            SYS_SETITIMER => {
                let (mm, ram) = self.mm();
                signal::setitimer(mm, ram, args[0], args[1], args[2])
            }
            SYS_SIGPROCMASK => {
                let (mm, ram) = self.mm();
                signal::sigprocmask(mm, ram, args[0], args[1], args[2])
            }
            SYS_SIGACTION => {
                let (mm, ram) = self.mm();
                signal::sigaction(mm, ram, args[0], args[1], args[2])
            }
            SYS_SIGRETURN => {
                let (mm, ram) = self.mm();
                signal::sigreturn(mm, ram, ctx, args[0]).and(Err(signal::EJUSTRETURN))
            }
            _ => {
                log!("kld: pid 1: system call {number} is not served: ENOSYS");
                Err(kpi::with(|k| k.layout.ENOSYS as i32))
            }
        };
        match result {
            // sigreturn restored every register itself.
            Err(signal::EJUSTRETURN) => {}
            Ok(v) => {
                ctx.regs[RAX] = v;
                ctx.regs[RDX] = 0;
                ctx.rflags &= !RFLAGS_CF;
            }
            Err(e) => {
                ctx.regs[RAX] = e as u64;
                ctx.rflags |= RFLAGS_CF;
            }
        }
        super::cpu::return_to_user();
    }

    fn mm(&mut self) -> (&mut Mm, &mut GuestRam<'r>) {
        let Some(mm) = self.mm.as_mut() else {
            crate::fail(format_args!("kld: system call without an address space"))
        };
        (mm, &mut self.ram)
    }

    fn fd(&self, fd: u64) -> Result<&Fd, i32> {
        let ebadf = kpi::with(|k| k.layout.EBADF as i32);
        usize::try_from(fd)
            .ok()
            .and_then(|i| self.fds.get(i))
            .and_then(Option::as_ref)
            .ok_or(ebadf)
    }

    fn read(&mut self, a: [u64; 6]) -> SysResult {
        match self.fd(a[0])? {
            Fd::Stdin => Ok(0),
            Fd::Stdout | Fd::Stderr => Err(kpi::with(|k| k.layout.EBADF as i32)),
            // No d_read in the module's cdevsw: no_read (prep_cdevsw).
            Fd::Device(_) => Err(kpi::with(|k| k.layout.ENODEV as i32)),
            Fd::File(..) => self.read_file(a),
        }
    }

    /// read(2) of a regular file: up to IO_CHUNK bytes from the offset.
    fn read_file(&mut self, a: [u64; 6]) -> SysResult {
        let Some(Some(Fd::File(data, pos))) = self.fds.get(a[0] as usize) else {
            return Err(kpi::with(|k| k.layout.EBADF as i32));
        };
        let n = (data.len() - *pos).min(a[2].min(IO_CHUNK) as usize);
        let chunk = data[*pos..*pos + n].to_vec();
        let (mm, ram) = self.mm();
        mm.write(ram, a[1], &chunk).map_err(errno)?;
        if let Some(Some(Fd::File(_, pos))) = self.fds.get_mut(a[0] as usize) {
            *pos += n;
        }
        Ok(n as u64)
    }

    fn write(&mut self, a: [u64; 6]) -> SysResult {
        let stderr = match self.fd(a[0])? {
            Fd::Stdout => false,
            Fd::Stderr => true,
            Fd::Stdin => return Err(kpi::with(|k| k.layout.EBADF as i32)),
            Fd::Device(_) => return Err(kpi::with(|k| k.layout.ENODEV as i32)),
            Fd::File(..) => return Err(kpi::with(|k| k.layout.EBADF as i32)),
        };
        let len = a[2].min(IO_CHUNK);
        let mut buf = vec![0u8; len as usize];
        let (mm, ram) = self.mm();
        mm.read(ram, a[1], &mut buf).map_err(errno)?;
        self.output(stderr, &buf);
        Ok(len)
    }

    /// open(2) of a devfs node: FFLAGS(flags) reach d_open.
    fn open(&mut self, a: [u64; 6], fs: &MemFs) -> SysResult {
        let (enoent, accmode, emfile) = kpi::with(|k| {
            (
                k.layout.ENOENT as i32,
                k.layout.O_ACCMODE,
                k.layout.EMFILE as i32,
            )
        });
        let (mm, ram) = self.mm();
        let path = mm
            .read_cstr(ram, a[0], MAXPATHLEN, Errno(63))
            .map_err(errno)?;
        let path = String::from_utf8_lossy(&path).into_owned();
        let slot = match self.fds.iter().position(Option::is_none) {
            Some(slot) => slot,
            None if self.fds.len() < 64 => {
                self.fds.push(None);
                self.fds.len() - 1
            }
            None => return Err(emfile),
        };
        let Some(name) = path.strip_prefix("/dev/") else {
            // A regular file of the guest archive, for reading only.
            if a[1] & accmode != 0 {
                return Err(kpi::with(|k| k.layout.EPERM as i32));
            }
            let data = fs.read_file(&path).ok_or(enoent)?.to_vec();
            self.fds[slot] = Some(Fd::File(data, 0));
            return Ok(slot as u64);
        };
        // FFLAGS(): O_RDONLY 0 → FREAD 1, O_WRONLY 1 → FWRITE 2, O_RDWR 2 → both.
        let fflags = ((a[1] & accmode) + 1) | (a[1] & !accmode);
        let id = devfs::open(name, fflags as i32)?;
        self.fds[slot] = Some(Fd::Device(id));
        Ok(slot as u64)
    }

    fn close(&mut self, a: [u64; 6]) -> SysResult {
        self.fd(a[0])?;
        match self.fds[a[0] as usize].take() {
            Some(Fd::Device(id)) => match devfs::close(id) {
                0 => Ok(0),
                e => Err(e),
            },
            _ => Ok(0),
        }
    }

    /// sys_ioctl / kern_ioctl: the argument is copied in for IOC_IN, zeroed
    /// for IOC_OUT alone, and copied out for IOC_OUT only when the driver
    /// returned 0.
    fn ioctl(
        &mut self,
        a: [u64; 6],
        fs: &MemFs,
        loaded: &mut Option<Loaded>,
        checks: &mut Checks,
    ) -> SysResult {
        let l = kpi::with(|k| k.layout);
        let Fd::Device(id) = *self.fd(a[0])? else {
            return Err(l.ENOTTY as i32);
        };
        // The command is a u_long; FreeBSD keeps its low 32 bits.
        let cmd = a[1] & 0xffff_ffff;
        let size = (cmd >> 16) & l.IOCPARM_MASK;
        if size > l.IOCPARM_MAX {
            return Err(l.ENOTTY as i32);
        }
        let mut buf = vec![0u8; size.max(8) as usize];
        if cmd & l.IOC_VOID != 0 && size == 0 {
            // An int argument passed by value.
            buf[..8].copy_from_slice(&a[2].to_le_bytes());
        } else if cmd & l.IOC_IN != 0 && size > 0 {
            let (mm, ram) = self.mm();
            mm.read(ram, a[2], &mut buf[..size as usize])
                .map_err(|_| l.EFAULT as i32)?;
        }
        // While the module runs this ioctl, a deferred preemption may give
        // another thread a slice (threads::preempt).
        let error = threads::preemptible(&mut || self.other_slice(fs, loaded, checks), || {
            devfs::ioctl(id, cmd, buf.as_mut_ptr())
        });
        if error != 0 {
            return Err(error);
        }
        if cmd & l.IOC_OUT != 0 && size > 0 {
            let (mm, ram) = self.mm();
            mm.write(ram, a[2], &buf[..size as usize])
                .map_err(|_| l.EFAULT as i32)?;
        }
        Ok(0)
    }

    /// mmap(2) of anonymous memory (MAP_ANON, shared or private: one
    /// process, so both are the same pages).
    fn mmap(&mut self, a: [u64; 6]) -> SysResult {
        let (einval, enodev) = kpi::with(|k| (k.layout.EINVAL as i32, k.layout.ENODEV as i32));
        let (addr, len, prot, flags) = (a[0], a[1], a[2], a[3]);
        if flags & MAP_ANON == 0 {
            log!("kld: mmap of a file is not served yet (issue 7): ENODEV");
            return Err(enodev);
        }
        if len == 0 || (flags & (MAP_SHARED | MAP_PRIVATE)) == (MAP_SHARED | MAP_PRIVATE) {
            return Err(einval);
        }
        let len = len.checked_next_multiple_of(kpi::PAGE_SIZE).ok_or(einval)?;
        let placement = if flags & MAP_FIXED != 0 {
            // Replaces what is mapped there, as munmap would.
            self.keep_held_pages(addr, addr.saturating_add(len))?;
            Placement::Fixed(addr)
        } else {
            self.keep_held_pages(0, 0)?;
            Placement::Hint(addr)
        };
        let (mm, ram) = self.mm();
        let at = mm
            .map_region(ram, placement, len, (prot & PROT_MASK) as u32)
            .map_err(errno)?;
        kpi::with(|k| k.mapped(at, len, prot & PROT_MASK));
        Ok(at)
    }

    /// munmap(2). Pages the module holds stay allocated (see
    /// `keep_held_pages`); the map's timestamp moves.
    fn munmap(&mut self, a: [u64; 6]) -> SysResult {
        let (addr, len) = (a[0], a[1]);
        let einval = kpi::with(|k| k.layout.EINVAL as i32);
        let end = addr.checked_add(len).ok_or(einval)?;
        if !addr.is_multiple_of(kpi::PAGE_SIZE) || len == 0 {
            return Err(einval);
        }
        self.keep_held_pages(addr, end)?;
        let (mm, ram) = self.mm();
        mm.unmap(ram, addr, len).map_err(errno)?;
        kpi::with(|k| k.unmapped(addr, len));
        self.flush = true;
        Ok(0)
    }

    /// In FreeBSD a held page is wired: munmap (or a MAP_FIXED mapping
    /// over it) removes the mapping, and the page lives on, the module's,
    /// until vm_page_unhold_pages. The client core would free the frame
    /// with the mapping, so each held page of `start..end` is first
    /// swapped out of the page tables for a fresh frame (which the unmap
    /// frees) and booked as an orphan; orphans whose last hold is gone
    /// since the last call are freed here.
    fn keep_held_pages(&mut self, start: u64, end: u64) -> Result<(), i32> {
        let released = kpi::with(|k| core::mem::take(&mut k.books.orphans_released));
        for frame in released {
            self.ram.free_frame(frame);
        }
        let held = kpi::with(|k| k.held_ptes(start, end));
        if !held.is_empty() {
            log!(
                "kld: {} held page(s) unmapped by the process: kept until their last unhold",
                held.len()
            );
        }
        for (pte, frame) in held {
            let fresh = self.ram.alloc_frame().map_err(errno)?;
            kpi::with(|k| {
                k.replace_frame(pte, fresh);
                k.books.orphans.push(frame);
            });
        }
        Ok(())
    }

    fn clock_gettime(&mut self, a: [u64; 6]) -> SysResult {
        let cycles = x86::rdtsc();
        let khz = self.run.clock.tsc_khz.max(1);
        let ns =
            (u128::from(cycles) * 1_000_000 / u128::from(khz)) as u64 + self.run.config.epoch_ns;
        let mut ts = [0u8; 16];
        ts[..8].copy_from_slice(&(ns / 1_000_000_000).to_le_bytes());
        ts[8..].copy_from_slice(&(ns % 1_000_000_000).to_le_bytes());
        let (mm, ram) = self.mm();
        mm.write(ram, a[1], &ts).map_err(errno)?;
        Ok(0)
    }

    /// kldfind(2): `kqemu` or `kqemu.ko` (linker_find_file_by_name).
    fn kldfind(&mut self, a: [u64; 6], loaded: &Option<Loaded>) -> SysResult {
        let enoent = kpi::with(|k| k.layout.ENOENT as i32);
        let (mm, ram) = self.mm();
        let name = mm
            .read_cstr(ram, a[0], MAXPATHLEN, Errno(63))
            .map_err(errno)?;
        match (&name[..], loaded) {
            (b"kqemu" | b"kqemu.ko", Some(_)) => Ok(MODULE_FILEID as u64),
            _ => Err(enoent),
        }
    }

    /// kldunload(2) (the caller is root).
    fn kldunload(
        &mut self,
        a: [u64; 6],
        loaded: &mut Option<Loaded>,
        checks: &mut Checks,
    ) -> SysResult {
        let enoent = kpi::with(|k| k.layout.ENOENT as i32);
        if a[0] as i32 != MODULE_FILEID || loaded.is_none() {
            return Err(enoent);
        }
        match unload(loaded, checks) {
            0 => {
                let gone = sysctl::read_int("hw.kqemu.version").is_err()
                    && devfs::node(super::DEVICE_NAME).is_none();
                checks.check(
                    gone,
                    "kldunload-syscall",
                    format_args!("module unloaded, /dev/kqemu and hw.kqemu gone: {gone}"),
                );
                Ok(0)
            }
            e => {
                // MOD_QUIESCE refused: the open files the module counts
                // (hw.kqemu.instances) are why.
                let instances = sysctl::read_int("hw.kqemu.instances");
                let ebusy = kpi::with(|k| k.layout.EBUSY as i32);
                checks.check(
                    e == ebusy && instances == Ok(1),
                    "kldunload-busy",
                    format_args!("error {e} with hw.kqemu.instances = {instances:?}"),
                );
                Err(e)
            }
        }
    }
}
