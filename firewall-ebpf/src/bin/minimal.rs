//! The benchmark floor: the least an XDP program that looks at UDP can do. Parses
//! Ethernet/IPv4/UDP, counts the packet in a per-CPU array and drops it.
#![no_std]
#![no_main]

#[path = "../floor.rs"]
mod floor;

use aya_ebpf::{bindings::xdp_action, macros::{map, xdp}, maps::PerCpuArray, programs::XdpContext};

#[map]
static MINIMAL_COUNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[xdp]
pub fn xdp_minimal(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    let end = ctx.data_end();
    // 14 (Ethernet) + 20 (IPv4) + 8 (UDP)
    if start + 42 > end {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: the 42 bytes were bounds-checked above.
    let (ethertype, proto) = unsafe { (*((start + 12) as *const u16), *((start + 23) as *const u8)) };
    if ethertype != 0x0008 || proto != 17 {
        return xdp_action::XDP_PASS;
    }
    floor::bump(&MINIMAL_COUNT, 0);
    xdp_action::XDP_DROP
}
