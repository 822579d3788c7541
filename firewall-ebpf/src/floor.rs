//! What the benchmark floors share (`bin/minimal.rs`, `minimal_tx.rs`, `calibration.rs`,
//! `calibration_tx.rs`, `sink.rs`). Each includes this file with `#[path]` instead of linking
//! the library: a program that links anything of the library gets all of its maps (see
//! lib.rs), and a floor must carry no more than its own.
#![allow(dead_code)]

use aya_ebpf::maps::PerCpuArray;

/// Iterations of the calibration's extra work; each depends on the last, so they cannot overlap.
pub const LOOPS: u32 = 256;

/// The calibration programs' fixed extra cost per packet: `LOOPS` dependent multiply-xorshift
/// steps, seeded from the packet so that the result cannot be computed at compile time. The
/// caller stores the result, so that the compiler cannot drop the loop.
#[inline(always)]
pub fn burn(seed: u32) -> u64 {
    let mut x = seed as u64 | 1;
    for _ in 0..LOOPS {
        x = x.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        x ^= x >> 29;
    }
    x
}

/// Adds one to slot `i` of a per-CPU counter array.
#[inline(always)]
pub fn bump(map: &PerCpuArray<u64>, i: u32) {
    if let Some(c) = map.get_ptr_mut(i) {
        // SAFETY: per-CPU slot, no concurrent writer.
        unsafe { *c += 1 };
    }
}

/// Stores `v` in slot `i` of a per-CPU array.
#[inline(always)]
pub fn store(map: &PerCpuArray<u64>, i: u32, v: u64) {
    if let Some(c) = map.get_ptr_mut(i) {
        // SAFETY: per-CPU slot, no concurrent writer.
        unsafe { *c = v };
    }
}

/// Swaps the destination and source MAC addresses of the frame at `p`, for XDP_TX.
///
/// # Safety
/// The caller has bounds-checked the first 12 bytes at `p`.
#[inline(always)]
pub unsafe fn swap_macs(p: *mut u8) {
    // SAFETY: within the 12 bytes the caller checked.
    unsafe {
        let dst = core::ptr::read_unaligned(p as *const [u8; 6]);
        let src = core::ptr::read_unaligned(p.add(6) as *const [u8; 6]);
        core::ptr::write_unaligned(p as *mut [u8; 6], src);
        core::ptr::write_unaligned(p.add(6) as *mut [u8; 6], dst);
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
