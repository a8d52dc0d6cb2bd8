//! kqemu-run for FreeBSD/amd64: static, no libc, raw system calls
//! (`syscall` with the number in RAX and arguments in RDI RSI RDX R10 R8
//! R9; on error the kernel sets the carry flag and RAX holds the errno,
//! sys/amd64/amd64/trap.c `amd64_syscall` / cpu_set_syscall_retval).
//!
//! Branded for FreeBSD: every object of the FreeBSD target carries ELF
//! OS/ABI 9 (ELFOSABI_FREEBSD), and the `.note.tag` below is the
//! NT_FREEBSD_ABI_TAG note a FreeBSD crt1 would bring, so FreeBSD's image
//! activator (sys/kern/imgact_elf.c) accepts the binary.
//!
//! Usage: `kqemu-run [--kldunload] [--exit-open] [--bench N]`. Exit status 0 when every check
//! passed, 1 otherwise. `kqemu-run --linux [--file PATH]... [--ram-file
//! PATH] -- PROGRAM ARGS...`: runs a static Linux program (busybox, a tiny
//! guest; amd64 or i386) through KQEMU_EXEC with the client core as its OS
//! and this process's environment (linux.rs); its exit status.
//! `--ram-file PATH`: guest memory from a shared file at PATH, created and
//! unlinked at once, as QEMU does on Linux (linux.rs).
//! `kqemu-run --signal-close PATH`: a signal handler closes /dev/kqemu
//! while PATH (a guest that spins) runs through KQEMU_EXEC; `--thread-close
//! PATH`: a second thread does (concurrency.rs).
//! `kqemu-run --ram-checks limit|munmap|device`: the guest-RAM error paths
//! (ramchecks.rs).
#![no_std]
#![no_main]
#![deny(unsafe_op_in_unsafe_fn)]

extern crate alloc;

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::alloc::{GlobalAlloc, Layout};
use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;
use core::ffi::{c_char, CStr};

mod concurrency;
mod ramchecks;

use kqemu::abi::{KqemuCpuState, KQEMU_EXEC};
use kqemu_run::{
    errno, run_checks, run_linux, Console, CpuFeatures, FxArea, GuestSystem, LinuxRun, Options,
    System, O_RDONLY, O_RDWR,
};

/// __FreeBSD_version of the oldest release the binary is for (14.0).
macro_rules! freebsd_abi_version {
    () => {
        "1400097"
    };
}

// NT_FREEBSD_ABI_TAG (1): namesz 8 ("FreeBSD\0"), descsz 4, the version.
// _start: the kernel enters with RSP at argc (and RDI pointing there too,
// sys/amd64/amd64/machdep.c exec_setregs); the stack is 16-byte aligned.
global_asm!(
    ".section .note.tag,\"a\",@note",
    ".p2align 2",
    ".long 8, 4, 1",
    ".asciz \"FreeBSD\"",
    concat!(".long ", freebsd_abi_version!()),
    ".text",
    ".globl _start",
    "_start:",
    "mov rdi, rsp",
    "and rsp, -16",
    "call {main}",
    "ud2",
    main = sym start,
);

/// System call numbers (sys/sys/syscall.h).
const SYS_EXIT: u64 = 1;
const SYS_READ: u64 = 3;
const SYS_WRITE: u64 = 4;
const SYS_OPEN: u64 = 5;
const SYS_CLOSE: u64 = 6;
const SYS_UNLINK: u64 = 10;
const SYS_IOCTL: u64 = 54;
const SYS_MUNMAP: u64 = 73;
const SYS_CLOCK_GETTIME: u64 = 232;
const SYS_KLDUNLOAD: u64 = 305;
const SYS_KLDFIND: u64 = 306;
const SYS_MMAP: u64 = 477;
const SYS_FTRUNCATE: u64 = 480;

/// sys/sys/fcntl.h.
const O_CREAT: u64 = 0x0200;
const O_TRUNC: u64 = 0x0400;
/// The mode QEMU's kqemu_vmalloc gives its RAM file.
const RAM_FILE_MODE: u64 = 0o600;

/// sys/sys/mman.h.
const PROT_READ: u64 = 0x1;
const PROT_WRITE: u64 = 0x2;
const MAP_SHARED: u64 = 0x1;
const MAP_ANON: u64 = 0x1000;

const STDOUT: u64 = 1;
/// read(2) asks for at least this much at a time when loading a file.
const READ_CHUNK: usize = 1 << 20;
/// Exit status when a check failed.
const EXIT_FAILED: u64 = 1;
/// Exit status of a Rust panic (a bug of this program).
const EXIT_PANIC: u64 = 70;

/// One system call; Err(errno) when the kernel set the carry flag.
fn syscall(number: u64, args: [u64; 6]) -> Result<u64, i32> {
    let rax: u64;
    let carry: u8;
    // SAFETY: the system calls made here take only plain values and
    // pointers to memory this program owns for the duration of the call;
    // the kernel clobbers RCX and R11 (the SYSCALL return state) and RDX
    // (the second return value); the argument registers are treated as
    // clobbered too, which no ABI document promises otherwise.
    unsafe {
        asm!(
            "syscall",
            "setc {carry}",
            carry = out(reg_byte) carry,
            inlateout("rax") number => rax,
            inlateout("rdi") args[0] => _,
            inlateout("rsi") args[1] => _,
            inlateout("rdx") args[2] => _,
            inlateout("r10") args[3] => _,
            inlateout("r8") args[4] => _,
            inlateout("r9") args[5] => _,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack)
        );
    }
    if carry != 0 {
        Err(rax as i32)
    } else {
        Ok(rax)
    }
}

fn exit(status: u64) -> ! {
    let _ = syscall(SYS_EXIT, [status, 0, 0, 0, 0, 0]);
    // SAFETY: exit does not return; if it did, stop here.
    unsafe { asm!("ud2", options(noreturn)) }
}

/// CLOCK_REALTIME (sys/sys/_clock_id.h).
const CLOCK_REALTIME: u64 = 0;

/// The heap of the client core: power-of-two size classes from 16 bytes
/// to [`LARGE`], each with a free list, carved from 4 MiB chunks of
/// `mmap(MAP_ANON)`; larger blocks are mappings of their own.
struct Heap(UnsafeCell<HeapState>);

struct HeapState {
    next: u64,
    end: u64,
    free: [u64; CLASSES],
}

const MIN_CLASS: u32 = 4;
const CLASSES: usize = 17;
/// The largest size class (16 << 16 = 1 MiB).
const LARGE: usize = 1 << (MIN_CLASS as usize + CLASSES - 1);
const CHUNK: u64 = 4 << 20;
const PAGE: u64 = 4096;

// SAFETY: this program has one thread.
unsafe impl Sync for Heap {}

#[global_allocator]
static HEAP: Heap = Heap(UnsafeCell::new(HeapState {
    next: 0,
    end: 0,
    free: [0; CLASSES],
}));

fn class_of(layout: Layout) -> usize {
    let size = layout.size().max(layout.align()).max(1 << MIN_CLASS);
    (size.next_power_of_two().trailing_zeros() - MIN_CLASS) as usize
}

fn map_anon(len: u64) -> *mut u8 {
    let fd = u64::MAX; // -1: no file
    syscall(
        SYS_MMAP,
        [0, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANON, fd, 0],
    )
    .map_or(core::ptr::null_mut(), |a| a as *mut u8)
}

// SAFETY: blocks are disjoint (free lists hold only freed blocks of their
// class; the bump pointer only moves up), aligned to their class size up
// to a page and to the page above that.
unsafe impl GlobalAlloc for Heap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.align() > PAGE as usize {
            // Nothing here asks for more than page alignment.
            return core::ptr::null_mut();
        }
        if layout.size().max(layout.align()) > LARGE {
            return map_anon((layout.size() as u64).div_ceil(PAGE) * PAGE);
        }
        // SAFETY: one thread, and no allocation happens while `h` lives.
        let h = unsafe { &mut *self.0.get() };
        let class = class_of(layout);
        let head = h.free[class];
        if head != 0 {
            // SAFETY: a freed block of this class holds the next pointer.
            h.free[class] = unsafe { *(head as *const u64) };
            return head as *mut u8;
        }
        let size = 1u64 << (class as u32 + MIN_CLASS);
        let align = size.min(PAGE);
        let start = h.next.div_ceil(align) * align;
        if h.next == 0 || start + size > h.end {
            let chunk = map_anon(CHUNK);
            if chunk.is_null() {
                return chunk;
            }
            h.next = chunk as u64;
            h.end = h.next + CHUNK;
            // The new chunk is page-aligned and larger than any class.
            h.next += size;
            return chunk;
        }
        h.next = start + size;
        start as *mut u8
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if layout.size().max(layout.align()) > LARGE {
            let len = (layout.size() as u64).div_ceil(PAGE) * PAGE;
            let _ = syscall(SYS_MUNMAP, [ptr as u64, len, 0, 0, 0, 0]);
            return;
        }
        // SAFETY: one thread, and no allocation happens while `h` lives.
        let h = unsafe { &mut *self.0.get() };
        let class = class_of(layout);
        // SAFETY: the block is ours again and at least 16 bytes.
        unsafe { *(ptr as *mut u64) = h.free[class] };
        h.free[class] = ptr as u64;
    }
}

/// The client core's console: guest output to this process's stdout and
/// stderr (OS log lines are dropped), CLOCK_REALTIME, RDTSC-seeded bytes.
struct FreeBsdConsole {
    seed: u64,
}

impl Console for FreeBsdConsole {
    fn write(&mut self, fd: i32, bytes: &[u8]) {
        if fd == 1 || fd == 2 {
            FreeBsd.write_fd(fd, bytes);
        }
    }

    fn now_ns(&mut self) -> u64 {
        let mut ts = [0u64; 2];
        let _ = syscall(
            SYS_CLOCK_GETTIME,
            [CLOCK_REALTIME, ts.as_mut_ptr() as u64, 0, 0, 0, 0],
        );
        ts[0].saturating_mul(1_000_000_000).saturating_add(ts[1])
    }

    fn random(&mut self, buf: &mut [u8]) {
        for b in buf {
            // xorshift64 (Marsaglia): not cryptographic, the guest's
            // AT_RANDOM and getrandom only need varying bytes here.
            self.seed ^= self.seed << 13;
            self.seed ^= self.seed >> 7;
            self.seed ^= self.seed << 17;
            *b = self.seed as u8;
        }
    }
}

/// NX from CPUID 8000_0001h EDX bit 20 (SDM Vol. 2A CPUID); the guest OS
/// enables no XSAVE or FSGSBASE (its FPU state is an FXSAVE image).
fn cpu_features() -> CpuFeatures {
    let ext = core::arch::x86_64::__cpuid(0x8000_0001);
    CpuFeatures {
        nx: ext.edx & (1 << 20) != 0,
        xsave: false,
        fsgsbase: false,
    }
}

/// `--linux [--file PATH]... [--ram-file PATH] -- PROGRAM ARGS...`, run
/// with `envp`.
fn linux_main(args: &[&CStr], envp: &[&str]) -> ! {
    let Some(split) = args.iter().position(|a| a.to_bytes() == b"--") else {
        usage()
    };
    let (options, program) = (&args[..split], &args[split + 1..]);
    let mut files: Vec<&CStr> = Vec::new();
    let mut ram_file = None;
    let mut it = options.iter();
    while let Some(opt) = it.next() {
        match (opt.to_bytes(), it.next()) {
            (b"--file", Some(path)) => files.push(path),
            (b"--ram-file", Some(path)) if ram_file.is_none() => ram_file = Some(*path),
            _ => usage(),
        }
    }
    let mut argv: Vec<&str> = Vec::new();
    for a in program {
        match a.to_str() {
            Ok(s) => argv.push(s),
            Err(_) => usage(),
        }
    }
    if argv.is_empty() {
        usage();
    }
    if !files.iter().any(|f| f.to_bytes() == argv[0].as_bytes()) {
        files.push(program[0]);
    }
    let console = FreeBsdConsole {
        // SAFETY: RDTSC, as in `cycles`.
        seed: unsafe { core::arch::x86_64::_rdtsc() } | 1,
    };
    let run = LinuxRun {
        files: &files,
        argv: &argv,
        envp,
        ram_file,
    };
    let status = run_linux(&mut FreeBsd, Box::new(console), cpu_features(), &run);
    exit(status as u64)
}

struct FreeBsd;

impl System for FreeBsd {
    fn open(&mut self, path: &CStr, flags: i32) -> Result<i32, i32> {
        syscall(SYS_OPEN, [path.as_ptr() as u64, flags as u64, 0, 0, 0, 0]).map(|fd| fd as i32)
    }

    fn close(&mut self, fd: i32) -> Result<(), i32> {
        syscall(SYS_CLOSE, [fd as u64, 0, 0, 0, 0, 0]).map(|_| ())
    }

    fn ioctl(&mut self, fd: i32, cmd: u32, arg: *mut u8) -> Result<i32, i32> {
        // ioctl(2) takes the command as u_long.
        syscall(SYS_IOCTL, [fd as u64, u64::from(cmd), arg as u64, 0, 0, 0]).map(|v| v as i32)
    }

    fn mmap_shared_anon(&mut self, len: u64) -> Result<u64, i32> {
        let fd = u64::MAX; // -1: no file
        syscall(
            SYS_MMAP,
            [0, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANON, fd, 0],
        )
    }

    fn munmap(&mut self, addr: u64, len: u64) -> Result<(), i32> {
        syscall(SYS_MUNMAP, [addr, len, 0, 0, 0, 0]).map(|_| ())
    }

    fn kldfind(&mut self, name: &CStr) -> Result<i32, i32> {
        syscall(SYS_KLDFIND, [name.as_ptr() as u64, 0, 0, 0, 0, 0]).map(|id| id as i32)
    }

    fn kldunload(&mut self, fileid: i32) -> Result<(), i32> {
        syscall(SYS_KLDUNLOAD, [fileid as u64, 0, 0, 0, 0, 0]).map(|_| ())
    }

    fn cycles(&mut self) -> u64 {
        // SAFETY: RDTSC reads the time-stamp counter (allowed at CPL 3
        // unless CR4.TSD, which FreeBSD leaves clear).
        unsafe { core::arch::x86_64::_rdtsc() }
    }

    fn print(&mut self, bytes: &[u8]) {
        let _ = syscall(
            SYS_WRITE,
            [STDOUT, bytes.as_ptr() as u64, bytes.len() as u64, 0, 0, 0],
        );
    }
}

impl GuestSystem for FreeBsd {
    fn read_file(&mut self, path: &CStr, max: usize) -> Result<Vec<u8>, i32> {
        let fd = self.open(path, O_RDONLY)?;
        let mut data: Vec<u8> = Vec::new();
        let result = loop {
            if data.len() == data.capacity() {
                data.reserve(READ_CHUNK);
            }
            let room = max + 1 - data.len();
            let spare = data.spare_capacity_mut();
            let want = spare.len().min(room);
            match syscall(
                SYS_READ,
                [fd as u64, spare.as_mut_ptr() as u64, want as u64, 0, 0, 0],
            ) {
                Ok(0) => break Ok(data),
                Ok(n) => {
                    // SAFETY: read(2) wrote n <= want bytes of the spare
                    // capacity right after the initialized ones.
                    unsafe { data.set_len(data.len() + (n as usize).min(want)) };
                    if data.len() > max {
                        break Err(errno::EFBIG);
                    }
                }
                Err(e) => break Err(e),
            }
        };
        let _ = self.close(fd);
        result
    }

    fn write_fd(&mut self, fd: i32, bytes: &[u8]) {
        let _ = syscall(
            SYS_WRITE,
            [
                fd as u64,
                bytes.as_ptr() as u64,
                bytes.len() as u64,
                0,
                0,
                0,
            ],
        );
    }

    fn exec(&mut self, fd: i32, state: &mut KqemuCpuState, fpu: &mut FxArea) -> Result<i32, i32> {
        let rax: u64;
        let carry: u64;
        // SAFETY: as in `syscall`, for ioctl(fd, KQEMU_EXEC, state); the
        // guest's FPU state is loaded right before it and saved right
        // after it, as QEMU 0.11 does around KQEMU_EXEC (the module runs
        // the guest on the live FPU registers). The FXSAVE area is
        // 16-aligned (FxArea) and in R12, the carry goes to R13 (both kept
        // by SYSCALL and the kernel); every x87/MMX/SSE register is
        // declared clobbered (clobber_abi).
        unsafe {
            asm!(
                "xor r13d, r13d",
                "fxrstor64 [r12]",
                "syscall",
                "setc r13b",
                "fxsave64 [r12]",
                out("r13") carry,
                in("r12") fpu.0.as_mut_ptr(),
                inlateout("rax") SYS_IOCTL => rax,
                inlateout("rdi") fd as u64 => _,
                inlateout("rsi") u64::from(KQEMU_EXEC) => _,
                inlateout("rdx") state as *mut KqemuCpuState as u64 => _,
                clobber_abi("C"),
                options(nostack)
            );
        }
        if carry != 0 {
            Err(rax as i32)
        } else {
            Ok(rax as i32)
        }
    }

    fn create_file(&mut self, path: &CStr) -> Result<i32, i32> {
        let flags = O_CREAT | O_TRUNC | O_RDWR as u64;
        syscall(
            SYS_OPEN,
            [path.as_ptr() as u64, flags, RAM_FILE_MODE, 0, 0, 0],
        )
        .map(|fd| fd as i32)
    }

    fn unlink(&mut self, path: &CStr) -> Result<(), i32> {
        syscall(SYS_UNLINK, [path.as_ptr() as u64, 0, 0, 0, 0, 0]).map(|_| ())
    }

    fn ftruncate(&mut self, fd: i32, len: u64) -> Result<(), i32> {
        syscall(SYS_FTRUNCATE, [fd as u64, len, 0, 0, 0, 0]).map(|_| ())
    }

    fn mmap_shared_file(&mut self, fd: i32, len: u64, offset: u64) -> Result<u64, i32> {
        syscall(
            SYS_MMAP,
            [
                0,
                len,
                PROT_READ | PROT_WRITE,
                MAP_SHARED,
                fd as u64,
                offset,
            ],
        )
    }
}

/// The process entry: `sp` points at argc, then argv[], NULL, envp[].
extern "C" fn start(sp: *const u64) -> ! {
    // SAFETY: the kernel's initial stack layout (see _start).
    let argc = unsafe { *sp } as usize;
    let args: Vec<&CStr> = (1..argc)
        // SAFETY: argv[1..argc] are NUL-terminated strings on the stack.
        .map(|i| unsafe { CStr::from_ptr(*sp.add(1 + i) as *const c_char) })
        .collect();
    if args.first().is_some_and(|a| a.to_bytes() == b"--linux") {
        // envp[] follows argv[]'s NULL and ends with its own.
        let mut envp: Vec<&str> = Vec::new();
        let mut at = argc + 2;
        loop {
            // SAFETY: the kernel's initial stack layout: envp[] is a
            // NULL-terminated array of NUL-terminated strings.
            let ptr = unsafe { *sp.add(at) } as *const c_char;
            if ptr.is_null() {
                break;
            }
            // SAFETY: as above.
            if let Ok(var) = unsafe { CStr::from_ptr(ptr) }.to_str() {
                envp.push(var);
            }
            at += 1;
        }
        linux_main(&args[1..], &envp);
    }
    if args
        .first()
        .is_some_and(|a| a.to_bytes() == b"--signal-close")
    {
        match args[1..] {
            [path] => exit(concurrency::signal_close(path) as u64),
            _ => usage(),
        }
    }
    if args
        .first()
        .is_some_and(|a| a.to_bytes() == b"--thread-close")
    {
        match args[1..] {
            [path] => exit(concurrency::thread_close(path) as u64),
            _ => usage(),
        }
    }
    if args
        .first()
        .is_some_and(|a| a.to_bytes() == b"--ram-checks")
    {
        match args[1..] {
            [which] => match ramchecks::RamChecks::parse(which.to_bytes()) {
                Some(which) => exit(ramchecks::run(&mut FreeBsd, which) as u64),
                None => usage(),
            },
            _ => usage(),
        }
    }
    let mut options = Options::default();
    let mut bench_next = false;
    for i in 1..argc {
        // SAFETY: argv[1..argc] are NUL-terminated strings on the stack.
        let arg = unsafe { CStr::from_ptr(*sp.add(1 + i) as *const c_char) };
        if bench_next {
            bench_next = false;
            options.bench = parse_count(arg.to_bytes()).unwrap_or_else(|| usage());
            continue;
        }
        match arg.to_bytes() {
            b"--kldunload" => options.kldunload = true,
            b"--exit-open" => options.exit_open = true,
            b"--bench" => bench_next = true,
            _ => usage(),
        }
    }
    if bench_next {
        usage();
    }
    let (_, failed) = run_checks(&mut FreeBsd, options);
    exit(if failed == 0 { 0 } else { EXIT_FAILED })
}

fn usage() -> ! {
    FreeBsd.print(
        b"usage: kqemu-run [--kldunload] [--exit-open] [--bench N]\n\
          | --linux [--file PATH]... [--ram-file PATH] -- PROGRAM ARGS...\n\
          | --signal-close PATH\n\
          | --ram-checks limit|munmap|device\n",
    );
    exit(2)
}

/// A decimal count between 1 and u32::MAX.
fn parse_count(digits: &[u8]) -> Option<u32> {
    let mut n: u32 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u32::from(d - b'0'))?;
    }
    (n > 0).then_some(n)
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    FreeBsd.print(b"kqemu-run: internal error (panic)\n");
    exit(EXIT_PANIC)
}
