//! Shadow page tables: the host-format tables the CPU uses while guest code
//! runs, filled lazily from walks of the guest's own tables (mmu.rs). They
//! act as a large software TLB.
//!
//! # Shape
//!
//! Every shadow address space is a 4-level tree as the host runs it (SDM
//! Vol. 3A 4.5): a 32-bit guest runs in compatibility mode under it and
//! uses PML4 slot 0 only, so it keeps its whole 4 GiB linear space. One
//! PML4 slot is reserved for the switcher (ARCHITECTURE.md "Where the
//! monitor lives") and never filled for the guest. Only user-mode
//! translations are mapped, always with 4 KiB leaves (a guest large page
//! becomes up to 512 leaves: its host frames are not contiguous), never
//! global (G = 0: they must not survive a switch back to the host's CR3),
//! with A preset and D preset on writable leaves so the CPU never writes
//! the shadow leaves.
//!
//! Each table page is a node of a fixed-capacity arena; the arena index of
//! a child is kept in the ignored bits of its parent's entry (bits 11:9
//! and 62:52, which the CPU ignores in non-leaf entries, Tables 4-15 to
//! 4-18), so descending needs no physical-to-virtual translation.
//!
//! # Why the cached roots stay exact
//!
//! Up to [`ROOT_CACHE_CAPACITY`] address spaces are kept, keyed by
//! [`AddressSpaceKey`] (guest CR3 and the bits that change user
//! translations), so a guest context switch finds its shadow tables again.
//! A MOV to CR3 architecturally empties the TLB of non-global entries
//! (SDM 4.10.4.1), and QEMU reports every CR3 write as a flush of
//! everything. Keeping a root across that flush is exact because every
//! leaf kept equals what a fresh walk would install now: each leaf table
//! records the guest paging-structure entries it was derived from
//! ([`Derivation`]), every guest page holding them is watched (ram.rs:
//! mapped read-only and reported by the client when written), and a
//! modification from any side drops what was derived from it:
//! - a guest write faults on the read-only page ([`Shadow::page_modified`]
//!   after ram.rs's write fault);
//! - a write by the client's emulation arrives in `modified_ram_pages`
//!   ([`Shadow::page_modified`]);
//! - any other write (DMA) sets the page's watch flag again, which
//!   [`Shadow::revalidate_current`] checks whenever the client asks for a
//!   full flush or the root changes.
//!
//! Accessed and Dirty flags the guest clears are writes to watched pages
//! too, so a kept leaf never hides a flag a fresh walk would set. Single
//! pages (`invlpg`, `pages_to_flush`) are dropped from every cached root;
//! dropping a translation is always allowed, a TLB may lose entries at any
//! time. Shadow leaf tables whose upper-level guest entries changed are
//! replaced when next filled, so the upper levels never act as a stale
//! paging-structure cache.

use core::ops::DerefMut;
use core::ptr::NonNull;

use bitflags::bitflags;

use crate::abi::ALL_DIRTY;
use crate::host::Zeroable;
use crate::monitor::mmu::{
    AddressSpaceKey, EntryWidth, GuestPhys, GuestPhysMem, GuestVirt, HostPhys, Level, PteFlags,
    Translation, WalkPath, MAX_LEVELS,
};
use crate::monitor::ram::{NativePage, RamPage};

/// Entries in a 4-level paging structure.
pub const ENTRIES: usize = 512;
/// Address spaces (guest CR3 values) whose shadow tables are kept.
pub const ROOT_CACHE_CAPACITY: usize = 8;
/// Largest arena: a child's index must fit the 14 ignored bits of its
/// parent's entry.
pub const MAX_NODES: usize = 1 << 14;
/// How many watched pages [`Shadow::revalidate_current`] examines one by
/// one before it drops the whole address space instead (bounding the work
/// of one EXEC entry).
pub const REVALIDATE_LIMIT: usize = 32;
/// Allocation retries, each after giving back memory: every other cached
/// root, then the leaf tables of the current one.
const MAX_RECLAIM_ATTEMPTS: usize = ROOT_CACHE_CAPACITY + 2;

bitflags! {
    /// Bits of a shadow (host-format) entry (SDM Vol. 3A Tables 4-15 to
    /// 4-20).
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct ShadowFlags: u64 {
        const PRESENT = 1 << 0;
        const WRITABLE = 1 << 1;
        const USER = 1 << 2;
        const ACCESSED = 1 << 5;
        const DIRTY = 1 << 6;
        const NO_EXECUTE = 1 << 63;
    }
}

/// Physical-address bits of a host entry (bits 51:12).
const FRAME_MASK: u64 = 0x000f_ffff_ffff_f000;
/// Where a child's arena index sits in its parent's entry: bits 11:9 hold
/// the low three bits, bits 62:52 the high eleven.
const CHILD_LOW_SHIFT: u32 = 9;
const CHILD_HIGH_SHIFT: u32 = 52;
/// Rights of a non-leaf shadow entry: the leaves decide everything.
const TABLE_ENTRY: u64 = ShadowFlags::PRESENT.bits()
    | ShadowFlags::WRITABLE.bits()
    | ShadowFlags::USER.bits()
    | ShadowFlags::ACCESSED.bits();

fn encode_child(node: u16) -> u64 {
    let n = u64::from(node);
    ((n & 0x7) << CHILD_LOW_SHIFT) | ((n >> 3) << CHILD_HIGH_SHIFT)
}

fn decode_child(entry: u64) -> u16 {
    (((entry >> CHILD_LOW_SHIFT) & 0x7) | (((entry >> CHILD_HIGH_SHIFT) & 0x7ff) << 3)) as u16
}

fn present(entry: u64) -> bool {
    entry & ShadowFlags::PRESENT.bits() != 0
}

/// One zeroed 4 KiB page for a shadow paging structure.
#[derive(Clone, Copy, Debug)]
pub struct TablePage {
    phys: HostPhys,
    table: NonNull<u64>,
}

impl TablePage {
    /// # Safety
    ///
    /// `table` points to a 4 KiB-aligned page of 512 `u64` that nothing
    /// else accesses, whose host-physical address is `phys`, valid until
    /// it is given back with [`TablePages::free`].
    pub unsafe fn new(phys: HostPhys, table: NonNull<u64>) -> Self {
        Self { phys, table }
    }

    /// The page's host-physical address.
    pub fn phys(&self) -> HostPhys {
        self.phys
    }

    /// The page's kernel mapping.
    pub fn table(&self) -> NonNull<u64> {
        self.table
    }
}

/// Where shadow table pages come from (the host's wired pages; a mock in
/// the tests). Allocation may fail: the shadow tables then give back
/// memory and retry, a bounded number of times.
///
/// # Safety
///
/// `alloc` returns pages as [`TablePage::new`] requires them, zero-filled.
pub unsafe trait TablePages {
    fn alloc(&mut self) -> Option<TablePage>;

    /// Takes a page back.
    ///
    /// # Safety
    ///
    /// `page` came from `alloc` of this provider, is given back once, and
    /// no shadow entry refers to it any more.
    unsafe fn free(&mut self, page: TablePage);
}

/// Where a leaf lives: arena index of its leaf table and slot in it. A
/// reference may outlive the leaf; every use checks it again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LeafRef {
    node: u16,
    slot: u16,
}

impl LeafRef {
    /// Slot `slot` of the leaf table at arena index `node`.
    pub const fn new(node: u16, slot: u16) -> Self {
        Self { node, slot }
    }
}

/// One guest paging-structure entry a leaf table was derived from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DerivedStep {
    /// The RAM page holding the entry.
    pub page: RamPage,
    pub entry_addr: GuestPhys,
    pub width: EntryWidth,
    /// The entry's value when last used (unused with `whole_table`).
    pub value: u64,
    /// The guest page table whose 4 KiB entries map the region: each leaf
    /// comes from its own entry, so any write to the page matters.
    pub whole_table: bool,
}

/// The guest entries a leaf table (one 2 MiB region of linear addresses)
/// was derived from. All its leaves share them: the entries above the
/// 4 KiB level depend only on address bits 47:21.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Derivation {
    steps: [DerivedStep; MAX_LEVELS],
    len: u8,
}

/// How a new derivation relates to the recorded one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Relation {
    Same,
    /// Equal but for Accessed/Dirty flags the new walk set.
    Advanced,
    Different,
}

impl Derivation {
    /// The derivation of a walk, naming each table page by its RAM page;
    /// `None` when a table is not in guest RAM.
    pub fn from_walk(
        path: &WalkPath,
        mut ram_page_of: impl FnMut(GuestPhys) -> Option<RamPage>,
    ) -> Option<Self> {
        let mut d = Self::default();
        for (slot, step) in d.steps.iter_mut().zip(path.steps()) {
            let whole_table = step.maps_page && step.level == Level::Pt;
            *slot = DerivedStep {
                page: ram_page_of(step.table_page())?,
                // A whole page table is named by its page: the leaves of
                // one region come from different entries of it, and must
                // share the leaf table.
                entry_addr: if whole_table {
                    step.table_page()
                } else {
                    step.entry_addr
                },
                width: step.width,
                value: if whole_table { 0 } else { step.value },
                whole_table,
            };
            d.len += 1;
        }
        Some(d)
    }

    /// The entries, top level first.
    pub fn steps(&self) -> &[DerivedStep] {
        &self.steps[..usize::from(self.len).min(MAX_LEVELS)]
    }

    fn references(&self, page: RamPage) -> bool {
        self.steps().iter().any(|s| s.page == page)
    }

    fn relation(&self, new: &Self) -> Relation {
        const AD: u64 = PteFlags::ACCESSED.bits() | PteFlags::DIRTY.bits();
        if self.len != new.len {
            return Relation::Different;
        }
        let mut relation = Relation::Same;
        for (old, new) in self.steps().iter().zip(new.steps()) {
            let same_place = old.page == new.page
                && old.entry_addr == new.entry_addr
                && old.width == new.width
                && old.whole_table == new.whole_table;
            if !same_place {
                return Relation::Different;
            }
            if old.value != new.value {
                // Flags the processor sets are sticky (4.8): a value that
                // only gained A or D is the same entry, walked again.
                if old.value & !AD != new.value & !AD || old.value & AD & !new.value != 0 {
                    return Relation::Different;
                }
                relation = Relation::Advanced;
            }
        }
        relation
    }
}

/// What a leaf maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeafMapping {
    /// The locked host frame of the guest page.
    pub frame: HostPhys,
    /// Guest rights allow writes, the guest entry is dirty, and the page's
    /// dirty byte is 0xFF (ram.rs).
    pub writable: bool,
    /// Guest rights allow instruction fetches.
    pub executable: bool,
}

impl LeafMapping {
    /// The leaf for translation `t` of a user access, backed by the guest
    /// RAM page `backing` locked at `frame`, whose dirty byte is
    /// `dirty_byte` (read after the derivation's pages were watched).
    /// `None` for a supervisor page: normal mode maps only what CPL 3 may
    /// use. Writable only when the guest allows writes, the guest's entry
    /// is already dirty (so the first write still reaches the walk, which
    /// sets D, SDM Vol. 3A 4.8), the page is not ROM, and the client's dirty
    /// byte is 0xFF (ram.rs).
    pub fn for_translation(
        t: &Translation,
        frame: HostPhys,
        backing: NativePage,
        dirty_byte: u8,
    ) -> Option<Self> {
        if !t.user {
            return None;
        }
        Some(Self {
            frame,
            writable: t.writable && t.dirty && !backing.read_only && dirty_byte == ALL_DIRTY,
            executable: t.executable,
        })
    }

    fn entry(&self) -> u64 {
        let mut flags = ShadowFlags::PRESENT | ShadowFlags::USER | ShadowFlags::ACCESSED;
        if self.writable {
            flags |= ShadowFlags::WRITABLE | ShadowFlags::DIRTY;
        }
        if !self.executable {
            flags |= ShadowFlags::NO_EXECUTE;
        }
        (self.frame.as_u64() & FRAME_MASK) | flags.bits()
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(u8)]
enum NodeKind {
    #[default]
    Free = 0,
    /// A PML4, PDPT or PD: entries point to other nodes.
    Table = 1,
    /// A page table of leaves, with a derivation.
    Leaf = 2,
}

/// One shadow table page of the arena.
#[derive(Clone, Copy, Debug, Default)]
pub struct ShadowNode {
    table: Option<NonNull<u64>>,
    phys: HostPhys,
    kind: NodeKind,
    /// Root slot of the address space the node belongs to.
    root: u8,
    parent: u16,
    parent_slot: u16,
    /// Next free node (+1) while free.
    next_free: u16,
    derivation: Derivation,
}

// SAFETY: all-zero bytes are a free node: no table (None), zero integers,
// NodeKind::Free (discriminant 0), an empty derivation of zero integers
// and EntryWidth::Four (discriminant 0).
unsafe impl Zeroable for ShadowNode {}
// SAFETY: the table pointer is owned by the arena and only dereferenced
// through `&mut Shadow`; nothing ties it to a thread.
unsafe impl Send for ShadowNode {}
// SAFETY: shared references never dereference the table mutably.
unsafe impl Sync for ShadowNode {}

#[derive(Clone, Copy, Debug, Default)]
struct RootSlot {
    key: Option<AddressSpaceKey>,
    node: u16,
    last_use: u64,
}

/// Why a shadow operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShadowError {
    /// No page for a table even after giving back everything else.
    NoMemory,
    /// The address lies in the switcher's PML4 slot: the client must
    /// emulate the access.
    Reserved,
    /// The address is not canonical.
    NonCanonical,
    /// No address space is selected.
    NoRoot,
    /// The arena is empty or larger than [`MAX_NODES`], or the reserved
    /// slot is not a PML4 index.
    BadConfig,
}

/// An address space made current by [`Shadow::select`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Selected {
    /// Host-physical address of its PML4, for CR3.
    pub root: HostPhys,
    /// Root-cache slot (a PCID can be derived from it).
    pub slot: usize,
    /// The tables were cached from an earlier run.
    pub reused: bool,
}

/// Pages [`Shadow::revalidate_current`] found written, from which leaf
/// tables are still derived: the caller watches them again.
#[derive(Clone, Copy, Debug, Default)]
pub struct Rewatch {
    pages: [RamPage; REVALIDATE_LIMIT],
    len: usize,
}

impl Rewatch {
    /// The pages.
    pub fn pages(&self) -> &[RamPage] {
        &self.pages[..self.len]
    }

    fn contains(&self, page: RamPage) -> bool {
        self.pages().contains(&page)
    }

    fn push(&mut self, page: RamPage) {
        if let Some(slot) = self.pages.get_mut(self.len) {
            *slot = page;
            self.len += 1;
        }
    }
}

/// Bits of the filter of RAM pages that derivations may reference.
const FILTER_BITS: usize = 8192;

/// A superset of the RAM pages referenced by some derivation: most pages
/// the client reports modified are data pages, which it rules out without
/// a scan.
#[derive(Clone, Copy)]
struct PageFilter([u64; FILTER_BITS / 64]);

impl PageFilter {
    const EMPTY: Self = Self([0; FILTER_BITS / 64]);

    fn bit(page: RamPage) -> usize {
        (page.index().wrapping_mul(0x9e37_79b9) >> 19) as usize % FILTER_BITS
    }

    fn insert(&mut self, page: RamPage) {
        let b = Self::bit(page);
        self.0[b / 64] |= 1 << (b % 64);
    }

    fn may_contain(&self, page: RamPage) -> bool {
        let b = Self::bit(page);
        self.0[b / 64] & (1 << (b % 64)) != 0
    }
}

enum Fill {
    NeedMemory,
    Failed(ShadowError),
}

/// All shadow address spaces of one VM. The table pages belong to the
/// provider passed to each call, so the owner gives them back with
/// [`Shadow::drop_all`] before dropping the value.
pub struct Shadow<S: DerefMut<Target = [ShadowNode]>> {
    nodes: S,
    /// Nodes below this index have been used; above, never.
    high_water: usize,
    /// First free node (+1).
    free: u16,
    live: usize,
    roots: [RootSlot; ROOT_CACHE_CAPACITY],
    current: Option<usize>,
    clock: u64,
    reserved_slot: usize,
    switcher_entry: u64,
    filter: PageFilter,
    /// Root slots whose translations the hardware TLB may still hold
    /// although the shadow tables dropped them.
    stale_tlb: u8,
}

impl<S: DerefMut<Target = [ShadowNode]>> Shadow<S> {
    /// Empty shadow tables over the arena `nodes`, keeping PML4 slot
    /// `reserved_slot` for the switcher.
    pub fn new(mut nodes: S, reserved_slot: usize) -> Result<Self, ShadowError> {
        if nodes.len() < MAX_LEVELS || nodes.len() > MAX_NODES || reserved_slot >= ENTRIES {
            return Err(ShadowError::BadConfig);
        }
        for node in nodes.iter_mut() {
            *node = ShadowNode::default();
        }
        Ok(Self {
            nodes,
            high_water: 0,
            free: 0,
            live: 0,
            roots: [RootSlot::default(); ROOT_CACHE_CAPACITY],
            current: None,
            clock: 0,
            reserved_slot,
            switcher_entry: 0,
            filter: PageFilter::EMPTY,
            stale_tlb: 0,
        })
    }

    /// Table pages in use.
    pub fn live_pages(&self) -> usize {
        self.live
    }

    /// The PML4 entry the switcher needs in every address space, at the
    /// reserved slot; written into every cached root now and every new one
    /// later.
    pub fn set_switcher_entry(&mut self, entry: u64) {
        self.switcher_entry = entry;
        for i in 0..ROOT_CACHE_CAPACITY {
            if self.roots[i].key.is_some() {
                let node = self.roots[i].node;
                self.set_entry(node, self.reserved_slot, entry);
            }
        }
    }

    /// Makes the address space `key` current, from the cache or new (then
    /// the least recently used one may be evicted).
    pub fn select<P: TablePages + ?Sized>(
        &mut self,
        key: AddressSpaceKey,
        pages: &mut P,
    ) -> Result<Selected, ShadowError> {
        self.clock += 1;
        if let Some(slot) = self.roots.iter().position(|r| r.key == Some(key)) {
            self.roots[slot].last_use = self.clock;
            self.current = Some(slot);
            return Ok(Selected {
                root: self.node_phys(self.roots[slot].node),
                slot,
                reused: true,
            });
        }
        self.current = None;
        let slot = match self.roots.iter().position(|r| r.key.is_none()) {
            Some(free) => free,
            None => {
                let lru = self.lru_root(None).unwrap_or(0);
                self.evict_root(lru, pages);
                lru
            }
        };
        for _ in 0..MAX_RECLAIM_ATTEMPTS {
            match self.alloc_node(pages) {
                Some(node) => {
                    self.nodes[usize::from(node)] = ShadowNode {
                        kind: NodeKind::Table,
                        root: slot as u8,
                        ..self.nodes[usize::from(node)]
                    };
                    self.set_entry(node, self.reserved_slot, self.switcher_entry);
                    self.roots[slot] = RootSlot {
                        key: Some(key),
                        node,
                        last_use: self.clock,
                    };
                    self.current = Some(slot);
                    return Ok(Selected {
                        root: self.node_phys(node),
                        slot,
                        reused: false,
                    });
                }
                None => {
                    let Some(victim) = self.lru_root(None) else {
                        break;
                    };
                    self.evict_root(victim, pages);
                }
            }
        }
        Err(ShadowError::NoMemory)
    }

    /// The current address space's PML4, if one is selected.
    pub fn current_root(&self) -> Option<HostPhys> {
        self.current
            .map(|slot| self.node_phys(self.roots[slot].node))
    }

    /// Installs the leaf for `linear` in the current address space, derived
    /// from `derivation`. The caller watches the derivation's pages before
    /// (ram.rs) and computes `mapping.writable` after, so that a guest page
    /// table mapped at its own address is never writable. When the leaf
    /// table of the region was derived from other guest entries, its old
    /// leaves go: they were TLB entries of a translation that changed.
    pub fn install<P: TablePages + ?Sized>(
        &mut self,
        linear: GuestVirt,
        mapping: LeafMapping,
        derivation: &Derivation,
        pages: &mut P,
    ) -> Result<LeafRef, ShadowError> {
        for attempt in 0..MAX_RECLAIM_ATTEMPTS {
            match self.try_install(linear, mapping, derivation, pages) {
                Ok(leaf) => return Ok(leaf),
                Err(Fill::Failed(e)) => return Err(e),
                Err(Fill::NeedMemory) => {
                    if !self.reclaim(pages) || attempt + 1 == MAX_RECLAIM_ATTEMPTS {
                        break;
                    }
                }
            }
        }
        Err(ShadowError::NoMemory)
    }

    fn try_install<P: TablePages + ?Sized>(
        &mut self,
        linear: GuestVirt,
        mapping: LeafMapping,
        derivation: &Derivation,
        pages: &mut P,
    ) -> Result<LeafRef, Fill> {
        let slot = self.current.ok_or(Fill::Failed(ShadowError::NoRoot))?;
        let [i4, i3, i2, i1] = indices(linear).map_err(Fill::Failed)?;
        if i4 == self.reserved_slot {
            return Err(Fill::Failed(ShadowError::Reserved));
        }
        let root = self.roots[slot].node;
        let pdpt = self.child_table(root, i4, pages)?;
        let pd = self.child_table(pdpt, i3, pages)?;
        let leaves = self.leaf_table(pd, i2, derivation, pages)?;
        self.set_entry(leaves, i1, mapping.entry());
        Ok(LeafRef {
            node: leaves,
            slot: i1 as u16,
        })
    }

    fn child_table<P: TablePages + ?Sized>(
        &mut self,
        parent: u16,
        index: usize,
        pages: &mut P,
    ) -> Result<u16, Fill> {
        let entry = self.entry(parent, index);
        if present(entry) {
            return Ok(decode_child(entry));
        }
        let node = self.alloc_node(pages).ok_or(Fill::NeedMemory)?;
        self.attach(parent, index, node, NodeKind::Table);
        Ok(node)
    }

    fn leaf_table<P: TablePages + ?Sized>(
        &mut self,
        parent: u16,
        index: usize,
        derivation: &Derivation,
        pages: &mut P,
    ) -> Result<u16, Fill> {
        let entry = self.entry(parent, index);
        let node = if present(entry) {
            let node = decode_child(entry);
            match self.nodes[usize::from(node)]
                .derivation
                .relation(derivation)
            {
                Relation::Same => return Ok(node),
                Relation::Advanced => {}
                Relation::Different => {
                    for slot in 0..ENTRIES {
                        self.set_entry(node, slot, 0);
                    }
                    self.mark_stale(node);
                }
            }
            node
        } else {
            let node = self.alloc_node(pages).ok_or(Fill::NeedMemory)?;
            self.attach(parent, index, node, NodeKind::Leaf);
            node
        };
        self.nodes[usize::from(node)].derivation = *derivation;
        for step in derivation.steps() {
            self.filter.insert(step.page);
        }
        Ok(node)
    }

    fn attach(&mut self, parent: u16, index: usize, node: u16, kind: NodeKind) {
        let root = self.nodes[usize::from(parent)].root;
        let n = &mut self.nodes[usize::from(node)];
        n.kind = kind;
        n.root = root;
        n.parent = parent;
        n.parent_slot = index as u16;
        n.derivation = Derivation::default();
        let entry = (n.phys.as_u64() & FRAME_MASK) | TABLE_ENTRY | encode_child(node);
        self.set_entry(parent, index, entry);
    }

    /// The leaf for `linear` in the current address space, if present.
    pub fn lookup(&self, linear: GuestVirt) -> Option<u64> {
        let slot = self.current?;
        let (node, i1) = self.find_leaf_table(self.roots[slot].node, linear)?;
        Some(self.entry(node, i1)).filter(|&e| present(e))
    }

    fn find_leaf_table(&self, root: u16, linear: GuestVirt) -> Option<(u16, usize)> {
        let [i4, i3, i2, i1] = indices(linear).ok()?;
        let mut node = root;
        for index in [i4, i3, i2] {
            let entry = self.entry(node, index);
            if !present(entry) || (index == self.reserved_slot && node == root) {
                return None;
            }
            node = decode_child(entry);
        }
        self.nodes
            .get(usize::from(node))
            .is_some_and(|n| n.kind == NodeKind::Leaf)
            .then_some((node, i1))
    }

    /// Drops the leaf for `linear` from every cached address space
    /// (`invlpg`, an entry of `pages_to_flush`).
    pub fn invalidate_page(&mut self, linear: GuestVirt) {
        for slot in 0..ROOT_CACHE_CAPACITY {
            if self.roots[slot].key.is_none() {
                continue;
            }
            if let Some((node, i1)) = self.find_leaf_table(self.roots[slot].node, linear) {
                if present(self.entry(node, i1)) {
                    self.set_entry(node, i1, 0);
                    self.mark_stale(node);
                }
            }
        }
    }

    /// Drops every leaf table of the current address space (kqemu's answer
    /// to every flush; here the last resort when memory is short).
    pub fn flush_current<P: TablePages + ?Sized>(&mut self, pages: &mut P) {
        let Some(slot) = self.current else { return };
        for i in 0..self.high_water {
            let node = self.nodes[i];
            if node.kind == NodeKind::Leaf && usize::from(node.root) == slot {
                self.drop_leaf_table(i as u16, pages);
            }
        }
    }

    /// Frees every address space (teardown, or a change of the guest's
    /// physical memory map that invalidates every frame).
    pub fn drop_all<P: TablePages + ?Sized>(&mut self, pages: &mut P) {
        for slot in 0..ROOT_CACHE_CAPACITY {
            if self.roots[slot].key.is_some() {
                self.evict_root(slot, pages);
            }
        }
        self.current = None;
        self.filter = PageFilter::EMPTY;
    }

    /// Guest RAM page `page` was written: drops every leaf table derived
    /// from it whose guest entry actually changed (re-read through `mem`),
    /// in every address space. Returns whether some leaf table still
    /// depends on the page, which must then be watched again.
    pub fn page_modified<M, P>(&mut self, page: RamPage, mem: &mut M, pages: &mut P) -> bool
    where
        M: GuestPhysMem + ?Sized,
        P: TablePages + ?Sized,
    {
        if !self.filter.may_contain(page) {
            return false;
        }
        let mut filter = PageFilter::EMPTY;
        let mut still_used = false;
        for i in 0..self.high_water {
            let node = self.nodes[i];
            if node.kind != NodeKind::Leaf {
                continue;
            }
            if node.derivation.references(page) && !still_valid(&node.derivation, page, mem) {
                self.drop_leaf_table(i as u16, pages);
                continue;
            }
            still_used |= node.derivation.references(page);
            for step in node.derivation.steps() {
                filter.insert(step.page);
            }
        }
        self.filter = filter;
        still_used
    }

    /// Finds the pages of the current address space's derivations that
    /// `written` says were written since they were watched, and handles
    /// each like [`Shadow::page_modified`]. Returns those still depended
    /// on, to be watched again. Past [`REVALIDATE_LIMIT`] pages, drops the
    /// whole address space instead.
    pub fn revalidate_current<W, M, P>(
        &mut self,
        mut written: W,
        mem: &mut M,
        pages: &mut P,
    ) -> Rewatch
    where
        W: FnMut(RamPage) -> bool,
        M: GuestPhysMem + ?Sized,
        P: TablePages + ?Sized,
    {
        let mut rewatch = Rewatch::default();
        let Some(slot) = self.current else {
            return rewatch;
        };
        let mut examined = 0;
        for i in 0..self.high_water {
            for s in 0..MAX_LEVELS {
                let node = self.nodes[i];
                if node.kind != NodeKind::Leaf || usize::from(node.root) != slot {
                    break;
                }
                let Some(step) = node.derivation.steps().get(s).copied() else {
                    break;
                };
                if rewatch.contains(step.page) || !written(step.page) {
                    continue;
                }
                examined += 1;
                if examined > REVALIDATE_LIMIT {
                    self.flush_current(pages);
                    return Rewatch::default();
                }
                if self.page_modified(step.page, mem, pages) {
                    rewatch.push(step.page);
                }
            }
        }
        rewatch
    }

    /// Clears `leaf` if it still maps `frame`.
    pub fn clear_leaf(&mut self, leaf: LeafRef, frame: HostPhys) -> bool {
        self.update_leaf(leaf, frame, |_| 0)
    }

    /// Makes `leaf` read-only if it still maps `frame`.
    pub fn write_protect_leaf(&mut self, leaf: LeafRef, frame: HostPhys) -> bool {
        self.update_leaf(leaf, frame, write_protected)
    }

    fn update_leaf(&mut self, leaf: LeafRef, frame: HostPhys, f: impl Fn(u64) -> u64) -> bool {
        let Some(node) = self.nodes.get(usize::from(leaf.node)) else {
            return false;
        };
        if node.kind != NodeKind::Leaf || usize::from(leaf.slot) >= ENTRIES {
            return false;
        }
        let entry = self.entry(leaf.node, usize::from(leaf.slot));
        if !present(entry) || entry & FRAME_MASK != frame.as_u64() & FRAME_MASK {
            return false;
        }
        let new = f(entry);
        if new != entry {
            self.set_entry(leaf.node, usize::from(leaf.slot), new);
            self.mark_stale(leaf.node);
        }
        true
    }

    /// Clears every leaf that maps `frame` (a full scan, for a page whose
    /// leaf hints overflowed). Returns how many.
    pub fn clear_frame(&mut self, frame: HostPhys) -> usize {
        self.update_all(|e| e & FRAME_MASK == frame.as_u64() & FRAME_MASK, |_| 0)
    }

    /// Makes every leaf that maps `frame` read-only. Returns how many.
    pub fn write_protect_frame(&mut self, frame: HostPhys) -> usize {
        self.update_all(
            |e| e & FRAME_MASK == frame.as_u64() & FRAME_MASK,
            write_protected,
        )
    }

    /// Makes every leaf read-only (the client reset more dirty bytes than
    /// its list holds). Returns how many leaves were writable.
    pub fn write_protect_all(&mut self) -> usize {
        self.update_all(|e| e & ShadowFlags::WRITABLE.bits() != 0, write_protected)
    }

    fn update_all(&mut self, matches: impl Fn(u64) -> bool, f: impl Fn(u64) -> u64) -> usize {
        let mut count = 0;
        for i in 0..self.high_water {
            if self.nodes[i].kind != NodeKind::Leaf {
                continue;
            }
            let mut changed = false;
            for slot in 0..ENTRIES {
                let entry = self.entry(i as u16, slot);
                if present(entry) && matches(entry) {
                    let new = f(entry);
                    if new != entry {
                        self.set_entry(i as u16, slot, new);
                        changed = true;
                    }
                    count += 1;
                }
            }
            if changed {
                self.mark_stale(i as u16);
            }
        }
        count
    }

    /// Root slots whose translations may still sit in the hardware TLB
    /// after leaves were dropped or write-protected, and clears the set.
    /// The world switch flushes them (their PCIDs, or by reloading CR3)
    /// before the guest runs again.
    pub fn take_stale_tlb(&mut self) -> u8 {
        core::mem::take(&mut self.stale_tlb)
    }

    fn mark_stale(&mut self, node: u16) {
        let root = self.nodes[usize::from(node)].root;
        self.stale_tlb |= 1u8.checked_shl(u32::from(root)).unwrap_or(0);
    }

    fn lru_root(&self, except: Option<usize>) -> Option<usize> {
        (0..ROOT_CACHE_CAPACITY)
            .filter(|&s| self.roots[s].key.is_some() && Some(s) != except)
            .min_by_key(|&s| self.roots[s].last_use)
    }

    /// Gives back memory for a fill: another address space first, else the
    /// current one's leaf tables. False when nothing is left to give.
    fn reclaim<P: TablePages + ?Sized>(&mut self, pages: &mut P) -> bool {
        if let Some(victim) = self.lru_root(self.current) {
            self.evict_root(victim, pages);
            return true;
        }
        let before = self.live;
        self.flush_current(pages);
        self.live < before
    }

    fn evict_root<P: TablePages + ?Sized>(&mut self, slot: usize, pages: &mut P) {
        for i in 0..self.high_water {
            let node = self.nodes[i];
            if node.kind != NodeKind::Free && usize::from(node.root) == slot {
                self.free_node(i as u16, pages);
            }
        }
        self.roots[slot] = RootSlot::default();
        if self.current == Some(slot) {
            self.current = None;
        }
        self.stale_tlb |= 1u8.checked_shl(slot as u32).unwrap_or(0);
    }

    fn drop_leaf_table<P: TablePages + ?Sized>(&mut self, node: u16, pages: &mut P) {
        let n = self.nodes[usize::from(node)];
        self.set_entry(n.parent, usize::from(n.parent_slot), 0);
        self.mark_stale(node);
        self.free_node(node, pages);
    }

    fn alloc_node<P: TablePages + ?Sized>(&mut self, pages: &mut P) -> Option<u16> {
        let index = match self.free.checked_sub(1) {
            Some(i) => usize::from(i),
            None if self.high_water < self.nodes.len() => self.high_water,
            None => return None,
        };
        let page = pages.alloc()?;
        if index == self.high_water {
            self.high_water += 1;
        } else {
            self.free = self.nodes[index].next_free;
        }
        self.nodes[index] = ShadowNode {
            table: Some(page.table),
            phys: page.phys,
            ..ShadowNode::default()
        };
        self.live += 1;
        Some(index as u16)
    }

    fn free_node<P: TablePages + ?Sized>(&mut self, node: u16, pages: &mut P) {
        let n = &mut self.nodes[usize::from(node)];
        if let Some(table) = n.table.take() {
            // SAFETY: the page came from `pages.alloc` in alloc_node and is
            // given back once (the node forgets it here); its parent entry
            // was cleared by the caller, or its whole tree is being freed.
            unsafe { pages.free(TablePage::new(n.phys, table)) };
            self.live -= 1;
        }
        *n = ShadowNode {
            next_free: self.free,
            ..ShadowNode::default()
        };
        self.free = node + 1;
    }

    fn node_phys(&self, node: u16) -> HostPhys {
        self.nodes[usize::from(node)].phys
    }

    fn entry(&self, node: u16, index: usize) -> u64 {
        match self.nodes.get(usize::from(node)).and_then(|n| n.table) {
            // SAFETY: a live node's table is a page of ENTRIES u64
            // (TablePage's contract) and the index is reduced below ENTRIES.
            Some(table) => unsafe { table.as_ptr().add(index % ENTRIES).read() },
            None => 0,
        }
    }

    fn set_entry(&mut self, node: u16, index: usize, value: u64) {
        if let Some(table) = self.nodes.get(usize::from(node)).and_then(|n| n.table) {
            // SAFETY: as in `entry`; `&mut self` makes the arena's access to
            // the page unique.
            unsafe { table.as_ptr().add(index % ENTRIES).write(value) };
        }
    }
}

fn write_protected(entry: u64) -> u64 {
    entry & !(ShadowFlags::WRITABLE.bits() | ShadowFlags::DIRTY.bits())
}

/// The PML4, PDPT, PD and PT indices of a linear address.
fn indices(linear: GuestVirt) -> Result<[usize; 4], ShadowError> {
    let l = linear.as_u64();
    let high = l >> 47;
    if high != 0 && high != (1 << 17) - 1 {
        return Err(ShadowError::NonCanonical);
    }
    Ok([39, 30, 21, 12].map(|shift| ((l >> shift) as usize) % ENTRIES))
}

/// Whether the entries of `derivation` held in `page` are unchanged.
fn still_valid<M: GuestPhysMem + ?Sized>(
    derivation: &Derivation,
    page: RamPage,
    mem: &mut M,
) -> bool {
    derivation
        .steps()
        .iter()
        .filter(|s| s.page == page)
        .all(|s| {
            !s.whole_table
                && match s.width {
                    EntryWidth::Four => mem.read_u32(s.entry_addr).map(u64::from),
                    EntryWidth::Eight => mem.read_u64(s.entry_addr),
                } == Ok(s.value)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::mmu::tests::TestMem;
    use crate::monitor::mmu::{
        translate, Access, CpuPaging, Cr0, Cr4, Efer, PagingConfig, PagingMode, PagingRegisters,
    };
    use std::boxed::Box;
    use std::collections::BTreeMap;
    use std::vec;
    use std::vec::Vec;

    /// Table pages from the test allocator, with fake physical addresses,
    /// a failure switch and a leak check.
    #[derive(Default)]
    struct MockPages {
        live: BTreeMap<u64, NonNull<u64>>,
        next_phys: u64,
        fail: bool,
        /// When set, a pool of this many pages: `alloc` takes from it and
        /// fails when it is empty, `free` gives back to it.
        budget: Option<usize>,
    }

    /// A page-aligned table page for the mock.
    #[repr(C, align(4096))]
    struct Page([u64; ENTRIES]);

    // SAFETY: pages are fresh zeroed boxes of 512 u64, 4 KiB aligned,
    // owned by the caller until freed.
    unsafe impl TablePages for MockPages {
        fn alloc(&mut self) -> Option<TablePage> {
            if self.fail {
                return None;
            }
            if let Some(b) = self.budget.as_mut() {
                *b = b.checked_sub(1)?;
            }
            let raw = Box::into_raw(Box::new(Page([0; ENTRIES]))).cast::<u64>();
            let table = NonNull::new(raw)?;
            self.next_phys += 0x1000;
            let phys = 0x7_0000_0000 + self.next_phys;
            self.live.insert(phys, table);
            // SAFETY: see the impl's comment.
            Some(unsafe { TablePage::new(HostPhys::new(phys), table) })
        }

        unsafe fn free(&mut self, page: TablePage) {
            let table = self
                .live
                .remove(&page.phys().as_u64())
                .expect("page was allocated");
            assert_eq!(table, page.table());
            // SAFETY: allocated by `alloc` as a Box<Page>, freed once.
            drop(unsafe { Box::from_raw(table.as_ptr().cast::<Page>()) });
            // A page given back can be handed out again.
            if let Some(b) = self.budget.as_mut() {
                *b += 1;
            }
        }
    }

    impl Drop for MockPages {
        fn drop(&mut self) {
            // Tests that leave tables behind fail here rather than leak.
            if !std::thread::panicking() {
                assert!(
                    self.live.is_empty(),
                    "{} shadow pages leaked",
                    self.live.len()
                );
            }
        }
    }

    type TestShadow = Shadow<Vec<ShadowNode>>;

    const RESERVED: usize = 510;

    fn shadow(nodes: usize) -> TestShadow {
        Shadow::new(vec![ShadowNode::default(); nodes], RESERVED).expect("valid arena")
    }

    fn key(cr3: u64) -> AddressSpaceKey {
        AddressSpaceKey {
            mode: PagingMode::Level4,
            root: GuestPhys::new(cr3),
            pse: false,
            nxe: true,
            a20_mask: u64::MAX,
        }
    }

    fn step(page: u32, entry_addr: u64, value: u64, whole_table: bool) -> DerivedStep {
        DerivedStep {
            page: RamPage::new(page),
            entry_addr: GuestPhys::new(entry_addr),
            width: EntryWidth::Eight,
            value,
            whole_table,
        }
    }

    fn derivation(steps: &[DerivedStep]) -> Derivation {
        let mut d = Derivation::default();
        for (slot, s) in d.steps.iter_mut().zip(steps) {
            *slot = *s;
            d.len += 1;
        }
        d
    }

    /// A derivation for a 4 KiB page under PD entry value `pde` (page 2) and
    /// page table page 3.
    fn deriv(pde: u64) -> Derivation {
        derivation(&[
            step(1, 0x1000, 0x2027, false),
            step(2, 0x2000, pde, false),
            step(3, 0x3000, 0, true),
        ])
    }

    fn map(frame: u64, writable: bool) -> LeafMapping {
        LeafMapping {
            frame: HostPhys::new(frame),
            writable,
            executable: true,
        }
    }

    const P: u64 = ShadowFlags::PRESENT.bits();
    const W: u64 = ShadowFlags::WRITABLE.bits();
    const U: u64 = ShadowFlags::USER.bits();
    const A: u64 = ShadowFlags::ACCESSED.bits();
    const D: u64 = ShadowFlags::DIRTY.bits();
    const NX: u64 = ShadowFlags::NO_EXECUTE.bits();

    #[test]
    fn child_index_round_trips() {
        for n in [0u16, 1, 7, 8, 1234, (MAX_NODES - 1) as u16] {
            let e = 0x1234_5000 | TABLE_ENTRY | encode_child(n);
            assert_eq!(decode_child(e), n);
            assert_eq!(
                e & FRAME_MASK,
                0x1234_5000,
                "index stays out of the address"
            );
        }
    }

    #[test]
    fn install_and_lookup() {
        let mut pages = MockPages::default();
        let mut s = shadow(64);
        assert_eq!(
            s.install(
                GuestVirt::new(0x1000),
                map(0x5000, true),
                &deriv(0x3067),
                &mut pages
            ),
            Err(ShadowError::NoRoot)
        );
        let sel = s.select(key(0x1000), &mut pages).expect("memory");
        assert!(!sel.reused);
        assert_eq!(s.current_root(), Some(sel.root));
        let linear = GuestVirt::new(0x0000_7f80_4060_5123);
        s.install(linear, map(0x5000, true), &deriv(0x3067), &mut pages)
            .expect("memory");
        assert_eq!(s.lookup(linear), Some(0x5000 | P | W | U | A | D));
        assert_eq!(s.live_pages(), 4, "PML4, PDPT, PD, PT");
        // Read-only, non-executable leaf next to it: same tables.
        let next = GuestVirt::new(linear.as_u64() + 0x1000);
        s.install(
            next,
            LeafMapping {
                frame: HostPhys::new(0x6000),
                writable: false,
                executable: false,
            },
            &deriv(0x3067),
            &mut pages,
        )
        .expect("memory");
        assert_eq!(s.lookup(next), Some(0x6000 | P | U | A | NX));
        assert_eq!(s.live_pages(), 4);
        assert_eq!(s.lookup(GuestVirt::new(0x1000)), None);
        // A 32-bit guest's addresses sit in PML4 slot 0; upper-half
        // addresses of a 64-bit guest are mapped too.
        s.install(
            GuestVirt::new(0xffff_f000),
            map(0x7000, false),
            &deriv(0x3067),
            &mut pages,
        )
        .expect("memory");
        s.install(
            GuestVirt::new(0xffff_8000_0000_0000),
            map(0x8000, false),
            &deriv(0x3067),
            &mut pages,
        )
        .expect("memory");
        assert!(s.lookup(GuestVirt::new(0xffff_f000)).is_some());
        assert!(s.lookup(GuestVirt::new(0xffff_8000_0000_0000)).is_some());
        // The switcher's slot and non-canonical addresses are refused.
        let reserved = GuestVirt::new(0xffff_0000_0000_0000 | (RESERVED as u64) << 39);
        assert_eq!(
            s.install(reserved, map(0x9000, false), &deriv(0x3067), &mut pages),
            Err(ShadowError::Reserved)
        );
        assert_eq!(
            s.install(
                GuestVirt::new(1 << 47),
                map(0x9000, false),
                &deriv(0x3067),
                &mut pages
            ),
            Err(ShadowError::NonCanonical)
        );
        s.drop_all(&mut pages);
        assert_eq!(s.live_pages(), 0);
    }

    #[test]
    fn switcher_entry_in_every_root() {
        let mut pages = MockPages::default();
        let mut s = shadow(64);
        s.select(key(0x1000), &mut pages).expect("memory");
        s.set_switcher_entry(0xabc_d000 | P | W);
        let root_a = s.roots[0].node;
        assert_eq!(s.entry(root_a, RESERVED), 0xabc_d000 | P | W);
        s.select(key(0x2000), &mut pages).expect("memory");
        assert_eq!(s.entry(s.roots[1].node, RESERVED), 0xabc_d000 | P | W);
        s.drop_all(&mut pages);
    }

    #[test]
    fn roots_are_cached_by_key_with_lru_eviction() {
        let mut pages = MockPages::default();
        let mut s = shadow(256);
        let linear = GuestVirt::new(0x40_0000);
        // Two address spaces, as the benchmark's two processes.
        s.select(key(0x1000), &mut pages).expect("memory");
        s.install(linear, map(0xa000, true), &deriv(0x3067), &mut pages)
            .expect("memory");
        s.select(key(0x2000), &mut pages).expect("memory");
        assert_eq!(s.lookup(linear), None, "a new address space starts empty");
        s.install(linear, map(0xb000, true), &deriv(0x3067), &mut pages)
            .expect("memory");
        let again = s.select(key(0x1000), &mut pages).expect("memory");
        assert!(again.reused);
        assert_eq!(s.lookup(linear).map(|e| e & FRAME_MASK), Some(0xa000));
        // Fill the cache; 0x2000 is now the least recently used.
        for cr3 in 3..=8u64 {
            s.select(key(cr3 << 12), &mut pages).expect("memory");
        }
        s.select(key(0x1000), &mut pages).expect("memory");
        let live = s.live_pages();
        s.select(key(0x9000), &mut pages).expect("memory");
        assert_eq!(
            s.live_pages(),
            live - 4 + 1,
            "0x2000's four tables freed, one PML4 added"
        );
        assert!(s.select(key(0x1000), &mut pages).expect("memory").reused);
        assert!(!s.select(key(0x2000), &mut pages).expect("memory").reused);
        // A different paging mode for the same CR3 is another space.
        let pae = AddressSpaceKey {
            mode: PagingMode::Pae,
            ..key(0x1000)
        };
        assert!(!s.select(pae, &mut pages).expect("memory").reused);
        s.drop_all(&mut pages);
    }

    #[test]
    fn invalidate_page_drops_the_leaf_everywhere() {
        let mut pages = MockPages::default();
        let mut s = shadow(64);
        let linear = GuestVirt::new(0x40_3000);
        s.select(key(0x1000), &mut pages).expect("memory");
        s.install(linear, map(0xa000, true), &deriv(0x3067), &mut pages)
            .expect("memory");
        s.install(
            GuestVirt::new(0x40_4000),
            map(0xc000, true),
            &deriv(0x3067),
            &mut pages,
        )
        .expect("memory");
        s.select(key(0x2000), &mut pages).expect("memory");
        s.install(linear, map(0xb000, true), &deriv(0x3067), &mut pages)
            .expect("memory");
        s.take_stale_tlb();
        s.invalidate_page(linear);
        assert_eq!(s.lookup(linear), None);
        assert_eq!(
            s.take_stale_tlb(),
            0b11,
            "both roots may have the page in the TLB"
        );
        s.select(key(0x1000), &mut pages).expect("memory");
        assert_eq!(s.lookup(linear), None);
        assert!(
            s.lookup(GuestVirt::new(0x40_4000)).is_some(),
            "other pages stay"
        );
        // Invalidating what is not mapped is harmless.
        s.invalidate_page(GuestVirt::new(0x1234_5000));
        s.invalidate_page(GuestVirt::new(1 << 63));
        assert_eq!(s.take_stale_tlb(), 0);
        s.drop_all(&mut pages);
    }

    #[test]
    fn derivations_share_or_replace_a_leaf_table() {
        let mut pages = MockPages::default();
        let mut s = shadow(64);
        s.select(key(0x1000), &mut pages).expect("memory");
        let a = GuestVirt::new(0x40_0000);
        let b = GuestVirt::new(0x40_1000);
        s.install(a, map(0xa000, false), &deriv(0x3027), &mut pages)
            .expect("memory");
        // The same PDE, now also dirty (a walk set D on it): compatible.
        s.install(b, map(0xb000, false), &deriv(0x3067), &mut pages)
            .expect("memory");
        assert!(s.lookup(a).is_some() && s.lookup(b).is_some());
        s.take_stale_tlb();
        // A PDE pointing elsewhere: the region's old leaves go.
        s.install(b, map(0xc000, false), &deriv(0x4067), &mut pages)
            .expect("memory");
        assert_eq!(s.lookup(a), None);
        assert_eq!(s.lookup(b).map(|e| e & FRAME_MASK), Some(0xc000));
        assert_eq!(s.take_stale_tlb(), 1);
        // A cleared A bit is a different entry too.
        s.install(a, map(0xa000, false), &deriv(0x4047), &mut pages)
            .expect("memory");
        assert_eq!(s.lookup(b), None);
        assert_eq!(
            s.live_pages(),
            4,
            "the leaf table was reused, not reallocated"
        );
        s.drop_all(&mut pages);
    }

    #[test]
    fn page_modified_drops_what_changed() {
        let mut pages = MockPages::default();
        let mut mem = TestMem::new(0x10000);
        let mut s = shadow(64);
        s.select(key(0x1000), &mut pages).expect("memory");
        // Region 0x40_0000 under PDE at 0x2010, region 0x60_0000 under PDE
        // at 0x2018, both in PD page 2; leaf tables in pages 3 and 4.
        mem.put64(0x2010, 0x3067);
        mem.put64(0x2018, 0x4067);
        let d1 = derivation(&[step(2, 0x2010, 0x3067, false), step(3, 0x3000, 0, true)]);
        let d2 = derivation(&[step(2, 0x2018, 0x4067, false), step(4, 0x4000, 0, true)]);
        s.install(
            GuestVirt::new(0x40_0000),
            map(0xa000, false),
            &d1,
            &mut pages,
        )
        .expect("memory");
        s.install(
            GuestVirt::new(0x60_0000),
            map(0xb000, false),
            &d2,
            &mut pages,
        )
        .expect("memory");
        // A data page nobody derived from: nothing happens.
        assert!(!s.page_modified(RamPage::new(77), &mut mem, &mut pages));
        // PD page written but both entries unchanged: everything stays, and
        // the page must be watched again.
        assert!(s.page_modified(RamPage::new(2), &mut mem, &mut pages));
        assert!(
            s.lookup(GuestVirt::new(0x40_0000)).is_some()
                && s.lookup(GuestVirt::new(0x60_0000)).is_some()
        );
        // One PDE changed: only its region goes.
        mem.put64(0x2018, 0x5067);
        assert!(s.page_modified(RamPage::new(2), &mut mem, &mut pages));
        assert!(s.lookup(GuestVirt::new(0x40_0000)).is_some());
        assert_eq!(s.lookup(GuestVirt::new(0x60_0000)), None);
        assert_eq!(s.live_pages(), 4);
        // A page table page written: its region goes, nothing else depends
        // on it.
        assert!(!s.page_modified(RamPage::new(3), &mut mem, &mut pages));
        assert_eq!(s.lookup(GuestVirt::new(0x40_0000)), None);
        assert_eq!(s.live_pages(), 3);
        s.drop_all(&mut pages);
    }

    #[test]
    fn revalidation_checks_only_written_pages() {
        let mut pages = MockPages::default();
        let mut mem = TestMem::new(0x10000);
        let mut s = shadow(64);
        mem.put64(0x2010, 0x3067);
        let d = derivation(&[step(2, 0x2010, 0x3067, false), step(3, 0x3000, 0, true)]);
        s.select(key(0x1000), &mut pages).expect("memory");
        s.install(
            GuestVirt::new(0x40_0000),
            map(0xa000, false),
            &d,
            &mut pages,
        )
        .expect("memory");
        // Nothing written: nothing to do.
        let r = s.revalidate_current(|_| false, &mut mem, &mut pages);
        assert!(r.pages().is_empty());
        assert!(s.lookup(GuestVirt::new(0x40_0000)).is_some());
        // The PD page was written (DMA) but the entry is the same: kept,
        // and the page must be watched again.
        let r = s.revalidate_current(|p| p == RamPage::new(2), &mut mem, &mut pages);
        assert_eq!(r.pages(), [RamPage::new(2)]);
        assert!(s.lookup(GuestVirt::new(0x40_0000)).is_some());
        // The page table was written: dropped.
        let r = s.revalidate_current(|p| p == RamPage::new(3), &mut mem, &mut pages);
        assert!(r.pages().is_empty());
        assert_eq!(s.lookup(GuestVirt::new(0x40_0000)), None);
        // Too many written pages: the whole space is dropped at once.
        for i in 0..(REVALIDATE_LIMIT as u64 + 1) {
            let d = derivation(&[step(100 + i as u32, 0x2010, 0x3067, false)]);
            s.install(GuestVirt::new(i << 21), map(0xa000, false), &d, &mut pages)
                .expect("memory");
        }
        let r = s.revalidate_current(|_| true, &mut mem, &mut pages);
        assert!(r.pages().is_empty());
        assert!((0..=REVALIDATE_LIMIT as u64).all(|i| s.lookup(GuestVirt::new(i << 21)).is_none()));
        s.drop_all(&mut pages);
    }

    #[test]
    fn write_protection_and_clearing() {
        let mut pages = MockPages::default();
        let mut s = shadow(64);
        s.select(key(0x1000), &mut pages).expect("memory");
        let a = s
            .install(
                GuestVirt::new(0x1000),
                map(0xa000, true),
                &deriv(0x3067),
                &mut pages,
            )
            .expect("memory");
        let b = s
            .install(
                GuestVirt::new(0x2000),
                map(0xa000, true),
                &deriv(0x3067),
                &mut pages,
            )
            .expect("memory");
        s.install(
            GuestVirt::new(0x3000),
            map(0xb000, true),
            &deriv(0x3067),
            &mut pages,
        )
        .expect("memory");
        s.take_stale_tlb();
        // A hint for another frame does nothing.
        assert!(!s.write_protect_leaf(a, HostPhys::new(0xb000)));
        assert!(s.write_protect_leaf(a, HostPhys::new(0xa000)));
        assert_eq!(s.lookup(GuestVirt::new(0x1000)), Some(0xa000 | P | U | A));
        assert_eq!(s.take_stale_tlb(), 1);
        assert_eq!(
            s.write_protect_frame(HostPhys::new(0xa000)),
            2,
            "both leaves of the frame"
        );
        assert_eq!(s.lookup(GuestVirt::new(0x2000)), Some(0xa000 | P | U | A));
        assert!(s.clear_leaf(b, HostPhys::new(0xa000)));
        assert!(!s.clear_leaf(b, HostPhys::new(0xa000)), "already gone");
        assert!(
            !s.clear_leaf(LeafRef::new(9999, 0), HostPhys::new(0xa000)),
            "no such node"
        );
        assert_eq!(s.clear_frame(HostPhys::new(0xa000)), 1);
        assert_eq!(s.lookup(GuestVirt::new(0x1000)), None);
        assert_eq!(s.write_protect_all(), 1);
        assert_eq!(s.lookup(GuestVirt::new(0x3000)), Some(0xb000 | P | U | A));
        s.drop_all(&mut pages);
    }

    #[test]
    fn allocation_failure_evicts_then_reports() {
        let mut pages = MockPages::default();
        let mut s = shadow(64);
        for cr3 in 1..=3u64 {
            s.select(key(cr3 << 12), &mut pages).expect("memory");
            s.install(
                GuestVirt::new(0x1000),
                map(0xa000, true),
                &deriv(0x3067),
                &mut pages,
            )
            .expect("memory");
        }
        assert_eq!(s.live_pages(), 12);
        // No more pages from the host: filling a new region of the current
        // space evicts the least recently used other space, whose pages
        // come back to the pool.
        pages.budget = Some(0);
        let far = GuestVirt::new(0x7f00_0000_0000);
        let leaf = s
            .install(far, map(0xb000, true), &deriv(0x3067), &mut pages)
            .expect("after eviction");
        assert!(s.lookup(far).is_some());
        assert!(s.clear_leaf(leaf, HostPhys::new(0xb000)));
        assert_eq!(s.live_pages(), 11, "space 1 evicted, three tables added");
        assert!(
            !s.select(key(0x1000), &mut pages)
                .expect("a page came back")
                .reused
        );
        assert!(s.select(key(0x2000), &mut pages).expect("cached").reused);
        // Nothing can be given back any more: NoMemory, nothing leaked.
        let mut none = MockPages::default();
        none.fail = true;
        let mut t = shadow(64);
        assert_eq!(t.select(key(0x1000), &mut none), Err(ShadowError::NoMemory));
        assert_eq!(t.live_pages(), 0);
        s.drop_all(&mut pages);
    }

    #[test]
    fn current_space_gives_back_its_own_leaf_tables_last() {
        let mut pages = MockPages::default();
        let mut s = shadow(64);
        s.select(key(0x1000), &mut pages).expect("memory");
        s.install(
            GuestVirt::new(0x1000),
            map(0xa000, true),
            &deriv(0x3067),
            &mut pages,
        )
        .expect("memory");
        pages.budget = Some(0);
        // A region in another PML4 slot needs three new tables; only the
        // old leaf table can be given back, which is not enough.
        let far = GuestVirt::new(0x7f00_0000_0000);
        assert_eq!(
            s.install(far, map(0xb000, true), &deriv(0x3067), &mut pages),
            Err(ShadowError::NoMemory)
        );
        assert_eq!(
            s.lookup(GuestVirt::new(0x1000)),
            None,
            "flushed in the attempt"
        );
        // With one page back, a region under the existing PD fits.
        pages.budget = Some(1);
        s.install(
            GuestVirt::new(0x20_0000),
            map(0xb000, true),
            &deriv(0x3067),
            &mut pages,
        )
        .expect("one table");
        s.drop_all(&mut pages);
    }

    #[test]
    fn arena_capacity_is_a_limit_too() {
        let mut pages = MockPages::default();
        let mut s = shadow(MAX_LEVELS);
        s.select(key(0x1000), &mut pages).expect("memory");
        s.install(
            GuestVirt::new(0x1000),
            map(0xa000, true),
            &deriv(0x3067),
            &mut pages,
        )
        .expect("four nodes");
        // A second region needs a fifth node: the current space's leaf
        // table is given back and reused.
        s.install(
            GuestVirt::new(0x20_0000),
            map(0xb000, true),
            &deriv(0x3067),
            &mut pages,
        )
        .expect("reused node");
        assert_eq!(s.lookup(GuestVirt::new(0x1000)), None);
        assert!(s.lookup(GuestVirt::new(0x20_0000)).is_some());
        assert_eq!(s.live_pages(), 4);
        assert!(Shadow::new(vec![ShadowNode::default(); 3], 0).is_err());
        assert!(Shadow::new(vec![ShadowNode::default(); 8], 512).is_err());
        s.drop_all(&mut pages);
    }

    #[test]
    fn derivation_from_a_real_walk() {
        // 32-bit paging: PD at 0x1000, PT at 0x2000.
        let mut mem = TestMem::new(0x10000);
        mem.put32(0x1004, 0x2007);
        mem.put32(0x200c, 0x5007);
        let regs = PagingRegisters {
            cr0: (Cr0::PE | Cr0::PG).bits(),
            cr3: 0x1000,
            cr4: Cr4::empty().bits(),
            efer: Efer::empty().bits(),
            a20_mask: u64::MAX,
        };
        let cfg = PagingConfig::new(
            &regs,
            CpuPaging {
                max_phys_addr_bits: 36,
                gib_pages: false,
            },
        )
        .expect("valid");
        let t = translate(&cfg, &mut mem, GuestVirt::new(0x40_3000), Access::USER_READ)
            .expect("mapped");
        let d = Derivation::from_walk(&t.path, |gpa| RamPage::from_offset(gpa.as_u64(), 16))
            .expect("in RAM");
        assert_eq!(d.steps().len(), 2);
        assert_eq!(
            d.steps()[0],
            DerivedStep {
                page: RamPage::new(1),
                entry_addr: GuestPhys::new(0x1004),
                width: EntryWidth::Four,
                value: 0x2027,
                whole_table: false
            }
        );
        assert!(d.steps()[1].whole_table);
        assert_eq!(d.steps()[1].page, RamPage::new(2));
        assert_eq!(Derivation::from_walk(&t.path, |_| None), None);
        // The PDE re-read through 4-byte accesses validates.
        assert!(still_valid(&d, RamPage::new(1), &mut mem));
        mem.put32(0x1004, 0x2007);
        assert!(
            !still_valid(&d, RamPage::new(1), &mut mem),
            "A cleared by the guest"
        );
    }

    fn translation(user: bool, writable: bool, dirty: bool, executable: bool) -> Translation {
        Translation {
            linear: GuestVirt::new(0x1000),
            phys: GuestPhys::new(0x5000),
            size: crate::monitor::mmu::PageSize::Size4K,
            writable,
            user,
            executable,
            dirty,
            global: false,
            path: WalkPath::default(),
        }
    }

    #[test]
    fn leaf_rights_follow_guest_and_dirty_byte() {
        let frame = HostPhys::new(0xa000);
        let ram = NativePage {
            page: RamPage::new(5),
            read_only: false,
        };
        let rom = NativePage {
            read_only: true,
            ..ram
        };
        let t = translation(true, true, true, true);
        let m = LeafMapping::for_translation(&t, frame, ram, ALL_DIRTY).expect("user page");
        assert!(m.writable && m.executable);
        assert_eq!(m.entry(), 0xa000 | P | W | U | A | D);
        for (t, backing, byte) in [
            (translation(true, false, true, true), ram, ALL_DIRTY),
            (translation(true, true, false, true), ram, ALL_DIRTY),
            (t, rom, ALL_DIRTY),
            (t, ram, ALL_DIRTY & !crate::abi::CODE_DIRTY_FLAG),
            (t, ram, ALL_DIRTY & !crate::monitor::ram::WATCH_FLAG),
        ] {
            let m = LeafMapping::for_translation(&t, frame, backing, byte).expect("user page");
            assert!(!m.writable, "{t:?} {backing:?} {byte:#x}");
        }
        let nx = LeafMapping::for_translation(
            &translation(true, true, true, false),
            frame,
            ram,
            ALL_DIRTY,
        );
        assert_eq!(nx.map(|m| m.entry() & NX), Some(NX));
        assert_eq!(
            LeafMapping::for_translation(
                &translation(false, true, true, true),
                frame,
                ram,
                ALL_DIRTY
            ),
            None
        );
    }

    /// What the monitor's fault path will do, with every module of this
    /// layer: walk, watch the tables, compute the leaf, install it.
    struct Machine {
        mem: TestMem,
        dirty: Vec<u8>,
        update: Vec<u64>,
        modified: Vec<u64>,
        tracker: crate::monitor::ram::DirtyTracker,
        shadow: TestShadow,
        pages: MockPages,
        config: PagingConfig,
    }

    const RAM_PAGES: u64 = 64;

    fn frame_of(page: RamPage) -> HostPhys {
        HostPhys::new(0x8000_0000 + page.offset())
    }

    impl Machine {
        fn new(cr3: u64) -> Self {
            Self {
                mem: TestMem::new((RAM_PAGES * 0x1000) as usize),
                dirty: vec![ALL_DIRTY; RAM_PAGES as usize],
                update: vec![0; 512],
                modified: vec![0; 512],
                tracker: crate::monitor::ram::DirtyTracker::new(),
                shadow: shadow(64),
                pages: MockPages::default(),
                config: Self::config(cr3),
            }
        }

        fn config(cr3: u64) -> PagingConfig {
            let regs = PagingRegisters {
                cr0: (Cr0::PE | Cr0::PG | Cr0::WP).bits(),
                cr3,
                cr4: Cr4::PAE.bits(),
                efer: (Efer::LME | Efer::LMA | Efer::NXE).bits(),
                a20_mask: u64::MAX,
            };
            PagingConfig::new(
                &regs,
                CpuPaging {
                    max_phys_addr_bits: 40,
                    gib_pages: true,
                },
            )
            .expect("valid")
        }

        fn switch_to(&mut self, cr3: u64) -> bool {
            self.config = Self::config(cr3);
            let key = self.config.address_space_key();
            self.shadow
                .select(key, &mut self.pages)
                .expect("memory")
                .reused
        }

        fn fill(&mut self, linear: u64, access: Access) -> Result<LeafRef, &'static str> {
            use crate::monitor::ram::{native_page, PageBacking, Watch};
            let linear = GuestVirt::new(linear);
            let t = translate(&self.config, &mut self.mem, linear, access)
                .map_err(|_| "guest fault")?;
            let d = Derivation::from_walk(&t.path, |g| RamPage::from_offset(g.as_u64(), RAM_PAGES))
                .ok_or("tables outside RAM")?;
            for step in d.steps() {
                let w = self.tracker.watch(
                    step.page,
                    self.dirty.as_mut_slice(),
                    self.update.as_mut_slice(),
                );
                if w == (Watch::Started { was_writable: true }) {
                    self.shadow.write_protect_frame(frame_of(step.page));
                }
            }
            let page = RamPage::from_offset(t.frame().as_u64(), RAM_PAGES).ok_or("not RAM")?;
            let native = native_page(PageBacking::Ram(page), access.kind).map_err(|_| "client")?;
            let byte = self.dirty[page.index() as usize];
            let m = LeafMapping::for_translation(&t, frame_of(page), native, byte)
                .ok_or("supervisor")?;
            self.shadow
                .install(linear, m, &d, &mut self.pages)
                .map_err(|_| "shadow")
        }

        fn leaf(&self, linear: u64) -> Option<u64> {
            self.shadow.lookup(GuestVirt::new(linear))
        }
    }

    #[test]
    fn fault_path_end_to_end() {
        const PWU: u64 = 7;
        let mut m = Machine::new(0x1000);
        // Guest tables: PML4 page 1, PDPT page 2, PD page 3, PT page 4;
        // linear 0x40_0000 + i pages -> page 16 + i; PT entry 8 maps the
        // page table itself.
        m.mem.put64(0x1000, 0x2000 | PWU);
        m.mem.put64(0x2000, 0x3000 | PWU);
        m.mem.put64(0x3000 + 2 * 8, 0x4000 | PWU);
        m.mem.put64(0x4000, 0x10000 | PWU);
        m.mem.put64(0x4000 + 8 * 8, 0x4000 | PWU);
        assert!(!m.switch_to(0x1000));

        // A read maps the page read-only: the guest entry is not dirty yet.
        m.fill(0x40_0000, Access::USER_READ).expect("mapped");
        assert_eq!(
            m.leaf(0x40_0000),
            Some(frame_of(RamPage::new(16)).as_u64() | P | U | A)
        );
        assert_eq!(m.mem.get64(0x4000), 0x10000 | PWU | A);
        // The four table pages are watched, and the client was told.
        for page in 1..=4 {
            assert_eq!(
                m.dirty[page],
                ALL_DIRTY & !crate::monitor::ram::WATCH_FLAG,
                "page {page}"
            );
        }
        assert_eq!(m.tracker.counts(), (4, 0));
        // The client has translated code from the page. The write faults
        // again; the walk sets D, but the dirty byte keeps the page
        // read-only, so the write faults once more; the dirty protocol lists
        // the page for the client and then it is writable.
        m.dirty[16] = ALL_DIRTY & !crate::abi::CODE_DIRTY_FLAG;
        m.fill(0x40_0000, Access::USER_WRITE).expect("mapped");
        assert_eq!(m.mem.get64(0x4000), 0x10000 | PWU | A | 0x40);
        assert_eq!(m.leaf(0x40_0000).map(|e| e & W), Some(0));
        let fault = m.tracker.write_fault(
            RamPage::new(16),
            m.dirty.as_mut_slice(),
            m.modified.as_mut_slice(),
            m.update.as_mut_slice(),
        );
        assert_eq!(
            fault,
            crate::monitor::ram::WriteFault::Writable { was_watched: false }
        );
        assert_eq!((m.modified[0], m.tracker.counts()), (0x10000, (5, 1)));
        m.fill(0x40_0000, Access::USER_WRITE).expect("mapped");
        assert_eq!(m.leaf(0x40_0000).map(|e| e & W), Some(W));

        // The page table seen through its own mapping stays read-only, and
        // a write to it hits a page the translation depends on: the client
        // must emulate it (refilling would loop).
        m.fill(0x40_8000, Access::USER_WRITE).expect("mapped");
        assert_eq!(m.leaf(0x40_8000).map(|e| e & W), Some(0));
        let t = translate(
            &m.config,
            &mut m.mem,
            GuestVirt::new(0x40_8000),
            Access::USER_WRITE,
        )
        .expect("ok");
        let d = Derivation::from_walk(&t.path, |g| RamPage::from_offset(g.as_u64(), RAM_PAGES))
            .expect("RAM");
        assert!(d.steps().iter().any(|s| s.page == RamPage::new(4)));

        // The guest kernel (emulated by the client) maps another page in
        // the same table: the client reports the page, the region is
        // dropped, nothing depends on the page any more.
        m.mem.put64(0x4000 + 8, 0x11000 | PWU);
        m.dirty[4] |= ALL_DIRTY & !crate::abi::CODE_DIRTY_FLAG;
        assert!(!m
            .shadow
            .page_modified(RamPage::new(4), &mut m.mem, &mut m.pages));
        assert_eq!(m.leaf(0x40_0000), None);
        m.fill(0x40_1000, Access::USER_READ).expect("the new page");
        assert_eq!(
            m.dirty[4],
            ALL_DIRTY & !crate::monitor::ram::WATCH_FLAG,
            "watched again"
        );
        assert_eq!(m.tracker.counts().0, 6, "the client re-protects it");

        // A second process shares the PDPT: switching back and forth keeps
        // both address spaces.
        m.mem.put64(0x5000, 0x2000 | PWU);
        assert!(!m.switch_to(0x5000));
        m.fill(0x40_1000, Access::USER_READ).expect("mapped in B");
        assert!(m.switch_to(0x1000));
        assert!(m.leaf(0x40_1000).is_some(), "kept across the CR3 switch");

        // An unreported write (DMA) to the page directory, seen when the
        // client asks for a full flush: the changed region goes in every
        // address space; the PD is no longer depended on.
        m.mem.put64(0x3000 + 2 * 8, 0x6000 | PWU);
        m.dirty[3] |= ALL_DIRTY & !crate::abi::CODE_DIRTY_FLAG;
        let dirty = m.dirty.clone();
        let rewatch = m.shadow.revalidate_current(
            |p| crate::monitor::ram::DirtyTracker::written_since_watch(p, dirty.as_slice()),
            &mut m.mem,
            &mut m.pages,
        );
        assert!(rewatch.pages().is_empty());
        assert_eq!(m.leaf(0x40_1000), None);
        assert!(m.switch_to(0x5000));
        assert_eq!(
            m.leaf(0x40_1000),
            None,
            "B's region derived from the same PDE"
        );
        m.shadow.drop_all(&mut m.pages);
    }
}
