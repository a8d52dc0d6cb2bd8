//! Kld mode (TESTBED.md rung 3): the FreeBSD personality. The testbed
//! loads the real `kqemu.ko` the way FreeBSD's kld linker does
//! (`kqemu-kldload`), at kernel addresses, against the KPI functions of
//! [`kpi`], registers its sysctls, runs its SYSINITs (malloc_init, then
//! module_register_init → MOD_LOAD → make_dev_s), then runs a static
//! FreeBSD/amd64 program (`kqemu-run`) at ring 3 whose FreeBSD system
//! calls reach the module's cdevsw as on FreeBSD. At the end the module
//! is unloaded and the books must show nothing left behind. The process
//! has signals (signal.rs: handlers, the interval timer, sigreturn) and
//! threads (threads.rs: thr_new, preemption inside the module), so a
//! descriptor can be closed while an ioctl on it runs (devfs.rs keeps the
//! file until that ioctl returns).
//!
//! Guest files: `/boot/modules/kqemu.ko`, `/boot/testbed-release` (the
//! FreeBSD release the module was built for: 14 or 15) and
//! `/boot/loader.conf` (tunables). The personality's own checks go to
//! stderr as `kld: PASS|FAIL <name>: <detail>` lines.

mod cpu;
mod devfs;
mod kpi;
mod layout;
mod printf;
mod process;
mod signal;
mod sysctl;
mod threads;

use crate::channel::Channel;
use crate::cpu::Features;
use crate::initrd::Config;
use crate::log;
use crate::mem::{phys_to_virt, KernelSpace};
use crate::timer::Clock;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::RefCell;
use core::convert::Infallible;
use core::fmt;
use kqemu_client::{GuestRam, MemFs};
use kqemu_kldload::{Kld, Loader, Memory};

/// Where the module's image lives: 8 MiB (four 2 MiB pages; the switcher's
/// per-CPU blocks make the module's .bss about 4 MiB) at KERNBASE + 512 MiB,
/// inside the kernel's top 2 GiB as `-mcmodel=kernel` code needs (its
/// R_X86_64_32S and PC32 relocations reach the kernel's own symbols).
const MODULE_AREA: u64 = 0xffff_ffff_a000_0000;
const MODULE_AREA_SIZE: u64 = 8 << 20;
const LARGE_PAGE: u64 = 2 << 20;
/// Page-table indices of MODULE_AREA: PML4 511, PDPT 510, PD 256 (to 259).
const MODULE_PML4: u64 = 511;
const MODULE_PDPT: u64 = 510;
const MODULE_PD: u64 = 256;
/// PDE bits: present, writable, large page; executable (no NX): the image
/// holds text and data, as FreeBSD's kld memory does.
const PDE_MODULE: u64 = 0x1 | 0x2 | 0x80;
const PTE_FRAME: u64 = 0x000f_ffff_ffff_f000;

const MODULE_PATH: &str = "/boot/modules/kqemu.ko";
const RELEASE_PATH: &str = "/boot/testbed-release";
/// The kenv variable (`--tunable`) that makes the personality's CPU one
/// with a high index (PCPU(cpuid)), as on a host with many CPUs; a comma
/// list of up to `cpu::MAX_CPUIDS` indices moves it to the next one at
/// each ioctl.
const CPUID_TUNABLE: &str = "testbed.cpuid";
/// MAXCPU of FreeBSD amd64 (sys/amd64/include/param.h).
const MAXCPU: u32 = 1024;
const LOADER_CONF: &str = "/boot/loader.conf";
/// The module's devfs node and the contract's defaults for it.
const DEVICE_NAME: &str = "kqemu";
const DEFAULT_MODE: u32 = 0o660;
const DEFAULT_GID: u32 = 0;
/// `kldfind`/`kldunload` file id of the module (the kernel is 1).
pub const MODULE_FILEID: i32 = 2;
/// FreeBSD amd64's kernel CS, GSEL(GCODE_SEL, SEL_KPL) (GCODE_SEL 4,
/// sys/x86/include/segments.h): the GDT kld mode runs on (crate::cpu).
const FREEBSD_KERNEL_CS: u16 = 4 << 3;
/// Exit status of the run when the personality's own checks failed.
const STATUS_CHECKS_FAILED: i32 = 1;

pub enum KldError {
    Archive(kqemu_client::cpio::CpioError),
    Missing(&'static str),
    Release(String),
    Ram,
    Channel,
    CpuId(String),
}

impl fmt::Display for KldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KldError::Archive(e) => write!(f, "guest archive: {e}"),
            KldError::Missing(p) => write!(f, "{p} is not in the guest archive"),
            KldError::Release(r) => write!(f, "FreeBSD release {r:?} is not 14 or 15"),
            KldError::Ram => write!(f, "no room for the module area in guest RAM"),
            KldError::Channel => write!(f, "the host channel is stuck"),
            KldError::CpuId(v) => write!(
                f,
                "{CPUID_TUNABLE}={v:?} is not 1 to {} CPU indices below MAXCPU ({MAXCPU})",
                cpu::MAX_CPUIDS
            ),
        }
    }
}

/// The module's image memory: the DMAP alias of the module area, which
/// the loader fills; the module runs at MODULE_AREA.
pub struct ModuleImage {
    ptr: *mut u8,
    len: usize,
}

impl AsRef<[u8]> for ModuleImage {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the module area's frames, reserved for the image.
        unsafe { core::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl AsMut<[u8]> for ModuleImage {
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above; only the loader and the module write it.
        unsafe { core::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

struct ModuleArea {
    phys: u64,
    taken: bool,
}

impl Memory for ModuleArea {
    type Region = ModuleImage;

    fn alloc(&mut self, size: usize, align: usize) -> Option<(u64, ModuleImage)> {
        if self.taken || size as u64 > MODULE_AREA_SIZE || align as u64 > MODULE_AREA_SIZE {
            return None;
        }
        self.taken = true;
        let ptr = phys_to_virt(self.phys) as *mut u8;
        // SAFETY: the area's frames; zeroed as kld memory is.
        unsafe { core::ptr::write_bytes(ptr, 0, MODULE_AREA_SIZE as usize) };
        Some((
            MODULE_AREA,
            ModuleImage {
                ptr,
                len: MODULE_AREA_SIZE as usize,
            },
        ))
    }
}

/// Maps MODULE_AREA to the 8 MiB at `phys` in the kernel's page tables.
fn map_module_area(phys: u64) {
    let mut table = crate::x86::read_cr3() & PTE_FRAME;
    for index in [MODULE_PML4, MODULE_PDPT] {
        // SAFETY: the kernel's page tables, reached through the DMAP;
        // build_kernel_space made both levels for KERNBASE.
        table = unsafe { kpi::peek::<u64>(phys_to_virt(table) + index * 8) } & PTE_FRAME;
    }
    for i in 0..MODULE_AREA_SIZE / LARGE_PAGE {
        let virt = MODULE_AREA + i * LARGE_PAGE;
        // SAFETY: PD entries 256.. of the KERNBASE gigabyte are unused (the
        // kernel image ends far below 512 MiB); the frames belong to the area.
        unsafe {
            kpi::poke(
                phys_to_virt(table) + (MODULE_PD + i) * 8,
                (phys + i * LARGE_PAGE) | PDE_MODULE,
            );
            core::arch::asm!("invlpg [{}]", in(reg) virt, options(nostack, preserves_flags));
        }
    }
}

/// The personality's own results, sent to stderr as `kld: PASS|FAIL` lines.
pub struct Checks {
    lines: Vec<u8>,
    pub failed: u32,
    pub passed: u32,
}

impl Checks {
    fn new() -> Checks {
        Checks {
            lines: Vec::new(),
            failed: 0,
            passed: 0,
        }
    }

    pub fn check(&mut self, ok: bool, name: &str, detail: fmt::Arguments<'_>) {
        let line = alloc::format!(
            "kld: {} {name}: {detail}\n",
            if ok { "PASS" } else { "FAIL" }
        );
        log!("{}", line.trim_end());
        self.lines.extend_from_slice(line.as_bytes());
        if ok {
            self.passed += 1;
        } else {
            self.failed += 1;
        }
    }

    fn flush(&mut self, channel: &Rc<RefCell<Channel>>) -> Result<(), KldError> {
        let lines = core::mem::take(&mut self.lines);
        channel
            .borrow_mut()
            .guest_output(true, &lines)
            .map_err(|_| KldError::Channel)
    }
}

/// `name="value"` lines of loader.conf(5); `#` starts a comment.
fn parse_loader_conf(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|line| {
            let line = line.split('#').next()?.trim();
            let (name, value) = line.split_once('=')?;
            Some((
                String::from(name.trim()),
                String::from(value.trim().trim_matches('"')),
            ))
        })
        .collect()
}

/// The loaded module and what unloading it needs.
pub struct Loaded {
    kld: Kld<ModuleImage>,
    oids: Vec<u64>,
}

/// kern_kldunload → linker_file_unload: every module of the file is asked
/// to quiesce, then unloaded (MOD_QUIESCE, MOD_UNLOAD); any refusal stops
/// the unload with that error. Then the SYSUNINITs run in reverse order,
/// the sysctls go, and the image is freed.
pub fn unload(loaded: &mut Option<Loaded>, checks: &mut Checks) -> i32 {
    let Some(l) = loaded.as_ref() else {
        return kpi::with(|k| k.layout.ENOENT as i32);
    };
    let (modules, lay) = kpi::with(|k| (k.modules.clone(), k.layout));
    let modules: Vec<_> = modules.into_iter().filter(|m| m.load_error == 0).collect();
    let benign = |e: i32| e as u64 == lay.EOPNOTSUPP || e as u64 == lay.EINVAL;
    for m in &modules {
        let e = kpi::module_event(m, lay.MOD_QUIESCE);
        if e != 0 && !benign(e) {
            log!("kld: MOD_QUIESCE of {} refused: error {e}", m.name);
            return e;
        }
    }
    for m in &modules {
        let e = kpi::module_event(m, lay.MOD_QUIESCE);
        let e = if e == 0 || benign(e) {
            kpi::module_event(m, lay.MOD_UNLOAD)
        } else {
            e
        };
        if e != 0 {
            log!("kld: MOD_UNLOAD of {} refused: error {e}", m.name);
            return e;
        }
    }
    let uninits = match l.kld.sysuninits() {
        Ok(list) => list,
        Err(e) => {
            checks.check(false, "sysuninits", format_args!("{e}"));
            Vec::new()
        }
    };
    for s in &uninits {
        kpi::enter_kernel();
        // SAFETY: a SYSUNINIT function of the module with its argument.
        unsafe {
            let f: extern "C" fn(u64) = core::mem::transmute(s.func as usize);
            f(s.udata);
        }
    }
    log!("kld: {} sysuninit(s) run", uninits.len());
    sysctl::unregister(&l.oids);
    let handles = kpi::with(|k| k.modules.drain(..).map(|m| m.handle).collect::<Vec<_>>());
    for h in handles {
        h.free();
    }
    *loaded = None;
    0
}

pub struct KldRun<'c> {
    pub config: &'c Config,
    pub features: Features,
    pub clock: &'c Clock,
    pub space: &'c KernelSpace,
    pub ram: (u64, usize),
}

impl KldRun<'_> {
    pub fn run(
        &self,
        guest_archive: &[u8],
        channel: &Rc<RefCell<Channel>>,
    ) -> Result<Infallible, KldError> {
        let fs = MemFs::from_cpio(guest_archive).map_err(KldError::Archive)?;
        let image = fs
            .read_file(MODULE_PATH)
            .ok_or(KldError::Missing(MODULE_PATH))?;
        let release_text = fs
            .read_file(RELEASE_PATH)
            .ok_or(KldError::Missing(RELEASE_PATH))?;
        let release_text = String::from_utf8_lossy(release_text).trim().into();
        let release: u32 = match &release_text {
            r if r == "14" => 14,
            r if r == "15" => 15,
            _ => return Err(KldError::Release(release_text)),
        };
        let kenv = fs
            .read_file(LOADER_CONF)
            .map(|t| parse_loader_conf(&String::from_utf8_lossy(t)))
            .unwrap_or_default();
        let expect_mode = kenv
            .iter()
            .find(|(n, _)| n == "hw.kqemu.mode")
            .and_then(|(_, v)| sysctl::parse_int(v))
            .and_then(|v| u32::try_from(v).ok())
            .unwrap_or(DEFAULT_MODE);
        let expect_gid = kenv
            .iter()
            .find(|(n, _)| n == "hw.kqemu.gid")
            .and_then(|(_, v)| sysctl::parse_int(v))
            .and_then(|v| u32::try_from(v).ok())
            .unwrap_or(DEFAULT_GID);
        let mut cpuids = Vec::new();
        if let Some((_, v)) = kenv.iter().find(|(n, _)| n == CPUID_TUNABLE) {
            for c in v.split(',') {
                let c = sysctl::parse_int(c)
                    .and_then(|c| u32::try_from(c).ok())
                    .filter(|&c| c < MAXCPU)
                    .ok_or_else(|| KldError::CpuId(v.clone()))?;
                cpuids.push(c);
            }
            if cpuids.len() > cpu::MAX_CPUIDS {
                return Err(KldError::CpuId(v.clone()));
            }
        }

        // The module area: the first 2 MiB-aligned 8 MiB of guest RAM;
        // the client's RAM is what follows it.
        let (ram_phys, ram_size) = self.ram;
        let area = ram_phys.next_multiple_of(LARGE_PAGE);
        let rest = area + MODULE_AREA_SIZE;
        if rest > ram_phys + ram_size as u64 {
            return Err(KldError::Ram);
        }
        map_module_area(area);
        kpi::boot(release, kenv).ok_or(KldError::Release(release_text))?;
        cpu::set_cpuids(&cpuids);
        kpi::enter_kernel();
        let mut checks = Checks::new();
        let (printed, expected) = printf::selftest();
        checks.check(
            printed == expected,
            "printf",
            format_args!("{printed:?} (want {expected:?})"),
        );
        let version = kpi::with(|k| k.layout.freebsd_version);
        log!("kld: FreeBSD {release} personality, __FreeBSD_version {version}");

        let mut memory = ModuleArea {
            phys: area,
            taken: false,
        };
        let loader = Loader::new(version as i32);
        let kld = match loader.load(MODULE_PATH, image, &mut memory, &mut kpi::resolve) {
            Ok(kld) => kld,
            Err(e) => {
                checks.check(false, "kldload", format_args!("{e}"));
                return finish(&mut checks, channel, STATUS_CHECKS_FAILED, 0);
            }
        };
        let imports: Vec<&str> = kld.imports().iter().map(|i| i.name.as_str()).collect();
        checks.check(
            true,
            "kldload",
            format_args!(
                "{MODULE_PATH} at {:#x}, {} bytes, {} imports resolved: {}",
                kld.base(),
                kld.size(),
                imports.len(),
                imports.join(" ")
            ),
        );
        let mut loaded = match self.link(kld, &mut checks) {
            Some(l) => Some(l),
            None => return finish(&mut checks, channel, STATUS_CHECKS_FAILED, 0),
        };
        after_load_checks(&mut checks, expect_mode, expect_gid);
        checks.flush(channel)?;

        // SAFETY: the region after the module area was reserved for the
        // guest alone and is mapped by the DMAP.
        let bytes = unsafe {
            core::slice::from_raw_parts_mut(
                phys_to_virt(rest) as *mut u8,
                (ram_phys + ram_size as u64 - rest) as usize,
            )
        };
        let ram = GuestRam::new(bytes, rest).map_err(|_| KldError::Ram)?;
        let mut proc = process::Process::new(self, ram, channel.clone());
        let (status, cycles) = proc.run(&fs, &mut loaded, &mut checks);
        drop(proc);

        if loaded.is_some() {
            let e = unload(&mut loaded, &mut checks);
            checks.check(e == 0, "kldunload-at-end", format_args!("error {e}"));
        }
        books_checks(&mut checks);
        kpi::ram_checks(&mut checks);
        if let Some((created, exited, slices, in_module)) = threads::summary() {
            checks.check(
                created == exited,
                "threads",
                format_args!(
                    "{created} made, {exited} gone; {slices} slices, {in_module} of them begun \
                     inside the module; {} closes waited for an ioctl",
                    devfs::deferred_closes()
                ),
            );
        }
        if let Some((posted, delivered, returned)) = signal::summary() {
            checks.check(
                delivered > 0 && delivered == returned,
                "signals",
                format_args!(
                    "{posted} posted, {delivered} delivered to handlers, {returned} sigreturns"
                ),
            );
        }
        finish(&mut checks, channel, status, cycles)
    }

    /// linker_load_file after the link: sysctls (with tunables), then the
    /// SYSINITs in order.
    fn link(&self, kld: Kld<ModuleImage>, checks: &mut Checks) -> Option<Loaded> {
        let oids = match kld.sysctl_oids() {
            Ok(oids) => oids,
            Err(e) => {
                checks.check(false, "sysctl-set", format_args!("{e}"));
                return None;
            }
        };
        match sysctl::register(&oids) {
            Ok(lines) => {
                for line in lines {
                    log!("kld: {line}");
                }
            }
            Err(e) => {
                checks.check(false, "sysctl-register", format_args!("{e}"));
                return None;
            }
        }
        let sysinits = match kld.sysinits() {
            Ok(list) => list,
            Err(e) => {
                checks.check(false, "sysinits", format_args!("{e}"));
                return None;
            }
        };
        for s in &sysinits {
            log!(
                "kld: sysinit subsystem {:#x} order {:#x} func {:#x}",
                s.subsystem,
                s.order,
                s.func
            );
            kpi::enter_kernel();
            // SAFETY: a SYSINIT function of the module with its argument,
            // in the kernel's order.
            unsafe {
                let f: extern "C" fn(u64) = core::mem::transmute(s.func as usize);
                f(s.udata);
            }
        }
        checks.check(
            !sysinits.is_empty(),
            "sysinits",
            format_args!("{} run in SYSINIT order", sysinits.len()),
        );
        Some(Loaded { kld, oids })
    }
}

/// What MOD_LOAD must have left: the malloc type, the module, the node
/// with the tunables' owner and mode, the sysctls.
fn after_load_checks(checks: &mut Checks, mode: u32, gid: u32) {
    let (types, modules) = kpi::with(|k| {
        (
            k.books
                .malloc_types
                .values()
                .map(|t| t.name.clone())
                .collect::<Vec<_>>(),
            k.modules
                .iter()
                .map(|m| (m.name.clone(), m.load_error))
                .collect::<Vec<_>>(),
        )
    });
    checks.check(
        types.iter().any(|t| t == "kqemu"),
        "malloc-type",
        format_args!("registered types {types:?}"),
    );
    checks.check(
        modules.iter().any(|(n, e)| n == "kqemu" && *e == 0),
        "mod-load",
        format_args!("modules (name, MOD_LOAD error) {modules:?}"),
    );
    match devfs::node(DEVICE_NAME) {
        Some((uid, g, m)) => checks.check(
            uid == 0 && g == gid && m == mode,
            "dev-kqemu",
            format_args!(
                "/dev/kqemu uid {uid} gid {g} mode {m:#o} (want uid 0 gid {gid} mode {mode:#o})"
            ),
        ),
        None => checks.check(
            false,
            "dev-kqemu",
            format_args!("/dev/kqemu does not exist"),
        ),
    }
    let want = [
        ("hw.kqemu.version", kqemu::abi::KQEMU_VERSION as i32),
        ("hw.kqemu.instances", 0),
        ("hw.kqemu.mode", mode as i32),
        ("hw.kqemu.gid", gid as i32),
    ];
    for (path, value) in want {
        let got = sysctl::read_int(path);
        checks.check(
            got == Ok(value),
            &alloc::format!("sysctl-{path}"),
            format_args!("{got:?} (want {value:#x})"),
        );
    }
}

/// A timer interrupt the module handed back while guest code ran
/// (monitor::host_interrupt): the scheduler's view of it.
pub fn timer_tick() {
    cpu::tick();
    signal::clock();
}

/// The books after unload: nothing may be left.
fn books_checks(checks: &mut Checks) {
    let (b, files, dmesg_leak) = kpi::with(|k| {
        let b = &k.books;
        (
            (
                b.mallocs.len(),
                b.malloc_types.len(),
                b.held.len(),
                b.holds,
                b.unholds,
                b.map_read_locks,
                b.cdevs_made,
                b.cdevs_destroyed,
                b.sysctls,
            ),
            k.files.len(),
            k.dmesg.iter().any(|l| l.contains("leaked memory")),
        )
    });
    let (mallocs, types, held, holds, unholds, locks, made, destroyed, sysctls) = b;
    checks.check(
        mallocs == 0 && types == 0 && !dmesg_leak,
        "leaks-malloc",
        format_args!("{mallocs} blocks live, {types} malloc types registered"),
    );
    checks.check(
        held == 0 && holds == unholds && kpi::with(|k| k.books.object_refs == 0),
        "leaks-held-pages",
        format_args!("{held} pages held; {holds} holds, {unholds} releases"),
    );
    let (vm_refs, acquired, orphans, refcnt) = kpi::with(|k| {
        (
            k.books.vmspace_refs,
            k.books.vmspaces_acquired,
            k.orphan_vmspaces.len(),
            k.vmspace_refcnt(k.vmspace.addr),
        )
    });
    checks.check(
        vm_refs == 0 && orphans == 0 && refcnt == 1,
        "leaks-vmspace",
        format_args!(
            "{vm_refs} vmspace references held ({acquired} taken), {orphans} vmspaces of \
             gone processes alive, the process's vm_refcnt {refcnt} (want 1)"
        ),
    );
    let (clash, ran, host_cs) = kpi::with(|k| {
        let b = &k.books;
        (
            b.execs_on_host_cs_index,
            b.execs_on_host_cs_index_ran,
            b.host_cs,
        )
    });
    if clash > 0 {
        // Only guests with such a CS (i386 programs: __USER32_CS 0x23)
        // report it; the suite wants it from those.
        checks.check(
            host_cs == FREEBSD_KERNEL_CS && ran > 0,
            "host-cs-clash",
            format_args!(
                "module called on CS {host_cs:#x} (FreeBSD's GCODE_SEL: {FREEBSD_KERNEL_CS:#x}); \
                 {clash} EXECs with a guest CS of that index, {ran} of them ran guest code"
            ),
        );
    }
    checks.check(
        made > 0 && made == destroyed,
        "leaks-cdevs",
        format_args!("{made} made, {destroyed} destroyed"),
    );
    let c = cpu::summary();
    checks.check(
        c.cpuid == c.cpuid_set && c.critnest == 0 && c.owepreempt == 0 && c.entered == c.left,
        "critical-sections",
        format_args!(
            "PCPU cpuid {} (set {}), td_critnest {}, td_owepreempt {}; {} entered, {} left; {} ticks in the module, \
             {} preemptions deferred, {} ASTs at return to user; fpudna {} calls",
            c.cpuid,
            c.cpuid_set,
            c.critnest,
            c.owepreempt,
            c.entered, c.left, c.ticks, c.deferred, c.asts, c.fpudna
        ),
    );
    checks.check(
        locks == 0 && files == 0 && sysctls == 0,
        "leaks-other",
        format_args!("{locks} map locks held, {files} files open, {sysctls} sysctls registered"),
    );
}

fn finish(
    checks: &mut Checks,
    channel: &Rc<RefCell<Channel>>,
    status: i32,
    cycles: u64,
) -> Result<Infallible, KldError> {
    let line = alloc::format!("kld: {} passed, {} failed\n", checks.passed, checks.failed);
    log!("{}", line.trim_end());
    checks.lines.extend_from_slice(line.as_bytes());
    checks.flush(channel)?;
    let status = if status == 0 && checks.failed != 0 {
        STATUS_CHECKS_FAILED
    } else {
        status
    };
    channel
        .borrow()
        .result(status, cycles)
        .map_err(|_| KldError::Channel)?;
    crate::exit::completed()
}
