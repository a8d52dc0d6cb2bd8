//! The world switch: switcher pages (GDT, IDT, TSS, stacks), one block of
//! them held by each CPU while it runs a guest, the shadow mapping of
//! those pages, and the entry/exit code (switch.S).
//!
//! ARCHITECTURE.md "Where the monitor lives" and "Rules the world switch
//! must keep". The switcher's pages live in the module's own image: its
//! text in a page-aligned section of its own, its blocks in a static
//! array. Both are therefore mapped by the host at the same virtual
//! addresses in every host address space, and the shadow address spaces
//! map exactly those pages at the same addresses (supervisor-only, through
//! the shadow's reserved PML4 slot), so the code keeps running across each
//! CR3 switch and an NMI at any instruction finds valid tables (the order
//! is explained in switch.S). Nothing else of the host is mapped in the
//! guest's space.

use core::cell::UnsafeCell;
use core::mem::{offset_of, size_of};
use core::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};

use crate::monitor::segments::{MONITOR_GDT_ENTRIES, MONITOR_GDT_FIRST};

/// MSR numbers (SDM Vol. 4 Table 2-2).
const MSR_EFER: u32 = 0xc000_0080;
const MSR_FS_BASE: u32 = 0xc000_0100;
const MSR_GS_BASE: u32 = 0xc000_0101;
const MSR_SYSENTER_CS: u32 = 0x174;

/// CR4.FSGSBASE (SDM Vol. 3A 2.5).
const CR4_FSGSBASE: u64 = 1 << 16;
/// DR7 L0-L3 and G0-G3: a breakpoint is armed only with one of them
/// (SDM Vol. 3B 18.2.4).
const DR7_ENABLE_MASK: u64 = 0xff;
/// DR6 B0-B3, BD, BS and BT: the bits a #DB sets and the processor never
/// clears (SDM Vol. 3B 18.2.3); DR6's value after reset (the others
/// reserved, 1 in bits 31:16 and 11:4, 0 in 63:32).
pub const DR6_STATUS: u64 = 0xf | 1 << 13 | 1 << 14 | 1 << 15;
const DR6_INIT: u64 = 0xffff_0ff0;
/// `SwitchArea::flags`: the switch uses RDFSBASE/WRFSBASE/RDGSBASE/
/// WRGSBASE instead of the MSRs; it reads the code bytes of a #UD or #GP
/// exit (`code_mask` is set); it needs STAC/CLAC to read them (CR4.SMAP);
/// it clears the CPU's buffers with VERW right before the IRETQ into the
/// guest (the CPU enumerates MD_CLEAR).
const F_FSGSBASE: u64 = 1 << 0;
const F_READ_CODE: u64 = 1 << 1;
const F_STAC: u64 = 1 << 2;
const F_VERW: u64 = 1 << 3;
/// CR4.SMAP, CR4.PCIDE and CR4.PGE (SDM Vol. 3A 2.5).
const CR4_SMAP: u64 = 1 << 21;
const CR4_PCIDE: u64 = 1 << 17;
const CR4_PGE: u64 = 1 << 7;
/// CPUID.(EAX=7,ECX=0):EBX bit 10: INVPCID (SDM Vol. 2A CPUID).
const CPUID7_EBX_INVPCID: u32 = 1 << 10;
/// CPUID.(EAX=7,ECX=0):EDX bit 10: MD_CLEAR, VERW with a memory operand
/// overwrites the store, fill and load-port buffers (Intel, "Deep Dive:
/// Intel Analysis of Microarchitectural Data Sampling"). FreeBSD's return
/// to user mode does the same (hw.mds_disable); the guest's entry bypasses
/// it, so switch.S does it.
const CPUID7_EDX_MD_CLEAR: u32 = 1 << 10;
/// INVPCID type 1, single-context invalidation (SDM Vol. 2A INVPCID).
const INVPCID_SINGLE_CONTEXT: u64 = 1;

/// Vectors for which the CPU pushes an error code (SDM Vol. 3A 6.15): 8,
/// 10-14, 17, 21, 29, 30.
const ERROR_CODE_VECTORS: u32 = (1 << 8)
    | (1 << 10)
    | (1 << 11)
    | (1 << 12)
    | (1 << 13)
    | (1 << 14)
    | (1 << 17)
    | (1 << 21)
    | (1 << 29)
    | (1 << 30);
/// Bytes between two vector stubs in switch.S.
const VECTOR_STUB_SIZE: usize = 16;

/// Switcher blocks. A block is needed only while a thread runs inside the
/// host's no-preemption section (`Host::cpu_enter` to `Host::cpu_leave`),
/// so this bounds the CPUs running guest code at the same moment, not the
/// CPU indices: a thread claims a free block there ([`prepare_cpu`]) and
/// gives it back before leaving. With every block taken, EXEC answers
/// `KQEMU_RET_INTR` and the client calls it again.
pub const SWITCHER_BLOCKS: usize = 32;

/// Vectors (SDM Vol. 3A Table 6-1).
pub const VECTOR_DEBUG: u8 = 1;
pub const VECTOR_NMI: u8 = 2;
pub const VECTOR_DOUBLE_FAULT: u8 = 8;
pub const VECTOR_MACHINE_CHECK: u8 = 18;
/// First vector of external interrupts.
pub const FIRST_EXTERNAL_VECTOR: u8 = 32;

/// IST slots of the monitor TSS (1-based, SDM Vol. 3A 7.7): NMI, #DF and
/// #MC have stacks of their own, every other vector uses the exit stack.
const IST_NMI: u8 = 1;
const IST_DOUBLE_FAULT: u8 = 2;
const IST_MACHINE_CHECK: u8 = 3;
const IST_EXIT: u8 = 4;
/// Stacks in the block: NMI, #DF, #MC, exit (IST 1-4 in order).
const STACKS: usize = 4;
/// Words of the exit's far-return frame: RIP and CS, below them the
/// return frames (RAX, RFLAGS, RIP, CS) of an NMI and of a machine check
/// that interrupts the NMI's return (switch.S 4:).
const FAR_FRAME_WORDS: usize = 2 + 4 + 4;

/// Guest GDT descriptors one run can hold (entry registers and lazy fills,
/// segments.rs `RunGdt`); [`CpuSwitcher::set_guest_descriptors`] refuses
/// more.
pub const GUEST_DESCRIPTORS: usize = 16;
/// Entries of the shadow LDT: one page. The guest's LDT may be larger (8192
/// entries); the shadow's limit stops at this page, and the monitor leaves
/// loads of the indices past it to the client.
pub const SHADOW_LDT_ENTRIES: usize = 512;
/// Guest LDT descriptors one run can hold
/// ([`CpuSwitcher::set_guest_ldt`] refuses more).
pub const GUEST_LDT_DESCRIPTORS: usize = 16;

/// GDT index of the monitor TSS descriptor (16 bytes: two entries).
const TSS_INDEX: u16 = MONITOR_GDT_FIRST;
/// GDT index of the monitor's own code segment M, which every gate of the
/// monitor IDT names: above any GDT limit guests use, so no guest selector
/// needs it (switch.S explains when the host's CS may be in force instead).
const MONITOR_CS_INDEX: u16 = MONITOR_GDT_FIRST + 2;
/// M's selector: RPL 0.
pub const MONITOR_CS: u16 = MONITOR_CS_INDEX << 3;
const _: () = assert!(MONITOR_CS_INDEX < MONITOR_GDT_FIRST + MONITOR_GDT_ENTRIES);
/// GDT index of the monitor's writable data segment, which only VERW
/// names: the buffer clear happens whatever the selector, but Intel
/// advises a valid writable data segment for the lowest latency (same
/// paper as [`CPUID7_EDX_MD_CLEAR`]). DPL 0 and above every guest index.
const MONITOR_DS_INDEX: u16 = MONITOR_GDT_FIRST + 3;
const MONITOR_DS: u16 = MONITOR_DS_INDEX << 3;
/// GDT index of the descriptor of the block's shadow LDT (16 bytes in
/// IA-32e mode: two entries, SDM Vol. 3A 7.2.3), which switch.S loads with
/// LLDT for every run: a guest LDT selector then indexes the shadow LDT.
const LDT_INDEX: u16 = MONITOR_GDT_FIRST + 4;
const LDT_SELECTOR: u16 = LDT_INDEX << 3;
const _: () = assert!(
    LDT_INDEX > MONITOR_DS_INDEX && LDT_INDEX + 1 < MONITOR_GDT_FIRST + MONITOR_GDT_ENTRIES
);
// Clear of the TSS (two entries) and M, inside the monitor's part.
const _: () = assert!(
    MONITOR_DS_INDEX > TSS_INDEX + 1
        && MONITOR_DS_INDEX != MONITOR_CS_INDEX
        && MONITOR_DS_INDEX < MONITOR_GDT_FIRST + MONITOR_GDT_ENTRIES
);
/// Bytes of a 64-bit TSS (SDM Vol. 3A Figure 7-11); an I/O map base at
/// the limit means "no I/O permission bitmap": every IN/OUT at CPL 3 with
/// IOPL < 3 faults.
const TSS_SIZE: usize = 104;

/// Table pages per CPU for the switcher's part of the shadow tree: one
/// PDPT, and page directories and page tables for the text and the block,
/// which may each straddle a 2 MiB or 1 GiB boundary.
const TABLE_PAGES: usize = 8;

const PAGE: usize = 4096;
const ENTRIES: usize = 512;

/// Page-table entry bits (SDM Vol. 3A Table 4-19/4-20).
const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_ACCESSED: u64 = 1 << 5;
const PTE_DIRTY: u64 = 1 << 6;
const PTE_NO_EXECUTE: u64 = 1 << 63;
const PTE_FRAME: u64 = 0x000f_ffff_ffff_f000;

/// A pseudo-descriptor for LGDT/LIDT/SGDT/SIDT, placed so that the limit
/// starts at byte 6 and the base is 8-byte aligned.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PseudoDescriptor {
    pad: [u16; 3],
    pub limit: u16,
    pub base: u64,
}

/// What the assembly reads and writes: the guest's registers, the host's
/// saved state and the description of the exit. Selectors are kept in
/// 64-bit slots whose upper bytes stay zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SwitchArea {
    /// RAX RCX RDX RBX RSP RBP RSI RDI R8..R15 (RSP unused: see `rsp`).
    pub regs: [u64; 16],
    /// The IRETQ frame: RIP, CS, RFLAGS, RSP, SS.
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
    pub ds: u64,
    pub es: u64,
    pub fs: u64,
    pub gs: u64,
    /// The FS and GS bases the guest runs with, loaded after its
    /// selectors (for a 32-bit guest the base of the selector's
    /// descriptor, 0 for a null selector) and read back at the exit.
    pub fs_base: u64,
    pub gs_base: u64,
    /// [`F_FSGSBASE`], [`F_READ_CODE`], [`F_STAC`], [`F_VERW`]; set by
    /// [`CpuSwitcher::run`].
    pub flags: u64,
    /// The selector VERW reads (`MONITOR_DS`).
    pub verw_selector: u64,
    /// CS base and the mask of the code size (`u32::MAX` or `u64::MAX`)
    /// giving the linear address of RIP; 0: the exit reads no code.
    pub code_base: u64,
    pub code_mask: u64,
    pub shadow_cr3: u64,
    pub guest_cr0: u64,
    pub guest_cr4: u64,
    pub guest_efer: u64,
    pub mon_gdtr: PseudoDescriptor,
    pub mon_idtr: PseudoDescriptor,
    pub mon_tr: u64,
    /// The selector of the shadow LDT's descriptor, loaded with LLDT.
    pub mon_ldtr: u64,
    /// M, the monitor's code selector.
    pub mon_cs: u64,
    /// The host's CS selector, the address of its index in the monitor
    /// GDT, the host's descriptor there, and what the guest runs with
    /// there (its own descriptor at that index, or 0).
    pub host_cs: u64,
    pub host_cs_slot: u64,
    pub host_cs_desc: u64,
    pub guest_at_host_cs: u64,
    pub host_rsp: u64,
    pub host_cr3: u64,
    pub host_cr0: u64,
    pub host_cr4: u64,
    pub host_efer: u64,
    pub host_gdtr: PseudoDescriptor,
    pub host_idtr: PseudoDescriptor,
    pub host_ldtr: u64,
    pub host_tr: u64,
    pub host_fs_base: u64,
    pub host_gs_base: u64,
    pub host_ds: u64,
    pub host_es: u64,
    pub host_fs: u64,
    pub host_gs: u64,
    pub host_ss: u64,
    pub host_sysenter_cs: u64,
    pub host_dr7: u64,
    /// The host's DR6 (switch.S clears its status bits for the run when
    /// any is set, and puts it back when the run may have changed it).
    pub host_dr6: u64,
    pub exit_vector: u64,
    pub exit_error: u64,
    pub exit_cr2: u64,
    /// 0: the guest exited from CPL 3; 1: a fault at CPL 0 while the
    /// guest's state was being loaded; 2: an NMI or machine check
    /// (`exit_vector`) in the entry, which was abandoned before the guest
    /// ran.
    pub exit_kind: u64,
    pub exit_fault_rip: u64,
    /// Bit 0: an NMI, bit 1: a machine check arrived in the exit.
    pub pending: u64,
    /// The two bytes at CS:RIP of a #UD or #GP exit (little endian) when
    /// `exit_code_len` is 2, read while the guest's mapping was loaded.
    pub exit_code: u64,
    pub exit_code_len: u64,
    /// 1 while the exit reads them (a fault there resumes the exit).
    pub reading_code: u64,
    /// The [`DR6_STATUS`] bits of DR6 after an exit through vector 1
    /// (those of the guest's #DB: the run starts with them clear).
    pub exit_dr6: u64,
    /// The exit's far return to the host's CS pops its RIP and CS from
    /// the last two words (switch.S: a stack no interrupt shares); the
    /// words below are room for the return frames (four words each) of
    /// an NMI and a machine check taken meanwhile.
    pub far_frame: [u64; FAR_FRAME_WORDS],
}

impl SwitchArea {
    /// The two bytes at CS:RIP the exit read, if it did.
    pub fn exit_code(&self) -> Option<[u8; 2]> {
        (self.exit_code_len == 2).then_some([self.exit_code as u8, (self.exit_code >> 8) as u8])
    }
}

/// The page that holds the switch area, the TSS and the CPU's
/// bookkeeping (one page for all three: every run touches them, and under
/// a TLB flushed by each CR3 switch every page touched costs a refill).
#[repr(C, align(4096))]
struct AreaPage {
    area: SwitchArea,
    /// The 64-bit TSS, as 32-bit words (its 64-bit fields are not 8-byte
    /// aligned).
    tss: [u32; TSS_SIZE / 4],
    state: CpuState,
}

/// Bookkeeping of one CPU that the assembly never touches.
#[derive(Clone, Copy, Debug)]
struct CpuState {
    /// Guest descriptors (GDT index, descriptor) written for the last run.
    written: [(u16, u64); GUEST_DESCRIPTORS],
    written_len: usize,
    /// The same for the shadow LDT, and its byte limit.
    ldt_written: [(u16, u64); GUEST_LDT_DESCRIPTORS],
    ldt_written_len: usize,
    ldt_limit: u32,
    /// Host CS index whose descriptor copy sits in the monitor GDT, and
    /// that descriptor.
    host_cs_index: u16,
    host_cs_desc: u64,
    /// The guest's descriptor at `host_cs_index` for the next run (0:
    /// none); switch.S puts it there once CS is M.
    guest_at_host_cs: u64,
    /// The PML4 entry that maps this CPU's switcher pages.
    pml4_entry: u64,
    /// The host GS base the stack tops hold (the CPU never writes that
    /// word: its pushes start below the IST pointer).
    stack_gs: u64,
    /// The host CPU the block was last set up for: the IDT's gates and
    /// the GDT's copy of the host CS come from that CPU's tables.
    cpu: usize,
    /// The CPU enumerates MD_CLEAR: every run sets [`F_VERW`].
    md_clear: bool,
}

/// One CPU's switcher pages. The GDT, IDT, area page and stacks are
/// mapped in the shadow address spaces (supervisor-only); the table pages
/// are the switcher's part of the shadow tree.
#[repr(C, align(4096))]
struct CpuBlock {
    gdt: [u64; 8192],
    idt: [u64; 2 * 256],
    area: AreaPage,
    stacks: [[u64; ENTRIES]; STACKS],
    /// The shadow LDT: the CPU reads it through the shadow tables on each
    /// load of an LDT selector (and may set accessed bits in it).
    ldt: [u64; SHADOW_LDT_ENTRIES],
    tables: [[u64; ENTRIES]; TABLE_PAGES],
}

/// Pages of a block the guest's space maps: GDT (16), IDT, area, stacks,
/// LDT.
const MAPPED_BLOCK_PAGES: usize = 16 + 1 + 1 + STACKS + 1;

struct Blocks([UnsafeCell<CpuBlock>; SWITCHER_BLOCKS]);

// SAFETY: block `i` is used only by the thread that holds bit `i` of
// `CLAIMED` (taken with Acquire, given back with Release, so each holder
// sees the previous holder's writes).
unsafe impl Sync for Blocks {}

// SAFETY: all-zero bytes are a valid CpuBlock (integers and arrays of
// them); a zeroed static goes to .bss.
static BLOCKS: Blocks = unsafe { core::mem::zeroed() };

/// Bit `i`: block `i` is held by a thread inside its no-preemption section.
static CLAIMED: AtomicU32 = AtomicU32::new(0);
const _: () = assert!(SWITCHER_BLOCKS <= 32);

/// Per-block setup state: 0 not set up, 1 ready, 2 failed.
static READY: [AtomicU8; SWITCHER_BLOCKS] = [const { AtomicU8::new(0) }; SWITCHER_BLOCKS];
const NOT_SET_UP: u8 = 0;
const SET_UP: u8 = 1;
const SETUP_FAILED: u8 = 2;

extern "C" {
    static kqemu_switch_text_start: u8;
    static kqemu_switch_text_end: u8;
    static kqemu_switch_vectors: u8;
    fn kqemu_switch_run(area: *mut SwitchArea);
}

core::arch::global_asm!(
    include_str!("switch.S"),
    A_HOST_RSP = const offset_of!(SwitchArea, host_rsp),
    A_HOST_CR3 = const offset_of!(SwitchArea, host_cr3),
    A_HOST_CR0 = const offset_of!(SwitchArea, host_cr0),
    A_HOST_CR4 = const offset_of!(SwitchArea, host_cr4),
    A_HOST_EFER = const offset_of!(SwitchArea, host_efer),
    A_HOST_GDTR = const offset_of!(SwitchArea, host_gdtr),
    A_HOST_IDTR = const offset_of!(SwitchArea, host_idtr),
    A_HOST_LDTR = const offset_of!(SwitchArea, host_ldtr),
    A_HOST_TR = const offset_of!(SwitchArea, host_tr),
    A_HOST_DS = const offset_of!(SwitchArea, host_ds),
    A_HOST_ES = const offset_of!(SwitchArea, host_es),
    A_HOST_FS = const offset_of!(SwitchArea, host_fs),
    A_HOST_GS = const offset_of!(SwitchArea, host_gs),
    A_HOST_SS = const offset_of!(SwitchArea, host_ss),
    A_HOST_FS_BASE = const offset_of!(SwitchArea, host_fs_base),
    A_HOST_GS_BASE = const offset_of!(SwitchArea, host_gs_base),
    A_HOST_SYSENTER_CS = const offset_of!(SwitchArea, host_sysenter_cs),
    A_GUEST_EFER = const offset_of!(SwitchArea, guest_efer),
    A_GUEST_CR0 = const offset_of!(SwitchArea, guest_cr0),
    A_GUEST_CR4 = const offset_of!(SwitchArea, guest_cr4),
    A_MON_GDTR = const offset_of!(SwitchArea, mon_gdtr),
    A_MON_IDTR = const offset_of!(SwitchArea, mon_idtr),
    A_MON_TR = const offset_of!(SwitchArea, mon_tr),
    A_MON_LDTR = const offset_of!(SwitchArea, mon_ldtr),
    A_MON_CS = const offset_of!(SwitchArea, mon_cs),
    A_HOST_CS = const offset_of!(SwitchArea, host_cs),
    A_HOST_CS_SLOT = const offset_of!(SwitchArea, host_cs_slot),
    A_HOST_CS_DESC = const offset_of!(SwitchArea, host_cs_desc),
    A_GUEST_AT_HOST_CS = const offset_of!(SwitchArea, guest_at_host_cs),
    A_SHADOW_CR3 = const offset_of!(SwitchArea, shadow_cr3),
    A_GUEST_DS = const offset_of!(SwitchArea, ds),
    A_GUEST_ES = const offset_of!(SwitchArea, es),
    A_GUEST_FS = const offset_of!(SwitchArea, fs),
    A_GUEST_GS = const offset_of!(SwitchArea, gs),
    A_GUEST_FS_BASE = const offset_of!(SwitchArea, fs_base),
    A_GUEST_GS_BASE = const offset_of!(SwitchArea, gs_base),
    A_FLAGS = const offset_of!(SwitchArea, flags),
    A_VERW_SELECTOR = const offset_of!(SwitchArea, verw_selector),
    A_HOST_DR7 = const offset_of!(SwitchArea, host_dr7),
    A_HOST_DR6 = const offset_of!(SwitchArea, host_dr6),
    A_EXIT_DR6 = const offset_of!(SwitchArea, exit_dr6),
    A_FAR_FRAME_END = const offset_of!(SwitchArea, far_frame) + size_of::<[u64; FAR_FRAME_WORDS]>(),
    A_GUEST_RIP = const offset_of!(SwitchArea, rip),
    A_EXIT_VECTOR = const offset_of!(SwitchArea, exit_vector),
    A_EXIT_ERROR = const offset_of!(SwitchArea, exit_error),
    A_EXIT_CR2 = const offset_of!(SwitchArea, exit_cr2),
    A_EXIT_KIND = const offset_of!(SwitchArea, exit_kind),
    A_EXIT_FAULT_RIP = const offset_of!(SwitchArea, exit_fault_rip),
    A_PENDING = const offset_of!(SwitchArea, pending),
    A_EXIT_CODE = const offset_of!(SwitchArea, exit_code),
    A_EXIT_CODE_LEN = const offset_of!(SwitchArea, exit_code_len),
    A_READING_CODE = const offset_of!(SwitchArea, reading_code),
    A_CODE_BASE = const offset_of!(SwitchArea, code_base),
    A_CODE_MASK = const offset_of!(SwitchArea, code_mask),
    MSR_EFER = const MSR_EFER,
    MSR_FS_BASE = const MSR_FS_BASE,
    MSR_GS_BASE = const MSR_GS_BASE,
    MSR_SYSENTER_CS = const MSR_SYSENTER_CS,
    VECTOR_STUB_SIZE = const VECTOR_STUB_SIZE,
    F_FSGSBASE = const F_FSGSBASE,
    F_READ_CODE = const F_READ_CODE,
    F_STAC = const F_STAC,
    F_VERW = const F_VERW,
    DR7_ENABLE_MASK = const DR7_ENABLE_MASK,
    DR6_STATUS = const DR6_STATUS,
    DR6_INIT = const DR6_INIT,
    ERROR_CODE_VECTORS = const ERROR_CODE_VECTORS,
    options(att_syntax)
);

// `int $n` for every n, four bytes apart, to hand an interrupt or NMI that
// arrived in guest mode to the host's own handler through the host's IDT.
core::arch::global_asm!(
    ".pushsection .text.kqemu_reraise, \"ax\", @progbits",
    ".balign 4",
    ".globl kqemu_reraise_table",
    "kqemu_reraise_table:",
    ".set vector, 0",
    ".rept 256",
    ".balign 4",
    ".byte 0xcd, vector",
    "ret",
    ".set vector, vector + 1",
    ".endr",
    ".popsection",
);

extern "C" {
    static kqemu_reraise_table: u8;
}

/// The layout the assembly relies on.
const _: () = {
    assert!(offset_of!(SwitchArea, regs) == 0);
    assert!(offset_of!(SwitchArea, rip) == 0x80);
    assert!(offset_of!(SwitchArea, ss) == offset_of!(SwitchArea, rip) + 32);
    assert!(offset_of!(SwitchArea, mon_gdtr) % 8 == 0);
    assert!(offset_of!(SwitchArea, host_gdtr) % 8 == 0);
    assert!(offset_of!(SwitchArea, far_frame) % 8 == 0);
    assert!(size_of::<AreaPage>() == PAGE);
    assert!(offset_of!(CpuBlock, idt) == 16 * PAGE);
    assert!(offset_of!(CpuBlock, area) == 17 * PAGE);
    assert!(offset_of!(CpuBlock, stacks) == 18 * PAGE);
    assert!(offset_of!(CpuBlock, ldt) == (18 + STACKS) * PAGE);
    assert!(SHADOW_LDT_ENTRIES * 8 == PAGE);
    assert!(offset_of!(CpuBlock, tables) == MAPPED_BLOCK_PAGES * PAGE);
};

/// A 16-byte IDT gate: 64-bit interrupt gate (type 14), DPL 0, present,
/// with `ist` (SDM Vol. 3A Figure 6-8). Interrupt gates clear IF, so the
/// exit path runs with interrupts off. DPL 0 on every gate: `int n`, `int3`
/// and `into` at CPL 3 then raise #GP(n * 8 + 2), which the monitor
/// decodes into `KQEMU_RET_INT` with `next_eip`.
pub fn interrupt_gate(handler: u64, selector: u16, ist: u8) -> [u64; 2] {
    const TYPE_INTERRUPT_GATE: u64 = 0xe;
    const PRESENT: u64 = 1 << 15;
    let low = (handler & 0xffff)
        | (u64::from(selector) << 16)
        | (u64::from(ist & 7) << 32)
        | ((TYPE_INTERRUPT_GATE << 8 | PRESENT) << 32)
        | ((handler >> 16) & 0xffff) << 48;
    [low, handler >> 32]
}

/// M's descriptor: 64-bit code (L set, D clear), DPL 0, present,
/// execute/read, accessed (SDM Vol. 3A 3.4.5, 5.2.1: in 64-bit mode base
/// and limit are ignored). Accessed is preset so that the far return to M
/// does not write the GDT.
pub fn monitor_code_descriptor() -> u64 {
    const TYPE_CODE_READ_ACCESSED: u64 = 0xb;
    const S: u64 = 1 << 44;
    const PRESENT: u64 = 1 << 47;
    const LONG: u64 = 1 << 53;
    const GRANULARITY: u64 = 1 << 55;
    0xffff | 0xf << 48 | TYPE_CODE_READ_ACCESSED << 40 | S | PRESENT | LONG | GRANULARITY
}

/// The monitor's data descriptor for VERW: writable data, DPL 0, present,
/// accessed (SDM Vol. 3A 3.4.5; VERW loads nothing, so it is never written).
pub fn monitor_data_descriptor() -> u64 {
    const TYPE_DATA_WRITE_ACCESSED: u64 = 0x3;
    const S: u64 = 1 << 44;
    const PRESENT: u64 = 1 << 47;
    const DB: u64 = 1 << 54;
    const GRANULARITY: u64 = 1 << 55;
    0xffff | 0xf << 48 | TYPE_DATA_WRITE_ACCESSED << 40 | S | PRESENT | DB | GRANULARITY
}

/// Whether the CPU enumerates MD_CLEAR, from CPUID leaf 0's EAX and
/// leaf 7's EDX (asked only when leaf 7 exists).
fn md_clear(max_leaf: u32, leaf7_edx: impl FnOnce() -> u32) -> bool {
    max_leaf >= 7 && leaf7_edx() & CPUID7_EDX_MD_CLEAR != 0
}

/// The monitor IDT: every vector to its stub in switch.S through M, NMI,
/// #DF and #MC on stacks of their own, everything else on the exit stack.
fn write_gates(idt: &mut [u64; 2 * 256], vectors: u64) {
    for v in 0..256usize {
        let ist = match v as u8 {
            VECTOR_NMI => IST_NMI,
            VECTOR_DOUBLE_FAULT => IST_DOUBLE_FAULT,
            VECTOR_MACHINE_CHECK => IST_MACHINE_CHECK,
            _ => IST_EXIT,
        };
        let gate = interrupt_gate(vectors + (v * VECTOR_STUB_SIZE) as u64, MONITOR_CS, ist);
        idt[2 * v] = gate[0];
        idt[2 * v + 1] = gate[1];
    }
}

/// A 16-byte available 64-bit TSS descriptor (type 9) for the TSS at
/// `base` (SDM Vol. 3A Figure 7-4).
pub fn tss_descriptor(base: u64) -> [u64; 2] {
    const TYPE_AVAILABLE_TSS: u64 = 0x9;
    const PRESENT: u64 = 1 << 47;
    let limit = (TSS_SIZE - 1) as u64;
    let low = (limit & 0xffff)
        | (base & 0xff_ffff) << 16
        | TYPE_AVAILABLE_TSS << 40
        | PRESENT
        | ((limit >> 16) & 0xf) << 48
        | ((base >> 24) & 0xff) << 56;
    [low, base >> 32]
}

/// A 16-byte LDT descriptor (system type 2, DPL 0, present) for the table
/// at `base` with byte limit `limit` (SDM Vol. 3A 7.2.3 and Table 3-2: in
/// IA-32e mode LDT descriptors are 16 bytes, the upper 8 holding base
/// bits 63:32 and a zero type field).
pub fn ldt_descriptor(base: u64, limit: u32) -> [u64; 2] {
    const TYPE_LDT: u64 = 0x2;
    const PRESENT: u64 = 1 << 47;
    let limit = u64::from(limit);
    let low = (limit & 0xffff)
        | (base & 0xff_ffff) << 16
        | TYPE_LDT << 40
        | PRESENT
        | ((limit >> 16) & 0xf) << 48
        | ((base >> 24) & 0xff) << 56;
    [low, base >> 32]
}

/// Why the switcher pages of a CPU cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetupError {
    /// Every switcher block is held by another CPU's run (or failed).
    AllBlocksBusy,
    /// Every switcher block failed its setup.
    AllBlocksFailed,
    /// The host gave no physical address for a switcher page.
    NoPhysical,
    /// The switcher's pages do not all lie in one PML4 slot, or need more
    /// table pages than reserved.
    Layout,
    /// The host's CS selector is not usable in the monitor GDT.
    HostSelector,
    /// The host IDT's gate for `vector` is missing, not an interrupt or
    /// trap gate, or names another code selector (`selector`) than the
    /// CS the switch is entered on: the monitor GDT holds no descriptor
    /// for it while the host's IDT may be loaded.
    HostGate { vector: u8, selector: Option<u16> },
}

/// The switcher's part of the shadow tree for one CPU: maps 4 KiB pages
/// at their host virtual addresses below one PML4 slot, supervisor-only.
/// Table pages come from `tables` (index 0 is the PDPT), whose physical
/// addresses `phys` gives.
pub struct SwitcherMap<'a> {
    tables: &'a mut [[u64; ENTRIES]],
    phys: &'a [u64],
    used: usize,
    slot: usize,
}

impl<'a> SwitcherMap<'a> {
    /// An empty map for PML4 slot `slot`; `tables` and `phys` have the
    /// same length (at least one).
    pub fn new(
        tables: &'a mut [[u64; ENTRIES]],
        phys: &'a [u64],
        slot: usize,
    ) -> Result<Self, SetupError> {
        if tables.is_empty() || tables.len() != phys.len() {
            return Err(SetupError::Layout);
        }
        for t in tables.iter_mut() {
            t.fill(0);
        }
        Ok(Self {
            tables,
            phys,
            used: 1,
            slot,
        })
    }

    /// The PML4 entry that points to the map: present, writable, not
    /// user (so nothing below is reachable from CPL 3).
    pub fn pml4_entry(&self) -> u64 {
        (self.phys[0] & PTE_FRAME) | PTE_PRESENT | PTE_WRITABLE | PTE_ACCESSED
    }

    fn child(&mut self, table: usize, index: usize) -> Result<usize, SetupError> {
        let entry = self.tables[table][index];
        if entry & PTE_PRESENT != 0 {
            return self
                .phys
                .iter()
                .position(|&p| p == entry & PTE_FRAME)
                .ok_or(SetupError::Layout);
        }
        let new = self.used;
        if new >= self.tables.len() {
            return Err(SetupError::Layout);
        }
        self.used += 1;
        self.tables[table][index] =
            (self.phys[new] & PTE_FRAME) | PTE_PRESENT | PTE_WRITABLE | PTE_ACCESSED;
        Ok(new)
    }

    /// Maps the page at virtual `virt` to physical `phys`, writable or
    /// executable as asked. Dirty and accessed are preset so the CPU never
    /// writes the tables.
    pub fn map(
        &mut self,
        virt: u64,
        phys: u64,
        writable: bool,
        executable: bool,
    ) -> Result<(), SetupError> {
        let index = |shift: u32| ((virt >> shift) as usize) % ENTRIES;
        if index(39) != self.slot || phys & !PTE_FRAME & !0xfff != 0 {
            return Err(SetupError::Layout);
        }
        let pd = self.child(0, index(30))?;
        let pt = self.child(pd, index(21))?;
        let mut entry = (phys & PTE_FRAME) | PTE_PRESENT | PTE_ACCESSED;
        if writable {
            entry |= PTE_WRITABLE | PTE_DIRTY;
        }
        if !executable {
            entry |= PTE_NO_EXECUTE;
        }
        self.tables[pt][index(12)] = entry;
        Ok(())
    }
}

/// The PML4 slot of a kernel virtual address.
pub fn pml4_slot(virt: u64) -> usize {
    ((virt >> 39) as usize) % ENTRIES
}

/// The PML4 slot the switcher occupies in every shadow address space (the
/// slot of the module's image).
pub fn switcher_slot() -> usize {
    pml4_slot(core::ptr::addr_of!(kqemu_switch_text_start) as u64)
}

/// Virtual range of the switch text, whole pages.
fn text_range() -> (u64, u64) {
    (
        core::ptr::addr_of!(kqemu_switch_text_start) as u64,
        core::ptr::addr_of!(kqemu_switch_text_end) as u64,
    )
}

/// The host's current CS selector.
fn read_cs() -> u16 {
    let cs: u16;
    // SAFETY: reading CS has no side effect.
    unsafe { core::arch::asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack)) };
    cs
}

/// The host's current GDTR.
fn read_gdtr() -> PseudoDescriptor {
    let mut d = PseudoDescriptor::default();
    // SAFETY: SGDT stores 10 bytes at the given address, inside `d`.
    unsafe {
        core::arch::asm!(
            "sgdt [{0}]",
            in(reg) core::ptr::addr_of_mut!(d.limit),
            options(nostack)
        )
    };
    d
}

/// The host IDT's vectors that can be delivered while the host's IDT
/// meets the monitor GDT (interrupts disabled, no fault expected there):
/// #DB, NMI, #DF and #MC. Their gates must name the host CS, the only
/// host code descriptor the monitor GDT holds a copy of (switch.S).
const HOST_GATES_CHECKED: [u8; 4] = [
    VECTOR_DEBUG,
    VECTOR_NMI,
    VECTOR_DOUBLE_FAULT,
    VECTOR_MACHINE_CHECK,
];

/// The code selector a 16-byte IDT gate names when it is present and a
/// 64-bit interrupt or trap gate (SDM Vol. 3A 6.14.1, Figure 6-8: bits
/// 31:16 the selector, 43:40 the type, 47 P).
pub fn gate_selector(gate: [u64; 2]) -> Option<u16> {
    const TYPE_INTERRUPT_GATE: u64 = 0xe;
    const TYPE_TRAP_GATE: u64 = 0xf;
    const PRESENT: u64 = 1 << 47;
    let kind = (gate[0] >> 40) & 0xf;
    if gate[0] & PRESENT == 0 || (kind != TYPE_INTERRUPT_GATE && kind != TYPE_TRAP_GATE) {
        return None;
    }
    Some((gate[0] >> 16) as u16)
}

/// Checks that the gates of [`HOST_GATES_CHECKED`] in the host IDT name
/// `host_cs`; `gate(v)` is the IDT's gate for vector `v`, `None` past its
/// limit.
fn check_host_gates(gate: impl Fn(u8) -> Option<[u64; 2]>, host_cs: u16) -> Result<(), SetupError> {
    for vector in HOST_GATES_CHECKED {
        let selector = gate(vector).and_then(gate_selector);
        if selector != Some(host_cs) {
            return Err(SetupError::HostGate { vector, selector });
        }
    }
    Ok(())
}

/// The host's current IDTR.
fn read_idtr() -> PseudoDescriptor {
    let mut d = PseudoDescriptor::default();
    // SAFETY: SIDT stores 10 bytes at the given address, inside `d`.
    unsafe {
        core::arch::asm!(
            "sidt [{0}]",
            in(reg) core::ptr::addr_of_mut!(d.limit),
            options(nostack)
        )
    };
    d
}

/// Every block's bit.
const ALL_BLOCKS: u32 = u32::MAX >> (32 - SWITCHER_BLOCKS);

/// Takes a free bit of `claimed` (one of `SWITCHER_BLOCKS`) that is not
/// in `skip`, trying `preferred` first so that a CPU keeps finding the
/// block it set up last (nothing to redo then). `None` when every bit is
/// taken or skipped.
fn claim_bit(claimed: &AtomicU32, skip: u32, preferred: usize) -> Option<usize> {
    for step in 0..SWITCHER_BLOCKS {
        let i = (preferred + step) % SWITCHER_BLOCKS;
        let bit = 1u32 << i;
        if (claimed.load(Ordering::Relaxed) | skip) & bit != 0 {
            continue;
        }
        // Acquire: the block's contents as the last holder left them.
        if claimed.fetch_or(bit, Ordering::Acquire) & bit == 0 {
            return Some(i);
        }
    }
    None
}

/// Gives back bit `i` taken by [`claim_bit`]; Release publishes the
/// block's contents to the next holder.
fn release_bit(claimed: &AtomicU32, i: usize) {
    claimed.fetch_and(!(1u32 << i), Ordering::Release);
}

/// The bits of the blocks whose setup failed.
fn failed_blocks(ready: &[AtomicU8; SWITCHER_BLOCKS]) -> u32 {
    ready
        .iter()
        .enumerate()
        .filter(|(_, r)| r.load(Ordering::Acquire) == SETUP_FAILED)
        .fold(0, |mask, (i, _)| mask | 1 << i)
}

/// A switcher block held by this thread; given back when dropped.
struct Claim {
    index: usize,
}

impl Drop for Claim {
    fn drop(&mut self) {
        release_bit(&CLAIMED, self.index);
    }
}

/// Every switcher block held, as by 32 runs on other CPUs, until dropped
/// (tests of what EXEC answers then).
#[cfg(test)]
pub(crate) struct AllBlocksHeld;

#[cfg(test)]
impl AllBlocksHeld {
    pub(crate) fn take() -> Self {
        let all = ALL_BLOCKS;
        // No other host test claims blocks: a free block here would let
        // prepare_cpu go on to the hardware.
        assert_eq!(CLAIMED.swap(all, Ordering::AcqRel), 0, "blocks free");
        Self
    }
}

#[cfg(test)]
impl Drop for AllBlocksHeld {
    fn drop(&mut self) {
        CLAIMED.store(0, Ordering::Release);
    }
}

/// A CPU's switcher, prepared for a run. Obtained from [`prepare_cpu`]
/// inside the host's no-preemption section, used on that CPU only, and
/// dropped before that section ends (which gives its block back).
pub struct CpuSwitcher {
    block: *mut CpuBlock,
    claim: Claim,
}

/// Claims a free switcher block for CPU `cpu`, sets it up (once) and
/// readies it for this CPU if another one used it last.
///
/// # Safety
///
/// The caller runs on CPU `cpu` with preemption and migration disabled
/// until it drops the result.
pub unsafe fn prepare_cpu(
    cpu: usize,
    virt_to_phys: impl Fn(u64) -> Option<u64>,
) -> Result<CpuSwitcher, SetupError> {
    // A block whose setup failed stays failed: never claimed again, or
    // the CPUs preferring it would never run guest code natively.
    let failed = failed_blocks(&READY);
    let index =
        claim_bit(&CLAIMED, failed, cpu % SWITCHER_BLOCKS).ok_or(if failed == ALL_BLOCKS {
            SetupError::AllBlocksFailed
        } else {
            SetupError::AllBlocksBusy
        })?;
    // From here on an early return gives the block back (Claim::drop).
    let claim = Claim { index };
    let ready = &READY[index];
    let block = BLOCKS.0[index].get();
    // SAFETY: the claim makes this thread the block's only user.
    let b = unsafe { &mut *block };
    match ready.load(Ordering::Acquire) {
        SET_UP if b.area.state.cpu == cpu => {}
        SET_UP => bind_to_cpu(b, cpu)?,
        NOT_SET_UP => {
            let result = set_up(b, cpu, &virt_to_phys);
            // Host gates that do not name the host CS concern this CPU's
            // IDT, not the block: another CPU may still set it up.
            let next = match result {
                Ok(()) => SET_UP,
                Err(SetupError::HostGate { .. }) => NOT_SET_UP,
                Err(_) => SETUP_FAILED,
            };
            ready.store(next, Ordering::Release);
            result?;
        }
        _ => return Err(SetupError::Layout),
    }
    Ok(CpuSwitcher { block, claim })
}

/// What of a block depends on the host CPU running it, (re)done for CPU
/// `cpu`: the GDT holds a copy of the host's CS descriptor at its index
/// while the host's IDT or CS may be in force (switch.S). The guest
/// descriptors of the last run go too: the host CS index may have moved
/// onto one of them. (The IST stacks' top word, the CPU's GS base that
/// FreeBSD's NMI, MC and DB handlers read there, is rewritten by the run
/// that finds it changed: CpuSwitcher::run.)
fn bind_to_cpu(b: &mut CpuBlock, cpu: usize) -> Result<(), SetupError> {
    let host_cs = read_cs();
    let cs_index = host_cs >> 3;
    if host_cs & 7 != 0 || cs_index == 0 || cs_index >= MONITOR_GDT_FIRST {
        return Err(SetupError::HostSelector);
    }
    // The host's CS descriptor, copied at the same index (switch.S).
    let host_gdt = read_gdtr();
    if u64::from(host_gdt.limit) < u64::from(cs_index) * 8 + 7 {
        return Err(SetupError::HostSelector);
    }
    // SAFETY: the host's GDT is mapped and holds the descriptor of the CS
    // we run on (checked against its limit above).
    let cs_desc = unsafe { ((host_gdt.base + u64::from(cs_index) * 8) as *const u64).read() };
    let host_idt = read_idtr();
    check_host_gates(
        |vector| {
            let offset = u64::from(vector) * 16;
            (offset + 15 <= u64::from(host_idt.limit)).then(|| {
                let p = (host_idt.base + offset) as *const [u64; 2];
                // SAFETY: the host's loaded IDT is mapped in the kernel
                // and holds this gate (checked against its limit).
                unsafe { p.read_unaligned() }
            })
        },
        host_cs,
    )?;

    forget_guest_descriptors(b);
    let state = &mut b.area.state;
    b.gdt[usize::from(state.host_cs_index)] = 0;
    b.gdt[usize::from(cs_index)] = cs_desc;
    state.host_cs_index = cs_index;
    state.host_cs_desc = cs_desc;
    state.cpu = cpu;
    Ok(())
}

/// Clears the guest descriptors the block's last run wrote into its GDT
/// (the host CS's index keeps the host's descriptor there).
fn forget_guest_descriptors(b: &mut CpuBlock) {
    let state = &mut b.area.state;
    let last = state.written_len.min(state.written.len());
    for &(index, _) in &state.written[..last] {
        if index != state.host_cs_index {
            b.gdt[usize::from(index)] = 0;
        }
    }
    state.written_len = 0;
    state.guest_at_host_cs = 0;
}

fn set_up(
    b: &mut CpuBlock,
    cpu: usize,
    virt_to_phys: &impl Fn(u64) -> Option<u64>,
) -> Result<(), SetupError> {
    // Stacks: the top word the host's per-CPU pointer (written by a run
    // when it changed, CpuSwitcher::run), the word above it the area.
    let area_addr = core::ptr::addr_of_mut!(b.area.area) as u64;
    let mut tops = [0u64; STACKS];
    for (i, stack) in b.stacks.iter_mut().enumerate() {
        stack[ENTRIES - 1] = area_addr;
        tops[i] = core::ptr::addr_of_mut!(stack[ENTRIES - 2]) as u64;
    }
    // TSS: RSP0 and IST1-7 (IST 5-7 on the #DF stack: the host's own
    // gates may name them while the host IDT meets the monitor TSS).
    let mut tss = [0u64; 8];
    tss[0] = tops[usize::from(IST_EXIT) - 1];
    for (ist, slot) in tss.iter_mut().enumerate().skip(1) {
        *slot = tops.get(ist - 1).copied().unwrap_or(tops[1]);
    }
    // RSP0 at byte 4, RSP1/RSP2 unused, IST1 at byte 36 (SDM Figure 7-11).
    let words = &mut b.area.tss;
    words.fill(0);
    let put = |words: &mut [u32; TSS_SIZE / 4], byte: usize, v: u64| {
        words[byte / 4] = v as u32;
        words[byte / 4 + 1] = (v >> 32) as u32;
    };
    put(words, 4, tss[0]);
    for (ist, &top) in tss.iter().enumerate().skip(1) {
        put(words, 36 + (ist - 1) * 8, top);
    }
    // I/O map base = size: no bitmap.
    words[TSS_SIZE / 4 - 1] = (TSS_SIZE as u32) << 16;

    b.gdt.fill(0);
    b.gdt[usize::from(MONITOR_CS_INDEX)] = monitor_code_descriptor();
    b.gdt[usize::from(MONITOR_DS_INDEX)] = monitor_data_descriptor();
    b.ldt.fill(0);
    let ldt = ldt_descriptor(b.ldt.as_ptr() as u64, 0);
    b.gdt[usize::from(LDT_INDEX)] = ldt[0];
    b.gdt[usize::from(LDT_INDEX) + 1] = ldt[1];
    write_gates(&mut b.idt, core::ptr::addr_of!(kqemu_switch_vectors) as u64);
    b.area.state = CpuState {
        written: [(0, 0); GUEST_DESCRIPTORS],
        written_len: 0,
        ldt_written: [(0, 0); GUEST_LDT_DESCRIPTORS],
        ldt_written_len: 0,
        ldt_limit: 0,
        host_cs_index: 0,
        host_cs_desc: 0,
        guest_at_host_cs: 0,
        pml4_entry: 0,
        stack_gs: 0,
        cpu,
        md_clear: {
            let max_leaf = core::arch::x86_64::__cpuid(0).eax;
            md_clear(max_leaf, || core::arch::x86_64::__cpuid_count(7, 0).edx)
        },
    };
    bind_to_cpu(b, cpu)?;

    // The shadow mapping: text, then the block's mapped pages.
    let (text_start, text_end) = text_range();
    let slot = pml4_slot(text_start);
    let mut table_phys = [0u64; TABLE_PAGES];
    for (i, t) in b.tables.iter().enumerate() {
        table_phys[i] = virt_to_phys(t.as_ptr() as u64).ok_or(SetupError::NoPhysical)?;
    }
    let block_start = b as *mut CpuBlock as u64;
    let mut map = SwitcherMap::new(&mut b.tables, &table_phys, slot)?;
    let mut page = text_start & !0xfff;
    for _ in 0..16 {
        if page >= text_end {
            break;
        }
        map.map(
            page,
            virt_to_phys(page).ok_or(SetupError::NoPhysical)?,
            false,
            true,
        )?;
        page += PAGE as u64;
    }
    if page < text_end {
        return Err(SetupError::Layout);
    }
    for i in 0..MAPPED_BLOCK_PAGES {
        let virt = block_start + (i * PAGE) as u64;
        map.map(
            virt,
            virt_to_phys(virt).ok_or(SetupError::NoPhysical)?,
            true,
            false,
        )?;
    }
    let entry = map.pml4_entry();
    b.area.state.pml4_entry = entry;
    Ok(())
}

/// What a run starts with, besides the guest registers.
#[derive(Clone, Copy, Debug)]
pub struct RunSetup {
    /// Host-physical address of the shadow PML4.
    pub shadow_cr3: u64,
    /// CR0, CR4 and EFER while the guest runs (computed from the host's).
    pub cr0: u64,
    pub cr4: u64,
    pub efer: u64,
    /// The host's CR0, CR4 and EFER as the caller read them on this CPU
    /// (with interrupts disabled since): restored after the run, so they
    /// are read once per run.
    pub host_cr0: u64,
    pub host_cr4: u64,
    pub host_efer: u64,
}

/// The host's CR0, CR4 and EFER, for [`RunSetup`].
pub fn host_control_registers() -> (u64, u64, u64) {
    (read_cr0(), read_cr4(), read_efer())
}

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exit {
    pub vector: u8,
    pub error_code: u64,
    pub cr2: u64,
    /// The guest's state could not be loaded (a ring-0 fault in the
    /// switch): nothing of the guest ran.
    pub entry_failed: bool,
    /// An NMI or machine check arrived in the exit, with the monitor's IDT
    /// loaded (one in the entry abandons it: the exit then has its vector,
    /// as if it had come in guest mode, and nothing of the guest ran).
    pub pending_nmi: bool,
    pub pending_mc: bool,
    /// The [`DR6_STATUS`] bits a #DB exit (vector 1) set: what the
    /// guest's DR6 gains (0 for every other exit).
    pub dr6: u64,
}

impl CpuSwitcher {
    fn block(&mut self) -> &mut CpuBlock {
        // SAFETY: the claim keeps the block this thread's own while the
        // switcher lives.
        unsafe { &mut *self.block }
    }

    /// Which switcher block this is (its PML4 entry changes with it).
    pub fn block_index(&self) -> usize {
        self.claim.index
    }

    /// The PML4 entry the shadow's reserved slot must hold on this CPU.
    pub fn pml4_entry(&mut self) -> u64 {
        self.block().area.state.pml4_entry
    }

    /// The guest's registers, read and written by the run.
    pub fn area(&mut self) -> &mut SwitchArea {
        &mut self.block().area.area
    }

    /// Writes the guest descriptors for a run at their indices, after
    /// clearing those of the previous run. `None` when an index is taken
    /// by the monitor. The same descriptors as in the last run on this CPU
    /// are left as they are (the CPU may have set their accessed bits,
    /// which changes nothing for the guest). A descriptor at the host CS's
    /// index is kept aside: switch.S puts it in place once CS is M.
    pub fn set_guest_descriptors(&mut self, descriptors: &[(u16, u64)]) -> Option<()> {
        let b = self.block();
        let cs_index = b.area.state.host_cs_index;
        let last = b.area.state.written_len.min(GUEST_DESCRIPTORS);
        if descriptors.len() == last && *descriptors == b.area.state.written[..last] {
            return Some(());
        }
        forget_guest_descriptors(b);
        if descriptors.len() > GUEST_DESCRIPTORS {
            return None;
        }
        for &(index, raw) in descriptors {
            if index == 0 || index >= MONITOR_GDT_FIRST {
                return None;
            }
            if index == cs_index {
                b.area.state.guest_at_host_cs = raw;
            } else {
                b.gdt[usize::from(index)] = raw;
            }
            b.area.state.written[b.area.state.written_len] = (index, raw);
            b.area.state.written_len += 1;
        }
        Some(())
    }

    /// Writes the guest's LDT descriptors for a run (LDT index,
    /// descriptor) in the shadow LDT, after clearing those of the previous
    /// run, and gives the shadow LDT the guest's byte limit `limit` (0 for
    /// a guest without an LDT: then every LDT selector is beyond it, the
    /// #GP(selector) of a null LDTR, SDM Vol. 3A 5.4.1) cut to the shadow's
    /// page. `None` when an index lies past that page or there are more
    /// than [`GUEST_LDT_DESCRIPTORS`]. The same list and limit as in the
    /// last run on this block are left as they are.
    pub fn set_guest_ldt(&mut self, descriptors: &[(u16, u64)], limit: u32) -> Option<()> {
        let limit = limit.min((SHADOW_LDT_ENTRIES * 8 - 1) as u32);
        let b = self.block();
        let state = &mut b.area.state;
        let last = state.ldt_written_len.min(GUEST_LDT_DESCRIPTORS);
        if descriptors.len() == last
            && *descriptors == state.ldt_written[..last]
            && limit == state.ldt_limit
        {
            return Some(());
        }
        for &(index, _) in &state.ldt_written[..last] {
            b.ldt[usize::from(index)] = 0;
        }
        state.ldt_written_len = 0;
        if limit != state.ldt_limit {
            let d = ldt_descriptor(b.ldt.as_ptr() as u64, limit);
            b.gdt[usize::from(LDT_INDEX)] = d[0];
            b.gdt[usize::from(LDT_INDEX) + 1] = d[1];
            state.ldt_limit = limit;
        }
        if descriptors.len() > GUEST_LDT_DESCRIPTORS {
            return None;
        }
        for &(index, raw) in descriptors {
            if usize::from(index) >= SHADOW_LDT_ENTRIES {
                return None;
            }
            b.ldt[usize::from(index)] = raw;
            state.ldt_written[state.ldt_written_len] = (index, raw);
            state.ldt_written_len += 1;
        }
        Some(())
    }

    /// Runs the guest once. Host interrupts must be disabled
    /// ([`interrupts_disable`]); they are enabled only while guest code
    /// runs.
    ///
    /// # Safety
    ///
    /// `setup.shadow_cr3` is a 4-level tree whose reserved slot holds
    /// [`Self::pml4_entry`] and that maps nothing else of the host; the
    /// area holds a validated guest state whose selectors have
    /// descriptors ([`Self::set_guest_descriptors`]); CR0/CR4/EFER are the
    /// host's with only the bits the guest may differ in changed, and
    /// `setup.host_*` are the values this CPU holds now (the exit path
    /// restores them).
    pub unsafe fn run(&mut self, setup: &RunSetup) -> Exit {
        let b = self.block();
        let tss_base = core::ptr::addr_of!(b.area.tss) as u64;
        let d = tss_descriptor(tss_base);
        let t = usize::from(TSS_INDEX);
        b.gdt[t] = d[0];
        b.gdt[t + 1] = d[1];
        let gdt_base = b.gdt.as_ptr() as u64;
        let idt_base = b.idt.as_ptr() as u64;
        // The host's per-CPU pointer at the top of every stack (switch.S).
        // Written only when it changed: four stack pages less per run.
        let host_gs = read_gs_base();
        if b.area.state.stack_gs != host_gs {
            for stack in b.stacks.iter_mut() {
                stack[ENTRIES - 2] = host_gs;
            }
            b.area.state.stack_gs = host_gs;
        }
        let a = &mut b.area.area;
        a.mon_gdtr = PseudoDescriptor {
            pad: [0; 3],
            limit: 0xffff,
            base: gdt_base,
        };
        a.mon_idtr = PseudoDescriptor {
            pad: [0; 3],
            limit: (256 * 16 - 1) as u16,
            base: idt_base,
        };
        a.mon_tr = u64::from(TSS_INDEX) << 3;
        a.mon_ldtr = u64::from(LDT_SELECTOR);
        a.mon_cs = u64::from(MONITOR_CS);
        let state = &b.area.state;
        a.host_cs = u64::from(state.host_cs_index) << 3;
        a.host_cs_slot = core::ptr::addr_of!(b.gdt[usize::from(state.host_cs_index)]) as u64;
        a.host_cs_desc = state.host_cs_desc;
        a.guest_at_host_cs = state.guest_at_host_cs;
        a.shadow_cr3 = setup.shadow_cr3;
        a.guest_cr0 = setup.cr0;
        a.guest_cr4 = setup.cr4;
        a.guest_efer = setup.efer;
        a.host_cr0 = setup.host_cr0;
        a.host_cr4 = setup.host_cr4;
        a.host_efer = setup.host_efer;
        // The base instructions only when CR4 has FSGSBASE on both sides
        // of the switch: switch.S uses them under either CR4.
        a.flags = if setup.cr4 & setup.host_cr4 & CR4_FSGSBASE != 0 {
            F_FSGSBASE
        } else {
            0
        };
        if a.code_mask != 0 {
            a.flags |= F_READ_CODE;
        }
        // The guest's CR4 is loaded while the exit reads its code.
        if setup.cr4 & CR4_SMAP != 0 {
            a.flags |= F_STAC;
        }
        if b.area.state.md_clear {
            a.flags |= F_VERW;
        }
        a.verw_selector = u64::from(MONITOR_DS);
        a.exit_code_len = 0;
        a.reading_code = 0;
        // Read once here for the stacks; switch.S restores it from the area.
        a.host_gs_base = host_gs;
        for slot in [
            &mut a.host_ldtr,
            &mut a.host_tr,
            &mut a.host_ds,
            &mut a.host_es,
            &mut a.host_fs,
            &mut a.host_gs,
            &mut a.host_ss,
        ] {
            *slot = 0;
        }
        a.exit_kind = EXIT_GUEST;
        a.pending = 0;
        a.exit_dr6 = 0;
        let area: *mut SwitchArea = a;
        // SAFETY: the caller guarantees the state the assembly loads is
        // valid; the area and tables live in this CPU's block.
        unsafe { kqemu_switch_run(area) };
        let a = &self.block().area.area;
        let exit = Exit {
            vector: a.exit_vector as u8,
            error_code: a.exit_error,
            cr2: a.exit_cr2,
            entry_failed: a.exit_kind == EXIT_ENTRY_FAULT,
            pending_nmi: a.pending & PENDING_NMI != 0,
            pending_mc: a.pending & PENDING_MC != 0,
            dr6: a.exit_dr6,
        };
        NMI_STATISTICS.count(a.exit_kind, &exit);
        exit
    }
}

/// `SwitchArea::exit_kind` (switch.S).
const EXIT_GUEST: u64 = 0;
const EXIT_ENTRY_FAULT: u64 = 1;
const EXIT_ENTRY_ABANDONED: u64 = 2;
/// `SwitchArea::pending` bits (switch.S).
const PENDING_NMI: u64 = 1 << 0;
const PENDING_MC: u64 = 1 << 1;

/// Where the NMIs that reached the monitor's IDT arrived, over all runs
/// on all CPUs (for tests: the testbed's NMI storm checks that each kind
/// happens and changes nothing the guest sees).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NmiCounts {
    /// In guest mode: the exit's vector is 2.
    pub guest: u64,
    /// In the entry, after the monitor's IDT was loaded: the entry was
    /// abandoned.
    pub entry: u64,
    /// In the exit, before the host's IDT was loaded: noted as pending.
    pub exit: u64,
}

struct NmiStatistics {
    guest: AtomicU64,
    entry: AtomicU64,
    exit: AtomicU64,
}

static NMI_STATISTICS: NmiStatistics = NmiStatistics {
    guest: AtomicU64::new(0),
    entry: AtomicU64::new(0),
    exit: AtomicU64::new(0),
};

impl NmiStatistics {
    fn count(&self, kind: u64, exit: &Exit) {
        let counter = match (kind, exit.vector) {
            (EXIT_GUEST, VECTOR_NMI) => Some(&self.guest),
            (EXIT_ENTRY_ABANDONED, VECTOR_NMI) => Some(&self.entry),
            _ => None,
        };
        if let Some(c) = counter {
            c.fetch_add(1, Ordering::Relaxed);
        }
        if exit.pending_nmi {
            self.exit.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The NMIs the monitor's IDT took so far.
pub fn nmi_counts() -> NmiCounts {
    NmiCounts {
        guest: NMI_STATISTICS.guest.load(Ordering::Relaxed),
        entry: NMI_STATISTICS.entry.load(Ordering::Relaxed),
        exit: NMI_STATISTICS.exit.load(Ordering::Relaxed),
    }
}

fn read_cr0() -> u64 {
    let v: u64;
    // SAFETY: reading CR0 at CPL 0 has no side effect.
    unsafe { core::arch::asm!("mov {}, cr0", out(reg) v, options(nomem, nostack)) };
    v
}

/// The host's CR4.
pub fn read_cr4() -> u64 {
    let v: u64;
    // SAFETY: reading CR4 at CPL 0 has no side effect.
    unsafe { core::arch::asm!("mov {}, cr4", out(reg) v, options(nomem, nostack)) };
    v
}

fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: the callers read architectural MSRs every x86-64 CPU has.
    unsafe {
        core::arch::asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack))
    };
    u64::from(hi) << 32 | u64::from(lo)
}

/// The host's EFER.
pub fn read_efer() -> u64 {
    rdmsr(MSR_EFER)
}

fn read_gs_base() -> u64 {
    rdmsr(MSR_GS_BASE)
}

/// Whether DS, ES, FS or GS of the calling thread holds an LDT selector
/// (TI = 1). FreeBSD enters a system call without reloading these four,
/// so they are the process's own, and the exit loads them back at CPL 0.
/// An LDT entry can vanish meanwhile (another thread's
/// `i386_set_ldt`): that load would then fault in the kernel, which
/// FreeBSD answers with a panic. Such a host gets no native run.
pub fn host_selectors_in_ldt() -> bool {
    const TI: u16 = 1 << 2;
    let (ds, es, fs, gs): (u16, u16, u16, u16);
    // SAFETY: reading segment selectors has no side effect.
    unsafe {
        core::arch::asm!(
            "mov {0:x}, ds",
            "mov {1:x}, es",
            "mov {2:x}, fs",
            "mov {3:x}, gs",
            out(reg) ds,
            out(reg) es,
            out(reg) fs,
            out(reg) gs,
            options(nomem, nostack, preserves_flags)
        )
    };
    (ds | es | fs | gs) & TI != 0
}

/// Whether the CPU has INVPCID (asked once).
fn has_invpcid() -> bool {
    const UNKNOWN: u8 = 0;
    const YES: u8 = 1;
    const NO: u8 = 2;
    static HAS: AtomicU8 = AtomicU8::new(UNKNOWN);
    match HAS.load(Ordering::Relaxed) {
        YES => true,
        NO => false,
        _ => {
            let max_leaf = core::arch::x86_64::__cpuid(0).eax;
            let has = max_leaf >= 7
                && core::arch::x86_64::__cpuid_count(7, 0).ebx & CPUID7_EBX_INVPCID != 0;
            HAS.store(if has { YES } else { NO }, Ordering::Relaxed);
            has
        }
    }
}

/// Drops what a run left in the TLB, on a host with CR4.PCIDE (`host_cr4`),
/// right after the switch back. The shadow CR3 carries PCID 0, which the
/// host uses too (FreeBSD's kernel pmap), and loading the host's CR3 back
/// flushes only the host PCID's entries (SDM Vol. 3A 4.10.4.1). Nothing in
/// the shadow is global (shadow leaves and the switcher's map never set
/// G), so INVPCID's single-context invalidation of PCID 0 removes exactly
/// the run's translations and paging-structure caches and keeps the host's
/// global entries; toggling CR4.PGE, the fallback without INVPCID, flushes
/// every entry of every PCID, globals included. Without PCIDE the CR3 load
/// flushed every non-global entry already.
///
/// Interrupts must be disabled.
pub fn flush_shadow_pcid(host_cr4: u64) {
    if host_cr4 & CR4_PCIDE == 0 {
        return;
    }
    if has_invpcid() {
        // PCID 0; the linear address is unused by type 1.
        let descriptor: [u64; 2] = [0, 0];
        // SAFETY: INVPCID only drops TLB entries; CR4.PCIDE is set and the
        // CPU has the instruction; the descriptor is 16 readable bytes.
        unsafe {
            core::arch::asm!(
                "invpcid {0}, [{1}]",
                in(reg) INVPCID_SINGLE_CONTEXT,
                in(reg) descriptor.as_ptr(),
                options(nostack, readonly)
            )
        };
    } else if host_cr4 & CR4_PGE != 0 {
        // SAFETY: writing back the host's CR4 with PGE toggled and
        // restored, with interrupts disabled (the caller's contract).
        unsafe {
            core::arch::asm!(
                "mov cr4, {0}",
                "mov cr4, {1}",
                in(reg) host_cr4 & !CR4_PGE,
                in(reg) host_cr4,
                options(nostack)
            )
        };
    }
}

/// Disables interrupts and returns the previous RFLAGS.
pub fn interrupts_disable() -> u64 {
    let flags: u64;
    // SAFETY: saving RFLAGS and clearing IF at CPL 0.
    unsafe { core::arch::asm!("pushfq", "pop {}", "cli", out(reg) flags, options(nomem)) };
    flags
}

/// Restores IF from `flags` (as returned by [`interrupts_disable`]).
pub fn interrupts_restore(flags: u64) {
    const IF: u64 = 1 << 9;
    if flags & IF != 0 {
        // SAFETY: re-enabling interrupts that were enabled before.
        unsafe { core::arch::asm!("sti", options(nomem, nostack)) };
    }
}

/// Hands interrupt or NMI `vector`, taken while the guest ran, to the
/// host's own handler through the host's IDT (interrupts stay disabled
/// around the call; the handler's IRETQ restores that).
///
/// # Safety
///
/// The host's IDT, GDT, TSS and GS base are loaded, and the host has a
/// handler for `vector`.
unsafe fn reraise(vector: u8) {
    let table = core::ptr::addr_of!(kqemu_reraise_table) as u64;
    let target = table + u64::from(vector) * 4;
    // SAFETY: the entry is `int $vector; ret`; the caller guarantees the
    // host handles the vector. Every register the handler may clobber is
    // saved by it (interrupt handlers preserve all state).
    unsafe {
        core::arch::asm!("call {}", in(reg) target, clobber_abi("C"));
    }
}

/// Hands what the run took for the host (an NMI, a machine check, an
/// external interrupt, in guest mode or inside the switch) to the host's
/// own handlers, right after the switch back.
///
/// The NMI first: after one, NMIs stay blocked until the next IRET (SDM
/// Vol. 3A 6.7.1; switch.S never executes one after it), so the host's NMI
/// handler, entered with `int $2`, runs with them blocked as after a real
/// NMI, and its own IRETQ unblocks them; any other handler's IRETQ before
/// it would let a second NMI restart its IST stack under it.
///
/// # Safety
///
/// As [`reraise`], for each vector handed over.
pub unsafe fn hand_to_host(exit: &Exit) {
    let from_run = |vector: u8| !exit.entry_failed && exit.vector == vector;
    if exit.pending_nmi || from_run(VECTOR_NMI) {
        // SAFETY: the caller's contract.
        unsafe { reraise(VECTOR_NMI) };
    }
    if exit.pending_mc || from_run(VECTOR_MACHINE_CHECK) {
        // SAFETY: the caller's contract.
        unsafe { reraise(VECTOR_MACHINE_CHECK) };
    }
    if !exit.entry_failed && exit.vector >= FIRST_EXTERNAL_VECTOR {
        // SAFETY: the caller's contract.
        unsafe { reraise(exit.vector) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec;

    #[test]
    fn nmi_statistics_tell_guest_mode_entry_and_exit_apart() {
        let stats = NmiStatistics {
            guest: AtomicU64::new(0),
            entry: AtomicU64::new(0),
            exit: AtomicU64::new(0),
        };
        let exit = |vector, pending_nmi| Exit {
            vector,
            error_code: 0,
            cr2: 0,
            entry_failed: false,
            pending_nmi,
            pending_mc: false,
            dr6: 0,
        };
        // An NMI in guest mode, one that abandoned the entry, one noted in
        // the exit of a timer interrupt; a machine check abandoning the
        // entry and a page fault count nowhere.
        stats.count(EXIT_GUEST, &exit(VECTOR_NMI, false));
        stats.count(EXIT_ENTRY_ABANDONED, &exit(VECTOR_NMI, false));
        stats.count(EXIT_GUEST, &exit(FIRST_EXTERNAL_VECTOR, true));
        stats.count(EXIT_ENTRY_ABANDONED, &exit(VECTOR_MACHINE_CHECK, false));
        stats.count(EXIT_GUEST, &exit(14, false));
        let got = [&stats.guest, &stats.entry, &stats.exit].map(|c| c.load(Ordering::Relaxed));
        assert_eq!(got, [1, 1, 1]);
    }

    #[test]
    fn md_clear_is_edx_bit_10_of_leaf_7_when_it_exists() {
        assert!(md_clear(7, || 1 << 10));
        assert!(md_clear(0xd, || u32::MAX));
        assert!(!md_clear(7, || !(1 << 10)));
        // Leaf 7 absent: never asked (its answer would be another leaf's).
        assert!(!md_clear(6, || panic!("leaf 7 read")));
    }

    #[test]
    fn verw_names_a_writable_data_segment_of_the_monitor() {
        let d = monitor_data_descriptor();
        // S set, type 0011 (data, read/write, accessed), DPL 0, present.
        assert_eq!((d >> 40) & 0xff, 0x93);
    }

    #[test]
    fn gate_layout_follows_the_sdm() {
        let g = interrupt_gate(0xffff_ffff_8123_4567, 0x20, 4);
        // Offset 15:0, selector, IST, type 0xE with P, offset 31:16, 63:32.
        assert_eq!(g[0] & 0xffff, 0x4567);
        assert_eq!((g[0] >> 16) & 0xffff, 0x20);
        assert_eq!((g[0] >> 32) & 7, 4);
        assert_eq!((g[0] >> 40) & 0xff, 0x8e);
        assert_eq!(g[0] >> 48, 0x8123);
        assert_eq!(g[1], 0xffff_ffff);
    }

    #[test]
    fn every_gate_names_the_monitor_code_selector_above_guest_indices() {
        let mut idt = [0u64; 2 * 256];
        let vectors = 0xffff_ffff_8040_1000u64;
        write_gates(&mut idt, vectors);
        for v in 0..256usize {
            let selector = ((idt[2 * v] >> 16) & 0xffff) as u16;
            assert_eq!(selector, MONITOR_CS, "vector {v}");
            // Not FreeBSD's GCODE_SEL (index 4, Linux's __USER32_CS 0x23)
            // nor any index a guest may load natively.
            assert_ne!(selector >> 3, 4);
            assert!(selector >> 3 >= MONITOR_GDT_FIRST && selector & 7 == 0);
            assert_ne!(selector >> 3, TSS_INDEX);
            assert_ne!(selector >> 3, TSS_INDEX + 1, "the TSS's upper half");
            let offset = (idt[2 * v] & 0xffff) | ((idt[2 * v] >> 48) << 16) | idt[2 * v + 1] << 32;
            assert_eq!(offset, vectors + (v * VECTOR_STUB_SIZE) as u64);
            let ist = ((idt[2 * v] >> 32) & 7) as u8;
            let want = match v {
                2 => IST_NMI,
                8 => IST_DOUBLE_FAULT,
                18 => IST_MACHINE_CHECK,
                _ => IST_EXIT,
            };
            assert_eq!(ist, want, "vector {v}");
        }
    }

    #[test]
    fn the_monitor_code_descriptor_is_64_bit_dpl_0_code() {
        let d = monitor_code_descriptor();
        assert_eq!(d >> 47 & 1, 1, "present");
        assert_eq!(d >> 44 & 1, 1, "code or data");
        assert_eq!(d >> 43 & 1, 1, "code");
        assert_eq!(d >> 42 & 1, 0, "not conforming");
        assert_eq!(d >> 40 & 1, 1, "accessed: the far return writes nothing");
        assert_eq!(d >> 45 & 3, 0, "DPL 0");
        assert_eq!(d >> 53 & 1, 1, "L");
        assert_eq!(d >> 54 & 1, 0, "D clear with L (SDM Vol. 3A 5.2.1)");
        // Linux's __KERNEL_CS descriptor, for comparison.
        assert_eq!(d, 0x00af_9b00_0000_ffff);
    }

    #[test]
    fn host_gates_are_decoded_as_the_sdm_lays_them_out() {
        // A FreeBSD-style interrupt gate on GCODE_SEL 0x20 with IST 2.
        let nmi = interrupt_gate(0xffff_ffff_80a1_2340, 0x20, 2);
        assert_eq!(gate_selector(nmi), Some(0x20));
        // The same as a trap gate (type 0xF).
        let trap = [nmi[0] | 1 << 40, nmi[1]];
        assert_eq!(gate_selector(trap), Some(0x20));
        // Not present; a call gate (type 0xC); a zero entry.
        assert_eq!(gate_selector([nmi[0] & !(1 << 47), nmi[1]]), None);
        assert_eq!(
            gate_selector([nmi[0] & !(0xf << 40) | 0xc << 40, nmi[1]]),
            None
        );
        assert_eq!(gate_selector([0, 0]), None);
        // A raw gate, selector 0x08 in bits 31:16, offset bits elsewhere.
        assert_eq!(
            gate_selector([0x8123_8e00_0008_4567, 0xffff_ffff]),
            Some(0x08)
        );
    }

    #[test]
    fn host_gates_must_name_the_host_cs() {
        let mut idt = [[0u64; 2]; 256];
        for (v, g) in idt.iter_mut().enumerate() {
            *g = interrupt_gate(0xffff_ffff_8000_0000 + v as u64 * 16, 0x20, 0);
        }
        let limit = |idt: &[[u64; 2]; 256], n: usize| {
            let idt = *idt;
            move |v: u8| (usize::from(v) < n).then(|| idt[usize::from(v)])
        };
        assert_eq!(check_host_gates(limit(&idt, 256), 0x20), Ok(()));
        assert_eq!(
            check_host_gates(limit(&idt, 256), 0x08),
            Err(SetupError::HostGate {
                vector: 1,
                selector: Some(0x20)
            })
        );
        // Vectors nothing delivers in the switch windows are not checked.
        idt[3] = interrupt_gate(0, 0x08, 0);
        idt[32] = [0, 0];
        assert_eq!(check_host_gates(limit(&idt, 256), 0x20), Ok(()));
        // #MC past the IDT's limit.
        assert_eq!(
            check_host_gates(limit(&idt, 18), 0x20),
            Err(SetupError::HostGate {
                vector: 18,
                selector: None
            })
        );
        // NMI on another selector, #DF not present.
        idt[2] = interrupt_gate(0, 0x08, 2);
        assert_eq!(
            check_host_gates(limit(&idt, 256), 0x20),
            Err(SetupError::HostGate {
                vector: 2,
                selector: Some(0x08)
            })
        );
        idt[2] = interrupt_gate(0, 0x20, 2);
        idt[8][0] &= !(1 << 47);
        assert_eq!(
            check_host_gates(limit(&idt, 256), 0x20),
            Err(SetupError::HostGate {
                vector: 8,
                selector: None
            })
        );
    }

    #[test]
    fn tss_descriptor_layout() {
        let d = tss_descriptor(0xffff_ffff_8765_4321);
        assert_eq!(d[0] & 0xffff, 103);
        assert_eq!((d[0] >> 16) & 0xff_ffff, 0x65_4321);
        assert_eq!((d[0] >> 40) & 0xff, 0x89, "present, type 9");
        assert_eq!(d[0] >> 56, 0x87);
        assert_eq!(d[1], 0xffff_ffff);
    }

    /// On the real CPU of the test host: Linux's modify_ldt gives this
    /// process an LDT entry, and DS loaded with it must be seen.
    #[test]
    fn an_ldt_selector_in_ds_is_seen() {
        const SYS_MODIFY_LDT: i64 = 154;
        const WRITE_LDT: i64 = 1;
        // struct user_desc: entry 0, base 0, limit 0xfffff in pages, 32-bit
        // data, usable.
        let desc: [u32; 4] = [0, 0, 0xf_ffff, 1 | 1 << 4 | 1 << 6];
        // Index 0 of the LDT (TI = 1), RPL 3.
        const LDT_DS: u16 = 0x7;
        assert!(!host_selectors_in_ldt(), "GDT selectors only at the start");
        let result: i64;
        // SAFETY: modify_ldt reads 16 bytes at `desc`; the syscall clobbers
        // RCX and R11 only.
        unsafe {
            core::arch::asm!(
                "syscall",
                inlateout("rax") SYS_MODIFY_LDT => result,
                in("rdi") WRITE_LDT,
                in("rsi") desc.as_ptr(),
                in("rdx") core::mem::size_of_val(&desc),
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack)
            )
        };
        assert_eq!(result, 0, "modify_ldt(1) on the test host");
        let old: u16;
        // SAFETY: LDT entry 0 is a present DPL-3 data segment (just
        // written); DS is put back before anything else runs here.
        let seen = unsafe {
            core::arch::asm!("mov {0:x}, ds", "mov ds, {1:x}", out(reg) old, in(reg) LDT_DS);
            let seen = host_selectors_in_ldt();
            core::arch::asm!("mov ds, {0:x}", in(reg) old);
            seen
        };
        assert!(seen);
    }

    #[test]
    fn ldt_descriptor_layout() {
        let d = ldt_descriptor(0xffff_fe80_1234_5000, 0xfff);
        assert_eq!(d[0] & 0xffff, 0xfff, "limit 15:0");
        assert_eq!((d[0] >> 40) & 0xf, 2, "type LDT");
        assert_eq!((d[0] >> 44) & 1, 0, "system descriptor");
        assert_eq!((d[0] >> 45) & 3, 0, "DPL 0");
        assert_ne!(d[0] & 1 << 47, 0, "present");
        let base = (d[0] >> 16) & 0xff_ffff | ((d[0] >> 56) & 0xff) << 24 | d[1] << 32;
        assert_eq!(base, 0xffff_fe80_1234_5000);
        assert_eq!((d[1] >> 40) & 0x1f, 0, "upper type field zero");
    }

    #[test]
    fn error_code_vectors_match_the_sdm() {
        let with: std::vec::Vec<u32> = (0..32)
            .filter(|v| ERROR_CODE_VECTORS >> v & 1 == 1)
            .collect();
        assert_eq!(with, [8, 10, 11, 12, 13, 14, 17, 21, 29, 30]);
    }

    #[test]
    fn switcher_map_builds_a_supervisor_tree() {
        let mut tables = vec![[0u64; ENTRIES]; 4];
        let phys = [0x10_000, 0x11_000, 0x12_000, 0x13_000];
        let base = 0xffff_ffff_8020_0000u64;
        let mut map = SwitcherMap::new(&mut tables, &phys, 511).expect("valid");
        map.map(base, 0x5000, false, true).expect("text");
        map.map(base + 0x1000, 0x6000, true, false).expect("data");
        let entry = map.pml4_entry();
        assert_eq!(entry & PTE_FRAME, 0x10_000);
        assert_eq!(entry & 4, 0, "never user");
        // PDPT[510] -> PD (page 1), PD[1] -> PT (page 2).
        assert_eq!(tables[0][510] & PTE_FRAME, 0x11_000);
        assert_eq!(tables[1][1] & PTE_FRAME, 0x12_000);
        let text = tables[2][0];
        let data = tables[2][1];
        assert_eq!(text & PTE_FRAME, 0x5000);
        assert_eq!(text & (PTE_WRITABLE | PTE_NO_EXECUTE | 4), 0);
        assert_eq!(data & PTE_FRAME, 0x6000);
        assert_eq!(
            data & (PTE_WRITABLE | PTE_NO_EXECUTE),
            PTE_WRITABLE | PTE_NO_EXECUTE
        );
        assert_eq!(data & 4, 0);
    }

    #[test]
    fn switcher_map_refuses_other_slots_and_overflow() {
        let mut tables = vec![[0u64; ENTRIES]; 3];
        let phys = [0x10_000, 0x11_000, 0x12_000];
        let mut map = SwitcherMap::new(&mut tables, &phys, 511).expect("valid");
        assert_eq!(
            map.map(0xffff_f800_0000_0000, 0x1000, true, false),
            Err(SetupError::Layout)
        );
        map.map(0xffff_ffff_8000_0000, 0x1000, true, false)
            .expect("first region");
        // Another 2 MiB region needs a third page table: none left.
        assert_eq!(
            map.map(0xffff_ffff_8040_0000, 0x2000, true, false),
            Err(SetupError::Layout)
        );
    }

    #[test]
    fn a_block_is_claimed_preferred_first_then_the_next_free_one() {
        let claimed = AtomicU32::new(0);
        assert_eq!(claim_bit(&claimed, 0, 5), Some(5));
        assert_eq!(claim_bit(&claimed, 0, 5), Some(6), "5 is held");
        // CPU 63 and CPU 200 prefer blocks 31 and 8 (index modulo 32).
        assert_eq!(claim_bit(&claimed, 0, 63 % SWITCHER_BLOCKS), Some(31));
        assert_eq!(
            claim_bit(&claimed, 0, 31),
            Some(0),
            "wraps past the last block"
        );
        release_bit(&claimed, 5);
        assert_eq!(claim_bit(&claimed, 0, 5), Some(5), "given back");
        assert_eq!(
            claimed.load(Ordering::Relaxed),
            1 << 0 | 1 << 5 | 1 << 6 | 1 << 31
        );
    }

    #[test]
    fn a_block_whose_setup_failed_is_never_claimed() {
        let ready: [AtomicU8; SWITCHER_BLOCKS] =
            [const { AtomicU8::new(NOT_SET_UP) }; SWITCHER_BLOCKS];
        ready[5].store(SETUP_FAILED, Ordering::Relaxed);
        ready[6].store(SET_UP, Ordering::Relaxed);
        ready[31].store(SETUP_FAILED, Ordering::Relaxed);
        let failed = failed_blocks(&ready);
        assert_eq!(failed, 1 << 5 | 1 << 31);
        let claimed = AtomicU32::new(0);
        // CPU 5 (and 37) prefer block 5: the next one instead, each time.
        assert_eq!(claim_bit(&claimed, failed, 5), Some(6));
        release_bit(&claimed, 6);
        assert_eq!(claim_bit(&claimed, failed, 37 % SWITCHER_BLOCKS), Some(6));
        assert_eq!(claim_bit(&claimed, failed, 31), Some(0), "past 31 too");
        // Every other block held: none to claim, the failed ones neither.
        for i in 0..SWITCHER_BLOCKS {
            if failed & 1 << i == 0 && i != 0 && i != 6 {
                assert_eq!(claim_bit(&claimed, failed, i), Some(i));
            }
        }
        assert_eq!(claimed.load(Ordering::Relaxed), ALL_BLOCKS & !failed);
        assert_eq!(claim_bit(&claimed, failed, 5), None);
        assert_eq!(claim_bit(&claimed, failed, 31), None);
        // With every block failed nothing is ever claimed.
        let none = AtomicU32::new(0);
        assert_eq!(claim_bit(&none, ALL_BLOCKS, 3), None);
        assert_eq!(none.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn with_every_block_held_a_claim_fails_until_one_is_given_back() {
        let claimed = AtomicU32::new(0);
        let mut got: std::vec::Vec<usize> = (0..SWITCHER_BLOCKS)
            .map(|cpu| claim_bit(&claimed, 0, (cpu * 7) % SWITCHER_BLOCKS).expect("a free block"))
            .collect();
        got.sort_unstable();
        assert_eq!(got, (0..SWITCHER_BLOCKS).collect::<std::vec::Vec<_>>());
        // The 33rd CPU running a guest at the same moment.
        assert_eq!(claim_bit(&claimed, 0, 0), None);
        assert_eq!(claim_bit(&claimed, 0, 17), None);
        release_bit(&claimed, 20);
        assert_eq!(claim_bit(&claimed, 0, 3), Some(20));
        assert_eq!(claim_bit(&claimed, 0, 3), None);
    }

    #[test]
    fn concurrent_claims_never_share_a_block() {
        use std::sync::atomic::AtomicUsize;
        const THREADS: usize = 40;
        let claimed = AtomicU32::new(0);
        let holders: [AtomicUsize; SWITCHER_BLOCKS] =
            [const { AtomicUsize::new(0) }; SWITCHER_BLOCKS];
        std::thread::scope(|scope| {
            for t in 1..=THREADS {
                let (claimed, holders) = (&claimed, &holders);
                scope.spawn(move || {
                    for _ in 0..2000 {
                        // More threads than blocks: a claim may fail.
                        let Some(i) = claim_bit(claimed, 0, t % SWITCHER_BLOCKS) else {
                            continue;
                        };
                        assert_eq!(holders[i].swap(t, Ordering::Relaxed), 0, "block {i} shared");
                        std::thread::yield_now();
                        assert_eq!(holders[i].swap(0, Ordering::Relaxed), t);
                        release_bit(claimed, i);
                    }
                });
            }
        });
        assert_eq!(claimed.load(Ordering::Relaxed), 0, "every block given back");
    }

    #[test]
    fn the_switch_text_is_whole_pages_in_one_slot() {
        let (start, end) = text_range();
        assert_eq!(start % PAGE as u64, 0);
        assert_eq!(end % PAGE as u64, 0);
        assert!(end > start && end - start <= 4 * PAGE as u64);
    }
}
