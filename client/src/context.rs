//! What the runner (the CPU) and the client core (the OS) exchange on every trap.

use alloc::vec::Vec;

/// The ABI of a guest program.
#[derive(Clone, Copy, PartialEq, Eq, Debug, PartialOrd, Ord)]
pub enum Arch {
    /// 32-bit x86 (ELF32, `int 0x80`); runs in legacy protected mode or compatibility mode.
    I386,
    /// x86_64 (ELF64, `syscall`).
    Amd64,
}

/// The page-table format the builder writes (Intel SDM vol. 3A, 4.3, 4.4, 4.5).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum PagingFormat {
    /// 32-bit paging: two levels of 1024 four-byte entries, no NX.
    Legacy32,
    /// PAE paging: a 4-entry PDPT, then two levels of 512 eight-byte entries, NX.
    Pae,
    /// 4-level paging (IA-32e): PML4, PDPT, PD, PT, NX.
    Long4,
}

/// Register indices in [`UserContext::regs`], in kqemu's `kqemu_cpu_state` order.
pub const REG_RAX: usize = 0;
pub const REG_RCX: usize = 1;
pub const REG_RDX: usize = 2;
pub const REG_RBX: usize = 3;
pub const REG_RSP: usize = 4;
pub const REG_RBP: usize = 5;
pub const REG_RSI: usize = 6;
pub const REG_RDI: usize = 7;
pub const REG_R8: usize = 8;
pub const REG_R9: usize = 9;
pub const REG_R10: usize = 10;

/// RFLAGS of a freshly executed program: IF set, reserved bit 1 set (SDM vol. 1, 3.4.3).
pub const RFLAGS_INITIAL: u64 = 0x202;

/// First GDT slot of the three i386 TLS descriptors (Linux `GDT_ENTRY_TLS_MIN` on i386);
/// the default of `LinuxConfig::tls_entry_base`.
pub const TLS_FIRST_ENTRY: u32 = 6;
/// Number of TLS descriptor slots (Linux `GDT_ENTRY_TLS_ENTRIES`).
pub const TLS_ENTRIES: usize = 3;

/// Linux `struct user_desc` (asm/ldt.h) as set by `set_thread_area`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct UserDesc {
    pub entry_number: u32,
    pub base_addr: u32,
    pub limit: u32,
    /// The bit fields after `limit`: seg_32bit (bit 0), contents (bits 1-2),
    /// read_exec_only (3), limit_in_pages (4), seg_not_present (5), useable (6), lm (7).
    pub flags: u32,
}

impl UserDesc {
    const SEG_32BIT: u32 = 1 << 0;
    const CONTENTS_SHIFT: u32 = 1;
    const READ_EXEC_ONLY: u32 = 1 << 3;
    const LIMIT_IN_PAGES: u32 = 1 << 4;
    const SEG_NOT_PRESENT: u32 = 1 << 5;
    const USEABLE: u32 = 1 << 6;

    /// An entry that clears the slot (Linux `LDT_empty`: everything zero except
    /// read_exec_only and seg_not_present), or an all-zero entry.
    pub fn is_empty(&self) -> bool {
        self.is_ldt_empty() || (self.base_addr == 0 && self.limit == 0 && self.flags == 0)
    }

    /// Linux's `LDT_empty`: base and limit 0, read_exec_only and
    /// seg_not_present set, the other flag bits clear.
    fn is_ldt_empty(&self) -> bool {
        self.base_addr == 0
            && self.limit == 0
            && self.flags & 0x7f == Self::READ_EXEC_ONLY | Self::SEG_NOT_PRESENT
    }

    /// The 8-byte GDT descriptor for this entry, DPL 3, accessed bit preset so the CPU never
    /// writes it (SDM vol. 3A, 3.4.5 "Segment Descriptors"); 0 for an empty slot.
    pub fn descriptor(&self) -> u64 {
        if self.is_empty() {
            return 0;
        }
        self.segment_descriptor()
    }

    /// An LDT entry for `modify_ldt` (Linux `write_ldt`): empty (0) only for Linux's
    /// `LDT_empty`, or in the old mode (func 1) for a zero base and limit, where AVL is also
    /// ignored; otherwise the descriptor as [`Self::descriptor`] builds it (an all-zero
    /// `user_desc` is a present 16-bit data segment there, not an empty slot).
    pub fn ldt_descriptor(&self, oldmode: bool) -> u64 {
        if self.is_ldt_empty() || (oldmode && self.base_addr == 0 && self.limit == 0) {
            return 0;
        }
        let mut desc = *self;
        if oldmode {
            desc.flags &= !Self::USEABLE;
        }
        desc.segment_descriptor()
    }

    /// Linux's `modify_ldt` refuses code segments with `contents` 3 (conforming) that are
    /// present, and any in the old mode (func 1).
    pub fn ldt_refused(&self, oldmode: bool) -> bool {
        (self.flags >> Self::CONTENTS_SHIFT) & 3 == 3
            && (oldmode || self.flags & Self::SEG_NOT_PRESENT == 0)
    }

    fn segment_descriptor(&self) -> u64 {
        let contents = (self.flags >> Self::CONTENTS_SHIFT) & 3;
        let writable_or_readable = self.flags & Self::READ_EXEC_ONLY == 0;
        // Type field: data (contents 0), expand-down data (1), code (2),
        // conforming code (3).
        let mut seg_type: u64 = match contents {
            0 => 0b0000,
            1 => 0b0100,
            2 => 0b1000,
            _ => 0b1100,
        };
        if writable_or_readable {
            seg_type |= 0b0010;
        }
        seg_type |= 0b0001;
        let base = u64::from(self.base_addr);
        let limit = u64::from(self.limit) & 0xf_ffff;
        let present = u64::from(self.flags & Self::SEG_NOT_PRESENT == 0);
        let avl = u64::from(self.flags & Self::USEABLE != 0);
        let db = u64::from(self.flags & Self::SEG_32BIT != 0);
        let g = u64::from(self.flags & Self::LIMIT_IN_PAGES != 0);
        (limit & 0xffff)
            | (base & 0xff_ffff) << 16
            | seg_type << 40
            | 1 << 44
            | 3 << 45
            | present << 47
            | (limit >> 16) << 48
            | avl << 52
            | db << 54
            | g << 55
            | (base >> 24) << 56
    }
}

/// The register file of one process, exchanged with the runner on every trap.
#[derive(Clone, Debug, Default)]
pub struct UserContext {
    /// RAX RCX RDX RBX RSP RBP RSI RDI R8..R15 (kqemu order, see `REG_*`).
    pub regs: [u64; 16],
    pub rip: u64,
    pub rflags: u64,
    /// amd64 `arch_prctl(ARCH_SET_FS/GS)` bases.
    pub fs_base: u64,
    pub gs_base: u64,
    /// i386 `set_thread_area` descriptors: `tls[i]` is GDT entry
    /// `LinuxConfig::tls_entry_base + i` (6..8 by default, as on i386 Linux).
    /// Each `entry_number` says which entry it is.
    pub tls: [UserDesc; TLS_ENTRIES],
    /// The process's LDT (`modify_ldt`): descriptor `i` is LDT entry `i`; its length is the
    /// LDT's size in entries (Linux grows it to the highest entry written). Copied on fork,
    /// empty after exec, as Linux's `mm->context.ldt`.
    pub ldt: Vec<u64>,
    /// Set by the OS when `tls` or `ldt` changed; the runner reloads its GDT slots and LDT
    /// and clears it.
    pub tls_changed: bool,
    /// i386: the selectors the program loaded into FS and GS (e.g. GS = TLS entry).
    pub fs_sel: u16,
    pub gs_sel: u16,
    /// i386: the selectors the program loaded into DS, ES and SS itself (a TLS entry with
    /// another base or limit, or null for DS and ES). `None`: the runner's flat user data
    /// segment, which every program starts with; the runners' selector values differ (the
    /// testbed's own GDT, the monitor guest's Linux numbering), so the context keeps the
    /// choice and each runner its number.
    pub ds_sel: Option<u16>,
    pub es_sel: Option<u16>,
    pub ss_sel: Option<u16>,
}

/// Why the runner stopped a process.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Trap {
    /// amd64 `syscall`; `ctx.rip` already points after it.
    Syscall,
    /// `int 0x80`; `ctx.rip` already points after it.
    Int80,
    /// A CPU exception raised by the program.
    Exception {
        vector: u8,
        error_code: u32,
        cr2: u64,
    },
    /// The runner's timer fired: the OS may switch to another runnable process.
    Timer,
}

#[cfg(test)]
mod tests {
    use super::UserDesc;

    #[test]
    fn contents_give_the_descriptor_type() {
        // Bits 43:40 of the descriptor: data, expand-down data, code,
        // conforming code; each readable or writable and accessed.
        for (contents, seg_type) in [(0u32, 0b0011u64), (1, 0b0111), (2, 0b1011), (3, 0b1111)] {
            let desc = UserDesc {
                entry_number: 0,
                base_addr: 0x1000,
                limit: 0xfff,
                flags: 1 | contents << UserDesc::CONTENTS_SHIFT,
            };
            assert_eq!(
                desc.descriptor() >> 40 & 0xf,
                seg_type,
                "contents {contents}"
            );
        }
    }
}
