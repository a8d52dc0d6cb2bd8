//! Reading the section table and laying out the image, as
//! `link_elf_load_file` does before any relocation: header checks, the
//! sections that make up the image, their offsets, the symbol table.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use crate::elf::{
    self, Header, SectionHeader, Symbol, EHDR_SIZE, ELFCLASS64, ELFDATA2LSB, EM_X86_64, ET_REL,
    EV_CURRENT, RELA_SIZE, SHDR_SIZE, SHF_EXECINSTR, SHF_WRITE, SHN_COMMON, SHN_UNDEF,
    SHT_FINI_ARRAY, SHT_INIT_ARRAY, SHT_NOBITS, SHT_PROGBITS, SHT_REL, SHT_RELA, SHT_STRTAB,
    SHT_SYMTAB, SHT_X86_64_UNWIND, SYM_SIZE,
};
use crate::error::{malformed, own, refuse, ErrorKind, LoadError};
use crate::kld::{Definition, Kld, LinkSymbol};
use crate::loader::{Memory, PAGE_SIZE};
use crate::metadata::LinkerSet;

/// The largest section alignment accepted. The image is asked of the
/// provider at the largest alignment of its sections (a page at least, as
/// the kernel maps it), so any power of two could be honoured; the bound
/// keeps a corrupted `sh_addralign` from asking for absurd ones.
const MAX_SECTION_ALIGN: u64 = 2 << 20;

/// Sections the kernel does not place in the image but in the per-CPU
/// and per-VNET areas (`DPCPU_SETNAME`, `VNET_SETNAME`).
const DPCPU_SETNAME: &str = "set_pcpu";
const VNET_SETNAME: &str = "set_vnet";

/// The kind of an image section, as `link_elf_obj` names unnamed ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SectionKind {
    ProgBits,
    NoBits,
    Unwind,
    InitArray,
    FiniArray,
}

/// A section of the image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Section {
    /// The section's name, or `<<PROGBITS>>`-style when it has none.
    pub name: String,
    /// Index in the file's section table.
    pub index: usize,
    pub address: u64,
    pub size: u64,
    /// `sh_flags`.
    pub flags: u64,
    pub kind: SectionKind,
}

impl Section {
    /// `link_elf_protect` maps a section writable when `SHF_WRITE` is set.
    pub fn writable(&self) -> bool {
        self.flags & SHF_WRITE != 0
    }

    /// ... and executable when `SHF_EXECINSTR` is set.
    pub fn executable(&self) -> bool {
        self.flags & SHF_EXECINSTR != 0
    }
}

/// An image section still to be filled from the file.
pub(crate) struct Placement {
    header: SectionHeader,
    offset: usize,
}

/// A `RELA` table for an image section.
pub(crate) struct RelaTable<'f> {
    pub index: usize,
    pub target: usize,
    pub entries: &'f [u8],
}

/// What the section table says, before any memory is taken.
pub(crate) struct Plan<'f> {
    path: &'f str,
    object: &'f [u8],
    sections: Vec<Section>,
    placements: Vec<Placement>,
    symbols: Vec<(String, Symbol)>,
    shnum: usize,
    pub relas: Vec<RelaTable<'f>>,
    image_size: usize,
    align: u64,
    ctors: Option<usize>,
    dtors: Option<usize>,
}

impl<'f> Plan<'f> {
    pub(crate) fn read(path: &'f str, object: &'f [u8]) -> Result<Self, LoadError> {
        let header = check_header(path, object)?;
        let headers = section_headers(path, object, &header)?;
        let shnum = headers.len();

        let mut image_sections = Vec::new();
        let mut symtabs = Vec::new();
        let mut rela_tables = Vec::new();
        for (index, sh) in headers.iter().enumerate() {
            if sh.size == 0 {
                continue;
            }
            match sh.sh_type {
                SHT_PROGBITS | SHT_NOBITS | SHT_X86_64_UNWIND | SHT_INIT_ARRAY | SHT_FINI_ARRAY
                    if sh.is_alloc() =>
                {
                    image_sections.push(index)
                }
                SHT_SYMTAB => symtabs.push(index),
                SHT_REL | SHT_RELA => {
                    let target = usize::try_from(sh.info).ok().filter(|&t| t < shnum);
                    let Some(target) = target else {
                        return Err(malformed(
                            path,
                            format!("relocation section {index} patches section {}, which does not exist", sh.info),
                        ));
                    };
                    if !headers[target].is_alloc() {
                        continue;
                    }
                    if sh.sh_type == SHT_REL {
                        // amd64 objects carry RELA only; REL takes its addend
                        // from the patched field, which nothing here builds.
                        return Err(own(
                            ErrorKind::Unsupported,
                            path,
                            format!("SHT_REL section {index} (amd64 klds use SHT_RELA)"),
                        ));
                    }
                    rela_tables.push((index, target));
                }
                _ => {}
            }
        }
        if image_sections.is_empty() {
            return Err(refuse(ErrorKind::NoContents, path, "file has no contents"));
        }
        let [symtab] = symtabs[..] else {
            return Err(refuse(
                ErrorKind::SymbolTableCount,
                path,
                "file must have exactly one symbol table",
            ));
        };
        let strtab = headers[symtab].link as usize;
        if strtab >= shnum || headers[strtab].sh_type != SHT_STRTAB {
            return Err(refuse(
                ErrorKind::InvalidSymbolStrings,
                path,
                "file has invalid symbol strings",
            ));
        }
        let strings = headers[strtab]
            .contents(object)
            .ok_or_else(|| malformed(path, "the symbol strings lie outside the file".into()))?;
        let shstrtab = match usize::from(header.shstrndx) {
            0 => None,
            i if i < shnum && headers[i].sh_type == SHT_STRTAB => {
                Some(headers[i].contents(object).ok_or_else(|| {
                    malformed(path, "the section names lie outside the file".into())
                })?)
            }
            _ => None,
        };

        let mut plan = Plan {
            path,
            object,
            sections: Vec::new(),
            placements: Vec::new(),
            symbols: Vec::new(),
            shnum,
            relas: Vec::new(),
            image_size: 0,
            align: PAGE_SIZE as u64,
            ctors: None,
            dtors: None,
        };
        plan.lay_out(&headers, &image_sections, shstrtab)?;
        plan.read_symbols(&headers[symtab], strings)?;
        for (index, target) in rela_tables {
            let sh = &headers[index];
            let entries = sh.contents(object).ok_or_else(|| {
                malformed(
                    path,
                    format!("relocation section {index} lies outside the file"),
                )
            })?;
            if !entries.len().is_multiple_of(RELA_SIZE) {
                return Err(malformed(
                    path,
                    format!("relocation section {index} is not a whole number of Elf64_Rela"),
                ));
            }
            plan.relas.push(RelaTable {
                index,
                target,
                entries,
            });
        }
        Ok(plan)
    }

    /// Offsets of the image sections, aligned as `link_elf_load_file`
    /// aligns them, and their names.
    fn lay_out(
        &mut self,
        headers: &[SectionHeader],
        image_sections: &[usize],
        shstrtab: Option<&[u8]>,
    ) -> Result<(), LoadError> {
        let path = self.path;
        let mut offset: u64 = 0;
        for &index in image_sections {
            let sh = headers[index];
            // gABI: 0 and 1 both mean "no constraint" (the kernel's mask
            // arithmetic would misplace a 0).
            let align = sh.addralign.max(1);
            if !align.is_power_of_two() || align > MAX_SECTION_ALIGN {
                return Err(malformed(
                    path,
                    format!("section {index} has alignment {align:#x}"),
                ));
            }
            self.align = self.align.max(align);
            let start = offset.checked_next_multiple_of(align);
            let end = start.and_then(|start| start.checked_add(sh.size));
            let (Some(start), Some(end)) = (start, end) else {
                return Err(malformed(path, format!("section {index} is too large")));
            };
            let kind = match sh.sh_type {
                SHT_PROGBITS => SectionKind::ProgBits,
                SHT_X86_64_UNWIND => SectionKind::Unwind,
                SHT_INIT_ARRAY => SectionKind::InitArray,
                SHT_FINI_ARRAY => SectionKind::FiniArray,
                _ => SectionKind::NoBits,
            };
            let given = match shstrtab {
                Some(names) if sh.name != 0 => {
                    Some(elf::read_cstr(names, sh.name as usize).ok_or_else(|| {
                        malformed(path, format!("section {index} has a bad name"))
                    })?)
                }
                _ => None,
            };
            // The kernel records constructors only for named sections.
            if let Some(name) = given {
                let slot = if name == ".ctors" || sh.sh_type == SHT_INIT_ARRAY {
                    Some(&mut self.ctors)
                } else if name == ".dtors" || sh.sh_type == SHT_FINI_ARRAY {
                    Some(&mut self.dtors)
                } else {
                    None
                };
                if let Some(slot) = slot {
                    // A second one is reported by the kernel and ignored.
                    slot.get_or_insert(self.sections.len());
                }
                if name == DPCPU_SETNAME || name == VNET_SETNAME {
                    return Err(own(
                        ErrorKind::Unsupported,
                        path,
                        format!("section {name} belongs in the per-CPU or VNET area"),
                    ));
                }
            }
            let name = match (given, kind) {
                (Some(name), _) => name.to_string(),
                (None, SectionKind::ProgBits) => "<<PROGBITS>>".to_string(),
                (None, SectionKind::Unwind) => "<<UNWIND>>".to_string(),
                (None, _) => "<<NOBITS>>".to_string(),
            };
            if kind != SectionKind::NoBits && sh.contents(self.object).is_none() {
                return Err(malformed(
                    path,
                    format!("section {name} lies outside the file"),
                ));
            }
            let at = usize::try_from(start)
                .map_err(|_| malformed(path, format!("section {name} is too large")))?;
            self.placements.push(Placement {
                header: sh,
                offset: at,
            });
            self.sections.push(Section {
                name,
                index,
                address: start,
                size: sh.size,
                flags: sh.flags,
                kind,
            });
            offset = end;
        }
        self.image_size = usize::try_from(offset)
            .ok()
            .and_then(|size| size.checked_next_multiple_of(PAGE_SIZE))
            .ok_or_else(|| malformed(path, "the image is too large".into()))?;
        Ok(())
    }

    fn read_symbols(&mut self, symtab: &SectionHeader, strings: &[u8]) -> Result<(), LoadError> {
        let path = self.path;
        let raw = symtab
            .contents(self.object)
            .ok_or_else(|| malformed(path, "the symbol table lies outside the file".into()))?;
        // The kernel counts sh_size / sizeof(Elf_Sym), ignoring a tail.
        for (i, entry) in raw.chunks_exact(SYM_SIZE).enumerate() {
            let sym = Symbol::parse(entry)
                .ok_or_else(|| malformed(path, format!("symbol {i} is truncated")))?;
            let name = elf::read_cstr(strings, sym.name as usize)
                .ok_or_else(|| malformed(path, format!("symbol {i} has a bad name")))?;
            self.symbols.push((name.to_string(), sym));
        }
        Ok(())
    }

    /// Where symbol `sym` stands once section `i` is at `sections[i].address`:
    /// symbols move with their section, as the kernel adds the section's
    /// address to every `st_value` of that section.
    fn definition(&self, sym: &Symbol, sections: &[Section]) -> Definition {
        match sym.shndx {
            SHN_UNDEF => Definition::Undefined,
            SHN_COMMON => Definition::Common,
            index if usize::from(index) < self.shnum => {
                match sections.iter().find(|s| s.index == usize::from(index)) {
                    Some(section) => Definition::At(section.address.wrapping_add(sym.value)),
                    None => Definition::NotLoaded {
                        index,
                        value: sym.value,
                    },
                }
            }
            // SHN_ABS and the other reserved indices: the value as is.
            _ => Definition::At(sym.value),
        }
    }

    /// Takes memory, copies the sections in and moves everything to the
    /// image's address.
    pub(crate) fn place<M: Memory>(&self, memory: &mut M) -> Result<Kld<M::Region>, LoadError> {
        let path = self.path;
        let align = self.align as usize;
        let (base, mut region) = memory.alloc(self.image_size, align).ok_or_else(|| {
            own(
                ErrorKind::NoMemory,
                path,
                format!("no memory for a {:#x}-byte image", self.image_size),
            )
        })?;
        if !base.is_multiple_of(self.align) || region.as_ref().len() < self.image_size {
            return Err(own(
                ErrorKind::NoMemory,
                path,
                format!(
                    "the memory provider returned {:#x} bytes at {base:#x} for {:#x} aligned {align:#x}",
                    region.as_ref().len(),
                    self.image_size
                ),
            ));
        }
        if base.checked_add(self.image_size as u64).is_none() {
            return Err(own(
                ErrorKind::NoMemory,
                path,
                format!("an image at {base:#x} would wrap around"),
            ));
        }
        let image = &mut region.as_mut()[..self.image_size];
        // Gaps and NOBITS read as zero, as the kernel's fresh pages do.
        image.fill(0);
        for placement in &self.placements {
            let sh = &placement.header;
            // Only PROGBITS and UNWIND are read from the file: the kernel
            // zeroes the rest, INIT_ARRAY and FINI_ARRAY included (their
            // entries come from relocations).
            if sh.sh_type == SHT_PROGBITS || sh.sh_type == SHT_X86_64_UNWIND {
                let bytes = sh.contents(self.object).unwrap_or_default();
                image[placement.offset..placement.offset + bytes.len()].copy_from_slice(bytes);
            }
        }
        let mut sections = self.sections.clone();
        for section in &mut sections {
            section.address += base;
        }
        let symbols = self
            .symbols
            .iter()
            .map(|(name, sym)| LinkSymbol {
                name: name.clone(),
                bind: sym.bind(),
                sym_type: sym.sym_type(),
                definition: self.definition(sym, &sections),
                resolved: None,
            })
            .collect();
        let bounds = |index: Option<usize>| {
            index.map(|i| LinkerSet {
                start: sections[i].address,
                stop: sections[i].address + sections[i].size,
            })
        };
        Ok(Kld {
            path: path.to_string(),
            base,
            size: self.image_size,
            ctors: bounds(self.ctors),
            dtors: bounds(self.dtors),
            region,
            sections,
            symbols,
            imports: Vec::new(),
        })
    }
}

fn check_header(path: &str, object: &[u8]) -> Result<Header, LoadError> {
    let Some(header) = elf::header(object) else {
        return Err(own(ErrorKind::NotElf, path, "not an ELF file".into()));
    };
    if header.class != ELFCLASS64 || header.data != ELFDATA2LSB {
        return Err(refuse(
            ErrorKind::UnsupportedLayout,
            path,
            "Unsupported file layout",
        ));
    }
    if u32::from(header.ident_version) != EV_CURRENT || header.version != EV_CURRENT {
        return Err(refuse(
            ErrorKind::UnsupportedVersion,
            path,
            "Unsupported file version",
        ));
    }
    if header.e_type != ET_REL {
        // link_elf_obj answers ENOSYS ("not mine"); with no other class
        // taking the file, linker_load_file prints this.
        return Err(LoadError::new(
            ErrorKind::UnsupportedType,
            format!("linker_load_file: {path} - unsupported file type"),
        ));
    }
    if header.machine != EM_X86_64 {
        return Err(refuse(
            ErrorKind::UnsupportedMachine,
            path,
            "Unsupported machine",
        ));
    }
    Ok(header)
}

fn section_headers(
    path: &str,
    object: &[u8],
    header: &Header,
) -> Result<Vec<SectionHeader>, LoadError> {
    // The kernel answers ENOEXEC without a message to all of these.
    if header.shnum == 0 || header.shoff == 0 || usize::from(header.shentsize) != SHDR_SIZE {
        return Err(malformed(
            path,
            format!(
                "bad section header table (e_shnum {}, e_shoff {:#x}, e_shentsize {})",
                header.shnum, header.shoff, header.shentsize
            ),
        ));
    }
    let table = usize::try_from(header.shoff)
        .ok()
        .filter(|&at| at >= EHDR_SIZE)
        .and_then(|at| object.get(at..at.checked_add(usize::from(header.shnum) * SHDR_SIZE)?))
        .ok_or_else(|| {
            malformed(
                path,
                "the section header table lies outside the file".into(),
            )
        })?;
    table
        .chunks_exact(SHDR_SIZE)
        .map(|raw| {
            SectionHeader::parse(raw)
                .ok_or_else(|| malformed(path, "truncated section header".into()))
        })
        .collect()
}
