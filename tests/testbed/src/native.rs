//! Native mode: the client core (`kqemu_client::Linux`) is the operating
//! system, this kernel is the CPU. Processes run at ring 3 on page tables
//! the client core builds in a contiguous guest-RAM region, which the
//! core reaches through the DMAP.

use crate::channel::Channel;
use crate::cpu::Features;
use crate::initrd::{Config, GuestArch};
use crate::mem::{phys_to_virt, KernelSpace};
use crate::timer::Clock;
use crate::user::UserCpu;
use crate::{log, x86};
use alloc::boxed::Box;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::RefCell;
use core::convert::Infallible;
use core::fmt;
use kqemu_client::cpio::CpioError;
use kqemu_client::{
    Arch, Console, Errno, GuestRam, Linux, LinuxConfig, MemFs, PagingFormat, Pid, Trap, LOG_FD,
};

/// Status of a program killed for running past its time limit:
/// 128 + SIGXCPU, what a shell shows for a process over RLIMIT_CPU.
pub(crate) const STATUS_TIME_LIMIT: i32 = 128 + 24;

pub enum NativeError {
    Ram,
    Archive(CpioError),
    Spawn(Errno),
    NoStatus,
    Channel,
}

impl fmt::Display for NativeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NativeError::Ram => write!(f, "the guest RAM region is unusable"),
            NativeError::Archive(e) => write!(f, "guest archive: {e}"),
            NativeError::Spawn(e) => write!(f, "cannot start the program: errno {}", e.0),
            NativeError::NoStatus => write!(f, "no process left and no exit status"),
            NativeError::Channel => write!(f, "the host channel is stuck"),
        }
    }
}

/// The client core's console: guest output goes to the host channel.
pub(crate) struct TestbedConsole {
    pub(crate) channel: Rc<RefCell<Channel>>,
    pub(crate) tsc_khz: u64,
    pub(crate) boot_tsc: u64,
    /// Host wall-clock time at boot (from the runner), ns since the epoch.
    pub(crate) epoch_ns: u64,
    pub(crate) rdrand: bool,
    pub(crate) seed: u64,
    pub(crate) failed: Rc<RefCell<bool>>,
}

impl Console for TestbedConsole {
    fn write(&mut self, fd: i32, bytes: &[u8]) {
        if fd == LOG_FD {
            let text = core::str::from_utf8(bytes).unwrap_or("(not UTF-8)");
            log!("{}", text.trim_end());
            return;
        }
        if self
            .channel
            .borrow_mut()
            .guest_output(fd == 2, bytes)
            .is_err()
        {
            *self.failed.borrow_mut() = true;
        }
    }

    fn now_ns(&mut self) -> u64 {
        let cycles = x86::rdtsc().wrapping_sub(self.boot_tsc);
        let elapsed = (u128::from(cycles) * 1_000_000 / u128::from(self.tsc_khz)) as u64;
        self.epoch_ns.saturating_add(elapsed)
    }

    fn random(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let value = self.next_random();
            chunk.copy_from_slice(&value.to_le_bytes()[..chunk.len()]);
        }
    }
}

/// RDRAND may fail transiently (SDM vol. 1, 7.3.17.1); retry a few times.
const RDRAND_RETRIES: u32 = 10;

impl TestbedConsole {
    fn next_random(&mut self) -> u64 {
        if self.rdrand {
            for _ in 0..RDRAND_RETRIES {
                let (value, ok): (u64, u8);
                // SAFETY: CPUID reports RDRAND; it only writes its operands.
                unsafe {
                    core::arch::asm!("rdrand {}", "setc {}", out(reg) value, out(reg_byte) ok, options(nomem, nostack))
                };
                if ok != 0 {
                    return value;
                }
            }
        }
        // xorshift64* seeded from the TSC: enough for AT_RANDOM and
        // getrandom in a test kernel.
        self.seed ^= self.seed >> 12;
        self.seed ^= self.seed << 25;
        self.seed ^= self.seed >> 27;
        self.seed.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Cycles of each run of a process (entry to ring 3 or EXEC until the
/// trap), apart for runs of a process other than the one that ran last:
/// the difference of the means is the cost of a process switch (a guest
/// CR3 change) to the CPU, which `tests/testbed/bench` reads from the log.
#[derive(Default)]
pub(crate) struct RunStats {
    last_pid: Option<kqemu_client::Pid>,
    switched: (u64, u64),
    same: (u64, u64),
}

impl RunStats {
    /// A run of `pid` starts; true if another process ran last.
    pub(crate) fn begin(&mut self, pid: kqemu_client::Pid) -> bool {
        self.last_pid.replace(pid).is_some_and(|last| last != pid)
    }

    pub(crate) fn end(&mut self, switched: bool, cycles: u64) {
        let (runs, total) = if switched {
            &mut self.switched
        } else {
            &mut self.same
        };
        *runs += 1;
        *total += cycles;
    }
}

impl fmt::Display for RunStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "runs after a process switch: {} ({} cycles), runs of the same process: {} ({} cycles)",
            self.switched.0, self.switched.1, self.same.0, self.same.1
        )
    }
}

/// The guest's architecture as the client core names it.
pub(crate) fn arch_of(config: &Config) -> Arch {
    match config.arch {
        GuestArch::Amd64 => Arch::Amd64,
        GuestArch::I386 => Arch::I386,
    }
}

/// The start both runners share: the client core on `ram` and `fs`, with
/// the configured program spawned as pid 1. Its console sends the guest's
/// output through `channel` and sets the returned flag when the channel
/// cannot take it.
pub(crate) fn start_program<'a>(
    config: &Config,
    features: Features,
    clock: &Clock,
    ram: GuestRam<'a>,
    fs: MemFs,
    mut linux_config: LinuxConfig,
    channel: &Rc<RefCell<Channel>>,
) -> Result<(Linux<'a>, Pid, Rc<RefCell<bool>>), NativeError> {
    linux_config.nx = features.nx;
    linux_config.switch_every = config.switch_every;
    let failed = Rc::new(RefCell::new(false));
    let console = TestbedConsole {
        channel: channel.clone(),
        tsc_khz: clock.tsc_khz,
        boot_tsc: x86::rdtsc(),
        epoch_ns: config.epoch_ns,
        rdrand: features.rdrand,
        seed: x86::rdtsc() | 1,
        failed: failed.clone(),
    };
    let mut linux = Linux::new(ram, fs, linux_config, Box::new(console));
    let argv: Vec<&str> = config.argv.iter().map(String::as_str).collect();
    let envp: Vec<&str> = config.envp.iter().map(String::as_str).collect();
    let init = linux
        .spawn(argv[0], &argv, &envp)
        .map_err(NativeError::Spawn)?;
    Ok((linux, init, failed))
}

/// The program's RAM, the contiguous region `ram` (physical base, size)
/// with `phys_base` as the physical address its page tables give byte 0
/// (the region's own base natively, 0 for the kqemu client), and its file
/// system from the guest archive.
pub fn guest_memory(
    ram: (u64, usize),
    phys_base: u64,
    guest_archive: &[u8],
) -> Result<(GuestRam<'static>, MemFs), NativeError> {
    let (ram_phys, ram_size) = ram;
    // SAFETY: the region was reserved from the frame allocator for the
    // guest alone and is mapped by the DMAP for the kernel's lifetime.
    let bytes =
        unsafe { core::slice::from_raw_parts_mut(phys_to_virt(ram_phys) as *mut u8, ram_size) };
    let ram = GuestRam::new(bytes, phys_base).map_err(|_| NativeError::Ram)?;
    let fs = MemFs::from_cpio(guest_archive).map_err(NativeError::Archive)?;
    Ok((ram, fs))
}

pub struct Native<'c> {
    pub config: &'c Config,
    pub features: Features,
    pub clock: &'c Clock,
    pub space: &'c KernelSpace,
    /// Physical base and size of the contiguous guest-RAM region.
    pub ram: (u64, usize),
}

impl Native<'_> {
    /// Runs the configured program to the end; sends its output through
    /// `channel` as it comes, then the --out files and the result frame
    /// (status, TSC cycles from pid 1's first entry into ring 3 to its
    /// exit).
    ///
    /// The result goes out while the client core (and with it the file
    /// data the out-file frames point at) is still alive: the runner may
    /// read those bytes from guest RAM until QEMU exits, so nothing may
    /// free them before the kernel ends the run.
    pub fn run(
        &self,
        guest_archive: &[u8],
        channel: &Rc<RefCell<Channel>>,
    ) -> Result<Infallible, NativeError> {
        let (ram, fs) = guest_memory(self.ram, self.ram.0, guest_archive)?;
        let mut linux_config = LinuxConfig::new(arch_of(self.config), PagingFormat::Long4);
        linux_config.kernel_pml4e = self.space.upper_entries.to_vec();
        let (mut linux, init, failed) = start_program(
            self.config,
            self.features,
            self.clock,
            ram,
            fs,
            linux_config,
            channel,
        )?;

        let mut cpu = UserCpu::new(self.features);
        let limit = self.clock.ms_to_cycles(self.config.time_limit_ms);
        let mut start: Option<u64> = None;
        let mut end: Option<u64> = None;
        let mut timed_out = false;
        let mut traps: u64 = 0;
        let mut runs = RunStats::default();
        // Bounded by the time limit: every pass checks the TSC (counted
        // from pid 1's first entry, or from here until that happens).
        let began = x86::rdtsc();
        loop {
            let now = x86::rdtsc();
            if now - start.unwrap_or(began) > limit {
                timed_out = true;
                break;
            }
            let Some(runnable) = linux.next() else { break };
            let pid = runnable.pid;
            if pid == init && start.is_none() {
                start = Some(x86::rdtsc());
            }
            let switched = runs.begin(pid);
            let entered = x86::rdtsc();
            let trap = cpu.run(
                pid,
                runnable.arch,
                runnable.cr3,
                runnable.flush_tlb,
                runnable.ctx,
                self.clock,
            );
            if self.config.cr3_exits {
                cpu.leave_address_space();
            }
            let trapped_at = x86::rdtsc();
            runs.end(switched, trapped_at - entered);
            traps += 1;
            if trap == Trap::Timer {
                cpu.retain(&linux.pids());
            }
            linux.trap(pid, trap);
            // pid 1's end is the trap that ended the run (its exit call,
            // fault or kill), not the client core's teardown after it.
            if end.is_none() && linux.exit_status().is_some() {
                end = Some(trapped_at);
            }
            if *failed.borrow() {
                return Err(NativeError::Channel);
            }
        }
        let stop = end.unwrap_or_else(x86::rdtsc);
        let cycles = start.map_or(0, |s| stop - s);
        let status = if timed_out {
            log!(
                "testbed: time limit of {} ms reached: killed (SIGXCPU)",
                self.config.time_limit_ms
            );
            STATUS_TIME_LIMIT
        } else {
            if linux.deadlocked() {
                log!("testbed: the guest deadlocked (every process blocked)");
            }
            linux.exit_status().ok_or(NativeError::NoStatus)?
        };
        log!(
            "testbed: pid 1 status {status}, {cycles} cycles, {traps} traps, {} stray interrupts",
            cpu.stray_interrupts
        );

        log!("testbed: {runs}");
        let channel = channel.borrow();
        for path in &self.config.outs {
            let sent = match linux.fs().read_file(path) {
                Some(data) => channel.out_file(path, data),
                None => channel.out_missing(path),
            };
            sent.map_err(|_| NativeError::Channel)?;
        }
        let (free, low_water) = crate::HEAP.stats();
        log!(
            "testbed: heap free {} KiB, lowest {} KiB",
            free >> 10,
            low_water >> 10
        );
        channel
            .result(status, cycles)
            .map_err(|_| NativeError::Channel)?;
        // Ending here keeps `linux` (and the out-file bytes) alive.
        crate::exit::completed()
    }
}
