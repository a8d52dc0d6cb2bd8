//! Hostile `kqemu_cpu_state`s for the fuzzers (issue 6, validation): the
//! host test of `validate_normal_mode` (fuzz_tests.rs) and the testbed's
//! EXEC fuzzer, which runs them through the real world switch at ring 0.
//! A seeded xorshift generator changes one field family at a time, at the
//! values where rules change: canonical and 4 GiB edges, descriptor flag
//! bits, EFLAGS/CR/EFER bits, the list counts beyond their maxima, an LDT
//! on the guest's own pages, any byte. No floating point: the testbed runs
//! this at ring 0.

use crate::abi::{KqemuCpuState, KqemuSegmentCache};

/// An LDT descriptor's high dword: present, DPL 0, type 2 (SDM Vol. 3A
/// 3.5), and the table-indicator bit of a selector.
const LDT_FLAGS: u32 = 0x8200;
const SELECTOR_LDT: u16 = 1 << 2;
const PAGE_SIZE: u64 = 4096;

/// xorshift64 (Marsaglia): deterministic, no floating point.
pub struct Rng(u64);

impl Rng {
    /// A distinct non-zero start for every seed: the SplitMix64 finalizer
    /// (a bijection) of the seed plus the golden-ratio increment.
    pub fn seeded(seed: u64) -> Rng {
        const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut z = seed.wrapping_add(GOLDEN);
        z = (z ^ z >> 30).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ z >> 27).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        Rng(if z == 0 { GOLDEN } else { z })
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn pick<T: Copy>(&mut self, values: &[T]) -> T {
        values[self.below(values.len() as u64) as usize]
    }

    /// An address at a rule's edge (canonical, 4 GiB, the old monitor's
    /// 0xF0000000), or `old` with one bit flipped, or anything.
    pub fn address(&mut self, old: u64) -> u64 {
        match self.below(4) {
            0 => old ^ 1 << self.below(64),
            1 => self.next_u64(),
            _ => self.pick(&[
                0,
                0xfff,
                0x7fff_ffff_ffff,
                0x7fff_ffff_fff0,
                0x8000_0000_0000,
                0xffff_7fff_ffff_ffff,
                0xffff_8000_0000_0000,
                0xffff_ffff_ffff_fff0,
                u64::MAX,
                0xffff_ffff,
                0xffff_fff0,
                0x1_0000_0000,
                0xc000_0000,
                0xf000_0000,
            ]),
        }
    }

    /// A count at and beyond its maximum (512, 513 = all), or negative.
    pub fn count(&mut self) -> u32 {
        self.pick(&[0, 1, 511, 512, 513, 514, 0x8000_0000, u32::MAX, 1000])
    }
}

/// One change to a segment cache.
pub fn mutate_segment(rng: &mut Rng, c: &mut KqemuSegmentCache) {
    match rng.below(5) {
        0 => {
            let garbage = if rng.below(4) == 0 {
                rng.next_u64() as u16
            } else {
                0
            };
            c.selector =
                rng.pick(&[0, 1, 3, 0x23, 0x2b, 0x33, 0x3b, 0x73, 0x7b, 0x7, 0xfffb]) ^ garbage;
        }
        // Type (8-11), S, DPL, P, AVL, L, D/B, G, or a bit the cache ignores.
        1 => c.flags ^= 1 << rng.pick(&[8, 9, 10, 11, 12, 13, 14, 15, 20, 21, 22, 23, 0, 31]),
        2 => c.base = rng.address(c.base),
        3 => c.limit = rng.pick(&[0, 0xfff, 0xffff, 0xf_ffff, 0xffff_ffff, 0x1000, 0xfff_ffff]),
        _ => c.flags = rng.next_u64() as u32,
    }
}

/// One change to a state.
pub fn mutate(rng: &mut Rng, s: &mut KqemuCpuState) {
    match rng.below(21) {
        0..=3 => {
            let i = rng.below(10) as usize;
            let cache = match i {
                0..=5 => &mut s.segs[i],
                6 => &mut s.ldt,
                7 => &mut s.tr,
                8 => &mut s.gdt,
                _ => &mut s.idt,
            };
            mutate_segment(rng, cache);
        }
        // VM, IOPL, IF, TF, AC, NT, RF, VIF, ID, bit 1, reserved 3/15/32.
        4 => s.eflags ^= 1 << rng.pick(&[17, 12, 13, 9, 8, 18, 14, 16, 19, 21, 1, 3, 15, 32]),
        5 => s.cpl = rng.pick(&[0, 1, 2, 3, 4, 0xff]),
        6 => s.cr0 ^= 1 << rng.pick(&[0, 1, 2, 3, 5, 16, 18, 29, 30, 31, 40]),
        7 => s.cr3 = rng.address(s.cr3) & !0xfff | rng.pick(&[0, 0x18, 0x800]),
        8 => s.cr4 ^= 1 << rng.below(33),
        9 => s.efer ^= 1 << rng.pick(&[0, 8, 10, 11, 12, 13, 14, 15, 20, 63]),
        10 => s.eip = rng.address(s.eip),
        11 => s.regs[4] = rng.address(s.regs[4]),
        12 => {
            s.dr7 = rng.pick(&[0, 1, 0x400, 0x2001, 0x1_0003, 1 << 12, 1 << 32]) | rng.below(256);
            s.dr0 = rng.address(s.dr0);
            s.dr3 = rng.address(s.dr3);
            s.dr6 = rng.pick(&[0, 0xffff_0ff0, 1 << 14, 1 << 40]);
        }
        13 => s.user_only = rng.pick(&[0, 1, 2, 0xff]),
        14 => {
            let any = rng.next_u64();
            s.a20_mask = rng.pick(&[u64::MAX, !(1 << 20), 0xffff_ffff, 0, any]);
        }
        15 => match rng.below(3) {
            0 => s.nb_pages_to_flush = rng.count(),
            1 => s.nb_ram_pages_to_update = rng.count(),
            _ => s.nb_modified_ram_pages = rng.count(),
        },
        16 => {
            s.retval = rng.next_u64() as i32;
            s.error_code = rng.next_u64() as u32;
            s.next_eip = rng.address(s.next_eip);
            s.cr2 = rng.address(s.cr2);
        }
        17 => {
            s.kernelgsbase = rng.address(s.kernelgsbase);
            s.sysenter_eip = rng.address(s.sysenter_eip);
            s.lstar = rng.address(s.lstar);
            s.star = rng.next_u64();
        }
        18 => {
            let i = rng.pick(&[4, 5]);
            s.segs[i].base = rng.address(s.segs[i].base);
        }
        19 => {
            // An LDT on the guest's own code or stack page (its bytes read
            // as descriptors), and a segment register selecting from it.
            let page = rng.pick(&[s.eip, s.regs[4], s.gdt.base]) & !(PAGE_SIZE - 1);
            s.ldt = KqemuSegmentCache {
                selector: rng.pick(&[0x28, 0x30, 0x50, 0x58]),
                flags: LDT_FLAGS,
                base: page,
                limit: rng.pick(&[0x7, 0xfff, 0xffff, 0x1_0000]),
                ..s.ldt
            };
            let i = rng.below(6) as usize;
            s.segs[i].selector = (rng.below(512) as u16) << 3 | SELECTOR_LDT | 3;
        }
        _ => {
            // SAFETY: a Pod has no padding bytes and accepts every bit
            // pattern (abi.rs); the slice covers exactly `s`.
            let bytes = unsafe {
                core::slice::from_raw_parts_mut(
                    (s as *mut KqemuCpuState).cast::<u8>(),
                    core::mem::size_of::<KqemuCpuState>(),
                )
            };
            let at = rng.below(bytes.len() as u64) as usize;
            bytes[at] = rng.next_u64() as u8;
        }
    }
}
