//! The FreeBSD kernel the module links against: the state behind the KPI
//! functions, their bookkeeping, and the symbol table the kld loader
//! resolves imports from (tests/kld/kpi-14.txt, kpi-15.txt).
//!
//! Everything runs on one CPU with interrupts off, as a thread of the
//! process that made the system call (or of kldload). The state sits
//! behind one lock that is never held while module code runs, so a KPI
//! call the module makes from inside a module function (a cdevpriv
//! destructor calling free(9) during destroy_dev(9)) finds it free; a
//! real re-entrant call would be a personality bug and fails the run.

use super::layout::Layout;
use super::printf::{self, c_string};
use crate::{fail, log};
use alloc::alloc::{alloc, alloc_zeroed, dealloc};
use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;
use core::alloc::Layout as AllocLayout;
use core::ffi::{c_char, c_int, c_void};
use core::sync::atomic::{AtomicU64, Ordering};

/// amd64 PAGE_SIZE.
pub const PAGE_SIZE: u64 = 4096;
/// Page-table entry bits (SDM vol. 3, 4.5): present, writable, user, large.
const PTE_P: u64 = 1 << 0;
const PTE_RW: u64 = 1 << 1;
const PTE_US: u64 = 1 << 2;
const PTE_PS: u64 = 1 << 7;
const PTE_FRAME: u64 = 0x000f_ffff_ffff_f000;
/// What malloc(9) without M_ZERO leaves in a block under INVARIANTS
/// (`WEIRD_ADDR`, sys/vm/uma_dbg.c): a module relying on zeroed memory
/// without asking for it reads garbage here too.
const JUNK: u32 = 0xdead_c0de;

/// A block the personality allocated for a kernel object it owns.
#[derive(Clone, Copy, Debug)]
pub struct Block {
    pub addr: u64,
    size: usize,
    align: usize,
}

impl Block {
    pub fn new(size: u64, align: usize) -> Block {
        let size = (size as usize).max(1);
        let layout = AllocLayout::from_size_align(size, align)
            .unwrap_or_else(|_| fail(format_args!("bad block layout {size}/{align}")));
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { alloc_zeroed(layout) };
        if p.is_null() {
            fail(format_args!(
                "FreeBSD personality: out of heap for a {size}-byte object"
            ));
        }
        Block {
            addr: p as u64,
            size,
            align,
        }
    }

    pub fn free(self) {
        // SAFETY: allocated by Block::new with this layout, freed once
        // (Block is consumed).
        unsafe {
            dealloc(
                self.addr as *mut u8,
                AllocLayout::from_size_align_unchecked(self.size, self.align),
            )
        }
    }
}

/// Reads kernel memory of the module or of the personality's objects.
///
/// # Safety
///
/// `addr` is a valid, aligned kernel address of a `T`.
pub unsafe fn peek<T: Copy>(addr: u64) -> T {
    // SAFETY: the caller's contract.
    unsafe { (addr as *const T).read() }
}

/// # Safety
///
/// `addr` is a valid, aligned, writable kernel address of a `T`.
pub unsafe fn poke<T>(addr: u64, value: T) {
    // SAFETY: the caller's contract.
    unsafe { (addr as *mut T).write(value) }
}

/// A registered malloc(9) type (`vmstat -m` line).
#[derive(Clone, Debug)]
pub struct MallocType {
    pub name: String,
    pub in_use: u64,
    pub bytes: u64,
    pub requests: u64,
}

/// The personality's books: what the module holds right now, and totals.
#[derive(Default, Debug)]
pub struct Books {
    /// Live malloc(9) blocks: address → (size, align, type).
    pub mallocs: BTreeMap<u64, (usize, usize, u64)>,
    pub malloc_types: BTreeMap<u64, MallocType>,
    /// Held pages: `vm_page_t` → (physical address, hold count, its block).
    pub held: BTreeMap<u64, (u64, u32, Block)>,
    pub holds: u64,
    pub unholds: u64,
    /// Unholds of managed pages that found the page not dirty: writes of
    /// the guest or the module FreeBSD could lose (`pages-dirty-at-unhold`).
    pub unheld_clean: u64,
    /// Held pages made device pages (`testbed.device_pages`).
    pub device_pages: u64,
    /// Most holds outstanding at once (`holds - unholds`).
    pub held_peak: u64,
    /// Held pages the process unmapped (FreeBSD keeps them until the last
    /// unhold): physical addresses still the module's.
    pub orphans: Vec<u64>,
    /// Orphans whose last hold is gone: frames for the process to free.
    pub orphans_released: Vec<u64>,
    pub map_read_locks: i64,
    /// References the module holds on vm_objects now.
    pub object_refs: u64,
    /// References the module holds on vmspaces now (vmspace_acquire_ref
    /// minus vmspace_free), and all it took.
    pub vmspace_refs: u64,
    pub vmspaces_acquired: u64,
    /// EXEC ioctls whose guest CS has the index of the CS the module was
    /// called on (kld mode runs on FreeBSD's GDT: Linux's __USER32_CS 0x23
    /// against GCODE_SEL 4), and those of them that came back with a
    /// guest exception, `int n` or `syscall` (guest code ran on that CS).
    pub execs_on_host_cs_index: u64,
    pub execs_on_host_cs_index_ran: u64,
    /// CS of the thread calling into the module at the last EXEC.
    pub host_cs: u16,
    /// vm_map_lookup_entry calls, and the address ranges of the entries
    /// they found: where the module watches the mappings.
    pub lookups: u64,
    pub watched: Vec<(u64, u64)>,
    /// The last map change that touched no watched mapping, until the
    /// next change: (`unholds`, `lookups`) when it happened.
    pub quiet_change: Option<(u64, u64)>,
    /// For each such change the module looked at (it looked up entries
    /// before the next change): the pages it released meanwhile.
    pub quiet_releases: Vec<u64>,
    pub cdevs_made: u32,
    pub cdevs_destroyed: u32,
    pub sysctls: u32,
}

/// A module registered by module_register_init (DECLARE_MODULE).
#[derive(Clone, Debug)]
pub struct Module {
    pub name: String,
    pub evhand: u64,
    pub private: u64,
    /// The `module_t` handed to the event handler.
    pub handle: Block,
    pub load_error: c_int,
}

/// A devfs node made by make_dev_s(9).
#[derive(Clone, Debug)]
pub struct Device {
    pub cdev: Block,
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
    pub devsw: u64,
}

/// An open file of a device (`struct file` with its cdevpriv).
#[derive(Clone, Debug)]
pub struct DevFile {
    pub cdev: u64,
    pub fflags: c_int,
    /// devfs_set_cdevpriv(9): (data, destructor).
    pub cdevpriv: Option<(u64, u64)>,
    /// destroy_dev(9) ran: every later operation answers ENXIO.
    pub dead: bool,
}

/// A sysctl the module registered.
#[derive(Clone, Debug)]
pub struct Oid {
    pub addr: u64,
    pub path: String,
    pub kind: u32,
    pub arg1: u64,
    pub arg2: i64,
    pub handler: u64,
}

pub struct Kernel {
    pub layout: &'static Layout,
    pub release: u32,
    pub pcpu: Block,
    pub thread: Block,
    /// `struct vmspace` of the one process (thread → td_proc → p_vmspace;
    /// the `struct proc` between them lives as long as the boot). Its
    /// `vm_refcnt` counts the process's reference and the module's.
    pub vmspace: Block,
    /// The `struct proc` (curthread's `td_proc`).
    pub proc: u64,
    /// Vmspaces of a process that is gone, alive while the module holds a
    /// reference on them (vmspace_exit leaves them to the last holder).
    pub orphan_vmspaces: Vec<Block>,
    /// Freed vmspaces, the last freed reused first, as the vmspace UMA
    /// zone does: a new process can get the address of one that is gone.
    pub free_vmspaces: Vec<Block>,
    pub sysctl_hw: u64,
    pub kva_layout: u64,
    /// The (empty) DPCPU set `__start_set_pcpu` / `__stop_set_pcpu` bound.
    pub pcpu_set: u64,
    /// Page-table root of the process whose map the vm_map functions see.
    pub cr3: u64,
    /// The process's map entries, by address: one per mapping mmap
    /// made, split where munmap (or a MAP_FIXED mapping) cut one, as
    /// FreeBSD clips entries.
    pub entries: Vec<MapEntry>,
    /// Live `struct vm_object`s: address → (block, references). Each
    /// entry holds one (a cut entry's parts one each, as vm_map_clip_*
    /// take one), the module those it took with vm_object_reference.
    pub objects: BTreeMap<u64, (Block, u32)>,
    /// Freed objects, the last freed reused first, as FreeBSD's object
    /// zone (UMA's per-CPU caches) does: a mapping replaced by another at
    /// the same address gets the old object's address back unless the
    /// module kept the old object alive.
    pub free_objects: Vec<Block>,
    pub books: Books,
    pub modules: Vec<Module>,
    pub devices: Vec<Device>,
    pub files: BTreeMap<u32, DevFile>,
    pub next_file: u32,
    /// `curthread->td_fpop`: the file whose d_open / d_ioctl is running.
    pub current_file: Option<u32>,
    /// The loader's kernel environment (/boot/loader.conf).
    pub kenv: Vec<(String, String)>,
    pub oids: Vec<Oid>,
    /// Console output not yet ended by a newline, and the lines so far.
    pub console_line: Vec<u8>,
    pub dmesg: Vec<String>,
}

/// One entry of the process's map: a `struct vm_map_entry` block the
/// module reads (through vm_map_lookup_entry) and what it says.
#[derive(Debug)]
pub struct MapEntry {
    pub start: u64,
    pub end: u64,
    pub object: u64,
    pub offset: u64,
    pub protection: u8,
    block: Block,
}

impl MapEntry {
    fn new(
        layout: &Layout,
        start: u64,
        end: u64,
        object: u64,
        offset: u64,
        protection: u8,
    ) -> Self {
        let block = Block::new(layout.sizeof_vm_map_entry, 64);
        // SAFETY: a fresh zeroed block of the header's struct vm_map_entry
        // size; the offsets come from the same headers (eflags stay 0: no
        // submap, no guard).
        unsafe {
            poke(block.addr + layout.vm_map_entry_start, start);
            poke(block.addr + layout.vm_map_entry_end, end);
            poke(block.addr + layout.vm_map_entry_object, object);
            poke(block.addr + layout.vm_map_entry_offset, offset);
            poke(block.addr + layout.vm_map_entry_protection, protection);
        }
        MapEntry {
            start,
            end,
            object,
            offset,
            protection,
            block,
        }
    }
}

struct Global(spin::Mutex<Option<Kernel>>);

static KERNEL: Global = Global(spin::Mutex::new(None));

/// `__stack_chk_guard` (sys/kern/stack_protector.c): set at boot.
static STACK_CHK_GUARD: AtomicU64 = AtomicU64::new(0);

/// The kernel's data objects the module imports (`kva_layout`,
/// `sysctl___hw`, the DPCPU set bounds) live in the kernel image, as in
/// FreeBSD: the module reaches them with PC32 relocations, which need
/// them within 2 GiB of its own image. Offsets of each in the area:
const KVA_LAYOUT_AT: usize = 0;
const SYSCTL_HW_AT: usize = 256;
const PCPU_SET_AT: usize = 1024;
const MAX_USER_WIRED_AT: usize = 1032;
const KERNEL_DATA_SIZE: usize = 1040;
/// `vm_page_max_user_wired` (vm.max_user_wired): FreeBSD sets it to a
/// third of the free pages at boot (sys/vm/vm_pageout.c
/// vm_pageout_init); the testbed's guest has 512 MiB.
const MAX_USER_WIRED: u64 = (512 << 20) / PAGE_SIZE / 3;
/// The loader tunable of the module's own limit on held pages.
const MAX_LOCKED_TUNABLE: &str = "hw.kqemu.max_locked_pages";
static KERNEL_DATA: [AtomicU64; KERNEL_DATA_SIZE / 8] =
    [const { AtomicU64::new(0) }; KERNEL_DATA_SIZE / 8];

fn kernel_data(offset: usize) -> u64 {
    KERNEL_DATA.as_ptr() as u64 + offset as u64
}

/// Runs `f` on the kernel state. Never call module code inside `f`.
pub fn with<R>(f: impl FnOnce(&mut Kernel) -> R) -> R {
    let Some(mut guard) = KERNEL.0.try_lock() else {
        fail(format_args!("FreeBSD personality: re-entrant KPI call"))
    };
    let Some(kernel) = guard.as_mut() else {
        fail(format_args!("FreeBSD personality: KPI call before boot"))
    };
    f(kernel)
}

/// Boots the personality for FreeBSD `release`: per-CPU data, the
/// thread and process the module runs in, the kernel's objects the module
/// imports.
pub fn boot(release: u32, kenv: Vec<(String, String)>) -> Option<()> {
    let layout = Layout::of(release)?;
    let pcpu = Block::new(layout.sizeof_pcpu, PAGE_SIZE as usize);
    let thread = Block::new(layout.sizeof_thread, 64);
    let proc = Block::new(layout.sizeof_proc, 64);
    let vmspace = Block::new(layout.sizeof_vmspace, 64);
    // SAFETY: fresh zeroed blocks of the header sizes; the offsets come
    // from the same headers.
    unsafe {
        poke(pcpu.addr + layout.pcpu_pc_curthread, thread.addr);
        poke(thread.addr + layout.thread_td_proc, proc.addr);
        poke(proc.addr + layout.proc_p_vmspace, vmspace.addr);
        poke::<i32>(proc.addr + layout.proc_p_pid, 1);
        // The process's own reference (vmspace_alloc starts at 1).
        poke::<u32>(vmspace.addr + layout.vmspace_vm_refcnt, 1);
    }
    if layout.sizeof_kva_layout > (SYSCTL_HW_AT - KVA_LAYOUT_AT) as u64
        || layout.sizeof_sysctl_oid > (PCPU_SET_AT - SYSCTL_HW_AT) as u64
    {
        fail(format_args!(
            "FreeBSD personality: kernel data area too small"
        ));
    }
    let kva_layout = kernel_data(KVA_LAYOUT_AT);
    if release >= 15 {
        // SAFETY: the area's struct kva_layout_s (size checked above).
        unsafe {
            poke(
                kva_layout + layout.kva_layout_dmap_low,
                crate::mem::DMAP_BASE,
            );
            poke(
                kva_layout + layout.kva_layout_dmap_high,
                crate::mem::DMAP_BASE + (512u64 << 30),
            );
        }
    }
    KERNEL_DATA[MAX_USER_WIRED_AT / 8].store(MAX_USER_WIRED, Ordering::Relaxed);
    super::cpu::boot(layout, pcpu.addr, thread.addr);
    STACK_CHK_GUARD.store(crate::x86::rdtsc().rotate_left(29) | 1, Ordering::Relaxed);
    *KERNEL.0.lock() = Some(Kernel {
        layout,
        release,
        pcpu,
        thread,
        vmspace,
        proc: proc.addr,
        orphan_vmspaces: Vec::new(),
        free_vmspaces: Vec::new(),
        sysctl_hw: kernel_data(SYSCTL_HW_AT),
        kva_layout,
        pcpu_set: kernel_data(PCPU_SET_AT),
        cr3: 0,
        entries: Vec::new(),
        objects: BTreeMap::new(),
        free_objects: Vec::new(),
        books: Books::default(),
        modules: Vec::new(),
        devices: Vec::new(),
        files: BTreeMap::new(),
        next_file: 1,
        current_file: None,
        kenv,
        oids: Vec::new(),
        console_line: Vec::new(),
        dmesg: Vec::new(),
    });
    Some(())
}

/// Points GS at this CPU's `struct pcpu`, as the kernel's GS base always
/// does (`curthread` is `%gs:0`). The testbed loads the user's GS base on
/// every entry to ring 3, so every way into the module comes through here.
pub fn enter_kernel() {
    let pcpu = with(|k| k.pcpu.addr);
    // SAFETY: the testbed's kernel does not use GS itself; the value is a
    // canonical kernel address.
    unsafe { crate::x86::wrmsr(crate::x86::MSR_GS_BASE, pcpu) };
}

/// Console output (printf(9)): whole lines go to the testbed log.
pub fn console(text: &[u8]) {
    with(|k| {
        for &b in text {
            if b == b'\n' {
                let line = String::from_utf8_lossy(&k.console_line).into_owned();
                log!("kernel: {line}");
                k.dmesg.push(line);
                k.console_line.clear();
            } else {
                k.console_line.push(b);
            }
        }
    })
}

/// The address of each symbol the kernel exports to the module.
pub fn resolve(name: &str) -> Option<u64> {
    let (release, hw, kva, pcpu_set) = with(|k| (k.release, k.sysctl_hw, k.kva_layout, k.pcpu_set));
    let f = match name {
        "__stack_chk_guard" => return Some(STACK_CHK_GUARD.as_ptr() as u64),
        "sysctl___hw" => return Some(hw),
        "kva_layout" if release >= 15 => return Some(kva),
        "__start_set_pcpu" | "__stop_set_pcpu" => return Some(pcpu_set),
        "vm_page_max_user_wired" => return Some(kernel_data(MAX_USER_WIRED_AT)),
        "__stack_chk_fail" => __stack_chk_fail as *const () as usize,
        "_vm_map_lock_read" => _vm_map_lock_read as *const () as usize,
        "_vm_map_unlock_read" => _vm_map_unlock_read as *const () as usize,
        "vm_map_check_protection" => vm_map_check_protection as *const () as usize,
        "vm_map_lookup_entry" => vm_map_lookup_entry as *const () as usize,
        "vm_object_reference" => vm_object_reference as *const () as usize,
        "vm_object_deallocate" => vm_object_deallocate as *const () as usize,
        "vm_fault_quick_hold_pages" => vm_fault_quick_hold_pages as *const () as usize,
        "vm_page_unhold_pages" => vm_page_unhold_pages as *const () as usize,
        "vm_page_dirty_KBI" => vm_page_dirty_kbi as *const () as usize,
        "vmspace_acquire_ref" => vmspace_acquire_ref as *const () as usize,
        "vmspace_free" => vmspace_free as *const () as usize,
        "malloc_aligned" => malloc_aligned as *const () as usize,
        "free" => free as *const () as usize,
        "malloc_init" => malloc_init as *const () as usize,
        "malloc_uninit" => malloc_uninit as *const () as usize,
        "module_register_init" => module_register_init as *const () as usize,
        "sysctl_handle_int" => super::sysctl::sysctl_handle_int as *const () as usize,
        "make_dev_args_init_impl" => super::devfs::make_dev_args_init_impl as *const () as usize,
        "destroy_dev" => super::devfs::destroy_dev as *const () as usize,
        "devfs_set_cdevpriv" => super::devfs::devfs_set_cdevpriv as *const () as usize,
        "devfs_get_cdevpriv" => super::devfs::devfs_get_cdevpriv as *const () as usize,
        "critical_enter_KBI" => super::cpu::critical_enter_kbi as *const () as usize,
        "critical_exit_KBI" => super::cpu::critical_exit_kbi as *const () as usize,
        "fpudna" => super::cpu::fpudna as *const () as usize,
        "pmap_kextract" => super::cpu::pmap_kextract as *const () as usize,
        "printf" => printf::fbsd_printf as *const () as usize,
        "panic" => printf::fbsd_panic as *const () as usize,
        "make_dev_s" => printf::fbsd_make_dev_s as *const () as usize,
        _ => return None,
    };
    Some(f as u64)
}

/// __stack_chk_fail(9): the stack protector saw a smashed canary.
extern "C" fn __stack_chk_fail() -> ! {
    fail(format_args!(
        "panic: stack overflow detected; backtrace may be corrupted"
    ))
}

impl Kernel {
    /// The calling process's `vm_map_t` (`&p->p_vmspace->vm_map`).
    pub fn vm_map(&self) -> u64 {
        self.vmspace.addr + self.layout.vmspace_vm_map
    }

    fn check_map(&self, map: u64, who: &str) {
        if map != self.vm_map() {
            fail(format_args!(
                "{who}: map {map:#x} is not the calling process's map"
            ));
        }
    }

    /// The physical page behind user address `va`, if the process's page
    /// tables map it for a user access with `write`.
    pub fn user_page(&self, va: u64, write: bool) -> Option<u64> {
        if va >= kqemu::abi::USER_ADDRESS_LIMIT || self.cr3 == 0 {
            return None;
        }
        let mut table = self.cr3 & PTE_FRAME;
        for level in (0..4).rev() {
            let index = (va >> (12 + 9 * level)) & 0x1ff;
            // SAFETY: page tables live in RAM, which the DMAP maps.
            let entry: u64 = unsafe { peek(crate::mem::phys_to_virt(table) + index * 8) };
            let needed = PTE_P | PTE_US | if write { PTE_RW } else { 0 };
            if entry & needed != needed {
                return None;
            }
            if level == 0 || (level < 3 && entry & PTE_PS != 0) {
                let size = 1u64 << (12 + 9 * level);
                let base = entry & PTE_FRAME & !(size - 1);
                return Some(base + (va & (size - 1) & !(PAGE_SIZE - 1)));
            }
            table = entry & PTE_FRAME;
        }
        None
    }

    /// The 4 KiB page-table entries of the user pages in `start..end`
    /// that map a page the module holds: (entry's kernel address, frame).
    pub fn held_ptes(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let held: Vec<u64> = self.books.held.values().map(|e| e.0).collect();
        self.user_ptes(start, end, |frame| held.contains(&frame))
            .into_iter()
            .map(|(_, pte, frame)| (pte, frame))
            .collect()
    }

    /// Whether the module holds the page at `phys`.
    pub fn is_held(&self, phys: u64) -> bool {
        self.books.held.values().any(|e| e.0 == phys)
    }

    /// The 4 KiB page-table entries of the user pages in `start..end`
    /// whose frame `wanted` accepts: (address, entry's kernel address,
    /// frame), by address. Absent tables are skipped whole, so any range
    /// is walked quickly.
    pub fn user_ptes(
        &self,
        start: u64,
        end: u64,
        wanted: impl Fn(u64) -> bool,
    ) -> Vec<(u64, u64, u64)> {
        let mut found = Vec::new();
        let end = end.min(kqemu::abi::USER_ADDRESS_LIMIT);
        let mut va = start & !(PAGE_SIZE - 1);
        // Each pass moves `va` past at least one page: at most one pass per
        // page-table entry of the range that is present.
        while va < end && self.cr3 != 0 {
            let mut table = self.cr3 & PTE_FRAME;
            let mut step = PAGE_SIZE;
            for level in (0..4).rev() {
                let at = crate::mem::phys_to_virt(table) + ((va >> (12 + 9 * level)) & 0x1ff) * 8;
                // SAFETY: page tables live in RAM, which the DMAP maps.
                let entry: u64 = unsafe { peek(at) };
                step = 1u64 << (12 + 9 * level);
                if entry & PTE_P == 0 || (level > 0 && entry & PTE_PS != 0) {
                    break;
                }
                if level == 0 {
                    if wanted(entry & PTE_FRAME) {
                        found.push((va, at, entry & PTE_FRAME));
                    }
                    break;
                }
                table = entry & PTE_FRAME;
            }
            va = (va & !(step - 1)).saturating_add(step);
        }
        found
    }

    /// Points the page-table entry at `pte` (from `held_ptes`) to
    /// `frame` instead, its other bits unchanged.
    pub fn replace_frame(&mut self, pte: u64, frame: u64) {
        // SAFETY: an entry of the process's page tables, through the DMAP.
        unsafe { poke(pte, (peek::<u64>(pte) & !PTE_FRAME) | (frame & PTE_FRAME)) };
    }

    /// mmap(2) mapped `start..start+len` with `prot` (PROT_* has the
    /// VM_PROT_* values): a new entry with an object of its own, replacing
    /// what was mapped there (MAP_FIXED).
    pub fn mapped(&mut self, start: u64, len: u64, prot: u64) {
        let object = self.new_object();
        self.mapped_object(start, len, prot, object, 0);
    }

    /// `vm_refcnt` of a live vmspace.
    pub fn vmspace_refcnt(&self, vm: u64) -> u32 {
        // SAFETY: `vm` is the process's vmspace block or an orphan's
        // (callers check), `u_int vm_refcnt` at the header's offset.
        unsafe { peek::<u32>(vm + self.layout.vmspace_vm_refcnt) }
    }

    fn set_vmspace_refcnt(&mut self, vm: u64, refs: u32) {
        // SAFETY: as in vmspace_refcnt.
        unsafe { poke::<u32>(vm + self.layout.vmspace_vm_refcnt, refs) }
    }

    /// The process exits while another process holds its descriptors
    /// (passed over a unix socket, or inherited), and a process forked
    /// afterwards by that holder now makes the system calls (curthread's
    /// `struct proc` stands for it). vmspace_exit drops the exiting
    /// process's reference: the vmspace is freed unless someone else
    /// holds one; the new process's vmspace comes from the zone, the last
    /// freed first. The map the personality goes on serving is carried
    /// over (the rest of the exit tears its entries down). Returns (old
    /// vmspace, its references left, new vmspace).
    pub fn exit_to_other_process(&mut self) -> (u64, u32, u64) {
        let old = self.vmspace;
        let refs = self.vmspace_refcnt(old.addr) - 1;
        self.set_vmspace_refcnt(old.addr, refs);
        if refs == 0 {
            self.free_vmspaces.push(old);
        } else {
            self.orphan_vmspaces.push(old);
        }
        let new = self
            .free_vmspaces
            .pop()
            .unwrap_or_else(|| Block::new(self.layout.sizeof_vmspace, 64));
        if new.addr != old.addr {
            // SAFETY: two distinct blocks of sizeof(struct vmspace).
            unsafe {
                core::ptr::copy_nonoverlapping(old.addr as *const u8, new.addr as *mut u8, old.size)
            };
        }
        self.set_vmspace_refcnt(new.addr, 1);
        // SAFETY: p_vmspace of the personality's struct proc.
        unsafe { poke(self.proc + self.layout.proc_p_vmspace, new.addr) };
        self.vmspace = new;
        (old.addr, refs, new.addr)
    }

    /// A new `struct vm_object` with one reference (the caller's).
    pub fn new_object(&mut self) -> u64 {
        let object = self
            .free_objects
            .pop()
            .unwrap_or_else(|| Block::new(self.layout.sizeof_vm_object, 64));
        self.objects.insert(object.addr, (object, 1));
        object.addr
    }

    /// The caller gives back its reference on `object` (from `new_object`).
    pub fn drop_object(&mut self, object: u64) {
        self.object_release(object);
    }

    /// mmap(2) of a file mapped `start..start+len` with `prot` from
    /// `offset` of the file's `object` (vm_mmap_vnode: every mapping of
    /// one file shares the vnode's object; the entry takes a reference).
    pub fn mapped_file(&mut self, start: u64, len: u64, prot: u64, object: u64, offset: u64) {
        self.object_ref(object);
        self.mapped_object(start, len, prot, object, offset);
    }

    /// A new entry for `object` (whose reference it takes over),
    /// replacing what was mapped there (MAP_FIXED).
    fn mapped_object(&mut self, start: u64, len: u64, prot: u64, object: u64, offset: u64) {
        let end = start.saturating_add(len);
        self.note_map_change(start, end);
        self.remove_entries(start, end);
        let entry = MapEntry::new(self.layout, start, end, object, offset, prot as u8);
        let at = self.entries.partition_point(|e| e.start < start);
        self.entries.insert(at, entry);
        self.map_changed();
    }

    /// munmap(2) of `start..start+len` (whole pages, as FreeBSD rounds
    /// the end up).
    pub fn unmapped(&mut self, start: u64, len: u64) {
        let end = start
            .saturating_add(len)
            .checked_next_multiple_of(PAGE_SIZE)
            .unwrap_or(u64::MAX);
        self.note_map_change(start, end);
        self.remove_entries(start, end);
        self.map_changed();
    }

    /// Removes `start..end` from the entries, keeping the parts of a cut
    /// entry outside it (same object, the offsets moved with the start).
    fn remove_entries(&mut self, start: u64, end: u64) {
        let mut kept = Vec::with_capacity(self.entries.len() + 1);
        for e in core::mem::take(&mut self.entries) {
            if e.end <= start || end <= e.start {
                kept.push(e);
                continue;
            }
            if e.start < start {
                self.object_ref(e.object);
                kept.push(MapEntry::new(
                    self.layout,
                    e.start,
                    start,
                    e.object,
                    e.offset,
                    e.protection,
                ));
            }
            if end < e.end {
                self.object_ref(e.object);
                let offset = e.offset + (end - e.start);
                kept.push(MapEntry::new(
                    self.layout,
                    end,
                    e.end,
                    e.object,
                    offset,
                    e.protection,
                ));
            }
            // After the parts took theirs: the object lives on with them.
            self.object_release(e.object);
            e.block.free();
        }
        self.entries = kept;
    }

    /// One more reference on a live object.
    fn object_ref(&mut self, object: u64) {
        match self.objects.get_mut(&object) {
            Some((_, refs)) => *refs += 1,
            None => fail(format_args!(
                "vm_object_reference: {object:#x} is not a live object"
            )),
        }
    }

    /// One reference less; the last one frees the object.
    fn object_release(&mut self, object: u64) {
        let Some((block, refs)) = self.objects.get_mut(&object) else {
            fail(format_args!(
                "vm_object_deallocate: {object:#x} is not a live object"
            ))
        };
        *refs -= 1;
        if *refs == 0 {
            let block = *block;
            self.objects.remove(&object);
            self.free_objects.push(block);
        }
    }

    /// Books a change of `start..end` for the unrelated-map-change
    /// check: settles the previous quiet change, and starts one if the
    /// module watches mappings and this change touches none of their
    /// addresses.
    fn note_map_change(&mut self, start: u64, end: u64) {
        let b = &mut self.books;
        if let Some((unholds, lookups)) = b.quiet_change.take() {
            if b.lookups > lookups {
                b.quiet_releases.push(b.unholds - unholds);
            }
        }
        let touches_watched = b.watched.iter().any(|&(s, e)| s < end && start < e);
        if !b.watched.is_empty() && !touches_watched {
            b.quiet_change = Some((b.unholds, b.lookups));
        }
    }

    /// The process's map changed (mmap, munmap): vm_map_lock() increments
    /// `timestamp` on every exclusive lock, i.e. every change of the map
    /// (sys/vm/vm_map.c `_vm_map_lock`).
    fn map_changed(&mut self) {
        let at = self.vm_map() + self.layout.vm_map_timestamp;
        // SAFETY: the `u_int timestamp` of the process's struct vm_map,
        // inside the vmspace block.
        unsafe { poke::<u32>(at, peek::<u32>(at).wrapping_add(1)) };
    }
}

/// The personality's checks of the module's own bound on held pages, made
/// when the loader set `hw.kqemu.max_locked_pages`: the most holds
/// outstanding at once stayed within it, and the module's log line
/// naming it, if it printed one (a refused INIT).
pub fn ram_checks(checks: &mut super::Checks) {
    map_change_checks(checks);
    let (unholds, clean, device, want_device) = with(|k| {
        let b = &k.books;
        (b.unholds, b.unheld_clean, b.device_pages, device_pages(k))
    });
    // The guest writes its RAM behind the pmap's back, so a page the
    // syncer cleaned while held must be dirtied again before its unhold,
    // or FreeBSD frees it without writing it back (a MAP_SHARED file).
    checks.check(
        clean == 0,
        "pages-dirty-at-unhold",
        format_args!("{clean} of {unholds} unholds found a managed page not dirty"),
    );
    if let Some(kind) = want_device {
        // Every page held was a device page; the module let go of each
        // (the books_checks see none left held).
        checks.check(
            device > 0 && device == unholds,
            "device-pages-released",
            format_args!("{device} {kind:?} pages held, {unholds} unholds"),
        );
    }
    let (cap, peak, line) = with(|k| {
        let cap = k
            .kenv
            .iter()
            .find(|(n, _)| n == MAX_LOCKED_TUNABLE)
            .and_then(|(_, v)| super::sysctl::parse_int(v));
        let line = k
            .dmesg
            .iter()
            .find(|l| l.contains(MAX_LOCKED_TUNABLE))
            .cloned();
        (cap, k.books.held_peak, line)
    });
    let Some(cap) = cap else { return };
    // 0 asks the module for its default, half of vm.max_user_wired.
    let cap = if cap == 0 {
        (MAX_USER_WIRED / 2) as i64
    } else {
        cap
    };
    checks.check(
        i64::try_from(peak).is_ok_and(|p| p <= cap),
        "held-peak",
        format_args!("at most {peak} pages held at once, {MAX_LOCKED_TUNABLE}={cap}"),
    );
    if let Some(line) = line {
        checks.check(
            line.contains("ENOMEM"),
            "log-max-locked-pages",
            format_args!("{line}"),
        );
    }
}

/// The kenv variable (set with the testbed's `--tunable`) that asks for
/// the unrelated-map-change check: only a client that makes such changes
/// between EXECs on purpose (kqemu-run --ram-checks munmap) can be held
/// to it.
const MAP_CHANGE_CHECKS: &str = "testbed.map_change_checks";

/// Changes of the process's map that touched no mapping the module
/// watches (its guest RAM, dirty bytes, list pages), and that the module
/// looked at (its map timestamp moved): it released no page after them,
/// i.e. kept its caches and its list pages.
fn map_change_checks(checks: &mut super::Checks) {
    let (wanted, releases) = with(|k| {
        let wanted = k
            .kenv
            .iter()
            .any(|(n, v)| n == MAP_CHANGE_CHECKS && v == "1");
        (wanted, k.books.quiet_releases.clone())
    });
    if wanted {
        checks.check(
            !releases.is_empty() && releases.iter().all(|&r| r == 0),
            "unrelated-map-change-keeps-holds",
            format_args!(
                "{} unrelated map changes the module looked at; pages released after each: {releases:?}",
                releases.len()
            ),
        );
    }
}

/// vmspace_acquire_ref(9) (sys/vm/vm_map.c): `p`'s vmspace with one more
/// `vm_refcnt`, or NULL when it has none left (the process is exiting).
extern "C" fn vmspace_acquire_ref(p: u64) -> u64 {
    with(|k| {
        if p != k.proc {
            fail(format_args!(
                "vmspace_acquire_ref: {p:#x} is not a struct proc"
            ));
        }
        // SAFETY: p_vmspace of the personality's struct proc.
        let vm: u64 = unsafe { peek(p + k.layout.proc_p_vmspace) };
        let refs = k.vmspace_refcnt(vm);
        if refs == 0 {
            return 0;
        }
        k.set_vmspace_refcnt(vm, refs + 1);
        k.books.vmspace_refs += 1;
        k.books.vmspaces_acquired += 1;
        vm
    })
}

/// vmspace_free(9): one `vm_refcnt` less; the last frees the vmspace
/// (vmspace_dofree), which goes back to the zone.
extern "C" fn vmspace_free(vm: u64) {
    with(|k| {
        if k.books.vmspace_refs == 0 {
            fail(format_args!(
                "vmspace_free: the module holds no vmspace reference"
            ));
        }
        let orphan = k.orphan_vmspaces.iter().position(|b| b.addr == vm);
        if vm != k.vmspace.addr && orphan.is_none() {
            fail(format_args!("vmspace_free: {vm:#x} is not a live vmspace"));
        }
        let refs = k.vmspace_refcnt(vm);
        if refs <= 1 && orphan.is_none() {
            fail(format_args!(
                "vmspace_free: the last reference of a running process's vmspace"
            ));
        }
        k.set_vmspace_refcnt(vm, refs - 1);
        k.books.vmspace_refs -= 1;
        if let Some(i) = orphan.filter(|_| refs == 1) {
            let block = k.orphan_vmspaces.swap_remove(i);
            k.free_vmspaces.push(block);
        }
    })
}

/// `_vm_map_lock_read(map, file, line)`: the vm_map_lock_read() macro.
extern "C" fn _vm_map_lock_read(map: u64, _file: *const c_char, _line: c_int) {
    with(|k| {
        k.check_map(map, "vm_map_lock_read");
        k.books.map_read_locks += 1;
    })
}

extern "C" fn _vm_map_unlock_read(map: u64, _file: *const c_char, _line: c_int) {
    with(|k| {
        k.check_map(map, "vm_map_unlock_read");
        if k.books.map_read_locks <= 0 {
            fail(format_args!("vm_map_unlock_read: map is not read-locked"));
        }
        k.books.map_read_locks -= 1;
    })
}

/// vm_map_check_protection(9): TRUE when every page of `start..end` is
/// mapped with at least `protection`. The map must be locked
/// (vm_map_assert_locked in FreeBSD).
extern "C" fn vm_map_check_protection(map: u64, start: u64, end: u64, protection: u8) -> c_int {
    with(|k| {
        k.check_map(map, "vm_map_check_protection");
        if k.books.map_read_locks <= 0 {
            fail(format_args!("vm_map_check_protection: map not locked"));
        }
        if start > end {
            return 0;
        }
        let write = u64::from(protection) & k.layout.VM_PROT_WRITE != 0;
        let mut page = start & !(PAGE_SIZE - 1);
        while page < end {
            if k.user_page(page, write).is_none() {
                return 0;
            }
            page += PAGE_SIZE;
        }
        1
    })
}

/// vm_map_lookup_entry (sys/vm/vm_map.c): TRUE and the entry containing
/// `addr`; otherwise FALSE and the entry before `addr`, or the map's
/// header when there is none. The map must be locked
/// (VM_MAP_ASSERT_LOCKED in FreeBSD).
extern "C" fn vm_map_lookup_entry(map: u64, addr: u64, entry: *mut u64) -> c_int {
    let (found, hit) = with(|k| {
        k.check_map(map, "vm_map_lookup_entry");
        if k.books.map_read_locks <= 0 {
            fail(format_args!("vm_map_lookup_entry: map not locked"));
        }
        k.books.lookups += 1;
        if let Some(e) = k.entries.iter().find(|e| e.start <= addr && addr < e.end) {
            if !k.books.watched.contains(&(e.start, e.end)) {
                k.books.watched.push((e.start, e.end));
            }
            return (e.block.addr, 1);
        }
        let before = k.entries.iter().rev().find(|e| e.end <= addr);
        (
            before.map_or(map + k.layout.vm_map_header, |e| e.block.addr),
            0,
        )
    });
    // SAFETY: the caller's `vm_map_entry_t *`, as FreeBSD writes it.
    unsafe { poke(entry as u64, found) };
    hit
}

/// vm_object_reference (sys/vm/vm_object.c): the object stays alive
/// until the matching vm_object_deallocate.
extern "C" fn vm_object_reference(object: u64) {
    with(|k| {
        k.object_ref(object);
        k.books.object_refs += 1;
    })
}

/// vm_object_deallocate (sys/vm/vm_object.c): gives back a reference the
/// module took.
extern "C" fn vm_object_deallocate(object: u64) {
    with(|k| {
        if k.books.object_refs == 0 {
            fail(format_args!(
                "vm_object_deallocate: the module holds no object reference"
            ));
        }
        k.books.object_refs -= 1;
        k.object_release(object);
    })
}

/// vm_fault_quick_hold_pages(9): holds (wires) the pages of
/// `addr..addr+len`, faulting them in as the calling thread; -1 if any is
/// not mapped with `prot`. More pages than `max` is a kernel panic.
extern "C" fn vm_fault_quick_hold_pages(
    map: u64,
    addr: u64,
    len: u64,
    prot: u8,
    ma: *mut u64,
    max: c_int,
) -> c_int {
    with(|k| {
        k.check_map(map, "vm_fault_quick_hold_pages");
        if len == 0 {
            return 0;
        }
        let Some(end) = addr.checked_add(len) else {
            return -1;
        };
        let first = addr & !(PAGE_SIZE - 1);
        let end = end.next_multiple_of(PAGE_SIZE);
        let count = (end - first) / PAGE_SIZE;
        if count > u64::try_from(max).unwrap_or(0) {
            fail(format_args!(
                "panic: vm_fault_quick_hold_pages: count > max."
            ));
        }
        let write = u64::from(prot) & k.layout.VM_PROT_WRITE != 0;
        let mut pages = Vec::new();
        for i in 0..count {
            match k.user_page(first + i * PAGE_SIZE, write) {
                Some(phys) => pages.push(phys),
                None => return -1,
            }
        }
        for (i, phys) in pages.into_iter().enumerate() {
            let m = hold(k, phys);
            // SAFETY: the caller passes an array of at least `max` entries.
            unsafe { ma.add(i).write(m) };
        }
        count as c_int
    })
}

/// One more hold on the page at `phys`; its `vm_page_t` (one per physical
/// page, as FreeBSD's vm_page_array has).
fn hold(k: &mut Kernel, phys: u64) -> u64 {
    k.books.holds += 1;
    k.books.held_peak = k.books.held_peak.max(k.books.holds - k.books.unholds);
    if let Some((m, entry)) = k.books.held.iter_mut().find(|(_, e)| e.0 == phys) {
        entry.1 += 1;
        return *m;
    }
    let block = Block::new(k.layout.sizeof_vm_page, 8);
    let l = k.layout;
    // SAFETY: a zeroed struct vm_page of the header size.
    unsafe { poke(block.addr + l.vm_page_phys_addr, phys) };
    // A page faulted in for the hold is all valid and, as FreeBSD's
    // syncer may have cleaned it since, not dirty.
    page_bits(k, block.addr + l.vm_page_valid, Some(l.VM_PAGE_BITS_ALL));
    match device_pages(k) {
        Some(DevicePages::Fictitious) => {
            k.books.device_pages += 1;
            // SAFETY: the `uint8_t flags` of the struct vm_page above.
            unsafe { poke::<u8>(block.addr + l.vm_page_flags, l.PG_FICTITIOUS as u8) };
        }
        Some(DevicePages::Unmanaged) => {
            k.books.device_pages += 1;
            // SAFETY: the `uint8_t oflags` of the struct vm_page above.
            unsafe { poke::<u8>(block.addr + l.vm_page_oflags, l.VPO_UNMANAGED as u8) };
        }
        None => {}
    }
    k.books.held.insert(block.addr, (phys, 1, block));
    block.addr
}

/// The kenv variable (set with the testbed's `--tunable`) that makes
/// every held page a device mapping's (/dev/mem, a DRM buffer):
/// `fictitious` (PG_FICTITIOUS, an OBJT_DEVICE/OBJT_SG page) or
/// `unmanaged` (VPO_UNMANAGED, an OBJT_PHYS page). The module must let go
/// of each and fail the call.
const DEVICE_PAGES: &str = "testbed.device_pages";

/// The kinds of device page `testbed.device_pages` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DevicePages {
    Fictitious,
    Unmanaged,
}

fn device_pages(k: &Kernel) -> Option<DevicePages> {
    let (_, v) = k.kenv.iter().find(|(n, _)| n == DEVICE_PAGES)?;
    match v.as_str() {
        "fictitious" => Some(DevicePages::Fictitious),
        "unmanaged" => Some(DevicePages::Unmanaged),
        _ => fail(format_args!("{DEVICE_PAGES}={v}: fictitious or unmanaged")),
    }
}

/// Reads, or with `set` writes, a `vm_page_bits_t` field (`valid`,
/// `dirty`) at `addr`: 8 bits on amd64 (PAGE_SIZE / DEV_BSIZE chunks,
/// sys/vm/vm_page.h).
fn page_bits(k: &Kernel, addr: u64, set: Option<u64>) -> u64 {
    if k.layout.sizeof_vm_page_bits_t != 1 {
        fail(format_args!(
            "vm_page_bits_t of {} bytes: the personality models 1",
            k.layout.sizeof_vm_page_bits_t
        ));
    }
    match set {
        // SAFETY: a `uint8_t` field of a struct vm_page block.
        Some(v) => unsafe {
            poke::<u8>(addr, v as u8);
            v
        },
        // SAFETY: as above.
        None => u64::from(unsafe { peek::<u8>(addr) }),
    }
}

/// vm_page_dirty_KBI (sys/vm/vm_page.c), the vm_page_dirty() of a
/// KLD_MODULE: sets every dirty bit, after FreeBSD's KASSERT that the
/// page is all valid. The module calls it only on pages it holds.
extern "C" fn vm_page_dirty_kbi(m: u64) {
    with(|k| {
        if !k.books.held.contains_key(&m) {
            fail(format_args!("vm_page_dirty: {m:#x} is not a held page"));
        }
        let l = k.layout;
        if page_bits(k, m + l.vm_page_valid, None) != l.VM_PAGE_BITS_ALL {
            fail(format_args!("panic: vm_page_dirty: page is invalid!"));
        }
        page_bits(k, m + l.vm_page_dirty, Some(l.VM_PAGE_BITS_ALL));
    })
}

/// vm_page_unhold_pages(9): drops one hold on each page.
extern "C" fn vm_page_unhold_pages(ma: *const u64, count: c_int) {
    with(|k| {
        for i in 0..usize::try_from(count).unwrap_or(0) {
            // SAFETY: the caller passes `count` vm_page_t's.
            let m = unsafe { ma.add(i).read() };
            if !k.books.held.contains_key(&m) {
                fail(format_args!(
                    "vm_page_unhold_pages: {m:#x} is not a held page"
                ));
            }
            let l = k.layout;
            // SAFETY: the `uint8_t flags` and `oflags` of a held page's
            // struct vm_page.
            let (flags, oflags) = unsafe {
                (
                    u64::from(peek::<u8>(m + l.vm_page_flags)),
                    u64::from(peek::<u8>(m + l.vm_page_oflags)),
                )
            };
            let managed = flags & l.PG_FICTITIOUS == 0 && oflags & l.VPO_UNMANAGED == 0;
            if managed && page_bits(k, m + l.vm_page_dirty, None) != l.VM_PAGE_BITS_ALL {
                k.books.unheld_clean += 1;
            }
            k.books.unholds += 1;
            let Some(entry) = k.books.held.get_mut(&m) else {
                continue;
            };
            entry.1 -= 1;
            if entry.1 == 0 {
                if let Some((phys, _, block)) = k.books.held.remove(&m) {
                    block.free();
                    if let Some(i) = k.books.orphans.iter().position(|&p| p == phys) {
                        k.books.orphans.swap_remove(i);
                        k.books.orphans_released.push(phys);
                    }
                }
            }
        }
    })
}

/// malloc_aligned(9) (sys/kern/kern_malloc.c): `size` bytes aligned to
/// `align` (a power of two up to a page) of malloc type `mtype`.
/// Exactly one of M_WAITOK / M_NOWAIT (a KASSERT in FreeBSD); M_ZERO
/// zeroes; M_NOWAIT may fail with NULL; M_WAITOK never fails (FreeBSD
/// would sleep, the testbed cannot: it fails the run).
extern "C" fn malloc_aligned(size: usize, align: usize, mtype: u64, flags: c_int) -> *mut c_void {
    let (nowait, zero) = with(|k| {
        let l = k.layout;
        let flags = flags as u64;
        if (flags & l.M_WAITOK != 0) == (flags & l.M_NOWAIT != 0) {
            fail(format_args!("panic: malloc: bad malloc flags: {flags:#x}"));
        }
        if !align.is_power_of_two() || align as u64 > PAGE_SIZE {
            fail(format_args!(
                "panic: malloc_domainset_aligned: align {align} (size {size}) too large"
            ));
        }
        if !k.books.malloc_types.contains_key(&mtype) {
            fail(format_args!(
                "malloc: type {mtype:#x} is not registered (no malloc_init)"
            ));
        }
        (flags & l.M_NOWAIT != 0, flags & l.M_ZERO != 0)
    });
    let layout = AllocLayout::from_size_align(size.max(1), align)
        .unwrap_or_else(|_| fail(format_args!("malloc: size {size} too large")));
    // SAFETY: non-zero size.
    let p = unsafe {
        if zero {
            alloc_zeroed(layout)
        } else {
            alloc(layout)
        }
    };
    if p.is_null() {
        if nowait {
            return core::ptr::null_mut();
        }
        fail(format_args!(
            "malloc(M_WAITOK) of {size} bytes: out of memory"
        ));
    }
    if !zero {
        for i in 0..layout.size() / 4 {
            // SAFETY: inside the new block.
            unsafe { p.cast::<u32>().add(i).write_unaligned(JUNK) };
        }
    }
    with(|k| {
        k.books
            .mallocs
            .insert(p as u64, (layout.size(), align, mtype));
        if let Some(t) = k.books.malloc_types.get_mut(&mtype) {
            t.in_use += 1;
            t.bytes += layout.size() as u64;
            t.requests += 1;
        }
    });
    p.cast()
}

/// free(9): NULL is allowed; anything else must be a live block of the
/// same type.
extern "C" fn free(addr: *mut c_void, mtype: u64) {
    if addr.is_null() {
        return;
    }
    let (size, align) = with(|k| {
        let Some((size, align, t)) = k.books.mallocs.remove(&(addr as u64)) else {
            fail(format_args!(
                "panic: free: address {addr:p} was not allocated"
            ));
        };
        if t != mtype {
            fail(format_args!(
                "panic: free: {addr:p} of type {t:#x} freed as {mtype:#x}"
            ));
        }
        if let Some(t) = k.books.malloc_types.get_mut(&mtype) {
            t.in_use -= 1;
            t.bytes -= size as u64;
        }
        (size, align)
    });
    // SAFETY: the block came from malloc_aligned with this layout.
    unsafe {
        dealloc(
            addr.cast(),
            AllocLayout::from_size_align_unchecked(size, align),
        )
    };
}

/// malloc_init(9) (the MALLOC_DEFINE sysinit): registers the type.
extern "C" fn malloc_init(data: u64) {
    with(|k| {
        // SAFETY: `data` is the module's struct malloc_type.
        let (version, desc): (u64, u64) = unsafe {
            (
                peek(data + k.layout.malloc_type_ks_version),
                peek(data + k.layout.malloc_type_ks_shortdesc),
            )
        };
        if version != k.layout.M_VERSION {
            fail(format_args!(
                "panic: malloc_init: type {data:#x} with bad version {version}"
            ));
        }
        if k.books.malloc_types.contains_key(&data) {
            fail(format_args!("malloc_init: type {data:#x} registered twice"));
        }
        // SAFETY: ks_shortdesc is a string of the module.
        let name = String::from_utf8_lossy(&unsafe { c_string(desc, 64) }).into_owned();
        k.books.malloc_types.insert(
            data,
            MallocType {
                name,
                in_use: 0,
                bytes: 0,
                requests: 0,
            },
        );
    })
}

/// malloc_uninit(9): unregisters the type, with FreeBSD's warning when
/// blocks of it are still allocated.
extern "C" fn malloc_uninit(data: u64) {
    let leaked = with(|k| {
        let Some(t) = k.books.malloc_types.remove(&data) else {
            fail(format_args!(
                "malloc_uninit: type {data:#x} is not registered"
            ));
        };
        (t.in_use != 0).then(|| {
            alloc::format!(
                "Warning: memory type {} leaked memory on destroy ({} allocations, {} bytes leaked).\n",
                t.name, t.in_use, t.bytes
            )
        })
    });
    if let Some(text) = leaked {
        console(text.as_bytes());
    }
}

/// Calls a module event handler, `int (*)(module_t, int, void *)`.
pub fn module_event(m: &Module, event: u64) -> c_int {
    enter_kernel();
    // SAFETY: evhand is the module's modeventhand_t from its moduledata;
    // the personality's lock is not held.
    unsafe {
        let f: extern "C" fn(u64, c_int, u64) -> c_int = core::mem::transmute(m.evhand as usize);
        f(m.handle.addr, event as c_int, m.private)
    }
}

/// module_register_init(9) (the DECLARE_MODULE sysinit): registers the
/// module and sends it MOD_LOAD; on failure FreeBSD logs, sends
/// MOD_UNLOAD and drops it.
extern "C" fn module_register_init(data: u64) {
    // struct moduledata { const char *name; modeventhand_t evhand; void *priv; }
    // SAFETY: `data` is the module's moduledata_t.
    let (name, evhand, private): (u64, u64, u64) =
        unsafe { (peek(data), peek(data + 8), peek(data + 16)) };
    // SAFETY: the module's name string.
    let name = String::from_utf8_lossy(&unsafe { c_string(name, 64) }).into_owned();
    let (exists, load) = with(|k| (k.modules.iter().any(|m| m.name == name), k.layout.MOD_LOAD));
    if exists {
        console(
            alloc::format!("module_register_init: module_register({name}) error 17\n").as_bytes(),
        );
        return;
    }
    let module = Module {
        name: name.clone(),
        evhand,
        private,
        handle: Block::new(64, 8),
        load_error: 0,
    };
    let error = module_event(&module, load);
    if error != 0 {
        console(
            alloc::format!(
                "module_register_init: MOD_LOAD ({name}, {evhand:#x}, {private:#x}) error {error}\n"
            )
            .as_bytes(),
        );
        let unload = with(|k| k.layout.MOD_UNLOAD);
        module_event(&module, unload);
    }
    with(|k| {
        k.modules.push(Module {
            load_error: error,
            ..module
        })
    });
}
