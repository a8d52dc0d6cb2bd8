//! Real busybox programs (Debian's busybox-static, amd64 and i386) run on the client core with
//! the host kernel as their CPU: a ptrace'd stub process executes the guest code in guest RAM
//! (a memfd mapped at the addresses the core's page tables give, found by walking those
//! tables like the MMU would), and every system call it makes is stopped (PTRACE_SYSEMU) and
//! served by `Linux::trap`. Outputs are compared byte for byte with the same busybox command
//! run natively on the host.

mod common;

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{busybox, MockConsole, Output};
use kqemu_client::context::REG_RAX;
use kqemu_client::{Arch, GuestRam, Linux, LinuxConfig, MemFs, PagingFormat, Trap, UserContext};

/// The stub program: `syscall; int3` (or `int 0x80; int3`) at STUB_CODE, a data page after it.
const STUB_CODE: u64 = 0x1_0000;
const STUB_END: u64 = 0x1_2000;
const RAM_SIZE: usize = 96 << 20;
/// GDT slot a 64-bit Linux host gives 32-bit TLS (GDT_ENTRY_TLS_MIN for compat tasks).
const HOST_TLS_BASE: u32 = 12;
const TIME_LIMIT: Duration = Duration::from_secs(30);
const PAGE: u64 = 4096;

/// A static ELF whose only code is the instruction that makes a system call, then int3.
fn stub_elf(arch: Arch) -> Vec<u8> {
    let code: &[u8] = match arch {
        Arch::Amd64 => &[0x0f, 0x05, 0xcc],
        Arch::I386 => &[0xcd, 0x80, 0xcc],
    };
    let mut f = Vec::new();
    let segments = [
        (
            5u32,
            0x1000u64,
            STUB_CODE,
            code.len() as u64,
            code.len() as u64,
        ),
        (6, 0x1000, STUB_CODE + PAGE, 0, PAGE),
    ];
    match arch {
        Arch::Amd64 => {
            f.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
            f.extend_from_slice(&2u16.to_le_bytes());
            f.extend_from_slice(&62u16.to_le_bytes());
            f.extend_from_slice(&1u32.to_le_bytes());
            f.extend_from_slice(&STUB_CODE.to_le_bytes());
            f.extend_from_slice(&64u64.to_le_bytes());
            f.extend_from_slice(&0u64.to_le_bytes());
            f.extend_from_slice(&0u32.to_le_bytes());
            for v in [64u16, 56, 2, 64, 0, 0] {
                f.extend_from_slice(&v.to_le_bytes());
            }
            for (flags, off, vaddr, filesz, memsz) in segments {
                f.extend_from_slice(&1u32.to_le_bytes());
                f.extend_from_slice(&flags.to_le_bytes());
                for v in [off, vaddr, vaddr, filesz, memsz, PAGE] {
                    f.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
        Arch::I386 => {
            f.extend_from_slice(b"\x7fELF\x01\x01\x01\0\0\0\0\0\0\0\0\0");
            f.extend_from_slice(&2u16.to_le_bytes());
            f.extend_from_slice(&3u16.to_le_bytes());
            f.extend_from_slice(&1u32.to_le_bytes());
            for v in [STUB_CODE as u32, 52, 0, 0] {
                f.extend_from_slice(&v.to_le_bytes());
            }
            for v in [52u16, 32, 2, 40, 0, 0] {
                f.extend_from_slice(&v.to_le_bytes());
            }
            for (flags, off, vaddr, filesz, memsz) in segments {
                for v in [
                    1,
                    off as u32,
                    vaddr as u32,
                    vaddr as u32,
                    filesz as u32,
                    memsz as u32,
                    flags,
                    PAGE as u32,
                ] {
                    f.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
    }
    f.resize(0x1000, 0);
    f.extend_from_slice(code);
    f
}

/// Guest RAM backed by a memfd, so that the stub process can map the same frames: the
/// writable mapping the client core owns, and a second read-only mapping for the MMU walk.
struct SharedRam {
    fd: i32,
    bytes: &'static mut [u8],
    view: *const u8,
}

fn shared_ram() -> SharedRam {
    let name = CString::new("kqemu-guest-ram").unwrap();
    // SAFETY: memfd_create with a valid NUL-terminated name; the fd is inherited by the stub.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
    assert!(fd >= 0, "memfd_create failed");
    // SAFETY: fd is a fresh memfd we own.
    assert_eq!(unsafe { libc::ftruncate(fd, RAM_SIZE as i64) }, 0);
    let map = |prot| {
        // SAFETY: a new shared mapping of the whole memfd at an address the kernel picks.
        let ptr = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                RAM_SIZE,
                prot,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        ptr.cast::<u8>()
    };
    let rw = map(libc::PROT_READ | libc::PROT_WRITE);
    let view = map(libc::PROT_READ);
    // SAFETY: the mapping is RAM_SIZE bytes, readable and writable, never unmapped (leaked
    // for the rest of the test process) and reached by Rust only through this slice.
    let bytes = unsafe { std::slice::from_raw_parts_mut(rw, RAM_SIZE) };
    SharedRam { fd, bytes, view }
}

/// The traced stub process: the guest's CPU.
struct HostCpu {
    pid: libc::pid_t,
    arch: Arch,
    ram_fd: i32,
    /// What the stub has mapped now: guest page → (RAM offset, prot).
    mapped: BTreeMap<u64, (u64, i32)>,
}

fn wait_stop(pid: libc::pid_t) -> i32 {
    let mut status = 0;
    // SAFETY: waiting for our own traced child.
    let got = unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
    assert_eq!(got, pid, "waitpid");
    assert!(
        libc::WIFSTOPPED(status),
        "stub is not stopped: status {status:#x}"
    );
    libc::WSTOPSIG(status)
}

impl HostCpu {
    fn launch(arch: Arch, ram_fd: i32, dir: &Path) -> HostCpu {
        let path = dir.join(format!("stub-{arch:?}"));
        std::fs::write(&path, stub_elf(arch)).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let cpath = CString::new(path.as_os_str().as_bytes()).unwrap();
        let argv = [cpath.as_ptr(), core::ptr::null()];
        let envp = [core::ptr::null()];
        // SAFETY: the child only calls async-signal-safe functions (ptrace, execve, _exit).
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: in the child: ask to be traced, then replace the image by the stub.
            unsafe {
                libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0);
                libc::execve(cpath.as_ptr(), argv.as_ptr(), envp.as_ptr());
                libc::_exit(127);
            }
        }
        assert!(pid > 0, "fork failed");
        assert_eq!(wait_stop(pid), libc::SIGTRAP, "stopped at exec");
        let options = libc::PTRACE_O_TRACESYSGOOD | libc::PTRACE_O_EXITKILL;
        // SAFETY: pid is our stopped tracee.
        assert_eq!(
            unsafe { libc::ptrace(libc::PTRACE_SETOPTIONS, pid, 0, options) },
            0
        );
        let mut cpu = HostCpu {
            pid,
            arch,
            ram_fd,
            mapped: BTreeMap::new(),
        };
        // Clear everything the host put in the guest's half (stack, vdso) except the stub.
        let top = match arch {
            Arch::Amd64 => 0x7fff_ffff_f000,
            Arch::I386 => 0xc000_0000,
        };
        assert_eq!(cpu.inject(cpu.nr(11, 91), &[STUB_END, top - STUB_END]), 0);
        cpu
    }

    fn regs(&self) -> libc::user_regs_struct {
        // SAFETY: user_regs_struct is plain data; all-zero is valid.
        let mut regs: libc::user_regs_struct = unsafe { core::mem::zeroed() };
        // SAFETY: pid is our stopped tracee; regs is a valid buffer.
        let r = unsafe { libc::ptrace(libc::PTRACE_GETREGS, self.pid, 0, &mut regs) };
        assert_eq!(r, 0, "PTRACE_GETREGS");
        regs
    }

    fn set_regs(&self, regs: &libc::user_regs_struct) {
        // SAFETY: pid is our stopped tracee; regs is a valid register set.
        let r = unsafe { libc::ptrace(libc::PTRACE_SETREGS, self.pid, 0, regs) };
        assert_eq!(r, 0, "PTRACE_SETREGS");
    }

    /// The host syscall number for this stub's ABI.
    fn nr(&self, amd64: u64, i386: u64) -> u64 {
        match self.arch {
            Arch::Amd64 => amd64,
            Arch::I386 => i386,
        }
    }

    /// Makes the stub execute a host system call and returns its result.
    fn inject(&mut self, nr: u64, args: &[u64]) -> i64 {
        let mut regs = self.regs();
        regs.rip = STUB_CODE;
        regs.rax = nr;
        let a = |i: usize| args.get(i).copied().unwrap_or(0);
        match self.arch {
            Arch::Amd64 => {
                (regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9) =
                    (a(0), a(1), a(2), a(3), a(4), a(5));
            }
            Arch::I386 => {
                (regs.rbx, regs.rcx, regs.rdx, regs.rsi, regs.rdi, regs.rbp) =
                    (a(0), a(1), a(2), a(3), a(4), a(5));
            }
        }
        self.set_regs(&regs);
        // SAFETY: pid is our stopped tracee.
        assert_eq!(
            unsafe { libc::ptrace(libc::PTRACE_CONT, self.pid, 0, 0) },
            0
        );
        assert_eq!(
            wait_stop(self.pid),
            libc::SIGTRAP,
            "stub int3 after syscall {nr}"
        );
        let rax = self.regs().rax;
        match self.arch {
            Arch::Amd64 => rax as i64,
            Arch::I386 => i64::from(rax as u32 as i32),
        }
    }

    /// Makes the stub's mappings match `pages` (guest page → RAM offset, prot).
    fn sync(&mut self, pages: BTreeMap<u64, (u64, i32)>) {
        let gone: Vec<u64> = self
            .mapped
            .keys()
            .filter(|va| !pages.contains_key(va))
            .copied()
            .collect();
        for (start, len, _, _) in runs(gone.iter().map(|&va| (va, 0, 0))) {
            let nr = self.nr(11, 91);
            assert_eq!(self.inject(nr, &[start, len]), 0, "munmap");
        }
        let changed: Vec<(u64, u64, i32)> = pages
            .iter()
            .filter(|(va, v)| self.mapped.get(va) != Some(v))
            .map(|(&va, &(phys, prot))| (va, phys, prot))
            .collect();
        for (start, len, phys, prot) in runs(changed.into_iter()) {
            let flags = (libc::MAP_SHARED | libc::MAP_FIXED) as u64;
            let (nr, offset) = match self.arch {
                Arch::Amd64 => (9, phys),
                Arch::I386 => (192, phys / PAGE),
            };
            let got = self.inject(
                nr,
                &[start, len, prot as u64, flags, self.ram_fd as u64, offset],
            );
            assert_eq!(
                got as u64 & 0xffff_ffff,
                start & 0xffff_ffff,
                "mmap {start:#x}"
            );
        }
        self.mapped = pages;
    }

    /// Runs the guest from `ctx` until its next system call or fault.
    fn run(&mut self, ctx: &mut UserContext) -> Trap {
        let mut regs = self.regs();
        let r = &ctx.regs;
        (regs.rax, regs.rcx, regs.rdx, regs.rbx) = (r[0], r[1], r[2], r[3]);
        (regs.rsp, regs.rbp, regs.rsi, regs.rdi) = (r[4], r[5], r[6], r[7]);
        (regs.r8, regs.r9, regs.r10, regs.r11) = (r[8], r[9], r[10], r[11]);
        (regs.r12, regs.r13, regs.r14, regs.r15) = (r[12], r[13], r[14], r[15]);
        regs.rip = ctx.rip;
        regs.eflags = ctx.rflags;
        match self.arch {
            Arch::Amd64 => (regs.fs_base, regs.gs_base) = (ctx.fs_base, ctx.gs_base),
            Arch::I386 => (regs.fs, regs.gs) = (ctx.fs_sel.into(), ctx.gs_sel.into()),
        }
        self.set_regs(&regs);
        // SAFETY: pid is our stopped tracee.
        assert_eq!(
            unsafe { libc::ptrace(libc::PTRACE_SYSEMU, self.pid, 0, 0) },
            0
        );
        let sig = wait_stop(self.pid);
        let regs = self.regs();
        ctx.regs = [
            regs.rax, regs.rcx, regs.rdx, regs.rbx, regs.rsp, regs.rbp, regs.rsi, regs.rdi,
            regs.r8, regs.r9, regs.r10, regs.r11, regs.r12, regs.r13, regs.r14, regs.r15,
        ];
        ctx.rip = regs.rip;
        ctx.rflags = regs.eflags;
        match self.arch {
            Arch::Amd64 => (ctx.fs_base, ctx.gs_base) = (regs.fs_base, regs.gs_base),
            Arch::I386 => (ctx.fs_sel, ctx.gs_sel) = (regs.fs as u16, regs.gs as u16),
        }
        if sig == libc::SIGTRAP | 0x80 {
            ctx.regs[REG_RAX] = regs.orig_rax;
            return match self.arch {
                Arch::Amd64 => Trap::Syscall,
                Arch::I386 => Trap::Int80,
            };
        }
        // SAFETY: siginfo_t is plain data; the tracee is in a signal-delivery-stop.
        let mut info: libc::siginfo_t = unsafe { core::mem::zeroed() };
        // SAFETY: pid is our stopped tracee; info is a valid buffer.
        unsafe { libc::ptrace(libc::PTRACE_GETSIGINFO, self.pid, 0, &mut info) };
        // SAFETY: si_addr is meaningful for the fault signals handled here.
        let cr2 = unsafe { info.si_addr() } as u64;
        let vector = match sig {
            libc::SIGSEGV if info.si_code == 0x80 => 13,
            libc::SIGSEGV => 14,
            libc::SIGILL => 6,
            libc::SIGFPE => 0,
            libc::SIGBUS => 17,
            libc::SIGTRAP => 3,
            other => panic!("stub stopped by signal {other}"),
        };
        Trap::Exception {
            vector,
            error_code: 0,
            cr2,
        }
    }

    /// Installs the i386 TLS descriptors of `ctx` in the stub's GDT slots.
    fn load_tls(&mut self, ctx: &UserContext) {
        for desc in ctx.tls.iter().filter(|d| d.entry_number != 0) {
            let mut raw = Vec::new();
            for v in [desc.entry_number, desc.base_addr, desc.limit, desc.flags] {
                raw.extend_from_slice(&v.to_le_bytes());
            }
            let scratch = STUB_CODE + PAGE;
            self.poke(scratch, &raw);
            let nr = self.nr(205, 243);
            assert_eq!(self.inject(nr, &[scratch]), 0, "set_thread_area");
        }
    }

    fn poke(&self, va: u64, data: &[u8]) {
        for (i, chunk) in data.chunks(8).enumerate() {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            let addr = va + 8 * i as u64;
            // SAFETY: pid is our stopped tracee; addr is in its writable stub data page.
            let r = unsafe {
                libc::ptrace(
                    libc::PTRACE_POKEDATA,
                    self.pid,
                    addr,
                    u64::from_le_bytes(word),
                )
            };
            assert_eq!(r, 0, "POKEDATA");
        }
    }
}

impl Drop for HostCpu {
    fn drop(&mut self) {
        // SAFETY: killing and reaping our own child.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            libc::waitpid(self.pid, core::ptr::null_mut(), libc::__WALL);
        }
    }
}

/// Groups pages into runs of consecutive addresses (and RAM offsets and prot):
/// (start, length, RAM offset, prot).
fn runs(pages: impl Iterator<Item = (u64, u64, i32)>) -> Vec<(u64, u64, u64, i32)> {
    let mut out: Vec<(u64, u64, u64, i32)> = Vec::new();
    for (va, phys, prot) in pages {
        match out.last_mut() {
            Some(last) if last.0 + last.1 == va && last.2 + last.1 == phys && last.3 == prot => {
                last.1 += PAGE
            }
            _ => out.push((va, PAGE, phys, prot)),
        }
    }
    out
}

/// The user pages an MMU sees through `cr3`: page → (RAM offset, host prot). Walks the
/// tables independently of the client core (SDM vol. 3A, 4.3-4.5).
fn mmu_pages(ram: &[u8], format: PagingFormat, cr3: u64) -> BTreeMap<u64, (u64, i32)> {
    let entry = |phys: u64, size: usize| {
        let at = phys as usize;
        let mut raw = [0u8; 8];
        raw[..size].copy_from_slice(&ram[at..at + size]);
        u64::from_le_bytes(raw)
    };
    let (shifts, widths, size, mask): (&[u32], &[u64], usize, u64) = match format {
        PagingFormat::Legacy32 => (&[22, 12], &[1024, 1024], 4, 0xffff_f000),
        PagingFormat::Pae => (&[30, 21, 12], &[4, 512, 512], 8, 0x000f_ffff_ffff_f000),
        PagingFormat::Long4 => (
            &[39, 30, 21, 12],
            &[256, 512, 512, 512],
            8,
            0x000f_ffff_ffff_f000,
        ),
    };
    let mut out = BTreeMap::new();
    // (table, level, va prefix, writable so far, executable so far)
    let mut stack = vec![(cr3 & mask, 0usize, 0u64, true, true)];
    while let Some((table, level, prefix, w, x)) = stack.pop() {
        for index in 0..widths[level] {
            let e = entry(table + index * size as u64, size);
            if e & 1 == 0 {
                continue;
            }
            let va = prefix | index << shifts[level];
            let pdpte = format == PagingFormat::Pae && level == 0;
            if !pdpte && e & 4 == 0 {
                continue;
            }
            let (w, x) = if pdpte {
                (w, x)
            } else {
                (w && e & 2 != 0, x && e & (1 << 63) == 0)
            };
            if level + 1 == shifts.len() {
                let prot = libc::PROT_READ
                    | if w { libc::PROT_WRITE } else { 0 }
                    | if x { libc::PROT_EXEC } else { 0 };
                out.insert(va, (e & mask, prot));
            } else {
                stack.push((e & mask, level + 1, va, w, x));
            }
        }
    }
    out
}

/// Runs `argv` on the client core with the host as CPU; returns (status, stdout, stderr, os).
fn run_guest(
    arch: Arch,
    paging: PagingFormat,
    files: &[(&str, &[u8])],
    argv: &[&str],
) -> (i32, Vec<u8>, Vec<u8>, Linux<'static>) {
    let SharedRam {
        fd: ram_fd,
        bytes,
        view,
    } = shared_ram();
    let ram = GuestRam::new(bytes, 0).unwrap();
    let mut fs = MemFs::new();
    fs.add_file("/bin/busybox", &busybox(arch), 0o755).unwrap();
    fs.add_symlink("/bin/sh", "busybox").unwrap();
    for (path, data) in files {
        fs.add_file(path, data, 0o644).unwrap();
    }
    let out = std::rc::Rc::new(std::cell::RefCell::new(Output::default()));
    let mut cfg = LinuxConfig::new(arch, paging);
    cfg.tls_entry_base = HOST_TLS_BASE;
    let mut linux = Linux::new(ram, fs, cfg, Box::new(MockConsole(out.clone())));
    linux
        .spawn("/bin/busybox", argv, &["PATH=/bin", "HOME=/", "LC_ALL=C"])
        .unwrap();
    let dir = scratch_dir("stub");
    let mut cpu = HostCpu::launch(arch, ram_fd, &dir);
    let started = Instant::now();
    let mut current = 0;
    // The stub's mappings follow the page tables. They can only have changed when another
    // process runs, the core asks for a flush, or frames were allocated or freed; a fault
    // with stale mappings is retried after a full resync, so nothing is missed.
    let mut synced_frames = usize::MAX;
    loop {
        let frames = linux.free_frames();
        let Some(run) = linux.next() else { break };
        assert!(
            started.elapsed() < TIME_LIMIT,
            "guest ran too long; log:\n{}",
            out.borrow().log
        );
        let (pid, cr3) = (run.pid, run.cr3);
        let stale = pid != current || run.flush_tlb || frames != synced_frames;
        let ctx = run.ctx;
        let mmu = || {
            // SAFETY: the read-only mapping covers RAM_SIZE bytes; nothing writes guest RAM
            // while this slice lives (the core waits in `next`/`trap`, the stub is stopped).
            let ram_view = unsafe { std::slice::from_raw_parts(view, RAM_SIZE) };
            mmu_pages(ram_view, paging, cr3)
        };
        if stale {
            cpu.sync(mmu());
            synced_frames = frames;
        }
        if ctx.tls_changed || pid != current {
            cpu.load_tls(ctx);
            ctx.tls_changed = false;
        }
        current = pid;
        let mut trap = cpu.run(ctx);
        if matches!(trap, Trap::Exception { .. }) {
            let pages = mmu();
            if pages != cpu.mapped {
                cpu.sync(pages);
                trap = cpu.run(ctx);
            }
        }
        linux.trap(pid, trap);
    }
    std::fs::remove_dir_all(&dir).unwrap();
    let status = linux.exit_status().expect("run ended");
    let stdout = out.borrow().stdout.clone();
    let stderr = out.borrow().stderr.clone();
    assert!(
        !out.borrow().log.contains("unknown system call"),
        "log:\n{}",
        out.borrow().log
    );
    if std::env::var_os("HOST_CPU_SHOW").is_some() {
        eprintln!("log: {}", out.borrow().log);
    }
    (status, stdout, stderr, linux)
}

/// A fresh directory under the system's temporary directory.
fn scratch_dir(what: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("kqemu-client-{}-{what}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn busybox_path(arch: Arch) -> PathBuf {
    match arch {
        Arch::Amd64 => PathBuf::from("/bin/busybox"),
        Arch::I386 => Path::new(env!("CARGO_MANIFEST_DIR")).join("../build/deps/busybox-i386"),
    }
}

/// The same command run natively on the host (files in a scratch directory, which is also
/// the working directory, as `/` is in the guest).
fn run_host(arch: Arch, files: &[(&str, &[u8])], argv: &[&str]) -> (i32, Vec<u8>, Vec<u8>) {
    use std::os::unix::process::CommandExt;
    let dir = scratch_dir("host");
    for (path, data) in files {
        std::fs::write(dir.join(path.trim_start_matches('/')), data).unwrap();
    }
    let output = Command::new(busybox_path(arch))
        .arg0(argv[0])
        .args(&argv[1..])
        .current_dir(&dir)
        .env_clear()
        .env("PATH", "/bin")
        .env("LC_ALL", "C")
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    (
        output.status.code().unwrap_or(-1),
        output.stdout,
        output.stderr,
    )
}

/// 1 MiB of xorshift bytes.
fn binary_data() -> Vec<u8> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    (0..1 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Lines of pseudo-random words, for sort and wc.
fn text_data() -> Vec<u8> {
    let words = [
        "kqemu", "monitor", "guest", "page", "table", "Ring", "zero", "42", "apple", "Zebra",
    ];
    let mut x = 12345u32;
    let mut out = String::new();
    for line in 0..4000 {
        for _ in 0..(line % 7 + 1) {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            out.push_str(words[(x >> 16) as usize % words.len()]);
            out.push(' ');
        }
        out.push('\n');
    }
    out.into_bytes()
}

/// Runs `argv` in the guest and on the host and requires identical status and stdout.
fn same_as_host(arch: Arch, paging: PagingFormat, argv: &[&str]) -> Linux<'static> {
    let data = binary_data();
    let text = text_data();
    let files: [(&str, &[u8]); 2] = [("/data.bin", &data), ("/text.txt", &text)];
    let (status, stdout, stderr, linux) = run_guest(arch, paging, &files, argv);
    let (host_status, host_stdout, host_stderr) = run_host(arch, &files, argv);
    assert_eq!(
        String::from_utf8_lossy(&stdout),
        String::from_utf8_lossy(&host_stdout),
        "{arch:?} {paging:?} {argv:?}: stdout differs (guest stderr: {})",
        String::from_utf8_lossy(&stderr)
    );
    assert_eq!(stdout, host_stdout);
    if std::env::var_os("HOST_CPU_SHOW").is_some() {
        eprintln!(
            "{argv:?} -> {status}\n{}\nstderr: {}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        );
    }
    assert_eq!(
        status,
        host_status,
        "{argv:?}: exit status; host stderr {}",
        String::from_utf8_lossy(&host_stderr)
    );
    linux
}

#[test]
fn sha256sum_and_md5sum() {
    same_as_host(
        Arch::Amd64,
        PagingFormat::Long4,
        &["sha256sum", "data.bin", "text.txt"],
    );
    same_as_host(
        Arch::I386,
        PagingFormat::Legacy32,
        &["sha256sum", "data.bin", "text.txt"],
    );
    same_as_host(Arch::Amd64, PagingFormat::Long4, &["md5sum", "data.bin"]);
    same_as_host(Arch::I386, PagingFormat::Pae, &["md5sum", "data.bin"]);
}

#[test]
fn shell_pipeline_with_gzip_round_trip() {
    let script = "cat data.bin | gzip -c | gunzip -c | sha256sum; gzip -c < text.txt | wc -c";
    same_as_host(Arch::Amd64, PagingFormat::Long4, &["sh", "-c", script]);
    same_as_host(Arch::I386, PagingFormat::Pae, &["sh", "-c", script]);
}

#[test]
fn sort_wc_cat() {
    for (arch, paging) in [
        (Arch::Amd64, PagingFormat::Long4),
        (Arch::I386, PagingFormat::Long4),
    ] {
        same_as_host(arch, paging, &["sort", "text.txt"]);
        same_as_host(arch, paging, &["wc", "text.txt"]);
        same_as_host(
            arch,
            paging,
            &["sh", "-c", "cat text.txt | head -n 3; echo status $?"],
        );
    }
}

#[test]
fn tar_create_and_list() {
    let script =
        "tar cf out.tar text.txt data.bin && tar tf out.tar && tar xOf out.tar text.txt | md5sum";
    same_as_host(Arch::Amd64, PagingFormat::Long4, &["sh", "-c", script]);
    same_as_host(Arch::I386, PagingFormat::Legacy32, &["sh", "-c", script]);
}

#[test]
fn dd_writes_a_file_the_runner_reads_back() {
    for (arch, paging) in [
        (Arch::Amd64, PagingFormat::Long4),
        (Arch::I386, PagingFormat::Pae),
    ] {
        let linux = same_as_host(arch, paging, &["dd", "if=data.bin", "of=copy.bin", "bs=4k"]);
        assert_eq!(linux.fs().read_file("/copy.bin"), Some(&binary_data()[..]));
    }
}

#[test]
fn shell_features() {
    let scripts = [
        "mkdir -p a/b && echo hi > a/b/f && cat a/b/f && mv a/b/f a/g && cat a/g && rm -r a && echo done",
        "i=0; while [ $i -lt 200 ]; do i=$((i+1)); done; echo $i; (echo sub; exit 3); echo status $?",
        "echo abc | tr a-c x-z; seq 1 2000 | sort -rn | head -n 2; yes | head -n 3",
        "tar cf x.tar text.txt && mkdir out && cd out && tar xf ../x.tar && md5sum text.txt && cd .. && rm -r out x.tar",
        "cat missing 2>/dev/null; echo status $?; exec md5sum < data.bin",
        "mkdir d; i=0; while [ $i -lt 1200 ]; do : > d/file$i; i=$((i+1)); done; ls d | wc -l; rm -r d; [ -e d ] || echo gone",
    ];
    for script in scripts {
        same_as_host(Arch::Amd64, PagingFormat::Long4, &["sh", "-c", script]);
        same_as_host(Arch::I386, PagingFormat::Legacy32, &["sh", "-c", script]);
    }
}
