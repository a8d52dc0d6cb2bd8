//! Ends the run through QEMU's isa-debug-exit device.
//!
//! QEMU exits with status `(value << 1) | 1` (TESTBED.md). One value means
//! "the testbed completed the run"; every other status the runner sees,
//! a triple fault's 0 included, is a testbed failure.

use crate::x86::{halt_forever, outl};

/// `-device isa-debug-exit,iobase=0xf4,iosize=0x04` (tests/testbed/run).
const DEBUG_EXIT_PORT: u16 = 0xf4;
/// Run completed (QEMU status 67); the guest's own status travels in the
/// channel's result frame.
const EXIT_COMPLETED: u32 = 33;
/// The testbed itself failed (QEMU status 35): panic, fatal trap, bad
/// input from the runner.
const EXIT_TESTBED_FAILURE: u32 = 17;

pub fn completed() -> ! {
    crate::nmi::report();
    outl(DEBUG_EXIT_PORT, EXIT_COMPLETED);
    halt_forever()
}

pub fn failure() -> ! {
    crate::nmi::report();
    outl(DEBUG_EXIT_PORT, EXIT_TESTBED_FAILURE);
    halt_forever()
}
