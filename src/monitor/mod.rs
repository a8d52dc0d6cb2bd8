//! The OS-independent monitor: no FreeBSD type appears here.
