//! Guest RAM pages: what backs a guest-physical page, which RAM pages are
//! locked for the shadow tables (under a cap, least recently used first
//! out), and the dirty-byte protocol shared with the client (ABI.md
//! "Constants" and "What each ioctl does").
//!
//! The dirty bytes are the contract that keeps the client's translated
//! code and the monitor's shadow mappings coherent:
//! - a RAM page is mapped writable in a shadow table only while its dirty
//!   byte is [`ALL_DIRTY`]; the first guest write to any other page faults,
//!   and [`DirtyTracker::write_fault`] marks the page dirty, tells the
//!   client (`ram_pages_to_update`), and lists it in `modified_ram_pages`
//!   when the client holds code translated from it (`CODE_DIRTY_FLAG`
//!   clear);
//! - the module clears its own flag, [`WATCH_FLAG`], in the pages it
//!   derives shadow state from (guest page tables, descriptor tables): the
//!   page is then mapped read-only, the client reports its own writes to
//!   it in `modified_ram_pages` (QEMU does so for every write to a page
//!   whose flags `0xfc` are not all set), and a write by any other path
//!   sets the flag again, which [`DirtyTracker::written_since_watch`]
//!   notices.

use core::ops::DerefMut;

use crate::abi::{
    ALL_DIRTY, CODE_DIRTY_FLAG, DESC_DIRTY_FLAG, KQEMU_MAX_MODIFIED_RAM_PAGES,
    KQEMU_MAX_RAM_PAGES_TO_UPDATE, KQEMU_RAM_PAGES_UPDATE_ALL,
};
use crate::host::Host;
use crate::monitor::instance::{PhysKind, PhysMap};
use crate::monitor::mmu::{AccessKind, GuestPhys, GuestVirt, HostPhys, PAGE_SHIFT};
use crate::monitor::shadow::LeafRef;

/// The dirty-byte flag the module keeps for itself (ABI.md reserves 0x04
/// for the module; kqemu called it `KQEMU_DIRTY_FLAG` / `DT_DIRTY_FLAG`).
/// Clear while the module holds state derived from the page's contents.
pub const WATCH_FLAG: u8 = DESC_DIRTY_FLAG;

/// A page of guest RAM, by index: RAM offset / 4096 (kqemu's `ram_addr`
/// >> 12). Guest RAM is at most 64 GiB, so 2^24 pages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RamPage(u32);

impl RamPage {
    /// The page at index `index`.
    pub const fn new(index: u32) -> Self {
        Self(index)
    }

    /// The page that holds RAM offset `offset`, if guest RAM has
    /// `ram_pages` pages. Offsets from the client need not be page aligned
    /// (QEMU reports the byte it wrote).
    pub fn from_offset(offset: u64, ram_pages: u64) -> Option<Self> {
        let index = offset >> PAGE_SHIFT;
        if index >= ram_pages {
            return None;
        }
        u32::try_from(index).ok().map(Self)
    }

    /// The page's index.
    pub const fn index(self) -> u32 {
        self.0
    }

    /// The RAM offset of the page's first byte.
    pub const fn offset(self) -> u64 {
        (self.0 as u64) << PAGE_SHIFT
    }
}

/// What a guest-physical page is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageBacking {
    /// Guest RAM.
    Ram(RamPage),
    /// Guest RAM the guest may only read.
    Rom(RamPage),
    /// The paravirtual communication page.
    Comm,
    /// Nothing: device memory the client emulates.
    Unassigned,
}

/// The client's guest-physical memory map, as `KQEMU_SET_PHYS_MEM` built
/// it.
pub trait GuestPhysMap {
    /// What backs the page holding `addr`.
    fn backing(&self, addr: GuestPhys) -> PageBacking;
}

impl<H: Host> GuestPhysMap for PhysMap<H> {
    fn backing(&self, addr: GuestPhys) -> PageBacking {
        let Some(range) = self.lookup(addr.as_u64()) else {
            return PageBacking::Unassigned;
        };
        // SET_PHYS_MEM checked that RAM and ROM ranges lie inside guest
        // RAM, so the offset fits a RamPage.
        let page = addr
            .page_base()
            .as_u64()
            .checked_sub(range.start)
            .and_then(|delta| range.ram_addr.checked_add(delta))
            .and_then(|offset| u32::try_from(offset >> PAGE_SHIFT).ok())
            .map(RamPage);
        match (range.kind, page) {
            (PhysKind::Ram, Some(page)) => PageBacking::Ram(page),
            (PhysKind::Rom, Some(page)) => PageBacking::Rom(page),
            (PhysKind::Comm, _) => PageBacking::Comm,
            (_, None) => PageBacking::Unassigned,
        }
    }
}

/// A guest RAM page an access may use natively.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NativePage {
    pub page: RamPage,
    /// ROM: mapped read-only whatever the guest's tables say.
    pub read_only: bool,
}

/// The access needs the client: `KQEMU_RET_SOFTMMU` (ABI.md: ROM writes,
/// the communication page and device memory are emulated by the client).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientMustEmulate;

/// Whether an access of `kind` to a page backed by `backing` can run
/// natively.
pub fn native_page(
    backing: PageBacking,
    kind: AccessKind,
) -> Result<NativePage, ClientMustEmulate> {
    match backing {
        PageBacking::Ram(page) => Ok(NativePage {
            page,
            read_only: false,
        }),
        PageBacking::Rom(page) if kind != AccessKind::Write => Ok(NativePage {
            page,
            read_only: true,
        }),
        PageBacking::Rom(_) | PageBacking::Comm | PageBacking::Unassigned => Err(ClientMustEmulate),
    }
}

/// The client's dirty bytes, one per RAM page, in memory the client shares
/// with the module. Other threads of the client may write them at any
/// time, so implementations use single-byte volatile accesses, never
/// references.
pub trait DirtyBytes {
    /// Number of RAM pages (= dirty bytes).
    fn page_count(&self) -> u64;
    /// The page's dirty byte; [`ALL_DIRTY`] for a page beyond RAM.
    fn load(&self, page: RamPage) -> u8;
    /// Sets the page's dirty byte; ignored for a page beyond RAM.
    fn store(&mut self, page: RamPage, value: u8);
}

impl DirtyBytes for [u8] {
    fn page_count(&self) -> u64 {
        self.len() as u64
    }

    fn load(&self, page: RamPage) -> u8 {
        self.get(page.0 as usize).copied().unwrap_or(ALL_DIRTY)
    }

    fn store(&mut self, page: RamPage, value: u8) {
        if let Some(byte) = self.get_mut(page.0 as usize) {
            *byte = value;
        }
    }
}

/// One of the client's list pages (`pages_to_flush`, `ram_pages_to_update`,
/// `modified_ram_pages`): 512 `u64` entries in shared memory, accessed
/// entry by entry for the same reason as [`DirtyBytes`].
pub trait SharedList {
    /// Number of entries (512 for the client's pages).
    fn capacity(&self) -> usize;
    /// Entry `index`; 0 beyond the capacity.
    fn read(&self, index: usize) -> u64;
    /// Sets entry `index`; ignored beyond the capacity.
    fn write(&mut self, index: usize, value: u64);
}

impl SharedList for [u64] {
    fn capacity(&self) -> usize {
        self.len()
    }

    fn read(&self, index: usize) -> u64 {
        self.get(index).copied().unwrap_or(0)
    }

    fn write(&mut self, index: usize, value: u64) {
        if let Some(entry) = self.get_mut(index) {
            *entry = value;
        }
    }
}

/// What a count the client passes on EXEC entry asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Incoming {
    /// The first `n` entries of the list (0..=512).
    Entries(usize),
    /// Everything (`KQEMU_FLUSH_ALL` / `KQEMU_RAM_PAGES_UPDATE_ALL` = 513;
    /// any larger count is treated the same, which is always safe since
    /// dropping derived state never changes what the guest sees).
    All,
}

impl Incoming {
    /// Interprets `count` for a list of `max` entries.
    pub fn from_count(count: u32, max: u32) -> Self {
        if count <= max {
            Self::Entries(count as usize)
        } else {
            Self::All
        }
    }
}

/// The RAM pages named by the first `count` entries of `list` (RAM
/// offsets), skipping entries beyond guest RAM.
pub fn listed_pages<'a, L: SharedList + ?Sized>(
    list: &'a L,
    count: usize,
    ram_pages: u64,
) -> impl Iterator<Item = RamPage> + 'a {
    (0..count.min(list.capacity()))
        .filter_map(move |i| RamPage::from_offset(list.read(i), ram_pages))
}

/// The guest linear addresses named by the first `count` entries of
/// `pages_to_flush` (QEMU passes `target_ulong` values: zero-extended for
/// 32-bit guests, sign-extended for 64-bit ones).
pub fn listed_linear<'a, L: SharedList + ?Sized>(
    list: &'a L,
    count: usize,
) -> impl Iterator<Item = GuestVirt> + 'a {
    (0..count.min(list.capacity())).map(move |i| GuestVirt::new(list.read(i)))
}

/// The outcome of a guest write to a page mapped read-only because of its
/// dirty byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteFault {
    /// The page is dirty now: map it writable and let the guest retry.
    /// `was_watched`: the module had derived state from the page, which is
    /// stale now and must be dropped first.
    Writable { was_watched: bool },
    /// `modified_ram_pages` is full (the page was appended as its last
    /// entry): end the run with `KQEMU_RET_SOFTMMU` so the client empties
    /// it; the client then emulates the write itself.
    ListFull,
}

/// Whether [`DirtyTracker::watch`] changed anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Watch {
    /// The page was watched already.
    Already,
    /// The page is watched now. `was_writable`: its dirty byte was
    /// [`ALL_DIRTY`], so shadow mappings of it may be writable and must be
    /// write-protected.
    Started { was_writable: bool },
}

/// The module → client half of the lists during one EXEC: how many entries
/// of `ram_pages_to_update` and `modified_ram_pages` the module wrote.
/// Created after the client's incoming entries were consumed (the same
/// pages carry both directions).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirtyTracker {
    ram_pages_to_update: u32,
    modified_ram_pages: u32,
}

impl DirtyTracker {
    /// Nothing reported yet.
    pub const fn new() -> Self {
        Self {
            ram_pages_to_update: 0,
            modified_ram_pages: 0,
        }
    }

    /// The counts for the exit: `nb_ram_pages_to_update` (513 when the list
    /// overflowed) and `nb_modified_ram_pages`.
    pub fn counts(&self) -> (u32, u32) {
        (self.ram_pages_to_update, self.modified_ram_pages)
    }

    /// A guest write faulted on `page`, mapped read-only because its dirty
    /// byte is not [`ALL_DIRTY`] (kqemu's monitor did the same steps in its
    /// page-fault handler).
    pub fn write_fault<D, L, U>(
        &mut self,
        page: RamPage,
        dirty: &mut D,
        modified: &mut L,
        update: &mut U,
    ) -> WriteFault
    where
        D: DirtyBytes + ?Sized,
        L: SharedList + ?Sized,
        U: SharedList + ?Sized,
    {
        let byte = dirty.load(page);
        if byte == ALL_DIRTY {
            return WriteFault::Writable { was_watched: false };
        }
        if byte & CODE_DIRTY_FLAG == 0 {
            // The client translated code from the page: it must drop those
            // translations before the guest's write is visible.
            let n = self.modified_ram_pages;
            if n >= KQEMU_MAX_MODIFIED_RAM_PAGES {
                return WriteFault::ListFull;
            }
            modified.write(n as usize, page.offset());
            self.modified_ram_pages = n + 1;
            if self.modified_ram_pages >= KQEMU_MAX_MODIFIED_RAM_PAGES {
                return WriteFault::ListFull;
            }
        }
        dirty.store(page, ALL_DIRTY);
        self.report_update(page, update);
        WriteFault::Writable {
            was_watched: byte & WATCH_FLAG == 0,
        }
    }

    /// Starts watching `page` before deriving shadow state from it. When
    /// the page was fully dirty the client is told (`ram_pages_to_update`)
    /// so that it routes its own writes to the page through its slow path
    /// again, which reports them (kqemu's `ram_reset_dirty`).
    pub fn watch<D, U>(&mut self, page: RamPage, dirty: &mut D, update: &mut U) -> Watch
    where
        D: DirtyBytes + ?Sized,
        U: SharedList + ?Sized,
    {
        let byte = dirty.load(page);
        if byte & WATCH_FLAG == 0 {
            return Watch::Already;
        }
        dirty.store(page, byte & !WATCH_FLAG);
        let was_writable = byte == ALL_DIRTY;
        if was_writable {
            self.report_update(page, update);
        }
        Watch::Started { was_writable }
    }

    /// Whether `page`, once watched, was written by a path that did not go
    /// through the module or the client's report: any write by the client
    /// sets every flag but `CODE_DIRTY_FLAG` again.
    pub fn written_since_watch<D: DirtyBytes + ?Sized>(page: RamPage, dirty: &D) -> bool {
        dirty.load(page) & WATCH_FLAG != 0
    }

    fn report_update<U: SharedList + ?Sized>(&mut self, page: RamPage, update: &mut U) {
        let n = self.ram_pages_to_update;
        if n < KQEMU_MAX_RAM_PAGES_TO_UPDATE {
            update.write(n as usize, page.offset());
            self.ram_pages_to_update = n + 1;
        } else {
            // Full: the client then rescans all its mappings, as it does for
            // its own overflow (QEMU's kqemu_set_notdirty).
            self.ram_pages_to_update = KQEMU_RAM_PAGES_UPDATE_ALL;
        }
    }
}

/// What the host handed out for a locked RAM page (a held user page on
/// FreeBSD): the cache keeps it and gives it back on eviction.
pub trait LockedFrame: Copy {
    /// The page's host-physical address.
    fn host_phys(&self) -> HostPhys;
}

/// Most shadow leaves remembered per locked page. Pages are seldom mapped
/// at more than two linear addresses; beyond, eviction falls back to a
/// scan of all shadow leaves.
pub const RMAP_HINTS: usize = 2;

/// Shadow leaves that may map a page (each still to be checked against the
/// page's frame: a leaf can have been reused since).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mappings {
    hints: [LeafRef; RMAP_HINTS],
    len: u8,
    /// More leaves than hints were recorded: only a full scan finds them all.
    pub overflow: bool,
}

impl Mappings {
    /// The recorded leaves.
    pub fn hints(&self) -> &[LeafRef] {
        &self.hints[..usize::from(self.len).min(RMAP_HINTS)]
    }

    fn add(&mut self, leaf: LeafRef) {
        if self.hints().contains(&leaf) {
            return;
        }
        match self.hints.get_mut(usize::from(self.len)) {
            Some(slot) => {
                *slot = leaf;
                self.len += 1;
            }
            None => self.overflow = true,
        }
    }
}

/// One slot of the locked-page cache. Links are slot index + 1, so that
/// zeroed memory is an empty cache.
#[derive(Clone, Copy, Debug, Default)]
pub struct LockedSlot<T> {
    frame: T,
    page: RamPage,
    used: bool,
    lru_prev: u32,
    lru_next: u32,
    hash_next: u32,
    mappings: Mappings,
}

/// A page leaving the cache. Its frame may be released to the host only
/// after every shadow leaf that maps it is cleared (`mappings`, or a full
/// scan when they overflowed): the guest would otherwise keep access to a
/// host page that is no longer its own.
#[derive(Clone, Copy, Debug)]
pub struct Unlocked<T> {
    pub page: RamPage,
    pub frame: T,
    pub mappings: Mappings,
}

/// Fewest pages the cache holds: one shadow fill uses at most four page
/// tables, a data page and two descriptor pages, all most recently used, so
/// eviction never takes one of them in the middle of a fill.
pub const MIN_LOCKED_PAGES: usize = 16;

/// Holds an instance may have besides its list pages, dirty-byte pages
/// and locked-page cache: the page `Monitor::lock` holds before the
/// cache evicts for it, or the one a guest-table walk holds for a single
/// access when the cache does not have it (never both at once).
pub const TRANSIENT_HOLDS: usize = 1;

/// How far past the pages it has locked an instance's cache may grow
/// before it asks the module-wide budget again (once per EXEC): small
/// enough that an idle instance does not sit on the budget, large enough
/// that a guest filling its cache asks only every few EXECs.
pub const LOCK_GROW_STEP: usize = 512;

/// The INIT reservation was refused: the numbers for the log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BudgetRefused {
    /// Pages the instance needs at least.
    pub needed: usize,
    /// Pages promised to other instances already.
    pub promised: usize,
    /// The module-wide limit.
    pub max: usize,
}

/// One instance's share of the module-wide
/// [`LockBudget`](crate::host::LockBudget): the minimum
/// reserved by INIT, plus what its locked-page cache was granted beyond
/// [`MIN_LOCKED_PAGES`]. Given back on drop (close).
///
/// The instance never holds more than its share: its fixed holds and
/// [`MIN_LOCKED_PAGES`] + [`TRANSIENT_HOLDS`] are in the reservation, and
/// its cache's cap is [`MIN_LOCKED_PAGES`] + the grant. All shares
/// together stay within the host's limit, so the module's held pages do.
pub struct LockShare<H: Host> {
    host: H,
    reserved: usize,
    granted: usize,
}

impl<H: Host> LockShare<H> {
    /// Reserves `fixed` pages (held for the instance's whole life) plus
    /// the cache's minimum and the transient holds.
    pub fn reserve(host: &H, fixed: usize) -> Result<Self, BudgetRefused> {
        let needed = fixed
            .saturating_add(MIN_LOCKED_PAGES)
            .saturating_add(TRANSIENT_HOLDS);
        let max = host.max_locked_pages();
        host.lock_budget()
            .reserve(needed, max)
            .map_err(|promised| BudgetRefused {
                needed,
                promised,
                max,
            })?;
        Ok(Self {
            host: host.clone(),
            reserved: needed,
            granted: 0,
        })
    }

    /// Pages the share covers now.
    pub fn pages(&self) -> usize {
        self.reserved + self.granted
    }

    /// The cap of the locked-page cache for the next EXEC, given that
    /// `locked` pages are locked now and the cache takes at most `slots`.
    /// Past the limit (lowered by the administrator) the grant is given
    /// back down to the reservation: the caller then unlocks its least
    /// recently used pages, the guest runs on. Otherwise the cap grows to
    /// `locked` + [`LOCK_GROW_STEP`] as far as the budget allows.
    pub fn next_cap(&mut self, locked: usize, slots: usize) -> usize {
        let budget = self.host.lock_budget();
        let max = self.host.max_locked_pages();
        let over = budget.promised().saturating_sub(max);
        if over > 0 {
            let back = over.min(self.granted);
            budget.release(back);
            self.granted -= back;
        } else {
            let want = locked
                .saturating_add(LOCK_GROW_STEP)
                .min(slots.max(MIN_LOCKED_PAGES))
                .saturating_sub(MIN_LOCKED_PAGES);
            if want > self.granted {
                self.granted += budget.grant_up_to(want - self.granted, max);
            } else {
                // More room than a step (the cache was emptied when the
                // caches were rebuilt after a map change): give it back.
                budget.release(self.granted - want);
                self.granted = want;
            }
        }
        MIN_LOCKED_PAGES + self.granted
    }
}

impl<H: Host> Drop for LockShare<H> {
    fn drop(&mut self) {
        self.host.lock_budget().release(self.pages());
    }
}

/// Why a cache cannot be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheConfigError {
    /// Fewer than [`MIN_LOCKED_PAGES`] slots, or more than 2^31.
    Slots,
    /// The bucket count is not a power of two.
    Buckets,
}

/// The RAM pages currently locked, with their host frames: a hash table
/// over fixed storage, in least-recently-used order, holding at most `cap`
/// pages.
pub struct LockedPages<T, S, B>
where
    S: DerefMut<Target = [LockedSlot<T>]>,
    B: DerefMut<Target = [u32]>,
{
    slots: S,
    buckets: B,
    cap: usize,
    len: usize,
    /// Slots below this index have been used; above, never.
    high_water: usize,
    /// Free slots (+1), chained through `hash_next`.
    free: u32,
    /// Most recently used (+1).
    lru_head: u32,
    /// Least recently used (+1).
    lru_tail: u32,
}

impl<T, S, B> LockedPages<T, S, B>
where
    T: LockedFrame,
    S: DerefMut<Target = [LockedSlot<T>]>,
    B: DerefMut<Target = [u32]>,
{
    /// An empty cache over `slots` and `buckets` (a power of two), holding
    /// at most `cap` pages (clamped to the slots).
    pub fn new(mut slots: S, mut buckets: B, cap: usize) -> Result<Self, CacheConfigError> {
        if slots.len() < MIN_LOCKED_PAGES || slots.len() > (1 << 31) {
            return Err(CacheConfigError::Slots);
        }
        if !buckets.len().is_power_of_two() {
            return Err(CacheConfigError::Buckets);
        }
        for slot in slots.iter_mut() {
            slot.used = false;
        }
        buckets.fill(0);
        let cap = cap.clamp(MIN_LOCKED_PAGES, slots.len());
        Ok(Self {
            slots,
            buckets,
            cap,
            len: 0,
            high_water: 0,
            free: 0,
            lru_head: 0,
            lru_tail: 0,
        })
    }

    /// Pages locked now.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no page is locked.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The most pages the cache keeps.
    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Changes the cap (clamped like in `new`); [`Self::shrink`] then
    /// unlocks the excess.
    pub fn set_cap(&mut self, cap: usize) {
        self.cap = cap.clamp(MIN_LOCKED_PAGES, self.slots.len());
    }

    fn bucket_of(&self, page: RamPage) -> usize {
        // Fibonacci hashing; the bucket count is a power of two.
        let h = page.0.wrapping_mul(0x9e37_79b9);
        (h as usize >> 8) & (self.buckets.len() - 1)
    }

    fn find(&self, page: RamPage) -> Option<usize> {
        let mut link = self.buckets[self.bucket_of(page)];
        // A chain holds each used slot at most once.
        for _ in 0..self.high_water {
            let i = link.checked_sub(1)? as usize;
            let slot = self.slots.get(i)?;
            if slot.used && slot.page == page {
                return Some(i);
            }
            link = slot.hash_next;
        }
        None
    }

    /// Whether `page` is locked (no change to the LRU order).
    pub fn contains(&self, page: RamPage) -> bool {
        self.find(page).is_some()
    }

    /// The frame of `page` if locked, which becomes the most recently used.
    pub fn lookup(&mut self, page: RamPage) -> Option<T> {
        let i = self.find(page)?;
        self.lru_unlink(i);
        self.lru_push_front(i);
        Some(self.slots[i].frame)
    }

    /// Remembers that shadow leaf `leaf` maps `page` (locked).
    pub fn add_mapping(&mut self, page: RamPage, leaf: LeafRef) {
        if let Some(i) = self.find(page) {
            self.slots[i].mappings.add(leaf);
        }
    }

    /// Records `page`, just locked as `frame`, as the most recently used.
    /// When the cache is at its cap, the least recently used page goes to
    /// `unlock` first. A page already present is not recorded twice: `Err`
    /// gives `frame` back to the caller to release.
    pub fn insert(
        &mut self,
        page: RamPage,
        frame: T,
        mut unlock: impl FnMut(Unlocked<T>),
    ) -> Result<(), T> {
        if self.contains(page) {
            return Err(frame);
        }
        if self.len >= self.cap {
            if let Some(old) = self.pop_lru() {
                unlock(old);
            }
        }
        let Some(i) = self.take_free_slot() else {
            return Err(frame);
        };
        let bucket = self.bucket_of(page);
        self.slots[i] = LockedSlot {
            frame,
            page,
            used: true,
            lru_prev: 0,
            lru_next: 0,
            hash_next: self.buckets[bucket],
            mappings: Mappings::default(),
        };
        self.buckets[bucket] = i as u32 + 1;
        self.lru_push_front(i);
        self.len += 1;
        Ok(())
    }

    /// Unlocks `page` if locked.
    pub fn remove(&mut self, page: RamPage) -> Option<Unlocked<T>> {
        let i = self.find(page)?;
        Some(self.release_slot(i))
    }

    /// Unlocks least recently used pages while more than the cap are
    /// locked, at most `budget` of them (the caller bounds the work done in
    /// one go). Returns how many were unlocked.
    pub fn shrink(&mut self, budget: usize, mut unlock: impl FnMut(Unlocked<T>)) -> usize {
        let mut done = 0;
        while done < budget && self.len > self.cap {
            let Some(old) = self.pop_lru() else { break };
            unlock(old);
            done += 1;
        }
        done
    }

    /// Unlocks everything (teardown).
    pub fn clear(&mut self, mut unlock: impl FnMut(Unlocked<T>)) {
        for _ in 0..self.slots.len() {
            let Some(old) = self.pop_lru() else { break };
            unlock(old);
        }
    }

    fn pop_lru(&mut self) -> Option<Unlocked<T>> {
        let i = self.lru_tail.checked_sub(1)? as usize;
        Some(self.release_slot(i))
    }

    fn take_free_slot(&mut self) -> Option<usize> {
        if let Some(i) = self.free.checked_sub(1) {
            self.free = self.slots[i as usize].hash_next;
            return Some(i as usize);
        }
        if self.high_water < self.slots.len() {
            self.high_water += 1;
            return Some(self.high_water - 1);
        }
        None
    }

    fn release_slot(&mut self, i: usize) -> Unlocked<T> {
        self.lru_unlink(i);
        self.hash_unlink(i);
        let slot = &mut self.slots[i];
        slot.used = false;
        let out = Unlocked {
            page: slot.page,
            frame: slot.frame,
            mappings: slot.mappings,
        };
        slot.hash_next = self.free;
        self.free = i as u32 + 1;
        self.len -= 1;
        out
    }

    fn hash_unlink(&mut self, i: usize) {
        let bucket = self.bucket_of(self.slots[i].page);
        let target = i as u32 + 1;
        let next = self.slots[i].hash_next;
        if self.buckets[bucket] == target {
            self.buckets[bucket] = next;
            return;
        }
        let mut link = self.buckets[bucket];
        for _ in 0..self.high_water {
            let Some(j) = link.checked_sub(1).map(|j| j as usize) else {
                return;
            };
            if self.slots[j].hash_next == target {
                self.slots[j].hash_next = next;
                return;
            }
            link = self.slots[j].hash_next;
        }
    }

    fn lru_unlink(&mut self, i: usize) {
        let (prev, next) = (self.slots[i].lru_prev, self.slots[i].lru_next);
        match prev.checked_sub(1) {
            Some(p) => self.slots[p as usize].lru_next = next,
            None => self.lru_head = next,
        }
        match next.checked_sub(1) {
            Some(n) => self.slots[n as usize].lru_prev = prev,
            None => self.lru_tail = prev,
        }
        self.slots[i].lru_prev = 0;
        self.slots[i].lru_next = 0;
    }

    fn lru_push_front(&mut self, i: usize) {
        let link = i as u32 + 1;
        self.slots[i].lru_prev = 0;
        self.slots[i].lru_next = self.lru_head;
        match self.lru_head.checked_sub(1) {
            Some(h) => self.slots[h as usize].lru_prev = link,
            None => self.lru_tail = link,
        }
        self.lru_head = link;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::VGA_DIRTY_FLAG;
    use crate::host::mock::MockHost;
    use std::vec;
    use std::vec::Vec;

    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    struct Frame(u64);

    impl LockedFrame for Frame {
        fn host_phys(&self) -> HostPhys {
            HostPhys::new(self.0)
        }
    }

    type Cache = LockedPages<Frame, Vec<LockedSlot<Frame>>, Vec<u32>>;

    fn cache(slots: usize, cap: usize) -> Cache {
        LockedPages::new(vec![LockedSlot::default(); slots], vec![0; 8], cap).expect("valid cache")
    }

    fn no_unlock(u: Unlocked<Frame>) {
        panic!("unexpected unlock of {u:?}");
    }

    #[test]
    fn ram_page_offsets() {
        assert_eq!(RamPage::from_offset(0x3fff, 4), Some(RamPage::new(3)));
        assert_eq!(RamPage::from_offset(0x4000, 4), None);
        assert_eq!(
            RamPage::from_offset(u64::MAX, u64::MAX),
            None,
            "index beyond u32"
        );
        assert_eq!(RamPage::new(5).offset(), 0x5000);
    }

    #[test]
    fn backing_from_the_instance_map() {
        let host = MockHost::default();
        let mut map = PhysMap::new(&host).expect("memory");
        map.set(0, 0xa_0000, Some((PhysKind::Ram, 0))).expect("RAM");
        map.set(0xc_0000, 0xd_0000, Some((PhysKind::Rom, 0x20_0000)))
            .expect("ROM");
        map.set(0xff00_0000, 0xff00_1000, Some((PhysKind::Comm, 0)))
            .expect("comm");
        assert_eq!(
            map.backing(GuestPhys::new(0x9_f123)),
            PageBacking::Ram(RamPage::new(0x9f))
        );
        assert_eq!(
            map.backing(GuestPhys::new(0xc_1fff)),
            PageBacking::Rom(RamPage::new(0x201))
        );
        assert_eq!(map.backing(GuestPhys::new(0xff00_0004)), PageBacking::Comm);
        assert_eq!(
            map.backing(GuestPhys::new(0xa_0000)),
            PageBacking::Unassigned
        );
    }

    #[test]
    fn which_accesses_run_natively() {
        let page = RamPage::new(7);
        for kind in [AccessKind::Read, AccessKind::Write, AccessKind::Fetch] {
            assert_eq!(
                native_page(PageBacking::Ram(page), kind),
                Ok(NativePage {
                    page,
                    read_only: false
                })
            );
            assert_eq!(native_page(PageBacking::Comm, kind), Err(ClientMustEmulate));
            assert_eq!(
                native_page(PageBacking::Unassigned, kind),
                Err(ClientMustEmulate)
            );
        }
        assert_eq!(
            native_page(PageBacking::Rom(page), AccessKind::Read),
            Ok(NativePage {
                page,
                read_only: true
            })
        );
        assert_eq!(
            native_page(PageBacking::Rom(page), AccessKind::Fetch),
            Ok(NativePage {
                page,
                read_only: true
            })
        );
        assert_eq!(
            native_page(PageBacking::Rom(page), AccessKind::Write),
            Err(ClientMustEmulate)
        );
    }

    #[test]
    fn incoming_counts() {
        assert_eq!(Incoming::from_count(0, 512), Incoming::Entries(0));
        assert_eq!(Incoming::from_count(512, 512), Incoming::Entries(512));
        assert_eq!(Incoming::from_count(513, 512), Incoming::All);
        assert_eq!(Incoming::from_count(u32::MAX, 512), Incoming::All);
        let list: Vec<u64> = vec![0x1000, 0x2fff, 0x10_0000, 0x3000];
        let pages: Vec<RamPage> = listed_pages(list.as_slice(), 4, 16).collect();
        assert_eq!(
            pages,
            [RamPage::new(1), RamPage::new(2), RamPage::new(3)],
            "the entry beyond RAM is skipped"
        );
        assert_eq!(
            listed_pages(list.as_slice(), 100, 16).count(),
            3,
            "count bounded by the list"
        );
    }

    struct Lists {
        dirty: Vec<u8>,
        modified: Vec<u64>,
        update: Vec<u64>,
    }

    fn lists(pages: usize) -> Lists {
        Lists {
            dirty: vec![ALL_DIRTY; pages],
            modified: vec![0; 512],
            update: vec![0; 512],
        }
    }

    #[test]
    fn write_fault_on_a_clean_page() {
        let mut l = lists(8);
        let mut t = DirtyTracker::new();
        let page = RamPage::new(3);
        // VGA has not seen the page, code was not translated from it.
        l.dirty[3] = ALL_DIRTY & !VGA_DIRTY_FLAG;
        let r = t.write_fault(
            page,
            l.dirty.as_mut_slice(),
            l.modified.as_mut_slice(),
            l.update.as_mut_slice(),
        );
        assert_eq!(r, WriteFault::Writable { was_watched: false });
        assert_eq!(l.dirty[3], ALL_DIRTY);
        assert_eq!(t.counts(), (1, 0));
        assert_eq!(l.update[0], 0x3000);
        // A second fault on the now dirty page changes nothing.
        let r = t.write_fault(
            page,
            l.dirty.as_mut_slice(),
            l.modified.as_mut_slice(),
            l.update.as_mut_slice(),
        );
        assert_eq!(r, WriteFault::Writable { was_watched: false });
        assert_eq!(t.counts(), (1, 0));
    }

    #[test]
    fn write_fault_on_a_code_page_reports_it() {
        let mut l = lists(8);
        let mut t = DirtyTracker::new();
        l.dirty[5] = ALL_DIRTY & !CODE_DIRTY_FLAG;
        let r = t.write_fault(
            RamPage::new(5),
            l.dirty.as_mut_slice(),
            l.modified.as_mut_slice(),
            l.update.as_mut_slice(),
        );
        assert_eq!(r, WriteFault::Writable { was_watched: false });
        assert_eq!(
            (l.modified[0], l.update[0], l.dirty[5]),
            (0x5000, 0x5000, ALL_DIRTY)
        );
        assert_eq!(t.counts(), (1, 1));
    }

    #[test]
    fn write_fault_on_a_watched_page() {
        let mut l = lists(8);
        let mut t = DirtyTracker::new();
        let page = RamPage::new(2);
        assert_eq!(
            t.watch(page, l.dirty.as_mut_slice(), l.update.as_mut_slice()),
            Watch::Started { was_writable: true }
        );
        assert_eq!(l.dirty[2], ALL_DIRTY & !WATCH_FLAG);
        assert_eq!(
            (t.counts(), l.update[0]),
            ((1, 0), 0x2000),
            "the client must re-protect the page"
        );
        assert_eq!(
            t.watch(page, l.dirty.as_mut_slice(), l.update.as_mut_slice()),
            Watch::Already
        );
        assert!(!DirtyTracker::written_since_watch(page, l.dirty.as_slice()));
        let r = t.write_fault(
            page,
            l.dirty.as_mut_slice(),
            l.modified.as_mut_slice(),
            l.update.as_mut_slice(),
        );
        assert_eq!(r, WriteFault::Writable { was_watched: true });
        assert_eq!(l.dirty[2], ALL_DIRTY);
        // Watching a page that is not fully dirty needs no report.
        l.dirty[4] = ALL_DIRTY & !VGA_DIRTY_FLAG;
        let before = t.counts();
        let w = t.watch(
            RamPage::new(4),
            l.dirty.as_mut_slice(),
            l.update.as_mut_slice(),
        );
        assert_eq!(
            w,
            Watch::Started {
                was_writable: false
            }
        );
        assert_eq!(t.counts(), before);
        // A client write (QEMU sets every flag but CODE) is noticed.
        l.dirty[4] |= ALL_DIRTY & !CODE_DIRTY_FLAG;
        assert!(DirtyTracker::written_since_watch(
            RamPage::new(4),
            l.dirty.as_slice()
        ));
    }

    #[test]
    fn modified_list_full_ends_the_run() {
        let pages = 600;
        let mut l = lists(pages);
        for b in l.dirty.iter_mut() {
            *b = 0;
        }
        let mut t = DirtyTracker::new();
        for i in 0..511u32 {
            let r = t.write_fault(
                RamPage::new(i),
                l.dirty.as_mut_slice(),
                l.modified.as_mut_slice(),
                l.update.as_mut_slice(),
            );
            assert_eq!(r, WriteFault::Writable { was_watched: true }, "page {i}");
        }
        assert_eq!(t.counts(), (511, 511));
        // The 512th code page fills the list: it is listed, left clean, and
        // the run must end.
        let r = t.write_fault(
            RamPage::new(511),
            l.dirty.as_mut_slice(),
            l.modified.as_mut_slice(),
            l.update.as_mut_slice(),
        );
        assert_eq!(r, WriteFault::ListFull);
        assert_eq!(l.modified[511], 511 << 12);
        assert_eq!(l.dirty[511], 0);
        assert_eq!(t.counts(), (511, 512));
        // Nothing more is appended past the end.
        let r = t.write_fault(
            RamPage::new(512),
            l.dirty.as_mut_slice(),
            l.modified.as_mut_slice(),
            l.update.as_mut_slice(),
        );
        assert_eq!(r, WriteFault::ListFull);
        assert_eq!(t.counts().1, 512);
        // Pages without translated code are still handled natively; the
        // update list takes a 512th entry, then turns into "update all".
        for (page, want) in [
            (513, 512),
            (514, KQEMU_RAM_PAGES_UPDATE_ALL),
            (515, KQEMU_RAM_PAGES_UPDATE_ALL),
        ] {
            l.dirty[page] = CODE_DIRTY_FLAG;
            let r = t.write_fault(
                RamPage::new(page as u32),
                l.dirty.as_mut_slice(),
                l.modified.as_mut_slice(),
                l.update.as_mut_slice(),
            );
            assert_eq!(r, WriteFault::Writable { was_watched: true });
            assert_eq!(t.counts(), (want, 512));
        }
        assert_eq!(l.update[511], 513 << 12);
    }

    #[test]
    fn dirty_bytes_beyond_ram_are_harmless() {
        let mut bytes = vec![0u8; 2];
        let d: &mut [u8] = bytes.as_mut_slice();
        assert_eq!(d.load(RamPage::new(9)), ALL_DIRTY);
        d.store(RamPage::new(9), 0);
        assert_eq!(d.page_count(), 2);
        let mut list = vec![0u64; 2];
        let l: &mut [u64] = list.as_mut_slice();
        l.write(5, 1);
        assert_eq!(l.read(5), 0);
    }

    #[test]
    fn cache_lookup_and_lru_eviction() {
        let mut c = cache(32, 16);
        for i in 0..16u32 {
            c.insert(RamPage::new(i), Frame(0x1000 * u64::from(i)), no_unlock)
                .expect("room");
        }
        assert_eq!(c.len(), 16);
        // Touch page 0: page 1 is now the least recently used.
        assert_eq!(c.lookup(RamPage::new(0)), Some(Frame(0)));
        let mut unlocked = Vec::new();
        c.insert(RamPage::new(100), Frame(0x64_000), |u| {
            unlocked.push(u.page)
        })
        .expect("evicts");
        assert_eq!(unlocked, [RamPage::new(1)]);
        assert!(
            !c.contains(RamPage::new(1))
                && c.contains(RamPage::new(0))
                && c.contains(RamPage::new(100))
        );
        assert_eq!(c.len(), 16);
        // Duplicates are refused, with the frame handed back.
        assert_eq!(
            c.insert(RamPage::new(100), Frame(9), no_unlock),
            Err(Frame(9))
        );
        assert_eq!(c.lookup(RamPage::new(100)), Some(Frame(0x64_000)));
    }

    #[test]
    fn cache_shrink_is_bounded_and_lru_first() {
        let mut c = cache(64, 64);
        for i in 0..40u32 {
            c.insert(RamPage::new(i), Frame(u64::from(i)), no_unlock)
                .expect("room");
        }
        c.lookup(RamPage::new(0));
        c.set_cap(20);
        let mut unlocked = Vec::new();
        assert_eq!(c.shrink(5, |u| unlocked.push(u.page.index())), 5);
        assert_eq!(unlocked, [1, 2, 3, 4, 5]);
        assert_eq!(c.shrink(100, |u| unlocked.push(u.page.index())), 15);
        assert_eq!(c.len(), 20);
        assert!(c.contains(RamPage::new(0)), "recently used page kept");
        assert_eq!(c.shrink(100, no_unlock), 0);
        // The cap never goes below the minimum.
        c.set_cap(1);
        assert_eq!(c.cap(), MIN_LOCKED_PAGES);
        let mut all = 0;
        c.clear(|_| all += 1);
        assert_eq!((all, c.len()), (20, 0));
        assert!(c.is_empty());
    }

    #[test]
    fn cache_reuses_slots_and_keeps_mappings() {
        let mut c = cache(16, 16);
        let leaf = |n| LeafRef::new(n, 7);
        for round in 0..5u32 {
            for i in 0..16u32 {
                c.insert(RamPage::new(round * 100 + i), Frame(u64::from(i)), |_| {})
                    .expect("room");
            }
        }
        assert_eq!(c.len(), 16);
        let page = RamPage::new(401);
        c.add_mapping(page, leaf(1));
        c.add_mapping(page, leaf(1));
        c.add_mapping(page, leaf(2));
        let u = c.remove(page).expect("locked");
        assert_eq!(u.mappings.hints(), [leaf(1), leaf(2)]);
        assert!(!u.mappings.overflow);
        assert_eq!(c.remove(page).map(|u| u.page), None);
        let page = RamPage::new(402);
        for n in 1..=3 {
            c.add_mapping(page, leaf(n));
        }
        let u = c.remove(page).expect("locked");
        assert!(u.mappings.overflow, "a third leaf overflows the hints");
        // Pages that collide in the same bucket are all found.
        for i in 0..14u32 {
            assert!(
                c.contains(RamPage::new(400 + i)) != (i == 1 || i == 2),
                "page {}",
                400 + i
            );
        }
    }

    #[test]
    fn cache_rejects_bad_storage() {
        assert_eq!(
            LockedPages::<Frame, _, _>::new(vec![LockedSlot::default(); 8], vec![0u32; 8], 8).err(),
            Some(CacheConfigError::Slots)
        );
        assert_eq!(
            LockedPages::<Frame, _, _>::new(vec![LockedSlot::default(); 16], vec![0u32; 6], 8)
                .err(),
            Some(CacheConfigError::Buckets)
        );
    }

    #[test]
    fn lock_shares_stay_within_the_limit() {
        let host = MockHost::default();
        host.state().max_locked = Some(1000);
        let fixed = 7;
        let reserved = fixed + MIN_LOCKED_PAGES + TRANSIENT_HOLDS;
        let mut a = LockShare::reserve(&host, fixed).expect("fits");
        assert_eq!(a.pages(), reserved);
        // The cap runs one step ahead of what is locked.
        assert_eq!(a.next_cap(0, 8192), LOCK_GROW_STEP);
        assert_eq!(a.next_cap(100, 8192), 100 + LOCK_GROW_STEP);
        // Growth stops at the limit: 1000 - 24 reserved = 976 granted.
        assert_eq!(a.next_cap(512, 8192), MIN_LOCKED_PAGES + 976);
        assert_eq!(host.lock_budget().promised(), 1000);
        assert_eq!(
            LockShare::reserve(&host, fixed).err(),
            Some(BudgetRefused {
                needed: reserved,
                promised: 1000,
                max: 1000
            })
        );
        // The administrator lowers the limit: the grant shrinks to fit.
        host.state().max_locked = Some(600);
        assert_eq!(a.next_cap(992, 8192), MIN_LOCKED_PAGES + 576);
        assert_eq!(host.lock_budget().promised(), 600);
        assert_eq!(a.next_cap(592, 8192), MIN_LOCKED_PAGES + 576, "no room");
        // Below the reservation it cannot go: the cache keeps its minimum.
        host.state().max_locked = Some(10);
        assert_eq!(a.next_cap(592, 8192), MIN_LOCKED_PAGES);
        assert_eq!(a.pages(), reserved);
        // Room again; a cache that was emptied gives back all but a step,
        // and the slots bound the cap.
        host.state().max_locked = Some(100_000);
        assert_eq!(a.next_cap(5000, 8192), 5000 + LOCK_GROW_STEP);
        assert_eq!(a.next_cap(0, 8192), LOCK_GROW_STEP);
        assert_eq!(a.next_cap(8000, 8192), 8192);
        let b = LockShare::reserve(&host, 0).expect("fits");
        assert_eq!(
            host.lock_budget().promised(),
            reserved + (8192 - MIN_LOCKED_PAGES) + b.pages()
        );
        drop(a);
        drop(b);
        assert_eq!(host.lock_budget().promised(), 0);
    }

    /// Model check: random inserts, lookups and removals against a simple
    /// LRU list.
    #[test]
    fn cache_matches_an_lru_model() {
        let mut c = cache(24, 20);
        let mut model: Vec<u32> = Vec::new(); // most recent last
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..5000 {
            let page = next(60) as u32;
            match next(3) {
                0 => {
                    let mut unlocked = Vec::new();
                    let r = c.insert(RamPage::new(page), Frame(u64::from(page)), |u| {
                        unlocked.push(u.page.index())
                    });
                    if model.contains(&page) {
                        assert!(r.is_err());
                    } else {
                        if model.len() == 20 {
                            assert_eq!(unlocked, [model.remove(0)]);
                        }
                        model.push(page);
                    }
                }
                1 => {
                    let got = c.lookup(RamPage::new(page));
                    if let Some(pos) = model.iter().position(|&p| p == page) {
                        assert_eq!(got, Some(Frame(u64::from(page))));
                        model.remove(pos);
                        model.push(page);
                    } else {
                        assert_eq!(got, None);
                    }
                }
                _ => {
                    let got = c.remove(RamPage::new(page)).map(|u| u.frame);
                    let pos = model.iter().position(|&p| p == page);
                    assert_eq!(got.is_some(), pos.is_some());
                    if let Some(pos) = pos {
                        model.remove(pos);
                    }
                }
            }
            assert_eq!(c.len(), model.len());
        }
    }
}
