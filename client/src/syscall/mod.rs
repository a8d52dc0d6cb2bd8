//! The Linux system-call layer: number decoding for both ABIs and the dispatcher.
//!
//! x86_64 (`syscall`): number in RAX, arguments in RDI RSI RDX R10 R8 R9.
//! i386 (`int 0x80`): number in EAX, arguments in EBX ECX EDX ESI EDI EBP.
//! Numbers: arch/x86/entry/syscalls/syscall_64.tbl and syscall_32.tbl.

mod fs;
mod mem;
mod proc;

use crate::context::{
    Arch, REG_R10, REG_R8, REG_R9, REG_RAX, REG_RBP, REG_RBX, REG_RCX, REG_RDI, REG_RDX, REG_RSI,
};
use crate::errno::{Errno, KResult};
use crate::linux::Linux;
use crate::process::Process;

/// What a system call did to the calling process.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Flow {
    /// Return this value (or `-errno`) in the accumulator.
    Ret(i64),
    /// Park the process; the call is retried (from the same registers) later.
    Block,
    /// The process no longer returns from this call (it exited or was killed).
    Gone,
    /// `execve` replaced the registers; leave them alone.
    Replaced,
}

pub(crate) type SysResult = KResult<Flow>;

/// Wraps a plain value result.
pub(crate) fn ret(value: i64) -> SysResult {
    Ok(Flow::Ret(value))
}

/// The six argument registers of a call, read per ABI.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Args {
    raw: [u64; 6],
    pub abi: Arch,
}

impl Args {
    /// An unsigned argument (`unsigned long`, pointer, `size_t`).
    pub fn u(&self, i: usize) -> u64 {
        match self.abi {
            Arch::Amd64 => self.raw[i],
            Arch::I386 => self.raw[i] & 0xffff_ffff,
        }
    }
    /// A C `int` argument.
    pub fn int(&self, i: usize) -> i32 {
        self.raw[i] as u32 as i32
    }
    /// A C `unsigned int` argument.
    pub fn uint(&self, i: usize) -> u32 {
        self.raw[i] as u32
    }
    /// A signed `long` (`off_t`, `ssize_t`) argument.
    pub fn long(&self, i: usize) -> i64 {
        match self.abi {
            Arch::Amd64 => self.raw[i] as i64,
            Arch::I386 => i64::from(self.raw[i] as u32 as i32),
        }
    }
    /// A size argument clamped to what one call moves (Linux `MAX_RW_COUNT`).
    pub fn count(&self, i: usize) -> usize {
        self.u(i).min(MAX_RW_COUNT) as usize
    }
}

/// Most bytes one read or write transfers (Linux `MAX_RW_COUNT`: INT_MAX rounded down to a page).
const MAX_RW_COUNT: u64 = 0x7fff_f000;

macro_rules! syscalls {
    ($($name:ident),* $(,)?) => {
        /// The system calls this layer knows, independent of ABI.
        #[derive(Clone, Copy, PartialEq, Eq, Debug)]
        pub(crate) enum Sys { $($name),* }
    };
}

syscalls!(
    Read,
    Write,
    Open,
    Close,
    Stat,
    Fstat,
    Lstat,
    Poll,
    Lseek,
    Llseek,
    Mmap,
    Mmap2,
    OldMmap,
    Mprotect,
    Munmap,
    Brk,
    RtSigaction,
    RtSigprocmask,
    Ioctl,
    Pread64,
    Pwrite64,
    Readv,
    Writev,
    Access,
    Pipe,
    Select,
    SchedYield,
    Mremap,
    Madvise,
    Dup,
    Dup2,
    Pause,
    Nanosleep,
    Alarm,
    Getpid,
    Sendfile,
    Sendfile64,
    Clone,
    Fork,
    Vfork,
    Execve,
    Exit,
    Wait4,
    Waitpid,
    Kill,
    Uname,
    Fcntl,
    Fcntl64,
    Flock,
    Fsync,
    Truncate,
    Ftruncate,
    Truncate64,
    Ftruncate64,
    Getdents64,
    Getcwd,
    Chdir,
    Fchdir,
    Rename,
    Mkdir,
    Rmdir,
    Creat,
    Link,
    Unlink,
    Symlink,
    Readlink,
    Chmod,
    Fchmod,
    Chown,
    Fchown,
    Umask,
    Gettimeofday,
    Getrlimit,
    Setrlimit,
    Prlimit64,
    Getrusage,
    Sysinfo,
    Times,
    GetId,
    SetId,
    Getresuid,
    Getgroups,
    Setpgid,
    Getppid,
    Getpgrp,
    Setsid,
    Getpgid,
    Getsid,
    RtSigpending,
    RtSigsuspend,
    Sigaltstack,
    Getpriority,
    Setpriority,
    Prctl,
    ArchPrctl,
    Sync,
    Gettid,
    Time,
    Futex,
    SetTidAddress,
    ClockGettime,
    ClockGettime64,
    ClockGetres,
    ClockGetres64,
    ClockNanosleep,
    ExitGroup,
    Tgkill,
    Tkill,
    Utimes,
    Openat,
    Mkdirat,
    Fchownat,
    Fstatat,
    Unlinkat,
    Renameat,
    Renameat2,
    Linkat,
    Symlinkat,
    Readlinkat,
    Fchmodat,
    Faccessat,
    Faccessat2,
    Pselect6,
    Pselect6Time64,
    Ppoll,
    PpollTime64,
    SetRobustList,
    GetRobustList,
    Dup3,
    Pipe2,
    Getrandom,
    Statx,
    Rseq,
    Utimensat,
    Utimensat64,
    Fadvise64,
    SchedGetaffinity,
    SetThreadArea,
    GetThreadArea,
    ModifyLdt,
    Socket,
);

impl Sys {
    /// x86_64 numbering (syscall_64.tbl).
    pub fn amd64(nr: u64) -> Option<Sys> {
        use Sys::*;
        Some(match nr {
            0 => Read,
            1 => Write,
            2 => Open,
            3 => Close,
            4 => Stat,
            5 => Fstat,
            6 => Lstat,
            7 => Poll,
            8 => Lseek,
            9 => Mmap,
            10 => Mprotect,
            11 => Munmap,
            12 => Brk,
            13 => RtSigaction,
            14 => RtSigprocmask,
            16 => Ioctl,
            17 => Pread64,
            18 => Pwrite64,
            19 => Readv,
            20 => Writev,
            21 => Access,
            22 => Pipe,
            23 => Select,
            24 => SchedYield,
            25 => Mremap,
            28 => Madvise,
            32 => Dup,
            33 => Dup2,
            34 => Pause,
            35 => Nanosleep,
            37 => Alarm,
            39 => Getpid,
            40 => Sendfile64,
            41 => Socket,
            56 => Clone,
            57 => Fork,
            58 => Vfork,
            59 => Execve,
            60 => Exit,
            61 => Wait4,
            62 => Kill,
            63 => Uname,
            72 => Fcntl,
            73 => Flock,
            74 | 75 => Fsync,
            76 => Truncate,
            77 => Ftruncate,
            79 => Getcwd,
            80 => Chdir,
            81 => Fchdir,
            82 => Rename,
            83 => Mkdir,
            84 => Rmdir,
            85 => Creat,
            86 => Link,
            87 => Unlink,
            88 => Symlink,
            89 => Readlink,
            90 => Chmod,
            91 => Fchmod,
            92 | 94 => Chown,
            93 => Fchown,
            95 => Umask,
            96 => Gettimeofday,
            97 => Getrlimit,
            98 => Getrusage,
            99 => Sysinfo,
            100 => Times,
            102 | 104 | 107 | 108 => GetId,
            105 | 106 | 113 | 114 | 117 | 119 | 116 | 122 | 123 => SetId,
            109 => Setpgid,
            110 => Getppid,
            111 => Getpgrp,
            112 => Setsid,
            115 => Getgroups,
            118 | 120 => Getresuid,
            121 => Getpgid,
            124 => Getsid,
            127 => RtSigpending,
            130 => RtSigsuspend,
            131 => Sigaltstack,
            140 => Getpriority,
            141 => Setpriority,
            157 => Prctl,
            154 => ModifyLdt,
            158 => ArchPrctl,
            160 => Setrlimit,
            162 => Sync,
            186 => Gettid,
            200 => Tkill,
            201 => Time,
            202 => Futex,
            204 => SchedGetaffinity,
            205 => SetThreadArea,
            211 => GetThreadArea,
            217 => Getdents64,
            218 => SetTidAddress,
            221 => Fadvise64,
            228 => ClockGettime,
            229 => ClockGetres,
            230 => ClockNanosleep,
            231 => ExitGroup,
            234 => Tgkill,
            235 => Utimes,
            257 => Openat,
            258 => Mkdirat,
            260 => Fchownat,
            262 => Fstatat,
            263 => Unlinkat,
            264 => Renameat,
            265 => Linkat,
            266 => Symlinkat,
            267 => Readlinkat,
            268 => Fchmodat,
            269 => Faccessat,
            270 => Pselect6,
            271 => Ppoll,
            273 => SetRobustList,
            274 => GetRobustList,
            280 => Utimensat,
            292 => Dup3,
            293 => Pipe2,
            302 => Prlimit64,
            316 => Renameat2,
            318 => Getrandom,
            332 => Statx,
            334 => Rseq,
            439 => Faccessat2,
            _ => return None,
        })
    }

    /// i386 numbering (syscall_32.tbl).
    pub fn i386(nr: u64) -> Option<Sys> {
        use Sys::*;
        Some(match nr {
            1 => Exit,
            2 => Fork,
            3 => Read,
            4 => Write,
            5 => Open,
            6 => Close,
            7 => Waitpid,
            8 => Creat,
            9 => Link,
            10 => Unlink,
            11 => Execve,
            12 => Chdir,
            13 => Time,
            15 => Chmod,
            16 | 182 | 198 | 212 => Chown,
            19 => Lseek,
            20 => Getpid,
            24 | 47 | 49 | 50 | 199 | 200 | 201 | 202 => GetId,
            23 | 46 | 70 | 71 | 138 | 139 | 164 | 170 | 203 | 204 | 208 | 210 | 213 | 214 | 215
            | 216 | 81 | 206 => SetId,
            27 => Alarm,
            29 => Pause,
            33 => Access,
            36 => Sync,
            37 => Kill,
            38 => Rename,
            39 => Mkdir,
            40 => Rmdir,
            41 => Dup,
            42 => Pipe,
            43 => Times,
            45 => Brk,
            54 => Ioctl,
            55 => Fcntl,
            57 => Setpgid,
            60 => Umask,
            63 => Dup2,
            64 => Getppid,
            65 => Getpgrp,
            66 => Setsid,
            75 => Setrlimit,
            76 | 191 => Getrlimit,
            77 => Getrusage,
            78 => Gettimeofday,
            80 | 205 => Getgroups,
            83 => Symlink,
            85 => Readlink,
            90 => OldMmap,
            91 => Munmap,
            92 => Truncate,
            93 => Ftruncate,
            94 => Fchmod,
            95 | 207 => Fchown,
            96 => Getpriority,
            97 => Setpriority,
            102 => Socket,
            114 => Wait4,
            116 => Sysinfo,
            118 | 148 => Fsync,
            120 => Clone,
            122 => Uname,
            123 => ModifyLdt,
            125 => Mprotect,
            132 => Getpgid,
            133 => Fchdir,
            140 => Llseek,
            142 => Select,
            143 => Flock,
            145 => Readv,
            146 => Writev,
            147 => Getsid,
            158 => SchedYield,
            162 => Nanosleep,
            163 => Mremap,
            165 | 171 | 209 | 211 => Getresuid,
            168 => Poll,
            172 => Prctl,
            174 => RtSigaction,
            175 => RtSigprocmask,
            176 => RtSigpending,
            179 => RtSigsuspend,
            180 => Pread64,
            181 => Pwrite64,
            183 => Getcwd,
            186 => Sigaltstack,
            187 => Sendfile,
            190 => Vfork,
            192 => Mmap2,
            193 => Truncate64,
            194 => Ftruncate64,
            195 => Stat,
            196 => Lstat,
            197 => Fstat,
            219 => Madvise,
            220 => Getdents64,
            221 => Fcntl64,
            224 => Gettid,
            238 => Tkill,
            239 => Sendfile64,
            240 => Futex,
            242 => SchedGetaffinity,
            243 => SetThreadArea,
            244 => GetThreadArea,
            250 | 272 => Fadvise64,
            252 => ExitGroup,
            258 => SetTidAddress,
            265 => ClockGettime,
            266 => ClockGetres,
            267 => ClockNanosleep,
            270 => Tgkill,
            271 => Utimes,
            295 => Openat,
            296 => Mkdirat,
            298 => Fchownat,
            300 => Fstatat,
            301 => Unlinkat,
            302 => Renameat,
            303 => Linkat,
            304 => Symlinkat,
            305 => Readlinkat,
            306 => Fchmodat,
            307 => Faccessat,
            308 => Pselect6,
            309 => Ppoll,
            311 => SetRobustList,
            312 => GetRobustList,
            320 => Utimensat,
            330 => Dup3,
            331 => Pipe2,
            340 => Prlimit64,
            353 => Renameat2,
            355 => Getrandom,
            359 => Socket,
            383 => Statx,
            384 => ArchPrctl,
            386 => Rseq,
            403 => ClockGettime64,
            406 => ClockGetres64,
            407 => ClockNanosleep,
            412 => Utimensat64,
            413 => Pselect6Time64,
            414 => PpollTime64,
            422 => Futex,
            439 => Faccessat2,
            _ => return None,
        })
    }
}

impl Linux<'_> {
    /// Decodes the call in `p.ctx` for `abi` and runs it.
    pub(crate) fn dispatch(&mut self, p: &mut Process, abi: Arch) -> Flow {
        let r = &p.ctx.regs;
        let (nr, raw) = match abi {
            Arch::Amd64 => (
                r[REG_RAX],
                [
                    r[REG_RDI], r[REG_RSI], r[REG_RDX], r[REG_R10], r[REG_R8], r[REG_R9],
                ],
            ),
            Arch::I386 => (
                r[REG_RAX] & 0xffff_ffff,
                [
                    r[REG_RBX], r[REG_RCX], r[REG_RDX], r[REG_RSI], r[REG_RDI], r[REG_RBP],
                ],
            ),
        };
        let args = Args { raw, abi };
        let sys = match abi {
            Arch::Amd64 => Sys::amd64(nr),
            Arch::I386 => Sys::i386(nr),
        };
        let result = match sys {
            Some(sys) => self.call(p, sys, &args),
            None => {
                self.log_once(abi, nr, format_args!("unknown system call {nr}: ENOSYS"));
                Err(Errno::ENOSYS)
            }
        };
        match result {
            Ok(flow) => flow,
            Err(err) => Flow::Ret(err.as_ret()),
        }
    }

    fn call(&mut self, p: &mut Process, sys: Sys, a: &Args) -> SysResult {
        use Sys::*;
        match sys {
            Read | Write | Pread64 | Pwrite64 | Readv | Writev | Sendfile | Sendfile64 | Lseek
            | Llseek | Open | Openat | Creat | Close | Dup | Dup2 | Dup3 | Pipe | Pipe2 | Fcntl
            | Fcntl64 | Ioctl | Flock | Fsync | Getdents64 | Poll | Ppoll | PpollTime64
            | Select | Pselect6 | Pselect6Time64 | Fadvise64 => self.file_call(p, sys, a),
            Stat | Lstat | Fstat | Fstatat | Statx | Access | Faccessat | Faccessat2 | Readlink
            | Readlinkat | Getcwd | Chdir | Fchdir | Mkdir | Mkdirat | Rmdir | Unlink
            | Unlinkat | Rename | Renameat | Renameat2 | Link | Linkat | Symlink | Symlinkat
            | Chmod | Fchmod | Fchmodat | Chown | Fchown | Fchownat | Truncate | Ftruncate
            | Truncate64 | Ftruncate64 | Utimes | Utimensat | Utimensat64 | Umask | Sync => {
                self.path_call(p, sys, a)
            }
            Mmap | Mmap2 | OldMmap | Munmap | Mprotect | Mremap | Brk | Madvise => {
                self.mem_call(p, sys, a)
            }
            _ => self.proc_call(p, sys, a),
        }
    }
}

/// `AT_FDCWD` (uapi/linux/fcntl.h).
pub(crate) const AT_FDCWD: i32 = -100;

/// The address space of a live process (a zombie has none).
pub(crate) fn mm_of(p: &mut Process) -> KResult<&mut crate::mm::Mm> {
    p.mm.as_mut().ok_or(Errno::EFAULT)
}

impl Linux<'_> {
    /// Copies `len` bytes of user memory (EFAULT on a bad pointer).
    pub(crate) fn uread(
        &mut self,
        p: &mut Process,
        va: u64,
        len: usize,
    ) -> KResult<alloc::vec::Vec<u8>> {
        let mut buf = alloc::vec![0u8; len];
        mm_of(p)?.read(&mut self.ram, va, &mut buf)?;
        Ok(buf)
    }

    /// Copies `data` to user memory (EFAULT on a bad pointer).
    pub(crate) fn uwrite(&mut self, p: &mut Process, va: u64, data: &[u8]) -> KResult<()> {
        mm_of(p)?.write(&mut self.ram, va, data)
    }

    /// A path argument: NUL-terminated, shorter than PATH_MAX (ENAMETOOLONG otherwise).
    pub(crate) fn upath(&mut self, p: &mut Process, va: u64) -> KResult<alloc::vec::Vec<u8>> {
        mm_of(p)?.read_cstr(
            &mut self.ram,
            va,
            crate::memfs::PATH_MAX - 1,
            Errno::ENAMETOOLONG,
        )
    }

    /// A `long` / pointer of the ABI at `va`.
    pub(crate) fn uword(&mut self, p: &mut Process, abi: Arch, va: u64) -> KResult<u64> {
        let size = crate::abi::word_size(abi);
        let bytes = self.uread(p, va, size)?;
        Ok(crate::abi::get_word(abi, &bytes, 0))
    }

    pub(crate) fn put_u32(&mut self, p: &mut Process, va: u64, value: u32) -> KResult<()> {
        self.uwrite(p, va, &value.to_le_bytes())
    }

    pub(crate) fn put_u64(&mut self, p: &mut Process, va: u64, value: u64) -> KResult<()> {
        self.uwrite(p, va, &value.to_le_bytes())
    }

    /// Writes a `long` of the ABI.
    pub(crate) fn put_word(
        &mut self,
        p: &mut Process,
        abi: Arch,
        va: u64,
        value: u64,
    ) -> KResult<()> {
        let size = crate::abi::word_size(abi);
        self.uwrite(p, va, &value.to_le_bytes()[..size])
    }
}
