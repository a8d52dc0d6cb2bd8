//! Monitor mode (TESTBED.md rung 2): this kernel is the kqemu client. The
//! client core is the guest's operating system as in native mode, but the
//! guest's code runs through the monitor of the `kqemu` crate, entered the
//! way the kld enters it (`OpenFile::ioctl` with KQEMU_INIT, SET_PHYS_MEM
//! and EXEC), with a [`Host`] made of this kernel's services.
//!
//! Guest-physical addresses are offsets into the guest-RAM region (the
//! client core builds the page tables with `phys_base` 0), and the
//! "user addresses" the client passes to INIT are physical addresses:
//! this host holds a "user page" by handing out its direct-map address.
//!
//! The state of a process for EXEC, the exit handling and the SOFTMMU
//! emulator are the client core's (`kqemu_client::kqemu`), shared with the
//! FreeBSD client `kqemu-run --linux`; this file is the EXEC itself.

use crate::channel::Channel;
use crate::cpu::Features;
use crate::fpu::FpuStates;
use crate::initrd::Config;
use crate::mem::{phys_to_virt, DMAP_BASE};
use crate::native::{
    arch_of, guest_memory, start_program, NativeError, RunStats, STATUS_TIME_LIMIT,
};
use crate::timer::Clock;
use crate::{log, x86};
use alloc::rc::Rc;
use alloc::vec::Vec;
use core::alloc::Layout;
use core::cell::RefCell;
use core::convert::Infallible;
use core::fmt;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, Ordering};
use kqemu::abi::{
    ioc_len, KqemuCpuState, KqemuInit, KqemuPhysMem, Pod, KQEMU_EXEC, KQEMU_INIT, KQEMU_IO_MEM_RAM,
    KQEMU_RET_EXCEPTION, KQEMU_RET_INTR, KQEMU_RET_SOFTMMU, KQEMU_SET_PHYS_MEM,
};
use kqemu::device::OpenFile;
use kqemu::error::{Error, Result as KResult};
use kqemu::host::{HeldUserPage, Host};
use kqemu_client::kqemu::{CpuFeatures, ExecCpu, Step, StepError};
use kqemu_client::{Arch, LinuxConfig, PagingFormat, Pid, Trap};

/// Set by the timer interrupt the monitor hands back to this kernel.
static TICK: AtomicBool = AtomicBool::new(false);
/// LAPIC EOI register (xAPIC MMIO, offset 0xB0, SDM Vol. 3A 11.8.5).
const LAPIC_EOI: u64 = 0xb0;
const APIC_BASE_MASK: u64 = 0xf_ffff_f000;

/// A host interrupt taken while guest code ran, re-raised by the monitor
/// through this kernel's IDT (trap.rs sends it here from ring 0).
pub fn host_interrupt(vector: u64) {
    if vector != crate::trap::VECTOR_SPURIOUS {
        let lapic = phys_to_virt(x86::rdmsr(x86::MSR_APIC_BASE) & APIC_BASE_MASK);
        // SAFETY: the LAPIC page is mapped (uncached) by the DMAP; writing
        // EOI acknowledges the interrupt being handled.
        unsafe { core::ptr::write_volatile((lapic + LAPIC_EOI) as *mut u32, 0) };
    }
    TICK.store(true, Ordering::Relaxed);
    crate::freebsd::timer_tick();
}

/// The guest environment entry that asks for the host-breakpoint check
/// (suite job `monitor  host-dr7`): EXECs run with a host execution
/// breakpoint armed on the guest's first instruction until one ends with
/// something else than `KQEMU_RET_INTR` (a timer tick may end the first
/// ones before the guest ran an instruction). The world
/// switch must keep host breakpoints out of guest mode (there a hit would
/// reach the guest as its own #DB) and give the host its DR7 back.
const HOST_DR7_CHECK: &str = "KQEMU_TESTBED_HOST_DR7=1";
/// DR7 with breakpoint 0 enabled (L0) as an instruction breakpoint (R/W0
/// and LEN0 = 0), and with every breakpoint disabled; bit 10 reads as 1
/// (SDM Vol. 3B 18.2.4).
const DR7_L0_EXECUTE: u64 = 1 << 0 | 1 << 10;
const DR7_DISABLED: u64 = 1 << 10;
/// #DB.
const VECTOR_DEBUG: i32 = 1;
/// EFLAGS.TF (SDM Vol. 1 3.4.3) and DR6.BS (SDM Vol. 3B 18.2.3).
const EFLAGS_TF: u64 = 1 << 8;
const DR6_BS: u64 = 1 << 14;

/// Loads DR0 and DR7.
///
/// # Safety
///
/// `dr7` arms breakpoints only on addresses this kernel never executes
/// or accesses.
unsafe fn set_breakpoint(dr0: u64, dr7: u64) {
    // SAFETY: the caller's contract; writing debug registers at CPL 0.
    unsafe {
        core::arch::asm!("mov dr0, {}", "mov dr7, {}", in(reg) dr0, in(reg) dr7, options(nostack))
    };
}

/// DR6, which the world switch must give back as it was before every
/// EXEC: a guest's single step (TF) or ICEBP sets its status bits, which
/// the processor never clears (SDM Vol. 3B 18.2.3), and the host's next
/// #DB would misread them. Checked on every EXEC of every monitor run
/// (the `exceptions` guest's db-tf and db-icebp cases make such exits).
fn read_dr6() -> u64 {
    let v: u64;
    // SAFETY: reading DR6 at CPL 0 has no side effect.
    unsafe { core::arch::asm!("mov {}, dr6", out(reg) v, options(nomem, nostack)) };
    v
}

fn read_dr7() -> u64 {
    let v: u64;
    // SAFETY: reading DR7 at CPL 0 has no side effect.
    unsafe { core::arch::asm!("mov {}, dr7", out(reg) v, options(nomem, nostack)) };
    v
}

/// This kernel as the monitor's host.
#[derive(Clone, Default)]
pub struct TestbedHost;

fn kernel_virt_to_phys(virt: u64) -> Option<u64> {
    if virt >= crate::boot::KERNBASE {
        Some(virt - crate::boot::KERNBASE)
    } else if (DMAP_BASE..DMAP_BASE + (512 << 30)).contains(&virt) {
        Some(virt - DMAP_BASE)
    } else {
        None
    }
}

impl Host for TestbedHost {
    fn log(&self, args: fmt::Arguments<'_>) {
        log!("kqemu: {args}");
    }

    fn alloc_zeroed(&self, layout: Layout) -> KResult<NonNull<u8>> {
        // SAFETY: the monitor never asks for zero-sized blocks.
        NonNull::new(unsafe { alloc::alloc::alloc_zeroed(layout) }).ok_or(Error::NoMemory)
    }

    unsafe fn free(&self, ptr: NonNull<u8>, layout: Layout) {
        // SAFETY: the caller's contract: from alloc_zeroed with `layout`.
        unsafe { alloc::alloc::dealloc(ptr.as_ptr(), layout) };
    }

    fn check_user_range(&self, addr: u64, len: u64) -> KResult<()> {
        addr.checked_add(len).map(|_| ()).ok_or(Error::Fault)
    }

    fn hold_user_page(&self, user_addr: u64) -> KResult<HeldUserPage> {
        let kernel =
            NonNull::new(phys_to_virt(user_addr) as *mut u8).ok_or(Error::InvalidArgument)?;
        Ok(HeldUserPage {
            user_addr,
            phys: user_addr,
            kernel,
            cookie: 0,
        })
    }

    unsafe fn release_user_page(&self, _page: &HeldUserPage) {}

    fn virt_to_phys(&self, virt: u64) -> Option<u64> {
        kernel_virt_to_phys(virt)
    }

    fn cpu_enter(&self) -> Option<usize> {
        // One CPU, and this kernel never preempts itself.
        Some(0)
    }

    fn cpu_leave(&self) {}

    fn should_yield(&self) -> bool {
        TICK.swap(false, Ordering::Relaxed)
    }
}

/// A page-aligned zeroed block from the heap, as a client buffer.
fn client_buffer(len: usize) -> Option<&'static mut [u8]> {
    let layout = Layout::from_size_align(len.max(4096), 4096).ok()?;
    // SAFETY: non-zero size; the block lives as long as the run (leaked:
    // the run ends the kernel).
    let ptr = unsafe { alloc::alloc::alloc_zeroed(layout) };
    // SAFETY: a fresh block of `len` bytes.
    (!ptr.is_null()).then(|| unsafe { core::slice::from_raw_parts_mut(ptr, len) })
}

/// The client address (= physical address) of a heap block.
fn client_addr(block: &[u8]) -> u64 {
    kernel_virt_to_phys(block.as_ptr() as u64).unwrap_or(0)
}

/// The ioctl on `arg`'s own bytes (the module decodes and encodes the
/// argument itself, as from the kernel's copy), with no buffer to clear and
/// copy on every EXEC.
pub(crate) fn ioctl<T: Pod>(file: &OpenFile<TestbedHost>, cmd: u32, arg: &mut T) -> KResult<()> {
    if ioc_len(cmd) != core::mem::size_of::<T>() {
        return Err(Error::InvalidArgument);
    }
    // SAFETY: a Pod has no padding bytes and accepts every bit pattern
    // (abi.rs); the slice covers exactly `arg`, borrowed mutably here.
    let buf = unsafe {
        core::slice::from_raw_parts_mut((arg as *mut T).cast::<u8>(), core::mem::size_of::<T>())
    };
    file.ioctl(u64::from(cmd), buf)
}

/// One EXEC through the monitor, with the process's FPU state live and the
/// run's statistics.
struct TestbedCpu<'f> {
    file: &'f OpenFile<TestbedHost>,
    dirty: &'static mut [u8],
    fpu: FpuStates<Pid>,
    runs: RunStats,
    /// pid 1: its first entry starts the cycle count.
    init: Pid,
    start: Option<u64>,
    trapped_at: u64,
    execs: u64,
    /// EXECs that answered KQEMU_RET_SOFTMMU (the suite checks programs
    /// that must run without any).
    softmmu: u64,
    /// [`HOST_DR7_CHECK`]: the check is still to be made, at this address
    /// (the first EXEC's RIP).
    host_breakpoint: bool,
    breakpoint_at: Option<u64>,
    /// `--exec-fuzz`: the states the fuzzer starts from (fuzz.rs).
    samples: Option<Vec<KqemuCpuState>>,
}

impl ExecCpu for TestbedCpu<'_> {
    type Error = Error;

    fn all_pages_dirty(&mut self) {
        self.dirty.fill(0xff);
    }

    fn exec(&mut self, pid: Pid, state: &mut KqemuCpuState) -> KResult<()> {
        if pid == self.init && self.start.is_none() {
            self.start = Some(x86::rdtsc());
        }
        let switched = self.runs.begin(pid);
        self.fpu.switch_to(pid);
        let armed = self.host_breakpoint;
        if armed {
            let at = *self.breakpoint_at.get_or_insert(state.eip);
            // SAFETY: the guest's first instruction, a user address this
            // kernel never executes (the guests' CS base is 0).
            unsafe { set_breakpoint(at, DR7_L0_EXECUTE) };
        }
        if let Some(samples) = &mut self.samples {
            crate::fuzz::keep_sample(samples, self.execs, state);
        }
        let dr6 = read_dr6();
        let entered = x86::rdtsc();
        let done = ioctl(self.file, KQEMU_EXEC, state);
        let dr6_after = read_dr6();
        if dr6_after != dr6 {
            crate::fail(format_args!(
                "host DR6 {dr6_after:#x} after EXEC (retval {:#x}), was {dr6:#x}: not restored",
                state.retval
            ));
        }
        // A single step (TF still set in the frame of the #DB) leaves BS in
        // the guest's DR6, as the processor sets it (SDM Vol. 3B 18.2.3).
        if done.is_ok()
            && state.retval == KQEMU_RET_EXCEPTION | VECTOR_DEBUG
            && state.eflags & EFLAGS_TF != 0
            && state.dr6 & DR6_BS == 0
        {
            crate::fail(format_args!(
                "guest single step at {:#x}: guest DR6 {:#x} without BS",
                state.eip, state.dr6
            ));
        }
        if armed {
            let dr7 = read_dr7();
            // SAFETY: disarms every breakpoint.
            unsafe { set_breakpoint(0, DR7_DISABLED) };
            if dr7 != DR7_L0_EXECUTE {
                crate::fail(format_args!(
                    "host DR7 {dr7:#x} after EXEC, was {DR7_L0_EXECUTE:#x}: not restored"
                ));
            }
            if done.is_ok() && state.retval == KQEMU_RET_EXCEPTION | VECTOR_DEBUG {
                crate::fail(format_args!(
                    "a host breakpoint fired in guest mode at {:#x} (EXEC returned #DB)",
                    state.eip
                ));
            }
            if done.is_ok() && state.retval != KQEMU_RET_INTR {
                self.host_breakpoint = false;
                log!(
                    "testbed: host breakpoint on the guest's first instruction: no #DB in guest mode, DR7 restored ({} EXECs)",
                    self.execs + 1
                );
            }
        }
        done?;
        self.execs += 1;
        if state.retval == KQEMU_RET_SOFTMMU {
            self.softmmu += 1;
        }
        self.trapped_at = x86::rdtsc();
        self.runs.end(switched, self.trapped_at - entered);
        Ok(())
    }
}

pub struct MonitorRun<'c> {
    pub config: &'c Config,
    pub features: Features,
    pub clock: &'c Clock,
    /// Physical base and size of the contiguous guest-RAM region.
    pub ram: (u64, usize),
}

impl MonitorRun<'_> {
    /// As `Native::run`, with the monitor as the CPU.
    pub fn run(
        &self,
        guest_archive: &[u8],
        channel: &Rc<RefCell<Channel>>,
    ) -> Result<Infallible, NativeError> {
        let (ram_phys, ram_size) = self.ram;
        // Guest-physical addresses are offsets into guest RAM (phys_base 0).
        let (ram, fs) = guest_memory(self.ram, 0, guest_archive)?;
        let arch = arch_of(self.config);
        // The guest OS: a 64-bit one for amd64 programs; for i386 ones a
        // 32-bit OS (2-level or PAE paging) or a 64-bit one running them in
        // compatibility mode.
        let paging = self.config.guest_paging.unwrap_or(match arch {
            Arch::Amd64 => PagingFormat::Long4,
            Arch::I386 => PagingFormat::Legacy32,
        });
        if arch == Arch::Amd64 && paging != PagingFormat::Long4 {
            crate::fail(format_args!("amd64 programs need --guest-paging long4"));
        }
        let (mut linux, init, failed) = start_program(
            self.config,
            self.features,
            self.clock,
            ram,
            fs,
            LinuxConfig::new(arch, paging),
            channel,
        )?;

        // The client's side of INIT: dirty bytes (all dirty: this client
        // translates no code) and the three list pages.
        let pages = ram_size / 4096;
        let dirty = client_buffer(pages).ok_or(NativeError::Ram)?;
        dirty.fill(0xff);
        let mut lists = [
            client_buffer(4096).ok_or(NativeError::Ram)?,
            client_buffer(4096).ok_or(NativeError::Ram)?,
            client_buffer(4096).ok_or(NativeError::Ram)?,
        ];
        let file = OpenFile::new(TestbedHost);
        let mut init_arg = KqemuInit {
            ram_base: ram_phys,
            ram_size: ram_size as u64,
            ram_dirty: client_addr(dirty),
            pages_to_flush: client_addr(lists[0]),
            ram_pages_to_update: client_addr(lists[1]),
            modified_ram_pages: client_addr(lists[2]),
        };
        if let Err(e) = ioctl(&file, KQEMU_INIT, &mut init_arg) {
            crate::fail(format_args!("KQEMU_INIT: {e:?}"));
        }
        let mut phys = KqemuPhysMem {
            phys_addr: 0,
            size: ram_size as u64,
            ram_addr: 0,
            io_index: KQEMU_IO_MEM_RAM,
            padding1: 0,
        };
        if let Err(e) = ioctl(&file, KQEMU_SET_PHYS_MEM, &mut phys) {
            crate::fail(format_args!("KQEMU_SET_PHYS_MEM: {e:?}"));
        }

        let mut cpu = TestbedCpu {
            file: &file,
            dirty,
            fpu: FpuStates::new(self.features.xsave, self.features.fpu_area_size),
            runs: RunStats::default(),
            init,
            start: None,
            trapped_at: 0,
            execs: 0,
            softmmu: 0,
            host_breakpoint: self.config.envp.iter().any(|e| e == HOST_DR7_CHECK),
            breakpoint_at: None,
            samples: self.config.exec_fuzz.as_ref().map(|_| Vec::new()),
        };
        let features = CpuFeatures {
            nx: self.features.nx,
            xsave: self.features.xsave,
            fsgsbase: self.features.fsgsbase,
        };
        let limit = self.clock.ms_to_cycles(self.config.time_limit_ms);
        let mut end: Option<u64> = None;
        let mut timed_out = false;
        let began = x86::rdtsc();
        loop {
            if x86::rdtsc() - cpu.start.unwrap_or(began) > limit {
                timed_out = true;
                break;
            }
            let trap = match kqemu_client::kqemu::step(&mut linux, &mut cpu, paging, &features) {
                Ok(Step::Idle) => break,
                Ok(Step::Ran { trap, .. }) => trap,
                Err(StepError::Exec(e)) => crate::fail(format_args!("KQEMU_EXEC: {e:?}")),
                Err(StepError::Softmmu { rip, code }) => crate::fail(format_args!(
                    "the monitor asks for emulation (SOFTMMU) at rip {rip:#x} ({code:02x?}), which this client cannot do"
                )),
                Err(StepError::Retval { retval, rip }) => crate::fail(format_args!(
                    "KQEMU_EXEC retval {retval:#x} at rip {rip:#x}"
                )),
            };
            if trap == Trap::Timer {
                let alive = linux.pids();
                cpu.fpu.retain(|p| alive.contains(p));
            }
            if end.is_none() && linux.exit_status().is_some() {
                end = Some(cpu.trapped_at);
            }
            if *failed.borrow() {
                return Err(NativeError::Channel);
            }
            if let (Some(plan), Some(samples)) = (&self.config.exec_fuzz, &cpu.samples) {
                if samples.len() == crate::fuzz::SAMPLES || linux.exit_status().is_some() {
                    let ram = self.ram;
                    return crate::fuzz::run(
                        plan, &file, ram, paging, samples, &mut lists, channel,
                    );
                }
            }
        }
        let (start, execs, runs, softmmu) = (cpu.start, cpu.execs, cpu.runs, cpu.softmmu);
        let stop = end.unwrap_or_else(x86::rdtsc);
        let cycles = start.map_or(0, |s| stop - s);
        let status = if timed_out {
            log!(
                "testbed: time limit of {} ms reached: killed (SIGXCPU)",
                self.config.time_limit_ms
            );
            STATUS_TIME_LIMIT
        } else {
            linux.exit_status().ok_or(NativeError::NoStatus)?
        };
        log!("testbed: monitor: pid 1 status {status}, {cycles} cycles, {execs} EXECs");
        log!("testbed: monitor: {softmmu} SOFTMMU exits");
        log!("testbed: {runs}");
        let channel = channel.borrow();
        for path in &self.config.outs {
            let sent = match linux.fs().read_file(path) {
                Some(data) => channel.out_file(path, data),
                None => channel.out_missing(path),
            };
            sent.map_err(|_| NativeError::Channel)?;
        }
        channel
            .result(status, cycles)
            .map_err(|_| NativeError::Channel)?;
        crate::exit::completed()
    }
}
