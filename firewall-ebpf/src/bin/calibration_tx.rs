//! The balancer flood's calibration: the floor (`minimal_tx.rs`: parse, count, swap MACs,
//! XDP_TX) plus a fixed extra cost per packet (`floor::burn`, as in `calibration.rs`). lb-bench
//! measures that cost with BPF_PROG_TEST_RUN; if a flood cannot tell this program from the floor,
//! the flood does not saturate the balancer and its rates are reported invalid.
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

/// Slot 0: packets sent back (as MINIMAL_TX_COUNT); slot 1: the loop's result, stored so that
/// the compiler cannot drop the loop.
#[map]
static CALIBRATION_TX_COUNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

#[xdp]
pub fn xdp_calibration_tx(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    let end = ctx.data_end();
    // 14 (Ethernet) + 20 (IPv4)
    if start + 34 > end {
        return xdp_action::XDP_PASS;
    }
    let p = start as *mut u8;
    // SAFETY: the 34 bytes were bounds-checked above.
    let (ethertype, version, src) =
        unsafe { (*((start + 12) as *const u16), *p.add(14) >> 4, *((start + 26) as *const u32)) };
    if ethertype != 0x0008 || version != 4 {
        return xdp_action::XDP_PASS;
    }
    let x = floor::burn(src);
    floor::store(&CALIBRATION_TX_COUNT, 1, x);
    floor::bump(&CALIBRATION_TX_COUNT, 0);
    // SAFETY: within the checked bytes.
    unsafe { floor::swap_macs(p) };
    xdp_action::XDP_TX
}
