//! kqemu-kldload: the testbed's kld loader.
//!
//! Loads an amd64 FreeBSD kld (`kqemu.ko`, an `ET_REL` object) with the
//! rules of the kernel's `link_elf_obj` and amd64 `elf_machdep.c`: what
//! FreeBSD refuses is refused with the message `kldload` shows, what it
//! accepts is laid out, linked against a caller-supplied kernel symbol
//! table and relocated as it would be. The linker sets the kernel acts on
//! next (module metadata, SYSINITs, sysctls) come out parsed and in the
//! kernel's order, for the testbed's FreeBSD personality to run.
//!
//! `no_std` + `alloc`; the `std` feature (default) only adds
//! `std::error::Error` for host use.
#![cfg_attr(not(feature = "std"), no_std)]
#![deny(unsafe_op_in_unsafe_fn)]
#![forbid(unsafe_code)]

extern crate alloc;

mod elf;
mod error;
mod image;
mod kld;
mod loader;
mod metadata;
mod reloc;

pub use error::{ErrorKind, LoadError};
pub use image::{Section, SectionKind};
pub use kld::{Import, Kld};
pub use loader::{Loader, Memory, Resolver, VecMemory, PAGE_SIZE};
pub use metadata::{
    LinkerSet, Metadata, ModDepend, ModMetadata, ModuleData, ProvidedModule, SysInit, MDT_DEPEND,
    MDT_MODULE, MDT_PNP_INFO, MDT_SETNAME, MDT_VERSION, SI_SUB_DUMMY,
};
