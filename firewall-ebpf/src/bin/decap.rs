//! `rampart_decap`: the backends' side of the balancer. The balancer sends a service's packets
//! to a backend encapsulated (IPv4 in IPv4, IPv6 in IPv6; this kernel has no ipip driver to
//! take them apart); this program strips the outer header of those addressed to one of the
//! backend's VIPs (`DECAP_VIPS`) and passes the inner packet to the stack, which answers the
//! client directly (direct server return). Every other frame passes untouched.
//!
//! Contract (README.md, "Backends: decapsulation"):
//! - untagged Ethernet, outer IPv4 (version 4, IHL 5..15, options skipped with the header) or
//!   IPv6 (no extension headers: the balancer adds none), whose protocol / next header is 4
//!   (IPv4 inside) or 41 (IPv6 inside); anything else is not IP-in-IP: passed, not counted;
//! - the outer packet must be whole (its total / payload length within the frame and long
//!   enough for the inner header) and not an IPv4 fragment, the inner header present with the
//!   version its protocol names: otherwise passed untouched and counted (`MALFORMED`,
//!   `FRAGMENT`); the outer checksum is not verified (as Katran's decap: the Ethernet FCS
//!   covers the link, and the stack checks the inner header);
//! - inner destination a VIP: the outer header goes (`bpf_xdp_adjust_head`), the Ethernet
//!   header is written again in front of the inner packet with the inner family's EtherType,
//!   `DECAPSULATED`, XDP_PASS; not a VIP: passed untouched, `NOT_OURS`.
//!
//! Small on purpose (the backend's hot path): one hash lookup, no loops. It uses nothing of the
//! kernel library (`firewall_ebpf`): bpf-linker keeps every map and global function of a
//! library that a program links, so one call into it would bring the firewall's and the
//! balancer's maps (the 4-million-entry Maglev ring among them) into this object. The test
//! `decap_object_holds_only_its_own_maps` loads the object and lists what it holds.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_xdp_adjust_head,
    macros::{map, xdp},
    maps::{HashMap, PerCpuArray},
    programs::XdpContext,
};
use rampart_common::{
    Counter,
    lb::{DecapKey, FAMILY_V4, FAMILY_V6, MAX_DECAP_VIPS, decap_stat},
    net::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IPPROTO_IPIP, IPPROTO_IPV6, IPV4_HLEN, IPV6_HLEN},
};

/// VIP → 0 (a set: the value is not read).
#[map]
static DECAP_VIPS: HashMap<DecapKey, u32> = HashMap::with_max_entries(MAX_DECAP_VIPS, 0);
#[map]
static DECAP_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(decap_stat::COUNT, 0);

#[xdp]
pub fn rampart_decap(ctx: XdpContext) -> u32 {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    match decap(&ctx) {
        Ok(()) => {
            count(decap_stat::DECAPSULATED, bytes);
            xdp_action::XDP_PASS
        }
        Err(Skip::Plain) => xdp_action::XDP_PASS,
        Err(Skip::Counted(stat)) => {
            count(stat, bytes);
            xdp_action::XDP_PASS
        }
        Err(Skip::AdjustFailed) => {
            // The frame may be half changed: drop it rather than pass garbage up.
            count(decap_stat::ADJUST_FAILED, bytes);
            xdp_action::XDP_ABORTED
        }
    }
}

enum Skip {
    /// Not IP-in-IP: untouched, not counted.
    Plain,
    /// Untouched, counted under this `decap_stat` index.
    Counted(u32),
    AdjustFailed,
}

/// Adds a frame of `bytes` to `DECAP_STATS[index]` (per-CPU: no other writer on this CPU).
#[inline(always)]
fn count(index: u32, bytes: u64) {
    if let Some(c) = DECAP_STATS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot; XDP does not preempt itself on one CPU.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

/// A pointer to `len` bytes at `off`, or `None` if the frame is shorter.
#[inline(always)]
fn at(ctx: &XdpContext, off: usize, len: usize) -> Option<*mut u8> {
    let start = ctx.data();
    if start + off + len > ctx.data_end() {
        return None;
    }
    Some((start + off) as *mut u8)
}

#[inline(always)]
fn decap(ctx: &XdpContext) -> Result<(), Skip> {
    // The shortest IP-in-IP frame: Ethernet, the outer IPv4 header, an inner IPv4 header.
    let eth = at(ctx, 0, ETH_HLEN + IPV4_HLEN).ok_or(Skip::Plain)?;
    let frame_len = ctx.data_end() - ctx.data();
    // SAFETY: the 34 bytes were bounds-checked above.
    let ethertype = unsafe { u16::from_be_bytes([*eth.add(12), *eth.add(13)]) };
    let outer = ETH_HLEN;
    let (outer_len, inner_proto) = match ethertype {
        ETH_P_IP => {
            // SAFETY: the outer IPv4 header's 20 bytes are inside the 34 checked above.
            let (vihl, tot_len, frag, proto) = unsafe {
                let h = eth.add(outer);
                (
                    *h,
                    u16::from_be_bytes([*h.add(2), *h.add(3)]) as usize,
                    u16::from_be_bytes([*h.add(6), *h.add(7)]),
                    *h.add(9),
                )
            };
            if proto != IPPROTO_IPIP && proto != IPPROTO_IPV6 {
                return Err(Skip::Plain);
            }
            let ihl = (vihl & 0x0f) as usize * 4;
            if vihl >> 4 != 4 || ihl < IPV4_HLEN || tot_len < ihl + inner_min(proto) || outer + tot_len > frame_len {
                return Err(Skip::Counted(decap_stat::MALFORMED));
            }
            // MF or a fragment offset (DF does not matter): one piece of an outer packet.
            if frag & 0x3fff != 0 {
                return Err(Skip::Counted(decap_stat::FRAGMENT));
            }
            (ihl, proto)
        }
        ETH_P_IPV6 => {
            let h = at(ctx, outer, IPV6_HLEN).ok_or(Skip::Plain)?;
            // SAFETY: 40 bytes bounds-checked above.
            let (ver, payload_len, next) =
                unsafe { (*h >> 4, u16::from_be_bytes([*h.add(4), *h.add(5)]) as usize, *h.add(6)) };
            if next != IPPROTO_IPIP && next != IPPROTO_IPV6 {
                return Err(Skip::Plain);
            }
            if ver != 6 || payload_len < inner_min(next) || outer + IPV6_HLEN + payload_len > frame_len {
                return Err(Skip::Counted(decap_stat::MALFORMED));
            }
            (IPV6_HLEN, next)
        }
        _ => return Err(Skip::Plain),
    };

    let inner = outer + outer_len;
    let key = if inner_proto == IPPROTO_IPIP {
        let h = at(ctx, inner, IPV4_HLEN).ok_or(Skip::Counted(decap_stat::MALFORMED))?;
        // SAFETY: 20 bytes bounds-checked above; the destination is bytes 16..20.
        let (ver, dst) = unsafe { (*h >> 4, core::ptr::read_unaligned(h.add(16) as *const [u8; 4])) };
        if ver != 4 {
            return Err(Skip::Counted(decap_stat::MALFORMED));
        }
        DecapKey {
            addr: [u64::from_ne_bytes([dst[0], dst[1], dst[2], dst[3], 0, 0, 0, 0]), 0],
            family: FAMILY_V4,
            _pad: [0; 7],
        }
    } else {
        let h = at(ctx, inner, IPV6_HLEN).ok_or(Skip::Counted(decap_stat::MALFORMED))?;
        // SAFETY: 40 bytes bounds-checked above; the destination is bytes 24..40.
        let (ver, dst) = unsafe {
            (
                *h >> 4,
                [
                    u64::from_ne_bytes(core::ptr::read_unaligned(h.add(24) as *const [u8; 8])),
                    u64::from_ne_bytes(core::ptr::read_unaligned(h.add(32) as *const [u8; 8])),
                ],
            )
        };
        if ver != 6 {
            return Err(Skip::Counted(decap_stat::MALFORMED));
        }
        DecapKey { addr: dst, family: FAMILY_V6, _pad: [0; 7] }
    };
    // SAFETY: a lookup; the value is not read.
    if unsafe { DECAP_VIPS.get(&key) }.is_none() {
        return Err(Skip::Counted(decap_stat::NOT_OURS));
    }

    // SAFETY: the 12 MAC bytes are inside the 34 checked first.
    let macs = unsafe { core::ptr::read_unaligned(eth as *const [u8; 12]) };
    // SAFETY: the helper checks the new start against the frame; pointers are re-derived after.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, outer_len as i32) } != 0 {
        return Err(Skip::AdjustFailed);
    }
    let new_eth = at(ctx, 0, ETH_HLEN).ok_or(Skip::AdjustFailed)?;
    let ethertype = if inner_proto == IPPROTO_IPIP { ETH_P_IP } else { ETH_P_IPV6 };
    // SAFETY: 14 bytes bounds-checked above.
    unsafe {
        core::ptr::write_unaligned(new_eth as *mut [u8; 12], macs);
        core::ptr::write_unaligned(new_eth.add(12) as *mut [u8; 2], ethertype.to_be_bytes());
    }
    Ok(())
}

/// The shortest inner packet of protocol `proto` (4 or 41): its fixed header.
#[inline(always)]
fn inner_min(proto: u8) -> usize {
    if proto == IPPROTO_IPIP { IPV4_HLEN } else { IPV6_HLEN }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
