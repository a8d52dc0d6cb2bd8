//! Processes, their file descriptors, open file descriptions and pipes.

use alloc::collections::VecDeque;
use alloc::vec::Vec;

use crate::context::{Arch, UserContext};
use crate::memfs::Ino;
use crate::mm::Mm;

/// A process id.
pub type Pid = u32;

/// Signals (Linux asm/signal.h, identical on i386 and x86_64).
pub const SIGILL: u32 = 4;
pub const SIGTRAP: u32 = 5;
pub const SIGABRT: u32 = 6;
pub const SIGBUS: u32 = 7;
pub const SIGFPE: u32 = 8;
pub const SIGKILL: u32 = 9;
pub const SIGSEGV: u32 = 11;
pub const SIGPIPE: u32 = 13;
pub const SIGCHLD: u32 = 17;
pub const SIGCONT: u32 = 18;
pub const SIGSTOP: u32 = 19;
pub const SIGTSTP: u32 = 20;
pub const SIGTTIN: u32 = 21;
pub const SIGTTOU: u32 = 22;
pub const SIGURG: u32 = 23;
pub const SIGWINCH: u32 = 28;
/// Number of signals (`_NSIG`).
pub const NSIG: u32 = 64;
/// Handler values.
pub const SIG_DFL: u64 = 0;
pub const SIG_IGN: u64 = 1;
/// `sa_flags` bit: children do not become zombies.
pub const SA_NOCLDWAIT: u64 = 2;

/// Most descriptors a process may hold (the default `RLIMIT_NOFILE`).
pub const MAX_FDS: usize = 1024;
/// Capacity of a pipe (Linux's default pipe size).
pub const PIPE_CAPACITY: usize = 64 << 10;
/// Writes up to this size are atomic (POSIX PIPE_BUF on Linux).
pub const PIPE_BUF: usize = 4096;
/// Most pipes alive at once (ENFILE beyond), so pipe buffers stay within a bounded heap.
pub const MAX_PIPES: usize = 256;

/// File status flags (Linux asm-generic/fcntl.h, same values on i386 and x86_64).
pub const O_ACCMODE: u32 = 3;
pub const O_RDONLY: u32 = 0;
pub const O_WRONLY: u32 = 1;
pub const O_RDWR: u32 = 2;
pub const O_CREAT: u32 = 0o100;
pub const O_EXCL: u32 = 0o200;
pub const O_TRUNC: u32 = 0o1000;
pub const O_APPEND: u32 = 0o2000;
pub const O_NONBLOCK: u32 = 0o4000;
pub const O_DIRECTORY: u32 = 0o200_000;
pub const O_NOFOLLOW: u32 = 0o400_000;
pub const O_CLOEXEC: u32 = 0o2_000_000;
pub const O_PATH: u32 = 0o10_000_000;
pub const O_TMPFILE: u32 = 0o20_000_000;

/// A simple slab: stable indices, reused after removal.
#[derive(Debug)]
pub(crate) struct Slab<T> {
    items: Vec<Option<T>>,
    free: Vec<usize>,
}

impl<T> Slab<T> {
    pub fn new() -> Self {
        Slab {
            items: Vec::new(),
            free: Vec::new(),
        }
    }
    pub fn insert(&mut self, item: T) -> usize {
        match self.free.pop() {
            Some(id) => {
                self.items[id] = Some(item);
                id
            }
            None => {
                self.items.push(Some(item));
                self.items.len() - 1
            }
        }
    }
    pub fn get(&self, id: usize) -> Option<&T> {
        self.items.get(id)?.as_ref()
    }
    pub fn get_mut(&mut self, id: usize) -> Option<&mut T> {
        self.items.get_mut(id)?.as_mut()
    }
    pub fn len(&self) -> usize {
        self.items.len() - self.free.len()
    }
    pub fn remove(&mut self, id: usize) -> Option<T> {
        let item = self.items.get_mut(id)?.take()?;
        self.free.push(id);
        Some(item)
    }
}

/// What an open file description refers to.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum FileKind {
    /// A file-system inode (regular file, directory, device).
    Inode(Ino),
    PipeRead(usize),
    PipeWrite(usize),
    /// The runner's console: 0 (stdin, always at end of file), 1 or 2.
    Console(i32),
}

/// An open file description (shared by `dup` and `fork`).
#[derive(Debug)]
pub(crate) struct OpenFile {
    pub kind: FileKind,
    /// Access mode and status flags (`O_ACCMODE | O_APPEND | O_NONBLOCK`).
    pub status: u32,
    pub offset: u64,
    /// Directories: the name last listed and the offset after it, so that a listing resumes
    /// after that name even when entries before it were removed meanwhile (`rm -r`).
    pub dir_cursor: Option<(u64, Vec<u8>)>,
    pub refs: u32,
}

impl OpenFile {
    pub fn readable(&self) -> bool {
        self.status & O_ACCMODE != O_WRONLY && self.status & O_PATH == 0
    }
    pub fn writable(&self) -> bool {
        self.status & O_ACCMODE != O_RDONLY && self.status & O_PATH == 0
    }
}

/// A pipe buffer.
#[derive(Debug)]
pub(crate) struct Pipe {
    pub buf: VecDeque<u8>,
    pub readers: u32,
    pub writers: u32,
}

/// A file descriptor slot.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Fd {
    pub file: usize,
    pub cloexec: bool,
}

/// A recorded `rt_sigaction` (signals are not delivered; default actions are applied).
#[derive(Clone, Copy, Default, Debug)]
pub(crate) struct SigAction {
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

/// A recorded `sigaltstack`.
#[derive(Clone, Copy, Default, Debug)]
pub(crate) struct AltStack {
    pub sp: u64,
    pub flags: u32,
    pub size: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum State {
    Runnable,
    /// Waiting in a syscall of this ABI; it is retried when the scheduler looks for work.
    Blocked(Arch),
    /// Exited; `wait_status` is what `wait4` reports.
    Zombie(i32),
}

/// One process.
#[derive(Debug)]
pub(crate) struct Process {
    pub pid: Pid,
    pub ppid: Pid,
    pub pgid: Pid,
    pub sid: Pid,
    pub state: State,
    pub ctx: UserContext,
    pub arch: Arch,
    pub mm: Option<Mm>,
    pub fds: Vec<Option<Fd>>,
    pub cwd: Ino,
    pub umask: u32,
    pub actions: [SigAction; NSIG as usize],
    pub sigmask: u64,
    pub altstack: AltStack,
    /// `prctl(PR_SET_NAME)` / the basename of the executable (at most 15 bytes).
    pub comm: Vec<u8>,
    /// Absolute path of the executable (`/proc/self/exe`).
    pub exe: Vec<u8>,
}

impl Process {
    /// The signal action for `sig` (1..=64).
    pub fn action(&self, sig: u32) -> SigAction {
        self.actions
            .get(sig.wrapping_sub(1) as usize)
            .copied()
            .unwrap_or_default()
    }

    /// The open-file id behind descriptor `fd`.
    pub fn fd(&self, fd: i32) -> Option<Fd> {
        *self.fds.get(usize::try_from(fd).ok()?)?
    }

    /// The lowest free descriptor at or above `min`.
    pub fn free_fd(&self, min: usize) -> Option<usize> {
        (min..MAX_FDS).find(|&fd| self.fds.get(fd).is_none_or(Option::is_none))
    }

    /// Installs `fd` at `index`, returning what was there.
    pub fn set_fd(&mut self, index: usize, fd: Fd) -> Option<Fd> {
        if self.fds.len() <= index {
            self.fds.resize(index + 1, None);
        }
        self.fds[index].replace(fd)
    }

    pub fn take_fd(&mut self, fd: i32) -> Option<Fd> {
        self.fds.get_mut(usize::try_from(fd).ok()?)?.take()
    }
}
