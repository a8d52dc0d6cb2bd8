//! The OS-independent monitor: no FreeBSD type appears here.
pub mod exec;
#[cfg(test)]
mod fuzz_tests;
pub mod instance;
pub mod mmu;
#[cfg(any(test, feature = "testing"))]
pub mod mutate;
pub mod ram;
pub mod segments;
pub mod shadow;
pub mod switch;
pub mod validate;
