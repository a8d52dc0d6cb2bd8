//! Guest RAM and its frame allocator.

use alloc::vec;
use alloc::vec::Vec;

use crate::errno::{Errno, KResult};

/// Size of a page and of a frame (SDM vol. 3A, 4.3: 4-KByte pages).
pub const PAGE_SIZE: u64 = 4096;
const PAGE: usize = PAGE_SIZE as usize;

/// Rounds `value` down to a page boundary.
pub fn page_down(value: u64) -> u64 {
    value & !(PAGE_SIZE - 1)
}

/// Rounds `value` up to a page boundary; `None` on overflow.
pub fn page_up(value: u64) -> Option<u64> {
    Some(value.checked_add(PAGE_SIZE - 1)? & !(PAGE_SIZE - 1))
}

/// Guest RAM: the bytes and the physical address that byte 0 has in page-table entries.
///
/// Native testbed: `phys_base` is the host physical address of the (contiguous) region.
/// kqemu client: `phys_base` is 0 (guest-physical addresses are offsets into guest RAM).
pub struct GuestRam<'a> {
    bytes: &'a mut [u8],
    phys_base: u64,
    /// One bit per frame, set when the frame is in use.
    used: Vec<u64>,
    frames: usize,
    free: usize,
    /// Where the next search starts (frames below it were all in use at some point).
    hint: usize,
}

impl<'a> GuestRam<'a> {
    /// Wraps `bytes` (only whole pages are used). `phys_base` must be page aligned.
    pub fn new(bytes: &'a mut [u8], phys_base: u64) -> KResult<Self> {
        if !phys_base.is_multiple_of(PAGE_SIZE) {
            return Err(Errno::EINVAL);
        }
        let frames = bytes.len() / PAGE;
        phys_base
            .checked_add(frames as u64 * PAGE_SIZE)
            .ok_or(Errno::EINVAL)?;
        Ok(GuestRam {
            bytes,
            phys_base,
            used: vec![0; frames.div_ceil(64)],
            frames,
            free: frames,
            hint: 0,
        })
    }

    pub fn phys_base(&self) -> u64 {
        self.phys_base
    }

    /// Number of frames (whole pages) in the region.
    pub fn frames(&self) -> usize {
        self.frames
    }

    pub fn free_frames(&self) -> usize {
        self.free
    }

    /// Allocates a zeroed frame whose physical address is below `limit`; ENOMEM if none.
    pub fn alloc_frame_below(&mut self, limit: u64) -> KResult<u64> {
        let max_frames = if limit <= self.phys_base {
            0
        } else {
            (((limit - self.phys_base) / PAGE_SIZE).min(self.frames as u64)) as usize
        };
        if self.free == 0 {
            return Err(Errno::ENOMEM);
        }
        let index = self
            .find_free(self.hint, max_frames)
            .or_else(|| self.find_free(0, self.hint.min(max_frames)))
            .ok_or(Errno::ENOMEM)?;
        self.used[index / 64] |= 1 << (index % 64);
        self.free -= 1;
        self.hint = index + 1;
        let offset = index * PAGE;
        self.bytes[offset..offset + PAGE].fill(0);
        Ok(self.phys_base + offset as u64)
    }

    /// Allocates a zeroed frame anywhere; ENOMEM if RAM is exhausted.
    pub fn alloc_frame(&mut self) -> KResult<u64> {
        self.alloc_frame_below(u64::MAX)
    }

    /// First free frame index in `from..to` (a bounded scan of the bitmap).
    fn find_free(&self, from: usize, to: usize) -> Option<usize> {
        let mut index = from;
        while index < to {
            let word = self.used[index / 64];
            if word == u64::MAX {
                index = (index / 64 + 1) * 64;
                continue;
            }
            if word & (1 << (index % 64)) == 0 {
                return Some(index);
            }
            index += 1;
        }
        None
    }

    /// Returns a frame to the allocator; frames it never gave out are ignored.
    pub fn free_frame(&mut self, phys: u64) {
        if let Some(index) = self.frame_index(phys) {
            let bit = 1 << (index % 64);
            if self.used[index / 64] & bit != 0 {
                self.used[index / 64] &= !bit;
                self.free += 1;
                self.hint = self.hint.min(index);
            }
        }
    }

    fn frame_index(&self, phys: u64) -> Option<usize> {
        let offset = phys.checked_sub(self.phys_base)?;
        let index = usize::try_from(offset / PAGE_SIZE).ok()?;
        (index < self.frames).then_some(index)
    }

    /// The 4 KiB frame at physical address `phys` (page aligned), if it is in this RAM.
    pub fn frame(&self, phys: u64) -> Option<&[u8]> {
        let index = self.frame_index(phys)?;
        Some(&self.bytes[index * PAGE..(index + 1) * PAGE])
    }

    /// The 4 KiB frame at physical address `phys`, writable.
    pub fn frame_mut(&mut self, phys: u64) -> Option<&mut [u8]> {
        let index = self.frame_index(phys)?;
        Some(&mut self.bytes[index * PAGE..(index + 1) * PAGE])
    }

    /// Copies the contents of frame `from` into frame `to`.
    pub(crate) fn copy_frame(&mut self, from: u64, to: u64) -> Option<()> {
        let source = self.frame_index(from)? * PAGE;
        let dest = self.frame_index(to)? * PAGE;
        self.bytes.copy_within(source..source + PAGE, dest);
        Some(())
    }

    /// Reads a little-endian page-table entry of `size` (4 or 8) bytes at `phys`.
    pub(crate) fn read_entry(&self, phys: u64, size: usize) -> Option<u64> {
        let frame = self.frame(page_down(phys))?;
        let offset = (phys % PAGE_SIZE) as usize;
        let bytes = frame.get(offset..offset + size)?;
        let mut raw = [0u8; 8];
        raw[..size].copy_from_slice(bytes);
        Some(u64::from_le_bytes(raw))
    }

    /// Writes a little-endian page-table entry of `size` (4 or 8) bytes at `phys`.
    pub(crate) fn write_entry(&mut self, phys: u64, size: usize, value: u64) -> Option<()> {
        let frame = self.frame_mut(page_down(phys))?;
        let offset = (phys % PAGE_SIZE) as usize;
        frame
            .get_mut(offset..offset + size)?
            .copy_from_slice(&value.to_le_bytes()[..size]);
        Some(())
    }
}
