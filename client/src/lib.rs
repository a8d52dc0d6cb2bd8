//! kqemu-client: the client side of `/dev/kqemu` (no_std + alloc core).
#![cfg_attr(not(any(test, feature = "std")), no_std)]
#![deny(unsafe_op_in_unsafe_fn)]
extern crate alloc;
