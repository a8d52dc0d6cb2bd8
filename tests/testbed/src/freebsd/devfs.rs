//! devfs and the character-device KPI: make_dev_s(9), destroy_dev(9),
//! devfs_set_cdevpriv(9) / devfs_get_cdevpriv(9), and the file operations
//! (open, ioctl, close) that reach a driver's cdevsw as
//! sys/fs/devfs/devfs_vnops.c and sys/kern/sys_generic.c route them.

use super::kpi::{self, peek, poke, Block, DevFile, Device, Kernel};
use super::printf::c_string;
use alloc::string::String;
use alloc::vec::Vec;
use core::ffi::{c_int, c_void};
use core::sync::atomic::{AtomicU64, Ordering};

/// The references ioctls in progress hold on each open file (fget in
/// kern_ioctl, fdrop after it), and whether its descriptor was closed
/// meanwhile: then the last close (d_close, the cdevpriv destructor)
/// waits for the last of those ioctls (devfs_fpdrop at the last fdrop).
/// (file, ioctls running, closed); a Vec keeps its room, so the EXEC path
/// does not allocate.
static IN_IOCTL: spin::Mutex<Vec<(u32, u32, bool)>> = spin::Mutex::new(Vec::new());
/// Closes that waited for an ioctl, for the end-of-run report.
static DEFERRED_CLOSES: AtomicU64 = AtomicU64::new(0);

/// curthread (`PCPU(curthread)`): the thread of the file operation.
fn curthread(k: &Kernel) -> u64 {
    // SAFETY: the personality's pcpu block.
    unsafe { peek(k.pcpu.addr + k.layout.pcpu_pc_curthread) }
}

/// Closes that waited for a running ioctl so far.
pub fn deferred_closes() -> u64 {
    DEFERRED_CLOSES.load(Ordering::Relaxed)
}

/// ENAMETOOLONG (sys/sys/errno.h).
const ENAMETOOLONG: c_int = 63;

/// make_dev_args_init_impl(9): zeroes the arguments and records their size.
pub extern "C" fn make_dev_args_init_impl(args: u64, size: usize) {
    kpi::with(|k| {
        // SAFETY: the module passes its own struct make_dev_args of `size` bytes.
        unsafe {
            core::ptr::write_bytes(args as *mut u8, 0, size);
            poke(args + k.layout.make_dev_args_mda_size, size);
        }
    })
}

/// prep_devname (kern_conf.c): the node name a driver may ask for.
/// Leading slashes are dropped and runs of slashes collapsed; spaces,
/// double quotes, a trailing slash, an empty name and `.`/`..` components
/// are EINVAL; more than SPECNAMELEN bytes is ENAMETOOLONG.
fn check_name(name: &[u8], max: usize, einval: c_int) -> Result<String, c_int> {
    if name.len() > max {
        return Err(ENAMETOOLONG);
    }
    let mut out: Vec<u8> = Vec::new();
    for (i, &b) in name.iter().enumerate() {
        if b.is_ascii_whitespace() || b == b'"' {
            return Err(einval);
        }
        let slash = b == b'/';
        if slash && (out.is_empty() || out.last() == Some(&b'/')) {
            continue;
        }
        if slash && i + 1 == name.len() {
            return Err(einval);
        }
        out.push(b);
    }
    if out.is_empty() || out.split(|&b| b == b'/').any(|c| c == b"." || c == b"..") {
        return Err(einval);
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// make_dev_s(9) (make_dev_sv in kern_conf.c): a node `name` with the
/// owner, group and mode of `args`, served by `args->mda_devsw`.
pub fn make_dev_s(args: u64, cdevp: u64, name: &[u8]) -> c_int {
    let result = kpi::with(|k| {
        let l = k.layout;
        // SAFETY: `args` is the module's struct make_dev_args, initialised
        // by make_dev_args_init_impl; fields at the header offsets.
        let (size, flags, devsw, uid, gid, mode, drv1, drv2) = unsafe {
            (
                peek::<u64>(args + l.make_dev_args_mda_size),
                peek::<c_int>(args + l.make_dev_args_mda_flags) as u64,
                peek::<u64>(args + l.make_dev_args_mda_devsw),
                peek::<u32>(args + l.make_dev_args_mda_uid),
                peek::<u32>(args + l.make_dev_args_mda_gid),
                peek::<c_int>(args + l.make_dev_args_mda_mode) as u32,
                peek::<u64>(args + l.make_dev_args_mda_si_drv1),
                peek::<u64>(args + l.make_dev_args_mda_si_drv2),
            )
        };
        if size > l.sizeof_make_dev_args {
            return Err((l.EINVAL as c_int, None));
        }
        if flags & l.MAKEDEV_WAITOK != 0 && flags & l.MAKEDEV_NOWAIT != 0 {
            crate::fail(format_args!(
                "panic: make_dev_sv: both WAITOK and NOWAIT specified"
            ));
        }
        // SAFETY: the module's struct cdevsw.
        let (version, dname) = unsafe {
            (
                peek::<c_int>(devsw + l.cdevsw_d_version) as u64,
                peek::<u64>(devsw + l.cdevsw_d_name),
            )
        };
        if version != l.D_VERSION {
            // SAFETY: d_name is the driver's name string.
            let dname = String::from_utf8_lossy(&unsafe { c_string(dname, 64) }).into_owned();
            let warning = alloc::format!(
                "WARNING: Device driver \"{dname}\" has wrong version {version:#x}\n"
            );
            return Err((l.EINVAL as c_int, Some(warning)));
        }
        let checked = check_name(name, l.SPECNAMELEN as usize, l.EINVAL as c_int).and_then(|n| {
            if k.devices.iter().any(|d| d.name == n) {
                Err(l.EEXIST as c_int)
            } else {
                Ok(n)
            }
        });
        let name = match checked {
            Ok(name) => name,
            Err(e) if flags & l.MAKEDEV_CHECKNAME != 0 => return Err((e, None)),
            Err(e) => crate::fail(format_args!(
                "panic: make_dev_sv: bad si_name (error={e}, si_name={})",
                String::from_utf8_lossy(name)
            )),
        };
        let cdev = Block::new(l.sizeof_cdev, 8);
        // SAFETY: a zeroed struct cdev of the header size; si_name has
        // SPECNAMELEN + 1 bytes and the name is at most SPECNAMELEN.
        unsafe {
            poke(cdev.addr + l.cdev_si_drv1, drv1);
            poke(cdev.addr + l.cdev_si_drv2, drv2);
            poke(cdev.addr + l.cdev_si_devsw, devsw);
            core::ptr::copy_nonoverlapping(
                name.as_ptr(),
                (cdev.addr + l.cdev_si_name) as *mut u8,
                name.len(),
            );
            poke(cdevp, cdev.addr);
        }
        k.devices.push(Device {
            cdev,
            name,
            uid,
            gid,
            mode,
            devsw,
        });
        k.books.cdevs_made += 1;
        Ok(())
    });
    match result {
        Ok(()) => 0,
        Err((error, warning)) => {
            if let Some(w) = warning {
                kpi::console(w.as_bytes());
            }
            error
        }
    }
}

/// Runs cdevpriv destructors, `void (*)(void *)`, outside the lock.
fn run_destructors(list: Vec<(u64, u64)>) {
    for (data, dtor) in list {
        if dtor != 0 {
            kpi::enter_kernel();
            // SAFETY: the module's d_priv_dtor_t with the data it
            // registered, run once (the entry was taken off its file).
            unsafe {
                let f: extern "C" fn(u64) = core::mem::transmute(dtor as usize);
                f(data);
            }
        }
    }
}

/// destroy_dev(9): removes the node, waits for threads inside the driver
/// (none can be: one CPU, and the caller is not one), runs the cdevpriv
/// destructors of the files still open on it and leaves those files
/// dead (ENXIO).
pub extern "C" fn destroy_dev(cdev: u64) {
    let (device, dtors) = kpi::with(|k| {
        let Some(i) = k.devices.iter().position(|d| d.cdev.addr == cdev) else {
            crate::fail(format_args!("panic: destroy_dev: unknown cdev {cdev:#x}"));
        };
        let device = k.devices.remove(i);
        let mut dtors = Vec::new();
        for file in k.files.values_mut().filter(|f| f.cdev == cdev) {
            file.dead = true;
            if let Some(p) = file.cdevpriv.take() {
                dtors.push(p);
            }
        }
        k.books.cdevs_destroyed += 1;
        (device, dtors)
    });
    run_destructors(dtors);
    device.cdev.free();
}

/// devfs_set_cdevpriv(9): attaches `data` to the file being opened
/// (`curthread->td_fpop`); EBUSY if it already has one.
pub extern "C" fn devfs_set_cdevpriv(data: *mut c_void, dtor: u64) -> c_int {
    kpi::with(|k| {
        let (ebusy, enoent) = (k.layout.EBUSY as c_int, k.layout.ENOENT as c_int);
        let Some(id) = k.current_file else {
            return enoent;
        };
        match k.files.get_mut(&id) {
            Some(f) if f.cdevpriv.is_some() => ebusy,
            Some(f) => {
                f.cdevpriv = Some((data as u64, dtor));
                0
            }
            None => enoent,
        }
    })
}

/// devfs_get_cdevpriv(9): the current file's data; EBADF outside a file
/// operation, ENOENT when the file has none.
pub extern "C" fn devfs_get_cdevpriv(datap: *mut *mut c_void) -> c_int {
    kpi::with(|k| {
        let (ebadf, enoent) = (k.layout.EBADF as c_int, k.layout.ENOENT as c_int);
        let Some(file) = k.current_file.and_then(|id| k.files.get(&id)) else {
            return ebadf;
        };
        match file.cdevpriv {
            Some((data, _)) => {
                // SAFETY: the driver passes a pointer to its void *.
                unsafe { datap.write(data as *mut c_void) };
                0
            }
            None => enoent,
        }
    })
}

/// Calls `d_open`/`d_close`-shaped methods: `int (*)(struct cdev *, int,
/// int, struct thread *)`.
fn call_open_close(method: u64, cdev: u64, fflags: c_int, devtype: c_int, td: u64) -> c_int {
    kpi::enter_kernel();
    // SAFETY: a method of the driver's cdevsw, called as devfs does.
    unsafe {
        let f: extern "C" fn(u64, c_int, c_int, u64) -> c_int =
            core::mem::transmute(method as usize);
        f(cdev, fflags, devtype, td)
    }
}

/// devfs_open: `fflags` are FFLAGS(open flags). Returns the file.
pub fn open(name: &str, fflags: c_int) -> Result<u32, c_int> {
    let (id, cdev, d_open, td, devtype) = kpi::with(|k| {
        let l = k.layout;
        let Some(d) = k.devices.iter().find(|d| d.name == name) else {
            return Err(l.ENOENT as c_int);
        };
        let cdev = d.cdev.addr;
        // SAFETY: the driver's cdevsw.
        let d_open: u64 = unsafe { peek(d.devsw + l.cdevsw_d_open) };
        let id = k.next_file;
        k.next_file += 1;
        k.files.insert(
            id,
            DevFile {
                cdev,
                fflags,
                cdevpriv: None,
                dead: false,
            },
        );
        k.current_file = Some(id);
        Ok((id, cdev, d_open, curthread(k), l.S_IFCHR as c_int))
    })?;
    // A NULL d_open is null_open (prep_cdevsw): success.
    let error = if d_open == 0 {
        0
    } else {
        call_open_close(d_open, cdev, fflags, devtype, td)
    };
    let dtor = kpi::with(|k| {
        k.current_file = None;
        if error != 0 {
            // devfs_open: a failed open drops the cdevpriv it may have set.
            k.files.remove(&id).and_then(|f| f.cdevpriv)
        } else {
            None
        }
    });
    run_destructors(dtor.into_iter().collect());
    if error != 0 {
        Err(error)
    } else {
        Ok(id)
    }
}

/// devfs_ioctl_f: `data` is the kernel's copy of the argument.
pub fn ioctl(id: u32, cmd: u64, data: *mut u8) -> c_int {
    let call = kpi::with(|k| {
        let l = k.layout;
        let Some(f) = k.files.get(&id) else {
            return Err(l.EBADF as c_int);
        };
        if f.dead {
            return Err(l.ENXIO as c_int);
        }
        let Some(d) = k.devices.iter().find(|d| d.cdev.addr == f.cdev) else {
            return Err(l.ENXIO as c_int);
        };
        // SAFETY: the driver's cdevsw.
        let d_ioctl: u64 = unsafe { peek(d.devsw + l.cdevsw_d_ioctl) };
        if d_ioctl == 0 {
            // no_ioctl (prep_cdevsw).
            return Err(l.ENODEV as c_int);
        }
        k.current_file = Some(id);
        Ok((d_ioctl, f.cdev, f.fflags, curthread(k)))
    });
    let (d_ioctl, cdev, fflags, td) = match call {
        Ok(call) => call,
        Err(e) => return e,
    };
    {
        let mut running = IN_IOCTL.lock();
        match running.iter_mut().find(|e| e.0 == id) {
            Some(e) => e.1 += 1,
            None => running.push((id, 1, false)),
        }
    }
    kpi::enter_kernel();
    super::cpu::before_ioctl();
    // SAFETY: d_ioctl_t of the driver, called as devfs does, with the
    // kernel's buffer of IOCPARM_LEN(cmd) bytes.
    let error = unsafe {
        let f: extern "C" fn(u64, u64, *mut u8, c_int, u64) -> c_int =
            core::mem::transmute(d_ioctl as usize);
        f(cdev, cmd, data, fflags, td)
    };
    super::cpu::after_ioctl();
    kpi::with(|k| k.current_file = None);
    let last = {
        let mut running = IN_IOCTL.lock();
        match running.iter().position(|e| e.0 == id) {
            Some(i) if running[i].1 == 1 => running.swap_remove(i).2,
            Some(i) => {
                running[i].1 -= 1;
                false
            }
            None => false,
        }
    };
    if last {
        DEFERRED_CLOSES.fetch_add(1, Ordering::Relaxed);
        last_close(id);
    }
    error
}

/// close(2) of a descriptor: the last reference goes now, or when the
/// ioctls other threads run on the file return (FreeBSD holds the file
/// for each ioctl: fget ... fdrop in kern_ioctl).
pub fn close(id: u32) -> c_int {
    let known = kpi::with(|k| k.files.contains_key(&id));
    if known {
        if let Some(entry) = IN_IOCTL.lock().iter_mut().find(|e| e.0 == id) {
            entry.2 = true;
            return 0;
        }
    }
    last_close(id)
}

/// The last close of an open file: d_close when it is the device's last
/// open file (devfs_close without D_TRACKCLOSE), then devfs_fpdrop runs
/// the file's cdevpriv destructor.
fn last_close(id: u32) -> c_int {
    let found = kpi::with(|k| {
        let file = k.files.remove(&id)?;
        let last = !k.files.values().any(|f| f.cdev == file.cdev);
        let d_close = k
            .devices
            .iter()
            .find(|d| d.cdev.addr == file.cdev)
            // SAFETY: the driver's cdevsw.
            .map_or(0, |d| unsafe {
                peek::<u64>(d.devsw + k.layout.cdevsw_d_close)
            });
        let close = (last && !file.dead && d_close != 0).then_some(d_close);
        Some((file, close, curthread(k), k.layout.S_IFCHR as c_int))
    });
    let Some((file, close, td, devtype)) = found else {
        return kpi::with(|k| k.layout.EBADF as c_int);
    };
    let error = close.map_or(0, |m| {
        call_open_close(m, file.cdev, file.fflags, devtype, td)
    });
    run_destructors(file.cdevpriv.into_iter().collect());
    error
}

/// Owner, group and mode of /dev/`name`, if it exists.
pub fn node(name: &str) -> Option<(u32, u32, u32)> {
    kpi::with(|k| {
        k.devices
            .iter()
            .find(|d| d.name == name)
            .map(|d| (d.uid, d.gid, d.mode))
    })
}
