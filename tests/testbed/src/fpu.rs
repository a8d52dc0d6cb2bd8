//! Per-process FPU/SSE/AVX state. The kernel itself never touches these
//! registers (soft-float target), so the registers always hold the state
//! of the process that ran last; a switch to another process saves it and
//! loads the other one's.

use alloc::collections::BTreeMap;
use alloc::vec;
use alloc::vec::Vec;
use core::arch::asm;

/// FXSAVE/XSAVE legacy-region offsets (SDM vol. 1, table 10-2).
const FCW_OFFSET: usize = 0;
const MXCSR_OFFSET: usize = 24;
/// Power-on values: x87 control word, MXCSR (SDM vol. 1, 8.1.5, 10.2.3).
const FCW_INIT: u16 = 0x037f;
const MXCSR_INIT: u32 = 0x1f80;
/// XSAVE areas are 64-byte aligned (SDM vol. 1, 13.4).
const AREA_ALIGN: usize = 64;

/// One saved state: a heap buffer with an aligned window inside it.
struct Area {
    buffer: Vec<u8>,
    offset: usize,
}

impl Area {
    /// The initial state: x87 and MXCSR at power-on values, XSAVE header
    /// zero (every component in its init state), registers zero.
    fn initial(size: usize) -> Area {
        let buffer = vec![0u8; size + AREA_ALIGN];
        let offset = (AREA_ALIGN - buffer.as_ptr() as usize % AREA_ALIGN) % AREA_ALIGN;
        let mut area = Area { buffer, offset };
        let bytes = area.bytes_mut(size);
        bytes[FCW_OFFSET..FCW_OFFSET + 2].copy_from_slice(&FCW_INIT.to_le_bytes());
        bytes[MXCSR_OFFSET..MXCSR_OFFSET + 4].copy_from_slice(&MXCSR_INIT.to_le_bytes());
        area
    }

    fn bytes_mut(&mut self, size: usize) -> &mut [u8] {
        &mut self.buffer[self.offset..self.offset + size]
    }

    fn ptr(&mut self) -> *mut u8 {
        // SAFETY: offset + size ≤ buffer.len() by construction.
        unsafe { self.buffer.as_mut_ptr().add(self.offset) }
    }
}

pub struct FpuStates<K: Ord + Copy> {
    xsave: bool,
    size: usize,
    areas: BTreeMap<K, Area>,
    /// Whose state the registers hold now.
    loaded: Option<K>,
}

impl<K: Ord + Copy> FpuStates<K> {
    pub fn new(xsave: bool, size: usize) -> Self {
        FpuStates {
            xsave,
            size,
            areas: BTreeMap::new(),
            loaded: None,
        }
    }

    /// Makes the registers hold `owner`'s state (a fresh state for an
    /// owner never seen before).
    pub fn switch_to(&mut self, owner: K) {
        if self.loaded == Some(owner) {
            return;
        }
        if let Some(previous) = self.loaded {
            let area = self
                .areas
                .entry(previous)
                .or_insert_with(|| Area::initial(self.size));
            save(self.xsave, area.ptr());
        }
        let area = self
            .areas
            .entry(owner)
            .or_insert_with(|| Area::initial(self.size));
        restore(self.xsave, area.ptr());
        self.loaded = Some(owner);
    }

    /// Keeps the states of the owners `alive` accepts, drops the others.
    pub fn retain(&mut self, mut alive: impl FnMut(&K) -> bool) {
        self.areas.retain(|owner, _| alive(owner));
        if self.loaded.is_some_and(|owner| !alive(&owner)) {
            self.loaded = None;
        }
    }
}

fn save(xsave: bool, area: *mut u8) {
    // SAFETY: `area` is a 64-byte aligned buffer of `size` bytes (the
    // CPUID 0xD size for XCR0, or 512 for FXSAVE); CR4.OSFXSR/OSXSAVE
    // are set by cpu::enable_features.
    unsafe {
        if xsave {
            asm!("xsave64 [{}]", in(reg) area, in("eax") u32::MAX, in("edx") u32::MAX, options(nostack));
        } else {
            asm!("fxsave64 [{}]", in(reg) area, options(nostack));
        }
    }
}

fn restore(xsave: bool, area: *mut u8) {
    // SAFETY: as in save; the area holds a state saved by save() or the
    // valid initial image (reserved fields and XSAVE header zero).
    unsafe {
        if xsave {
            asm!("xrstor64 [{}]", in(reg) area, in("eax") u32::MAX, in("edx") u32::MAX, options(nostack));
        } else {
            asm!("fxrstor64 [{}]", in(reg) area, options(nostack));
        }
    }
}
