//! Types and constants shared by the kernel programs (`firewall-ebpf`) and userspace (`rampart`).
//!
//! Every BPF map's key and value type is defined here, once. The rules for them:
//! `#[repr(C)]`, no implicit padding (explicit `_pad` fields), no `bool`/enum/`Option` (the kernel
//! may write any bit pattern), and a compile-time size assert. With the `user` feature each type
//! also implements `aya::Pod`.
#![no_std]

pub mod fw;
pub mod lb;
pub mod net;

/// Implements `aya::Pod` (userspace only) and asserts the size of a map type at compile time.
macro_rules! map_type {
    ($t:ty, $size:expr) => {
        const _: () = assert!(core::mem::size_of::<$t>() == $size);
        #[cfg(feature = "user")]
        unsafe impl aya::Pod for $t {}
    };
}
pub(crate) use map_type;

/// A packet and byte counter; per-CPU maps hold one per CPU and userspace sums them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}
map_type!(Counter, 16);

/// XDP return codes (from `enum xdp_action` in the kernel uapi).
pub mod xdp_action {
    pub const ABORTED: u32 = 0;
    pub const DROP: u32 = 1;
    pub const PASS: u32 = 2;
    pub const TX: u32 = 3;
    pub const REDIRECT: u32 = 4;
}
