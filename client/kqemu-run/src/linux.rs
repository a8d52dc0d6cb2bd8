//! `kqemu-run --linux [--file PATH]... -- PROGRAM ARGS...`: runs a static
//! Linux program (busybox) through `KQEMU_EXEC` with the client core
//! (crate `kqemu-client`) as its operating system: processes, the memory
//! file system, the system-call layer, and the exit handling and SOFTMMU
//! emulator of `kqemu_client::kqemu`, the same code the testbed's monitor
//! mode runs. Guest RAM comes from `mmap(MAP_ANON|MAP_SHARED)` and is
//! guest-physical 0.. (`phys_base` 0, one SET_PHYS_MEM range).

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::vec;
use core::ffi::CStr;

use kqemu::abi::{
    KqemuCpuState, KqemuInit, KqemuPhysMem, KQEMU_INIT, KQEMU_IO_MEM_RAM, KQEMU_SET_PHYS_MEM,
};
use kqemu_client::kqemu::{step, CpuFeatures, ExecCpu, Step, StepError};
use kqemu_client::{Arch, Console, GuestRam, Linux, LinuxConfig, MemFs, PagingFormat, Pid};

use crate::guest::{region, say, FxArea, GuestSystem, STATUS_RUNNER_FAILED};
use crate::O_RDWR;

/// Guest RAM: 64 MiB (busybox and its files fit with room to spare).
pub const LINUX_RAM_SIZE: u64 = 64 << 20;
const PAGE: u64 = 4096;
/// The largest file this runner copies into the guest's file system.
const MAX_FILE: usize = 16 << 20;
/// Bound on EXEC calls of one run (a guest that never exits).
const MAX_EXECS: u64 = 100_000_000;
/// Mode of the files put into the guest (busybox must be executable).
const FILE_MODE: u32 = 0o755;

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

/// Runs `argv[0]` with the files `files` (host paths = guest paths) in the
/// guest's file system; the program's exit status (128 + signal when
/// killed), or [`STATUS_RUNNER_FAILED`] with a line on stderr.
pub fn run_linux<'a, S: GuestSystem>(
    sys: &'a mut S,
    console: Box<dyn Console + 'a>,
    features: CpuFeatures,
    files: &[&CStr],
    argv: &[&str],
    envp: &[&str],
) -> i32 {
    let mut fs = MemFs::new();
    let mut buf = vec![0u8; MAX_FILE];
    for path in files {
        let Ok(name) = path.to_str() else {
            say(sys, format_args!("kqemu-run: file name not UTF-8\n"));
            return STATUS_RUNNER_FAILED;
        };
        let len = match sys.read_file(path, &mut buf) {
            Ok(len) if len < MAX_FILE => len,
            _ => {
                say(
                    sys,
                    format_args!("kqemu-run: cannot read {name} (or it is too large)\n"),
                );
                return STATUS_RUNNER_FAILED;
            }
        };
        if fs.add_file(name, &buf[..len], FILE_MODE).is_err() {
            say(sys, format_args!("kqemu-run: cannot add {name}\n"));
            return STATUS_RUNNER_FAILED;
        }
    }
    drop(buf);
    let Some((_, ram)) = region(sys, LINUX_RAM_SIZE) else {
        say(sys, format_args!("kqemu-run: no memory for guest RAM\n"));
        return STATUS_RUNNER_FAILED;
    };
    let ram_addr = ram.as_ptr() as u64;
    let Ok(ram) = GuestRam::new(ram, 0) else {
        say(sys, format_args!("kqemu-run: guest RAM rejected\n"));
        return STATUS_RUNNER_FAILED;
    };
    let mut config = LinuxConfig::new(Arch::Amd64, PagingFormat::Long4);
    config.nx = features.nx;
    let mut linux = Linux::new(ram, fs, config, console);
    if let Err(e) = linux.spawn(argv[0], argv, envp) {
        say(
            sys,
            format_args!("kqemu-run: cannot start {}: {e:?}\n", argv[0]),
        );
        return STATUS_RUNNER_FAILED;
    }
    // The client's side of INIT: dirty bytes (all dirty: this client
    // translates no code) and the three list pages.
    let Some((dirty_addr, dirty)) = region(sys, LINUX_RAM_SIZE / PAGE) else {
        return STATUS_RUNNER_FAILED;
    };
    dirty.fill(0xff);
    let Some((lists, _)) = region(sys, 3 * PAGE) else {
        return STATUS_RUNNER_FAILED;
    };
    let Ok(fd) = sys.open(c"/dev/kqemu", O_RDWR) else {
        say(sys, format_args!("kqemu-run: cannot open /dev/kqemu\n"));
        return STATUS_RUNNER_FAILED;
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
        return STATUS_RUNNER_FAILED;
    }
    let mut cpu = FreeBsdCpu {
        sys,
        fd,
        dirty,
        fpu: BTreeMap::new(),
    };
    let mut failure = None;
    for _ in 0..MAX_EXECS {
        match step(&mut linux, &mut cpu, PagingFormat::Long4, &features) {
            Ok(Step::Idle) => break,
            Ok(Step::Ran { .. }) => {
                let alive = linux.pids();
                cpu.fpu.retain(|p, _| alive.contains(p));
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let sys = cpu.sys;
    let _ = sys.close(fd);
    match failure {
        Some(StepError::Exec(errno)) => {
            say(
                sys,
                format_args!("kqemu-run: KQEMU_EXEC failed: errno {errno}\n"),
            );
            STATUS_RUNNER_FAILED
        }
        Some(StepError::Softmmu { rip, code }) => {
            say(sys, format_args!("kqemu-run: SOFTMMU at rip {rip:#x} ({code:02x?}), which this client cannot emulate\n"));
            STATUS_RUNNER_FAILED
        }
        Some(StepError::Retval { retval, rip }) => {
            say(
                sys,
                format_args!("kqemu-run: KQEMU_EXEC retval {retval:#x} at rip {rip:#x}\n"),
            );
            STATUS_RUNNER_FAILED
        }
        None => linux.exit_status().unwrap_or_else(|| {
            say(
                sys,
                format_args!("kqemu-run: no exit status (deadlock or EXEC bound)\n"),
            );
            STATUS_RUNNER_FAILED
        }),
    }
}
