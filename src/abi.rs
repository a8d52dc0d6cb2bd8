//! The `/dev/kqemu` interface, ABI 1.4.0 (ABI.md).
//!
//! Every type here is fixed by existing client binaries (QEMU 0.10/0.11 built
//! with kqemu support): sizes, offsets and numbers must match byte for byte.
//! The values come from kqemu-1.4.0pre1's `kqemu.h`, which QEMU 0.10.4 and
//! 0.11.1 carry unchanged; it has one layout for 32- and 64-bit clients
//! (pointers are followed by 32 bits of padding that the client zeroes).
//! The compile-time assertions at the end of this file and the unit tests
//! fail if a field moves.

use core::mem::{align_of, size_of};

/// The only ABI version the client accepts (`KQEMU_VERSION`): any other
/// value disables acceleration in the client.
pub const KQEMU_VERSION: u32 = 0x0001_0400;

/// Size of a guest and host page, which is also the unit of every range and
/// list in this interface.
pub const KQEMU_PAGE_SIZE: u64 = 4096;

/// `struct kqemu_segment_cache`: a segment register as the client caches it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KqemuSegmentCache {
    pub selector: u16,
    pub padding1: u16,
    /// High dword of the descriptor (type, S, DPL, P, AVL, L, D/B and G
    /// bits in place).
    pub flags: u32,
    pub base: u64,
    /// Byte-granular limit, already expanded from the descriptor.
    pub limit: u32,
    pub padding2: u32,
}

/// Index of each guest segment register in [`KqemuCpuState::segs`].
pub mod seg {
    pub const ES: usize = 0;
    pub const CS: usize = 1;
    pub const SS: usize = 2;
    pub const DS: usize = 3;
    pub const FS: usize = 4;
    pub const GS: usize = 5;
    /// Number of segment registers in the state.
    pub const COUNT: usize = 6;
}

/// Number of general-purpose registers in [`KqemuCpuState::regs`]
/// (RAX RCX RDX RBX RSP RBP RSI RDI R8..R15, in encoding order).
pub const KQEMU_NB_REGS: usize = 16;

/// `struct kqemu_cpu_state`: the guest CPU state exchanged by `KQEMU_EXEC`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KqemuCpuState {
    pub regs: [u64; KQEMU_NB_REGS],
    pub eip: u64,
    pub eflags: u64,
    pub segs: [KqemuSegmentCache; seg::COUNT],
    pub ldt: KqemuSegmentCache,
    pub tr: KqemuSegmentCache,
    /// Only `base` and `limit` are meaningful.
    pub gdt: KqemuSegmentCache,
    /// Only `base` and `limit` are meaningful.
    pub idt: KqemuSegmentCache,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub a20_mask: u64,
    pub sysenter_cs: u64,
    pub sysenter_esp: u64,
    pub sysenter_eip: u64,
    pub efer: u64,
    pub star: u64,
    pub lstar: u64,
    pub cstar: u64,
    pub fmask: u64,
    pub kernelgsbase: u64,
    /// The client always passes 0.
    pub tsc_offset: u64,
    pub dr0: u64,
    pub dr1: u64,
    pub dr2: u64,
    pub dr3: u64,
    pub dr6: u64,
    pub dr7: u64,
    pub cpl: u8,
    /// 1: normal mode (only guest CPL 3 runs natively), 0: full
    /// virtualization (`-kernel-kqemu`).
    pub user_only: u8,
    pub padding1: u16,
    pub error_code: u32,
    pub next_eip: u64,
    pub nb_pages_to_flush: u32,
    /// The outcome of `KQEMU_EXEC` (`KQEMU_RET_*`).
    pub retval: i32,
    pub nb_ram_pages_to_update: u32,
    pub nb_modified_ram_pages: u32,
}

/// `struct kqemu_init`: the argument of `KQEMU_INIT`. Pointers are user
/// addresses of the calling process.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KqemuInit {
    /// Guest RAM, page aligned (the client's shared anonymous or file
    /// mapping).
    pub ram_base: u64,
    /// Multiple of the page size.
    pub ram_size: u64,
    /// One dirty byte per RAM page, page aligned, shared read/write.
    pub ram_dirty: u64,
    /// One page: [`KQEMU_MAX_PAGES_TO_FLUSH`] guest addresses.
    pub pages_to_flush: u64,
    /// One page: [`KQEMU_MAX_RAM_PAGES_TO_UPDATE`] RAM offsets.
    pub ram_pages_to_update: u64,
    /// One page: [`KQEMU_MAX_MODIFIED_RAM_PAGES`] RAM offsets.
    pub modified_ram_pages: u64,
}

/// `struct kqemu_phys_mem`: the argument of `KQEMU_SET_PHYS_MEM`, one
/// guest-physical range.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KqemuPhysMem {
    /// Page aligned guest-physical start.
    pub phys_addr: u64,
    /// Page aligned length.
    pub size: u64,
    /// Offset into guest RAM of the first page (RAM and ROM ranges).
    pub ram_addr: u64,
    /// One of the `KQEMU_IO_MEM_*` values.
    pub io_index: u32,
    pub padding1: u32,
}

/// `retval`: the module cannot go on; the client dumps the CPU state and
/// exits. Never used for guest behaviour.
pub const KQEMU_RET_ABORT: i32 = -1;
/// `retval`: guest exception; the vector is in the low byte.
pub const KQEMU_RET_EXCEPTION: i32 = 0x0000;
/// `retval`: guest software interrupt `int n` (vector in the low byte),
/// with `next_eip` set.
pub const KQEMU_RET_INT: i32 = 0x0100;
/// `retval`: the client must emulate the next instructions itself.
pub const KQEMU_RET_SOFTMMU: i32 = 0x0200;
/// `retval`: interrupted (signal pending, reschedule, time slice over).
pub const KQEMU_RET_INTR: i32 = 0x0201;
/// `retval`: guest `syscall`, with `next_eip` set.
pub const KQEMU_RET_SYSCALL: i32 = 0x0300;

/// Entries in the `pages_to_flush` page.
pub const KQEMU_MAX_PAGES_TO_FLUSH: u32 = 512;
/// `nb_pages_to_flush` value meaning "flush everything".
pub const KQEMU_FLUSH_ALL: u32 = KQEMU_MAX_PAGES_TO_FLUSH + 1;
/// Entries in the `ram_pages_to_update` page.
pub const KQEMU_MAX_RAM_PAGES_TO_UPDATE: u32 = 512;
/// `nb_ram_pages_to_update` value meaning "update every RAM page".
pub const KQEMU_RAM_PAGES_UPDATE_ALL: u32 = KQEMU_MAX_RAM_PAGES_TO_UPDATE + 1;
/// Entries in the `modified_ram_pages` page.
pub const KQEMU_MAX_MODIFIED_RAM_PAGES: u32 = 512;

/// `io_index`: guest RAM at `ram_addr`.
pub const KQEMU_IO_MEM_RAM: u32 = 0;
/// `io_index`: read-only memory at `ram_addr`.
pub const KQEMU_IO_MEM_ROM: u32 = 1;
/// `io_index`: the paravirtual communication page.
pub const KQEMU_IO_MEM_COMM: u32 = 2;
/// `io_index`: device memory; a guest access returns `KQEMU_RET_SOFTMMU`.
pub const KQEMU_IO_MEM_UNASSIGNED: u32 = 3;

/// Dirty byte flag: the client's VGA emulation has not seen the write.
pub const VGA_DIRTY_FLAG: u8 = 0x01;
/// Dirty byte flag: clear while the client holds translated code from the
/// page.
pub const CODE_DIRTY_FLAG: u8 = 0x02;
/// Dirty byte flag the module may use for its descriptor-table tracking.
pub const DESC_DIRTY_FLAG: u8 = 0x04;
/// Dirty byte value of a fully dirty page.
pub const ALL_DIRTY: u8 = 0xff;

/// Limits of this implementation (the lead's contract; kqemu's own were
/// narrower: RAM below 0x7ffff000, 32-bit guest-physical ranges).
///
/// Largest `ram_size` INIT accepts: 64 GiB.
pub const KQEMU_MAX_RAM_SIZE: u64 = 0x10_0000_0000;
/// Guest-physical ranges must end at or below 2^52, the architectural
/// limit of x86 physical addresses (SDM Vol. 3A 4.1.4, MAXPHYADDR <= 52).
pub const KQEMU_MAX_GUEST_PHYS: u64 = 1 << 52;
/// Most distinct guest-physical ranges one instance records.
pub const KQEMU_MAX_PHYS_RANGES: usize = 1024;
/// End of the lower (user) half of the canonical 48-bit amd64 address
/// space: every client buffer must lie below it.
pub const USER_ADDRESS_LIMIT: u64 = 0x0000_8000_0000_0000;

// FreeBSD's ioctl encoding (sys/sys/ioccom.h): direction in bits 31..29,
// parameter length in bits 28..16, group in 15..8, number in 7..0.
const IOCPARM_SHIFT: u32 = 13;
/// Largest length the encoding can carry (`IOCPARM_MASK`).
pub const IOCPARM_MASK: u32 = (1 << IOCPARM_SHIFT) - 1;
/// `IOC_OUT`: the kernel copies the argument out after a successful call.
pub const IOC_OUT: u32 = 0x4000_0000;
/// `IOC_IN`: the kernel copies the argument in before the call.
pub const IOC_IN: u32 = 0x8000_0000;
/// `IOC_INOUT`: both.
pub const IOC_INOUT: u32 = IOC_IN | IOC_OUT;
/// The kqemu ioctl group, `'q'`.
pub const KQEMU_IOC_GROUP: u8 = b'q';

/// `_IOC(dir, group, num, len)`. Evaluated only in constants: a length the
/// encoding cannot carry stops the build.
pub const fn ioc(dir: u32, group: u8, num: u8, len: usize) -> u32 {
    assert!(len <= IOCPARM_MASK as usize, "ioctl argument too large");
    dir | ((len as u32 & IOCPARM_MASK) << 16) | ((group as u32) << 8) | num as u32
}

/// `_IOR(group, num, T)`.
pub const fn ior<T>(group: u8, num: u8) -> u32 {
    ioc(IOC_OUT, group, num, size_of::<T>())
}

/// `_IOW(group, num, T)`.
pub const fn iow<T>(group: u8, num: u8) -> u32 {
    ioc(IOC_IN, group, num, size_of::<T>())
}

/// `_IOWR(group, num, T)`.
pub const fn iowr<T>(group: u8, num: u8) -> u32 {
    ioc(IOC_INOUT, group, num, size_of::<T>())
}

/// `IOCPARM_LEN(cmd)`: the argument length a command carries.
pub const fn ioc_len(cmd: u32) -> usize {
    ((cmd >> 16) & IOCPARM_MASK) as usize
}

/// `_IOWR('q', 1, struct kqemu_cpu_state)`.
pub const KQEMU_EXEC: u32 = iowr::<KqemuCpuState>(KQEMU_IOC_GROUP, 1);
/// `_IOW('q', 2, struct kqemu_init)`.
pub const KQEMU_INIT: u32 = iow::<KqemuInit>(KQEMU_IOC_GROUP, 2);
/// `_IOR('q', 3, int)`.
pub const KQEMU_GET_VERSION: u32 = ior::<i32>(KQEMU_IOC_GROUP, 3);
/// `_IOW('q', 4, int)`.
pub const KQEMU_MODIFY_RAM_PAGES: u32 = iow::<i32>(KQEMU_IOC_GROUP, 4);
/// `_IOW('q', 5, struct kqemu_phys_mem)`.
pub const KQEMU_SET_PHYS_MEM: u32 = iow::<KqemuPhysMem>(KQEMU_IOC_GROUP, 5);

/// Plain data exchanged through an ioctl buffer.
///
/// # Safety
///
/// Implementors are `#[repr(C)]` (or primitive), contain no padding bytes
/// (every gap is a named field) and accept every bit pattern, so copying
/// them to and from bytes is sound.
pub unsafe trait Pod: Copy + Default {
    /// Reads a value from exactly `size_of::<Self>()` bytes; `None` on any
    /// other length.
    fn read_from(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != size_of::<Self>() {
            return None;
        }
        // SAFETY: the length was checked; the trait contract says every bit
        // pattern is a valid `Self`; read_unaligned has no alignment need.
        Some(unsafe { bytes.as_ptr().cast::<Self>().read_unaligned() })
    }

    /// The value in place in exactly `size_of::<Self>()` bytes that are
    /// aligned for it; `None` on any other length or a misaligned start.
    fn from_bytes_mut(bytes: &mut [u8]) -> Option<&mut Self> {
        if bytes.len() != size_of::<Self>() || bytes.as_ptr().align_offset(align_of::<Self>()) != 0
        {
            return None;
        }
        // SAFETY: the length and alignment were checked; the trait contract
        // says every bit pattern is a valid `Self`; the result borrows
        // `bytes` uniquely for as long as `bytes` was borrowed.
        Some(unsafe { &mut *bytes.as_mut_ptr().cast::<Self>() })
    }

    /// Writes the value into exactly `size_of::<Self>()` bytes; `None` on
    /// any other length.
    fn write_to(&self, bytes: &mut [u8]) -> Option<()> {
        if bytes.len() != size_of::<Self>() {
            return None;
        }
        // SAFETY: the length was checked and `bytes` is a unique borrow;
        // write_unaligned has no alignment need.
        unsafe { bytes.as_mut_ptr().cast::<Self>().write_unaligned(*self) };
        Some(())
    }
}

// SAFETY: primitive integer, every bit pattern valid, no padding.
unsafe impl Pod for i32 {}
// SAFETY: repr(C), fields 2+2+4+8+4+4 bytes with no gap (asserted below).
unsafe impl Pod for KqemuSegmentCache {}
// SAFETY: repr(C) of integers and Pod structs; size equals the sum of the
// fields (asserted below), so there is no padding.
unsafe impl Pod for KqemuCpuState {}
// SAFETY: repr(C), six u64 fields, no padding.
unsafe impl Pod for KqemuInit {}
// SAFETY: repr(C), 3 x u64 + 2 x u32, no padding.
unsafe impl Pod for KqemuPhysMem {}

// Layout of ABI.md, checked at compile time.
macro_rules! assert_layout {
    ($ty:ty, size $size:expr, align $align:expr, { $($field:ident $(. $idx:tt)? @ $off:expr),* $(,)? }) => {
        const _: () = assert!(size_of::<$ty>() == $size);
        const _: () = assert!(core::mem::align_of::<$ty>() == $align);
        $(const _: () = assert!(core::mem::offset_of!($ty, $field $(. $idx)?) == $off);)*
    };
}

assert_layout!(KqemuSegmentCache, size 24, align 8, {
    selector @ 0, padding1 @ 2, flags @ 4, base @ 8, limit @ 16, padding2 @ 20,
});
assert_layout!(KqemuCpuState, size 0x248, align 8, {
    regs @ 0x000, eip @ 0x080, eflags @ 0x088, segs @ 0x090, ldt @ 0x120,
    tr @ 0x138, gdt @ 0x150, idt @ 0x168, cr0 @ 0x180, cr2 @ 0x188,
    cr3 @ 0x190, cr4 @ 0x198, a20_mask @ 0x1a0, sysenter_cs @ 0x1a8,
    sysenter_esp @ 0x1b0, sysenter_eip @ 0x1b8, efer @ 0x1c0, star @ 0x1c8,
    lstar @ 0x1d0, cstar @ 0x1d8, fmask @ 0x1e0, kernelgsbase @ 0x1e8,
    tsc_offset @ 0x1f0, dr0 @ 0x1f8, dr1 @ 0x200, dr2 @ 0x208, dr3 @ 0x210,
    dr6 @ 0x218, dr7 @ 0x220, cpl @ 0x228, user_only @ 0x229,
    padding1 @ 0x22a, error_code @ 0x22c, next_eip @ 0x230,
    nb_pages_to_flush @ 0x238, retval @ 0x23c, nb_ram_pages_to_update @ 0x240,
    nb_modified_ram_pages @ 0x244,
});
assert_layout!(KqemuInit, size 48, align 8, {
    ram_base @ 0, ram_size @ 8, ram_dirty @ 16, pages_to_flush @ 24,
    ram_pages_to_update @ 32, modified_ram_pages @ 40,
});
assert_layout!(KqemuPhysMem, size 32, align 8, {
    phys_addr @ 0, size @ 8, ram_addr @ 16, io_index @ 24, padding1 @ 28,
});
// Each list is exactly one page of u64 entries.
const _: () = assert!(KQEMU_MAX_PAGES_TO_FLUSH as u64 * 8 == KQEMU_PAGE_SIZE);
const _: () = assert!(KQEMU_MAX_RAM_PAGES_TO_UPDATE as u64 * 8 == KQEMU_PAGE_SIZE);
const _: () = assert!(KQEMU_MAX_MODIFIED_RAM_PAGES as u64 * 8 == KQEMU_PAGE_SIZE);

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::offset_of;

    #[test]
    fn ioctl_numbers_are_freebsd_values() {
        assert_eq!(KQEMU_EXEC, 0xC248_7101);
        assert_eq!(KQEMU_INIT, 0x8030_7102);
        assert_eq!(KQEMU_GET_VERSION, 0x4004_7103);
        assert_eq!(KQEMU_MODIFY_RAM_PAGES, 0x8004_7104);
        assert_eq!(KQEMU_SET_PHYS_MEM, 0x8020_7105);
    }

    #[test]
    fn ioctl_lengths_decode() {
        assert_eq!(ioc_len(KQEMU_EXEC), 584);
        assert_eq!(ioc_len(KQEMU_INIT), 48);
        assert_eq!(ioc_len(KQEMU_GET_VERSION), 4);
        assert_eq!(ioc_len(KQEMU_MODIFY_RAM_PAGES), 4);
        assert_eq!(ioc_len(KQEMU_SET_PHYS_MEM), 32);
    }

    #[test]
    fn constants() {
        assert_eq!(KQEMU_VERSION, 0x010400);
        assert_eq!(KQEMU_RET_ABORT, -1);
        assert_eq!(KQEMU_RET_INT, 0x100);
        assert_eq!(KQEMU_RET_SOFTMMU, 0x200);
        assert_eq!(KQEMU_RET_INTR, 0x201);
        assert_eq!(KQEMU_RET_SYSCALL, 0x300);
        assert_eq!(KQEMU_FLUSH_ALL, 513);
        assert_eq!(KQEMU_RAM_PAGES_UPDATE_ALL, 513);
        assert_eq!(KQEMU_MAX_MODIFIED_RAM_PAGES, 512);
        assert_eq!(
            [
                KQEMU_IO_MEM_RAM,
                KQEMU_IO_MEM_ROM,
                KQEMU_IO_MEM_COMM,
                KQEMU_IO_MEM_UNASSIGNED
            ],
            [0, 1, 2, 3]
        );
        assert_eq!(KQEMU_MAX_RAM_SIZE, 64 << 30);
        assert_eq!(KQEMU_MAX_GUEST_PHYS, 0x0010_0000_0000_0000);
        assert_eq!(KQEMU_MAX_PHYS_RANGES, 1024);
    }

    #[test]
    fn segment_cache_layout() {
        assert_eq!(size_of::<KqemuSegmentCache>(), 24);
        assert_eq!(offset_of!(KqemuSegmentCache, selector), 0);
        assert_eq!(offset_of!(KqemuSegmentCache, flags), 4);
        assert_eq!(offset_of!(KqemuSegmentCache, base), 8);
        assert_eq!(offset_of!(KqemuSegmentCache, limit), 16);
        assert_eq!(offset_of!(KqemuSegmentCache, padding2), 20);
    }

    #[test]
    fn cpu_state_layout() {
        assert_eq!(size_of::<KqemuCpuState>(), 584);
        let offsets = [
            (offset_of!(KqemuCpuState, regs), 0x000),
            (offset_of!(KqemuCpuState, eip), 0x080),
            (offset_of!(KqemuCpuState, eflags), 0x088),
            (offset_of!(KqemuCpuState, segs), 0x090),
            (offset_of!(KqemuCpuState, ldt), 0x120),
            (offset_of!(KqemuCpuState, tr), 0x138),
            (offset_of!(KqemuCpuState, gdt), 0x150),
            (offset_of!(KqemuCpuState, idt), 0x168),
            (offset_of!(KqemuCpuState, cr0), 0x180),
            (offset_of!(KqemuCpuState, cr2), 0x188),
            (offset_of!(KqemuCpuState, cr3), 0x190),
            (offset_of!(KqemuCpuState, cr4), 0x198),
            (offset_of!(KqemuCpuState, a20_mask), 0x1a0),
            (offset_of!(KqemuCpuState, sysenter_cs), 0x1a8),
            (offset_of!(KqemuCpuState, sysenter_esp), 0x1b0),
            (offset_of!(KqemuCpuState, sysenter_eip), 0x1b8),
            (offset_of!(KqemuCpuState, efer), 0x1c0),
            (offset_of!(KqemuCpuState, star), 0x1c8),
            (offset_of!(KqemuCpuState, lstar), 0x1d0),
            (offset_of!(KqemuCpuState, cstar), 0x1d8),
            (offset_of!(KqemuCpuState, fmask), 0x1e0),
            (offset_of!(KqemuCpuState, kernelgsbase), 0x1e8),
            (offset_of!(KqemuCpuState, tsc_offset), 0x1f0),
            (offset_of!(KqemuCpuState, dr0), 0x1f8),
            (offset_of!(KqemuCpuState, dr1), 0x200),
            (offset_of!(KqemuCpuState, dr2), 0x208),
            (offset_of!(KqemuCpuState, dr3), 0x210),
            (offset_of!(KqemuCpuState, dr6), 0x218),
            (offset_of!(KqemuCpuState, dr7), 0x220),
            (offset_of!(KqemuCpuState, cpl), 0x228),
            (offset_of!(KqemuCpuState, user_only), 0x229),
            (offset_of!(KqemuCpuState, padding1), 0x22a),
            (offset_of!(KqemuCpuState, error_code), 0x22c),
            (offset_of!(KqemuCpuState, next_eip), 0x230),
            (offset_of!(KqemuCpuState, nb_pages_to_flush), 0x238),
            (offset_of!(KqemuCpuState, retval), 0x23c),
            (offset_of!(KqemuCpuState, nb_ram_pages_to_update), 0x240),
            (offset_of!(KqemuCpuState, nb_modified_ram_pages), 0x244),
        ];
        for (i, (got, want)) in offsets.iter().enumerate() {
            assert_eq!(got, want, "field #{i} of kqemu_cpu_state");
        }
        // The sixth segment (GS) ends where the LDT cache begins.
        assert_eq!(0x090 + seg::COUNT * 24, 0x120);
        assert_eq!(seg::GS, 5);
    }

    #[test]
    fn init_and_phys_mem_layout() {
        assert_eq!(size_of::<KqemuInit>(), 48);
        assert_eq!(offset_of!(KqemuInit, ram_base), 0);
        assert_eq!(offset_of!(KqemuInit, ram_size), 8);
        assert_eq!(offset_of!(KqemuInit, ram_dirty), 16);
        assert_eq!(offset_of!(KqemuInit, pages_to_flush), 24);
        assert_eq!(offset_of!(KqemuInit, ram_pages_to_update), 32);
        assert_eq!(offset_of!(KqemuInit, modified_ram_pages), 40);
        assert_eq!(size_of::<KqemuPhysMem>(), 32);
        assert_eq!(offset_of!(KqemuPhysMem, phys_addr), 0);
        assert_eq!(offset_of!(KqemuPhysMem, size), 8);
        assert_eq!(offset_of!(KqemuPhysMem, ram_addr), 16);
        assert_eq!(offset_of!(KqemuPhysMem, io_index), 24);
        assert_eq!(offset_of!(KqemuPhysMem, padding1), 28);
    }

    #[test]
    fn pod_round_trip_is_little_endian() {
        let mut bytes = [0u8; 32];
        bytes[0..8].copy_from_slice(&0x1000u64.to_le_bytes());
        bytes[8..16].copy_from_slice(&0x2000u64.to_le_bytes());
        bytes[16..24].copy_from_slice(&0x3000u64.to_le_bytes());
        bytes[24..28].copy_from_slice(&KQEMU_IO_MEM_ROM.to_le_bytes());
        let m = KqemuPhysMem::read_from(&bytes).expect("32 bytes");
        assert_eq!(
            (m.phys_addr, m.size, m.ram_addr, m.io_index),
            (0x1000, 0x2000, 0x3000, KQEMU_IO_MEM_ROM)
        );
        let mut out = [0xffu8; 32];
        m.write_to(&mut out).expect("32 bytes");
        assert_eq!(out, bytes);
        assert!(KqemuPhysMem::read_from(&bytes[..31]).is_none());
        assert!(m.write_to(&mut out[..31]).is_none());
        assert!(i32::read_from(&[0; 8]).is_none());
    }

    #[test]
    fn in_place_view_needs_exact_length_and_alignment() {
        // A u64 array gives 8-byte alignment; one byte in, it is lost.
        let mut words = [0u64; 5];
        // SAFETY: a u64 array is 40 initialized bytes, borrowed uniquely
        // for the slice's life.
        let bytes = unsafe { core::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), 40) };
        bytes[8..16].copy_from_slice(&0x2000u64.to_le_bytes());
        let m = KqemuPhysMem::from_bytes_mut(&mut bytes[..32]).expect("aligned, 32 bytes");
        assert_eq!(m.size, 0x2000);
        m.ram_addr = 0x3000;
        assert_eq!(&bytes[16..24], &0x3000u64.to_le_bytes());
        assert!(KqemuPhysMem::from_bytes_mut(&mut bytes[1..33]).is_none());
        assert!(KqemuPhysMem::from_bytes_mut(&mut bytes[..31]).is_none());
        assert!(KqemuPhysMem::from_bytes_mut(&mut bytes[..40]).is_none());
    }

    #[test]
    fn retval_sits_at_its_abi_offset_in_bytes() {
        let mut state = KqemuCpuState {
            retval: KQEMU_RET_ABORT,
            ..Default::default()
        };
        state.regs[15] = 0x1122_3344_5566_7788;
        let mut bytes = [0u8; 584];
        state.write_to(&mut bytes).expect("584 bytes");
        assert_eq!(&bytes[0x23c..0x240], &(-1i32).to_le_bytes());
        assert_eq!(&bytes[0x78..0x80], &0x1122_3344_5566_7788u64.to_le_bytes());
    }
}
