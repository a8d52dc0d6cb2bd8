//! The checks of `kqemu_cpu_state` before a normal-mode run (ABI.md "How
//! the client drives an EXEC", ARCHITECTURE.md "EXEC").
//!
//! Nothing from an earlier call is trusted: every field the world switch
//! will load into the CPU is checked here, on every EXEC, and every
//! failure is an answer the client handles (`KQEMU_RET_SOFTMMU`: it
//! emulates the next instructions itself), never a host fault. Values
//! that would fault in ring 0 when loaded (a non-canonical MSR or debug
//! address, reserved bits of DR6/DR7, a malformed descriptor) are refused
//! here so the world switch never meets them.

use bitflags::bitflags;

use crate::abi::{seg, KqemuCpuState, KqemuSegmentCache, KQEMU_RET_SOFTMMU};
use crate::monitor::mmu::{
    CpuPaging, Cr0, Cr4, Efer, PagingConfig, PagingConfigError, PagingRegisters,
};
use crate::monitor::segments::{
    code_size, entry_segment, CodeSize, CpuMode, Descriptor, DescriptorFlags, DescriptorKind,
    EntrySegment, SegReg, SegmentRefusal, Selector,
};

bitflags! {
    /// EFLAGS (SDM Vol. 1 3.4.3, Vol. 3A 2.3).
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Eflags: u64 {
        const CF = 1 << 0;
        /// Reserved, always 1.
        const FIXED1 = 1 << 1;
        const PF = 1 << 2;
        const AF = 1 << 4;
        const ZF = 1 << 6;
        const SF = 1 << 7;
        /// Trap flag: single-step.
        const TF = 1 << 8;
        /// Interrupt enable.
        const IF = 1 << 9;
        const DF = 1 << 10;
        const OF = 1 << 11;
        /// I/O privilege level (two bits).
        const IOPL = 3 << 12;
        /// Nested task.
        const NT = 1 << 14;
        /// Resume flag.
        const RF = 1 << 16;
        /// Virtual-8086 mode.
        const VM = 1 << 17;
        /// Alignment check (with CR0.AM at CPL 3).
        const AC = 1 << 18;
        const VIF = 1 << 19;
        const VIP = 1 << 20;
        const ID = 1 << 21;
    }
}

/// The A20 masks the client uses: A20 enabled (all ones) or disabled (bit
/// 20 clear), QEMU's `a20_mask`.
const A20_ENABLED: u64 = u64::MAX;
const A20_DISABLED: u64 = !(1 << 20);

/// CR4 bits a normal-mode guest may have set. Refused: LA57 (5-level
/// paging is not walked), PKE (PKRU is not part of the state), CET (the
/// user shadow-stack MSRs are not either), KL and UINTR (user instructions
/// that would use the host's internal key or interrupt state).
const CR4_SUPPORTED: Cr4 = Cr4::VME
    .union(Cr4::PVI)
    .union(Cr4::TSD)
    .union(Cr4::DE)
    .union(Cr4::PSE)
    .union(Cr4::PAE)
    .union(Cr4::MCE)
    .union(Cr4::PGE)
    .union(Cr4::PCE)
    .union(Cr4::OSFXSR)
    .union(Cr4::OSXMMEXCPT)
    .union(Cr4::UMIP)
    .union(Cr4::VMXE)
    .union(Cr4::SMXE)
    .union(Cr4::FSGSBASE)
    .union(Cr4::PCIDE)
    .union(Cr4::OSXSAVE)
    .union(Cr4::SMEP)
    .union(Cr4::SMAP)
    .union(Cr4::PKS);

/// EFER bits a normal-mode guest may have set. AMD's LMSLE is refused: it
/// would apply segment limits to 64-bit code at CPL 3.
const EFER_SUPPORTED: Efer = Efer::SCE
    .union(Efer::LME)
    .union(Efer::LMA)
    .union(Efer::NXE)
    .union(Efer::SVME)
    .union(Efer::FFXSR)
    .union(Efer::TCE);

/// DR7 bits: L0-G3 enables (7:0), LE/GE (9:8), bit 10 reads as 1, GD (13),
/// R/W and LEN fields (31:16); bits 11, 12, 14, 15 and 63:32 are reserved
/// (SDM Vol. 3B 18.2.4).
const DR7_ENABLES: u64 = 0xff;
const DR7_FIXED1: u64 = 1 << 10;
const DR7_GENERAL_DETECT: u64 = 1 << 13;
const DR7_RESERVED: u64 = !0xffff_27ff;
/// DR6 bits 63:32 are reserved; MOV to DR6 with any of them faults.
const DR6_RESERVED: u64 = !0xffff_ffff;

/// Why a state cannot run natively in normal mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `user_only` is not 1: full virtualization is not implemented.
    NotNormalMode,
    /// CPL is not 3.
    Cpl(u8),
    /// CR0.PE = 0 (real mode), or bits 63:32 of CR0 set.
    Cr0,
    /// Reserved EFLAGS bits set, or bit 1 clear.
    EflagsReserved,
    /// EFLAGS.VM = 1: virtual-8086 mode.
    Vm86,
    /// EFLAGS.IF = 0: the client must deliver nothing while the guest
    /// cannot be interrupted, and the host must keep interrupts on.
    InterruptsDisabled,
    /// IOPL = 3: CPL-3 code could execute CLI, STI and port I/O.
    Iopl,
    /// A CR4 bit outside [`CR4_SUPPORTED`].
    Cr4,
    /// A reserved or unsupported EFER bit, or LMA without LME.
    Efer,
    /// An A20 mask the client never produces.
    A20Mask,
    Paging(PagingConfigError),
    Segment(SegReg, SegmentRefusal),
    /// The instruction pointer is not canonical (64-bit code) or not a 32-bit
    /// offset (other code).
    InstructionPointer,
    /// The GDT or LDT cache is malformed.
    DescriptorTable,
    /// Debug registers the CPU would refuse to load, or DR7.GD, which would
    /// make the monitor's own debug-register accesses fault.
    DebugRegisters,
}

impl Refusal {
    /// The answer for the client: it emulates.
    pub fn retval(self) -> i32 {
        KQEMU_RET_SOFTMMU
    }
}

/// The guest's descriptor tables as the world switch needs them for the
/// shadow GDT and LDT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DescriptorTables {
    /// GDT base (linear) and byte limit.
    pub gdt: (u64, u32),
    /// LDT base and byte limit, when an LDT is loaded.
    pub ldt: Option<(u64, u32)>,
}

/// Breakpoints the guest enabled (the client passes DR0-DR3 and DR7 only
/// then).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DebugRegisters {
    pub dr: [u64; 4],
    pub dr7: u64,
}

/// A state that may run natively, with what the world switch loads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NormalModeEntry {
    pub paging: PagingConfig,
    pub mode: CpuMode,
    pub code_size: CodeSize,
    /// In ABI order: ES, CS, SS, DS, FS, GS.
    pub segments: [EntrySegment; seg::COUNT],
    pub tables: DescriptorTables,
    /// The guest's CR0. The world switch honours TS and EM (#NM on FPU use,
    /// the guest kernel's lazy FPU switching) and AM (#AC at CPL 3 with
    /// EFLAGS.AC), or the run is not exact.
    pub cr0: Cr0,
    /// The guest's CR4. TSD, PCE, UMIP, OSFXSR, OSXMMEXCPT, OSXSAVE and
    /// FSGSBASE decide which CPL-3 instructions fault.
    pub cr4: Cr4,
    /// EFER.SCE: without it the guest's SYSCALL raises #UD.
    pub syscall_enabled: bool,
    pub debug: Option<DebugRegisters>,
    /// SS is a 16-bit stack: an IRET to it restores only SP, the switch
    /// must supply the guest's bits 31:16 of ESP itself.
    pub stack_16bit: bool,
}

/// Checks `state` for a normal-mode run on a CPU described by `cpu`.
pub fn validate_normal_mode(
    state: &KqemuCpuState,
    cpu: CpuPaging,
) -> Result<NormalModeEntry, Refusal> {
    if state.user_only != 1 {
        return Err(Refusal::NotNormalMode);
    }
    if state.cpl != 3 {
        return Err(Refusal::Cpl(state.cpl));
    }
    let cr0 = Cr0::from_bits_retain(state.cr0);
    if !cr0.contains(Cr0::PE) || state.cr0 >> 32 != 0 {
        return Err(Refusal::Cr0);
    }
    check_eflags(state.eflags)?;
    let cr4 = Cr4::from_bits(state.cr4)
        .filter(|c| CR4_SUPPORTED.contains(*c))
        .ok_or(Refusal::Cr4)?;
    let efer = Efer::from_bits(state.efer)
        .filter(|e| EFER_SUPPORTED.contains(*e))
        .ok_or(Refusal::Efer)?;
    if efer.contains(Efer::LMA) && !efer.contains(Efer::LME) {
        return Err(Refusal::Efer);
    }
    if state.a20_mask != A20_ENABLED && state.a20_mask != A20_DISABLED {
        return Err(Refusal::A20Mask);
    }
    let regs = PagingRegisters {
        cr0: state.cr0,
        cr3: state.cr3,
        cr4: state.cr4,
        efer: state.efer,
        a20_mask: state.a20_mask,
    };
    let paging = PagingConfig::new(&regs, cpu).map_err(Refusal::Paging)?;
    let mode = if efer.contains(Efer::LMA) {
        CpuMode::Long
    } else {
        CpuMode::Legacy
    };

    let mut segments = [EntrySegment {
        selector: Selector(0),
        descriptor: None,
        base_msr: None,
    }; seg::COUNT];
    for (slot, reg) in segments.iter_mut().zip(SegReg::ALL) {
        *slot = entry_segment(reg, &state.segs[reg as usize], mode)
            .map_err(|e| Refusal::Segment(reg, e))?;
    }
    let code_size = code_size(&state.segs[seg::CS], mode);
    let eip_ok = match code_size {
        CodeSize::Bits64 => is_canonical(state.eip),
        CodeSize::Bits32 | CodeSize::Bits16 => state.eip <= u64::from(u32::MAX),
    };
    if !eip_ok {
        return Err(Refusal::InstructionPointer);
    }
    let stack_16bit = segments[seg::SS]
        .descriptor
        .is_some_and(|d| !d.flags().contains(DescriptorFlags::DEFAULT_SIZE));

    Ok(NormalModeEntry {
        paging,
        mode,
        code_size,
        segments,
        tables: descriptor_tables(state, mode)?,
        cr0,
        cr4,
        syscall_enabled: efer.contains(Efer::SCE),
        debug: debug_registers(state, mode)?,
        stack_16bit,
    })
}

fn check_eflags(value: u64) -> Result<(), Refusal> {
    let flags = Eflags::from_bits(value).ok_or(Refusal::EflagsReserved)?;
    if !flags.contains(Eflags::FIXED1) {
        return Err(Refusal::EflagsReserved);
    }
    if flags.contains(Eflags::VM) {
        return Err(Refusal::Vm86);
    }
    if !flags.contains(Eflags::IF) {
        return Err(Refusal::InterruptsDisabled);
    }
    if flags.contains(Eflags::IOPL) {
        return Err(Refusal::Iopl);
    }
    Ok(())
}

/// A linear address the mode can hold: canonical in IA-32e mode, 32 bits
/// otherwise.
fn address_ok(addr: u64, mode: CpuMode) -> bool {
    match mode {
        CpuMode::Long => is_canonical(addr),
        CpuMode::Legacy => addr <= u64::from(u32::MAX),
    }
}

fn descriptor_tables(state: &KqemuCpuState, mode: CpuMode) -> Result<DescriptorTables, Refusal> {
    // LGDT takes a 16-bit limit.
    if state.gdt.limit > 0xffff || !address_ok(state.gdt.base, mode) {
        return Err(Refusal::DescriptorTable);
    }
    let ldt = ldt_of(&state.ldt, mode)?;
    Ok(DescriptorTables {
        gdt: (state.gdt.base, state.gdt.limit),
        ldt,
    })
}

fn ldt_of(cache: &KqemuSegmentCache, mode: CpuMode) -> Result<Option<(u64, u32)>, Refusal> {
    if Selector(cache.selector).is_null() {
        return Ok(None);
    }
    let attributes = Descriptor(u64::from(cache.flags) << 32);
    // LLDT loads only a present LDT descriptor (type 2, SDM Vol. 3A LLDT).
    if !attributes.present()
        || attributes.kind() != DescriptorKind::System(2)
        || !address_ok(cache.base, mode)
    {
        return Err(Refusal::DescriptorTable);
    }
    // A selector indexes at most 8192 entries: a larger limit adds nothing.
    Ok(Some((cache.base, cache.limit.min(0xffff))))
}

fn debug_registers(
    state: &KqemuCpuState,
    mode: CpuMode,
) -> Result<Option<DebugRegisters>, Refusal> {
    if state.dr6 & DR6_RESERVED != 0 {
        return Err(Refusal::DebugRegisters);
    }
    if state.dr7 & DR7_ENABLES == 0 {
        return Ok(None);
    }
    let dr7 = state.dr7 | DR7_FIXED1;
    if dr7 & (DR7_RESERVED | DR7_GENERAL_DETECT) != 0 {
        return Err(Refusal::DebugRegisters);
    }
    let dr = [state.dr0, state.dr1, state.dr2, state.dr3];
    if !dr.iter().all(|&a| address_ok(a, mode)) {
        return Err(Refusal::DebugRegisters);
    }
    Ok(Some(DebugRegisters { dr, dr7 }))
}

fn is_canonical(addr: u64) -> bool {
    let high = addr >> 47;
    high == 0 || high == (1 << 17) - 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::mmu::PagingMode;
    use crate::monitor::segments::cache_of_load;

    const CPU: CpuPaging = CpuPaging {
        max_phys_addr_bits: 40,
        gib_pages: true,
    };
    const USER_CS32: u64 = 0x00cf_fb00_0000_ffff;
    const USER_CS64: u64 = 0x00af_fb00_0000_ffff;
    const USER_DS: u64 = 0x00cf_f300_0000_ffff;
    const LDT: u64 = 0x0000_8200_0000_0fff;

    /// A 32-bit process of a PAE guest, as QEMU hands it over.
    fn state32() -> KqemuCpuState {
        let mut s = KqemuCpuState {
            eip: 0x0804_8000,
            eflags: (Eflags::FIXED1 | Eflags::IF | Eflags::ZF).bits(),
            cr0: (Cr0::PE | Cr0::PG | Cr0::WP | Cr0::ET | Cr0::NE).bits(),
            cr3: 0x0123_4000,
            cr4: (Cr4::PAE | Cr4::PGE | Cr4::OSFXSR | Cr4::OSXMMEXCPT).bits(),
            a20_mask: A20_ENABLED,
            efer: (Efer::NXE | Efer::SCE).bits(),
            cpl: 3,
            user_only: 1,
            ..KqemuCpuState::default()
        };
        s.segs[seg::CS] = cache_of_load(Selector(0x73), Descriptor(USER_CS32));
        for i in [seg::SS, seg::DS, seg::ES] {
            s.segs[i] = cache_of_load(Selector(0x7b), Descriptor(USER_DS));
        }
        s.segs[seg::GS] = KqemuSegmentCache {
            base: 0xb7f0_0000,
            ..cache_of_load(Selector(0x33), Descriptor(USER_DS))
        };
        s.gdt = KqemuSegmentCache {
            base: 0xc1a0_0000,
            limit: 0xff,
            ..KqemuSegmentCache::default()
        };
        s
    }

    /// A 64-bit process of a long-mode guest.
    fn state64() -> KqemuCpuState {
        let mut s = state32();
        s.eip = 0x0000_5555_5555_4000;
        s.efer |= (Efer::LME | Efer::LMA).bits();
        s.segs[seg::CS] = cache_of_load(Selector(0x33), Descriptor(USER_CS64));
        s.segs[seg::SS] = cache_of_load(Selector(0x2b), Descriptor(USER_DS));
        s.segs[seg::DS] = KqemuSegmentCache::default();
        s.segs[seg::ES] = KqemuSegmentCache::default();
        s.segs[seg::FS] = KqemuSegmentCache {
            base: 0x7fff_f7d8_b740,
            ..KqemuSegmentCache::default()
        };
        s.segs[seg::GS] = KqemuSegmentCache::default();
        s.gdt.base = 0xffff_fe00_0000_1000;
        s
    }

    #[test]
    fn a_32bit_process_is_accepted() {
        let e = validate_normal_mode(&state32(), CPU).expect("valid");
        assert_eq!((e.mode, e.code_size), (CpuMode::Legacy, CodeSize::Bits32));
        assert_eq!(e.paging.mode(), PagingMode::Pae);
        assert_eq!(
            e.segments[seg::GS].descriptor.map(|d| d.base()),
            Some(0xb7f0_0000)
        );
        assert!(e.segments.iter().all(|s| s.base_msr.is_none()));
        assert_eq!(e.segments[seg::FS].descriptor, None);
        assert_eq!(
            e.tables,
            DescriptorTables {
                gdt: (0xc1a0_0000, 0xff),
                ldt: None
            }
        );
        assert!(e.syscall_enabled && e.debug.is_none() && !e.stack_16bit);
        assert!(e.cr4.contains(Cr4::OSFXSR));
    }

    #[test]
    fn a_64bit_process_is_accepted() {
        let e = validate_normal_mode(&state64(), CPU).expect("valid");
        assert_eq!((e.mode, e.code_size), (CpuMode::Long, CodeSize::Bits64));
        assert_eq!(e.paging.mode(), PagingMode::Level4);
        assert_eq!(e.segments[seg::FS].base_msr, Some(0x7fff_f7d8_b740));
        assert_eq!(e.segments[seg::GS].base_msr, Some(0));
    }

    #[test]
    fn compatibility_mode_process_is_accepted() {
        let mut s = state64();
        s.segs[seg::CS] = cache_of_load(Selector(0x23), Descriptor(USER_CS32));
        s.eip = 0xffff_f000;
        let e = validate_normal_mode(&s, CPU).expect("valid");
        assert_eq!((e.mode, e.code_size), (CpuMode::Long, CodeSize::Bits32));
        s.eip = 0x1_0000_0000;
        assert_eq!(
            validate_normal_mode(&s, CPU),
            Err(Refusal::InstructionPointer)
        );
    }

    /// A change to a valid state.
    type Change = fn(&mut KqemuCpuState);

    #[test]
    fn mode_refusals() {
        let cases: [(Change, Refusal); 12] = [
            (|s| s.user_only = 0, Refusal::NotNormalMode),
            (|s| s.cpl = 0, Refusal::Cpl(0)),
            (|s| s.cr0 &= !Cr0::PE.bits(), Refusal::Cr0),
            (|s| s.cr0 |= 1 << 40, Refusal::Cr0),
            (|s| s.eflags |= Eflags::VM.bits(), Refusal::Vm86),
            (
                |s| s.eflags &= !Eflags::IF.bits(),
                Refusal::InterruptsDisabled,
            ),
            (|s| s.eflags |= Eflags::IOPL.bits(), Refusal::Iopl),
            (
                |s| s.eflags &= !Eflags::FIXED1.bits(),
                Refusal::EflagsReserved,
            ),
            (|s| s.eflags |= 1 << 3, Refusal::EflagsReserved),
            (|s| s.eflags |= 1 << 32, Refusal::EflagsReserved),
            (|s| s.a20_mask = 0xffff_ffff, Refusal::A20Mask),
            (|s| s.efer |= Efer::LMA.bits(), Refusal::Efer),
        ];
        for (i, (change, want)) in cases.iter().enumerate() {
            let mut s = state32();
            change(&mut s);
            assert_eq!(validate_normal_mode(&s, CPU), Err(*want), "case {i}");
            assert_eq!(want.retval(), KQEMU_RET_SOFTMMU);
        }
        // IOPL 1 and 2 still trap CLI/STI/IN/OUT at CPL 3.
        let mut s = state32();
        s.eflags |= 1 << 12;
        assert!(validate_normal_mode(&s, CPU).is_ok());
        // A20 disabled is a mask the client produces.
        s.a20_mask = A20_DISABLED;
        assert!(validate_normal_mode(&s, CPU).is_ok());
    }

    #[test]
    fn control_register_refusals() {
        for bit in [Cr4::LA57, Cr4::PKE, Cr4::CET, Cr4::KL, Cr4::UINTR] {
            let mut s = state64();
            s.cr4 |= bit.bits();
            assert_eq!(validate_normal_mode(&s, CPU), Err(Refusal::Cr4), "{bit:?}");
        }
        let mut s = state32();
        s.cr4 |= 1 << 40;
        assert_eq!(validate_normal_mode(&s, CPU), Err(Refusal::Cr4));
        let mut s = state32();
        s.efer |= Efer::LMSLE.bits();
        assert_eq!(validate_normal_mode(&s, CPU), Err(Refusal::Efer));
        let mut s = state32();
        s.efer |= 1 << 20;
        assert_eq!(validate_normal_mode(&s, CPU), Err(Refusal::Efer));
        // Paging checks: CR3 beyond MAXPHYADDR, long mode without PAE.
        let mut s = state64();
        s.cr3 = 1 << 45;
        assert_eq!(
            validate_normal_mode(&s, CPU),
            Err(Refusal::Paging(PagingConfigError::Cr3ReservedBits))
        );
        let mut s = state32();
        s.cr3 = 1 << 33;
        assert_eq!(
            validate_normal_mode(&s, CPU),
            Err(Refusal::Paging(PagingConfigError::Cr3ReservedBits))
        );
        let mut s = state64();
        s.cr4 &= !Cr4::PAE.bits();
        assert_eq!(
            validate_normal_mode(&s, CPU),
            Err(Refusal::Paging(PagingConfigError::InconsistentLongMode))
        );
        // Lazy FPU and alignment checks reach the world switch.
        let mut s = state32();
        s.cr0 |= (Cr0::TS | Cr0::AM).bits();
        let e = validate_normal_mode(&s, CPU).expect("valid");
        assert!(e.cr0.contains(Cr0::TS | Cr0::AM));
        // Paging off is protected mode still.
        let mut s = state32();
        s.cr0 &= !Cr0::PG.bits();
        assert_eq!(
            validate_normal_mode(&s, CPU).map(|e| e.paging.mode()),
            Ok(PagingMode::Disabled)
        );
    }

    #[test]
    fn segment_and_pointer_refusals() {
        let mut s = state32();
        s.segs[seg::SS] = s.segs[seg::CS];
        assert_eq!(
            validate_normal_mode(&s, CPU),
            Err(Refusal::Segment(SegReg::Ss, SegmentRefusal::WrongType))
        );
        let mut s = state32();
        s.segs[seg::CS].selector = 0x70;
        assert_eq!(
            validate_normal_mode(&s, CPU),
            Err(Refusal::Segment(SegReg::Cs, SegmentRefusal::Privilege))
        );
        let mut s = state64();
        s.segs[seg::FS].base = 0x0000_8000_0000_0000;
        assert_eq!(
            validate_normal_mode(&s, CPU),
            Err(Refusal::Segment(SegReg::Fs, SegmentRefusal::Base))
        );
        let mut s = state64();
        s.eip = 0x0000_8000_0000_0000;
        assert_eq!(
            validate_normal_mode(&s, CPU),
            Err(Refusal::InstructionPointer)
        );
        let mut s = state32();
        s.eip = 0x1_0000_0000;
        assert_eq!(
            validate_normal_mode(&s, CPU),
            Err(Refusal::InstructionPointer)
        );
        // A 16-bit stack is reported.
        let mut s = state32();
        s.segs[seg::SS] = cache_of_load(Selector(0x7b), Descriptor(0x0000_f300_0000_ffff));
        assert!(validate_normal_mode(&s, CPU).expect("valid").stack_16bit);
    }

    #[test]
    fn descriptor_table_checks() {
        let mut s = state32();
        s.ldt = KqemuSegmentCache {
            base: 0xc200_0000,
            ..cache_of_load(Selector(0x28), Descriptor(LDT))
        };
        let e = validate_normal_mode(&s, CPU).expect("valid");
        assert_eq!(e.tables.ldt, Some((0xc200_0000, 0xfff)));
        // A huge LDT limit is clamped to what selectors can index.
        s.ldt.limit = 0xffff_ffff;
        assert_eq!(
            validate_normal_mode(&s, CPU).expect("valid").tables.ldt,
            Some((0xc200_0000, 0xffff))
        );
        let bad_ldts = [
            KqemuSegmentCache { flags: 0, ..s.ldt },
            KqemuSegmentCache {
                flags: (USER_DS >> 32) as u32,
                ..s.ldt
            },
            KqemuSegmentCache {
                base: 1 << 32,
                ..s.ldt
            },
        ];
        for ldt in bad_ldts {
            let mut s = state32();
            s.ldt = ldt;
            assert_eq!(
                validate_normal_mode(&s, CPU),
                Err(Refusal::DescriptorTable),
                "{ldt:x?}"
            );
        }
        let mut s = state32();
        s.gdt.limit = 0x1_0000;
        assert_eq!(validate_normal_mode(&s, CPU), Err(Refusal::DescriptorTable));
        let mut s = state64();
        s.gdt.base = 0x0000_8000_0000_0000;
        assert_eq!(validate_normal_mode(&s, CPU), Err(Refusal::DescriptorTable));
    }

    #[test]
    fn debug_register_checks() {
        let mut s = state64();
        s.dr7 = 0x0001_0003;
        s.dr0 = 0x0000_5555_5555_4000;
        let e = validate_normal_mode(&s, CPU).expect("valid");
        assert_eq!(
            e.debug,
            Some(DebugRegisters {
                dr: [0x0000_5555_5555_4000, 0, 0, 0],
                dr7: 0x0001_0403
            })
        );
        // Registers the CPU refuses, or that would trap the monitor.
        let bad: [Change; 5] = [
            |s| s.dr0 = 0x0000_8000_0000_0000,
            |s| s.dr7 |= 1 << 32,
            |s| s.dr7 |= 1 << 12,
            |s| s.dr7 |= DR7_GENERAL_DETECT,
            |s| s.dr6 = 1 << 40,
        ];
        for (i, change) in bad.iter().enumerate() {
            let mut t = s;
            change(&mut t);
            assert_eq!(
                validate_normal_mode(&t, CPU),
                Err(Refusal::DebugRegisters),
                "case {i}"
            );
        }
        // Breakpoints disabled: the addresses are not looked at.
        let mut t = s;
        t.dr7 = 0;
        t.dr0 = u64::MAX;
        assert_eq!(validate_normal_mode(&t, CPU).expect("valid").debug, None);
        // A legacy guest's breakpoints are 32-bit linear addresses.
        let mut t = state32();
        t.dr7 = 0x1;
        t.dr1 = 1 << 32;
        assert_eq!(validate_normal_mode(&t, CPU), Err(Refusal::DebugRegisters));
    }
}
