//! Memory system calls: brk, mmap, munmap, mprotect, mremap, madvise.

use super::{mm_of, ret, Args, Sys, SysResult};
use crate::context::Arch;
use crate::errno::{Errno, KResult};
use crate::linux::Linux;
use crate::memfs::{Device, Node};
use crate::mm::Placement;
use crate::process::{FileKind, Process};
use crate::ram::{page_up, PAGE_SIZE};

// uapi/asm-generic/mman-common.h and arch/x86/include/uapi/asm/mman.h
const MAP_TYPE: u32 = 0x0f;
const MAP_SHARED: u32 = 0x01;
const MAP_PRIVATE: u32 = 0x02;
const MAP_SHARED_VALIDATE: u32 = 0x03;
const MAP_FIXED: u32 = 0x10;
const MAP_ANONYMOUS: u32 = 0x20;
const MAP_32BIT: u32 = 0x40;
const MAP_FIXED_NOREPLACE: u32 = 0x10_0000;
const PROT_MASK: u32 = 0x7;
const PROT_GROWSDOWN: u32 = 0x0100_0000;
const PROT_GROWSUP: u32 = 0x0200_0000;
const MADV_DONTNEED: u32 = 4;
/// mmap2 offsets are in 4096-byte units on i386 whatever the page size.
const MMAP2_UNIT: u64 = 4096;

/// The arguments of an mmap call.
struct MmapArgs {
    addr: u64,
    len: u64,
    prot: u32,
    flags: u32,
    fd: i32,
    offset: u64,
}

impl Linux<'_> {
    pub(super) fn mem_call(&mut self, p: &mut Process, sys: Sys, a: &Args) -> SysResult {
        match sys {
            Sys::Brk => {
                let mm = mm_of(p)?;
                ret(mm.set_brk(&mut self.ram, a.u(0)) as i64)
            }
            Sys::Mmap | Sys::Mmap2 => {
                let offset = match sys {
                    Sys::Mmap2 => a.u(5) * MMAP2_UNIT,
                    _ => a.u(5),
                };
                let args = MmapArgs {
                    addr: a.u(0),
                    len: a.u(1),
                    prot: a.uint(2),
                    flags: a.uint(3),
                    fd: a.int(4),
                    offset,
                };
                self.do_mmap(p, a.abi, &args)
            }
            Sys::OldMmap => {
                // i386 old_mmap: one pointer to six 32-bit arguments.
                let raw = self.uread(p, a.u(0), 24)?;
                let field = |i: usize| {
                    u32::from_le_bytes([raw[4 * i], raw[4 * i + 1], raw[4 * i + 2], raw[4 * i + 3]])
                };
                let args = MmapArgs {
                    addr: field(0).into(),
                    len: field(1).into(),
                    prot: field(2),
                    flags: field(3),
                    fd: field(4) as i32,
                    offset: field(5).into(),
                };
                self.do_mmap(p, a.abi, &args)
            }
            Sys::Munmap => {
                mm_of(p)?.unmap(&mut self.ram, a.u(0), a.u(1))?;
                ret(0)
            }
            Sys::Mprotect => {
                let prot = a.uint(2) & !(PROT_GROWSDOWN | PROT_GROWSUP);
                if prot & !PROT_MASK != 0 {
                    return Err(Errno::EINVAL);
                }
                mm_of(p)?.protect(&mut self.ram, a.u(0), a.u(1), prot)?;
                ret(0)
            }
            Sys::Mremap => {
                let mm = mm_of(p)?;
                let addr = mm.remap(&mut self.ram, a.u(0), a.u(1), a.u(2), a.uint(3), a.u(4))?;
                ret(addr as i64)
            }
            Sys::Madvise => {
                if !a.u(0).is_multiple_of(PAGE_SIZE) {
                    return Err(Errno::EINVAL);
                }
                if a.uint(2) == MADV_DONTNEED {
                    // Private anonymous memory reads back as zeros after MADV_DONTNEED.
                    let len = page_up(a.u(1)).ok_or(Errno::EINVAL)?;
                    mm_of(p)?.zero_range(&mut self.ram, a.u(0), len)?;
                }
                ret(0)
            }
            _ => Err(Errno::ENOSYS),
        }
    }

    fn do_mmap(&mut self, p: &mut Process, abi: Arch, m: &MmapArgs) -> SysResult {
        let len = page_up(m.len).filter(|&l| l != 0 && m.len != 0);
        let len = match len {
            Some(len) => len,
            None if m.len == 0 => return Err(Errno::EINVAL),
            None => return Err(Errno::ENOMEM),
        };
        let kind = m.flags & MAP_TYPE;
        if !matches!(kind, MAP_SHARED | MAP_PRIVATE | MAP_SHARED_VALIDATE)
            || m.prot & !PROT_MASK != 0
            || !m.offset.is_multiple_of(PAGE_SIZE)
        {
            return Err(Errno::EINVAL);
        }
        let source = if m.flags & MAP_ANONYMOUS != 0 {
            None
        } else {
            self.mmap_source(p, m.fd)?
        };
        if source.is_some() && kind != MAP_PRIVATE && m.prot & crate::paging::PROT_WRITE != 0 {
            self.log_once(
                abi,
                2 << 32,
                format_args!("mmap: writable MAP_SHARED file mapping is a private copy"),
            );
        }
        let placement = if m.flags & MAP_FIXED_NOREPLACE != 0 {
            Placement::FixedNoReplace(m.addr)
        } else if m.flags & MAP_FIXED != 0 {
            Placement::Fixed(m.addr)
        } else if m.flags & MAP_32BIT != 0 && abi == Arch::Amd64 {
            Placement::Low32
        } else {
            Placement::Hint(m.addr)
        };
        let mm = mm_of(p)?;
        let start = mm.map_region(&mut self.ram, placement, len, m.prot)?;
        if let Some(ino) = source {
            let data = self.fs.read_at(ino, m.offset, len as usize);
            mm.poke(&mut self.ram, start, data)?;
        }
        ret(start as i64)
    }

    /// The inode whose bytes a file mapping copies (None: `/dev/zero`, like anonymous memory).
    fn mmap_source(&self, p: &Process, fd: i32) -> KResult<Option<usize>> {
        let id = self.file_of(p, fd)?;
        let file = self.files.get(id).ok_or(Errno::EBADF)?;
        if !file.readable() {
            return Err(Errno::EACCES);
        }
        match file.kind {
            FileKind::Inode(ino) => match self.fs.node(ino) {
                Some(Node::File(_)) => Ok(Some(ino)),
                Some(Node::Device(Device::Zero)) => Ok(None),
                _ => Err(Errno::ENODEV),
            },
            _ => Err(Errno::ENODEV),
        }
    }
}
