//! The kernel side of rampart: what every XDP program shares.
//!
//! - [`parse`]: the one packet parser (Ethernet, VLAN tags, IPv4/IPv6, ports);
//! - [`fw`]: the firewall stage (`classify`) and its maps;
//! - [`lb`]: the L4 balancer stage (`balance`) and its maps;
//! - [`count`]: per-CPU counters.
//!
//! The programs are in `bin/`: `rampart.rs` (the pipeline: parse → fw → lb), `decap.rs` (the
//! backends' side of the balancer) and the benchmark floors (`minimal*.rs`, `calibration*.rs`,
//! `sink.rs`, which share `floor.rs` by `#[path]` include). A program that
//! links anything of this library gets all of its maps and global functions in its object
//! (bpf-linker keeps them), so `decap.rs` and the floors use none of it.
#![no_std]

pub mod fw;
pub mod lb;
pub mod parse;

use rampart_common::Counter;

/// Adds a packet of `bytes` to `map[index]` (per-CPU: no other writer on this CPU).
#[inline(always)]
pub fn count(map: &aya_ebpf::maps::PerCpuArray<Counter>, index: u32, bytes: u64) {
    if let Some(c) = map.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot; XDP does not preempt itself on one CPU.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}
