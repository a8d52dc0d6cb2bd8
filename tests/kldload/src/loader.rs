//! Loading an amd64 `ET_REL` kld the way FreeBSD's `link_elf_load_file`
//! (sys/kern/link_elf_obj.c, 14 and 15) does:
//!
//! 1. header checks, in the kernel's order and with its messages;
//! 2. the section table: allocated `PROGBITS`, `NOBITS`, `X86_64_UNWIND`,
//!    `INIT_ARRAY`, `FINI_ARRAY` sections with contents become the image,
//!    exactly one non-empty symbol table, `RELA` tables for allocated
//!    sections;
//! 3. one image for all of them, each section at the next multiple of its
//!    alignment, in section-table order; symbols move with their section;
//! 4. `__start_<sec>` / `__stop_<sec>` bound to the section `<sec>`
//!    (`link_elf_fix_link_set`), then relocations against local symbols;
//! 5. the module's dependencies (`linker_load_dependencies`);
//! 6. relocations against global symbols, undefined ones through the
//!    caller's [`Resolver`] (the kernel's symbol table), then the ifunc
//!    relocations, global and local.
//!
//! What the kernel then does with the image (run `SYSINIT`s, register
//! sysctls and modules, call constructors) is the caller's: [`Kld`] hands
//! out the linker sets, parsed and ordered.

use alloc::string::ToString;
use alloc::vec::Vec;

use crate::error::LoadError;
use crate::image::Plan;
use crate::kld::{Kld, Pass};
use crate::metadata::{self, ProvidedModule};

/// amd64 `PAGE_SIZE`: the kernel maps a kld as whole pages at a
/// page-aligned address, so section alignment is honoured up to a page
/// whatever the provider's granularity.
pub const PAGE_SIZE: usize = 4096;

/// Where the image goes. The testbed maps it at kernel addresses; host
/// tests use [`VecMemory`] with a made-up base address.
pub trait Memory {
    /// The memory holding the image; dropped (or returned) at unload.
    type Region: AsRef<[u8]> + AsMut<[u8]>;

    /// A region of at least `size` bytes whose first byte is at kernel
    /// address `base`, a multiple of `align` (a power of two). `None` when
    /// there is no room.
    fn alloc(&mut self, size: usize, align: usize) -> Option<(u64, Self::Region)>;
}

/// A heap buffer that claims to live at `base`: for loading on a host,
/// where the image is inspected, never run.
#[derive(Clone, Copy, Debug)]
pub struct VecMemory {
    base: u64,
}

impl VecMemory {
    pub fn new(base: u64) -> Self {
        VecMemory { base }
    }
}

impl Memory for VecMemory {
    type Region = Vec<u8>;

    fn alloc(&mut self, size: usize, align: usize) -> Option<(u64, Vec<u8>)> {
        if align == 0 || !self.base.is_multiple_of(align as u64) {
            return None;
        }
        let mut region = Vec::new();
        region.try_reserve_exact(size).ok()?;
        region.resize(size, 0);
        Some((self.base, region))
    }
}

/// The kernel's side of symbol resolution.
pub trait Resolver {
    /// The address of kernel symbol `name`, as `linker_file_lookup_symbol`
    /// finds it. `None` (or 0, which the kernel also reads as "not
    /// found") leaves a strong symbol undefined and a weak one at 0.
    fn resolve(&mut self, name: &str) -> Option<u64>;

    /// Runs the ifunc resolver at `resolver` (an `R_X86_64_IRELATIVE`
    /// target or an `STT_GNU_IFUNC` symbol) and returns its result: the
    /// kernel calls it in place during the load. Only a caller running the
    /// image at its real address can; the default says it cannot, which
    /// fails the load and names the address.
    fn call_ifunc(&mut self, resolver: u64) -> Option<u64> {
        let _ = resolver;
        None
    }
}

impl<F: FnMut(&str) -> Option<u64>> Resolver for F {
    fn resolve(&mut self, name: &str) -> Option<u64> {
        self(name)
    }
}

/// Loads klds for a kernel that provides some modules.
#[derive(Clone, Debug)]
pub struct Loader {
    modules: Vec<ProvidedModule>,
}

impl Loader {
    /// A loader for a kernel of `__FreeBSD_version` `freebsd_version`,
    /// which provides the module `kernel` at that version (kern_mib.c's
    /// `MODULE_VERSION(kernel, __FreeBSD_version)`).
    pub fn new(freebsd_version: i32) -> Self {
        Loader {
            modules: alloc::vec![ProvidedModule {
                name: "kernel".to_string(),
                version: freebsd_version,
                container: "kernel".to_string(),
            }],
        }
    }

    /// Adds a module (a `MODULE_VERSION` of an already loaded file).
    pub fn provide(mut self, name: &str, version: i32, container: &str) -> Self {
        self.modules.push(ProvidedModule {
            name: name.to_string(),
            version,
            container: container.to_string(),
        });
        self
    }

    pub fn modules(&self) -> &[ProvidedModule] {
        &self.modules
    }

    /// Loads the object file `object`, read from `path` (used in messages
    /// as the kernel uses it), into memory from `memory`, resolving its
    /// undefined symbols through `resolver`.
    pub fn load<M: Memory, S: Resolver>(
        &self,
        path: &str,
        object: &[u8],
        memory: &mut M,
        resolver: &mut S,
    ) -> Result<Kld<M::Region>, LoadError> {
        let plan = Plan::read(path, object)?;
        let mut link = plan.place(memory)?;
        link.fix_link_sets();
        link.relocate(&plan, resolver, Pass::Local { ifuncs: false })?;
        let metadata = link.modmetadata()?;
        metadata::check_dependencies(link.file_name(), &metadata, &self.modules)?;
        link.relocate(&plan, resolver, Pass::Global { ifuncs: false })?;
        link.relocate(&plan, resolver, Pass::Global { ifuncs: true })?;
        link.relocate(&plan, resolver, Pass::Local { ifuncs: true })?;
        Ok(link)
    }
}
