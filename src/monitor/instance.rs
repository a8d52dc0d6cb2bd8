//! One VM: what `KQEMU_INIT` builds and the later ioctls act on.
//!
//! The instance records the client's RAM parameters, holds the three list
//! pages the client shares with the module, and keeps the guest-physical
//! memory map that `KQEMU_SET_PHYS_MEM` describes. Every rejection is an
//! error for the caller (ABI.md, the lead's errno contract); nothing here
//! names a FreeBSD type.

use crate::abi::{
    KqemuCpuState, KqemuInit, KqemuPhysMem, KQEMU_IO_MEM_COMM, KQEMU_IO_MEM_RAM, KQEMU_IO_MEM_ROM,
    KQEMU_IO_MEM_UNASSIGNED, KQEMU_MAX_GUEST_PHYS, KQEMU_MAX_MODIFIED_RAM_PAGES,
    KQEMU_MAX_PHYS_RANGES, KQEMU_MAX_RAM_SIZE, KQEMU_PAGE_SIZE, KQEMU_RET_ABORT, KQEMU_RET_SOFTMMU,
    USER_ADDRESS_LIMIT,
};
use crate::error::{Error, Result};
use crate::host::{Host, HostArray, RangeBacking, UserPage, Zeroable};
use crate::monitor::exec::{Lists, Monitor};
use crate::monitor::ram::LockShare;

/// The list pages INIT holds: `pages_to_flush`, `ram_pages_to_update`,
/// `modified_ram_pages`.
const LIST_PAGES: usize = 3;

/// The client's guest RAM, as INIT gave it (user addresses of the caller).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamParams {
    /// Start of guest RAM in the client.
    pub ram_base: u64,
    /// Bytes of guest RAM (a multiple of the page size).
    pub ram_size: u64,
    /// Start of the dirty bytes, one per RAM page.
    pub ram_dirty: u64,
}

impl RamParams {
    /// Number of guest RAM pages (= dirty bytes).
    pub fn pages(&self) -> u64 {
        self.ram_size / KQEMU_PAGE_SIZE
    }

    /// Pages of dirty bytes (one byte per RAM page), held by the monitor
    /// for its whole life.
    pub fn dirty_pages(&self) -> usize {
        self.pages().div_ceil(KQEMU_PAGE_SIZE).max(1) as usize
    }
}

/// What a recorded guest-physical range is backed by. Addresses that no
/// range covers are unassigned (device memory: the client emulates them).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PhysKind {
    /// Guest RAM, writable.
    Ram = 0,
    /// Guest RAM the guest may only read.
    Rom = 1,
    /// The paravirtual communication page.
    Comm = 2,
}

/// One guest-physical range `[start, end)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PhysRange {
    pub start: u64,
    pub end: u64,
    /// RAM offset of `start` for RAM and ROM; 0 for the communication page.
    pub ram_addr: u64,
    pub kind: PhysKind,
}

// SAFETY: all-zero bytes are a valid PhysRange (integers, and PhysKind::Ram
// has discriminant 0).
unsafe impl Zeroable for PhysRange {}

impl PhysRange {
    fn backed_by_ram(&self) -> bool {
        matches!(self.kind, PhysKind::Ram | PhysKind::Rom)
    }

    /// The part of `self` from `start` on (`start` inside the range).
    fn starting_at(self, start: u64) -> Self {
        let ram_addr = if self.backed_by_ram() {
            self.ram_addr + (start - self.start)
        } else {
            0
        };
        Self {
            start,
            ram_addr,
            ..self
        }
    }

    /// The part of `self` before `end` (`end` inside the range).
    fn ending_at(self, end: u64) -> Self {
        Self { end, ..self }
    }

    /// `self` followed directly by `next`, as one range, if they describe
    /// one contiguous piece of the same kind of memory.
    fn merge(&self, next: &Self) -> Option<Self> {
        let contiguous = self.end == next.start
            && self.kind == next.kind
            && (!self.backed_by_ram() || self.ram_addr + (self.end - self.start) == next.ram_addr);
        contiguous.then_some(Self {
            end: next.end,
            ..*self
        })
    }
}

/// At most three ranges replace the overlapped ones in one update: the
/// part of the first overlapped range before the new one, the new one, and
/// the part of the last overlapped range after it.
struct Replacement {
    ranges: [PhysRange; 3],
    len: usize,
}

impl Replacement {
    fn new() -> Self {
        let empty = PhysRange {
            start: 0,
            end: 0,
            ram_addr: 0,
            kind: PhysKind::Ram,
        };
        Self {
            ranges: [empty; 3],
            len: 0,
        }
    }

    fn as_slice(&self) -> &[PhysRange] {
        &self.ranges[..self.len]
    }

    /// Appends `range`, merged into the last one when they are contiguous.
    fn push(&mut self, range: PhysRange) {
        if let Some(last) = self.len.checked_sub(1).map(|i| &mut self.ranges[i]) {
            if let Some(merged) = last.merge(&range) {
                *last = merged;
                return;
            }
        }
        // At most three pushes per update (see the type's comment).
        if let Some(slot) = self.ranges.get_mut(self.len) {
            *slot = range;
            self.len += 1;
        }
    }
}

/// The guest-physical memory map: sorted, disjoint, maximally merged
/// ranges in a fixed-capacity array from the host, searched by bisection.
pub struct PhysMap<H: Host> {
    ranges: HostArray<PhysRange, H>,
    len: usize,
}

impl<H: Host> PhysMap<H> {
    /// An empty map with room for [`KQEMU_MAX_PHYS_RANGES`] ranges.
    pub fn new(host: &H) -> Result<Self> {
        Ok(Self {
            ranges: HostArray::zeroed(host, KQEMU_MAX_PHYS_RANGES)?,
            len: 0,
        })
    }

    /// The recorded ranges, sorted by address.
    pub fn ranges(&self) -> &[PhysRange] {
        &self.ranges[..self.len]
    }

    /// The range that holds guest-physical address `addr`, if any.
    pub fn lookup(&self, addr: u64) -> Option<PhysRange> {
        let ranges = self.ranges();
        let i = ranges.partition_point(|r| r.end <= addr);
        ranges.get(i).copied().filter(|r| r.start <= addr)
    }

    /// Makes `[start, end)` (non-empty, validated by the caller) map to
    /// `backing`, or unassigned when `backing` is `None`. What earlier calls
    /// recorded there is overridden: QEMU re-registers regions as devices
    /// remap them. [`Error::NoSpace`] (and no change) when the result would
    /// need more than the capacity.
    pub fn set(&mut self, start: u64, end: u64, backing: Option<(PhysKind, u64)>) -> Result<()> {
        let len = self.len;
        let ranges = &self.ranges[..len];
        // ranges[first..last] are exactly those overlapping [start, end).
        let first = ranges.partition_point(|r| r.end <= start);
        let last = ranges.partition_point(|r| r.start < end);

        let mut replacement = Replacement::new();
        if let Some(head) = ranges[first..last].first().filter(|r| r.start < start) {
            replacement.push(head.ending_at(start));
        }
        if let Some((kind, ram_addr)) = backing {
            let ram_addr = if matches!(kind, PhysKind::Comm) {
                0
            } else {
                ram_addr
            };
            replacement.push(PhysRange {
                start,
                end,
                ram_addr,
                kind,
            });
        }
        if let Some(tail) = ranges[first..last].last().filter(|r| r.end > end) {
            replacement.push(tail.starting_at(end));
        }

        // Merge with the untouched neighbours so equal memory stays one range.
        let (mut lo, mut hi) = (first, last);
        if let (Some(prev), Some(head)) = (
            lo.checked_sub(1).map(|i| ranges[i]),
            replacement.as_slice().first(),
        ) {
            if let Some(merged) = prev.merge(head) {
                replacement.ranges[0] = merged;
                lo -= 1;
            }
        }
        if let (Some(next), Some(tail_index)) =
            (ranges.get(hi).copied(), replacement.len.checked_sub(1))
        {
            if let Some(merged) = replacement.ranges[tail_index].merge(&next) {
                replacement.ranges[tail_index] = merged;
                hi += 1;
            }
        }

        let new_len = len - (hi - lo) + replacement.len;
        if new_len > self.ranges.len() {
            return Err(Error::NoSpace);
        }
        let new = replacement.as_slice();
        self.ranges.copy_within(hi..len, lo + new.len());
        self.ranges[lo..lo + new.len()].copy_from_slice(new);
        self.len = new_len;
        Ok(())
    }
}

/// Checks that `[addr, addr + len)` is a well-formed client buffer: page
/// aligned, not wrapping, inside the user half of the address space.
fn check_user_buffer(addr: u64, len: u64) -> Result<()> {
    let end = addr.checked_add(len).ok_or(Error::InvalidArgument)?;
    if !addr.is_multiple_of(KQEMU_PAGE_SIZE) || end > USER_ADDRESS_LIMIT {
        return Err(Error::InvalidArgument);
    }
    Ok(())
}

/// One VM, created by `KQEMU_INIT`.
pub struct Instance<H: Host> {
    host: H,
    /// The monitor's caches, built by the first EXEC.
    monitor: Option<Monitor<H>>,
    /// The failure to build the monitor was logged (once per instance: a
    /// client retrying EXEC must not flood the console).
    logged_monitor_failure: bool,
    ram: RamParams,
    pages_to_flush: UserPage<H>,
    ram_pages_to_update: UserPage<H>,
    modified_ram_pages: UserPage<H>,
    phys_map: PhysMap<H>,
    /// The instance's share of the module-wide budget of locked pages.
    share: LockShare<H>,
    /// `Host::user_map_version` when the held pages were last known to be
    /// the client's current ones.
    map_version: u64,
    /// The mappings behind guest RAM, the dirty bytes and the three list
    /// pages then, when the host could tell ([`Self::backing`]).
    backing: Option<Backing<H>>,
    /// `Host::user_space` of the INIT caller: the held pages and the
    /// ranges the instance checks are that address space's.
    owner: u64,
}

/// One answer of [`Host::user_range_backing`]; dropping it lets go of the
/// objects the host keeps alive for it.
struct HeldBacking<H: Host> {
    host: H,
    backing: RangeBacking,
}

impl<H: Host> HeldBacking<H> {
    fn record(host: &H, addr: u64, len: u64) -> Option<Self> {
        Some(Self {
            host: host.clone(),
            backing: host.user_range_backing(addr, len)?,
        })
    }
}

impl<H: Host> Drop for HeldBacking<H> {
    fn drop(&mut self) {
        // SAFETY: `backing` came from user_range_backing (record) and is
        // released here, once.
        unsafe { self.host.release_range_backing(&self.backing) };
    }
}

/// The identity of the mappings behind guest RAM, the dirty bytes and the
/// list pages, in that order.
type Backing<H> = [HeldBacking<H>; 2 + LIST_PAGES];

impl<H: Host> Instance<H> {
    /// Validates INIT's argument and builds the instance: EINVAL for a bad
    /// field, EFAULT for a buffer not mapped read/write in the caller,
    /// ENOMEM when the host has no memory or the module-wide limit of
    /// locked pages cannot cover the instance's minimum (with a log line
    /// naming the limit). On failure everything taken so far is given
    /// back.
    pub fn new(host: &H, init: &KqemuInit) -> Result<Self> {
        let ram = RamParams {
            ram_base: init.ram_base,
            ram_size: init.ram_size,
            ram_dirty: init.ram_dirty,
        };
        if ram.ram_size == 0
            || !ram.ram_size.is_multiple_of(KQEMU_PAGE_SIZE)
            || ram.ram_size > KQEMU_MAX_RAM_SIZE
        {
            return Err(Error::InvalidArgument);
        }
        let lists = [
            init.pages_to_flush,
            init.ram_pages_to_update,
            init.modified_ram_pages,
        ];
        check_user_buffer(ram.ram_base, ram.ram_size)?;
        check_user_buffer(ram.ram_dirty, ram.pages())?;
        for list in lists {
            check_user_buffer(list, KQEMU_PAGE_SIZE)?;
        }

        // Read before the checks: a change of the map from here on is
        // seen by the first EXEC.
        let map_version = host.user_map_version();
        host.check_user_range(ram.ram_base, ram.ram_size)?;
        host.check_user_range(ram.ram_dirty, ram.pages())?;
        let backing = Self::backing(host, &ram, lists);
        let share = LockShare::reserve(host, LIST_PAGES + ram.dirty_pages()).map_err(|r| {
            host.log(format_args!(
                "KQEMU_INIT: {} pages to lock for {} MiB of guest RAM do not fit \
                 {}={} ({} promised to other instances): ENOMEM",
                r.needed,
                ram.ram_size >> 20,
                H::MAX_LOCKED_PAGES_NAME,
                r.max,
                r.promised
            ));
            Error::NoMemory
        })?;
        let pages_to_flush = UserPage::hold(host, init.pages_to_flush)?;
        let ram_pages_to_update = UserPage::hold(host, init.ram_pages_to_update)?;
        let modified_ram_pages = UserPage::hold(host, init.modified_ram_pages)?;
        let phys_map = PhysMap::new(host).inspect_err(|_| {
            host.log(format_args!(
                "KQEMU_INIT: no kernel memory for the guest-physical map ({} ranges)",
                KQEMU_MAX_PHYS_RANGES
            ))
        })?;
        Ok(Self {
            owner: host.user_space(),
            host: host.clone(),
            monitor: None,
            logged_monitor_failure: false,
            ram,
            pages_to_flush,
            ram_pages_to_update,
            modified_ram_pages,
            phys_map,
            share,
            map_version,
            backing,
        })
    }

    /// What [`Host::user_range_backing`] answers for each range the
    /// instance holds pages of; `None` if it cannot tell for one of them.
    fn backing(host: &H, ram: &RamParams, lists: [u64; LIST_PAGES]) -> Option<Backing<H>> {
        let [flush, update, modified] = lists;
        // On a `None`, the answers taken so far are dropped: released.
        Some([
            HeldBacking::record(host, ram.ram_base, ram.ram_size)?,
            HeldBacking::record(host, ram.ram_dirty, ram.pages())?,
            HeldBacking::record(host, flush, KQEMU_PAGE_SIZE)?,
            HeldBacking::record(host, update, KQEMU_PAGE_SIZE)?,
            HeldBacking::record(host, modified, KQEMU_PAGE_SIZE)?,
        ])
    }

    /// Makes sure the pages the instance holds are still the client's.
    /// FreeBSD keeps a held page alive when the client unmaps it, so after
    /// a change of the client's map (munmap, mmap over the range) the
    /// module would go on using pages the client no longer has. The map's
    /// version moves at every mmap, munmap or mprotect anywhere in the
    /// process (and at some first faults), so a change is first compared
    /// with the mappings behind the instance's ranges recorded last time
    /// ([`Self::backing`]): the same mappings (same memory objects at the
    /// same offsets) mean the held pages are still the client's, and every
    /// cache stays. The record keeps its objects alive, so an object of a
    /// new mapping never has the address of a recorded one. Otherwise, or when the host cannot tell: the monitor's
    /// caches go (their RAM and dirty-byte pages are held again from the
    /// current mapping when needed), the RAM and dirty ranges must still
    /// be mapped read/write (EFAULT otherwise, again at each call until
    /// they are), and the list pages are held again.
    fn revalidate(&mut self) -> Result<()> {
        let now = self.host.user_map_version();
        if now == self.map_version {
            return Ok(());
        }
        let lists = self.list_pages().map(|p| p.user_addr());
        let backing = Self::backing(&self.host, &self.ram, lists);
        let unchanged = match (&backing, &self.backing) {
            (Some(new), Some(old)) => new.iter().zip(old).all(|(n, o)| n.backing == o.backing),
            _ => false,
        };
        if unchanged {
            self.map_version = now;
            return Ok(());
        }
        // The old record's objects are let go now: an unmapped range's
        // memory is not kept alive while the calls answer EFAULT.
        self.backing = None;
        self.monitor = None;
        let ram = self.ram;
        self.host.check_user_range(ram.ram_base, ram.ram_size)?;
        self.host.check_user_range(ram.ram_dirty, ram.pages())?;
        // Each new hold replaces the old one (released on drop); with the
        // monitor gone this stays within the instance's reservation.
        self.pages_to_flush = UserPage::hold(&self.host, self.pages_to_flush.user_addr())?;
        self.ram_pages_to_update =
            UserPage::hold(&self.host, self.ram_pages_to_update.user_addr())?;
        self.modified_ram_pages = UserPage::hold(&self.host, self.modified_ram_pages.user_addr())?;
        self.map_version = now;
        self.backing = backing;
        Ok(())
    }

    /// EPERM unless the caller runs in the address space that made the
    /// instance. After fork(2) or descriptor passing another process may
    /// call on the open file; its addresses are not the ones INIT held
    /// and checked (the map checks of [`Self::revalidate`] would look at
    /// the wrong map), so only the INIT process may use the instance.
    fn check_owner(&self) -> Result<()> {
        if self.host.user_space() == self.owner {
            Ok(())
        } else {
            Err(Error::Permission)
        }
    }

    /// The guest RAM parameters.
    pub fn ram(&self) -> &RamParams {
        &self.ram
    }

    /// The guest-physical memory map.
    pub fn phys_map(&self) -> &PhysMap<H> {
        &self.phys_map
    }

    /// The held list pages: `pages_to_flush`, `ram_pages_to_update`,
    /// `modified_ram_pages`.
    pub fn list_pages(&self) -> [&UserPage<H>; 3] {
        [
            &self.pages_to_flush,
            &self.ram_pages_to_update,
            &self.modified_ram_pages,
        ]
    }

    /// `KQEMU_SET_PHYS_MEM`: records one range. EPERM from a process other
    /// than INIT's ([`Self::check_owner`]). EINVAL for misaligned,
    /// empty, overflowing or too high ranges, RAM/ROM beyond guest RAM, or
    /// an unknown `io_index`; ENOSPC when the map is full. `padding1` is not
    /// looked at (the client does not clear it).
    pub fn set_phys_mem(&mut self, mem: &KqemuPhysMem) -> Result<()> {
        self.check_owner()?;
        let aligned = |v: u64| v.is_multiple_of(KQEMU_PAGE_SIZE);
        if !aligned(mem.phys_addr) || !aligned(mem.size) || !aligned(mem.ram_addr) || mem.size == 0
        {
            return Err(Error::InvalidArgument);
        }
        let end = mem
            .phys_addr
            .checked_add(mem.size)
            .ok_or(Error::InvalidArgument)?;
        if end > KQEMU_MAX_GUEST_PHYS {
            return Err(Error::InvalidArgument);
        }
        let backing = match mem.io_index {
            KQEMU_IO_MEM_RAM => Some(PhysKind::Ram),
            KQEMU_IO_MEM_ROM => Some(PhysKind::Rom),
            KQEMU_IO_MEM_COMM => Some(PhysKind::Comm),
            KQEMU_IO_MEM_UNASSIGNED => None,
            _ => return Err(Error::InvalidArgument),
        };
        if matches!(backing, Some(PhysKind::Ram | PhysKind::Rom)) {
            let ram_end = mem
                .ram_addr
                .checked_add(mem.size)
                .ok_or(Error::InvalidArgument)?;
            if ram_end > self.ram.ram_size {
                return Err(Error::InvalidArgument);
            }
        }
        self.phys_map
            .set(mem.phys_addr, end, backing.map(|kind| (kind, mem.ram_addr)))
    }

    /// `KQEMU_MODIFY_RAM_PAGES`: the client rewrote `count` entries of
    /// `modified_ram_pages`. EPERM from a process other than INIT's,
    /// EINVAL unless `0 <= count <= 512`. The
    /// monitor drops what it derived from those pages.
    pub fn modify_ram_pages(&mut self, count: i32) -> Result<()> {
        self.check_owner()?;
        self.revalidate()?;
        match u32::try_from(count) {
            Ok(n) if n <= KQEMU_MAX_MODIFIED_RAM_PAGES => {
                if let Some(m) = self.monitor.as_mut() {
                    m.modified(
                        &self.phys_map,
                        &self.ram,
                        self.modified_ram_pages.kernel_ptr(),
                        n as usize,
                    );
                }
                Ok(())
            }
            _ => Err(Error::InvalidArgument),
        }
    }

    /// `KQEMU_EXEC`: runs the guest until an exit and reports the outcome in
    /// `state.retval` (exec.rs). A host that cannot run guest code
    /// (`Host::cpu_enter`) answers `KQEMU_RET_ABORT`, which makes the
    /// client stop with a CPU dump instead of computing wrong results.
    /// EFAULT when the client unmapped its guest RAM, dirty bytes or list
    /// pages since INIT ([`Self::revalidate`]); EPERM from a process other
    /// than INIT's ([`Self::check_owner`]).
    pub fn exec(&mut self, state: &mut KqemuCpuState) -> Result<()> {
        self.check_owner()?;
        self.revalidate()?;
        if self.host.cpu_enter().is_none() {
            state.retval = KQEMU_RET_ABORT;
            return Ok(());
        }
        self.host.cpu_leave();
        if self.monitor.is_none() {
            match Monitor::new(&self.host, &self.ram) {
                Ok(m) => self.monitor = Some(m),
                Err(e) => {
                    if !self.logged_monitor_failure {
                        self.logged_monitor_failure = true;
                        let why = match e {
                            Error::Fault => "the dirty bytes are no longer mapped",
                            _ => "no kernel memory for the monitor's tables",
                        };
                        self.host
                            .log(format_args!("KQEMU_EXEC: cannot run guest code: {why}"));
                    }
                    state.retval = KQEMU_RET_SOFTMMU;
                    return Ok(());
                }
            }
        }
        let lists = Lists {
            pages_to_flush: self.pages_to_flush.kernel_ptr(),
            ram_pages_to_update: self.ram_pages_to_update.kernel_ptr(),
            modified_ram_pages: self.modified_ram_pages.kernel_ptr(),
        };
        if let Some(m) = self.monitor.as_mut() {
            // The cache may grow only as far as the module-wide budget
            // allows; past it, its least recently used pages go now.
            let (locked, slots) = m.locked_pages();
            m.limit_locked(self.share.next_cap(locked, slots));
            m.exec(state, &self.phys_map, &self.ram, &lists);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::mock::MockHost;
    use crate::host::MAX_BACKING_PIECES;
    use std::vec::Vec;

    const RAM: u64 = 0x10_0000;
    const RAM_SIZE: u64 = 0x40_0000;
    const DIRTY: u64 = 0x80_0000;
    const LISTS: [u64; 3] = [0x90_0000, 0x90_1000, 0x90_3000];
    /// The last page of the 64-bit address space.
    const LAST_PAGE: u64 = !0xfff;

    fn good_init() -> KqemuInit {
        KqemuInit {
            ram_base: RAM,
            ram_size: RAM_SIZE,
            ram_dirty: DIRTY,
            pages_to_flush: LISTS[0],
            ram_pages_to_update: LISTS[1],
            modified_ram_pages: LISTS[2],
        }
    }

    /// A host where every buffer of `good_init` is mapped read/write.
    fn mapped_host() -> MockHost {
        let host = MockHost::default();
        host.map(RAM, RAM_SIZE, true);
        host.map(DIRTY, RAM_SIZE / KQEMU_PAGE_SIZE, true);
        host.map(LISTS[0], 0x2000, true);
        host.map(LISTS[2], 0x1000, true);
        host
    }

    fn instance(host: &MockHost) -> Instance<MockHost> {
        Instance::new(host, &good_init()).expect("valid INIT")
    }

    fn phys(phys_addr: u64, size: u64, ram_addr: u64, io_index: u32) -> KqemuPhysMem {
        KqemuPhysMem {
            phys_addr,
            size,
            ram_addr,
            io_index,
            padding1: 0,
        }
    }

    #[test]
    fn init_records_ram_and_holds_the_list_pages() {
        let host = mapped_host();
        let inst = instance(&host);
        assert_eq!(
            *inst.ram(),
            RamParams {
                ram_base: RAM,
                ram_size: RAM_SIZE,
                ram_dirty: DIRTY
            }
        );
        assert_eq!(inst.ram().pages(), 1024);
        assert_eq!(inst.list_pages().map(|p| p.user_addr()), LISTS);
        assert_eq!(host.state().held_pages, LISTS);
        assert!(inst.phys_map().ranges().is_empty());
        drop(inst);
        assert!(host.state().held_pages.is_empty());
        assert_eq!(host.state().live_allocs, 0);
    }

    #[test]
    fn init_rejects_bad_ram_size() {
        let host = mapped_host();
        for ram_size in [
            0,
            0x800,
            RAM_SIZE + 1,
            KQEMU_MAX_RAM_SIZE + KQEMU_PAGE_SIZE,
            LAST_PAGE,
        ] {
            let init = KqemuInit {
                ram_size,
                ..good_init()
            };
            assert_eq!(
                Instance::new(&host, &init).err(),
                Some(Error::InvalidArgument),
                "ram_size {ram_size:#x}"
            );
        }
    }

    #[test]
    fn init_accepts_the_largest_ram() {
        let host = MockHost::default();
        let init = KqemuInit {
            ram_base: 0x1_0000_0000,
            ram_size: KQEMU_MAX_RAM_SIZE,
            ..good_init()
        };
        host.map(init.ram_base, KQEMU_MAX_RAM_SIZE, true);
        host.map(DIRTY, KQEMU_MAX_RAM_SIZE / KQEMU_PAGE_SIZE, true);
        host.map(LISTS[0], 0x2000, true);
        host.map(LISTS[2], 0x1000, true);
        assert!(Instance::new(&host, &init).is_ok());
    }

    /// The five user-address fields of `KqemuInit`, for tests that break
    /// each in turn.
    const POINTER_FIELDS: [fn(&mut KqemuInit) -> &mut u64; 5] = [
        |i| &mut i.ram_base,
        |i| &mut i.ram_dirty,
        |i| &mut i.pages_to_flush,
        |i| &mut i.ram_pages_to_update,
        |i| &mut i.modified_ram_pages,
    ];

    #[test]
    fn init_rejects_each_misaligned_pointer() {
        let host = mapped_host();
        for (n, field) in POINTER_FIELDS.iter().enumerate() {
            for offset in [1, 8, 0x800] {
                let mut init = good_init();
                *field(&mut init) += offset;
                assert_eq!(
                    Instance::new(&host, &init).err(),
                    Some(Error::InvalidArgument),
                    "field {n} +{offset}"
                );
            }
        }
        assert!(host.state().held_pages.is_empty());
    }

    #[test]
    fn init_rejects_buffers_outside_the_user_half() {
        let host = mapped_host();
        for (n, field) in POINTER_FIELDS.iter().enumerate() {
            // Last page of the user half (fits for the one-page lists and
            // the dirty bytes of this small RAM, not for the RAM itself),
            // first page of the upper half, and a wrapping address.
            for (addr, fits) in [
                (USER_ADDRESS_LIMIT - 0x1000, n != 0),
                (USER_ADDRESS_LIMIT, false),
                (LAST_PAGE, false),
            ] {
                let mut init = good_init();
                *field(&mut init) = addr;
                let err = Instance::new(&host, &init).err();
                let want = if fits {
                    Error::Fault
                } else {
                    Error::InvalidArgument
                };
                assert_eq!(err, Some(want), "field {n} at {addr:#x}");
            }
        }
    }

    #[test]
    fn init_faults_on_each_unmapped_buffer() {
        for (n, field) in POINTER_FIELDS.iter().enumerate() {
            let host = mapped_host();
            let mut init = good_init();
            *field(&mut init) = 0x4000_0000;
            assert_eq!(
                Instance::new(&host, &init).err(),
                Some(Error::Fault),
                "field {n}"
            );
            assert!(
                host.state().held_pages.is_empty(),
                "field {n} leaked a held page"
            );
            assert_eq!(host.state().live_allocs, 0);
        }
    }

    #[test]
    fn init_faults_on_partly_mapped_or_read_only_buffers() {
        let host = MockHost::default();
        host.map(RAM, RAM_SIZE - KQEMU_PAGE_SIZE, true);
        host.map(DIRTY, 0x1000, true);
        host.map(LISTS[0], 0x2000, true);
        host.map(LISTS[2], 0x1000, false);
        assert_eq!(Instance::new(&host, &good_init()).err(), Some(Error::Fault));
        host.map(RAM + RAM_SIZE - KQEMU_PAGE_SIZE, KQEMU_PAGE_SIZE, true);
        // RAM now complete; the read-only modified_ram_pages page remains.
        assert_eq!(Instance::new(&host, &good_init()).err(), Some(Error::Fault));
        assert!(host.state().held_pages.is_empty());
    }

    #[test]
    fn init_reports_no_memory_and_releases_the_pages() {
        let host = mapped_host();
        host.state().allocs_before_failure = Some(0);
        assert_eq!(
            Instance::new(&host, &good_init()).err(),
            Some(Error::NoMemory)
        );
        assert!(host.state().held_pages.is_empty());
        let log = host.state().log.clone();
        assert_eq!(log.len(), 1);
        assert!(log[0].contains("guest-physical map"), "{log:?}");
    }

    #[test]
    fn set_phys_mem_records_ranges() {
        let host = mapped_host();
        let mut inst = instance(&host);
        inst.set_phys_mem(&phys(0, 0xa_0000, 0, KQEMU_IO_MEM_RAM))
            .expect("low RAM");
        inst.set_phys_mem(&phys(0xc_0000, 0x2_0000, 0x30_0000, KQEMU_IO_MEM_ROM))
            .expect("option ROM");
        inst.set_phys_mem(&phys(0xff00_0000, 0x1000, 0xdead_0000, KQEMU_IO_MEM_COMM))
            .expect("comm page");
        let map = inst.phys_map();
        assert_eq!(map.ranges().len(), 3);
        assert_eq!(
            map.lookup(0x9_f000),
            Some(PhysRange {
                start: 0,
                end: 0xa_0000,
                ram_addr: 0,
                kind: PhysKind::Ram
            })
        );
        assert_eq!(map.lookup(0xa_0000), None);
        assert_eq!(
            map.lookup(0xc_1000).map(|r| (r.kind, r.ram_addr)),
            Some((PhysKind::Rom, 0x30_0000))
        );
        // The communication page does not point into RAM.
        assert_eq!(
            map.lookup(0xff00_0fff).map(|r| (r.kind, r.ram_addr)),
            Some((PhysKind::Comm, 0))
        );
        assert_eq!(map.lookup(0xff00_1000), None);
    }

    #[test]
    fn set_phys_mem_rejects_each_invalid_field() {
        let host = mapped_host();
        let mut inst = instance(&host);
        let bad = [
            phys(0x800, 0x1000, 0, KQEMU_IO_MEM_RAM),
            phys(0x1000, 0x800, 0, KQEMU_IO_MEM_RAM),
            phys(0x1000, 0x1000, 0x10, KQEMU_IO_MEM_RAM),
            phys(0x1000, 0, 0, KQEMU_IO_MEM_RAM),
            phys(LAST_PAGE, 0x2000, 0, KQEMU_IO_MEM_UNASSIGNED),
            phys(KQEMU_MAX_GUEST_PHYS - 0x1000, 0x2000, 0, KQEMU_IO_MEM_COMM),
            phys(KQEMU_MAX_GUEST_PHYS, 0x1000, 0, KQEMU_IO_MEM_UNASSIGNED),
            phys(0, RAM_SIZE + 0x1000, 0, KQEMU_IO_MEM_RAM),
            phys(0, 0x2000, RAM_SIZE - 0x1000, KQEMU_IO_MEM_ROM),
            phys(0, 0x1000, LAST_PAGE, KQEMU_IO_MEM_RAM),
            phys(0, 0x1000, 0, 4),
            phys(0, 0x1000, 0, u32::MAX),
        ];
        for m in bad {
            assert_eq!(inst.set_phys_mem(&m), Err(Error::InvalidArgument), "{m:?}");
        }
        assert!(inst.phys_map().ranges().is_empty());
    }

    #[test]
    fn set_phys_mem_accepts_the_limits() {
        let host = mapped_host();
        let mut inst = instance(&host);
        let good = [
            phys(KQEMU_MAX_GUEST_PHYS - 0x1000, 0x1000, 0, KQEMU_IO_MEM_COMM),
            phys(0x1_0000_0000, RAM_SIZE, 0, KQEMU_IO_MEM_RAM),
            phys(0x2_0000_0000, 0x1000, RAM_SIZE - 0x1000, KQEMU_IO_MEM_ROM),
            // Device memory anywhere below the limit; ram_addr is not RAM.
            phys(0x3_0000_0000, 0x10_0000, LAST_PAGE, KQEMU_IO_MEM_UNASSIGNED),
            KqemuPhysMem {
                padding1: 0xdead_beef,
                ..phys(0, 0x1000, 0, KQEMU_IO_MEM_RAM)
            },
        ];
        for m in good {
            assert_eq!(inst.set_phys_mem(&m), Ok(()), "{m:?}");
        }
        assert_eq!(inst.phys_map().ranges().len(), 4);
    }

    #[test]
    fn later_ranges_override_the_overlapping_part() {
        let host = mapped_host();
        let mut inst = instance(&host);
        inst.set_phys_mem(&phys(0, 0x10_0000, 0, KQEMU_IO_MEM_RAM))
            .expect("RAM");
        // A VGA window in the middle: RAM splits around it.
        inst.set_phys_mem(&phys(0xa_0000, 0x2_0000, 0, KQEMU_IO_MEM_UNASSIGNED))
            .expect("VGA");
        // ROM over the end of the RAM and beyond.
        inst.set_phys_mem(&phys(0xf_0000, 0x2_0000, 0x20_0000, KQEMU_IO_MEM_ROM))
            .expect("BIOS");
        let map = inst.phys_map();
        assert_eq!(
            map.ranges(),
            [
                PhysRange {
                    start: 0,
                    end: 0xa_0000,
                    ram_addr: 0,
                    kind: PhysKind::Ram
                },
                PhysRange {
                    start: 0xc_0000,
                    end: 0xf_0000,
                    ram_addr: 0xc_0000,
                    kind: PhysKind::Ram
                },
                PhysRange {
                    start: 0xf_0000,
                    end: 0x11_0000,
                    ram_addr: 0x20_0000,
                    kind: PhysKind::Rom
                },
            ]
        );
        // Re-registering the RAM behind the VGA window joins it again.
        inst.set_phys_mem(&phys(0xa_0000, 0x2_0000, 0xa_0000, KQEMU_IO_MEM_RAM))
            .expect("VGA off");
        assert_eq!(
            inst.phys_map().ranges()[0],
            PhysRange {
                start: 0,
                end: 0xf_0000,
                ram_addr: 0,
                kind: PhysKind::Ram
            }
        );
        assert_eq!(inst.phys_map().ranges().len(), 2);
    }

    #[test]
    fn unassigned_removes_and_never_takes_room() {
        let host = mapped_host();
        let mut map = PhysMap::new(&host).expect("memory");
        map.set(0x5000, 0x9000, None).expect("nothing to remove");
        assert!(map.ranges().is_empty());
        map.set(0x1000, 0x9000, Some((PhysKind::Ram, 0)))
            .expect("RAM");
        map.set(0x0000, 0x10000, None).expect("remove all");
        assert!(map.ranges().is_empty());
    }

    #[test]
    fn capacity_is_enforced_without_partial_updates() {
        const STEP: u64 = 0x3000;
        let host = mapped_host();
        let mut map = PhysMap::new(&host).expect("memory");
        // Three-page ranges, alternately RAM and ROM, so no two merge.
        for i in 0..KQEMU_MAX_PHYS_RANGES as u64 {
            let kind = if i % 2 == 0 {
                PhysKind::Ram
            } else {
                PhysKind::Rom
            };
            map.set(i * STEP, (i + 1) * STEP, Some((kind, i * STEP)))
                .expect("room");
        }
        assert_eq!(map.ranges().len(), KQEMU_MAX_PHYS_RANGES);
        let before: Vec<PhysRange> = map.ranges().to_vec();
        let top = KQEMU_MAX_PHYS_RANGES as u64 * STEP;
        assert_eq!(
            map.set(top, top + 0x1000, Some((PhysKind::Comm, 0))),
            Err(Error::NoSpace)
        );
        // A hole in the middle of a range needs one more slot, a different
        // page there two more.
        assert_eq!(map.set(0x1000, 0x2000, None), Err(Error::NoSpace));
        assert_eq!(
            map.set(0x1000, 0x2000, Some((PhysKind::Comm, 0))),
            Err(Error::NoSpace)
        );
        assert_eq!(map.ranges(), before.as_slice());
        // Replacing a whole range keeps the count; trimming one too.
        map.set(STEP, 2 * STEP, Some((PhysKind::Comm, 0)))
            .expect("same count");
        map.set(0, 0x1000, None).expect("trim");
        assert_eq!(map.ranges().len(), KQEMU_MAX_PHYS_RANGES);
        // RAM that continues both neighbours merges all three.
        map.set(STEP, 2 * STEP, Some((PhysKind::Ram, STEP)))
            .expect("merges");
        assert_eq!(map.ranges().len(), KQEMU_MAX_PHYS_RANGES - 2);
        assert_eq!(
            map.ranges()[0],
            PhysRange {
                start: 0x1000,
                end: 3 * STEP,
                ram_addr: 0x1000,
                kind: PhysKind::Ram
            }
        );
        assert_eq!(
            map.set(top, top + 0x1000, Some((PhysKind::Comm, 0))),
            Ok(())
        );
        // Covering everything with one range frees all the rest.
        map.set(0, top + 0x1000, None).expect("remove all");
        assert!(map.ranges().is_empty());
    }

    /// Deterministic pseudo-random numbers (xorshift64) for the model test.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    #[test]
    fn map_matches_a_page_by_page_model() {
        const PAGES: u64 = 96;
        let host = mapped_host();
        let mut map = PhysMap::new(&host).expect("memory");
        // The model: for each page, its kind and RAM offset.
        let mut model: Vec<Option<(PhysKind, u64)>> = std::vec![None; PAGES as usize];
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for step in 0..4000 {
            let start = rng.below(PAGES);
            let end = start + 1 + rng.below(PAGES - start);
            let backing = match rng.below(5) {
                0 => None,
                1 => Some((PhysKind::Comm, 0)),
                2 => Some((PhysKind::Rom, rng.below(4) * 0x1000)),
                // RAM mostly at the identity offset, so merges happen.
                _ => Some((
                    PhysKind::Ram,
                    if rng.below(3) == 0 {
                        0x7000
                    } else {
                        start * 0x1000
                    },
                )),
            };
            map.set(start * 0x1000, end * 0x1000, backing)
                .expect("few ranges");
            for page in start..end {
                model[page as usize] = backing.map(|(kind, ram_addr)| match kind {
                    PhysKind::Comm => (kind, 0),
                    _ => (kind, ram_addr + (page - start) * 0x1000),
                });
            }
            for (page, want) in model.iter().enumerate() {
                let addr = page as u64 * 0x1000 + rng.below(0x1000);
                let got = map.lookup(addr).map(|r| {
                    let ram = if r.kind == PhysKind::Comm {
                        0
                    } else {
                        r.ram_addr + (addr & !0xfff) - r.start
                    };
                    (r.kind, ram)
                });
                assert_eq!(got, *want, "step {step}, page {page}");
            }
            let ranges = map.ranges();
            for pair in ranges.windows(2) {
                assert!(
                    pair[0].end <= pair[1].start,
                    "sorted and disjoint at step {step}"
                );
                assert!(
                    pair[0].merge(&pair[1]).is_none(),
                    "not merged at step {step}: {pair:?}"
                );
            }
            assert!(ranges.iter().all(|r| r.start < r.end));
        }
    }

    #[test]
    fn modify_ram_pages_counts() {
        let host = mapped_host();
        let mut inst = instance(&host);
        for ok in [0, 1, 512] {
            assert_eq!(inst.modify_ram_pages(ok), Ok(()), "{ok}");
        }
        for bad in [513, -1, i32::MIN, i32::MAX] {
            assert_eq!(
                inst.modify_ram_pages(bad),
                Err(Error::InvalidArgument),
                "{bad}"
            );
        }
    }

    /// After fork or descriptor passing another process calls on the
    /// open file: its address space is not the one INIT held pages of.
    #[test]
    fn another_address_space_gets_eperm() {
        let host = mapped_host();
        host.state().space = 0x1000;
        let mut inst = instance(&host);
        let mut state = KqemuCpuState::default();
        host.state().space = 0x2000;
        let holds = host.state().holds;
        assert_eq!(inst.exec(&mut state), Err(Error::Permission));
        assert_eq!(inst.modify_ram_pages(0), Err(Error::Permission));
        assert_eq!(
            inst.set_phys_mem(&phys(0, 0x1000, 0, KQEMU_IO_MEM_RAM)),
            Err(Error::Permission)
        );
        assert!(inst.phys_map().ranges().is_empty(), "nothing recorded");
        assert_eq!(
            host.state().holds,
            holds,
            "nothing held for the other process"
        );
        // The INIT process itself goes on.
        host.state().space = 0x1000;
        assert_eq!(
            inst.set_phys_mem(&phys(0, 0x1000, 0, KQEMU_IO_MEM_RAM)),
            Ok(())
        );
        assert_eq!(inst.modify_ram_pages(0), Ok(()));
        assert_eq!(inst.exec(&mut state), Ok(()));
        assert_eq!(state.retval, KQEMU_RET_ABORT);
    }

    #[test]
    fn exec_answers_abort_until_the_monitor_lands() {
        let host = mapped_host();
        let mut inst = instance(&host);
        let mut state = KqemuCpuState {
            eip: 0x1234,
            cpl: 3,
            user_only: 1,
            ..Default::default()
        };
        assert_eq!(inst.exec(&mut state), Ok(()));
        assert_eq!(state.retval, KQEMU_RET_ABORT);
        assert_eq!((state.eip, state.cpl, state.user_only), (0x1234, 3, 1));
    }

    /// What INIT reserves for `good_init`: the three list pages, one page
    /// of dirty bytes (1024 RAM pages), the cache's minimum and one
    /// transient hold.
    const MINIMUM: usize = 3 + 1 + crate::monitor::ram::MIN_LOCKED_PAGES + 1;

    #[test]
    fn init_reserves_its_minimum_and_close_gives_it_back() {
        let host = mapped_host();
        host.state().max_locked = Some(2 * MINIMUM);
        let a = instance(&host);
        assert_eq!(host.lock_budget().promised(), MINIMUM);
        // Held pages are booked by the host and covered by the share.
        assert_eq!(host.lock_budget().held(), 3);
        let b = instance(&host);
        assert_eq!(host.lock_budget().promised(), 2 * MINIMUM);
        drop((a, b));
        assert_eq!(host.lock_budget().promised(), 0);
        assert_eq!(host.lock_budget().held(), 0);
    }

    #[test]
    fn init_past_the_limit_is_enomem_with_a_log_line() {
        let host = mapped_host();
        host.state().max_locked = Some(MINIMUM + 5);
        let first = instance(&host);
        assert_eq!(
            Instance::new(&host, &good_init()).err(),
            Some(Error::NoMemory)
        );
        let log = host.state().log.clone();
        assert_eq!(log.len(), 1, "{log:?}");
        assert!(
            log[0].contains("mock.max_locked_pages=26")
                && log[0].contains(&refusal_prefix(MINIMUM))
                && log[0].contains("(21 promised to other instances)"),
            "{log:?}"
        );
        // Nothing was taken by the refused INIT.
        assert_eq!(host.lock_budget().promised(), MINIMUM);
        assert_eq!(host.state().held_pages.len(), 3);
        drop(first);
        // A lowered limit refuses even the first instance.
        host.state().max_locked = Some(MINIMUM - 1);
        assert_eq!(
            Instance::new(&host, &good_init()).err(),
            Some(Error::NoMemory)
        );
        host.state().max_locked = Some(MINIMUM);
        assert!(Instance::new(&host, &good_init()).is_ok());
        // A list page that cannot be held after the reservation: EFAULT,
        // and the reservation is given back.
        host.unmap(LISTS[2]);
        assert_eq!(Instance::new(&host, &good_init()).err(), Some(Error::Fault));
        assert_eq!(host.lock_budget().promised(), 0);
        assert!(host.state().held_pages.is_empty());
    }

    fn refusal_prefix(n: usize) -> std::string::String {
        std::format!("KQEMU_INIT: {n} pages to lock")
    }

    #[test]
    fn unmapped_guest_ram_is_efault_at_the_next_exec() {
        let host = mapped_host();
        let mut inst = instance(&host);
        let mut state = KqemuCpuState::default();
        assert_eq!(inst.exec(&mut state), Ok(()));
        // munmap of guest RAM between two EXECs.
        host.unmap(RAM);
        assert_eq!(inst.exec(&mut state), Err(Error::Fault));
        // The recorded objects are let go: the unmapped memory is not
        // kept alive while the calls fail.
        assert!(host.state().object_refs.is_empty());
        assert_eq!(inst.modify_ram_pages(0), Err(Error::Fault));
        assert_eq!(inst.exec(&mut state), Err(Error::Fault), "still gone");
        // Mapped again (as a client would after mmap MAP_FIXED): runs, and
        // the list pages are held anew (released and held: still three).
        host.map(RAM, RAM_SIZE, true);
        assert_eq!(inst.exec(&mut state), Ok(()));
        assert_eq!(host.state().held_pages.len(), 3);
        assert_eq!(inst.exec(&mut state), Ok(()));
        // The list pages themselves gone: EFAULT too.
        host.unmap(LISTS[2]);
        assert_eq!(inst.exec(&mut state), Err(Error::Fault));
        drop(inst);
        assert!(host.state().held_pages.is_empty());
        assert_eq!(host.lock_budget().promised(), 0);
    }

    #[test]
    fn unrelated_map_changes_keep_running() {
        let host = mapped_host();
        let mut inst = instance(&host);
        let mut state = KqemuCpuState::default();
        let holds = host.state().holds;
        // mmap elsewhere, and a change that leaves every mapping as it was
        // (an mprotect elsewhere, a first fault): the version moves, the
        // mappings behind the instance's ranges stay, so nothing is held
        // again.
        host.map(0x4000_0000, 0x1000, true);
        assert_eq!(inst.exec(&mut state), Ok(()));
        host.touch_map();
        assert_eq!(inst.modify_ram_pages(0), Ok(()));
        host.unmap(0x4000_0000);
        assert_eq!(inst.exec(&mut state), Ok(()));
        assert_eq!(host.state().holds, holds, "no list page held again");
        assert_eq!(host.state().held_pages.len(), 3);
    }

    #[test]
    fn guest_ram_mapped_anew_at_the_same_address_is_noticed() {
        let host = mapped_host();
        let mut inst = instance(&host);
        let mut state = KqemuCpuState::default();
        let holds = host.state().holds;
        // munmap + mmap MAP_FIXED: the same range, another object. The
        // client sees the new memory, so the module must too: the caches
        // go and the list pages are held anew.
        host.unmap(RAM);
        host.map(RAM, RAM_SIZE, true);
        assert_eq!(inst.exec(&mut state), Ok(()));
        assert_eq!(host.state().holds, holds + 3);
        // Recorded anew: the next unrelated change keeps everything.
        host.touch_map();
        assert_eq!(inst.exec(&mut state), Ok(()));
        assert_eq!(host.state().holds, holds + 3);
        // The dirty bytes replaced the same way: noticed too.
        host.unmap(DIRTY);
        host.map(DIRTY, RAM_SIZE / KQEMU_PAGE_SIZE, true);
        assert_eq!(inst.modify_ram_pages(0), Ok(()));
        assert_eq!(host.state().holds, holds + 6);
        // One reference per recorded range (the two list mappings hold
        // two and one), given back with the instance.
        let refs: u32 = host.state().object_refs.values().sum();
        assert_eq!(refs, 5);
        drop(inst);
        assert!(host.state().object_refs.is_empty());
    }

    #[test]
    fn ram_over_too_many_mappings_is_checked_at_every_change() {
        // Guest RAM over more mappings than are recorded: the host cannot
        // tell, so every change of the map is treated as one of the RAM.
        let host = MockHost::default();
        let pieces = 2 * MAX_BACKING_PIECES as u64;
        let piece = RAM_SIZE / pieces;
        for i in 0..pieces {
            host.map(RAM + i * piece, piece, true);
        }
        host.map(DIRTY, RAM_SIZE / KQEMU_PAGE_SIZE, true);
        host.map(LISTS[0], 0x2000, true);
        host.map(LISTS[2], 0x1000, true);
        assert_eq!(host.user_range_backing(RAM, RAM_SIZE), None);
        let mut inst = instance(&host);
        let mut state = KqemuCpuState::default();
        let holds = host.state().holds;
        host.touch_map();
        assert_eq!(inst.exec(&mut state), Ok(()));
        assert_eq!(host.state().holds, holds + 3);
    }
}
