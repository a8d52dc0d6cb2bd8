//! A mock runner for the client core: a console that records output, tiny ELF programs,
//! and helpers that issue system calls the way a CPU would report them.
#![allow(dead_code)]

use std::cell::RefCell;
use std::rc::Rc;

use kqemu_client::context::{REG_R10, REG_R8, REG_R9};
use kqemu_client::context::{REG_RAX, REG_RBP, REG_RBX, REG_RCX, REG_RDI, REG_RDX, REG_RSI};
use kqemu_client::{
    Arch, Console, GuestRam, Linux, LinuxConfig, MemFs, PagingFormat, Pid, ProcessState, Trap,
    LOG_FD,
};

/// Everything the mock console saw.
#[derive(Default)]
pub struct Output {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub log: String,
    pub now_ns: u64,
    pub random_calls: u8,
}

pub struct MockConsole(pub Rc<RefCell<Output>>);

impl Console for MockConsole {
    fn write(&mut self, fd: i32, bytes: &[u8]) {
        let mut out = self.0.borrow_mut();
        match fd {
            1 => out.stdout.extend_from_slice(bytes),
            2 => out.stderr.extend_from_slice(bytes),
            LOG_FD => out.log.push_str(&String::from_utf8_lossy(bytes)),
            other => panic!("console write to fd {other}"),
        }
    }
    fn now_ns(&mut self) -> u64 {
        let mut out = self.0.borrow_mut();
        out.now_ns += 1_000;
        1_700_000_000_000_000_000 + out.now_ns
    }
    fn random(&mut self, buf: &mut [u8]) {
        let mut out = self.0.borrow_mut();
        out.random_calls = out.random_calls.wrapping_add(1);
        for (i, b) in buf.iter_mut().enumerate() {
            *b = out.random_calls.wrapping_mul(16).wrapping_add(i as u8);
        }
    }
}

/// Where the tiny programs are linked and where their writable data lives.
pub fn tiny_base(arch: Arch) -> u64 {
    match arch {
        Arch::Amd64 => 0x40_0000,
        Arch::I386 => 0x0804_8000,
    }
}

/// Scratch memory in a tiny program: its 8 KiB bss segment, one page above the text.
pub fn scratch(arch: Arch) -> u64 {
    tiny_base(arch) + 0x1000
}

/// A static executable with a read+exec segment (headers and a few bytes of code) and a
/// read+write segment of 16 file bytes plus bss, 8 KiB in all. Nothing in it is executed.
pub fn tiny_elf(arch: Arch) -> Vec<u8> {
    let base = tiny_base(arch);
    let mut f = Vec::new();
    let code: &[u8] = &[0x0f, 0x05, 0xcd, 0x80, 0xeb, 0xfe];
    match arch {
        Arch::Amd64 => {
            let (ehsize, phentsize) = (64u64, 56u64);
            let code_off = ehsize + 2 * phentsize;
            f.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
            f.extend_from_slice(&2u16.to_le_bytes());
            f.extend_from_slice(&62u16.to_le_bytes());
            f.extend_from_slice(&1u32.to_le_bytes());
            f.extend_from_slice(&(base + code_off).to_le_bytes());
            f.extend_from_slice(&ehsize.to_le_bytes());
            f.extend_from_slice(&0u64.to_le_bytes());
            f.extend_from_slice(&0u32.to_le_bytes());
            for v in [ehsize as u16, phentsize as u16, 2, 64, 0, 0] {
                f.extend_from_slice(&v.to_le_bytes());
            }
            let text_size = code_off + code.len() as u64;
            let data_off = 0x1000u64;
            for (flags, off, vaddr, filesz, memsz) in [
                (5u32, 0u64, base, text_size, text_size),
                (6, data_off, base + 0x1000, 16, 0x2000),
            ] {
                f.extend_from_slice(&1u32.to_le_bytes());
                f.extend_from_slice(&flags.to_le_bytes());
                for v in [off, vaddr, vaddr, filesz, memsz, 0x1000] {
                    f.extend_from_slice(&v.to_le_bytes());
                }
            }
            f.extend_from_slice(code);
            f.resize(data_off as usize, 0);
            f.extend_from_slice(b"DATA-SEGMENT-16B");
        }
        Arch::I386 => {
            let (ehsize, phentsize) = (52u32, 32u32);
            let code_off = ehsize + 2 * phentsize;
            f.extend_from_slice(b"\x7fELF\x01\x01\x01\0\0\0\0\0\0\0\0\0");
            f.extend_from_slice(&2u16.to_le_bytes());
            f.extend_from_slice(&3u16.to_le_bytes());
            f.extend_from_slice(&1u32.to_le_bytes());
            f.extend_from_slice(&(base as u32 + code_off).to_le_bytes());
            f.extend_from_slice(&ehsize.to_le_bytes());
            f.extend_from_slice(&0u32.to_le_bytes());
            f.extend_from_slice(&0u32.to_le_bytes());
            for v in [ehsize as u16, phentsize as u16, 2, 40, 0, 0] {
                f.extend_from_slice(&v.to_le_bytes());
            }
            let text_size = code_off + code.len() as u32;
            let data_off = 0x1000u32;
            for (flags, off, vaddr, filesz, memsz) in [
                (5u32, 0u32, base as u32, text_size, text_size),
                (6, data_off, base as u32 + 0x1000, 16, 0x2000),
            ] {
                for v in [1, off, vaddr, vaddr, filesz, memsz, flags, 0x1000] {
                    f.extend_from_slice(&v.to_le_bytes());
                }
            }
            f.extend_from_slice(code);
            f.resize(data_off as usize, 0);
            f.extend_from_slice(b"DATA-SEGMENT-16B");
        }
    }
    f
}

/// A Linux instance with its console.
pub struct Machine {
    pub linux: Linux<'static>,
    pub out: Rc<RefCell<Output>>,
    pub arch: Arch,
}

impl Machine {
    /// `ram_mib` of guest RAM at physical address 16 MiB, the given file system.
    pub fn new(arch: Arch, paging: PagingFormat, ram_mib: usize, fs: MemFs) -> Machine {
        let bytes: &'static mut [u8] = Box::leak(vec![0u8; ram_mib << 20].into_boxed_slice());
        let ram = GuestRam::new(bytes, 16 << 20).unwrap();
        let out = Rc::new(RefCell::new(Output::default()));
        let cfg = LinuxConfig::new(arch, paging);
        let linux = Linux::new(ram, fs, cfg, Box::new(MockConsole(out.clone())));
        Machine { linux, out, arch }
    }

    /// A machine running the tiny program as pid 1 (also installed at /bin/tiny).
    pub fn tiny(arch: Arch, paging: PagingFormat) -> Machine {
        let mut fs = MemFs::new();
        fs.add_file("/bin/tiny", &tiny_elf(arch), 0o755).unwrap();
        let mut m = Machine::new(arch, paging, 8, fs);
        assert_eq!(m.linux.spawn("/bin/tiny", &["tiny"], &["HOME=/"]), Ok(1));
        m
    }

    /// Issues system call `nr` from `pid` with the ABI's registers; returns the result
    /// (sign-extended for i386) or None if the call blocked or the process is gone.
    pub fn sys(&mut self, pid: Pid, nr: u64, args: &[u64]) -> Option<i64> {
        let arch = self.arch;
        let ctx = self.linux.context(pid)?;
        let order = match arch {
            Arch::Amd64 => [REG_RDI, REG_RSI, REG_RDX, REG_R10, REG_R8, REG_R9],
            Arch::I386 => [REG_RBX, REG_RCX, REG_RDX, REG_RSI, REG_RDI, REG_RBP],
        };
        ctx.regs[REG_RAX] = nr;
        for (i, &reg) in order.iter().enumerate() {
            ctx.regs[reg] = args.get(i).copied().unwrap_or(0);
        }
        let trap = match arch {
            Arch::Amd64 => Trap::Syscall,
            Arch::I386 => Trap::Int80,
        };
        self.linux.trap(pid, trap);
        self.result(pid)
    }

    /// The accumulator of `pid` if its call completed (it is runnable), else None.
    pub fn result(&mut self, pid: Pid) -> Option<i64> {
        if self.linux.process_state(pid) != Some(ProcessState::Runnable) {
            return None;
        }
        let rax = self.linux.context(pid)?.regs[REG_RAX];
        Some(match self.arch {
            Arch::Amd64 => rax as i64,
            Arch::I386 => i64::from(rax as u32 as i32),
        })
    }

    /// Writes bytes into `pid`'s memory.
    pub fn poke(&mut self, pid: Pid, va: u64, data: &[u8]) {
        self.linux.write_user(pid, va, data).unwrap();
    }

    /// Reads bytes from `pid`'s memory.
    pub fn peek(&mut self, pid: Pid, va: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.linux.read_user(pid, va, &mut buf).unwrap();
        buf
    }

    /// Writes a NUL-terminated string and returns its address.
    pub fn cstr(&mut self, pid: Pid, va: u64, s: &str) -> u64 {
        let mut bytes = s.as_bytes().to_vec();
        bytes.push(0);
        self.poke(pid, va, &bytes);
        va
    }

    pub fn stdout(&self) -> Vec<u8> {
        self.out.borrow().stdout.clone()
    }

    pub fn log(&self) -> String {
        self.out.borrow().log.clone()
    }
}

/// The Debian busybox-static binaries; a missing one fails the test.
pub fn busybox(arch: Arch) -> Vec<u8> {
    let path = match arch {
        Arch::Amd64 => "/bin/busybox".to_string(),
        Arch::I386 => {
            concat!(env!("CARGO_MANIFEST_DIR"), "/../build/deps/busybox-i386").to_string()
        }
    };
    std::fs::read(&path)
        .unwrap_or_else(|err| panic!("{path}: {err}: run `make deps` to install busybox-static"))
}
