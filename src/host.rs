//! `trait Host`: everything the monitor asks of the kernel.
