//! `trait Host`: everything the OS-independent code asks of the kernel.
//!
//! The kld implements it with FreeBSD's KPI (src/freebsd); the unit tests
//! with a mock. The types below own what the host hands out (memory, held
//! user pages) and give it back on drop, so no error path can leak.

use core::alloc::Layout;
use core::fmt;
use core::marker::PhantomData;
use core::mem::{align_of, size_of};
use core::ops::{Deref, DerefMut};
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::error::{Error, Result};

/// Size of a host page (amd64 `PAGE_SIZE`).
pub const PAGE_SIZE: u64 = 4096;

/// A page of the calling process, held in memory by [`Host::hold_user_page`]:
/// it stays resident at `phys` until released, whatever the process does
/// with its mapping. A token: copying it does not hold the page twice.
#[derive(Clone, Copy, Debug)]
pub struct HeldUserPage {
    /// Page-aligned user address in the caller's address space.
    pub user_addr: u64,
    /// Physical address of the page.
    pub phys: u64,
    /// The page's kernel mapping (the direct map on FreeBSD amd64).
    pub kernel: NonNull<u8>,
    /// The host's own handle for the release (a `vm_page_t` on FreeBSD).
    pub cookie: usize,
}

/// Most map entries whose identity is recorded for one user range
/// ([`Host::user_range_backing`]); a range over more is checked the slow
/// way, at every change of the map. QEMU maps its guest RAM, dirty bytes
/// and list pages with one mmap each, so one entry per range is usual.
pub const MAX_BACKING_PIECES: usize = 8;

/// One part of a user range and the mapping behind it: the memory object
/// (compared only, never followed) and the offset in it of `start`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapPiece {
    pub start: u64,
    pub end: u64,
    pub object: usize,
    pub offset: u64,
}

/// The identity of the memory behind a user range: while it stays equal,
/// pages held from the range are still the ones the process sees there.
/// Unused pieces stay zero, so the derived equality compares the used
/// ones.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RangeBacking {
    pieces: [MapPiece; MAX_BACKING_PIECES],
    len: usize,
}

impl RangeBacking {
    /// A backing of `pieces`, first to last; `None` past
    /// [`MAX_BACKING_PIECES`].
    pub fn new(pieces: &[MapPiece]) -> Option<Self> {
        let mut b = Self::default();
        b.pieces.get_mut(..pieces.len())?.copy_from_slice(pieces);
        b.len = pieces.len();
        Some(b)
    }

    /// The pieces, first to last.
    pub fn pieces(&self) -> &[MapPiece] {
        &self.pieces[..self.len]
    }
}

/// The module-wide books of locked user pages, shared by every instance
/// (FreeBSD: held pages are wirings that `vm.max_user_wired` does not
/// count, so the module bounds them itself, FREEBSD.md "Memory").
///
/// `promised` is what instances may hold: each one's reservation (taken
/// by INIT) plus the growth of its locked-page cache granted since; it
/// never passes the host's limit (only a lowered limit leaves it above,
/// until the instances give back). `held` is what the host's
/// `hold_user_page` holds right now, for the administrator's view.
/// `repr(C)` and `u32`: the kld's sysctl reads `held` as a `u_int`.
/// `promised` is 64-bit so that no sum of requests can wrap it.
#[repr(C)]
#[derive(Debug, Default)]
pub struct LockBudget {
    held: AtomicU32,
    promised: AtomicU64,
}

/// Compare-and-swap attempts of [`LockBudget::reserve`] and
/// [`LockBudget::grant_up_to`] before they refuse: each failed attempt
/// means another instance changed the books meanwhile, so the loop is
/// bounded by contention, never by a guest.
const BUDGET_TRIES: usize = 8;

/// Offset of `held` in [`LockBudget`]: the kld's C shim names it as the
/// first `u_int` of the structure.
pub const LOCK_BUDGET_HELD_OFFSET: usize = core::mem::offset_of!(LockBudget, held);

impl LockBudget {
    /// Empty books.
    pub const fn new() -> Self {
        Self {
            held: AtomicU32::new(0),
            promised: AtomicU64::new(0),
        }
    }

    /// Pages held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed) as usize
    }

    /// Pages promised to instances now.
    pub fn promised(&self) -> usize {
        self.promised.load(Ordering::Acquire) as usize
    }

    /// Books one page held by the host.
    pub fn note_hold(&self) {
        self.held.fetch_add(1, Ordering::Relaxed);
    }

    /// Books one page released by the host.
    pub fn note_release(&self) {
        self.held.fetch_sub(1, Ordering::Relaxed);
    }

    /// Promises `pages` more if the total stays within `max`; otherwise
    /// nothing, and `Err` carries what was promised already. The total is
    /// only ever stored when it fits, so a concurrent caller never sees
    /// a transient excess; after [`BUDGET_TRIES`] lost races the request
    /// is refused rather than retried forever.
    pub fn reserve(&self, pages: usize, max: usize) -> core::result::Result<(), usize> {
        let pages = u64::try_from(pages).unwrap_or(u64::MAX);
        let max = u64::try_from(max).unwrap_or(u64::MAX);
        let mut before = self.promised.load(Ordering::Acquire);
        for _ in 0..BUDGET_TRIES {
            let Some(after) = before.checked_add(pages).filter(|&a| a <= max) else {
                break;
            };
            match self
                .promised
                .compare_exchange(before, after, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok(()),
                Err(now) => before = now,
            }
        }
        Err(usize::try_from(before).unwrap_or(usize::MAX))
    }

    /// Promises as many of `pages` more as fit within `max` (maybe none);
    /// returns how many. Like [`LockBudget::reserve`], never stores more
    /// than fits and gives up (granting none) after [`BUDGET_TRIES`]
    /// lost races.
    pub fn grant_up_to(&self, pages: usize, max: usize) -> usize {
        let pages = u64::try_from(pages).unwrap_or(u64::MAX);
        let max = u64::try_from(max).unwrap_or(u64::MAX);
        let mut before = self.promised.load(Ordering::Acquire);
        for _ in 0..BUDGET_TRIES {
            let room = max.saturating_sub(before).min(pages);
            if room == 0 {
                return 0;
            }
            match self.promised.compare_exchange(
                before,
                before + room,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                // `room` is at most `pages`, a usize.
                Ok(_) => return usize::try_from(room).unwrap_or(0),
                Err(now) => before = now,
            }
        }
        0
    }

    /// Takes back `pages` promised by `reserve` or `grant_up_to`.
    pub fn release(&self, pages: usize) {
        // Nothing to give back is the steady state of every EXEC
        // (`LockShare::next_cap`): no write to the module-wide counter.
        if pages == 0 {
            return;
        }
        // Callers give back at most what they were promised.
        self.promised
            .fetch_sub(u64::try_from(pages).unwrap_or(0), Ordering::AcqRel);
    }
}

/// The books of hosts that keep none of their own: no limit. Their
/// instances still reserve and release, so the counts stay balanced.
static UNLIMITED_BUDGET: LockBudget = LockBudget::new();

/// Services of the host kernel.
///
/// `Clone` because every object that must give something back on drop keeps
/// its own handle; the kld's implementation is a zero-sized type.
pub trait Host: Clone + Send + Sync {
    /// Writes one line to the kernel log.
    fn log(&self, args: fmt::Arguments<'_>);

    /// Zeroed, wired kernel memory for `layout` (alignment at most
    /// [`PAGE_SIZE`]). Never sleeps for long and never panics: failure is
    /// [`Error::NoMemory`].
    fn alloc_zeroed(&self, layout: Layout) -> Result<NonNull<u8>>;

    /// Returns memory to the host.
    ///
    /// # Safety
    ///
    /// `ptr` came from `alloc_zeroed` of this host with the same `layout`,
    /// is freed once, and nothing refers to it any more.
    unsafe fn free(&self, ptr: NonNull<u8>, layout: Layout);

    /// Checks that `[addr, addr + len)` is mapped readable and writable in
    /// the caller's address space: [`Error::Fault`] otherwise.
    fn check_user_range(&self, addr: u64, len: u64) -> Result<()>;

    /// Holds the caller's page at `user_addr` (page aligned) for reading and
    /// writing, faulting it in if needed: [`Error::Fault`] when it is not
    /// mapped read/write, [`Error::InvalidArgument`] when misaligned.
    fn hold_user_page(&self, user_addr: u64) -> Result<HeldUserPage>;

    /// Releases a page held by `hold_user_page`.
    ///
    /// # Safety
    ///
    /// `page` came from `hold_user_page` of this host, is released once, and
    /// its kernel mapping is not used afterwards.
    unsafe fn release_user_page(&self, page: &HeldUserPage);

    /// The physical address of kernel virtual address `virt` (the module's
    /// own image: the switcher pages), `None` when unmapped.
    fn virt_to_phys(&self, virt: u64) -> Option<u64>;

    /// Begins running guest code on this CPU: no preemption and no
    /// migration until [`Host::cpu_leave`]. Returns the CPU's index, or
    /// `None` when this host cannot run guest code (the monitor then
    /// answers `KQEMU_RET_ABORT`). Any index will do: the monitor holds
    /// one of its switcher blocks (a fixed number, not one per CPU) from
    /// here to `cpu_leave`, preferring the one this index used last.
    fn cpu_enter(&self) -> Option<usize>;

    /// Ends what [`Host::cpu_enter`] began (a reschedule deferred by it
    /// may happen here).
    fn cpu_leave(&self);

    /// Whether the thread should go back to user mode now: a signal is
    /// pending or the scheduler wants the CPU (FREEBSD.md "CPU").
    fn should_yield(&self) -> bool;

    /// The name under which the administrator sets
    /// [`Host::max_locked_pages`], for the log line of a refusal.
    const MAX_LOCKED_PAGES_NAME: &'static str = "the locked-page limit";

    /// The module-wide books of locked user pages (one per loaded module,
    /// shared by all instances).
    fn lock_budget(&self) -> &LockBudget {
        &UNLIMITED_BUDGET
    }

    /// Most user pages all instances together may hold; read at every
    /// decision, so a lowered limit takes effect at the next EXEC.
    fn max_locked_pages(&self) -> usize {
        u32::MAX as usize
    }

    /// An opaque identity of the caller's address space (FreeBSD: its
    /// `struct vmspace`), the same for every thread of one process and
    /// different for processes that do not share their memory (a fork's
    /// child, a process the descriptor was passed to). Only compared. A
    /// host that cannot tell answers the same number always.
    fn user_space(&self) -> u64 {
        0
    }

    /// A number that changes whenever the caller's address map changes
    /// (a mapping added, removed or changed), so that pages held from an
    /// earlier mapping can be told stale. A host that cannot tell answers
    /// the same number always.
    fn user_map_version(&self) -> u64 {
        0
    }

    /// The identity of the mappings behind `addr..addr+len` (each part's
    /// memory object and offset), when the range is mapped read/write over
    /// at most [`MAX_BACKING_PIECES`] mappings that each have their object
    /// already; `None` otherwise, or when the host cannot tell (then the
    /// caller treats every change of [`Host::user_map_version`] as a
    /// change of the range). The answer keeps each object alive (its
    /// address is not reused) until [`Host::release_range_backing`], so a
    /// mapping replaced by another at the same address has another object
    /// and the answer changes.
    fn user_range_backing(&self, _addr: u64, _len: u64) -> Option<RangeBacking> {
        None
    }

    /// Lets go of the objects an answer of [`Host::user_range_backing`]
    /// kept alive.
    ///
    /// # Safety
    ///
    /// `backing` came from `user_range_backing` and is released once.
    unsafe fn release_range_backing(&self, _backing: &RangeBacking) {}
}

/// Types for which all-zero bytes are a valid value, so a zeroed host
/// allocation can be used as an array of them.
///
/// # Safety
///
/// The all-zero bit pattern must be a valid value of the type.
pub unsafe trait Zeroable: Sized {}

// SAFETY: integers are valid for every bit pattern, zero included.
unsafe impl Zeroable for u8 {}
// SAFETY: as above.
unsafe impl Zeroable for u32 {}
// SAFETY: as above.
unsafe impl Zeroable for u64 {}

/// A fixed-length array of `T` in zeroed host memory.
pub struct HostArray<T: Zeroable, H: Host> {
    ptr: NonNull<T>,
    len: usize,
    layout: Layout,
    host: H,
    _owns: PhantomData<T>,
}

// SAFETY: the array owns its elements like a Box<[T]> does; the host handle
// is Send by the trait's bound.
unsafe impl<T: Zeroable + Send, H: Host> Send for HostArray<T, H> {}
// SAFETY: shared access only hands out &[T].
unsafe impl<T: Zeroable + Sync, H: Host> Sync for HostArray<T, H> {}

impl<T: Zeroable, H: Host> HostArray<T, H> {
    /// `len` zeroed elements (at least one) from `host`.
    pub fn zeroed(host: &H, len: usize) -> Result<Self> {
        if len == 0 || align_of::<T>() as u64 > PAGE_SIZE {
            return Err(Error::InvalidArgument);
        }
        let layout = Layout::array::<T>(len).map_err(|_| Error::NoMemory)?;
        let ptr = host.alloc_zeroed(layout)?.cast::<T>();
        Ok(Self {
            ptr,
            len,
            layout,
            host: host.clone(),
            _owns: PhantomData,
        })
    }
}

impl<T: Zeroable, H: Host> Deref for HostArray<T, H> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: `ptr` points to `len` elements, valid because zeroed
        // memory is a valid `T` (Zeroable) and every later write stored a
        // `T`; the array owns them for its lifetime.
        unsafe { core::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Zeroable, H: Host> DerefMut for HostArray<T, H> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`, and `&mut self` makes the access unique.
        unsafe { core::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Zeroable, H: Host> Drop for HostArray<T, H> {
    fn drop(&mut self) {
        // SAFETY: drop the elements in place (nothing else owns them), then
        // give back the block `zeroed` obtained with this very layout.
        unsafe {
            core::ptr::drop_in_place(core::ptr::slice_from_raw_parts_mut(
                self.ptr.as_ptr(),
                self.len,
            ));
            self.host.free(self.ptr.cast(), self.layout);
        }
    }
}

/// One value of `T` in host memory (the kld keeps its per-open state in
/// one, handed to devfs as a raw pointer).
pub struct HostBox<T, H: Host> {
    ptr: NonNull<T>,
    host: H,
    _owns: PhantomData<T>,
}

// SAFETY: owns its value like a Box<T>.
unsafe impl<T: Send, H: Host> Send for HostBox<T, H> {}
// SAFETY: shared access only hands out &T.
unsafe impl<T: Sync, H: Host> Sync for HostBox<T, H> {}

impl<T, H: Host> HostBox<T, H> {
    /// Moves `value` into memory from `host`.
    pub fn new(host: &H, value: T) -> Result<Self> {
        if size_of::<T>() == 0 || align_of::<T>() as u64 > PAGE_SIZE {
            return Err(Error::InvalidArgument);
        }
        let ptr = host.alloc_zeroed(Layout::new::<T>())?.cast::<T>();
        // SAFETY: fresh allocation of the layout of T, so valid and aligned
        // for one write.
        unsafe { ptr.as_ptr().write(value) };
        Ok(Self {
            ptr,
            host: host.clone(),
            _owns: PhantomData,
        })
    }

    /// Gives up ownership; [`HostBox::from_raw`] takes it back.
    pub fn into_raw(self) -> NonNull<T> {
        let ptr = self.ptr;
        core::mem::forget(self);
        ptr
    }

    /// Takes back a box given up by [`HostBox::into_raw`].
    ///
    /// # Safety
    ///
    /// `ptr` came from `into_raw` of a box made with an equivalent `host`,
    /// is taken back once, and no reference to the value outlives the box.
    pub unsafe fn from_raw(host: H, ptr: NonNull<T>) -> Self {
        Self {
            ptr,
            host,
            _owns: PhantomData,
        }
    }
}

impl<T, H: Host> Deref for HostBox<T, H> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the box owns an initialized T at `ptr`.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T, H: Host> DerefMut for HostBox<T, H> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`, and `&mut self` makes the access unique.
        unsafe { self.ptr.as_mut() }
    }
}

impl<T, H: Host> Drop for HostBox<T, H> {
    fn drop(&mut self) {
        // SAFETY: the box owns the value: drop it, then free the block
        // `new` allocated with the layout of T.
        unsafe {
            core::ptr::drop_in_place(self.ptr.as_ptr());
            self.host.free(self.ptr.cast(), Layout::new::<T>());
        }
    }
}

/// A held user page that is released on drop.
pub struct UserPage<H: Host> {
    page: HeldUserPage,
    host: H,
}

// SAFETY: the held page is plain memory owned by this value until drop;
// nothing in it is tied to the thread that held it.
unsafe impl<H: Host> Send for UserPage<H> {}

impl<H: Host> UserPage<H> {
    /// Holds the caller's page at `user_addr`.
    pub fn hold(host: &H, user_addr: u64) -> Result<Self> {
        if !user_addr.is_multiple_of(PAGE_SIZE) {
            return Err(Error::InvalidArgument);
        }
        let page = host.hold_user_page(user_addr)?;
        Ok(Self {
            page,
            host: host.clone(),
        })
    }

    /// The user address the page was held at.
    pub fn user_addr(&self) -> u64 {
        self.page.user_addr
    }

    /// Physical address of the page.
    pub fn phys(&self) -> u64 {
        self.page.phys
    }

    /// Kernel mapping of the page, valid while `self` lives.
    pub fn kernel_ptr(&self) -> NonNull<u8> {
        self.page.kernel
    }
}

impl<H: Host> Drop for UserPage<H> {
    fn drop(&mut self) {
        // SAFETY: the page came from hold_user_page of this host and is
        // released exactly once, here.
        unsafe { self.host.release_user_page(&self.page) };
    }
}

#[cfg(test)]
pub(crate) mod mock {
    //! A host for unit tests: memory from the test process's allocator, a
    //! table of "mapped" user ranges, counters to check that nothing leaks.

    use super::*;
    use std::string::{String, ToString};
    use std::sync::{Arc, Mutex, MutexGuard};
    use std::vec::Vec;

    #[derive(Default)]
    pub(crate) struct MockState {
        /// Mapped user ranges: (start, end, writable, object), each
        /// mapping with an object of its own.
        pub mappings: Vec<(u64, u64, bool, usize)>,
        pub live_allocs: usize,
        pub live_bytes: usize,
        /// Allocations left before `alloc_zeroed` starts failing.
        pub allocs_before_failure: Option<usize>,
        pub held_pages: Vec<u64>,
        /// Pages held so far (`held_pages` is what is held now).
        pub holds: u64,
        pub log: Vec<String>,
        /// Answers of `should_yield`, first to last; then `false`.
        pub yields: Vec<bool>,
        /// `max_locked_pages`; `None`: no limit.
        pub max_locked: Option<usize>,
        /// `user_map_version`: bumped by every map and unmap.
        pub map_version: u64,
        /// `user_space`: the calling process's address space.
        pub space: u64,
        /// Objects kept alive by `user_range_backing` answers: object →
        /// references.
        pub object_refs: std::collections::BTreeMap<usize, u32>,
    }

    #[derive(Clone, Default)]
    pub(crate) struct MockHost {
        state: Arc<Mutex<MockState>>,
        budget: Arc<LockBudget>,
    }

    impl MockHost {
        pub(crate) fn state(&self) -> MutexGuard<'_, MockState> {
            self.state.lock().expect("mock state lock")
        }

        pub(crate) fn map(&self, start: u64, len: u64, writable: bool) {
            let mut st = self.state();
            st.map_version += 1;
            let object = st.map_version as usize;
            st.mappings.push((start, start + len, writable, object));
        }

        /// Removes the mappings that start at `start` (munmap).
        pub(crate) fn unmap(&self, start: u64) {
            let mut st = self.state();
            st.mappings.retain(|&(s, _, _, _)| s != start);
            st.map_version += 1;
        }

        /// A change of the map elsewhere (an unrelated mmap or munmap):
        /// the version moves, the mappings stay.
        pub(crate) fn touch_map(&self) {
            self.state().map_version += 1;
        }

        /// The writable mapping containing `addr`.
        fn mapping_at(st: &MockState, addr: u64) -> Option<(u64, u64, bool, usize)> {
            st.mappings
                .iter()
                .copied()
                .find(|&(s, e, w, _)| w && s <= addr && addr < e)
        }
    }

    impl Host for MockHost {
        fn log(&self, args: fmt::Arguments<'_>) {
            self.state().log.push(args.to_string());
        }

        fn alloc_zeroed(&self, layout: Layout) -> Result<NonNull<u8>> {
            let mut st = self.state();
            if let Some(left) = st.allocs_before_failure.as_mut() {
                if *left == 0 {
                    return Err(Error::NoMemory);
                }
                *left -= 1;
            }
            assert!(layout.size() > 0 && layout.align() as u64 <= PAGE_SIZE);
            // SAFETY: non-zero size checked above.
            let ptr =
                NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) }).ok_or(Error::NoMemory)?;
            st.live_allocs += 1;
            st.live_bytes += layout.size();
            Ok(ptr)
        }

        unsafe fn free(&self, ptr: NonNull<u8>, layout: Layout) {
            let mut st = self.state();
            st.live_allocs -= 1;
            st.live_bytes -= layout.size();
            // SAFETY: the caller guarantees ptr came from alloc_zeroed with
            // this layout, i.e. from std::alloc::alloc_zeroed.
            unsafe { std::alloc::dealloc(ptr.as_ptr(), layout) };
        }

        fn check_user_range(&self, addr: u64, len: u64) -> Result<()> {
            let st = self.state();
            let end = addr.checked_add(len).ok_or(Error::Fault)?;
            let mut cursor = addr;
            // Each pass advances `cursor` to the end of a mapping or fails,
            // so the loop runs at most once per mapping.
            for _ in 0..=st.mappings.len() {
                if cursor >= end {
                    return Ok(());
                }
                let Some((_, m_end, _, _)) = Self::mapping_at(&st, cursor) else {
                    return Err(Error::Fault);
                };
                cursor = m_end;
            }
            Err(Error::Fault)
        }

        fn hold_user_page(&self, user_addr: u64) -> Result<HeldUserPage> {
            if !user_addr.is_multiple_of(PAGE_SIZE) {
                return Err(Error::InvalidArgument);
            }
            self.check_user_range(user_addr, PAGE_SIZE)?;
            let layout = Layout::from_size_align(PAGE_SIZE as usize, PAGE_SIZE as usize)
                .map_err(|_| Error::NoMemory)?;
            // SAFETY: non-zero size.
            let kernel =
                NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) }).ok_or(Error::NoMemory)?;
            {
                let mut st = self.state();
                st.held_pages.push(user_addr);
                st.holds += 1;
            }
            self.budget.note_hold();
            Ok(HeldUserPage {
                user_addr,
                phys: 0x1_0000_0000 + user_addr,
                kernel,
                cookie: 0,
            })
        }

        unsafe fn release_user_page(&self, page: &HeldUserPage) {
            let mut st = self.state();
            let i = st
                .held_pages
                .iter()
                .position(|&a| a == page.user_addr)
                .expect("page was held");
            st.held_pages.swap_remove(i);
            self.budget.note_release();
            let layout = Layout::from_size_align(PAGE_SIZE as usize, PAGE_SIZE as usize)
                .expect("page layout");
            // SAFETY: `kernel` came from alloc_zeroed with this layout in
            // hold_user_page and is released once (the caller's contract).
            unsafe { std::alloc::dealloc(page.kernel.as_ptr(), layout) };
        }

        fn virt_to_phys(&self, virt: u64) -> Option<u64> {
            Some(virt)
        }

        /// A test process cannot run guest code at ring 3.
        fn cpu_enter(&self) -> Option<usize> {
            None
        }

        fn cpu_leave(&self) {}

        fn should_yield(&self) -> bool {
            let mut st = self.state();
            if st.yields.is_empty() {
                false
            } else {
                st.yields.remove(0)
            }
        }

        const MAX_LOCKED_PAGES_NAME: &'static str = "mock.max_locked_pages";

        fn lock_budget(&self) -> &LockBudget {
            &self.budget
        }

        fn max_locked_pages(&self) -> usize {
            self.state().max_locked.unwrap_or(u32::MAX as usize)
        }

        fn user_map_version(&self) -> u64 {
            self.state().map_version
        }

        fn user_space(&self) -> u64 {
            self.state().space
        }

        fn user_range_backing(&self, addr: u64, len: u64) -> Option<RangeBacking> {
            let mut st = self.state();
            let end = addr.checked_add(len)?;
            let mut pieces = Vec::new();
            let mut cursor = addr;
            while cursor < end && pieces.len() < MAX_BACKING_PIECES {
                let (s, e, _, object) = Self::mapping_at(&st, cursor)?;
                pieces.push(MapPiece {
                    start: cursor,
                    end: e.min(end),
                    object,
                    offset: cursor - s,
                });
                cursor = e;
            }
            let backing = RangeBacking::new(&pieces).filter(|_| cursor >= end)?;
            for p in backing.pieces() {
                *st.object_refs.entry(p.object).or_default() += 1;
            }
            Some(backing)
        }

        unsafe fn release_range_backing(&self, backing: &RangeBacking) {
            let mut st = self.state();
            for p in backing.pieces() {
                let refs = st
                    .object_refs
                    .get_mut(&p.object)
                    .expect("object referenced");
                *refs -= 1;
                if *refs == 0 {
                    st.object_refs.remove(&p.object);
                }
            }
        }
    }

    #[test]
    fn lock_budget_reserves_grants_and_releases() {
        let b = LockBudget::new();
        assert_eq!(b.reserve(60, 100), Ok(()));
        assert_eq!(b.reserve(50, 100), Err(60), "all or nothing");
        assert_eq!(b.promised(), 60);
        assert_eq!(b.grant_up_to(30, 100), 30);
        assert_eq!(b.grant_up_to(30, 100), 10, "only what fits");
        assert_eq!(b.grant_up_to(5, 100), 0);
        assert_eq!(b.promised(), 100);
        b.release(40);
        assert_eq!(b.reserve(40, 100), Ok(()));
        // A lowered limit refuses everything new, takes nothing back.
        assert_eq!(b.grant_up_to(1, 50), 0);
        assert_eq!(b.reserve(1, 50), Err(100));
        assert_eq!(b.promised(), 100);
        b.release(100);
        assert_eq!(b.promised(), 0);
        assert_eq!(b.reserve(usize::MAX, usize::MAX - 1), Err(0));
        // A 64-bit counter: requests past 2^32 pages neither fail nor
        // wrap it.
        assert_eq!(b.reserve(1 << 33, usize::MAX), Ok(()));
        assert_eq!(
            b.grant_up_to(usize::MAX, usize::MAX),
            usize::MAX - (1 << 33)
        );
        assert_eq!(b.promised(), usize::MAX);
        assert_eq!(b.reserve(1, usize::MAX), Err(usize::MAX));
        b.release(usize::MAX);
        assert_eq!(b.promised(), 0);
        b.note_hold();
        b.note_hold();
        b.note_release();
        assert_eq!(b.held(), 1);
    }

    /// A request that can never fit (another INIT asking for more than
    /// the limit) must not make a small one that fits fail meanwhile,
    /// and grants stay within the limit whatever runs concurrently.
    #[test]
    fn lock_budget_races_refuse_nothing_that_fits() {
        const MAX: usize = 1000;
        const ROUNDS: usize = 200_000;
        let b = std::sync::Arc::new(LockBudget::new());
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let hog = {
            let (b, stop) = (b.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut refused = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    refused += u64::from(b.reserve(2 * MAX, MAX).is_err());
                }
                refused
            })
        };
        let mut spurious = 0;
        for _ in 0..ROUNDS {
            match b.reserve(10, MAX) {
                Ok(()) => b.release(10),
                Err(_) => spurious += 1,
            }
            let g = b.grant_up_to(MAX, MAX);
            assert!(g <= MAX, "granted {g}");
            assert!(b.promised() <= MAX, "promised {}", b.promised());
            b.release(g);
        }
        stop.store(true, Ordering::Relaxed);
        let refused = hog.join().expect("hog thread");
        assert!(refused > 0);
        assert_eq!(spurious, 0, "small reservations refused during a race");
        assert_eq!(b.promised(), 0);
    }

    #[test]
    fn host_array_and_box_give_memory_back() {
        let host = MockHost::default();
        {
            let mut a = HostArray::<u64, _>::zeroed(&host, 100).expect("memory");
            assert!(a.iter().all(|&x| x == 0));
            a[99] = 7;
            assert_eq!(a[99], 7);
            let b = HostBox::new(&host, [1u8; 3]).expect("memory");
            assert_eq!(*b, [1, 1, 1]);
            let raw = b.into_raw();
            // SAFETY: from into_raw of a box of this host, taken back once.
            let b = unsafe { HostBox::from_raw(host.clone(), raw) };
            assert_eq!(b[2], 1);
            assert_eq!(host.state().live_allocs, 2);
        }
        assert_eq!(host.state().live_allocs, 0);
        assert_eq!(host.state().live_bytes, 0);
        assert_eq!(
            HostArray::<u64, _>::zeroed(&host, 0).err(),
            Some(Error::InvalidArgument)
        );
    }

    #[test]
    fn allocation_failure_is_an_error() {
        let host = MockHost::default();
        host.state().allocs_before_failure = Some(0);
        assert_eq!(
            HostArray::<u8, _>::zeroed(&host, 1).err(),
            Some(Error::NoMemory)
        );
        assert_eq!(HostBox::new(&host, 1u64).err(), Some(Error::NoMemory));
    }

    #[test]
    fn user_pages_are_released_on_drop() {
        let host = MockHost::default();
        host.map(0x10000, 0x2000, true);
        host.map(0x20000, 0x1000, false);
        let p = UserPage::hold(&host, 0x11000).expect("mapped");
        assert_eq!((p.user_addr(), p.phys()), (0x11000, 0x1_0001_1000));
        assert_eq!(
            UserPage::hold(&host, 0x11001).err(),
            Some(Error::InvalidArgument)
        );
        assert_eq!(UserPage::hold(&host, 0x12000).err(), Some(Error::Fault));
        assert_eq!(UserPage::hold(&host, 0x20000).err(), Some(Error::Fault));
        assert_eq!(host.state().held_pages, [0x11000]);
        drop(p);
        assert!(host.state().held_pages.is_empty());
    }

    #[test]
    fn mock_range_check_follows_adjacent_mappings() {
        let host = MockHost::default();
        host.map(0x1000, 0x1000, true);
        host.map(0x2000, 0x1000, true);
        assert_eq!(host.check_user_range(0x1800, 0x1800), Ok(()));
        assert_eq!(host.check_user_range(0x1800, 0x1801), Err(Error::Fault));
        assert_eq!(host.check_user_range(0x800, 0x1000), Err(Error::Fault));
    }
}
