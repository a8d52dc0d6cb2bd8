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
//!   runs ([`shadow_of_guest`]).
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
    /// there too and must be emulated by the client ([`needs_client`]).
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

/// Whether a fault on the shadow entry of `guest` is a transfer the client
/// must emulate (a gate, a TSS, an LDT descriptor) rather than a fault of
/// the guest's own: a #GP(selector) on an empty entry.
pub fn needs_client(guest: Descriptor) -> bool {
    matches!(guest.kind(), DescriptorKind::System(_)) && guest.present()
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
        assert!(needs_client(call_gate) && needs_client(tss));
        assert!(!needs_client(Descriptor(0)) && !needs_client(Descriptor(USER_DS)));
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
