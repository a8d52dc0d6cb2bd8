//! kqemu-client: the client side of `/dev/kqemu` (no_std + alloc core).
//!
//! The core is the Linux "operating system" that a guest program sees, independent of who
//! runs the CPU (the testbed natively, the testbed as a kqemu client, the FreeBSD client
//! binary): ELF loading, page tables in guest RAM, the syscall layer for the i386 and
//! x86_64 ABIs, an in-memory file system from a cpio initrd, and process scheduling.
//! The runner is the CPU: see [`Linux::next`] and [`Linux::trap`].
#![cfg_attr(not(any(test, feature = "std")), no_std)]
#![deny(unsafe_op_in_unsafe_fn)]
extern crate alloc;

mod abi;
pub mod context;
pub mod cpio;
pub mod elf;
pub mod errno;
pub mod kqemu;
pub mod linux;
pub mod loader;
pub mod memfs;
pub mod mm;
pub mod paging;
pub mod process;
pub mod ram;
mod syscall;

pub use context::{Arch, PagingFormat, Trap, UserContext, UserDesc};
pub use errno::Errno;
pub use linux::{Console, Linux, LinuxConfig, ProcessState, Runnable, LDT_ENTRIES, LOG_FD};
pub use memfs::MemFs;
pub use process::Pid;
pub use ram::GuestRam;
