//! Process, signal, identity, time and miscellaneous system calls.

use alloc::vec;
use alloc::vec::Vec;

use super::{mm_of, ret, Args, Flow, Sys, SysResult};
use crate::abi::{self, get_u64, get_word, word_size, Enc};
use crate::context::{Arch, UserDesc, REG_RSP, TLS_ENTRIES};
use crate::errno::{Errno, KResult};
use crate::linux::{exited_status, signaled_status, Linux};
use crate::loader::{ARG_MAX, CLOCK_TICKS};
use crate::process::{AltStack, Pid, Process, SigAction, State, NSIG, SIGCHLD, SIGKILL, SIGSTOP};

// uapi/linux/sched.h
const CLONE_VM: u64 = 0x100;
const CLONE_SIGHAND: u64 = 0x800;
const CLONE_VFORK: u64 = 0x4000;
const CLONE_THREAD: u64 = 0x1_0000;
const CLONE_SETTLS: u64 = 0x8_0000;
const CLONE_PARENT_SETTID: u64 = 0x10_0000;
const CLONE_CHILD_SETTID: u64 = 0x100_0000;
// uapi/linux/wait.h
const WNOHANG: u32 = 1;
// uapi/asm-generic/signal-defs.h
const SIG_BLOCK: u32 = 0;
const SIG_UNBLOCK: u32 = 1;
const SIG_SETMASK: u32 = 2;
const SS_DISABLE: u32 = 2;
/// Size of the kernel sigset_t (64 signals).
const SIGSET_SIZE: u64 = 8;
// uapi/linux/prctl.h
const PR_SET_PDEATHSIG: u32 = 1;
const PR_GET_DUMPABLE: u32 = 3;
const PR_SET_DUMPABLE: u32 = 4;
const PR_SET_NAME: u32 = 15;
const PR_GET_NAME: u32 = 16;
const PR_SET_NO_NEW_PRIVS: u32 = 38;
const PR_GET_NO_NEW_PRIVS: u32 = 39;
/// `TASK_COMM_LEN`.
const COMM_LEN: usize = 16;
// arch/x86/include/uapi/asm/prctl.h
const ARCH_SET_GS: u32 = 0x1001;
const ARCH_SET_FS: u32 = 0x1002;
const ARCH_GET_FS: u32 = 0x1003;
const ARCH_GET_GS: u32 = 0x1004;
// uapi/linux/futex.h
const FUTEX_CMD_MASK: u32 = 0x7f;
const FUTEX_WAIT: u32 = 0;
const FUTEX_WAKE: u32 = 1;
const FUTEX_WAIT_BITSET: u32 = 9;
const FUTEX_WAKE_BITSET: u32 = 10;
// uapi/asm-generic/resource.h
const RLIMIT_STACK: u32 = 3;
const RLIMIT_CORE: u32 = 4;
const RLIMIT_NOFILE: u32 = 7;
const RLIM_NLIMITS: u32 = 16;
/// Longest single argv/envp string (`MAX_ARG_STRLEN`, 32 pages).
const MAX_ARG_STRLEN: usize = 32 * 4096;
/// Largest getrandom request served in one call (Linux caps at 32 MiB).
const GETRANDOM_MAX: usize = 32 << 20;

/// The soft and hard limits this OS reports.
fn rlimit(resource: u32) -> (u64, u64) {
    match resource {
        RLIMIT_STACK => (crate::mm::STACK_RESERVE, u64::MAX),
        RLIMIT_CORE => (0, u64::MAX),
        RLIMIT_NOFILE => (
            crate::process::MAX_FDS as u64,
            crate::process::MAX_FDS as u64,
        ),
        _ => (u64::MAX, u64::MAX),
    }
}

impl Linux<'_> {
    pub(super) fn proc_call(&mut self, p: &mut Process, sys: Sys, a: &Args) -> SysResult {
        let abi = a.abi;
        match sys {
            Sys::Exit | Sys::ExitGroup => {
                self.exit_process(p, exited_status(a.int(0)));
                Ok(Flow::Gone)
            }
            Sys::Fork | Sys::Vfork => self.do_clone(p, abi, u64::from(SIGCHLD), 0, 0, 0, 0),
            Sys::Clone => {
                let (parent_tid, child_tid, tls) = match abi {
                    Arch::Amd64 => (a.u(2), a.u(3), a.u(4)),
                    Arch::I386 => (a.u(2), a.u(4), a.u(3)),
                };
                self.do_clone(p, abi, a.u(0), a.u(1), parent_tid, child_tid, tls)
            }
            Sys::Execve => self.do_execve(p, abi, a.u(0), a.u(1), a.u(2)),
            Sys::Wait4 => self.do_wait(p, abi, a.int(0), a.u(1), a.uint(2), a.u(3)),
            Sys::Waitpid => self.do_wait(p, abi, a.int(0), a.u(1), a.uint(2), 0),
            Sys::Kill => self.do_kill(p, a.int(0), a.int(1)),
            Sys::Tkill => self.do_kill(p, a.int(0), a.int(1)),
            Sys::Tgkill => self.do_kill(p, a.int(1), a.int(2)),
            Sys::Getpid | Sys::Gettid => ret(p.pid.into()),
            Sys::Getppid => ret(p.ppid.into()),
            Sys::Getpgrp => ret(p.pgid.into()),
            Sys::Getpgid | Sys::Getsid => {
                let pid = a.int(0);
                let target = if pid == 0 || pid == p.pid as i32 {
                    (p.pgid, p.sid)
                } else {
                    let t = self.procs.get(&(pid as Pid)).ok_or(Errno::ESRCH)?;
                    (t.pgid, t.sid)
                };
                ret(if sys == Sys::Getpgid {
                    target.0
                } else {
                    target.1
                }
                .into())
            }
            Sys::Setpgid => {
                let (pid, pgid) = (a.int(0), a.int(1));
                if pgid < 0 {
                    return Err(Errno::EINVAL);
                }
                if pid == 0 || pid == p.pid as i32 {
                    p.pgid = if pgid == 0 { p.pid } else { pgid as Pid };
                } else {
                    let t = self.procs.get_mut(&(pid as Pid)).ok_or(Errno::ESRCH)?;
                    if t.ppid != p.pid {
                        return Err(Errno::ESRCH);
                    }
                    t.pgid = if pgid == 0 { t.pid } else { pgid as Pid };
                }
                ret(0)
            }
            Sys::Setsid => {
                if p.pgid == p.pid {
                    return Err(Errno::EPERM);
                }
                p.sid = p.pid;
                p.pgid = p.pid;
                ret(p.pid.into())
            }
            // Everything runs as root.
            Sys::GetId | Sys::SetId | Sys::Getgroups => ret(0),
            Sys::Getresuid => {
                for i in 0..3 {
                    self.put_u32(p, a.u(i), 0)?;
                }
                ret(0)
            }
            Sys::Uname => {
                self.uwrite(p, a.u(0), &abi::utsname(abi))?;
                ret(0)
            }
            Sys::Sysinfo => {
                let uptime = (self.now_ns() as u64).saturating_sub(self.boot_ns) / 1_000_000_000;
                let total = self.ram.frames() as u64 * crate::ram::PAGE_SIZE;
                let free = self.ram.free_frames() as u64 * crate::ram::PAGE_SIZE;
                let procs = self.procs.len() as u16 + 1;
                self.uwrite(p, a.u(0), &abi::sysinfo(abi, uptime, total, free, procs))?;
                ret(0)
            }
            Sys::Times => {
                if a.u(0) != 0 {
                    self.uwrite(p, a.u(0), &vec![0u8; 4 * word_size(abi)])?;
                }
                let ticks = (self.now_ns() as u64).saturating_sub(self.boot_ns)
                    / (1_000_000_000 / CLOCK_TICKS);
                ret(ticks as i64)
            }
            Sys::Getrlimit => {
                let resource = a.uint(0);
                if resource >= RLIM_NLIMITS {
                    return Err(Errno::EINVAL);
                }
                let (cur, max) = rlimit(resource);
                let clamp = |v: u64| match abi {
                    Arch::Amd64 => v,
                    Arch::I386 => v.min(u64::from(u32::MAX)),
                };
                let mut e = Enc::new();
                e.word(abi, clamp(cur)).word(abi, clamp(max));
                self.uwrite(p, a.u(1), &e.buf)?;
                ret(0)
            }
            Sys::Setrlimit => ret(0),
            Sys::Prlimit64 => {
                let (pid, resource, old) = (a.int(0), a.uint(1), a.u(3));
                if pid != 0 && pid != p.pid as i32 && !self.procs.contains_key(&(pid as Pid)) {
                    return Err(Errno::ESRCH);
                }
                if resource >= RLIM_NLIMITS {
                    return Err(Errno::EINVAL);
                }
                if old != 0 {
                    let (cur, max) = rlimit(resource);
                    let mut e = Enc::new();
                    e.u64(cur).u64(max);
                    self.uwrite(p, old, &e.buf)?;
                }
                ret(0)
            }
            Sys::Getrusage => {
                self.uwrite(p, a.u(1), &abi::rusage_zero(abi))?;
                ret(0)
            }
            Sys::RtSigaction => self.do_sigaction(p, abi, a.int(0), a.u(1), a.u(2), a.u(3)),
            Sys::RtSigprocmask => {
                let (how, set, old, size) = (a.uint(0), a.u(1), a.u(2), a.u(3));
                if size != SIGSET_SIZE {
                    return Err(Errno::EINVAL);
                }
                let new = if set != 0 {
                    Some(get_u64(&self.uread(p, set, 8)?, 0))
                } else {
                    None
                };
                if old != 0 {
                    self.put_u64(p, old, p.sigmask)?;
                }
                if let Some(new) = new {
                    let unblockable = 1 << (SIGKILL - 1) | 1 << (SIGSTOP - 1);
                    p.sigmask = match how {
                        SIG_BLOCK => p.sigmask | new,
                        SIG_UNBLOCK => p.sigmask & !new,
                        SIG_SETMASK => new,
                        _ => return Err(Errno::EINVAL),
                    } & !unblockable;
                }
                ret(0)
            }
            Sys::RtSigpending => {
                self.put_u64(p, a.u(0), 0)?;
                ret(0)
            }
            // Signals are never delivered, so nothing can end these waits.
            Sys::RtSigsuspend | Sys::Pause => Ok(Flow::Block),
            Sys::Sigaltstack => self.do_sigaltstack(p, abi, a.u(0), a.u(1)),
            Sys::Prctl => self.do_prctl(p, a.uint(0), a.u(1)),
            Sys::ArchPrctl => {
                if abi != Arch::Amd64 {
                    return Err(Errno::EINVAL);
                }
                let (code, addr) = (a.uint(0), a.u(1));
                let top = mm_of(p)?.user_top();
                match code {
                    ARCH_SET_FS | ARCH_SET_GS if addr >= top => Err(Errno::EPERM),
                    ARCH_SET_FS => {
                        p.ctx.fs_base = addr;
                        ret(0)
                    }
                    ARCH_SET_GS => {
                        p.ctx.gs_base = addr;
                        ret(0)
                    }
                    ARCH_GET_FS | ARCH_GET_GS => {
                        let base = if code == ARCH_GET_FS {
                            p.ctx.fs_base
                        } else {
                            p.ctx.gs_base
                        };
                        self.put_u64(p, addr, base)?;
                        ret(0)
                    }
                    _ => Err(Errno::EINVAL),
                }
            }
            Sys::SetThreadArea => {
                let desc = self.read_user_desc(p, a.u(0))?;
                let entry = Self::install_tls(p, self.cfg.tls_entry_base, desc)?;
                self.put_u32(p, a.u(0), entry)?;
                ret(0)
            }
            Sys::ModifyLdt => self.modify_ldt(p, a.u(0), a.u(1), a.u(2)),
            Sys::GetThreadArea => {
                let entry = self.uread(p, a.u(0), 4)?;
                let entry = u32::from_le_bytes([entry[0], entry[1], entry[2], entry[3]]);
                let index = entry
                    .checked_sub(self.cfg.tls_entry_base)
                    .filter(|&i| (i as usize) < TLS_ENTRIES)
                    .ok_or(Errno::EINVAL)?;
                let desc = p.ctx.tls[index as usize];
                let mut e = Enc::new();
                e.u32(entry)
                    .u32(desc.base_addr)
                    .u32(desc.limit)
                    .u32(desc.flags);
                self.uwrite(p, a.u(0), &e.buf)?;
                ret(0)
            }
            // Without threads nobody waits on the cleared tid: only the return value matters.
            Sys::SetTidAddress => ret(p.pid.into()),
            Sys::SetRobustList => {
                let expected = 3 * word_size(abi) as u64;
                if a.u(1) != expected {
                    return Err(Errno::EINVAL);
                }
                ret(0)
            }
            // glibc disables rseq registration when the kernel answers ENOSYS.
            Sys::Rseq | Sys::GetRobustList => Err(Errno::ENOSYS),
            Sys::Futex => match a.uint(1) & FUTEX_CMD_MASK {
                FUTEX_WAKE | FUTEX_WAKE_BITSET => ret(0),
                FUTEX_WAIT | FUTEX_WAIT_BITSET => {
                    let current = self.uread(p, a.u(0), 4)?;
                    if u32::from_le_bytes([current[0], current[1], current[2], current[3]])
                        != a.uint(2)
                    {
                        return Err(Errno::EAGAIN);
                    }
                    // Single-threaded processes: nobody else can wake this waiter.
                    Ok(Flow::Block)
                }
                _ => Err(Errno::ENOSYS),
            },
            Sys::ClockGettime | Sys::ClockGettime64 => {
                let word = if sys == Sys::ClockGettime64 {
                    8
                } else {
                    word_size(abi)
                };
                let ns = self.clock_ns(a.int(0))?;
                let value = abi::time_pair(word, ns / 1_000_000_000, ns % 1_000_000_000);
                self.uwrite(p, a.u(1), &value)?;
                ret(0)
            }
            Sys::ClockGetres | Sys::ClockGetres64 => {
                let word = if sys == Sys::ClockGetres64 {
                    8
                } else {
                    word_size(abi)
                };
                self.clock_ns(a.int(0))?;
                if a.u(1) != 0 {
                    self.uwrite(p, a.u(1), &abi::time_pair(word, 0, 1))?;
                }
                ret(0)
            }
            // Sleeping returns at once: the guest sees no time pass.
            Sys::Nanosleep | Sys::ClockNanosleep | Sys::Alarm => ret(0),
            Sys::Gettimeofday => {
                if a.u(0) != 0 {
                    let ns = self.now_ns();
                    let value = abi::time_pair(
                        word_size(abi),
                        ns / 1_000_000_000,
                        ns % 1_000_000_000 / 1000,
                    );
                    self.uwrite(p, a.u(0), &value)?;
                }
                if a.u(1) != 0 {
                    self.uwrite(p, a.u(1), &[0u8; 8])?;
                }
                ret(0)
            }
            Sys::Time => {
                let sec = self.now_ns() / 1_000_000_000;
                if a.u(0) != 0 {
                    self.put_word(p, abi, a.u(0), sec as u64)?;
                }
                ret(sec)
            }
            Sys::SchedYield => {
                self.request_rotate();
                ret(0)
            }
            Sys::SchedGetaffinity => {
                let len = a.u(1);
                if len < 8 || !len.is_multiple_of(word_size(abi) as u64) {
                    return Err(Errno::EINVAL);
                }
                self.put_u64(p, a.u(2), 1)?;
                ret(8)
            }
            Sys::Getpriority => ret(20),
            Sys::Setpriority => ret(0),
            Sys::Getrandom => {
                let count = (a.u(1) as usize).min(GETRANDOM_MAX);
                mm_of(p)?.check(&mut self.ram, a.u(0), count as u64, true)?;
                let mut done = 0;
                let mut chunk = [0u8; 256];
                while done < count {
                    let n = (count - done).min(chunk.len());
                    self.console.random(&mut chunk[..n]);
                    self.uwrite(p, a.u(0) + done as u64, &chunk[..n])?;
                    done += n;
                }
                ret(count as i64)
            }
            Sys::Socket => Err(Errno::EAFNOSUPPORT),
            _ => Err(Errno::ENOSYS),
        }
    }

    /// Nanoseconds on clock `id` (CLOCK_REALTIME and friends; uapi/linux/time.h).
    fn clock_ns(&mut self, id: i32) -> KResult<i64> {
        let now = self.now_ns();
        match id {
            0 | 5 | 8 | 11 => Ok(now),
            1 | 4 | 6 | 7 | 9 => Ok(now - self.boot_ns as i64 + 1_000_000_000),
            2 | 3 => Ok(now - self.boot_ns as i64),
            _ => Err(Errno::EINVAL),
        }
    }

    fn read_user_desc(&mut self, p: &mut Process, va: u64) -> KResult<UserDesc> {
        let raw = self.uread(p, va, 16)?;
        let field = |i: usize| {
            u32::from_le_bytes([raw[4 * i], raw[4 * i + 1], raw[4 * i + 2], raw[4 * i + 3]])
        };
        Ok(UserDesc {
            entry_number: field(0),
            base_addr: field(1),
            limit: field(2),
            flags: field(3),
        })
    }

    /// `modify_ldt(func, ptr, bytecount)` (Linux arch/x86/kernel/ldt.c): func 0 reads the
    /// LDT (`bytecount` bytes, zero-filled past its entries; 0 without an LDT), 1 and 0x11
    /// write one entry (the old and the new mode of `write_ldt`); func 2 (the default LDT)
    /// and others are ENOSYS. The LDT lives in the guest OS's GDT page
    /// ([`crate::LDT_ENTRIES`] entries: a higher entry number is ENOMEM here, EINVAL from
    /// 8192 on as in Linux).
    fn modify_ldt(&mut self, p: &mut Process, func: u64, ptr: u64, bytecount: u64) -> SysResult {
        const READ: u64 = 0;
        const WRITE_OLD: u64 = 1;
        const READ_DEFAULT: u64 = 2;
        /// What x86_64 Linux's default LDT reads as: this many zero bytes.
        const DEFAULT_LDT_BYTES: u64 = 128;
        const WRITE: u64 = 0x11;
        /// Linux `LDT_ENTRIES` and `LDT_ENTRY_SIZE`.
        const LINUX_LDT_ENTRIES: u32 = 8192;
        const ENTRY_SIZE: u64 = 8;
        const USER_DESC_SIZE: u64 = 16;
        match func & 0xffff_ffff {
            READ => {
                if p.ctx.ldt.is_empty() {
                    return ret(0);
                }
                let bytes = bytecount.min(u64::from(LINUX_LDT_ENTRIES) * ENTRY_SIZE) as usize;
                let mut buf = Vec::with_capacity(bytes);
                for raw in &p.ctx.ldt {
                    buf.extend_from_slice(&raw.to_le_bytes());
                }
                buf.resize(bytes, 0);
                self.uwrite(p, ptr, &buf)?;
                ret(bytes as i64)
            }
            READ_DEFAULT => {
                let bytes = bytecount.min(DEFAULT_LDT_BYTES) as usize;
                self.uwrite(p, ptr, &vec![0; bytes])?;
                ret(bytes as i64)
            }
            f @ (WRITE_OLD | WRITE) => {
                let oldmode = f == WRITE_OLD;
                if bytecount != USER_DESC_SIZE {
                    return Err(Errno::EINVAL);
                }
                let desc = self.read_user_desc(p, ptr)?;
                if desc.entry_number >= LINUX_LDT_ENTRIES || desc.ldt_refused(oldmode) {
                    return Err(Errno::EINVAL);
                }
                let index = desc.entry_number as usize;
                if index >= crate::LDT_ENTRIES {
                    return Err(Errno::ENOMEM);
                }
                if p.ctx.ldt.len() <= index {
                    p.ctx.ldt.resize(index + 1, 0);
                }
                p.ctx.ldt[index] = desc.ldt_descriptor(oldmode);
                p.ctx.tls_changed = true;
                ret(0)
            }
            _ => Err(Errno::ENOSYS),
        }
    }

    /// `set_thread_area`: stores the descriptor in a TLS slot (-1 picks a free one).
    fn install_tls(p: &mut Process, base: u32, mut desc: UserDesc) -> KResult<u32> {
        let index = if desc.entry_number == u32::MAX {
            p.ctx
                .tls
                .iter()
                .position(UserDesc::is_empty)
                .ok_or(Errno::ESRCH)?
        } else {
            desc.entry_number
                .checked_sub(base)
                .map(|i| i as usize)
                .filter(|&i| i < TLS_ENTRIES)
                .ok_or(Errno::EINVAL)?
        };
        let entry = base + index as u32;
        desc.entry_number = entry;
        p.ctx.tls[index] = if desc.is_empty() {
            UserDesc {
                entry_number: entry,
                ..UserDesc::default()
            }
        } else {
            desc
        };
        p.ctx.tls_changed = true;
        Ok(entry)
    }

    #[allow(clippy::too_many_arguments)]
    fn do_clone(
        &mut self,
        p: &mut Process,
        abi: Arch,
        flags: u64,
        new_sp: u64,
        parent_tid: u64,
        child_tid: u64,
        tls: u64,
    ) -> SysResult {
        if flags & (CLONE_THREAD | CLONE_SIGHAND) != 0
            || (flags & CLONE_VM != 0 && flags & CLONE_VFORK == 0)
        {
            self.log_once(
                abi,
                3 << 32,
                format_args!("clone: threads are not supported"),
            );
            return Err(Errno::ENOSYS);
        }
        let tls_desc = if flags & CLONE_SETTLS != 0 && abi == Arch::I386 {
            Some(self.read_user_desc(p, tls)?)
        } else {
            None
        };
        let pid = self.alloc_pid()?;
        let mut child = self.fork_process(p, pid)?;
        if new_sp != 0 {
            child.ctx.regs[REG_RSP] = new_sp;
        }
        if flags & CLONE_SETTLS != 0 {
            match tls_desc {
                Some(desc) => {
                    if let Err(err) = Self::install_tls(&mut child, self.cfg.tls_entry_base, desc) {
                        self.exit_process(&mut child, 0);
                        return Err(err);
                    }
                }
                None => child.ctx.fs_base = tls,
            }
        }
        if flags & CLONE_CHILD_SETTID != 0 {
            // Written in the child's copy of memory; a bad pointer is ignored as on Linux.
            let _ = self.put_u32(&mut child, child_tid, pid);
        }
        if flags & CLONE_PARENT_SETTID != 0 {
            let _ = self.put_u32(p, parent_tid, pid);
        }
        self.insert_process(child);
        ret(pid.into())
    }

    /// Reads a NULL-terminated array of string pointers (argv, envp).
    fn read_strings(
        &mut self,
        p: &mut Process,
        abi: Arch,
        va: u64,
        total: &mut usize,
    ) -> KResult<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        if va == 0 {
            return Ok(out);
        }
        let word = word_size(abi);
        for index in 0..ARG_MAX / word {
            let ptr = self.uword(p, abi, va + (index * word) as u64)?;
            if ptr == 0 {
                return Ok(out);
            }
            let s = mm_of(p)?.read_cstr(&mut self.ram, ptr, MAX_ARG_STRLEN, Errno::E2BIG)?;
            *total += s.len() + 1 + word;
            if *total > ARG_MAX {
                return Err(Errno::E2BIG);
            }
            out.push(s);
        }
        Err(Errno::E2BIG)
    }

    fn do_execve(
        &mut self,
        p: &mut Process,
        abi: Arch,
        path_va: u64,
        argv_va: u64,
        envp_va: u64,
    ) -> SysResult {
        let path = self.upath(p, path_va)?;
        if path.is_empty() {
            return Err(Errno::ENOENT);
        }
        let mut total = 0;
        let argv = self.read_strings(p, abi, argv_va, &mut total)?;
        let envp = self.read_strings(p, abi, envp_va, &mut total)?;
        self.exec(p, &path, argv, envp)?;
        Ok(Flow::Replaced)
    }

    fn do_wait(
        &mut self,
        p: &mut Process,
        abi: Arch,
        pid: i32,
        status_va: u64,
        options: u32,
        rusage_va: u64,
    ) -> SysResult {
        let me = p.pid;
        let my_group = p.pgid;
        let matches = |c: &Process| {
            c.ppid == me
                && match pid {
                    -1 => true,
                    0 => c.pgid == my_group,
                    n if n < -1 => c.pgid == n.unsigned_abs(),
                    n => c.pid == n as Pid,
                }
        };
        let children: Vec<(Pid, State)> = self
            .procs
            .values()
            .filter(|c| matches(c))
            .map(|c| (c.pid, c.state))
            .collect();
        if children.is_empty() {
            return Err(Errno::ECHILD);
        }
        let zombie = children.iter().find_map(|&(cpid, state)| match state {
            State::Zombie(status) => Some((cpid, status)),
            _ => None,
        });
        let Some((cpid, status)) = zombie else {
            return if options & WNOHANG != 0 {
                ret(0)
            } else {
                Ok(Flow::Block)
            };
        };
        if status_va != 0 {
            self.put_u32(p, status_va, status as u32)?;
        }
        if rusage_va != 0 {
            self.uwrite(p, rusage_va, &abi::rusage_zero(abi))?;
        }
        self.procs.remove(&cpid);
        ret(cpid.into())
    }

    fn do_kill(&mut self, p: &mut Process, pid: i32, sig: i32) -> SysResult {
        let sig = u32::try_from(sig)
            .ok()
            .filter(|&s| s <= NSIG)
            .ok_or(Errno::EINVAL)?;
        let me = p.pid;
        let (hits_self, others): (bool, Vec<Pid>) = match pid {
            n if n > 0 => (n as Pid == me, vec![n as Pid]),
            0 | -1 => {
                let group = p.pgid;
                let others = self
                    .procs
                    .values()
                    .filter(|t| {
                        if pid == 0 {
                            t.pgid == group
                        } else {
                            t.pid != 1
                        }
                    })
                    .map(|t| t.pid)
                    .collect();
                (true, others)
            }
            n => {
                let group = n.unsigned_abs();
                let others = self
                    .procs
                    .values()
                    .filter(|t| t.pgid == group)
                    .map(|t| t.pid)
                    .collect();
                (p.pgid == group, others)
            }
        };
        let others: Vec<Pid> = others.into_iter().filter(|&t| t != me).collect();
        let exists = others.iter().all(|t| self.procs.contains_key(t));
        if !hits_self && (others.is_empty() || !exists) {
            return Err(Errno::ESRCH);
        }
        if sig == 0 {
            return ret(0);
        }
        for target in others {
            let Some((action, arch, alive)) = self
                .procs
                .get(&target)
                .map(|t| (t.action(sig), t.arch, !matches!(t.state, State::Zombie(_))))
            else {
                continue;
            };
            if alive && self.signal_terminates(action, arch, sig) {
                self.kill_other(target, sig);
            }
        }
        if hits_self && self.signal_terminates(p.action(sig), p.arch, sig) {
            self.exit_process(p, signaled_status(sig));
            return Ok(Flow::Gone);
        }
        ret(0)
    }

    fn do_sigaction(
        &mut self,
        p: &mut Process,
        abi: Arch,
        sig: i32,
        act: u64,
        old: u64,
        size: u64,
    ) -> SysResult {
        if size != SIGSET_SIZE {
            return Err(Errno::EINVAL);
        }
        let sig = u32::try_from(sig)
            .ok()
            .filter(|&s| (1..=NSIG).contains(&s))
            .ok_or(Errno::EINVAL)?;
        if act != 0 && (sig == SIGKILL || sig == SIGSTOP) {
            return Err(Errno::EINVAL);
        }
        let word = word_size(abi);
        let new = if act != 0 {
            let raw = self.uread(p, act, 3 * word + 8)?;
            Some(SigAction {
                handler: get_word(abi, &raw, 0),
                flags: get_word(abi, &raw, word),
                restorer: get_word(abi, &raw, 2 * word),
                mask: get_u64(&raw, 3 * word),
            })
        } else {
            None
        };
        if old != 0 {
            let current = p.action(sig);
            let mut e = Enc::new();
            e.word(abi, current.handler)
                .word(abi, current.flags)
                .word(abi, current.restorer)
                .u64(current.mask);
            self.uwrite(p, old, &e.buf)?;
        }
        if let Some(new) = new {
            p.actions[sig as usize - 1] = new;
        }
        ret(0)
    }

    fn do_sigaltstack(&mut self, p: &mut Process, abi: Arch, ss: u64, old: u64) -> SysResult {
        let word = word_size(abi);
        // stack_t: { void *ss_sp; int ss_flags; size_t ss_size; } with natural alignment.
        let size_offset = if abi == Arch::Amd64 { 16 } else { 8 };
        let len = size_offset + word;
        let new = if ss != 0 {
            let raw = self.uread(p, ss, len)?;
            let flags =
                u32::from_le_bytes([raw[word], raw[word + 1], raw[word + 2], raw[word + 3]]);
            Some(AltStack {
                sp: get_word(abi, &raw, 0),
                flags,
                size: get_word(abi, &raw, size_offset),
            })
        } else {
            None
        };
        if old != 0 {
            let current = p.altstack;
            let flags = if current.size == 0 {
                SS_DISABLE
            } else {
                current.flags
            };
            let mut e = Enc::new();
            e.word(abi, current.sp).u32(flags);
            if abi == Arch::Amd64 {
                e.u32(0);
            }
            e.word(abi, current.size);
            self.uwrite(p, old, &e.buf)?;
        }
        if let Some(new) = new {
            p.altstack = if new.flags & SS_DISABLE != 0 {
                AltStack::default()
            } else {
                new
            };
        }
        ret(0)
    }

    fn do_prctl(&mut self, p: &mut Process, option: u32, arg: u64) -> SysResult {
        match option {
            PR_SET_NAME => {
                let name = match mm_of(p)?.read_cstr(&mut self.ram, arg, 4095, Errno::EINVAL) {
                    Ok(name) => name,
                    Err(Errno::EINVAL) => self.uread(p, arg, COMM_LEN - 1)?,
                    Err(err) => return Err(err),
                };
                p.comm = name[..name.len().min(COMM_LEN - 1)].to_vec();
                ret(0)
            }
            PR_GET_NAME => {
                let mut out = [0u8; COMM_LEN];
                out[..p.comm.len()].copy_from_slice(&p.comm);
                self.uwrite(p, arg, &out)?;
                ret(0)
            }
            PR_GET_DUMPABLE => ret(1),
            PR_SET_PDEATHSIG | PR_SET_DUMPABLE | PR_SET_NO_NEW_PRIVS => ret(0),
            PR_GET_NO_NEW_PRIVS => ret(0),
            _ => Err(Errno::EINVAL),
        }
    }
}
