//! The parts of ELF64 (System V gABI, x86-64 psABI) that an amd64 kld
//! uses, read from a byte slice with every offset bounds-checked: the
//! kernel's `link_elf_obj.c` trusts the file, a test loader must not.

/// `e_ident[EI_CLASS]` for 64-bit objects (gABI).
pub const ELFCLASS64: u8 = 2;
/// `e_ident[EI_DATA]` for little-endian objects (gABI).
pub const ELFDATA2LSB: u8 = 1;
/// `EV_CURRENT`, both in `e_ident[EI_VERSION]` and `e_version` (gABI).
pub const EV_CURRENT: u32 = 1;
/// `e_type` of a relocatable object: what `ld -r` makes of a kld (gABI).
pub const ET_REL: u16 = 1;
/// `e_machine` for x86-64 (gABI).
pub const EM_X86_64: u16 = 62;

/// Size of `Elf64_Ehdr`, `Elf64_Shdr`, `Elf64_Sym`, `Elf64_Rela` (gABI).
pub const EHDR_SIZE: usize = 64;
pub const SHDR_SIZE: usize = 64;
pub const SYM_SIZE: usize = 24;
pub const RELA_SIZE: usize = 24;

/// Section types (gABI; `SHT_X86_64_UNWIND` from the x86-64 psABI: LLVM
/// gives `.eh_frame` this type, and link_elf_obj loads it like PROGBITS).
pub const SHT_PROGBITS: u32 = 1;
pub const SHT_SYMTAB: u32 = 2;
pub const SHT_STRTAB: u32 = 3;
pub const SHT_RELA: u32 = 4;
pub const SHT_NOBITS: u32 = 8;
pub const SHT_REL: u32 = 9;
pub const SHT_INIT_ARRAY: u32 = 14;
pub const SHT_FINI_ARRAY: u32 = 15;
pub const SHT_X86_64_UNWIND: u32 = 0x7000_0001;

/// Section flags (gABI).
pub const SHF_WRITE: u64 = 0x1;
pub const SHF_ALLOC: u64 = 0x2;
pub const SHF_EXECINSTR: u64 = 0x4;

/// Special section indices (gABI).
pub const SHN_UNDEF: u16 = 0;
pub const SHN_COMMON: u16 = 0xfff2;

/// Symbol bindings and types (gABI; `STT_GNU_IFUNC` is the GNU OS extension
/// FreeBSD honours).
pub const STB_LOCAL: u8 = 0;
pub const STB_GLOBAL: u8 = 1;
pub const STB_WEAK: u8 = 2;
pub const STT_GNU_IFUNC: u8 = 10;

/// The relocation types FreeBSD's amd64 `elf_reloc_internal`
/// (sys/amd64/amd64/elf_machdep.c) knows, numbered as in the x86-64 psABI.
pub const R_X86_64_NONE: u32 = 0;
pub const R_X86_64_64: u32 = 1;
pub const R_X86_64_PC32: u32 = 2;
pub const R_X86_64_PLT32: u32 = 4;
pub const R_X86_64_COPY: u32 = 5;
pub const R_X86_64_GLOB_DAT: u32 = 6;
pub const R_X86_64_JMP_SLOT: u32 = 7;
pub const R_X86_64_RELATIVE: u32 = 8;
pub const R_X86_64_32S: u32 = 11;
pub const R_X86_64_IRELATIVE: u32 = 37;

/// Little-endian reads from a slice; `None` when the range is outside it.
pub fn read_u16(bytes: &[u8], at: usize) -> Option<u16> {
    let b = bytes.get(at..at.checked_add(2)?)?;
    Some(u16::from_le_bytes([b[0], b[1]]))
}

pub fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

pub fn read_u64(bytes: &[u8], at: usize) -> Option<u64> {
    let b = bytes.get(at..at.checked_add(8)?)?;
    let mut raw = [0u8; 8];
    raw.copy_from_slice(b);
    Some(u64::from_le_bytes(raw))
}

/// The NUL-terminated string at `at`; `None` if it runs off the slice or
/// is not UTF-8 (symbol and section names in a kld are ASCII).
pub fn read_cstr(bytes: &[u8], at: usize) -> Option<&str> {
    let tail = bytes.get(at..)?;
    let len = tail.iter().position(|&b| b == 0)?;
    core::str::from_utf8(&tail[..len]).ok()
}

/// `Elf64_Ehdr`, the fields the loader reads.
#[derive(Clone, Copy, Debug)]
pub struct Header {
    pub class: u8,
    pub data: u8,
    pub ident_version: u8,
    pub e_type: u16,
    pub machine: u16,
    pub version: u32,
    pub shoff: u64,
    pub shentsize: u16,
    pub shnum: u16,
    pub shstrndx: u16,
}

/// `None` unless the file is at least a header long and starts with the
/// ELF magic (FreeBSD's `IS_ELF`).
pub fn header(file: &[u8]) -> Option<Header> {
    if file.len() < EHDR_SIZE || file[..4] != *b"\x7fELF" {
        return None;
    }
    Some(Header {
        class: file[4],
        data: file[5],
        ident_version: file[6],
        e_type: read_u16(file, 16)?,
        machine: read_u16(file, 18)?,
        version: read_u32(file, 20)?,
        shoff: read_u64(file, 40)?,
        shentsize: read_u16(file, 58)?,
        shnum: read_u16(file, 60)?,
        shstrndx: read_u16(file, 62)?,
    })
}

/// `Elf64_Shdr`.
#[derive(Clone, Copy, Debug)]
pub struct SectionHeader {
    pub name: u32,
    pub sh_type: u32,
    pub flags: u64,
    pub offset: u64,
    pub size: u64,
    pub link: u32,
    pub info: u32,
    pub addralign: u64,
}

impl SectionHeader {
    pub fn parse(raw: &[u8]) -> Option<Self> {
        Some(SectionHeader {
            name: read_u32(raw, 0)?,
            sh_type: read_u32(raw, 4)?,
            flags: read_u64(raw, 8)?,
            offset: read_u64(raw, 24)?,
            size: read_u64(raw, 32)?,
            link: read_u32(raw, 40)?,
            info: read_u32(raw, 44)?,
            addralign: read_u64(raw, 48)?,
        })
    }

    pub fn is_alloc(&self) -> bool {
        self.flags & SHF_ALLOC != 0
    }

    /// The section's bytes in the file (not for `SHT_NOBITS`).
    pub fn contents<'f>(&self, file: &'f [u8]) -> Option<&'f [u8]> {
        let start = usize::try_from(self.offset).ok()?;
        let len = usize::try_from(self.size).ok()?;
        file.get(start..start.checked_add(len)?)
    }
}

/// `Elf64_Sym`.
#[derive(Clone, Copy, Debug)]
pub struct Symbol {
    pub name: u32,
    pub info: u8,
    pub shndx: u16,
    pub value: u64,
}

impl Symbol {
    pub fn parse(raw: &[u8]) -> Option<Self> {
        Some(Symbol {
            name: read_u32(raw, 0)?,
            info: *raw.get(4)?,
            shndx: read_u16(raw, 6)?,
            value: read_u64(raw, 8)?,
        })
    }

    pub fn bind(&self) -> u8 {
        self.info >> 4
    }

    pub fn sym_type(&self) -> u8 {
        self.info & 0xf
    }
}

/// `Elf64_Rela`.
#[derive(Clone, Copy, Debug)]
pub struct Rela {
    pub offset: u64,
    pub info: u64,
    pub addend: i64,
}

impl Rela {
    pub fn parse(raw: &[u8]) -> Option<Self> {
        Some(Rela {
            offset: read_u64(raw, 0)?,
            info: read_u64(raw, 8)?,
            addend: read_u64(raw, 16)? as i64,
        })
    }

    /// `ELF64_R_SYM`.
    pub fn symbol(&self) -> u32 {
        (self.info >> 32) as u32
    }

    /// `ELF64_R_TYPE`.
    pub fn rtype(&self) -> u32 {
        self.info as u32
    }
}

/// The psABI name of a relocation type, for messages.
pub fn relocation_name(rtype: u32) -> &'static str {
    match rtype {
        R_X86_64_NONE => "R_X86_64_NONE",
        R_X86_64_64 => "R_X86_64_64",
        R_X86_64_PC32 => "R_X86_64_PC32",
        R_X86_64_PLT32 => "R_X86_64_PLT32",
        R_X86_64_COPY => "R_X86_64_COPY",
        R_X86_64_GLOB_DAT => "R_X86_64_GLOB_DAT",
        R_X86_64_JMP_SLOT => "R_X86_64_JMP_SLOT",
        R_X86_64_RELATIVE => "R_X86_64_RELATIVE",
        R_X86_64_32S => "R_X86_64_32S",
        R_X86_64_IRELATIVE => "R_X86_64_IRELATIVE",
        _ => "R_X86_64_?",
    }
}
