//! Page tables of a guest process, built in guest RAM, and the software walk that the
//! OS uses to reach user memory (Intel SDM vol. 3A, chapter 4 "Paging").

use crate::context::PagingFormat;
use crate::errno::{Errno, KResult};
use crate::ram::{page_down, GuestRam, PAGE_SIZE};

/// `mmap` protection bits (Linux uapi/asm-generic/mman-common.h).
pub const PROT_NONE: u32 = 0;
pub const PROT_READ: u32 = 1;
pub const PROT_WRITE: u32 = 2;
pub const PROT_EXEC: u32 = 4;

// Entry bits (SDM vol. 3A, tables 4-4..4-6, 4-8..4-11, 4-14..4-19).
const PTE_P: u64 = 1 << 0;
const PTE_RW: u64 = 1 << 1;
const PTE_US: u64 = 1 << 2;
const PTE_A: u64 = 1 << 5;
const PTE_D: u64 = 1 << 6;
/// Bit 9 is ignored by the CPU in every format: the OS marks the leaves whose frame it owns,
/// including PROT_NONE pages whose entry is not present but keeps the frame address.
const PTE_OWNED: u64 = 1 << 9;
const PTE_NX: u64 = 1 << 63;
/// Physical-address bits of an entry: 31:12 in 32-bit paging, 51:12 with PAE and IA-32e
/// (MAXPHYADDR at most 52).
const ADDR_MASK_32: u64 = 0xffff_f000;
const ADDR_MASK_52: u64 = 0x000f_ffff_ffff_f000;
/// 32-bit paging and the PAE PDPT (CR3 holds 32 bits outside IA-32e mode) need frames below 4 GiB.
const FOUR_GIB: u64 = 1 << 32;
/// Highest physical address + 1 with PAE / IA-32e paging.
const PHYS_LIMIT_52: u64 = 1 << 52;

struct Layout {
    /// Shift of the linear-address bits that index each level, root first.
    shifts: &'static [u32],
    /// Number of index bits of each level.
    bits: &'static [u32],
    entry_size: usize,
    addr_mask: u64,
}

const LEGACY32: Layout = Layout {
    shifts: &[22, 12],
    bits: &[10, 10],
    entry_size: 4,
    addr_mask: ADDR_MASK_32,
};
const PAE: Layout = Layout {
    shifts: &[30, 21, 12],
    bits: &[2, 9, 9],
    entry_size: 8,
    addr_mask: ADDR_MASK_52,
};
const LONG4: Layout = Layout {
    shifts: &[39, 30, 21, 12],
    bits: &[9, 9, 9, 9],
    entry_size: 8,
    addr_mask: ADDR_MASK_52,
};

fn layout(format: PagingFormat) -> &'static Layout {
    match format {
        PagingFormat::Legacy32 => &LEGACY32,
        PagingFormat::Pae => &PAE,
        PagingFormat::Long4 => &LONG4,
    }
}

/// Builds supervisor-only tables that map the one page at `linear` to `frame`, read-write,
/// for every address space of `format`: returns the root entry (index, value) to copy into
/// each root ([`PageTables::new`]'s `kernel_entries`), so all roots share the tables below
/// it and never free them. Accessed and Dirty are preset throughout, so the CPU never
/// writes these entries. The tables stay allocated for the OS's lifetime.
pub fn kernel_page(
    ram: &mut GuestRam,
    format: PagingFormat,
    linear: u64,
    frame: u64,
) -> KResult<(usize, u64)> {
    let lay = layout(format);
    let levels = lay.shifts.len();
    let index = |level: usize| (linear >> lay.shifts[level]) & ((1 << lay.bits[level]) - 1);
    let mut entry = frame | PTE_P | PTE_RW | PTE_A | PTE_D;
    for level in (1..levels).rev() {
        let table = ram.alloc_frame_below(FOUR_GIB)?;
        ram.write_entry(
            table + index(level) * lay.entry_size as u64,
            lay.entry_size,
            entry,
        )
        .ok_or(Errno::EFAULT)?;
        entry = table | PTE_P | PTE_RW | PTE_A;
    }
    // PAE PDPTEs have only P (see `intermediate_flags`).
    if format == PagingFormat::Pae {
        entry &= !(PTE_RW | PTE_A);
    }
    Ok((index(0) as usize, entry))
}

/// A present leaf found by [`PageTables::next_leaf`].
#[derive(Clone, Copy, Debug)]
pub struct Leaf {
    pub va: u64,
    pub entry: u64,
}

/// The page tables of one address space.
#[derive(Debug)]
pub struct PageTables {
    format: PagingFormat,
    root: u64,
    nx: bool,
    /// User linear addresses are below this; the walk never goes above it.
    user_top: u64,
}

impl PageTables {
    /// Allocates an empty root. `kernel_entries` are root entries copied in verbatim (the
    /// runner's upper half, the OS's own pages from [`kernel_page`]); they must lie above
    /// `user_top`.
    pub fn new(
        ram: &mut GuestRam,
        format: PagingFormat,
        nx: bool,
        user_top: u64,
        kernel_entries: &[(usize, u64)],
    ) -> KResult<Self> {
        let lay = layout(format);
        let top_limit = match format {
            PagingFormat::Long4 => 1u64 << 47,
            _ => FOUR_GIB,
        };
        if user_top == 0 || user_top > top_limit || !user_top.is_multiple_of(PAGE_SIZE) {
            return Err(Errno::EINVAL);
        }
        let first_kernel = ((user_top - 1) >> lay.shifts[0]) + 1;
        for &(index, _) in kernel_entries {
            if (index as u64) < first_kernel || index >= 1 << lay.bits[0] {
                return Err(Errno::EINVAL);
            }
        }
        let root = ram.alloc_frame_below(FOUR_GIB)?;
        for &(index, entry) in kernel_entries {
            ram.write_entry(
                root + (index * lay.entry_size) as u64,
                lay.entry_size,
                entry,
            )
            .ok_or(Errno::EFAULT)?;
        }
        Ok(PageTables {
            format,
            root,
            nx: nx && format != PagingFormat::Legacy32,
            user_top,
        })
    }

    /// The value for CR3 (the physical address of the root table).
    pub fn cr3(&self) -> u64 {
        self.root
    }

    pub fn format(&self) -> PagingFormat {
        self.format
    }

    /// True if leaf entries carry NX (format with NX and the runner enabled it).
    pub fn has_nx(&self) -> bool {
        self.nx
    }

    pub fn user_top(&self) -> u64 {
        self.user_top
    }

    /// Allocates a zeroed frame this format can address.
    pub fn alloc_frame(&self, ram: &mut GuestRam) -> KResult<u64> {
        match self.format {
            PagingFormat::Legacy32 => ram.alloc_frame_below(FOUR_GIB),
            _ => ram.alloc_frame_below(PHYS_LIMIT_52),
        }
    }

    fn intermediate_flags(&self, level: usize) -> u64 {
        // PAE PDPTEs have only P (RW/US are reserved there; SDM vol. 3A, 4.4.1).
        if self.format == PagingFormat::Pae && level == 0 {
            PTE_P
        } else {
            PTE_P | PTE_RW | PTE_US | PTE_A
        }
    }

    /// The leaf entry mapping `frame` with protection `prot` for user mode.
    pub fn leaf_entry(&self, frame: u64, prot: u32) -> u64 {
        let mut entry = frame | PTE_OWNED;
        if prot & (PROT_READ | PROT_WRITE | PROT_EXEC) != 0 {
            // A and D preset: neither the CPU nor a monitor needs to write the entry.
            entry |= PTE_P | PTE_US | PTE_A | PTE_D;
            if prot & PROT_WRITE != 0 {
                entry |= PTE_RW;
            }
            if self.nx && prot & PROT_EXEC == 0 {
                entry |= PTE_NX;
            }
        }
        entry
    }

    /// The protection an entry enforces (read implied by any access; exec implied without NX).
    pub fn entry_prot(&self, entry: u64) -> u32 {
        if entry & PTE_P == 0 {
            return PROT_NONE;
        }
        let mut prot = PROT_READ;
        if entry & PTE_RW != 0 {
            prot |= PROT_WRITE;
        }
        if !self.nx || entry & PTE_NX == 0 {
            prot |= PROT_EXEC;
        }
        prot
    }

    /// The frame an owned leaf entry holds.
    pub fn entry_frame(&self, entry: u64) -> u64 {
        entry & layout(self.format).addr_mask
    }

    fn index(lay: &Layout, level: usize, va: u64) -> u64 {
        (va >> lay.shifts[level]) & ((1 << lay.bits[level]) - 1)
    }

    /// Walks to the leaf slot of `va`: `Ok(slot)`, or `Err(next)` where `next` is the first
    /// address after the missing table's span.
    fn walk(&self, ram: &GuestRam, va: u64) -> Result<u64, u64> {
        let lay = layout(self.format);
        let mut table = self.root;
        let last = lay.shifts.len() - 1;
        for level in 0..last {
            let slot = table + Self::index(lay, level, va) * lay.entry_size as u64;
            let entry = ram.read_entry(slot, lay.entry_size).unwrap_or(0);
            if entry & PTE_P == 0 {
                let span = 1u64 << lay.shifts[level];
                return Err((va & !(span - 1)).saturating_add(span));
            }
            table = entry & lay.addr_mask;
        }
        Ok(table + Self::index(lay, last, va) * lay.entry_size as u64)
    }

    /// The leaf slot of `va`, creating missing tables.
    fn walk_alloc(&self, ram: &mut GuestRam, va: u64) -> KResult<u64> {
        let lay = layout(self.format);
        let mut table = self.root;
        let last = lay.shifts.len() - 1;
        for level in 0..last {
            let slot = table + Self::index(lay, level, va) * lay.entry_size as u64;
            let entry = ram.read_entry(slot, lay.entry_size).ok_or(Errno::EFAULT)?;
            table = if entry & PTE_P == 0 {
                let frame = self.alloc_frame(ram)?;
                ram.write_entry(slot, lay.entry_size, frame | self.intermediate_flags(level))
                    .ok_or(Errno::EFAULT)?;
                frame
            } else {
                entry & lay.addr_mask
            };
        }
        Ok(table + Self::index(lay, last, va) * lay.entry_size as u64)
    }

    fn check_user(&self, va: u64) -> KResult<()> {
        if va >= self.user_top {
            Err(Errno::EFAULT)
        } else {
            Ok(())
        }
    }

    /// The leaf entry of `va` if the OS owns a frame there (present or PROT_NONE).
    pub fn leaf(&self, ram: &GuestRam, va: u64) -> Option<u64> {
        self.check_user(va).ok()?;
        let slot = self.walk(ram, va).ok()?;
        let entry = ram.read_entry(slot, layout(self.format).entry_size)?;
        (entry & (PTE_P | PTE_OWNED) != 0).then_some(entry)
    }

    /// Installs `entry` as the leaf of `va` (page aligned), creating tables as needed.
    pub fn set_leaf(&self, ram: &mut GuestRam, va: u64, entry: u64) -> KResult<()> {
        self.check_user(va)?;
        let slot = self.walk_alloc(ram, page_down(va))?;
        ram.write_entry(slot, layout(self.format).entry_size, entry)
            .ok_or(Errno::EFAULT)
    }

    /// Maps `va` to `frame` with `prot`.
    pub fn map(&self, ram: &mut GuestRam, va: u64, frame: u64, prot: u32) -> KResult<()> {
        self.set_leaf(ram, va, self.leaf_entry(frame, prot))
    }

    /// Clears the leaf of `va` and returns the entry it held (the caller owns its frame now).
    pub fn take(&self, ram: &mut GuestRam, va: u64) -> Option<u64> {
        let entry = self.leaf(ram, va)?;
        let slot = self.walk(ram, va).ok()?;
        ram.write_entry(slot, layout(self.format).entry_size, 0)?;
        Some(entry)
    }

    /// Changes the protection of a mapped page; false if `va` has no frame.
    pub fn protect(&self, ram: &mut GuestRam, va: u64, prot: u32) -> bool {
        let Some(entry) = self.leaf(ram, va) else {
            return false;
        };
        let new = self.leaf_entry(self.entry_frame(entry), prot);
        self.set_leaf(ram, va, new).is_ok()
    }

    /// The first page at or above `va` and below `end` whose frame the OS owns.
    pub fn next_leaf(&self, ram: &GuestRam, mut va: u64, end: u64) -> Option<Leaf> {
        let end = end.min(self.user_top);
        let size = layout(self.format).entry_size;
        va = page_down(va);
        while va < end {
            match self.walk(ram, va) {
                Ok(slot) => {
                    let entry = ram.read_entry(slot, size).unwrap_or(0);
                    if entry & (PTE_P | PTE_OWNED) != 0 {
                        return Some(Leaf { va, entry });
                    }
                    va += PAGE_SIZE;
                }
                Err(next) => va = next,
            }
        }
        None
    }

    /// Translates a user access to `va` like the CPU at CPL 3 would (present, U/S, and R/W for
    /// a write; SDM vol. 3A, 4.6): the physical address, or EFAULT.
    pub fn translate(&self, ram: &GuestRam, va: u64, write: bool) -> KResult<u64> {
        let entry = self.leaf(ram, va).ok_or(Errno::EFAULT)?;
        if entry & (PTE_P | PTE_US) != PTE_P | PTE_US || (write && entry & PTE_RW == 0) {
            return Err(Errno::EFAULT);
        }
        Ok(self.entry_frame(entry) | (va & (PAGE_SIZE - 1)))
    }

    /// Frees every owned frame and every table below `user_top`, then the root.
    pub fn destroy(self, ram: &mut GuestRam) {
        let lay = layout(self.format);
        let root_entries = ((self.user_top - 1) >> lay.shifts[0]) + 1;
        self.free_table(ram, self.root, 0, root_entries);
        ram.free_frame(self.root);
    }

    fn free_table(&self, ram: &mut GuestRam, table: u64, level: usize, entries: u64) {
        let lay = layout(self.format);
        let last = level == lay.shifts.len() - 1;
        for index in 0..entries {
            let slot = table + index * lay.entry_size as u64;
            let entry = ram.read_entry(slot, lay.entry_size).unwrap_or(0);
            let frame = entry & lay.addr_mask;
            if last {
                if entry & PTE_OWNED != 0 {
                    ram.free_frame(frame);
                }
            } else if entry & PTE_P != 0 {
                self.free_table(ram, frame, level + 1, 1 << lay.bits[level + 1]);
                ram.free_frame(frame);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use alloc::vec::Vec;

    const BASE: u64 = 0x20_0000;

    /// An independent walk of the tables as the CPU would do it at CPL 3 (SDM vol. 3A,
    /// 4.3/4.4/4.5): returns (physical address, writable, executable) or None.
    fn hw_walk(
        ram: &GuestRam,
        format: PagingFormat,
        cr3: u64,
        va: u64,
    ) -> Option<(u64, bool, bool)> {
        let read = |phys: u64, size: usize| ram.read_entry(phys, size).expect("table inside RAM");
        match format {
            PagingFormat::Legacy32 => {
                let pde = read((cr3 & !0xfff) + ((va >> 22) & 0x3ff) * 4, 4);
                if pde & 7 != 7 {
                    return None;
                }
                let pte = read((pde & 0xffff_f000) + ((va >> 12) & 0x3ff) * 4, 4);
                (pte & 5 == 5).then_some((pte & 0xffff_f000 | va & 0xfff, pte & 2 != 0, true))
            }
            PagingFormat::Pae | PagingFormat::Long4 => {
                let mut table = cr3 & !0xfff;
                let levels: &[u32] = if format == PagingFormat::Pae {
                    &[30, 21, 12]
                } else {
                    &[39, 30, 21, 12]
                };
                let mut writable = true;
                let mut exec = true;
                for (i, &shift) in levels.iter().enumerate() {
                    let bits = if format == PagingFormat::Pae && i == 0 {
                        3
                    } else {
                        0x1ff
                    };
                    let entry = read(table + ((va >> shift) & bits) * 8, 8);
                    if entry & 1 == 0 {
                        return None;
                    }
                    if format == PagingFormat::Pae && i == 0 {
                        // PDPTE: bits 1, 2, 5-8 and 63 are reserved (SDM table 4-8).
                        assert_eq!(entry & (0x1e6 | 1 << 63), 0, "reserved PDPTE bits set");
                    } else if entry & 4 == 0 {
                        return None;
                    } else {
                        writable &= entry & 2 != 0;
                        exec &= entry & (1 << 63) == 0;
                    }
                    table = entry & ADDR_MASK_52;
                }
                Some((table | va & 0xfff, writable, exec))
            }
        }
    }

    fn formats() -> [(PagingFormat, u64); 3] {
        [
            (PagingFormat::Legacy32, 0xc000_0000),
            (PagingFormat::Pae, 0xc000_0000),
            (PagingFormat::Long4, 0x7fff_ffff_f000),
        ]
    }

    #[test]
    fn map_protect_unmap_in_every_format() {
        for (format, top) in formats() {
            let mut bytes = vec![0u8; 64 * 4096];
            let mut ram = GuestRam::new(&mut bytes, BASE).unwrap();
            let total = ram.free_frames();
            let pt = PageTables::new(&mut ram, format, true, top, &[]).unwrap();
            let cr3 = pt.cr3();
            assert!((BASE..BASE + 64 * 4096).contains(&cr3) && cr3.is_multiple_of(4096));
            let (a, b, c) = (0x40_0000, top - 0x1000, 0x1234_5000);
            let fa = pt.alloc_frame(&mut ram).unwrap();
            let fb = pt.alloc_frame(&mut ram).unwrap();
            let fc = pt.alloc_frame(&mut ram).unwrap();
            pt.map(&mut ram, a, fa, PROT_READ | PROT_WRITE).unwrap();
            pt.map(&mut ram, b, fb, PROT_READ | PROT_EXEC).unwrap();
            pt.map(&mut ram, c, fc, PROT_NONE).unwrap();

            let nx = format != PagingFormat::Legacy32;
            assert_eq!(
                hw_walk(&ram, format, cr3, a + 0x123),
                Some((fa + 0x123, true, !nx))
            );
            assert_eq!(hw_walk(&ram, format, cr3, b), Some((fb, false, true)));
            assert_eq!(
                hw_walk(&ram, format, cr3, c),
                None,
                "PROT_NONE is not present"
            );
            assert_eq!(hw_walk(&ram, format, cr3, a + 0x1000), None);

            assert_eq!(pt.translate(&ram, a + 7, true), Ok(fa + 7));
            assert_eq!(pt.translate(&ram, b, false), Ok(fb));
            assert_eq!(pt.translate(&ram, b, true), Err(Errno::EFAULT));
            assert_eq!(pt.translate(&ram, c, false), Err(Errno::EFAULT));
            assert_eq!(pt.translate(&ram, top, false), Err(Errno::EFAULT));
            assert!(pt.leaf(&ram, c).is_some(), "PROT_NONE keeps its frame");

            assert!(pt.protect(&mut ram, b, PROT_READ | PROT_WRITE));
            assert_eq!(hw_walk(&ram, format, cr3, b), Some((fb, true, !nx)));
            assert!(pt.protect(&mut ram, c, PROT_READ));
            assert_eq!(hw_walk(&ram, format, cr3, c), Some((fc, false, !nx)));
            assert!(!pt.protect(&mut ram, a + 0x1000, PROT_READ));

            let leaves: Vec<u64> = core::iter::successors(pt.next_leaf(&ram, 0, top), |l| {
                pt.next_leaf(&ram, l.va + PAGE_SIZE, top)
            })
            .map(|l| l.va)
            .collect();
            assert_eq!(leaves, vec![a, c, b]);

            let entry = pt.take(&mut ram, a).unwrap();
            assert_eq!(pt.entry_frame(entry), fa);
            ram.free_frame(fa);
            assert_eq!(pt.translate(&ram, a, false), Err(Errno::EFAULT));
            assert_eq!(hw_walk(&ram, format, cr3, a), None);

            pt.destroy(&mut ram);
            assert_eq!(
                ram.free_frames(),
                total,
                "{format:?}: every frame comes back"
            );
        }
    }

    #[test]
    fn exhausted_ram_gives_enomem() {
        for (format, top) in formats() {
            // Root + one table below it for Legacy32; PAE and Long4 need more levels.
            let mut bytes = vec![0u8; 3 * 4096];
            let mut ram = GuestRam::new(&mut bytes, 0).unwrap();
            let pt = PageTables::new(&mut ram, format, true, top, &[]).unwrap();
            let mut result = Ok(());
            let mut va = 0x10_0000;
            for _ in 0..8 {
                result = pt.alloc_frame(&mut ram).and_then(|f| {
                    pt.map(&mut ram, va, f, PROT_READ)
                        .inspect_err(|_| ram.free_frame(f))
                });
                if result.is_err() {
                    break;
                }
                va += 1 << 30;
            }
            assert_eq!(result, Err(Errno::ENOMEM), "{format:?}");
            pt.destroy(&mut ram);
            assert_eq!(ram.free_frames(), 3);
        }
    }

    #[test]
    fn kernel_entries_are_copied_and_checked() {
        let mut bytes = vec![0u8; 8 * 4096];
        let mut ram = GuestRam::new(&mut bytes, 0x1000_0000).unwrap();
        let kernel = [(256, 0xabc0_0063u64), (511, 0x1234_5003)];
        let pt = PageTables::new(
            &mut ram,
            PagingFormat::Long4,
            true,
            0x7fff_ffff_f000,
            &kernel,
        )
        .unwrap();
        assert_eq!(ram.read_entry(pt.cr3() + 256 * 8, 8), Some(0xabc0_0063));
        assert_eq!(ram.read_entry(pt.cr3() + 511 * 8, 8), Some(0x1234_5003));
        pt.destroy(&mut ram);
        assert_eq!(
            ram.free_frames(),
            8,
            "kernel entries are never freed as tables"
        );
        // An i386 address space under Long4 may share PML4 slots 1..; slot 0 is user space.
        let low = [(1, 0x5003u64)];
        assert!(PageTables::new(&mut ram, PagingFormat::Long4, true, 0xc000_0000, &low).is_ok());
        for bad in [(255usize, 1u64), (0, 1), (512, 1)] {
            let result = PageTables::new(
                &mut ram,
                PagingFormat::Long4,
                true,
                0x7fff_ffff_f000,
                &[bad],
            );
            assert_eq!(result.err(), Some(Errno::EINVAL), "{bad:?}");
        }
        let result = PageTables::new(&mut ram, PagingFormat::Pae, true, 0xc000_0000, &kernel);
        assert_eq!(result.err(), Some(Errno::EINVAL));
    }

    #[test]
    fn a_kernel_page_is_supervisor_only_and_shared_by_every_root() {
        for (format, linear, top) in [
            (PagingFormat::Legacy32, 0xffc0_0000u64, 0xc000_0000u64),
            (PagingFormat::Pae, 0xffe0_0000, 0xc000_0000),
            (PagingFormat::Long4, 0xffff_ff00_0000_0000, 0x7fff_ffff_f000),
        ] {
            let mut bytes = vec![0u8; 16 * 4096];
            let mut ram = GuestRam::new(&mut bytes, 0x1000_0000).unwrap();
            let frame = ram.alloc_frame().unwrap();
            let root_entry = kernel_page(&mut ram, format, linear, frame).unwrap();
            let lay = layout(format);
            let free = ram.free_frames();
            for _ in 0..2 {
                let pt = PageTables::new(&mut ram, format, true, top, &[root_entry]).unwrap();
                // The CPU's walk: every level present, U/S clear at the leaf's levels
                // (a CPL-3 access faults), R/W set.
                let mut table = pt.cr3();
                for (level, &shift) in lay.shifts.iter().enumerate() {
                    let index = (linear >> shift) & ((1 << lay.bits[level]) - 1);
                    let entry = ram
                        .read_entry(table + index * lay.entry_size as u64, lay.entry_size)
                        .unwrap();
                    assert_ne!(entry & PTE_P, 0, "{format:?} level {level}");
                    assert_eq!(entry & PTE_US, 0, "{format:?} level {level}");
                    if format != PagingFormat::Pae || level != 0 {
                        assert_ne!(entry & PTE_RW, 0);
                    }
                    table = entry & lay.addr_mask;
                }
                assert_eq!(table, frame);
                assert_eq!(pt.translate(&ram, linear, false), Err(Errno::EFAULT));
                pt.destroy(&mut ram);
                assert_eq!(
                    ram.free_frames(),
                    free,
                    "{format:?}: the shared tables stay"
                );
            }
        }
    }
}
