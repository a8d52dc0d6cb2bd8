//! The guest-RAM error paths of issue 7 (item 5), `kqemu-run --ram-checks
//! limit|munmap|device`: each prints `PASS <name>: ...` or `FAIL <name>: ...`
//! as checks.rs does, the last line counts them.
//!
//! - `limit`: run with the loader tunable `hw.kqemu.max_locked_pages`
//!   below what one instance needs; INIT must answer ENOMEM (the module's
//!   log line naming the limit is the personality's check).
//! - `munmap`: a tiny guest runs (the module holds its RAM pages); an
//!   mmap and munmap elsewhere do not disturb it (the personality checks
//!   that the module released no page after them); guest RAM unmapped and
//!   mapped anew at the same address (MAP_FIXED) is the client's new,
//!   zeroed memory, and the guest runs on it; then the client unmaps its
//!   guest RAM, the next EXECs answer EFAULT; then the list pages the
//!   module holds since INIT go too, and close releases everything (the
//!   personality's books must balance at unload).
//! - `device`: run with the testbed's `testbed.device_pages` tunable, which
//!   makes every page the module holds a device mapping's (fictitious or
//!   unmanaged, as /dev/mem or a DRM buffer mapped as guest RAM gives):
//!   INIT must answer EFAULT (the personality checks that the module let
//!   go of each page).

use core::fmt::Write;

use kqemu::abi::{
    seg, KqemuCpuState, KqemuInit, KqemuPhysMem, KqemuSegmentCache, KQEMU_EXEC, KQEMU_INIT,
    KQEMU_IO_MEM_RAM, KQEMU_RET_SOFTMMU, KQEMU_SET_PHYS_MEM,
};
use kqemu_run::checks::{allocate, ioctl_with, summary, Buffers, Report, PAGE, RAM_SIZE};
use kqemu_run::errno::EFAULT;
use kqemu_run::{System, O_RDWR};

/// ENOMEM (sys/sys/errno.h).
const ENOMEM: i32 = 12;
/// Guest-physical (= linear: paging is off) places in guest RAM.
const GDT: u64 = 0x1000;
const CODE: u64 = 0x2000;
const DATA_READ: u64 = 0x3000;
const DATA_WRITTEN: u64 = 0x4000;
/// The guest's selectors and their descriptors: flat 4 GiB, DPL 3, 32-bit
/// code (type 0xb) and data (type 0x3), as Linux's i386 user segments.
const USER_CS: u16 = 0x73;
const USER_DS: u16 = 0x7b;
const USER_CS32: u64 = 0x00cf_fb00_0000_ffff;
const USER_DS32: u64 = 0x00cf_f300_0000_ffff;
/// The guest: `mov eax, [DATA_READ]`, `mov [DATA_WRITTEN], eax`, `hlt`
/// (privileged: the monitor hands it to the client, KQEMU_RET_SOFTMMU).
const GUEST_CODE: [u8; 11] = [
    0xa1, 0x00, 0x30, 0x00, 0x00, 0xa3, 0x00, 0x40, 0x00, 0x00, 0xf4,
];
/// Offset of the `hlt` in GUEST_CODE.
const HLT_AT: u64 = 10;
/// CR0.PE | ET | NE (paging off: linear addresses are physical).
const CR0_GUEST: u64 = 0x1 | 0x10 | 0x20;
/// EFLAGS.IF and the always-one bit 1.
const EFLAGS_IF_FIXED: u64 = 0x202;
/// QEMU's `a20_mask` with A20 enabled.
const A20_ENABLED: u64 = u64::MAX;
/// What the guest copies from DATA_READ to DATA_WRITTEN ("meqk"), and
/// what it finds in guest RAM mapped anew ("wenk").
const GUEST_DATA: u32 = 0x6b71_656d;
const REMAPPED_DATA: u32 = 0x6b6e_6577;
/// MAP_FIXED (sys/sys/mman.h): the System trait's mmap has no address.
const MAP_FIXED: u64 = 0x10;
/// A dirty byte of a page the client has not translated code from.
const ALL_DIRTY: u8 = 0xff;

/// Which checks `--ram-checks` runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RamChecks {
    Limit,
    Munmap,
    Device,
}

impl RamChecks {
    pub fn parse(name: &[u8]) -> Option<Self> {
        match name {
            b"limit" => Some(Self::Limit),
            b"munmap" => Some(Self::Munmap),
            b"device" => Some(Self::Device),
            _ => None,
        }
    }
}

/// Runs the checks; the process's exit status (0: all passed).
pub fn run<S: System>(sys: &mut S, which: RamChecks) -> i32 {
    let mut r = Report::new(sys);
    let got = r.sys.open(c"/dev/kqemu", O_RDWR);
    if r.expect("open-rdwr", got, Ok(())) {
        if let Ok(fd) = got {
            match which {
                RamChecks::Limit => limit(&mut r, fd),
                RamChecks::Munmap => munmap(&mut r, fd),
                RamChecks::Device => device(&mut r, fd),
            }
            let closed = r.sys.close(fd);
            r.expect("close", closed, Ok(()));
        }
    }
    let (_, failed) = summary(r);
    i32::from(failed != 0)
}

/// INIT past `hw.kqemu.max_locked_pages`: ENOMEM, and nothing held.
fn limit<S: System>(r: &mut Report<'_, S>, fd: i32) {
    let Some(b) = allocate(r) else { return };
    let mut init = b.init();
    let got = ioctl_with(r.sys, fd, KQEMU_INIT, &mut init);
    r.expect("init-past-max-locked-pages", got, Err(ENOMEM));
}

/// INIT over memory whose pages are a device's: EFAULT, nothing held.
fn device<S: System>(r: &mut Report<'_, S>, fd: i32) {
    let Some(b) = allocate(r) else { return };
    let mut init = b.init();
    let got = ioctl_with(r.sys, fd, KQEMU_INIT, &mut init);
    r.expect("init-device-pages", got, Err(EFAULT));
}

/// A flat 32-bit user segment with `selector` and descriptor `desc`.
fn flat(selector: u16, desc: u64) -> KqemuSegmentCache {
    KqemuSegmentCache {
        selector,
        flags: (desc >> 32) as u32,
        base: 0,
        limit: u32::MAX,
        ..KqemuSegmentCache::default()
    }
}

/// The tiny guest's program, GDT and dirty bytes, written by the client
/// into the shared memory as QEMU loads a guest; `data` at DATA_READ.
fn load_guest(b: &Buffers, data: u32) {
    let ram = b.ram as *mut u8;
    // SAFETY: `ram` is RAM_SIZE bytes of this process's fresh shared
    // mapping; every offset below is inside it; `dirty` is RAM_SIZE / PAGE
    // bytes; the module does not run meanwhile.
    unsafe {
        for (selector, desc) in [(USER_CS, USER_CS32), (USER_DS, USER_DS32)] {
            let at = GDT as usize + usize::from(selector & !7);
            ram.add(at).cast::<u64>().write_unaligned(desc);
        }
        for (i, byte) in GUEST_CODE.iter().enumerate() {
            ram.add(CODE as usize + i).write(*byte);
        }
        ram.add(DATA_READ as usize)
            .cast::<u32>()
            .write_unaligned(data);
        core::ptr::write_bytes(b.dirty as *mut u8, ALL_DIRTY, (RAM_SIZE / PAGE) as usize);
    }
}

fn guest_state() -> KqemuCpuState {
    let mut state = KqemuCpuState {
        eip: CODE,
        eflags: EFLAGS_IF_FIXED,
        cr0: CR0_GUEST,
        a20_mask: A20_ENABLED,
        cpl: 3,
        user_only: 1,
        ..KqemuCpuState::default()
    };
    state.segs[seg::CS] = flat(USER_CS, USER_CS32);
    for i in [seg::SS, seg::DS, seg::ES, seg::FS, seg::GS] {
        state.segs[i] = flat(USER_DS, USER_DS32);
    }
    state.gdt = KqemuSegmentCache {
        base: GDT,
        limit: 0xff,
        ..KqemuSegmentCache::default()
    };
    state
}

/// Runs the tiny guest once: it must copy `want` from DATA_READ to
/// DATA_WRITTEN (cleared first) of the client's current mapping.
fn exec_guest<S: System>(r: &mut Report<'_, S>, fd: i32, b: &Buffers, want: u32, name: &str) {
    // SAFETY: DATA_WRITTEN is inside the mapping, which is mapped; the
    // module does not run meanwhile.
    unsafe { ((b.ram + DATA_WRITTEN) as *mut u32).write_volatile(0) };
    let mut state = guest_state();
    let got = ioctl_with(r.sys, fd, KQEMU_EXEC, &mut state);
    // SAFETY: as above.
    let copied = unsafe { ((b.ram + DATA_WRITTEN) as *const u32).read_volatile() };
    r.result(
        got == Ok(0)
            && state.retval == KQEMU_RET_SOFTMMU
            && state.eip == CODE + HLT_AT
            && copied == want,
        name,
        format_args!(
            "{got:?}, retval {:#x} at eip {:#x} (want {KQEMU_RET_SOFTMMU:#x} at {:#x}), \
             copied {copied:#x} (want {want:#x})",
            state.retval,
            state.eip,
            CODE + HLT_AT
        ),
    );
}

/// Guest-RAM map changes between EXECs: elsewhere, the same address
/// mapped anew, guest RAM unmapped, the list pages unmapped.
fn munmap<S: System>(r: &mut Report<'_, S>, fd: i32) {
    let Some(b) = allocate(r) else { return };
    load_guest(&b, GUEST_DATA);
    let mut init = b.init();
    let got = ioctl_with(r.sys, fd, KQEMU_INIT, &mut init);
    if !r.expect("init-valid", got, Ok(())) {
        return;
    }
    let mut ram = KqemuPhysMem {
        phys_addr: 0,
        size: RAM_SIZE,
        ram_addr: 0,
        io_index: KQEMU_IO_MEM_RAM,
        padding1: 0,
    };
    let got = ioctl_with(r.sys, fd, KQEMU_SET_PHYS_MEM, &mut ram);
    r.expect("set-phys-mem-ram", got, Ok(()));

    // The guest reads one page and writes another natively, then stops
    // at `hlt`: the module locked its code and data pages to run it.
    exec_guest(r, fd, &b, GUEST_DATA, "exec-guest");

    // An mmap and munmap elsewhere (QEMU does them all the time): the
    // map's timestamp moves, the mappings of guest RAM stay, and so do the
    // module's caches (the personality's unrelated-map-change-keeps-holds).
    let got = r.sys.mmap_shared_anon(PAGE);
    if r.expect("mmap-elsewhere", got, Ok(())) {
        if let Ok(other) = got {
            let got = r.sys.munmap(other, PAGE);
            r.expect("munmap-elsewhere", got, Ok(()));
        }
    }
    exec_guest(r, fd, &b, GUEST_DATA, "exec-after-unrelated-map-change");

    // Guest RAM unmapped and mapped anew at the same address: the client
    // now has new, zeroed memory there, loads the guest into it again, and
    // the guest must run on that memory, not on the pages the module held
    // from the old mapping (kqemu.4).
    let got = r.sys.munmap(b.ram, RAM_SIZE);
    r.expect("munmap-guest-ram-to-remap", got, Ok(()));
    let got = crate::syscall(
        crate::SYS_MMAP,
        [
            b.ram,
            RAM_SIZE,
            crate::PROT_READ | crate::PROT_WRITE,
            crate::MAP_SHARED | crate::MAP_ANON | MAP_FIXED,
            u64::MAX,
            0,
        ],
    );
    r.result(
        got == Ok(b.ram),
        "mmap-fixed-guest-ram",
        format_args!("{got:x?} (want Ok({:#x}))", b.ram),
    );
    if got != Ok(b.ram) {
        return;
    }
    // SAFETY: the new mapping is RAM_SIZE bytes at b.ram.
    let zeroed = unsafe { ((b.ram + DATA_READ) as *const u32).read_volatile() };
    r.result(
        zeroed == 0,
        "remapped-guest-ram-zeroed",
        format_args!("{zeroed:#x} at DATA_READ"),
    );
    load_guest(&b, REMAPPED_DATA);
    exec_guest(r, fd, &b, REMAPPED_DATA, "exec-after-remap");

    let got = r.sys.munmap(b.ram, RAM_SIZE);
    r.expect("munmap-guest-ram", got, Ok(()));
    for name in ["exec-after-munmap", "exec-again-after-munmap"] {
        let mut state = guest_state();
        let got = ioctl_with(r.sys, fd, KQEMU_EXEC, &mut state);
        r.expect(name, got, Err(EFAULT));
    }
    // The list pages are held since INIT: unmapping them must not leave
    // the module with pages it can no longer give back.
    let got = r.sys.munmap(b.lists, 3 * PAGE);
    r.expect("munmap-list-pages", got, Ok(()));
    let mut state = guest_state();
    let got = ioctl_with(r.sys, fd, KQEMU_EXEC, &mut state);
    r.expect("exec-after-munmap-lists", got, Err(EFAULT));
}
