//! 16550 UARTs: COM1 carries the testbed's own log (plain text), COM2 the
//! framed channel to the host runner (guest output, --out files, result;
//! see [`crate::channel`]). Two ports keep the log separable from the
//! guest's bytes.

use crate::x86::{inb, outb};
use core::fmt;

/// Legacy PC COM port bases.
pub const COM1: u16 = 0x3f8;
pub const COM2: u16 = 0x2f8;

/// 16550 register offsets and bits (PC16550D data sheet).
const REG_DATA: u16 = 0;
const REG_IER: u16 = 1;
const REG_FCR: u16 = 2;
const REG_LCR: u16 = 3;
const REG_MCR: u16 = 4;
const REG_LSR: u16 = 5;
const LCR_DLAB: u8 = 0x80;
const LCR_8N1: u8 = 0x03;
const FCR_ENABLE_CLEAR: u8 = 0x07;
const MCR_DTR_RTS: u8 = 0x03;
const LSR_THRE: u8 = 0x20;

/// How many LSR polls a byte may wait for the transmitter. QEMU's UART
/// frees the holding register as soon as the host side accepts the byte,
/// so this only runs out when the host stopped reading.
const TX_POLL_LIMIT: u32 = 50_000_000;

#[derive(Clone, Copy)]
pub struct Uart {
    base: u16,
}

/// The transmitter stayed busy for [`TX_POLL_LIMIT`] polls.
#[derive(Debug)]
pub struct TxStuck;

impl Uart {
    pub const fn new(base: u16) -> Self {
        Uart { base }
    }

    /// 115200 8N1, FIFOs on, no interrupts: the kernel polls.
    pub fn init(&self) {
        outb(self.base + REG_IER, 0);
        outb(self.base + REG_LCR, LCR_DLAB);
        outb(self.base + REG_DATA, 1);
        outb(self.base + REG_IER, 0);
        outb(self.base + REG_LCR, LCR_8N1);
        outb(self.base + REG_FCR, FCR_ENABLE_CLEAR);
        outb(self.base + REG_MCR, MCR_DTR_RTS);
    }

    pub fn write_byte(&self, byte: u8) -> Result<(), TxStuck> {
        for _ in 0..TX_POLL_LIMIT {
            if inb(self.base + REG_LSR) & LSR_THRE != 0 {
                outb(self.base + REG_DATA, byte);
                return Ok(());
            }
        }
        Err(TxStuck)
    }

    pub fn write_all(&self, bytes: &[u8]) -> Result<(), TxStuck> {
        bytes.iter().try_for_each(|&b| self.write_byte(b))
    }
}

/// The log port as a `fmt::Write` sink. A stuck log port drops the text:
/// the log is for people, and its loss must not stop a run.
pub struct Log;

impl fmt::Write for Log {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let _ = Uart::new(COM1).write_all(s.as_bytes());
        Ok(())
    }
}

/// Prints one line to the testbed log (COM1).
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = writeln!($crate::serial::Log, $($arg)*);
    }};
}
