//! Errors the module reports. The kld maps each one to a FreeBSD errno
//! (src/freebsd); the contract of which ioctl answers which error is in
//! the lead's errno contract and the man page.

/// An error a `/dev/kqemu` operation returns to the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// EIO: the call is out of order (INIT twice, anything before INIT).
    Io,
    /// EINVAL: a field of the argument is invalid.
    InvalidArgument,
    /// EFAULT: a user buffer is not mapped read/write in the caller.
    Fault,
    /// ENOMEM: no memory, or a wiring limit was hit.
    NoMemory,
    /// ENOSPC: a fixed-capacity table of the instance is full.
    NoSpace,
    /// EBUSY: another thread is running on the same open file.
    Busy,
    /// ENOTTY: unknown ioctl command.
    NotTty,
    /// EPERM: the device was opened without write access.
    Permission,
}

/// Result of a `/dev/kqemu` operation.
pub type Result<T> = core::result::Result<T, Error>;
