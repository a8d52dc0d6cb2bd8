//! The syscall layer driven by a mock runner: registers are set as the CPU would leave them
//! at `syscall` / `int 0x80`, and the results are read back from the accumulator.

mod common;

use common::{busybox, scratch, tiny_elf, Machine};
use kqemu_client::context::{REG_RAX, REG_RSP};
use kqemu_client::{Arch, Errno, MemFs, PagingFormat, ProcessState, Trap};

/// Syscall numbers per ABI (syscall_64.tbl / syscall_32.tbl), written out independently
/// of the implementation.
struct Nr {
    read: u64,
    write: u64,
    open: u64,
    close: u64,
    pipe: u64,
    fork: u64,
    execve: u64,
    exit: u64,
    wait4: u64,
    kill: u64,
    brk: u64,
    munmap: u64,
    mprotect: u64,
    mremap: u64,
    writev: u64,
    fcntl: u64,
    getcwd: u64,
    chdir: u64,
    mkdir: u64,
    readlink: u64,
    rt_sigaction: u64,
    getdents64: u64,
    exit_group: u64,
    openat: u64,
    dup2: u64,
    sendfile: u64,
    uname: u64,
    rename: u64,
    unlink: u64,
    getrandom: u64,
}

const AMD64: Nr = Nr {
    read: 0,
    write: 1,
    open: 2,
    close: 3,
    pipe: 22,
    fork: 57,
    execve: 59,
    exit: 60,
    wait4: 61,
    kill: 62,
    brk: 12,
    munmap: 11,
    mprotect: 10,
    mremap: 25,
    writev: 20,
    fcntl: 72,
    getcwd: 79,
    chdir: 80,
    mkdir: 83,
    readlink: 89,
    rt_sigaction: 13,
    getdents64: 217,
    exit_group: 231,
    openat: 257,
    dup2: 33,
    sendfile: 40,
    uname: 63,
    rename: 82,
    unlink: 87,
    getrandom: 318,
};

const I386: Nr = Nr {
    read: 3,
    write: 4,
    open: 5,
    close: 6,
    pipe: 42,
    fork: 2,
    execve: 11,
    exit: 1,
    wait4: 114,
    kill: 37,
    brk: 45,
    munmap: 91,
    mprotect: 125,
    mremap: 163,
    writev: 146,
    fcntl: 55,
    getcwd: 183,
    chdir: 12,
    mkdir: 39,
    readlink: 85,
    rt_sigaction: 174,
    getdents64: 220,
    exit_group: 252,
    openat: 295,
    dup2: 63,
    sendfile: 239,
    uname: 122,
    rename: 38,
    unlink: 10,
    getrandom: 355,
};

fn nr(arch: Arch) -> &'static Nr {
    match arch {
        Arch::Amd64 => &AMD64,
        Arch::I386 => &I386,
    }
}

const EFAULT: i64 = -14;
const EBADF: i64 = -9;
const ENOENT: i64 = -2;
const EINVAL: i64 = -22;
const ENOSYS: i64 = -38;
const ECHILD: i64 = -10;
const O_WRONLY: u64 = 1;
const O_RDWR: u64 = 2;
const O_CREAT: u64 = 0o100;
const O_EXCL: u64 = 0o200;
const O_TRUNC: u64 = 0o1000;
const O_CLOEXEC: u64 = 0o2000000;
const AT_FDCWD: u64 = -100i64 as u64;
const PROT_RW: u64 = 3;
const MAP_PRIVATE_ANON: u64 = 0x22;

/// Every ABI / paging combination the OS supports.
fn machines() -> Vec<Machine> {
    vec![
        Machine::tiny(Arch::Amd64, PagingFormat::Long4),
        Machine::tiny(Arch::I386, PagingFormat::Legacy32),
        Machine::tiny(Arch::I386, PagingFormat::Pae),
        Machine::tiny(Arch::I386, PagingFormat::Long4),
    ]
}

/// An iovec array of the ABI.
fn iovecs(arch: Arch, list: &[(u64, u64)]) -> Vec<u8> {
    let mut out = Vec::new();
    for &(base, len) in list {
        match arch {
            Arch::Amd64 => {
                out.extend_from_slice(&base.to_le_bytes());
                out.extend_from_slice(&len.to_le_bytes());
            }
            Arch::I386 => {
                out.extend_from_slice(&(base as u32).to_le_bytes());
                out.extend_from_slice(&(len as u32).to_le_bytes());
            }
        }
    }
    out
}

/// Maps `pages` of anonymous memory (mmap or mmap2) and returns the address.
fn mmap(m: &mut Machine, addr: u64, pages: u64, prot: u64, flags: u64) -> i64 {
    let nr = if m.arch == Arch::Amd64 { 9 } else { 192 };
    let result = m
        .sys(1, nr, &[addr, pages * 4096, prot, flags, u64::MAX, 0])
        .unwrap();
    user_addr(result)
}

/// An address returned in EAX by an i386 call (the mock sign-extends it): errors are the
/// values -4095..-1, anything else is an unsigned 32-bit address.
fn user_addr(result: i64) -> i64 {
    if result < -4095 {
        i64::from(result as u32)
    } else {
        result
    }
}

#[test]
fn console_writes() {
    for mut m in machines() {
        let n = nr(m.arch);
        let buf = scratch(m.arch);
        m.poke(1, buf, b"hello\nworld\n");
        assert_eq!(m.sys(1, n.write, &[1, buf, 6]), Some(6));
        assert_eq!(m.sys(1, n.write, &[2, buf + 6, 6]), Some(6));
        let iov = buf + 0x100;
        m.poke(1, iov, &iovecs(m.arch, &[(buf + 6, 6), (buf, 0), (buf, 6)]));
        assert_eq!(m.sys(1, n.writev, &[1, iov, 3]), Some(12));
        assert_eq!(m.stdout(), b"hello\nworld\nhello\n");
        assert_eq!(m.out.borrow().stderr, b"world\n");
        assert_eq!(m.sys(1, n.write, &[1, buf, 0]), Some(0));
        assert_eq!(m.sys(1, n.write, &[1, 0x10, 5]), Some(EFAULT));
        assert_eq!(m.sys(1, n.write, &[99, buf, 5]), Some(EBADF));
        assert_eq!(
            m.sys(1, n.read, &[1, buf, 5]),
            Some(EBADF),
            "stdout is write-only"
        );
        assert_eq!(
            m.sys(1, n.read, &[0, buf, 5]),
            Some(0),
            "stdin is at end of file"
        );
    }
}

#[test]
fn brk_grows_and_shrinks() {
    for mut m in machines() {
        let n = nr(m.arch);
        let start = m.sys(1, n.brk, &[0]).unwrap() as u64;
        assert_eq!(start % 4096, 0);
        assert!(
            start >= scratch(m.arch) + 0x2000,
            "the heap starts after bss"
        );
        let before = m.linux.free_frames();
        assert_eq!(
            m.sys(1, n.brk, &[start + 100_000]),
            Some((start + 100_000) as i64)
        );
        m.poke(1, start + 99_999, b"x");
        assert_eq!(m.linux.free_frames(), before - 25);
        assert_eq!(
            m.sys(1, n.brk, &[start + 4096]),
            Some((start + 4096) as i64)
        );
        assert_eq!(
            m.linux.write_user(1, start + 8192, b"x"),
            Err(Errno::EFAULT)
        );
        assert!(m.linux.free_frames() >= before - 2);
        assert_eq!(
            m.sys(1, n.brk, &[start - 4096]),
            Some((start + 4096) as i64),
            "below the start: unchanged"
        );
        assert_eq!(
            m.sys(1, n.brk, &[u64::MAX >> 16]),
            Some((start + 4096) as i64),
            "too large: unchanged"
        );
    }
}

#[test]
fn mmap_munmap_mremap_mprotect() {
    for mut m in machines() {
        let n = nr(m.arch);
        let before = m.linux.free_frames();
        let addr = mmap(&mut m, 0, 3, PROT_RW, MAP_PRIVATE_ANON) as u64;
        assert_eq!(addr % 4096, 0);
        assert_eq!(m.peek(1, addr, 4), [0; 4], "anonymous memory is zero");
        m.poke(1, addr, b"first");
        m.poke(1, addr + 3 * 4096 - 4, b"last");
        // Another mapping right above blocks growth in place: mremap must move.
        let next = mmap(&mut m, addr + 3 * 4096, 1, PROT_RW, MAP_PRIVATE_ANON | 0x10) as u64;
        assert_eq!(next, addr + 3 * 4096, "MAP_FIXED");
        let moved = user_addr(
            m.sys(1, n.mremap, &[addr, 3 * 4096, 64 * 4096, 1, 0])
                .unwrap(),
        ) as u64;
        assert_ne!(moved, addr);
        assert_eq!(m.peek(1, moved, 5), b"first");
        assert_eq!(m.peek(1, moved + 3 * 4096 - 4, 4), b"last");
        assert_eq!(m.peek(1, moved + 63 * 4096, 4), [0; 4]);
        assert_eq!(
            m.linux.read_user(1, addr, &mut [0; 4]),
            Err(Errno::EFAULT),
            "old range is gone"
        );
        let shrunk = m
            .sys(1, n.mremap, &[moved, 64 * 4096, 4096, 0, 0])
            .map(user_addr);
        assert_eq!(shrunk, Some(moved as i64), "shrink");
        let grown = m
            .sys(1, n.mremap, &[moved, 4096, 2 * 4096, 0, 0])
            .map(user_addr);
        assert_eq!(grown, Some(moved as i64), "grow in place");
        assert_eq!(m.sys(1, n.mprotect, &[moved, 4096, 1]), Some(0));
        assert_eq!(m.linux.write_user(1, moved, b"x"), Err(Errno::EFAULT));
        assert_eq!(m.peek(1, moved, 5), b"first", "PROT_READ keeps the data");
        assert_eq!(m.sys(1, n.mprotect, &[moved, 4096, 0]), Some(0));
        assert_eq!(
            m.linux.read_user(1, moved, &mut [0; 1]),
            Err(Errno::EFAULT),
            "PROT_NONE"
        );
        assert_eq!(m.sys(1, n.mprotect, &[moved, 4096, PROT_RW]), Some(0));
        assert_eq!(m.peek(1, moved, 5), b"first", "PROT_NONE kept the frame");
        assert_eq!(m.sys(1, n.read, &[0, moved, 1]), Some(0));
        assert_eq!(m.sys(1, n.munmap, &[moved, 2 * 4096]), Some(0));
        assert_eq!(m.sys(1, n.munmap, &[next, 4096]), Some(0));
        let kept = before - m.linux.free_frames();
        assert!(
            kept <= 3,
            "every data frame returned, only page tables stay ({kept})"
        );
        assert_eq!(m.sys(1, n.munmap, &[moved + 1, 4096]), Some(EINVAL));
        assert_eq!(
            m.sys(1, n.mprotect, &[moved, 4096, 1]),
            Some(-12),
            "ENOMEM on unmapped"
        );
        assert_eq!(mmap(&mut m, 0, 0, PROT_RW, MAP_PRIVATE_ANON), EINVAL);
        assert_eq!(
            mmap(&mut m, 0, 1, PROT_RW, 0x20),
            EINVAL,
            "neither shared nor private"
        );
        let flush = m.linux.next().unwrap().flush_tlb;
        assert!(flush, "unmapping asks the runner to flush");
    }
}

#[test]
fn mmap_out_of_memory_is_enomem() {
    let mut m = Machine::tiny(Arch::Amd64, PagingFormat::Long4);
    let free = m.linux.free_frames() as u64;
    assert_eq!(mmap(&mut m, 0, free + 1, PROT_RW, MAP_PRIVATE_ANON), -12);
    let kept = free - m.linux.free_frames() as u64;
    assert!(
        kept <= 8,
        "a failed mmap gives its data frames back ({kept} tables kept)"
    );
    let brk = m.sys(1, AMD64.brk, &[0]).unwrap() as u64;
    assert_eq!(
        m.sys(1, AMD64.brk, &[brk + (free + 1) * 4096]),
        Some(brk as i64)
    );
}

#[test]
fn files_on_memfs() {
    for mut m in machines() {
        let n = nr(m.arch);
        let buf = scratch(m.arch);
        let path = m.cstr(1, buf, "/tmp/f");
        let fd = m
            .sys(1, n.open, &[path, O_CREAT | O_RDWR | O_TRUNC, 0o644])
            .unwrap();
        assert_eq!(fd, 3);
        m.poke(1, buf + 0x100, b"abcxyz");
        assert_eq!(m.sys(1, n.write, &[3, buf + 0x100, 3]), Some(3));
        let lseek = if m.arch == Arch::Amd64 { 8 } else { 19 };
        assert_eq!(m.sys(1, lseek, &[3, 10, 0]), Some(10));
        assert_eq!(m.sys(1, n.write, &[3, buf + 0x103, 3]), Some(3));
        assert_eq!(m.sys(1, lseek, &[3, 0, 0]), Some(0));
        assert_eq!(m.sys(1, n.read, &[3, buf + 0x200, 100]), Some(13));
        assert_eq!(m.peek(1, buf + 0x200, 13), b"abc\0\0\0\0\0\0\0xyz");
        assert_eq!(m.sys(1, n.read, &[3, buf + 0x200, 100]), Some(0));
        assert_eq!(m.sys(1, lseek, &[3, -2i64 as u64, 2]), Some(11), "SEEK_END");
        assert_eq!(m.sys(1, n.close, &[3]), Some(0));
        assert_eq!(m.sys(1, n.close, &[3]), Some(EBADF));
        assert_eq!(
            m.linux.fs().read_file("/tmp/f"),
            Some(&b"abc\0\0\0\0\0\0\0xyz"[..])
        );
        assert_eq!(
            m.sys(1, n.open, &[path, O_CREAT | O_EXCL | O_WRONLY, 0o644]),
            Some(-17)
        );

        let missing = m.cstr(1, buf + 0x300, "/tmp/none");
        assert_eq!(m.sys(1, n.open, &[missing, 0, 0]), Some(ENOENT));
        assert_eq!(m.sys(1, n.rename, &[path, missing]), Some(0));
        assert_eq!(
            m.linux.fs().read_file("/tmp/none").map(<[u8]>::len),
            Some(13)
        );

        let dir = m.cstr(1, buf + 0x400, "/tmp/d");
        assert_eq!(m.sys(1, n.mkdir, &[dir, 0o755]), Some(0));
        assert_eq!(m.sys(1, n.mkdir, &[dir, 0o755]), Some(-17));
        assert_eq!(m.sys(1, n.chdir, &[dir]), Some(0));
        assert_eq!(m.sys(1, n.getcwd, &[buf + 0x500, 64]), Some(7));
        assert_eq!(m.peek(1, buf + 0x500, 7), b"/tmp/d\0");
        assert_eq!(m.sys(1, n.getcwd, &[buf + 0x500, 3]), Some(-34), "ERANGE");
        let rel = m.cstr(1, buf + 0x600, "g");
        assert_eq!(
            m.sys(1, n.openat, &[AT_FDCWD, rel, O_CREAT | O_WRONLY, 0o600]),
            Some(3)
        );
        assert!(
            m.linux.fs().read_file("/tmp/d/g").is_some(),
            "relative to the cwd"
        );

        let tmp = m.cstr(1, buf + 0x700, "/tmp");
        let dfd = m.sys(1, n.open, &[tmp, 0o200000, 0]).unwrap();
        let got = m
            .sys(1, n.getdents64, &[dfd as u64, buf + 0x800, 1024])
            .unwrap() as usize;
        let raw = m.peek(1, buf + 0x800, got);
        let mut names = Vec::new();
        let mut at = 0;
        while at < raw.len() {
            let reclen = u16::from_le_bytes([raw[at + 16], raw[at + 17]]) as usize;
            let name: Vec<u8> = raw[at + 19..at + reclen]
                .iter()
                .copied()
                .take_while(|&b| b != 0)
                .collect();
            names.push((String::from_utf8(name).unwrap(), raw[at + 18]));
            at += reclen;
        }
        let expected = [(".", 4), ("..", 4), ("d", 4), ("none", 8)];
        let expected: Vec<(String, u8)> =
            expected.iter().map(|(s, t)| (s.to_string(), *t)).collect();
        assert_eq!(names, expected);
        assert_eq!(
            m.sys(1, n.getdents64, &[dfd as u64, buf + 0x800, 1024]),
            Some(0),
            "end of directory"
        );

        assert_eq!(m.sys(1, n.unlink, &[missing]), Some(0));
        assert_eq!(m.sys(1, n.unlink, &[missing]), Some(ENOENT));
        let exe = m.cstr(1, buf + 0x900, "/proc/self/exe");
        assert_eq!(m.sys(1, n.readlink, &[exe, buf + 0xa00, 64]), Some(9));
        assert_eq!(m.peek(1, buf + 0xa00, 9), b"/bin/tiny");
        let null = m.cstr(1, buf + 0xb00, "/dev/null");
        let nfd = m.sys(1, n.open, &[null, O_RDWR, 0]).unwrap() as u64;
        assert_eq!(m.sys(1, n.write, &[nfd, buf, 100]), Some(100));
        assert_eq!(m.sys(1, n.read, &[nfd, buf, 100]), Some(0));
    }
}

#[test]
fn stat_layouts_per_abi() {
    let mut fs = MemFs::new();
    fs.add_file("/bin/tiny", &tiny_elf(Arch::Amd64), 0o755)
        .unwrap();
    fs.add_file("/bin/tiny32", &tiny_elf(Arch::I386), 0o755)
        .unwrap();
    fs.add_file("/data", &[7u8; 12345], 0o640).unwrap();
    for (arch, exe) in [(Arch::Amd64, "/bin/tiny"), (Arch::I386, "/bin/tiny32")] {
        let mut m = Machine::new(
            arch,
            PagingFormat::Long4,
            8,
            MemFs::from_cpio(&cpio_of(&fs)).unwrap(),
        );
        m.linux.spawn(exe, &["t"], &[]).unwrap();
        let buf = scratch(arch);
        let path = m.cstr(1, buf, "/data");
        let (stat_nr, size_at, mode_at, len) = match arch {
            Arch::Amd64 => (4, 48, 24, 144),
            Arch::I386 => (195, 44, 16, 96),
        };
        assert_eq!(m.sys(1, stat_nr, &[path, buf + 0x100]), Some(0));
        let st = m.peek(1, buf + 0x100, len);
        assert_eq!(
            u64::from_le_bytes(st[size_at..size_at + 8].try_into().unwrap()),
            12345
        );
        assert_eq!(
            u32::from_le_bytes(st[mode_at..mode_at + 4].try_into().unwrap()),
            0o100640
        );
        let statx = if arch == Arch::Amd64 { 332 } else { 383 };
        let empty = m.cstr(1, buf + 0x50, "");
        let fd = m.sys(1, nr(arch).open, &[path, 0, 0]).unwrap() as u64;
        assert_eq!(
            m.sys(1, statx, &[fd, empty, 0x1000, 0x7ff, buf + 0x200]),
            Some(0)
        );
        let sx = m.peek(1, buf + 0x200, 256);
        assert_eq!(u64::from_le_bytes(sx[40..48].try_into().unwrap()), 12345);
        assert_eq!(u16::from_le_bytes([sx[28], sx[29]]), 0o100640);
        assert_eq!(
            m.sys(1, statx, &[fd, empty, 0, 0x7ff, buf + 0x200]),
            Some(ENOENT)
        );
        assert_eq!(m.sys(1, stat_nr, &[path, 0x10]), Some(EFAULT));
    }
}

/// A newc archive of every regular file in `fs` (through the public API only).
fn cpio_of(fs: &MemFs) -> Vec<u8> {
    let mut out = Vec::new();
    let mut ino = 1;
    for path in ["/bin/tiny", "/bin/tiny32", "/data"] {
        if let Some(data) = fs.read_file(path) {
            let mode = if path == "/data" { 0o100640 } else { 0o100755 };
            push_member(&mut out, ino, &path[1..], mode, data);
            ino += 1;
        }
    }
    push_member(&mut out, 0, "TRAILER!!!", 0, &[]);
    out
}

fn push_member(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, data: &[u8]) {
    let fields = [
        ino,
        mode,
        0,
        0,
        1,
        0,
        data.len() as u32,
        0,
        0,
        0,
        0,
        name.len() as u32 + 1,
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    out.resize(out.len().div_ceil(4) * 4, 0);
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(4) * 4, 0);
}

#[test]
fn pipe_fork_wait4() {
    for mut m in machines() {
        let n = nr(m.arch);
        let buf = scratch(m.arch);
        assert_eq!(m.sys(1, n.pipe, &[buf]), Some(0));
        assert_eq!(m.peek(1, buf, 8), [3, 0, 0, 0, 4, 0, 0, 0]);
        assert_eq!(m.sys(1, n.fork, &[]), Some(2));
        assert_eq!(
            m.linux.context(2).unwrap().regs[REG_RAX],
            0,
            "the child sees 0"
        );
        assert_eq!(m.sys(1, n.close, &[4]), Some(0));
        // The parent reads first: the pipe is empty and a writer exists, so it blocks.
        assert_eq!(m.sys(1, n.read, &[3, buf + 0x100, 100]), None);
        assert_eq!(m.linux.process_state(1), Some(ProcessState::Blocked));
        assert_eq!(
            m.linux.next().map(|r| r.pid),
            Some(2),
            "the scheduler moves on"
        );
        assert_eq!(m.sys(2, n.close, &[3]), Some(0));
        m.poke(2, buf + 0x40, b"ping");
        assert_eq!(m.sys(2, n.write, &[4, buf + 0x40, 4]), Some(4));
        assert_eq!(m.sys(2, n.exit_group, &[7]), None);
        assert_eq!(m.linux.process_state(2), Some(ProcessState::Exited(7 << 8)));
        assert_eq!(
            m.linux.next().map(|r| r.pid),
            Some(1),
            "the blocked read completes"
        );
        assert_eq!(m.result(1), Some(4));
        assert_eq!(m.peek(1, buf + 0x100, 4), b"ping");
        assert_eq!(
            m.sys(1, n.read, &[3, buf + 0x100, 100]),
            Some(0),
            "EOF: no writer left"
        );
        assert_eq!(m.sys(1, n.wait4, &[u64::MAX, buf + 0x200, 0, 0]), Some(2));
        assert_eq!(m.peek(1, buf + 0x200, 4), (7u32 << 8).to_le_bytes());
        assert_eq!(
            m.sys(1, n.wait4, &[u64::MAX, buf + 0x200, 0, 0]),
            Some(ECHILD)
        );
        assert_eq!(m.linux.pids(), [1]);
    }
}

#[test]
fn wait4_blocks_until_a_child_exits() {
    let mut m = Machine::tiny(Arch::Amd64, PagingFormat::Long4);
    assert_eq!(m.sys(1, AMD64.fork, &[]), Some(2));
    assert_eq!(m.sys(1, AMD64.wait4, &[2, 0, 1, 0]), Some(0), "WNOHANG");
    assert_eq!(m.sys(1, AMD64.wait4, &[2, 0, 0, 0]), None);
    assert_eq!(m.linux.next().map(|r| r.pid), Some(2));
    assert_eq!(m.sys(2, AMD64.exit, &[0]), None);
    assert_eq!(m.linux.next().map(|r| r.pid), Some(1));
    assert_eq!(m.result(1), Some(2));
}

#[test]
fn full_pipe_blocks_the_writer_and_a_gone_reader_kills_it() {
    let mut m = Machine::tiny(Arch::Amd64, PagingFormat::Long4);
    let buf = scratch(Arch::Amd64);
    let big = mmap(&mut m, 0, 17, PROT_RW, MAP_PRIVATE_ANON) as u64;
    assert_eq!(m.sys(1, AMD64.pipe, &[buf]), Some(0));
    assert_eq!(m.sys(1, AMD64.fork, &[]), Some(2));
    assert_eq!(m.sys(1, AMD64.write, &[4, big, 65536]), Some(65536));
    assert_eq!(
        m.sys(1, AMD64.write, &[4, big, 10]),
        None,
        "full: the writer waits"
    );
    assert_eq!(m.linux.next().map(|r| r.pid), Some(2));
    assert_eq!(m.sys(2, AMD64.read, &[3, big, 4096]), Some(4096));
    assert_eq!(m.sys(2, AMD64.exit, &[0]), None);
    assert_eq!(m.linux.next().map(|r| r.pid), Some(1));
    assert_eq!(m.result(1), Some(10), "room again: the write completes");
    // Big writes to a pipe with little room move what fits.
    assert_eq!(m.sys(1, AMD64.write, &[4, big, 8192]), Some(4086));
    assert_eq!(m.sys(1, AMD64.wait4, &[u64::MAX, 0, 0, 0]), Some(2));
    assert_eq!(m.sys(1, AMD64.close, &[3]), Some(0));
    assert_eq!(m.sys(1, AMD64.write, &[4, big, 1]), None, "SIGPIPE");
    assert_eq!(m.linux.next().map(|r| r.pid), None);
    assert_eq!(m.linux.exit_status(), Some(128 + 13));
}

#[test]
fn ignored_sigpipe_gives_epipe_and_kill_terminates() {
    let mut m = Machine::tiny(Arch::Amd64, PagingFormat::Long4);
    let buf = scratch(Arch::Amd64);
    // struct sigaction { handler = SIG_IGN, flags, restorer, mask }
    m.poke(1, buf + 0x100, &[1, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(
        m.sys(1, AMD64.rt_sigaction, &[13, buf + 0x100, 0, 8]),
        Some(0)
    );
    assert_eq!(
        m.sys(1, AMD64.rt_sigaction, &[9, buf + 0x100, 0, 8]),
        Some(EINVAL)
    );
    assert_eq!(
        m.sys(1, AMD64.rt_sigaction, &[13, 0, buf + 0x200, 8]),
        Some(0)
    );
    assert_eq!(m.peek(1, buf + 0x200, 1), [1]);
    assert_eq!(m.sys(1, AMD64.pipe, &[buf]), Some(0));
    assert_eq!(m.sys(1, AMD64.close, &[3]), Some(0));
    assert_eq!(m.sys(1, AMD64.write, &[4, buf, 1]), Some(-32), "EPIPE");
    assert_eq!(m.sys(1, AMD64.fork, &[]), Some(2));
    assert_eq!(m.sys(1, AMD64.kill, &[2, 0]), Some(0));
    assert_eq!(m.sys(1, AMD64.kill, &[2, 15]), Some(0));
    assert_eq!(m.linux.process_state(2), Some(ProcessState::Exited(15)));
    assert_eq!(m.sys(1, AMD64.kill, &[99, 15]), Some(-3), "ESRCH");
    assert_eq!(
        m.sys(1, AMD64.kill, &[1, 17]),
        Some(0),
        "SIGCHLD is ignored by default"
    );
    assert_eq!(
        m.sys(1, AMD64.kill, &[1, 6]),
        None,
        "SIGABRT terminates the caller"
    );
    assert_eq!(m.linux.exit_status(), Some(128 + 6));
}

#[test]
fn execve_replaces_the_image() {
    for arch in [Arch::Amd64, Arch::I386] {
        let n = nr(arch);
        let mut fs = MemFs::new();
        fs.add_file("/bin/tiny", &tiny_elf(arch), 0o755).unwrap();
        fs.add_file("/bin/other", &tiny_elf(arch), 0o755).unwrap();
        fs.add_file("/bin/script", b"#!/bin/sh\necho hi\n", 0o755)
            .unwrap();
        fs.add_file("/bin/noexec", &tiny_elf(arch), 0o644).unwrap();
        fs.add_symlink("/bin/link", "other").unwrap();
        let mut m = Machine::new(arch, PagingFormat::Long4, 8, fs);
        m.linux.spawn("/bin/tiny", &["tiny"], &[]).unwrap();
        let buf = scratch(arch);
        let w = if arch == Arch::Amd64 { 8 } else { 4 };
        let path = m.cstr(1, buf, "/bin/tiny");
        assert_eq!(m.sys(1, n.open, &[path, O_CLOEXEC, 0]), Some(3));
        assert_eq!(m.sys(1, n.open, &[path, 0, 0]), Some(4));
        let target = m.cstr(1, buf + 0x40, "/bin/link");
        let arg0 = m.cstr(1, buf + 0x80, "other");
        let arg1 = m.cstr(1, buf + 0x90, "x");
        let env0 = m.cstr(1, buf + 0xa0, "E=1");
        let mut table = Vec::new();
        for v in [arg0, arg1, 0, env0, 0] {
            table.extend_from_slice(&v.to_le_bytes()[..w]);
        }
        m.poke(1, buf + 0x100, &table);
        let (argv, envp) = (buf + 0x100, buf + 0x100 + 3 * w as u64);
        for (bad, expected) in [
            ("/bin/script", -8),
            ("/bin/noexec", -13),
            ("/bin/none", ENOENT),
            ("/bin", -13),
        ] {
            let p = m.cstr(1, buf + 0x200, bad);
            assert_eq!(
                m.sys(1, n.execve, &[p, argv, envp]),
                Some(expected),
                "{bad}"
            );
        }
        assert!(m.log().contains("execve /bin/script: not an ELF file"));
        assert_eq!(m.sys(1, n.execve, &[target, 0x10, envp]), Some(EFAULT));
        assert_eq!(m.sys(1, n.execve, &[0x10, argv, envp]), Some(EFAULT));
        let frames = m.linux.free_frames();
        m.linux.context(1).unwrap().regs[REG_RAX] = n.execve;
        assert_eq!(m.sys(1, n.execve, &[target, argv, envp]), Some(0));
        assert!(
            m.linux.free_frames() + 8 > frames,
            "the old image was freed"
        );
        let ctx = m.linux.context(1).unwrap().clone();
        assert_eq!(
            ctx.rip,
            common::tiny_base(arch) + if w == 8 { 176 } else { 116 }
        );
        let sp = ctx.regs[REG_RSP];
        assert_eq!(m.peek(1, sp, 1), [2], "argc");
        assert_eq!(
            m.sys(1, n.fcntl, &[3, 1]),
            Some(EBADF),
            "O_CLOEXEC closed at exec"
        );
        assert_eq!(m.sys(1, n.fcntl, &[4, 1]), Some(0));
        let exe = m.cstr(1, buf, "/proc/self/exe");
        assert_eq!(m.sys(1, n.readlink, &[exe, buf + 0x40, 64]), Some(10));
        assert_eq!(
            m.peek(1, buf + 0x40, 10),
            b"/bin/other",
            "symlinks resolved"
        );
    }
}

#[test]
fn bad_pointers_give_efault_and_leak_nothing() {
    for mut m in machines() {
        let n = nr(m.arch);
        let buf = scratch(m.arch);
        let files = m.linux.open_files();
        let text = common::tiny_base(m.arch);
        assert_eq!(m.sys(1, n.open, &[0x1, 0, 0]), Some(EFAULT));
        assert_eq!(m.sys(1, n.pipe, &[0x10]), Some(EFAULT));
        assert_eq!(m.sys(1, n.pipe, &[text]), Some(EFAULT), "read-only memory");
        assert_eq!(m.linux.open_files(), files, "no half-made pipe left behind");
        let path = m.cstr(1, buf, "/bin/tiny");
        let fd = m.sys(1, n.open, &[path, 0, 0]).unwrap() as u64;
        assert_eq!(m.sys(1, n.read, &[fd, text, 16]), Some(EFAULT));
        assert_eq!(
            m.sys(1, n.read, &[fd, buf + 0x100, 4]),
            Some(4),
            "offset not moved by the fault"
        );
        assert_eq!(m.peek(1, buf + 0x100, 4), b"\x7fELF");
        assert_eq!(m.sys(1, n.uname, &[0x20]), Some(EFAULT));
        assert_eq!(m.sys(1, n.getrandom, &[0x20, 16, 0]), Some(EFAULT));
        assert_eq!(m.sys(1, n.writev, &[1, 0x30, 1]), Some(EFAULT));
        m.poke(1, buf + 0x200, &iovecs(m.arch, &[(0x40, 5)]));
        assert_eq!(m.sys(1, n.writev, &[1, buf + 0x200, 1]), Some(EFAULT));
        assert_eq!(m.sys(1, n.rt_sigaction, &[2, 0x50, 0, 8]), Some(EFAULT));
        assert_eq!(m.sys(1, n.getcwd, &[0x60, 100]), Some(EFAULT));
        let long = "a".repeat(5000);
        let p = mmap(&mut m, 0, 2, PROT_RW, MAP_PRIVATE_ANON) as u64;
        m.cstr(1, p, &long);
        assert_eq!(m.sys(1, n.open, &[p, 0, 0]), Some(-36), "ENAMETOOLONG");
        m.poke(1, p + 8190, b"ab");
        assert_eq!(
            m.sys(1, n.open, &[p + 8190, 0, 0]),
            Some(EFAULT),
            "unterminated at the end"
        );
        assert_eq!(m.sys(1, n.write, &[1, u64::MAX - 3, 8]), Some(EFAULT));
        assert_eq!(m.linux.process_state(1), Some(ProcessState::Runnable));
    }
}

#[test]
fn unknown_syscalls_answer_enosys_once_logged() {
    for mut m in machines() {
        assert_eq!(m.sys(1, 500, &[]), Some(ENOSYS));
        assert_eq!(m.sys(1, 500, &[]), Some(ENOSYS));
        assert_eq!(m.sys(1, 0xffff_ffff, &[]), Some(ENOSYS));
        assert_eq!(m.log().matches("unknown system call 500").count(), 1);
        let rseq = if m.arch == Arch::Amd64 { 334 } else { 386 };
        assert_eq!(m.sys(1, rseq, &[]), Some(ENOSYS));
    }
}

#[test]
fn deadlock_ends_the_run() {
    let mut m = Machine::tiny(Arch::I386, PagingFormat::Pae);
    let buf = scratch(Arch::I386);
    assert_eq!(m.sys(1, I386.pipe, &[buf]), Some(0));
    assert_eq!(m.sys(1, I386.fork, &[]), Some(2));
    assert_eq!(m.sys(1, I386.wait4, &[u64::MAX, 0, 0, 0]), None);
    // The child reads from a pipe whose write end the waiting parent holds.
    assert_eq!(m.sys(2, I386.read, &[3, buf + 0x100, 1]), None);
    assert!(m.linux.next().is_none());
    assert!(m.linux.deadlocked());
    assert_eq!(m.linux.exit_status(), Some(128 + 9));
    assert!(m.log().contains("deadlock"), "{}", m.log());
}

#[test]
fn exceptions_become_signals() {
    for (vector, status) in [
        (0u8, 136),
        (6, 132),
        (11, 135),
        (12, 135),
        (13, 139),
        (14, 139),
        (17, 135),
        (3, 133),
    ] {
        let mut m = Machine::tiny(Arch::Amd64, PagingFormat::Long4);
        let free = m.linux.free_frames();
        m.linux.trap(
            1,
            Trap::Exception {
                vector,
                error_code: 0,
                cr2: 0x10,
            },
        );
        assert!(m.linux.next().is_none());
        assert_eq!(m.linux.exit_status(), Some(status), "vector {vector}");
        assert!(m.log().contains(&format!("exception {vector}")));
        assert!(m.linux.free_frames() > free, "the address space was freed");
    }
}

#[test]
fn stack_grows_on_demand() {
    for mut m in machines() {
        let sp = m.linux.context(1).unwrap().regs[REG_RSP];
        let deep = (sp & !0xfff) - (1 << 20);
        assert_eq!(
            m.linux.write_user(1, deep, b"x"),
            Ok(()),
            "kernel access grows the stack"
        );
        let deeper = deep - (1 << 20);
        m.linux.trap(
            1,
            Trap::Exception {
                vector: 14,
                error_code: 6,
                cr2: deeper,
            },
        );
        assert_eq!(m.linux.process_state(1), Some(ProcessState::Runnable));
        assert_eq!(m.peek(1, deeper, 1), [0]);
        let below = (sp & !0xfff) - (9 << 20);
        m.linux.trap(
            1,
            Trap::Exception {
                vector: 14,
                error_code: 6,
                cr2: below,
            },
        );
        assert_eq!(
            m.linux.exit_status(),
            Some(139),
            "beyond the 8 MiB reserve: SIGSEGV"
        );
    }
}

#[test]
fn run_end_releases_every_frame() {
    // The paging format of each of `machines()`: the OS's own GDT page takes
    // one table per paging level besides the page.
    let formats = [
        PagingFormat::Long4,
        PagingFormat::Legacy32,
        PagingFormat::Pae,
        PagingFormat::Long4,
    ];
    for (mut m, paging) in machines().into_iter().zip(formats) {
        let n = nr(m.arch);
        let buf = scratch(m.arch);
        assert_eq!(m.sys(1, n.pipe, &[buf]), Some(0));
        assert_eq!(m.sys(1, n.fork, &[]), Some(2));
        assert_eq!(m.sys(2, n.fork, &[]), Some(3));
        mmap(&mut m, 0, 10, PROT_RW, MAP_PRIVATE_ANON);
        assert_eq!(m.sys(1, n.exit_group, &[3]), None);
        assert!(m.linux.next().is_none());
        assert_eq!(m.linux.exit_status(), Some(3));
        assert!(!m.linux.deadlocked());
        assert_eq!(m.linux.pids(), Vec::<u32>::new());
        assert_eq!(m.linux.open_files(), (0, 0));
        let mut fresh = Machine::tiny(m.arch, paging);
        assert_eq!(fresh.sys(1, n.exit, &[0]), None);
        assert_eq!(
            m.linux.free_frames(),
            fresh.linux.free_frames(),
            "nothing leaked"
        );
    }
}

#[test]
fn timer_rotates_between_runnable_processes() {
    let mut m = Machine::tiny(Arch::Amd64, PagingFormat::Long4);
    assert_eq!(m.sys(1, AMD64.fork, &[]), Some(2));
    assert_eq!(
        m.linux.next().map(|r| r.pid),
        Some(1),
        "no preemption without a timer"
    );
    m.linux.trap(1, Trap::Timer);
    assert_eq!(m.linux.next().map(|r| r.pid), Some(2));
    m.linux.trap(2, Trap::Timer);
    assert_eq!(m.linux.next().map(|r| r.pid), Some(1));
}

#[test]
fn switch_every_rotates_after_that_many_calls() {
    use common::{MockConsole, Output};
    use kqemu_client::{GuestRam, Linux, LinuxConfig};
    use std::cell::RefCell;
    use std::rc::Rc;

    let mut fs = MemFs::new();
    fs.add_file("/bin/tiny", &tiny_elf(Arch::Amd64), 0o755)
        .unwrap();
    let bytes: &'static mut [u8] = Box::leak(vec![0u8; 8 << 20].into_boxed_slice());
    let ram = GuestRam::new(bytes, 16 << 20).unwrap();
    let out = Rc::new(RefCell::new(Output::default()));
    let mut cfg = LinuxConfig::new(Arch::Amd64, PagingFormat::Long4);
    cfg.switch_every = 3;
    let linux = Linux::new(ram, fs, cfg, Box::new(MockConsole(out.clone())));
    let mut m = Machine {
        linux,
        out,
        arch: Arch::Amd64,
    };
    assert_eq!(m.linux.spawn("/bin/tiny", &["tiny"], &["HOME=/"]), Ok(1));
    // Call 1 of pid 1.
    assert_eq!(m.sys(1, AMD64.fork, &[]), Some(2));
    let mut order = Vec::new();
    for _ in 0..8 {
        let pid = m.linux.next().map(|r| r.pid).unwrap();
        order.push(pid);
        assert!(m.sys(pid, AMD64.uname, &[0]).is_some());
    }
    assert_eq!(order, [1, 1, 2, 2, 2, 1, 1, 1], "every third call moves on");
}

#[test]
fn dup2_and_sendfile_between_files_and_pipes() {
    for mut m in machines() {
        let n = nr(m.arch);
        let buf = scratch(m.arch);
        let path = m.cstr(1, buf, "/bin/tiny");
        let fd = m.sys(1, n.open, &[path, 0, 0]).unwrap() as u64;
        assert_eq!(m.sys(1, n.dup2, &[fd, 1]), Some(1));
        assert_eq!(
            m.sys(1, n.read, &[1, buf + 0x100, 4]),
            Some(4),
            "fd 1 is the file now"
        );
        assert_eq!(
            m.sys(1, n.read, &[fd, buf + 0x100, 4]),
            Some(4),
            "shared offset"
        );
        assert_eq!(m.peek(1, buf + 0x100, 4), tiny_elf(m.arch)[4..8]);
        let out = m.cstr(1, buf + 0x40, "/tmp/copy");
        let ofd = m.sys(1, n.open, &[out, O_CREAT | O_WRONLY, 0o644]).unwrap() as u64;
        assert_eq!(
            m.sys(1, n.sendfile, &[ofd, fd, 0, 1 << 20]),
            Some(4096 + 16 - 8)
        );
        let elf = tiny_elf(m.arch);
        assert_eq!(m.linux.fs().read_file("/tmp/copy"), Some(&elf[8..]));
        assert_eq!(m.sys(1, n.pipe, &[buf + 0x200]), Some(0));
        let (r, w) = (
            m.peek(1, buf + 0x200, 1)[0] as u64,
            m.peek(1, buf + 0x204, 1)[0] as u64,
        );
        m.poke(1, buf + 0x300, &[0; 8]);
        assert_eq!(m.sys(1, n.sendfile, &[w, fd, buf + 0x300, 100]), Some(100));
        assert_eq!(m.sys(1, n.read, &[r, buf + 0x400, 200]), Some(100));
        assert_eq!(m.peek(1, buf + 0x400, 100), &elf[..100]);
        assert_eq!(m.peek(1, buf + 0x300, 1), [100], "offset argument advanced");
        assert_eq!(
            m.sys(1, n.sendfile, &[ofd, r, 0, 10]),
            Some(EINVAL),
            "input must be a file"
        );
    }
}

#[test]
fn busybox_startup_replay_amd64() {
    let file = busybox(Arch::Amd64);
    let mut fs = MemFs::new();
    fs.add_file("/bin/busybox", &file, 0o755).unwrap();
    let mut m = Machine::new(Arch::Amd64, PagingFormat::Long4, 24, fs);
    m.linux
        .spawn("/bin/busybox", &["busybox", "true"], &[])
        .unwrap();
    let start = m.sys(1, 12, &[0]).unwrap() as u64;
    assert_eq!(
        start, 0x5e_c000,
        "page after the end of bss (0x5db708 + 0x10450)"
    );
    assert_eq!(m.sys(1, 12, &[start + 0xd40]), Some((start + 0xd40) as i64));
    assert_eq!(
        m.sys(1, 158, &[0x1002, start + 0x3c0]),
        Some(0),
        "arch_prctl(ARCH_SET_FS)"
    );
    assert_eq!(m.linux.context(1).unwrap().fs_base, start + 0x3c0);
    assert_eq!(m.sys(1, 158, &[0x1003, start + 0x10]), Some(0));
    assert_eq!(m.peek(1, start + 0x10, 8), (start + 0x3c0).to_le_bytes());
    assert_eq!(m.sys(1, 158, &[0x1002, 1 << 47]), Some(-1), "EPERM");
    assert_eq!(m.sys(1, 218, &[start + 0x690]), Some(1), "set_tid_address");
    assert_eq!(
        m.sys(1, 273, &[start + 0x6a0, 24]),
        Some(0),
        "set_robust_list"
    );
    assert_eq!(
        m.sys(1, 334, &[start + 0xce0, 0x20, 0, 0x5305_3053]),
        Some(ENOSYS),
        "rseq"
    );
    assert_eq!(
        m.sys(1, 302, &[0, 3, 0, start + 0x20]),
        Some(0),
        "prlimit64(RLIMIT_STACK)"
    );
    assert_eq!(m.peek(1, start + 0x20, 8), (8u64 << 20).to_le_bytes());
    let exe = m.cstr(1, start + 0x100, "/proc/self/exe");
    assert_eq!(m.sys(1, 89, &[exe, start + 0x200, 4096]), Some(12));
    assert_eq!(m.sys(1, 318, &[start + 0x30, 8, 1]), Some(8), "getrandom");
    assert_eq!(
        m.sys(1, 10, &[0x5db000, 28672, 1]),
        Some(0),
        "mprotect(RELRO)"
    );
    assert_eq!(
        m.sys(1, 157, &[16, start + 0x40]),
        Some(0),
        "prctl(PR_GET_NAME)"
    );
    assert_eq!(m.peek(1, start + 0x40, 8), b"busybox\0");
    assert_eq!(m.sys(1, 102, &[]), Some(0), "getuid");
    assert_eq!(
        m.sys(1, 16, &[1, 0x5401, start + 0x80]),
        Some(-25),
        "TCGETS: ENOTTY"
    );
    assert_eq!(m.sys(1, 231, &[0]), None);
    assert_eq!(m.linux.exit_status(), Some(0));
}

#[test]
fn i386_thread_area_and_32bit_calls() {
    let file = busybox(Arch::I386);
    let mut fs = MemFs::new();
    fs.add_file("/bin/busybox", &file, 0o755).unwrap();
    fs.add_file("/big", &vec![1u8; 5000], 0o644).unwrap();
    let mut m = Machine::new(Arch::I386, PagingFormat::Legacy32, 24, fs);
    m.linux
        .spawn("/bin/busybox", &["busybox", "true"], &[])
        .unwrap();
    let start = user_addr(m.sys(1, 45, &[0]).unwrap()) as u64;
    assert_eq!(m.sys(1, 45, &[start + 0x880]), Some((start + 0x880) as i64));
    // struct user_desc { entry_number = -1, base, limit = 0xfffff, flags = 0x51 }
    let mut desc = Vec::new();
    for v in [u32::MAX, start as u32 + 0x380, 0xfffff, 0x51] {
        desc.extend_from_slice(&v.to_le_bytes());
    }
    m.poke(1, start + 0x800, &desc);
    assert_eq!(m.sys(1, 243, &[start + 0x800]), Some(0), "set_thread_area");
    assert_eq!(
        m.peek(1, start + 0x800, 4),
        6u32.to_le_bytes(),
        "GDT entry 6"
    );
    let ctx = m.linux.context(1).unwrap().clone();
    assert!(ctx.tls_changed);
    assert_eq!(ctx.tls[0].base_addr, start as u32 + 0x380);
    let d = ctx.tls[0].descriptor();
    let base = (d >> 16 & 0xff_ffff) | (d >> 56) << 24;
    assert_eq!(base, start + 0x380);
    assert_eq!(d >> 45 & 3, 3, "DPL 3");
    assert_eq!(d >> 47 & 1, 1, "present");
    assert_eq!(d >> 54 & 1, 1, "32-bit");
    assert_eq!(d >> 55 & 1, 1, "4 KiB granularity");
    assert_eq!(d >> 40 & 0xf, 0b0011, "read/write data, accessed");
    assert_eq!(
        m.sys(1, 191, &[3, start + 0x40]),
        Some(0),
        "ugetrlimit(RLIMIT_STACK)"
    );
    assert_eq!(
        m.peek(1, start + 0x40, 8),
        [0, 0, 0x80, 0, 0xff, 0xff, 0xff, 0xff]
    );
    let path = m.cstr(1, start + 0x100, "/big");
    let fd = m.sys(1, 5, &[path, 0o100000, 0]).unwrap() as u64;
    assert_eq!(
        m.sys(1, 140, &[fd, 0, 4000, start + 0x48, 0]),
        Some(0),
        "_llseek"
    );
    assert_eq!(m.peek(1, start + 0x48, 8), 4000u64.to_le_bytes());
    assert_eq!(m.sys(1, 3, &[fd, start + 0x200, 2000]), Some(1000));
    assert_eq!(m.sys(1, 197, &[fd, start + 0x300]), Some(0), "fstat64");
    assert_eq!(m.peek(1, start + 0x300 + 44, 8), 5000u64.to_le_bytes());
    let map = user_addr(m.sys(1, 192, &[0, 4096, 1, 2, fd, 1]).unwrap()) as u64;
    assert_eq!(map % 4096, 0);
    assert!(
        map > 0x8000_0000 && map < 0xc000_0000,
        "below the 3 GiB stack top: {map:#x}"
    );
    assert_eq!(m.peek(1, map, 4), [1, 1, 1, 1], "mmap2 offset in pages");
    assert_eq!(
        m.peek(1, map + 5000 - 4096, 4),
        [0; 4],
        "zero past the end of file"
    );
    assert_eq!(
        m.sys(1, 403, &[1, start + 0x60]),
        Some(0),
        "clock_gettime64"
    );
    assert_eq!(m.sys(1, 122, &[start + 0x400]), Some(0));
    assert_eq!(m.peek(1, start + 0x400 + 4 * 65, 5), b"i686\0");
    assert_eq!(
        m.sys(1, 384, &[0x1002, 0]),
        Some(EINVAL),
        "no arch_prctl(SET_FS) on i386"
    );
}

#[test]
fn spawn_checks_its_program() {
    let mut fs = MemFs::new();
    fs.add_file("/bin/tiny32", &tiny_elf(Arch::I386), 0o755)
        .unwrap();
    fs.add_file("/bin/tiny", &tiny_elf(Arch::Amd64), 0o755)
        .unwrap();
    let mut m = Machine::new(Arch::Amd64, PagingFormat::Long4, 8, fs);
    let free = m.linux.free_frames();
    assert_eq!(m.linux.spawn("/bin/none", &["x"], &[]), Err(Errno::ENOENT));
    assert_eq!(
        m.linux.spawn("/bin/tiny32", &["x"], &[]),
        Err(Errno::ENOEXEC)
    );
    assert!(
        m.log().contains("spawn /bin/tiny32: a I386 program"),
        "{}",
        m.log()
    );
    assert_eq!(m.linux.free_frames(), free, "the refused image was freed");
    assert_eq!(m.linux.spawn("/bin/tiny", &["x"], &[]), Ok(1));
    assert_eq!(m.linux.spawn("/bin/tiny", &["x"], &[]), Err(Errno::EBUSY));
    // amd64 code cannot run on 32-bit page tables.
    let mut fs = MemFs::new();
    fs.add_file("/bin/tiny", &tiny_elf(Arch::Amd64), 0o755)
        .unwrap();
    let mut m = Machine::new(Arch::Amd64, PagingFormat::Pae, 8, fs);
    assert_eq!(m.linux.spawn("/bin/tiny", &["x"], &[]), Err(Errno::ENOEXEC));
}

#[test]
fn clone_variants() {
    let mut m = Machine::tiny(Arch::Amd64, PagingFormat::Long4);
    let buf = scratch(Arch::Amd64);
    const CLONE_VM: u64 = 0x100;
    const CLONE_VFORK: u64 = 0x4000;
    const CLONE_SETTLS: u64 = 0x8_0000;
    const CLONE_PARENT_SETTID: u64 = 0x10_0000;
    const CLONE_CHILD_SETTID: u64 = 0x100_0000;
    assert_eq!(
        m.sys(1, 56, &[CLONE_VM | 17, buf + 0x1000, 0, 0, 0]),
        Some(ENOSYS),
        "threads"
    );
    assert!(m.log().contains("threads are not supported"));
    // posix_spawn's clone(CLONE_VM | CLONE_VFORK) on its own stack: a copy is enough.
    let flags =
        CLONE_VM | CLONE_VFORK | 17 | CLONE_SETTLS | CLONE_PARENT_SETTID | CLONE_CHILD_SETTID;
    let child = m
        .sys(1, 56, &[flags, buf + 0x1800, buf, buf + 8, 0x1234_5000])
        .unwrap();
    assert_eq!(child, 2);
    assert_eq!(
        m.peek(1, buf, 4),
        2u32.to_le_bytes(),
        "parent tid written in the parent"
    );
    assert_eq!(
        m.peek(1, buf + 8, 4),
        b"MENT",
        "the parent's copy keeps its data"
    );
    assert_eq!(
        m.peek(2, buf + 8, 4),
        2u32.to_le_bytes(),
        "child tid written in the child"
    );
    let ctx = m.linux.context(2).unwrap().clone();
    assert_eq!(
        (ctx.regs[REG_RSP], ctx.fs_base, ctx.regs[REG_RAX]),
        (buf + 0x1800, 0x1234_5000, 0)
    );
}

#[test]
fn pipes_are_bounded() {
    let mut m = Machine::tiny(Arch::I386, PagingFormat::Legacy32);
    let buf = scratch(Arch::I386);
    let mut made = 0;
    let result = loop {
        match m.sys(1, I386.pipe, &[buf]).unwrap() {
            0 => made += 1,
            err => break err,
        }
    };
    assert_eq!((made, result), (256, -23), "ENFILE after MAX_PIPES");
    assert_eq!(m.sys(1, I386.close, &[3]), Some(0));
    assert_eq!(
        m.sys(1, I386.pipe, &[buf]),
        Some(-23),
        "one end still open keeps the pipe"
    );
    assert_eq!(m.sys(1, I386.close, &[4]), Some(0));
    assert_eq!(m.sys(1, I386.pipe, &[buf]), Some(0));
}

#[test]
fn directory_listing_survives_removals() {
    let mut fs = MemFs::new();
    fs.add_file("/bin/tiny", &tiny_elf(Arch::Amd64), 0o755)
        .unwrap();
    for name in ["a", "b", "c", "d", "e"] {
        fs.add_file(&format!("/d/{name}"), b"", 0o644).unwrap();
    }
    let mut m = Machine::new(Arch::Amd64, PagingFormat::Long4, 8, fs);
    m.linux.spawn("/bin/tiny", &["t"], &[]).unwrap();
    let buf = scratch(Arch::Amd64);
    let dir = m.cstr(1, buf, "/d");
    let fd = m.sys(1, AMD64.open, &[dir, 0o200000, 0]).unwrap() as u64;
    let names = |m: &mut Machine, len: usize| -> Vec<String> {
        let raw = m.peek(1, buf + 0x100, len);
        let mut out = Vec::new();
        let mut at = 0;
        while at < raw.len() {
            let reclen = u16::from_le_bytes([raw[at + 16], raw[at + 17]]) as usize;
            let name = raw[at + 19..at + reclen].split(|&b| b == 0).next().unwrap();
            out.push(String::from_utf8(name.to_vec()).unwrap());
            at += reclen;
        }
        out
    };
    // Each record of a one-letter name takes 24 bytes: room for three.
    let got = m.sys(1, AMD64.getdents64, &[fd, buf + 0x100, 72]).unwrap() as usize;
    assert_eq!(names(&mut m, got), [".", "..", "a"]);
    assert_eq!(
        m.sys(1, AMD64.getdents64, &[fd, buf + 0x100, 10]),
        Some(EINVAL),
        "too small"
    );
    let a = m.cstr(1, buf + 0x80, "/d/a");
    assert_eq!(m.sys(1, AMD64.unlink, &[a]), Some(0));
    let got = m
        .sys(1, AMD64.getdents64, &[fd, buf + 0x100, 1024])
        .unwrap() as usize;
    assert_eq!(
        names(&mut m, got),
        ["b", "c", "d", "e"],
        "nothing skipped after the removal"
    );
    assert_eq!(m.sys(1, 8, &[fd, 0, 0]), Some(0), "rewind");
    let got = m
        .sys(1, AMD64.getdents64, &[fd, buf + 0x100, 1024])
        .unwrap() as usize;
    assert_eq!(names(&mut m, got), [".", "..", "b", "c", "d", "e"]);
}

#[test]
fn modify_ldt_writes_reads_and_forks_the_process_ldt() {
    const ENOMEM: i64 = -12;
    for mut m in machines() {
        let n = nr(m.arch);
        let modify_ldt = if m.arch == Arch::Amd64 { 154 } else { 123 };
        let buf = scratch(m.arch);
        let desc = |entry: u32, base: u32, limit: u32, flags: u32| {
            let mut d = Vec::new();
            for v in [entry, base, limit, flags] {
                d.extend_from_slice(&v.to_le_bytes());
            }
            d
        };
        assert_eq!(m.sys(1, modify_ldt, &[0, buf, 64]), Some(0), "no LDT yet");
        // Entry 2: 4 KiB of 32-bit data at 0x1000 (seg_32bit).
        m.poke(1, buf, &desc(2, 0x1000, 0xfff, 1));
        assert_eq!(m.sys(1, modify_ldt, &[0x11, buf, 16]), Some(0));
        let ctx = m.linux.context(1).unwrap().clone();
        assert!(ctx.tls_changed);
        assert_eq!(ctx.ldt.len(), 3, "grown to the entry written");
        let d = ctx.ldt[2];
        assert_eq!(d & 0xffff, 0xfff);
        assert_eq!(d >> 16 & 0xff_ffff, 0x1000);
        assert_eq!(d >> 40 & 0xff, 0xf3, "present DPL-3 data, accessed");
        assert_eq!(d >> 54 & 1, 1, "32-bit");
        // func 0: bytecount bytes, the entries then zeros.
        m.poke(1, buf + 0x100, &[0xaa; 40]);
        assert_eq!(m.sys(1, modify_ldt, &[0, buf + 0x100, 32]), Some(32));
        let read = m.peek(1, buf + 0x100, 40);
        assert_eq!(read[16..24], d.to_le_bytes());
        assert_eq!(read[24..32], [0; 8]);
        assert_eq!(read[32..], [0xaa; 8], "nothing past bytecount");
        // Refusals.
        assert_eq!(m.sys(1, modify_ldt, &[0x11, buf, 15]), Some(EINVAL));
        m.poke(1, buf, &desc(8192, 0, 0, 1));
        assert_eq!(m.sys(1, modify_ldt, &[0x11, buf, 16]), Some(EINVAL));
        m.poke(1, buf, &desc(300, 0, 0, 1));
        assert_eq!(m.sys(1, modify_ldt, &[0x11, buf, 16]), Some(ENOMEM));
        m.poke(1, buf, &desc(1, 0, 0xfff, 3 << 1));
        assert_eq!(
            m.sys(1, modify_ldt, &[0x11, buf, 16]),
            Some(EINVAL),
            "present conforming code"
        );
        // func 2 reads the default LDT: zeros, at most 128 bytes.
        m.poke(1, buf, &[0xff; 16]);
        assert_eq!(m.sys(1, modify_ldt, &[2, buf, 16]), Some(16));
        assert_eq!(m.peek(1, buf, 16), [0; 16]);
        assert_eq!(m.sys(1, modify_ldt, &[3, buf, 16]), Some(ENOSYS));
        // fork copies the LDT; the child's changes stay its own.
        assert_eq!(m.sys(1, n.fork, &[]), Some(2));
        assert_eq!(m.linux.context(2).unwrap().ldt, ctx.ldt);
        // func 1 with base and limit 0: the entry is cleared.
        m.poke(2, buf, &desc(2, 0, 0, 1));
        assert_eq!(m.sys(2, modify_ldt, &[1, buf, 16]), Some(0));
        assert_eq!(m.linux.context(2).unwrap().ldt, [0, 0, 0]);
        assert_eq!(m.linux.context(1).unwrap().ldt[2], d);
    }
}
