//! The balancer flood's calibration: the floor (`minimal_tx.rs`: parse, count, swap MACs,
//! XDP_TX) plus a fixed extra cost per packet, the bounded loop of `calibration.rs`. lb-bench
//! measures that cost with BPF_PROG_TEST_RUN; if a flood cannot tell this program from the floor,
//! the flood does not saturate the balancer and its rates are reported invalid.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::PerCpuArray,
    programs::XdpContext,
};

/// Iterations of the extra work; each depends on the last, so they cannot overlap.
const LOOPS: u32 = 256;

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
    // Seeded from the packet, so the result cannot be computed at compile time.
    let mut x = src as u64 | 1;
    for _ in 0..LOOPS {
        x = x.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        x ^= x >> 29;
    }
    if let Some(c) = CALIBRATION_TX_COUNT.get_ptr_mut(1) {
        // SAFETY: per-CPU slot, no concurrent writer.
        unsafe { *c = x };
    }
    if let Some(c) = CALIBRATION_TX_COUNT.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, no concurrent writer.
        unsafe { *c += 1 };
    }
    // SAFETY: within the checked bytes.
    unsafe {
        let dst = core::ptr::read_unaligned(p as *const [u8; 6]);
        let src = core::ptr::read_unaligned(p.add(6) as *const [u8; 6]);
        core::ptr::write_unaligned(p as *mut [u8; 6], src);
        core::ptr::write_unaligned(p.add(6) as *mut [u8; 6], dst);
    }
    xdp_action::XDP_TX
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
