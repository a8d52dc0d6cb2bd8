//! Builds a program's address space from a static ELF and lays out its initial stack as
//! the System V ABI and Linux `create_elf_tables` do.

use alloc::vec::Vec;

use crate::context::{Arch, PagingFormat};
use crate::elf::{ElfImage, PF_R, PF_W, PF_X};
use crate::errno::{Errno, KResult};
use crate::mm::Mm;
use crate::paging::{PROT_EXEC, PROT_READ, PROT_WRITE};
use crate::ram::{page_down, page_up, GuestRam};

/// Auxiliary vector types (Linux uapi/linux/auxvec.h).
pub const AT_NULL: u64 = 0;
pub const AT_PHDR: u64 = 3;
pub const AT_PHENT: u64 = 4;
pub const AT_PHNUM: u64 = 5;
pub const AT_PAGESZ: u64 = 6;
pub const AT_BASE: u64 = 7;
pub const AT_FLAGS: u64 = 8;
pub const AT_ENTRY: u64 = 9;
pub const AT_UID: u64 = 11;
pub const AT_EUID: u64 = 12;
pub const AT_GID: u64 = 13;
pub const AT_EGID: u64 = 14;
pub const AT_PLATFORM: u64 = 15;
pub const AT_HWCAP: u64 = 16;
pub const AT_CLKTCK: u64 = 17;
pub const AT_SECURE: u64 = 23;
pub const AT_RANDOM: u64 = 25;
pub const AT_HWCAP2: u64 = 26;
pub const AT_EXECFN: u64 = 31;

/// `sysconf(_SC_CLK_TCK)` as Linux reports it (USER_HZ).
pub const CLOCK_TICKS: u64 = 100;
/// Where a static PIE (ET_DYN) is placed (Linux `ELF_ET_DYN_BASE` without randomization).
const PIE_BASE_AMD64: u64 = 0x5555_5555_4000;
const PIE_BASE_I386: u64 = 0x5655_5000;
/// Largest argv + envp + auxv block accepted (Linux: a quarter of the 8 MiB stack limit).
pub const ARG_MAX: usize = 2 << 20;

/// How to build address spaces (from `LinuxConfig`).
#[derive(Clone, Copy, Debug)]
pub struct AddressSpaceSpec<'k> {
    pub format: PagingFormat,
    pub nx: bool,
    pub kernel_entries: &'k [(usize, u64)],
}

/// What the new program's stack receives besides argv and envp.
pub struct StackInfo<'s> {
    pub execfn: &'s [u8],
    pub random: [u8; 16],
    pub hwcap: u64,
}

/// A loaded program, ready to run.
pub struct Loaded {
    pub mm: Mm,
    pub entry: u64,
    pub sp: u64,
}

fn prot_of(flags: u32) -> u32 {
    let mut prot = 0;
    if flags & PF_R != 0 {
        prot |= PROT_READ;
    }
    if flags & PF_W != 0 {
        prot |= PROT_WRITE;
    }
    if flags & PF_X != 0 {
        prot |= PROT_EXEC;
    }
    prot
}

/// Loads `elf` into a fresh address space and builds its stack.
pub fn load(
    ram: &mut GuestRam,
    spec: AddressSpaceSpec,
    elf: &ElfImage,
    argv: &[Vec<u8>],
    envp: &[Vec<u8>],
    info: &StackInfo,
) -> KResult<Loaded> {
    let mut mm = Mm::new(ram, elf.arch, spec.format, spec.nx, spec.kernel_entries)?;
    match populate(ram, &mut mm, elf, argv, envp, info) {
        Ok((entry, sp)) => Ok(Loaded { mm, entry, sp }),
        Err(err) => {
            mm.destroy(ram);
            Err(err)
        }
    }
}

fn populate(
    ram: &mut GuestRam,
    mm: &mut Mm,
    elf: &ElfImage,
    argv: &[Vec<u8>],
    envp: &[Vec<u8>],
    info: &StackInfo,
) -> KResult<(u64, u64)> {
    let lowest = elf.segments.iter().map(|s| s.vaddr).min().unwrap_or(0);
    let bias = if elf.position_independent {
        let base = match elf.arch {
            Arch::Amd64 => PIE_BASE_AMD64,
            Arch::I386 => PIE_BASE_I386,
        };
        base.wrapping_sub(page_down(lowest))
    } else {
        0
    };
    let limit = mm.stack_top - crate::mm::STACK_RESERVE;
    let mut image_end = 0;
    for seg in &elf.segments {
        let vaddr = seg.vaddr.wrapping_add(bias);
        let end = vaddr
            .checked_add(seg.memsz)
            .filter(|&end| end <= limit)
            .ok_or(Errno::ENOMEM)?;
        if seg.memsz == 0 {
            continue;
        }
        let map_end = page_up(end).ok_or(Errno::ENOMEM)?;
        mm.map_segment(ram, page_down(vaddr), map_end, prot_of(seg.flags))?;
        let data = &elf.file[seg.offset as usize..(seg.offset + seg.filesz) as usize];
        mm.poke(ram, vaddr, data)?;
        image_end = image_end.max(end);
    }
    mm.init_brk(image_end)?;
    let stack_prot = PROT_READ | PROT_WRITE | if elf.stack_exec { PROT_EXEC } else { 0 };
    mm.map_initial_stack(ram, stack_prot)?;
    let phdr = match elf.phdr_vaddr {
        Some(vaddr) => vaddr.wrapping_add(bias),
        // Linux's fallback: the first segment's load address plus e_phoff.
        None => elf.segments[0].vaddr.wrapping_sub(elf.segments[0].offset) + bias,
    };
    let entry = elf.entry.wrapping_add(bias);
    let sp = build_stack(
        ram,
        mm,
        elf.arch,
        argv,
        envp,
        info,
        |random, platform, execfn| {
            [
                (AT_HWCAP, info.hwcap),
                (AT_PAGESZ, crate::ram::PAGE_SIZE),
                (AT_CLKTCK, CLOCK_TICKS),
                (AT_PHDR, phdr),
                (AT_PHENT, elf.phentsize),
                (AT_PHNUM, elf.phnum),
                (AT_BASE, 0),
                (AT_FLAGS, 0),
                (AT_ENTRY, entry),
                (AT_UID, 0),
                (AT_EUID, 0),
                (AT_GID, 0),
                (AT_EGID, 0),
                (AT_SECURE, 0),
                (AT_RANDOM, random),
                (AT_HWCAP2, 0),
                (AT_EXECFN, execfn),
                (AT_PLATFORM, platform),
            ]
        },
    )?;
    Ok((entry, sp))
}

/// Writes strings, auxv, envp, argv and argc below the stack top; returns the initial
/// stack pointer (16-byte aligned, pointing at argc). `auxv(random, platform, execfn)`
/// gives the auxiliary vector without its AT_NULL terminator.
fn build_stack<const N: usize>(
    ram: &mut GuestRam,
    mm: &mut Mm,
    arch: Arch,
    argv: &[Vec<u8>],
    envp: &[Vec<u8>],
    info: &StackInfo,
    auxv: impl FnOnce(u64, u64, u64) -> [(u64, u64); N],
) -> KResult<u64> {
    let (word, platform): (u64, &[u8]) = match arch {
        Arch::Amd64 => (8, b"x86_64"),
        Arch::I386 => (4, b"i686"),
    };
    let strings_len: usize = argv.iter().chain(envp).map(|s| s.len() + 1).sum();
    let total = strings_len + info.execfn.len() + platform.len() + 64;
    let pointers = (argv.len() + envp.len() + 3 + 2 * (N + 1)) as u64 * word;
    if total + pointers as usize > ARG_MAX {
        return Err(Errno::E2BIG);
    }
    // A NULL word at the very top, then the program name (Linux puts bprm->filename there).
    let mut cursor = mm.stack_top - word;
    let execfn = cursor - (info.execfn.len() as u64 + 1);
    cursor = execfn;
    let strings = cursor - strings_len as u64;
    cursor = strings;
    let platform_at = cursor - (platform.len() as u64 + 1);
    let random_at = (platform_at - 16) & !15;
    let sp = (random_at - pointers) & !15;
    if !mm.grow_stack(ram, sp) && mm.pt.leaf(ram, sp).is_none() {
        return Err(Errno::E2BIG);
    }
    let mut text = Vec::with_capacity(strings_len);
    let mut argv_ptrs = Vec::with_capacity(argv.len());
    let mut envp_ptrs = Vec::with_capacity(envp.len());
    for (list, ptrs) in [(argv, &mut argv_ptrs), (envp, &mut envp_ptrs)] {
        for s in list {
            ptrs.push(strings + text.len() as u64);
            text.extend_from_slice(s);
            text.push(0);
        }
    }
    mm.poke(ram, strings, &text)?;
    let mut execfn_bytes = info.execfn.to_vec();
    execfn_bytes.push(0);
    mm.poke(ram, execfn, &execfn_bytes)?;
    let mut platform_bytes = platform.to_vec();
    platform_bytes.push(0);
    mm.poke(ram, platform_at, &platform_bytes)?;
    mm.poke(ram, random_at, &info.random)?;

    let mut words: Vec<u64> = Vec::with_capacity(pointers as usize);
    words.push(argv.len() as u64);
    words.extend_from_slice(&argv_ptrs);
    words.push(0);
    words.extend_from_slice(&envp_ptrs);
    words.push(0);
    for (key, value) in auxv(random_at, platform_at, execfn) {
        words.extend_from_slice(&[key, value]);
    }
    words.extend_from_slice(&[AT_NULL, 0]);
    let mut block = Vec::with_capacity(words.len() * word as usize);
    for w in words {
        block.extend_from_slice(&w.to_le_bytes()[..word as usize]);
    }
    mm.poke(ram, sp, &block)?;
    Ok(sp)
}
