//! Errors the monitor reports; the kld maps them to FreeBSD errno values.
