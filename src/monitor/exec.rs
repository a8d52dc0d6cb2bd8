//! `KQEMU_EXEC` in normal mode: validate, apply the client's lists, run
//! the guest through the world switch until an exit the client must see,
//! and copy the state out (ARCHITECTURE.md "EXEC: one run, step by step",
//! ABI.md "How the client drives an EXEC").
//!
//! The exits the monitor handles itself are page faults it can answer
//! from the guest's tables (a shadow fill, or the first write to a page
//! the dirty protocol keeps read-only), loads of GDT and LDT selectors
//! whose descriptors it fills from the guest's tables (segments.rs
//! [`RunGdt`]),
//! and host interrupts. Everything
//! else ends the run with the code kqemu 1.4.0pre1 used: exceptions with
//! their error code (and CR2), `int n` / `int3` / `into` as
//! `KQEMU_RET_INT | n` with `next_eip`, `syscall` as `KQEMU_RET_SYSCALL`
//! with `next_eip` (its interpreter: #UD when EFER.SCE = 0), `sysenter`
//! and anything the monitor cannot run exactly as `KQEMU_RET_SOFTMMU`.

use core::alloc::Layout;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::abi::{
    seg, KqemuCpuState, KqemuSegmentCache, ALL_DIRTY, KQEMU_MAX_PAGES_TO_FLUSH,
    KQEMU_MAX_RAM_PAGES_TO_UPDATE, KQEMU_RET_ABORT, KQEMU_RET_EXCEPTION, KQEMU_RET_INT,
    KQEMU_RET_INTR, KQEMU_RET_SOFTMMU, KQEMU_RET_SYSCALL,
};
use crate::error::{Error, Result};
use crate::host::{Host, HostArray, UserPage, Zeroable, PAGE_SIZE};
use crate::monitor::instance::{PhysMap, RamParams};
use crate::monitor::mmu::{
    translate, Access, AccessKind, CpuPaging, Cr0, Cr4, Efer, GuestPhys, GuestPhysMem, GuestVirt,
    HostPhys, NotRam, WalkError,
};
use crate::monitor::ram::{
    listed_linear, listed_pages, native_page, DirtyBytes, DirtyTracker, GuestPhysMap, Incoming,
    LockedFrame, LockedPages, LockedSlot, PageBacking, RamPage, SharedList, Unlocked, Watch,
    WriteFault,
};
use crate::monitor::segments::{
    descriptor_address, CodeSize, CpuMode, Descriptor, Fill, RunGdt, SegmentFault, Selector,
    SHADOW_LDT_ENTRIES, VEC_GP, VEC_NP, VEC_SS,
};
use crate::monitor::shadow::{
    Derivation, LeafMapping, Shadow, ShadowFlags, ShadowNode, TablePage, TablePages,
};
use crate::monitor::switch::{self, Exit, RunSetup, SwitchArea};
use crate::monitor::validate::{validate_normal_mode, NormalModeEntry};

/// Exits handled inside one EXEC before it returns `KQEMU_RET_INTR`, so
/// that a guest faulting in a loop the monitor resolves still gives the
/// CPU back to the client (and the host) regularly.
pub const MAX_EXITS_PER_EXEC: usize = 4096;
/// Shadow table pages an instance may use (the arena).
const SHADOW_NODES: usize = 4096;
/// Guest RAM pages locked at once for shadow mappings, and the slots and
/// hash buckets of their cache.
const LOCKED_SLOTS: usize = 8192;
const LOCKED_BUCKETS: usize = 2048;
const LOCKED_CAP: usize = 8192;

/// Vectors (SDM Vol. 3A Table 6-1).
const VEC_DB: u8 = 1;
const VEC_UD: u8 = 6;
const VEC_DF: u8 = 8;
const VEC_TS: u8 = 10;
const VEC_PF: u8 = 14;
/// Error code bit of a #GP raised by an IDT gate (SDM Vol. 3A 6.13).
const ERROR_IDT: u64 = 1 << 1;
/// Opcodes the exit decoding recognizes (SDM Vol. 2).
const OP_INT3: u8 = 0xcc;
const OP_INT: u8 = 0xcd;
const OP_INTO: u8 = 0xce;
const OP_TWO_BYTE: u8 = 0x0f;
const OP2_SYSCALL: u8 = 0x05;
const OP2_SYSENTER: u8 = 0x34;
/// Physical-address bits of a host page-table entry (bits 51:12, SDM
/// Vol. 3A Table 4-19).
const PTE_FRAME: u64 = 0x000f_ffff_ffff_f000;

/// What a guest exit means for the client, decided from the exit and the
/// bytes at the guest's RIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `retval` with the exception's error code (and CR2 for #PF).
    Exception { vector: u8, error_code: u32 },
    /// `KQEMU_RET_INT | n`, with the instruction's length for `next_eip`.
    Int { vector: u8, length: u8 },
    /// `KQEMU_RET_SYSCALL`, `next_eip` after the 2-byte instruction.
    Syscall,
    /// The client emulates.
    SoftMmu,
    /// The module is broken (a #DF from guest code).
    Abort,
}

impl Outcome {
    /// The `retval` of the outcome.
    pub fn retval(self) -> i32 {
        match self {
            Self::Exception { vector, .. } => KQEMU_RET_EXCEPTION | i32::from(vector),
            Self::Int { vector, .. } => KQEMU_RET_INT | i32::from(vector),
            Self::Syscall => KQEMU_RET_SYSCALL,
            Self::SoftMmu => KQEMU_RET_SOFTMMU,
            Self::Abort => KQEMU_RET_ABORT,
        }
    }
}

/// Decides what a guest exception other than #PF means. `code` holds the
/// bytes at the guest's RIP (fewer when unreadable); `syscall_enabled` is
/// the guest's EFER.SCE.
pub fn classify(vector: u8, error_code: u64, code: &[u8], syscall_enabled: bool) -> Outcome {
    match vector {
        VEC_GP if error_code & ERROR_IDT != 0 => {
            // Every gate of the monitor IDT has DPL 0, so a software
            // interrupt from CPL 3 lands here (SDM Vol. 3A 6.12.1.1).
            let (vector, length) = match code {
                [OP_INT, imm, ..] => (*imm, 2),
                [OP_INT3, ..] => (3, 1),
                [OP_INTO, ..] => (4, 1),
                _ => return Outcome::SoftMmu,
            };
            if idt_error_names(error_code, vector) {
                Outcome::Int { vector, length }
            } else {
                Outcome::SoftMmu
            }
        }
        VEC_UD => match code {
            // The world switch clears EFER.SCE, so SYSCALL always raises
            // #UD here; kqemu's interpreter answered #UD itself when the
            // guest's SCE was clear.
            [OP_TWO_BYTE, OP2_SYSCALL, ..] if syscall_enabled => Outcome::Syscall,
            [OP_TWO_BYTE, OP2_SYSENTER, ..] => Outcome::SoftMmu,
            _ => Outcome::Exception {
                vector,
                error_code: 0,
            },
        },
        // #DE, #DB, #BP, #OF, #BR, #NM, #MF, #AC, #XM: the guest's own.
        0 | 1 | 3 | 4 | 5 | 7 | 16 | 17 | 19 => Outcome::Exception {
            vector,
            error_code: error_code as u32,
        },
        VEC_DF => Outcome::Abort,
        // Other #GP, #TS, #NP, #SS (the run loop has handled the loads of
        // selectors it fills, `Monitor::segment_fault`): the loads it
        // leaves to the client, I/O, privileged instructions, UMIP: the
        // client emulates them exactly with the guest's own tables.
        VEC_TS..=VEC_GP => Outcome::SoftMmu,
        _ => Outcome::SoftMmu,
    }
}

/// Whether a #GP error code with the IDT bit names gate `vector`: the
/// SDM puts the vector in bits 15:3 (Vol. 3A 6.13); QEMU's TCG, the
/// testbed's CPU, reports `vector * 16 + 2` for 64-bit IDTs
/// (`do_interrupt64`), which is accepted too since no other vector can
/// alias it for the instruction decoded at RIP.
fn idt_error_names(error_code: u64, vector: u8) -> bool {
    let v = u64::from(vector);
    error_code == (v << 3) | ERROR_IDT || error_code == (v << 4) | ERROR_IDT
}

/// A locked guest RAM page (a held page of the client).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Frame {
    user_addr: u64,
    phys: u64,
    kernel: usize,
    cookie: usize,
}

impl LockedFrame for Frame {
    fn host_phys(&self) -> HostPhys {
        HostPhys::new(self.phys)
    }
}

// SAFETY: integers only.
unsafe impl Zeroable for Frame {}
// SAFETY: a zeroed slot is an unused one (ram.rs: "zeroed memory is an
// empty cache"): integers, bools and arrays of them.
unsafe impl Zeroable for LockedSlot<Frame> {}

/// Releases every held frame of `frames` (unused slots have no kernel
/// address).
fn release_frames<H: Host>(host: &H, frames: &mut [Frame]) {
    for f in frames.iter_mut().filter(|f| f.kernel != 0) {
        // SAFETY: held by hold_user_page, released once (then cleared).
        unsafe { host.release_user_page(&f.held()) };
        *f = Frame::default();
    }
}

impl Frame {
    fn from_held(held: &crate::host::HeldUserPage) -> Self {
        Self {
            user_addr: held.user_addr,
            phys: held.phys,
            kernel: held.kernel.as_ptr() as usize,
            cookie: held.cookie,
        }
    }

    fn held(&self) -> crate::host::HeldUserPage {
        crate::host::HeldUserPage {
            user_addr: self.user_addr,
            phys: self.phys,
            kernel: NonNull::new(self.kernel as *mut u8).unwrap_or(NonNull::dangling()),
            cookie: self.cookie,
        }
    }
}

/// Shadow table pages from the host: page-sized zeroed blocks and their
/// physical addresses.
struct HostTables<H: Host> {
    host: H,
}

const PAGE_LAYOUT: Layout = match Layout::from_size_align(PAGE_SIZE as usize, PAGE_SIZE as usize) {
    Ok(l) => l,
    Err(_) => panic!("page layout"),
};

// SAFETY: pages come from alloc_zeroed with a page layout (zero-filled,
// 4 KiB aligned) and their physical address from the host.
unsafe impl<H: Host> TablePages for HostTables<H> {
    fn alloc(&mut self) -> Option<TablePage> {
        let ptr = self.host.alloc_zeroed(PAGE_LAYOUT).ok()?;
        let Some(phys) = self.host.virt_to_phys(ptr.as_ptr() as u64) else {
            // SAFETY: just allocated with this layout, not used.
            unsafe { self.host.free(ptr, PAGE_LAYOUT) };
            return None;
        };
        // SAFETY: a zeroed page of 512 u64 owned by the shadow until freed.
        Some(unsafe { TablePage::new(HostPhys::new(phys), ptr.cast()) })
    }

    unsafe fn free(&mut self, page: TablePage) {
        // SAFETY: the page came from `alloc` (the caller's contract).
        unsafe { self.host.free(page.table().cast(), PAGE_LAYOUT) };
    }
}

/// Guest-physical memory for the page walks: a RAM page through the
/// locked-page cache when it holds the page, else held just for the access
/// (a hold and a release per access are costly on FreeBSD: the page-table
/// pages of a walk are locked by the page fault that walks them).
struct RamMem<'a, H: Host> {
    host: &'a H,
    map: &'a PhysMap<H>,
    ram: &'a RamParams,
    locked: Option<&'a mut LockedCache<H>>,
}

impl<H: Host> RamMem<'_, H> {
    /// Runs `f` on the kernel address of guest-physical `addr`.
    fn with<R>(
        &mut self,
        addr: GuestPhys,
        f: impl FnOnce(*mut u8) -> R,
    ) -> core::result::Result<R, NotRam> {
        let page = match self.map.backing(addr) {
            PageBacking::Ram(p) | PageBacking::Rom(p) => p,
            PageBacking::Comm | PageBacking::Unassigned => return Err(NotRam),
        };
        if u64::from(page.index()) >= self.ram.pages() {
            return Err(NotRam);
        }
        if let Some(frame) = self.locked.as_mut().and_then(|l| l.lookup(page)) {
            if frame.kernel != 0 {
                let base = frame.kernel as *mut u8;
                // SAFETY: a locked page stays held while it is in the
                // cache, which this walk borrows; the offset is inside it.
                return Ok(f(unsafe { base.add(addr.page_offset() as usize) }));
            }
        }
        let held =
            UserPage::hold(self.host, self.ram.ram_base + page.offset()).map_err(|_| NotRam)?;
        // SAFETY: the offset is inside the held page.
        let ptr = unsafe { held.kernel_ptr().as_ptr().add(addr.page_offset() as usize) };
        Ok(f(ptr))
    }
}

impl<H: Host> GuestPhysMem for RamMem<'_, H> {
    fn read_u32(&mut self, addr: GuestPhys) -> core::result::Result<u32, NotRam> {
        // SAFETY: aligned (the walk's contract) and inside a held page.
        self.with(addr, |p| unsafe {
            core::ptr::read_volatile(p.cast::<u32>())
        })
    }

    fn read_u64(&mut self, addr: GuestPhys) -> core::result::Result<u64, NotRam> {
        // SAFETY: as above.
        self.with(addr, |p| unsafe {
            core::ptr::read_volatile(p.cast::<u64>())
        })
    }

    fn compare_exchange_u32(
        &mut self,
        addr: GuestPhys,
        old: u32,
        new: u32,
    ) -> core::result::Result<bool, NotRam> {
        self.with(addr, |p| {
            // SAFETY: aligned, inside a held page; other writers (the
            // client's threads) use atomic or plain stores of the entry.
            let a = unsafe { core::sync::atomic::AtomicU32::from_ptr(p.cast()) };
            a.compare_exchange(old, new, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        })
    }

    fn compare_exchange_u64(
        &mut self,
        addr: GuestPhys,
        old: u64,
        new: u64,
    ) -> core::result::Result<bool, NotRam> {
        self.with(addr, |p| {
            // SAFETY: as above.
            let a = unsafe { AtomicU64::from_ptr(p.cast()) };
            a.compare_exchange(old, new, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        })
    }
}

/// The client's dirty bytes, through their pages held for the instance's
/// life (one page covers 4096 RAM pages).
struct UserDirty<'a> {
    /// The monitor's `dirty_pages`, which only `Monitor::new` and its drop
    /// write: a copy of the slice's pointer lets the monitor's methods
    /// borrow `self` mutably meanwhile.
    pages: NonNull<Frame>,
    len: usize,
    ram: &'a RamParams,
}

impl UserDirty<'_> {
    fn with<R>(&self, page: RamPage, f: impl FnOnce(*mut u8) -> R) -> Option<R> {
        let index = u64::from(page.index());
        if index >= self.ram.pages() {
            return None;
        }
        let slot = (index / PAGE_SIZE) as usize;
        if slot >= self.len {
            return None;
        }
        // SAFETY: in bounds of the monitor's dirty_pages, alive and not
        // written while the monitor runs an EXEC (see the field).
        let frame = unsafe { &*self.pages.as_ptr().add(slot) };
        if frame.kernel == 0 {
            return None;
        }
        // SAFETY: the dirty page is held while the monitor lives; the
        // offset is inside it.
        Some(f(unsafe {
            (frame.kernel as *mut u8).add((index % PAGE_SIZE) as usize)
        }))
    }
}

impl DirtyBytes for UserDirty<'_> {
    fn page_count(&self) -> u64 {
        self.ram.pages()
    }

    fn load(&self, page: RamPage) -> u8 {
        // SAFETY: one byte inside a held page; the client may write it
        // concurrently, hence volatile.
        self.with(page, |p| unsafe { core::ptr::read_volatile(p) })
            .unwrap_or(ALL_DIRTY)
    }

    fn store(&mut self, page: RamPage, value: u8) {
        // SAFETY: as above.
        self.with(page, |p| unsafe { core::ptr::write_volatile(p, value) });
    }
}

/// One of the client's list pages, through its kernel mapping.
struct ListPage(NonNull<u64>);

impl SharedList for ListPage {
    fn capacity(&self) -> usize {
        (PAGE_SIZE / 8) as usize
    }

    fn read(&self, index: usize) -> u64 {
        if index >= self.capacity() {
            return 0;
        }
        // SAFETY: the held list page has 512 entries; volatile because the
        // client shares it.
        unsafe { core::ptr::read_volatile(self.0.as_ptr().add(index)) }
    }

    fn write(&mut self, index: usize, value: u64) {
        if index < self.capacity() {
            // SAFETY: as in `read`.
            unsafe { core::ptr::write_volatile(self.0.as_ptr().add(index), value) };
        }
    }
}

/// The client's three list pages for one EXEC.
pub struct Lists {
    pub pages_to_flush: NonNull<u8>,
    pub ram_pages_to_update: NonNull<u8>,
    pub modified_ram_pages: NonNull<u8>,
}

type LockedCache<H> = LockedPages<Frame, HostArray<LockedSlot<Frame>, H>, HostArray<u32, H>>;

/// What the monitor keeps between EXECs of one instance: its caches only.
pub struct Monitor<H: Host> {
    host: H,
    shadow: Shadow<HostArray<ShadowNode, H>>,
    tables: HostTables<H>,
    locked: LockedCache<H>,
    /// The pages of the client's dirty bytes, held.
    dirty_pages: HostArray<Frame, H>,
    cpu_paging: CpuPaging,
    /// Switcher block whose entry the shadow roots hold.
    switcher_block: Option<usize>,
    /// The shadow root of the previous EXEC.
    last_root: Option<HostPhys>,
    /// The linear page of the last code read through the guest's tables
    /// and the locked frame of its RAM page: a hint only, checked against
    /// the shadow leaf the guest just ran from (`code_from_shadow`), and
    /// dropped when that frame is unlocked.
    code_page: Option<(u64, RamPage, Frame)>,
    logged_setup_failure: bool,
    logged_table_shortage: bool,
}

/// The dirty-byte books a guest write to RAM goes through.
struct WriteBooks<'b, 'r> {
    tracker: &'b mut DirtyTracker,
    dirty: &'b mut UserDirty<'r>,
    modified: &'b mut ListPage,
    update: &'b mut ListPage,
}

/// Lets the guest write RAM page `page` under the dirty-byte protocol
/// (ABI.md): a page not all dirty is marked and listed first (DirtyTracker),
/// and the shadow tables that derive from a watched page are brought up to
/// date. False when the client must make the write: the list is full, or
/// shadow state still derives from the page.
fn guest_write<H: Host>(
    shadow: &mut Shadow<HostArray<ShadowNode, H>>,
    tables: &mut HostTables<H>,
    mem: &mut RamMem<'_, H>,
    page: RamPage,
    books: &mut WriteBooks<'_, '_>,
) -> bool {
    if books.dirty.load(page) == ALL_DIRTY {
        return true;
    }
    match books
        .tracker
        .write_fault(page, books.dirty, books.modified, books.update)
    {
        WriteFault::ListFull => false,
        WriteFault::Writable { was_watched } => {
            !(was_watched && shadow.page_modified(page, mem, tables))
        }
    }
}

/// What the CPU reports about paging (CPUID 80000008H and 80000001H).
fn cpu_paging() -> CpuPaging {
    let max_ext = core::arch::x86_64::__cpuid(0x8000_0000).eax;
    let bits = if max_ext >= 0x8000_0008 {
        (core::arch::x86_64::__cpuid(0x8000_0008).eax & 0xff) as u8
    } else {
        36
    };
    let gib =
        max_ext >= 0x8000_0001 && core::arch::x86_64::__cpuid(0x8000_0001).edx & (1 << 26) != 0;
    CpuPaging {
        max_phys_addr_bits: bits,
        gib_pages: gib,
    }
}

/// A page the locked-page cache let go (its cap, or room for another):
/// it is no longer the cached code page, and it is unmapped and unlocked.
fn evicted<S: core::ops::DerefMut<Target = [ShadowNode]>, H: Host>(
    shadow: &mut Shadow<S>,
    host: &H,
    code_page: &mut Option<(u64, RamPage, Frame)>,
    old: Unlocked<Frame>,
) {
    if code_page.is_some_and(|(_, p, _)| p == old.page) {
        *code_page = None;
    }
    unlock(shadow, host, old);
}

/// Releases a locked page after clearing every shadow leaf that maps it.
fn unlock<S: core::ops::DerefMut<Target = [ShadowNode]>, H: Host>(
    shadow: &mut Shadow<S>,
    host: &H,
    old: Unlocked<Frame>,
) {
    let frame = old.frame.host_phys();
    for &leaf in old.mappings.hints() {
        shadow.clear_leaf(leaf, frame);
    }
    if old.mappings.overflow {
        shadow.clear_frame(frame);
    }
    // SAFETY: the frame came from hold_user_page and no leaf maps it now.
    unsafe { host.release_user_page(&old.frame.held()) };
}

/// Why [`Monitor::run_once`] ran no guest code.
enum NoRun {
    /// This host cannot run guest code (`Host::cpu_enter`).
    Host,
    /// Every switcher block is in use by runs on other CPUs.
    Busy,
}

/// Why [`Monitor::run_on_cpu`] ran no guest code, besides [`NoRun`]: the
/// run fails and the client emulates (logged once, after cpu_leave).
enum NoEntry {
    Run(NoRun),
    Setup(usize, switch::SetupError),
    La57,
    /// The calling thread has an LDT selector in a data segment register
    /// ([`switch::host_selectors_in_ldt`]).
    HostLdt,
    Unusable,
}

/// Registers of the guest as the exit left them, and what the client
/// needs beside `retval`.
struct ExitReport {
    retval: i32,
    error_code: u32,
    cr2: Option<u64>,
    next_eip: Option<u64>,
}

impl<H: Host> Monitor<H> {
    /// The caches for one instance.
    pub fn new(host: &H, ram: &RamParams) -> Result<Self> {
        // As many as INIT reserved (RamParams::dirty_pages).
        let mut dirty_pages = HostArray::<Frame, H>::zeroed(host, ram.dirty_pages())?;
        for (i, slot) in dirty_pages.iter_mut().enumerate() {
            let held = match host.hold_user_page(ram.ram_dirty + i as u64 * PAGE_SIZE) {
                Ok(h) => h,
                Err(e) => {
                    release_frames(host, &mut dirty_pages);
                    return Err(e);
                }
            };
            *slot = Frame::from_held(&held);
        }
        // Everything after the holds can fail too: the held dirty-byte
        // pages are released on every such path, not only freed.
        let caches = || -> Result<_> {
            let nodes = HostArray::zeroed(host, SHADOW_NODES)?;
            let shadow =
                Shadow::new(nodes, switch::switcher_slot()).map_err(|_| Error::InvalidArgument)?;
            let slots = HostArray::zeroed(host, LOCKED_SLOTS)?;
            let buckets = HostArray::zeroed(host, LOCKED_BUCKETS)?;
            let locked =
                LockedPages::new(slots, buckets, LOCKED_CAP).map_err(|_| Error::InvalidArgument)?;
            Ok((shadow, locked))
        };
        let (shadow, locked) = match caches() {
            Ok(c) => c,
            Err(e) => {
                release_frames(host, &mut dirty_pages);
                return Err(e);
            }
        };
        Ok(Self {
            host: host.clone(),
            shadow,
            tables: HostTables { host: host.clone() },
            locked,
            dirty_pages,
            cpu_paging: cpu_paging(),
            switcher_block: None,
            last_root: None,
            code_page: None,
            logged_setup_failure: false,
            logged_table_shortage: false,
        })
    }

    /// Pages in the locked-page cache now, and the most it can hold.
    pub fn locked_pages(&self) -> (usize, usize) {
        (self.locked.len(), LOCKED_SLOTS)
    }

    /// Caps the locked-page cache at `cap` pages (the instance's share of
    /// the module-wide budget, ram.rs `LockShare`) and unlocks the least
    /// recently used pages beyond it now.
    pub fn limit_locked(&mut self, cap: usize) {
        let Self {
            shadow,
            locked,
            host,
            code_page,
            ..
        } = self;
        locked.set_cap(cap);
        locked.shrink(LOCKED_SLOTS, |old| evicted(shadow, host, code_page, old));
    }

    /// `KQEMU_MODIFY_RAM_PAGES`: the client changed these pages.
    pub fn modified(&mut self, map: &PhysMap<H>, ram: &RamParams, list: NonNull<u8>, count: usize) {
        let list = ListPage(list.cast());
        let mut mem = RamMem {
            host: &self.host,
            map,
            ram,
            locked: Some(&mut self.locked),
        };
        for page in listed_pages(&list, count, ram.pages()) {
            self.shadow.page_modified(page, &mut mem, &mut self.tables);
        }
    }

    /// Runs one EXEC and fills `state` for the client.
    pub fn exec(
        &mut self,
        state: &mut KqemuCpuState,
        map: &PhysMap<H>,
        ram: &RamParams,
        lists: &Lists,
    ) {
        let report = self.run(state, map, ram, lists);
        state.retval = report.retval;
        if let Some(cr2) = report.cr2 {
            state.cr2 = cr2;
        }
        state.error_code = report.error_code;
        if let Some(next) = report.next_eip {
            state.next_eip = next;
        }
    }

    fn run(
        &mut self,
        state: &mut KqemuCpuState,
        map: &PhysMap<H>,
        ram: &RamParams,
        lists: &Lists,
    ) -> ExitReport {
        let soft = ExitReport {
            retval: KQEMU_RET_SOFTMMU,
            error_code: 0,
            cr2: None,
            next_eip: None,
        };
        let host = self.host.clone();
        let flush = ListPage(lists.pages_to_flush.cast());
        let mut update = ListPage(lists.ram_pages_to_update.cast());
        let mut modified = ListPage(lists.modified_ram_pages.cast());
        let mut dirty = UserDirty {
            pages: NonNull::from(&self.dirty_pages[..]).cast(),
            len: self.dirty_pages.len(),
            ram,
        };

        // 1. The client's lists (client -> module), then nothing for it.
        let flush_all = matches!(
            Incoming::from_count(state.nb_pages_to_flush, KQEMU_MAX_PAGES_TO_FLUSH),
            Incoming::All
        );
        match Incoming::from_count(state.nb_pages_to_flush, KQEMU_MAX_PAGES_TO_FLUSH) {
            Incoming::Entries(n) => {
                for linear in listed_linear(&flush, n) {
                    self.shadow.invalidate_page(linear);
                }
            }
            // The root cache stays exact across a full flush (shadow.rs);
            // the revalidation below checks what was written.
            Incoming::All => {}
        }
        match Incoming::from_count(state.nb_ram_pages_to_update, KQEMU_MAX_RAM_PAGES_TO_UPDATE) {
            Incoming::Entries(n) => {
                for page in listed_pages(&update, n, ram.pages()) {
                    if let Some(frame) = self.locked.lookup(page) {
                        self.shadow.write_protect_frame(frame.host_phys());
                    }
                }
            }
            Incoming::All => {
                self.shadow.write_protect_all();
            }
        }
        let modified_in = state.nb_modified_ram_pages.min(512) as usize;
        let mut mem = RamMem {
            host: &host,
            map,
            ram,
            locked: Some(&mut self.locked),
        };
        for page in listed_pages(&modified, modified_in, ram.pages()) {
            self.shadow.page_modified(page, &mut mem, &mut self.tables);
        }
        state.nb_pages_to_flush = 0;
        state.nb_ram_pages_to_update = 0;
        state.nb_modified_ram_pages = 0;
        let mut tracker = DirtyTracker::new();

        // 2. Is the state runnable natively?
        let Ok(entry) = validate_normal_mode(state, self.cpu_paging) else {
            return soft;
        };
        if !runnable(&entry) {
            return soft;
        }

        // 3. The address space.
        let key = entry.paging.address_space_key();
        let Ok(selected) = self.shadow.select(key, &mut self.tables) else {
            // Once per instance: under memory pressure every EXEC would
            // log it again.
            if !self.logged_table_shortage {
                self.logged_table_shortage = true;
                host.log(format_args!(
                    "EXEC: no memory for shadow page tables; the client emulates the guest"
                ));
            }
            return soft;
        };
        // Writes the module did not see (neither a guest write fault nor
        // the client's modified list) matter when the client flushes
        // everything or the address space changes (shadow.rs "Why the
        // cached roots stay exact"); otherwise the kept tables are exact.
        if flush_all || self.last_root != Some(selected.root) {
            let mut mem = RamMem {
                host: &host,
                map,
                ram,
                locked: Some(&mut self.locked),
            };
            let rewatch = self.shadow.revalidate_current(
                |p| DirtyTracker::written_since_watch(p, &dirty),
                &mut mem,
                &mut self.tables,
            );
            for &page in rewatch.pages() {
                self.watch(page, &mut tracker, &mut dirty, &mut update);
            }
        }
        self.last_root = Some(selected.root);

        let mut area = area_from_state(state, &entry);
        let mut gdt = RunGdt::EMPTY;
        if gdt.load_entry(&entry.segments).is_none() {
            return soft;
        }
        let mut report = ExitReport {
            retval: KQEMU_RET_INTR,
            error_code: 0,
            cr2: None,
            next_eip: None,
        };

        for _ in 0..MAX_EXITS_PER_EXEC {
            let exit = match self.run_once(&mut area, &gdt, &entry) {
                Ok(exit) => exit,
                // Every switcher block is held by a run on another CPU,
                // each for at most one host tick: the client calls EXEC
                // again (KQEMU_RET_INTR), with the guest's state as it is.
                Err(NoRun::Busy) => break,
                Err(NoRun::Host) => {
                    report = ExitReport {
                        retval: KQEMU_RET_ABORT,
                        ..soft
                    };
                    break;
                }
            };
            if exit.entry_failed {
                report = soft;
                break;
            }
            if exit.vector >= switch::FIRST_EXTERNAL_VECTOR
                || exit.vector == switch::VECTOR_NMI
                || exit.vector == switch::VECTOR_MACHINE_CHECK
            {
                if host.should_yield() {
                    break;
                }
                continue;
            }
            if exit.vector == VEC_PF {
                match self.page_fault(
                    &exit,
                    &entry,
                    map,
                    ram,
                    &mut tracker,
                    &mut dirty,
                    &mut modified,
                    &mut update,
                ) {
                    Ok(()) => continue,
                    Err(r) => {
                        report = r;
                        break;
                    }
                }
            }
            if matches!(exit.vector, VEC_NP | VEC_SS | VEC_GP) {
                let mut fill = SegmentFill {
                    gdt: &mut gdt,
                    map,
                    ram,
                    tracker: &mut tracker,
                    dirty: &mut dirty,
                    modified: &mut modified,
                    update: &mut update,
                };
                match self.segment_fault(&exit, &entry, &mut fill) {
                    SegmentExit::Resume => continue,
                    SegmentExit::Guest => {
                        report = ExitReport {
                            retval: KQEMU_RET_EXCEPTION | i32::from(exit.vector),
                            error_code: exit.error_code as u32,
                            cr2: None,
                            next_eip: None,
                        };
                        break;
                    }
                    SegmentExit::Client => {}
                }
            }
            let code = match area.exit_code() {
                Some(bytes) => (bytes, 2),
                None => self.code_at(&entry, &area, map, ram),
            };
            let outcome = classify(
                exit.vector,
                exit.error_code,
                &code.0[..code.1],
                entry.syscall_enabled,
            );
            let next = |len: u64| next_ip(&entry, area.rip, len);
            report = match outcome {
                Outcome::Exception { vector, error_code } => {
                    if vector == VEC_DB {
                        // The guest's DR6 gains what its #DB set, as the
                        // processor would have set it (ABI.md: the client
                        // copies dr6 back; kqemu reported DR6 there).
                        state.dr6 |= exit.dr6;
                    }
                    ExitReport {
                        retval: outcome.retval(),
                        error_code,
                        cr2: None,
                        next_eip: None,
                    }
                }
                Outcome::Int { length, .. } => ExitReport {
                    retval: outcome.retval(),
                    error_code: 0,
                    cr2: None,
                    next_eip: Some(next(u64::from(length))),
                },
                Outcome::Syscall => ExitReport {
                    retval: outcome.retval(),
                    error_code: 0,
                    cr2: None,
                    next_eip: Some(next(2)),
                },
                Outcome::SoftMmu | Outcome::Abort => ExitReport {
                    retval: outcome.retval(),
                    ..soft
                },
            };
            break;
        }

        copy_out(state, &area, &entry, &gdt);
        let (updates, mods) = tracker.counts();
        state.nb_ram_pages_to_update = updates;
        state.nb_modified_ram_pages = mods;
        report
    }

    fn watch(
        &mut self,
        page: RamPage,
        tracker: &mut DirtyTracker,
        dirty: &mut UserDirty<'_>,
        update: &mut ListPage,
    ) {
        if let Watch::Started { was_writable: true } = tracker.watch(page, dirty, update) {
            if let Some(frame) = self.locked.lookup(page) {
                self.shadow.write_protect_frame(frame.host_phys());
            }
        }
    }

    /// One entry into the guest and back.
    fn run_once(
        &mut self,
        area: &mut SwitchArea,
        gdt: &RunGdt,
        entry: &NormalModeEntry,
    ) -> core::result::Result<Exit, NoRun> {
        let cpu = self.host.cpu_enter().ok_or(NoRun::Host)?;
        let result = self.run_on_cpu(cpu, area, gdt, entry);
        // After run_on_cpu dropped its switcher: a switcher block is held
        // only inside the no-preemption section.
        self.host.cpu_leave();
        let why = match result {
            Ok(exit) => return Ok(exit),
            Err(NoEntry::Run(no_run)) => return Err(no_run),
            Err(why) => why,
        };
        if !self.logged_setup_failure {
            match why {
                NoEntry::Setup(cpu, e) => {
                    self.logged_setup_failure = true;
                    self.host
                        .log(format_args!("EXEC: no switcher on CPU {cpu}: {e:?}"));
                }
                NoEntry::La57 => {
                    self.logged_setup_failure = true;
                    self.host.log(format_args!(
                        "EXEC: the host runs 5-level paging (CR4.LA57), which the monitor \
                         does not support; the client emulates the guest"
                    ));
                }
                NoEntry::HostLdt => {
                    self.logged_setup_failure = true;
                    self.host.log(format_args!(
                        "EXEC: the calling thread has an LDT selector in DS, ES, FS or GS; \
                         the client emulates the guest"
                    ));
                }
                NoEntry::Run(_) | NoEntry::Unusable => {}
            }
        }
        Ok(Exit {
            vector: 0,
            error_code: 0,
            cr2: 0,
            entry_failed: true,
            pending_nmi: false,
            pending_mc: false,
            dr6: 0,
        })
    }

    /// [`Self::run_once`] between cpu_enter and cpu_leave, on CPU `cpu`.
    fn run_on_cpu(
        &mut self,
        cpu: usize,
        area: &mut SwitchArea,
        gdt: &RunGdt,
        entry: &NormalModeEntry,
    ) -> core::result::Result<Exit, NoEntry> {
        if switch::host_selectors_in_ldt() {
            return Err(NoEntry::HostLdt);
        }
        let host = self.host.clone();
        // SAFETY: cpu_enter pinned this thread to `cpu` until cpu_leave,
        // which comes after `sw` is dropped (run_once).
        let prepared = unsafe { switch::prepare_cpu(cpu, |v| host.virt_to_phys(v)) };
        let mut sw = match prepared {
            Ok(sw) => sw,
            Err(switch::SetupError::AllBlocksBusy) => return Err(NoEntry::Run(NoRun::Busy)),
            Err(e) => return Err(NoEntry::Setup(cpu, e)),
        };
        if self.switcher_block != Some(sw.block_index()) {
            self.shadow.set_switcher_entry(sw.pml4_entry());
            self.switcher_block = Some(sw.block_index());
        }
        let root = self.shadow.current_root();
        // The shadow LDT's limit is the guest's (0 without an LDT: every
        // LDT selector beyond it, as under a null LDTR).
        let ldt_limit = entry.tables.ldt.map_or(0, |(_, limit)| limit);
        let usable = root.is_some()
            && sw.set_guest_descriptors(gdt.descriptors()).is_some()
            && sw.set_guest_ldt(gdt.ldt_descriptors(), ldt_limit).is_some();
        if !usable {
            return Err(NoEntry::Unusable);
        }
        // Interrupts off before the host's registers are read: a handler
        // may change CR0.TS (lazy FPU switching).
        let flags = switch::interrupts_disable();
        let (host_cr0, host_cr4, host_efer) = switch::host_control_registers();
        if host_cr4 & Cr4::LA57.bits() != 0 {
            // The shadow tables are 4-level: loaded under CR4.LA57 they
            // would be walked as 5-level ones. Such a host gets no native
            // runs; the client emulates (SOFTMMU), and the log says why.
            switch::interrupts_restore(flags);
            return Err(NoEntry::La57);
        }
        let setup = RunSetup {
            shadow_cr3: root.map_or(0, |r| r.as_u64()),
            cr0: guest_cr0(host_cr0, entry.cr0),
            cr4: guest_cr4(host_cr4, entry.cr4),
            efer: host_efer & !Efer::SCE.bits(),
            host_cr0,
            host_cr4,
            host_efer,
        };
        *sw.area() = *area;
        // SAFETY: the shadow root maps the switcher at its reserved slot
        // and guest user pages only; the state was validated and its
        // descriptors written; CR0/CR4/EFER differ from the host's only in
        // bits the guest may own, and the host's were read with interrupts
        // off just above.
        let exit = unsafe { sw.run(&setup) };
        switch::flush_shadow_pcid(host_cr4);
        // SAFETY: the host's tables are back; it handles NMIs, machine
        // checks and its own interrupts.
        unsafe { switch::hand_to_host(&exit) };
        take_guest_fields(area, sw.area());
        switch::interrupts_restore(flags);
        Ok(exit)
    }

    #[allow(clippy::too_many_arguments)]
    fn page_fault(
        &mut self,
        exit: &Exit,
        entry: &NormalModeEntry,
        map: &PhysMap<H>,
        ram: &RamParams,
        tracker: &mut DirtyTracker,
        dirty: &mut UserDirty<'_>,
        modified: &mut ListPage,
        update: &mut ListPage,
    ) -> core::result::Result<(), ExitReport> {
        let soft = ExitReport {
            retval: KQEMU_RET_SOFTMMU,
            error_code: 0,
            cr2: None,
            next_eip: None,
        };
        let host = self.host.clone();
        let mut mem = RamMem {
            host: &host,
            map,
            ram,
            locked: Some(&mut self.locked),
        };
        let access = if exit.error_code & (1 << 1) != 0 {
            Access::USER_WRITE
        } else if exit.error_code & (1 << 4) != 0 {
            Access::USER_FETCH
        } else {
            Access::USER_READ
        };
        let linear = GuestVirt::new(exit.cr2);
        let t = match translate(&entry.paging, &mut mem, linear, access) {
            Ok(t) => t,
            Err(WalkError::PageFault(pf)) => {
                return Err(ExitReport {
                    retval: KQEMU_RET_EXCEPTION | i32::from(VEC_PF),
                    error_code: pf.code.bits(),
                    cr2: Some(pf.linear.as_u64()),
                    next_eip: None,
                })
            }
            Err(_) => return Err(soft),
        };
        let Ok(native) = native_page(map.backing(t.frame()), access.kind) else {
            return Err(soft);
        };
        let page = native.page;
        if u64::from(page.index()) >= ram.pages() {
            return Err(soft);
        }
        let Some(derivation) = Derivation::from_walk(&t.path, |gp| match map.backing(gp) {
            PageBacking::Ram(p) | PageBacking::Rom(p) => Some(p),
            PageBacking::Comm | PageBacking::Unassigned => None,
        }) else {
            return Err(soft);
        };
        let write = access.kind == AccessKind::Write;
        if write && !native.read_only {
            let mut books = WriteBooks {
                tracker,
                dirty,
                modified,
                update,
            };
            if !guest_write(
                &mut self.shadow,
                &mut self.tables,
                &mut mem,
                page,
                &mut books,
            ) {
                return Err(soft);
            }
        }
        for step in derivation.steps() {
            self.watch(step.page, tracker, dirty, update);
            // Locked, the next walks read the guest's tables without a
            // hold per access; when the cache refuses, they hold.
            let _ = self.lock(step.page, ram);
        }
        let frame = match self.lock(page, ram) {
            Some(f) => f,
            None => return Err(soft),
        };
        let Some(mapping) =
            LeafMapping::for_translation(&t, frame.host_phys(), native, dirty.load(page))
        else {
            return Err(soft);
        };
        match self
            .shadow
            .install(linear, mapping, &derivation, &mut self.tables)
        {
            Ok(leaf) => self.locked.add_mapping(page, leaf),
            Err(_) => return Err(soft),
        }
        if write && !mapping.writable {
            return Err(soft);
        }
        Ok(())
    }

    /// A #GP, #NP or #SS exit: a load of a selector the run's shadow does
    /// not hold yet is filled from the guest's GDT or LDT and retried
    /// (segments.rs [`RunGdt`]).
    fn segment_fault(
        &mut self,
        exit: &Exit,
        entry: &NormalModeEntry,
        f: &mut SegmentFill<'_, '_, H>,
    ) -> SegmentExit {
        let host = self.host.clone();
        match f.gdt.on_fault(
            exit.vector,
            exit.error_code,
            entry.tables.gdt,
            entry.tables.ldt,
        ) {
            SegmentFault::Client => SegmentExit::Client,
            SegmentFault::Guest => SegmentExit::Guest,
            SegmentFault::Read { selector, linear } => {
                let mut mem = RamMem {
                    host: &host,
                    map: f.map,
                    ram: f.ram,
                    locked: Some(&mut self.locked),
                };
                let Some(guest) = read_descriptor(entry, &mut mem, linear) else {
                    return SegmentExit::Client;
                };
                match f.gdt.fill(selector, guest, entry.mode) {
                    Fill::Installed => SegmentExit::Resume,
                    Fill::Client => SegmentExit::Client,
                }
            }
            SegmentFault::SetAccessed {
                selector,
                linear,
                guest,
            } => {
                if self.set_accessed(entry, f, linear, guest) {
                    f.gdt.accessed(selector, entry.mode);
                    SegmentExit::Resume
                } else {
                    SegmentExit::Client
                }
            }
        }
    }

    /// Sets the accessed bit of the guest's descriptor at `linear`, as the
    /// CPU writes it on a load (SDM Vol. 3A 3.4.5.1): an implicit
    /// supervisor write through the guest's tables, which sets their
    /// Accessed and Dirty flags, and a guest write to its RAM page for the
    /// dirty bytes (the client learns of it as of any guest write). False:
    /// the client emulates the load (the page is not RAM, the list of
    /// modified pages is full, shadow state derives from the page, or the
    /// descriptor changed meanwhile).
    fn set_accessed(
        &mut self,
        entry: &NormalModeEntry,
        f: &mut SegmentFill<'_, '_, H>,
        linear: GuestVirt,
        guest: Descriptor,
    ) -> bool {
        if linear.as_u64() & 3 != 0 {
            return false;
        }
        let host = self.host.clone();
        let mut mem = RamMem {
            host: &host,
            map: f.map,
            ram: f.ram,
            locked: Some(&mut self.locked),
        };
        // The attribute dword (bits 63:32) holds the accessed bit (40).
        let high = GuestVirt::new(linear.as_u64().wrapping_add(4));
        let Ok(t) = translate(&entry.paging, &mut mem, high, Access::IMPLICIT_WRITE) else {
            return false;
        };
        let Ok(native) = native_page(f.map.backing(t.frame()), AccessKind::Write) else {
            return false;
        };
        let page = native.page;
        if u64::from(page.index()) >= f.ram.pages() {
            return false;
        }
        let mut books = WriteBooks {
            tracker: f.tracker,
            dirty: f.dirty,
            modified: f.modified,
            update: f.update,
        };
        if !guest_write(
            &mut self.shadow,
            &mut self.tables,
            &mut mem,
            page,
            &mut books,
        ) {
            return false;
        }
        // From the descriptor as read for the fill: if the guest's table
        // changed since, the client emulates the load with the new one.
        let old = (guest.0 >> 32) as u32;
        let new = (guest.with_accessed().0 >> 32) as u32;
        matches!(mem.compare_exchange_u32(t.phys, old, new), Ok(true))
    }

    /// Up to two bytes of guest code at CS:RIP (see [`read_code`]); from
    /// the locked page the guest ran them from when the shadow maps it.
    fn code_at(
        &mut self,
        entry: &NormalModeEntry,
        a: &SwitchArea,
        map: &PhysMap<H>,
        ram: &RamParams,
    ) -> ([u8; 2], usize) {
        let linear = code_linear(entry, a.rip, 0);
        if let Some(code) = self.code_from_shadow(linear) {
            return code;
        }
        let mut mem = RamMem {
            host: &self.host,
            map,
            ram,
            locked: Some(&mut self.locked),
        };
        let (code, page) = read_code(entry, a, &mut mem, map);
        self.code_page = page.and_then(|p| Some((linear & !0xfff, p, self.locked.lookup(p)?)));
        code
    }

    /// The two bytes at `linear` without a guest walk: when the current
    /// shadow has a user, executable leaf for the page and it maps the
    /// locked frame of the RAM page a previous walk found there, those
    /// are the bytes the CPU fetched (the shadow derives its leaves from
    /// the guest's walk and drops them when the guest's tables change,
    /// shadow.rs). `None`: walk the guest's tables.
    fn code_from_shadow(&mut self, linear: u64) -> Option<([u8; 2], usize)> {
        let (cached, _, frame) = self.code_page?;
        // Both bytes on one page (the second may be on the next).
        if cached != linear & !0xfff || linear & 0xfff == 0xfff {
            return None;
        }
        let leaf = ShadowFlags::from_bits_retain(self.shadow.lookup(GuestVirt::new(linear))?);
        if !leaf.contains(ShadowFlags::PRESENT | ShadowFlags::USER)
            || leaf.contains(ShadowFlags::NO_EXECUTE)
        {
            return None;
        }
        // The leaf maps only a locked frame, and unlocking this one drops
        // the hint: the frame is still held at `kernel`.
        if leaf.bits() & PTE_FRAME != frame.phys || frame.kernel == 0 {
            return None;
        }
        let at = (frame.kernel as *const u8).wrapping_add((linear & 0xfff) as usize);
        // SAFETY: the locked page is held while it is in the cache and
        // both offsets are inside it; volatile because the client's
        // threads may write guest RAM.
        let code = unsafe {
            [
                core::ptr::read_volatile(at),
                core::ptr::read_volatile(at.add(1)),
            ]
        };
        Some((code, 2))
    }

    /// The locked frame of guest RAM page `page`, locking it now if needed.
    fn lock(&mut self, page: RamPage, ram: &RamParams) -> Option<Frame> {
        if let Some(frame) = self.locked.lookup(page) {
            return Some(frame);
        }
        let held = self
            .host
            .hold_user_page(ram.ram_base + page.offset())
            .ok()?;
        let frame = Frame::from_held(&held);
        let Self {
            shadow,
            locked,
            host,
            code_page,
            ..
        } = self;
        let evict = |old: Unlocked<Frame>| evicted(shadow, host, code_page, old);
        match locked.insert(page, frame, evict) {
            Ok(()) => Some(frame),
            Err(f) => {
                // SAFETY: held just above, never mapped.
                unsafe { host.release_user_page(&f.held()) };
                None
            }
        }
    }
}

impl<H: Host> Drop for Monitor<H> {
    fn drop(&mut self) {
        let Self {
            shadow,
            locked,
            host,
            tables,
            dirty_pages,
            ..
        } = self;
        locked.clear(|old| unlock(shadow, host, old));
        shadow.drop_all(tables);
        release_frames(host, dirty_pages);
    }
}

/// What a segment fault needs besides the monitor: the run's GDT and the
/// EXEC's dirty-byte protocol state.
struct SegmentFill<'a, 'd, H: Host> {
    gdt: &'a mut RunGdt,
    map: &'a PhysMap<H>,
    ram: &'a RamParams,
    tracker: &'a mut DirtyTracker,
    dirty: &'a mut UserDirty<'d>,
    modified: &'a mut ListPage,
    update: &'a mut ListPage,
}

/// What the run loop does after [`Monitor::segment_fault`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SegmentExit {
    /// The shadow was filled: run the guest again.
    Resume,
    /// The guest's own exception, with the exit's vector and error code.
    Guest,
    /// Classify as before: the client emulates.
    Client,
}

/// The guest's descriptor at `linear` in its GDT, read as the CPU reads
/// it: two implicit supervisor reads through the guest's tables (each
/// dword on its own page when the descriptor straddles two). `None` when
/// the walk faults or the memory is not RAM or ROM: the client emulates
/// (it raises the #PF of the implicit access itself), and for a GDT base
/// that is not 4-byte aligned.
fn read_descriptor<H: Host>(
    entry: &NormalModeEntry,
    mem: &mut RamMem<'_, H>,
    linear: GuestVirt,
) -> Option<Descriptor> {
    if linear.as_u64() & 3 != 0 {
        return None;
    }
    let mut halves = [0u32; 2];
    for (i, half) in halves.iter_mut().enumerate() {
        let at = GuestVirt::new(linear.as_u64().wrapping_add(4 * i as u64));
        let t = translate(&entry.paging, mem, at, Access::IMPLICIT_READ).ok()?;
        // Only RAM and ROM read (RamMem::with): not COMM or unassigned.
        *half = mem.read_u32(t.phys).ok()?;
    }
    Some(Descriptor(
        u64::from(halves[0]) | (u64::from(halves[1]) << 32),
    ))
}

/// Whether the validated state can run natively on this monitor: debug
/// registers, a guest CR0.TS or EM (FPU ownership stays with the host,
/// ARCHITECTURE.md) and 16-bit stacks need the client, and so does an LDT
/// selector in an entry register unless the guest's LDT holds its index
/// within the shadow LDT's page (its shadow entry is built from the cache,
/// but the CPU checks the index against the shadow LDT's limit, the
/// guest's).
fn runnable(entry: &NormalModeEntry) -> bool {
    let ldt_holds = |s: &crate::monitor::segments::EntrySegment| {
        !s.selector.in_ldt()
            || (s.selector.index() < SHADOW_LDT_ENTRIES
                && descriptor_address(s.selector, entry.tables.gdt, entry.tables.ldt).is_some())
    };
    entry.debug.is_none()
        && !entry.cr0.intersects(Cr0::TS | Cr0::EM)
        && !entry.stack_16bit
        && entry.segments.iter().all(ldt_holds)
}

/// CR0 while the guest runs: the host's, with the guest's AM (alignment
/// checks at CPL 3 follow the guest kernel's choice, SDM Vol. 3A 2.5).
pub fn guest_cr0(host: u64, guest: Cr0) -> u64 {
    (host & !Cr0::AM.bits()) | (guest.bits() & Cr0::AM.bits())
}

/// CR4 while the guest runs: the host's, with the guest's TSD and PCE
/// (which decide whether RDTSC/RDPMC fault at CPL 3), and FSGSBASE only
/// when both enable it. UMIP stays as the host has it: with it, SGDT and
/// friends fault and the client answers with the guest's own values.
pub fn guest_cr4(host: u64, guest: Cr4) -> u64 {
    let follow = Cr4::TSD.bits() | Cr4::PCE.bits();
    let mut cr4 = (host & !follow) | (guest.bits() & follow);
    // Bits the guest can only narrow: without them its SSE, XSAVE/AVX and
    // RDFSBASE-family instructions raise #UD (and SIMD exceptions #UD
    // instead of #XM) as on hardware (SDM Vol. 3A 2.5). The monitor never
    // sets one the host lacks: MOV to CR4 would #GP at ring 0.
    let narrow = Cr4::OSFXSR | Cr4::OSXMMEXCPT | Cr4::OSXSAVE | Cr4::FSGSBASE;
    cr4 &= !(narrow.bits() & !guest.bits());
    // Never for the guest: with CR4.PKE it could WRPKRU the client thread's
    // protection keys (validation refuses guests that enable PKE, so the
    // guest gets #UD as its own CR4 says).
    cr4 & !Cr4::PKE.bits()
}

/// The switch area for the state: registers, the IRETQ frame, data
/// selectors and the 64-bit FS/GS bases.
fn area_from_state(state: &KqemuCpuState, entry: &NormalModeEntry) -> SwitchArea {
    let mut a = SwitchArea {
        regs: state.regs,
        rip: state.eip,
        cs: u64::from(state.segs[seg::CS].selector),
        rflags: state.eflags,
        rsp: state.regs[4],
        ss: u64::from(state.segs[seg::SS].selector),
        ds: u64::from(state.segs[seg::DS].selector),
        es: u64::from(state.segs[seg::ES].selector),
        fs: u64::from(state.segs[seg::FS].selector),
        gs: u64::from(state.segs[seg::GS].selector),
        ..SwitchArea::default()
    };
    // The switch loads both bases after the selectors: the 64-bit base,
    // or the one the selector's descriptor gives (0 for a null one).
    let base = |s: &crate::monitor::segments::EntrySegment| {
        s.base_msr
            .or_else(|| s.descriptor.map(|d| u64::from(d.base())))
            .unwrap_or(0)
    };
    a.fs_base = base(&entry.segments[seg::FS]);
    a.gs_base = base(&entry.segments[seg::GS]);
    // The exit reads the code bytes at the linear address of RIP (as
    // `code_linear` computes it).
    a.code_base = code_linear(entry, 0, 0);
    a.code_mask = if entry.mode == CpuMode::Legacy || entry.code_size != CodeSize::Bits64 {
        0xffff_ffff
    } else {
        u64::MAX
    };
    a
}

/// Copies from the area of a run what the EXEC loop reads after it: the
/// guest's registers, selectors and FS/GS bases, and the code bytes the
/// exit read. The rest of `local` keeps what `area_from_state` gave it, as
/// for the first run of the EXEC: the switch fills its own fields at every
/// entry. (Copying only these spares a copy of the whole area per exit.)
fn take_guest_fields(local: &mut SwitchArea, run: &SwitchArea) {
    local.regs = run.regs;
    local.rip = run.rip;
    local.cs = run.cs;
    local.rflags = run.rflags;
    local.rsp = run.rsp;
    local.ss = run.ss;
    local.ds = run.ds;
    local.es = run.es;
    local.fs = run.fs;
    local.gs = run.gs;
    local.fs_base = run.fs_base;
    local.gs_base = run.gs_base;
    local.exit_code = run.exit_code;
    local.exit_code_len = run.exit_code_len;
}

/// Copies the guest's registers back into the state (ABI.md: the client
/// reads regs, eip, eflags, segs and cr2 back).
fn copy_out(state: &mut KqemuCpuState, a: &SwitchArea, entry: &NormalModeEntry, gdt: &RunGdt) {
    let before = state.segs;
    state.regs = a.regs;
    state.regs[4] = a.rsp;
    state.eip = a.rip;
    state.eflags = a.rflags;
    let now = [a.es, a.cs, a.ss, a.ds, a.fs, a.gs];
    for (i, &sel) in now.iter().enumerate() {
        let sel = sel as u16;
        if sel != before[i].selector {
            state.segs[i] = gdt
                .loaded_cache(Selector(sel))
                .unwrap_or_else(|| cache_for(sel, &before));
        }
    }
    if entry.mode == CpuMode::Long {
        state.segs[seg::FS].base = a.fs_base;
        state.segs[seg::GS].base = a.gs_base;
    }
}

/// The cache of a selector the guest loaded natively other than from a
/// filled entry (`RunGdt::loaded_cache`): a copy of an entry register's,
/// or null.
fn cache_for(sel: u16, before: &[KqemuSegmentCache; seg::COUNT]) -> KqemuSegmentCache {
    if Selector(sel).is_null() {
        return KqemuSegmentCache {
            selector: sel,
            ..KqemuSegmentCache::default()
        };
    }
    let mut cache = before
        .iter()
        .find(|c| c.selector & !3 == sel & !3)
        .copied()
        .unwrap_or_default();
    cache.selector = sel;
    cache
}

/// Linear address of the next instruction after `len` bytes, as the
/// client's `next_eip` (an offset in CS, wrapped to the code size).
fn next_ip(entry: &NormalModeEntry, rip: u64, len: u64) -> u64 {
    let next = rip.wrapping_add(len);
    match entry.code_size {
        CodeSize::Bits64 => next,
        CodeSize::Bits32 => next & 0xffff_ffff,
        CodeSize::Bits16 => next & 0xffff,
    }
}

/// Linear address of byte `i` of the instruction at CS:`rip`.
fn code_linear(entry: &NormalModeEntry, rip: u64, i: u64) -> u64 {
    let cs_base = entry.segments[seg::CS]
        .descriptor
        .map_or(0, |d| u64::from(d.base()));
    let linear = cs_base.wrapping_add(rip).wrapping_add(i);
    if entry.mode == CpuMode::Legacy || entry.code_size != CodeSize::Bits64 {
        linear & 0xffff_ffff
    } else {
        linear
    }
}

/// Up to two bytes of guest code at CS:RIP, read through the guest's
/// tables (a byte that cannot be read ends the slice), and the RAM page
/// of the first byte.
fn read_code<H: Host>(
    entry: &NormalModeEntry,
    a: &SwitchArea,
    mem: &mut RamMem<'_, H>,
    map: &PhysMap<H>,
) -> (([u8; 2], usize), Option<RamPage>) {
    let mut out = [0u8; 2];
    let mut first_page = None;
    // One walk per page: the second byte is almost always on the first
    // one's page.
    let mut page: Option<(u64, GuestPhys)> = None;
    for (i, byte) in out.iter_mut().enumerate() {
        let linear = code_linear(entry, a.rip, i as u64);
        let frame = match page {
            Some((l, f)) if l == linear & !0xfff => f,
            _ => {
                let Ok(t) = translate(
                    &entry.paging,
                    mem,
                    GuestVirt::new(linear),
                    Access::USER_FETCH,
                ) else {
                    return ((out, i), first_page);
                };
                let (PageBacking::Ram(p) | PageBacking::Rom(p)) = map.backing(t.frame()) else {
                    return ((out, i), first_page);
                };
                if i == 0 {
                    first_page = Some(p);
                }
                page = Some((linear & !0xfff, t.frame()));
                t.frame()
            }
        };
        let phys = frame.as_u64() | (linear & 0xfff);
        let Ok(word) = mem.read_u64(GuestPhys::new(phys & !7)) else {
            return ((out, i), first_page);
        };
        *byte = (word >> ((phys & 7) * 8)) as u8;
    }
    ((out, 2), first_page)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::CODE_DIRTY_FLAG;
    use crate::host::HeldUserPage;
    use std::boxed::Box;
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    /// A host whose user memory persists (the guest's RAM, dirty bytes and
    /// lists live in it), so the monitor's walks and the dirty protocol
    /// can be checked without running guest code.
    #[derive(Clone, Default)]
    struct MemHost {
        pages: Arc<Mutex<BTreeMap<u64, Box<[u64; 512]>>>>,
        /// Calls of hold_user_page.
        holds: Arc<std::sync::atomic::AtomicUsize>,
        /// What cpu_enter answers; calls of cpu_enter and cpu_leave.
        cpu: Option<usize>,
        cpu_calls: Arc<Mutex<(usize, usize)>>,
    }

    impl MemHost {
        fn page(&self, addr: u64) -> *mut u8 {
            let mut pages = self.pages.lock().expect("pages");
            let page = pages
                .entry(addr & !0xfff)
                .or_insert_with(|| Box::new([0; 512]));
            // SAFETY: inside the page; the boxes never move while the map
            // lives.
            unsafe { (page.as_mut_ptr() as *mut u8).add((addr & 0xfff) as usize) }
        }

        fn write_u64(&self, addr: u64, value: u64) {
            // SAFETY: aligned, inside a page of the map.
            unsafe { (self.page(addr) as *mut u64).write(value) }
        }

        fn read_u64(&self, addr: u64) -> u64 {
            // SAFETY: aligned, inside a page of the map.
            unsafe { (self.page(addr) as *mut u64).read() }
        }

        fn read_u8(&self, addr: u64) -> u8 {
            // SAFETY: inside a page of the map.
            unsafe { self.page(addr).read() }
        }

        fn write_u8(&self, addr: u64, value: u8) {
            // SAFETY: inside a page of the map.
            unsafe { self.page(addr).write(value) }
        }
    }

    impl Host for MemHost {
        fn log(&self, _args: core::fmt::Arguments<'_>) {}
        fn alloc_zeroed(&self, layout: Layout) -> Result<NonNull<u8>> {
            // SAFETY: non-zero sizes only.
            NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) }).ok_or(Error::NoMemory)
        }
        unsafe fn free(&self, ptr: NonNull<u8>, layout: Layout) {
            // SAFETY: from alloc_zeroed with this layout.
            unsafe { std::alloc::dealloc(ptr.as_ptr(), layout) }
        }
        fn check_user_range(&self, _addr: u64, _len: u64) -> Result<()> {
            Ok(())
        }
        fn hold_user_page(&self, user_addr: u64) -> Result<HeldUserPage> {
            self.holds.fetch_add(1, Ordering::Relaxed);
            Ok(HeldUserPage {
                user_addr,
                phys: FAKE_PHYS + user_addr,
                kernel: NonNull::new(self.page(user_addr)).ok_or(Error::Fault)?,
                cookie: 0,
            })
        }
        unsafe fn release_user_page(&self, _page: &HeldUserPage) {}
        fn virt_to_phys(&self, virt: u64) -> Option<u64> {
            Some(virt)
        }
        fn cpu_enter(&self) -> Option<usize> {
            self.cpu_calls.lock().expect("calls").0 += 1;
            self.cpu
        }
        fn cpu_leave(&self) {
            self.cpu_calls.lock().expect("calls").1 += 1;
        }
        fn should_yield(&self) -> bool {
            false
        }
    }

    const FAKE_PHYS: u64 = 0x10_0000_0000;
    const RAM_BASE: u64 = 0x1000_0000;
    const RAM_PAGES: u64 = 64;
    const DIRTY: u64 = 0x2000_0000;
    const LISTS: [u64; 3] = [0x3000_0000, 0x3000_1000, 0x3000_2000];
    /// Guest 4-level tables at guest-physical 0x1000..0x4fff; linear
    /// 0x40_0000 maps guest-physical 0x10000 (user, writable).
    const LINEAR: u64 = 0x40_0000;
    const DATA_PHYS: u64 = 0x10000;

    struct Guest {
        host: MemHost,
        monitor: Monitor<MemHost>,
        map: PhysMap<MemHost>,
        ram: RamParams,
        entry: NormalModeEntry,
        state: KqemuCpuState,
    }

    fn guest() -> Guest {
        let host = MemHost::default();
        let ram = RamParams {
            ram_base: RAM_BASE,
            ram_size: RAM_PAGES * 4096,
            ram_dirty: DIRTY,
        };
        let pte = 0x7; // present, writable, user
        host.write_u64(RAM_BASE + 0x1000, 0x2000 | pte);
        host.write_u64(RAM_BASE + 0x2000, 0x3000 | pte);
        host.write_u64(RAM_BASE + 0x3000 + 2 * 8, 0x4000 | pte);
        host.write_u64(RAM_BASE + 0x4000, DATA_PHYS | pte);
        for page in 0..RAM_PAGES {
            host.write_u8(DIRTY + page, ALL_DIRTY);
        }
        let mut map = PhysMap::new(&host).expect("memory");
        map.set(
            0,
            ram.ram_size,
            Some((crate::monitor::instance::PhysKind::Ram, 0)),
        )
        .expect("RAM");
        let mut state = KqemuCpuState {
            eip: LINEAR,
            eflags: 0x202,
            cr0: 0x8005_0033,
            cr3: 0x1000,
            cr4: 0x20,
            a20_mask: u64::MAX,
            efer: 0x501,
            cpl: 3,
            user_only: 1,
            ..KqemuCpuState::default()
        };
        state.segs[seg::CS] = KqemuSegmentCache {
            selector: 0x33,
            flags: 0x00af_fb00,
            limit: 0xffff_ffff,
            ..Default::default()
        };
        state.segs[seg::SS] = KqemuSegmentCache {
            selector: 0x2b,
            flags: 0x00cf_f300,
            limit: 0xffff_ffff,
            ..Default::default()
        };
        let entry = validate_normal_mode(
            &state,
            CpuPaging {
                max_phys_addr_bits: 46,
                gib_pages: true,
            },
        )
        .expect("a valid 64-bit state");
        let mut monitor = Monitor::new(&host, &ram).expect("memory");
        monitor
            .shadow
            .select(entry.paging.address_space_key(), &mut monitor.tables)
            .expect("root");
        Guest {
            host,
            monitor,
            map,
            ram,
            entry,
            state,
        }
    }

    impl Guest {
        fn fault(&mut self, linear: u64, error_code: u64, tracker: &mut DirtyTracker) -> i32 {
            let exit = Exit {
                vector: VEC_PF,
                error_code,
                cr2: linear,
                entry_failed: false,
                pending_nmi: false,
                pending_mc: false,
                dr6: 0,
            };
            let pages = [
                NonNull::new(self.host.page(LISTS[0])).expect("page"),
                NonNull::new(self.host.page(LISTS[1])).expect("page"),
                NonNull::new(self.host.page(LISTS[2])).expect("page"),
            ];
            let mut dirty = UserDirty {
                pages: NonNull::from(&self.monitor.dirty_pages[..]).cast(),
                len: self.monitor.dirty_pages.len(),
                ram: &self.ram,
            };
            let mut modified = ListPage(pages[2].cast());
            let mut update = ListPage(pages[1].cast());
            match self.monitor.page_fault(
                &exit,
                &self.entry,
                &self.map,
                &self.ram,
                tracker,
                &mut dirty,
                &mut modified,
                &mut update,
            ) {
                Ok(()) => 0,
                Err(report) => report.retval,
            }
        }

        fn leaf(&self, linear: u64) -> Option<u64> {
            self.monitor.shadow.lookup(GuestVirt::new(linear))
        }

        fn segment_fault(
            &mut self,
            vector: u8,
            error_code: u64,
            gdt: &mut RunGdt,
            tracker: &mut DirtyTracker,
        ) -> SegmentExit {
            let exit = Exit {
                vector,
                error_code,
                cr2: 0,
                entry_failed: false,
                pending_nmi: false,
                pending_mc: false,
                dr6: 0,
            };
            let mut dirty = UserDirty {
                pages: NonNull::from(&self.monitor.dirty_pages[..]).cast(),
                len: self.monitor.dirty_pages.len(),
                ram: &self.ram,
            };
            let list = |addr| NonNull::new(self.host.page(addr).cast()).expect("page");
            let mut modified = ListPage(list(LISTS[2]));
            let mut update = ListPage(list(LISTS[1]));
            let mut fill = SegmentFill {
                gdt,
                map: &self.map,
                ram: &self.ram,
                tracker,
                dirty: &mut dirty,
                modified: &mut modified,
                update: &mut update,
            };
            self.monitor.segment_fault(&exit, &self.entry, &mut fill)
        }
    }

    /// EXEC on a 33rd CPU while 32 others run guests: no block, so no run;
    /// the client gets KQEMU_RET_INTR (it calls EXEC again) with the
    /// guest's state as it gave it, and the CPU was left again.
    #[test]
    fn with_every_switcher_block_held_exec_answers_intr() {
        let mut g = guest();
        let lists = Lists {
            pages_to_flush: NonNull::new(g.host.page(LISTS[0])).expect("page"),
            ram_pages_to_update: NonNull::new(g.host.page(LISTS[1])).expect("page"),
            modified_ram_pages: NonNull::new(g.host.page(LISTS[2])).expect("page"),
        };
        // The monitor's clone of the host answers cpu_enter.
        g.monitor.host.cpu = Some(40);
        let mut state = g.state;
        {
            let _held = switch::AllBlocksHeld::take();
            g.monitor.exec(&mut state, &g.map, &g.ram, &lists);
        }
        assert_eq!(state.retval, KQEMU_RET_INTR);
        state.retval = g.state.retval;
        assert_eq!(state, g.state, "the guest's state as it was");
        let (entered, left) = *g.host.cpu_calls.lock().expect("calls");
        assert_eq!((entered, left), (1, 1));
        // A host that cannot run guest code at all: ABORT.
        g.monitor.host.cpu = None;
        let mut state = g.state;
        g.monitor.exec(&mut state, &g.map, &g.ram, &lists);
        assert_eq!(state.retval, KQEMU_RET_ABORT);
    }

    #[test]
    fn a_page_fault_fills_the_shadow_from_the_guest_walk() {
        let mut g = guest();
        let mut tracker = DirtyTracker::new();
        assert_eq!(g.fault(LINEAR + 0x123, 0x4, &mut tracker), 0);
        let leaf = g.leaf(LINEAR).expect("installed");
        assert_eq!(
            leaf & 0x000f_ffff_ffff_f000,
            FAKE_PHYS + RAM_BASE + DATA_PHYS
        );
        // A read of a page whose guest entry is not dirty: read-only until
        // the first write reaches the walk (which then sets D).
        assert_eq!(leaf & 0x6, 0x4, "user, not writable");
        assert_eq!(g.fault(LINEAR + 8, 0x7, &mut tracker), 0);
        assert_eq!(g.leaf(LINEAR).expect("leaf") & 0x2, 0x2, "writable now");
        // The guest's entry got A and D as the CPU would set them.
        // SAFETY: the PTE's page exists in the host map.
        let pte = unsafe { (g.host.page(RAM_BASE + 0x4000) as *const u64).read() };
        assert_eq!(pte & 0x60, 0x60);
        assert_eq!(
            tracker.counts(),
            (4, 0),
            "the four table pages were reported watched"
        );
    }

    #[test]
    fn leaves_of_one_page_table_share_their_shadow_table() {
        let mut g = guest();
        g.host
            .write_u64(RAM_BASE + 0x4000 + 0x1f0 * 8, 0x11000 | 0x7);
        let mut tracker = DirtyTracker::new();
        assert_eq!(g.fault(LINEAR, 0x14, &mut tracker), 0);
        assert_eq!(g.fault(LINEAR + 0x1f_0000, 0x6, &mut tracker), 0);
        // Filling the second page kept the first (a code page and a data
        // page of one program under one guest page table).
        assert!(g.leaf(LINEAR).is_some());
        assert!(g.leaf(LINEAR + 0x1f_0000).is_some());
    }

    #[test]
    fn walks_read_locked_table_pages_without_holding_them() {
        let mut g = guest();
        g.host
            .write_u64(RAM_BASE + 0x4000 + 0x1f0 * 8, 0x11000 | 0x7);
        let mut tracker = DirtyTracker::new();
        assert_eq!(g.fault(LINEAR, 0x14, &mut tracker), 0);
        let before = g.host.holds.load(Ordering::Relaxed);
        assert_eq!(g.fault(LINEAR + 0x1f_0000, 0x4, &mut tracker), 0);
        // The four table pages were locked by the first fault: the second
        // holds only its new data page.
        assert_eq!(g.host.holds.load(Ordering::Relaxed) - before, 1);
        assert!(g.leaf(LINEAR + 0x1f_0000).is_some());
    }

    #[test]
    fn instruction_bytes_come_from_the_page_the_shadow_maps() {
        let mut g = guest();
        g.host.write_u8(RAM_BASE + DATA_PHYS + 0x10, 0xcd);
        g.host.write_u8(RAM_BASE + DATA_PHYS + 0x11, 0x80);
        g.host.write_u8(RAM_BASE + 0x11010, 0x0f);
        g.host.write_u8(RAM_BASE + 0x11011, 0x05);
        let mut tracker = DirtyTracker::new();
        assert_eq!(g.fault(LINEAR + 0x10, 0x14, &mut tracker), 0);
        let at = SwitchArea {
            rip: LINEAR + 0x10,
            ..SwitchArea::default()
        };
        let (map, ram) = (&g.map, &g.ram);
        assert_eq!(
            g.monitor.code_at(&g.entry, &at, map, ram),
            ([0xcd, 0x80], 2)
        );
        assert!(g.monitor.code_page.is_some(), "the walk left its hint");
        // The guest's entry now names another page, which the client has
        // not reported yet: the CPU still runs the page the shadow maps.
        g.host.write_u64(RAM_BASE + 0x4000, 0x11000 | 0x67);
        assert_eq!(
            g.monitor.code_at(&g.entry, &at, map, ram),
            ([0xcd, 0x80], 2)
        );
        // Once the leaf is gone, the bytes come from the guest's walk.
        g.monitor.shadow.invalidate_page(GuestVirt::new(LINEAR));
        assert_eq!(
            g.monitor.code_at(&g.entry, &at, map, ram),
            ([0x0f, 0x05], 2)
        );
    }

    #[test]
    fn instruction_bytes_come_through_the_guest_walk() {
        let g = guest();
        g.host.write_u8(RAM_BASE + DATA_PHYS + 0x10, 0x0f);
        g.host.write_u8(RAM_BASE + DATA_PHYS + 0x11, 0x05);
        g.host.write_u8(RAM_BASE + DATA_PHYS + 0xfff, 0xcd);
        let mut mem = RamMem {
            host: &g.host,
            map: &g.map,
            ram: &g.ram,
            locked: None,
        };
        let at = |rip: u64| SwitchArea {
            rip,
            ..SwitchArea::default()
        };
        assert_eq!(
            read_code(&g.entry, &at(LINEAR + 0x10), &mut mem, &g.map).0,
            ([0x0f, 0x05], 2)
        );
        // The next page is not mapped: one byte.
        assert_eq!(
            read_code(&g.entry, &at(LINEAR + 0xfff), &mut mem, &g.map).0,
            ([0xcd, 0], 1)
        );
        assert_eq!(
            read_code(&g.entry, &at(0x60_0000), &mut mem, &g.map).0 .1,
            0
        );
    }

    #[test]
    fn a_guest_fault_is_the_guests_with_its_error_code() {
        let mut g = guest();
        let mut tracker = DirtyTracker::new();
        // Nothing maps 0x60_0000 (PD entry 3 is empty).
        assert_eq!(
            g.fault(0x60_0010, 0x6, &mut tracker),
            KQEMU_RET_EXCEPTION | 14
        );
        assert!(g.leaf(0x60_0000).is_none());
    }

    #[test]
    fn the_first_write_to_a_translated_page_is_reported() {
        let mut g = guest();
        let data_page = DATA_PHYS / 4096;
        // The client translated code from the page: dirty byte without
        // CODE_DIRTY_FLAG.
        g.host
            .write_u8(DIRTY + data_page, ALL_DIRTY & !CODE_DIRTY_FLAG);
        let mut tracker = DirtyTracker::new();
        assert_eq!(g.fault(LINEAR, 0x7, &mut tracker), 0);
        assert_eq!(g.host.read_u8(DIRTY + data_page), ALL_DIRTY);
        let (updates, modified) = tracker.counts();
        assert_eq!(modified, 1);
        // SAFETY: the list page exists in the host map.
        let first = unsafe { (g.host.page(LISTS[2]) as *const u64).read() };
        assert_eq!(first, DATA_PHYS, "modified_ram_pages names the RAM offset");
        assert!(updates >= 1);
        assert_eq!(g.leaf(LINEAR).expect("leaf") & 0x2, 0x2);
    }

    #[test]
    fn a_write_to_a_page_table_goes_to_the_client() {
        let mut g = guest();
        // Map the guest's own page table at 0x40_1000, writable.
        g.host.write_u64(RAM_BASE + 0x4000 + 8, 0x4000 | 0x67);
        let mut tracker = DirtyTracker::new();
        assert_eq!(
            g.fault(LINEAR + 0x1000, 0x7, &mut tracker),
            KQEMU_RET_SOFTMMU
        );
        let leaf = g.leaf(LINEAR + 0x1000);
        assert!(
            leaf.is_none_or(|l| l & 0x2 == 0),
            "never writable: {leaf:?}"
        );
    }

    #[test]
    fn software_interrupts_become_int_with_their_length() {
        let gp = |n: u64| (n << 3) | ERROR_IDT;
        assert_eq!(
            classify(13, gp(0x80), &[0xcd, 0x80], true),
            Outcome::Int {
                vector: 0x80,
                length: 2
            }
        );
        assert_eq!(
            classify(13, gp(3), &[0xcc, 0x90], true),
            Outcome::Int {
                vector: 3,
                length: 1
            }
        );
        assert_eq!(
            classify(13, gp(4), &[0xce], true),
            Outcome::Int {
                vector: 4,
                length: 1
            }
        );
        // The bytes do not match the vector: the client decides.
        assert_eq!(
            classify(13, gp(0x81), &[0xcd, 0x80], true),
            Outcome::SoftMmu
        );
        // QEMU TCG's 64-bit error code (vector * 16 + 2) names it too.
        assert_eq!(
            classify(13, (0x81 << 4) | 2, &[0xcd, 0x81], true),
            Outcome::Int {
                vector: 0x81,
                length: 2
            }
        );
        assert_eq!(classify(13, gp(0x80), &[], true), Outcome::SoftMmu);
        // A #GP without the IDT bit is the client's to emulate.
        assert_eq!(classify(13, 0, &[0xee], true), Outcome::SoftMmu);
        assert_eq!(
            Outcome::Int {
                vector: 0x80,
                length: 2
            }
            .retval(),
            0x180
        );
    }

    #[test]
    fn syscall_and_sysenter_follow_kqemu() {
        assert_eq!(classify(6, 0, &[0x0f, 0x05], true), Outcome::Syscall);
        assert_eq!(KQEMU_RET_SYSCALL, Outcome::Syscall.retval());
        assert_eq!(
            classify(6, 0, &[0x0f, 0x05], false),
            Outcome::Exception {
                vector: 6,
                error_code: 0
            }
        );
        assert_eq!(classify(6, 0, &[0x0f, 0x34], true), Outcome::SoftMmu);
        assert_eq!(
            classify(6, 0, &[0x0f, 0x0b], true),
            Outcome::Exception {
                vector: 6,
                error_code: 0
            }
        );
    }

    #[test]
    fn guest_exceptions_and_the_rest() {
        for v in [0u8, 1, 3, 4, 5, 7, 16, 17, 19] {
            assert_eq!(
                classify(v, 0, &[], true),
                Outcome::Exception {
                    vector: v,
                    error_code: 0
                },
                "{v}"
            );
        }
        assert_eq!(classify(8, 0, &[], true), Outcome::Abort);
        for v in [10u8, 11, 12, 13, 20, 21, 31] {
            assert_eq!(classify(v, 0x18, &[], true), Outcome::SoftMmu, "{v}");
        }
        assert_eq!(
            Outcome::Exception {
                vector: 14,
                error_code: 5
            }
            .retval(),
            14
        );
    }

    #[test]
    fn control_registers_for_the_guest() {
        let host_cr0 = 0x8005_0033 | Cr0::AM.bits();
        assert_eq!(guest_cr0(host_cr0, Cr0::PE), host_cr0 & !Cr0::AM.bits());
        assert_eq!(
            guest_cr0(host_cr0 & !Cr0::AM.bits(), Cr0::PE | Cr0::AM),
            host_cr0
        );
        let host_cr4 = (Cr4::PAE | Cr4::PGE | Cr4::OSFXSR | Cr4::UMIP | Cr4::FSGSBASE).bits();
        let g = guest_cr4(host_cr4, Cr4::PAE | Cr4::TSD);
        assert_eq!(g & Cr4::TSD.bits(), Cr4::TSD.bits());
        assert_eq!(g & Cr4::UMIP.bits(), Cr4::UMIP.bits(), "UMIP kept");
        assert_eq!(g & Cr4::FSGSBASE.bits(), 0, "guest without FSGSBASE");
        assert_eq!(g & Cr4::PGE.bits(), Cr4::PGE.bits());
        assert_eq!(
            g & Cr4::OSFXSR.bits(),
            0,
            "guest without OSFXSR: SSE raises #UD"
        );
        let host_pke = host_cr4 | (Cr4::PKE | Cr4::OSXSAVE).bits();
        let g = guest_cr4(host_pke, Cr4::PAE | Cr4::OSFXSR | Cr4::OSXSAVE | Cr4::PKE);
        assert_eq!(
            g & Cr4::PKE.bits(),
            0,
            "protection keys never reach the guest"
        );
        assert_eq!(g & Cr4::OSXSAVE.bits(), Cr4::OSXSAVE.bits());
        assert_eq!(g & Cr4::OSFXSR.bits(), Cr4::OSFXSR.bits());
        let g = guest_cr4(host_cr4, Cr4::PAE | Cr4::OSXSAVE);
        assert_eq!(g & Cr4::OSXSAVE.bits(), 0, "never a bit the host lacks");
    }

    /// The guest's GDT at linear 0x40_1000 (guest-physical 0x11000),
    /// mapped supervisor-only, 32 entries.
    const GDT_LINEAR: u64 = 0x40_1000;
    const GDT_PHYS: u64 = 0x11000;
    /// A flat DPL-3 data segment, not yet accessed, and the accessed bit.
    const FRESH_DS: u64 = 0x00cf_f200_0000_ffff;
    const DESC_A: u64 = 1 << 40;

    fn guest_with_gdt() -> Guest {
        let mut g = guest();
        g.host.write_u64(RAM_BASE + 0x4000 + 8, GDT_PHYS | 0x3);
        g.host.write_u64(RAM_BASE + GDT_PHYS + 9 * 8, FRESH_DS);
        g.host.write_u64(
            RAM_BASE + GDT_PHYS + 10 * 8,
            (FRESH_DS | DESC_A) & !(1 << 47),
        );
        g.entry.tables.gdt = (GDT_LINEAR, 32 * 8 - 1);
        g
    }

    #[test]
    fn a_gdt_selector_is_read_from_guest_memory_and_its_accessed_bit_set() {
        let mut g = guest_with_gdt();
        // The client translated code from the GDT's page (CODE_DIRTY clear).
        let gdt_page = GDT_PHYS / 4096;
        g.host
            .write_u8(DIRTY + gdt_page, ALL_DIRTY & !CODE_DIRTY_FLAG);
        let mut gdt = RunGdt::of_entry(&g.entry.segments).expect("distinct entry descriptors");
        let mut tracker = DirtyTracker::new();
        // `mov ds, 0x4b`: #GP(0x48) on the empty entry, filled (not
        // present while the guest's A is clear), retried.
        assert_eq!(
            g.segment_fault(VEC_GP, 0x48, &mut gdt, &mut tracker),
            SegmentExit::Resume
        );
        assert_eq!(
            gdt.descriptors().last(),
            Some(&(9, FRESH_DS & !(1 << 47) | DESC_A))
        );
        assert_eq!(g.host.read_u64(RAM_BASE + GDT_PHYS + 72), FRESH_DS);
        // The checks passed: #NP(0x48). The guest's A is set in its RAM,
        // through the guest's tables (their A and D set), as a guest write
        // for the dirty bytes; the shadow entry is present.
        assert_eq!(
            g.segment_fault(VEC_NP, 0x48, &mut gdt, &mut tracker),
            SegmentExit::Resume
        );
        assert_eq!(g.host.read_u64(RAM_BASE + GDT_PHYS + 72), FRESH_DS | DESC_A);
        assert_eq!(
            g.host.read_u64(RAM_BASE + 0x4000 + 8),
            GDT_PHYS | 0x3 | 0x60
        );
        assert_eq!(gdt.descriptors().last(), Some(&(9, FRESH_DS | DESC_A)));
        assert_eq!(g.host.read_u8(DIRTY + gdt_page), ALL_DIRTY);
        assert_eq!(tracker.counts(), (1, 1));
        assert_eq!(g.host.read_u64(LISTS[2]), GDT_PHYS);
        // Any further fault on it is the guest's.
        assert_eq!(
            g.segment_fault(VEC_GP, 0x48, &mut gdt, &mut tracker),
            SegmentExit::Guest
        );
        // A not-present descriptor: filled, then its #NP is the guest's,
        // with nothing written.
        assert_eq!(
            g.segment_fault(VEC_GP, 0x50, &mut gdt, &mut tracker),
            SegmentExit::Resume
        );
        assert_eq!(
            g.segment_fault(VEC_NP, 0x50, &mut gdt, &mut tracker),
            SegmentExit::Guest
        );
        // Beyond the limit: the guest's #GP without a read.
        assert_eq!(
            g.segment_fault(VEC_GP, 0x100, &mut gdt, &mut tracker),
            SegmentExit::Guest
        );
        assert_eq!(tracker.counts(), (1, 1));
    }

    #[test]
    fn a_gdt_the_guest_has_not_mapped_goes_to_the_client() {
        let mut g = guest_with_gdt();
        let mut tracker = DirtyTracker::new();
        let mut gdt = RunGdt::of_entry(&g.entry.segments).expect("distinct entry descriptors");
        // An unmapped page: the implicit read's #PF is the client's to
        // raise.
        g.entry.tables.gdt = (GDT_LINEAR + 0x1000, 0xff);
        assert_eq!(
            g.segment_fault(VEC_GP, 0x48, &mut gdt, &mut tracker),
            SegmentExit::Client
        );
        // A base that is not 4-byte aligned.
        g.entry.tables.gdt = (GDT_LINEAR + 2, 0xff);
        assert_eq!(
            g.segment_fault(VEC_GP, 0x48, &mut gdt, &mut tracker),
            SegmentExit::Client
        );
        assert_eq!(gdt.descriptors().len(), 2, "CS and SS only");
        // The guest's descriptor changed between the fill and the load:
        // the client loads it.
        g.entry.tables.gdt = (GDT_LINEAR, 0xff);
        assert_eq!(
            g.segment_fault(VEC_GP, 0x48, &mut gdt, &mut tracker),
            SegmentExit::Resume
        );
        g.host
            .write_u64(RAM_BASE + GDT_PHYS + 72, FRESH_DS & !(3 << 45));
        assert_eq!(
            g.segment_fault(VEC_SS, 0x48, &mut gdt, &mut tracker),
            SegmentExit::Client
        );
    }

    #[test]
    fn an_ldt_selector_is_read_from_the_guests_ldt_in_guest_memory() {
        let mut g = guest_with_gdt();
        // The guest's LDT: 4 entries in the GDT's page at +0x200.
        let ldt = 0x200;
        g.host
            .write_u64(RAM_BASE + GDT_PHYS + ldt + 2 * 8, FRESH_DS);
        g.entry.tables.ldt = Some((GDT_LINEAR + ldt, 4 * 8 - 1));
        let mut gdt = RunGdt::of_entry(&g.entry.segments).expect("distinct entry descriptors");
        let mut tracker = DirtyTracker::new();
        // `mov es, 0x17` (LDT index 2): filled from ldt.base + 16, not
        // present until the checks pass; then the guest's A is set there.
        assert_eq!(
            g.segment_fault(VEC_GP, 0x14, &mut gdt, &mut tracker),
            SegmentExit::Resume
        );
        assert_eq!(gdt.ldt_descriptors(), [(2, FRESH_DS & !(1 << 47) | DESC_A)]);
        assert_eq!(gdt.descriptors().len(), 2, "the GDT's list unchanged");
        assert_eq!(
            g.segment_fault(VEC_NP, 0x14, &mut gdt, &mut tracker),
            SegmentExit::Resume
        );
        assert_eq!(
            g.host.read_u64(RAM_BASE + GDT_PHYS + ldt + 16),
            FRESH_DS | DESC_A
        );
        assert_eq!(gdt.ldt_descriptors(), [(2, FRESH_DS | DESC_A)]);
        // The same index in the GDT is another entry (9 there: a load of
        // GDT index 2 reads gdt.base + 16).
        assert_eq!(g.host.read_u64(RAM_BASE + GDT_PHYS + 16), 0);
        // Beyond the LDT's limit, and any LDT selector without an LDT:
        // the guest's #GP.
        assert_eq!(
            g.segment_fault(VEC_GP, 0x24, &mut gdt, &mut tracker),
            SegmentExit::Guest
        );
        g.entry.tables.ldt = None;
        assert_eq!(
            g.segment_fault(VEC_GP, 0x0c, &mut gdt, &mut tracker),
            SegmentExit::Guest
        );
    }

    #[test]
    fn ldt_entry_registers_run_natively_when_the_ldt_holds_them() {
        let mut g = guest_with_gdt();
        let d = Descriptor(FRESH_DS | DESC_A);
        g.entry.segments[seg::DS] = crate::monitor::segments::EntrySegment {
            selector: Selector(0x0f),
            descriptor: Some(d),
            base_msr: None,
        };
        assert!(!runnable(&g.entry), "no LDT");
        g.entry.tables.ldt = Some((GDT_LINEAR + 0x200, 8 - 1));
        assert!(!runnable(&g.entry), "index 1 beyond the limit");
        g.entry.tables.ldt = Some((GDT_LINEAR + 0x200, 16 - 1));
        assert!(runnable(&g.entry));
        g.entry.segments[seg::DS].selector = Selector(SHADOW_LDT_ENTRIES << 3 | 7);
        g.entry.tables.ldt = Some((GDT_LINEAR + 0x200, 0xffff));
        assert!(!runnable(&g.entry), "past the shadow LDT's page");
    }

    #[test]
    fn native_selector_loads_copy_an_entry_cache() {
        let mut before = [KqemuSegmentCache::default(); seg::COUNT];
        before[seg::DS] = KqemuSegmentCache {
            selector: 0x2b,
            flags: 0x00cf_f300,
            base: 0,
            limit: 0xffff_ffff,
            ..Default::default()
        };
        let c = cache_for(0x2b, &before);
        assert_eq!(
            (c.selector, c.flags, c.limit),
            (0x2b, 0x00cf_f300, 0xffff_ffff)
        );
        let null = cache_for(0, &before);
        assert_eq!((null.selector, null.flags), (0, 0));
    }

    #[test]
    fn failed_setup_releases_the_dirty_byte_pages() {
        // 8 MiB of RAM: two pages of dirty bytes are held before the
        // shadow and the locked-page cache are allocated; whichever of
        // those allocations fails, no hold and no block may stay behind.
        let ram = RamParams {
            ram_base: 0x1000_0000,
            ram_size: 8 << 20,
            ram_dirty: 0x2000_0000,
        };
        for budget in 0..5 {
            let host = crate::host::mock::MockHost::default();
            host.map(ram.ram_dirty, 2 * PAGE_SIZE, true);
            host.state().allocs_before_failure = Some(budget);
            match Monitor::new(&host, &ram) {
                Ok(monitor) => drop(monitor),
                Err(e) => assert_eq!(e, Error::NoMemory, "budget {budget}"),
            }
            let st = host.state();
            assert!(
                st.held_pages.is_empty(),
                "budget {budget}: held pages leaked"
            );
            assert_eq!(st.live_allocs, 0, "budget {budget}: blocks leaked");
        }
    }
}
