//! The NMI storm (`nmi=HZ` on the kernel command line, `run --nmi-storm
//! HZ`): NMIs arrive asynchronously at HZ per second while guests run, so
//! that some land in guest mode and inside the world switch's windows with
//! interrupts disabled (src/monitor/switch.S), and the host NMI handler
//! here counts where they landed.
//!
//! Source: PIT channel 0 as a rate generator; its output is ISA IRQ 0,
//! which reaches I/O APIC pin 2 (the usual interrupt source override;
//! QEMU wires it so on every machine, microvm included), and that pin's
//! redirection entry delivers it as an NMI to this CPU. The LAPIC timer
//! stays the kernel's periodic interrupt (timer.rs).
//!
//! The handler behaves as FreeBSD's (amd64 exception.S, `nmi_calltrap`):
//! it runs on an IST stack and takes its per-CPU pointer from the word
//! right above the hardware frame, where the TSS's IST pointer points
//! (`struct nmi_pcpu`, amd64 machdep.c). The monitor's IST stacks carry the
//! host's GS base there for that reason; an NMI taken on one of them from
//! ring 0 (the host IDT met the monitor TSS) must find it equal to the GS
//! base loaded, or FreeBSD would run on a wrong pcpu: the run fails.

use crate::mem::phys_to_virt;
use crate::trap::TrapFrame;
use crate::x86::{self, outb};
use core::mem::size_of;
use core::sync::atomic::{AtomicU64, Ordering};

/// i8254 (Intel 8254 data sheet): input clock, channel 0, command port;
/// channel 0, lobyte/hibyte access, mode 2 (rate generator), binary.
const PIT_HZ: u64 = 1_193_182;
const PIT_CHANNEL0: u16 = 0x40;
const PIT_COMMAND: u16 = 0x43;
const PIT_CH0_RATE_GENERATOR: u8 = 0x34;
/// Mode 2 needs a count of at least 2; the counter is 16 bits.
const PIT_MIN_COUNT: u64 = 2;
const PIT_MAX_COUNT: u64 = 0xffff;

/// I/O APIC (82093AA data sheet): its default address, the index and data
/// registers, the redirection table's first register (two per pin), and
/// the pin ISA IRQ 0 reaches.
const IOAPIC_BASE: u64 = 0xfec0_0000;
const IOAPIC_REGSEL: u64 = 0x00;
const IOAPIC_WINDOW: u64 = 0x10;
const IOAPIC_REDIRECTION: u32 = 0x10;
const IOAPIC_PIN_PIT: u32 = 2;
/// Redirection entry: delivery mode NMI (bits 10:8 = 100b; the vector is
/// ignored), physical destination, active high, edge triggered (an NMI
/// must be edge triggered), not masked; destination APIC ID in bits 63:56.
const REDIRECTION_NMI: u32 = 0b100 << 8;
const REDIRECTION_MASKED: u32 = 1 << 16;
const REDIRECTION_DESTINATION_SHIFT: u32 = 24;

/// LAPIC ID register (SDM Vol. 3A Table 11-1): the ID in bits 31:24.
const LAPIC_ID: u64 = 0x20;
const APIC_BASE_MASK: u64 = 0xf_ffff_f000;

/// `int $2` (opcode CD ib): the bytes before the RIP of the frame when the
/// monitor handed an NMI over by software.
const INT_2: [u8; 2] = [0xcd, 0x02];
const PAGE_MASK: u64 = 0xfff;
/// Where the TSS keeps IST1, the NMI's stack pointer (SDM Vol. 3A Figure
/// 7-11), and the bytes its top gives up for the per-CPU word (16 to keep
/// the stack 16-byte aligned, as FreeBSD's `struct nmi_pcpu`).
const TSS_IST1: u64 = 36;
const NMI_PCPU_BYTES: u64 = 16;

/// Storm rate (0: no storm, an NMI is a fatal trap), and this kernel's
/// IST1 pointers: the one the storm sets (the per-CPU word's address), and
/// the stack's top, where cpu.rs points IST1 when it loads its tables
/// again (the FreeBSD personality's GDT).
static HZ: AtomicU64 = AtomicU64::new(0);
static OWN_IST1: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

/// The per-CPU pointer this kernel gives FreeBSD-style handlers while no
/// personality set one of its own: any non-zero address it owns.
static PCPU_MARKER: u64 = 0;

/// Counts of the host handler.
static TOTAL: AtomicU64 = AtomicU64::new(0);
static FROM_RING3: AtomicU64 = AtomicU64::new(0);
static HANDED_OVER: AtomicU64 = AtomicU64::new(0);
static IN_SWITCH: AtomicU64 = AtomicU64::new(0);
static MONITOR_STACK: AtomicU64 = AtomicU64::new(0);

extern "C" {
    /// The world switch's text (src/monitor/switch.S): its pages hold
    /// nothing else.
    static kqemu_switch_text_start: u8;
    static kqemu_switch_text_end: u8;
}

fn ioapic_write(register: u32, value: u32) {
    let base = phys_to_virt(IOAPIC_BASE);
    // SAFETY: the I/O APIC's registers, mapped uncached by the DMAP (which
    // covers the 32-bit physical space); index, then data.
    unsafe {
        ((base + IOAPIC_REGSEL) as *mut u32).write_volatile(register);
        ((base + IOAPIC_WINDOW) as *mut u32).write_volatile(value);
    }
}

/// Address of the loaded TSS (STR, SGDT, and its 16-byte descriptor).
fn loaded_tss() -> u64 {
    let mut gdtr = [0u8; 10];
    let tr: u16;
    // SAFETY: SGDT stores 10 bytes into `gdtr`; STR reads TR.
    unsafe {
        core::arch::asm!("sgdt [{}]", in(reg) gdtr.as_mut_ptr(), options(nostack));
        core::arch::asm!("str {0:x}", out(reg) tr, options(nomem, nostack));
    }
    let mut base = [0u8; 8];
    base.copy_from_slice(&gdtr[2..]);
    let descriptor = u64::from_le_bytes(base) + u64::from(tr & !7);
    // SAFETY: TR names a present 16-byte TSS descriptor of the loaded GDT.
    let (low, high) = unsafe {
        (
            (descriptor as *const u64).read_volatile(),
            ((descriptor + 8) as *const u64).read_volatile(),
        )
    };
    (low >> 16 & 0xff_ffff) | (low >> 56 & 0xff) << 24 | high << 32
}

/// Starts the storm at `hz` NMIs per second (PIT channel 0 is free: the
/// clock's calibration is over). Call with interrupts disabled.
pub fn start(hz: u64) {
    // FreeBSD's layout on this kernel's NMI stack: IST1 points at the
    // per-CPU word, the CPU pushes below it.
    let ist1 = loaded_tss() + TSS_IST1;
    // SAFETY: IST1 of the loaded TSS (4-byte aligned: the 64-bit TSS packs
    // its fields so) and the top 16 bytes of the stack it names, which the
    // CPU has never pushed into (an NMI before the storm is fatal).
    let top = unsafe {
        let top = (ist1 as *const u64).read_unaligned();
        let pcpu = top - NMI_PCPU_BYTES;
        (ist1 as *mut u64).write_unaligned(pcpu);
        (pcpu as *mut u64).write_volatile(own_pcpu());
        top
    };
    OWN_IST1[0].store(top - NMI_PCPU_BYTES, Ordering::Relaxed);
    OWN_IST1[1].store(top, Ordering::Relaxed);
    HZ.store(hz, Ordering::Relaxed);

    let count = (PIT_HZ / hz.max(1)).clamp(PIT_MIN_COUNT, PIT_MAX_COUNT);
    outb(PIT_COMMAND, PIT_CH0_RATE_GENERATOR);
    outb(PIT_CHANNEL0, count as u8);
    outb(PIT_CHANNEL0, (count >> 8) as u8);

    let lapic = phys_to_virt(x86::rdmsr(x86::MSR_APIC_BASE) & APIC_BASE_MASK);
    // SAFETY: the LAPIC page through the uncached DMAP.
    let apic_id = unsafe { ((lapic + LAPIC_ID) as *const u32).read_volatile() } >> 24;
    let entry = IOAPIC_REDIRECTION + 2 * IOAPIC_PIN_PIT;
    ioapic_write(entry, REDIRECTION_MASKED);
    ioapic_write(entry + 1, apic_id << REDIRECTION_DESTINATION_SHIFT);
    ioapic_write(entry, REDIRECTION_NMI);
    crate::log!(
        "testbed: nmi storm: {hz} Hz (PIT count {count}) through I/O APIC pin {IOAPIC_PIN_PIT} to APIC {apic_id}"
    );
}

/// This kernel's per-CPU pointer for FreeBSD-style handlers: the GS base
/// (the FreeBSD personality sets it to its pcpu), else [`PCPU_MARKER`],
/// which then becomes the GS base the monitor sees as the host's.
fn own_pcpu() -> u64 {
    let gs = x86::rdmsr(x86::MSR_GS_BASE);
    if gs != 0 {
        return gs;
    }
    let marker = (&raw const PCPU_MARKER) as u64;
    // SAFETY: this kernel's code uses no GS-relative data; a ring-3
    // program gets its own GS base when it runs.
    unsafe { x86::wrmsr(x86::MSR_GS_BASE, marker) };
    marker
}

/// The host NMI handler (trap.rs, on IST1). `pcpu` is the word right
/// above the hardware frame. False when no storm runs: the caller fails
/// the run then.
pub fn host_nmi(frame: &TrapFrame, pcpu: u64) -> bool {
    if HZ.load(Ordering::Relaxed) == 0 {
        return false;
    }
    TOTAL.fetch_add(1, Ordering::Relaxed);
    if frame.cs & 3 != 0 {
        FROM_RING3.fetch_add(1, Ordering::Relaxed);
        return true;
    }
    // The CPU starts every NMI at the IST pointer: on this kernel's stack
    // the frame ends at one of its IST1 pointers.
    let end = frame as *const TrapFrame as u64 + size_of::<TrapFrame>() as u64;
    if !OWN_IST1.iter().any(|p| p.load(Ordering::Relaxed) == end) {
        // The host IDT met the monitor TSS: FreeBSD's handler would load
        // its pcpu from this word.
        MONITOR_STACK.fetch_add(1, Ordering::Relaxed);
        let gs = x86::rdmsr(x86::MSR_GS_BASE);
        if pcpu != gs {
            crate::fail(format_args!(
                "NMI on a monitor IST stack at rip {:#x}: per-CPU word {pcpu:#x}, GS base {gs:#x}",
                frame.rip
            ));
        }
    }
    // The bytes before RIP only on RIP's own page (the page before it may
    // not be mapped: the module's first instruction): the monitor's
    // `int $2; ret` entries are 4-byte aligned, none crosses a page.
    if frame.rip & PAGE_MASK >= INT_2.len() as u64 {
        // SAFETY: the RIP of a ring-0 frame is in this kernel's text or the
        // loaded module's, mapped and readable, and so is its page.
        let before = unsafe { (frame.rip.wrapping_sub(2) as *const [u8; 2]).read_unaligned() };
        if before == INT_2 {
            HANDED_OVER.fetch_add(1, Ordering::Relaxed);
        }
    }
    let switch =
        (&raw const kqemu_switch_text_start) as u64..(&raw const kqemu_switch_text_end) as u64;
    if switch.contains(&frame.rip) {
        IN_SWITCH.fetch_add(1, Ordering::Relaxed);
    }
    true
}

/// Logs where the storm's NMIs landed (the suite reads this line).
pub fn report() {
    let hz = HZ.load(Ordering::Relaxed);
    if hz == 0 {
        return;
    }
    let entry = IOAPIC_REDIRECTION + 2 * IOAPIC_PIN_PIT;
    ioapic_write(entry, REDIRECTION_MASKED);
    let monitor = kqemu::monitor::switch::nmi_counts();
    crate::log!(
        "testbed: nmi storm: host handler {} (ring 3 {}, handed over {}, in switch {}, monitor stack {}); monitor IDT: guest {} entry {} exit {}",
        TOTAL.load(Ordering::Relaxed),
        FROM_RING3.load(Ordering::Relaxed),
        HANDED_OVER.load(Ordering::Relaxed),
        IN_SWITCH.load(Ordering::Relaxed),
        MONITOR_STACK.load(Ordering::Relaxed),
        monitor.guest,
        monitor.entry,
        monitor.exit,
    );
}
