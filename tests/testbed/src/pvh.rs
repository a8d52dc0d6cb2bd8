//! The PVH start-of-day structure (`hvm_start_info`, Xen
//! public/arch-x86/hvm/start_info.h), copied out of low memory at boot.

use crate::mem::phys_to_virt;
use core::fmt;

/// `XEN_HVM_START_MAGIC_VALUE`.
const START_MAGIC: u32 = 0x336e_c578;
/// Field offsets in `struct hvm_start_info`.
const OFF_NR_MODULES: usize = 12;
const OFF_MODLIST: usize = 16;
const OFF_CMDLINE: usize = 24;
const OFF_MEMMAP: usize = 40;
const OFF_MEMMAP_ENTRIES: usize = 48;
/// `struct hvm_memmap_table_entry` is 24 bytes, `struct hvm_modlist_entry` 32.
const MEMMAP_ENTRY_SIZE: u64 = 24;
/// E820 type of usable RAM (`XEN_HVM_MEMMAP_TYPE_RAM`).
pub const MEMMAP_TYPE_RAM: u32 = 1;

pub const MAX_MEMMAP: usize = 32;
pub const MAX_CMDLINE: usize = 512;

#[derive(Clone, Copy, Default)]
pub struct MemRegion {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

pub struct StartInfo {
    pub memmap: [MemRegion; MAX_MEMMAP],
    pub memmap_len: usize,
    pub cmdline: [u8; MAX_CMDLINE],
    pub cmdline_len: usize,
    /// The initrd (first module): physical address and size.
    pub initrd: Option<(u64, u64)>,
}

pub enum StartInfoError {
    BadMagic(u32),
    NoMemoryMap,
}

impl fmt::Display for StartInfoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartInfoError::BadMagic(magic) => write!(f, "magic {magic:#x}, not {START_MAGIC:#x}"),
            StartInfoError::NoMemoryMap => write!(f, "no memory map"),
        }
    }
}

/// Reads `n` bytes at a physical address below 1 GiB, which the boot
/// trampoline's early direct map covers.
fn read_u32(phys: u64) -> u32 {
    // SAFETY: the early DMAP maps physical 0..1 GiB and QEMU's PVH option
    // ROM places the start info and its tables in low memory.
    unsafe { core::ptr::read_unaligned(phys_to_virt(phys) as *const u32) }
}

fn read_u64(phys: u64) -> u64 {
    // SAFETY: as in read_u32.
    unsafe { core::ptr::read_unaligned(phys_to_virt(phys) as *const u64) }
}

fn read_u8(phys: u64) -> u8 {
    // SAFETY: as in read_u32.
    unsafe { core::ptr::read(phys_to_virt(phys) as *const u8) }
}

/// The early direct map covers physical memory below this.
const EARLY_MAP_LIMIT: u64 = 1 << 30;

fn early_mapped(phys: u64, len: u64) -> bool {
    phys.checked_add(len)
        .is_some_and(|end| end <= EARLY_MAP_LIMIT)
}

impl StartInfo {
    pub fn read(phys: u64) -> Result<StartInfo, StartInfoError> {
        if !early_mapped(phys, 56) {
            return Err(StartInfoError::BadMagic(0));
        }
        let magic = read_u32(phys);
        if magic != START_MAGIC {
            return Err(StartInfoError::BadMagic(magic));
        }
        let mut info = StartInfo {
            memmap: [MemRegion::default(); MAX_MEMMAP],
            memmap_len: 0,
            cmdline: [0; MAX_CMDLINE],
            cmdline_len: 0,
            initrd: None,
        };

        let memmap = read_u64(phys + OFF_MEMMAP as u64);
        let entries = (read_u32(phys + OFF_MEMMAP_ENTRIES as u64) as usize).min(MAX_MEMMAP);
        if memmap == 0 || entries == 0 || !early_mapped(memmap, entries as u64 * MEMMAP_ENTRY_SIZE)
        {
            return Err(StartInfoError::NoMemoryMap);
        }
        for (i, slot) in info.memmap.iter_mut().take(entries).enumerate() {
            let e = memmap + i as u64 * MEMMAP_ENTRY_SIZE;
            *slot = MemRegion {
                addr: read_u64(e),
                size: read_u64(e + 8),
                kind: read_u32(e + 16),
            };
        }
        info.memmap_len = entries;

        let cmdline = read_u64(phys + OFF_CMDLINE as u64);
        if cmdline != 0 && early_mapped(cmdline, MAX_CMDLINE as u64) {
            for i in 0..MAX_CMDLINE - 1 {
                let b = read_u8(cmdline + i as u64);
                if b == 0 {
                    break;
                }
                info.cmdline[i] = b;
                info.cmdline_len = i + 1;
            }
        }

        let modules = read_u32(phys + OFF_NR_MODULES as u64);
        let modlist = read_u64(phys + OFF_MODLIST as u64);
        if modules > 0 && modlist != 0 && early_mapped(modlist, 16) {
            info.initrd = Some((read_u64(modlist), read_u64(modlist + 8)));
        }
        Ok(info)
    }

    pub fn cmdline(&self) -> &str {
        core::str::from_utf8(&self.cmdline[..self.cmdline_len]).unwrap_or("")
    }

    pub fn memmap(&self) -> &[MemRegion] {
        &self.memmap[..self.memmap_len]
    }

    /// The value of `key=value` on the command line.
    pub fn cmdline_value(&self, key: &str) -> Option<&str> {
        self.cmdline()
            .split_ascii_whitespace()
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
    }
}
