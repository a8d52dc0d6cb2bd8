//! The error-path checks of issue 7 (item 5) through the real ioctls, in
//! the order a client meets them. Each prints `PASS <name>: ...` or
//! `FAIL <name>: ...`; the last line counts them.

use core::fmt::Write;

use kqemu::abi::{
    ioc, ior, KqemuCpuState, KqemuInit, KqemuPhysMem, IOC_INOUT, KQEMU_EXEC, KQEMU_GET_VERSION,
    KQEMU_INIT, KQEMU_IOC_GROUP, KQEMU_IO_MEM_RAM, KQEMU_MAX_RAM_SIZE, KQEMU_MODIFY_RAM_PAGES,
    KQEMU_SET_PHYS_MEM, KQEMU_VERSION, USER_ADDRESS_LIMIT,
};

use crate::errno::{EBUSY, EFAULT, EINVAL, EIO, ENOENT, ENOTTY, EPERM};
use crate::line::Line;
use crate::{System, O_RDONLY, O_RDWR};

pub const PAGE: u64 = 4096;
/// Guest RAM of the checks (ramchecks.rs too): 1 MiB, 256 pages, one page
/// of dirty bytes.
pub const RAM_SIZE: u64 = 1 << 20;
/// KQEMU_MAX_MODIFIED_RAM_PAGES + 1: one past the list.
const TOO_MANY_MODIFIED: i32 = 513;
/// A page-aligned user address nothing is mapped at (the client core
/// places mappings far below it).
const UNMAPPED: u64 = 0x5000_0000_0000;
/// An io_index no KQEMU_IO_MEM_* has.
const BAD_IO_INDEX: u32 = 7;
/// Guest-physical addresses end at 2^52 (KQEMU_MAX_GUEST_PHYS).
const GUEST_PHYS_LIMIT: u64 = 1 << 52;
/// CR0.PE and EFLAGS.IF (bit 1 always set): a state the client could pass.
const CR0_PE: u64 = 1;
const EFLAGS_IF_FIXED: u64 = 0x202;

/// What to run besides the device checks.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// `kldunload(2)` the module while the device is open (EBUSY) and
    /// after close (success); needs root on a real FreeBSD machine, and
    /// leaves the module unloaded.
    pub kldunload: bool,
    /// Exit with the device still open after the device checks: the
    /// kernel's exit must close it (cdevpriv destructor, nothing leaked).
    pub exit_open: bool,
    /// After the checks, time this many EXEC ioctls (`--bench N`): the
    /// round trip ring 3 → kernel → module → ring 3.
    pub bench: u32,
}

/// The PASS/FAIL lines of a run and their counts (ramchecks.rs too).
pub struct Report<'s, S: System> {
    pub sys: &'s mut S,
    pub passed: u32,
    pub failed: u32,
}

impl<'s, S: System> Report<'s, S> {
    pub fn new(sys: &'s mut S) -> Self {
        Self {
            sys,
            passed: 0,
            failed: 0,
        }
    }

    pub fn result(&mut self, ok: bool, name: &str, detail: core::fmt::Arguments<'_>) {
        let mut line = Line::default();
        let _ = writeln!(
            line,
            "{} {name}: {detail}",
            if ok { "PASS" } else { "FAIL" }
        );
        self.sys.print(line.as_bytes());
        if ok {
            self.passed += 1;
        } else {
            self.failed += 1;
        }
    }

    /// A call that must fail with `want`.
    pub fn expect_errno<T: core::fmt::Debug>(
        &mut self,
        name: &str,
        got: Result<T, i32>,
        want: i32,
    ) {
        match got {
            Err(e) if e == want => self.result(true, name, format_args!("errno {e}")),
            other => self.result(
                false,
                name,
                format_args!("got {other:?}, want errno {want}"),
            ),
        }
    }

    /// A call that must succeed.
    pub fn expect_ok<T: core::fmt::Debug>(&mut self, name: &str, got: Result<T, i32>) -> bool {
        let ok = got.is_ok();
        self.result(ok, name, format_args!("{got:?}"));
        ok
    }

    /// A call that must succeed (`want` Ok) or fail with the errno `want` names.
    pub fn expect<T: core::fmt::Debug>(
        &mut self,
        name: &str,
        got: Result<T, i32>,
        want: Result<(), i32>,
    ) -> bool {
        let ok = match (&got, want) {
            (Ok(_), Ok(())) => true,
            (Err(e), Err(w)) => *e == w,
            _ => false,
        };
        self.result(ok, name, format_args!("{got:?} (want {want:?})"));
        ok
    }
}

pub fn ioctl_with<S: System, T>(sys: &mut S, fd: i32, cmd: u32, arg: &mut T) -> Result<i32, i32> {
    sys.ioctl(fd, cmd, (arg as *mut T).cast::<u8>())
}

/// Runs every check; returns (passed, failed).
pub fn run_checks<S: System>(sys: &mut S, options: Options) -> (u32, u32) {
    let mut r = Report::new(sys);
    let dev = c"/dev/kqemu";
    match r.sys.open(dev, O_RDONLY) {
        Ok(fd) => {
            let _ = r.sys.close(fd);
            r.result(
                false,
                "open-rdonly",
                format_args!("opened (fd {fd}), want EPERM"),
            );
        }
        Err(e) => r.expect_errno::<()>("open-rdonly", Err(e), EPERM),
    }
    let fd = match r.sys.open(dev, O_RDWR) {
        Ok(fd) => {
            r.result(true, "open-rdwr", format_args!("fd {fd}"));
            fd
        }
        Err(e) => {
            r.result(false, "open-rdwr", format_args!("errno {e}"));
            return (r.passed, r.failed);
        }
    };
    device_checks(&mut r, fd);
    if options.bench > 0 {
        bench_exec(&mut r, fd, options.bench);
    }
    if options.exit_open {
        return summary(r);
    }

    let module = c"kqemu";
    let fileid = if options.kldunload {
        let id = r.sys.kldfind(module);
        let found = r.expect_ok("kldfind", id);
        match id {
            Ok(id) if found => {
                let got = r.sys.kldunload(id);
                r.expect_errno("kldunload-while-open", got, EBUSY);
                Some(id)
            }
            _ => None,
        }
    } else {
        None
    };
    let got = r.sys.close(fd);
    r.expect_ok("close", got);
    if let Some(id) = fileid {
        let got = r.sys.kldunload(id);
        r.expect_ok("kldunload-after-close", got);
        let got = r.sys.open(dev, O_RDWR);
        r.expect_errno("open-after-unload", got, ENOENT);
    }
    summary(r)
}

/// The last line: the counts.
pub fn summary<S: System>(r: Report<'_, S>) -> (u32, u32) {
    let (passed, failed) = (r.passed, r.failed);
    let mut line = Line::default();
    let _ = writeln!(line, "kqemu-run: {passed} passed, {failed} failed");
    r.sys.print(line.as_bytes());
    (passed, failed)
}

/// The buffers INIT names, allocated as QEMU 0.11 does.
pub struct Buffers {
    pub ram: u64,
    pub dirty: u64,
    pub lists: u64,
}

impl Buffers {
    /// INIT for these buffers: RAM_SIZE of RAM, the three lists in order.
    pub fn init(&self) -> KqemuInit {
        KqemuInit {
            ram_base: self.ram,
            ram_size: RAM_SIZE,
            ram_dirty: self.dirty,
            pages_to_flush: self.lists,
            ram_pages_to_update: self.lists + PAGE,
            modified_ram_pages: self.lists + 2 * PAGE,
        }
    }
}

pub fn allocate<S: System>(r: &mut Report<'_, S>) -> Option<Buffers> {
    let ram = r.sys.mmap_shared_anon(RAM_SIZE);
    let dirty = r.sys.mmap_shared_anon(RAM_SIZE / PAGE);
    let lists = r.sys.mmap_shared_anon(3 * PAGE);
    match (ram, dirty, lists) {
        (Ok(ram), Ok(dirty), Ok(lists)) => {
            r.result(
                true,
                "mmap-guest-ram",
                format_args!("ram {ram:#x} dirty {dirty:#x} lists {lists:#x}"),
            );
            Some(Buffers { ram, dirty, lists })
        }
        other => {
            r.result(false, "mmap-guest-ram", format_args!("{other:?}"));
            None
        }
    }
}

/// A state a client could pass to EXEC: protected mode, interrupts on,
/// CPL 3, normal mode; everything else zero.
fn minimal_state() -> KqemuCpuState {
    KqemuCpuState {
        cr0: CR0_PE,
        eflags: EFLAGS_IF_FIXED,
        cpl: 3,
        user_only: 1,
        ..KqemuCpuState::default()
    }
}

fn device_checks<S: System>(r: &mut Report<'_, S>, fd: i32) {
    let mut version: i32 = 0;
    match ioctl_with(r.sys, fd, KQEMU_GET_VERSION, &mut version) {
        Ok(0) if version as u32 == KQEMU_VERSION => {
            r.result(true, "get-version", format_args!("{version:#08x}"))
        }
        other => r.result(
            false,
            "get-version",
            format_args!("{other:?}, version {version:#x}, want {KQEMU_VERSION:#08x}"),
        ),
    }
    let mut state = minimal_state();
    let got = ioctl_with(r.sys, fd, KQEMU_EXEC, &mut state);
    r.expect_errno("exec-before-init", got, EIO);
    let mut phys = KqemuPhysMem::default();
    let got = ioctl_with(r.sys, fd, KQEMU_SET_PHYS_MEM, &mut phys);
    r.expect_errno("set-phys-mem-before-init", got, EIO);
    let mut count: i32 = 0;
    let got = ioctl_with(r.sys, fd, KQEMU_MODIFY_RAM_PAGES, &mut count);
    r.expect_errno("modify-ram-pages-before-init", got, EIO);

    let Some(b) = allocate(r) else { return };
    let valid = b.init();
    let top = USER_ADDRESS_LIMIT;
    let invalid: [(&str, KqemuInit, i32); 14] = [
        (
            "init-ram-base-misaligned",
            KqemuInit {
                ram_base: b.ram + 8,
                ..valid
            },
            EINVAL,
        ),
        (
            "init-ram-size-zero",
            KqemuInit {
                ram_size: 0,
                ..valid
            },
            EINVAL,
        ),
        (
            "init-ram-size-unaligned",
            KqemuInit {
                ram_size: RAM_SIZE + 1,
                ..valid
            },
            EINVAL,
        ),
        (
            "init-ram-size-too-big",
            KqemuInit {
                ram_size: KQEMU_MAX_RAM_SIZE + PAGE,
                ..valid
            },
            EINVAL,
        ),
        (
            "init-ram-dirty-misaligned",
            KqemuInit {
                ram_dirty: b.dirty + 1,
                ..valid
            },
            EINVAL,
        ),
        (
            "init-pages-to-flush-misaligned",
            KqemuInit {
                pages_to_flush: b.lists + 8,
                ..valid
            },
            EINVAL,
        ),
        (
            "init-ram-pages-to-update-misaligned",
            KqemuInit {
                ram_pages_to_update: b.lists + PAGE + 8,
                ..valid
            },
            EINVAL,
        ),
        (
            "init-modified-ram-pages-misaligned",
            KqemuInit {
                modified_ram_pages: b.lists + 2 * PAGE + 8,
                ..valid
            },
            EINVAL,
        ),
        (
            "init-ram-in-kernel-half",
            KqemuInit {
                ram_base: top,
                ..valid
            },
            EINVAL,
        ),
        (
            "init-ram-crosses-user-top",
            KqemuInit {
                ram_base: top - PAGE,
                ..valid
            },
            EINVAL,
        ),
        (
            "init-ram-overflows",
            KqemuInit {
                ram_base: 0u64.wrapping_sub(PAGE),
                ..valid
            },
            EINVAL,
        ),
        (
            "init-dirty-in-kernel-half",
            KqemuInit {
                ram_dirty: top,
                ..valid
            },
            EINVAL,
        ),
        (
            "init-ram-unmapped",
            KqemuInit {
                ram_base: UNMAPPED,
                ..valid
            },
            EFAULT,
        ),
        (
            "init-dirty-unmapped",
            KqemuInit {
                ram_dirty: UNMAPPED,
                ..valid
            },
            EFAULT,
        ),
    ];
    for (name, mut arg, want) in invalid {
        let got = ioctl_with(r.sys, fd, KQEMU_INIT, &mut arg);
        r.expect_errno(name, got, want);
    }
    let mut arg = valid;
    let got = ioctl_with(r.sys, fd, KQEMU_INIT, &mut arg);
    if !r.expect_ok("init-valid", got) {
        return;
    }
    let mut arg = valid;
    let got = ioctl_with(r.sys, fd, KQEMU_INIT, &mut arg);
    r.expect_errno("init-second", got, EIO);

    let ram = KqemuPhysMem {
        phys_addr: 0,
        size: RAM_SIZE,
        ram_addr: 0,
        io_index: KQEMU_IO_MEM_RAM,
        padding1: 0,
    };
    let bad_phys: [(&str, KqemuPhysMem); 8] = [
        (
            "set-phys-mem-addr-misaligned",
            KqemuPhysMem {
                phys_addr: 0x800,
                ..ram
            },
        ),
        ("set-phys-mem-size-zero", KqemuPhysMem { size: 0, ..ram }),
        (
            "set-phys-mem-size-unaligned",
            KqemuPhysMem {
                size: PAGE + 1,
                ..ram
            },
        ),
        (
            "set-phys-mem-ram-addr-misaligned",
            KqemuPhysMem { ram_addr: 8, ..ram },
        ),
        (
            "set-phys-mem-overflows",
            KqemuPhysMem {
                phys_addr: 0u64.wrapping_sub(PAGE),
                size: 2 * PAGE,
                ..ram
            },
        ),
        (
            "set-phys-mem-above-2^52",
            KqemuPhysMem {
                phys_addr: GUEST_PHYS_LIMIT,
                size: PAGE,
                ..ram
            },
        ),
        (
            "set-phys-mem-past-ram",
            KqemuPhysMem {
                ram_addr: RAM_SIZE - PAGE,
                size: 2 * PAGE,
                ..ram
            },
        ),
        (
            "set-phys-mem-bad-io-index",
            KqemuPhysMem {
                io_index: BAD_IO_INDEX,
                ..ram
            },
        ),
    ];
    for (name, mut arg) in bad_phys {
        let got = ioctl_with(r.sys, fd, KQEMU_SET_PHYS_MEM, &mut arg);
        r.expect_errno(name, got, EINVAL);
    }
    let mut arg = ram;
    let got = ioctl_with(r.sys, fd, KQEMU_SET_PHYS_MEM, &mut arg);
    r.expect_ok("set-phys-mem-ram", got);

    let mut count = TOO_MANY_MODIFIED;
    let got = ioctl_with(r.sys, fd, KQEMU_MODIFY_RAM_PAGES, &mut count);
    r.expect_errno("modify-ram-pages-too-many", got, EINVAL);
    let mut count = 0;
    let got = ioctl_with(r.sys, fd, KQEMU_MODIFY_RAM_PAGES, &mut count);
    r.expect_ok("modify-ram-pages-zero", got);

    let unknown = [
        (
            "ioctl-unknown-number",
            ioc(IOC_INOUT, KQEMU_IOC_GROUP, 99, 4),
        ),
        ("ioctl-unknown-group", ior::<i32>(b'x', 3)),
    ];
    for (name, cmd) in unknown {
        let mut word: u32 = 0;
        let got = ioctl_with(r.sys, fd, cmd, &mut word);
        r.expect_errno(name, got, ENOTTY);
    }

    let mut state = minimal_state();
    match ioctl_with(r.sys, fd, KQEMU_EXEC, &mut state) {
        Ok(0) => r.result(true, "exec", format_args!("0, retval {:#x}", state.retval)),
        other => r.result(
            false,
            "exec",
            format_args!("{other:?}, want 0 and a retval"),
        ),
    }
}

/// `BENCH exec-ioctl: <cycles> cycles per call (<n> calls, retval <r>)`.
fn bench_exec<S: System>(r: &mut Report<'_, S>, fd: i32, calls: u32) {
    let mut state = KqemuCpuState::default();
    let start = r.sys.cycles();
    let mut failures = 0u32;
    for _ in 0..calls {
        state = KqemuCpuState {
            cr0: CR0_PE,
            eflags: EFLAGS_IF_FIXED,
            cpl: 3,
            user_only: 1,
            ..KqemuCpuState::default()
        };
        if ioctl_with(r.sys, fd, KQEMU_EXEC, &mut state) != Ok(0) {
            failures += 1;
        }
    }
    let per_call = r.sys.cycles().wrapping_sub(start) / u64::from(calls);
    let mut line = Line::default();
    let _ = writeln!(
        line,
        "BENCH exec-ioctl: {per_call} cycles per call ({calls} calls, retval {:#x}, {failures} failed)",
        state.retval
    );
    r.sys.print(line.as_bytes());
}

#[cfg(test)]
mod tests;
