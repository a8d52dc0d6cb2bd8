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
//! passed, 1 otherwise. `kqemu-run --guest PATH`: runs the static Linux/amd64
//! program PATH through KQEMU_EXEC instead (guest.rs); its exit status.
#![no_std]
#![no_main]
#![deny(unsafe_op_in_unsafe_fn)]

use core::arch::{asm, global_asm};
use core::ffi::{c_char, CStr};

use kqemu::abi::{KqemuCpuState, KQEMU_EXEC};
use kqemu_run::{run_checks, run_guest, FxArea, GuestSystem, Options, System, O_RDONLY};

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
const SYS_IOCTL: u64 = 54;
const SYS_MUNMAP: u64 = 73;
const SYS_KLDUNLOAD: u64 = 305;
const SYS_KLDFIND: u64 = 306;
const SYS_MMAP: u64 = 477;

/// sys/sys/mman.h.
const PROT_READ: u64 = 0x1;
const PROT_WRITE: u64 = 0x2;
const MAP_SHARED: u64 = 0x1;
const MAP_ANON: u64 = 0x1000;

const STDOUT: u64 = 1;
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
    fn read_file(&mut self, path: &CStr, buf: &mut [u8]) -> Result<usize, i32> {
        let fd = self.open(path, O_RDONLY)?;
        let mut len = 0;
        let result = loop {
            let rest = &mut buf[len..];
            if rest.is_empty() {
                break Ok(len);
            }
            match syscall(
                SYS_READ,
                [
                    fd as u64,
                    rest.as_mut_ptr() as u64,
                    rest.len() as u64,
                    0,
                    0,
                    0,
                ],
            ) {
                Ok(0) => break Ok(len),
                Ok(n) => len += n as usize,
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
}

/// The process entry: `sp` points at argc, then argv[], NULL, envp[].
extern "C" fn start(sp: *const u64) -> ! {
    // SAFETY: the kernel's initial stack layout (see _start).
    let argc = unsafe { *sp } as usize;
    let mut options = Options::default();
    let mut bench_next = false;
    let mut guest_next = false;
    let mut guest = None;
    for i in 1..argc {
        // SAFETY: argv[1..argc] are NUL-terminated strings on the stack.
        let arg = unsafe { CStr::from_ptr(*sp.add(1 + i) as *const c_char) };
        if guest_next {
            guest_next = false;
            guest = Some(arg);
            continue;
        }
        if bench_next {
            bench_next = false;
            options.bench = parse_count(arg.to_bytes()).unwrap_or_else(|| usage());
            continue;
        }
        match arg.to_bytes() {
            b"--kldunload" => options.kldunload = true,
            b"--exit-open" => options.exit_open = true,
            b"--bench" => bench_next = true,
            b"--guest" => guest_next = true,
            _ => usage(),
        }
    }
    if bench_next || guest_next {
        usage();
    }
    if let Some(path) = guest {
        exit(run_guest(&mut FreeBsd, path) as u64);
    }
    let (_, failed) = run_checks(&mut FreeBsd, options);
    exit(if failed == 0 { 0 } else { EXIT_FAILED })
}

fn usage() -> ! {
    FreeBsd.print(b"usage: kqemu-run [--kldunload] [--exit-open] [--bench N] | --guest PATH\n");
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
