//! Byte layouts of the Linux structures the syscall layer exchanges with programs, for the
//! x86_64 ABI and the i386 ABI (arch/x86/include/uapi/asm/stat.h, uapi/linux/stat.h, ...).

use alloc::vec;
use alloc::vec::Vec;

use crate::context::Arch;
use crate::memfs::Stat;

/// Device number reported for every file of the in-memory file system.
const FS_DEV: u64 = 0x16;
/// `st_blksize` reported for every file.
const BLOCK_SIZE: u64 = 4096;

/// A little-endian byte buffer builder.
#[derive(Default)]
pub(crate) struct Enc {
    pub buf: Vec<u8>,
}

impl Enc {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// A C `long` / pointer of the ABI.
    pub fn word(&mut self, arch: Arch, v: u64) -> &mut Self {
        match arch {
            Arch::Amd64 => self.u64(v),
            Arch::I386 => self.u32(v as u32),
        }
    }
    pub fn zeros(&mut self, n: usize) -> &mut Self {
        self.buf.resize(self.buf.len() + n, 0);
        self
    }
}

/// Size of a C `long` / pointer.
pub(crate) fn word_size(arch: Arch) -> usize {
    match arch {
        Arch::Amd64 => 8,
        Arch::I386 => 4,
    }
}

/// Reads a little-endian `long` of the ABI at `offset` (zero-extended).
pub(crate) fn get_word(arch: Arch, bytes: &[u8], offset: usize) -> u64 {
    let size = word_size(arch);
    let mut raw = [0u8; 8];
    if let Some(src) = bytes.get(offset..offset + size) {
        raw[..size].copy_from_slice(src);
    }
    u64::from_le_bytes(raw)
}

/// Reads a little-endian `u64` at `offset`.
pub(crate) fn get_u64(bytes: &[u8], offset: usize) -> u64 {
    let mut raw = [0u8; 8];
    if let Some(src) = bytes.get(offset..offset + 8) {
        raw.copy_from_slice(src);
    }
    u64::from_le_bytes(raw)
}

/// `struct stat` (x86_64, 144 bytes) or `struct stat64` (i386, 96 bytes).
pub(crate) fn stat(arch: Arch, st: &Stat) -> Vec<u8> {
    let blocks = st.size.div_ceil(512);
    let sec = st.mtime_sec as u64;
    let nsec = u64::from(st.mtime_nsec);
    let mut e = Enc::new();
    match arch {
        Arch::Amd64 => {
            e.u64(FS_DEV).u64(st.ino).u64(st.nlink.into());
            e.u32(st.mode).u32(st.uid).u32(st.gid).u32(0);
            e.u64(st.rdev).u64(st.size).u64(BLOCK_SIZE).u64(blocks);
            for _ in 0..3 {
                e.u64(sec).u64(nsec);
            }
            e.zeros(24);
        }
        Arch::I386 => {
            e.u64(FS_DEV).zeros(4).u32(st.ino as u32);
            e.u32(st.mode).u32(st.nlink).u32(st.uid).u32(st.gid);
            e.u64(st.rdev).zeros(4).u64(st.size);
            e.u32(BLOCK_SIZE as u32).u64(blocks);
            for _ in 0..3 {
                e.u32(sec as u32).u32(nsec as u32);
            }
            e.u64(st.ino);
        }
    }
    e.buf
}

/// `STATX_BASIC_STATS` (uapi/linux/stat.h): the fields `statx` fills.
pub(crate) const STATX_BASIC_STATS: u32 = 0x7ff;

/// `struct statx` (256 bytes, same on both ABIs).
pub(crate) fn statx(st: &Stat) -> Vec<u8> {
    let mut e = Enc::new();
    e.u32(STATX_BASIC_STATS).u32(BLOCK_SIZE as u32).u64(0);
    e.u32(st.nlink).u32(st.uid).u32(st.gid);
    e.u16(st.mode as u16).u16(0);
    e.u64(st.ino).u64(st.size).u64(st.size.div_ceil(512)).u64(0);
    for _ in 0..4 {
        e.u64(st.mtime_sec as u64).u32(st.mtime_nsec).u32(0);
    }
    e.u32((st.rdev >> 8) as u32).u32((st.rdev & 0xff) as u32);
    e.u32((FS_DEV >> 8) as u32).u32((FS_DEV & 0xff) as u32);
    e.zeros(256 - e.buf.len());
    e.buf
}

/// `struct new_utsname`: six 65-byte fields.
pub(crate) fn utsname(arch: Arch) -> Vec<u8> {
    let machine: &[u8] = match arch {
        Arch::Amd64 => b"x86_64",
        Arch::I386 => b"i686",
    };
    let fields: [&[u8]; 6] = [
        b"Linux",
        b"kqemu",
        b"6.1.0-kqemu",
        b"#1 SMP",
        machine,
        b"(none)",
    ];
    let mut out = vec![0u8; 6 * 65];
    for (i, field) in fields.iter().enumerate() {
        out[i * 65..i * 65 + field.len()].copy_from_slice(field);
    }
    out
}

/// `struct sysinfo` with memory in bytes (mem_unit 1).
pub(crate) fn sysinfo(
    arch: Arch,
    uptime: u64,
    total_ram: u64,
    free_ram: u64,
    procs: u16,
) -> Vec<u8> {
    let mut e = Enc::new();
    e.word(arch, uptime);
    for _ in 0..3 {
        e.word(arch, 0);
    }
    e.word(arch, total_ram)
        .word(arch, free_ram)
        .word(arch, 0)
        .word(arch, 0);
    e.word(arch, 0).word(arch, 0);
    e.u16(procs).u16(0);
    if arch == Arch::Amd64 {
        e.u32(0);
    }
    e.word(arch, 0).word(arch, 0).u32(1);
    let size = match arch {
        Arch::Amd64 => 112,
        Arch::I386 => 64,
    };
    e.zeros(size - e.buf.len());
    e.buf
}

/// A `struct timespec` / `struct timeval` whose fields are `word` bytes (4 or 8) each.
pub(crate) fn time_pair(word: usize, sec: i64, sub: i64) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 * word);
    out.extend_from_slice(&sec.to_le_bytes()[..word]);
    out.extend_from_slice(&sub.to_le_bytes()[..word]);
    out
}

/// Decodes a `time_pair` of `word`-byte fields (sign-extended).
pub(crate) fn get_time_pair(word: usize, bytes: &[u8]) -> (i64, i64) {
    let field = |at: usize| {
        let mut raw = [0u8; 8];
        raw[..word].copy_from_slice(&bytes[at..at + word]);
        let value = i64::from_le_bytes(raw);
        if word == 4 {
            i64::from(value as i32)
        } else {
            value
        }
    };
    (field(0), field(word))
}

/// `struct rusage` of zeros for the ABI.
pub(crate) fn rusage_zero(arch: Arch) -> Vec<u8> {
    vec![0u8; 18 * word_size(arch)]
}
