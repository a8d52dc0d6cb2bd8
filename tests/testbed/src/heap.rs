//! The kernel heap behind `alloc`: one contiguous region of the DMAP,
//! managed as an address-ordered free list with first fit and coalescing.
//!
//! Every block is a multiple of 16 bytes at a 16-aligned address, so a
//! split never leaves a remainder too small to hold a free-block header.

use core::alloc::{GlobalAlloc, Layout};
use core::ptr::{self, null_mut};
use spin::Mutex;

const GRANULE: usize = 16;

#[repr(C)]
struct FreeBlock {
    size: usize,
    next: *mut FreeBlock,
}

struct FreeList {
    head: *mut FreeBlock,
    free: usize,
    low_water: usize,
}

// SAFETY: the list is only reached through the mutex; the blocks it
// points to belong to the heap region, which nothing else uses.
unsafe impl Send for FreeList {}

pub struct Heap {
    list: Mutex<FreeList>,
}

fn granules(size: usize) -> usize {
    size.max(1).next_multiple_of(GRANULE)
}

impl Heap {
    pub const fn empty() -> Heap {
        Heap {
            list: Mutex::new(FreeList {
                head: null_mut(),
                free: 0,
                low_water: 0,
            }),
        }
    }

    /// Hands the region [start, start + size) to the heap.
    ///
    /// # Safety
    /// The region must be mapped, writable, unused by anything else, and
    /// stay so for the kernel's lifetime; `init` is called once.
    pub unsafe fn init(&self, start: usize, size: usize) {
        let aligned = start.next_multiple_of(GRANULE);
        let size = (size - (aligned - start)) & !(GRANULE - 1);
        let block = aligned as *mut FreeBlock;
        // SAFETY: the caller hands over this region.
        unsafe {
            block.write(FreeBlock {
                size,
                next: null_mut(),
            })
        };
        let mut list = self.list.lock();
        list.head = block;
        list.free = size;
        list.low_water = size;
    }

    /// (free bytes now, lowest free bytes seen).
    pub fn stats(&self) -> (usize, usize) {
        let list = self.list.lock();
        (list.free, list.low_water)
    }
}

impl FreeList {
    /// First fit: carves `size` bytes aligned to `align` out of a free block.
    ///
    /// # Safety
    /// The list must be well formed (blocks inside the heap region).
    unsafe fn take(&mut self, size: usize, align: usize) -> *mut u8 {
        let mut prev: *mut FreeBlock = null_mut();
        let mut cur = self.head;
        while !cur.is_null() {
            let addr = cur as usize;
            // SAFETY: cur is a free block of the list.
            let (block_size, next) = unsafe { ((*cur).size, (*cur).next) };
            let start = addr.next_multiple_of(align);
            let end = start + size;
            if end <= addr + block_size {
                let front = start - addr;
                let back = addr + block_size - end;
                let mut link = next;
                if back > 0 {
                    let tail = end as *mut FreeBlock;
                    // SAFETY: [end, end + back) is inside the free block.
                    unsafe { tail.write(FreeBlock { size: back, next }) };
                    link = tail;
                }
                if front > 0 {
                    // SAFETY: cur stays a free block of `front` bytes.
                    unsafe {
                        (*cur).size = front;
                        (*cur).next = link;
                    }
                } else if prev.is_null() {
                    self.head = link;
                } else {
                    // SAFETY: prev is a free block of the list.
                    unsafe { (*prev).next = link };
                }
                self.free -= size;
                self.low_water = self.low_water.min(self.free);
                return start as *mut u8;
            }
            prev = cur;
            cur = next;
        }
        null_mut()
    }

    /// Returns [addr, addr + size) to the list, merging with neighbours.
    ///
    /// # Safety
    /// The range was handed out by `take` and is not in use any more.
    unsafe fn give(&mut self, addr: usize, size: usize) {
        let mut prev: *mut FreeBlock = null_mut();
        let mut cur = self.head;
        while !cur.is_null() && (cur as usize) < addr {
            prev = cur;
            // SAFETY: cur is a free block of the list.
            cur = unsafe { (*cur).next };
        }
        let block = addr as *mut FreeBlock;
        // SAFETY: the range is ours again; it is large enough for a header.
        unsafe { block.write(FreeBlock { size, next: cur }) };
        if !cur.is_null() && addr + size == cur as usize {
            // SAFETY: block and cur are adjacent free blocks.
            unsafe {
                (*block).size += (*cur).size;
                (*block).next = (*cur).next;
            }
        }
        if prev.is_null() {
            self.head = block;
        } else {
            // SAFETY: prev is a free block below addr.
            unsafe {
                if prev as usize + (*prev).size == addr {
                    (*prev).size += (*block).size;
                    (*prev).next = (*block).next;
                } else {
                    (*prev).next = block;
                }
            }
        }
        self.free += size;
    }

    /// Grows the allocation at `addr` from `old` to `new` bytes using the
    /// free block right after it, if there is one large enough.
    ///
    /// # Safety
    /// [addr, addr + old) is a live allocation.
    unsafe fn grow_in_place(&mut self, addr: usize, old: usize, new: usize) -> bool {
        let want_end = addr + new;
        let mut prev: *mut FreeBlock = null_mut();
        let mut cur = self.head;
        while !cur.is_null() && (cur as usize) < addr + old {
            prev = cur;
            // SAFETY: cur is a free block of the list.
            cur = unsafe { (*cur).next };
        }
        if cur.is_null() || cur as usize != addr + old {
            return false;
        }
        // SAFETY: cur is the free block adjacent to the allocation.
        let (size, next) = unsafe { ((*cur).size, (*cur).next) };
        let block_end = cur as usize + size;
        if block_end < want_end {
            return false;
        }
        let mut link = next;
        if block_end > want_end {
            let tail = want_end as *mut FreeBlock;
            // SAFETY: [want_end, block_end) is the rest of the free block.
            unsafe {
                tail.write(FreeBlock {
                    size: block_end - want_end,
                    next,
                })
            };
            link = tail;
        }
        if prev.is_null() {
            self.head = link;
        } else {
            // SAFETY: prev is a free block of the list.
            unsafe { (*prev).next = link };
        }
        self.free -= new - old;
        self.low_water = self.low_water.min(self.free);
        true
    }
}

// SAFETY: blocks handed out are disjoint, inside the heap region, sized
// and aligned as the layout asks (rounded up to whole granules).
unsafe impl GlobalAlloc for Heap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let mut list = self.list.lock();
        // SAFETY: the list is well formed.
        unsafe { list.take(granules(layout.size()), layout.align().max(GRANULE)) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let mut list = self.list.lock();
        // SAFETY: ptr came from alloc with this layout.
        unsafe { list.give(ptr as usize, granules(layout.size())) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = granules(layout.size());
        let new = granules(new_size);
        if new <= old {
            if new < old {
                let mut list = self.list.lock();
                // SAFETY: the tail [ptr + new, ptr + old) is no longer used.
                unsafe { list.give(ptr as usize + new, old - new) };
            }
            return ptr;
        }
        {
            let mut list = self.list.lock();
            // SAFETY: ptr is a live allocation of `old` bytes.
            if unsafe { list.grow_in_place(ptr as usize, old, new) } {
                return ptr;
            }
        }
        // SAFETY: same alignment as the original, new_size > 0.
        let fresh =
            unsafe { self.alloc(Layout::from_size_align_unchecked(new_size, layout.align())) };
        if !fresh.is_null() {
            // SAFETY: both blocks are live and disjoint; `old` ≥ layout.size().
            unsafe {
                ptr::copy_nonoverlapping(ptr, fresh, layout.size());
                self.dealloc(ptr, layout);
            }
        }
        fresh
    }
}
