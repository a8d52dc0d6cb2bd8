//! The checks against a model of the device contract: a correct device
//! passes every check, a wrong answer fails exactly that check.

use super::*;
use std::string::String;
use std::vec::Vec;

/// The device as notes/contract.md describes it, for one open file.
#[derive(Default)]
struct Model {
    open: bool,
    initialized: bool,
    ram_size: u64,
    next_map: u64,
    loaded: bool,
    out: Vec<u8>,
    /// Answer this errno to the INIT with a zero size instead of EINVAL.
    wrong_zero_size: Option<i32>,
    /// Let a read-only open succeed.
    opens_read_only: bool,
    clock: u64,
}

fn aligned(v: u64) -> bool {
    v.is_multiple_of(PAGE)
}

fn user_range(addr: u64, len: u64) -> bool {
    addr.checked_add(len)
        .is_some_and(|end| end <= USER_ADDRESS_LIMIT)
}

impl Model {
    fn loaded() -> Model {
        Model {
            loaded: true,
            ..Model::default()
        }
    }

    fn output(&self) -> String {
        String::from_utf8(self.out.clone()).unwrap()
    }

    fn init(&mut self, a: &KqemuInit) -> Result<i32, i32> {
        if self.initialized {
            return Err(EIO);
        }
        if a.ram_size == 0 {
            if let Some(e) = self.wrong_zero_size {
                return Err(e);
            }
        }
        let pointers = [
            a.ram_base,
            a.ram_dirty,
            a.pages_to_flush,
            a.ram_pages_to_update,
            a.modified_ram_pages,
        ];
        if pointers.iter().any(|&p| !aligned(p))
            || a.ram_size == 0
            || !aligned(a.ram_size)
            || a.ram_size > KQEMU_MAX_RAM_SIZE
            || !user_range(a.ram_base, a.ram_size)
            || !user_range(a.ram_dirty, a.ram_size / PAGE)
        {
            return Err(EINVAL);
        }
        if a.ram_base == UNMAPPED || a.ram_dirty == UNMAPPED {
            return Err(EFAULT);
        }
        self.initialized = true;
        self.ram_size = a.ram_size;
        Ok(0)
    }

    fn set_phys_mem(&mut self, m: &KqemuPhysMem) -> Result<i32, i32> {
        let end = m.phys_addr.checked_add(m.size);
        if !aligned(m.phys_addr)
            || !aligned(m.size)
            || !aligned(m.ram_addr)
            || m.size == 0
            || end.is_none_or(|e| e > GUEST_PHYS_LIMIT)
            || m.io_index > 3
            || m.ram_addr + m.size > self.ram_size
        {
            return Err(EINVAL);
        }
        Ok(0)
    }
}

impl System for Model {
    fn open(&mut self, path: &core::ffi::CStr, flags: i32) -> Result<i32, i32> {
        if !self.loaded || path != c"/dev/kqemu" {
            return Err(ENOENT);
        }
        if flags != O_RDWR && !self.opens_read_only {
            return Err(EPERM);
        }
        self.open = true;
        Ok(3)
    }

    fn close(&mut self, _fd: i32) -> Result<(), i32> {
        self.open = false;
        Ok(())
    }

    fn ioctl(&mut self, _fd: i32, cmd: u32, arg: *mut u8) -> Result<i32, i32> {
        let known = [KQEMU_EXEC, KQEMU_SET_PHYS_MEM, KQEMU_MODIFY_RAM_PAGES];
        // SAFETY: the checks pass a buffer of the command's argument type.
        unsafe {
            match cmd {
                KQEMU_GET_VERSION => {
                    *arg.cast::<i32>() = KQEMU_VERSION as i32;
                    Ok(0)
                }
                KQEMU_INIT => self.init(&*arg.cast::<KqemuInit>()),
                _ if !known.contains(&cmd) => Err(ENOTTY),
                _ if !self.initialized => Err(EIO),
                KQEMU_SET_PHYS_MEM => self.set_phys_mem(&*arg.cast::<KqemuPhysMem>()),
                KQEMU_MODIFY_RAM_PAGES if *arg.cast::<i32>() > 512 => Err(EINVAL),
                KQEMU_EXEC => {
                    (*arg.cast::<KqemuCpuState>()).retval = -1;
                    Ok(0)
                }
                _ => Ok(0),
            }
        }
    }

    fn mmap_shared_anon(&mut self, _len: u64) -> Result<u64, i32> {
        self.next_map += 0x100_0000;
        Ok(self.next_map)
    }

    fn munmap(&mut self, _addr: u64, _len: u64) -> Result<(), i32> {
        Ok(())
    }

    fn kldfind(&mut self, name: &core::ffi::CStr) -> Result<i32, i32> {
        if self.loaded && name == c"kqemu" {
            Ok(2)
        } else {
            Err(ENOENT)
        }
    }

    fn kldunload(&mut self, _fileid: i32) -> Result<(), i32> {
        if self.open {
            return Err(EBUSY);
        }
        self.loaded = false;
        Ok(())
    }

    fn print(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
    }

    fn cycles(&mut self) -> u64 {
        self.clock += 100;
        self.clock
    }
}

#[test]
fn a_device_that_keeps_the_contract_passes_every_check() {
    let mut m = Model::loaded();
    let options = Options {
        kldunload: true,
        ..Options::default()
    };
    let (passed, failed) = run_checks(&mut m, options);
    let out = m.output();
    assert_eq!(failed, 0, "{out}");
    assert_eq!(passed, 42, "{out}");
    assert!(out.ends_with("kqemu-run: 42 passed, 0 failed\n"), "{out}");
    assert!(out.contains("PASS exec: 0, retval 0xffffffff\n"), "{out}");
    assert!(
        out.contains("PASS kldunload-while-open: errno 16\n"),
        "{out}"
    );
}

#[test]
fn a_wrong_errno_fails_that_check_only() {
    let mut m = Model {
        wrong_zero_size: Some(EFAULT),
        ..Model::loaded()
    };
    let (_, failed) = run_checks(&mut m, Options::default());
    let out = m.output();
    assert_eq!(failed, 1, "{out}");
    assert!(
        out.contains("FAIL init-ram-size-zero: got Err(14), want errno 22\n"),
        "{out}"
    );
}

#[test]
fn a_read_only_open_that_succeeds_fails_and_the_run_goes_on() {
    let mut m = Model {
        opens_read_only: true,
        ..Model::loaded()
    };
    let (passed, failed) = run_checks(&mut m, Options::default());
    let out = m.output();
    assert_eq!((passed, failed), (37, 1), "{out}");
    assert!(
        out.starts_with("FAIL open-rdonly: opened (fd 3), want EPERM\n"),
        "{out}"
    );
}

#[test]
fn no_device_stops_after_the_open() {
    let mut m = Model::default();
    let (passed, failed) = run_checks(&mut m, Options::default());
    assert_eq!((passed, failed), (0, 2), "{}", m.output());
}

#[test]
fn exit_open_leaves_the_device_open() {
    let mut m = Model::loaded();
    let options = Options {
        kldunload: true,
        exit_open: true,
        bench: 0,
    };
    let (passed, failed) = run_checks(&mut m, options);
    assert_eq!((passed, failed), (37, 0), "{}", m.output());
    assert!(m.open && m.loaded);
}

#[test]
fn the_benchmark_times_exec_calls() {
    let mut m = Model::loaded();
    let options = Options {
        bench: 10,
        ..Options::default()
    };
    let (_, failed) = run_checks(&mut m, options);
    let out = m.output();
    assert_eq!(failed, 0, "{out}");
    assert!(
        out.contains(
            "BENCH exec-ioctl: 10 cycles per call (10 calls, retval 0xffffffff, 0 failed)\n"
        ),
        "{out}"
    );
}
