//! The balancer benchmark's floor: the least an XDP program that forwards can do. Parses
//! Ethernet/IPv4, counts the packet in a per-CPU array, swaps the MACs and sends the frame back
//! out of the interface it came in on (XDP_TX).
#![no_std]
#![no_main]

#[path = "../floor.rs"]
mod floor;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::PerCpuArray,
    programs::XdpContext,
};

#[map]
static MINIMAL_TX_COUNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[xdp]
pub fn xdp_minimal_tx(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    let end = ctx.data_end();
    // 14 (Ethernet) + 20 (IPv4)
    if start + 34 > end {
        return xdp_action::XDP_PASS;
    }
    let p = start as *mut u8;
    // SAFETY: the 34 bytes were bounds-checked above.
    let (ethertype, version) = unsafe { (*((start + 12) as *const u16), *p.add(14) >> 4) };
    if ethertype != 0x0008 || version != 4 {
        return xdp_action::XDP_PASS;
    }
    floor::bump(&MINIMAL_TX_COUNT, 0);
    // SAFETY: within the checked bytes.
    unsafe { floor::swap_macs(p) };
    xdp_action::XDP_TX
}
