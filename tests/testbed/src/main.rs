//! The testbed kernel (TESTBED.md): a small x86_64 kernel that QEMU boots
//! through PVH, which runs guest programs at ring 3 and reports to the
//! host runner (tests/testbed/run) over a serial channel.
#![no_std]
#![no_main]
#![deny(unsafe_op_in_unsafe_fn)]

extern crate alloc;

mod boot;
mod channel;
mod cpu;
mod exit;
mod fpu;
mod freebsd;
mod fuzz;
mod heap;
mod initrd;
mod mem;
mod monitor;
mod native;
mod nmi;
mod pvh;
mod serial;
mod timer;
mod trap;
mod user;
mod x86;

use alloc::rc::Rc;
use core::cell::RefCell;
use heap::Heap;

#[global_allocator]
static HEAP: Heap = Heap::empty();

/// Share of the free physical memory (in percent) that becomes the
/// kernel heap (the client core's file system lives there).
const HEAP_PERCENT: u64 = 30;
/// Staging area for guest output when the runner shares guest RAM.
const STAGING_MAX: u64 = 64 << 20;
const STAGING_PERCENT: u64 = 12;

/// Entered from the boot trampoline on the boot stack, interrupts off,
/// with the physical address of `hvm_start_info`.
pub extern "C" fn kmain(start_info: u64) -> ! {
    serial::Uart::new(serial::COM1).init();
    log!("testbed: boot");
    let info = pvh::StartInfo::read(start_info)
        .unwrap_or_else(|e| fail(format_args!("bad PVH start info: {e}")));
    let mut features = cpu::detect_features();
    let mut frames = mem::Frames::from_memmap(&info);
    let paging = mem::PagingFeatures {
        nx: features.nx,
        global: features.global_pages,
    };
    let space = mem::build_kernel_space(&mut frames, &paging)
        .unwrap_or_else(|e| fail(format_args!("page tables: {e:?}")));
    cpu::enable_features(&mut features);
    cpu::init_tables(cpu::GdtLayout::Testbed);

    let heap_size = frames.free_bytes() * HEAP_PERCENT / 100;
    let heap_phys = frames
        .alloc(heap_size, mem::PAGE_SIZE)
        .unwrap_or_else(|| fail(format_args!("no room for a {heap_size}-byte heap")));
    // SAFETY: the region was just taken from the frame allocator and is
    // mapped by the DMAP; nothing else will use it.
    unsafe { HEAP.init(mem::phys_to_virt(heap_phys) as usize, heap_size as usize) };

    let shared_memory = info.cmdline_value("shm") == Some("1");
    let staging = if shared_memory {
        let size = (frames.free_bytes() * STAGING_PERCENT / 100).min(STAGING_MAX);
        frames
            .alloc(size, mem::PAGE_SIZE)
            .map(|phys| (phys, size as usize))
    } else {
        None
    };
    let ram_size = frames.largest_free();
    let ram_phys = frames
        .alloc(ram_size, mem::PAGE_SIZE)
        .unwrap_or_else(|| fail(format_args!("no room for guest RAM")));

    let tsc_hint = info
        .cmdline_value("tsc_khz")
        .and_then(|v| v.parse().ok())
        .or(features.tsc_khz_cpuid);
    let clock = timer::Clock::start(features.apic, tsc_hint)
        .unwrap_or_else(|e| fail(format_args!("timer: {e:?}")));
    if let Some(hz) = info
        .cmdline_value("nmi")
        .and_then(|v| v.parse().ok())
        .filter(|&hz: &u64| hz > 0)
    {
        nmi::start(hz);
    }
    log!(
        "testbed: nx={} pge={} smep={} smap={} umip={} fsgsbase={} xsave={} xcr0={:#x} fpu_area={} tsc={}kHz({})",
        features.nx,
        features.global_pages,
        features.smep,
        features.smap,
        features.umip,
        features.fsgsbase,
        features.xsave,
        features.xcr0,
        features.fpu_area_size,
        clock.tsc_khz,
        clock.source,
    );
    log!(
        "testbed: heap {} MiB, guest RAM {} MiB at {ram_phys:#x}, staging {} MiB",
        heap_size >> 20,
        ram_size >> 20,
        staging.map_or(0, |(_, size)| size >> 20)
    );

    let (initrd_phys, initrd_size) = info
        .initrd
        .unwrap_or_else(|| fail(format_args!("no initrd")));
    // SAFETY: the initrd lies in RAM the frame allocator reserved; the DMAP
    // maps all of RAM.
    let initrd = unsafe {
        core::slice::from_raw_parts(
            mem::phys_to_virt(initrd_phys) as *const u8,
            initrd_size as usize,
        )
    };
    let (config_bytes, guest_archive) =
        initrd::split(initrd).unwrap_or_else(|e| fail(format_args!("initrd: {e}")));
    let config = initrd::Config::parse(config_bytes).unwrap_or_else(|e| fail(format_args!("{e}")));
    let channel = Rc::new(RefCell::new(channel::Channel::open(shared_memory, staging)));
    if config.mode == initrd::Mode::Kld {
        // The module is a FreeBSD kernel's: it runs on FreeBSD's GDT.
        cpu::init_tables(cpu::GdtLayout::FreeBsd);
        let run = freebsd::KldRun {
            config: &config,
            features,
            clock: &clock,
            space: &space,
            ram: (ram_phys, ram_size as usize),
        };
        match run.run(guest_archive, &channel) {
            Ok(never) => match never {},
            Err(e) => fail(format_args!("kld run: {e}")),
        }
    }
    if config.mode == initrd::Mode::Monitor {
        // FreeBSD's GDT too: the host CS has index 4, that of the CS 0x23
        // of i386 guests under a long-mode guest OS, so the world switch
        // meets the clash it meets on FreeBSD.
        cpu::init_tables(cpu::GdtLayout::FreeBsd);
        let run = monitor::MonitorRun {
            config: &config,
            features,
            clock: &clock,
            ram: (ram_phys, ram_size as usize),
        };
        match run.run(guest_archive, &channel) {
            Ok(never) => match never {},
            Err(e) => fail(format_args!("monitor run: {e}")),
        }
    }
    let native = native::Native {
        config: &config,
        features,
        clock: &clock,
        space: &space,
        ram: (ram_phys, ram_size as usize),
    };
    match native.run(guest_archive, &channel) {
        Ok(never) => match never {},
        Err(e) => fail(format_args!("native run: {e}")),
    }
}

/// Ends the run as a testbed failure after logging why.
pub fn fail(why: core::fmt::Arguments) -> ! {
    log!("testbed: FAILURE: {why}");
    exit::failure()
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    fail(format_args!("panic: {info}"))
}
