//! `kqemu-run --linux [--file PATH]... -- PROGRAM ARGS...`: runs a static
//! Linux program (busybox, the guests of tests/guests; amd64, or i386 in
//! compatibility mode) through `KQEMU_EXEC` with the client core (crate
//! `kqemu-client`) as its operating system: processes, the memory file
//! system, the system-call layer, and the exit handling and SOFTMMU
//! emulator of `kqemu_client::kqemu`, the same code the testbed's monitor
//! mode runs. Guest RAM comes from `mmap(MAP_ANON|MAP_SHARED)` and is
//! guest-physical 0.. (`phys_base` 0, one SET_PHYS_MEM range), as QEMU
//! 0.11 allocates it on FreeBSD; the guest's FPU state is live around each
//! EXEC (`fxrstor` before, `fxsave` after: ABI.md "Guest FPU contract").
//!
//! `--ram-file PATH`: guest RAM, the dirty bytes and the list pages come
//! from one shared file instead, as QEMU 0.10's `kqemu_vmalloc` (osdep.c,
//! behind `qemu_vmalloc` when kqemu is on) allocates them on Linux: a
//! `qemuXXXXXX` file made by mkstemp (mode 0600) in `$QEMU_TMPDIR` or
//! `/dev/shm` (else `/tmp`) and unlinked at once; each allocation, rounded
//! up to a page, grows it with `ftruncate` and maps the new part
//! `PROT_READ|PROT_WRITE, MAP_SHARED` at its offset (RAM at 0, then the
//! dirty bytes, then the lists: the order of qemu_vmalloc's calls). PATH is
//! the user's, so it is opened `O_CREAT|O_TRUNC|O_RDWR` mode 0600 (as
//! QEMU 0.9 reopened its file): a leftover file is emptied. After the run a
//! second mapping of the RAM part must show the guest's RAM and share
//! writes with the first (the file's pages are the mapping's pages); then
//! the file is unmapped and closed before `/dev/kqemu` is, so the pages
//! the module holds outlive the file.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::ffi::CStr;
use core::fmt::Write;

use kqemu::abi::{
    KqemuCpuState, KqemuInit, KqemuPhysMem, KQEMU_INIT, KQEMU_IO_MEM_RAM, KQEMU_SET_PHYS_MEM,
};
use kqemu_client::kqemu::{step, CpuFeatures, ExecCpu, Step, StepError};
use kqemu_client::{Arch, Console, GuestRam, Linux, LinuxConfig, MemFs, PagingFormat, Pid, Trap};

use crate::{Line, System, O_RDWR};

/// What the runner needs beyond [`System`].
pub trait GuestSystem: System {
    /// The contents of the file at `path`; EFBIG past `max` bytes.
    fn read_file(&mut self, path: &CStr, max: usize) -> Result<Vec<u8>, i32>;
    /// Writes `bytes` to descriptor `fd` of this process (1 or 2).
    fn write_fd(&mut self, fd: i32, bytes: &[u8]);
    /// KQEMU_EXEC with `fpu` (an FXSAVE image) loaded into the FPU before
    /// the ioctl and saved back from it after, with no code between.
    fn exec(&mut self, fd: i32, state: &mut KqemuCpuState, fpu: &mut FxArea) -> Result<i32, i32>;
    /// `open(path, O_CREAT|O_TRUNC|O_RDWR, 0600)`; a system without
    /// writable files answers ENOSYS.
    fn create_file(&mut self, _path: &CStr) -> Result<i32, i32> {
        Err(ENOSYS)
    }
    /// `unlink(path)`.
    fn unlink(&mut self, _path: &CStr) -> Result<(), i32> {
        Err(ENOSYS)
    }
    /// `ftruncate(fd, len)`.
    fn ftruncate(&mut self, _fd: i32, _len: u64) -> Result<(), i32> {
        Err(ENOSYS)
    }
    /// `mmap(NULL, len, PROT_READ|PROT_WRITE, MAP_SHARED, fd, offset)`.
    fn mmap_shared_file(&mut self, _fd: i32, _len: u64, _offset: u64) -> Result<u64, i32> {
        Err(ENOSYS)
    }
}

/// ENOSYS (FreeBSD sys/sys/errno.h).
const ENOSYS: i32 = 78;

/// An FXSAVE/FXRSTOR image (SDM Vol. 1 10.5.1: 512 bytes, 16-aligned).
#[repr(C, align(16))]
pub struct FxArea(pub [u8; 512]);

impl FxArea {
    /// The power-on FPU state: FCW 0x037f, MXCSR 0x1f80 (SDM Vol. 1
    /// 8.1.5, 10.2.3), everything else zero.
    pub fn initial() -> FxArea {
        let mut a = FxArea([0; 512]);
        a.0[0..2].copy_from_slice(&0x037fu16.to_le_bytes());
        a.0[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
        a
    }
}

/// Exit status of a run this runner could not carry out.
pub const STATUS_RUNNER_FAILED: i32 = 125;
/// Guest RAM: 64 MiB (busybox and its files fit with room to spare).
const LINUX_RAM_SIZE: u64 = 64 << 20;
const PAGE: u64 = 4096;
/// The largest file this runner copies into the guest's file system.
const MAX_FILE: usize = 64 << 20;
/// Bound on EXEC calls of one run (a guest that never exits).
const MAX_EXECS: u64 = 100_000_000;
/// Mode of the files put into the guest (busybox must be executable).
const FILE_MODE: u32 = 0o755;

/// What `--linux` runs.
pub struct LinuxRun<'a> {
    /// Files read from this process's file system into the guest's, at the
    /// same paths (PROGRAM is added when missing).
    pub files: &'a [&'a CStr],
    /// PROGRAM ARGS.
    pub argv: &'a [&'a str],
    pub envp: &'a [&'a str],
    /// `--ram-file PATH`: guest memory from this shared file.
    pub ram_file: Option<&'a CStr>,
}

/// Where guest memory comes from: QEMU's qemu_vmalloc with kqemu, on
/// FreeBSD (anonymous shared memory) or on Linux (a shared file).
enum Backing {
    Anon,
    /// The file's descriptor and its size so far.
    File {
        fd: i32,
        size: u64,
    },
}

/// The FreeBSD process around the run: KQEMU_EXEC with the FPU state of
/// the guest process live around the ioctl.
struct FreeBsdCpu<'s, S: GuestSystem> {
    sys: &'s mut S,
    fd: i32,
    dirty: &'s mut [u8],
    fpu: BTreeMap<Pid, FxArea>,
}

impl<S: GuestSystem> ExecCpu for FreeBsdCpu<'_, S> {
    type Error = i32;

    fn all_pages_dirty(&mut self) {
        self.dirty.fill(0xff);
    }

    fn exec(&mut self, pid: Pid, state: &mut KqemuCpuState) -> Result<(), i32> {
        let fpu = self.fpu.entry(pid).or_insert_with(FxArea::initial);
        self.sys.exec(self.fd, state, fpu).map(|_| ())
    }
}

fn say<S: GuestSystem>(sys: &mut S, args: core::fmt::Arguments<'_>) {
    let mut line = Line::default();
    let _ = line.write_fmt(args);
    sys.write_fd(2, line.as_bytes());
}

/// A fresh shared region of `len` bytes (a page multiple) as a byte
/// slice: anonymous, or the file grown by `len` and its new part mapped;
/// Err(errno).
fn region<'a, S: GuestSystem>(
    sys: &mut S,
    backing: &mut Backing,
    len: u64,
) -> Result<(u64, &'a mut [u8]), i32> {
    let addr = match backing {
        Backing::Anon => sys.mmap_shared_anon(len)?,
        Backing::File { fd, size } => {
            sys.ftruncate(*fd, *size + len)?;
            let addr = sys.mmap_shared_file(*fd, len, *size)?;
            *size += len;
            addr
        }
    };
    // SAFETY: a fresh mapping of `len` readable, writable bytes that this
    // process never unmaps.
    Ok((addr, unsafe {
        core::slice::from_raw_parts_mut(addr as *mut u8, len as usize)
    }))
}

/// `--ram-file`: the file QEMU's kqemu_vmalloc makes, unlinked at once.
fn file_backing<S: GuestSystem>(sys: &mut S, path: &CStr) -> Result<Backing, i32> {
    let name = path.to_str().unwrap_or("?");
    let fd = match sys.create_file(path) {
        Ok(fd) => fd,
        Err(errno) => {
            say(
                sys,
                format_args!("kqemu-run: cannot create {name}: errno {errno}\n"),
            );
            return Err(STATUS_RUNNER_FAILED);
        }
    };
    if let Err(errno) = sys.unlink(path) {
        say(
            sys,
            format_args!("kqemu-run: cannot unlink {name}: errno {errno}\n"),
        );
        let _ = sys.close(fd);
        return Err(STATUS_RUNNER_FAILED);
    }
    Ok(Backing::File { fd, size: 0 })
}

/// A second `MAP_SHARED` mapping of the file's first `len` bytes (guest
/// RAM) must hold what the guest left in RAM (not all zero) and see a
/// write made through the first mapping.
fn check_shared_file<S: GuestSystem>(sys: &mut S, fd: i32, ram: u64, len: u64) -> Result<(), i32> {
    let second = match sys.mmap_shared_file(fd, len, 0) {
        Ok(addr) => addr,
        Err(errno) => {
            say(
                sys,
                format_args!("kqemu-run: ram file: second mmap failed: errno {errno}\n"),
            );
            return Err(STATUS_RUNNER_FAILED);
        }
    };
    let (first_ptr, second_ptr) = (ram as *mut u8, second as *mut u8);
    // SAFETY: both are live mappings of `len` bytes; nothing writes them
    // while these shared slices live.
    let (a, b) = unsafe {
        (
            core::slice::from_raw_parts(first_ptr, len as usize),
            core::slice::from_raw_parts(second_ptr, len as usize),
        )
    };
    let same = a == b;
    let used = a.iter().any(|&x| x != 0);
    // SAFETY: byte 0 of both mappings; volatile, since the two addresses
    // alias one page, which the compiler cannot know.
    let shared = unsafe {
        let old = first_ptr.read_volatile();
        first_ptr.write_volatile(!old);
        let seen = second_ptr.read_volatile();
        first_ptr.write_volatile(old);
        seen == !old
    };
    let _ = sys.munmap(second, len);
    if same && used && shared {
        say(
            sys,
            format_args!(
                "kqemu-run: ram file: a second mapping shows the guest's RAM ({len} bytes) and shares writes\n"
            ),
        );
        Ok(())
    } else {
        say(
            sys,
            format_args!(
                "kqemu-run: ram file: second mapping: same bytes {same}, RAM used {used}, writes shared {shared}\n"
            ),
        );
        Err(STATUS_RUNNER_FAILED)
    }
}

/// The ABI of a static ELF program: ELFCLASS32 (EI_CLASS 1, System V gABI)
/// is i386, anything else is left to the loader (amd64 or ENOEXEC).
fn program_arch(elf: &[u8]) -> Arch {
    match elf.get(4) {
        Some(1) => Arch::I386,
        _ => Arch::Amd64,
    }
}

/// The guest's file system: `files`, read from this process's.
fn guest_fs<S: GuestSystem>(sys: &mut S, files: &[&CStr]) -> Result<MemFs, i32> {
    let mut fs = MemFs::new();
    for path in files {
        let Ok(name) = path.to_str() else {
            say(sys, format_args!("kqemu-run: file name not UTF-8\n"));
            return Err(STATUS_RUNNER_FAILED);
        };
        let data = match sys.read_file(path, MAX_FILE) {
            Ok(data) => data,
            Err(errno) => {
                say(
                    sys,
                    format_args!("kqemu-run: cannot read {name}: errno {errno}\n"),
                );
                return Err(STATUS_RUNNER_FAILED);
            }
        };
        if fs.add_file(name, &data, FILE_MODE).is_err() {
            say(sys, format_args!("kqemu-run: cannot add {name}\n"));
            return Err(STATUS_RUNNER_FAILED);
        }
    }
    Ok(fs)
}

/// Runs `run.argv[0]` with `run.files` in the guest's file system; the
/// program's exit status (128 + signal when killed), or
/// [`STATUS_RUNNER_FAILED`] with a line on stderr. The last stderr line of
/// a run that started is `kqemu-run: <n> EXEC calls, <c> cycles ...`: the
/// cycles (RDTSC) from before the first EXEC to the exit of pid 1.
pub fn run_linux<'a, S: GuestSystem>(
    sys: &'a mut S,
    console: Box<dyn Console + 'a>,
    features: CpuFeatures,
    run: &LinuxRun<'_>,
) -> i32 {
    match run_linux_inner(sys, console, features, run) {
        Ok(status) | Err(status) => status,
    }
}

fn run_linux_inner<'a, S: GuestSystem>(
    sys: &'a mut S,
    console: Box<dyn Console + 'a>,
    features: CpuFeatures,
    run: &LinuxRun<'_>,
) -> Result<i32, i32> {
    let argv = run.argv;
    let Some(&program) = argv.first() else {
        return Err(STATUS_RUNNER_FAILED);
    };
    let fs = guest_fs(sys, run.files)?;
    let arch = program_arch(fs.read_file(program).unwrap_or_default());
    let mut backing = match run.ram_file {
        Some(path) => file_backing(sys, path)?,
        None => Backing::Anon,
    };
    let ram = match region(sys, &mut backing, LINUX_RAM_SIZE) {
        Ok((_, ram)) => ram,
        Err(errno) => {
            say(
                sys,
                format_args!("kqemu-run: no memory for guest RAM: errno {errno}\n"),
            );
            return Err(STATUS_RUNNER_FAILED);
        }
    };
    let ram_addr = ram.as_ptr() as u64;
    let Ok(ram) = GuestRam::new(ram, 0) else {
        say(sys, format_args!("kqemu-run: guest RAM rejected\n"));
        return Err(STATUS_RUNNER_FAILED);
    };
    // A 64-bit guest OS: amd64 programs run in 64-bit mode, i386 ones in
    // compatibility mode (client/src/kqemu.rs `state_of`).
    let mut config = LinuxConfig::new(arch, PagingFormat::Long4);
    config.nx = features.nx;
    let mut linux = Linux::new(ram, fs, config, console);
    if let Err(e) = linux.spawn(program, argv, run.envp) {
        say(
            sys,
            format_args!("kqemu-run: cannot start {program}: {e:?}\n"),
        );
        return Err(STATUS_RUNNER_FAILED);
    }
    // The client's side of INIT: dirty bytes (all dirty: this client
    // translates no code) and the three list pages.
    let dirty = region(sys, &mut backing, LINUX_RAM_SIZE / PAGE);
    let lists = region(sys, &mut backing, 3 * PAGE);
    let (Ok((dirty_addr, dirty)), Ok((lists, _))) = (dirty, lists) else {
        say(sys, format_args!("kqemu-run: no memory for INIT\n"));
        return Err(STATUS_RUNNER_FAILED);
    };
    dirty.fill(0xff);
    let Ok(fd) = sys.open(c"/dev/kqemu", O_RDWR) else {
        say(sys, format_args!("kqemu-run: cannot open /dev/kqemu\n"));
        return Err(STATUS_RUNNER_FAILED);
    };
    let mut init = KqemuInit {
        ram_base: ram_addr,
        ram_size: LINUX_RAM_SIZE,
        ram_dirty: dirty_addr,
        pages_to_flush: lists,
        ram_pages_to_update: lists + PAGE,
        modified_ram_pages: lists + 2 * PAGE,
    };
    let mut phys = KqemuPhysMem {
        phys_addr: 0,
        size: LINUX_RAM_SIZE,
        ram_addr: 0,
        io_index: KQEMU_IO_MEM_RAM,
        padding1: 0,
    };
    if sys
        .ioctl(fd, KQEMU_INIT, (&mut init as *mut KqemuInit).cast())
        .is_err()
        || sys
            .ioctl(
                fd,
                KQEMU_SET_PHYS_MEM,
                (&mut phys as *mut KqemuPhysMem).cast(),
            )
            .is_err()
    {
        say(
            sys,
            format_args!("kqemu-run: KQEMU_INIT / SET_PHYS_MEM failed\n"),
        );
        let _ = sys.close(fd);
        return Err(STATUS_RUNNER_FAILED);
    }
    let mut cpu = FreeBsdCpu {
        sys,
        fd,
        dirty,
        fpu: BTreeMap::new(),
    };
    let mut failure = None;
    let mut execs = 0u64;
    let start = cpu.sys.cycles();
    let mut end = None;
    while execs < MAX_EXECS {
        match step(&mut linux, &mut cpu, PagingFormat::Long4, &features) {
            Ok(Step::Idle) => break,
            Ok(Step::Ran { trap, .. }) => {
                execs += 1;
                if end.is_none() && linux.exit_status().is_some() {
                    end = Some(cpu.sys.cycles());
                }
                // FPU areas of processes that are gone (the monitor-mode
                // runner does the same on its timer path).
                if trap == Trap::Timer {
                    let alive = linux.pids();
                    cpu.fpu.retain(|p, _| alive.contains(p));
                }
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let end = end.unwrap_or_else(|| cpu.sys.cycles());
    let sys = cpu.sys;
    match failure {
        Some(StepError::Exec(errno)) => say(
            sys,
            format_args!("kqemu-run: KQEMU_EXEC failed: errno {errno}\n"),
        ),
        Some(StepError::Softmmu { rip, code }) => say(
            sys,
            format_args!(
                "kqemu-run: SOFTMMU at rip {rip:#x} ({code:02x?}), which this client cannot emulate\n"
            ),
        ),
        Some(StepError::Retval { retval, rip }) => say(
            sys,
            format_args!("kqemu-run: KQEMU_EXEC retval {retval:#x} at rip {rip:#x}\n"),
        ),
        None => {}
    }
    let status = match (&failure, linux.exit_status()) {
        (None, Some(status)) => Ok(status),
        (None, None) => {
            say(
                sys,
                format_args!("kqemu-run: no exit status (deadlock or EXEC bound)\n"),
            );
            Err(STATUS_RUNNER_FAILED)
        }
        (Some(_), _) => Err(STATUS_RUNNER_FAILED),
    };
    drop(linux);
    let status = match (status, backing) {
        (Ok(status), Backing::File { fd: file, .. }) => {
            let checked = check_shared_file(sys, file, ram_addr, LINUX_RAM_SIZE).map(|()| status);
            // The file goes before /dev/kqemu is closed: its last mapping
            // and descriptor are gone while the module still holds some
            // of its pages, which must outlive the file until the close
            // unholds them (FreeBSD keeps held pages wired).
            let regions = [
                (ram_addr, LINUX_RAM_SIZE),
                (dirty_addr, LINUX_RAM_SIZE / PAGE),
                (lists, 3 * PAGE),
            ];
            let mut released = Ok(());
            for (addr, len) in regions {
                released = released.and(sys.munmap(addr, len));
            }
            released = released.and(sys.close(file));
            match released {
                Err(errno) => {
                    say(
                        sys,
                        format_args!(
                            "kqemu-run: ram file: munmap/close before closing /dev/kqemu: errno {errno}\n"
                        ),
                    );
                    Err(STATUS_RUNNER_FAILED)
                }
                Ok(()) => checked,
            }
        }
        (status, _) => status,
    };
    let _ = sys.close(fd);
    say(
        sys,
        format_args!(
            "kqemu-run: {execs} EXEC calls, {} cycles from the first EXEC to the exit of pid 1\n",
            end.wrapping_sub(start)
        ),
    );
    status
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::string::String;
    use std::vec;

    #[test]
    fn elf_class_picks_the_abi() {
        assert_eq!(program_arch(b"\x7fELF\x01\x01\x01"), Arch::I386);
        assert_eq!(program_arch(b"\x7fELF\x02\x01\x01"), Arch::Amd64);
        assert_eq!(program_arch(b""), Arch::Amd64);
    }

    /// A process with files but no /dev/kqemu.
    struct NoDevice {
        files: std::vec::Vec<(&'static CStr, std::vec::Vec<u8>)>,
        stderr: String,
    }

    impl System for NoDevice {
        fn open(&mut self, _: &CStr, _: i32) -> Result<i32, i32> {
            Err(crate::errno::ENOENT)
        }
        fn close(&mut self, _: i32) -> Result<(), i32> {
            Ok(())
        }
        fn ioctl(&mut self, _: i32, _: u32, _: *mut u8) -> Result<i32, i32> {
            Err(crate::errno::ENOTTY)
        }
        fn mmap_shared_anon(&mut self, len: u64) -> Result<u64, i32> {
            // Leaked on purpose: the runner keeps its mappings to the end.
            Ok(vec![0u64; (len / 8) as usize].leak().as_mut_ptr() as u64)
        }
        fn munmap(&mut self, _: u64, _: u64) -> Result<(), i32> {
            Ok(())
        }
        fn kldfind(&mut self, _: &CStr) -> Result<i32, i32> {
            Err(crate::errno::ENOENT)
        }
        fn kldunload(&mut self, _: i32) -> Result<(), i32> {
            Err(crate::errno::ENOENT)
        }
        fn print(&mut self, _: &[u8]) {}
        fn cycles(&mut self) -> u64 {
            0
        }
    }

    impl GuestSystem for NoDevice {
        fn read_file(&mut self, path: &CStr, max: usize) -> Result<Vec<u8>, i32> {
            let (_, data) = self
                .files
                .iter()
                .find(|(p, _)| *p == path)
                .ok_or(crate::errno::ENOENT)?;
            if data.len() > max {
                return Err(crate::errno::EFBIG);
            }
            Ok(data.clone())
        }
        fn write_fd(&mut self, _: i32, bytes: &[u8]) {
            self.stderr.push_str(&String::from_utf8_lossy(bytes));
        }
        fn exec(&mut self, _: i32, _: &mut KqemuCpuState, _: &mut FxArea) -> Result<i32, i32> {
            Err(crate::errno::EIO)
        }
    }

    struct Quiet;

    impl Console for Quiet {
        fn write(&mut self, _: i32, _: &[u8]) {}
        fn now_ns(&mut self) -> u64 {
            0
        }
        fn random(&mut self, buf: &mut [u8]) {
            buf.fill(7);
        }
    }

    fn run(sys: &mut NoDevice, argv: &[&str], files: &[&CStr]) -> i32 {
        let run = LinuxRun {
            files,
            argv,
            envp: &[],
            ram_file: None,
        };
        run_linux(sys, Box::new(Quiet), CpuFeatures::default(), &run)
    }

    #[test]
    fn a_ram_file_that_cannot_be_created_fails_the_run() {
        let mut sys = NoDevice {
            files: vec![(c"/x", b"\x7fELF\x02".to_vec())],
            stderr: String::new(),
        };
        let run = LinuxRun {
            files: &[c"/x"],
            argv: &["/x"],
            envp: &[],
            ram_file: Some(c"/tmp/ram"),
        };
        let status = run_linux(&mut sys, Box::new(Quiet), CpuFeatures::default(), &run);
        assert_eq!(status, STATUS_RUNNER_FAILED);
        assert!(
            sys.stderr.contains("cannot create /tmp/ram: errno 78"),
            "{}",
            sys.stderr
        );
    }

    #[test]
    fn a_missing_file_fails_the_run() {
        let mut sys = NoDevice {
            files: vec![],
            stderr: String::new(),
        };
        assert_eq!(run(&mut sys, &["/x"], &[c"/x"]), STATUS_RUNNER_FAILED);
        assert!(
            sys.stderr.contains("cannot read /x: errno 2"),
            "{}",
            sys.stderr
        );
    }

    #[test]
    fn a_file_that_is_not_a_program_fails_to_start() {
        let mut sys = NoDevice {
            files: vec![(c"/x", b"#!/bin/sh\n".to_vec())],
            stderr: String::new(),
        };
        assert_eq!(run(&mut sys, &["/x"], &[c"/x"]), STATUS_RUNNER_FAILED);
        assert!(sys.stderr.contains("cannot start /x"), "{}", sys.stderr);
    }
}
