//! The kld: what the C shim (sys/kqemu_kmod.c) calls. Module load and
//! unload, the `/dev/kqemu` entry points, the errno mapping, the panic
//! handler. Everything else is OS-independent (crate::device).

mod host;

use core::ffi::{c_int, c_ulong, c_void};
use core::panic::PanicInfo;
use core::ptr::{self, NonNull};
use core::sync::atomic::{AtomicPtr, AtomicU32, Ordering};

use freebsd_kernel_sys as sys;

use crate::abi::{IOCPARM_MASK, KQEMU_INIT, KQEMU_VERSION};
use crate::device::OpenFile;
use crate::error::{Error, Result};
use crate::host::{Host, HostBox, LockBudget, LOCK_BUDGET_HELD_OFFSET};
use host::FreeBsdHost;

/// `hw.kqemu.version`, read by the shim's sysctl: the ABI version.
#[no_mangle]
#[allow(non_upper_case_globals)] // the C shim's name
static kqemu_abi_version: c_int = KQEMU_VERSION as c_int;

/// `hw.kqemu.instances`: open files of `/dev/kqemu` (each holds per-open
/// state until its cdevpriv destructor runs). Unload refuses while it is
/// not zero.
#[no_mangle]
#[allow(non_upper_case_globals)] // the C shim's name
static kqemu_instances: AtomicU32 = AtomicU32::new(0);

/// The module-wide books of held guest pages (all instances); the shim's
/// `hw.kqemu.locked_pages` reads `held`, its first `u_int`.
#[no_mangle]
#[allow(non_upper_case_globals)] // the C shim's name
static kqemu_lock_budget: LockBudget = LockBudget::new();
const _: () = assert!(LOCK_BUDGET_HELD_OFFSET == 0);

/// `/dev/kqemu`, between load and unload.
static DEVICE: AtomicPtr<sys::cdev> = AtomicPtr::new(ptr::null_mut());

/// Default mode of `/dev/kqemu` when the `hw.kqemu.mode` tunable is
/// unusable (the contract's 0660, root:wheel).
const DEFAULT_MODE: c_int = 0o660;

// The entry points must have the types the shim's cdevsw and module
// declaration give them; these fail to compile otherwise.
const _: sys::d_open_t = Some(kqemu_open);
const _: sys::d_ioctl_t = Some(kqemu_ioctl);
const _: sys::d_priv_dtor_t = Some(kqemu_cdevpriv_dtor);
const _: sys::modeventhand_t = Some(kqemu_modevent);

/// The FreeBSD errno of each error (sys/errno.h).
fn errno(e: Error) -> c_int {
    match e {
        Error::Io => sys::EIO,
        Error::InvalidArgument => sys::EINVAL,
        Error::Fault => sys::EFAULT,
        Error::NoMemory => sys::ENOMEM,
        Error::NoSpace => sys::ENOSPC,
        Error::Busy => sys::EBUSY,
        Error::NotTty => sys::ENOTTY,
        Error::Permission => sys::EPERM,
    }
}

/// The cdevpriv of an open file: the device state, and the address space
/// its instance belongs to.
struct FileState {
    file: OpenFile<FreeBsdHost>,
    /// Dropped after `file` (field order), when the instance no longer
    /// compares anything with it.
    owner: OwnerVmspace,
}

/// The vmspace of the process whose INIT made the instance, with a
/// reference on it (`vm_refcnt`, taken by vmspace_acquire_ref(9)) from
/// that INIT until the cdevpriv destructor. The instance answers EPERM to
/// any caller whose `p_vmspace` is another pointer (Host::user_space);
/// the reference keeps this one from being freed and its address handed
/// to another process's vmspace (UMA reuses freed items) while the
/// descriptor lives on in a child or in a process it was passed to after
/// the INIT process exited or exec'd. Null before INIT.
struct OwnerVmspace(AtomicPtr<sys::vmspace>);

impl Drop for OwnerVmspace {
    fn drop(&mut self) {
        if let Some(vm) = NonNull::new(*self.0.get_mut()) {
            // SAFETY: the one reference FileState::ioctl kept; vmspace_free(9) may
            // sleep (it frees the vmspace at its last reference), which
            // the destructor's thread context allows.
            unsafe { sys::vmspace_free(vm.as_ptr()) };
        }
    }
}

impl FileState {
    /// Runs one ioctl. INIT references the caller's vmspace first, and
    /// keeps the reference only if INIT built the instance: a failed INIT
    /// (which the client may retry) and a losing concurrent one give it
    /// back at once.
    fn ioctl(&self, cmd: c_ulong, arg: &mut [u8]) -> Result<()> {
        if cmd != c_ulong::from(KQEMU_INIT) {
            return self.file.ioctl(cmd, arg);
        }
        // SAFETY: curthread and its process are valid in thread context;
        // vmspace_acquire_ref(9) takes the process's vmspace lock itself.
        let vm = unsafe { sys::vmspace_acquire_ref((*sys::kqemu_curthread()).td_proc) };
        // NULL only while the process tears its vmspace down (exit):
        // there is no memory left to run a guest in.
        let vm = NonNull::new(vm).ok_or(Error::Fault)?;
        let result = self.file.ioctl(cmd, arg);
        // A successful INIT is the file's only one (OpenFile answers EIO
        // to any later INIT), so when it succeeds the owner slot is still
        // empty and the exchange below keeps the reference: the instance
        // never runs without it.
        let kept = result.is_ok()
            && self
                .owner
                .0
                .compare_exchange(
                    ptr::null_mut(),
                    vm.as_ptr(),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok();
        if !kept {
            // SAFETY: the reference taken above, given back once; thread
            // context (an ioctl) may sleep.
            unsafe { sys::vmspace_free(vm.as_ptr()) };
        }
        result
    }
}

/// Module event handler (DEV_MODULE in the shim).
#[no_mangle]
pub extern "C" fn kqemu_modevent(_module: sys::module_t, event: c_int, _arg: *mut c_void) -> c_int {
    match u32::try_from(event) {
        Ok(sys::MOD_LOAD) => load(),
        // Quiesce asks "may I unload?"; unload itself asks again because
        // `kldunload -f` skips the question. destroy_dev would wait for
        // threads inside the driver and then tear down open files under
        // their users: refuse while any is open, as bhyve's vmm does.
        Ok(sys::MOD_QUIESCE) if kqemu_instances.load(Ordering::Acquire) != 0 => sys::EBUSY,
        Ok(sys::MOD_QUIESCE) => 0,
        Ok(sys::MOD_UNLOAD) if kqemu_instances.load(Ordering::Acquire) != 0 => sys::EBUSY,
        Ok(sys::MOD_UNLOAD) => {
            unload();
            0
        }
        Ok(sys::MOD_SHUTDOWN) => 0,
        _ => sys::EOPNOTSUPP,
    }
}

/// The device's group and mode from the loader tunables, or the defaults
/// (with a log line) when a tunable is out of range.
fn device_owner() -> (sys::gid_t, c_int) {
    // SAFETY: plain ints of the shim, written only by the sysctl framework
    // when it loads the tunables, before the module event runs.
    let (gid, mode) = unsafe { (sys::kqemu_tunable_gid, sys::kqemu_tunable_mode) };
    let gid = sys::gid_t::try_from(gid).unwrap_or_else(|_| {
        FreeBsdHost.log(format_args!(
            "hw.kqemu.gid={gid} is not a group id, using 0"
        ));
        sys::GID_WHEEL as sys::gid_t
    });
    let mode = if (0..=0o777).contains(&mode) {
        mode
    } else {
        FreeBsdHost.log(format_args!(
            "hw.kqemu.mode={mode:#o} is not a permission mode, using 0660"
        ));
        DEFAULT_MODE
    };
    (gid, mode)
}

/// `hw.kqemu.max_locked_pages` when the loader did not set it: half of
/// `vm.max_user_wired` (which FreeBSD sets to a third of the free pages at
/// boot, vm_pageout_init). Held pages are not counted against that limit,
/// so user wirings and kqemu together stay near half of memory, and an
/// administrator who raised or lowered `vm.max_user_wired` is followed.
fn default_max_locked_pages() -> u32 {
    // SAFETY: a u_long of the kernel (sys/vm/vm_pageout.c), only read; a
    // racing sysctl write gives the old or the new value.
    let wired = unsafe { ptr::read_volatile(ptr::addr_of!(sys::vm_page_max_user_wired)) };
    u32::try_from(wired / 2).unwrap_or(u32::MAX)
}

/// Locked pages the instances may hold, from the sysctl.
pub(crate) fn max_locked_pages() -> usize {
    // SAFETY: a u_int of the shim, written by the sysctl framework; a
    // racing write gives the old or the new value.
    unsafe { ptr::read_volatile(ptr::addr_of!(sys::kqemu_max_locked_pages)) as usize }
}

/// The module-wide books of held pages.
pub(crate) fn lock_budget() -> &'static LockBudget {
    &kqemu_lock_budget
}

fn load() -> c_int {
    // SAFETY: module load runs before any open of /dev/kqemu, and the
    // sysctl is writable only after it is registered, which already
    // happened (the tunable was fetched then): one writer here.
    unsafe {
        if ptr::read_volatile(ptr::addr_of!(sys::kqemu_max_locked_pages)) == 0 {
            ptr::write_volatile(
                ptr::addr_of_mut!(sys::kqemu_max_locked_pages),
                default_max_locked_pages(),
            );
        }
    }
    let (gid, mode) = device_owner();
    let mut args = sys::make_dev_args::default();
    let mut dev: *mut sys::cdev = ptr::null_mut();
    // SAFETY: make_dev_args_init fills in the size and defaults of `args`;
    // kqemu_cdevsw is the shim's static switch, valid for the module's
    // lifetime; make_dev_s may sleep (MAKEDEV_WAITOK), which module load
    // allows.
    let error = unsafe {
        sys::make_dev_args_init_impl(&mut args, core::mem::size_of::<sys::make_dev_args>());
        args.mda_flags = sys::MAKEDEV_WAITOK | sys::MAKEDEV_CHECKNAME;
        args.mda_devsw = ptr::addr_of_mut!(sys::kqemu_cdevsw);
        args.mda_uid = sys::UID_ROOT as sys::uid_t;
        args.mda_gid = gid;
        args.mda_mode = mode;
        sys::kqemu_make_dev_s(&mut args, &mut dev, c"kqemu".as_ptr())
    };
    if error == 0 {
        DEVICE.store(dev, Ordering::Release);
    }
    error
}

fn unload() {
    let dev = DEVICE.swap(ptr::null_mut(), Ordering::AcqRel);
    if !dev.is_null() {
        // SAFETY: `dev` came from make_dev_s at load and is destroyed once
        // (the swap took it). destroy_dev waits for threads still inside
        // the driver and runs the cdevpriv destructors of files opened
        // since the instance count was read.
        unsafe { sys::destroy_dev(dev) };
    }
}

/// `d_open`: the client opens `O_RDWR`; without write access: EPERM. Each
/// open file gets its own state, freed by the cdevpriv destructor.
///
/// # Safety
///
/// Called by devfs as the cdevsw's d_open.
#[no_mangle]
pub unsafe extern "C" fn kqemu_open(
    _dev: *mut sys::cdev,
    oflags: c_int,
    _devtype: c_int,
    _td: *mut sys::thread,
) -> c_int {
    if oflags & sys::FWRITE == 0 {
        return errno(Error::Permission);
    }
    let state = FileState {
        file: OpenFile::new(FreeBsdHost),
        owner: OwnerVmspace(AtomicPtr::new(ptr::null_mut())),
    };
    let file = match HostBox::new(&FreeBsdHost, state) {
        Ok(file) => file.into_raw(),
        Err(e) => return errno(e),
    };
    kqemu_instances.fetch_add(1, Ordering::AcqRel);
    // SAFETY: devfs_set_cdevpriv attaches `file` to the file being opened;
    // on success the destructor owns it, on failure nothing does.
    let error = unsafe {
        sys::devfs_set_cdevpriv(file.as_ptr().cast::<c_void>(), Some(kqemu_cdevpriv_dtor))
    };
    if error != 0 {
        // SAFETY: devfs did not take `file`: take it back once and free it.
        drop(unsafe { HostBox::from_raw(FreeBsdHost, file) });
        kqemu_instances.fetch_sub(1, Ordering::AcqRel);
    }
    error
}

/// cdevpriv destructor: the last close of an open file (or destroy_dev).
///
/// # Safety
///
/// Called by devfs once per pointer given to devfs_set_cdevpriv.
#[no_mangle]
pub unsafe extern "C" fn kqemu_cdevpriv_dtor(data: *mut c_void) {
    if let Some(file) = NonNull::new(data.cast::<FileState>()) {
        // SAFETY: `data` is the pointer kqemu_open gave devfs, from
        // HostBox::into_raw; devfs runs this once and no ioctl is running
        // on the file any more. Dropping it releases the instance, then the
        // reference on INIT's vmspace.
        drop(unsafe { HostBox::from_raw(FreeBsdHost, file) });
        kqemu_instances.fetch_sub(1, Ordering::AcqRel);
    }
}

/// `d_ioctl`: every command goes through the one dispatch table of
/// crate::device with the argument the kernel copied in.
///
/// # Safety
///
/// Called by devfs as the cdevsw's d_ioctl, with `data` pointing to the
/// kernel's copy of the argument.
#[no_mangle]
pub unsafe extern "C" fn kqemu_ioctl(
    _dev: *mut sys::cdev,
    cmd: c_ulong,
    data: sys::caddr_t,
    _fflag: c_int,
    _td: *mut sys::thread,
) -> c_int {
    let mut private: *mut c_void = ptr::null_mut();
    // SAFETY: called in the context of an open file of this device.
    let error = unsafe { sys::devfs_get_cdevpriv(&mut private) };
    if error != 0 {
        return error;
    }
    // SAFETY: the cdevpriv of our files is always a FileState from
    // kqemu_open, alive until its destructor, which devfs does not run
    // while this call is inside the driver. OpenFile is Sync, the owner
    // an atomic.
    let file = unsafe { &*private.cast::<FileState>() };
    // kern_ioctl hands d_ioctl a buffer of IOCPARM_LEN(cmd) bytes (or, for
    // IOC_VOID and length 0, a pointer to an intptr_t): never more bytes
    // than this length.
    let len = ((cmd >> 16) & c_ulong::from(IOCPARM_MASK)) as usize;
    let arg: &mut [u8] = if len == 0 || data.is_null() {
        &mut []
    } else {
        // SAFETY: see above; the buffer is the kernel's own copy, private
        // to this call.
        unsafe { core::slice::from_raw_parts_mut(data.cast::<u8>(), len) }
    };
    match file.ioctl(cmd, arg) {
        Ok(()) => 0,
        Err(e) => errno(e),
    }
}

/// Rust panics are bugs of the module (user input only ever produces
/// errors), so they end in panic(9) with the place they came from.
#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    let (file, line) = info.location().map_or(("?", 0), |l| (l.file(), l.line()));
    // A file name longer than c_int::MAX cannot exist; clamp anyway.
    let file_len = c_int::try_from(file.len()).unwrap_or(c_int::MAX);
    // SAFETY: "%.*s" reads at most file_len bytes of `file`; panic(9) does
    // not return.
    unsafe {
        sys::panic(
            c"kqemu: Rust panic at %.*s:%u".as_ptr(),
            file_len,
            file.as_ptr(),
            line,
        )
    }
}
