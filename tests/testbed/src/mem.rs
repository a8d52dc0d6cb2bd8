//! Physical memory: the frame allocator fed by the PVH memory map, and the
//! kernel's final page tables (kernel image at KERNBASE, direct map of all
//! physical memory at DMAP_BASE, nothing in the lower half).

use crate::boot::KERNBASE;
use crate::pvh::{StartInfo, MEMMAP_TYPE_RAM};
use crate::x86;

/// FreeBSD amd64 DMAP_MIN_ADDRESS (contract.md): PML4 slot 496.
pub const DMAP_BASE: u64 = 0xffff_f800_0000_0000;
pub const DMAP_PML4_SLOT: usize = 496;
/// KERNBASE's PML4 slot and PDPT slot (0xffffffff80000000).
const KERNEL_PML4_SLOT: usize = 511;
const KERNEL_PDPT_SLOT: usize = 510;

pub const PAGE_SIZE: u64 = 4096;
const LARGE_PAGE: u64 = 2 << 20;
const HUGE_PAGE: u64 = 1 << 30;

/// Page-table entry bits (SDM vol. 3, 4.5).
pub const PTE_P: u64 = 1 << 0;
pub const PTE_RW: u64 = 1 << 1;
pub const PTE_PWT: u64 = 1 << 3;
pub const PTE_PCD: u64 = 1 << 4;
pub const PTE_PS: u64 = 1 << 7;
pub const PTE_G: u64 = 1 << 8;
pub const PTE_NX: u64 = 1 << 63;

/// Physical memory from the 4th GiB down to 3 GiB holds the LAPIC, IOAPIC
/// and other device windows; the DMAP maps it uncached.
const MMIO_HOLE: core::ops::Range<u64> = 0xc000_0000..0x1_0000_0000;
/// The DMAP always covers at least the 32-bit physical space (LAPIC).
const DMAP_MIN_SIZE: u64 = 1 << 32;
/// One DMAP PDPT maps 512 GiB, far above what the testbed is given.
const DMAP_MAX_SIZE: u64 = 512 * HUGE_PAGE;
/// Below 1 MiB live the PVH structures and the option ROM's data.
const LOW_MEMORY_END: u64 = 1 << 20;
/// The boot trampoline maps physical memory below this into the DMAP.
const EARLY_DMAP_LIMIT: u64 = 1 << 30;

extern "C" {
    static __kernel_start: u8;
    static __kernel_end: u8;
}

pub fn phys_to_virt(phys: u64) -> u64 {
    DMAP_BASE + phys
}

/// Physical address of a kernel-image address (code, data, bss).
pub fn kernel_virt_to_phys(virt: u64) -> u64 {
    virt - KERNBASE
}

fn kernel_image_phys() -> (u64, u64) {
    // Only the addresses of the linker-script symbols are taken.
    let (start, end) = (
        &raw const __kernel_start as u64,
        &raw const __kernel_end as u64,
    );
    (kernel_virt_to_phys(start), kernel_virt_to_phys(end))
}

const MAX_RANGES: usize = 48;

/// Free physical memory as a set of ranges; allocations are carved from
/// the bottom of the first range that fits. The testbed never returns
/// frames: everything it allocates lives until the run ends.
pub struct Frames {
    ranges: [(u64, u64); MAX_RANGES],
    len: usize,
    top: u64,
}

impl Frames {
    pub fn from_memmap(info: &StartInfo) -> Frames {
        let mut frames = Frames {
            ranges: [(0, 0); MAX_RANGES],
            len: 0,
            top: 0,
        };
        for r in info.memmap().iter().filter(|r| r.kind == MEMMAP_TYPE_RAM) {
            let start = r.addr.max(LOW_MEMORY_END).next_multiple_of(PAGE_SIZE);
            let end = r.addr.saturating_add(r.size) & !(PAGE_SIZE - 1);
            frames.top = frames.top.max(end);
            if start < end && frames.len < MAX_RANGES {
                frames.ranges[frames.len] = (start, end);
                frames.len += 1;
            }
        }
        let (kstart, kend) = kernel_image_phys();
        frames.reserve(kstart, kend);
        if let Some((addr, size)) = info.initrd {
            frames.reserve(
                addr & !(PAGE_SIZE - 1),
                addr.saturating_add(size).next_multiple_of(PAGE_SIZE),
            );
        }
        frames
    }

    /// Highest RAM address + 1.
    pub fn ram_top(&self) -> u64 {
        self.top
    }

    pub fn free_bytes(&self) -> u64 {
        self.ranges[..self.len].iter().map(|(s, e)| e - s).sum()
    }

    /// Size of the largest free range.
    pub fn largest_free(&self) -> u64 {
        self.ranges[..self.len]
            .iter()
            .map(|(s, e)| e - s)
            .max()
            .unwrap_or(0)
    }

    /// Removes [start, end) from the free ranges.
    fn reserve(&mut self, start: u64, end: u64) {
        let mut i = 0;
        while i < self.len {
            let (s, e) = self.ranges[i];
            if end <= s || start >= e {
                i += 1;
                continue;
            }
            let left = (s, start.max(s));
            let right = (end.min(e), e);
            self.ranges[i] = left;
            if right.0 < right.1 && self.len < MAX_RANGES {
                self.ranges[self.len] = right;
                self.len += 1;
            }
            i += 1;
        }
        self.ranges[..self.len].sort_unstable_by_key(|r| r.0);
        let mut kept = 0;
        for j in 0..self.len {
            if self.ranges[j].0 < self.ranges[j].1 {
                self.ranges[kept] = self.ranges[j];
                kept += 1;
            }
        }
        self.len = kept;
    }

    /// `size` bytes of physical memory aligned to `align` (a power of two),
    /// not zeroed.
    pub fn alloc(&mut self, size: u64, align: u64) -> Option<u64> {
        let size = size.next_multiple_of(PAGE_SIZE);
        for r in self.ranges[..self.len].iter_mut() {
            let start = r.0.checked_next_multiple_of(align)?;
            if start.checked_add(size).is_some_and(|end| end <= r.1) {
                r.0 = start + size;
                return Some(start);
            }
        }
        None
    }

    /// One zeroed 4 KiB frame for a page table, reachable through the
    /// early DMAP (so it can be filled before the final tables are live).
    fn alloc_table(&mut self) -> Option<u64> {
        let frame = self.alloc(PAGE_SIZE, PAGE_SIZE)?;
        if frame + PAGE_SIZE > EARLY_DMAP_LIMIT {
            return None;
        }
        // SAFETY: the frame is free RAM below 1 GiB, mapped by the DMAP.
        unsafe { core::ptr::write_bytes(phys_to_virt(frame) as *mut u8, 0, PAGE_SIZE as usize) };
        Some(frame)
    }
}

/// Writes entry `index` of the page table at physical `table`.
fn set_entry(table: u64, index: usize, value: u64) {
    // SAFETY: `table` is a page-table frame from alloc_table, mapped by
    // the DMAP; index < 512 keeps the write inside it.
    unsafe { ((phys_to_virt(table) as *mut u64).add(index % 512)).write_volatile(value) }
}

/// The kernel's address space: the upper-half PML4 entries every guest
/// address space copies.
pub struct KernelSpace {
    pub upper_entries: [(usize, u64); 2],
}

#[derive(Debug)]
pub struct OutOfTables;

/// CPU paging features the tables may use.
pub struct PagingFeatures {
    pub nx: bool,
    pub global: bool,
}

/// Builds and loads the final tables: DMAP over all physical memory (at
/// least 4 GiB, the top GiB uncached), the kernel image at KERNBASE, and
/// an empty lower half.
pub fn build_kernel_space(
    frames: &mut Frames,
    features: &PagingFeatures,
) -> Result<KernelSpace, OutOfTables> {
    let nx = if features.nx { PTE_NX } else { 0 };
    let global = if features.global { PTE_G } else { 0 };
    let pml4 = frames.alloc_table().ok_or(OutOfTables)?;

    let dmap_size = frames
        .ram_top()
        .next_multiple_of(HUGE_PAGE)
        .clamp(DMAP_MIN_SIZE, DMAP_MAX_SIZE);
    let dmap_pdpt = frames.alloc_table().ok_or(OutOfTables)?;
    for gib in 0..(dmap_size / HUGE_PAGE) {
        let pd = frames.alloc_table().ok_or(OutOfTables)?;
        for i in 0..512u64 {
            let phys = gib * HUGE_PAGE + i * LARGE_PAGE;
            let cache = if MMIO_HOLE.contains(&phys) {
                PTE_PCD | PTE_PWT
            } else {
                0
            };
            set_entry(
                pd,
                i as usize,
                phys | PTE_P | PTE_RW | PTE_PS | global | nx | cache,
            );
        }
        set_entry(dmap_pdpt, gib as usize, pd | PTE_P | PTE_RW);
    }
    let dmap_entry = dmap_pdpt | PTE_P | PTE_RW;
    set_entry(pml4, DMAP_PML4_SLOT, dmap_entry);

    let (_, kend) = kernel_image_phys();
    let kernel_pdpt = frames.alloc_table().ok_or(OutOfTables)?;
    let kernel_pd = frames.alloc_table().ok_or(OutOfTables)?;
    for i in 0..kend.div_ceil(LARGE_PAGE) {
        set_entry(
            kernel_pd,
            i as usize,
            (i * LARGE_PAGE) | PTE_P | PTE_RW | PTE_PS | global,
        );
    }
    set_entry(kernel_pdpt, KERNEL_PDPT_SLOT, kernel_pd | PTE_P | PTE_RW);
    let kernel_entry = kernel_pdpt | PTE_P | PTE_RW;
    set_entry(pml4, KERNEL_PML4_SLOT, kernel_entry);

    // SAFETY: the new tables map the kernel image at the same virtual
    // addresses (KERNBASE) and the DMAP as a superset of the early one;
    // nothing the kernel uses lives in the dropped identity map.
    unsafe { x86::write_cr3(pml4) };
    Ok(KernelSpace {
        upper_entries: [
            (DMAP_PML4_SLOT, dmap_entry),
            (KERNEL_PML4_SLOT, kernel_entry),
        ],
    })
}
