//! kqemu-run: the FreeBSD client of `/dev/kqemu` (issue 7).
//!
//! The library holds what the program does, against a [`System`] (the
//! FreeBSD system calls it needs): the error-path checks of the device
//! contract (notes/contract.md, ABI.md), one result line each, and
//! (`--linux`) a static Linux program run through KQEMU_EXEC with the
//! client core as its OS (linux.rs).
//! `src/main.rs` is the static FreeBSD/amd64 program that runs them with
//! raw system calls; the unit tests run them against a model.
#![no_std]
#![deny(unsafe_op_in_unsafe_fn)]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod checks;
mod line;
mod linux;

pub use checks::{run_checks, Options};
pub use kqemu_client::kqemu::CpuFeatures;
pub use kqemu_client::Console;
pub use line::Line;
pub use linux::{run_linux, FxArea, GuestSystem, LinuxRun, STATUS_RUNNER_FAILED};

/// FreeBSD errno values (sys/sys/errno.h) the checks expect.
pub mod errno {
    pub const EPERM: i32 = 1;
    pub const ENOENT: i32 = 2;
    pub const EIO: i32 = 5;
    pub const EFAULT: i32 = 14;
    pub const EBUSY: i32 = 16;
    pub const EFBIG: i32 = 27;
    pub const EINVAL: i32 = 22;
    pub const ENOTTY: i32 = 25;
}

/// `open(2)` flags (sys/sys/fcntl.h).
pub const O_RDONLY: i32 = 0;
pub const O_RDWR: i32 = 2;

/// The system calls the client makes; errors are FreeBSD errno values.
pub trait System {
    fn open(&mut self, path: &core::ffi::CStr, flags: i32) -> Result<i32, i32>;
    fn close(&mut self, fd: i32) -> Result<(), i32>;
    /// `ioctl(fd, cmd, arg)` with `arg` pointing at a buffer of at least
    /// `IOCPARM_LEN(cmd)` bytes in this process.
    fn ioctl(&mut self, fd: i32, cmd: u32, arg: *mut u8) -> Result<i32, i32>;
    /// `mmap(NULL, len, PROT_READ|PROT_WRITE, MAP_ANON|MAP_SHARED, -1, 0)`:
    /// guest RAM as QEMU 0.11 allocates it on FreeBSD.
    fn mmap_shared_anon(&mut self, len: u64) -> Result<u64, i32>;
    fn munmap(&mut self, addr: u64, len: u64) -> Result<(), i32>;
    /// `kldfind(2)`: the file id of a loaded kld.
    fn kldfind(&mut self, name: &core::ffi::CStr) -> Result<i32, i32>;
    /// `kldunload(2)`.
    fn kldunload(&mut self, fileid: i32) -> Result<(), i32>;
    /// Writes to standard output.
    fn print(&mut self, bytes: &[u8]);
    /// A cycle counter (RDTSC), for the benchmark.
    fn cycles(&mut self) -> u64;
}
