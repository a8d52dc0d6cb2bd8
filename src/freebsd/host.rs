//! [`Host`] with FreeBSD's kernel programming interface.

use core::alloc::Layout;
use core::ffi::{c_char, c_int, c_void};
use core::fmt::{self, Write};
use core::ptr::{self, NonNull};

use freebsd_kernel_sys as sys;

use crate::error::{Error, Result};
use crate::host::{
    HeldUserPage, Host, LockBudget, MapPiece, RangeBacking, MAX_BACKING_PIECES, PAGE_SIZE,
};

/// The running FreeBSD kernel, seen from the thread that called into the
/// module (user addresses are those of its process).
#[derive(Clone, Copy, Debug, Default)]
pub struct FreeBsdHost;

/// Read and write access, as `vm_prot_t`.
const PROT_READ_WRITE: sys::vm_prot_t =
    (sys::KQEMU_VM_PROT_READ | sys::KQEMU_VM_PROT_WRITE) as sys::vm_prot_t;

/// The calling process's address map.
fn current_map() -> sys::vm_map_t {
    // SAFETY: curthread is always valid in thread context; td_proc of a
    // thread running a system call and p_vmspace of its process stay valid
    // while the thread runs (only the process itself replaces its vmspace,
    // in execve).
    unsafe {
        let td = sys::kqemu_curthread();
        ptr::addr_of_mut!((*(*(*td).td_proc).p_vmspace).vm_map)
    }
}

/// A kernel log line assembled on the stack (no heap in the log path).
struct LineBuffer {
    bytes: [u8; 200],
    len: usize,
}

impl Write for LineBuffer {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // Longer lines are cut, never split: one call, one log line.
        let room = self.bytes.len() - self.len;
        let n = s.len().min(room);
        self.bytes[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

impl Host for FreeBsdHost {
    fn log(&self, args: fmt::Arguments<'_>) {
        let mut line = LineBuffer {
            bytes: [0; 200],
            len: 0,
        };
        // LineBuffer never fails; a formatting error only shortens the line.
        let _ = line.write_fmt(args);
        // `len` is at most 200, so the cast cannot truncate.
        let len = line.len as c_int;
        // SAFETY: "%.*s" reads at most `len` bytes of `line`, which lives
        // across the call; printf(9) is callable from any thread context.
        unsafe {
            sys::printf(
                c"kqemu: %.*s\n".as_ptr(),
                len,
                line.bytes.as_ptr().cast::<c_char>(),
            )
        };
    }

    fn alloc_zeroed(&self, layout: Layout) -> Result<NonNull<u8>> {
        if layout.size() == 0 || layout.align() as u64 > PAGE_SIZE {
            return Err(Error::InvalidArgument);
        }
        // M_NOWAIT: sizes come from the client, and an allocation that
        // cannot be satisfied must fail with ENOMEM rather than sleep
        // forever. malloc_aligned(9) takes power-of-two alignments up to a
        // page, which Layout guarantees and the check above bounds.
        // SAFETY: M_KQEMU is the module's malloc type, registered by its
        // MALLOC_DEFINE for the module's lifetime.
        let p = unsafe {
            sys::malloc_aligned(
                layout.size(),
                layout.align(),
                ptr::addr_of_mut!(sys::M_KQEMU).cast(),
                sys::M_NOWAIT | sys::M_ZERO,
            )
        };
        NonNull::new(p.cast::<u8>()).ok_or(Error::NoMemory)
    }

    unsafe fn free(&self, ptr: NonNull<u8>, _layout: Layout) {
        // SAFETY: the caller guarantees `ptr` came from alloc_zeroed, i.e.
        // from malloc_aligned(9) with M_KQEMU, which free(9) takes back.
        unsafe {
            sys::free(
                ptr.as_ptr().cast::<c_void>(),
                ptr::addr_of_mut!(sys::M_KQEMU).cast(),
            )
        };
    }

    fn check_user_range(&self, addr: u64, len: u64) -> Result<()> {
        let end = addr.checked_add(len).ok_or(Error::Fault)?;
        let map = current_map();
        // SAFETY: vm_map_check_protection(9) needs the map locked; a read
        // lock is enough and is held only around the call.
        let mapped = unsafe {
            sys::kqemu_vm_map_lock_read(map);
            let ok = sys::vm_map_check_protection(map, addr, end, PROT_READ_WRITE);
            sys::kqemu_vm_map_unlock_read(map);
            ok
        };
        if mapped != 0 {
            Ok(())
        } else {
            Err(Error::Fault)
        }
    }

    fn hold_user_page(&self, user_addr: u64) -> Result<HeldUserPage> {
        // vm_fault_quick_hold_pages panics when the range needs more pages
        // than the array holds: one aligned page needs exactly one.
        if !user_addr.is_multiple_of(PAGE_SIZE) {
            return Err(Error::InvalidArgument);
        }
        let mut page: sys::vm_page_t = ptr::null_mut();
        // SAFETY: `page` has room for the one page a page-aligned range of
        // PAGE_SIZE bytes covers; the call faults the page in as the
        // calling thread and returns -1 if it is not mapped read/write.
        let held = unsafe {
            sys::vm_fault_quick_hold_pages(
                current_map(),
                user_addr,
                PAGE_SIZE,
                PROT_READ_WRITE,
                &mut page,
                1,
            )
        };
        if held != 1 || page.is_null() {
            return Err(Error::Fault);
        }
        // SAFETY: `page` is held (its flags stay as they are while held).
        if unsafe { sys::kqemu_page_is_managed_ram(page) } == 0 {
            // A device mapping (/dev/mem, a DRM buffer) is no guest RAM:
            // its page may have no direct-map entry (helpers.c).
            // SAFETY: releases the hold taken above, once; not dirtied,
            // as nothing was written to it.
            unsafe { sys::vm_page_unhold_pages(&mut page, 1) };
            return Err(Error::Fault);
        }
        // SAFETY: `page` is held, so it stays this physical page; every
        // physical page of managed memory is in amd64's direct map.
        let (phys, kernel) = unsafe {
            let phys = sys::kqemu_vm_page_to_phys(page);
            (phys, sys::kqemu_phys_to_dmap(phys))
        };
        let Some(kernel) = NonNull::new(kernel.cast::<u8>()) else {
            // SAFETY: releases the hold taken above, once.
            unsafe { sys::vm_page_unhold_pages(&mut page, 1) };
            return Err(Error::Fault);
        };
        super::lock_budget().note_hold();
        Ok(HeldUserPage {
            user_addr,
            phys,
            kernel,
            cookie: page as usize,
        })
    }

    unsafe fn release_user_page(&self, page: &HeldUserPage) {
        let m = page.cookie as sys::vm_page_t;
        // Every held page is guest RAM, dirty bytes or a list page, and
        // each may have been written behind the pmap's back (the guest
        // through the shadow page tables, the module through the direct
        // map), so each is marked dirty before the unhold (helpers.c).
        // SAFETY: the caller guarantees `page` was held by hold_user_page
        // (the cookie is its vm_page_t) and is released once.
        unsafe { sys::kqemu_page_release(m) };
        super::lock_budget().note_release();
    }

    fn virt_to_phys(&self, virt: u64) -> Option<u64> {
        // Only page-aligned addresses are asked for (switcher pages, table
        // pages), so the 0 vtophys(9) answers for an unmapped page cannot
        // be confused with a mapped one.
        if !virt.is_multiple_of(PAGE_SIZE) {
            return None;
        }
        // SAFETY: pmap_kextract(9) only reads the kernel page tables.
        let phys = unsafe { sys::kqemu_vtophys(virt) };
        (phys != 0).then_some(phys)
    }

    fn cpu_enter(&self) -> Option<usize> {
        // SAFETY: thread context (an ioctl). kqemu_cpu_enter enters a
        // critical section (no preemption or migration until cpu_leave)
        // and makes the thread's user FPU state live with CR0.TS clear
        // (FREEBSD.md "CPU", ABI.md "Guest FPU contract").
        let cpu = unsafe { sys::kqemu_cpu_enter() };
        Some(cpu as usize)
    }

    fn cpu_leave(&self) {
        // SAFETY: pairs with the critical_enter(9) of cpu_enter; a
        // preemption deferred meanwhile happens here.
        unsafe { sys::kqemu_cpu_leave() };
    }

    const MAX_LOCKED_PAGES_NAME: &'static str = "hw.kqemu.max_locked_pages";

    fn lock_budget(&self) -> &LockBudget {
        super::lock_budget()
    }

    fn max_locked_pages(&self) -> usize {
        super::max_locked_pages()
    }

    fn user_space(&self) -> u64 {
        // SAFETY: as in current_map: the running thread's process and its
        // vmspace are valid during the call; the pointer is only compared
        // (with INIT's, which the open file keeps referenced so that no
        // other vmspace gets its address: mod.rs OwnerVmspace).
        unsafe {
            let td = sys::kqemu_curthread();
            (*(*td).td_proc).p_vmspace as u64
        }
    }

    fn user_map_version(&self) -> u64 {
        let map = current_map();
        // SAFETY: `timestamp` changes under the map's exclusive lock, at
        // every change of the map (vm_map_lock() increments it); read
        // under the shared lock, held only around the read.
        unsafe {
            sys::kqemu_vm_map_lock_read(map);
            let stamp = ptr::read_volatile(ptr::addr_of!((*map).timestamp));
            sys::kqemu_vm_map_unlock_read(map);
            u64::from(stamp)
        }
    }

    fn user_range_backing(&self, addr: u64, len: u64) -> Option<RangeBacking> {
        let end = addr.checked_add(len)?;
        let mut raw = [sys::kqemu_map_piece::default(); MAX_BACKING_PIECES];
        // SAFETY: `raw` has room for the MAX_BACKING_PIECES pieces the
        // helper may write; it takes and drops the map's read lock itself
        // and only reads the entries (helpers.c).
        let n = unsafe {
            sys::kqemu_map_backing(
                current_map(),
                addr,
                end,
                raw.as_mut_ptr(),
                MAX_BACKING_PIECES as c_int,
            )
        };
        let n = usize::try_from(n).ok()?;
        let mut pieces = [MapPiece::default(); MAX_BACKING_PIECES];
        for (piece, r) in pieces.iter_mut().zip(raw.iter()).take(n) {
            *piece = MapPiece {
                start: r.start,
                end: r.end,
                object: r.object,
                offset: r.offset,
            };
        }
        let backing = pieces.get(..n).and_then(RangeBacking::new);
        if backing.is_none() {
            // Not reached (the helper writes at most MAX_BACKING_PIECES),
            // but the references it took must not leak either way.
            for r in raw.iter().take(n) {
                // SAFETY: kqemu_map_backing referenced each of these.
                unsafe { sys::vm_object_deallocate(r.object as sys::vm_object_t) };
            }
        }
        backing
    }

    unsafe fn release_range_backing(&self, backing: &RangeBacking) {
        for p in backing.pieces() {
            // SAFETY: the caller guarantees `backing` came from
            // user_range_backing, whose helper took one reference on each
            // piece's object, and is released once; vm_object_deallocate
            // may sleep, which thread context (an ioctl, the cdevpriv
            // destructor) allows.
            unsafe { sys::vm_object_deallocate(p.object as sys::vm_object_t) };
        }
    }

    fn should_yield(&self) -> bool {
        // SAFETY: curthread is valid in thread context, and these two
        // fields of the running thread are only read (bhyve's
        // vcpu_should_yield reads them the same way).
        unsafe {
            let td = sys::kqemu_curthread();
            ptr::read_volatile(ptr::addr_of!((*td).td_ast)) != 0
                || ptr::read_volatile(ptr::addr_of!((*td).td_owepreempt)) != 0
        }
    }
}
