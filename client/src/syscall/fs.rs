//! File and path system calls over the in-memory file system, pipes and the console.

use alloc::vec;
use alloc::vec::Vec;

use super::{mm_of, ret, Args, Flow, Sys, SysResult, AT_FDCWD};
use crate::abi::{self, get_time_pair, get_word, word_size};
use crate::context::Arch;
use crate::errno::{Errno, KResult};
use crate::linux::{signaled_status, Linux};
use crate::memfs::{
    Device, DirPos, Ino, Node, Stat, MAX_FILE_SIZE, ROOT_INO, S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK,
    S_IFMT, S_IFREG,
};
use crate::process::{
    Fd, FileKind, Pipe, Process, MAX_FDS, MAX_PIPES, O_ACCMODE, O_APPEND, O_CLOEXEC, O_CREAT,
    O_DIRECTORY, O_EXCL, O_NOFOLLOW, O_NONBLOCK, O_PATH, O_RDONLY, O_RDWR, O_TMPFILE, O_TRUNC,
    O_WRONLY, PIPE_BUF, PIPE_CAPACITY, SIGPIPE,
};

// uapi/linux/fcntl.h
const AT_SYMLINK_NOFOLLOW: u32 = 0x100;
const AT_REMOVEDIR: u32 = 0x200;
const AT_SYMLINK_FOLLOW: u32 = 0x400;
const AT_EMPTY_PATH: u32 = 0x1000;
const RENAME_NOREPLACE: u32 = 1;
// uapi/linux/fs.h
const SEEK_SET: u32 = 0;
const SEEK_CUR: u32 = 1;
const SEEK_END: u32 = 2;
const SEEK_DATA: u32 = 3;
const SEEK_HOLE: u32 = 4;
const ENXIO: Errno = Errno(6);
// asm-generic/fcntl.h; the 64-bit lock commands are i386 fcntl64 only.
const F_DUPFD: u32 = 0;
const F_GETFD: u32 = 1;
const F_SETFD: u32 = 2;
const F_GETFL: u32 = 3;
const F_SETFL: u32 = 4;
const F_GETLK: u32 = 5;
const F_SETLK: u32 = 6;
const F_SETLKW: u32 = 7;
const F_SETOWN: u32 = 8;
const F_GETOWN: u32 = 9;
const F_GETLK64: u32 = 12;
const F_SETLK64: u32 = 13;
const F_SETLKW64: u32 = 14;
const F_DUPFD_CLOEXEC: u32 = 1030;
const F_SETPIPE_SZ: u32 = 1031;
const F_GETPIPE_SZ: u32 = 1032;
const FD_CLOEXEC: u64 = 1;
const F_UNLCK: u16 = 2;
// asm-generic/ioctls.h
const FIONREAD: u32 = 0x541b;
const FIONBIO: u32 = 0x5421;
const FIONCLEX: u32 = 0x5450;
const FIOCLEX: u32 = 0x5451;
// uapi/asm-generic/poll.h
const POLLIN: u16 = 0x1;
const POLLOUT: u16 = 0x4;
const POLLERR: u16 = 0x8;
const POLLHUP: u16 = 0x10;
const POLLNVAL: u16 = 0x20;
// Linux dirent d_type values (include/linux/fs_types.h).
const DT_FIFO: u8 = 1;
const DT_CHR: u8 = 2;
const DT_DIR: u8 = 4;
const DT_REG: u8 = 8;
const DT_LNK: u8 = 10;
// uapi/linux/stat.h
const UTIME_NOW: i64 = (1 << 30) - 1;
const UTIME_OMIT: i64 = (1 << 30) - 2;
const X_OK: u32 = 1;
/// `IOV_MAX` (UIO_MAXIOV).
const IOV_MAX: usize = 1024;
/// Bytes moved through a kernel buffer at a time (console and file writes, sendfile).
const CHUNK: usize = 64 << 10;

/// Room a writer has in a file right now.
enum Room {
    Ready(usize),
    Full,
    Broken,
}

fn dirent_type(mode: u32) -> u8 {
    match mode & S_IFMT {
        S_IFDIR => DT_DIR,
        S_IFREG => DT_REG,
        S_IFLNK => DT_LNK,
        S_IFCHR => DT_CHR,
        S_IFIFO => DT_FIFO,
        _ => 0,
    }
}

/// A 64-bit value passed as two 32-bit halves (i386 `pread64`, `truncate64`, ...).
fn split64(a: &Args, lo: usize) -> u64 {
    u64::from(a.uint(lo)) | u64::from(a.uint(lo + 1)) << 32
}

impl Linux<'_> {
    pub(super) fn file_call(&mut self, p: &mut Process, sys: Sys, a: &Args) -> SysResult {
        let abi = a.abi;
        match sys {
            Sys::Read => self.do_read(p, a.int(0), a.u(1), a.count(2), None),
            Sys::Write => self.do_write(p, a.int(0), a.u(1), a.count(2), None),
            Sys::Pread64 | Sys::Pwrite64 => {
                let pos = match abi {
                    Arch::Amd64 => a.long(3),
                    Arch::I386 => split64(a, 3) as i64,
                };
                let pos = u64::try_from(pos).map_err(|_| Errno::EINVAL)?;
                if sys == Sys::Pread64 {
                    self.do_read(p, a.int(0), a.u(1), a.count(2), Some(pos))
                } else {
                    self.do_write(p, a.int(0), a.u(1), a.count(2), Some(pos))
                }
            }
            Sys::Readv | Sys::Writev => {
                self.do_vectored(p, a.int(0), a.u(1), a.int(2), sys == Sys::Writev, abi)
            }
            Sys::Sendfile => self.do_sendfile(p, a.int(0), a.int(1), a.u(2), a.count(3), 4),
            Sys::Sendfile64 => self.do_sendfile(p, a.int(0), a.int(1), a.u(2), a.count(3), 8),
            Sys::Lseek => ret(self.do_lseek(p, a.int(0), a.long(1), a.uint(2))?),
            Sys::Llseek => {
                // _llseek(fd, offset_high, offset_low, result, whence)
                let offset = (u64::from(a.uint(1)) << 32 | u64::from(a.uint(2))) as i64;
                let pos = self.do_lseek(p, a.int(0), offset, a.uint(4))?;
                self.put_u64(p, a.u(3), pos as u64)?;
                ret(0)
            }
            Sys::Open => self.do_open(p, AT_FDCWD, a.u(0), a.uint(1), a.uint(2)),
            Sys::Openat => self.do_open(p, a.int(0), a.u(1), a.uint(2), a.uint(3)),
            Sys::Creat => {
                let flags = O_CREAT | O_WRONLY | O_TRUNC;
                self.do_open(p, AT_FDCWD, a.u(0), flags, a.uint(1))
            }
            Sys::Close => {
                let fd = p.take_fd(a.int(0)).ok_or(Errno::EBADF)?;
                self.unref_file(fd.file);
                ret(0)
            }
            Sys::Dup => {
                let fd = p.fd(a.int(0)).ok_or(Errno::EBADF)?;
                self.ref_file(fd.file);
                ret(self.install_fd(p, fd.file, 0, false)?.into())
            }
            Sys::Dup2 | Sys::Dup3 => {
                let (old, new) = (a.int(0), a.int(1));
                let flags = if sys == Sys::Dup3 { a.uint(2) } else { 0 };
                if flags & !O_CLOEXEC != 0 || (sys == Sys::Dup3 && old == new) {
                    return Err(Errno::EINVAL);
                }
                let fd = p.fd(old).ok_or(Errno::EBADF)?;
                let index = usize::try_from(new)
                    .ok()
                    .filter(|&n| n < MAX_FDS)
                    .ok_or(Errno::EBADF)?;
                if old == new {
                    return ret(new.into());
                }
                self.ref_file(fd.file);
                let cloexec = flags & O_CLOEXEC != 0;
                if let Some(previous) = p.set_fd(
                    index,
                    Fd {
                        file: fd.file,
                        cloexec,
                    },
                ) {
                    self.unref_file(previous.file);
                }
                ret(new.into())
            }
            Sys::Pipe => self.do_pipe(p, a.u(0), 0),
            Sys::Pipe2 => self.do_pipe(p, a.u(0), a.uint(1)),
            Sys::Fcntl | Sys::Fcntl64 => {
                self.do_fcntl(p, a.int(0), a.uint(1), a.u(2), sys == Sys::Fcntl64)
            }
            Sys::Ioctl => self.do_ioctl(p, a.int(0), a.uint(1), a.u(2)),
            Sys::Flock | Sys::Fsync | Sys::Fadvise64 => {
                p.fd(a.int(0)).ok_or(Errno::EBADF)?;
                ret(0)
            }
            Sys::Getdents64 => self.do_getdents64(p, a.int(0), a.u(1), a.count(2)),
            Sys::Poll => {
                let timeout = a.int(2);
                let timeout = (timeout >= 0).then_some(i64::from(timeout));
                self.do_poll(p, a.u(0), a.u(1), timeout)
            }
            Sys::Ppoll | Sys::PpollTime64 => {
                let word = if sys == Sys::PpollTime64 {
                    8
                } else {
                    word_size(abi)
                };
                let timeout = self.timeout_arg(p, a.u(2), word)?;
                self.do_poll(p, a.u(0), a.u(1), timeout)
            }
            Sys::Select => {
                let timeout = self.timeout_arg(p, a.u(4), word_size(abi))?;
                self.do_select(p, a, timeout)
            }
            Sys::Pselect6 | Sys::Pselect6Time64 => {
                let word = if sys == Sys::Pselect6Time64 {
                    8
                } else {
                    word_size(abi)
                };
                let timeout = self.timeout_arg(p, a.u(4), word)?;
                self.do_select(p, a, timeout)
            }
            _ => Err(Errno::ENOSYS),
        }
    }

    /// A timeout pointer: None (wait forever) for NULL, else Some(0) if zero, Some(1) if not.
    fn timeout_arg(&mut self, p: &mut Process, va: u64, word: usize) -> KResult<Option<i64>> {
        if va == 0 {
            return Ok(None);
        }
        let raw = self.uread(p, va, 2 * word)?;
        let (sec, sub) = get_time_pair(word, &raw);
        Ok(Some(i64::from(sec != 0 || sub != 0)))
    }

    /// The open-file id behind `fd`.
    pub(crate) fn file_of(&self, p: &Process, fd: i32) -> KResult<usize> {
        let id = p.fd(fd).ok_or(Errno::EBADF)?.file;
        self.files.get(id).ok_or(Errno::EBADF)?;
        Ok(id)
    }

    fn do_read(
        &mut self,
        p: &mut Process,
        fd: i32,
        va: u64,
        count: usize,
        pos: Option<u64>,
    ) -> SysResult {
        let id = self.file_of(p, fd)?;
        let file = self.files.get(id).ok_or(Errno::EBADF)?;
        if !file.readable() {
            return Err(Errno::EBADF);
        }
        let (kind, status, offset) = (file.kind, file.status, file.offset);
        match kind {
            FileKind::Console(_) => ret(0),
            FileKind::PipeWrite(_) => Err(Errno::EBADF),
            FileKind::PipeRead(pipe_id) => {
                if pos.is_some() {
                    return Err(Errno::ESPIPE);
                }
                let pipe = self.pipes.get(pipe_id).ok_or(Errno::EBADF)?;
                if pipe.buf.is_empty() {
                    if pipe.writers == 0 || count == 0 {
                        return ret(0);
                    }
                    if status & O_NONBLOCK != 0 {
                        return Err(Errno::EAGAIN);
                    }
                    return Ok(Flow::Block);
                }
                let n = count.min(pipe.buf.len());
                mm_of(p)?.check(&mut self.ram, va, n as u64, true)?;
                let pipe = self.pipes.get_mut(pipe_id).ok_or(Errno::EBADF)?;
                let data: Vec<u8> = pipe.buf.drain(..n).collect();
                self.uwrite(p, va, &data)?;
                ret(n as i64)
            }
            FileKind::Inode(ino) => match self.fs.node(ino) {
                Some(Node::File(_)) => {
                    let start = pos.unwrap_or(offset);
                    let data = self.fs.read_at(ino, start, count);
                    let n = data.len();
                    mm_of(p)?.write(&mut self.ram, va, data)?;
                    if pos.is_none() {
                        if let Some(file) = self.files.get_mut(id) {
                            file.offset = start + n as u64;
                        }
                    }
                    ret(n as i64)
                }
                Some(Node::Dir { .. }) => Err(Errno::EISDIR),
                Some(Node::Device(Device::Zero)) => {
                    let n = count.min(CHUNK);
                    self.uwrite(p, va, &vec![0u8; n])?;
                    ret(n as i64)
                }
                Some(Node::Device(Device::Null)) => ret(0),
                _ => Err(Errno::EINVAL),
            },
        }
    }

    /// How much a write of `count` bytes to file `id` can move now.
    fn write_room(&self, id: usize, count: usize) -> KResult<Room> {
        let file = self.files.get(id).ok_or(Errno::EBADF)?;
        Ok(match file.kind {
            FileKind::PipeWrite(pipe_id) => {
                let pipe = self.pipes.get(pipe_id).ok_or(Errno::EBADF)?;
                let space = PIPE_CAPACITY.saturating_sub(pipe.buf.len());
                if pipe.readers == 0 {
                    Room::Broken
                } else if count == 0 {
                    Room::Ready(0)
                } else if space == 0 || (count <= PIPE_BUF && space < count) {
                    Room::Full
                } else {
                    Room::Ready(count.min(space))
                }
            }
            FileKind::PipeRead(_) => return Err(Errno::EBADF),
            FileKind::Console(_) | FileKind::Inode(_) => Room::Ready(count),
        })
    }

    /// Appends `data` to file `id` at `pos` (or its offset), after `write_room` said yes.
    fn write_bytes(&mut self, id: usize, data: &[u8], pos: Option<u64>) -> KResult<usize> {
        let now = self.now_ns();
        let file = self.files.get_mut(id).ok_or(Errno::EBADF)?;
        match file.kind {
            FileKind::Console(fd) => {
                self.console.write(fd, data);
                Ok(data.len())
            }
            FileKind::PipeWrite(pipe_id) => {
                let pipe = self.pipes.get_mut(pipe_id).ok_or(Errno::EBADF)?;
                pipe.buf.extend(data);
                Ok(data.len())
            }
            FileKind::PipeRead(_) => Err(Errno::EBADF),
            FileKind::Inode(ino) => match self.fs.node(ino) {
                Some(Node::File(contents)) => {
                    let start = match pos {
                        Some(pos) => pos,
                        None if file.status & O_APPEND != 0 => contents.len() as u64,
                        None => file.offset,
                    };
                    let n = self.fs.write_at(ino, start, data)?;
                    if pos.is_none() {
                        file.offset = start + n as u64;
                    }
                    self.fs.set_mtime(ino, now);
                    Ok(n)
                }
                Some(Node::Device(_)) => Ok(data.len()),
                Some(Node::Dir { .. }) => Err(Errno::EISDIR),
                _ => Err(Errno::EINVAL),
            },
        }
    }

    /// A write to a pipe nobody reads: SIGPIPE's default action kills the writer, else EPIPE.
    fn broken_pipe(&mut self, p: &mut Process) -> SysResult {
        if self.signal_terminates(p.action(SIGPIPE), p.arch, SIGPIPE) {
            self.exit_process(p, signaled_status(SIGPIPE));
            Ok(Flow::Gone)
        } else {
            Err(Errno::EPIPE)
        }
    }

    fn do_write(
        &mut self,
        p: &mut Process,
        fd: i32,
        va: u64,
        count: usize,
        pos: Option<u64>,
    ) -> SysResult {
        let id = self.file_of(p, fd)?;
        let file = self.files.get(id).ok_or(Errno::EBADF)?;
        if !file.writable() {
            return Err(Errno::EBADF);
        }
        let nonblock = file.status & O_NONBLOCK != 0;
        let is_pipe = matches!(file.kind, FileKind::PipeWrite(_));
        if pos.is_some() && !matches!(file.kind, FileKind::Inode(_)) {
            return Err(Errno::ESPIPE);
        }
        let n = match self.write_room(id, count)? {
            Room::Broken => return self.broken_pipe(p),
            Room::Full if nonblock => return Err(Errno::EAGAIN),
            Room::Full => return Ok(Flow::Block),
            Room::Ready(n) => n,
        };
        if is_pipe {
            // A pipe write is all or nothing: check the source before moving anything.
            mm_of(p)?.check(&mut self.ram, va, n as u64, false)?;
        }
        let mut done = 0;
        while done < n {
            let len = (n - done).min(CHUNK);
            let data = match self.uread(p, va + done as u64, len) {
                Ok(data) => data,
                Err(err) if done == 0 => return Err(err),
                Err(_) => break,
            };
            match self.write_bytes(id, &data, pos.map(|pos| pos + done as u64)) {
                Ok(written) => done += written,
                Err(err) if done == 0 => return Err(err),
                Err(_) => break,
            }
        }
        ret(done as i64)
    }

    fn do_vectored(
        &mut self,
        p: &mut Process,
        fd: i32,
        iov: u64,
        count: i32,
        write: bool,
        abi: Arch,
    ) -> SysResult {
        let count = usize::try_from(count)
            .ok()
            .filter(|&c| c <= IOV_MAX)
            .ok_or(Errno::EINVAL)?;
        let word = word_size(abi);
        let raw = self.uread(p, iov, count * 2 * word)?;
        let mut total: usize = 0;
        for index in 0..count {
            let base = get_word(abi, &raw, index * 2 * word);
            let len = get_word(abi, &raw, index * 2 * word + word);
            let len = (len as usize).min(0x7fff_f000 - total);
            if len == 0 {
                continue;
            }
            let result = if write {
                self.do_write(p, fd, base, len, None)
            } else {
                self.do_read(p, fd, base, len, None)
            };
            match result {
                Ok(Flow::Ret(n)) => {
                    total += n as usize;
                    if (n as usize) < len {
                        break;
                    }
                }
                Ok(Flow::Block) if total > 0 => break,
                Ok(flow) => return Ok(flow),
                Err(_) if total > 0 => break,
                Err(err) => return Err(err),
            }
        }
        ret(total as i64)
    }

    fn do_sendfile(
        &mut self,
        p: &mut Process,
        out_fd: i32,
        in_fd: i32,
        offset_ptr: u64,
        count: usize,
        offset_size: usize,
    ) -> SysResult {
        let in_id = self.file_of(p, in_fd)?;
        let out_id = self.file_of(p, out_fd)?;
        let in_file = self.files.get(in_id).ok_or(Errno::EBADF)?;
        let out_file = self.files.get(out_id).ok_or(Errno::EBADF)?;
        if !in_file.readable() || !out_file.writable() {
            return Err(Errno::EBADF);
        }
        let nonblock = out_file.status & O_NONBLOCK != 0;
        let (FileKind::Inode(in_ino), in_offset) = (in_file.kind, in_file.offset) else {
            return Err(Errno::EINVAL);
        };
        if !matches!(self.fs.node(in_ino), Some(Node::File(_))) {
            return Err(Errno::EINVAL);
        }
        let start = if offset_ptr == 0 {
            in_offset
        } else {
            let raw = self.uread(p, offset_ptr, offset_size)?;
            let mut bytes = [0u8; 8];
            bytes[..offset_size].copy_from_slice(&raw);
            let value = i64::from_le_bytes(bytes);
            let value = if offset_size == 4 {
                i64::from(value as i32)
            } else {
                value
            };
            u64::try_from(value).map_err(|_| Errno::EINVAL)?
        };
        let n = match self.write_room(out_id, count.min(CHUNK))? {
            Room::Broken => return self.broken_pipe(p),
            Room::Full if nonblock => return Err(Errno::EAGAIN),
            Room::Full => return Ok(Flow::Block),
            Room::Ready(n) => n,
        };
        let data = self.fs.read_at(in_ino, start, n).to_vec();
        if data.is_empty() {
            return ret(0);
        }
        let written = self.write_bytes(out_id, &data, None)?;
        let end = start + written as u64;
        if offset_ptr == 0 {
            if let Some(file) = self.files.get_mut(in_id) {
                file.offset = end;
            }
        } else {
            self.uwrite(p, offset_ptr, &end.to_le_bytes()[..offset_size])?;
        }
        ret(written as i64)
    }

    fn do_lseek(&mut self, p: &mut Process, fd: i32, offset: i64, whence: u32) -> KResult<i64> {
        let id = self.file_of(p, fd)?;
        let file = self.files.get(id).ok_or(Errno::EBADF)?;
        let FileKind::Inode(ino) = file.kind else {
            return Err(Errno::ESPIPE);
        };
        let size = match self.fs.node(ino) {
            Some(Node::File(data)) => data.len() as i64,
            Some(Node::Device(_)) => return Ok(0),
            _ => 0,
        };
        let current = file.offset as i64;
        let target = match whence {
            SEEK_SET => Some(offset),
            SEEK_CUR => current.checked_add(offset),
            SEEK_END => size.checked_add(offset),
            SEEK_DATA if offset < size => Some(offset),
            SEEK_HOLE if offset < size => Some(size),
            SEEK_DATA | SEEK_HOLE => return Err(ENXIO),
            _ => return Err(Errno::EINVAL),
        };
        let target = target
            .filter(|&t| t >= 0 && t as u64 <= MAX_FILE_SIZE * 2)
            .ok_or(Errno::EINVAL)?;
        if let Some(file) = self.files.get_mut(id) {
            file.offset = target as u64;
        }
        Ok(target)
    }

    /// The directory a `*at` call starts from.
    pub(crate) fn at_dir(&self, p: &Process, dirfd: i32, path: &[u8]) -> KResult<Ino> {
        if path.first() == Some(&b'/') {
            return Ok(ROOT_INO);
        }
        if dirfd == AT_FDCWD {
            return Ok(p.cwd);
        }
        let id = self.file_of(p, dirfd)?;
        match self.files.get(id).map(|f| f.kind) {
            Some(FileKind::Inode(ino)) if self.fs.is_dir(ino) => Ok(ino),
            _ => Err(Errno::ENOTDIR),
        }
    }

    /// Reads a path argument and applies `/proc/self/exe`.
    fn path_arg(&mut self, p: &mut Process, va: u64) -> KResult<Vec<u8>> {
        let path = self.upath(p, va)?;
        Ok(self.proc_self_path(p, &path).unwrap_or(path))
    }

    fn do_open(
        &mut self,
        p: &mut Process,
        dirfd: i32,
        path_va: u64,
        flags: u32,
        mode: u32,
    ) -> SysResult {
        let path = self.path_arg(p, path_va)?;
        let start = self.at_dir(p, dirfd, &path)?;
        if flags & O_TMPFILE == O_TMPFILE {
            return Err(Errno::EINVAL);
        }
        let follow = flags & O_NOFOLLOW == 0;
        let ino = if flags & O_CREAT != 0 {
            match self.fs.resolve(start, &path, follow) {
                Ok(_) if flags & O_EXCL != 0 => return Err(Errno::EEXIST),
                Ok(ino) => ino,
                Err(Errno::ENOENT) => {
                    let (dir, name) = self.fs.resolve_new(start, &path)?;
                    let perm = mode & !p.umask & 0o7777;
                    let now = self.now_ns();
                    self.fs
                        .create(dir, name, Node::File(Vec::new()), perm, now)?
                }
                Err(err) => return Err(err),
            }
        } else {
            self.fs.resolve(start, &path, follow)?
        };
        let access = flags & O_ACCMODE;
        match self.fs.node(ino) {
            Some(Node::Symlink(_)) if flags & O_PATH == 0 => return Err(Errno::ELOOP),
            Some(Node::Dir { .. }) if access != O_RDONLY && flags & O_PATH == 0 => {
                return Err(Errno::EISDIR)
            }
            Some(Node::Dir { .. }) => {}
            Some(_) if flags & O_DIRECTORY != 0 => return Err(Errno::ENOTDIR),
            Some(Node::File(_))
                if flags & O_TRUNC != 0 && (access == O_WRONLY || access == O_RDWR) =>
            {
                self.fs.truncate(ino, 0)?;
                let now = self.now_ns();
                self.fs.set_mtime(ino, now);
            }
            _ => {}
        }
        let status = flags & (O_ACCMODE | O_APPEND | O_NONBLOCK | O_PATH);
        let file = self.new_file(FileKind::Inode(ino), status);
        ret(self.install_fd(p, file, 0, flags & O_CLOEXEC != 0)?.into())
    }

    fn do_pipe(&mut self, p: &mut Process, fds_va: u64, flags: u32) -> SysResult {
        const O_DIRECT: u32 = 0o40_000;
        if flags & !(O_CLOEXEC | O_NONBLOCK | O_DIRECT) != 0 {
            return Err(Errno::EINVAL);
        }
        mm_of(p)?.check(&mut self.ram, fds_va, 8, true)?;
        if self.pipes.len() >= MAX_PIPES {
            return Err(Errno::ENFILE);
        }
        let pipe = self.pipes.insert(Pipe {
            buf: Default::default(),
            readers: 1,
            writers: 1,
        });
        let nonblock = flags & O_NONBLOCK;
        let cloexec = flags & O_CLOEXEC != 0;
        let reader = self.new_file(FileKind::PipeRead(pipe), O_RDONLY | nonblock);
        let writer = self.new_file(FileKind::PipeWrite(pipe), O_WRONLY | nonblock);
        let read_fd = match self.install_fd(p, reader, 0, cloexec) {
            Ok(fd) => fd,
            Err(err) => {
                self.unref_file(writer);
                return Err(err);
            }
        };
        let write_fd = match self.install_fd(p, writer, 0, cloexec) {
            Ok(fd) => fd,
            Err(err) => {
                if let Some(fd) = p.take_fd(read_fd) {
                    self.unref_file(fd.file);
                }
                return Err(err);
            }
        };
        let mut out = [0u8; 8];
        out[..4].copy_from_slice(&read_fd.to_le_bytes());
        out[4..].copy_from_slice(&write_fd.to_le_bytes());
        self.uwrite(p, fds_va, &out)?;
        ret(0)
    }

    fn do_fcntl(
        &mut self,
        p: &mut Process,
        fd: i32,
        cmd: u32,
        arg: u64,
        fcntl64: bool,
    ) -> SysResult {
        let id = self.file_of(p, fd)?;
        let slot = p.fd(fd).ok_or(Errno::EBADF)?;
        match cmd {
            F_DUPFD | F_DUPFD_CLOEXEC => {
                let min = usize::try_from(arg as u32 as i32)
                    .ok()
                    .filter(|&m| m < MAX_FDS)
                    .ok_or(Errno::EINVAL)?;
                self.ref_file(id);
                ret(self.install_fd(p, id, min, cmd == F_DUPFD_CLOEXEC)?.into())
            }
            F_GETFD => ret(i64::from(slot.cloexec)),
            F_SETFD => {
                let cloexec = arg & FD_CLOEXEC != 0;
                if let Ok(index) = usize::try_from(fd) {
                    p.set_fd(index, Fd { file: id, cloexec });
                }
                ret(0)
            }
            F_GETFL => ret(self.files.get(id).map_or(0, |f| f.status).into()),
            F_SETFL => {
                if let Some(file) = self.files.get_mut(id) {
                    let changeable = O_APPEND | O_NONBLOCK;
                    file.status = (file.status & !changeable) | (arg as u32 & changeable);
                }
                ret(0)
            }
            F_GETLK | F_GETLK64 if cmd == F_GETLK || fcntl64 => {
                // No other process holds locks: report the range unlocked (l_type first).
                self.uwrite(p, arg, &F_UNLCK.to_le_bytes())?;
                ret(0)
            }
            F_SETLK | F_SETLKW | F_SETLK64 | F_SETLKW64 => ret(0),
            F_SETOWN | F_GETOWN => ret(0),
            F_SETPIPE_SZ | F_GETPIPE_SZ => match self.files.get(id).map(|f| f.kind) {
                Some(FileKind::PipeRead(_) | FileKind::PipeWrite(_)) => ret(PIPE_CAPACITY as i64),
                _ => Err(Errno::EBADF),
            },
            _ => Err(Errno::EINVAL),
        }
    }

    fn do_ioctl(&mut self, p: &mut Process, fd: i32, request: u32, arg: u64) -> SysResult {
        let id = self.file_of(p, fd)?;
        let kind = self.files.get(id).map(|f| f.kind).ok_or(Errno::EBADF)?;
        match request {
            FIONREAD => {
                let available = match kind {
                    FileKind::PipeRead(pipe) => self.pipes.get(pipe).map_or(0, |p| p.buf.len()),
                    FileKind::Inode(ino) => {
                        let offset = self.files.get(id).map_or(0, |f| f.offset);
                        let size = self.fs.stat(ino).map_or(0, |s| s.size);
                        size.saturating_sub(offset) as usize
                    }
                    _ => 0,
                };
                self.put_u32(p, arg, available.min(i32::MAX as usize) as u32)?;
                ret(0)
            }
            FIONBIO => {
                let on = self.uread(p, arg, 4)? != [0, 0, 0, 0];
                if let Some(file) = self.files.get_mut(id) {
                    file.status = if on {
                        file.status | O_NONBLOCK
                    } else {
                        file.status & !O_NONBLOCK
                    };
                }
                ret(0)
            }
            FIOCLEX | FIONCLEX => {
                if let Ok(index) = usize::try_from(fd) {
                    p.set_fd(
                        index,
                        Fd {
                            file: id,
                            cloexec: request == FIOCLEX,
                        },
                    );
                }
                ret(0)
            }
            // No descriptor is a terminal: TCGETS, TIOCGWINSZ and the rest answer ENOTTY.
            _ => Err(Errno::ENOTTY),
        }
    }

    fn do_getdents64(&mut self, p: &mut Process, fd: i32, va: u64, count: usize) -> SysResult {
        let id = self.file_of(p, fd)?;
        let file = self.files.get(id).ok_or(Errno::EBADF)?;
        let FileKind::Inode(dir) = file.kind else {
            return Err(Errno::ENOTDIR);
        };
        if !self.fs.is_dir(dir) {
            return Err(Errno::ENOTDIR);
        }
        let mut index = file.offset as usize;
        let mut last = match &file.dir_cursor {
            Some((offset, name)) if *offset == file.offset => Some(name.clone()),
            _ => None,
        };
        let count = count.min(CHUNK);
        let mut buf = Vec::new();
        loop {
            let pos = match &last {
                Some(name) if index >= 2 => DirPos::After(name),
                _ => DirPos::Index(index),
            };
            let Some((name, ino, mode)) = self.fs.dir_entry(dir, pos) else {
                break;
            };
            let reclen = (19 + name.len() + 1 + 7) & !7;
            if buf.len() + reclen > count {
                if buf.is_empty() {
                    return Err(Errno::EINVAL);
                }
                break;
            }
            let start = buf.len();
            buf.extend_from_slice(&(ino as u64 + 1).to_le_bytes());
            buf.extend_from_slice(&(index as u64 + 1).to_le_bytes());
            buf.extend_from_slice(&(reclen as u16).to_le_bytes());
            buf.push(dirent_type(mode));
            buf.extend_from_slice(&name);
            buf.resize(start + reclen, 0);
            if index >= 2 {
                last = Some(name);
            }
            index += 1;
        }
        self.uwrite(p, va, &buf)?;
        if let Some(file) = self.files.get_mut(id) {
            file.offset = index as u64;
            file.dir_cursor = last.map(|name| (index as u64, name));
        }
        ret(buf.len() as i64)
    }

    /// poll(2) readiness of an open file: POLLIN/POLLOUT/POLLHUP/POLLERR bits.
    fn readiness(&self, id: usize) -> u16 {
        let Some(file) = self.files.get(id) else {
            return POLLNVAL;
        };
        match file.kind {
            FileKind::Console(0) => POLLIN,
            FileKind::Console(_) => POLLOUT,
            FileKind::PipeRead(pipe) => match self.pipes.get(pipe) {
                Some(pipe) => {
                    let data = if pipe.buf.is_empty() { 0 } else { POLLIN };
                    let hup = if pipe.writers == 0 { POLLHUP } else { 0 };
                    data | hup
                }
                None => POLLHUP,
            },
            FileKind::PipeWrite(pipe) => match self.pipes.get(pipe) {
                Some(pipe) if pipe.readers == 0 => POLLERR,
                Some(pipe) if PIPE_CAPACITY - pipe.buf.len() >= PIPE_BUF => POLLOUT,
                _ => 0,
            },
            FileKind::Inode(_) => POLLIN | POLLOUT,
        }
    }

    fn do_poll(
        &mut self,
        p: &mut Process,
        fds_va: u64,
        nfds: u64,
        timeout: Option<i64>,
    ) -> SysResult {
        let nfds = usize::try_from(nfds)
            .ok()
            .filter(|&n| n <= MAX_FDS)
            .ok_or(Errno::EINVAL)?;
        let mut raw = self.uread(p, fds_va, nfds * 8)?;
        let mut ready = 0;
        for entry in raw.chunks_exact_mut(8) {
            let fd = i32::from_le_bytes([entry[0], entry[1], entry[2], entry[3]]);
            let events = u16::from_le_bytes([entry[4], entry[5]]);
            let revents = if fd < 0 {
                0
            } else {
                match p.fd(fd) {
                    Some(slot) => {
                        self.readiness(slot.file) & (events | POLLHUP | POLLERR | POLLNVAL)
                    }
                    None => POLLNVAL,
                }
            };
            entry[6..8].copy_from_slice(&revents.to_le_bytes());
            if revents != 0 {
                ready += 1;
            }
        }
        if ready == 0 && timeout.is_none() {
            return Ok(Flow::Block);
        }
        self.uwrite(p, fds_va, &raw)?;
        ret(ready)
    }

    fn do_select(&mut self, p: &mut Process, a: &Args, timeout: Option<i64>) -> SysResult {
        let nfds = usize::try_from(a.int(0))
            .ok()
            .filter(|&n| n <= MAX_FDS)
            .ok_or(Errno::EINVAL)?;
        let word_bits = 8 * word_size(a.abi);
        let bytes = nfds.div_ceil(word_bits) * word_size(a.abi);
        let mut sets: [Option<Vec<u8>>; 3] = [None, None, None];
        for (index, set) in sets.iter_mut().enumerate() {
            let va = a.u(1 + index);
            if va != 0 {
                *set = Some(self.uread(p, va, bytes)?);
            }
        }
        let mut ready = 0;
        for fd in 0..nfds {
            let (byte, bit) = (fd / 8, 1u8 << (fd % 8));
            let wanted: Vec<bool> = sets
                .iter()
                .map(|s| s.as_ref().is_some_and(|s| s[byte] & bit != 0))
                .collect();
            if !wanted.iter().any(|&w| w) {
                continue;
            }
            let slot = p.fd(fd as i32).ok_or(Errno::EBADF)?;
            let state = self.readiness(slot.file);
            let hits = [
                state & (POLLIN | POLLHUP | POLLERR) != 0,
                state & (POLLOUT | POLLERR) != 0,
                false,
            ];
            for (index, set) in sets.iter_mut().enumerate() {
                if let Some(set) = set {
                    if wanted[index] && hits[index] {
                        ready += 1;
                    } else {
                        set[byte] &= !bit;
                    }
                }
            }
        }
        if ready == 0 && timeout.is_none() {
            return Ok(Flow::Block);
        }
        for (index, set) in sets.iter().enumerate() {
            if let Some(set) = set {
                self.uwrite(p, a.u(1 + index), set)?;
            }
        }
        ret(ready)
    }

    /// `stat` of an open file (pipes and the console are FIFOs).
    fn stat_file(&self, id: usize) -> KResult<Stat> {
        let file = self.files.get(id).ok_or(Errno::EBADF)?;
        let fifo = |ino: u64| Stat {
            ino,
            mode: S_IFIFO | 0o600,
            nlink: 1,
            uid: 0,
            gid: 0,
            size: 0,
            rdev: 0,
            mtime_sec: 0,
            mtime_nsec: 0,
        };
        match file.kind {
            FileKind::Inode(ino) => self.fs.stat(ino),
            FileKind::PipeRead(pipe) | FileKind::PipeWrite(pipe) => {
                Ok(fifo(0x1_0000 + pipe as u64))
            }
            FileKind::Console(fd) => Ok(fifo(0x2_0000 + fd as u64)),
        }
    }

    /// `stat` of `path` relative to `dirfd`, with AT_* `flags`.
    fn stat_at(&mut self, p: &mut Process, dirfd: i32, path_va: u64, flags: u32) -> KResult<Stat> {
        let path = self.path_arg(p, path_va)?;
        if path.is_empty() {
            if flags & AT_EMPTY_PATH == 0 {
                return Err(Errno::ENOENT);
            }
            if dirfd == AT_FDCWD {
                return self.fs.stat(p.cwd);
            }
            let id = self.file_of(p, dirfd)?;
            return self.stat_file(id);
        }
        let start = self.at_dir(p, dirfd, &path)?;
        let ino = self
            .fs
            .resolve(start, &path, flags & AT_SYMLINK_NOFOLLOW == 0)?;
        self.fs.stat(ino)
    }

    /// Resolves a path argument of a `*at` call to an inode.
    fn inode_at(
        &mut self,
        p: &mut Process,
        dirfd: i32,
        path_va: u64,
        follow: bool,
    ) -> KResult<Ino> {
        let path = self.path_arg(p, path_va)?;
        let start = self.at_dir(p, dirfd, &path)?;
        self.fs.resolve(start, &path, follow)
    }

    /// The inode behind a descriptor.
    fn inode_of_fd(&self, p: &Process, fd: i32) -> KResult<Ino> {
        let id = self.file_of(p, fd)?;
        match self.files.get(id).map(|f| f.kind) {
            Some(FileKind::Inode(ino)) => Ok(ino),
            _ => Err(Errno::EINVAL),
        }
    }

    pub(super) fn path_call(&mut self, p: &mut Process, sys: Sys, a: &Args) -> SysResult {
        let abi = a.abi;
        match sys {
            Sys::Stat | Sys::Lstat | Sys::Fstatat => {
                let (dirfd, path, buf, flags) = match sys {
                    Sys::Stat => (AT_FDCWD, a.u(0), a.u(1), 0),
                    Sys::Lstat => (AT_FDCWD, a.u(0), a.u(1), AT_SYMLINK_NOFOLLOW),
                    _ => (a.int(0), a.u(1), a.u(2), a.uint(3)),
                };
                let st = self.stat_at(p, dirfd, path, flags)?;
                self.uwrite(p, buf, &abi::stat(abi, &st))?;
                ret(0)
            }
            Sys::Fstat => {
                let id = self.file_of(p, a.int(0))?;
                let st = self.stat_file(id)?;
                self.uwrite(p, a.u(1), &abi::stat(abi, &st))?;
                ret(0)
            }
            Sys::Statx => {
                let st = self.stat_at(p, a.int(0), a.u(1), a.uint(2))?;
                self.uwrite(p, a.u(4), &abi::statx(&st))?;
                ret(0)
            }
            Sys::Access | Sys::Faccessat | Sys::Faccessat2 => {
                let (dirfd, path, mode) = match sys {
                    Sys::Access => (AT_FDCWD, a.u(0), a.uint(1)),
                    _ => (a.int(0), a.u(1), a.uint(2)),
                };
                if mode & !7 != 0 {
                    return Err(Errno::EINVAL);
                }
                let ino = self.inode_at(p, dirfd, path, true)?;
                let st = self.fs.stat(ino)?;
                // Everything runs as root: only execute needs a permission bit.
                if mode & X_OK != 0 && st.mode & S_IFMT != S_IFDIR && st.mode & 0o111 == 0 {
                    return Err(Errno::EACCES);
                }
                ret(0)
            }
            Sys::Readlink | Sys::Readlinkat => {
                let (dirfd, path_va, buf, size) = match sys {
                    Sys::Readlink => (AT_FDCWD, a.u(0), a.u(1), a.int(2)),
                    _ => (a.int(0), a.u(1), a.u(2), a.int(3)),
                };
                let size = usize::try_from(size)
                    .ok()
                    .filter(|&s| s > 0)
                    .ok_or(Errno::EINVAL)?;
                let path = self.upath(p, path_va)?;
                let target = match self.proc_self_path(p, &path) {
                    Some(exe) => exe,
                    None => {
                        let start = self.at_dir(p, dirfd, &path)?;
                        let ino = self.fs.resolve(start, &path, false)?;
                        self.fs.readlink(ino)?.to_vec()
                    }
                };
                let n = target.len().min(size);
                self.uwrite(p, buf, &target[..n])?;
                ret(n as i64)
            }
            Sys::Getcwd => {
                let mut path = self.fs.dir_path(p.cwd)?;
                path.push(0);
                if path.len() > a.u(1) as usize {
                    return Err(Errno::ERANGE);
                }
                self.uwrite(p, a.u(0), &path)?;
                ret(path.len() as i64)
            }
            Sys::Chdir | Sys::Fchdir => {
                let ino = if sys == Sys::Chdir {
                    self.inode_at(p, AT_FDCWD, a.u(0), true)?
                } else {
                    self.inode_of_fd(p, a.int(0))?
                };
                if !self.fs.is_dir(ino) {
                    return Err(Errno::ENOTDIR);
                }
                self.fs.retain(ino);
                self.fs.release(p.cwd);
                p.cwd = ino;
                ret(0)
            }
            Sys::Mkdir | Sys::Mkdirat => {
                let (dirfd, path_va, mode) = match sys {
                    Sys::Mkdir => (AT_FDCWD, a.u(0), a.uint(1)),
                    _ => (a.int(0), a.u(1), a.uint(2)),
                };
                let path = self.path_arg(p, path_va)?;
                let start = self.at_dir(p, dirfd, &path)?;
                let (dir, name) = self.fs.resolve_new(start, &path)?;
                let node = Node::Dir {
                    entries: Default::default(),
                    parent: dir,
                };
                let now = self.now_ns();
                self.fs
                    .create(dir, name, node, mode & !p.umask & 0o7777, now)?;
                ret(0)
            }
            Sys::Rmdir | Sys::Unlink | Sys::Unlinkat => {
                let (dirfd, path_va, rmdir) = match sys {
                    Sys::Rmdir => (AT_FDCWD, a.u(0), true),
                    Sys::Unlink => (AT_FDCWD, a.u(0), false),
                    _ => {
                        let flags = a.uint(2);
                        if flags & !AT_REMOVEDIR != 0 {
                            return Err(Errno::EINVAL);
                        }
                        (a.int(0), a.u(1), flags & AT_REMOVEDIR != 0)
                    }
                };
                let path = self.path_arg(p, path_va)?;
                let start = self.at_dir(p, dirfd, &path)?;
                let (dir, name) = self.fs.resolve_parent(start, &path)?;
                self.fs.unlink(dir, name, rmdir)?;
                let now = self.now_ns();
                self.fs.set_mtime(dir, now);
                ret(0)
            }
            Sys::Rename | Sys::Renameat | Sys::Renameat2 => {
                let (old_fd, old_va, new_fd, new_va, flags) = match sys {
                    Sys::Rename => (AT_FDCWD, a.u(0), AT_FDCWD, a.u(1), 0),
                    Sys::Renameat => (a.int(0), a.u(1), a.int(2), a.u(3), 0),
                    _ => (a.int(0), a.u(1), a.int(2), a.u(3), a.uint(4)),
                };
                if flags & !RENAME_NOREPLACE != 0 {
                    return Err(Errno::EINVAL);
                }
                let old = self.path_arg(p, old_va)?;
                let new = self.path_arg(p, new_va)?;
                let old_start = self.at_dir(p, old_fd, &old)?;
                let new_start = self.at_dir(p, new_fd, &new)?;
                let (old_dir, old_name) = self.fs.resolve_parent(old_start, &old)?;
                let (new_dir, new_name) = self.fs.resolve_new(new_start, &new)?;
                if flags & RENAME_NOREPLACE != 0 && self.fs.child(new_dir, new_name).is_some() {
                    return Err(Errno::EEXIST);
                }
                self.fs.rename(old_dir, old_name, new_dir, new_name)?;
                ret(0)
            }
            Sys::Link | Sys::Linkat => {
                let (old_fd, old_va, new_fd, new_va, flags) = match sys {
                    Sys::Link => (AT_FDCWD, a.u(0), AT_FDCWD, a.u(1), 0),
                    _ => (a.int(0), a.u(1), a.int(2), a.u(3), a.uint(4)),
                };
                let target = self.inode_at(p, old_fd, old_va, flags & AT_SYMLINK_FOLLOW != 0)?;
                let new = self.path_arg(p, new_va)?;
                let start = self.at_dir(p, new_fd, &new)?;
                let (dir, name) = self.fs.resolve_new(start, &new)?;
                self.fs.link(target, dir, name)?;
                ret(0)
            }
            Sys::Symlink | Sys::Symlinkat => {
                let (target_va, dirfd, path_va) = match sys {
                    Sys::Symlink => (a.u(0), AT_FDCWD, a.u(1)),
                    _ => (a.u(0), a.int(1), a.u(2)),
                };
                let target = self.upath(p, target_va)?;
                if target.is_empty() {
                    return Err(Errno::ENOENT);
                }
                let path = self.path_arg(p, path_va)?;
                let start = self.at_dir(p, dirfd, &path)?;
                let (dir, name) = self.fs.resolve_new(start, &path)?;
                let now = self.now_ns();
                self.fs
                    .create(dir, name, Node::Symlink(target), 0o777, now)?;
                ret(0)
            }
            Sys::Chmod | Sys::Fchmod | Sys::Fchmodat => {
                let (ino, mode) = match sys {
                    Sys::Chmod => (self.inode_at(p, AT_FDCWD, a.u(0), true)?, a.uint(1)),
                    Sys::Fchmod => (self.inode_of_fd(p, a.int(0))?, a.uint(1)),
                    _ => (self.inode_at(p, a.int(0), a.u(1), true)?, a.uint(2)),
                };
                self.fs.set_perm(ino, mode);
                ret(0)
            }
            Sys::Chown | Sys::Fchown | Sys::Fchownat => {
                let (ino, uid, gid) = match sys {
                    Sys::Chown => (
                        self.inode_at(p, AT_FDCWD, a.u(0), true)?,
                        a.uint(1),
                        a.uint(2),
                    ),
                    Sys::Fchown => (self.inode_of_fd(p, a.int(0))?, a.uint(1), a.uint(2)),
                    _ => {
                        let follow = a.uint(4) & AT_SYMLINK_NOFOLLOW == 0;
                        (
                            self.inode_at(p, a.int(0), a.u(1), follow)?,
                            a.uint(2),
                            a.uint(3),
                        )
                    }
                };
                let keep = |id: u32| (id != u32::MAX).then_some(id);
                self.fs.set_owner(ino, keep(uid), keep(gid));
                ret(0)
            }
            Sys::Truncate | Sys::Ftruncate | Sys::Truncate64 | Sys::Ftruncate64 => {
                let len = match (sys, abi) {
                    (Sys::Truncate64 | Sys::Ftruncate64, Arch::I386) => split64(a, 1) as i64,
                    _ => a.long(1),
                };
                let len = u64::try_from(len).map_err(|_| Errno::EINVAL)?;
                let ino = if matches!(sys, Sys::Truncate | Sys::Truncate64) {
                    self.inode_at(p, AT_FDCWD, a.u(0), true)?
                } else {
                    let id = self.file_of(p, a.int(0))?;
                    if !self.files.get(id).is_some_and(|f| f.writable()) {
                        return Err(Errno::EINVAL);
                    }
                    self.inode_of_fd(p, a.int(0))?
                };
                match self.fs.node(ino) {
                    Some(Node::File(_)) => {}
                    Some(Node::Dir { .. }) => return Err(Errno::EISDIR),
                    _ => return Err(Errno::EINVAL),
                }
                self.fs.truncate(ino, len)?;
                let now = self.now_ns();
                self.fs.set_mtime(ino, now);
                ret(0)
            }
            Sys::Utimes | Sys::Utimensat | Sys::Utimensat64 => self.do_utimes(p, sys, a),
            Sys::Umask => {
                let old = p.umask;
                p.umask = a.uint(0) & 0o777;
                ret(old.into())
            }
            Sys::Sync => ret(0),
            _ => Err(Errno::ENOSYS),
        }
    }

    fn do_utimes(&mut self, p: &mut Process, sys: Sys, a: &Args) -> SysResult {
        let (dirfd, path_va, times_va, flags) = match sys {
            Sys::Utimes => (AT_FDCWD, a.u(0), a.u(1), 0),
            _ => (a.int(0), a.u(1), a.u(2), a.uint(3)),
        };
        let ino = if path_va == 0 {
            self.inode_of_fd(p, dirfd)?
        } else {
            self.inode_at(p, dirfd, path_va, flags & AT_SYMLINK_NOFOLLOW == 0)?
        };
        let now = self.now_ns();
        if times_va == 0 {
            self.fs.set_mtime(ino, now);
            return ret(0);
        }
        let word = match sys {
            Sys::Utimensat64 => 8,
            _ => word_size(a.abi),
        };
        // times[1] is the modification time; utimes passes microseconds, utimensat nanoseconds.
        let raw = self.uread(p, times_va, 4 * word)?;
        let (sec, sub) = get_time_pair(word, &raw[2 * word..]);
        let mtime = match (sys, sub) {
            (Sys::Utimes, usec) => sec * 1_000_000_000 + usec * 1000,
            (_, UTIME_OMIT) => return ret(0),
            (_, UTIME_NOW) => now,
            (_, nsec) => sec * 1_000_000_000 + nsec,
        };
        self.fs.set_mtime(ino, mtime);
        ret(0)
    }
}
