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
use alloc::collections::BTreeMap;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;
use kqemu::abi::{
    seg, KqemuCpuState, Pod, KQEMU_EXEC, KQEMU_RET_EXCEPTION, KQEMU_RET_SOFTMMU, KQEMU_RET_SYSCALL,
};
use kqemu_client::loader::{self, AddressSpaceSpec, StackInfo};
use kqemu_client::mm::{Mm, Placement};
use kqemu_client::{Arch, Errno, GuestRam, MemFs, PagingFormat, Trap, UserContext};

/// System call numbers (sys/sys/syscall.h).
const SYS_EXIT: u64 = 1;
const SYS_READ: u64 = 3;
const SYS_WRITE: u64 = 4;
const SYS_OPEN: u64 = 5;
const SYS_CLOSE: u64 = 6;
const SYS_UNLINK: u64 = 10;
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
const SYS_FTRUNCATE: u64 = 480;

/// The kenv variable (`--tunable`) of the descriptor-outlives-its-process
/// scenario ([`Process::hand_off_devices`]).
const VMSPACE_HANDOFF: &str = "testbed.vmspace_handoff";

/// Books an EXEC whose guest CS has the index of the CS this kernel calls
/// the module on (kpi::Books::execs_on_host_cs_index).
fn note_exec_cs(guest_cs: u16, retval: Option<i32>) {
    let host_cs: u16;
    // SAFETY: reading CS has no side effects.
    unsafe {
        core::arch::asm!("mov {0:x}, cs", out(reg) host_cs, options(nomem, nostack, preserves_flags))
    };
    kpi::with(|k| {
        let b = &mut k.books;
        b.host_cs = host_cs;
        if guest_cs >> 3 == host_cs >> 3 {
            b.execs_on_host_cs_index += 1;
            // An exception, `int n` or `syscall` of the guest: the CPU ran
            // guest code on that CS (not SOFTMMU, INTR or ABORT).
            let trapped = |r: i32| {
                (KQEMU_RET_EXCEPTION..KQEMU_RET_SOFTMMU).contains(&r) || r == KQEMU_RET_SYSCALL
            };
            if retval.is_some_and(trapped) {
                b.execs_on_host_cs_index_ran += 1;
            }
        }
    });
}

/// sys/sys/fcntl.h.
const O_CREAT: u64 = 0x0200;
const O_TRUNC: u64 = 0x0400;
const O_EXCL: u64 = 0x0800;
/// FFLAGS() bit of a descriptor open for writing (sys/sys/fcntl.h).
const FWRITE: u64 = 0x0002;
/// The writable directory of the process (tmpfs, one level: regular
/// files only).
const TMP_DIR: &str = "/tmp/";
/// EACCES (sys/sys/errno.h): a shared writable mapping of a descriptor
/// not open for writing (vm_mmap_vnode).
const EACCES: i32 = 13;

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
    /// A file of /tmp: its id and the descriptor's FFLAGS.
    Tmp(u32, u64),
}

/// A regular file of /tmp (tmpfs): its pages are physical frames of the
/// process's RAM, the same frames in every mapping of the file (the
/// vnode's vm_object); it lives while it has a name, a descriptor or a
/// mapped page, and its frames the module holds outlive it until their
/// last unhold (vm_page_unhold_pages frees an unwired page of a dead
/// object).
struct TmpFile {
    name: Option<String>,
    size: u64,
    /// Frame of each page (0: not yet allocated, reads as zeros) and the
    /// number of page-table entries mapping it.
    pages: Vec<(u64, u32)>,
    fds: u32,
    object: u64,
}

/// The /tmp files and their books for the `tmpfs-pages` check.
#[derive(Default)]
struct Tmpfs {
    files: BTreeMap<u32, TmpFile>,
    next: u32,
    /// Frame → (file, page index) of every live file page.
    frames: BTreeMap<u64, (u32, usize)>,
    created: u32,
    pages_allocated: u64,
    pages_freed: u64,
    /// Of those, pages freed at their last unhold (their file was gone).
    pages_freed_at_unhold: u64,
    /// Pages of dead files the module still held: freed at their last
    /// unhold (kpi's orphans).
    orphans: Vec<u64>,
    /// Pages of files still in /tmp when the process ended.
    pages_kept: u64,
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
    tmp: Tmpfs,
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
            tmp: Tmpfs::default(),
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
        self.hand_off_devices(checks);
        self.exit_files();
        signal::exit();
        threads::exit();
        // vmspace_exit: the file pages leave the map first (the files keep
        // their frames; the unmap must not free them).
        let top = self.mm.as_ref().map_or(0, Mm::user_top);
        let _ = self.release_file_pages(0, top);
        if let Some(mm) = self.mm.take() {
            mm.destroy(&mut self.ram);
        }
        self.tmp_books(checks);
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

    /// With the tunable `testbed.vmspace_handoff=1`: the process's
    /// `/dev/kqemu` descriptors outlive it (another process holds them)
    /// and a process forked after the exit calls MODIFY_RAM_PAGES(0) on
    /// each (kpi::Kernel::exit_to_other_process). Its vmspace is a new
    /// one, so the module must answer EPERM; had the module not kept the
    /// INIT vmspace referenced, the new vmspace would have its address
    /// (the zone reuses the last freed) and the call would pass. The new
    /// process then closes them (exit_files).
    fn hand_off_devices(&mut self, checks: &mut Checks) {
        let wanted = kpi::with(|k| k.kenv.iter().any(|(n, v)| n == VMSPACE_HANDOFF && v == "1"));
        if !wanted {
            return;
        }
        let ids: Vec<u32> = self
            .fds
            .iter()
            .filter_map(|fd| match fd {
                Some(Fd::Device(id)) => Some(*id),
                _ => None,
            })
            .collect();
        let (old, refs, new) = kpi::with(|k| k.exit_to_other_process());
        let eperm = kpi::with(|k| k.layout.EPERM as i32);
        let mut errors = Vec::new();
        for id in ids {
            let mut count = 0i32;
            let cmd = u64::from(kqemu::abi::KQEMU_MODIFY_RAM_PAGES);
            errors.push(devfs::ioctl(id, cmd, (&raw mut count).cast::<u8>()));
        }
        checks.check(
            !errors.is_empty() && errors.iter().all(|&e| e == eperm) && new != old,
            "vmspace-handoff",
            format_args!(
                "INIT's vmspace {old:#x} ({refs} references left after its exit), the next \
                 process's {new:#x}; MODIFY_RAM_PAGES from it: errors {errors:?} (want EPERM {eperm})"
            ),
        );
    }

    /// exit1: every descriptor is closed (cdevpriv destructors run).
    fn exit_files(&mut self) {
        for fd in 0..self.fds.len() {
            match self.fds[fd].take() {
                Some(Fd::Device(id)) => {
                    devfs::close(id);
                }
                Some(Fd::Tmp(id, _)) => self.tmp_close(id),
                _ => {}
            }
        }
    }

    /// The end of the process: orphaned file pages whose last hold is gone
    /// are freed, files still in /tmp are kept (their pages counted), and
    /// the check: every page a /tmp file got was freed with the last of
    /// its name, descriptors, mappings and holds, or is a kept file's.
    fn tmp_books(&mut self, checks: &mut Checks) {
        if self.tmp.created == 0 {
            return;
        }
        self.free_released_orphans();
        let ids: Vec<u32> = self.tmp.files.keys().copied().collect();
        for id in ids {
            if let Some(file) = self.tmp.files.remove(&id) {
                for &(frame, _) in &file.pages {
                    if frame != 0 {
                        self.tmp.frames.remove(&frame);
                        self.ram.free_frame(frame);
                        self.tmp.pages_kept += 1;
                    }
                }
                kpi::with(|k| k.drop_object(file.object));
            }
        }
        let t = &self.tmp;
        checks.check(
            t.pages_allocated == t.pages_freed + t.pages_kept && t.orphans.is_empty(),
            "tmpfs-pages",
            format_args!(
                "{} files created; {} pages allocated, {} freed ({} at their last unhold), {} in files left in /tmp, {} still held",
                t.created,
                t.pages_allocated,
                t.pages_freed,
                t.pages_freed_at_unhold,
                t.pages_kept,
                t.orphans.len()
            ),
        );
    }

    /// Frees the frames of kpi's released orphans (see `keep_held_pages`),
    /// counting those that were /tmp file pages.
    fn free_released_orphans(&mut self) {
        let released = kpi::with(|k| core::mem::take(&mut k.books.orphans_released));
        for frame in released {
            if let Some(i) = self.tmp.orphans.iter().position(|&f| f == frame) {
                self.tmp.orphans.swap_remove(i);
                self.tmp.pages_freed += 1;
                self.tmp.pages_freed_at_unhold += 1;
            }
            self.ram.free_frame(frame);
        }
    }

    /// One descriptor of file `id` less.
    fn tmp_close(&mut self, id: u32) {
        if let Some(file) = self.tmp.files.get_mut(&id) {
            file.fds = file.fds.saturating_sub(1);
        }
        self.tmp_maybe_free(id);
    }

    /// A /tmp file lets go of its page `frame`: back to RAM now, or, when
    /// the module holds it, at its last unhold (kpi's orphans).
    fn drop_file_frame(&mut self, frame: u64) {
        self.tmp.frames.remove(&frame);
        if kpi::with(|k| k.is_held(frame)) {
            kpi::with(|k| k.books.orphans.push(frame));
            self.tmp.orphans.push(frame);
        } else {
            self.ram.free_frame(frame);
            self.tmp.pages_freed += 1;
        }
    }

    /// Frees file `id` when it has no name, descriptor or mapped page:
    /// its frames go back to RAM, those the module holds wait for their
    /// last unhold (kpi's orphans).
    fn tmp_maybe_free(&mut self, id: u32) {
        let dead = self.tmp.files.get(&id).is_some_and(|f| {
            f.name.is_none() && f.fds == 0 && f.pages.iter().all(|&(_, maps)| maps == 0)
        });
        if !dead {
            return;
        }
        let Some(file) = self.tmp.files.remove(&id) else {
            return;
        };
        for &(frame, _) in &file.pages {
            if frame != 0 {
                self.drop_file_frame(frame);
            }
        }
        kpi::with(|k| k.drop_object(file.object));
    }

    /// The file pages mapped in `start..end` leave the page tables: each
    /// entry gets a fresh frame (which the unmap that follows frees) and
    /// the file page one mapping less.
    fn release_file_pages(&mut self, start: u64, end: u64) -> Result<(), i32> {
        if self.tmp.frames.is_empty() {
            return Ok(());
        }
        let frames = &self.tmp.frames;
        let mapped = kpi::with(|k| k.user_ptes(start, end, |f| frames.contains_key(&f)));
        let mut touched = Vec::new();
        for (_, pte, frame) in mapped {
            let fresh = self.ram.alloc_frame().map_err(errno)?;
            kpi::with(|k| k.replace_frame(pte, fresh));
            if let Some(&(id, index)) = self.tmp.frames.get(&frame) {
                if let Some(page) = self
                    .tmp
                    .files
                    .get_mut(&id)
                    .and_then(|f| f.pages.get_mut(index))
                {
                    page.1 = page.1.saturating_sub(1);
                }
                if !touched.contains(&id) {
                    touched.push(id);
                }
            }
        }
        for id in touched {
            self.tmp_maybe_free(id);
        }
        Ok(())
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
            SYS_UNLINK => self.unlink(args),
            SYS_FTRUNCATE => self.ftruncate(args),
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
            Fd::Tmp(..) => {
                log!("kld: read(2) of a /tmp file is not served (only mmap): EOPNOTSUPP");
                Err(kpi::with(|k| k.layout.EOPNOTSUPP as i32))
            }
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
            Fd::Tmp(..) => {
                log!("kld: write(2) to a /tmp file is not served (only mmap): EOPNOTSUPP");
                return Err(kpi::with(|k| k.layout.EOPNOTSUPP as i32));
            }
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
        if let Some(name) = path.strip_prefix(TMP_DIR) {
            let fflags = ((a[1] & accmode) + 1) | (a[1] & !accmode);
            let id = self.tmp_open(name, a[1], fflags)?;
            self.fds[slot] = Some(Fd::Tmp(id, fflags));
            return Ok(slot as u64);
        }
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
            Some(Fd::Tmp(id, _)) => {
                self.tmp_close(id);
                Ok(0)
            }
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
        let exec_cs = (cmd == u64::from(KQEMU_EXEC))
            .then(|| KqemuCpuState::read_from(&buf[..size as usize]))
            .flatten()
            .map(|state| state.segs[seg::CS].selector);
        // While the module runs this ioctl, a deferred preemption may give
        // another thread a slice (threads::preempt).
        let error = threads::preemptible(&mut || self.other_slice(fs, loaded, checks), || {
            devfs::ioctl(id, cmd, buf.as_mut_ptr())
        });
        if error != 0 {
            return Err(error);
        }
        if let Some(guest_cs) = exec_cs {
            let retval = KqemuCpuState::read_from(&buf[..size as usize]).map(|s| s.retval);
            note_exec_cs(guest_cs, retval);
        }
        if cmd & l.IOC_OUT != 0 && size > 0 {
            let (mm, ram) = self.mm();
            mm.write(ram, a[2], &buf[..size as usize])
                .map_err(|_| l.EFAULT as i32)?;
        }
        Ok(0)
    }

    /// mmap(2) of anonymous memory (MAP_ANON, shared or private: one
    /// process, so both are the same pages), or of a /tmp file.
    fn mmap(&mut self, a: [u64; 6]) -> SysResult {
        let (einval, enodev) = kpi::with(|k| (k.layout.EINVAL as i32, k.layout.ENODEV as i32));
        let (addr, len, prot, flags) = (a[0], a[1], a[2], a[3]);
        if flags & MAP_ANON == 0 {
            return match self.fd(a[4]) {
                Ok(&Fd::Tmp(id, fflags)) => self.mmap_tmp(a, id, fflags),
                _ => {
                    log!("kld: mmap of a descriptor that is not a /tmp file is not served: ENODEV");
                    Err(enodev)
                }
            };
        }
        if len == 0 || (flags & (MAP_SHARED | MAP_PRIVATE)) == (MAP_SHARED | MAP_PRIVATE) {
            return Err(einval);
        }
        let len = len.checked_next_multiple_of(kpi::PAGE_SIZE).ok_or(einval)?;
        let placement = self.placement(addr, len, flags)?;
        let (mm, ram) = self.mm();
        let at = mm
            .map_region(ram, placement, len, (prot & PROT_MASK) as u32)
            .map_err(errno)?;
        kpi::with(|k| k.mapped(at, len, prot & PROT_MASK));
        Ok(at)
    }

    /// Where a new mapping goes: MAP_FIXED replaces what is mapped at
    /// `addr..addr + len`, as munmap would (file pages released, pages the
    /// module holds kept); otherwise `addr` is a hint.
    fn placement(&mut self, addr: u64, len: u64, flags: u64) -> Result<Placement, i32> {
        if flags & MAP_FIXED != 0 {
            self.release_file_pages(addr, addr.saturating_add(len))?;
            self.keep_held_pages(addr, addr.saturating_add(len))?;
            Ok(Placement::Fixed(addr))
        } else {
            self.keep_held_pages(0, 0)?;
            Ok(Placement::Hint(addr))
        }
    }

    /// mmap(2) of /tmp file `id` (MAP_SHARED only: a private mapping is
    /// copy-on-write, not modelled): the file's pages at `offset..` are
    /// the mapping's pages, allocated (zeroed) on first use; pages past
    /// the end of the file are refused (FreeBSD maps them and SIGBUSes
    /// on access, which is not modelled).
    fn mmap_tmp(&mut self, a: [u64; 6], id: u32, fflags: u64) -> SysResult {
        let (einval, enodev) = kpi::with(|k| (k.layout.EINVAL as i32, k.layout.ENODEV as i32));
        let (addr, len, prot, flags, offset) = (a[0], a[1], a[2] & PROT_MASK, a[3], a[5]);
        if flags & MAP_SHARED == 0 || flags & MAP_PRIVATE != 0 {
            log!("kld: a private mapping of a file (copy-on-write) is not served: ENODEV");
            return Err(enodev);
        }
        // vm_mmap_vnode: a shared writable mapping needs a writable descriptor.
        if prot & 0x2 != 0 && fflags & FWRITE == 0 {
            return Err(EACCES);
        }
        if len == 0 || !offset.is_multiple_of(kpi::PAGE_SIZE) {
            return Err(einval);
        }
        let len = len.checked_next_multiple_of(kpi::PAGE_SIZE).ok_or(einval)?;
        let size = self.tmp.files.get(&id).map_or(0, |f| f.size);
        let end = offset.checked_add(len).ok_or(einval)?;
        if end > size.next_multiple_of(kpi::PAGE_SIZE) {
            log!("kld: mmap past the end of a /tmp file is not modelled: EINVAL");
            return Err(einval);
        }
        let placement = self.placement(addr, len, flags)?;
        let (mm, ram) = self.mm();
        let at = mm
            .map_region(ram, placement, len, prot as u32)
            .map_err(errno)?;
        // The fresh frames map_region put there: each becomes the file's
        // page, or gives way to the page the file has.
        let fresh = kpi::with(|k| k.user_ptes(at, at + len, |_| true));
        let first = (offset / kpi::PAGE_SIZE) as usize;
        for (va, pte, frame) in fresh {
            let index = first + ((va - at) / kpi::PAGE_SIZE) as usize;
            let Some(page) = self
                .tmp
                .files
                .get_mut(&id)
                .and_then(|f| f.pages.get_mut(index))
            else {
                continue;
            };
            page.1 += 1;
            if page.0 == 0 {
                page.0 = frame;
                self.tmp.frames.insert(frame, (id, index));
                self.tmp.pages_allocated += 1;
            } else {
                let shared = page.0;
                kpi::with(|k| k.replace_frame(pte, shared));
                self.ram.free_frame(frame);
            }
        }
        self.flush = true;
        let object = self.tmp.files.get(&id).map_or(0, |f| f.object);
        kpi::with(|k| k.mapped_file(at, len, prot, object, offset));
        Ok(at)
    }

    /// open(2) in /tmp: O_CREAT makes a regular file (O_EXCL: EEXIST if
    /// it exists), O_TRUNC of a writable descriptor empties it.
    fn tmp_open(&mut self, name: &str, flags: u64, fflags: u64) -> Result<u32, i32> {
        let (enoent, eexist) = kpi::with(|k| (k.layout.ENOENT as i32, k.layout.EEXIST as i32));
        if name.is_empty() || name.contains('/') {
            return Err(enoent);
        }
        let found = self
            .tmp
            .files
            .iter()
            .find(|(_, f)| f.name.as_deref() == Some(name))
            .map(|(&id, _)| id);
        let id = match found {
            Some(_) if flags & (O_CREAT | O_EXCL) == O_CREAT | O_EXCL => return Err(eexist),
            Some(id) => id,
            None if flags & O_CREAT != 0 => {
                let id = self.tmp.next;
                self.tmp.next += 1;
                self.tmp.created += 1;
                let object = kpi::with(|k| k.new_object());
                self.tmp.files.insert(
                    id,
                    TmpFile {
                        name: Some(String::from(name)),
                        size: 0,
                        pages: Vec::new(),
                        fds: 0,
                        object,
                    },
                );
                id
            }
            None => return Err(enoent),
        };
        if flags & O_TRUNC != 0 && fflags & FWRITE != 0 {
            self.tmp_truncate(id, 0)?;
        }
        if let Some(file) = self.tmp.files.get_mut(&id) {
            file.fds += 1;
        }
        Ok(id)
    }

    /// unlink(2) of a /tmp file: the name goes, the file lives on while
    /// descriptors or mappings use it.
    fn unlink(&mut self, a: [u64; 6]) -> SysResult {
        let (enoent, eperm) = kpi::with(|k| (k.layout.ENOENT as i32, k.layout.EPERM as i32));
        let (mm, ram) = self.mm();
        let path = mm
            .read_cstr(ram, a[0], MAXPATHLEN, Errno(63))
            .map_err(errno)?;
        let path = String::from_utf8_lossy(&path).into_owned();
        let Some(name) = path.strip_prefix(TMP_DIR) else {
            // The guest archive and devfs are not the process's to change.
            return Err(eperm);
        };
        let id = self
            .tmp
            .files
            .iter()
            .find(|(_, f)| f.name.as_deref() == Some(name))
            .map(|(&id, _)| id)
            .ok_or(enoent)?;
        if let Some(file) = self.tmp.files.get_mut(&id) {
            file.name = None;
        }
        self.tmp_maybe_free(id);
        Ok(0)
    }

    /// ftruncate(2): EINVAL for a descriptor not open for writing or a
    /// negative length (kern_ftruncate, vn_truncate).
    fn ftruncate(&mut self, a: [u64; 6]) -> SysResult {
        let einval = kpi::with(|k| k.layout.EINVAL as i32);
        let Fd::Tmp(id, fflags) = *self.fd(a[0])? else {
            return Err(einval);
        };
        if fflags & FWRITE == 0 || (a[1] as i64) < 0 {
            return Err(einval);
        }
        self.tmp_truncate(id, a[1])?;
        Ok(0)
    }

    /// Sets the size of file `id`: new pages read as zeros; pages past a
    /// smaller end are freed (EOPNOTSUPP if one is mapped: FreeBSD would
    /// remove it from the mappings, which is not modelled).
    fn tmp_truncate(&mut self, id: u32, size: u64) -> Result<(), i32> {
        let eopnotsupp = kpi::with(|k| k.layout.EOPNOTSUPP as i32);
        let Some(file) = self.tmp.files.get_mut(&id) else {
            return Ok(());
        };
        let pages = usize::try_from(size.div_ceil(kpi::PAGE_SIZE)).map_err(|_| eopnotsupp)?;
        if file.pages.len() > pages && file.pages[pages..].iter().any(|&(_, maps)| maps > 0) {
            log!("kld: ftruncate cutting mapped pages of a /tmp file is not modelled: EOPNOTSUPP");
            return Err(eopnotsupp);
        }
        let cut: Vec<u64> = file
            .pages
            .drain(pages.min(file.pages.len())..)
            .map(|(frame, _)| frame)
            .filter(|&f| f != 0)
            .collect();
        file.pages.resize(pages, (0, 0));
        file.size = size;
        for frame in cut {
            self.drop_file_frame(frame);
        }
        Ok(())
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
        self.release_file_pages(addr, end)?;
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
        self.free_released_orphans();
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
