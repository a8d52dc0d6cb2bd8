//! The guest's own address translation: a walk of the guest page tables
//! exactly as the processor does it (Intel SDM Vol. 3A chapter 4).
//!
//! The shadow page tables (shadow.rs) are filled from the results of this
//! walk, so everything the guest can observe of paging comes from here:
//! which accesses fault and with which error code (SDM 4.7), which
//! reserved bits are checked (4.3, 4.4.2, 4.5), how rights combine across
//! levels (4.6), and the Accessed and Dirty flags set in the guest's own
//! entries (4.8). Three formats: 32-bit paging with 4 MiB pages when
//! CR4.PSE = 1 (4.3), PAE paging with 2 MiB pages (4.4) and 4-level paging
//! with 2 MiB and 1 GiB pages (4.5). 5-level paging is refused by
//! [`PagingConfig::new`].
//!
//! Guest memory is reached only through [`GuestPhysMem`]; the walk never
//! loops without bound (one pass per level, a fixed number of restarts
//! when an entry changes under it) and never panics on guest data.

use core::fmt;

use bitflags::bitflags;

/// log2 of the size of a page (4 KiB), the unit of every shadow mapping.
pub const PAGE_SHIFT: u32 = 12;
/// Size of a 4 KiB page.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
const PAGE_OFFSET_MASK: u64 = PAGE_SIZE - 1;

macro_rules! address_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
        #[repr(transparent)]
        pub struct $name(u64);

        impl $name {
            /// The address `value`.
            pub const fn new(value: u64) -> Self {
                Self(value)
            }

            /// The address as a number.
            pub const fn as_u64(self) -> u64 {
                self.0
            }

            /// The start of the 4 KiB page that holds the address.
            pub const fn page_base(self) -> Self {
                Self(self.0 & !PAGE_OFFSET_MASK)
            }

            /// The offset of the address inside its 4 KiB page.
            pub const fn page_offset(self) -> u64 {
                self.0 & PAGE_OFFSET_MASK
            }

            /// The number of the 4 KiB page that holds the address.
            pub const fn page_number(self) -> u64 {
                self.0 >> PAGE_SHIFT
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({:#x})"), self.0)
            }
        }
    };
}

address_type!(
    /// A guest linear address (the "virtual" address after segmentation,
    /// SDM 3.1), as the guest's page tables translate it.
    GuestVirt
);
address_type!(
    /// A guest-physical address: what the guest's page tables produce,
    /// looked up in the client's physical memory map (ram.rs).
    GuestPhys
);
address_type!(
    /// A host-physical address: what the host CPU's page tables (the shadow
    /// tables) contain.
    HostPhys
);

bitflags! {
    /// CR0 (SDM Vol. 3A 2.5).
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Cr0: u64 {
        /// Protection enable.
        const PE = 1 << 0;
        /// Monitor coprocessor.
        const MP = 1 << 1;
        /// x87 emulation: FPU instructions raise #NM.
        const EM = 1 << 2;
        /// Task switched: the next FPU instruction raises #NM.
        const TS = 1 << 3;
        /// Extension type (hard-wired to 1).
        const ET = 1 << 4;
        /// Numeric error reporting through #MF.
        const NE = 1 << 5;
        /// Write protect: supervisor writes honour read-only pages.
        const WP = 1 << 16;
        /// Alignment mask: #AC at CPL 3 when EFLAGS.AC = 1.
        const AM = 1 << 18;
        /// Not write-through.
        const NW = 1 << 29;
        /// Cache disable.
        const CD = 1 << 30;
        /// Paging.
        const PG = 1 << 31;
    }
}

bitflags! {
    /// CR4 (SDM Vol. 3A 2.5).
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Cr4: u64 {
        /// Virtual-8086 mode extensions.
        const VME = 1 << 0;
        /// Protected-mode virtual interrupts.
        const PVI = 1 << 1;
        /// RDTSC at CPL > 0 raises #GP.
        const TSD = 1 << 2;
        /// Debugging extensions.
        const DE = 1 << 3;
        /// 4 MiB pages in 32-bit paging.
        const PSE = 1 << 4;
        /// Physical address extension (PAE or 4-level paging).
        const PAE = 1 << 5;
        /// Machine-check enable.
        const MCE = 1 << 6;
        /// Global pages.
        const PGE = 1 << 7;
        /// RDPMC at any CPL.
        const PCE = 1 << 8;
        /// FXSAVE/FXRSTOR and SSE enabled by the OS.
        const OSFXSR = 1 << 9;
        /// Unmasked SIMD floating-point exceptions raise #XM.
        const OSXMMEXCPT = 1 << 10;
        /// User-mode instruction prevention (SGDT, SIDT, SLDT, SMSW, STR).
        const UMIP = 1 << 11;
        /// 57-bit linear addresses (5-level paging).
        const LA57 = 1 << 12;
        /// VMX enable.
        const VMXE = 1 << 13;
        /// SMX enable.
        const SMXE = 1 << 14;
        /// RDFSBASE/WRFSBASE/RDGSBASE/WRGSBASE at any CPL.
        const FSGSBASE = 1 << 16;
        /// Process-context identifiers.
        const PCIDE = 1 << 17;
        /// XSAVE and extended states enabled by the OS.
        const OSXSAVE = 1 << 18;
        /// Key Locker.
        const KL = 1 << 19;
        /// Supervisor-mode execution prevention.
        const SMEP = 1 << 20;
        /// Supervisor-mode access prevention.
        const SMAP = 1 << 21;
        /// Protection keys for user-mode pages.
        const PKE = 1 << 22;
        /// Control-flow enforcement technology.
        const CET = 1 << 23;
        /// Protection keys for supervisor-mode pages.
        const PKS = 1 << 24;
        /// User interrupts.
        const UINTR = 1 << 25;
    }
}

bitflags! {
    /// IA32_EFER (SDM Vol. 3A 2.2.1, Vol. 4 MSR C000_0080H).
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Efer: u64 {
        /// SYSCALL/SYSRET enable.
        const SCE = 1 << 0;
        /// IA-32e mode enable.
        const LME = 1 << 8;
        /// IA-32e mode active.
        const LMA = 1 << 10;
        /// Execute-disable bit enable.
        const NXE = 1 << 11;
        /// AMD: secure virtual machine enable.
        const SVME = 1 << 12;
        /// AMD: long mode segment limit enable.
        const LMSLE = 1 << 13;
        /// AMD: fast FXSAVE/FXRSTOR.
        const FFXSR = 1 << 14;
        /// AMD: translation cache extension.
        const TCE = 1 << 15;
    }
}

bitflags! {
    /// The bits of a guest paging-structure entry that the walk looks at
    /// (SDM Vol. 3A Tables 4-4 to 4-20). The address fields depend on the
    /// format and level and are extracted by the walk.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct PteFlags: u64 {
        /// Present.
        const PRESENT = 1 << 0;
        /// Writes allowed (combined with the other levels).
        const WRITABLE = 1 << 1;
        /// User-mode accesses allowed (combined with the other levels).
        const USER = 1 << 2;
        /// Page-level write-through.
        const WRITE_THROUGH = 1 << 3;
        /// Page-level cache disable.
        const CACHE_DISABLE = 1 << 4;
        /// Accessed: set by the processor when it uses the entry (4.8).
        const ACCESSED = 1 << 5;
        /// Dirty: set in the entry that maps the page on a write (4.8).
        const DIRTY = 1 << 6;
        /// Page size: the entry maps a page instead of a table.
        const PAGE_SIZE = 1 << 7;
        /// Global translation (CR4.PGE).
        const GLOBAL = 1 << 8;
        /// Execute disable (XD), with IA32_EFER.NXE = 1 in PAE and 4-level
        /// paging.
        const NO_EXECUTE = 1 << 63;
    }
}

bitflags! {
    /// The page-fault error code (SDM Vol. 3A 4.7, Figure 4-12).
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct PageFaultCode: u32 {
        /// 0: no valid translation because of a not-present entry;
        /// 1: a protection violation or a reserved bit.
        const PRESENT = 1 << 0;
        /// The access was a write.
        const WRITE = 1 << 1;
        /// The access was a user-mode access (CPL 3, not an implicit
        /// supervisor access).
        const USER = 1 << 2;
        /// A reserved bit was set in some paging-structure entry.
        const RESERVED = 1 << 3;
        /// The access was an instruction fetch, reported only when
        /// CR4.SMEP = 1 or when PAE/4-level paging runs with EFER.NXE = 1.
        const FETCH = 1 << 4;
    }
}

/// What the processor knows about itself and the walk depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuPaging {
    /// MAXPHYADDR (CPUID 80000008H:EAX[7:0]): bits above it are reserved in
    /// PAE and 4-level entries and limit PSE-36 in 32-bit paging.
    pub max_phys_addr_bits: u8,
    /// 1 GiB pages in 4-level paging (CPUID 80000001H:EDX[26]); without
    /// them PS = 1 in a PDPTE is a reserved bit.
    pub gib_pages: bool,
}

/// Which translation the guest has enabled (SDM Vol. 3A 4.1.1, Table 4-1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PagingMode {
    /// CR0.PG = 0: linear addresses are physical addresses.
    Disabled,
    /// CR0.PG = 1, CR4.PAE = 0 (4.3).
    Bits32,
    /// CR0.PG = 1, CR4.PAE = 1, IA32_EFER.LME = 0 (4.4).
    Pae,
    /// CR0.PG = 1, CR4.PAE = 1, IA32_EFER.LMA = 1, CR4.LA57 = 0 (4.5).
    Level4,
}

/// The guest registers that control translation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PagingRegisters {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    /// The client's A20 mask: ANDed into every physical address the walk
    /// produces, paging structures included (QEMU's `a20_mask`).
    pub a20_mask: u64,
}

/// Why a register combination cannot be walked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PagingConfigError {
    /// EFER.LMA = 1 without CR0.PG = 1 and CR4.PAE = 1, which no processor
    /// allows (SDM Vol. 3A 9.8.5).
    InconsistentLongMode,
    /// CR4.LA57: 5-level paging is not implemented.
    FiveLevelPaging,
    /// CR4.PKE: user pages would be subject to PKRU, which kqemu's state
    /// does not carry.
    ProtectionKeys,
    /// CR3 sets bits above MAXPHYADDR (4-level) or above bit 31 (32-bit and
    /// PAE paging), which MOV to CR3 refuses (SDM Vol. 3A 4.5.2, 2.5).
    Cr3ReservedBits,
}

/// Everything the walk of one address space depends on, checked once per
/// EXEC from the guest registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PagingConfig {
    mode: PagingMode,
    root: GuestPhys,
    pse: bool,
    wp: bool,
    nxe: bool,
    smep: bool,
    smap: bool,
    gib_pages: bool,
    max_phys_addr_bits: u8,
    a20_mask: u64,
}

/// What determines the result of every user-mode access in one guest
/// address space: two configurations with equal keys translate every user
/// access alike. CR0.WP, CR4.SMEP and CR4.SMAP are not part of it because
/// they only change supervisor accesses (SDM Vol. 3A 4.6.1), which normal
/// mode never maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AddressSpaceKey {
    pub mode: PagingMode,
    /// Address of the top-level table (page directory, PDPT or PML4).
    pub root: GuestPhys,
    pub pse: bool,
    pub nxe: bool,
    pub a20_mask: u64,
}

impl PagingConfig {
    /// Checks the registers and keeps what the walk needs.
    pub fn new(regs: &PagingRegisters, cpu: CpuPaging) -> Result<Self, PagingConfigError> {
        let cr0 = Cr0::from_bits_retain(regs.cr0);
        let cr4 = Cr4::from_bits_retain(regs.cr4);
        let efer = Efer::from_bits_retain(regs.efer);
        // MAXPHYADDR is at least 36 on processors with PAE and at most 52
        // (SDM Vol. 3A 4.1.4); clamp whatever the caller measured.
        let max_phys_addr_bits = cpu.max_phys_addr_bits.clamp(32, 52);
        let paging = cr0.contains(Cr0::PG);
        let long = efer.contains(Efer::LMA);
        if long && !(paging && cr4.contains(Cr4::PAE)) {
            return Err(PagingConfigError::InconsistentLongMode);
        }
        if cr4.contains(Cr4::LA57) && long {
            return Err(PagingConfigError::FiveLevelPaging);
        }
        let mode = match (paging, cr4.contains(Cr4::PAE), long) {
            (false, _, _) => PagingMode::Disabled,
            (true, false, _) => PagingMode::Bits32,
            (true, true, false) => PagingMode::Pae,
            (true, true, true) => PagingMode::Level4,
        };
        // Protection keys apply only to 4-level paging (SDM Vol. 3A 4.6.2).
        if mode == PagingMode::Level4 && cr4.contains(Cr4::PKE) {
            return Err(PagingConfigError::ProtectionKeys);
        }
        let root = match mode {
            PagingMode::Disabled => 0,
            // CR3 bits 31:12 locate the page directory (4.3); bits 31:5 the
            // PDPT (4.4.1). Outside IA-32e mode only bits 31:0 exist.
            PagingMode::Bits32 | PagingMode::Pae if regs.cr3 > u64::from(u32::MAX) => {
                return Err(PagingConfigError::Cr3ReservedBits);
            }
            PagingMode::Bits32 => regs.cr3 & 0xffff_f000,
            PagingMode::Pae => regs.cr3 & 0xffff_ffe0,
            // Bits M-1:12 locate the PML4; bits 11:0 are PWT/PCD or the
            // PCID; bits 63:M are reserved (4.5.2, Table 4-12).
            PagingMode::Level4 => {
                if regs.cr3 & !low_bits(max_phys_addr_bits) != 0 {
                    return Err(PagingConfigError::Cr3ReservedBits);
                }
                regs.cr3 & !PAGE_OFFSET_MASK
            }
        };
        Ok(Self {
            mode,
            root: GuestPhys(root),
            pse: cr4.contains(Cr4::PSE),
            wp: cr0.contains(Cr0::WP),
            nxe: efer.contains(Efer::NXE),
            smep: cr4.contains(Cr4::SMEP),
            smap: cr4.contains(Cr4::SMAP),
            gib_pages: cpu.gib_pages,
            max_phys_addr_bits,
            a20_mask: regs.a20_mask,
        })
    }

    /// The translation the guest has enabled.
    pub fn mode(&self) -> PagingMode {
        self.mode
    }

    /// Whether the execute-disable bit is in force (PAE and 4-level paging
    /// with IA32_EFER.NXE = 1; SDM Vol. 3A 4.1.1).
    pub fn nx_enabled(&self) -> bool {
        self.nxe && matches!(self.mode, PagingMode::Pae | PagingMode::Level4)
    }

    /// The key under which shadow tables of this address space are cached.
    pub fn address_space_key(&self) -> AddressSpaceKey {
        AddressSpaceKey {
            mode: self.mode,
            root: self.root,
            // PSE only matters to 32-bit paging; elsewhere it must not split
            // the cache.
            pse: self.pse && self.mode == PagingMode::Bits32,
            nxe: self.nx_enabled(),
            a20_mask: self.a20_mask,
        }
    }

    /// Whether the mode can translate `linear` at all.
    fn linear_limit_ok(&self, linear: GuestVirt) -> Result<(), WalkError> {
        match self.mode {
            PagingMode::Level4 => {
                // Canonical: bits 63:47 all equal (SDM Vol. 1 3.3.7.1).
                let high = linear.0 >> 47;
                if high == 0 || high == (1 << 17) - 1 {
                    Ok(())
                } else {
                    Err(WalkError::NonCanonical)
                }
            }
            _ if linear.0 > u64::from(u32::MAX) => Err(WalkError::Beyond32Bits),
            _ => Ok(()),
        }
    }
}

/// Mask of bits `hi..=lo`.
const fn bit_range(hi: u32, lo: u32) -> u64 {
    if hi < lo {
        0
    } else {
        (u64::MAX >> (63 - hi)) & !((1u64 << lo) - 1)
    }
}

/// Mask of bits `bits-1..=0`.
const fn low_bits(bits: u8) -> u64 {
    if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

/// What kind of access is translated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessKind {
    Read,
    Write,
    /// Instruction fetch.
    Fetch,
}

/// Who makes the access (SDM Vol. 3A 4.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Privilege {
    /// A user-mode access: CPL 3 and not an implicit supervisor access.
    User,
    /// A supervisor-mode access: CPL < 3, or an implicit access to a
    /// system structure (GDT, LDT, IDT, TSS) at any CPL. `implicit`
    /// accesses ignore EFLAGS.AC for SMAP; `eflags_ac` is EFLAGS.AC.
    Supervisor { implicit: bool, eflags_ac: bool },
}

/// One access to translate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    pub kind: AccessKind,
    pub privilege: Privilege,
}

impl Access {
    /// A user-mode read.
    pub const USER_READ: Self = Self {
        kind: AccessKind::Read,
        privilege: Privilege::User,
    };
    /// A user-mode write.
    pub const USER_WRITE: Self = Self {
        kind: AccessKind::Write,
        privilege: Privilege::User,
    };
    /// A user-mode instruction fetch.
    pub const USER_FETCH: Self = Self {
        kind: AccessKind::Fetch,
        privilege: Privilege::User,
    };
    /// An implicit supervisor read, as of a descriptor table.
    pub const IMPLICIT_READ: Self = Self {
        kind: AccessKind::Read,
        privilege: Privilege::Supervisor {
            implicit: true,
            eflags_ac: false,
        },
    };
    /// An implicit supervisor write, as of a descriptor's accessed bit.
    pub const IMPLICIT_WRITE: Self = Self {
        kind: AccessKind::Write,
        privilege: Privilege::Supervisor {
            implicit: true,
            eflags_ac: false,
        },
    };
}

/// A paging-structure level, named as in 4-level paging; 32-bit paging
/// uses `Pd` and `Pt`, PAE paging `Pdpt`, `Pd` and `Pt`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Level {
    Pml4,
    Pdpt,
    #[default]
    Pd,
    Pt,
}

/// Size of the page a translation found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageSize {
    Size4K,
    Size2M,
    /// 32-bit paging with CR4.PSE = 1.
    Size4M,
    Size1G,
}

impl PageSize {
    /// Bytes in a page of this size.
    pub const fn bytes(self) -> u64 {
        match self {
            Self::Size4K => 1 << 12,
            Self::Size2M => 1 << 21,
            Self::Size4M => 1 << 22,
            Self::Size1G => 1 << 30,
        }
    }
}

/// Width of a paging-structure entry in guest memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum EntryWidth {
    /// 32-bit paging.
    #[default]
    Four,
    /// PAE and 4-level paging.
    Eight,
}

/// One paging-structure entry the walk used.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PathStep {
    pub level: Level,
    /// Guest-physical address of the entry (A20 mask applied).
    pub entry_addr: GuestPhys,
    pub width: EntryWidth,
    /// The entry's value after the walk's own Accessed/Dirty update.
    pub value: u64,
    /// The entry maps the page (a PTE, or a PDE/PDPTE with PS = 1).
    pub maps_page: bool,
}

impl PathStep {
    /// The 4 KiB guest page that holds the entry: the page whose
    /// modification makes translations derived from this step stale.
    pub fn table_page(&self) -> GuestPhys {
        self.entry_addr.page_base()
    }
}

/// Most levels a walk uses (4-level paging).
pub const MAX_LEVELS: usize = 4;

/// The entries one walk used, top level first.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WalkPath {
    steps: [PathStep; MAX_LEVELS],
    len: usize,
}

impl WalkPath {
    /// The steps, top level first.
    pub fn steps(&self) -> &[PathStep] {
        &self.steps[..self.len]
    }

    fn push(&mut self, step: PathStep) {
        if let Some(slot) = self.steps.get_mut(self.len) {
            *slot = step;
            self.len += 1;
        }
    }
}

/// A successful translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// The translated linear address.
    pub linear: GuestVirt,
    /// Its guest-physical address (A20 mask applied).
    pub phys: GuestPhys,
    pub size: PageSize,
    /// Writes allowed at every level (R/W = 1 throughout).
    pub writable: bool,
    /// User-mode accesses allowed at every level (U/S = 1 throughout).
    pub user: bool,
    /// Instruction fetches allowed: XD = 0 throughout, or no NX in force.
    pub executable: bool,
    /// The entry that maps the page has D = 1 (after this access).
    pub dirty: bool,
    /// The entry that maps the page has G = 1.
    pub global: bool,
    /// The entries used, with their values after this walk.
    pub path: WalkPath,
}

impl Translation {
    /// The 4 KiB guest-physical frame that holds the translated address.
    pub fn frame(&self) -> GuestPhys {
        self.phys.page_base()
    }
}

/// A page fault as the processor would raise it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageFault {
    /// The faulting linear address (CR2).
    pub linear: GuestVirt,
    pub code: PageFaultCode,
}

/// Why a walk produced no translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkError {
    /// The guest takes a page fault (#PF, vector 14).
    PageFault(PageFault),
    /// A non-canonical address in 4-level paging: the processor raises #GP
    /// or #SS before paging is involved (SDM Vol. 1 3.3.7.1).
    NonCanonical,
    /// An address above 4 GiB in a mode whose linear addresses are 32 bits.
    Beyond32Bits,
    /// A present PAE PDPTE with reserved bits set: the processor refuses
    /// such a PDPTE when CR3 is loaded (#GP, SDM Vol. 3A 4.4.1), never
    /// during a walk; the client, which emulated the load, decides.
    InvalidPdpte,
    /// A paging structure lies outside guest RAM (device memory or an
    /// unassigned address): only the client can emulate that access.
    NotRam(GuestPhys),
    /// An entry kept changing while the walk updated it.
    Contended,
}

/// Guest memory holding paging structures is not ordinary RAM the monitor
/// may read and write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotRam;

/// Reads and atomic updates of guest-physical memory, for paging-structure
/// entries. Addresses are naturally aligned for the width. Implemented over
/// guest RAM by the monitor and over a vector by the tests.
pub trait GuestPhysMem {
    fn read_u32(&mut self, addr: GuestPhys) -> Result<u32, NotRam>;
    fn read_u64(&mut self, addr: GuestPhys) -> Result<u64, NotRam>;
    /// Stores `new` at `addr` if it still holds `old`, atomically with
    /// respect to other writers of guest memory; `Ok(false)` if it held
    /// something else.
    fn compare_exchange_u32(&mut self, addr: GuestPhys, old: u32, new: u32)
        -> Result<bool, NotRam>;
    /// As [`GuestPhysMem::compare_exchange_u32`] for 8 bytes.
    fn compare_exchange_u64(&mut self, addr: GuestPhys, old: u64, new: u64)
        -> Result<bool, NotRam>;
}

/// How often a walk restarts because an entry changed between its read
/// and the update of its Accessed/Dirty flags. Only a writer racing with
/// the monitor (another thread of the client) can cause a restart.
const MAX_WALK_ATTEMPTS: usize = 4;

/// Translates `linear` for `access` in the guest's tables, setting the
/// Accessed and Dirty flags the processor would set.
pub fn translate<M: GuestPhysMem + ?Sized>(
    config: &PagingConfig,
    mem: &mut M,
    linear: GuestVirt,
    access: Access,
) -> Result<Translation, WalkError> {
    config.linear_limit_ok(linear)?;
    if config.mode == PagingMode::Disabled {
        return Ok(Translation {
            linear,
            phys: GuestPhys(linear.0 & config.a20_mask),
            size: PageSize::Size4K,
            writable: true,
            user: true,
            executable: true,
            dirty: true,
            global: false,
            path: WalkPath::default(),
        });
    }
    for _ in 0..MAX_WALK_ATTEMPTS {
        match walk_once(config, mem, linear, access) {
            Err(Attempt::Restart) => continue,
            Err(Attempt::Failed(e)) => return Err(e),
            Ok(t) => return Ok(t),
        }
    }
    Err(WalkError::Contended)
}

enum Attempt {
    Restart,
    Failed(WalkError),
}

impl From<WalkError> for Attempt {
    fn from(e: WalkError) -> Self {
        Self::Failed(e)
    }
}

/// How one level of a format is laid out.
struct LevelFormat {
    level: Level,
    /// Bit position of the level's index in the linear address.
    shift: u32,
    /// Number of index bits.
    index_bits: u32,
}

const LEVELS_32: [LevelFormat; 2] = [
    LevelFormat {
        level: Level::Pd,
        shift: 22,
        index_bits: 10,
    },
    LevelFormat {
        level: Level::Pt,
        shift: 12,
        index_bits: 10,
    },
];
const LEVELS_PAE: [LevelFormat; 3] = [
    LevelFormat {
        level: Level::Pdpt,
        shift: 30,
        index_bits: 2,
    },
    LevelFormat {
        level: Level::Pd,
        shift: 21,
        index_bits: 9,
    },
    LevelFormat {
        level: Level::Pt,
        shift: 12,
        index_bits: 9,
    },
];
const LEVELS_4: [LevelFormat; 4] = [
    LevelFormat {
        level: Level::Pml4,
        shift: 39,
        index_bits: 9,
    },
    LevelFormat {
        level: Level::Pdpt,
        shift: 30,
        index_bits: 9,
    },
    LevelFormat {
        level: Level::Pd,
        shift: 21,
        index_bits: 9,
    },
    LevelFormat {
        level: Level::Pt,
        shift: 12,
        index_bits: 9,
    },
];

/// What one entry says, once its reserved bits were checked.
enum EntryKind {
    /// References the next table at this guest-physical address.
    Table(u64),
    /// Maps a page at this guest-physical base.
    Page(u64, PageSize),
}

/// Rights accumulated over the levels (SDM Vol. 3A 4.6).
struct Rights {
    writable: bool,
    user: bool,
    no_execute: bool,
}

fn walk_once<M: GuestPhysMem + ?Sized>(
    config: &PagingConfig,
    mem: &mut M,
    linear: GuestVirt,
    access: Access,
) -> Result<Translation, Attempt> {
    let (levels, width): (&[LevelFormat], EntryWidth) = match config.mode {
        PagingMode::Bits32 => (&LEVELS_32, EntryWidth::Four),
        PagingMode::Pae => (&LEVELS_PAE, EntryWidth::Eight),
        PagingMode::Level4 | PagingMode::Disabled => (&LEVELS_4, EntryWidth::Eight),
    };
    let entry_bytes = match width {
        EntryWidth::Four => 4,
        EntryWidth::Eight => 8,
    };
    let mut table = config.root.0;
    let mut rights = Rights {
        writable: true,
        user: true,
        no_execute: false,
    };
    let mut path = WalkPath::default();
    for format in levels {
        let index = (linear.0 >> format.shift) & low_bits(format.index_bits as u8);
        let entry_addr = GuestPhys(table.wrapping_add(index * entry_bytes) & config.a20_mask);
        let entry = read_entry(mem, entry_addr, width)?;
        let flags = PteFlags::from_bits_retain(entry);
        if !flags.contains(PteFlags::PRESENT) {
            return Err(page_fault(config, linear, access, PageFaultCode::empty()).into());
        }
        let kind = decode_entry(config, format.level, entry)?.ok_or_else(|| {
            page_fault(
                config,
                linear,
                access,
                PageFaultCode::PRESENT | PageFaultCode::RESERVED,
            )
        })?;
        // A PAE PDPTE has no R/W, U/S or XD bits: it restricts nothing
        // (SDM Vol. 3A Table 4-8).
        if !(config.mode == PagingMode::Pae && format.level == Level::Pdpt) {
            rights.writable &= flags.contains(PteFlags::WRITABLE);
            rights.user &= flags.contains(PteFlags::USER);
            rights.no_execute |= config.nx_enabled() && flags.contains(PteFlags::NO_EXECUTE);
        }
        match kind {
            EntryKind::Table(next) => {
                // The processor sets A in every entry it uses (4.8), in all
                // levels but the PAE PDPTEs, where bit 5 is reserved.
                let value = if config.mode == PagingMode::Pae && format.level == Level::Pdpt {
                    entry
                } else {
                    set_flags(mem, entry_addr, width, entry, PteFlags::ACCESSED)?
                };
                path.push(PathStep {
                    level: format.level,
                    entry_addr,
                    width,
                    value,
                    maps_page: false,
                });
                table = next;
            }
            EntryKind::Page(base, size) => {
                if !permitted(config, access, &rights) {
                    return Err(page_fault(config, linear, access, PageFaultCode::PRESENT).into());
                }
                // A and D of the entry that maps the page are set only for
                // an access the rights allow; D only on a write (4.8).
                let mut update = PteFlags::ACCESSED;
                if access.kind == AccessKind::Write {
                    update |= PteFlags::DIRTY;
                }
                let value = set_flags(mem, entry_addr, width, entry, update)?;
                path.push(PathStep {
                    level: format.level,
                    entry_addr,
                    width,
                    value,
                    maps_page: true,
                });
                let final_flags = PteFlags::from_bits_retain(value);
                let offset = linear.0 & (size.bytes() - 1);
                return Ok(Translation {
                    linear,
                    phys: GuestPhys((base | offset) & config.a20_mask),
                    size,
                    writable: rights.writable,
                    user: rights.user,
                    executable: !rights.no_execute,
                    dirty: final_flags.contains(PteFlags::DIRTY),
                    global: final_flags.contains(PteFlags::GLOBAL),
                    path,
                });
            }
        }
    }
    // Every format's last level maps a page, so the loop always returns.
    Err(WalkError::Contended.into())
}

fn read_entry<M: GuestPhysMem + ?Sized>(
    mem: &mut M,
    addr: GuestPhys,
    width: EntryWidth,
) -> Result<u64, WalkError> {
    match width {
        EntryWidth::Four => mem.read_u32(addr).map(u64::from),
        EntryWidth::Eight => mem.read_u64(addr),
    }
    .map_err(|NotRam| WalkError::NotRam(addr))
}

/// Sets `flags` in the entry at `addr`, which was read as `old`; a restart
/// of the walk if the entry changed meanwhile. Returns the new value.
fn set_flags<M: GuestPhysMem + ?Sized>(
    mem: &mut M,
    addr: GuestPhys,
    width: EntryWidth,
    old: u64,
    flags: PteFlags,
) -> Result<u64, Attempt> {
    let new = old | flags.bits();
    if new == old {
        return Ok(old);
    }
    let swapped = match width {
        // A 32-bit entry has no bit above 31 to set.
        EntryWidth::Four => mem.compare_exchange_u32(addr, old as u32, new as u32),
        EntryWidth::Eight => mem.compare_exchange_u64(addr, old, new),
    }
    .map_err(|NotRam| WalkError::NotRam(addr))?;
    if swapped {
        Ok(new)
    } else {
        Err(Attempt::Restart)
    }
}

/// Checks the reserved bits of a present entry and says what it points to;
/// `Ok(None)` for a reserved-bit violation (a #PF with RSVD = 1).
fn decode_entry(
    config: &PagingConfig,
    level: Level,
    entry: u64,
) -> Result<Option<EntryKind>, WalkError> {
    let m = u32::from(config.max_phys_addr_bits);
    let ps = entry & PteFlags::PAGE_SIZE.bits() != 0;
    let xd_reserved = if config.nxe {
        0
    } else {
        PteFlags::NO_EXECUTE.bits()
    };
    let checked = |reserved: u64, kind: EntryKind| {
        if entry & reserved != 0 {
            None
        } else {
            Some(kind)
        }
    };
    Ok(match config.mode {
        PagingMode::Bits32 => {
            if level == Level::Pd && ps && config.pse {
                // 4 MiB page (Table 4-4): bits 20:13 are physical-address bits
                // 39:32 up to MAXPHYADDR (at most 40, PSE-36), bit 21 is
                // reserved.
                let m = m.min(40);
                let reserved = bit_range(21, 13 + (m - 32));
                let base = (entry & 0xffc0_0000) | (((entry >> 13) & 0xff) << 32);
                checked(reserved, EntryKind::Page(base, PageSize::Size4M))
            } else if level == Level::Pd {
                // PS is ignored without CR4.PSE (Table 4-5).
                Some(EntryKind::Table(entry & 0xffff_f000))
            } else {
                Some(EntryKind::Page(entry & 0xffff_f000, PageSize::Size4K))
            }
        }
        PagingMode::Pae => {
            let address = bit_range(m - 1, 12);
            match level {
                Level::Pdpt => {
                    // Bits 2:1, 8:5 and 63:M are reserved (Table 4-8).
                    let reserved = bit_range(2, 1) | bit_range(8, 5) | bit_range(63, m);
                    if entry & reserved != 0 {
                        return Err(WalkError::InvalidPdpte);
                    }
                    Some(EntryKind::Table(entry & address))
                }
                Level::Pd if ps => {
                    // 2 MiB page (Table 4-9): bits 20:13 and 62:M reserved.
                    let reserved = bit_range(62, m) | bit_range(20, 13) | xd_reserved;
                    checked(
                        reserved,
                        EntryKind::Page(entry & bit_range(m - 1, 21), PageSize::Size2M),
                    )
                }
                Level::Pd => checked(
                    bit_range(62, m) | xd_reserved,
                    EntryKind::Table(entry & address),
                ),
                _ => checked(
                    bit_range(62, m) | xd_reserved,
                    EntryKind::Page(entry & address, PageSize::Size4K),
                ),
            }
        }
        PagingMode::Level4 | PagingMode::Disabled => {
            // Bits 51:M are reserved everywhere, bits 62:52 ignored
            // (Tables 4-15 to 4-20).
            let high = bit_range(51, m) | xd_reserved;
            let address = bit_range(m - 1, 12);
            match level {
                // PS is reserved in a PML4E (Table 4-15).
                Level::Pml4 => checked(
                    high | PteFlags::PAGE_SIZE.bits(),
                    EntryKind::Table(entry & address),
                ),
                Level::Pdpt if ps => {
                    if !config.gib_pages {
                        None
                    } else {
                        // 1 GiB page (Table 4-16): bits 29:13 reserved.
                        let kind = EntryKind::Page(entry & bit_range(m - 1, 30), PageSize::Size1G);
                        checked(high | bit_range(29, 13), kind)
                    }
                }
                Level::Pd if ps => {
                    let kind = EntryKind::Page(entry & bit_range(m - 1, 21), PageSize::Size2M);
                    checked(high | bit_range(20, 13), kind)
                }
                Level::Pdpt | Level::Pd => checked(high, EntryKind::Table(entry & address)),
                Level::Pt => checked(high, EntryKind::Page(entry & address, PageSize::Size4K)),
            }
        }
    })
}

/// The access-rights rules of SDM Vol. 3A 4.6.1 for a translation with
/// `rights`.
fn permitted(config: &PagingConfig, access: Access, rights: &Rights) -> bool {
    match access.privilege {
        Privilege::User => {
            rights.user
                && match access.kind {
                    AccessKind::Read => true,
                    // User writes need R/W = 1 whatever CR0.WP says.
                    AccessKind::Write => rights.writable,
                    AccessKind::Fetch => !rights.no_execute,
                }
        }
        Privilege::Supervisor {
            implicit,
            eflags_ac,
        } => {
            // SMAP forbids supervisor data accesses to user pages unless they
            // are explicit and EFLAGS.AC = 1.
            let smap_denies = config.smap && rights.user && (implicit || !eflags_ac);
            match access.kind {
                AccessKind::Read => !smap_denies,
                AccessKind::Write => !smap_denies && (rights.writable || !config.wp),
                // SMEP forbids supervisor fetches from user pages.
                AccessKind::Fetch => !(rights.no_execute || (config.smep && rights.user)),
            }
        }
    }
}

fn page_fault(
    config: &PagingConfig,
    linear: GuestVirt,
    access: Access,
    mut code: PageFaultCode,
) -> WalkError {
    if access.kind == AccessKind::Write {
        code |= PageFaultCode::WRITE;
    }
    if access.privilege == Privilege::User {
        code |= PageFaultCode::USER;
    }
    // I/D is reported only with SMEP, or with NX in force (4.7).
    let pae_like = matches!(config.mode, PagingMode::Pae | PagingMode::Level4);
    if access.kind == AccessKind::Fetch && (config.smep || (pae_like && config.nxe)) {
        code |= PageFaultCode::FETCH;
    }
    WalkError::PageFault(PageFault { linear, code })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::vec;
    use std::vec::Vec;

    /// Guest RAM for the tests: a byte vector starting at guest-physical 0;
    /// everything beyond is not RAM. `races` makes that many of the next
    /// compare-exchanges fail after changing the entry, as a concurrent
    /// writer would.
    pub(crate) struct TestMem {
        pub bytes: Vec<u8>,
        pub races: usize,
        pub writes: usize,
    }

    impl TestMem {
        pub(crate) fn new(size: usize) -> Self {
            Self {
                bytes: vec![0; size],
                races: 0,
                writes: 0,
            }
        }

        fn range(&self, addr: GuestPhys, len: usize) -> Result<core::ops::Range<usize>, NotRam> {
            let start = usize::try_from(addr.0).map_err(|_| NotRam)?;
            let end = start.checked_add(len).ok_or(NotRam)?;
            if end > self.bytes.len() {
                return Err(NotRam);
            }
            Ok(start..end)
        }

        pub(crate) fn put32(&mut self, addr: u64, v: u32) {
            let r = self.range(GuestPhys(addr), 4).expect("in RAM");
            self.bytes[r].copy_from_slice(&v.to_le_bytes());
        }

        pub(crate) fn put64(&mut self, addr: u64, v: u64) {
            let r = self.range(GuestPhys(addr), 8).expect("in RAM");
            self.bytes[r].copy_from_slice(&v.to_le_bytes());
        }

        pub(crate) fn get32(&self, addr: u64) -> u32 {
            let r = self.range(GuestPhys(addr), 4).expect("in RAM");
            u32::from_le_bytes(self.bytes[r].try_into().expect("4 bytes"))
        }

        pub(crate) fn get64(&self, addr: u64) -> u64 {
            let r = self.range(GuestPhys(addr), 8).expect("in RAM");
            u64::from_le_bytes(self.bytes[r].try_into().expect("8 bytes"))
        }
    }

    impl GuestPhysMem for TestMem {
        fn read_u32(&mut self, addr: GuestPhys) -> Result<u32, NotRam> {
            self.range(addr, 4)?;
            Ok(self.get32(addr.0))
        }

        fn read_u64(&mut self, addr: GuestPhys) -> Result<u64, NotRam> {
            self.range(addr, 8)?;
            Ok(self.get64(addr.0))
        }

        fn compare_exchange_u32(
            &mut self,
            addr: GuestPhys,
            old: u32,
            new: u32,
        ) -> Result<bool, NotRam> {
            self.range(addr, 4)?;
            if self.races > 0 {
                self.races -= 1;
                // Another writer sets an ignored bit meanwhile.
                self.put32(addr.0, old | 1 << 9);
                return Ok(false);
            }
            if self.get32(addr.0) != old {
                return Ok(false);
            }
            self.writes += 1;
            self.put32(addr.0, new);
            Ok(true)
        }

        fn compare_exchange_u64(
            &mut self,
            addr: GuestPhys,
            old: u64,
            new: u64,
        ) -> Result<bool, NotRam> {
            self.range(addr, 8)?;
            if self.races > 0 {
                self.races -= 1;
                self.put64(addr.0, old | 1 << 9);
                return Ok(false);
            }
            if self.get64(addr.0) != old {
                return Ok(false);
            }
            self.writes += 1;
            self.put64(addr.0, new);
            Ok(true)
        }
    }

    const P: u64 = PteFlags::PRESENT.bits();
    const W: u64 = PteFlags::WRITABLE.bits();
    const U: u64 = PteFlags::USER.bits();
    const A: u64 = PteFlags::ACCESSED.bits();
    const D: u64 = PteFlags::DIRTY.bits();
    const PS: u64 = PteFlags::PAGE_SIZE.bits();
    const G: u64 = PteFlags::GLOBAL.bits();
    const XD: u64 = PteFlags::NO_EXECUTE.bits();
    const PWU: u64 = P | W | U;

    const CPU: CpuPaging = CpuPaging {
        max_phys_addr_bits: 40,
        gib_pages: true,
    };
    const ALL_ONES: u64 = u64::MAX;

    fn config(cr0: Cr0, cr3: u64, cr4: Cr4, efer: Efer) -> PagingConfig {
        let regs = PagingRegisters {
            cr0: cr0.bits(),
            cr3,
            cr4: cr4.bits(),
            efer: efer.bits(),
            a20_mask: ALL_ONES,
        };
        PagingConfig::new(&regs, CPU).expect("valid paging registers")
    }

    fn cfg32(pse: bool) -> PagingConfig {
        let cr4 = if pse { Cr4::PSE } else { Cr4::empty() };
        config(Cr0::PE | Cr0::PG | Cr0::WP, 0x1000, cr4, Efer::empty())
    }

    fn cfg_pae(nxe: bool) -> PagingConfig {
        let efer = if nxe { Efer::NXE } else { Efer::empty() };
        config(Cr0::PE | Cr0::PG | Cr0::WP, 0x1020, Cr4::PAE, efer)
    }

    fn cfg_long(nxe: bool) -> PagingConfig {
        let mut efer = Efer::LME | Efer::LMA;
        if nxe {
            efer |= Efer::NXE;
        }
        config(Cr0::PE | Cr0::PG | Cr0::WP, 0x1000, Cr4::PAE, efer)
    }

    fn user_fault(write: bool, present: bool) -> PageFaultCode {
        let mut code = PageFaultCode::USER;
        if write {
            code |= PageFaultCode::WRITE;
        }
        if present {
            code |= PageFaultCode::PRESENT;
        }
        code
    }

    fn fault_code(r: Result<Translation, WalkError>) -> PageFaultCode {
        match r {
            Err(WalkError::PageFault(f)) => f.code,
            other => panic!("expected a page fault, got {other:?}"),
        }
    }

    /// 32-bit tables: PD at 0x1000, PT at 0x2000 for linear 0x0040_0000..,
    /// page 0x0040_3000 -> 0x5000.
    fn mem32(pde: u64, pte: u64) -> TestMem {
        let mut mem = TestMem::new(0x10000);
        mem.put32(0x1000 + 4, (0x2000 | pde) as u32);
        mem.put32(0x2000 + 3 * 4, (0x5000 | pte) as u32);
        mem
    }

    #[test]
    fn bits32_translates_and_sets_accessed_and_dirty() {
        let cfg = cfg32(false);
        let mut mem = mem32(PWU, PWU);
        let t =
            translate(&cfg, &mut mem, GuestVirt(0x0040_3abc), Access::USER_READ).expect("mapped");
        assert_eq!(t.phys, GuestPhys(0x5abc));
        assert_eq!(t.size, PageSize::Size4K);
        assert!(t.writable && t.user && t.executable && !t.dirty);
        assert_eq!(mem.get32(0x1004), 0x2000 | (PWU | A) as u32);
        assert_eq!(
            mem.get32(0x200c),
            0x5000 | (PWU | A) as u32,
            "read sets A only"
        );
        let steps = t.path.steps();
        assert_eq!(steps.len(), 2);
        assert_eq!(
            (steps[0].level, steps[0].entry_addr, steps[0].width),
            (Level::Pd, GuestPhys(0x1004), EntryWidth::Four)
        );
        assert!(!steps[0].maps_page && steps[1].maps_page);
        assert_eq!(steps[1].table_page(), GuestPhys(0x2000));

        let t = translate(&cfg, &mut mem, GuestVirt(0x0040_3000), Access::USER_WRITE)
            .expect("writable");
        assert!(t.dirty);
        assert_eq!(mem.get32(0x200c), 0x5000 | (PWU | A | D) as u32);
        // A PDE that references a table gets no D.
        assert_eq!(mem.get32(0x1004) & D as u32, 0);
        // Nothing left to update: no more writes.
        let writes = mem.writes;
        translate(&cfg, &mut mem, GuestVirt(0x0040_3000), Access::USER_WRITE).expect("writable");
        assert_eq!(mem.writes, writes);
    }

    #[test]
    fn bits32_fault_error_codes() {
        let cfg = cfg32(false);
        let linear = GuestVirt(0x0040_3010);
        // Not-present PDE, then not-present PTE.
        let mut mem = mem32(0, PWU);
        assert_eq!(
            fault_code(translate(&cfg, &mut mem, linear, Access::USER_READ)),
            user_fault(false, false)
        );
        assert_eq!(
            fault_code(translate(&cfg, &mut mem, linear, Access::USER_WRITE)),
            user_fault(true, false)
        );
        let mut mem = mem32(PWU, 0);
        let r = translate(&cfg, &mut mem, linear, Access::USER_READ);
        assert_eq!(
            r,
            Err(WalkError::PageFault(PageFault {
                linear,
                code: user_fault(false, false)
            }))
        );
        // The PDE was used, so it is accessed; the PTE is untouched.
        assert_eq!(mem.get32(0x1004) & A as u32, A as u32);
        assert_eq!(mem.get32(0x200c), 0x5000);
        // Supervisor page at either level.
        for (pde, pte) in [(P | W, PWU), (PWU, P | W)] {
            let mut mem = mem32(pde, pte);
            assert_eq!(
                fault_code(translate(&cfg, &mut mem, linear, Access::USER_READ)),
                user_fault(false, true)
            );
            assert_eq!(mem.get32(0x200c) & A as u32, 0, "no A on a denied access");
        }
        // Read-only at either level.
        for (pde, pte) in [(P | U, PWU), (PWU, P | U)] {
            let mut mem = mem32(pde, pte);
            assert!(translate(&cfg, &mut mem, linear, Access::USER_READ).is_ok());
            assert_eq!(
                fault_code(translate(&cfg, &mut mem, linear, Access::USER_WRITE)),
                user_fault(true, true)
            );
            assert_eq!(mem.get32(0x200c) & D as u32, 0, "no D on a denied write");
        }
        // No NX in 32-bit paging: fetches need only U/S, and I/D is not
        // reported without SMEP.
        let mut mem = mem32(PWU, P | U);
        assert!(
            translate(&cfg, &mut mem, linear, Access::USER_FETCH)
                .expect("fetch")
                .executable
        );
        let mut mem = mem32(PWU, P);
        assert_eq!(
            fault_code(translate(&cfg, &mut mem, linear, Access::USER_FETCH)),
            user_fault(false, true)
        );
    }

    #[test]
    fn bits32_pse_pages_and_reserved_bits() {
        let linear = GuestVirt(0x00c1_2345);
        // PDE 3 maps a 4 MiB page at 0x0080_0000 | (bits 39:32 = 0x12).
        let pde = 0x0080_0000 | (0x12 << 13) | PWU | PS | G;
        let mut mem = TestMem::new(0x10000);
        mem.put32(0x1000 + 3 * 4, pde as u32);
        let t = translate(&cfg32(true), &mut mem, linear, Access::USER_WRITE).expect("4 MiB page");
        assert_eq!(t.size, PageSize::Size4M);
        assert_eq!(t.phys, GuestPhys(0x12_0081_2345));
        assert!(t.dirty && t.global);
        assert_eq!(u64::from(mem.get32(0x100c)), pde | A | D);
        assert_eq!(t.path.steps().len(), 1);

        // Without CR4.PSE the same PDE references a page table at 0x0080_0000
        // + ignored bits, which is outside this RAM.
        let mut mem = TestMem::new(0x10000);
        mem.put32(0x100c, pde as u32);
        assert!(matches!(
            translate(&cfg32(false), &mut mem, linear, Access::USER_READ),
            Err(WalkError::NotRam(_))
        ));

        // Bit 21 is reserved; with MAXPHYADDR 40, bit 20 is address bit 39.
        let mut mem = TestMem::new(0x10000);
        mem.put32(0x100c, (pde | 1 << 21) as u32);
        let code = fault_code(translate(&cfg32(true), &mut mem, linear, Access::USER_READ));
        assert_eq!(code, user_fault(false, true) | PageFaultCode::RESERVED);
        assert_eq!(
            u64::from(mem.get32(0x100c)),
            pde | 1 << 21,
            "no A in an entry with reserved bits"
        );
        mem.put32(0x100c, (pde | 1 << 20) as u32);
        let t = translate(&cfg32(true), &mut mem, linear, Access::USER_READ)
            .expect("bit 20 is address");
        assert_eq!(t.phys, GuestPhys(0x92_0081_2345));
        // With MAXPHYADDR 36 bits 20:17 are reserved, 16:13 still address.
        let regs = PagingRegisters {
            cr0: (Cr0::PG | Cr0::PE).bits(),
            cr3: 0x1000,
            cr4: Cr4::PSE.bits(),
            efer: 0,
            a20_mask: ALL_ONES,
        };
        let cfg36 = PagingConfig::new(
            &regs,
            CpuPaging {
                max_phys_addr_bits: 36,
                gib_pages: false,
            },
        )
        .expect("valid");
        let mut mem = TestMem::new(0x10000);
        mem.put32(0x100c, (0x0080_0000 | (0xf << 13) | PWU | PS) as u32);
        assert_eq!(
            translate(&cfg36, &mut mem, linear, Access::USER_READ)
                .expect("ok")
                .phys,
            GuestPhys(0xf_0081_2345)
        );
        mem.put32(0x100c, (0x0080_0000 | (0x10 << 13) | PWU | PS) as u32);
        assert!(
            fault_code(translate(&cfg36, &mut mem, linear, Access::USER_READ))
                .contains(PageFaultCode::RESERVED)
        );
    }

    /// PAE tables: PDPT at 0x1020, PD at 0x2000, PT at 0x3000, mapping
    /// linear 0x4020_3000 (PDPTE 1, PDE 1, PTE 3) to 0x7000.
    fn mem_pae(pdpte: u64, pde: u64, pte: u64) -> TestMem {
        let mut mem = TestMem::new(0x10000);
        mem.put64(0x1020 + 8, 0x2000 | pdpte);
        mem.put64(0x2000 + 8, 0x3000 | pde);
        mem.put64(0x3000 + 3 * 8, 0x7000 | pte);
        mem
    }

    #[test]
    fn pae_translates_with_nx() {
        let linear = GuestVirt(0x4020_3123);
        let mut mem = mem_pae(P, PWU, PWU | XD);
        let t = translate(&cfg_pae(true), &mut mem, linear, Access::USER_READ).expect("mapped");
        assert_eq!(t.phys, GuestPhys(0x7123));
        assert!(!t.executable);
        // PDPTEs get no A (bit 5 is reserved there).
        assert_eq!(mem.get64(0x1028), 0x2000 | P);
        assert_eq!(mem.get64(0x2008), 0x3000 | PWU | A);
        let code = fault_code(translate(
            &cfg_pae(true),
            &mut mem,
            linear,
            Access::USER_FETCH,
        ));
        assert_eq!(code, user_fault(false, true) | PageFaultCode::FETCH);
        // XD in the PDE alone also forbids fetches.
        let mut mem = mem_pae(P, PWU | XD, PWU);
        assert!(translate(&cfg_pae(true), &mut mem, linear, Access::USER_FETCH).is_err());
        // Without NXE, bit 63 is reserved.
        let mut mem = mem_pae(P, PWU, PWU | XD);
        let code = fault_code(translate(
            &cfg_pae(false),
            &mut mem,
            linear,
            Access::USER_READ,
        ));
        assert_eq!(code, user_fault(false, true) | PageFaultCode::RESERVED);
        // Not-present fetch with NXE reports I/D; without NXE it does not.
        let mut mem = mem_pae(P, PWU, 0);
        assert_eq!(
            fault_code(translate(
                &cfg_pae(true),
                &mut mem,
                linear,
                Access::USER_FETCH
            )),
            PageFaultCode::USER | PageFaultCode::FETCH
        );
        assert_eq!(
            fault_code(translate(
                &cfg_pae(false),
                &mut mem,
                linear,
                Access::USER_FETCH
            )),
            PageFaultCode::USER
        );
    }

    #[test]
    fn pae_pdpte_rules() {
        let linear = GuestVirt(0x4020_3000);
        // A not-present PDPTE is an ordinary not-present fault.
        let mut mem = mem_pae(0, PWU, PWU);
        assert_eq!(
            fault_code(translate(
                &cfg_pae(true),
                &mut mem,
                linear,
                Access::USER_READ
            )),
            user_fault(false, false)
        );
        // A present PDPTE with reserved bits cannot exist on hardware.
        for bad in [P | W, P | U, P | A, P | XD, P | 1 << 40] {
            let mut mem = mem_pae(bad, PWU, PWU);
            assert_eq!(
                translate(&cfg_pae(true), &mut mem, linear, Access::USER_READ),
                Err(WalkError::InvalidPdpte),
                "{bad:#x}"
            );
        }
        // The PDPTE restricts nothing: R/W and U/S come from the lower levels.
        let mut mem = mem_pae(P, PWU, PWU);
        assert!(
            translate(&cfg_pae(true), &mut mem, linear, Access::USER_WRITE)
                .expect("ok")
                .writable
        );
        // The PDPT is 32-byte aligned: CR3 bits 4:0 are ignored.
        let regs = PagingRegisters {
            cr0: (Cr0::PG | Cr0::PE).bits(),
            cr3: 0x103f,
            cr4: Cr4::PAE.bits(),
            efer: 0,
            a20_mask: ALL_ONES,
        };
        let cfg = PagingConfig::new(&regs, CPU).expect("valid");
        assert!(translate(&cfg, &mut mem, linear, Access::USER_READ).is_ok());
    }

    #[test]
    fn pae_2mib_pages_and_reserved_bits() {
        let linear = GuestVirt(0x4031_2345);
        let mut mem = TestMem::new(0x10000);
        mem.put64(0x1028, 0x2000 | P);
        let pde = 0x1_2340_0000 | PWU | PS;
        mem.put64(0x2008, pde);
        let t =
            translate(&cfg_pae(true), &mut mem, linear, Access::USER_WRITE).expect("2 MiB page");
        assert_eq!(
            (t.phys, t.size),
            (GuestPhys(0x1_2351_2345), PageSize::Size2M)
        );
        assert_eq!(mem.get64(0x2008), pde | A | D);
        // Bits 20:13 are reserved in a 2 MiB PDE, bits 62:M (here 40) too.
        for bad in [pde | 1 << 13, pde | 1 << 20, pde | 1 << 40, pde | 1 << 62] {
            mem.put64(0x2008, bad);
            let code = fault_code(translate(
                &cfg_pae(true),
                &mut mem,
                linear,
                Access::USER_READ,
            ));
            assert_eq!(
                code,
                user_fault(false, true) | PageFaultCode::RESERVED,
                "pde {bad:#x}"
            );
        }
        // In a PTE, bits 62:M are reserved in PAE paging.
        let mut mem = mem_pae(P, PWU, PWU | 1 << 52);
        let code = fault_code(translate(
            &cfg_pae(true),
            &mut mem,
            GuestVirt(0x4020_3000),
            Access::USER_WRITE,
        ));
        assert_eq!(code, user_fault(true, true) | PageFaultCode::RESERVED);
    }

    /// 4-level tables at 0x1000 (PML4), 0x2000 (PDPT), 0x3000 (PD), 0x4000
    /// (PT) mapping linear 0x0000_7f80_4060_5000 to 0x9000.
    const L4_LINEAR: u64 = (0xff << 39) | (1 << 30) | (3 << 21) | (5 << 12);

    fn mem_long(pml4e: u64, pdpte: u64, pde: u64, pte: u64) -> TestMem {
        let mut mem = TestMem::new(0x10000);
        mem.put64(0x1000 + 0xff * 8, 0x2000 | pml4e);
        mem.put64(0x2000 + 8, 0x3000 | pdpte);
        mem.put64(0x3000 + 3 * 8, 0x4000 | pde);
        mem.put64(0x4000 + 5 * 8, 0x9000 | pte);
        mem
    }

    #[test]
    fn long_mode_translates_and_sets_accessed_everywhere() {
        let mut mem = mem_long(PWU, PWU, PWU, PWU | G);
        let t = translate(
            &cfg_long(true),
            &mut mem,
            GuestVirt(L4_LINEAR | 0x77),
            Access::USER_WRITE,
        )
        .expect("mapped");
        assert_eq!(t.phys, GuestPhys(0x9077));
        assert!(t.dirty && t.global && t.executable);
        assert_eq!(mem.get64(0x1000 + 0xff * 8), 0x2000 | PWU | A);
        assert_eq!(mem.get64(0x2008), 0x3000 | PWU | A);
        assert_eq!(mem.get64(0x3018), 0x4000 | PWU | A);
        assert_eq!(mem.get64(0x4028), 0x9000 | PWU | G | A | D);
        let levels: Vec<Level> = t.path.steps().iter().map(|s| s.level).collect();
        assert_eq!(levels, [Level::Pml4, Level::Pdpt, Level::Pd, Level::Pt]);
        assert_eq!(t.path.steps()[3].value, 0x9000 | PWU | G | A | D);
    }

    #[test]
    fn long_mode_rights_combine_across_levels() {
        let linear = GuestVirt(L4_LINEAR);
        for level in 0..4 {
            let mut entries = [PWU; 4];
            entries[level] = P | U;
            let mut mem = mem_long(entries[0], entries[1], entries[2], entries[3]);
            let t =
                translate(&cfg_long(true), &mut mem, linear, Access::USER_READ).expect("readable");
            assert!(!t.writable, "R/W clear at level {level}");
            assert_eq!(
                fault_code(translate(
                    &cfg_long(true),
                    &mut mem,
                    linear,
                    Access::USER_WRITE
                )),
                user_fault(true, true)
            );

            entries[level] = P | W;
            let mut mem = mem_long(entries[0], entries[1], entries[2], entries[3]);
            assert_eq!(
                fault_code(translate(
                    &cfg_long(true),
                    &mut mem,
                    linear,
                    Access::USER_READ
                )),
                user_fault(false, true)
            );

            entries[level] = PWU | XD;
            let mut mem = mem_long(entries[0], entries[1], entries[2], entries[3]);
            assert!(
                !translate(&cfg_long(true), &mut mem, linear, Access::USER_READ)
                    .expect("readable")
                    .executable
            );
            let code = fault_code(translate(
                &cfg_long(true),
                &mut mem,
                linear,
                Access::USER_FETCH,
            ));
            assert_eq!(
                code,
                user_fault(false, true) | PageFaultCode::FETCH,
                "XD at level {level}"
            );

            entries[level] = 0;
            let mut mem = mem_long(entries[0], entries[1], entries[2], entries[3]);
            assert_eq!(
                fault_code(translate(
                    &cfg_long(true),
                    &mut mem,
                    linear,
                    Access::USER_WRITE
                )),
                user_fault(true, false)
            );
        }
    }

    #[test]
    fn long_mode_reserved_bits() {
        let linear = GuestVirt(L4_LINEAR);
        let rsvd = user_fault(false, true) | PageFaultCode::RESERVED;
        // Bits 51:M at each level (M = 40 here); PS in a PML4E.
        for level in 0..4 {
            let mut entries = [PWU; 4];
            entries[level] |= 1 << 45;
            let mut mem = mem_long(entries[0], entries[1], entries[2], entries[3]);
            assert_eq!(
                fault_code(translate(
                    &cfg_long(true),
                    &mut mem,
                    linear,
                    Access::USER_READ
                )),
                rsvd,
                "level {level}"
            );
        }
        let mut mem = mem_long(PWU | PS, PWU, PWU, PWU);
        assert_eq!(
            fault_code(translate(
                &cfg_long(true),
                &mut mem,
                linear,
                Access::USER_READ
            )),
            rsvd
        );
        // Bits 62:52 are ignored in 4-level paging.
        let mut mem = mem_long(PWU | 1 << 55, PWU | 1 << 62, PWU, PWU | 1 << 52);
        assert!(translate(&cfg_long(true), &mut mem, linear, Access::USER_READ).is_ok());
        // Bit 63 is reserved without NXE.
        let mut mem = mem_long(PWU, PWU, PWU, PWU | XD);
        assert_eq!(
            fault_code(translate(
                &cfg_long(false),
                &mut mem,
                linear,
                Access::USER_READ
            )),
            rsvd
        );
        // A reserved bit wins over a later not-present level, and is
        // reported even for a write that R/W would refuse.
        let mut mem = mem_long(PWU, P | U | 1 << 50, PWU, 0);
        let code = fault_code(translate(
            &cfg_long(true),
            &mut mem,
            linear,
            Access::USER_WRITE,
        ));
        assert_eq!(code, user_fault(true, true) | PageFaultCode::RESERVED);
    }

    #[test]
    fn long_mode_huge_pages() {
        // 2 MiB page in PDE 3.
        let linear = GuestVirt(L4_LINEAR | 0x123);
        let pde = 0x8_1220_0000 | PWU | PS;
        let mut mem = mem_long(PWU, PWU, 0, 0);
        mem.put64(0x3018, pde);
        let t = translate(&cfg_long(true), &mut mem, linear, Access::USER_READ).expect("2 MiB");
        assert_eq!(t.size, PageSize::Size2M);
        assert_eq!(
            t.phys,
            GuestPhys(0x8_1220_0000 | (L4_LINEAR & 0x1f_ffff) | 0x123)
        );
        assert_eq!(t.path.steps().len(), 3);
        mem.put64(0x3018, pde | 1 << 16);
        assert!(fault_code(translate(
            &cfg_long(true),
            &mut mem,
            linear,
            Access::USER_READ
        ))
        .contains(PageFaultCode::RESERVED));

        // 1 GiB page in PDPTE 1.
        let pdpte = 0x40_0000_0000 | PWU | PS | 1 << 12;
        let mut mem = mem_long(PWU, 0, 0, 0);
        mem.put64(0x2008, pdpte);
        let t = translate(&cfg_long(true), &mut mem, linear, Access::USER_WRITE).expect("1 GiB");
        assert_eq!(t.size, PageSize::Size1G);
        assert_eq!(
            t.phys,
            GuestPhys(0x40_0000_0000 | (L4_LINEAR & 0x3fff_ffff) | 0x123),
            "PAT bit 12 is not address"
        );
        assert_eq!(mem.get64(0x2008), pdpte | A | D);
        mem.put64(0x2008, pdpte | 1 << 29);
        assert!(fault_code(translate(
            &cfg_long(true),
            &mut mem,
            linear,
            Access::USER_READ
        ))
        .contains(PageFaultCode::RESERVED));
        // Without 1 GiB page support, PS in a PDPTE is itself reserved.
        let regs = PagingRegisters {
            cr0: (Cr0::PG | Cr0::PE).bits(),
            cr3: 0x1000,
            cr4: Cr4::PAE.bits(),
            efer: (Efer::LME | Efer::LMA | Efer::NXE).bits(),
            a20_mask: ALL_ONES,
        };
        let cfg = PagingConfig::new(
            &regs,
            CpuPaging {
                max_phys_addr_bits: 40,
                gib_pages: false,
            },
        )
        .expect("valid");
        mem.put64(0x2008, pdpte);
        assert!(
            fault_code(translate(&cfg, &mut mem, linear, Access::USER_READ))
                .contains(PageFaultCode::RESERVED)
        );
    }

    #[test]
    fn long_mode_address_checks() {
        let mut mem = mem_long(PWU, PWU, PWU, PWU);
        let cfg = cfg_long(true);
        assert_eq!(
            translate(
                &cfg,
                &mut mem,
                GuestVirt(0x0000_8000_0000_0000),
                Access::USER_READ
            ),
            Err(WalkError::NonCanonical)
        );
        assert_eq!(
            translate(
                &cfg,
                &mut mem,
                GuestVirt(0xfff0_0000_0000_0000),
                Access::USER_READ
            ),
            Err(WalkError::NonCanonical)
        );
        // The upper half is canonical (and not mapped here).
        assert!(matches!(
            translate(
                &cfg,
                &mut mem,
                GuestVirt(0xffff_8000_0000_0000),
                Access::USER_READ
            ),
            Err(WalkError::PageFault(_))
        ));
        assert_eq!(
            translate(
                &cfg32(false),
                &mut mem,
                GuestVirt(1 << 32),
                Access::USER_READ
            ),
            Err(WalkError::Beyond32Bits)
        );
    }

    #[test]
    fn supervisor_rules() {
        let linear = GuestVirt(L4_LINEAR);
        let sup_write = Access {
            kind: AccessKind::Write,
            privilege: Privilege::Supervisor {
                implicit: false,
                eflags_ac: false,
            },
        };
        // Read-only supervisor page: a supervisor write faults only with WP.
        let mut mem = mem_long(PWU, PWU, PWU, P);
        let code = fault_code(translate(&cfg_long(true), &mut mem, linear, sup_write));
        assert_eq!(
            code,
            PageFaultCode::PRESENT | PageFaultCode::WRITE,
            "no U/S bit for supervisor accesses"
        );
        let no_wp = config(Cr0::PE | Cr0::PG, 0x1000, Cr4::PAE, Efer::LME | Efer::LMA);
        assert!(translate(&no_wp, &mut mem, linear, sup_write).is_ok());
        // SMAP: implicit accesses to user pages fault even with AC = 1;
        // explicit ones only without AC.
        let smap = config(
            Cr0::PE | Cr0::PG | Cr0::WP,
            0x1000,
            Cr4::PAE | Cr4::SMAP,
            Efer::LME | Efer::LMA,
        );
        let mut mem = mem_long(PWU, PWU, PWU, PWU);
        assert_eq!(
            fault_code(translate(&smap, &mut mem, linear, Access::IMPLICIT_READ)),
            PageFaultCode::PRESENT
        );
        let explicit_ac = Access {
            kind: AccessKind::Read,
            privilege: Privilege::Supervisor {
                implicit: false,
                eflags_ac: true,
            },
        };
        assert!(translate(&smap, &mut mem, linear, explicit_ac).is_ok());
        // SMEP: supervisor fetch from a user page, I/D reported even without NXE.
        let smep = config(
            Cr0::PE | Cr0::PG,
            0x1000,
            Cr4::PAE | Cr4::SMEP,
            Efer::LME | Efer::LMA,
        );
        let sup_fetch = Access {
            kind: AccessKind::Fetch,
            privilege: Privilege::Supervisor {
                implicit: false,
                eflags_ac: false,
            },
        };
        assert_eq!(
            fault_code(translate(&smep, &mut mem, linear, sup_fetch)),
            PageFaultCode::PRESENT | PageFaultCode::FETCH
        );
        let mut mem = mem_long(PWU, PWU, PWU, P | W);
        assert!(translate(&smep, &mut mem, linear, sup_fetch).is_ok());
    }

    #[test]
    fn paging_disabled_is_identity_under_a20() {
        let regs = PagingRegisters {
            cr0: Cr0::PE.bits(),
            cr3: 0,
            cr4: 0,
            efer: 0,
            a20_mask: !(1 << 20),
        };
        let cfg = PagingConfig::new(&regs, CPU).expect("valid");
        let mut mem = TestMem::new(0x1000);
        let t = translate(&cfg, &mut mem, GuestVirt(0x0012_3456), Access::USER_WRITE)
            .expect("identity");
        assert_eq!(t.phys, GuestPhys(0x0002_3456));
        assert!(t.path.steps().is_empty());
        assert_eq!(
            translate(&cfg, &mut mem, GuestVirt(1 << 32), Access::USER_READ),
            Err(WalkError::Beyond32Bits)
        );
    }

    #[test]
    fn a20_mask_applies_to_tables_and_pages() {
        // CR3 = 0x10_1000 with A20 masked reads the PD at 0x1000.
        let regs = PagingRegisters {
            cr0: (Cr0::PE | Cr0::PG).bits(),
            cr3: 0x10_1000,
            cr4: 0,
            efer: 0,
            a20_mask: !(1 << 20),
        };
        let cfg = PagingConfig::new(&regs, CPU).expect("valid");
        let mut mem = TestMem::new(0x10000);
        mem.put32(0x1004, (0x10_2000 | PWU) as u32);
        mem.put32(0x2000 + 3 * 4, (0x10_5000 | PWU) as u32);
        let t =
            translate(&cfg, &mut mem, GuestVirt(0x0040_3004), Access::USER_READ).expect("mapped");
        assert_eq!(t.phys, GuestPhys(0x5004));
        assert_eq!(t.path.steps()[1].entry_addr, GuestPhys(0x200c));
    }

    #[test]
    fn tables_outside_ram_and_races() {
        let linear = GuestVirt(L4_LINEAR);
        let mut mem = mem_long(PWU, PWU, PWU, PWU);
        mem.put64(0x3018, 0x10_0000 | PWU);
        assert_eq!(
            translate(&cfg_long(true), &mut mem, linear, Access::USER_READ),
            Err(WalkError::NotRam(GuestPhys(0x10_0028)))
        );
        // A writer racing with the A/D update makes the walk start over; it
        // sees the new value and the translation still succeeds.
        let mut mem = mem_long(PWU, PWU, PWU, PWU);
        mem.races = 2;
        let t = translate(&cfg_long(true), &mut mem, linear, Access::USER_WRITE)
            .expect("after restarts");
        assert_eq!(mem.get64(0x1000 + 0xff * 8), 0x2000 | PWU | A | 1 << 9);
        assert!(t.dirty);
        // A writer that never stops wins after a bounded number of attempts.
        let mut mem = mem_long(PWU, PWU, PWU, PWU);
        mem.races = usize::MAX;
        assert_eq!(
            translate(&cfg_long(true), &mut mem, linear, Access::USER_READ),
            Err(WalkError::Contended)
        );
    }

    #[test]
    fn config_checks() {
        let base = PagingRegisters {
            cr0: (Cr0::PE | Cr0::PG).bits(),
            cr3: 0x1000,
            cr4: Cr4::PAE.bits(),
            efer: 0,
            a20_mask: ALL_ONES,
        };
        let long = PagingRegisters {
            efer: (Efer::LME | Efer::LMA).bits(),
            ..base
        };
        assert_eq!(
            PagingConfig::new(&long, CPU).map(|c| c.mode()),
            Ok(PagingMode::Level4)
        );
        let no_pae = PagingRegisters { cr4: 0, ..long };
        assert_eq!(
            PagingConfig::new(&no_pae, CPU),
            Err(PagingConfigError::InconsistentLongMode)
        );
        let la57 = PagingRegisters {
            cr4: (Cr4::PAE | Cr4::LA57).bits(),
            ..long
        };
        assert_eq!(
            PagingConfig::new(&la57, CPU),
            Err(PagingConfigError::FiveLevelPaging)
        );
        let pke = PagingRegisters {
            cr4: (Cr4::PAE | Cr4::PKE).bits(),
            ..long
        };
        assert_eq!(
            PagingConfig::new(&pke, CPU),
            Err(PagingConfigError::ProtectionKeys)
        );
        let high_cr3 = PagingRegisters {
            cr3: 1 << 40,
            ..long
        };
        assert_eq!(
            PagingConfig::new(&high_cr3, CPU),
            Err(PagingConfigError::Cr3ReservedBits)
        );
        let high_cr3_pae = PagingRegisters {
            cr3: 1 << 32,
            ..base
        };
        assert_eq!(
            PagingConfig::new(&high_cr3_pae, CPU),
            Err(PagingConfigError::Cr3ReservedBits)
        );
        // PCID bits are not part of the root.
        let pcid = PagingRegisters {
            cr3: 0x1fff,
            cr4: (Cr4::PAE | Cr4::PCIDE).bits(),
            ..long
        };
        let cfg = PagingConfig::new(&pcid, CPU).expect("valid");
        assert_eq!(cfg.address_space_key().root, GuestPhys(0x1000));
        // Keys: WP does not split address spaces, NXE and PSE (in 32-bit) do.
        let a = config(Cr0::PE | Cr0::PG, 0x1000, Cr4::PSE, Efer::empty()).address_space_key();
        let b = config(Cr0::PE | Cr0::PG | Cr0::WP, 0x1000, Cr4::PSE, Efer::empty())
            .address_space_key();
        let c = config(Cr0::PE | Cr0::PG, 0x1000, Cr4::empty(), Efer::empty()).address_space_key();
        assert_eq!(a, b);
        assert_ne!(a, c);
        let d =
            config(Cr0::PE | Cr0::PG, 0x1000, Cr4::PAE | Cr4::PSE, Efer::NXE).address_space_key();
        let e = config(Cr0::PE | Cr0::PG, 0x1000, Cr4::PAE, Efer::NXE).address_space_key();
        assert_eq!(d, e, "PSE is irrelevant to PAE paging");
        // NXE matters only where NX exists.
        let f = config(Cr0::PE | Cr0::PG, 0x1000, Cr4::empty(), Efer::NXE).address_space_key();
        assert_eq!(f, c);
    }

    #[test]
    fn bit_helpers() {
        assert_eq!(bit_range(2, 1), 0b110);
        assert_eq!(bit_range(63, 63), 1 << 63);
        assert_eq!(bit_range(51, 52), 0);
        assert_eq!(bit_range(63, 0), u64::MAX);
        assert_eq!(low_bits(12), 0xfff);
        assert_eq!(low_bits(64), u64::MAX);
    }
}
