//! The balancer benchmark's count point at the backends: every IPv4 frame that arrives is
//! counted by its (outer) destination address and dropped before the stack, so that every
//! contender's packets are counted at the same place and the backends' own cost is no part of
//! the figure. On veth it also gives the balancer's XDP_TX a program on the peer, which native
//! XDP needs there.
#![no_std]
#![no_main]

#[path = "../floor.rs"]
mod floor;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{Array, PerCpuArray},
    programs::XdpContext,
};

/// Destinations counted apart (IPv4, network order); 0 is never matched.
const DESTINATIONS: u32 = 4;

/// Userspace writes the addresses to tell apart (the backends, the VIP).
#[map]
static SINK_DST: Array<u32> = Array::with_max_entries(DESTINATIONS, 0);
/// Slot i: frames to SINK_DST[i]; slot DESTINATIONS: every other IPv4 frame.
#[map]
static SINK_COUNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(DESTINATIONS + 1, 0);

#[xdp]
pub fn xdp_sink(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    let end = ctx.data_end();
    // 14 (Ethernet) + 20 (IPv4)
    if start + 34 > end {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: the 34 bytes were bounds-checked above.
    let (ethertype, dst) = unsafe { (*((start + 12) as *const u16), *((start + 30) as *const u32)) };
    if ethertype != 0x0008 {
        return xdp_action::XDP_PASS;
    }
    let mut slot = DESTINATIONS;
    for i in 0..DESTINATIONS {
        if dst != 0 && SINK_DST.get(i).copied() == Some(dst) {
            slot = i;
            break;
        }
    }
    floor::bump(&SINK_COUNT, slot);
    xdp_action::XDP_DROP
}
