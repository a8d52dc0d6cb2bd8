//! Segment descriptors for guest code running at host ring 3.
//!
//! The CPU loads guest selectors from the monitor's shadow GDT and LDT,
//! indexed exactly like the guest's own tables, so selector values, their
//! RPL, and every check the CPU makes on a load are the guest's (SDM Vol.
//! 3A 5.5 to 5.8). Two sources fill those tables:
//! - the client's segment caches, for the registers loaded when a run
//!   starts ([`entry_segment`]): the hidden part of a segment register is
//!   what counts, even when the guest changed its tables since;
//! - the guest's descriptors, for the loads guest code does itself while it
//!   runs ([`shadow_of_guest`]), read from the guest's GDT or LDT in guest
//!   memory lazily, one per faulting index ([`RunGdt`]).
//!
//! # The lazy fill
//!
//! Every index the shadow does not hold is an empty entry, so a load of
//! any other GDT selector faults #GP(selector) after the CPU found the
//! selector within the monitor GDT's limit. The same for LDT selectors:
//! the world switch loads a shadow LDT (one page) for every run, its limit
//! the guest's LDTR limit cut to that page (0 when the guest has no LDT:
//! every LDT selector is then beyond it, as under a null LDTR). The
//! monitor then reads the guest's descriptor at `gdt.base + index * 8`
//! (`ldt.base + index * 8` for an LDT selector) through the guest's page
//! tables (implicit supervisor reads), installs its shadow and resumes the
//! guest, which retries the load with the guest's descriptor in place: the
//! CPU makes every check of the guest CPU (type, DPL/RPL/CPL, present).
//! Each index is filled at most once per EXEC, so a second fault on it is
//! the guest's own exception; an index past the guest's limit is the
//! guest's #GP(selector) at once. The accessed bit is set in the guest's
//! descriptor in memory (a guest write for the dirty bytes) when the load
//! passes its checks, as the CPU would ([`on_not_present`]). Fills last
//! one EXEC: between EXECs the guest OS may rewrite its tables (a context
//! switch loads another task's TLS entries), and the next EXEC starts again
//! from the entry registers.
//!
//! What the client emulates (SOFTMMU) instead: the GDT indices the world
//! switch keeps for itself, LDT indices past the shadow LDT's page
//! ([`SHADOW_LDT_ENTRIES`]), the indices of entry registers (their hidden
//! part may differ from the table), code segments, system descriptors and
//! gates, writable 16-bit data (a 16-bit stack), a table page that is not
//! RAM or not mapped, and loads beyond the [`RUN_DESCRIPTORS`] GDT (and
//! [`RUN_LDT_DESCRIPTORS`] LDT) entries one run can hold. One difference
//! stays: LAR, LSL, VERR and VERW never fault, so on a selector that no
//! segment register holds and no load filled in this EXEC they report
//! "invalid" (ZF = 0) where the guest's CPU would read its table; and on
//! a filled entry that still waits for its accessed bit (installed not
//! present, see above) LAR reads P = 0 and A = 1 where the guest's CPU
//! reads P = 1 and A = 0. And guest code that reloads an entry register's
//! own selector gets the hidden part the register had at the EXEC's start,
//! where the CPU would read the table, which the guest OS may have changed
//! since (x86_64 Linux's modify_ldt refreshes DS and ES, not FS and GS).
//! Two entry registers of one index with different hidden parts make the
//! EXEC the client's.
//!
//! The host runs in IA-32e mode; guest code runs in 64-bit mode (CS.L = 1
//! in a long-mode guest) or in compatibility mode, which applies 16- and
//! 32-bit protected-mode segmentation unchanged: bases, limits,
//! expand-down data, conforming code, default operand and stack sizes (SDM
//! Vol. 3A 5.2.1). That is why 32-bit guests need no stolen address window
//! and 16-bit protected-mode code runs natively too.

use bitflags::bitflags;

use crate::abi::KqemuSegmentCache;
use crate::monitor::mmu::GuestVirt;
use crate::monitor::switch;

bitflags! {
    /// The attribute bits of a code or data segment descriptor, in place in
    /// the 8-byte descriptor (SDM Vol. 3A 3.4.5, Figure 3-8).
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct DescriptorFlags: u64 {
        /// Accessed: set by the CPU on a load when clear.
        const ACCESSED = 1 << 40;
        /// Readable (code) or writable (data).
        const READ_WRITE = 1 << 41;
        /// Conforming (code) or expand-down (data).
        const CONFORMING_EXPAND_DOWN = 1 << 42;
        /// Code segment.
        const EXECUTABLE = 1 << 43;
        /// S: code or data segment (clear: system descriptor or gate).
        const CODE_OR_DATA = 1 << 44;
        const DPL_LOW = 1 << 45;
        const DPL_HIGH = 1 << 46;
        const PRESENT = 1 << 47;
        /// Available to software.
        const AVAILABLE = 1 << 52;
        /// L: 64-bit code segment (IA-32e mode only).
        const LONG_MODE = 1 << 53;
        /// D/B: 32-bit default operand size, 32-bit stack, 4 GiB bound of
        /// expand-down data.
        const DEFAULT_SIZE = 1 << 54;
        /// G: the limit counts 4 KiB units.
        const GRANULARITY = 1 << 55;
    }
}

/// Attribute bits of the descriptor's high dword, where the client's
/// segment caches keep them (ABI.md: type, S, DPL, P, AVL, L, D/B, G).
const CACHE_ATTRIBUTES: u32 = 0x00f0_ff00;
/// The largest descriptor table: a selector indexes 8192 entries.
pub const MAX_DESCRIPTORS: usize = 8192;
/// GDT entries the world switch keeps for the monitor (its code, stack and
/// TSS descriptors), at the top of the shadow GDT, above any GDT limit
/// guests use in practice. A guest selector indexing them cannot run
/// natively ([`SegmentRefusal::MonitorSelector`]).
pub const MONITOR_GDT_ENTRIES: u16 = 16;
/// First GDT index kept for the monitor.
pub const MONITOR_GDT_FIRST: u16 = MAX_DESCRIPTORS as u16 - MONITOR_GDT_ENTRIES;

/// A segment selector (SDM Vol. 3A 3.4.2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Selector(pub u16);

impl Selector {
    /// Index in the descriptor table.
    pub const fn index(self) -> u16 {
        self.0 >> 3
    }

    /// TI: the selector indexes the LDT.
    pub const fn in_ldt(self) -> bool {
        self.0 & 4 != 0
    }

    /// Requested privilege level.
    pub const fn rpl(self) -> u8 {
        (self.0 & 3) as u8
    }

    /// A null selector: GDT index 0, any RPL.
    pub const fn is_null(self) -> bool {
        self.0 & !3 == 0
    }
}

/// An 8-byte segment descriptor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Descriptor(pub u64);

/// What a descriptor describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DescriptorKind {
    Data {
        writable: bool,
        expand_down: bool,
    },
    Code {
        readable: bool,
        conforming: bool,
    },
    /// A system descriptor or gate, by type (SDM Vol. 3A Table 3-2).
    System(u8),
}

impl Descriptor {
    /// A code or data descriptor with `base`, the 20-bit `limit_field` and
    /// `flags`.
    pub fn segment(base: u32, limit_field: u32, flags: DescriptorFlags) -> Self {
        let base = u64::from(base);
        let limit = u64::from(limit_field & 0xf_ffff);
        Self(
            (limit & 0xffff)
                | ((base & 0xff_ffff) << 16)
                | ((limit >> 16) << 48)
                | ((base >> 24) << 56)
                | flags.bits(),
        )
    }

    /// The attribute bits.
    pub fn flags(self) -> DescriptorFlags {
        DescriptorFlags::from_bits_truncate(self.0)
    }

    /// The 32-bit base.
    pub fn base(self) -> u32 {
        (((self.0 >> 16) & 0xff_ffff) | ((self.0 >> 56) << 24)) as u32
    }

    /// The 20-bit limit field.
    pub fn limit_field(self) -> u32 {
        ((self.0 & 0xffff) | (((self.0 >> 48) & 0xf) << 16)) as u32
    }

    /// The limit in bytes, expanded by the granularity (SDM Vol. 3A 3.4.5).
    pub fn limit(self) -> u32 {
        let field = self.limit_field();
        if self.flags().contains(DescriptorFlags::GRANULARITY) {
            (field << 12) | 0xfff
        } else {
            field
        }
    }

    /// Descriptor privilege level.
    pub fn dpl(self) -> u8 {
        ((self.0 >> 45) & 3) as u8
    }

    /// The present bit.
    pub fn present(self) -> bool {
        self.flags().contains(DescriptorFlags::PRESENT)
    }

    pub fn kind(self) -> DescriptorKind {
        let f = self.flags();
        if !f.contains(DescriptorFlags::CODE_OR_DATA) {
            return DescriptorKind::System(((self.0 >> 40) & 0xf) as u8);
        }
        let rw = f.contains(DescriptorFlags::READ_WRITE);
        let ce = f.contains(DescriptorFlags::CONFORMING_EXPAND_DOWN);
        if f.contains(DescriptorFlags::EXECUTABLE) {
            DescriptorKind::Code {
                readable: rw,
                conforming: ce,
            }
        } else {
            DescriptorKind::Data {
                writable: rw,
                expand_down: ce,
            }
        }
    }

    /// The descriptor with the accessed bit set, as the CPU writes it back
    /// on a load.
    pub fn with_accessed(self) -> Self {
        Self(self.0 | DescriptorFlags::ACCESSED.bits())
    }
}

/// The guest's paging-independent CPU mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuMode {
    /// Protected mode, IA32_EFER.LMA = 0.
    Legacy,
    /// IA-32e mode, IA32_EFER.LMA = 1.
    Long,
}

/// Operand and address size of the code segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CodeSize {
    Bits16,
    Bits32,
    /// 64-bit mode: CS.L = 1 in IA-32e mode.
    Bits64,
}

/// The segment registers, in the order of `kqemu_cpu_state.segs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegReg {
    Es,
    Cs,
    Ss,
    Ds,
    Fs,
    Gs,
}

impl SegReg {
    /// All of them, in ABI order.
    pub const ALL: [Self; 6] = [Self::Es, Self::Cs, Self::Ss, Self::Ds, Self::Fs, Self::Gs];
}

/// What the shadow table holds for one guest descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShadowDescriptor {
    /// A code or data segment, loadable natively.
    Segment(Descriptor),
    /// An empty entry (all zero). Loading it faults with #GP(selector),
    /// which is what the guest gets for loading a system descriptor into a
    /// segment register; a far transfer through a guest gate or TSS ends
    /// there too and goes to the client (`RunGdt::fill` refuses system
    /// descriptors).
    Empty,
}

impl ShadowDescriptor {
    /// The 8 bytes to store.
    pub fn raw(self) -> u64 {
        match self {
            Self::Segment(d) => d.0,
            Self::Empty => 0,
        }
    }
}

/// The shadow entry for a guest descriptor read from the guest's GDT or
/// LDT.
///
/// - System descriptors and gates are left empty: in IA-32e mode they are
///   16 bytes and call gates have another format (SDM Vol. 3A 5.8.3.1),
///   task gates and task switches do not exist (7.7), so a 32-bit guest's
///   cannot be mirrored; CPL-3 code can use them only through far
///   transfers, which the client emulates. A known difference: LAR and LSL
///   at CPL 3 on a DPL-3 system descriptor report "invalid" (ZF = 0).
/// - Code and data segments are mirrored with their DPL, so a CPL-3 load
///   of a DPL < 3 segment faults natively with the guest's #GP(selector),
///   and conforming code of any DPL runs at CPL 3 as in the guest.
/// - In a legacy guest, L is cleared: bit 53 means nothing outside IA-32e
///   mode, but would make the host run the code as 64-bit code.
/// - The shadow has A set, so the CPU never writes the shadow table. When
///   the guest's A is clear, the shadow entry is not present: the guest's
///   first load passes every type and privilege check, then faults #NP or
///   #SS(selector), and the monitor sets A in the guest's descriptor as
///   the CPU would ([`on_not_present`]) before retrying.
pub fn shadow_of_guest(guest: Descriptor, mode: CpuMode) -> ShadowDescriptor {
    if matches!(guest.kind(), DescriptorKind::System(_)) {
        return ShadowDescriptor::Empty;
    }
    let mut flags = guest.flags() | DescriptorFlags::ACCESSED;
    if mode == CpuMode::Legacy {
        flags.remove(DescriptorFlags::LONG_MODE);
    }
    if !guest.flags().contains(DescriptorFlags::ACCESSED) {
        flags.remove(DescriptorFlags::PRESENT);
    }
    ShadowDescriptor::Segment(Descriptor::segment(
        guest.base(),
        guest.limit_field(),
        flags,
    ))
}

/// What a not-present fault (#NP or #SS with a selector) on a shadow entry
/// built by [`shadow_of_guest`] means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotPresent {
    /// The guest's descriptor is not present: the guest takes the fault.
    GuestFault,
    /// The guest's descriptor only lacked the accessed bit: set it in the
    /// guest's table (an implicit supervisor write, mmu.rs), refill the
    /// shadow entry and let the guest retry.
    SetAccessed,
}

/// Classifies a not-present fault on the shadow entry of `guest`.
pub fn on_not_present(guest: Descriptor) -> NotPresent {
    if guest.present() {
        NotPresent::SetAccessed
    } else {
        NotPresent::GuestFault
    }
}

/// Linear address of the descriptor `selector` names, in the guest's GDT
/// (`gdt_base`, `gdt_limit`) or LDT; `None` when the selector is null or
/// beyond the table's limit (the CPU raises #GP(selector) then).
pub fn descriptor_address(
    selector: Selector,
    gdt: (u64, u32),
    ldt: Option<(u64, u32)>,
) -> Option<GuestVirt> {
    if selector.is_null() {
        return None;
    }
    let (base, limit) = if selector.in_ldt() { ldt? } else { gdt };
    let offset = u64::from(selector.index()) * 8;
    // The whole 8-byte descriptor must lie within the limit (SDM Vol. 3A
    // 3.5.1).
    if offset + 7 > u64::from(limit) {
        return None;
    }
    Some(GuestVirt::new(base.wrapping_add(offset)))
}

/// Why the client's cache of a segment register cannot be loaded natively
/// at CPL 3. Every case answers `KQEMU_RET_SOFTMMU`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegmentRefusal {
    /// The cache is not present (or null for CS or SS).
    NotPresent,
    /// CS is not a code segment, SS not a writable data segment, a data
    /// register holds execute-only code or a system descriptor.
    WrongType,
    /// The selector's RPL or the descriptor's DPL does not match CPL 3.
    Privilege,
    /// A 64-bit code segment with D = 1 (reserved: the CPU refuses to load
    /// it, SDM Vol. 3A 5.2.1).
    LongAndDefaultSize,
    /// The base does not fit 32 bits, or an FS/GS base of a long-mode guest
    /// is not canonical (WRMSR would fault).
    Base,
    /// The byte limit cannot be expressed with the cache's granularity.
    Limit,
    /// The selector indexes the GDT entries the monitor keeps.
    MonitorSelector,
}

/// How the world switch loads one segment register at the start of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntrySegment {
    pub selector: Selector,
    /// The descriptor to place at the selector's index before loading it;
    /// `None` for a null selector.
    pub descriptor: Option<Descriptor>,
    /// FS and GS of a long-mode guest: the 64-bit base, written to
    /// IA32_FS_BASE / IA32_GS_BASE after the selector is loaded (SDM Vol. 3A
    /// 3.4.4: the descriptor holds only 32 bits of it).
    pub base_msr: Option<u64>,
}

/// Checks the client's cache of `reg` for CPL-3 code in `mode` and builds
/// what the world switch loads.
pub fn entry_segment(
    reg: SegReg,
    cache: &KqemuSegmentCache,
    mode: CpuMode,
) -> Result<EntrySegment, SegmentRefusal> {
    let selector = Selector(cache.selector);
    let attributes = u64::from(cache.flags & CACHE_ATTRIBUTES) << 32;
    let mut flags = DescriptorFlags::from_bits_truncate(attributes);
    let present = flags.contains(DescriptorFlags::PRESENT);
    let fs_gs = matches!(reg, SegReg::Fs | SegReg::Gs);
    let long_base = |base: u64| {
        if is_canonical(base) {
            Ok(Some(base))
        } else {
            Err(SegmentRefusal::Base)
        }
    };

    if matches!(reg, SegReg::Cs | SegReg::Ss) {
        // CS and SS can never be null at CPL 3 (SDM Vol. 3A 5.8, IRET).
        if selector.is_null() || !present {
            return Err(SegmentRefusal::NotPresent);
        }
        if selector.rpl() != 3 {
            return Err(SegmentRefusal::Privilege);
        }
    } else if selector.is_null() || !present {
        // The client clears the cache of a null load; a non-null selector
        // with a non-present cache cannot come from a load.
        if !selector.is_null() {
            return Err(SegmentRefusal::NotPresent);
        }
        let base_msr = match (mode, fs_gs) {
            (CpuMode::Long, true) => long_base(cache.base)?,
            _ => None,
        };
        return Ok(EntrySegment {
            selector,
            descriptor: None,
            base_msr,
        });
    }
    if !selector.in_ldt() && selector.index() >= MONITOR_GDT_FIRST {
        return Err(SegmentRefusal::MonitorSelector);
    }

    let kind = Descriptor(attributes).kind();
    let dpl = Descriptor(attributes).dpl();
    let long_code =
        reg == SegReg::Cs && mode == CpuMode::Long && flags.contains(DescriptorFlags::LONG_MODE);
    match (reg, kind) {
        (SegReg::Cs, DescriptorKind::Code { conforming, .. }) => {
            // Non-conforming code runs at its DPL; conforming code at any
            // CPL >= DPL (SDM Vol. 3A 5.8.1.2).
            if !conforming && dpl != 3 {
                return Err(SegmentRefusal::Privilege);
            }
            if long_code && flags.contains(DescriptorFlags::DEFAULT_SIZE) {
                return Err(SegmentRefusal::LongAndDefaultSize);
            }
        }
        (SegReg::Ss, DescriptorKind::Data { writable: true, .. }) => {
            // SS DPL must equal CPL (SDM Vol. 3A 5.7).
            if dpl != 3 {
                return Err(SegmentRefusal::Privilege);
            }
        }
        (SegReg::Cs | SegReg::Ss, _) => return Err(SegmentRefusal::WrongType),
        (
            _,
            DescriptorKind::Data { .. }
            | DescriptorKind::Code {
                readable: true,
                conforming: true,
            },
        ) => {}
        (
            _,
            DescriptorKind::Code {
                readable: true,
                conforming: false,
            },
        ) => {
            if dpl != 3 {
                return Err(SegmentRefusal::Privilege);
            }
        }
        (_, _) => return Err(SegmentRefusal::WrongType),
    }
    // Data segments and non-conforming code need DPL >= CPL: a lower DPL
    // would be nulled by the IRET to CPL 3 (SDM Vol. 3A IRET).
    if matches!(kind, DescriptorKind::Data { .. }) && dpl != 3 {
        return Err(SegmentRefusal::Privilege);
    }
    if mode == CpuMode::Legacy {
        flags.remove(DescriptorFlags::LONG_MODE);
    }
    flags |= DescriptorFlags::ACCESSED;

    let limit_field = if flags.contains(DescriptorFlags::GRANULARITY) {
        if cache.limit & 0xfff != 0xfff {
            return Err(SegmentRefusal::Limit);
        }
        cache.limit >> 12
    } else if cache.limit > 0xf_ffff {
        return Err(SegmentRefusal::Limit);
    } else {
        cache.limit
    };

    let (base, base_msr) = match (mode, fs_gs) {
        // 64-bit FS/GS bases live in MSRs; the descriptor keeps the low half.
        (CpuMode::Long, true) => (cache.base as u32, long_base(cache.base)?),
        _ => (
            u32::try_from(cache.base).map_err(|_| SegmentRefusal::Base)?,
            None,
        ),
    };
    let descriptor = Descriptor::segment(base, limit_field, flags);
    Ok(EntrySegment {
        selector,
        descriptor: Some(descriptor),
        base_msr,
    })
}

/// The code size the CS cache selects.
pub fn code_size(cs: &KqemuSegmentCache, mode: CpuMode) -> CodeSize {
    let flags = DescriptorFlags::from_bits_truncate(u64::from(cs.flags & CACHE_ATTRIBUTES) << 32);
    if mode == CpuMode::Long && flags.contains(DescriptorFlags::LONG_MODE) {
        CodeSize::Bits64
    } else if flags.contains(DescriptorFlags::DEFAULT_SIZE) {
        CodeSize::Bits32
    } else {
        CodeSize::Bits16
    }
}

/// The client's cache of a register the guest loaded natively from
/// `guest` (its own descriptor, accessed bit included), as the client
/// itself fills it on a load: flags are the descriptor's high dword, the
/// limit expanded (QEMU's `cpu_x86_load_seg_cache`). A null selector gives
/// an empty cache.
pub fn cache_of_load(selector: Selector, guest: Descriptor) -> KqemuSegmentCache {
    if selector.is_null() {
        return KqemuSegmentCache {
            selector: selector.0,
            ..KqemuSegmentCache::default()
        };
    }
    KqemuSegmentCache {
        selector: selector.0,
        padding1: 0,
        flags: (guest.0 >> 32) as u32,
        base: u64::from(guest.base()),
        limit: guest.limit(),
        padding2: 0,
    }
}

/// Shadow GDT entries one run can hold: the world switch writes at most
/// this many guest descriptors per run (switch.rs
/// `set_guest_descriptors`); the entry registers take up to six of them
/// when they all differ, which no guest OS does (code, data and a TLS
/// entry are the usual three).
pub const RUN_DESCRIPTORS: usize = switch::GUEST_DESCRIPTORS;
/// Shadow LDT entries one run can hold (switch.rs `set_guest_ldt`).
pub const RUN_LDT_DESCRIPTORS: usize = switch::GUEST_LDT_DESCRIPTORS;
/// LDT indices the shadow LDT has room for: loads of higher ones go to the
/// client.
pub const SHADOW_LDT_ENTRIES: u16 = switch::SHADOW_LDT_ENTRIES as u16;
const _: () = assert!(RUN_DESCRIPTORS == RUN_LDT_DESCRIPTORS);

/// Vectors of the faults a segment load raises at CPL 3 (SDM Vol. 3A
/// Table 6-1): #NP, #SS and #GP with the selector as error code.
pub const VEC_NP: u8 = 11;
pub const VEC_SS: u8 = 12;
pub const VEC_GP: u8 = 13;
/// Error-code bits that do not name a selector: EXT (an external event)
/// and IDT (a gate) (SDM Vol. 3A 6.13).
const ERROR_EXT_IDT: u64 = 0b11;

/// Where an entry of [`RunGdt`] came from and what its next fault means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Built from the client's segment cache of an entry register.
    Entry,
    /// Read from the guest's table in this EXEC; a fault on it is the
    /// guest's own.
    Filled,
    /// Read from the guest's table with its accessed bit clear: the shadow
    /// entry is not present until the CPU's first load passes every check
    /// and faults #NP or #SS, which sets the guest's bit.
    AwaitingAccessed,
}

/// The entries of one shadow table (GDT or LDT) for one EXEC.
#[derive(Clone, Copy, Debug)]
struct Table {
    shadow: [(u16, u64); RUN_DESCRIPTORS],
    /// The guest's descriptor of each filled entry (accessed bit as read).
    guest: [Descriptor; RUN_DESCRIPTORS],
    stage: [Stage; RUN_DESCRIPTORS],
    len: usize,
}

impl Table {
    const EMPTY: Self = Self {
        shadow: [(0, 0); RUN_DESCRIPTORS],
        guest: [Descriptor(0); RUN_DESCRIPTORS],
        stage: [Stage::Entry; RUN_DESCRIPTORS],
        len: 0,
    };

    /// Adds an entry; false when the index has one or the table is full.
    fn push(&mut self, index: u16, raw: u64, guest: Descriptor, stage: Stage) -> bool {
        if self.position(index).is_some() || self.len == RUN_DESCRIPTORS {
            return false;
        }
        self.shadow[self.len] = (index, raw);
        self.guest[self.len] = guest;
        self.stage[self.len] = stage;
        self.len += 1;
        true
    }

    fn position(&self, index: u16) -> Option<usize> {
        self.shadow[..self.len]
            .iter()
            .position(|&(i, _)| i == index)
    }
}

/// The guest descriptors of one EXEC, at their GDT and LDT indices: the
/// entry registers' (from the client's caches), then those filled lazily
/// from the guest's own GDT or LDT when guest code loads another selector
/// (kqemu kept a shadow of the guest's whole GDT and LDT instead, tracked
/// through the descriptor-table dirty flag). A fill lives for the EXEC
/// only: the guest OS may change its tables between EXECs (a context
/// switch, `modify_ldt`), and the next EXEC starts again from the entry
/// registers.
#[derive(Clone, Copy, Debug)]
pub struct RunGdt {
    gdt: Table,
    ldt: Table,
}

/// What a #GP, #NP or #SS exit of guest code comes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegmentFault {
    /// Not a load of a selector the monitor fills (an entry register's
    /// index, the monitor's own GDT indices, an LDT index past the shadow
    /// LDT, a full table, an error code without a selector): the client
    /// emulates.
    Client,
    /// The guest's own exception, exactly as the CPU raised it: a second
    /// fault on a filled index (the shadow mirrors the guest's
    /// descriptor, so the CPU made the guest CPU's checks), or a selector
    /// beyond the GDT or LDT limit, or an LDT selector without an LDT
    /// (#GP(selector), SDM Vol. 3A 5.4.1).
    Guest,
    /// Read the guest's descriptor for `selector` (RPL 0: the table and
    /// index) at `linear`, then [`RunGdt::fill`].
    Read {
        selector: Selector,
        linear: GuestVirt,
    },
    /// The load of filled entry `selector` passed every check: set the
    /// accessed bit of the guest's descriptor at `linear` (in guest
    /// memory, as the CPU would), then [`RunGdt::accessed`].
    SetAccessed {
        selector: Selector,
        linear: GuestVirt,
        guest: Descriptor,
    },
}

/// What [`RunGdt::fill`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fill {
    /// Installed: run the guest again, it retries the load.
    Installed,
    /// A descriptor the world switch cannot mirror exactly: the client
    /// emulates.
    Client,
}

impl RunGdt {
    /// No descriptors: what [`Self::load_entry`] starts from.
    pub const EMPTY: Self = Self {
        gdt: Table::EMPTY,
        ldt: Table::EMPTY,
    };

    /// Makes the tables hold the entry registers' descriptors of
    /// `segments` (ABI order) and nothing else. In place: the tables are
    /// large, and the EXEC path keeps one where it was made instead of
    /// moving it. `None` when two registers of one index have different
    /// hidden parts (one loaded before the guest OS changed the entry):
    /// one shadow entry cannot hold both.
    pub fn load_entry(&mut self, segments: &[EntrySegment]) -> Option<()> {
        self.gdt.len = 0;
        self.ldt.len = 0;
        for s in segments {
            if let Some(d) = s.descriptor {
                let table = self.table_mut(s.selector);
                let index = s.selector.index();
                let same = table
                    .position(index)
                    .is_some_and(|at| table.shadow[at].1 == d.0);
                if !same && !table.push(index, d.0, Descriptor(0), Stage::Entry) {
                    return None;
                }
            }
        }
        Some(())
    }

    /// [`Self::load_entry`] on new tables.
    #[cfg(test)]
    pub fn of_entry(segments: &[EntrySegment]) -> Option<Self> {
        let mut gdt = Self::EMPTY;
        gdt.load_entry(segments)?;
        Some(gdt)
    }

    fn table(&self, selector: Selector) -> &Table {
        if selector.in_ldt() {
            &self.ldt
        } else {
            &self.gdt
        }
    }

    fn table_mut(&mut self, selector: Selector) -> &mut Table {
        if selector.in_ldt() {
            &mut self.ldt
        } else {
            &mut self.gdt
        }
    }

    /// (GDT index, descriptor) pairs for the world switch.
    pub fn descriptors(&self) -> &[(u16, u64)] {
        &self.gdt.shadow[..self.gdt.len]
    }

    /// (LDT index, descriptor) pairs for the world switch's shadow LDT.
    pub fn ldt_descriptors(&self) -> &[(u16, u64)] {
        &self.ldt.shadow[..self.ldt.len]
    }

    /// Classifies an exit with `vector` and `error_code`, given the
    /// guest's GDT (`gdt`: base, byte limit) and LDT (`ldt`, `None`: a
    /// null LDTR).
    pub fn on_fault(
        &self,
        vector: u8,
        error_code: u64,
        gdt: (u64, u32),
        ldt: Option<(u64, u32)>,
    ) -> SegmentFault {
        if !matches!(vector, VEC_NP | VEC_SS | VEC_GP)
            || error_code & ERROR_EXT_IDT != 0
            || error_code == 0
            || error_code > 0xffff
        {
            return SegmentFault::Client;
        }
        let selector = Selector(error_code as u16 & !3);
        let index = selector.index();
        // The monitor's own GDT entries are not the guest's; LDT entries
        // past the shadow LDT's page are beyond its limit there, not
        // necessarily in the guest's LDT.
        if !selector.in_ldt() && index >= MONITOR_GDT_FIRST {
            return SegmentFault::Client;
        }
        let beyond_shadow = selector.in_ldt() && index >= SHADOW_LDT_ENTRIES;
        let table = self.table(selector);
        if let Some(i) = table.position(index) {
            return match (table.stage[i], vector) {
                // The hidden part of an entry register may differ from the
                // guest's table: only the client knows the table then.
                (Stage::Entry, _) => SegmentFault::Client,
                (Stage::Filled, _) | (Stage::AwaitingAccessed, VEC_GP) => SegmentFault::Guest,
                (Stage::AwaitingAccessed, _) => {
                    match (
                        on_not_present(table.guest[i]),
                        descriptor_address(selector, gdt, ldt),
                    ) {
                        (NotPresent::SetAccessed, Some(linear)) => SegmentFault::SetAccessed {
                            selector,
                            linear,
                            guest: table.guest[i],
                        },
                        (NotPresent::GuestFault, _) => SegmentFault::Guest,
                        (_, None) => SegmentFault::Client,
                    }
                }
            };
        }
        // An index the shadow does not hold is an empty entry: the CPU
        // raised #GP(selector) for its type (SDM Vol. 3A 5.5).
        if vector != VEC_GP {
            return SegmentFault::Client;
        }
        match descriptor_address(selector, gdt, ldt) {
            // Beyond the guest's limit (or no LDT): the guest CPU raises
            // #GP(selector) too, the same exception from the same
            // instruction.
            None => SegmentFault::Guest,
            Some(_) if beyond_shadow || table.len == RUN_DESCRIPTORS => SegmentFault::Client,
            Some(linear) => SegmentFault::Read { selector, linear },
        }
    }

    /// Installs the shadow of `guest`, the entry of `selector` (RPL 0) as
    /// read for [`SegmentFault::Read`].
    ///
    /// Filled: data segments (their shadow from [`shadow_of_guest`]) and
    /// all-zero entries (a load of one faults #GP(selector) on the guest
    /// CPU as on the empty shadow entry). The client emulates the rest:
    /// - system descriptors and gates: far transfers through them, and
    ///   #NP for a not-present gate where the empty entry gives #GP;
    /// - code segments: a far transfer would change CS under a run whose
    ///   code base and size the monitor took from the entry CS;
    /// - writable data with D/B = 0: loaded into SS it is a 16-bit stack,
    ///   whose ESP bits 31:16 the world switch's IRET cannot restore.
    pub fn fill(&mut self, selector: Selector, guest: Descriptor, mode: CpuMode) -> Fill {
        match guest.kind() {
            DescriptorKind::System(_) if guest.0 != 0 => return Fill::Client,
            DescriptorKind::Code { .. } => return Fill::Client,
            DescriptorKind::Data { writable: true, .. }
                if !guest.flags().contains(DescriptorFlags::DEFAULT_SIZE) =>
            {
                return Fill::Client
            }
            _ => {}
        }
        if selector.in_ldt() && selector.index() >= SHADOW_LDT_ENTRIES {
            return Fill::Client;
        }
        // A present data segment without A: its shadow is not present
        // until the load passes its checks (`shadow_of_guest`).
        let stage = if guest.present() && !guest.flags().contains(DescriptorFlags::ACCESSED) {
            Stage::AwaitingAccessed
        } else {
            Stage::Filled
        };
        let raw = shadow_of_guest(guest, mode).raw();
        if self
            .table_mut(selector)
            .push(selector.index(), raw, guest, stage)
        {
            Fill::Installed
        } else {
            Fill::Client
        }
    }

    /// The guest's descriptor of `selector` has its accessed bit now: the
    /// shadow entry becomes present and the guest retries the load.
    pub fn accessed(&mut self, selector: Selector, mode: CpuMode) {
        let table = self.table_mut(selector);
        if let Some(i) = table.position(selector.index()) {
            let guest = table.guest[i].with_accessed();
            table.guest[i] = guest;
            table.shadow[i].1 = shadow_of_guest(guest, mode).raw();
            table.stage[i] = Stage::Filled;
        }
    }

    /// The client's cache of `selector` when guest code loaded it from a
    /// filled entry (`None`: not a filled entry).
    pub fn loaded_cache(&self, selector: Selector) -> Option<KqemuSegmentCache> {
        if selector.is_null() {
            return None;
        }
        let table = self.table(selector);
        let i = table.position(selector.index())?;
        // A load completed only from a present entry, after which the
        // guest's descriptor has its accessed bit.
        (table.stage[i] == Stage::Filled && table.guest[i].present())
            .then(|| cache_of_load(selector, table.guest[i].with_accessed()))
    }
}

fn is_canonical(addr: u64) -> bool {
    let high = addr >> 47;
    high == 0 || high == (1 << 17) - 1
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: DescriptorFlags = DescriptorFlags::PRESENT;
    const S: DescriptorFlags = DescriptorFlags::CODE_OR_DATA;
    const X: DescriptorFlags = DescriptorFlags::EXECUTABLE;
    const RW: DescriptorFlags = DescriptorFlags::READ_WRITE;
    const CE: DescriptorFlags = DescriptorFlags::CONFORMING_EXPAND_DOWN;
    const A: DescriptorFlags = DescriptorFlags::ACCESSED;
    const G: DescriptorFlags = DescriptorFlags::GRANULARITY;
    const DB: DescriptorFlags = DescriptorFlags::DEFAULT_SIZE;
    const L: DescriptorFlags = DescriptorFlags::LONG_MODE;
    const DPL3: DescriptorFlags = DescriptorFlags::DPL_LOW.union(DescriptorFlags::DPL_HIGH);

    /// Linux's flat 32-bit user code segment (GDT entry 0x73 >> 3).
    const USER_CS32: u64 = 0x00cf_fa00_0000_ffff;
    /// Linux's 64-bit user code segment.
    const USER_CS64: u64 = 0x00af_fb00_0000_ffff;
    /// A flat user data segment, not yet accessed.
    const USER_DS: u64 = 0x00cf_f200_0000_ffff;

    fn cache(selector: u16, d: Descriptor) -> KqemuSegmentCache {
        cache_of_load(Selector(selector), d)
    }

    #[test]
    fn descriptor_fields() {
        let d = Descriptor(USER_CS32);
        assert_eq!(
            (d.base(), d.limit_field(), d.limit(), d.dpl()),
            (0, 0xf_ffff, 0xffff_ffff, 3)
        );
        assert_eq!(
            d.kind(),
            DescriptorKind::Code {
                readable: true,
                conforming: false
            }
        );
        assert!(d.present() && d.flags().contains(DB | G));
        let d = Descriptor::segment(0x1234_5678, 0xabcde, P | S | RW | CE | DPL3);
        assert_eq!(
            (d.base(), d.limit_field(), d.limit()),
            (0x1234_5678, 0xabcde, 0xabcde)
        );
        assert_eq!(
            d.kind(),
            DescriptorKind::Data {
                writable: true,
                expand_down: true
            }
        );
        assert_eq!(
            Descriptor(USER_DS).kind(),
            DescriptorKind::Data {
                writable: true,
                expand_down: false
            }
        );
        // A 32-bit TSS (type 9) and an LDT (type 2).
        assert_eq!(
            Descriptor(0x0000_8900_0000_0067).kind(),
            DescriptorKind::System(9)
        );
        assert_eq!(
            Descriptor(0x0000_8200_0000_0067).kind(),
            DescriptorKind::System(2)
        );
        let s = Selector(0x7f);
        assert_eq!(
            (s.index(), s.in_ldt(), s.rpl(), s.is_null()),
            (15, true, 3, false)
        );
        assert!(Selector(3).is_null() && !Selector(4).is_null());
    }

    #[test]
    fn guest_code_and_data_are_mirrored() {
        for mode in [CpuMode::Legacy, CpuMode::Long] {
            for raw in [USER_CS32 | A.bits(), USER_DS | A.bits()] {
                assert_eq!(
                    shadow_of_guest(Descriptor(raw), mode),
                    ShadowDescriptor::Segment(Descriptor(raw))
                );
            }
        }
        // Kernel segments keep DPL 0: a CPL-3 load faults natively.
        let kernel_ds = Descriptor(0x00cf_9300_0000_ffff);
        assert_eq!(
            shadow_of_guest(kernel_ds, CpuMode::Legacy).raw(),
            kernel_ds.0
        );
        // Exact odd bases and limits, byte granular, expand-down.
        let odd = Descriptor::segment(0x8765_4321, 0x1_2345, P | S | RW | CE | A | DPL3);
        assert_eq!(
            shadow_of_guest(odd, CpuMode::Legacy),
            ShadowDescriptor::Segment(odd)
        );
    }

    #[test]
    fn long_bit_only_in_long_mode() {
        let cs64 = Descriptor(USER_CS64 | A.bits());
        assert_eq!(shadow_of_guest(cs64, CpuMode::Long).raw(), cs64.0);
        let ShadowDescriptor::Segment(legacy) = shadow_of_guest(cs64, CpuMode::Legacy) else {
            panic!("a segment")
        };
        assert!(
            !legacy.flags().contains(L),
            "a legacy guest's L bit would make 64-bit code"
        );
        assert_eq!(legacy.0, cs64.0 & !L.bits());
    }

    #[test]
    fn accessed_bit_is_left_to_the_monitor() {
        let d = Descriptor(USER_DS);
        let ShadowDescriptor::Segment(s) = shadow_of_guest(d, CpuMode::Legacy) else {
            panic!("a segment")
        };
        assert!(
            !s.present() && s.flags().contains(A),
            "first load faults #NP; the CPU never writes the shadow"
        );
        assert_eq!(on_not_present(d), NotPresent::SetAccessed);
        assert_eq!(
            shadow_of_guest(d.with_accessed(), CpuMode::Legacy).raw(),
            USER_DS | A.bits()
        );
        let absent = Descriptor(USER_DS & !P.bits());
        assert_eq!(on_not_present(absent), NotPresent::GuestFault);
    }

    #[test]
    fn system_descriptors_stay_empty() {
        let call_gate = Descriptor(0x0000_ec00_0008_1000);
        let tss = Descriptor(0x0000_8900_0000_0067);
        for d in [call_gate, tss, Descriptor(0)] {
            assert_eq!(shadow_of_guest(d, CpuMode::Legacy), ShadowDescriptor::Empty);
            assert_eq!(ShadowDescriptor::Empty.raw(), 0);
        }
    }

    #[test]
    fn descriptor_addresses_honour_limits() {
        let gdt = (0x1000, 0x7f);
        let ldt = Some((0x8000_0000, 0xf));
        assert_eq!(
            descriptor_address(Selector(0x73), gdt, ldt),
            Some(GuestVirt::new(0x1070))
        );
        assert_eq!(
            descriptor_address(Selector(0x7b), gdt, ldt),
            Some(GuestVirt::new(0x1078))
        );
        assert_eq!(
            descriptor_address(Selector(0x83), gdt, ldt),
            None,
            "beyond the GDT limit"
        );
        assert_eq!(
            descriptor_address(Selector(0x0f), gdt, ldt),
            Some(GuestVirt::new(0x8000_0008))
        );
        assert_eq!(
            descriptor_address(Selector(0x17), gdt, ldt),
            None,
            "beyond the LDT limit"
        );
        assert_eq!(
            descriptor_address(Selector(0x0f), gdt, None),
            None,
            "no LDT"
        );
        assert_eq!(descriptor_address(Selector(3), gdt, ldt), None, "null");
        // A limit that ends inside a descriptor excludes it.
        assert_eq!(descriptor_address(Selector(0x78), (0, 0x7e), None), None);
    }

    #[test]
    fn entry_of_a_flat_32bit_process() {
        let cs = cache(0x73, Descriptor(USER_CS32 | A.bits()));
        let e = entry_segment(SegReg::Cs, &cs, CpuMode::Legacy).expect("flat code");
        assert_eq!(e.descriptor, Some(Descriptor(USER_CS32 | A.bits())));
        assert_eq!(e.base_msr, None);
        assert_eq!(code_size(&cs, CpuMode::Legacy), CodeSize::Bits32);
        let ds = cache(0x7b, Descriptor(USER_DS | A.bits()));
        for reg in [SegReg::Ss, SegReg::Ds, SegReg::Es, SegReg::Fs] {
            assert_eq!(
                entry_segment(reg, &ds, CpuMode::Legacy)
                    .expect("data")
                    .descriptor,
                Some(Descriptor(USER_DS | A.bits()))
            );
        }
        // The cache's base/limit bits in `flags` (QEMU keeps the whole high
        // dword) are ignored; the cache's base and limit count.
        let tls = KqemuSegmentCache {
            base: 0xb7e0_06c0,
            limit: 0xffff_ffff,
            ..cache(0x33, Descriptor(USER_DS))
        };
        let e = entry_segment(SegReg::Gs, &tls, CpuMode::Legacy).expect("TLS");
        let d = e.descriptor.expect("not null");
        assert_eq!((d.base(), d.limit()), (0xb7e0_06c0, 0xffff_ffff));
    }

    #[test]
    fn entry_of_a_64bit_process() {
        let cs = cache(0x33, Descriptor(USER_CS64 | A.bits()));
        let e = entry_segment(SegReg::Cs, &cs, CpuMode::Long).expect("64-bit code");
        assert!(e.descriptor.expect("code").flags().contains(L));
        assert_eq!(code_size(&cs, CpuMode::Long), CodeSize::Bits64);
        // The same descriptor in a legacy guest is 16-bit code: L means
        // nothing there and D is clear.
        assert_eq!(code_size(&cs, CpuMode::Legacy), CodeSize::Bits16);
        // FS with a 64-bit base from the MSR, GS null with a base.
        let fs = KqemuSegmentCache {
            base: 0x7f12_3456_7000,
            ..cache(0x2b, Descriptor(USER_DS | A.bits()))
        };
        let e = entry_segment(SegReg::Fs, &fs, CpuMode::Long).expect("fs");
        assert_eq!(e.base_msr, Some(0x7f12_3456_7000));
        assert_eq!(e.descriptor.expect("fs").base(), 0x3456_7000);
        let gs = KqemuSegmentCache {
            base: 0xffff_8000_0000_1000,
            ..KqemuSegmentCache::default()
        };
        let e = entry_segment(SegReg::Gs, &gs, CpuMode::Long).expect("null gs");
        assert_eq!(
            (e.descriptor, e.base_msr),
            (None, Some(0xffff_8000_0000_1000))
        );
        let bad = KqemuSegmentCache {
            base: 0x8000_0000_0000_0000,
            ..gs
        };
        assert_eq!(
            entry_segment(SegReg::Gs, &bad, CpuMode::Long),
            Err(SegmentRefusal::Base)
        );
        // In a legacy guest a null register needs nothing.
        let e = entry_segment(SegReg::Gs, &gs, CpuMode::Legacy).expect("null gs");
        assert_eq!((e.descriptor, e.base_msr), (None, None));
        // L = 1 with D = 1 is reserved.
        let bad_cs = cache(0x33, Descriptor(USER_CS64 | DB.bits()));
        assert_eq!(
            entry_segment(SegReg::Cs, &bad_cs, CpuMode::Long),
            Err(SegmentRefusal::LongAndDefaultSize)
        );
    }

    #[test]
    fn entry_of_16bit_and_odd_segments() {
        // 16-bit code, byte-granular limit, runs in compatibility mode.
        let cs16 = Descriptor::segment(0x2_0000, 0xffff, P | S | X | RW | A | DPL3);
        let c = cache(0x0f, cs16);
        assert_eq!(code_size(&c, CpuMode::Legacy), CodeSize::Bits16);
        assert_eq!(
            entry_segment(SegReg::Cs, &c, CpuMode::Legacy)
                .expect("16-bit")
                .descriptor,
            Some(cs16)
        );
        // Expand-down 16-bit stack.
        let ss = Descriptor::segment(0x3_0000, 0x0fff, P | S | RW | CE | A | DPL3);
        assert_eq!(
            entry_segment(SegReg::Ss, &cache(0x17, ss), CpuMode::Legacy)
                .expect("stack")
                .descriptor,
            Some(ss)
        );
        // Conforming kernel code runs at CPL 3 and may be a data register.
        let conforming = Descriptor::segment(0, 0xf_ffff, P | S | X | RW | CE | A | G | DB);
        assert!(entry_segment(SegReg::Cs, &cache(0x13, conforming), CpuMode::Legacy).is_ok());
        assert!(entry_segment(SegReg::Ds, &cache(0x13, conforming), CpuMode::Legacy).is_ok());
        // The accessed bit is always set in what is loaded.
        let d = Descriptor::segment(0, 0xffff, P | S | RW | DPL3);
        assert!(entry_segment(SegReg::Ds, &cache(0x1f, d), CpuMode::Legacy)
            .expect("data")
            .descriptor
            .expect("d")
            .flags()
            .contains(A));
    }

    #[test]
    fn entry_refusals() {
        let data = Descriptor(USER_DS | A.bits());
        let code = Descriptor(USER_CS32 | A.bits());
        let legacy = CpuMode::Legacy;
        let cases: [(SegReg, KqemuSegmentCache, SegmentRefusal); 13] = [
            (SegReg::Cs, cache(0x7b, data), SegmentRefusal::WrongType),
            (SegReg::Ss, cache(0x73, code), SegmentRefusal::WrongType),
            (
                SegReg::Ss,
                cache(0x7b, Descriptor(data.0 & !RW.bits())),
                SegmentRefusal::WrongType,
            ),
            (
                SegReg::Ds,
                cache(0x73, Descriptor(code.0 & !RW.bits())),
                SegmentRefusal::WrongType,
            ),
            (
                SegReg::Ds,
                cache(0x7b, Descriptor(0x0000_e900_0000_0067)),
                SegmentRefusal::WrongType,
            ),
            (SegReg::Cs, cache(0x70, code), SegmentRefusal::Privilege),
            (
                SegReg::Cs,
                cache(0x13, Descriptor(0x00cf_9b00_0000_ffff)),
                SegmentRefusal::Privilege,
            ),
            (
                SegReg::Ss,
                cache(0x1b, Descriptor(0x00cf_9300_0000_ffff)),
                SegmentRefusal::Privilege,
            ),
            (
                SegReg::Ds,
                cache(0x1b, Descriptor(0x00cf_9300_0000_ffff)),
                SegmentRefusal::Privilege,
            ),
            (
                SegReg::Cs,
                KqemuSegmentCache::default(),
                SegmentRefusal::NotPresent,
            ),
            (
                SegReg::Es,
                KqemuSegmentCache {
                    selector: 0x7b,
                    ..KqemuSegmentCache::default()
                },
                SegmentRefusal::NotPresent,
            ),
            (
                SegReg::Ds,
                KqemuSegmentCache {
                    limit: 0x1000,
                    ..cache(0x7b, data)
                },
                SegmentRefusal::Limit,
            ),
            (
                SegReg::Ds,
                KqemuSegmentCache {
                    base: 1 << 32,
                    ..cache(0x7b, data)
                },
                SegmentRefusal::Base,
            ),
        ];
        for (reg, c, want) in cases {
            assert_eq!(entry_segment(reg, &c, legacy), Err(want), "{reg:?} {c:x?}");
        }
        let byte_granular = Descriptor(data.0 & !G.bits());
        let big = KqemuSegmentCache {
            limit: 0x10_0000,
            ..cache(0x7b, byte_granular)
        };
        assert_eq!(
            entry_segment(SegReg::Ds, &big, legacy),
            Err(SegmentRefusal::Limit)
        );
        let monitor = MONITOR_GDT_FIRST << 3 | 3;
        assert_eq!(
            entry_segment(SegReg::Ds, &cache(monitor, data), legacy),
            Err(SegmentRefusal::MonitorSelector)
        );
        // The same index in the LDT is the guest's.
        assert!(entry_segment(SegReg::Ds, &cache(monitor | 4, data), legacy).is_ok());
    }

    /// A run of an i386 process: CS 0x73, SS/DS/ES 0x7b, GS a TLS entry
    /// (0x33), under a GDT of 32 entries at 0xc100_0000.
    fn i386_run() -> (RunGdt, (u64, u32)) {
        let cs = cache(0x73, Descriptor(USER_CS32 | A.bits()));
        let ds = cache(0x7b, Descriptor(USER_DS | A.bits()));
        let gs = cache(0x33, Descriptor(USER_DS | A.bits()));
        let mut segments = [EntrySegment {
            selector: Selector(0),
            descriptor: None,
            base_msr: None,
        }; 6];
        for (reg, c) in [
            (SegReg::Es, ds),
            (SegReg::Cs, cs),
            (SegReg::Ss, ds),
            (SegReg::Ds, ds),
            (SegReg::Gs, gs),
        ] {
            segments[reg as usize] = entry_segment(reg, &c, CpuMode::Legacy).expect("entry");
        }
        (
            RunGdt::of_entry(&segments).expect("distinct entry descriptors"),
            (0xc100_0000, 32 * 8 - 1),
        )
    }

    const GP: u8 = VEC_GP;
    const NP: u8 = VEC_NP;
    const SS: u8 = VEC_SS;

    #[test]
    fn a_gdt_selector_is_filled_once_then_faults_are_the_guests() {
        let (mut gdt, table) = i386_run();
        assert_eq!(
            gdt.descriptors().iter().map(|d| d.0).collect::<Vec<_>>(),
            [0xf, 0xe, 0x6],
            "entry registers, one entry per index"
        );
        // `mov fs, 0x3b`: the empty shadow entry raised #GP(0x38).
        assert_eq!(
            gdt.on_fault(GP, 0x38, table, None),
            SegmentFault::Read {
                selector: Selector(0x38),
                linear: GuestVirt::new(0xc100_0038)
            }
        );
        let tls = Descriptor::segment(0x1234_5000, 0xfff, P | S | RW | A | DB | DPL3);
        assert_eq!(
            gdt.fill(Selector(7 << 3), tls, CpuMode::Legacy),
            Fill::Installed
        );
        assert_eq!(gdt.descriptors()[3], (7, tls.0));
        // Loaded natively now; the cache the client gets is the guest's.
        let c = gdt.loaded_cache(Selector(0x3b)).expect("filled");
        assert_eq!((c.selector, c.base, c.limit), (0x3b, 0x1234_5000, 0xfff));
        assert_eq!(gdt.loaded_cache(Selector(0x3f)), None, "LDT");
        // A second fault on it is the guest's (e.g. `mov ss` of a
        // read-only copy would be; here any #GP/#NP/#SS).
        for v in [GP, NP, SS] {
            assert_eq!(gdt.on_fault(v, 0x38, table, None), SegmentFault::Guest);
        }
    }

    #[test]
    fn faults_the_monitor_leaves_to_the_client() {
        let (gdt, table) = i386_run();
        // Entry registers' indices: the table may differ from the cache.
        assert_eq!(gdt.on_fault(GP, 0x78, table, None), SegmentFault::Client);
        // The monitor's indices, no selector, IDT/EXT bits, #TS, and
        // #NP/#SS on an index the shadow does not hold.
        let monitor = u64::from(MONITOR_GDT_FIRST) << 3;
        let big = (0, 0xffff);
        for (v, e, t) in [
            (GP, monitor, big),
            (GP, monitor + 0x10, big),
            (GP, 0, table),
            (GP, 0x3a, table),
            (GP, 0x39, table),
            (10, 0x38, table),
            (NP, 0x38, table),
            (SS, 0x38, table),
            (14, 0x38, table),
        ] {
            assert_eq!(
                gdt.on_fault(v, e, t, None),
                SegmentFault::Client,
                "{v} {e:#x}"
            );
        }
    }

    #[test]
    fn beyond_the_limit_is_the_guests_gp() {
        let (gdt, table) = i386_run();
        assert_eq!(gdt.on_fault(GP, 0x100, table, None), SegmentFault::Guest);
        // A descriptor that ends past the limit is beyond it too.
        assert_eq!(gdt.on_fault(GP, 0x38, (0, 0x3e), None), SegmentFault::Guest);
        assert!(matches!(
            gdt.on_fault(GP, 0x38, (0, 0x3f), None),
            SegmentFault::Read {
                selector: Selector(0x38),
                ..
            }
        ));
    }

    #[test]
    fn what_is_filled_and_what_the_client_emulates() {
        let (gdt, table) = i386_run();
        let legacy = CpuMode::Legacy;
        let filled = |d: Descriptor| {
            let mut g = gdt;
            let r = g.fill(Selector(9 << 3), d, legacy);
            (r, g)
        };
        // DPL 0 data: mirrored with its DPL; the retried load faults #GP
        // natively, which is the guest's.
        let kernel_ds = Descriptor(0x00cf_9300_0000_ffff);
        let (r, g) = filled(kernel_ds);
        assert_eq!(r, Fill::Installed);
        assert_eq!(g.descriptors()[3], (9, kernel_ds.0));
        assert_eq!(g.on_fault(GP, 0x48, table, None), SegmentFault::Guest);
        // An all-zero entry: #GP(selector) natively and on the guest CPU.
        let (r, g) = filled(Descriptor(0));
        assert_eq!(r, Fill::Installed);
        assert_eq!(g.descriptors()[3], (9, 0));
        assert_eq!(g.on_fault(GP, 0x48, table, None), SegmentFault::Guest);
        // Not present (A set): #NP or #SS natively, the guest's.
        let absent = Descriptor(USER_DS & !P.bits() | A.bits());
        let (r, g) = filled(absent);
        assert_eq!(r, Fill::Installed);
        assert_eq!(g.on_fault(NP, 0x48, table, None), SegmentFault::Guest);
        assert_eq!(g.on_fault(SS, 0x48, table, None), SegmentFault::Guest);
        assert_eq!(g.loaded_cache(Selector(0x4b)), None);
        // System descriptors, gates (present or not), code segments and
        // writable 16-bit data: the client.
        for d in [
            Descriptor(0x0000_8900_0000_0067),
            Descriptor(0x0000_0900_0000_0067),
            Descriptor(0x0000_ec00_0008_1000),
            Descriptor(USER_CS32 | A.bits()),
            Descriptor::segment(0, 0xffff, P | S | RW | A | DPL3),
        ] {
            let (r, g) = filled(d);
            assert_eq!(r, Fill::Client, "{d:x?}");
            assert_eq!(g.descriptors().len(), 3, "nothing installed");
        }
        // Read-only 16-bit data cannot be a stack: filled.
        assert_eq!(
            filled(Descriptor::segment(0, 0xffff, P | S | A | DPL3)).0,
            Fill::Installed
        );
    }

    #[test]
    fn the_accessed_bit_is_set_when_the_load_passes_its_checks() {
        let (mut gdt, table) = i386_run();
        let fresh = Descriptor(USER_DS);
        assert_eq!(
            gdt.fill(Selector(9 << 3), fresh, CpuMode::Legacy),
            Fill::Installed
        );
        let (_, raw) = gdt.descriptors()[3];
        assert!(!Descriptor(raw).present(), "not present until accessed");
        assert_eq!(gdt.loaded_cache(Selector(0x4b)), None);
        // A type or privilege failure comes first: #GP is the guest's, and
        // the guest's A stays clear as on the CPU.
        assert_eq!(gdt.on_fault(GP, 0x48, table, None), SegmentFault::Guest);
        for v in [NP, SS] {
            assert_eq!(
                gdt.on_fault(v, 0x48, table, None),
                SegmentFault::SetAccessed {
                    selector: Selector(0x48),
                    linear: GuestVirt::new(0xc100_0048),
                    guest: fresh
                }
            );
        }
        gdt.accessed(Selector(0x48), CpuMode::Legacy);
        assert_eq!(gdt.descriptors()[3], (9, USER_DS | A.bits()));
        assert_eq!(gdt.on_fault(NP, 0x48, table, None), SegmentFault::Guest);
        let c = gdt.loaded_cache(Selector(0x4b)).expect("loaded");
        assert_eq!(c.flags, ((USER_DS | A.bits()) >> 32) as u32);
    }

    #[test]
    fn fills_stop_when_the_switch_holds_no_more() {
        let (mut gdt, table) = i386_run();
        let tls = Descriptor(USER_DS | A.bits());
        let entry = gdt.descriptors().len();
        let last = 16 + (RUN_DESCRIPTORS - entry) as u16;
        for index in 16..last {
            assert!(matches!(
                gdt.on_fault(GP, u64::from(index) << 3, table, None),
                SegmentFault::Read { .. }
            ));
            assert_eq!(
                gdt.fill(Selector(index << 3), tls, CpuMode::Legacy),
                Fill::Installed
            );
        }
        assert_eq!(gdt.descriptors().len(), RUN_DESCRIPTORS);
        assert_eq!(RUN_DESCRIPTORS, 16, "what the switch holds");
        // An index is never filled twice, nor over an entry register's.
        assert_eq!(
            gdt.fill(Selector(16 << 3), tls, CpuMode::Legacy),
            Fill::Client
        );
        assert_eq!(
            gdt.fill(Selector(15 << 3), tls, CpuMode::Legacy),
            Fill::Client
        );
        let next = u64::from(last) << 3;
        assert_eq!(gdt.on_fault(GP, next, table, None), SegmentFault::Client);
        assert_eq!(
            gdt.fill(Selector(last << 3), tls, CpuMode::Legacy),
            Fill::Client
        );
        // Beyond the limit is still the guest's.
        assert_eq!(gdt.on_fault(GP, 40 << 3, table, None), SegmentFault::Guest);
        // The LDT's entries are counted apart.
        let ldt = Some((0x8000_0000, 0xfff));
        assert!(matches!(
            gdt.on_fault(GP, 0x0c, table, ldt),
            SegmentFault::Read { .. }
        ));
        assert_eq!(
            gdt.fill(Selector(0x0c), tls, CpuMode::Legacy),
            Fill::Installed
        );
        assert_eq!(gdt.ldt_descriptors(), [(1, tls.0)]);
    }

    /// An LDT of 16 entries at 0x8000_0000.
    const LDT: Option<(u64, u32)> = Some((0x8000_0000, 16 * 8 - 1));

    #[test]
    fn an_ldt_selector_is_read_from_the_guests_ldt() {
        let (mut gdt, table) = i386_run();
        // `mov ds, 0x0f` (LDT index 1, RPL 3): #GP(0x0c) on the empty
        // shadow LDT entry; read at ldt.base + 8.
        assert_eq!(
            gdt.on_fault(GP, 0x0c, table, LDT),
            SegmentFault::Read {
                selector: Selector(0x0c),
                linear: GuestVirt::new(0x8000_0008)
            }
        );
        let d = Descriptor::segment(0x1_0000, 0xff, P | S | RW | A | DB | DPL3);
        assert_eq!(
            gdt.fill(Selector(0x0c), d, CpuMode::Legacy),
            Fill::Installed
        );
        assert_eq!(gdt.ldt_descriptors(), [(1, d.0)]);
        assert_eq!(gdt.descriptors().len(), 3, "the GDT's list unchanged");
        // GDT index 1 is another entry.
        assert!(matches!(
            gdt.on_fault(GP, 0x08, table, LDT),
            SegmentFault::Read {
                selector: Selector(0x08),
                ..
            }
        ));
        let c = gdt.loaded_cache(Selector(0x0f)).expect("loaded");
        assert_eq!((c.selector, c.base, c.limit), (0x0f, 0x1_0000, 0xff));
        assert_eq!(gdt.loaded_cache(Selector(0x0b)), None, "GDT index 1");
        // A second fault is the guest's.
        assert_eq!(gdt.on_fault(GP, 0x0c, table, LDT), SegmentFault::Guest);
        // Not accessed yet: set in the guest's LDT once the checks pass.
        let fresh = Descriptor(USER_DS);
        assert_eq!(
            gdt.fill(Selector(0x14), fresh, CpuMode::Legacy),
            Fill::Installed
        );
        assert_eq!(
            gdt.on_fault(NP, 0x14, table, LDT),
            SegmentFault::SetAccessed {
                selector: Selector(0x14),
                linear: GuestVirt::new(0x8000_0010),
                guest: fresh
            }
        );
        gdt.accessed(Selector(0x14), CpuMode::Legacy);
        assert_eq!(gdt.ldt_descriptors()[1], (2, USER_DS | A.bits()));
    }

    #[test]
    fn ldt_selectors_the_monitor_refuses_or_leaves_to_the_guest() {
        let (mut gdt, table) = i386_run();
        // No LDT (null LDTR) or beyond its limit: the guest's #GP.
        assert_eq!(gdt.on_fault(GP, 0x0c, table, None), SegmentFault::Guest);
        assert_eq!(
            gdt.on_fault(GP, 16 << 3 | 4, table, LDT),
            SegmentFault::Guest
        );
        // Within the guest's limit but past the shadow LDT's page: the
        // client (the CPU checked the shadow's limit, not the guest's).
        let big = Some((0x8000_0000, 0xffff));
        let past = u64::from(SHADOW_LDT_ENTRIES) << 3 | 4;
        assert_eq!(gdt.on_fault(GP, past, table, big), SegmentFault::Client);
        let last = past - 8;
        assert!(matches!(
            gdt.on_fault(GP, last, table, big),
            SegmentFault::Read { .. }
        ));
        let d = Descriptor(USER_DS | A.bits());
        assert_eq!(
            gdt.fill(Selector(past as u16), d, CpuMode::Legacy),
            Fill::Client
        );
        // Code and system descriptors in the LDT: the client.
        for d in [
            Descriptor(USER_CS32 | A.bits()),
            Descriptor(0x0000_ec00_0008_1000),
        ] {
            assert_eq!(gdt.fill(Selector(0x0c), d, CpuMode::Legacy), Fill::Client);
        }
        // The LDT's own capacity.
        for i in 0..RUN_LDT_DESCRIPTORS as u16 {
            assert_eq!(
                gdt.fill(Selector(i << 3 | 4), d, CpuMode::Legacy),
                Fill::Installed
            );
        }
        assert_eq!(gdt.on_fault(GP, 0x84 | 4, table, big), SegmentFault::Client);
    }

    #[test]
    fn an_ldt_entry_register_has_its_shadow_from_the_cache() {
        let d = Descriptor::segment(0x2_0000, 0xfff, P | S | RW | A | DB | DPL3);
        let e = entry_segment(SegReg::Ds, &cache(0x0f, d), CpuMode::Legacy).expect("LDT DS");
        assert_eq!(e.descriptor, Some(d));
        let gdt = RunGdt::of_entry(&[e]).expect("one entry register");
        assert_eq!(gdt.ldt_descriptors(), [(1, d.0)]);
        assert!(gdt.descriptors().is_empty());
        // Its index: the table may differ from the cache.
        assert_eq!(gdt.on_fault(GP, 0x0c, (0, 0xff), LDT), SegmentFault::Client);
    }

    #[test]
    fn entry_registers_of_one_index_must_agree() {
        let old = Descriptor::segment(0x2_0000, 0xfff, P | S | RW | A | DB | DPL3);
        let new = Descriptor::segment(0x3_0000, 0xfff, P | S | RW | A | DB | DPL3);
        let ds = entry_segment(SegReg::Ds, &cache(0x0f, old), CpuMode::Legacy).expect("DS");
        let es = entry_segment(SegReg::Es, &cache(0x0f, old), CpuMode::Legacy).expect("ES");
        let fs = entry_segment(SegReg::Fs, &cache(0x0f, new), CpuMode::Legacy).expect("FS");
        let same = RunGdt::of_entry(&[ds, es]).expect("the same descriptor twice");
        assert_eq!(same.ldt_descriptors(), [(1, old.0)]);
        // FS loaded after the entry changed: its hidden part differs from
        // DS's, and one shadow entry cannot give both.
        assert!(RunGdt::of_entry(&[ds, fs]).is_none());
    }

    #[test]
    fn long_mode_fills_keep_no_l_bit_in_legacy_guests() {
        let (mut gdt, _) = i386_run();
        let data_with_l = Descriptor(USER_DS | A.bits() | L.bits());
        assert_eq!(
            gdt.fill(Selector(9 << 3), data_with_l, CpuMode::Legacy),
            Fill::Installed
        );
        assert_eq!(gdt.descriptors()[3].1, USER_DS | A.bits());
    }

    #[test]
    fn caches_of_native_loads() {
        let d = Descriptor(USER_DS | A.bits());
        let c = cache_of_load(Selector(0x7b), d);
        assert_eq!(
            (c.selector, c.flags, c.base, c.limit),
            (0x7b, 0x00cf_f300, 0, 0xffff_ffff)
        );
        let null = cache_of_load(Selector(3), d);
        assert_eq!(
            (null.selector, null.flags, null.base, null.limit),
            (3, 0, 0, 0)
        );
        // Round trip: a cache built from a load loads the same descriptor.
        let odd = Descriptor::segment(0x1234_5678, 0x9abc, P | S | RW | A | DPL3);
        let e = entry_segment(
            SegReg::Es,
            &cache_of_load(Selector(0x2f), odd),
            CpuMode::Legacy,
        )
        .expect("odd");
        assert_eq!(e.descriptor, Some(odd));
    }
}
