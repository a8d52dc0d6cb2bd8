//! Time: the TSC (calibrated against PIT channel 0) and the LAPIC timer,
//! which interrupts ring 3 periodically so a guest that never traps still
//! gives the CPU back.
//!
//! microvm has no port 0x61, so PIT channel 2 cannot be gated: channel 0
//! runs in mode 0 and is read back with latch commands (TESTBED.md).

use crate::mem::phys_to_virt;
use crate::x86::{self, inb, outb, rdtsc};

/// i8254: input clock and ports (Intel 8254 data sheet).
const PIT_HZ: u64 = 1_193_182;
const PIT_CHANNEL0: u16 = 0x40;
const PIT_COMMAND: u16 = 0x43;
/// Channel 0, lobyte/hibyte access, mode 0 (interrupt on terminal count).
const PIT_CH0_MODE0: u8 = 0x30;
/// Channel 0 counter latch command.
const PIT_CH0_LATCH: u8 = 0x00;
/// Calibrate over 10 ms of PIT ticks.
const CALIBRATION_TICKS: u64 = PIT_HZ / 100;
const CALIBRATION_POLL_LIMIT: u32 = 20_000_000;

/// 8259A PICs: remapped away from the exception vectors, then fully
/// masked; the testbed uses the LAPIC only.
const PIC1_COMMAND: u16 = 0x20;
const PIC1_DATA: u16 = 0x21;
const PIC2_COMMAND: u16 = 0xa0;
const PIC2_DATA: u16 = 0xa1;
const PIC_ICW1_INIT_ICW4: u8 = 0x11;
const PIC_ICW4_8086: u8 = 0x01;
const PIC1_VECTOR_BASE: u8 = 0x30;
const PIC2_VECTOR_BASE: u8 = 0x38;

/// Local APIC registers (SDM vol. 3, table 11-1).
const LAPIC_EOI: usize = 0xb0;
const LAPIC_SVR: usize = 0xf0;
const LAPIC_LVT_TIMER: usize = 0x320;
const LAPIC_LVT_LINT0: usize = 0x350;
const LAPIC_LVT_LINT1: usize = 0x360;
const LAPIC_LVT_ERROR: usize = 0x370;
const LAPIC_TIMER_INITIAL: usize = 0x380;
const LAPIC_TIMER_CURRENT: usize = 0x390;
const LAPIC_TIMER_DIVIDE: usize = 0x3e0;
const LAPIC_SVR_ENABLE: u32 = 1 << 8;
const LVT_MASKED: u32 = 1 << 16;
const LVT_TIMER_PERIODIC: u32 = 1 << 17;
/// Divide configuration value for "divide by 16".
const LAPIC_DIVIDE_16: u32 = 0x3;
const APIC_BASE_MASK: u64 = 0xf_ffff_f000;

/// Timer interrupts per second while a guest runs.
pub const TIMER_HZ: u64 = 100;

pub struct Clock {
    pub tsc_khz: u64,
    /// How the TSC frequency was found.
    pub source: &'static str,
    lapic: u64,
}

#[derive(Debug)]
pub enum TimerError {
    NoApic,
    PitDead,
}

fn lapic_read(base: u64, reg: usize) -> u32 {
    // SAFETY: `base` is the LAPIC page seen through the uncached DMAP.
    unsafe { ((base + reg as u64) as *const u32).read_volatile() }
}

fn lapic_write(base: u64, reg: usize, value: u32) {
    // SAFETY: as in lapic_read.
    unsafe { ((base + reg as u64) as *mut u32).write_volatile(value) }
}

fn mask_pics() {
    outb(PIC1_COMMAND, PIC_ICW1_INIT_ICW4);
    outb(PIC2_COMMAND, PIC_ICW1_INIT_ICW4);
    outb(PIC1_DATA, PIC1_VECTOR_BASE);
    outb(PIC2_DATA, PIC2_VECTOR_BASE);
    outb(PIC1_DATA, 4);
    outb(PIC2_DATA, 2);
    outb(PIC1_DATA, PIC_ICW4_8086);
    outb(PIC2_DATA, PIC_ICW4_8086);
    outb(PIC1_DATA, 0xff);
    outb(PIC2_DATA, 0xff);
}

fn pit_read() -> u64 {
    outb(PIT_COMMAND, PIT_CH0_LATCH);
    let low = inb(PIT_CHANNEL0);
    let high = inb(PIT_CHANNEL0);
    u64::from(u16::from_le_bytes([low, high]))
}

/// Measures the TSC and the LAPIC timer (divide by 16) over
/// [`CALIBRATION_TICKS`] of PIT channel 0. Returns (TSC Hz, LAPIC Hz).
fn calibrate(lapic: u64) -> Result<(u64, u64), TimerError> {
    lapic_write(lapic, LAPIC_TIMER_DIVIDE, LAPIC_DIVIDE_16);
    lapic_write(
        lapic,
        LAPIC_LVT_TIMER,
        LVT_MASKED | u32::from(crate::trap::VECTOR_TIMER as u8),
    );
    lapic_write(lapic, LAPIC_TIMER_INITIAL, u32::MAX);

    outb(PIT_COMMAND, PIT_CH0_MODE0);
    outb(PIT_CHANNEL0, 0xff);
    outb(PIT_CHANNEL0, 0xff);
    let start_count = pit_read();
    let start_tsc = rdtsc();
    let start_lapic = lapic_read(lapic, LAPIC_TIMER_CURRENT);
    for _ in 0..CALIBRATION_POLL_LIMIT {
        let count = pit_read();
        let elapsed = start_count.saturating_sub(count);
        if elapsed >= CALIBRATION_TICKS {
            let tsc = rdtsc() - start_tsc;
            let lapic_ticks =
                u64::from(start_lapic.wrapping_sub(lapic_read(lapic, LAPIC_TIMER_CURRENT)));
            lapic_write(lapic, LAPIC_TIMER_INITIAL, 0);
            return Ok((tsc * PIT_HZ / elapsed, lapic_ticks * PIT_HZ / elapsed));
        }
    }
    lapic_write(lapic, LAPIC_TIMER_INITIAL, 0);
    Err(TimerError::PitDead)
}

impl Clock {
    /// Masks the PICs, enables the LAPIC, calibrates, and leaves the LAPIC
    /// timer running periodically at [`TIMER_HZ`] (it only interrupts while
    /// ring 3 runs: the kernel keeps IF clear). `tsc_khz_hint` (command
    /// line or CPUID) is used only if the PIT does not count.
    pub fn start(apic: bool, tsc_khz_hint: Option<u64>) -> Result<Clock, TimerError> {
        if !apic {
            return Err(TimerError::NoApic);
        }
        mask_pics();
        let lapic = phys_to_virt(x86::rdmsr(x86::MSR_APIC_BASE) & APIC_BASE_MASK);
        lapic_write(
            lapic,
            LAPIC_SVR,
            LAPIC_SVR_ENABLE | crate::trap::VECTOR_SPURIOUS as u32,
        );
        lapic_write(lapic, LAPIC_LVT_LINT0, LVT_MASKED);
        lapic_write(lapic, LAPIC_LVT_LINT1, LVT_MASKED);
        lapic_write(lapic, LAPIC_LVT_ERROR, LVT_MASKED);

        let (tsc_khz, lapic_hz, source) = match calibrate(lapic) {
            Ok((tsc_hz, lapic_hz)) => (tsc_hz / 1000, lapic_hz, "pit"),
            Err(e) => {
                let khz = tsc_khz_hint.ok_or(e)?;
                // Without a PIT the LAPIC rate is unknown; QEMU's LAPIC
                // counts at 1 GHz before the divider.
                (khz, 1_000_000_000 / 16, "hint")
            }
        };
        let period = (lapic_hz / TIMER_HZ).clamp(1, u64::from(u32::MAX)) as u32;
        lapic_write(lapic, LAPIC_TIMER_DIVIDE, LAPIC_DIVIDE_16);
        lapic_write(
            lapic,
            LAPIC_LVT_TIMER,
            LVT_TIMER_PERIODIC | crate::trap::VECTOR_TIMER as u32,
        );
        lapic_write(lapic, LAPIC_TIMER_INITIAL, period);
        Ok(Clock {
            tsc_khz: tsc_khz.max(1),
            source,
            lapic,
        })
    }

    pub fn eoi(&self) {
        lapic_write(self.lapic, LAPIC_EOI, 0);
    }

    pub fn ms_to_cycles(&self, ms: u64) -> u64 {
        ms.saturating_mul(self.tsc_khz)
    }
}
