//! The flood benchmark's calibration: the minimal program (`minimal.rs`) plus a fixed extra cost
//! per packet (`floor::burn`: `LOOPS` dependent multiply-xorshift steps). fw-bench measures that
//! cost with BPF_PROG_TEST_RUN; if a flood cannot tell this program from the minimal one, the
//! flood does not saturate the receiver and its figures are reported invalid.
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

/// Slot 0: packets dropped (as MINIMAL_COUNT); slot 1: the loop's result, stored so that the
/// compiler cannot drop the loop.
#[map]
static CALIBRATION_COUNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

#[xdp]
pub fn xdp_calibration(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    let end = ctx.data_end();
    // 14 (Ethernet) + 20 (IPv4) + 8 (UDP)
    if start + 42 > end {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: the 42 bytes were bounds-checked above.
    let (ethertype, proto, src) =
        unsafe { (*((start + 12) as *const u16), *((start + 23) as *const u8), *((start + 26) as *const u32)) };
    if ethertype != 0x0008 || proto != 17 {
        return xdp_action::XDP_PASS;
    }
    let x = floor::burn(src);
    floor::store(&CALIBRATION_COUNT, 1, x);
    floor::bump(&CALIBRATION_COUNT, 0);
    xdp_action::XDP_DROP
}
