//! The address space of one process: its page tables, the ranges it reserved (ELF
//! segments, brk heap, mmap regions, the stack reserve), and access to its memory.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use crate::context::{Arch, PagingFormat};
use crate::errno::{Errno, KResult};
use crate::paging::{PageTables, PROT_READ, PROT_WRITE};
use crate::ram::{page_down, page_up, GuestRam, PAGE_SIZE};

/// Top of the amd64 user half (Linux `TASK_SIZE_MAX`: 2^47 minus a guard page).
pub const AMD64_USER_TOP: u64 = 0x7fff_ffff_f000;
/// Top of i386 user space (Linux's default 3G/1G split, `PAGE_OFFSET`); also used under
/// Long4 so that a 32-bit program sees the same layout in every paging format.
pub const I386_USER_TOP: u64 = 0xc000_0000;
/// The stack can grow to this size (the default `RLIMIT_STACK`).
pub const STACK_RESERVE: u64 = 8 << 20;
/// Mapped at exec; the rest of the reserve is mapped when the program touches it.
const STACK_INITIAL: u64 = 128 << 10;
/// Lowest address `mmap` hands out (Linux `vm.mmap_min_addr` default).
const MMAP_MIN_ADDR: u64 = 0x1_0000;
/// `MAP_32BIT` (amd64) places mappings in the second GiB, as Linux does.
const MAP_32BIT_LOW: u64 = 0x4000_0000;
const MAP_32BIT_HIGH: u64 = 0x8000_0000;

/// `mremap` flags (Linux uapi/linux/mman.h).
pub const MREMAP_MAYMOVE: u32 = 1;
pub const MREMAP_FIXED: u32 = 2;

/// Where `map_region` may put a mapping.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Placement {
    /// Anywhere (`addr` is a hint).
    Hint(u64),
    /// Exactly there, replacing what was mapped (`MAP_FIXED`).
    Fixed(u64),
    /// Exactly there, EEXIST if anything is mapped (`MAP_FIXED_NOREPLACE`).
    FixedNoReplace(u64),
    /// Anywhere below 2 GiB (`MAP_32BIT`).
    Low32,
}

/// One process's address space.
#[derive(Debug)]
pub struct Mm {
    pub(crate) pt: PageTables,
    /// Reserved ranges, start → end (half-open, page aligned, non-overlapping, merged).
    areas: BTreeMap<u64, u64>,
    pub(crate) brk_start: u64,
    pub(crate) brk: u64,
    pub(crate) stack_top: u64,
    /// Lowest mapped stack page; the reserve below it down to `stack_limit` maps on demand.
    stack_low: u64,
    stack_limit: u64,
    /// Set when a mapping was removed or reduced: the runner must flush stale translations.
    pub(crate) tlb_stale: bool,
}

/// The top of user space for a program of `arch`.
pub fn user_top(arch: Arch) -> u64 {
    match arch {
        Arch::Amd64 => AMD64_USER_TOP,
        Arch::I386 => I386_USER_TOP,
    }
}

impl Mm {
    /// An empty address space with its stack reserve (nothing mapped yet).
    pub fn new(
        ram: &mut GuestRam,
        arch: Arch,
        format: PagingFormat,
        nx: bool,
        kernel_entries: &[(usize, u64)],
    ) -> KResult<Self> {
        if arch == Arch::Amd64 && format != PagingFormat::Long4 {
            return Err(Errno::ENOEXEC);
        }
        let top = user_top(arch);
        let pt = PageTables::new(ram, format, nx, top, kernel_entries)?;
        let mut mm = Mm {
            pt,
            areas: BTreeMap::new(),
            brk_start: 0,
            brk: 0,
            stack_top: top,
            stack_low: top,
            stack_limit: top - STACK_RESERVE,
            tlb_stale: false,
        };
        mm.reserve(mm.stack_limit, top);
        Ok(mm)
    }

    /// CR3 for this address space.
    pub fn cr3(&self) -> u64 {
        self.pt.cr3()
    }

    pub fn user_top(&self) -> u64 {
        self.pt.user_top()
    }

    /// True if no reserved range overlaps `start..end`.
    pub fn is_free(&self, start: u64, end: u64) -> bool {
        if start >= end {
            return true;
        }
        match self.areas.range(..end).next_back() {
            Some((_, &area_end)) => area_end <= start,
            None => true,
        }
    }

    /// True if `start..end` is entirely reserved.
    pub fn is_covered(&self, start: u64, end: u64) -> bool {
        let mut cursor = start;
        for (&area_start, &area_end) in self.areas.range(..end) {
            if area_end <= cursor {
                continue;
            }
            if area_start > cursor {
                return false;
            }
            cursor = area_end;
            if cursor >= end {
                return true;
            }
        }
        cursor >= end
    }

    fn reserve(&mut self, mut start: u64, mut end: u64) {
        if start >= end {
            return;
        }
        // Merge with touching or overlapping neighbours.
        if let Some((&s, &e)) = self.areas.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
                self.areas.remove(&s);
            }
        }
        let touching: Vec<(u64, u64)> = self
            .areas
            .range(start..=end)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in touching {
            end = end.max(e);
            self.areas.remove(&s);
        }
        self.areas.insert(start, end);
    }

    fn release(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let overlapping: Vec<(u64, u64)> = self
            .areas
            .range(..end)
            .filter(|(_, &e)| e > start)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in overlapping {
            self.areas.remove(&s);
            if s < start {
                self.areas.insert(s, start);
            }
            if e > end {
                self.areas.insert(end, e);
            }
        }
    }

    /// The highest free range of `len` bytes inside `low..high`.
    fn find_free(&self, len: u64, low: u64, high: u64) -> Option<u64> {
        let mut hole_end = high;
        for (&s, &e) in self.areas.range(..high).rev() {
            if e <= hole_end && hole_end - e >= len && hole_end - len >= low {
                return Some(hole_end - len);
            }
            hole_end = hole_end.min(s);
            if hole_end < low.saturating_add(len) {
                return None;
            }
        }
        (hole_end >= low.saturating_add(len)).then(|| hole_end - len)
    }

    /// Maps fresh zeroed frames at `start..end`; on failure unmaps what it mapped.
    fn map_fresh(&mut self, ram: &mut GuestRam, start: u64, end: u64, prot: u32) -> KResult<()> {
        let mut va = start;
        while va < end {
            let mapped = self.pt.alloc_frame(ram).and_then(|frame| {
                match self.pt.map(ram, va, frame, prot) {
                    Ok(()) => Ok(()),
                    Err(err) => {
                        ram.free_frame(frame);
                        Err(err)
                    }
                }
            });
            if let Err(err) = mapped {
                self.unmap_pages(ram, start, va);
                return Err(err);
            }
            va += PAGE_SIZE;
        }
        Ok(())
    }

    fn unmap_pages(&mut self, ram: &mut GuestRam, start: u64, end: u64) {
        let mut cursor = start;
        while let Some(leaf) = self.pt.next_leaf(ram, cursor, end) {
            if let Some(entry) = self.pt.take(ram, leaf.va) {
                ram.free_frame(self.pt.entry_frame(entry));
            }
            self.tlb_stale = true;
            cursor = leaf.va + PAGE_SIZE;
        }
    }

    /// Reserves and maps `len` bytes (page multiple) of zeroed memory; returns the address.
    pub fn map_region(
        &mut self,
        ram: &mut GuestRam,
        placement: Placement,
        len: u64,
        prot: u32,
    ) -> KResult<u64> {
        let top = self.user_top();
        if len == 0 || !len.is_multiple_of(PAGE_SIZE) {
            return Err(Errno::EINVAL);
        }
        let fits = |addr: u64| addr.checked_add(len).is_some_and(|end| end <= top);
        let start = match placement {
            Placement::Fixed(addr) | Placement::FixedNoReplace(addr) => {
                if !addr.is_multiple_of(PAGE_SIZE) || !fits(addr) || addr < MMAP_MIN_ADDR {
                    return Err(if !addr.is_multiple_of(PAGE_SIZE) {
                        Errno::EINVAL
                    } else {
                        Errno::ENOMEM
                    });
                }
                if !self.is_free(addr, addr + len) {
                    if matches!(placement, Placement::FixedNoReplace(_)) {
                        return Err(Errno::EEXIST);
                    }
                    self.unmap(ram, addr, len)?;
                }
                addr
            }
            Placement::Hint(hint) => {
                let hint = page_down(hint);
                if hint >= MMAP_MIN_ADDR && fits(hint) && self.is_free(hint, hint + len) {
                    hint
                } else {
                    self.find_free(len, MMAP_MIN_ADDR, self.stack_limit)
                        .ok_or(Errno::ENOMEM)?
                }
            }
            Placement::Low32 => self
                .find_free(len, MAP_32BIT_LOW, MAP_32BIT_HIGH.min(top))
                .ok_or(Errno::ENOMEM)?,
        };
        self.map_fresh(ram, start, start + len, prot)?;
        self.reserve(start, start + len);
        Ok(start)
    }

    /// Removes every mapping in `addr..addr+len` (`munmap`).
    pub fn unmap(&mut self, ram: &mut GuestRam, addr: u64, len: u64) -> KResult<()> {
        if !addr.is_multiple_of(PAGE_SIZE) || len == 0 {
            return Err(Errno::EINVAL);
        }
        let end = page_up(len)
            .and_then(|len| addr.checked_add(len))
            .filter(|&end| end <= self.user_top())
            .ok_or(Errno::EINVAL)?;
        self.unmap_pages(ram, addr, end);
        self.release(addr, end);
        if addr < self.stack_top && end > self.stack_limit {
            // The stack reserve is gone where it was unmapped: never grow into it again.
            self.stack_limit = self.stack_limit.max(end.min(self.stack_low));
        }
        Ok(())
    }

    /// Changes the protection of `addr..addr+len` (`mprotect`); ENOMEM if not all mapped.
    pub fn protect(&mut self, ram: &mut GuestRam, addr: u64, len: u64, prot: u32) -> KResult<()> {
        if !addr.is_multiple_of(PAGE_SIZE) {
            return Err(Errno::EINVAL);
        }
        let end = page_up(len)
            .and_then(|len| addr.checked_add(len))
            .ok_or(Errno::ENOMEM)?;
        if end > self.user_top() || !self.is_covered(addr, end) {
            return Err(Errno::ENOMEM);
        }
        let mut cursor = addr;
        while let Some(leaf) = self.pt.next_leaf(ram, cursor, end) {
            self.pt.protect(ram, leaf.va, prot);
            cursor = leaf.va + PAGE_SIZE;
        }
        self.tlb_stale = true;
        Ok(())
    }

    /// Moves or resizes a mapping (`mremap`); returns its new address.
    pub fn remap(
        &mut self,
        ram: &mut GuestRam,
        old: u64,
        old_len: u64,
        new_len: u64,
        flags: u32,
        new_addr: u64,
    ) -> KResult<u64> {
        let top = self.user_top();
        if !old.is_multiple_of(PAGE_SIZE)
            || flags & !(MREMAP_MAYMOVE | MREMAP_FIXED) != 0
            || (flags & MREMAP_FIXED != 0 && flags & MREMAP_MAYMOVE == 0)
        {
            return Err(Errno::EINVAL);
        }
        let old_len = page_up(old_len).ok_or(Errno::EINVAL)?;
        let new_len = page_up(new_len).ok_or(Errno::EINVAL)?;
        if old_len == 0 || new_len == 0 {
            return Err(Errno::EINVAL);
        }
        let old_end = old.checked_add(old_len).filter(|&e| e <= top);
        let old_end = old_end.ok_or(Errno::EFAULT)?;
        if !self.is_covered(old, old_end) {
            return Err(Errno::EFAULT);
        }
        let tail_prot = self
            .pt
            .leaf(ram, old_end - PAGE_SIZE)
            .map(|entry| self.pt.entry_prot(entry))
            .unwrap_or(PROT_READ | PROT_WRITE);
        if flags & MREMAP_FIXED == 0 {
            if new_len <= old_len {
                self.unmap(ram, old + new_len, old_len - new_len)?;
                return Ok(old);
            }
            let grown_end = old.checked_add(new_len).filter(|&e| e <= top);
            if let Some(grown_end) = grown_end {
                if self.is_free(old_end, grown_end) {
                    self.map_fresh(ram, old_end, grown_end, tail_prot)?;
                    self.reserve(old_end, grown_end);
                    return Ok(old);
                }
            }
            if flags & MREMAP_MAYMOVE == 0 {
                return Err(Errno::ENOMEM);
            }
        }
        let dest = if flags & MREMAP_FIXED != 0 {
            let dest_end = new_addr.checked_add(new_len).filter(|&e| e <= top);
            let dest_end = dest_end.ok_or(Errno::EINVAL)?;
            if !new_addr.is_multiple_of(PAGE_SIZE) || (new_addr < old_end && dest_end > old) {
                return Err(Errno::EINVAL);
            }
            self.unmap(ram, new_addr, new_len)?;
            new_addr
        } else {
            self.find_free(new_len, MMAP_MIN_ADDR, self.stack_limit)
                .ok_or(Errno::ENOMEM)?
        };
        let keep = old_len.min(new_len);
        // Create the destination tables first so that moving entries cannot fail halfway.
        let mut va = dest;
        while va < dest + keep {
            self.pt.set_leaf(ram, va, 0)?;
            va += PAGE_SIZE;
        }
        if new_len > old_len {
            self.map_fresh(ram, dest + old_len, dest + new_len, tail_prot)?;
        }
        let mut cursor = old;
        while let Some(leaf) = self.pt.next_leaf(ram, cursor, old + keep) {
            if let Some(entry) = self.pt.take(ram, leaf.va) {
                self.pt.set_leaf(ram, dest + (leaf.va - old), entry)?;
            }
            cursor = leaf.va + PAGE_SIZE;
        }
        self.unmap_pages(ram, old + keep, old_end);
        self.release(old, old_end);
        self.reserve(dest, dest + new_len);
        self.tlb_stale = true;
        Ok(dest)
    }

    /// Sets up the heap after the program's last segment.
    pub(crate) fn init_brk(&mut self, end_of_image: u64) -> KResult<()> {
        let start = page_up(end_of_image).ok_or(Errno::ENOMEM)?;
        self.brk_start = start;
        self.brk = start;
        Ok(())
    }

    /// `brk`: moves the program break if it can and returns the (new or old) break.
    pub fn set_brk(&mut self, ram: &mut GuestRam, new: u64) -> u64 {
        if new < self.brk_start || new > self.user_top() {
            return self.brk;
        }
        let (Some(old_top), Some(new_top)) = (page_up(self.brk), page_up(new)) else {
            return self.brk;
        };
        if new_top > old_top {
            if !self.is_free(old_top, new_top)
                || self
                    .map_fresh(ram, old_top, new_top, PROT_READ | PROT_WRITE)
                    .is_err()
            {
                return self.brk;
            }
            self.reserve(old_top, new_top);
        } else if new_top < old_top {
            self.unmap_pages(ram, new_top, old_top);
            self.release(new_top, old_top);
        }
        self.brk = new;
        self.brk
    }

    /// Maps the initial stack pages below `stack_top`.
    pub(crate) fn map_initial_stack(&mut self, ram: &mut GuestRam, prot: u32) -> KResult<()> {
        let low = self.stack_top - STACK_INITIAL;
        self.map_fresh(ram, low, self.stack_top, prot)?;
        self.stack_low = low;
        Ok(())
    }

    /// Maps the stack down to `va` if `va` lies in the unmapped part of the stack reserve.
    pub fn grow_stack(&mut self, ram: &mut GuestRam, va: u64) -> bool {
        if va < self.stack_limit || va >= self.stack_low {
            return false;
        }
        let low = page_down(va);
        let prot = self
            .pt
            .leaf(ram, self.stack_low)
            .map(|entry| self.pt.entry_prot(entry))
            .unwrap_or(PROT_READ | PROT_WRITE);
        if self.map_fresh(ram, low, self.stack_low, prot).is_err() {
            return false;
        }
        self.stack_low = low;
        true
    }

    /// Reserves `start..end` and maps zeroed pages there (ELF segments, with `prot`); pages
    /// already mapped keep their frame and get the union of both protections.
    pub(crate) fn map_segment(
        &mut self,
        ram: &mut GuestRam,
        start: u64,
        end: u64,
        prot: u32,
    ) -> KResult<()> {
        let mut va = start;
        while va < end {
            match self.pt.leaf(ram, va) {
                Some(entry) => {
                    let merged = self.pt.entry_prot(entry) | prot;
                    self.pt.protect(ram, va, merged);
                }
                None => self.map_fresh(ram, va, va + PAGE_SIZE, prot)?,
            }
            va += PAGE_SIZE;
        }
        self.reserve(start, end);
        Ok(())
    }

    /// Writes `data` at `va` regardless of page protection (the loader and file mappings).
    pub(crate) fn poke(&mut self, ram: &mut GuestRam, va: u64, data: &[u8]) -> KResult<()> {
        self.copy(ram, va, data.len(), None, |frame, offset, done, len| {
            frame[offset..offset + len].copy_from_slice(&data[done..done + len]);
        })
    }

    /// Copies user memory at `va` into `buf` (EFAULT if any byte is not readable).
    pub fn read(&mut self, ram: &mut GuestRam, va: u64, buf: &mut [u8]) -> KResult<()> {
        let len = buf.len();
        self.copy(ram, va, len, Some(false), |frame, offset, done, n| {
            buf[done..done + n].copy_from_slice(&frame[offset..offset + n]);
        })
    }

    /// Copies `data` into user memory at `va` (EFAULT if any byte is not writable).
    pub fn write(&mut self, ram: &mut GuestRam, va: u64, data: &[u8]) -> KResult<()> {
        self.check(ram, va, data.len() as u64, true)?;
        self.copy(ram, va, data.len(), Some(true), |frame, offset, done, n| {
            frame[offset..offset + n].copy_from_slice(&data[done..done + n]);
        })
    }

    /// Checks that `len` bytes at `va` are accessible (growing the stack if needed).
    pub fn check(&mut self, ram: &mut GuestRam, va: u64, len: u64, write: bool) -> KResult<()> {
        if len == 0 {
            return Ok(());
        }
        let end = va.checked_add(len).ok_or(Errno::EFAULT)?;
        let mut page = page_down(va);
        while page < end {
            self.user_phys(ram, page, write)?;
            page += PAGE_SIZE;
        }
        Ok(())
    }

    /// The physical address of a user access to `va`, growing the stack on demand.
    fn user_phys(&mut self, ram: &mut GuestRam, va: u64, write: bool) -> KResult<u64> {
        match self.pt.translate(ram, va, write) {
            Err(_) if self.grow_stack(ram, va) => self.pt.translate(ram, va, write),
            result => result,
        }
    }

    /// Walks `len` bytes at `va` page by page: `access` is `None` (kernel access) or
    /// `Some(write)` (user access rules); `step(frame, offset, done, n)` moves `n` bytes.
    fn copy(
        &mut self,
        ram: &mut GuestRam,
        va: u64,
        len: usize,
        access: Option<bool>,
        mut step: impl FnMut(&mut [u8], usize, usize, usize),
    ) -> KResult<()> {
        va.checked_add(len as u64).ok_or(Errno::EFAULT)?;
        let mut done = 0;
        while done < len {
            let addr = va + done as u64;
            let phys = match access {
                Some(write) => self.user_phys(ram, addr, write)?,
                None => {
                    let entry = self.pt.leaf(ram, addr).ok_or(Errno::EFAULT)?;
                    self.pt.entry_frame(entry) | (addr % PAGE_SIZE)
                }
            };
            let offset = (phys % PAGE_SIZE) as usize;
            let n = (len - done).min(PAGE_SIZE as usize - offset);
            let frame = ram.frame_mut(page_down(phys)).ok_or(Errno::EFAULT)?;
            step(frame, offset, done, n);
            done += n;
        }
        Ok(())
    }

    /// A NUL-terminated string at `va` of at most `max` bytes (without the NUL);
    /// `too_long` is returned when no NUL comes within `max` bytes.
    pub fn read_cstr(
        &mut self,
        ram: &mut GuestRam,
        va: u64,
        max: usize,
        too_long: Errno,
    ) -> KResult<Vec<u8>> {
        let mut out = Vec::new();
        let mut addr = va;
        loop {
            let phys = self.user_phys(ram, addr, false)?;
            let offset = (phys % PAGE_SIZE) as usize;
            let frame = ram.frame(page_down(phys)).ok_or(Errno::EFAULT)?;
            let chunk = &frame[offset..];
            match chunk.iter().position(|&b| b == 0) {
                Some(nul) => {
                    if out.len() + nul > max {
                        return Err(too_long);
                    }
                    out.extend_from_slice(&chunk[..nul]);
                    return Ok(out);
                }
                None => {
                    if out.len() + chunk.len() > max {
                        return Err(too_long);
                    }
                    out.extend_from_slice(chunk);
                    addr = addr.checked_add(chunk.len() as u64).ok_or(Errno::EFAULT)?;
                }
            }
        }
    }

    /// A copy of this address space in fresh frames (`fork`).
    pub fn duplicate(&self, ram: &mut GuestRam, kernel_entries: &[(usize, u64)]) -> KResult<Mm> {
        let nx = self.pt.has_nx();
        let pt = PageTables::new(ram, self.pt.format(), nx, self.user_top(), kernel_entries)?;
        let child = Mm {
            pt,
            areas: self.areas.clone(),
            brk_start: self.brk_start,
            brk: self.brk,
            stack_top: self.stack_top,
            stack_low: self.stack_low,
            stack_limit: self.stack_limit,
            tlb_stale: false,
        };
        let mut cursor = 0;
        while let Some(leaf) = self.pt.next_leaf(ram, cursor, self.user_top()) {
            let copied = child.pt.alloc_frame(ram).and_then(|frame| {
                let source = self.pt.entry_frame(leaf.entry);
                let entry = (leaf.entry & !self.pt.entry_frame(leaf.entry)) | frame;
                ram.copy_frame(source, frame);
                child.pt.set_leaf(ram, leaf.va, entry).inspect_err(|_| {
                    ram.free_frame(frame);
                })
            });
            if let Err(err) = copied {
                child.destroy(ram);
                return Err(err);
            }
            cursor = leaf.va + PAGE_SIZE;
        }
        Ok(child)
    }

    /// Frees every frame of this address space.
    pub fn destroy(self, ram: &mut GuestRam) {
        self.pt.destroy(ram);
    }
}

impl Mm {
    /// Zeroes the mapped pages of `addr..addr+len` (`MADV_DONTNEED` on private memory).
    pub fn zero_range(&mut self, ram: &mut GuestRam, addr: u64, len: u64) -> KResult<()> {
        let end = addr.checked_add(len).ok_or(Errno::EINVAL)?;
        if !self.is_covered(addr, end) {
            return Err(Errno::ENOMEM);
        }
        let mut cursor = addr;
        while let Some(leaf) = self.pt.next_leaf(ram, cursor, end) {
            if let Some(frame) = ram.frame_mut(self.pt.entry_frame(leaf.entry)) {
                frame.fill(0);
            }
            cursor = leaf.va + PAGE_SIZE;
        }
        Ok(())
    }
}
