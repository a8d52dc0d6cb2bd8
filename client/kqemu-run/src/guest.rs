//! `kqemu-run --guest PATH`: runs a static Linux/amd64 program through
//! `KQEMU_EXEC` in normal mode, as QEMU 0.11 with kqemu does for a guest
//! process: guest RAM from `mmap(MAP_ANON|MAP_SHARED)`, INIT, one RAM
//! range by SET_PHYS_MEM, then EXEC until the program exits, with the
//! guest's FPU state live around each EXEC (`fxrstor` before, `fxsave`
//! after: ABI.md "Guest FPU contract").
//!
//! The guest OS here is minimal: a 64-bit address space built by hand
//! (4-level page tables in guest RAM), the program's PT_LOAD segments and
//! a stack, and the Linux system calls the testbed's tiny guests make
//! (`write`, `getpid`, `exit`, `exit_group`; anything else is -ENOSYS).
//! The full client core (client/src: processes, memfs, the whole system
//! call layer) runs programs under `--linux` (linux.rs).

use core::ffi::CStr;
use core::fmt::Write;

use kqemu::abi::{
    seg, KqemuCpuState, KqemuInit, KqemuPhysMem, KqemuSegmentCache, KQEMU_INIT, KQEMU_IO_MEM_RAM,
    KQEMU_RET_EXCEPTION, KQEMU_RET_INT, KQEMU_RET_INTR, KQEMU_RET_SYSCALL, KQEMU_SET_PHYS_MEM,
};

use crate::{Line, System, O_RDWR};

/// What the guest runner needs beyond [`System`].
pub trait GuestSystem: System {
    /// Reads the file at `path` into `buf`; its length (at most `buf.len()`).
    fn read_file(&mut self, path: &CStr, buf: &mut [u8]) -> Result<usize, i32>;
    /// Writes `bytes` to descriptor `fd` of this process (1 or 2).
    fn write_fd(&mut self, fd: i32, bytes: &[u8]);
    /// KQEMU_EXEC with `fpu` (an FXSAVE image) loaded into the FPU before
    /// the ioctl and saved back from it after, with no code between.
    fn exec(&mut self, fd: i32, state: &mut KqemuCpuState, fpu: &mut FxArea) -> Result<i32, i32>;
}

/// An FXSAVE/FXRSTOR image (SDM Vol. 1 10.5.1: 512 bytes, 16-aligned).
#[repr(C, align(16))]
pub struct FxArea(pub [u8; 512]);

impl FxArea {
    /// The power-on FPU state: FCW 0x037f, MXCSR 0x1f80 (SDM Vol. 1
    /// 8.1.5, 10.2.3), everything else zero.
    pub fn initial() -> FxArea {
        let mut a = FxArea([0; 512]);
        a.0[0..2].copy_from_slice(&0x037fu16.to_le_bytes());
        a.0[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
        a
    }
}

/// Guest RAM: 8 MiB, as guest-physical 0.. (one RAM range).
pub const RAM_SIZE: u64 = 8 << 20;
const PAGE: u64 = 4096;
/// The largest program this runner loads.
pub const MAX_PROGRAM: usize = 2 << 20;
/// Page-table pages come from the bottom 64 KiB, the rest from above.
const TABLES_END: u64 = 0x1_0000;
/// The stack: 64 KiB below this address.
const STACK_TOP: u64 = 0x7fff_ffff_0000;
const STACK_SIZE: u64 = 0x1_0000;
/// PTE bits (SDM Vol. 3A 4.5): present, writable, user.
const PTE_PRW_U: u64 = 0x7;
const PTE_FRAME: u64 = 0x000f_ffff_ffff_f000;

/// Guest selectors and descriptor attributes as Linux x86_64 has them
/// (__USER_CS 0x33, __USER_DS 0x2b; SDM Vol. 3A Figure 3-8): 64-bit code
/// DPL 3 and data DPL 3.
const GUEST_CS64: u16 = 0x33;
const GUEST_DS: u16 = 0x2b;
const FLAGS_CODE64: u32 = 0x00af_fb00;
const FLAGS_DATA: u32 = 0x00cf_f300;
/// CR0: PE, MP, ET, NE, WP, PG; CR4: PAE, OSFXSR, OSXMMEXCPT; EFER: SCE,
/// LME, LMA (SDM Vol. 3A 2.5, 2.2.1).
const GUEST_CR0: u64 = 0x8005_0033;
const GUEST_CR4: u64 = (1 << 5) | (1 << 9) | (1 << 10);
const GUEST_EFER: u64 = 1 | (1 << 8) | (1 << 10);
const RFLAGS_IF: u64 = 1 << 9;
const RFLAGS_FIXED: u64 = 1 << 1;
/// Registers in kqemu_cpu_state order: RAX RCX RDX RBX RSP RBP RSI RDI R8..R15.
const RAX: usize = 0;
const RCX: usize = 1;
const RDX: usize = 2;
const RSP: usize = 4;
const RSI: usize = 6;
const RDI: usize = 7;
const R11: usize = 11;
/// Linux x86_64 system call numbers and errno.
const NR_WRITE: u64 = 1;
const NR_GETPID: u64 = 39;
const NR_EXIT: u64 = 60;
const NR_EXIT_GROUP: u64 = 231;
const ENOSYS: u64 = 38;
const EFAULT: u64 = 14;
/// Exit status of a run this runner could not carry out.
pub const STATUS_RUNNER_FAILED: i32 = 125;
/// Linux signal numbers for guest exceptions.
const SIGSEGV: i32 = 11;
const SIGFPE: i32 = 8;
const SIGILL: i32 = 4;
const SIGTRAP: i32 = 5;
const SIGBUS: i32 = 7;
/// The most EXEC calls one run makes (the guests here need far fewer).
const MAX_EXECS: u64 = 50_000_000;

/// The guest's memory seen from this process: RAM at `base`, a bump
/// allocator for frames, the PML4 at guest-physical 0.
pub struct GuestMem<'a> {
    ram: &'a mut [u8],
    next_table: u64,
    next_frame: u64,
}

impl<'a> GuestMem<'a> {
    pub fn new(ram: &'a mut [u8]) -> GuestMem<'a> {
        GuestMem {
            ram,
            next_table: PAGE,
            next_frame: TABLES_END,
        }
    }

    fn entry(&self, table: u64, index: u64) -> u64 {
        let at = (table + index * 8) as usize;
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.ram[at..at + 8]);
        u64::from_le_bytes(b)
    }

    fn set_entry(&mut self, table: u64, index: u64, value: u64) {
        let at = (table + index * 8) as usize;
        self.ram[at..at + 8].copy_from_slice(&value.to_le_bytes());
    }

    /// The guest-physical frame of `virt`, mapping a fresh zeroed one
    /// (and the tables above it) when absent.
    fn map(&mut self, virt: u64) -> Option<u64> {
        let mut table = 0;
        for shift in [39u32, 30, 21] {
            let index = (virt >> shift) & 511;
            let e = self.entry(table, index);
            table = if e & 1 != 0 {
                e & PTE_FRAME
            } else {
                let t = self.next_table;
                if t >= TABLES_END {
                    return None;
                }
                self.next_table += PAGE;
                self.set_entry(table, index, t | PTE_PRW_U);
                t
            };
        }
        let index = (virt >> 12) & 511;
        let e = self.entry(table, index);
        if e & 1 != 0 {
            return Some(e & PTE_FRAME);
        }
        let frame = self.next_frame;
        if frame + PAGE > self.ram.len() as u64 {
            return None;
        }
        self.next_frame += PAGE;
        self.set_entry(table, index, frame | PTE_PRW_U);
        Some(frame)
    }

    /// The guest-physical address of mapped `virt`.
    pub fn translate(&self, virt: u64) -> Option<u64> {
        let mut table = 0;
        for shift in [39u32, 30, 21, 12] {
            let e = self.entry(table, (virt >> shift) & 511);
            if e & 1 == 0 {
                return None;
            }
            table = e & PTE_FRAME;
        }
        Some(table | (virt & (PAGE - 1)))
    }

    /// Copies `bytes` to guest-virtual `virt`, mapping pages as needed.
    fn write(&mut self, virt: u64, bytes: &[u8]) -> Option<()> {
        let mut done = 0;
        while done < bytes.len() {
            let v = virt + done as u64;
            let phys = self.map(v)? + (v & (PAGE - 1));
            let n = ((PAGE - (v & (PAGE - 1))) as usize).min(bytes.len() - done);
            self.ram[phys as usize..phys as usize + n].copy_from_slice(&bytes[done..done + n]);
            done += n;
        }
        Some(())
    }

    /// Reads guest-virtual `virt` into `out`; None when a page is unmapped.
    pub fn read(&self, virt: u64, out: &mut [u8]) -> Option<()> {
        let mut done = 0;
        while done < out.len() {
            let v = virt.checked_add(done as u64)?;
            let phys = self.translate(v)? as usize;
            let n = ((PAGE - (v & (PAGE - 1))) as usize).min(out.len() - done);
            out[done..done + n].copy_from_slice(&self.ram[phys..phys + n]);
            done += n;
        }
        Some(())
    }
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Loads a static ELF64 x86-64 executable's PT_LOAD segments and builds
/// the initial stack (argc 1, argv[0] = `name`, no environment, empty
/// auxiliary vector); returns (entry, stack pointer).
pub fn load(mem: &mut GuestMem<'_>, elf: &[u8], name: &[u8]) -> Option<(u64, u64)> {
    // ELF header (System V gABI): magic, ELFCLASS64, ELFDATA2LSB, ET_EXEC,
    // EM_X86_64 (62).
    if elf.get(0..6)? != b"\x7fELF\x02\x01" || u16_at(elf, 16)? != 2 || u16_at(elf, 18)? != 62 {
        return None;
    }
    let entry = u64_at(elf, 24)?;
    let phoff = u64_at(elf, 32)? as usize;
    let phentsize = usize::from(u16_at(elf, 54)?);
    let phnum = usize::from(u16_at(elf, 56)?);
    for i in 0..phnum {
        let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
        if u32_at(elf, ph)? != 1 {
            continue; // not PT_LOAD
        }
        let offset = u64_at(elf, ph + 8)? as usize;
        let vaddr = u64_at(elf, ph + 16)?;
        let filesz = u64_at(elf, ph + 32)? as usize;
        let memsz = u64_at(elf, ph + 40)?;
        if memsz > RAM_SIZE {
            return None;
        }
        mem.write(vaddr, elf.get(offset..offset.checked_add(filesz)?)?)?;
        // .bss: the pages past the file's bytes are mapped zeroed.
        let mut page = (vaddr + filesz as u64) & !(PAGE - 1);
        while page < vaddr + memsz {
            mem.map(page)?;
            page += PAGE;
        }
    }
    let mut page = STACK_TOP - STACK_SIZE;
    while page < STACK_TOP {
        mem.map(page)?;
        page += PAGE;
    }
    let name_at = STACK_TOP - 256;
    let mut name_buf = [0u8; 255];
    let n = name.len().min(254);
    name_buf[..n].copy_from_slice(&name[..n]);
    mem.write(name_at, &name_buf)?;
    // argc, argv[0], NULL, envp NULL, AT_NULL (2 words): 16-aligned.
    let sp = name_at - 64;
    let words = [1u64, name_at, 0, 0, 0, 0];
    let mut bytes = [0u8; 48];
    for (i, w) in words.iter().enumerate() {
        bytes[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
    }
    mem.write(sp, &bytes)?;
    Some((entry, sp))
}

fn cache(selector: u16, flags: u32) -> KqemuSegmentCache {
    KqemuSegmentCache {
        selector,
        padding1: 0,
        flags,
        base: 0,
        limit: if flags == 0 { 0 } else { 0xffff_ffff },
        padding2: 0,
    }
}

/// The CPU state of a 64-bit process at CPL 3 under a long-mode guest OS
/// whose PML4 is at guest-physical 0.
pub fn initial_state(entry: u64, sp: u64) -> KqemuCpuState {
    let mut s = KqemuCpuState {
        eip: entry,
        eflags: RFLAGS_IF | RFLAGS_FIXED,
        cr0: GUEST_CR0,
        cr3: 0,
        cr4: GUEST_CR4,
        a20_mask: u64::MAX,
        efer: GUEST_EFER,
        cpl: 3,
        user_only: 1,
        ..KqemuCpuState::default()
    };
    s.regs[RSP] = sp;
    s.segs[seg::CS] = cache(GUEST_CS64, FLAGS_CODE64);
    s.segs[seg::SS] = cache(GUEST_DS, FLAGS_DATA);
    s.gdt.limit = 0x7f;
    s
}

/// Linux's signal for a guest exception vector (as the testbed's guest OS).
fn signal_of(vector: i32) -> i32 {
    match vector {
        0 | 16 | 19 => SIGFPE,
        1 | 3 => SIGTRAP,
        6 => SIGILL,
        17 => SIGBUS,
        _ => SIGSEGV,
    }
}

pub(crate) fn say<S: GuestSystem>(sys: &mut S, args: core::fmt::Arguments<'_>) {
    let mut line = Line::default();
    let _ = line.write_fmt(args);
    sys.write_fd(2, line.as_bytes());
}

/// An mmap(MAP_ANON|MAP_SHARED) region as a byte slice.
pub(crate) fn region<'a, S: GuestSystem>(sys: &mut S, len: u64) -> Option<(u64, &'a mut [u8])> {
    let addr = sys.mmap_shared_anon(len).ok()?;
    // SAFETY: a fresh private mapping of `len` readable, writable bytes
    // that this process never unmaps.
    Some((addr, unsafe {
        core::slice::from_raw_parts_mut(addr as *mut u8, len as usize)
    }))
}

/// Runs the program at `path` through /dev/kqemu; its exit status, or
/// 128 + signal, or [`STATUS_RUNNER_FAILED`] with a line on stderr.
pub fn run_guest<S: GuestSystem>(sys: &mut S, path: &CStr) -> i32 {
    match run(sys, path) {
        Ok(status) => status,
        Err(why) => {
            say(sys, format_args!("kqemu-run: {why}\n"));
            STATUS_RUNNER_FAILED
        }
    }
}

fn run<S: GuestSystem>(sys: &mut S, path: &CStr) -> Result<i32, &'static str> {
    let (_, program) = region(sys, MAX_PROGRAM as u64).ok_or("no memory for the program")?;
    let size = sys
        .read_file(path, program)
        .map_err(|_| "cannot read the guest program")?;
    let (ram_addr, ram) = region(sys, RAM_SIZE).ok_or("no memory for guest RAM")?;
    let mut mem = GuestMem::new(ram);
    let (entry, sp) = load(&mut mem, &program[..size], path.to_bytes())
        .ok_or("not a static ELF64 x86-64 program that fits")?;

    // The client's side of INIT: the dirty bytes (all dirty: this client
    // translates no code) and the three list pages.
    let (dirty_addr, dirty) = region(sys, RAM_SIZE / PAGE).ok_or("no memory")?;
    dirty.fill(0xff);
    let (lists, _) = region(sys, 3 * PAGE).ok_or("no memory")?;
    let fd = sys
        .open(c"/dev/kqemu", O_RDWR)
        .map_err(|_| "cannot open /dev/kqemu")?;
    let mut init = KqemuInit {
        ram_base: ram_addr,
        ram_size: RAM_SIZE,
        ram_dirty: dirty_addr,
        pages_to_flush: lists,
        ram_pages_to_update: lists + PAGE,
        modified_ram_pages: lists + 2 * PAGE,
    };
    sys.ioctl(fd, KQEMU_INIT, (&mut init as *mut KqemuInit).cast())
        .map_err(|_| "KQEMU_INIT failed")?;
    let mut phys = KqemuPhysMem {
        phys_addr: 0,
        size: RAM_SIZE,
        ram_addr: 0,
        io_index: KQEMU_IO_MEM_RAM,
        padding1: 0,
    };
    sys.ioctl(
        fd,
        KQEMU_SET_PHYS_MEM,
        (&mut phys as *mut KqemuPhysMem).cast(),
    )
    .map_err(|_| "KQEMU_SET_PHYS_MEM failed")?;

    let mut state = initial_state(entry, sp);
    let mut fpu = FxArea::initial();
    let mut execs = 0u64;
    let status = loop {
        execs += 1;
        if execs > MAX_EXECS {
            break Err("too many EXEC calls");
        }
        if sys.exec(fd, &mut state, &mut fpu).is_err() {
            break Err("KQEMU_EXEC failed");
        }
        match state.retval {
            KQEMU_RET_SYSCALL => {
                // The monitor stops before SYSCALL's own effects: RCX gets
                // the return address and R11 RFLAGS (SDM Vol. 2B SYSCALL).
                state.eip = state.next_eip;
                state.regs[RCX] = state.next_eip;
                state.regs[R11] = state.eflags;
                if let Some(status) = syscall(sys, &mem, &mut state) {
                    break Ok(status);
                }
            }
            KQEMU_RET_INTR => {}
            r if r & !0xff == KQEMU_RET_INT => {
                say(
                    sys,
                    format_args!("kqemu-run: guest int {:#x} at {:#x}\n", r & 0xff, state.eip),
                );
                break Ok(128 + SIGSEGV);
            }
            r if (KQEMU_RET_EXCEPTION..KQEMU_RET_EXCEPTION + 0x100).contains(&r) => {
                say(
                    sys,
                    format_args!(
                        "kqemu-run: guest exception {r} (error {:#x}, cr2 {:#x}) at {:#x}\n",
                        state.error_code, state.cr2, state.eip
                    ),
                );
                break Ok(128 + signal_of(r));
            }
            r => {
                say(
                    sys,
                    format_args!("kqemu-run: EXEC retval {r:#x} at {:#x}\n", state.eip),
                );
                break Err("the monitor handed over what this client cannot emulate");
            }
        }
    };
    let _ = sys.close(fd);
    say(sys, format_args!("kqemu-run: {execs} EXEC calls\n"));
    status
}

/// Serves a Linux system call of the guest; Some(status) when it exited.
fn syscall<S: GuestSystem>(sys: &mut S, mem: &GuestMem<'_>, s: &mut KqemuCpuState) -> Option<i32> {
    let r = &mut s.regs;
    let result = match r[RAX] {
        NR_WRITE if r[RDI] == 1 || r[RDI] == 2 => {
            let mut buf = [0u8; 512];
            let (fd, mut addr, mut left) = (r[RDI] as i32, r[RSI], r[RDX]);
            let mut ok = true;
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                if mem.read(addr, &mut buf[..n]).is_none() {
                    ok = false;
                    break;
                }
                sys.write_fd(fd, &buf[..n]);
                addr += n as u64;
                left -= n as u64;
            }
            if ok {
                r[RDX]
            } else {
                EFAULT.wrapping_neg()
            }
        }
        NR_GETPID => 1,
        NR_EXIT | NR_EXIT_GROUP => return Some((r[RDI] & 0xff) as i32),
        _ => ENOSYS.wrapping_neg(),
    };
    r[RAX] = result;
    None
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec;

    /// A minimal ELF64 executable: one PT_LOAD of `code` at 0x401000.
    fn elf(code: &[u8]) -> std::vec::Vec<u8> {
        let mut e = vec![0u8; 0x78];
        e[0..6].copy_from_slice(b"\x7fELF\x02\x01");
        e[16..18].copy_from_slice(&2u16.to_le_bytes());
        e[18..20].copy_from_slice(&62u16.to_le_bytes());
        e[24..32].copy_from_slice(&0x401000u64.to_le_bytes());
        e[32..40].copy_from_slice(&0x40u64.to_le_bytes());
        e[54..56].copy_from_slice(&56u16.to_le_bytes());
        e[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = 0x40;
        e[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
        e[ph + 8..ph + 16].copy_from_slice(&0x78u64.to_le_bytes());
        e[ph + 16..ph + 24].copy_from_slice(&0x401000u64.to_le_bytes());
        e[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
        e[ph + 40..ph + 48].copy_from_slice(&0x3000u64.to_le_bytes());
        e.extend_from_slice(code);
        e
    }

    #[test]
    fn loads_segments_and_stack() {
        let mut ram = vec![0u8; RAM_SIZE as usize];
        let mut mem = GuestMem::new(&mut ram);
        let code = [0xb8, 0x3c, 0, 0, 0, 0x0f, 0x05];
        let (entry, sp) = load(&mut mem, &elf(&code), b"/exit42").expect("loads");
        assert_eq!(entry, 0x401000);
        let mut got = [0u8; 7];
        mem.read(0x401000, &mut got).expect("code mapped");
        assert_eq!(got, code);
        // .bss pages mapped, beyond not.
        assert!(mem.translate(0x403fff).is_some());
        assert!(mem.translate(0x404000).is_none());
        let mut argc = [0u8; 8];
        mem.read(sp, &mut argc).expect("stack mapped");
        assert_eq!(u64::from_le_bytes(argc), 1);
        assert_eq!(sp % 16, 0);
        let mut argv0 = [0u8; 8];
        mem.read(sp + 8, &mut argv0).expect("argv");
        let mut name = [0u8; 7];
        mem.read(u64::from_le_bytes(argv0), &mut name)
            .expect("name");
        assert_eq!(&name, b"/exit42");
    }

    #[test]
    fn refuses_non_elf() {
        let mut ram = vec![0u8; RAM_SIZE as usize];
        let mut mem = GuestMem::new(&mut ram);
        assert!(load(&mut mem, b"#!/bin/sh\n", b"x").is_none());
    }

    #[test]
    fn state_is_long_mode_cpl3() {
        let s = initial_state(0x401000, 0x7fff_0000);
        assert_eq!(s.segs[seg::CS].selector & 3, 3);
        assert_eq!(s.efer & (1 << 10), 1 << 10);
        assert_eq!(s.regs[RSP], 0x7fff_0000);
        assert_eq!(s.cpl, 3);
    }
}
