//! The in-memory file system every process sees: filled from the initrd (cpio newc),
//! writable, with `/dev/null` and `/dev/zero`; the runner reads files back for `--out`.

use alloc::collections::BTreeMap;
use alloc::vec;
use alloc::vec::Vec;

use crate::cpio::{self, CpioError};
use crate::errno::{Errno, KResult};

/// Inode number (index in the inode table).
pub type Ino = usize;
/// The root directory.
pub const ROOT_INO: Ino = 0;

/// File type bits of `st_mode` (Linux uapi/linux/stat.h).
pub const S_IFMT: u32 = 0o170_000;
pub const S_IFLNK: u32 = 0o120_000;
pub const S_IFREG: u32 = 0o100_000;
pub const S_IFDIR: u32 = 0o040_000;
pub const S_IFCHR: u32 = 0o020_000;
pub const S_IFIFO: u32 = 0o010_000;

/// Linux limits: NAME_MAX, PATH_MAX, and the symlinks one lookup may follow (MAXSYMLINKS).
pub const NAME_MAX: usize = 255;
pub const PATH_MAX: usize = 4096;
const MAX_SYMLINKS: usize = 40;
/// Largest regular file the file system accepts (EFBIG beyond).
pub const MAX_FILE_SIZE: u64 = 1 << 31;
/// Most directory entries (names) the file system holds (ENOSPC beyond): the kernel heap
/// must not run out whatever a guest creates.
pub const MAX_ENTRIES: usize = 1 << 16;

/// Character devices (major 1, minors 3 and 5 as on Linux).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Device {
    Null,
    Zero,
}

impl Device {
    fn rdev(self) -> u64 {
        match self {
            Device::Null => 1 << 8 | 3,
            Device::Zero => 1 << 8 | 5,
        }
    }
}

#[derive(Debug)]
pub(crate) enum Node {
    File(Vec<u8>),
    Dir {
        entries: BTreeMap<Vec<u8>, Ino>,
        parent: Ino,
    },
    Symlink(Vec<u8>),
    Device(Device),
}

#[derive(Debug)]
struct Inode {
    node: Node,
    perm: u32,
    uid: u32,
    gid: u32,
    mtime_sec: i64,
    mtime_nsec: u32,
    /// Directory entries naming this inode (directories: 1 while linked).
    nlink: u32,
    /// Open files, current directories and executables holding it.
    refs: u32,
}

/// Where a directory listing continues.
#[derive(Clone, Copy, Debug)]
pub(crate) enum DirPos<'n> {
    /// The `index`th entry (0 is `.`, 1 is `..`).
    Index(usize),
    /// The first entry whose name sorts after this one.
    After(&'n [u8]),
}

/// What `stat` reports about an inode.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Stat {
    pub ino: u64,
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub rdev: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
}

/// The file system.
#[derive(Debug)]
pub struct MemFs {
    inodes: Vec<Option<Inode>>,
    free: Vec<Ino>,
    /// Directory entries in use (bounded by MAX_ENTRIES).
    entries: usize,
}

impl Default for MemFs {
    fn default() -> Self {
        Self::new()
    }
}

/// Splits a path into its non-empty components.
fn components(path: &[u8]) -> impl DoubleEndedIterator<Item = &[u8]> {
    path.split(|&b| b == b'/').filter(|c| !c.is_empty())
}

impl MemFs {
    /// An empty root with `/dev/null`, `/dev/zero` and `/tmp`.
    pub fn new() -> Self {
        let root = Inode {
            node: Node::Dir {
                entries: BTreeMap::new(),
                parent: ROOT_INO,
            },
            perm: 0o755,
            uid: 0,
            gid: 0,
            mtime_sec: 0,
            mtime_nsec: 0,
            nlink: 1,
            refs: 1,
        };
        let mut fs = MemFs {
            inodes: vec![Some(root)],
            free: Vec::new(),
            entries: 0,
        };
        // Fresh file system: these creations cannot collide.
        let _ = fs.add_dir("/tmp", 0o1777);
        let _ = fs.add_dir("/dev", 0o755);
        if let Ok(dev) = fs.resolve(ROOT_INO, b"/dev", true) {
            let _ = fs.create(dev, b"null", Node::Device(Device::Null), 0o666, 0);
            let _ = fs.create(dev, b"zero", Node::Device(Device::Zero), 0o666, 0);
        }
        fs
    }

    /// A file system holding the members of a cpio newc archive.
    pub fn from_cpio(archive: &[u8]) -> Result<Self, CpioError> {
        let mut fs = Self::new();
        // Hard links share the archive's inode number; the data comes with one of them.
        let mut links: BTreeMap<u32, Ino> = BTreeMap::new();
        for entry in cpio::entries(archive) {
            let entry = entry?;
            let unsupported = CpioError::Unsupported(entry.offset);
            let mut name = entry.name;
            while let Some(rest) = name.strip_prefix(b"./").or(name.strip_prefix(b"/")) {
                name = rest;
            }
            if name.is_empty() || name == b"." {
                if entry.mode & S_IFMT == S_IFDIR {
                    fs.set_owner_perm(ROOT_INO, entry.mode, entry.uid, entry.gid);
                }
                continue;
            }
            let (dir, base) = fs.make_parents(name).map_err(|_| unsupported)?;
            let perm = entry.mode & 0o7777;
            let mtime = i64::from(entry.mtime) * 1_000_000_000;
            if entry.mode & S_IFMT != S_IFDIR {
                // A later member replaces an earlier non-directory (as the kernel's unpacker).
                match fs.lookup_child(dir, base) {
                    Some(existing) if fs.is_dir(existing) => return Err(unsupported),
                    Some(_) => fs.unlink(dir, base, false).map_err(|_| unsupported)?,
                    None => {}
                }
            }
            let ino = match entry.mode & S_IFMT {
                S_IFDIR => match fs.lookup_child(dir, base) {
                    Some(existing) if fs.is_dir(existing) => existing,
                    Some(_) => return Err(unsupported),
                    None => {
                        let node = Node::Dir {
                            entries: BTreeMap::new(),
                            parent: dir,
                        };
                        fs.create(dir, base, node, perm, mtime)
                            .map_err(|_| unsupported)?
                    }
                },
                S_IFREG => {
                    let linked = (entry.nlink > 1).then(|| links.get(&entry.ino)).flatten();
                    if let Some(&target) = linked {
                        fs.link(target, dir, base).map_err(|_| unsupported)?;
                        if !entry.data.is_empty() {
                            fs.replace_data(target, entry.data)
                                .map_err(|_| unsupported)?;
                        }
                        target
                    } else {
                        let ino = fs
                            .create(dir, base, Node::File(entry.data.to_vec()), perm, mtime)
                            .map_err(|_| unsupported)?;
                        if entry.nlink > 1 {
                            links.insert(entry.ino, ino);
                        }
                        ino
                    }
                }
                S_IFLNK => fs
                    .create(dir, base, Node::Symlink(entry.data.to_vec()), perm, mtime)
                    .map_err(|_| unsupported)?,
                S_IFCHR => {
                    let device = match (entry.rdev_major, entry.rdev_minor) {
                        (1, 3) => Device::Null,
                        (1, 5) => Device::Zero,
                        _ => return Err(unsupported),
                    };
                    fs.create(dir, base, Node::Device(device), perm, mtime)
                        .map_err(|_| unsupported)?
                }
                _ => return Err(unsupported),
            };
            fs.set_owner_perm(ino, entry.mode, entry.uid, entry.gid);
            fs.set_mtime(ino, mtime);
        }
        Ok(fs)
    }

    /// Creates (or replaces the contents of) a regular file, making parent directories.
    pub fn add_file(&mut self, path: &str, data: &[u8], perm: u32) -> KResult<()> {
        let (dir, base) = self.make_parents(path.as_bytes())?;
        match self.lookup_child(dir, base) {
            Some(ino) => self.replace_data(ino, data),
            None => self
                .create(dir, base, Node::File(data.to_vec()), perm & 0o7777, 0)
                .map(|_| ()),
        }
    }

    /// Creates a directory and its parents (an existing directory is fine).
    pub fn add_dir(&mut self, path: &str, perm: u32) -> KResult<()> {
        let (dir, base) = self.make_parents(path.as_bytes())?;
        match self.lookup_child(dir, base) {
            Some(ino) if self.is_dir(ino) => Ok(()),
            Some(_) => Err(Errno::EEXIST),
            None => {
                let node = Node::Dir {
                    entries: BTreeMap::new(),
                    parent: dir,
                };
                self.create(dir, base, node, perm & 0o7777, 0).map(|_| ())
            }
        }
    }

    /// Creates a symbolic link at `path` pointing to `target`.
    pub fn add_symlink(&mut self, path: &str, target: &str) -> KResult<()> {
        let (dir, base) = self.make_parents(path.as_bytes())?;
        let node = Node::Symlink(target.as_bytes().to_vec());
        self.create(dir, base, node, 0o777, 0).map(|_| ())
    }

    /// The contents of the regular file at `path` (symlinks followed).
    pub fn read_file(&self, path: &str) -> Option<&[u8]> {
        let ino = self.resolve(ROOT_INO, path.as_bytes(), true).ok()?;
        match &self.inode(ino)?.node {
            Node::File(data) => Some(data),
            _ => None,
        }
    }

    /// `stat` of `path` (symlinks followed).
    pub fn metadata(&self, path: &str) -> Option<Stat> {
        let ino = self.resolve(ROOT_INO, path.as_bytes(), true).ok()?;
        self.stat(ino).ok()
    }

    /// Resolves all but the last component of `path`, creating missing directories.
    fn make_parents<'p>(&mut self, path: &'p [u8]) -> KResult<(Ino, &'p [u8])> {
        let parts: Vec<&[u8]> = components(path).collect();
        let (&base, dirs) = parts.split_last().ok_or(Errno::EINVAL)?;
        if base == b"." || base == b".." || base.len() > NAME_MAX {
            return Err(Errno::EINVAL);
        }
        let mut dir = ROOT_INO;
        for &part in dirs {
            dir = match self.lookup_child(dir, part) {
                Some(ino) if self.is_dir(ino) => ino,
                Some(_) => return Err(Errno::ENOTDIR),
                None => {
                    let node = Node::Dir {
                        entries: BTreeMap::new(),
                        parent: dir,
                    };
                    self.create(dir, part, node, 0o755, 0)?
                }
            };
        }
        Ok((dir, base))
    }

    fn inode(&self, ino: Ino) -> Option<&Inode> {
        self.inodes.get(ino)?.as_ref()
    }

    fn inode_mut(&mut self, ino: Ino) -> Option<&mut Inode> {
        self.inodes.get_mut(ino)?.as_mut()
    }

    pub(crate) fn node(&self, ino: Ino) -> Option<&Node> {
        Some(&self.inode(ino)?.node)
    }

    pub(crate) fn is_dir(&self, ino: Ino) -> bool {
        matches!(self.node(ino), Some(Node::Dir { .. }))
    }

    fn lookup_child(&self, dir: Ino, name: &[u8]) -> Option<Ino> {
        match self.node(dir)? {
            Node::Dir { entries, parent } => match name {
                b"." => Some(dir),
                b".." => Some(*parent),
                _ => entries.get(name).copied(),
            },
            _ => None,
        }
    }

    fn set_owner_perm(&mut self, ino: Ino, mode: u32, uid: u32, gid: u32) {
        if let Some(inode) = self.inode_mut(ino) {
            inode.perm = mode & 0o7777;
            inode.uid = uid;
            inode.gid = gid;
        }
    }

    pub(crate) fn set_perm(&mut self, ino: Ino, perm: u32) {
        if let Some(inode) = self.inode_mut(ino) {
            inode.perm = perm & 0o7777;
        }
    }

    pub(crate) fn set_owner(&mut self, ino: Ino, uid: Option<u32>, gid: Option<u32>) {
        if let Some(inode) = self.inode_mut(ino) {
            inode.uid = uid.unwrap_or(inode.uid);
            inode.gid = gid.unwrap_or(inode.gid);
        }
    }

    /// Sets the modification time (nanoseconds since the epoch).
    pub(crate) fn set_mtime(&mut self, ino: Ino, time_ns: i64) {
        if let Some(inode) = self.inode_mut(ino) {
            inode.mtime_sec = time_ns.div_euclid(1_000_000_000);
            inode.mtime_nsec = time_ns.rem_euclid(1_000_000_000) as u32;
        }
    }

    /// Resolves `path` relative to directory `start`; `follow_last` follows a final symlink.
    pub(crate) fn resolve(&self, start: Ino, path: &[u8], follow_last: bool) -> KResult<Ino> {
        if path.is_empty() {
            return Err(Errno::ENOENT);
        }
        if path.len() >= PATH_MAX {
            return Err(Errno::ENAMETOOLONG);
        }
        let mut current = if path[0] == b'/' { ROOT_INO } else { start };
        // Components still to walk, last one on the bottom of the stack.
        let mut pending: Vec<Vec<u8>> = components(path).rev().map(<[u8]>::to_vec).collect();
        let mut links = 0;
        while let Some(part) = pending.pop() {
            if part.len() > NAME_MAX {
                return Err(Errno::ENAMETOOLONG);
            }
            if !self.is_dir(current) {
                return Err(Errno::ENOTDIR);
            }
            let child = self.lookup_child(current, &part).ok_or(Errno::ENOENT)?;
            match self.node(child) {
                Some(Node::Symlink(target)) if !pending.is_empty() || follow_last => {
                    links += 1;
                    if links > MAX_SYMLINKS {
                        return Err(Errno::ELOOP);
                    }
                    if target.first() == Some(&b'/') {
                        current = ROOT_INO;
                    }
                    pending.extend(components(target).rev().map(<[u8]>::to_vec));
                }
                _ => current = child,
            }
        }
        if path.ends_with(b"/") && !self.is_dir(current) {
            return Err(Errno::ENOTDIR);
        }
        Ok(current)
    }

    /// Resolves the directory part of `path`; returns it and the final name (EEXIST when the
    /// path names the root itself).
    pub(crate) fn resolve_parent<'p>(
        &self,
        start: Ino,
        path: &'p [u8],
    ) -> KResult<(Ino, &'p [u8])> {
        if path.is_empty() {
            return Err(Errno::ENOENT);
        }
        let trimmed = {
            let mut end = path.len();
            while end > 1 && path[end - 1] == b'/' {
                end -= 1;
            }
            &path[..end]
        };
        let (dir_part, name) = match trimmed.iter().rposition(|&b| b == b'/') {
            Some(slash) => (&trimmed[..slash.max(1)], &trimmed[slash + 1..]),
            None => (&b""[..], trimmed),
        };
        if name.is_empty() {
            return Err(Errno::EEXIST);
        }
        if name.len() > NAME_MAX {
            return Err(Errno::ENAMETOOLONG);
        }
        let dir = if dir_part.is_empty() {
            start
        } else {
            self.resolve(start, dir_part, true)?
        };
        if !self.is_dir(dir) {
            return Err(Errno::ENOTDIR);
        }
        Ok((dir, name))
    }

    /// Resolves `path`, following symlinks in the last component too; returns the directory
    /// that holds the final inode, its name there, and the inode.
    pub(crate) fn resolve_final(&self, start: Ino, path: &[u8]) -> KResult<(Ino, Vec<u8>, Ino)> {
        let mut start = start;
        let mut path = path.to_vec();
        for _ in 0..=MAX_SYMLINKS {
            let (dir, name) = self.resolve_parent(start, &path)?;
            let ino = self.lookup_child(dir, name).ok_or(Errno::ENOENT)?;
            match self.node(ino) {
                Some(Node::Symlink(target)) => {
                    let target = target.clone();
                    start = dir;
                    path = target;
                }
                _ => return Ok((dir, name.to_vec(), ino)),
            }
        }
        Err(Errno::ELOOP)
    }

    /// Like `resolve_parent`, and the final name must not be `.` or `..`.
    pub(crate) fn resolve_new<'p>(&self, start: Ino, path: &'p [u8]) -> KResult<(Ino, &'p [u8])> {
        let (dir, name) = self.resolve_parent(start, path)?;
        if name == b"." || name == b".." {
            return Err(Errno::EINVAL);
        }
        Ok((dir, name))
    }

    /// The child `name` of directory `dir`, if any.
    pub(crate) fn child(&self, dir: Ino, name: &[u8]) -> Option<Ino> {
        self.lookup_child(dir, name)
    }

    fn alloc_inode(&mut self, inode: Inode) -> Ino {
        match self.free.pop() {
            Some(ino) => {
                self.inodes[ino] = Some(inode);
                ino
            }
            None => {
                self.inodes.push(Some(inode));
                self.inodes.len() - 1
            }
        }
    }

    /// Adds a new inode as `name` in directory `dir`; EEXIST if the name is taken.
    pub(crate) fn create(
        &mut self,
        dir: Ino,
        name: &[u8],
        node: Node,
        perm: u32,
        now_ns: i64,
    ) -> KResult<Ino> {
        if self.lookup_child(dir, name).is_some() {
            return Err(Errno::EEXIST);
        }
        match self.node(dir) {
            Some(Node::Dir { .. }) => {}
            _ => return Err(Errno::ENOTDIR),
        }
        if self.inode(dir).is_some_and(|d| d.nlink == 0) {
            return Err(Errno::ENOENT);
        }
        if self.entries >= MAX_ENTRIES {
            return Err(Errno::ENOSPC);
        }
        let ino = self.alloc_inode(Inode {
            node,
            perm: perm & 0o7777,
            uid: 0,
            gid: 0,
            mtime_sec: 0,
            mtime_nsec: 0,
            nlink: 1,
            refs: 0,
        });
        self.set_mtime(ino, now_ns);
        self.insert_entry(dir, name, ino);
        self.set_mtime(dir, now_ns);
        Ok(ino)
    }

    fn insert_entry(&mut self, dir: Ino, name: &[u8], ino: Ino) {
        if let Some(Inode {
            node: Node::Dir { entries, .. },
            ..
        }) = self.inode_mut(dir)
        {
            if entries.insert(name.to_vec(), ino).is_none() {
                self.entries += 1;
            }
        }
    }

    fn remove_entry(&mut self, dir: Ino, name: &[u8]) -> Option<Ino> {
        let removed = match self.inode_mut(dir) {
            Some(Inode {
                node: Node::Dir { entries, .. },
                ..
            }) => entries.remove(name),
            _ => None,
        };
        if removed.is_some() {
            self.entries = self.entries.saturating_sub(1);
        }
        removed
    }

    /// Adds a hard link `name` in `dir` to the non-directory `target`.
    pub(crate) fn link(&mut self, target: Ino, dir: Ino, name: &[u8]) -> KResult<()> {
        if self.is_dir(target) {
            return Err(Errno::EPERM);
        }
        if !self.is_dir(dir) {
            return Err(Errno::ENOTDIR);
        }
        if self.lookup_child(dir, name).is_some() {
            return Err(Errno::EEXIST);
        }
        if self.entries >= MAX_ENTRIES {
            return Err(Errno::ENOSPC);
        }
        let inode = self.inode_mut(target).ok_or(Errno::ENOENT)?;
        if inode.nlink >= u16::MAX.into() {
            return Err(Errno::EMLINK);
        }
        inode.nlink += 1;
        self.insert_entry(dir, name, target);
        Ok(())
    }

    /// Removes the entry `name` of `dir`: a non-directory (`rmdir` false) or an empty
    /// directory (`rmdir` true).
    pub(crate) fn unlink(&mut self, dir: Ino, name: &[u8], rmdir: bool) -> KResult<()> {
        if name == b"." {
            return Err(Errno::EINVAL);
        }
        if name == b".." {
            return Err(Errno::ENOTEMPTY);
        }
        let ino = self.lookup_child(dir, name).ok_or(Errno::ENOENT)?;
        match (self.node(ino), rmdir) {
            (Some(Node::Dir { entries, .. }), true) => {
                if !entries.is_empty() {
                    return Err(Errno::ENOTEMPTY);
                }
                if ino == ROOT_INO {
                    return Err(Errno::EBUSY);
                }
            }
            (Some(Node::Dir { .. }), false) => return Err(Errno::EISDIR),
            (_, true) => return Err(Errno::ENOTDIR),
            (_, false) => {}
        }
        self.remove_entry(dir, name);
        if let Some(inode) = self.inode_mut(ino) {
            inode.nlink = inode.nlink.saturating_sub(1);
        }
        self.maybe_free(ino);
        Ok(())
    }

    /// Moves `old_dir/old_name` to `new_dir/new_name`, replacing a compatible target.
    pub(crate) fn rename(
        &mut self,
        old_dir: Ino,
        old_name: &[u8],
        new_dir: Ino,
        new_name: &[u8],
    ) -> KResult<()> {
        if [old_name, new_name]
            .iter()
            .any(|n| *n == b"." || *n == b"..")
        {
            return Err(Errno::EINVAL);
        }
        let ino = self.lookup_child(old_dir, old_name).ok_or(Errno::ENOENT)?;
        if !self.is_dir(new_dir) {
            return Err(Errno::ENOTDIR);
        }
        let moving_dir = self.is_dir(ino);
        if moving_dir {
            // A directory cannot move below itself.
            let mut cursor = new_dir;
            for _ in 0..self.inodes.len() {
                if cursor == ino {
                    return Err(Errno::EINVAL);
                }
                if cursor == ROOT_INO {
                    break;
                }
                cursor = match self.node(cursor) {
                    Some(Node::Dir { parent, .. }) => *parent,
                    _ => break,
                };
            }
        }
        if let Some(existing) = self.lookup_child(new_dir, new_name) {
            if existing == ino {
                return Ok(());
            }
            match self.node(existing) {
                Some(Node::Dir { entries, .. }) => {
                    if !moving_dir {
                        return Err(Errno::EISDIR);
                    }
                    if !entries.is_empty() {
                        return Err(Errno::ENOTEMPTY);
                    }
                }
                _ if moving_dir => return Err(Errno::ENOTDIR),
                _ => {}
            }
            self.remove_entry(new_dir, new_name);
            if let Some(inode) = self.inode_mut(existing) {
                inode.nlink = inode.nlink.saturating_sub(1);
            }
            self.maybe_free(existing);
        }
        self.remove_entry(old_dir, old_name);
        self.insert_entry(new_dir, new_name, ino);
        if let Some(Inode {
            node: Node::Dir { parent, .. },
            ..
        }) = self.inode_mut(ino)
        {
            *parent = new_dir;
        }
        Ok(())
    }

    /// Takes a reference (open file, current directory).
    pub(crate) fn retain(&mut self, ino: Ino) {
        if let Some(inode) = self.inode_mut(ino) {
            inode.refs += 1;
        }
    }

    /// Drops a reference; an unlinked inode without references is freed.
    pub(crate) fn release(&mut self, ino: Ino) {
        if let Some(inode) = self.inode_mut(ino) {
            inode.refs = inode.refs.saturating_sub(1);
        }
        self.maybe_free(ino);
    }

    fn maybe_free(&mut self, ino: Ino) {
        if ino == ROOT_INO {
            return;
        }
        if self.inode(ino).is_some_and(|i| i.nlink == 0 && i.refs == 0) {
            self.inodes[ino] = None;
            self.free.push(ino);
        }
    }

    /// `stat` of an inode.
    pub(crate) fn stat(&self, ino: Ino) -> KResult<Stat> {
        let inode = self.inode(ino).ok_or(Errno::ENOENT)?;
        let (kind, size, rdev, nlink) = match &inode.node {
            Node::File(data) => (S_IFREG, data.len() as u64, 0, inode.nlink),
            Node::Dir { entries, .. } => {
                let subdirs = entries.values().filter(|&&i| self.is_dir(i)).count() as u32;
                (S_IFDIR, 4096, 0, (inode.nlink * 2).saturating_add(subdirs))
            }
            Node::Symlink(target) => (S_IFLNK, target.len() as u64, 0, inode.nlink),
            Node::Device(dev) => (S_IFCHR, 0, dev.rdev(), inode.nlink),
        };
        Ok(Stat {
            ino: ino as u64 + 1,
            mode: kind | inode.perm,
            nlink,
            uid: inode.uid,
            gid: inode.gid,
            size,
            rdev,
            mtime_sec: inode.mtime_sec,
            mtime_nsec: inode.mtime_nsec,
        })
    }

    /// Up to `max` bytes of a regular file from `offset`.
    pub(crate) fn read_at(&self, ino: Ino, offset: u64, max: usize) -> &[u8] {
        match self.node(ino) {
            Some(Node::File(data)) => {
                let start = usize::try_from(offset)
                    .unwrap_or(usize::MAX)
                    .min(data.len());
                let end = start + max.min(data.len() - start);
                &data[start..end]
            }
            _ => &[],
        }
    }

    fn file_data_mut(&mut self, ino: Ino) -> KResult<&mut Vec<u8>> {
        match self.inode_mut(ino) {
            Some(Inode {
                node: Node::File(data),
                ..
            }) => Ok(data),
            Some(_) => Err(Errno::EINVAL),
            None => Err(Errno::ENOENT),
        }
    }

    /// Writes `bytes` at `offset`, growing (zero-filling) the file; ENOSPC when memory
    /// runs out, EFBIG past `MAX_FILE_SIZE`.
    pub(crate) fn write_at(&mut self, ino: Ino, offset: u64, bytes: &[u8]) -> KResult<usize> {
        let end = offset
            .checked_add(bytes.len() as u64)
            .filter(|&end| end <= MAX_FILE_SIZE)
            .ok_or(Errno::EFBIG)?;
        let data = self.file_data_mut(ino)?;
        let (start, end) = (offset as usize, end as usize);
        if end > data.len() {
            data.try_reserve(end - data.len())
                .map_err(|_| Errno::ENOSPC)?;
            data.resize(end, 0);
        }
        data[start..end].copy_from_slice(bytes);
        Ok(bytes.len())
    }

    /// Sets the length of a regular file.
    pub(crate) fn truncate(&mut self, ino: Ino, len: u64) -> KResult<()> {
        if len > MAX_FILE_SIZE {
            return Err(Errno::EFBIG);
        }
        let data = self.file_data_mut(ino)?;
        let len = len as usize;
        if len > data.len() {
            data.try_reserve(len - data.len())
                .map_err(|_| Errno::ENOSPC)?;
        }
        data.resize(len, 0);
        Ok(())
    }

    fn replace_data(&mut self, ino: Ino, bytes: &[u8]) -> KResult<()> {
        let data = self.file_data_mut(ino)?;
        data.clear();
        data.try_reserve(bytes.len()).map_err(|_| Errno::ENOSPC)?;
        data.extend_from_slice(bytes);
        Ok(())
    }

    /// The target of a symlink.
    pub(crate) fn readlink(&self, ino: Ino) -> KResult<&[u8]> {
        match self.node(ino) {
            Some(Node::Symlink(target)) => Ok(target),
            Some(_) => Err(Errno::EINVAL),
            None => Err(Errno::ENOENT),
        }
    }

    /// An entry of a directory listing that starts with `.` and `..`: (name, inode,
    /// `st_mode` type bits).
    pub(crate) fn dir_entry(&self, dir: Ino, pos: DirPos) -> Option<(Vec<u8>, Ino, u32)> {
        use core::ops::Bound::{Excluded, Unbounded};
        let Node::Dir { entries, parent } = self.node(dir)? else {
            return None;
        };
        let (name, ino) = match pos {
            DirPos::Index(0) => (b".".to_vec(), dir),
            DirPos::Index(1) => (b"..".to_vec(), *parent),
            DirPos::Index(index) => {
                let (name, ino) = entries.iter().nth(index - 2)?;
                (name.clone(), *ino)
            }
            DirPos::After(last) => {
                let (name, ino) = entries
                    .range::<[u8], _>((Excluded(last), Unbounded))
                    .next()?;
                (name.clone(), *ino)
            }
        };
        let kind = self.stat(ino).map(|s| s.mode & S_IFMT).unwrap_or(0);
        Some((name, ino, kind))
    }

    /// The absolute path of a directory (for `getcwd`); ENOENT once it was removed.
    pub(crate) fn dir_path(&self, dir: Ino) -> KResult<Vec<u8>> {
        let mut parts: Vec<Vec<u8>> = Vec::new();
        let mut cursor = dir;
        for _ in 0..self.inodes.len() {
            if cursor == ROOT_INO {
                let mut path = Vec::new();
                for part in parts.iter().rev() {
                    path.push(b'/');
                    path.extend_from_slice(part);
                }
                if path.is_empty() {
                    path.push(b'/');
                }
                return Ok(path);
            }
            let inode = self.inode(cursor).ok_or(Errno::ENOENT)?;
            let Node::Dir { parent, .. } = inode.node else {
                return Err(Errno::ENOTDIR);
            };
            if inode.nlink == 0 {
                return Err(Errno::ENOENT);
            }
            let Some(Node::Dir { entries, .. }) = self.node(parent) else {
                return Err(Errno::ENOENT);
            };
            let name = entries
                .iter()
                .find(|(_, &ino)| ino == cursor)
                .map(|(name, _)| name.clone())
                .ok_or(Errno::ENOENT)?;
            parts.push(name);
            cursor = parent;
        }
        Err(Errno::ELOOP)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpio::build::{member, trailer};
    use alloc::vec::Vec;

    fn sample() -> MemFs {
        let mut archive = Vec::new();
        member(&mut archive, 1, ".", 0o40700, 2, &[]);
        member(&mut archive, 2, "./bin", 0o40755, 2, &[]);
        member(&mut archive, 3, "bin/busybox", 0o100755, 1, b"\x7fELF...");
        member(&mut archive, 4, "bin/sh", 0o120777, 1, b"busybox");
        member(&mut archive, 5, "data/a", 0o100600, 2, &[]);
        member(&mut archive, 5, "data/b", 0o100600, 2, b"linked");
        member(&mut archive, 6, "loop", 0o120777, 1, b"loop");
        member(&mut archive, 7, "dev/null", 0o20666, 1, &[]);
        trailer(&mut archive);
        MemFs::from_cpio(&archive).unwrap()
    }

    #[test]
    fn builds_tree_from_cpio() {
        let fs = sample();
        assert_eq!(fs.read_file("/bin/busybox"), Some(&b"\x7fELF..."[..]));
        assert_eq!(
            fs.read_file("/bin/sh"),
            Some(&b"\x7fELF..."[..]),
            "symlink followed"
        );
        assert_eq!(
            fs.read_file("/data/a"),
            Some(&b"linked"[..]),
            "hard link shares data"
        );
        let a = fs.resolve(ROOT_INO, b"/data/a", true).unwrap();
        let st = fs.stat(a).unwrap();
        assert_eq!((st.mode, st.nlink, st.size), (S_IFREG | 0o600, 2, 6));
        assert_eq!(st.mtime_sec, 1_700_000_000);
        let root = fs.stat(ROOT_INO).unwrap();
        assert_eq!(root.mode, S_IFDIR | 0o700, "`.` sets the root's mode");
        let sh = fs.resolve(ROOT_INO, b"/bin/sh", false).unwrap();
        assert_eq!(fs.readlink(sh), Ok(&b"busybox"[..]));
        assert_eq!(fs.resolve(ROOT_INO, b"/loop", true), Err(Errno::ELOOP));
        assert_eq!(
            fs.resolve(ROOT_INO, b"/bin/busybox/x", true),
            Err(Errno::ENOTDIR)
        );
        assert_eq!(fs.resolve(ROOT_INO, b"/nope", true), Err(Errno::ENOENT));
        let bin = fs.resolve(ROOT_INO, b"/bin", true).unwrap();
        assert_eq!(
            fs.resolve(bin, b"../bin/./sh", true).ok(),
            fs.resolve(ROOT_INO, b"/bin/busybox", true).ok()
        );
        assert_eq!(fs.dir_path(bin), Ok(b"/bin".to_vec()));
        let null = fs.resolve(ROOT_INO, b"/dev/null", true).unwrap();
        assert_eq!(fs.stat(null).unwrap().rdev, 0x103);
    }

    #[test]
    fn rejects_device_nodes_it_cannot_emulate() {
        let mut archive = Vec::new();
        member(&mut archive, 1, "fifo", 0o10644, 1, &[]);
        trailer(&mut archive);
        assert_eq!(
            MemFs::from_cpio(&archive).err(),
            Some(CpioError::Unsupported(0))
        );
    }

    #[test]
    fn create_write_rename_unlink() {
        let mut fs = sample();
        let tmp = fs.resolve(ROOT_INO, b"/tmp", true).unwrap();
        let f = fs
            .create(tmp, b"f", Node::File(Vec::new()), 0o644, 5_000_000_123)
            .unwrap();
        assert_eq!(
            fs.create(tmp, b"f", Node::File(Vec::new()), 0o644, 0),
            Err(Errno::EEXIST)
        );
        assert_eq!(fs.write_at(f, 3, b"abc"), Ok(3));
        assert_eq!(fs.read_at(f, 0, 100), b"\0\0\0abc");
        assert_eq!(fs.write_at(f, MAX_FILE_SIZE, b"x"), Err(Errno::EFBIG));
        assert_eq!(fs.stat(f).unwrap().mtime_nsec, 123);
        fs.truncate(f, 2).unwrap();
        assert_eq!(fs.read_at(f, 0, 100), b"\0\0");

        let data = fs.resolve(ROOT_INO, b"/data", true).unwrap();
        fs.rename(tmp, b"f", data, b"a").unwrap();
        assert_eq!(fs.read_file("/data/a"), Some(&b"\0\0"[..]));
        assert_eq!(
            fs.read_file("/data/b"),
            Some(&b"linked"[..]),
            "replaced link kept its twin"
        );
        assert_eq!(
            fs.rename(ROOT_INO, b"data", data, b"sub"),
            Err(Errno::EINVAL)
        );
        assert_eq!(fs.unlink(ROOT_INO, b"data", false), Err(Errno::EISDIR));
        assert_eq!(fs.unlink(ROOT_INO, b"data", true), Err(Errno::ENOTEMPTY));

        // An open file outlives its last name.
        let b = fs.resolve(ROOT_INO, b"/data/b", true).unwrap();
        fs.retain(b);
        fs.unlink(data, b"b", false).unwrap();
        assert_eq!(fs.read_at(b, 0, 100), b"linked");
        fs.release(b);
        assert!(fs.node(b).is_none(), "freed after the last reference");
        fs.unlink(data, b"a", false).unwrap();
        fs.unlink(ROOT_INO, b"data", true).unwrap();
        assert_eq!(fs.dir_path(data), Err(Errno::ENOENT));
    }

    #[test]
    fn host_side_helpers() {
        let mut fs = MemFs::new();
        fs.add_file("/a/b/c.txt", b"hi", 0o644).unwrap();
        fs.add_dir("/a/d", 0o755).unwrap();
        fs.add_symlink("/a/link", "b/c.txt").unwrap();
        assert_eq!(fs.read_file("/a/link"), Some(&b"hi"[..]));
        fs.add_file("/a/b/c.txt", b"again", 0o644).unwrap();
        assert_eq!(fs.read_file("/a/b/c.txt"), Some(&b"again"[..]));
        assert_eq!(fs.add_dir("/a/b/c.txt", 0o755), Err(Errno::EEXIST));
        let a = fs.resolve(ROOT_INO, b"/a", true).unwrap();
        let names: Vec<Vec<u8>> = (0..)
            .map_while(|i| fs.dir_entry(a, DirPos::Index(i)))
            .map(|e| e.0)
            .collect();
        assert_eq!(names, [&b"."[..], b"..", b"b", b"d", b"link"]);
        let (_, _, kind) = fs.dir_entry(a, DirPos::Index(4)).unwrap();
        let (name, _, _) = fs.dir_entry(a, DirPos::After(b"c")).unwrap();
        assert_eq!(name, b"d");
        assert_eq!(kind, S_IFLNK);
    }
}
