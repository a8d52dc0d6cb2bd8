//! Reader for cpio "newc" archives (the initrd format; Linux
//! Documentation/driver-api/early-userspace/buffer-format.rst).

use core::fmt;

const MAGIC_NEWC: &[u8; 6] = b"070701";
const MAGIC_CRC: &[u8; 6] = b"070702";
const HEADER_LEN: usize = 110;
const TRAILER: &[u8] = b"TRAILER!!!";

/// A malformed archive, with the byte offset of the offending header.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum CpioError {
    BadMagic(usize),
    BadHeader(usize),
    Truncated(usize),
    /// A device, fifo or socket node, or a path the file system cannot hold.
    Unsupported(usize),
}

impl fmt::Display for CpioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CpioError::BadMagic(at) => write!(f, "cpio: no newc magic at offset {at}"),
            CpioError::BadHeader(at) => write!(f, "cpio: bad header field at offset {at}"),
            CpioError::Truncated(at) => write!(f, "cpio: entry at offset {at} runs past the end"),
            CpioError::Unsupported(at) => {
                write!(f, "cpio: unsupported node type or path at offset {at}")
            }
        }
    }
}

/// One archive member.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct CpioEntry<'a> {
    /// Where the header starts (for error messages).
    pub offset: usize,
    pub ino: u32,
    /// `st_mode`: file type and permission bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub mtime: u32,
    pub rdev_major: u32,
    pub rdev_minor: u32,
    /// The path without its terminating NUL.
    pub name: &'a [u8],
    pub data: &'a [u8],
}

/// Iterates over the members of a (possibly concatenated, NUL-padded) newc archive.
pub struct Entries<'a> {
    archive: &'a [u8],
    pos: usize,
    failed: bool,
}

/// The members of `archive`, ending at the last trailer.
pub fn entries(archive: &[u8]) -> Entries<'_> {
    Entries {
        archive,
        pos: 0,
        failed: false,
    }
}

fn align4(value: usize) -> Option<usize> {
    Some(value.checked_add(3)? & !3)
}

fn hex_field(header: &[u8], index: usize, at: usize) -> Result<u32, CpioError> {
    let start = 6 + index * 8;
    let mut value = 0u32;
    for &digit in &header[start..start + 8] {
        let nibble = match digit {
            b'0'..=b'9' => digit - b'0',
            b'a'..=b'f' => digit - b'a' + 10,
            b'A'..=b'F' => digit - b'A' + 10,
            _ => return Err(CpioError::BadHeader(at)),
        };
        value = value << 4 | u32::from(nibble);
    }
    Ok(value)
}

impl<'a> Entries<'a> {
    fn parse_one(&mut self) -> Result<Option<CpioEntry<'a>>, CpioError> {
        loop {
            // Padding between concatenated archives is NUL bytes.
            while self.archive.get(self.pos) == Some(&0) {
                self.pos += 1;
            }
            let at = self.pos;
            if at >= self.archive.len() {
                return Ok(None);
            }
            let header = self
                .archive
                .get(at..at + HEADER_LEN)
                .ok_or(CpioError::Truncated(at))?;
            if &header[..6] != MAGIC_NEWC && &header[..6] != MAGIC_CRC {
                return Err(CpioError::BadMagic(at));
            }
            let field = |index| hex_field(header, index, at);
            let namesize = field(11)? as usize;
            let filesize = field(6)? as usize;
            let name_start = at + HEADER_LEN;
            let name_end = name_start
                .checked_add(namesize)
                .ok_or(CpioError::Truncated(at))?;
            let data_start = align4(name_end).ok_or(CpioError::Truncated(at))?;
            let data_end = data_start
                .checked_add(filesize)
                .ok_or(CpioError::Truncated(at))?;
            if namesize == 0 || data_end > self.archive.len() {
                return Err(CpioError::Truncated(at));
            }
            let raw_name = &self.archive[name_start..name_end];
            let name = raw_name.strip_suffix(&[0]).unwrap_or(raw_name);
            self.pos = align4(data_end).ok_or(CpioError::Truncated(at))?;
            if name == TRAILER {
                continue;
            }
            return Ok(Some(CpioEntry {
                offset: at,
                ino: field(0)?,
                mode: field(1)?,
                uid: field(2)?,
                gid: field(3)?,
                nlink: field(4)?,
                mtime: field(5)?,
                rdev_major: field(9)?,
                rdev_minor: field(10)?,
                name,
                data: &self.archive[data_start..data_end],
            }));
        }
    }
}

impl<'a> Iterator for Entries<'a> {
    type Item = Result<CpioEntry<'a>, CpioError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        match self.parse_one() {
            Ok(entry) => entry.map(Ok),
            Err(err) => {
                self.failed = true;
                Some(Err(err))
            }
        }
    }
}

/// Builds newc archives by hand for tests.
#[cfg(test)]
pub(crate) mod build {
    use alloc::format;
    use alloc::vec::Vec;

    /// Appends one member; `nlink` 1, owner root.
    pub fn member(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, nlink: u32, data: &[u8]) {
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            ino,
            mode,
            0,
            0,
            nlink,
            1_700_000_000u32,
            data.len(),
            0,
            0,
            if mode & 0o170_000 == 0o020_000 { 1 } else { 0 },
            if mode & 0o170_000 == 0o020_000 { 3 } else { 0 },
            name.len() + 1,
            0
        );
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
        out.extend_from_slice(data);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
    }

    pub fn trailer(out: &mut Vec<u8>) {
        member(out, 0, "TRAILER!!!", 0, 1, &[]);
    }
}

#[cfg(test)]
mod tests {
    use super::build::{member, trailer};
    use super::*;
    use alloc::vec::Vec;

    #[test]
    fn parses_members_and_concatenated_archives() {
        let mut archive = Vec::new();
        member(&mut archive, 1, ".", 0o40755, 2, &[]);
        member(&mut archive, 2, "bin", 0o40755, 2, &[]);
        member(&mut archive, 3, "bin/hello", 0o100755, 1, b"hello world");
        trailer(&mut archive);
        archive.extend_from_slice(&[0; 12]);
        member(&mut archive, 4, "etc/motd", 0o100644, 1, b"x");
        trailer(&mut archive);
        let list: Vec<CpioEntry> = entries(&archive).collect::<Result<_, _>>().unwrap();
        let names: Vec<&[u8]> = list.iter().map(|e| e.name).collect();
        assert_eq!(names, [&b"."[..], b"bin", b"bin/hello", b"etc/motd"]);
        assert_eq!(list[2].data, b"hello world");
        assert_eq!(list[2].mode, 0o100755);
        assert_eq!(list[2].mtime, 1_700_000_000);
    }

    #[test]
    fn rejects_damaged_archives() {
        let mut archive = Vec::new();
        member(&mut archive, 3, "file", 0o100644, 1, b"0123456789");
        let mut bad_magic = archive.clone();
        bad_magic[5] = b'7';
        assert_eq!(
            entries(&bad_magic).next(),
            Some(Err(CpioError::BadMagic(0)))
        );
        let truncated = &archive[..archive.len() - 8];
        assert_eq!(
            entries(truncated).next(),
            Some(Err(CpioError::Truncated(0)))
        );
        let mut bad_hex = archive.clone();
        bad_hex[10] = b'z';
        assert_eq!(entries(&bad_hex).next(), Some(Err(CpioError::BadHeader(0))));
        let mut iter = entries(&bad_hex);
        iter.next();
        assert!(iter.next().is_none(), "iteration stops after an error");
    }
}
