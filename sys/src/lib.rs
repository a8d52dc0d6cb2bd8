//! Bindings to the FreeBSD kernel headers and to the kld's C shim,
//! generated at build time (build.rs) for one release (feature
//! `freebsd14` or `freebsd15`). This crate is the only place raw kernel
//! symbols appear; bindgen's layout assertions compile with it, so a header
//! set that disagrees with the generated types stops the build.
#![no_std]
#![allow(
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    dead_code
)]
#![allow(clippy::all, clippy::pedantic)]
#![deny(unsafe_op_in_unsafe_fn)]

include!(concat!(env!("OUT_DIR"), "/bindings.rs"));

// The headers are those of the release the feature names (FreeBSD
// encodes the major release as __FreeBSD_version / 100000).
#[cfg(feature = "freebsd14")]
const _: () = assert!(
    KQEMU_FREEBSD_VERSION / 100_000 == 14,
    "freebsd14 feature with other headers"
);
#[cfg(feature = "freebsd15")]
const _: () = assert!(
    KQEMU_FREEBSD_VERSION / 100_000 == 15,
    "freebsd15 feature with other headers"
);

// Facts of TOOLCHAIN.md the module relies on: struct thread differs
// between the releases, the run-loop exit check reads td_ast and
// td_owepreempt, whose place does not.
#[cfg(feature = "freebsd14")]
const _: () = assert!(core::mem::size_of::<thread>() == 1776);
#[cfg(feature = "freebsd15")]
const _: () = assert!(core::mem::size_of::<thread>() == 1824);
const _: () = assert!(core::mem::offset_of!(thread, td_ast) == 268);
