//! The testbed kernel (TESTBED.md). Filled in by the testbed work.
#![no_std]
#![no_main]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    loop {}
}
