//! The loaded module: the relocation passes that finish the load
//! (`link_elf_reloc_local`, `relocate_file`, `elf_obj_lookup`) and what
//! the kernel reads from the image afterwards.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use crate::elf::{
    self, Rela, RELA_SIZE, R_X86_64_IRELATIVE, STB_GLOBAL, STB_LOCAL, STB_WEAK, STT_GNU_IFUNC,
};
use crate::error::{malformed, own, refuse, ErrorKind, LoadError};
use crate::image::{Plan, Section};
use crate::loader::Resolver;
use crate::metadata::{
    self, ImageView, LinkerSet, ModMetadata, ProvidedModule, Reader, SysInit, MDT_SETNAME,
};
use crate::reloc::{self, Failure, Target};

/// An undefined symbol the load resolved through the [`Resolver`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Import {
    pub name: String,
    /// 0 for a weak symbol the resolver did not know.
    pub address: u64,
    pub weak: bool,
}

/// Where a symbol stands after layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Definition {
    /// `SHN_UNDEF`: resolved by the kernel, if at all.
    Undefined,
    /// At this address (in the image, or absolute).
    At(u64),
    /// `SHN_COMMON`: the kernel would take the alignment in `st_value`
    /// for an address; klds are built `-fno-common`.
    Common,
    /// In section `index`, which is not part of the image (not allocated,
    /// or empty): the kernel would use the raw section offset.
    NotLoaded { index: u16, value: u64 },
}

/// A symbol-table entry of the loaded module.
#[derive(Clone, Debug)]
pub(crate) struct LinkSymbol {
    pub name: String,
    pub bind: u8,
    pub sym_type: u8,
    pub definition: Definition,
    /// What the resolver answered for an undefined symbol, kept for the
    /// rest of the load as the kernel's `SHN_FBSD_CACHED` keeps it.
    pub resolved: Option<u64>,
}

/// The module a load produced: its image and what the kernel reads from it.
pub struct Kld<R> {
    pub(crate) path: String,
    pub(crate) base: u64,
    pub(crate) size: usize,
    pub(crate) region: R,
    pub(crate) sections: Vec<Section>,
    pub(crate) symbols: Vec<LinkSymbol>,
    pub(crate) imports: Vec<Import>,
    pub(crate) ctors: Option<LinkerSet>,
    pub(crate) dtors: Option<LinkerSet>,
}

/// Which relocations a pass applies: FreeBSD does local symbols first
/// (before dependencies load), then global ones, and ifuncs last of all.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Pass {
    Local { ifuncs: bool },
    Global { ifuncs: bool },
}

/// Why `elf_obj_lookup` found no address.
enum LookupError {
    /// The kernel's "not found": a message depends on the pass.
    NotFound,
    /// An `STT_GNU_IFUNC` symbol whose resolver could not be called.
    Ifunc(u64),
    /// Something this loader refuses, with its own message.
    Refused(LoadError),
}

/// A relocation's view of the loader's state.
struct Linking<'k, S> {
    path: &'k str,
    symbols: &'k mut [LinkSymbol],
    imports: &'k mut Vec<Import>,
    resolver: &'k mut S,
}

impl<S: Resolver> reloc::Context for Linking<'_, S> {
    type LookupError = LookupError;

    fn lookup(&mut self, symidx: u32) -> Result<u64, LookupError> {
        let sym = self
            .symbols
            .get_mut(symidx as usize)
            .ok_or(LookupError::NotFound)?;
        match sym.definition {
            Definition::At(address) if sym.sym_type == STT_GNU_IFUNC => self
                .resolver
                .call_ifunc(address)
                .ok_or(LookupError::Ifunc(address)),
            Definition::At(address) => Ok(address),
            Definition::Common => Err(LookupError::Refused(own(
                ErrorKind::Unsupported,
                self.path,
                format!(
                    "symbol {} is a common symbol (klds are built with -fno-common)",
                    sym.name
                ),
            ))),
            Definition::NotLoaded { index, value } => Err(LookupError::Refused(malformed(
                self.path,
                format!(
                    "symbol {} is defined in section {index}, which is not in the image \
                     (FreeBSD would use its raw value {value:#x})",
                    sym.name
                ),
            ))),
            Definition::Undefined => {
                if let Some(address) = sym.resolved {
                    return Ok(address);
                }
                let weak = match sym.bind {
                    STB_GLOBAL => false,
                    STB_WEAK => true,
                    // A local undefined symbol, or an unknown binding.
                    _ => return Err(LookupError::NotFound),
                };
                if sym.name.is_empty() {
                    return Err(LookupError::NotFound);
                }
                // The kernel reads address 0 as "not found".
                let address = match self.resolver.resolve(&sym.name) {
                    Some(address) if address != 0 => address,
                    _ if weak => 0,
                    _ => return Err(LookupError::NotFound),
                };
                sym.resolved = Some(address);
                self.imports.push(Import {
                    name: sym.name.clone(),
                    address,
                    weak,
                });
                Ok(address)
            }
        }
    }

    fn call_ifunc(&mut self, resolver: u64) -> Option<u64> {
        self.resolver.call_ifunc(resolver)
    }
}

/// `linker_basename`: the part after the last `/`, unless that is empty.
fn basename(path: &str) -> &str {
    match path.rsplit_once('/') {
        Some((_, name)) if !name.is_empty() => name,
        _ => path,
    }
}

impl<R: AsRef<[u8]> + AsMut<[u8]>> Kld<R> {
    /// The path the module was loaded from, as given to [`Loader::load`](crate::Loader::load).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The file name the kernel knows the module by (`lf->filename`).
    pub fn file_name(&self) -> &str {
        basename(&self.path)
    }

    /// Kernel address of the image.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Size of the image: the sections, rounded up to whole pages.
    pub fn size(&self) -> usize {
        self.size
    }

    pub fn image(&self) -> &[u8] {
        &self.region.as_ref()[..self.size]
    }

    pub fn image_mut(&mut self) -> &mut [u8] {
        &mut self.region.as_mut()[..self.size]
    }

    /// Gives the memory back, for unload.
    pub fn into_region(self) -> R {
        self.region
    }

    /// The image's sections, in section-table order.
    pub fn sections(&self) -> &[Section] {
        &self.sections
    }

    pub fn section(&self, name: &str) -> Option<&Section> {
        self.sections.iter().find(|s| s.name == name)
    }

    /// The undefined symbols the relocations needed, in first-use order,
    /// with the addresses the resolver gave them.
    pub fn imports(&self) -> &[Import] {
        &self.imports
    }

    /// `link_elf_lookup_symbol` with the default
    /// `debug.link_elf_obj_leak_locals=1`: the first defined symbol of that
    /// name, local or global (`__start_`/`__stop_` bounds included).
    pub fn symbol(&self, name: &str) -> Option<u64> {
        let symbol = self
            .symbols
            .iter()
            .find(|s| s.name == name && s.definition != Definition::Undefined)?;
        match symbol.definition {
            Definition::At(address) => Some(address),
            _ => None,
        }
    }

    /// `link_elf_lookup_set`: the section `set_<name>`.
    pub fn linker_set(&self, name: &str) -> Option<LinkerSet> {
        self.sections
            .iter()
            .find(|s| s.name.strip_prefix("set_") == Some(name))
            .map(|s| LinkerSet {
                start: s.address,
                stop: s.address + s.size,
            })
    }

    /// The pointers in set `name`; none when the module has no such set.
    pub fn set_entries(&self, name: &str) -> Result<Vec<u64>, LoadError> {
        match self.linker_set(name) {
            Some(set) => self.reader().set_entries(name, set),
            None => Ok(Vec::new()),
        }
    }

    /// `set_modmetadata_set`, in set order.
    pub fn modmetadata(&self) -> Result<Vec<ModMetadata>, LoadError> {
        let entries = self.set_entries(MDT_SETNAME)?;
        self.reader().modmetadata(&entries)
    }

    /// `set_sysinit_set` in the order `linker_file_sysinit` calls it
    /// (`SI_SUB_DUMMY` entries left out, as the kernel skips them).
    pub fn sysinits(&self) -> Result<Vec<SysInit>, LoadError> {
        let entries = self.set_entries("sysinit_set")?;
        Ok(metadata::sysinit_order(self.reader().sysinits(&entries)?))
    }

    /// `set_sysuninit_set` in the order `linker_file_sysuninit` calls it.
    pub fn sysuninits(&self) -> Result<Vec<SysInit>, LoadError> {
        let entries = self.set_entries("sysuninit_set")?;
        Ok(metadata::sysuninit_order(self.reader().sysinits(&entries)?))
    }

    /// `set_sysctl_set`: the `struct sysctl_oid *`s the kernel registers.
    pub fn sysctl_oids(&self) -> Result<Vec<u64>, LoadError> {
        self.set_entries("sysctl_set")
    }

    /// The constructors `link_elf_invoke_cbs` calls after the load: the
    /// non-null entries of the first `.ctors` or `INIT_ARRAY` section.
    pub fn ctors(&self) -> Result<Vec<u64>, LoadError> {
        self.callbacks(self.ctors, ".ctors")
    }

    /// The destructors it calls at unload (`.dtors` or `FINI_ARRAY`).
    pub fn dtors(&self) -> Result<Vec<u64>, LoadError> {
        self.callbacks(self.dtors, ".dtors")
    }

    /// `linker_load_dependencies` against `modules` (the load already did
    /// this against its [`Loader`](crate::Loader)'s modules).
    pub fn check_dependencies(&self, modules: &[ProvidedModule]) -> Result<(), LoadError> {
        metadata::check_dependencies(self.file_name(), &self.modmetadata()?, modules)
    }

    fn callbacks(&self, set: Option<LinkerSet>, name: &str) -> Result<Vec<u64>, LoadError> {
        let Some(set) = set else {
            return Ok(Vec::new());
        };
        let mut entries = self.reader().set_entries(name, set)?;
        entries.retain(|&f| f != 0);
        Ok(entries)
    }

    fn reader(&self) -> Reader<'_, '_> {
        Reader {
            view: ImageView {
                base: self.base,
                bytes: self.image(),
            },
            path: &self.path,
        }
    }

    /// `link_elf_fix_link_set`: an undefined `__start_<sec>` or
    /// `__stop_<sec>` becomes the start or end of image section `<sec>`.
    /// Without such a section it stays undefined, for the kernel's table.
    pub(crate) fn fix_link_sets(&mut self) {
        for symbol in self.symbols.iter_mut().skip(1) {
            if symbol.definition != Definition::Undefined {
                continue;
            }
            let (set, at_start) = if let Some(set) = symbol.name.strip_prefix("__start_") {
                (set, true)
            } else if let Some(set) = symbol.name.strip_prefix("__stop_") {
                (set, false)
            } else {
                continue;
            };
            if let Some(section) = self.sections.iter().find(|s| s.name == set) {
                let address = if at_start {
                    section.address
                } else {
                    section.address + section.size
                };
                symbol.definition = Definition::At(address);
            }
        }
    }

    /// One of `link_elf_reloc_local` / `relocate_file1`: every RELA entry
    /// whose symbol's binding and ifunc-ness match `pass`.
    pub(crate) fn relocate<S: Resolver>(
        &mut self,
        plan: &Plan<'_>,
        resolver: &mut S,
        pass: Pass,
    ) -> Result<(), LoadError> {
        let (want_local, want_ifuncs) = match pass {
            Pass::Local { ifuncs } => (true, ifuncs),
            Pass::Global { ifuncs } => (false, ifuncs),
        };
        let Kld {
            path,
            base,
            region,
            sections,
            symbols,
            imports,
            ..
        } = self;
        for table in &plan.relas {
            let Some(section) = sections.iter().find(|s| s.index == table.target) else {
                // An allocated but empty target: not in the image.
                return Err(refuse(ErrorKind::Malformed, path, "lost base for relatab"));
            };
            let start = (section.address - *base) as usize;
            let mut target = Target {
                bytes: &mut region.as_mut()[start..start + section.size as usize],
                address: section.address,
            };
            for (n, raw) in table.entries.chunks_exact(RELA_SIZE).enumerate() {
                let rela = Rela::parse(raw)
                    .ok_or_else(|| malformed(path, format!("truncated relocation {n}")))?;
                let symidx = rela.symbol() as usize;
                let Some(symbol) = symbols.get(symidx) else {
                    return Err(malformed(
                        path,
                        format!(
                            "relocation {n} of section {} names symbol {symidx}, past the \
                             symbol table (FreeBSD skips it silently)",
                            table.index
                        ),
                    ));
                };
                let ifunc = symbol.sym_type == STT_GNU_IFUNC || rela.rtype() == R_X86_64_IRELATIVE;
                if (symbol.bind == STB_LOCAL) != want_local || ifunc != want_ifuncs {
                    continue;
                }
                let mut linking = Linking {
                    path,
                    symbols,
                    imports,
                    resolver,
                };
                if let Err(failure) = reloc::apply(&mut target, &rela, &mut linking) {
                    let site = Site {
                        path,
                        section: &section.name,
                        number: n,
                        rela: &rela,
                        symbol: &symbols[symidx].name,
                        place: section.address.wrapping_add(rela.offset),
                    };
                    return Err(site.error(failure, !want_local));
                }
            }
        }
        Ok(())
    }
}

/// A relocation that failed, for the message.
struct Site<'a> {
    path: &'a str,
    section: &'a str,
    number: usize,
    rela: &'a Rela,
    symbol: &'a str,
    place: u64,
}

impl Site<'_> {
    /// The console text for `failure`. In the global passes the kernel
    /// follows any failure with `link_elf_obj: symbol X undefined`; in the
    /// local ones it prints only what `elf_reloc_internal` printed.
    fn error(&self, failure: Failure<LookupError>, global: bool) -> LoadError {
        let rtype = self.rela.rtype();
        let symidx = self.rela.symbol();
        let (kind, kernel_line) = match failure {
            Failure::UnexpectedType => (
                ErrorKind::UnexpectedRelocation { rtype },
                Some(format!(
                    "kldload: unexpected relocation type {rtype}, symbol index {symidx}"
                )),
            ),
            Failure::Copy => (
                ErrorKind::UnexpectedRelocation { rtype },
                Some(format!(
                    "kldload: unexpected R_COPY relocation, symbol index {symidx}"
                )),
            ),
            Failure::Lookup(LookupError::NotFound) if global => {
                (ErrorKind::UndefinedSymbol(self.symbol.to_string()), None)
            }
            Failure::Lookup(LookupError::NotFound) => {
                return own(
                    ErrorKind::LocalRelocation,
                    self.path,
                    format!(
                        "relocation {} of {} against local symbol {symidx} ('{}') has no \
                         address (FreeBSD fails with ENOEXEC and no message)",
                        self.number, self.section, self.symbol
                    ),
                )
            }
            Failure::Lookup(LookupError::Refused(error)) => return error,
            Failure::Lookup(LookupError::Ifunc(resolver)) | Failure::Ifunc(resolver) => {
                return own(
                    ErrorKind::Ifunc,
                    self.path,
                    format!(
                        "{} at {:#x} needs the ifunc resolver at {resolver:#x} called, and the \
                         Resolver cannot call it",
                        elf::relocation_name(rtype),
                        self.place
                    ),
                )
            }
            Failure::OutOfSection => {
                return malformed(
                    self.path,
                    format!(
                        "relocation {} patches offset {:#x}, outside {}",
                        self.number, self.rela.offset, self.section
                    ),
                )
            }
            Failure::Overflow(value) => {
                return own(
                    ErrorKind::Overflow,
                    self.path,
                    format!(
                        "{} against '{}' at {:#x}: value {value:#x} does not fit 32 bits \
                         (FreeBSD would truncate it)",
                        elf::relocation_name(rtype),
                        self.symbol,
                        self.place
                    ),
                )
            }
        };
        let undefined = format!("link_elf_obj: symbol {} undefined", self.symbol);
        let message = match (kernel_line, global) {
            (Some(line), true) => format!("{line}\n{undefined}"),
            (Some(line), false) => line,
            (None, _) => undefined,
        };
        LoadError::new(kind, message)
    }
}
