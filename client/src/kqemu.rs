//! The client side of KQEMU_EXEC for the Linux core, independent of who
//! carries out the ioctl (the testbed calls its monitor directly, the
//! FreeBSD client `kqemu-run` calls `/dev/kqemu`): the CPU state of a
//! process for EXEC ([`state_of`]), what an exit means to the OS
//! ([`step`]), and the small emulator for what the monitor hands back as
//! SOFTMMU (segment-register loads, non-canonical accesses, null far
//! pointers, privileged instructions at CPL 3).
//!
//! Guest-physical addresses are offsets into guest RAM (`phys_base` 0):
//! the runner registers the whole RAM as one range at 0 (SET_PHYS_MEM).

use kqemu::abi::{
    seg, KqemuCpuState, KqemuSegmentCache, KQEMU_FLUSH_ALL, KQEMU_RET_EXCEPTION, KQEMU_RET_INT,
    KQEMU_RET_INTR, KQEMU_RET_SOFTMMU, KQEMU_RET_SYSCALL,
};
use kqemu::monitor::segments::{
    cache_of_load, entry_segment, CpuMode, Descriptor, SegReg, Selector,
};

use alloc::vec::Vec;
use kqemu::monitor::switch::ldt_descriptor;

use crate::linux::GuestGdt;
use crate::{Arch, Linux, PagingFormat, Pid, Trap, UserContext};

/// The host CPU features the guest OS's control registers may enable.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuFeatures {
    /// EFER.NXE (CPUID 8000_0001h EDX bit 20).
    pub nx: bool,
    /// CR4.OSXSAVE (CPUID 1 ECX bit 26, and the OS uses XSAVE).
    pub xsave: bool,
    /// CR4.FSGSBASE (CPUID 7 EBX bit 0).
    pub fsgsbase: bool,
}

/// Control-register and EFER bits (SDM Vol. 3A 2.5, 2.2.1).
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const CR4_FSGSBASE: u64 = 1 << 16;
const CR4_OSXSAVE: u64 = 1 << 18;
const EFER_SCE: u64 = 1 << 0;
const EFER_NXE: u64 = 1 << 11;

/// Guest selectors, as Linux x86_64 has them (__USER_CS 0x33, __USER_DS
/// 0x2b): the monitor loads them from its own GDT at these indices.
const GUEST_CS64: u16 = 0x33;
const GUEST_DS: u16 = 0x2b;
/// Descriptor attributes (high dword, SDM Vol. 3A Figure 3-8): 64-bit
/// code DPL 3 (G, L, P, S, type 0xB) and data DPL 3 (G, D/B, P, S, type 3).
const FLAGS_CODE64: u32 = 0x00af_fb00;
const FLAGS_DATA: u32 = 0x00cf_f300;
/// i386 processes: 32-bit code DPL 3 (G, D/B, P, S, type 0xB) under the
/// selectors of Linux i386 (__USER_CS 0x73, __USER_DS 0x7b) on a 32-bit
/// guest OS, and in compatibility mode under those of Linux x86_64
/// (__USER32_CS 0x23, __USER_DS 0x2b) on a long-mode one ([`User32`]);
/// TLS descriptors at GDT entries 6..8.
const GUEST_CS32: u16 = 0x73;
const GUEST_DS32: u16 = 0x7b;
const GUEST_CS32_LONG: u16 = 0x23;
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

/// The code and data selectors of i386 processes under one guest OS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct User32 {
    cs: u16,
    ds: u16,
}

impl User32 {
    /// Linux x86_64's numbers under 4-level paging, Linux i386's
    /// otherwise. On FreeBSD 0x23 has the index of the host's kernel CS
    /// (GCODE_SEL 4): the world switch gives the guest that index.
    fn of(paging: PagingFormat) -> Self {
        if paging == PagingFormat::Long4 {
            Self {
                cs: GUEST_CS32_LONG,
                ds: GUEST_DS,
            }
        } else {
            Self {
                cs: GUEST_CS32,
                ds: GUEST_DS32,
            }
        }
    }
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

/// The cache of an i386 data selector the process loaded: its TLS or LDT
/// descriptor, the user data segment, or null.
fn data_cache32(ctx: &UserContext, user: User32, selector: u16) -> KqemuSegmentCache {
    // Any RPL: a CPL-3 load of a DPL-3 data segment accepts RPL 0 to 3
    // (SDM Vol. 2B MOV), and the selector keeps the RPL it was loaded with.
    let index = selector >> 3;
    if selector & 4 != 0 {
        return match ctx.ldt.get(usize::from(index)) {
            Some(&raw) if raw != 0 => cache_of_load(Selector(selector), Descriptor(raw)),
            _ => cache(0, 0, 0),
        };
    }
    if (TLS_FIRST..TLS_FIRST + 3).contains(&index) {
        let raw = ctx.tls[usize::from(index - TLS_FIRST)].descriptor();
        if raw != 0 {
            return cache_of_load(Selector(selector), Descriptor(raw));
        }
    }
    if selector | 3 == user.ds {
        return cache(selector, FLAGS_DATA, 0);
    }
    cache(0, 0, 0)
}

/// An i386 DS, ES or SS selector as [`UserContext`] keeps it: `None` for
/// the flat user data segment every program starts with.
fn own_data_selector(user: User32, selector: u16) -> Option<u16> {
    (selector != user.ds).then_some(selector)
}

/// The CPU state of a process for EXEC: a long-mode guest whose amd64
/// processes run 64-bit code and whose i386 processes run in
/// compatibility mode.
pub fn state_of(
    ctx: &UserContext,
    arch: Arch,
    paging: PagingFormat,
    cr3: u64,
    features: &CpuFeatures,
) -> KqemuCpuState {
    let compat = arch == Arch::I386;
    let mut s = KqemuCpuState {
        regs: ctx.regs,
        eip: ctx.rip,
        eflags: (ctx.rflags & !(3 << 12)) | RFLAGS_IF | RFLAGS_FIXED,
        cr0: GUEST_CR0,
        cr3,
        cr4: CR4_PAE
            | CR4_OSFXSR
            | CR4_OSXMMEXCPT
            | if features.xsave { CR4_OSXSAVE } else { 0 }
            | if features.fsgsbase { CR4_FSGSBASE } else { 0 },
        a20_mask: u64::MAX,
        efer: EFER_SCE | EFER_LME | EFER_LMA | if features.nx { EFER_NXE } else { 0 },
        cpl: 3,
        user_only: 1,
        ..KqemuCpuState::default()
    };
    if paging != PagingFormat::Long4 {
        // A 32-bit OS: protected mode without IA-32e (EFER.LME/LMA clear),
        // NX only with PAE (SDM Vol. 3A 4.1.1).
        s.efer = if paging == PagingFormat::Pae && features.nx {
            EFER_NXE
        } else {
            0
        };
        s.cr4 &= !(CR4_PAE | CR4_FSGSBASE);
        if paging == PagingFormat::Pae {
            s.cr4 |= CR4_PAE;
        }
    }
    if compat {
        let user = User32::of(paging);
        s.eip &= 0xffff_ffff;
        s.regs[4] &= 0xffff_ffff;
        s.segs[seg::CS] = cache(user.cs, FLAGS_CODE32, 0);
        s.segs[seg::SS] = data_cache32(ctx, user, ctx.ss_sel.unwrap_or(user.ds));
        // A data register whose TLS entry the program has made unloadable
        // since it loaded it is null: i386 Linux reloads DS, ES, FS and GS
        // on every return to user mode and its fixup of a failed reload
        // loads null (x86_64 Linux gives 32-bit programs the same result,
        // tests/guests/dataseg). SS cannot be null: see `stale_stack`.
        let data = |reg: SegReg, sel: u16| {
            let c = data_cache32(ctx, user, sel);
            match entry_segment(reg, &c, CpuMode::Legacy) {
                Ok(_) => c,
                Err(_) => cache(0, 0, 0),
            }
        };
        s.segs[seg::DS] = data(SegReg::Ds, ctx.ds_sel.unwrap_or(user.ds));
        s.segs[seg::ES] = data(SegReg::Es, ctx.es_sel.unwrap_or(user.ds));
        s.segs[seg::FS] = data(SegReg::Fs, ctx.fs_sel);
        s.segs[seg::GS] = data(SegReg::Gs, ctx.gs_sel);
    } else {
        s.segs[seg::CS] = cache(GUEST_CS64, FLAGS_CODE64, 0);
        s.segs[seg::SS] = cache(GUEST_DS, FLAGS_DATA, 0);
        s.segs[seg::DS] = cache(0, 0, 0);
        s.segs[seg::ES] = cache(0, 0, 0);
        s.segs[seg::FS] = cache(0, 0, ctx.fs_base);
        s.segs[seg::GS] = cache(0, 0, ctx.gs_base);
    }
    // The base is the GDT page's, which the caller fills (`load_gdt`).
    s.gdt.limit = u32::from(GUEST_GDT_LIMIT);
    s
}

/// Limit of the guest OS's GDT as `state_of` describes it (16 entries).
const GUEST_GDT_LIMIT: u16 = 0x7f;
/// GDT index of the descriptor of the process's LDT (Linux x86_64's
/// GDT_ENTRY_LDT; 16 bytes, up to index 11, under a long-mode guest OS).
const LDT_INDEX: u16 = 10;
/// The LDTR cache's attributes: present, system type 2 (SDM Vol. 3A
/// Table 3-2), as the high dword of the descriptor holds them.
const FLAGS_LDT: u32 = 0x0000_8200;

/// The process's LDT in the guest OS's GDT page: linear base and byte
/// limit (`None`: no LDT, or no GDT page to hold it).
fn ldt_of(ctx: &UserContext, gdt: Option<GuestGdt>) -> Option<(u64, u32)> {
    if ctx.ldt.is_empty() {
        return None;
    }
    Some((gdt?.ldt_linear(), (ctx.ldt.len() * 8 - 1) as u32))
}

/// The LDTR's cache for `ldt` (what LLDT of [`LDT_INDEX`] loads), null
/// without an LDT.
fn ldt_cache(ldt: Option<(u64, u32)>) -> KqemuSegmentCache {
    match ldt {
        Some((base, limit)) => KqemuSegmentCache {
            selector: LDT_INDEX << 3,
            padding1: 0,
            flags: FLAGS_LDT,
            base,
            limit,
            padding2: 0,
        },
        None => KqemuSegmentCache::default(),
    }
}
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
const SREG_ES: u8 = 0;
const SREG_CS: u8 = 1;
const SREG_SS: u8 = 2;
const SREG_DS: u8 = 3;
const SREG_FS: u8 = 4;
const SREG_GS: u8 = 5;

/// A descriptor as the GDT holds it, from the attribute dword of `cache`
/// (base 0, limit 0xfffff).
fn flat_descriptor(flags: u32) -> u64 {
    (u64::from(flags) << 32) | 0xffff
}

/// Entry `index` of the guest OS's GDT while the process of `ctx` runs (0:
/// empty): the code and data segments `state_of` gives the process, for
/// i386 processes their TLS entries, and the descriptor of its LDT `ldt`
/// (base, limit; its upper half at the next index under 4-level paging,
/// where the guest OS runs in IA-32e mode).
fn guest_descriptor(
    ctx: &UserContext,
    compat: Option<User32>,
    ldt: Option<(u64, u32)>,
    long: bool,
    index: u16,
) -> u64 {
    if let Some((base, limit)) = ldt {
        let d = ldt_descriptor(base, limit);
        if index == LDT_INDEX {
            return d[0];
        }
        if long && index == LDT_INDEX + 1 {
            return d[1];
        }
    }
    match (compat, index) {
        (Some(user), i) if i == user.cs >> 3 => flat_descriptor(FLAGS_CODE32),
        (Some(user), i) if i == user.ds >> 3 => flat_descriptor(FLAGS_DATA),
        (Some(_), i) if (TLS_FIRST..TLS_FIRST + 3).contains(&i) => {
            ctx.tls[usize::from(i - TLS_FIRST)].descriptor()
        }
        (None, i) if i == GUEST_CS64 >> 3 => flat_descriptor(FLAGS_CODE64),
        (None, i) if i == GUEST_DS >> 3 => flat_descriptor(FLAGS_DATA),
        _ => 0,
    }
}

/// Entries of the guest OS's GDT (up to [`GUEST_GDT_LIMIT`]).
const GDT_ENTRIES: usize = (GUEST_GDT_LIMIT as usize + 1) / 8;
/// The guest OS's GDT.
type GdtTable = [u64; GDT_ENTRIES];

/// The guest OS's GDT while the process of `ctx` runs, with its LDT `ldt`.
fn gdt_table(
    ctx: &UserContext,
    compat: Option<User32>,
    ldt: Option<(u64, u32)>,
    long: bool,
) -> GdtTable {
    core::array::from_fn(|i| guest_descriptor(ctx, compat, ldt, long, i as u16))
}

/// GDT base for EXEC when the OS has no GDT page (`Linux::gdt`): not
/// 4-byte aligned, so the monitor reads no descriptor there and hands
/// every load of a selector within the limit to this client's emulator,
/// which then uses the table `gdt_table` computes (what both did before
/// the GDT lived in guest RAM).
const NO_GDT_PAGE_BASE: u64 = 1;

/// Writes `table` into the GDT page in guest RAM where it differs (the
/// guest OS's context switch, as Linux's `load_TLS`): the page then holds
/// the running process's descriptors when the monitor or this client's
/// emulator reads them. Returns the GDT's linear base.
fn load_gdt(linux: &mut Linux<'_>, table: &GdtTable, ldt: &[u64]) -> u64 {
    let Some(gdt) = linux.gdt else {
        return NO_GDT_PAGE_BASE;
    };
    let ldt_entries = ldt.iter().take(crate::LDT_ENTRIES).enumerate();
    let writes = table
        .iter()
        .enumerate()
        .map(|(i, &raw)| (gdt.frame + i as u64 * 8, raw))
        .chain(ldt_entries.map(|(i, &raw)| (gdt.ldt_frame() + i as u64 * 8, raw)));
    for (at, raw) in writes {
        if linux.ram.read_entry(at, 8) != Some(raw) {
            linux.ram.write_entry(at, 8, raw);
        }
    }
    gdt.linear
}

/// The guest OS's GDT as the page in guest RAM holds it (`None` without a
/// page).
fn read_gdt(linux: &Linux<'_>) -> Option<GdtTable> {
    let gdt = linux.gdt?;
    let mut table = [0; GDT_ENTRIES];
    for (i, raw) in table.iter_mut().enumerate() {
        *raw = linux.ram.read_entry(gdt.frame + i as u64 * 8, 8)?;
    }
    Some(table)
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
/// guest OS's GDT (`gdt`, as the page in guest RAM holds it), with the
/// checks of SDM Vol. 2B MOV ("Loading a segment register in protected
/// mode") and POP: the monitor loads the GDT and LDT selectors it can
/// mirror itself and hands the others back as SOFTMMU (a descriptor it
/// cannot mirror, an entry register's index, a full shadow, an LDT index
/// past its shadow LDT). `ldt` is the process's LDT. A load that succeeds is carried out only where the process's state has a place for it (the data registers
/// of i386 processes); `None`: this client cannot emulate the instruction.
/// `user32` names the selectors of an i386 process (None: amd64);
/// `stack_top` is the word at the stack pointer, for `pop`.
fn emulate_segment_load(
    code: &[u8],
    ctx: &mut UserContext,
    user32: Option<User32>,
    gdt: &GdtTable,
    ldt: &[u64],
    stack_top: Option<u16>,
) -> Option<Emulated> {
    let compat = user32.is_some();
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
        [0x1f, ..] if compat => (SREG_DS, stack_top?, popped, 1),
        [0x07, ..] if compat => (SREG_ES, stack_top?, popped, 1),
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
        let index = usize::from(selector >> 3);
        let desc = if selector & 4 != 0 {
            // TI = 1: the process's LDT, whose limit its length sets.
            match ldt.get(index) {
                Some(&desc) => desc,
                None => return Some(fault(VECTOR_GP, error)),
            }
        } else if (selector & !7) + 7 > GUEST_GDT_LIMIT {
            return Some(fault(VECTOR_GP, error));
        } else {
            gdt[index]
        };
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
    // amd64: no data register to keep (the state has no place for one).
    let user = user32?;
    match sreg {
        SREG_FS => ctx.fs_sel = selector,
        SREG_GS => ctx.gs_sel = selector,
        SREG_ES => ctx.es_sel = own_data_selector(user, selector),
        SREG_SS => ctx.ss_sel = own_data_selector(user, selector),
        SREG_DS => ctx.ds_sel = own_data_selector(user, selector),
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

/// One KQEMU_EXEC, as the runner carries it out.
pub trait ExecCpu {
    type Error;
    /// The OS rewrote page tables behind the monitor's back: mark every
    /// RAM page dirty, as a client's slow path would, so the monitor
    /// revalidates what it derived from them.
    fn all_pages_dirty(&mut self);
    /// KQEMU_EXEC with `state`, for process `pid` (whose FPU state the
    /// runner makes live around the ioctl).
    fn exec(&mut self, pid: Pid, state: &mut KqemuCpuState) -> Result<(), Self::Error>;
}

/// What one [`step`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// No process is runnable.
    Idle,
    /// Process `pid` ran; the OS was handed `trap` (Timer after an
    /// instruction this client emulated).
    Ran { pid: Pid, trap: Trap },
}

/// A step that could not be carried out.
#[derive(Debug)]
pub enum StepError<E> {
    /// The EXEC ioctl failed.
    Exec(E),
    /// SOFTMMU at `rip` (first code bytes) for an instruction this client
    /// cannot emulate.
    Softmmu { rip: u64, code: [u8; 6] },
    /// An EXEC result outside the ABI.
    Retval { retval: i32, rip: u64 },
}

/// Runs the next runnable process of `linux` through one EXEC of `cpu` and
/// hands its exit to the OS.
pub fn step<C: ExecCpu>(
    linux: &mut Linux<'_>,
    cpu: &mut C,
    paging: PagingFormat,
    features: &CpuFeatures,
) -> Result<Step, StepError<C::Error>> {
    let gdt_holds = linux.gdt_pid;
    let guest_gdt = linux.gdt;
    let Some(runnable) = linux.next() else {
        return Ok(Step::Idle);
    };
    let pid = runnable.pid;
    let flush_tlb = runnable.flush_tlb;
    if flush_tlb {
        cpu.all_pages_dirty();
    }
    let compat = runnable.arch == Arch::I386;
    let user32 = compat.then(|| User32::of(paging));
    let mut state = state_of(runnable.ctx, runnable.arch, paging, runnable.cr3, features);
    // The page changes on a switch to another process and after
    // set_thread_area or modify_ldt, as Linux's load_TLS and load_mm_ldt
    // run: not on every EXEC.
    let reload = gdt_holds != Some(pid) || runnable.ctx.tls_changed;
    let ldt = ldt_of(runnable.ctx, guest_gdt);
    let long = paging == PagingFormat::Long4;
    let table = reload.then(|| gdt_table(runnable.ctx, user32, ldt, long));
    let ldt_table = if reload {
        runnable.ctx.ldt.clone()
    } else {
        Vec::new()
    };
    state.ldt = ldt_cache(ldt);
    if let Some(trap) = stale_stack(runnable.ctx, &state, compat) {
        linux.trap(pid, trap);
        return Ok(Step::Ran { pid, trap });
    }
    state.gdt.base = match table {
        Some(table) => {
            let base = load_gdt(linux, &table, &ldt_table);
            if let Some(ctx) = linux.context(pid) {
                ctx.tls_changed = false;
            }
            linux.gdt_pid = Some(pid);
            base
        }
        None => linux.gdt.map_or(NO_GDT_PAGE_BASE, |gdt| gdt.linear),
    };
    if flush_tlb {
        state.nb_pages_to_flush = KQEMU_FLUSH_ALL;
    }
    cpu.exec(pid, &mut state).map_err(StepError::Exec)?;
    // The process `next` returned: it is still there.
    let Some(ctx) = linux.context(pid) else {
        return Ok(Step::Idle);
    };
    ctx.regs = state.regs;
    ctx.rip = state.eip;
    ctx.rflags = state.eflags;
    if let Some(user) = user32 {
        ctx.fs_sel = state.segs[seg::FS].selector;
        ctx.gs_sel = state.segs[seg::GS].selector;
        ctx.es_sel = own_data_selector(user, state.segs[seg::ES].selector);
        ctx.ss_sel = own_data_selector(user, state.segs[seg::SS].selector);
        ctx.ds_sel = own_data_selector(user, state.segs[seg::DS].selector);
    } else {
        ctx.fs_base = state.segs[seg::FS].base;
        ctx.gs_base = state.segs[seg::GS].base;
    }
    let trap = match state.retval {
        KQEMU_RET_SYSCALL => {
            // The monitor stops before the instruction's own effects
            // (kqemu hands SYSCALL to QEMU's helper_syscall): in 64-bit
            // mode the CPU saves the return address in RCX and RFLAGS in
            // R11 (SDM Vol. 2B SYSCALL), which Linux's sysret path relies
            // on and programs may check.
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
        KQEMU_RET_SOFTMMU => softmmu(linux, pid, &state, user32, long)?,
        retval => {
            return Err(StepError::Retval {
                retval,
                rip: state.eip,
            })
        }
    };
    linux.trap(pid, trap);
    Ok(Step::Ran { pid, trap })
}

/// An i386 program's own SS whose TLS entry no longer holds a writable
/// DPL-3 data segment (the program changed it after loading SS): Linux's
/// return to user mode faults reloading SS, and the program gets #GP
/// (SIGSEGV) without running; the monitor would refuse the state. The
/// checks of SS do not depend on the CPU mode.
fn stale_stack(ctx: &UserContext, state: &KqemuCpuState, compat: bool) -> Option<Trap> {
    let selector = ctx.ss_sel.filter(|_| compat)?;
    entry_segment(SegReg::Ss, &state.segs[seg::SS], CpuMode::Legacy).err()?;
    Some(Trap::Exception {
        vector: VECTOR_GP,
        error_code: u32::from(selector & !3),
        cr2: 0,
    })
}

/// SOFTMMU: this client has a small emulator only: segment-register loads,
/// non-canonical accesses, null far pointers, and the privileged
/// instructions that raise #GP(0) at CPL 3. An emulated instruction is a
/// preemption point for the OS, as after a tick (Timer).
fn softmmu<E>(
    linux: &mut Linux<'_>,
    pid: Pid,
    state: &KqemuCpuState,
    user32: Option<User32>,
    long: bool,
) -> Result<Trap, StepError<E>> {
    let compat = user32.is_some();
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
    let gdt = read_gdt(linux);
    let linux_gdt = linux.gdt;
    let emulated = if !readable {
        None
    } else if null_far {
        Some(fault(VECTOR_GP, 0))
    } else {
        linux.context(pid).and_then(|c| {
            let ldt = ldt_of(c, linux_gdt);
            let gdt = gdt.unwrap_or_else(|| gdt_table(c, user32, ldt, long));
            let ldt_table = c.ldt.clone();
            emulate_segment_load(&code, c, user32, &gdt, &ldt_table, stack_top)
                .or_else(|| (!compat).then(|| noncanonical_access(&code, c))?)
        })
    };
    match emulated {
        Some(Emulated::Done(len)) => {
            if let Some(c) = linux.context(pid) {
                c.rip = (c.rip + len) & if compat { 0xffff_ffff } else { u64::MAX };
            }
            Ok(Trap::Timer)
        }
        Some(Emulated::Fault(trap)) => Ok(trap),
        None if readable && raises_gp(&code) => Ok(Trap::Exception {
            vector: VECTOR_GP,
            error_code: 0,
            cr2: 0,
        }),
        None => {
            let mut first = [0u8; 6];
            first.copy_from_slice(&code[..6]);
            Err(StepError::Softmmu {
                rip: state.eip,
                code: first,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The emulator against the GDT the process's descriptors make.
    fn emulate(
        code: &[u8],
        ctx: &mut UserContext,
        user32: Option<User32>,
        stack_top: Option<u16>,
    ) -> Option<Emulated> {
        let gdt = gdt_table(ctx, user32, None, false);
        let ldt = ctx.ldt.clone();
        emulate_segment_load(code, ctx, user32, &gdt, &ldt, stack_top)
    }

    struct NoConsole;

    impl crate::Console for NoConsole {
        fn write(&mut self, _fd: i32, _bytes: &[u8]) {}
        fn now_ns(&mut self) -> u64 {
            0
        }
        fn random(&mut self, _buf: &mut [u8]) {}
    }

    /// An OS for i386 processes with `bytes` as its guest RAM.
    fn i386_os(bytes: &mut [u8], paging: PagingFormat) -> Linux<'_> {
        let ram = crate::GuestRam::new(bytes, 0).expect("ram");
        let cfg = crate::LinuxConfig::new(Arch::I386, paging);
        Linux::new(
            ram,
            crate::MemFs::new(),
            cfg,
            alloc::boxed::Box::new(NoConsole),
        )
    }

    #[test]
    fn the_gdt_page_holds_the_running_process_descriptors() {
        for (paging, linear) in [
            (PagingFormat::Legacy32, 0xffc0_0000),
            (PagingFormat::Pae, 0xffe0_0000),
            (PagingFormat::Long4, 0xffff_ff00_0000_0000),
        ] {
            let mut bytes = alloc::vec![0u8; 64 * 4096];
            let mut linux = i386_os(&mut bytes, paging);
            let gdt = linux.gdt().expect("a GDT page");
            assert_eq!(gdt.linear, linear, "{paging:?}");
            // Every address space maps it: its root entry is among those
            // copied into each root.
            assert_eq!(linux.cfg.kernel_pml4e.len(), 1);
            let user = User32::of(paging);
            let mut ctx = UserContext::default();
            ctx.tls[1] = crate::UserDesc {
                entry_number: 7,
                base_addr: 0x1234_5000,
                limit: 0xfff,
                flags: 0x41,
            };
            let table = gdt_table(&ctx, Some(user), None, false);
            assert_eq!(load_gdt(&mut linux, &table, &[]), linear);
            let read = read_gdt(&linux).expect("the page");
            assert_eq!(read, table);
            assert_eq!(read[7], ctx.tls[1].descriptor());
            assert_eq!(
                read[usize::from(user.cs >> 3)],
                flat_descriptor(FLAGS_CODE32)
            );
            // set_thread_area clears the entry: the next load_gdt writes it.
            ctx.tls[1] = crate::UserDesc::default();
            load_gdt(&mut linux, &gdt_table(&ctx, Some(user), None, false), &[]);
            assert_eq!(read_gdt(&linux).expect("the page")[7], 0);
            // The emulator reads what the page holds.
            let mut page = read_gdt(&linux).expect("the page");
            page[7] = flat_descriptor(FLAGS_DATA);
            ctx.regs[0] = 0x3b;
            assert!(matches!(
                emulate_segment_load(&[0x8e, 0xe8], &mut ctx, Some(user), &page, &[], None),
                Some(Emulated::Done(2))
            ));
            assert_eq!(ctx.gs_sel, 0x3b);
        }
    }

    const LEGACY: Option<User32> = Some(User32 {
        cs: GUEST_CS32,
        ds: GUEST_DS32,
    });

    #[test]
    fn amd64_state_is_long_mode_with_linux_selectors() {
        let ctx = UserContext {
            rip: 0x40_1000,
            fs_base: 0x7000,
            ..UserContext::default()
        };
        let features = CpuFeatures {
            nx: true,
            ..CpuFeatures::default()
        };
        let s = state_of(&ctx, Arch::Amd64, PagingFormat::Long4, 0x5000, &features);
        assert_eq!(s.eip, 0x40_1000);
        assert_eq!(s.cr3, 0x5000);
        assert_eq!(s.efer, EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE);
        assert_eq!(s.segs[seg::CS].selector, GUEST_CS64);
        assert_eq!(s.segs[seg::FS].base, 0x7000);
        assert_eq!(s.cpl, 3);
        assert_ne!(s.eflags & RFLAGS_IF, 0);
    }

    #[test]
    fn i386_state_on_legacy_paging_has_no_long_mode() {
        let ctx = UserContext {
            rip: 0x1_0000_8048,
            ..UserContext::default()
        };
        let s = state_of(
            &ctx,
            Arch::I386,
            PagingFormat::Legacy32,
            0x1000,
            &CpuFeatures::default(),
        );
        assert_eq!(s.efer, 0);
        assert_eq!(s.cr4 & CR4_PAE, 0);
        assert_eq!(s.eip, 0x8048);
        assert_eq!(s.segs[seg::CS].selector, GUEST_CS32);
    }

    #[test]
    fn i386_state_on_long_mode_has_linux_x86_64_selectors() {
        let mut ctx = UserContext {
            rip: 0x8048,
            ..UserContext::default()
        };
        let long = User32::of(PagingFormat::Long4);
        assert_eq!(long, User32 { cs: 0x23, ds: 0x2b });
        for paging in [PagingFormat::Legacy32, PagingFormat::Pae] {
            assert_eq!(User32::of(paging), LEGACY.expect("i386"));
        }
        let s = state_of(
            &ctx,
            Arch::I386,
            PagingFormat::Long4,
            0x1000,
            &CpuFeatures::default(),
        );
        assert_eq!(s.efer & EFER_LMA, EFER_LMA);
        assert_eq!(
            (s.segs[seg::CS].selector, s.segs[seg::CS].flags),
            (0x23, FLAGS_CODE32)
        );
        for r in [seg::SS, seg::DS, seg::ES] {
            assert_eq!((s.segs[r].selector, s.segs[r].flags), (0x2b, FLAGS_DATA));
        }
        // The emulator's GDT is the same guest OS's: 0x2b loads and is the
        // default again, 0x7b (nothing there) is #GP(0x78).
        ctx.regs[0] = 0x2b;
        assert!(matches!(
            emulate(&[0x8e, 0xd8], &mut ctx, Some(long), None),
            Some(Emulated::Done(2))
        ));
        assert_eq!(ctx.ds_sel, None);
        ctx.regs[0] = 0x7b;
        assert!(matches!(
            emulate(&[0x8e, 0xd8], &mut ctx, Some(long), None),
            Some(Emulated::Fault(Trap::Exception {
                vector: VECTOR_GP,
                error_code: 0x78,
                ..
            }))
        ));
        assert_eq!(
            guest_descriptor(&ctx, Some(long), None, true, 4),
            flat_descriptor(FLAGS_CODE32)
        );
        assert_eq!(guest_descriptor(&ctx, Some(long), None, true, 14), 0);
    }

    #[test]
    fn segment_loads_check_the_guest_gdt() {
        let mut ctx = UserContext::default();
        // mov fs, ax with AX = the i386 user data selector: loads.
        ctx.regs[0] = u64::from(GUEST_DS32);
        assert!(matches!(
            emulate(&[0x8e, 0xe0], &mut ctx, LEGACY, None),
            Some(Emulated::Done(2))
        ));
        assert_eq!(ctx.fs_sel, GUEST_DS32);
        // mov ss, ax with the null selector: #GP(0).
        ctx.regs[0] = 0;
        assert!(matches!(
            emulate(&[0x8e, 0xd0], &mut ctx, LEGACY, None),
            Some(Emulated::Fault(Trap::Exception {
                vector: VECTOR_GP,
                error_code: 0,
                ..
            }))
        ));
        // mov cs, ax: #UD.
        assert!(matches!(
            emulate(&[0x8e, 0xc8], &mut ctx, LEGACY, None),
            Some(Emulated::Fault(Trap::Exception {
                vector: VECTOR_UD,
                ..
            }))
        ));
    }

    #[test]
    fn the_ldt_lives_in_the_gdt_page_and_its_selectors_load() {
        for (paging, long) in [(PagingFormat::Legacy32, false), (PagingFormat::Long4, true)] {
            let mut bytes = alloc::vec![0u8; 64 * 4096];
            let mut linux = i386_os(&mut bytes, paging);
            let gdt = linux.gdt().expect("a GDT page");
            let user = User32::of(paging);
            let mut ctx = UserContext::default();
            assert_eq!(ldt_of(&ctx, Some(gdt)), None, "no LDT");
            assert_eq!(ldt_cache(None).selector, 0);
            // Entry 2: 4 KiB of 32-bit data at 0x2000 (modify_ldt func 0x11).
            let desc = crate::UserDesc {
                entry_number: 2,
                base_addr: 0x2000,
                limit: 0xfff,
                flags: 1,
            };
            ctx.ldt = alloc::vec![0, 0, desc.ldt_descriptor(false)];
            let ldt = ldt_of(&ctx, Some(gdt));
            assert_eq!(ldt, Some((gdt.linear + 0x800, 3 * 8 - 1)));
            let c = ldt_cache(ldt);
            assert_eq!(
                (c.selector, c.flags, c.base, c.limit),
                (0x50, 0x8200, gdt.linear + 0x800, 23)
            );
            // The GDT holds its descriptor (16 bytes under IA-32e), the
            // page's upper half the entries.
            let table = gdt_table(&ctx, Some(user), ldt, long);
            assert_eq!(
                [table[10], table[11]],
                [
                    ldt_descriptor(gdt.linear + 0x800, 23)[0],
                    if long { (gdt.linear + 0x800) >> 32 } else { 0 }
                ]
            );
            load_gdt(&mut linux, &table, &ctx.ldt);
            assert_eq!(
                linux.ram.read_entry(gdt.frame + 0x800 + 16, 8),
                Some(ctx.ldt[2])
            );
            // A data register holding LDT selector 0x17 has its cache.
            ctx.ds_sel = Some(0x17);
            ctx.gs_sel = 0x0f;
            let s = state_of(&ctx, Arch::I386, paging, 0x1000, &CpuFeatures::default());
            let ds = s.segs[seg::DS];
            assert_eq!((ds.selector, ds.base, ds.limit), (0x17, 0x2000, 0xfff));
            assert_eq!(s.segs[seg::GS].selector, 0, "an empty entry: null");
            // RPL 0 of the same entry (a CPL-3 load accepts it): the same
            // cache, with the selector's own RPL.
            ctx.es_sel = Some(0x14);
            let s = state_of(&ctx, Arch::I386, paging, 0x1000, &CpuFeatures::default());
            let es = s.segs[seg::ES];
            assert_eq!((es.selector, es.base, es.limit), (0x14, 0x2000, 0xfff));
            ctx.es_sel = None;
            // The emulator loads from the LDT: beyond its limit #GP with
            // TI set in the error code; an empty entry #GP.
            let mut page = read_gdt(&linux).expect("the page");
            page[2] = 0;
            let ldt_entries = ctx.ldt.clone();
            for (sel, ok, error) in [(0x17u64, true, 0), (0x1f, false, 0x1c), (0x0f, false, 0x0c)] {
                ctx.regs[0] = sel;
                let r = emulate_segment_load(
                    &[0x8e, 0xe0],
                    &mut ctx,
                    Some(user),
                    &page,
                    &ldt_entries,
                    None,
                );
                match r {
                    Some(Emulated::Done(2)) => assert!(ok, "{sel:#x}"),
                    Some(Emulated::Fault(Trap::Exception {
                        vector: VECTOR_GP,
                        error_code,
                        ..
                    })) => assert_eq!((ok, error_code), (false, error), "{sel:#x}"),
                    _ => panic!("{sel:#x}"),
                }
            }
            assert_eq!(ctx.fs_sel, 0x17);
        }
    }

    #[test]
    fn i386_data_selectors_are_kept() {
        let mut ctx = UserContext::default();
        // A 4 KiB 32-bit data segment at 0x1000 in TLS entry 6 (selector 0x33).
        ctx.tls[0] = crate::UserDesc {
            entry_number: 6,
            base_addr: 0x1000,
            limit: 0xfff,
            flags: 1 | 1 << 6,
        };
        ctx.regs[0] = 0x33;
        assert!(matches!(
            emulate(&[0x8e, 0xd0], &mut ctx, LEGACY, None),
            Some(Emulated::Done(2))
        ));
        // pop ds of the user data selector: the default again; mov es of
        // null: kept as null.
        ctx.regs[4] = 0x8000;
        assert!(matches!(
            emulate(&[0x1f], &mut ctx, LEGACY, Some(GUEST_DS32)),
            Some(Emulated::Done(1))
        ));
        assert_eq!(ctx.regs[4], 0x8004);
        ctx.regs[0] = 0;
        assert!(matches!(
            emulate(&[0x8e, 0xc0], &mut ctx, LEGACY, None),
            Some(Emulated::Done(2))
        ));
        assert_eq!(
            (ctx.ss_sel, ctx.ds_sel, ctx.es_sel),
            (Some(0x33), None, Some(0))
        );
        let s = state_of(
            &ctx,
            Arch::I386,
            PagingFormat::Legacy32,
            0x1000,
            &CpuFeatures::default(),
        );
        let ss = s.segs[seg::SS];
        assert_eq!((ss.selector, ss.base, ss.limit), (0x33, 0x1000, 0xfff));
        assert_eq!(s.segs[seg::DS].selector, GUEST_DS32);
        assert_eq!((s.segs[seg::ES].selector, s.segs[seg::ES].flags), (0, 0));
        assert!(stale_stack(&ctx, &s, true).is_none());
        // The program marks the entry not present with DS and SS loaded:
        // DS becomes null, SS faults before the program runs.
        ctx.ds_sel = Some(0x33);
        ctx.tls[0].flags |= 1 << 5;
        let s = state_of(
            &ctx,
            Arch::I386,
            PagingFormat::Legacy32,
            0x1000,
            &CpuFeatures::default(),
        );
        assert_eq!(s.segs[seg::DS].selector, 0);
        assert_eq!(
            stale_stack(&ctx, &s, true),
            Some(Trap::Exception {
                vector: VECTOR_GP,
                error_code: 0x30,
                cr2: 0
            })
        );
    }

    #[test]
    fn privileged_instructions_raise_gp() {
        assert!(raises_gp(&[0xf4]));
        assert!(raises_gp(&[0x0f, 0x22, 0xd8]));
        assert!(!raises_gp(&[0x90]));
    }
}
