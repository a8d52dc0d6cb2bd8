//! The sysctl tree as far as a module reaches it: registration of its
//! `set_sysctl_set` oids under the kernel's `hw` node, loader tunables
//! (CTLFLAG_TUN) fetched from the kernel environment at registration, and
//! reads through the oid's handler (sys/kern/kern_sysctl.c).

use super::kpi::{self, peek, poke, Block, Oid};
use super::printf::c_string;
use alloc::string::String;
use alloc::vec::Vec;
use core::ffi::c_int;

/// `struct sysctl_req` of the header size, filled for a kernel request.
fn request(old: Option<&mut [u8]>, new: Option<&[u8]>) -> Block {
    kpi::with(|k| {
        let l = k.layout;
        let req = Block::new(l.sizeof_sysctl_req, 8);
        // SAFETY: a zeroed struct sysctl_req of the header size.
        unsafe {
            poke(req.addr + l.sysctl_req_td, k.thread.addr);
            if let Some(old) = old {
                poke(req.addr + l.sysctl_req_oldptr, old.as_mut_ptr() as u64);
                poke(req.addr + l.sysctl_req_oldlen, old.len() as u64);
            }
            if let Some(new) = new {
                poke(req.addr + l.sysctl_req_newptr, new.as_ptr() as u64);
                poke(req.addr + l.sysctl_req_newlen, new.len() as u64);
            }
            poke(
                req.addr + l.sysctl_req_oldfunc,
                sysctl_old_kernel as *const () as u64,
            );
            poke(
                req.addr + l.sysctl_req_newfunc,
                sysctl_new_kernel as *const () as u64,
            );
        }
        req
    })
}

/// sysctl_old_kernel: copies a handler's output to the kernel buffer.
extern "C" fn sysctl_old_kernel(req: u64, p: *const u8, l: usize) -> c_int {
    kpi::with(|k| {
        let lay = k.layout;
        // SAFETY: `req` is a request built by `request`; the buffer it
        // names is `oldlen` bytes.
        unsafe {
            let oldptr: u64 = peek(req + lay.sysctl_req_oldptr);
            let oldlen: u64 = peek(req + lay.sysctl_req_oldlen);
            let oldidx: u64 = peek(req + lay.sysctl_req_oldidx);
            let mut i = 0u64;
            if oldptr != 0 {
                i = (l as u64).min(oldlen.saturating_sub(oldidx));
                core::ptr::copy_nonoverlapping(p, (oldptr + oldidx) as *mut u8, i as usize);
            }
            poke(req + lay.sysctl_req_oldidx, oldidx + l as u64);
            if oldptr != 0 && i != l as u64 {
                return lay.ENOMEM as c_int;
            }
        }
        0
    })
}

/// sysctl_new_kernel: hands a handler the new value.
extern "C" fn sysctl_new_kernel(req: u64, p: *mut u8, l: usize) -> c_int {
    kpi::with(|k| {
        let lay = k.layout;
        // SAFETY: as above, for the new-value buffer.
        unsafe {
            let newptr: u64 = peek(req + lay.sysctl_req_newptr);
            if newptr == 0 {
                return 0;
            }
            let newlen: u64 = peek(req + lay.sysctl_req_newlen);
            let newidx: u64 = peek(req + lay.sysctl_req_newidx);
            if newlen - newidx < l as u64 {
                return lay.EINVAL as c_int;
            }
            core::ptr::copy_nonoverlapping((newptr + newidx) as *const u8, p, l);
            poke(req + lay.sysctl_req_newidx, newidx + l as u64);
        }
        0
    })
}

/// sysctl_handle_int(9): reports `*arg1` (or `arg2` without arg1) and
/// takes a new value into `*arg1` when the request carries one.
pub extern "C" fn sysctl_handle_int(_oidp: u64, arg1: *mut c_int, arg2: i64, req: u64) -> c_int {
    let (oldfunc, newfunc, newptr, eperm) = kpi::with(|k| {
        let l = k.layout;
        // SAFETY: `req` is a struct sysctl_req.
        unsafe {
            (
                peek::<u64>(req + l.sysctl_req_oldfunc),
                peek::<u64>(req + l.sysctl_req_newfunc),
                peek::<u64>(req + l.sysctl_req_newptr),
                l.EPERM as c_int,
            )
        }
    });
    // SAFETY: arg1 is the int the oid names (SYSCTL_INT), or null.
    let value: c_int = if arg1.is_null() {
        arg2 as c_int
    } else {
        unsafe { arg1.read() }
    };
    // SAFETY: SYSCTL_OUT / SYSCTL_IN: the request's own functions.
    unsafe {
        let out: extern "C" fn(u64, *const u8, usize) -> c_int =
            core::mem::transmute(oldfunc as usize);
        let error = out(req, (&value as *const c_int).cast(), 4);
        if error != 0 || newptr == 0 {
            return error;
        }
        if arg1.is_null() {
            return eperm;
        }
        let input: extern "C" fn(u64, *mut u8, usize) -> c_int =
            core::mem::transmute(newfunc as usize);
        input(req, arg1.cast(), 4)
    }
}

/// Calls an oid's handler, `int (*)(struct sysctl_oid *, void *,
/// intmax_t, struct sysctl_req *)`.
fn call_handler(oid: &Oid, req: &Block) -> c_int {
    kpi::enter_kernel();
    // SAFETY: the oid's handler with its own arguments.
    unsafe {
        let f: extern "C" fn(u64, u64, i64, u64) -> c_int =
            core::mem::transmute(oid.handler as usize);
        f(oid.addr, oid.arg1, oid.arg2, req.addr)
    }
}

/// `getenv_int`-style parse (strtoq base 0: 0x hex, leading 0 octal).
pub fn parse_int(v: &str) -> Option<i64> {
    let v = v.trim();
    let (neg, v) = match v.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, v),
    };
    let n = if let Some(hex) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        i64::from_str_radix(hex, 16).ok()?
    } else if v.len() > 1 && v.starts_with('0') {
        i64::from_str_radix(&v[1..], 8).ok()?
    } else {
        v.parse().ok()?
    };
    Some(if neg { -n } else { n })
}

/// linker_file_register_sysctls: every oid of the module's set gets its
/// path from its parent list (the kernel's `hw` node or a node of the
/// module); tunables are loaded. Returns log lines of what was done.
pub fn register(oids: &[u64]) -> Result<Vec<String>, String> {
    let (hw, l) = kpi::with(|k| (k.sysctl_hw, k.layout));
    // Parent lists we know: `hw`, then each node as it gets a path.
    let mut lists: Vec<(u64, String)> =
        alloc::vec![(hw + l.sysctl_oid_oid_children, String::from("hw"))];
    let mut pending: Vec<u64> = oids.to_vec();
    let mut registered = Vec::new();
    for _ in 0..=oids.len() {
        if pending.is_empty() {
            break;
        }
        pending.retain(|&addr| {
            // SAFETY: `addr` is a struct sysctl_oid of the module.
            let (parent, name, kind, arg1, arg2, handler) = unsafe {
                (
                    peek::<u64>(addr + l.sysctl_oid_oid_parent),
                    peek::<u64>(addr + l.sysctl_oid_oid_name),
                    peek::<u32>(addr + l.sysctl_oid_oid_kind),
                    peek::<u64>(addr + l.sysctl_oid_oid_arg1),
                    peek::<i64>(addr + l.sysctl_oid_oid_arg2),
                    peek::<u64>(addr + l.sysctl_oid_oid_handler),
                )
            };
            let Some(base) = lists
                .iter()
                .find(|(list, _)| *list == parent)
                .map(|(_, p)| p.clone())
            else {
                return true;
            };
            // SAFETY: oid_name is a string of the module.
            let name = String::from_utf8_lossy(&unsafe { c_string(name, 128) }).into_owned();
            let path = alloc::format!("{base}.{name}");
            if u64::from(kind) & l.CTLTYPE == l.CTLTYPE_NODE {
                lists.push((addr + l.sysctl_oid_oid_children, path.clone()));
            }
            registered.push(Oid {
                addr,
                path,
                kind,
                arg1,
                arg2,
                handler,
            });
            false
        });
    }
    if !pending.is_empty() {
        return Err(alloc::format!(
            "{} sysctl oid(s) with a parent outside the tree",
            pending.len()
        ));
    }
    let mut log = Vec::new();
    for oid in &registered {
        let kind = u64::from(oid.kind);
        let ty = kind & l.CTLTYPE;
        if kind & l.CTLFLAG_TUN != 0 && (ty == l.CTLTYPE_INT || ty == l.CTLTYPE_UINT) {
            let value = kpi::with(|k| {
                k.kenv
                    .iter()
                    .find(|(n, _)| *n == oid.path)
                    .map(|(_, v)| v.clone())
            });
            if let Some(value) = value {
                let Some(n) = parse_int(&value) else {
                    log.push(alloc::format!(
                        "tunable {}={value:?} is not a number: ignored",
                        oid.path
                    ));
                    continue;
                };
                let bytes = (n as i32).to_le_bytes();
                let req = request(None, Some(&bytes));
                let error = call_handler(oid, &req);
                req.free();
                if error != 0 {
                    kpi::console(
                        alloc::format!("Setting sysctl {} failed: {error}\n", oid.path).as_bytes(),
                    );
                }
                log.push(alloc::format!(
                    "tunable {}={value} loaded (error {error})",
                    oid.path
                ));
            }
        }
    }
    kpi::with(|k| {
        k.books.sysctls += registered.len() as u32;
        k.oids.extend(registered.iter().cloned());
    });
    for oid in &registered {
        log.push(alloc::format!(
            "sysctl {} registered (kind {:#x})",
            oid.path,
            oid.kind
        ));
    }
    Ok(log)
}

/// linker_file_unregister_sysctls: drops the module's oids.
pub fn unregister(oids: &[u64]) {
    kpi::with(|k| {
        let before = k.oids.len();
        k.oids.retain(|o| !oids.contains(&o.addr));
        k.books.sysctls -= (before - k.oids.len()) as u32;
    })
}

/// Reads an integer sysctl through its handler, as `sysctl(8)` would.
pub fn read_int(path: &str) -> Result<i32, String> {
    let oid = kpi::with(|k| k.oids.iter().find(|o| o.path == path).cloned())
        .ok_or_else(|| alloc::format!("no sysctl {path}"))?;
    let mut buf = [0u8; 4];
    let req = request(Some(&mut buf), None);
    let error = call_handler(&oid, &req);
    req.free();
    if error != 0 {
        return Err(alloc::format!("{path}: error {error}"));
    }
    Ok(i32::from_le_bytes(buf))
}
