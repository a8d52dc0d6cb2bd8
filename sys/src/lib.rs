//! Bindings to the FreeBSD kernel headers. Filled in by the foundation work.
#![no_std]
