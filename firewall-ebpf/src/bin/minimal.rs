//! The benchmark floor: the least an XDP program that looks at UDP can do. Parses
//! Ethernet/IPv4/UDP, counts the packet in a per-CPU array and drops it.
#![no_std]
#![no_main]

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
    if let Some(c) = MINIMAL_COUNT.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, no concurrent writer.
        unsafe { *c += 1 };
    }
    xdp_action::XDP_DROP
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
