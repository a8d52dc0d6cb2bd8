//! Parser for static ELF executables: ELF32 i386 and ELF64 x86_64
//! (System V gABI, "ELF Header" and "Program Header").

use alloc::vec::Vec;
use core::fmt;

use crate::context::Arch;

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const ELFCLASS32: u8 = 1;
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const EV_CURRENT: u8 = 1;
const ET_EXEC: u16 = 2;
const ET_DYN: u16 = 3;
const EM_386: u16 = 3;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const PT_INTERP: u32 = 3;
const PT_PHDR: u32 = 6;
const PT_TLS: u32 = 7;
const PT_GNU_STACK: u32 = 0x6474_e551;
/// Segment permission flags (`p_flags`).
pub const PF_X: u32 = 1;
pub const PF_W: u32 = 2;
pub const PF_R: u32 = 4;

/// Why a file is not a program this OS can run.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ElfError {
    NotElf,
    /// Not little-endian ELF32/EM_386 or ELF64/EM_X86_64.
    UnsupportedMachine,
    /// Neither ET_EXEC nor ET_DYN.
    NotExecutable,
    /// The program asks for an interpreter (dynamic linking is not supported).
    Dynamic,
    /// A header or segment lies outside the file or overflows.
    Truncated,
    /// A PT_LOAD with filesz > memsz or no PT_LOAD at all.
    BadSegments,
}

impl fmt::Display for ElfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            ElfError::NotElf => "not an ELF file",
            ElfError::UnsupportedMachine => "not an i386 or x86_64 little-endian ELF",
            ElfError::NotExecutable => "not an executable ELF",
            ElfError::Dynamic => {
                "dynamically linked (PT_INTERP): only static executables are supported"
            }
            ElfError::Truncated => "ELF header or segment outside the file",
            ElfError::BadSegments => "ELF with no loadable segment or filesz > memsz",
        };
        f.write_str(text)
    }
}

/// A PT_LOAD segment.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Segment {
    pub vaddr: u64,
    pub memsz: u64,
    pub offset: u64,
    pub filesz: u64,
    /// `PF_R | PF_W | PF_X` bits.
    pub flags: u32,
}

/// What the loader needs from an executable.
#[derive(Clone, Debug)]
pub struct ElfImage<'f> {
    pub arch: Arch,
    /// ET_DYN (static PIE): loaded at a bias chosen by the loader.
    pub position_independent: bool,
    pub entry: u64,
    pub phentsize: u64,
    pub phnum: u64,
    /// Link-time address of the program headers in memory (PT_PHDR, or the PT_LOAD that
    /// covers `e_phoff`), if they are loaded at all.
    pub phdr_vaddr: Option<u64>,
    pub segments: Vec<Segment>,
    /// PT_GNU_STACK asks for an executable stack (or is absent).
    pub stack_exec: bool,
    /// The program has a PT_TLS segment (it sets up its thread pointer itself).
    pub has_tls: bool,
    pub file: &'f [u8],
}

fn bytes<const N: usize>(file: &[u8], at: u64) -> Result<[u8; N], ElfError> {
    let start = usize::try_from(at).map_err(|_| ElfError::Truncated)?;
    let end = start.checked_add(N).ok_or(ElfError::Truncated)?;
    let slice = file.get(start..end).ok_or(ElfError::Truncated)?;
    let mut out = [0u8; N];
    out.copy_from_slice(slice);
    Ok(out)
}

fn u16_at(file: &[u8], at: u64) -> Result<u16, ElfError> {
    Ok(u16::from_le_bytes(bytes(file, at)?))
}

fn u32_at(file: &[u8], at: u64) -> Result<u32, ElfError> {
    Ok(u32::from_le_bytes(bytes(file, at)?))
}

fn u64_at(file: &[u8], at: u64) -> Result<u64, ElfError> {
    Ok(u64::from_le_bytes(bytes(file, at)?))
}

struct RawPhdr {
    kind: u32,
    flags: u32,
    offset: u64,
    vaddr: u64,
    filesz: u64,
    memsz: u64,
}

fn read_phdr(file: &[u8], arch: Arch, at: u64) -> Result<RawPhdr, ElfError> {
    Ok(match arch {
        Arch::Amd64 => RawPhdr {
            kind: u32_at(file, at)?,
            flags: u32_at(file, at + 4)?,
            offset: u64_at(file, at + 8)?,
            vaddr: u64_at(file, at + 16)?,
            filesz: u64_at(file, at + 32)?,
            memsz: u64_at(file, at + 40)?,
        },
        Arch::I386 => RawPhdr {
            kind: u32_at(file, at)?,
            offset: u32_at(file, at + 4)?.into(),
            vaddr: u32_at(file, at + 8)?.into(),
            filesz: u32_at(file, at + 16)?.into(),
            memsz: u32_at(file, at + 20)?.into(),
            flags: u32_at(file, at + 24)?,
        },
    })
}

/// Parses and validates a static executable.
pub fn parse(file: &[u8]) -> Result<ElfImage<'_>, ElfError> {
    if file.len() < 16 || &file[..4] != ELF_MAGIC {
        return Err(ElfError::NotElf);
    }
    if file[5] != ELFDATA2LSB || file[6] != EV_CURRENT {
        return Err(ElfError::UnsupportedMachine);
    }
    let class = file[4];
    let machine = u16_at(file, 18)?;
    let arch = match (class, machine) {
        (ELFCLASS32, EM_386) => Arch::I386,
        (ELFCLASS64, EM_X86_64) => Arch::Amd64,
        _ => return Err(ElfError::UnsupportedMachine),
    };
    let position_independent = match u16_at(file, 16)? {
        ET_EXEC => false,
        ET_DYN => true,
        _ => return Err(ElfError::NotExecutable),
    };
    let (entry, phoff, phentsize, phnum) = match arch {
        Arch::Amd64 => (
            u64_at(file, 24)?,
            u64_at(file, 32)?,
            u16_at(file, 54)?,
            u16_at(file, 56)?,
        ),
        Arch::I386 => (
            u32_at(file, 24)?.into(),
            u32_at(file, 28)?.into(),
            u16_at(file, 42)?,
            u16_at(file, 44)?,
        ),
    };
    let expected_phentsize = match arch {
        Arch::Amd64 => 56,
        Arch::I386 => 32,
    };
    if phentsize != expected_phentsize {
        return Err(ElfError::Truncated);
    }
    let phentsize = u64::from(phentsize);
    let phnum = u64::from(phnum);
    let table_end = phoff
        .checked_add(phentsize * phnum)
        .ok_or(ElfError::Truncated)?;
    if table_end > file.len() as u64 {
        return Err(ElfError::Truncated);
    }
    let mut image = ElfImage {
        arch,
        position_independent,
        entry,
        phentsize,
        phnum,
        phdr_vaddr: None,
        segments: Vec::new(),
        stack_exec: true,
        has_tls: false,
        file,
    };
    let mut phdr_segment = None;
    for index in 0..phnum {
        let ph = read_phdr(file, arch, phoff + index * phentsize)?;
        match ph.kind {
            PT_LOAD => {
                let file_end = ph.offset.checked_add(ph.filesz);
                if ph.filesz > ph.memsz || ph.vaddr.checked_add(ph.memsz).is_none() {
                    return Err(ElfError::BadSegments);
                }
                if file_end.is_none_or(|end| end > file.len() as u64) {
                    return Err(ElfError::Truncated);
                }
                image.segments.push(Segment {
                    vaddr: ph.vaddr,
                    memsz: ph.memsz,
                    offset: ph.offset,
                    filesz: ph.filesz,
                    flags: ph.flags,
                });
            }
            PT_INTERP => return Err(ElfError::Dynamic),
            PT_PHDR => phdr_segment = Some(ph.vaddr),
            PT_TLS => image.has_tls = true,
            PT_GNU_STACK => image.stack_exec = ph.flags & PF_X != 0,
            _ => {}
        }
    }
    if image.segments.is_empty() {
        return Err(ElfError::BadSegments);
    }
    image.phdr_vaddr = phdr_segment.or_else(|| {
        image
            .segments
            .iter()
            .find(|s| s.offset <= phoff && table_end <= s.offset + s.filesz)
            .map(|s| s.vaddr + (phoff - s.offset))
    });
    Ok(image)
}
