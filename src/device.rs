//! `/dev/kqemu` without the OS: the state of one open file and the one
//! ioctl dispatch table.
//!
//! The kld's `d_ioctl` hands every command here with the argument the
//! kernel already copied in; the kernel copies it back out only when the
//! call succeeds (FreeBSD's `kern_ioctl`), which is why EXEC reports its
//! outcome in `retval` and returns success.
//!
//! Concurrency (several threads may call ioctls on one open file at once;
//! the device runs without Giant):
//! - `phase` moves UNINIT -> INITIALIZING -> READY once; only the thread
//!   that won the INITIALIZING transition writes `instance`, and publishes
//!   it with the Release store of READY.
//! - Every call that uses the instance first sees READY (Acquire), then
//!   takes `busy`. A second caller gets EBUSY at once instead of waiting:
//!   nothing ever spins or sleeps on `busy`.

use core::cell::UnsafeCell;
use core::mem::MaybeUninit;
use core::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use crate::abi::{
    ioc_len, KqemuCpuState, KqemuInit, KqemuPhysMem, Pod, KQEMU_EXEC, KQEMU_GET_VERSION,
    KQEMU_INIT, KQEMU_MODIFY_RAM_PAGES, KQEMU_SET_PHYS_MEM, KQEMU_VERSION,
};
use crate::error::{Error, Result};
use crate::host::Host;
use crate::monitor::instance::Instance;

const UNINIT: u8 = 0;
const INITIALIZING: u8 = 1;
const READY: u8 = 2;

/// The per-open state of `/dev/kqemu` (FreeBSD keeps it as cdevpriv).
pub struct OpenFile<H: Host> {
    host: H,
    phase: AtomicU8,
    busy: AtomicBool,
    /// Initialized exactly when `phase` is READY.
    instance: UnsafeCell<MaybeUninit<Instance<H>>>,
}

// SAFETY: `instance` is written only by the single thread that moved
// `phase` to INITIALIZING, before the Release store of READY; afterwards it
// is used only under `busy`, which admits one thread at a time (see the
// module comment). The instance itself is Send.
unsafe impl<H: Host> Sync for OpenFile<H> {}
// SAFETY: moving the open file moves the instance, which is Send.
unsafe impl<H: Host> Send for OpenFile<H> {}

/// One entry of the dispatch table.
struct Command<H: Host> {
    cmd: u32,
    run: fn(&OpenFile<H>, &mut [u8]) -> Result<()>,
}

/// Decodes the argument as a `T`, runs `f` on it, and encodes it back (the
/// kernel copies it out only for commands that carry IOC_OUT).
fn with_arg<T: Pod>(data: &mut [u8], f: impl FnOnce(&mut T) -> Result<()>) -> Result<()> {
    // In place when the buffer is aligned (FreeBSD's ioctl buffers are):
    // the EXEC state is 584 bytes, and each copy is paid on every exit. A
    // failed call may leave the buffer changed; the kernel copies it out
    // only on success.
    if let Some(arg) = T::from_bytes_mut(data) {
        return f(arg);
    }
    let mut arg = T::read_from(data).ok_or(Error::InvalidArgument)?;
    f(&mut arg)?;
    arg.write_to(data).ok_or(Error::InvalidArgument)
}

/// Clears `busy` when the call that took it ends, on every path.
struct BusyGuard<'a>(&'a AtomicBool);

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl<H: Host> OpenFile<H> {
    /// The dispatch table: every command of ABI.md, with its handler. The
    /// argument length is part of each number (`ioc_len`).
    const COMMANDS: [Command<H>; 5] = [
        Command {
            cmd: KQEMU_GET_VERSION,
            run: |f, d| with_arg(d, |v: &mut i32| f.get_version(v)),
        },
        Command {
            cmd: KQEMU_INIT,
            run: |f, d| with_arg(d, |i: &mut KqemuInit| f.init(i)),
        },
        Command {
            cmd: KQEMU_SET_PHYS_MEM,
            run: |f, d| with_arg(d, |m: &mut KqemuPhysMem| f.set_phys_mem(m)),
        },
        Command {
            cmd: KQEMU_EXEC,
            run: |f, d| with_arg(d, |s: &mut KqemuCpuState| f.exec(s)),
        },
        Command {
            cmd: KQEMU_MODIFY_RAM_PAGES,
            run: |f, d| with_arg(d, |n: &mut i32| f.modify_ram_pages(*n)),
        },
    ];

    /// A freshly opened file: no instance until INIT.
    pub fn new(host: H) -> Self {
        Self {
            host,
            phase: AtomicU8::new(UNINIT),
            busy: AtomicBool::new(false),
            instance: UnsafeCell::new(MaybeUninit::uninit()),
        }
    }

    /// Runs ioctl `cmd` on `data`, the argument as the kernel copied it in
    /// (`IOCPARM_LEN(cmd)` bytes). Unknown commands: ENOTTY; an argument of
    /// another length than the command carries: EINVAL.
    pub fn ioctl(&self, cmd: u64, data: &mut [u8]) -> Result<()> {
        let command = Self::COMMANDS
            .iter()
            .find(|c| u64::from(c.cmd) == cmd)
            .ok_or(Error::NotTty)?;
        if data.len() != ioc_len(command.cmd) {
            return Err(Error::InvalidArgument);
        }
        (command.run)(self, data)
    }

    /// Whether INIT has built the instance.
    pub fn is_initialized(&self) -> bool {
        self.phase.load(Ordering::Acquire) == READY
    }

    fn get_version(&self, version: &mut i32) -> Result<()> {
        // 0x010400 fits an i32: the ABI's `int`.
        *version = KQEMU_VERSION as i32;
        Ok(())
    }

    fn init(&self, init: &KqemuInit) -> Result<()> {
        self.phase
            .compare_exchange(UNINIT, INITIALIZING, Ordering::Acquire, Ordering::Acquire)
            .map_err(|_| Error::Io)?;
        match Instance::new(&self.host, init) {
            Ok(instance) => {
                // SAFETY: this thread won UNINIT -> INITIALIZING, so it is
                // the only one touching `instance` until READY is published.
                unsafe { (*self.instance.get()).write(instance) };
                self.phase.store(READY, Ordering::Release);
                Ok(())
            }
            Err(e) => {
                // A failed INIT leaves the file as it was: the client may
                // try again (kqemu's drivers behaved the same).
                self.phase.store(UNINIT, Ordering::Release);
                Err(e)
            }
        }
    }

    /// Runs `f` on the instance: EIO before INIT, EBUSY while another
    /// thread is inside.
    fn with_instance<R>(&self, f: impl FnOnce(&mut Instance<H>) -> Result<R>) -> Result<R> {
        if !self.is_initialized() {
            return Err(Error::Io);
        }
        if self.busy.swap(true, Ordering::Acquire) {
            return Err(Error::Busy);
        }
        let _guard = BusyGuard(&self.busy);
        // SAFETY: READY was seen with Acquire, so the instance is
        // initialized and visible; holding `busy` makes this the only
        // reference to it until the guard drops.
        let instance = unsafe { (*self.instance.get()).assume_init_mut() };
        f(instance)
    }

    fn set_phys_mem(&self, mem: &KqemuPhysMem) -> Result<()> {
        self.with_instance(|i| i.set_phys_mem(mem))
    }

    fn exec(&self, state: &mut KqemuCpuState) -> Result<()> {
        self.with_instance(|i| i.exec(state))
    }

    fn modify_ram_pages(&self, count: i32) -> Result<()> {
        self.with_instance(|i| i.modify_ram_pages(count))
    }
}

impl<H: Host> Drop for OpenFile<H> {
    fn drop(&mut self) {
        if *self.phase.get_mut() == READY {
            // SAFETY: READY means the instance was written; `&mut self`
            // means no ioctl is running; it is dropped once, here.
            unsafe { self.instance.get_mut().assume_init_drop() };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::{ioc, IOC_INOUT, KQEMU_IO_MEM_RAM, KQEMU_RET_ABORT};
    use crate::host::mock::MockHost;
    use std::sync::Arc;
    use std::vec::Vec;

    const INIT_ARG: KqemuInit = KqemuInit {
        ram_base: 0x10_0000,
        ram_size: 0x10_0000,
        ram_dirty: 0x40_0000,
        pages_to_flush: 0x50_0000,
        ram_pages_to_update: 0x50_1000,
        modified_ram_pages: 0x50_2000,
    };

    fn host() -> MockHost {
        let host = MockHost::default();
        host.map(0x10_0000, 0x10_0000, true);
        host.map(0x40_0000, 0x1000, true);
        host.map(0x50_0000, 0x3000, true);
        host
    }

    fn bytes<T: Pod>(v: &T) -> Vec<u8> {
        let mut b = std::vec![0; core::mem::size_of::<T>()];
        v.write_to(&mut b).expect("exact size");
        b
    }

    fn call<T: Pod>(file: &OpenFile<MockHost>, cmd: u32, arg: &mut T) -> Result<()> {
        let mut b = bytes(arg);
        let r = file.ioctl(u64::from(cmd), &mut b);
        *arg = T::read_from(&b).expect("exact size");
        r
    }

    fn initialized(host: &MockHost) -> OpenFile<MockHost> {
        let file = OpenFile::new(host.clone());
        call(&file, KQEMU_INIT, &mut INIT_ARG.clone()).expect("INIT");
        file
    }

    #[test]
    fn get_version_answers_0x010400_in_any_state() {
        let host = host();
        let file = OpenFile::new(host.clone());
        let mut v = 0i32;
        call(&file, KQEMU_GET_VERSION, &mut v).expect("GET_VERSION");
        assert_eq!(v, 0x010400);
        let file = initialized(&host);
        let mut v = -5i32;
        call(&file, KQEMU_GET_VERSION, &mut v).expect("GET_VERSION");
        assert_eq!(v, 0x010400);
    }

    #[test]
    fn init_once_then_eio() {
        let host = host();
        let file = OpenFile::new(host.clone());
        assert!(!file.is_initialized());
        call(&file, KQEMU_INIT, &mut INIT_ARG.clone()).expect("first INIT");
        assert!(file.is_initialized());
        assert_eq!(
            call(&file, KQEMU_INIT, &mut INIT_ARG.clone()),
            Err(Error::Io)
        );
        assert_eq!(host.state().held_pages.len(), 3);
    }

    #[test]
    fn failed_init_can_be_retried() {
        let host = host();
        let file = OpenFile::new(host.clone());
        let mut bad = KqemuInit {
            ram_size: 0,
            ..INIT_ARG
        };
        assert_eq!(
            call(&file, KQEMU_INIT, &mut bad),
            Err(Error::InvalidArgument)
        );
        let mut unmapped = KqemuInit {
            ram_dirty: 0x7000_0000,
            ..INIT_ARG
        };
        assert_eq!(call(&file, KQEMU_INIT, &mut unmapped), Err(Error::Fault));
        assert!(!file.is_initialized());
        call(&file, KQEMU_INIT, &mut INIT_ARG.clone()).expect("INIT after failures");
    }

    #[test]
    fn calls_before_init_are_eio() {
        let file = OpenFile::new(host());
        let mut mem = KqemuPhysMem {
            size: 0x1000,
            ..Default::default()
        };
        assert_eq!(call(&file, KQEMU_SET_PHYS_MEM, &mut mem), Err(Error::Io));
        let mut state = KqemuCpuState::default();
        assert_eq!(call(&file, KQEMU_EXEC, &mut state), Err(Error::Io));
        assert_eq!(
            call(&file, KQEMU_MODIFY_RAM_PAGES, &mut 1i32),
            Err(Error::Io)
        );
    }

    #[test]
    fn set_phys_mem_reaches_the_instance_and_reports_errors() {
        let file = initialized(&host());
        let mut ram = KqemuPhysMem {
            phys_addr: 0,
            size: 0x10_0000,
            ram_addr: 0,
            io_index: KQEMU_IO_MEM_RAM,
            padding1: 0,
        };
        call(&file, KQEMU_SET_PHYS_MEM, &mut ram).expect("RAM");
        let mut beyond = KqemuPhysMem {
            size: 0x10_1000,
            ..ram
        };
        assert_eq!(
            call(&file, KQEMU_SET_PHYS_MEM, &mut beyond),
            Err(Error::InvalidArgument)
        );
        let mut unknown = KqemuPhysMem { io_index: 9, ..ram };
        assert_eq!(
            call(&file, KQEMU_SET_PHYS_MEM, &mut unknown),
            Err(Error::InvalidArgument)
        );
        let ranges = file
            .with_instance(|i| Ok(i.phys_map().ranges().len()))
            .expect("instance");
        assert_eq!(ranges, 1);
    }

    #[test]
    fn exec_after_init_returns_zero_with_abort_in_retval() {
        let file = initialized(&host());
        let mut state = KqemuCpuState {
            eip: 0x8000,
            retval: 0x201,
            ..Default::default()
        };
        call(&file, KQEMU_EXEC, &mut state).expect("EXEC succeeds");
        assert_eq!(state.retval, KQEMU_RET_ABORT);
        assert_eq!(state.eip, 0x8000);
    }

    #[test]
    fn exec_answers_the_same_in_place_and_through_a_copy() {
        let file = initialized(&host());
        let state = KqemuCpuState {
            eip: 0x8000,
            retval: 0x201,
            ..Default::default()
        };
        // Aligned: the handler works in the buffer itself; one byte off,
        // on a copy that is written back.
        let mut words = [0u64; 74];
        // SAFETY: 74 u64 are 592 initialized bytes, borrowed uniquely for
        // the slice's life.
        let buffer =
            unsafe { core::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), 592) };
        let mut answers = Vec::new();
        for start in [0, 1] {
            let arg = &mut buffer[start..start + 584];
            state.write_to(arg).expect("584 bytes");
            assert_eq!(
                KqemuCpuState::from_bytes_mut(arg).is_some(),
                start == 0,
                "alignment at {start}"
            );
            file.ioctl(u64::from(KQEMU_EXEC), arg).expect("EXEC");
            answers.push(arg.to_vec());
        }
        assert_eq!(answers[0], answers[1]);
        let out = KqemuCpuState::read_from(&answers[0]).expect("584 bytes");
        assert_eq!((out.retval, out.eip), (KQEMU_RET_ABORT, 0x8000));
    }

    #[test]
    fn modify_ram_pages_checks_the_count() {
        let file = initialized(&host());
        assert_eq!(call(&file, KQEMU_MODIFY_RAM_PAGES, &mut 512i32), Ok(()));
        assert_eq!(
            call(&file, KQEMU_MODIFY_RAM_PAGES, &mut 513i32),
            Err(Error::InvalidArgument)
        );
        assert_eq!(
            call(&file, KQEMU_MODIFY_RAM_PAGES, &mut -1i32),
            Err(Error::InvalidArgument)
        );
    }

    #[test]
    fn a_second_caller_gets_ebusy_and_the_flag_is_released() {
        let file = initialized(&host());
        let nested = file.with_instance(|_| {
            let mut state = KqemuCpuState::default();
            let exec = call(&file, KQEMU_EXEC, &mut state);
            let mut mem = KqemuPhysMem {
                size: 0x1000,
                ..Default::default()
            };
            let set = call(&file, KQEMU_SET_PHYS_MEM, &mut mem);
            let modify = call(&file, KQEMU_MODIFY_RAM_PAGES, &mut 0i32);
            let init = call(&file, KQEMU_INIT, &mut INIT_ARG.clone());
            Ok([exec, set, modify, init])
        });
        assert_eq!(
            nested,
            Ok([
                Err(Error::Busy),
                Err(Error::Busy),
                Err(Error::Busy),
                Err(Error::Io)
            ])
        );
        // The flag is released after success and after failure alike.
        let mut state = KqemuCpuState::default();
        assert_eq!(call(&file, KQEMU_EXEC, &mut state), Ok(()));
        assert_eq!(
            call(&file, KQEMU_MODIFY_RAM_PAGES, &mut 600i32),
            Err(Error::InvalidArgument)
        );
        assert_eq!(call(&file, KQEMU_EXEC, &mut state), Ok(()));
    }

    #[test]
    fn threads_racing_on_one_file_get_defined_answers() {
        let host = host();
        let file = Arc::new(OpenFile::new(host.clone()));
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let file = Arc::clone(&file);
                std::thread::spawn(move || {
                    let init = call(&file, KQEMU_INIT, &mut INIT_ARG.clone());
                    let mut results = Vec::new();
                    for _ in 0..200 {
                        let mut state = KqemuCpuState::default();
                        let r = call(&file, KQEMU_EXEC, &mut state);
                        assert!(
                            matches!(r, Ok(()) | Err(Error::Busy) | Err(Error::Io)),
                            "{r:?}"
                        );
                        if r.is_ok() {
                            assert_eq!(state.retval, KQEMU_RET_ABORT);
                        }
                        results.push(r);
                    }
                    init
                })
            })
            .collect();
        let inits: Vec<_> = workers
            .into_iter()
            .map(|w| w.join().expect("worker"))
            .collect();
        assert_eq!(inits.iter().filter(|r| r.is_ok()).count(), 1, "{inits:?}");
        assert!(inits.iter().all(|r| matches!(r, Ok(()) | Err(Error::Io))));
        assert_eq!(host.state().held_pages.len(), 3);
        drop(file);
        assert!(host.state().held_pages.is_empty());
        assert_eq!(host.state().live_allocs, 0);
    }

    #[test]
    fn unknown_commands_are_enotty() {
        let file = initialized(&host());
        let mut data = [0u8; 584];
        for cmd in [
            0,
            u64::from(ioc(IOC_INOUT, b'q', 6, 584)),
            // INIT's number with another length, and as _IOWR.
            u64::from(KQEMU_INIT & !(0x1fff << 16) | (40 << 16)),
            u64::from(KQEMU_INIT | IOC_INOUT),
            // The Linux encoding of GET_VERSION (direction bits swapped).
            0x8004_7103,
            u64::from(KQEMU_EXEC) | 1 << 32,
        ] {
            assert_eq!(file.ioctl(cmd, &mut data), Err(Error::NotTty), "{cmd:#x}");
        }
    }

    #[test]
    fn arguments_of_the_wrong_length_are_einval() {
        let file = OpenFile::new(host());
        for (cmd, len) in [
            (KQEMU_INIT, 47),
            (KQEMU_INIT, 49),
            (KQEMU_EXEC, 0),
            (KQEMU_GET_VERSION, 8),
            (KQEMU_SET_PHYS_MEM, 24),
        ] {
            let mut data = std::vec![0u8; len];
            assert_eq!(
                file.ioctl(u64::from(cmd), &mut data),
                Err(Error::InvalidArgument),
                "{cmd:#x}/{len}"
            );
        }
        assert!(!file.is_initialized());
    }

    #[test]
    fn closing_gives_everything_back() {
        let host = host();
        let file = initialized(&host);
        let mut ram = KqemuPhysMem {
            size: 0x1000,
            ..Default::default()
        };
        call(&file, KQEMU_SET_PHYS_MEM, &mut ram).expect("RAM");
        assert!(host.state().live_allocs > 0);
        drop(file);
        assert_eq!(host.state().live_allocs, 0);
        assert!(host.state().held_pages.is_empty());
        // A file closed before INIT holds nothing either.
        drop(OpenFile::new(host.clone()));
        assert_eq!(host.state().live_allocs, 0);
    }
}
