//! Linker sets and what the kernel reads from them: module metadata
//! (sys/sys/module.h), SYSINIT/SYSUNINIT records (sys/sys/kernel.h) and
//! the dependency rules of `linker_load_dependencies` (kern_linker.c).
//!
//! The layouts are the amd64 ones of the FreeBSD 14 and 15 headers, which
//! agree: `struct mod_metadata { int md_version; int md_type; const void
//! *md_data; const char *md_cval; }` (24 bytes) and `struct sysinit { enum
//! sysinit_sub_id subsystem; enum sysinit_elem_order order;
//! STAILQ_ENTRY(sysinit) next; sysinit_cfunc_t func; const void *udata; }`
//! (32 bytes: the list link sits between the keys and the function).

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use crate::elf::{read_cstr, read_u32, read_u64};
use crate::error::{ErrorKind, LoadError};

/// `md_type` values (sys/sys/module.h).
pub const MDT_DEPEND: i32 = 1;
pub const MDT_MODULE: i32 = 2;
pub const MDT_VERSION: i32 = 3;
pub const MDT_PNP_INFO: i32 = 4;
/// `MDT_SETNAME` without the `set_` prefix.
pub const MDT_SETNAME: &str = "modmetadata_set";

/// `SI_SUB_DUMMY` (sys/sys/kernel.h): sorted with the others, never run.
pub const SI_SUB_DUMMY: u32 = 0;

/// Field offsets of the amd64 layouts above.
const MD_VERSION: u64 = 0;
const MD_TYPE: u64 = 4;
const MD_DATA: u64 = 8;
const MD_CVAL: u64 = 16;
const MOD_DEPEND_MINIMUM: u64 = 0;
const MOD_DEPEND_PREFERRED: u64 = 4;
const MOD_DEPEND_MAXIMUM: u64 = 8;
const MV_VERSION: u64 = 0;
const MODULEDATA_NAME: u64 = 0;
const MODULEDATA_EVHAND: u64 = 8;
const MODULEDATA_PRIV: u64 = 16;
const SYSINIT_SUBSYSTEM: u64 = 0;
const SYSINIT_ORDER: u64 = 4;
const SYSINIT_FUNC: u64 = 16;
const SYSINIT_UDATA: u64 = 24;
const POINTER_SIZE: u64 = 8;

/// The bounds of one linker set: the `set_<name>` section.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkerSet {
    pub start: u64,
    pub stop: u64,
}

impl LinkerSet {
    /// Number of pointers in the set, as `link_elf_lookup_set` counts them.
    pub fn count(&self) -> u64 {
        (self.stop - self.start) / POINTER_SIZE
    }
}

/// `struct mod_depend`: the versions of a module that satisfy a dependency.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModDepend {
    pub minimum: i32,
    pub preferred: i32,
    pub maximum: i32,
}

impl ModDepend {
    /// `modlist_lookup2`'s test: the preferred version, or any version in
    /// `minimum..=maximum`.
    pub fn accepts(&self, version: i32) -> bool {
        version == self.preferred || (self.minimum..=self.maximum).contains(&version)
    }
}

/// `moduledata_t`, the argument of `module_register_init`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModuleData {
    pub name: String,
    /// `modeventhand_t evhand`: called with `MOD_LOAD`, `MOD_UNLOAD`, ...
    pub evhand: u64,
    pub private: u64,
}

/// One `struct mod_metadata`, typed by `md_type`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Metadata {
    /// `MODULE_DEPEND(this, module, min, pref, max)`.
    Depend { module: String, depend: ModDepend },
    /// `DECLARE_MODULE(name, moduledata, ...)`.
    Module {
        name: String,
        moduledata: u64,
        data: ModuleData,
    },
    /// `MODULE_VERSION(module, version)`.
    Version { module: String, version: i32 },
    /// `MODULE_PNP_INFO`: the bus name and the address of the table record.
    PnpInfo { bus: String, info: u64 },
    /// Any other `md_type`, which the kernel ignores.
    Other { md_type: i32, data: u64, cval: u64 },
}

/// An entry of `set_modmetadata_set`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModMetadata {
    /// Address of the `struct mod_metadata`.
    pub address: u64,
    /// `md_version` (`MDT_STRUCT_VERSION`, 1, in every FreeBSD since 5).
    pub md_version: i32,
    pub entry: Metadata,
}

/// A `struct sysinit` from `set_sysinit_set` or `set_sysuninit_set`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SysInit {
    /// Address of the record.
    pub address: u64,
    pub subsystem: u32,
    pub order: u32,
    /// `sysinit_cfunc_t func`, called as `func(udata)`.
    pub func: u64,
    pub udata: u64,
}

/// A module the loading kernel already provides: `MODULE_VERSION`s of
/// loaded files, and the kernel itself (`kernel`, `__FreeBSD_version`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProvidedModule {
    pub name: String,
    pub version: i32,
    /// The file that provides it (`kernel` for the kernel).
    pub container: String,
}

/// Read access to a loaded image by kernel address.
#[derive(Clone, Copy)]
pub(crate) struct ImageView<'i> {
    pub base: u64,
    pub bytes: &'i [u8],
}

impl<'i> ImageView<'i> {
    fn offset(&self, address: u64) -> Option<usize> {
        usize::try_from(address.checked_sub(self.base)?).ok()
    }

    fn u32_at(&self, address: u64) -> Option<u32> {
        read_u32(self.bytes, self.offset(address)?)
    }

    fn u64_at(&self, address: u64) -> Option<u64> {
        read_u64(self.bytes, self.offset(address)?)
    }

    fn str_at(&self, address: u64) -> Option<&'i str> {
        read_cstr(self.bytes, self.offset(address)?)
    }
}

/// Reads metadata for one image; failures name the file.
pub(crate) struct Reader<'i, 'n> {
    pub view: ImageView<'i>,
    pub path: &'n str,
}

impl Reader<'_, '_> {
    fn malformed(&self, what: String) -> LoadError {
        LoadError::new(
            ErrorKind::Malformed,
            format!("kqemu-kldload: {}: {what}", self.path),
        )
    }

    /// The 32-bit field at `field` bytes into the record at `record`; an
    /// address that wraps or leaves the image fails the read.
    fn u32_at(&self, record: u64, field: u64, what: &str) -> Result<u32, LoadError> {
        record
            .checked_add(field)
            .and_then(|address| self.view.u32_at(address))
            .ok_or_else(|| self.outside(record, what))
    }

    fn u64_at(&self, record: u64, field: u64, what: &str) -> Result<u64, LoadError> {
        record
            .checked_add(field)
            .and_then(|address| self.view.u64_at(address))
            .ok_or_else(|| self.outside(record, what))
    }

    fn outside(&self, record: u64, what: &str) -> LoadError {
        self.malformed(format!("{what} at {record:#x} is outside the module"))
    }

    fn string_at(&self, address: u64, what: &str) -> Result<String, LoadError> {
        self.view
            .str_at(address)
            .map(ToString::to_string)
            .ok_or_else(|| {
                self.malformed(format!(
                    "{what} at {address:#x} is not a string inside the module"
                ))
            })
    }

    /// The pointers a set holds.
    pub fn set_entries(&self, name: &str, set: LinkerSet) -> Result<Vec<u64>, LoadError> {
        if !(set.stop - set.start).is_multiple_of(POINTER_SIZE) {
            return Err(self.malformed(format!(
                "set_{name} is {} bytes, not a whole number of pointers",
                set.stop - set.start
            )));
        }
        (0..set.count())
            .map(|i| self.u64_at(set.start, i * POINTER_SIZE, "a set entry"))
            .collect()
    }

    pub fn modmetadata(&self, entries: &[u64]) -> Result<Vec<ModMetadata>, LoadError> {
        entries.iter().map(|&at| self.one_metadata(at)).collect()
    }

    fn one_metadata(&self, at: u64) -> Result<ModMetadata, LoadError> {
        let md_version = self.u32_at(at, MD_VERSION, "struct mod_metadata")? as i32;
        let md_type = self.u32_at(at, MD_TYPE, "struct mod_metadata")? as i32;
        let data = self.u64_at(at, MD_DATA, "struct mod_metadata")?;
        let cval = self.u64_at(at, MD_CVAL, "struct mod_metadata")?;
        let entry = match md_type {
            MDT_DEPEND => Metadata::Depend {
                module: self.string_at(cval, "MDT_DEPEND md_cval")?,
                depend: ModDepend {
                    minimum: self.u32_at(data, MOD_DEPEND_MINIMUM, "struct mod_depend")? as i32,
                    preferred: self.u32_at(data, MOD_DEPEND_PREFERRED, "struct mod_depend")? as i32,
                    maximum: self.u32_at(data, MOD_DEPEND_MAXIMUM, "struct mod_depend")? as i32,
                },
            },
            MDT_MODULE => Metadata::Module {
                name: self.string_at(cval, "MDT_MODULE md_cval")?,
                moduledata: data,
                data: ModuleData {
                    name: self.string_at(
                        self.u64_at(data, MODULEDATA_NAME, "moduledata_t")?,
                        "moduledata name",
                    )?,
                    evhand: self.u64_at(data, MODULEDATA_EVHAND, "moduledata_t")?,
                    private: self.u64_at(data, MODULEDATA_PRIV, "moduledata_t")?,
                },
            },
            MDT_VERSION => Metadata::Version {
                module: self.string_at(cval, "MDT_VERSION md_cval")?,
                version: self.u32_at(data, MV_VERSION, "struct mod_version")? as i32,
            },
            MDT_PNP_INFO => Metadata::PnpInfo {
                bus: self.string_at(cval, "MDT_PNP_INFO md_cval")?,
                info: data,
            },
            _ => Metadata::Other {
                md_type,
                data,
                cval,
            },
        };
        Ok(ModMetadata {
            address: at,
            md_version,
            entry,
        })
    }

    pub fn sysinits(&self, entries: &[u64]) -> Result<Vec<SysInit>, LoadError> {
        entries
            .iter()
            .map(|&at| {
                Ok(SysInit {
                    address: at,
                    subsystem: self.u32_at(at, SYSINIT_SUBSYSTEM, "struct sysinit")?,
                    order: self.u32_at(at, SYSINIT_ORDER, "struct sysinit")?,
                    func: self.u64_at(at, SYSINIT_FUNC, "struct sysinit")?,
                    udata: self.u64_at(at, SYSINIT_UDATA, "struct sysinit")?,
                })
            })
            .collect()
    }
}

/// `linker_file_sysinit`'s order: the kernel's own exchange sort by
/// (subsystem, order), kept as is because it is not stable and equal keys
/// must run in the order FreeBSD runs them; then `SI_SUB_DUMMY` dropped.
pub(crate) fn sysinit_order(mut list: Vec<SysInit>) -> Vec<SysInit> {
    exchange_sort(&mut list, |a, b| {
        a.subsystem < b.subsystem || (a.subsystem == b.subsystem && a.order <= b.order)
    });
    list.retain(|s| s.subsystem != SI_SUB_DUMMY);
    list
}

/// `linker_file_sysuninit`'s order: the same sort with the keys reversed.
pub(crate) fn sysuninit_order(mut list: Vec<SysInit>) -> Vec<SysInit> {
    exchange_sort(&mut list, |a, b| {
        a.subsystem > b.subsystem || (a.subsystem == b.subsystem && a.order >= b.order)
    });
    list.retain(|s| s.subsystem != SI_SUB_DUMMY);
    list
}

/// For every pair i < j, swaps unless `in_order(list[i], list[j])`.
fn exchange_sort(list: &mut [SysInit], in_order: impl Fn(&SysInit, &SysInit) -> bool) {
    for i in 0..list.len() {
        for j in i + 1..list.len() {
            if !in_order(&list[i], &list[j]) {
                list.swap(i, j);
            }
        }
    }
}

/// `linker_load_dependencies` for a file whose modules are `metadata`,
/// against the modules the kernel already has.
///
/// A `MODULE_VERSION` that a loaded file already provides fails with
/// EEXIST's message; each `MODULE_DEPEND` must name a module of this file
/// (a self reference) or one in `available` with an accepted version.
/// FreeBSD would then try to load a missing dependency from disk; this
/// loader has no disk, so a missing one fails with the kernel's message.
pub(crate) fn check_dependencies(
    file_name: &str,
    metadata: &[ModMetadata],
    available: &[ProvidedModule],
) -> Result<(), LoadError> {
    for md in metadata {
        if let Metadata::Version { module, version } = &md.entry {
            // modlist_lookup(name, ver): same name, and same version.
            if let Some(present) = available
                .iter()
                .find(|p| p.name == *module && p.version == *version)
            {
                return Err(LoadError::new(
                    ErrorKind::InterfacePresent(module.clone()),
                    format!(
                        "interface {module}.{version} already present in the KLD '{}'!",
                        present.container
                    ),
                ));
            }
        }
    }
    for md in metadata {
        let Metadata::Depend { module, depend } = &md.entry else {
            continue;
        };
        let self_reference = metadata
            .iter()
            .any(|m| matches!(&m.entry, Metadata::Version { module: own, .. } if own == module));
        if self_reference {
            continue;
        }
        let satisfied = available
            .iter()
            .any(|p| p.name == *module && depend.accepts(p.version));
        if !satisfied {
            return Err(LoadError::new(
                ErrorKind::Dependency(module.clone()),
                format!("KLD {file_name}: depends on {module} - not available or version mismatch"),
            ));
        }
    }
    Ok(())
}
