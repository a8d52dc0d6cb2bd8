//! The EXEC state fuzzer (`run --mode monitor --exec-fuzz N[,SEED]`;
//! issue 6, validation: a hostile state gets an answer for the client,
//! never a host fault, a hang or a changed host).
//!
//! Monitor mode runs the program as usual and keeps a few of the states
//! the client core passes to EXEC ([`keep_sample`]). Then, with the
//! process still alive (its page tables and code in guest RAM), it stops
//! the program and makes N EXEC calls on copies of those states, each
//! changed by 1 to 3 deterministic mutations (seeded xorshift): segment
//! selectors, bases, limits and flag bits, EFLAGS bits, CPL, CR0/CR3/CR4/
//! EFER bits, RIP/RSP and bases at the canonical and 4 GiB edges, the
//! descriptor-table caches (also an LDT on the guest's code, stack or GDT
//! page with a segment register selecting from it), debug registers,
//! `user_only`, `a20_mask`, the three counts beyond their maxima, `retval`
//! garbage, any byte; and one call in eight with garbage in an entry of
//! the guest's page-table walk of RIP or RSP (outside RAM, reserved bits, a huge
//! page at an odd address, a table pointing at itself), restored after the
//! call. One call in four starts from the state the previous call gave
//! back instead of a sample (so a run repeats exactly only as far as the
//! timer's INTR exits fall alike; a failure prints the whole state sent).
//!
//! After every call: it returned (a hang is the runner's timeout), the
//! result is Ok or an errno of the ABI, `retval` is one of the ABI's
//! values, a state `validate_normal_mode` refuses comes back as sent
//! (SOFTMMU, counts consumed), and this kernel's GDTR, IDTR, TR, CR0, CR3, CR4, EFER, FS/GS/
//! kernel GS bases, DR6, DR7, system-call MSRs, XCR0 and RFLAGS TF, IF,
//! DF, IOPL, NT, AC are what they were before it. Any break fails the run
//! with the call number, the seed and the state.

use crate::channel::Channel;
use crate::mem::phys_to_virt;
use crate::monitor::{ioctl, TestbedHost};
use crate::native::NativeError;
use crate::{log, x86};
use alloc::rc::Rc;
use alloc::vec::Vec;
use core::arch::asm;
use core::cell::RefCell;
use core::convert::Infallible;
use kqemu::abi::{
    KqemuCpuState, KQEMU_EXEC, KQEMU_FLUSH_ALL, KQEMU_RET_ABORT, KQEMU_RET_INT, KQEMU_RET_INTR,
    KQEMU_RET_SOFTMMU, KQEMU_RET_SYSCALL,
};
use kqemu::device::OpenFile;
use kqemu::error::Error;
use kqemu::monitor::mmu::CpuPaging;
use kqemu::monitor::mutate::{mutate, Rng};
use kqemu::monitor::validate::validate_normal_mode;
use kqemu_client::PagingFormat;

/// States kept from the program's run: its first EXECs and those at
/// powers of two after them.
pub const SAMPLES: usize = 8;
/// IA32_KERNEL_GS_BASE (SDM Vol. 4 table 2-2).
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
/// IA32_SYSENTER_CS/ESP/EIP (SDM Vol. 4 table 2-2).
const MSR_SYSENTER_CS: u32 = 0x174;
const MSR_SYSENTER_ESP: u32 = 0x175;
const MSR_SYSENTER_EIP: u32 = 0x176;
/// The RFLAGS bits compared before and after each call.
const HOST_RFLAGS: u64 = x86::RFLAGS_TF
    | x86::RFLAGS_IF
    | x86::RFLAGS_DF
    | x86::RFLAGS_IOPL
    | x86::RFLAGS_NT
    | x86::RFLAGS_AC;
/// Exception vectors are 0..31 (SDM Vol. 3A 6.3.1).
const EXCEPTION_VECTORS: usize = 32;
/// One call in this many starts from the state the previous call gave
/// back rather than from a sample.
const CHAINED_ONE_IN: u64 = 4;
/// One call in this many also puts garbage in a guest page-table entry.
const PAGE_TABLE_ONE_IN: u64 = 8;
const PAGE_SIZE: u64 = 4096;
/// Page-table entry bits (SDM Vol. 3A 4.3-4.5).
const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PTE_HUGE: u64 = 1 << 7;
const PTE_NX: u64 = 1 << 63;
const PTE_ADDR_64: u64 = 0x000f_ffff_ffff_f000;
const PTE_ADDR_32: u64 = 0xffff_f000;
/// PAE CR3 holds a 32-byte aligned PDPT address.
const CR3_PAE_ADDR: u64 = 0xffff_ffe0;

/// Keeps `state` if it is one of the samples (`execs` EXECs so far).
pub fn keep_sample(samples: &mut Vec<KqemuCpuState>, execs: u64, state: &KqemuCpuState) {
    if samples.len() < SAMPLES && (execs < 4 || execs.is_power_of_two()) {
        samples.push(*state);
    }
}

/// This kernel's state the world switch must give back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct HostState {
    gdtr: (u16, u64),
    idtr: (u16, u64),
    tr: u16,
    cr0: u64,
    cr3: u64,
    cr4: u64,
    efer: u64,
    fs_base: u64,
    gs_base: u64,
    kernel_gs_base: u64,
    dr6: u64,
    dr7: u64,
    /// The system-call MSRs: STAR, LSTAR, CSTAR, FMASK, SYSENTER_CS/ESP/EIP.
    syscall_msrs: [u64; 7],
    xcr0: u64,
    /// RFLAGS bits the host's code relies on: TF, IF, DF, IOPL, NT, AC
    /// (AC set would open user pages to SMAP-protected kernel accesses).
    rflags: u64,
}

/// XCR0.
fn xgetbv0() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: XGETBV of XCR0 with CR4.OSXSAVE set (checked by the caller)
    // only reads.
    unsafe {
        asm!("xgetbv", in("ecx") 0, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    u64::from(hi) << 32 | u64::from(lo)
}

fn host_state() -> HostState {
    let mut gdtr = [0u8; 10];
    let mut idtr = [0u8; 10];
    let (tr, dr6, dr7, rflags): (u16, u64, u64, u64);
    // SAFETY: SGDT/SIDT store 10 bytes into the buffers; STR, reads of
    // DR6/DR7 and PUSHFQ/POP have no side effect.
    unsafe {
        asm!(
            "sgdt [{g}]", "sidt [{i}]", "str {tr:x}", "mov {d6}, dr6", "mov {d7}, dr7",
            "pushfq", "pop {fl}",
            g = in(reg) gdtr.as_mut_ptr(), i = in(reg) idtr.as_mut_ptr(), tr = out(reg) tr,
            d6 = out(reg) dr6, d7 = out(reg) dr7, fl = out(reg) rflags,
        )
    };
    let table = |b: &[u8; 10]| {
        let mut base = [0u8; 8];
        base.copy_from_slice(&b[2..]);
        (u16::from_le_bytes([b[0], b[1]]), u64::from_le_bytes(base))
    };
    HostState {
        gdtr: table(&gdtr),
        idtr: table(&idtr),
        tr,
        cr0: x86::read_cr0(),
        cr3: x86::read_cr3(),
        cr4: x86::read_cr4(),
        efer: x86::rdmsr(x86::MSR_EFER),
        fs_base: x86::rdmsr(x86::MSR_FS_BASE),
        gs_base: x86::rdmsr(x86::MSR_GS_BASE),
        kernel_gs_base: x86::rdmsr(MSR_KERNEL_GS_BASE),
        dr6,
        dr7,
        syscall_msrs: [
            x86::MSR_STAR,
            x86::MSR_LSTAR,
            x86::MSR_CSTAR,
            x86::MSR_FMASK,
            MSR_SYSENTER_CS,
            MSR_SYSENTER_ESP,
            MSR_SYSENTER_EIP,
        ]
        .map(x86::rdmsr),
        xcr0: if x86::read_cr4() & x86::CR4_OSXSAVE != 0 {
            xgetbv0()
        } else {
            0
        },
        rflags: rflags & HOST_RFLAGS,
    }
}

/// Calls and answers.
#[derive(Default)]
struct Histogram {
    exceptions: [u64; EXCEPTION_VECTORS],
    ints: u64,
    softmmu: u64,
    intr: u64,
    syscall: u64,
    abort: u64,
    errors: [u64; 8],
}

/// Whether `retval` is one of the ABI's answers (ABI.md "Constants"),
/// counted.
fn count_retval(h: &mut Histogram, retval: i32) -> bool {
    match retval {
        KQEMU_RET_ABORT => h.abort += 1,
        KQEMU_RET_SOFTMMU => h.softmmu += 1,
        KQEMU_RET_INTR => h.intr += 1,
        KQEMU_RET_SYSCALL => h.syscall += 1,
        r if (KQEMU_RET_INT..KQEMU_RET_INT + 0x100).contains(&r) => h.ints += 1,
        r if (0..EXCEPTION_VECTORS as i32).contains(&r) => h.exceptions[r as usize] += 1,
        _ => return false,
    }
    true
}

fn error_index(e: Error) -> usize {
    match e {
        Error::Io => 0,
        Error::InvalidArgument => 1,
        Error::Fault => 2,
        Error::NoMemory => 3,
        Error::NoSpace => 4,
        Error::Busy => 5,
        Error::NotTty => 6,
        Error::Permission => 7,
    }
}

const ERROR_NAMES: [&str; 8] = [
    "EIO", "EINVAL", "EFAULT", "ENOMEM", "ENOSPC", "EBUSY", "ENOTTY", "EPERM",
];

/// Guest RAM as this kernel reaches it (guest-physical = offset).
struct Ram {
    phys: u64,
    size: u64,
}

impl Ram {
    fn read(&self, gpa: u64, wide: bool) -> Option<u64> {
        let len = if wide { 8 } else { 4 };
        if gpa.checked_add(len)? > self.size || !gpa.is_multiple_of(len) {
            return None;
        }
        let at = phys_to_virt(self.phys + gpa);
        // SAFETY: inside the guest-RAM region, which the DMAP maps and
        // which nothing else touches while the fuzzer runs; aligned.
        Some(unsafe {
            if wide {
                core::ptr::read_volatile(at as *const u64)
            } else {
                u64::from(core::ptr::read_volatile(at as *const u32))
            }
        })
    }

    fn write(&self, gpa: u64, wide: bool, value: u64) {
        if self.read(gpa, wide).is_none() {
            return;
        }
        let at = phys_to_virt(self.phys + gpa);
        // SAFETY: as in `read` (the same bounds were just checked).
        unsafe {
            if wide {
                core::ptr::write_volatile(at as *mut u64, value)
            } else {
                core::ptr::write_volatile(at as *mut u32, value as u32)
            }
        }
    }
}

/// The entries (guest-physical address of each) of the walk of `linear`
/// from `cr3` in `format`, as far as they are present.
fn walk(ram: &Ram, format: PagingFormat, cr3: u64, linear: u64) -> Vec<u64> {
    let (shifts, wide, mask, mut table): (&[u32], bool, u64, u64) = match format {
        PagingFormat::Long4 => (&[39, 30, 21, 12], true, PTE_ADDR_64, cr3 & PTE_ADDR_64),
        PagingFormat::Pae => (&[30, 21, 12], true, PTE_ADDR_64, cr3 & CR3_PAE_ADDR),
        PagingFormat::Legacy32 => (&[22, 12], false, PTE_ADDR_32, cr3 & PTE_ADDR_32),
    };
    let size = if wide { 8 } else { 4 };
    let mut entries = Vec::new();
    for (level, &shift) in shifts.iter().enumerate() {
        let index_bits = if format == PagingFormat::Pae && level == 0 {
            3
        } else if wide {
            511
        } else {
            1023
        };
        let at = table + ((linear >> shift) & index_bits) * size;
        let Some(entry) = ram.read(at, wide) else {
            break;
        };
        entries.push(at);
        if entry & PTE_PRESENT == 0 || (level > 0 && entry & PTE_HUGE != 0) {
            break;
        }
        table = entry & mask;
    }
    entries
}

/// A hostile value for the entry `old` at `at` in a table of guest RAM of
/// `ram_size` bytes.
fn bad_entry(rng: &mut Rng, old: u64, at: u64, ram_size: u64, wide: bool) -> u64 {
    let flags = old & 0xfff | PTE_PRESENT | PTE_USER | PTE_WRITABLE;
    let mask = if wide { PTE_ADDR_64 } else { PTE_ADDR_32 };
    match rng.below(6) {
        // Beyond the end of RAM, up to the top of the format.
        0 => (ram_size + rng.below(64) * PAGE_SIZE) & mask | flags,
        1 => mask | flags,
        // Reserved bits: above MAXPHYADDR, NX without EFER.NXE, PAT/PS bits
        // of a huge page's low address bits.
        2 if wide => old | rng.pick(&[1 << 51, 1 << 45, PTE_NX, 1 << 13 | PTE_HUGE]),
        2 => old | rng.pick(&[1 << 13, 1 << 21]) | PTE_HUGE,
        // A huge page at an address that is not a multiple of its size.
        3 => ((old & mask) + PAGE_SIZE) | flags | PTE_HUGE,
        // The table points at itself.
        4 => at & !(PAGE_SIZE - 1) | flags,
        _ => rng.next_u64(),
    }
}

/// What the monitor of this CPU checks paging against (CPUID 80000008H
/// MAXPHYADDR, 80000001H EDX bit 26 1 GiB pages), as exec.rs reads it.
fn cpu_paging() -> CpuPaging {
    let max_ext = x86::cpuid(0x8000_0000, 0).eax;
    let bits = if max_ext >= 0x8000_0008 {
        (x86::cpuid(0x8000_0008, 0).eax & 0xff) as u8
    } else {
        36
    };
    CpuPaging {
        max_phys_addr_bits: bits,
        gib_pages: max_ext >= 0x8000_0001 && x86::cpuid(0x8000_0001, 0).edx & 1 << 26 != 0,
    }
}

/// The answer to a state validation refuses: SOFTMMU, the three counts
/// consumed, no error code, every other field as sent (ABI.md: the client
/// copies them back and emulates from them).
fn refused_answer(sent: &KqemuCpuState) -> KqemuCpuState {
    KqemuCpuState {
        retval: KQEMU_RET_SOFTMMU,
        error_code: 0,
        nb_pages_to_flush: 0,
        nb_ram_pages_to_update: 0,
        nb_modified_ram_pages: 0,
        ..*sent
    }
}

pub struct Plan {
    pub calls: u64,
    pub seed: u64,
}

/// Makes the plan's calls on mutated copies of `samples`, checks each, and
/// ends the run (status 0) with the summary line.
pub fn run(
    plan: &Plan,
    file: &OpenFile<TestbedHost>,
    ram: (u64, usize),
    format: PagingFormat,
    samples: &[KqemuCpuState],
    lists: &mut [&'static mut [u8]; 3],
    channel: &Rc<RefCell<Channel>>,
) -> Result<Infallible, NativeError> {
    if samples.is_empty() {
        crate::fail(format_args!(
            "exec-fuzz: the program made no EXEC to start from"
        ));
    }
    let ram = Ram {
        phys: ram.0,
        size: ram.1 as u64,
    };
    let mut rng = Rng::seeded(plan.seed);
    // The client's lists: valid page addresses and garbage, for the counts
    // the mutations set.
    for list in lists.iter_mut() {
        for entry in list.chunks_exact_mut(8) {
            let value = match rng.below(3) {
                0 => rng.below(ram.size / PAGE_SIZE) * PAGE_SIZE,
                1 => rng.address(0),
                _ => rng.next_u64(),
            };
            entry.copy_from_slice(&value.to_le_bytes());
        }
    }
    let wide = format != PagingFormat::Legacy32;
    let mut h = Histogram::default();
    let mut page_table_changes = 0u64;
    let mut refused = 0u64;
    let cpu = cpu_paging();
    // The state the last call gave back: the next one may start from it
    // (the module must trust nothing it wrote there itself).
    let mut last: Option<KqemuCpuState> = None;
    for call in 0..plan.calls {
        let base = match last {
            Some(state) if rng.below(CHAINED_ONE_IN) == 0 => state,
            _ => samples[rng.below(samples.len() as u64) as usize],
        };
        let mut state = base;
        // Flush whatever an earlier page-table change left in the monitor's
        // caches, unless a mutation says otherwise.
        state.nb_pages_to_flush = KQEMU_FLUSH_ALL;
        for _ in 0..=rng.below(3) {
            mutate(&mut rng, &mut state);
        }
        let changed = if rng.below(PAGE_TABLE_ONE_IN) == 0 {
            let linear = rng.pick(&[base.eip, base.regs[4]]);
            let entries = walk(&ram, format, base.cr3, linear);
            let pick = entries.get(rng.below(entries.len().max(1) as u64) as usize);
            pick.and_then(|&at| {
                let old = ram.read(at, wide)?;
                let bad = bad_entry(&mut rng, old, at, ram.size, wide);
                ram.write(at, wide, bad);
                page_table_changes += 1;
                Some((at, old, bad))
            })
        } else {
            None
        };
        let sent = state;
        let before = host_state();
        let done = ioctl(file, KQEMU_EXEC, &mut state);
        let after = host_state();
        if let Some((at, old, _)) = changed {
            ram.write(at, wide, old);
        }
        if after != before {
            crate::fail(format_args!(
                "exec-fuzz call {call} (seed {:#x}): host state changed by EXEC ({done:?}, retval {:#x}): before {before:x?}, after {after:x?}; page-table change {changed:x?}; state sent {sent:x?}",
                plan.seed, state.retval
            ));
        }
        match done {
            Ok(()) => {
                last = Some(state);
                if !count_retval(&mut h, state.retval) {
                    crate::fail(format_args!(
                        "exec-fuzz call {call} (seed {:#x}): retval {:#x} is none of the ABI's; page-table change {changed:x?}; state sent {sent:x?}",
                        plan.seed, state.retval
                    ));
                }
                if validate_normal_mode(&sent, cpu).is_err() {
                    refused += 1;
                    if state != refused_answer(&sent) {
                        crate::fail(format_args!(
                            "exec-fuzz call {call} (seed {:#x}): a state validation refuses came back changed (the client would emulate from it): sent {sent:x?}, got {state:x?}",
                            plan.seed
                        ));
                    }
                }
            }
            Err(e) => h.errors[error_index(e)] += 1,
        }
    }
    let mut exceptions = alloc::string::String::new();
    for (vector, &n) in h.exceptions.iter().enumerate().filter(|(_, &n)| n > 0) {
        exceptions.push_str(&alloc::format!(" #{vector}:{n}"));
    }
    let mut errors = alloc::string::String::new();
    for (name, &n) in ERROR_NAMES.iter().zip(&h.errors).filter(|(_, &n)| n > 0) {
        errors.push_str(&alloc::format!(" {name}:{n}"));
    }
    log!(
        "testbed: exec-fuzz: {} calls, seed {:#x}, {} samples, {page_table_changes} page-table changes, {refused} refused by validation and given back unchanged; retval softmmu {} intr {} syscall {} int {} abort {} exception{exceptions}; errno{errors}; host state unchanged after every call",
        plan.calls,
        plan.seed,
        samples.len(),
        h.softmmu,
        h.intr,
        h.syscall,
        h.ints,
        h.abort,
    );
    channel
        .borrow()
        .result(0, 0)
        .map_err(|_| NativeError::Channel)?;
    crate::exit::completed()
}
