//! `Linux`: the operating system a guest program sees. The runner is the CPU: it asks
//! `next()` what to run, runs it until a trap, and reports the trap with `trap()`.

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, BTreeSet};
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::{self, Write as _};

use crate::context::{
    Arch, PagingFormat, Trap, UserContext, REG_RAX, REG_RSP, RFLAGS_INITIAL, TLS_FIRST_ENTRY,
};
use crate::elf;
use crate::errno::{Errno, KResult};
use crate::loader::{self, AddressSpaceSpec, StackInfo};
use crate::memfs::{MemFs, Node, ROOT_INO};
use crate::mm::Mm;
use crate::process::{
    AltStack, Fd, FileKind, OpenFile, Pid, Pipe, Process, SigAction, Slab, State, O_RDONLY,
    O_WRONLY, SA_NOCLDWAIT, SIGBUS, SIGCHLD, SIGFPE, SIGILL, SIGKILL, SIGSEGV, SIGTRAP, SIG_DFL,
    SIG_IGN,
};
use crate::ram::GuestRam;
use crate::syscall::Flow;

/// `fd` value of [`Console::write`] that carries the OS's own log lines (one line per call,
/// newline-terminated, prefixed with `kqemu-client: `).
pub const LOG_FD: i32 = -1;

/// A CPUID.1:EDX-like AT_HWCAP (FPU, TSC, CX8, CMOV, MMX, FXSR, SSE, SSE2 and the rest of
/// the baseline every x86_64 CPU has); glibc reads CPUID itself, this is informational.
pub const DEFAULT_HWCAP: u64 = 0x078b_fbff;

/// Most processes alive at once (`fork` answers EAGAIN beyond).
pub const MAX_PROCESSES: usize = 256;

/// What the OS needs from the runner's environment.
pub trait Console {
    /// Guest output on fd 1 or 2, or an OS log line with `fd == LOG_FD`.
    fn write(&mut self, fd: i32, bytes: &[u8]);
    /// Wall-clock time in nanoseconds since the Unix epoch (also used as the monotonic clock).
    fn now_ns(&mut self) -> u64;
    /// Fills `buf` with random bytes (AT_RANDOM, `getrandom`).
    fn random(&mut self, buf: &mut [u8]);
}

/// How the OS builds address spaces.
#[derive(Clone, Debug)]
pub struct LinuxConfig {
    /// The ABI `spawn` expects of the first program (ENOEXEC otherwise). `execve` accepts
    /// either ABI when the paging format can hold it (amd64 needs Long4).
    pub arch: Arch,
    pub paging: PagingFormat,
    /// PML4 entries copied into every Long4 root (the runner's upper half: its kernel, DMAP).
    /// Indices must be above the user range (256.. for amd64, 1.. for i386). `Linux::new`
    /// adds the root entry of its GDT page ([`GuestGdt`]), a PDE or PDPTE under 32-bit or
    /// PAE paging.
    pub kernel_pml4e: Vec<(usize, u64)>,
    /// Set NX on non-executable user pages (PAE/Long4 only; the runner must enable EFER.NXE).
    pub nx: bool,
    /// AT_HWCAP.
    pub hwcap: u64,
    /// GDT index of the first of the three TLS slots that `set_thread_area` hands out
    /// (`TLS_FIRST_ENTRY` = 6 as on i386 Linux; a 64-bit Linux host uses 12 for 32-bit tasks).
    pub tls_entry_base: u32,
    /// After this many system calls the scheduler moves on to the next runnable process
    /// (0: only when a call blocks or the runner reports a timer tick). Benchmarks use it to
    /// make two processes alternate under their own page-table roots at a known rate.
    pub switch_every: u32,
}

impl LinuxConfig {
    /// Defaults: no kernel entries, NX where the format has it, `DEFAULT_HWCAP`.
    pub fn new(arch: Arch, paging: PagingFormat) -> Self {
        LinuxConfig {
            arch,
            paging,
            kernel_pml4e: Vec::new(),
            nx: paging != PagingFormat::Legacy32,
            hwcap: DEFAULT_HWCAP,
            tls_entry_base: TLS_FIRST_ENTRY,
            switch_every: 0,
        }
    }
}

/// The guest OS's GDT: one page of guest RAM, mapped supervisor-only at the same linear
/// address in every address space (a kernel's per-CPU GDT), holding the descriptors of the
/// running process (`kqemu::load_gdt`, Linux's `load_TLS` on a context switch). What the
/// monitor reads when guest code loads a selector, and what this client's emulator reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestGdt {
    /// Guest-physical address of the page.
    pub frame: u64,
    /// Its linear address: the GDTR base.
    pub linear: u64,
}

/// The running process's LDT (`modify_ldt`) shares the GDT page: its upper half, from
/// this offset, as the table the LDTR of the guest OS names (`kqemu::state_of` gives its
/// base and limit); the GDT itself takes 16 entries.
pub const LDT_OFFSET: u64 = 0x800;
/// LDT entries a process can have here: the upper half of the page (Linux allows 8192).
pub const LDT_ENTRIES: usize = 256;

impl GuestGdt {
    /// Linear address of the LDT in the page.
    pub fn ldt_linear(&self) -> u64 {
        self.linear + LDT_OFFSET
    }

    /// Guest-physical address of the LDT in the page.
    pub fn ldt_frame(&self) -> u64 {
        self.frame + LDT_OFFSET
    }
}

/// Where the GDT page is mapped: the top 4 MiB (32-bit paging) or 2 MiB (PAE) of a 32-bit
/// OS's kernel space; under 4-level paging, a free PML4 slot of the upper half below 511
/// (the slot of the module's switcher on FreeBSD and in the testbed).
const GDT_LINEAR_LEGACY32: u64 = 0xffc0_0000;
const GDT_LINEAR_PAE: u64 = 0xffe0_0000;
const LONG4_KERNEL_SLOTS: core::ops::RangeInclusive<usize> = 256..=510;
const LONG4_SIGN_EXTEND: u64 = 0xffff_0000_0000_0000;
const PML4_SHIFT: u32 = 39;

impl GuestGdt {
    /// Allocates the page and its supervisor tables and adds their root entry to
    /// `cfg.kernel_pml4e`, so every address space built from `cfg` maps it. `None`: no
    /// guest RAM or no free PML4 slot (the runner's upper half takes them all).
    fn build(ram: &mut GuestRam, cfg: &mut LinuxConfig) -> Option<Self> {
        let linear = match cfg.paging {
            PagingFormat::Legacy32 => GDT_LINEAR_LEGACY32,
            PagingFormat::Pae => GDT_LINEAR_PAE,
            PagingFormat::Long4 => {
                let slot = LONG4_KERNEL_SLOTS
                    .rev()
                    .find(|s| cfg.kernel_pml4e.iter().all(|&(i, _)| i != *s))?;
                LONG4_SIGN_EXTEND | (slot as u64) << PML4_SHIFT
            }
        };
        // Below 4 GiB: a 32-bit paging entry holds a 32-bit frame address.
        let frame = ram.alloc_frame_below(1 << 32).ok()?;
        let Ok(root) = crate::paging::kernel_page(ram, cfg.paging, linear, frame) else {
            ram.free_frame(frame);
            return None;
        };
        cfg.kernel_pml4e.push(root);
        Some(Self { frame, linear })
    }
}

/// What a process is doing (for diagnostics and tests).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ProcessState {
    Runnable,
    /// Waiting in a system call (pipe, wait4, ...).
    Blocked,
    /// Exited, not yet reaped; the Linux wait status.
    Exited(i32),
}

/// A process the runner should run now.
pub struct Runnable<'l> {
    pub pid: Pid,
    pub arch: Arch,
    /// Root of its page tables.
    pub cr3: u64,
    /// Translations of this address space were removed or reduced (munmap, mprotect, mremap,
    /// exec, or a recycled root) since the runner last ran it: drop any cached ones.
    pub flush_tlb: bool,
    pub ctx: &'l mut UserContext,
}

/// The operating system.
pub struct Linux<'a> {
    pub(crate) ram: GuestRam<'a>,
    pub(crate) cfg: LinuxConfig,
    pub(crate) console: Box<dyn Console + 'a>,
    pub(crate) fs: MemFs,
    pub(crate) files: Slab<OpenFile>,
    pub(crate) pipes: Slab<Pipe>,
    pub(crate) procs: BTreeMap<Pid, Box<Process>>,
    next_pid: Pid,
    current: Option<Pid>,
    rotate: bool,
    /// System calls since the last `switch_every` rotation.
    calls_since_switch: u32,
    logged: BTreeSet<(Arch, u64)>,
    init_status: Option<i32>,
    deadlocked: bool,
    pub(crate) boot_ns: u64,
    pub(crate) gdt: Option<GuestGdt>,
    /// The process whose descriptors the GDT page holds (`kqemu::step` rewrites it only
    /// for another process or after its `tls_changed`).
    pub(crate) gdt_pid: Option<Pid>,
}

/// Linux wait status of a normal exit.
pub(crate) fn exited_status(code: i32) -> i32 {
    (code & 0xff) << 8
}

/// Linux wait status of a death by signal.
pub(crate) fn signaled_status(sig: u32) -> i32 {
    (sig & 0x7f) as i32
}

/// The signal a CPU exception raises (Linux arch/x86/kernel/traps.c).
fn exception_signal(vector: u8) -> u32 {
    match vector {
        0 | 16 | 19 => SIGFPE,
        1 | 3 => SIGTRAP,
        6 => SIGILL,
        // #NP, #SS and #AC: SIGBUS (Linux arch/x86/kernel/traps.c, DO_ERROR).
        11 | 12 | 17 => SIGBUS,
        _ => SIGSEGV,
    }
}

impl<'a> Linux<'a> {
    pub fn new(
        mut ram: GuestRam<'a>,
        fs: MemFs,
        mut cfg: LinuxConfig,
        console: Box<dyn Console + 'a>,
    ) -> Self {
        let gdt = GuestGdt::build(&mut ram, &mut cfg);
        let mut linux = Linux {
            ram,
            cfg,
            console,
            fs,
            files: Slab::new(),
            pipes: Slab::new(),
            procs: BTreeMap::new(),
            next_pid: 1,
            current: None,
            rotate: false,
            calls_since_switch: 0,
            logged: BTreeSet::new(),
            init_status: None,
            deadlocked: false,
            boot_ns: 0,
            gdt,
            gdt_pid: None,
        };
        linux.boot_ns = linux.console.now_ns();
        if linux.gdt.is_none() {
            linux.log(format_args!(
                "no guest RAM or PML4 slot for the GDT page: segment loads go to the emulator"
            ));
        }
        linux
    }

    /// The GDT page (`None` when guest RAM had no room for it).
    pub fn gdt(&self) -> Option<GuestGdt> {
        self.gdt
    }

    /// Writes one log line to the console's log channel.
    pub(crate) fn log(&mut self, args: fmt::Arguments) {
        let mut line = String::from("kqemu-client: ");
        let _ = line.write_fmt(args);
        line.push('\n');
        self.console.write(LOG_FD, line.as_bytes());
    }

    /// Logs a line once per (ABI, key).
    pub(crate) fn log_once(&mut self, abi: Arch, key: u64, args: fmt::Arguments) {
        if self.logged.insert((abi, key)) {
            self.log(args);
        }
    }

    pub(crate) fn now_ns(&mut self) -> i64 {
        self.console.now_ns() as i64
    }

    /// Loads the static ELF at `path` as pid 1 with fds 0-2 on the console.
    pub fn spawn(&mut self, path: &str, argv: &[&str], envp: &[&str]) -> KResult<Pid> {
        if !self.procs.is_empty() || self.init_status.is_some() {
            return Err(Errno::EBUSY);
        }
        let mut p = Box::new(Process {
            pid: 1,
            ppid: 0,
            pgid: 1,
            sid: 1,
            state: State::Runnable,
            ctx: UserContext::default(),
            arch: self.cfg.arch,
            mm: None,
            fds: Vec::new(),
            cwd: ROOT_INO,
            umask: 0o022,
            actions: [SigAction::default(); 64],
            sigmask: 0,
            altstack: AltStack::default(),
            comm: Vec::new(),
            exe: Vec::new(),
        });
        self.fs.retain(ROOT_INO);
        for (fd, status) in [(0, O_RDONLY), (1, O_WRONLY), (2, O_WRONLY)] {
            let file = self.files.insert(OpenFile {
                kind: FileKind::Console(fd),
                status,
                offset: 0,
                dir_cursor: None,
                refs: 1,
            });
            p.set_fd(
                fd as usize,
                Fd {
                    file,
                    cloexec: false,
                },
            );
        }
        let argv: Vec<Vec<u8>> = argv.iter().map(|s| s.as_bytes().to_vec()).collect();
        let envp: Vec<Vec<u8>> = envp.iter().map(|s| s.as_bytes().to_vec()).collect();
        let mut result = self.exec(&mut p, path.as_bytes(), argv, envp);
        if result.is_ok() && p.arch != self.cfg.arch {
            let (found, expected) = (p.arch, self.cfg.arch);
            self.log(format_args!(
                "spawn {path}: a {found:?} program, the configuration expects {expected:?}"
            ));
            result = Err(Errno::ENOEXEC);
        }
        if let Err(err) = result {
            self.release_process_resources(&mut p);
            return Err(err);
        }
        self.next_pid = 2;
        self.procs.insert(1, p);
        self.current = Some(1);
        Ok(1)
    }

    /// Replaces `p`'s program with the executable at `path`.
    pub(crate) fn exec(
        &mut self,
        p: &mut Process,
        path: &[u8],
        argv: Vec<Vec<u8>>,
        envp: Vec<Vec<u8>>,
    ) -> KResult<()> {
        let path = self
            .proc_self_path(p, path)
            .unwrap_or_else(|| path.to_vec());
        let (dir, name, ino) = self.fs.resolve_final(p.cwd, &path)?;
        let stat = self.fs.stat(ino)?;
        if stat.mode & 0o111 == 0 {
            return Err(Errno::EACCES);
        }
        let mut exe = self.fs.dir_path(dir)?;
        if exe != b"/" {
            exe.push(b'/');
        }
        exe.extend_from_slice(&name);
        let mut random = [0u8; 16];
        self.console.random(&mut random);
        let Some(Node::File(data)) = self.fs.node(ino) else {
            return Err(Errno::EACCES);
        };
        let image = match elf::parse(data) {
            Ok(image) => image,
            Err(err) => {
                let shown = String::from_utf8_lossy(&path).into_owned();
                self.log(format_args!("execve {shown}: {err}"));
                return Err(Errno::ENOEXEC);
            }
        };
        let info = StackInfo {
            execfn: &path,
            random,
            hwcap: self.cfg.hwcap,
        };
        let spec = AddressSpaceSpec {
            format: self.cfg.paging,
            nx: self.cfg.nx,
            kernel_entries: &self.cfg.kernel_pml4e,
        };
        let loaded = loader::load(&mut self.ram, spec, &image, &argv, &envp, &info)?;
        let arch = image.arch;
        if let Some(old) = p.mm.replace(loaded.mm) {
            old.destroy(&mut self.ram);
        }
        if let Some(mm) = p.mm.as_mut() {
            mm.tlb_stale = true;
        }
        p.arch = arch;
        p.ctx = UserContext {
            rip: loaded.entry,
            rflags: RFLAGS_INITIAL,
            tls_changed: true,
            ..UserContext::default()
        };
        p.ctx.regs[REG_RSP] = loaded.sp;
        for index in 0..p.fds.len() {
            if p.fds[index].is_some_and(|fd| fd.cloexec) {
                if let Some(fd) = p.fds[index].take() {
                    self.unref_file(fd.file);
                }
            }
        }
        for action in p.actions.iter_mut() {
            if action.handler != SIG_IGN {
                *action = SigAction::default();
            }
        }
        p.altstack = AltStack::default();
        let base = path.rsplit(|&b| b == b'/').next().unwrap_or(&path);
        p.comm = base[..base.len().min(15)].to_vec();
        p.exe = exe;
        Ok(())
    }

    /// `/proc/self/exe` (and `/proc/<own pid>/exe`) name the process's executable.
    pub(crate) fn proc_self_path(&self, p: &Process, path: &[u8]) -> Option<Vec<u8>> {
        let rest = path.strip_prefix(b"/proc/")?;
        let (who, file) = rest.split_at(rest.iter().position(|&b| b == b'/')?);
        let own = alloc::format!("{}", p.pid);
        ((who == b"self" || who == own.as_bytes()) && file == b"/exe").then(|| p.exe.clone())
    }

    /// The process to run next, or None once pid 1 has exited (or a deadlock ended the run).
    // Not an Iterator: each item borrows the OS mutably until the runner reports the trap.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Option<Runnable<'_>> {
        if self.init_status.is_some() {
            return None;
        }
        let pid = self.pick()?;
        self.current = Some(pid);
        let p = self.procs.get_mut(&pid)?;
        let mm = p.mm.as_mut()?;
        let flush_tlb = core::mem::take(&mut mm.tlb_stale);
        Some(Runnable {
            pid,
            arch: p.arch,
            cr3: mm.cr3(),
            flush_tlb,
            ctx: &mut p.ctx,
        })
    }

    /// Chooses a runnable process, retrying blocked calls; ends the run on deadlock.
    fn pick(&mut self) -> Option<Pid> {
        let rotate = core::mem::take(&mut self.rotate);
        if let Some(cur) = self.current {
            if !rotate
                && self
                    .procs
                    .get(&cur)
                    .is_some_and(|p| p.state == State::Runnable)
            {
                return Some(cur);
            }
        }
        let start = self.current.unwrap_or(0);
        let order: Vec<Pid> = self
            .procs
            .range(start + 1..)
            .chain(self.procs.range(..=start))
            .filter(|(_, p)| !matches!(p.state, State::Zombie(_)))
            .map(|(&pid, _)| pid)
            .collect();
        for pid in order.iter().copied() {
            let Some(state) = self.procs.get(&pid).map(|p| p.state) else {
                continue;
            };
            match state {
                State::Runnable => return Some(pid),
                State::Blocked(abi) => {
                    self.retry(pid, abi);
                    if self.init_status.is_some() {
                        return None;
                    }
                    if self
                        .procs
                        .get(&pid)
                        .is_some_and(|p| p.state == State::Runnable)
                    {
                        return Some(pid);
                    }
                }
                State::Zombie(_) => {}
            }
        }
        if order.is_empty() {
            return None;
        }
        let mut waiting = String::new();
        for (pid, p) in &self.procs {
            if !matches!(p.state, State::Zombie(_)) {
                let comm = String::from_utf8_lossy(&p.comm);
                let _ = write!(waiting, " {pid}({comm})");
            }
        }
        self.log(format_args!("deadlock: every process is blocked:{waiting}"));
        self.deadlocked = true;
        self.shutdown(signaled_status(SIGKILL));
        None
    }

    /// Runs the blocked call of `pid` again.
    fn retry(&mut self, pid: Pid, abi: Arch) {
        let Some(mut p) = self.procs.remove(&pid) else {
            return;
        };
        p.state = State::Runnable;
        let flow = self.dispatch(&mut p, abi);
        self.complete(&mut p, abi, flow);
        self.finish(p);
    }

    /// Applies a call's outcome to the caller.
    fn complete(&mut self, p: &mut Process, abi: Arch, flow: Flow) {
        match flow {
            Flow::Ret(value) => {
                p.ctx.regs[REG_RAX] = match abi {
                    Arch::Amd64 => value as u64,
                    Arch::I386 => u64::from(value as u32),
                };
            }
            Flow::Block => p.state = State::Blocked(abi),
            Flow::Gone | Flow::Replaced => {}
        }
    }

    /// Puts a process back in the table (or drops it if it exited and nobody will wait).
    fn finish(&mut self, p: Box<Process>) {
        let pid = p.pid;
        let auto_reap = match p.state {
            State::Zombie(_) => {
                // A parent outside the table is in a syscall right now: keep the zombie for it.
                let parent = self.procs.get(&p.ppid);
                let ignores = parent.is_some_and(|parent| {
                    let act = parent.action(SIGCHLD);
                    act.handler == SIG_IGN || act.flags & SA_NOCLDWAIT != 0
                });
                pid != 1 && ignores
            }
            _ => false,
        };
        if !auto_reap {
            self.procs.insert(pid, p);
        }
        if pid == 1 {
            if let Some(State::Zombie(status)) = self.procs.get(&1).map(|p| p.state) {
                self.shutdown(status);
            }
        }
    }

    /// The runner stopped `pid` with `trap` (its registers already saved in the context).
    pub fn trap(&mut self, pid: Pid, trap: Trap) {
        let Some(mut p) = self.procs.remove(&pid) else {
            return;
        };
        if p.state != State::Runnable {
            self.procs.insert(pid, p);
            return;
        }
        match trap {
            Trap::Syscall if p.arch == Arch::Amd64 => {
                let flow = self.dispatch(&mut p, Arch::Amd64);
                self.complete(&mut p, Arch::Amd64, flow);
            }
            Trap::Int80 => {
                let flow = self.dispatch(&mut p, Arch::I386);
                self.complete(&mut p, Arch::I386, flow);
            }
            Trap::Syscall => {
                // `syscall` from 32-bit code has no Linux ABI here (Intel CPUs raise #UD).
                self.fault(&mut p, 6, 0);
            }
            Trap::Exception { vector, cr2, .. } => {
                let grown = vector == 14
                    && p.mm
                        .as_mut()
                        .is_some_and(|mm| mm.grow_stack(&mut self.ram, cr2));
                if !grown {
                    self.fault(&mut p, vector, cr2);
                }
            }
            Trap::Timer => self.rotate = true,
        }
        if matches!(trap, Trap::Syscall | Trap::Int80) && self.cfg.switch_every != 0 {
            self.calls_since_switch += 1;
            if self.calls_since_switch >= self.cfg.switch_every {
                self.calls_since_switch = 0;
                self.rotate = true;
            }
        }
        self.finish(p);
    }

    /// Kills `p` for an exception it raised (signal handlers are not run).
    fn fault(&mut self, p: &mut Process, vector: u8, cr2: u64) {
        let sig = exception_signal(vector);
        let comm = String::from_utf8_lossy(&p.comm).into_owned();
        let rip = p.ctx.rip;
        self.log(format_args!(
            "pid {} ({comm}): exception {vector} at rip {rip:#x} (cr2 {cr2:#x}): killed by signal {sig}",
            p.pid
        ));
        self.exit_process(p, signaled_status(sig));
    }

    /// Ends the run: every process is killed, `status` becomes pid 1's status if it had none.
    fn shutdown(&mut self, status: i32) {
        let status = match self.procs.get(&1).map(|p| p.state) {
            Some(State::Zombie(s)) => s,
            _ => status,
        };
        let pids: Vec<Pid> = self.procs.keys().copied().collect();
        for pid in pids {
            if let Some(mut p) = self.procs.remove(&pid) {
                if !matches!(p.state, State::Zombie(_)) {
                    self.exit_process(&mut p, signaled_status(SIGKILL));
                }
            }
        }
        self.init_status = Some(if status & 0x7f != 0 {
            128 + (status & 0x7f)
        } else {
            (status >> 8) & 0xff
        });
    }

    /// Lets the scheduler pick another runnable process at the next `next()`.
    pub(crate) fn request_rotate(&mut self) {
        self.rotate = true;
    }

    /// Exit status of pid 1 once the run is over: its exit code, or 128+signal when killed
    /// (a deadlock counts as SIGKILL, see `deadlocked`).
    pub fn exit_status(&self) -> Option<i32> {
        self.init_status
    }

    /// True if the run ended because every process was blocked.
    pub fn deadlocked(&self) -> bool {
        self.deadlocked
    }

    pub fn fs(&self) -> &MemFs {
        &self.fs
    }

    pub fn fs_mut(&mut self) -> &mut MemFs {
        &mut self.fs
    }

    /// Free frames left in guest RAM.
    pub fn free_frames(&self) -> usize {
        self.ram.free_frames()
    }

    /// Pids of the processes that have not been reaped.
    pub fn pids(&self) -> Vec<Pid> {
        self.procs.keys().copied().collect()
    }

    /// The state of `pid`, if it exists.
    pub fn process_state(&self, pid: Pid) -> Option<ProcessState> {
        Some(match self.procs.get(&pid)?.state {
            State::Runnable => ProcessState::Runnable,
            State::Blocked(_) => ProcessState::Blocked,
            State::Zombie(status) => ProcessState::Exited(status),
        })
    }

    /// Reads user memory of `pid` (user access rules: EFAULT if not readable).
    pub fn read_user(&mut self, pid: Pid, va: u64, buf: &mut [u8]) -> KResult<()> {
        let p = self.procs.get_mut(&pid).ok_or(Errno::ESRCH)?;
        let mm = p.mm.as_mut().ok_or(Errno::ESRCH)?;
        mm.read(&mut self.ram, va, buf)
    }

    /// Writes user memory of `pid` (user access rules: EFAULT if not writable).
    pub fn write_user(&mut self, pid: Pid, va: u64, data: &[u8]) -> KResult<()> {
        let p = self.procs.get_mut(&pid).ok_or(Errno::ESRCH)?;
        let mm = p.mm.as_mut().ok_or(Errno::ESRCH)?;
        mm.write(&mut self.ram, va, data)
    }

    /// The register file of `pid` (between traps).
    pub fn context(&mut self, pid: Pid) -> Option<&mut UserContext> {
        Some(&mut self.procs.get_mut(&pid)?.ctx)
    }

    pub(crate) fn alloc_pid(&mut self) -> KResult<Pid> {
        if self.procs.len() >= MAX_PROCESSES {
            return Err(Errno::EAGAIN);
        }
        for _ in 0..=MAX_PROCESSES {
            let pid = self.next_pid;
            self.next_pid = if pid >= 32767 { 2 } else { pid + 1 };
            if !self.procs.contains_key(&pid) {
                return Ok(pid);
            }
        }
        Err(Errno::EAGAIN)
    }

    /// Drops one reference to an open file, releasing pipe ends and inodes on the last.
    pub(crate) fn unref_file(&mut self, id: usize) {
        let Some(file) = self.files.get_mut(id) else {
            return;
        };
        file.refs = file.refs.saturating_sub(1);
        if file.refs > 0 {
            return;
        }
        let kind = file.kind;
        self.files.remove(id);
        match kind {
            FileKind::Inode(ino) => self.fs.release(ino),
            FileKind::PipeRead(pipe) | FileKind::PipeWrite(pipe) => {
                let read_end = matches!(kind, FileKind::PipeRead(_));
                let Some(p) = self.pipes.get_mut(pipe) else {
                    return;
                };
                if read_end {
                    p.readers = p.readers.saturating_sub(1);
                } else {
                    p.writers = p.writers.saturating_sub(1);
                }
                if p.readers == 0 && p.writers == 0 {
                    self.pipes.remove(pipe);
                }
            }
            FileKind::Console(_) => {}
        }
    }

    /// Takes one more reference to an open file.
    pub(crate) fn ref_file(&mut self, id: usize) {
        if let Some(file) = self.files.get_mut(id) {
            file.refs += 1;
        }
    }

    /// Closes every descriptor, frees the address space and the current directory.
    fn release_process_resources(&mut self, p: &mut Process) {
        for fd in core::mem::take(&mut p.fds).into_iter().flatten() {
            self.unref_file(fd.file);
        }
        if let Some(mm) = p.mm.take() {
            mm.destroy(&mut self.ram);
        }
        self.fs.release(p.cwd);
    }

    /// Terminates `p` (not in the process table) with a wait status.
    pub(crate) fn exit_process(&mut self, p: &mut Process, wait_status: i32) {
        if matches!(p.state, State::Zombie(_)) {
            return;
        }
        self.release_process_resources(p);
        p.state = State::Zombie(wait_status);
        let orphans: Vec<Pid> = self
            .procs
            .iter()
            .filter(|(_, child)| child.ppid == p.pid)
            .map(|(&pid, _)| pid)
            .collect();
        for pid in orphans {
            let zombie = match self.procs.get_mut(&pid) {
                Some(child) => {
                    child.ppid = 1;
                    matches!(child.state, State::Zombie(_))
                }
                None => false,
            };
            // Nobody is left to reap a zombie orphan when init itself is exiting.
            if zombie && p.pid == 1 {
                self.procs.remove(&pid);
            }
        }
    }

    /// Terminates another process (in the table) with a signal.
    pub(crate) fn kill_other(&mut self, pid: Pid, sig: u32) {
        if let Some(mut target) = self.procs.remove(&pid) {
            self.exit_process(&mut target, signaled_status(sig));
            self.finish(target);
        }
    }

    /// Whether `sig` terminates a process with `action` for it (no handler, not ignored).
    pub(crate) fn signal_terminates(&mut self, action: SigAction, arch: Arch, sig: u32) -> bool {
        use crate::process::{SIGCONT, SIGSTOP, SIGTSTP, SIGTTIN, SIGTTOU, SIGURG, SIGWINCH};
        if sig == SIGKILL {
            return true;
        }
        match action.handler {
            SIG_IGN => false,
            SIG_DFL => !matches!(
                sig,
                SIGCHLD | SIGCONT | SIGURG | SIGWINCH | SIGSTOP | SIGTSTP | SIGTTIN | SIGTTOU
            ),
            _ => {
                self.log_once(
                    arch,
                    1 << 32 | u64::from(sig),
                    format_args!(
                        "signal {sig} has a handler; handlers are not run, signal dropped"
                    ),
                );
                false
            }
        }
    }

    /// A fresh child of `p` sharing its open files (`fork`); the child is not yet in the table.
    pub(crate) fn fork_process(&mut self, p: &Process, pid: Pid) -> KResult<Box<Process>> {
        let mm = p.mm.as_ref().ok_or(Errno::ENOMEM)?;
        let mm: Mm = mm.duplicate(&mut self.ram, &self.cfg.kernel_pml4e)?;
        let mut child = Box::new(Process {
            pid,
            ppid: p.pid,
            pgid: p.pgid,
            sid: p.sid,
            state: State::Runnable,
            ctx: p.ctx.clone(),
            arch: p.arch,
            mm: Some(mm),
            fds: p.fds.clone(),
            cwd: p.cwd,
            umask: p.umask,
            actions: p.actions,
            sigmask: p.sigmask,
            altstack: p.altstack,
            comm: p.comm.clone(),
            exe: p.exe.clone(),
        });
        for fd in child.fds.iter().flatten() {
            if let Some(file) = self.files.get_mut(fd.file) {
                file.refs += 1;
            }
        }
        self.fs.retain(child.cwd);
        if let Some(mm) = child.mm.as_mut() {
            mm.tlb_stale = true;
        }
        child.ctx.regs[REG_RAX] = 0;
        Ok(child)
    }

    /// Adds a process to the table.
    pub(crate) fn insert_process(&mut self, p: Box<Process>) {
        self.procs.insert(p.pid, p);
    }

    /// Installs `file` at the lowest free descriptor ≥ `min` (EMFILE, dropping the file,
    /// when none is free).
    pub(crate) fn install_fd(
        &mut self,
        p: &mut Process,
        file: usize,
        min: usize,
        cloexec: bool,
    ) -> KResult<i32> {
        match p.free_fd(min) {
            Some(fd) => {
                p.set_fd(fd, Fd { file, cloexec });
                Ok(fd as i32)
            }
            None => {
                self.unref_file(file);
                Err(Errno::EMFILE)
            }
        }
    }

    /// A new open file description with one reference.
    pub(crate) fn new_file(&mut self, kind: FileKind, status: u32) -> usize {
        if let FileKind::Inode(ino) = kind {
            self.fs.retain(ino);
        }
        self.files.insert(OpenFile {
            kind,
            status,
            offset: 0,
            dir_cursor: None,
            refs: 1,
        })
    }

    /// How many open file descriptions and pipes exist (for leak checks).
    pub fn open_files(&self) -> (usize, usize) {
        (self.files.len(), self.pipes.len())
    }
}
