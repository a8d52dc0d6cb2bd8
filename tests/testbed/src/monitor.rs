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
    crate::freebsd::timer_tick();
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
fn ioctl<T: Pod>(file: &OpenFile<TestbedHost>, cmd: u32, arg: &mut T) -> KResult<()> {
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

/// Limit of the guest OS's GDT as `state_of` describes it (16 entries).
const GUEST_GDT_LIMIT: u16 = 0x7f;
/// Exception vectors of a failed segment load (SDM Vol. 3A 6.15).
const VECTOR_UD: u8 = 6;
const VECTOR_NP: u8 = 11;
const VECTOR_SS: u8 = 12;
/// Segment descriptor bits (SDM Vol. 3A 3.4.5): P, S, and in the type
/// field code, conforming (code) and readable (code) / writable (data).
const DESC_P: u64 = 1 << 47;
const DESC_S: u64 = 1 << 44;
const DESC_CODE: u64 = 1 << 43;
const DESC_CONFORMING: u64 = 1 << 42;
const DESC_RW: u64 = 1 << 41;
const DESC_DPL_SHIFT: u32 = 45;
/// ModRM reg field of `mov Sreg, r/m16` (8E /r): ES CS SS DS FS GS.
const SREG_CS: u8 = 1;
const SREG_SS: u8 = 2;
const SREG_FS: u8 = 4;
const SREG_GS: u8 = 5;

/// A descriptor as the GDT holds it, from the attribute dword of `cache`
/// (base 0, limit 0xfffff).
fn flat_descriptor(flags: u32) -> u64 {
    (u64::from(flags) << 32) | 0xffff
}

/// Entry `index` of the guest OS's GDT (0: empty): the code and data
/// segments `state_of` gives the process and, for i386 processes, their
/// TLS entries. These are the only descriptors the monitor has.
fn guest_descriptor(ctx: &UserContext, compat: bool, index: u16) -> u64 {
    match (compat, index) {
        (true, i) if i == GUEST_CS32 >> 3 => flat_descriptor(FLAGS_CODE32),
        (true, i) if i == GUEST_DS32 >> 3 => flat_descriptor(FLAGS_DATA),
        (true, i) if (TLS_FIRST..TLS_FIRST + 3).contains(&i) => {
            ctx.tls[usize::from(i - TLS_FIRST)].descriptor()
        }
        (false, i) if i == GUEST_CS64 >> 3 => flat_descriptor(FLAGS_CODE64),
        (false, i) if i == GUEST_DS >> 3 => flat_descriptor(FLAGS_DATA),
        _ => 0,
    }
}

/// What the client's emulation of one instruction came to.
enum Emulated {
    /// The instruction completed; it was this long.
    Done(u64),
    /// It raised this exception (the guest OS turns it into a signal).
    Fault(Trap),
}

fn fault(vector: u8, error_code: u16) -> Emulated {
    Emulated::Fault(Trap::Exception {
        vector,
        error_code: u32::from(error_code),
        cr2: 0,
    })
}

/// Emulates `mov Sreg, r16/r32` (8E /r, register form) and `pop Sreg`
/// (1F, 07, 17 outside 64-bit mode; 0F A1, 0F A9) at CPL 3 against the
/// guest OS's GDT, with the checks of SDM Vol. 2B MOV ("Loading a segment
/// register in protected mode") and POP: the monitor has the process's
/// entry descriptors only, so a load it cannot do (a TLS selector, a bad
/// selector) comes back as SOFTMMU. A load that succeeds is carried out
/// only where the process's state has a place for it (FS and GS of i386
/// processes); `None`: this client cannot emulate the instruction.
/// `stack_top` is the word at the stack pointer, for `pop`.
fn emulate_segment_load(
    code: &[u8],
    ctx: &mut UserContext,
    compat: bool,
    stack_top: Option<u16>,
) -> Option<Emulated> {
    let prefixes = code
        .iter()
        .take_while(|&&b| b == 0x66 || (!compat && (0x40..=0x4f).contains(&b)))
        .count();
    let operand16 = code[..prefixes].contains(&0x66);
    let rex_b = code[..prefixes]
        .iter()
        .any(|&b| (0x40..=0x4f).contains(&b) && b & 1 != 0);
    // What a `pop` adds to the stack pointer: the operand size.
    let popped = if operand16 {
        2
    } else if compat {
        4
    } else {
        8
    };
    // (segment register, selector, bytes popped, instruction length)
    let (sreg, selector, pop, len) = match *code.get(prefixes..)? {
        [0x8e, modrm, ..] if modrm >> 6 == 3 => {
            let reg = usize::from(modrm & 7) + if rex_b { 8 } else { 0 };
            ((modrm >> 3) & 7, ctx.regs[reg] as u16, 0, 2)
        }
        [0x1f, ..] if compat => (3, stack_top?, popped, 1),
        [0x07, ..] if compat => (0, stack_top?, popped, 1),
        [0x17, ..] if compat => (SREG_SS, stack_top?, popped, 1),
        [0x0f, 0xa1, ..] => (SREG_FS, stack_top?, popped, 2),
        [0x0f, 0xa9, ..] => (SREG_GS, stack_top?, popped, 2),
        _ => return None,
    };
    if sreg == SREG_CS || sreg > SREG_GS {
        return Some(fault(VECTOR_UD, 0));
    }
    let error = selector & !3;
    let rpl = selector & 3;
    if selector & !3 == 0 {
        // A null selector: #GP(0) for SS at CPL 3, else it loads.
        if sreg == SREG_SS {
            return Some(fault(VECTOR_GP, 0));
        }
    } else {
        // TI = 1: this guest OS sets no LDT.
        if selector & 4 != 0 || (selector & !7) + 7 > GUEST_GDT_LIMIT {
            return Some(fault(VECTOR_GP, error));
        }
        let desc = guest_descriptor(ctx, compat, selector >> 3);
        let dpl = ((desc >> DESC_DPL_SHIFT) & 3) as u16;
        let code_seg = desc & DESC_CODE != 0;
        if sreg == SREG_SS {
            if rpl != 3 || dpl != 3 || desc & DESC_S == 0 || code_seg || desc & DESC_RW == 0 {
                return Some(fault(VECTOR_GP, error));
            }
            if desc & DESC_P == 0 {
                return Some(fault(VECTOR_SS, error));
            }
        } else {
            let conforming = code_seg && desc & DESC_CONFORMING != 0;
            if desc & DESC_S == 0
                || (code_seg && desc & DESC_RW == 0)
                || (!conforming && (rpl > dpl || 3 > dpl))
            {
                return Some(fault(VECTOR_GP, error));
            }
            if desc & DESC_P == 0 {
                return Some(fault(VECTOR_NP, error));
            }
        }
    }
    match sreg {
        SREG_FS if compat => ctx.fs_sel = selector,
        SREG_GS if compat => ctx.gs_sel = selector,
        _ => return None,
    }
    ctx.regs[4] = (ctx.regs[4] + pop) & 0xffff_ffff;
    Some(Emulated::Done(prefixes as u64 + len))
}

/// Whether a 64-bit address is canonical (48-bit linear addresses, SDM
/// Vol. 1 3.3.7.1).
fn canonical(addr: u64) -> bool {
    ((addr as i64) << 16 >> 16) as u64 == addr
}

/// A 64-bit process's `push r64` with a non-canonical stack address
/// (#SS(0)) or `mov r32/r64, [r64]` from a non-canonical address (#GP(0)),
/// SDM Vol. 3A 6.15: the monitor hands such faults over as SOFTMMU.
fn noncanonical_access(code: &[u8], ctx: &UserContext) -> Option<Emulated> {
    let rex = code.first().copied().filter(|b| (0x40..=0x4f).contains(b));
    let rest = &code[usize::from(rex.is_some())..];
    let rex_b = usize::from(rex.is_some_and(|r| r & 1 != 0)) * 8;
    match *rest {
        [0x50..=0x57, ..] => (!canonical(ctx.regs[4].wrapping_sub(8))).then(|| fault(VECTOR_SS, 0)),
        [0x8b, modrm, ..] if modrm >> 6 == 0 && !matches!(modrm & 7, 4 | 5) => {
            let addr = ctx.regs[usize::from(modrm & 7) + rex_b];
            (!canonical(addr)).then(|| fault(VECTOR_GP, 0))
        }
        _ => None,
    }
}

/// A far `jmp`/`call` through memory (FF /5, FF /3) whose pointer holds
/// the null selector: #GP(0) (SDM Vol. 2A JMP). Returns the address of
/// the far pointer's selector when the instruction is such a transfer
/// (register-indirect or, RIP-relative / absolute, disp32 forms).
fn far_pointer_selector_addr(code: &[u8], ctx: &UserContext, compat: bool) -> Option<u64> {
    let rex = code
        .first()
        .copied()
        .filter(|b| !compat && (0x40..=0x4f).contains(b));
    let rest = &code[usize::from(rex.is_some())..];
    let [0xff, modrm, ..] = *rest else {
        return None;
    };
    if modrm >> 6 != 0 || !matches!((modrm >> 3) & 7, 3 | 5) {
        return None;
    }
    let offset_size = if rex.is_some_and(|r| r & 8 != 0) {
        8
    } else {
        4
    };
    let base = match modrm & 7 {
        4 => return None,
        5 => {
            let disp = i32::from_le_bytes(rest.get(2..6)?.try_into().ok()?);
            let len = usize::from(rex.is_some()) as u64 + 6;
            if compat {
                u64::from(disp as u32)
            } else {
                ctx.rip.wrapping_add(len).wrapping_add(disp as i64 as u64)
            }
        }
        rm => ctx.regs[usize::from(rm) + usize::from(rex.is_some_and(|r| r & 1 != 0)) * 8],
    };
    Some(base.wrapping_add(offset_size))
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
        // SYSENTER with IA32_SYSENTER_CS = 0 raises #GP(0) (SDM Vol. 2B
        // SYSENTER): this guest OS sets no SYSENTER MSRs, as in native mode.
        [0x0f, 0x34, ..] => true,
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
                    // This client has a small emulator only: segment-register
                    // loads, non-canonical accesses, null far pointers, and
                    // the privileged instructions that raise #GP(0) at CPL 3.
                    let mut code = [0u8; 16];
                    let readable = linux.read_user(pid, state.eip, &mut code).is_ok()
                        || linux.read_user(pid, state.eip, &mut code[..6]).is_ok();
                    let selector_addr = linux
                        .context(pid)
                        .and_then(|c| far_pointer_selector_addr(&code, c, compat));
                    let mut stack_top = [0u8; 2];
                    let sp = state.regs[4] & if compat { 0xffff_ffff } else { u64::MAX };
                    let stack_top = linux
                        .read_user(pid, sp, &mut stack_top)
                        .is_ok()
                        .then(|| u16::from_le_bytes(stack_top));
                    let mut selector = [0u8; 2];
                    let null_far = selector_addr.is_some_and(|addr| {
                        linux.read_user(pid, addr, &mut selector).is_ok() && selector == [0, 0]
                    });
                    let emulated = if !readable {
                        None
                    } else if null_far {
                        Some(fault(VECTOR_GP, 0))
                    } else {
                        linux.context(pid).and_then(|c| {
                            emulate_segment_load(&code, c, compat, stack_top)
                                .or_else(|| (!compat).then(|| noncanonical_access(&code, c))?)
                        })
                    };
                    match emulated {
                        Some(Emulated::Done(len)) => {
                            if let Some(c) = linux.context(pid) {
                                c.rip = (c.rip + len) & if compat { 0xffff_ffff } else { u64::MAX };
                            }
                            // A preemption point for the OS, as after a tick.
                            linux.trap(pid, Trap::Timer);
                            continue;
                        }
                        Some(Emulated::Fault(trap)) => trap,
                        None if readable && raises_gp(&code) => Trap::Exception {
                            vector: VECTOR_GP,
                            error_code: 0,
                            cr2: 0,
                        },
                        None => crate::fail(format_args!(
                            "the monitor asks for emulation (SOFTMMU) at rip {:#x} ({:02x?}), which this client cannot do",
                            state.eip,
                            &code[..6]
                        )),
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
