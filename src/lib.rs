//! kqemu: the QEMU accelerator for FreeBSD amd64.
//!
//! Layers (ARCHITECTURE.md): [`abi`] is the `/dev/kqemu` contract,
//! [`monitor`] the OS-independent monitor, [`host`] the seam through which
//! the monitor asks the kernel for things, and `freebsd` (built only with
//! the `freebsd14`/`freebsd15` features) the kld itself.
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod abi;
pub mod device;
pub mod error;
pub mod host;
pub mod monitor;

#[cfg(any(feature = "freebsd14", feature = "freebsd15"))]
mod freebsd;
