//! Struct layouts and constants of FreeBSD 14 and 15, computed at build
//! time by clang from the kernel headers (tests/testbed/freebsd/layout.c,
//! probe.rs): the personality lays out `struct pcpu`, `struct thread`,
//! `struct cdev`, ... exactly as the module, built against the same
//! headers, reads them.

include!(concat!(env!("OUT_DIR"), "/freebsd_layout.rs"));

impl Layout {
    /// The layout of FreeBSD `release` (14 or 15).
    pub fn of(release: u32) -> Option<&'static Layout> {
        match release {
            14 => Some(&FREEBSD14),
            15 => Some(&FREEBSD15),
            _ => None,
        }
    }
}
