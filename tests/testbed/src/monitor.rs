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

use crate::channel::Channel;
use crate::cpu::Features;
use crate::fpu::FpuStates;
use crate::initrd::{Config, GuestArch};
use crate::mem::{phys_to_virt, DMAP_BASE};
use crate::native::{NativeError, RunStats, TestbedConsole, STATUS_TIME_LIMIT};
use crate::timer::Clock;
use crate::{log, x86};
use alloc::boxed::Box;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use core::alloc::Layout;
use core::cell::RefCell;
use core::convert::Infallible;
use core::fmt;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, Ordering};
use kqemu::abi::{
    ioc_len, seg, KqemuCpuState, KqemuInit, KqemuPhysMem, KqemuSegmentCache, Pod, KQEMU_EXEC,
    KQEMU_INIT, KQEMU_IO_MEM_RAM, KQEMU_RET_EXCEPTION, KQEMU_RET_INT, KQEMU_RET_INTR,
    KQEMU_RET_SOFTMMU, KQEMU_RET_SYSCALL, KQEMU_SET_PHYS_MEM,
};
use kqemu::device::OpenFile;
use kqemu::error::{Error, Result as KResult};
use kqemu::host::{HeldUserPage, Host};
use kqemu::monitor::segments::{cache_of_load, Descriptor, Selector};
use kqemu_client::{Arch, GuestRam, Linux, LinuxConfig, MemFs, PagingFormat, Trap, UserContext};

/// Guest selectors, as Linux x86_64 has them (__USER_CS 0x33, __USER_DS
/// 0x2b): the monitor loads them from its own GDT at these indices.
const GUEST_CS64: u16 = 0x33;
const GUEST_DS: u16 = 0x2b;
/// Descriptor attributes (high dword, SDM Vol. 3A Figure 3-8): 64-bit
/// code DPL 3 (G, L, P, S, type 0xB) and data DPL 3 (G, D/B, P, S, type 3).
const FLAGS_CODE64: u32 = 0x00af_fb00;
const FLAGS_DATA: u32 = 0x00cf_f300;
/// i386 processes run in compatibility mode, as under a 64-bit Linux:
/// Linux i386's __USER_CS 0x73 and __USER_DS 0x7b, 32-bit code DPL 3 (G,
/// D/B, P, S, type 0xB); TLS descriptors at GDT entries 6..8.
const GUEST_CS32: u16 = 0x73;
const GUEST_DS32: u16 = 0x7b;
const FLAGS_CODE32: u32 = 0x00cf_fb00;
const TLS_FIRST: u16 = 6;

/// CR0: PE, MP, ET, NE, WP, PG; CR4: PAE, OSFXSR, OSXMMEXCPT (+ OSXSAVE);
/// EFER: SCE, LME, LMA (+ NXE).
const GUEST_CR0: u64 = 0x8005_0033;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const RFLAGS_IF: u64 = 1 << 9;
const RFLAGS_FIXED: u64 = 1 << 1;
/// Linux's IDT: only these vectors may be raised by `int n` at CPL 3; any
/// other `int n` is #GP(n * 8 + 2).
const VECTOR_BREAKPOINT: u8 = 3;
const VECTOR_OVERFLOW: u8 = 4;
const VECTOR_INT80: u8 = 0x80;
const VECTOR_GP: u8 = 13;
const VECTOR_PF: u8 = 14;
/// Indices of RCX and R11 in `regs` (kqemu_cpu_state order: RAX RCX RDX
/// RBX RSP RBP RSI RDI R8..R15).
const REG_RCX: usize = 1;
const REG_R11: usize = 11;

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

fn ioctl<T: Pod>(file: &OpenFile<TestbedHost>, cmd: u32, arg: &mut T) -> KResult<()> {
    let mut bytes = [0u8; 1024];
    let len = ioc_len(cmd);
    let buf = &mut bytes[..len];
    arg.write_to(buf).ok_or(Error::InvalidArgument)?;
    let r = file.ioctl(u64::from(cmd), buf);
    if let Some(v) = T::read_from(buf) {
        *arg = v;
    }
    r
}

fn cache(selector: u16, flags: u32, base: u64) -> KqemuSegmentCache {
    KqemuSegmentCache {
        selector,
        padding1: 0,
        flags,
        base,
        limit: if flags == 0 { 0 } else { 0xffff_ffff },
        padding2: 0,
    }
}

/// The cache of an i386 data selector the process loaded: its TLS
/// descriptor, the user data segment, or null.
fn data_cache32(ctx: &UserContext, selector: u16) -> KqemuSegmentCache {
    let index = selector >> 3;
    if selector & 7 == 3 && (TLS_FIRST..TLS_FIRST + 3).contains(&index) {
        let raw = ctx.tls[usize::from(index - TLS_FIRST)].descriptor();
        if raw != 0 {
            return cache_of_load(Selector(selector), Descriptor(raw));
        }
    }
    if selector == GUEST_DS32 {
        return cache(GUEST_DS32, FLAGS_DATA, 0);
    }
    cache(0, 0, 0)
}

/// The CPU state of a process for EXEC: a long-mode guest whose amd64
/// processes run 64-bit code and whose i386 processes run in
/// compatibility mode.
fn state_of(
    ctx: &UserContext,
    arch: Arch,
    paging: PagingFormat,
    cr3: u64,
    features: &Features,
) -> KqemuCpuState {
    let compat = arch == Arch::I386;
    let mut s = KqemuCpuState {
        regs: ctx.regs,
        eip: ctx.rip,
        eflags: (ctx.rflags & !(3 << 12)) | RFLAGS_IF | RFLAGS_FIXED,
        cr0: GUEST_CR0,
        cr3,
        cr4: CR4_PAE
            | x86::CR4_OSFXSR
            | x86::CR4_OSXMMEXCPT
            | if features.xsave { x86::CR4_OSXSAVE } else { 0 }
            | if features.fsgsbase {
                x86::CR4_FSGSBASE
            } else {
                0
            },
        a20_mask: u64::MAX,
        efer: x86::EFER_SCE | EFER_LME | EFER_LMA | if features.nx { x86::EFER_NXE } else { 0 },
        cpl: 3,
        user_only: 1,
        ..KqemuCpuState::default()
    };
    if paging != PagingFormat::Long4 {
        // A 32-bit OS: protected mode without IA-32e (EFER.LME/LMA clear),
        // NX only with PAE (SDM Vol. 3A 4.1.1).
        s.efer = if paging == PagingFormat::Pae && features.nx {
            x86::EFER_NXE
        } else {
            0
        };
        s.cr4 &= !(CR4_PAE | x86::CR4_FSGSBASE);
        if paging == PagingFormat::Pae {
            s.cr4 |= CR4_PAE;
        }
    }
    if compat {
        s.eip &= 0xffff_ffff;
        s.regs[4] &= 0xffff_ffff;
        s.segs[seg::CS] = cache(GUEST_CS32, FLAGS_CODE32, 0);
        s.segs[seg::SS] = cache(GUEST_DS32, FLAGS_DATA, 0);
        s.segs[seg::DS] = cache(GUEST_DS32, FLAGS_DATA, 0);
        s.segs[seg::ES] = cache(GUEST_DS32, FLAGS_DATA, 0);
        s.segs[seg::FS] = data_cache32(ctx, ctx.fs_sel);
        s.segs[seg::GS] = data_cache32(ctx, ctx.gs_sel);
    } else {
        s.segs[seg::CS] = cache(GUEST_CS64, FLAGS_CODE64, 0);
        s.segs[seg::SS] = cache(GUEST_DS, FLAGS_DATA, 0);
        s.segs[seg::DS] = cache(0, 0, 0);
        s.segs[seg::ES] = cache(0, 0, 0);
        s.segs[seg::FS] = cache(0, 0, ctx.fs_base);
        s.segs[seg::GS] = cache(0, 0, ctx.gs_base);
    }
    s.gdt.limit = 0x7f;
    s
}

/// Emulates `mov r16/r32, %fs` or `%gs` (8E /r, register form, SDM Vol.
/// 2B MOV): the monitor has only the entry registers' descriptors, so a
/// process's first load of its TLS selector comes back as SOFTMMU.
/// Returns the instruction's length.
fn emulate_segment_load(code: &[u8], ctx: &mut UserContext) -> Option<u64> {
    let prefix = usize::from(code.first() == Some(&0x66));
    let [0x8e, modrm] = *code.get(prefix..prefix + 2)? else {
        return None;
    };
    if modrm >> 6 != 3 {
        return None;
    }
    let selector = ctx.regs[usize::from(modrm & 7)] as u16;
    let index = selector >> 3;
    let valid = selector == 0
        || selector == GUEST_DS32
        || (selector & 7 == 3
            && (TLS_FIRST..TLS_FIRST + 3).contains(&index)
            && ctx.tls[usize::from(index - TLS_FIRST)].descriptor() != 0);
    if !valid {
        return None;
    }
    match (modrm >> 3) & 7 {
        4 => ctx.fs_sel = selector,
        5 => ctx.gs_sel = selector,
        _ => return None,
    }
    Some(prefix as u64 + 2)
}

/// Whether `code` starts with an instruction that raises #GP(0) at CPL 3
/// with IOPL 0 (SDM Vol. 2: HLT, CLI, STI, IN, OUT, INS, OUTS, MOV to or
/// from control and debug registers, CLTS, INVD, WBINVD, WRMSR, RDMSR,
/// LGDT/LIDT/LMSW/INVLPG), after legacy and REX prefixes; and a direct
/// far JMP or CALL (EA, 9A), which the monitor hands over because the
/// target selector is not one of the process's (this client's GDT has no
/// other code segment it could reach: #GP(selector)).
fn raises_gp(code: &[u8]) -> bool {
    let start = code
        .iter()
        .position(|&b| !matches!(b, 0x66 | 0x67 | 0xf2 | 0xf3 | 0x40..=0x4f))
        .unwrap_or(code.len());
    match &code[start..] {
        [0xf4 | 0xfa | 0xfb | 0xe4..=0xe7 | 0xec..=0xef | 0x6c..=0x6f, ..] => true,
        [0xea | 0x9a, ..] => true,
        [0x0f, 0x20..=0x23 | 0x06 | 0x08 | 0x09 | 0x30 | 0x32, ..] => true,
        [0x0f, 0x01, modrm, ..] => matches!((modrm >> 3) & 7, 2 | 3 | 6 | 7),
        _ => false,
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
        // SAFETY: the region was reserved for the guest alone and is mapped
        // by the DMAP for the kernel's lifetime.
        let bytes =
            unsafe { core::slice::from_raw_parts_mut(phys_to_virt(ram_phys) as *mut u8, ram_size) };
        let ram = GuestRam::new(bytes, 0).map_err(|_| NativeError::Ram)?;
        let fs = MemFs::from_cpio(guest_archive).map_err(NativeError::Archive)?;
        let arch = match self.config.arch {
            GuestArch::Amd64 => Arch::Amd64,
            GuestArch::I386 => Arch::I386,
        };
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
        let mut linux_config = LinuxConfig::new(arch, paging);
        linux_config.nx = self.features.nx;
        linux_config.switch_every = self.config.switch_every;
        let failed = Rc::new(RefCell::new(false));
        let console = TestbedConsole {
            channel: channel.clone(),
            tsc_khz: self.clock.tsc_khz,
            boot_tsc: x86::rdtsc(),
            epoch_ns: self.config.epoch_ns,
            rdrand: self.features.rdrand,
            seed: x86::rdtsc() | 1,
            failed: failed.clone(),
        };
        let mut linux = Linux::new(ram, fs, linux_config, Box::new(console));
        let argv: Vec<&str> = self.config.argv.iter().map(String::as_str).collect();
        let envp: Vec<&str> = self.config.envp.iter().map(String::as_str).collect();
        let init = linux
            .spawn(argv[0], &argv, &envp)
            .map_err(NativeError::Spawn)?;

        // The client's side of INIT: dirty bytes (all dirty: this client
        // translates no code) and the three list pages.
        let pages = ram_size / 4096;
        let dirty = client_buffer(pages).ok_or(NativeError::Ram)?;
        dirty.fill(0xff);
        let lists = [
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

        let mut fpu = FpuStates::new(self.features.xsave, self.features.fpu_area_size);
        let limit = self.clock.ms_to_cycles(self.config.time_limit_ms);
        let mut start: Option<u64> = None;
        let mut end: Option<u64> = None;
        let mut timed_out = false;
        let mut execs: u64 = 0;
        let mut runs = RunStats::default();
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
            if runnable.flush_tlb {
                // The OS rewrote page tables behind the monitor's back: mark
                // every page written, as a client's slow path would, so the
                // monitor revalidates what it derived from them.
                dirty.fill(0xff);
            }
            let compat = runnable.arch == Arch::I386;
            let mut state = state_of(
                runnable.ctx,
                runnable.arch,
                paging,
                runnable.cr3,
                &self.features,
            );
            if runnable.flush_tlb {
                state.nb_pages_to_flush = kqemu::abi::KQEMU_FLUSH_ALL;
            }
            fpu.switch_to(pid);
            let entered = x86::rdtsc();
            if let Err(e) = ioctl(&file, KQEMU_EXEC, &mut state) {
                crate::fail(format_args!("KQEMU_EXEC: {e:?}"));
            }
            execs += 1;
            let trapped_at = x86::rdtsc();
            runs.end(switched, trapped_at - entered);
            let ctx = runnable.ctx;
            ctx.regs = state.regs;
            ctx.rip = state.eip;
            ctx.rflags = state.eflags;
            if compat {
                ctx.fs_sel = state.segs[seg::FS].selector;
                ctx.gs_sel = state.segs[seg::GS].selector;
            } else {
                ctx.fs_base = state.segs[seg::FS].base;
                ctx.gs_base = state.segs[seg::GS].base;
            }
            let retval = state.retval;
            let trap = match retval {
                KQEMU_RET_SYSCALL => {
                    // The monitor stops before the instruction's own effects
                    // (kqemu hands SYSCALL to QEMU's helper_syscall): in
                    // 64-bit mode the CPU saves the return address in RCX
                    // and RFLAGS in R11 (SDM Vol. 2B SYSCALL), which Linux's
                    // sysret path relies on and programs may check.
                    ctx.rip = state.next_eip;
                    if !compat {
                        ctx.regs[REG_RCX] = state.next_eip;
                        ctx.regs[REG_R11] = state.eflags;
                    }
                    Trap::Syscall
                }
                KQEMU_RET_INTR => Trap::Timer,
                r if r & !0xff == KQEMU_RET_INT => {
                    ctx.rip = state.next_eip;
                    let n = (r & 0xff) as u8;
                    match n {
                        VECTOR_INT80 => Trap::Int80,
                        VECTOR_BREAKPOINT | VECTOR_OVERFLOW => Trap::Exception {
                            vector: n,
                            error_code: 0,
                            cr2: 0,
                        },
                        _ => {
                            // Linux's gate has DPL 0: #GP at the int.
                            ctx.rip = state.eip;
                            Trap::Exception {
                                vector: VECTOR_GP,
                                error_code: u32::from(n) << 3 | 2,
                                cr2: 0,
                            }
                        }
                    }
                }
                r if (KQEMU_RET_EXCEPTION..KQEMU_RET_EXCEPTION + 0x100).contains(&r) => {
                    let vector = (r & 0xff) as u8;
                    Trap::Exception {
                        vector,
                        error_code: state.error_code,
                        cr2: if vector == VECTOR_PF { state.cr2 } else { 0 },
                    }
                }
                KQEMU_RET_SOFTMMU => {
                    // This client has no emulator: it only knows that a
                    // privileged instruction at CPL 3 raises #GP(0).
                    let mut code = [0u8; 6];
                    let readable = linux.read_user(pid, state.eip, &mut code).is_ok();
                    let emulated = readable
                        && compat
                        && linux.context(pid).is_some_and(|c| {
                            emulate_segment_load(&code, c)
                                .map(|len| {
                                    c.rip = (c.rip + len) & 0xffff_ffff;
                                })
                                .is_some()
                        });
                    if emulated {
                        // A preemption point for the OS, as after a tick.
                        linux.trap(pid, Trap::Timer);
                        continue;
                    }
                    if !(readable && raises_gp(&code)) {
                        crate::fail(format_args!(
                            "the monitor asks for emulation (SOFTMMU) at rip {:#x} ({code:02x?}), which this client cannot do",
                            state.eip
                        ));
                    }
                    Trap::Exception {
                        vector: VECTOR_GP,
                        error_code: 0,
                        cr2: 0,
                    }
                }
                other => crate::fail(format_args!(
                    "KQEMU_EXEC retval {other:#x} at rip {:#x}",
                    state.eip
                )),
            };
            if trap == Trap::Timer {
                let alive = linux.pids();
                fpu.retain(|p| alive.contains(p));
            }
            linux.trap(pid, trap);
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
            linux.exit_status().ok_or(NativeError::NoStatus)?
        };
        log!("testbed: monitor: pid 1 status {status}, {cycles} cycles, {execs} EXECs");
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
