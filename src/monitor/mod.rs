//! The OS-independent monitor: no FreeBSD type appears here.
pub mod instance;
