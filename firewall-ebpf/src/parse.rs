//! The one packet parser of the XDP pipeline: Ethernet, up to two VLAN tags, IPv4 (with options)
//! or IPv6 (with a bounded walk over extension headers), then the TCP/UDP ports.
//!
//! Its contract is written down in README.md ("Parsing") and mirrored line by line by the
//! reference classifier in `userspace/src/fw/reference.rs`; the differential test keeps the two
//! in step.

use aya_ebpf::programs::XdpContext;
use rampart_common::fw::{
    parse::{MAX_IPV6_EXT, MAX_VLAN_TAGS},
    stat,
};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

/// Where a packet stands with respect to IP fragmentation.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Frag {
    None,
    /// Offset 0, more fragments follow: ports are present and matched.
    First,
    /// Offset > 0: no L4 header, so no ports.
    Later,
}

/// What the firewall (and later the balancer) needs of an IP packet.
pub struct Packet {
    /// 4 or 6.
    pub family: u8,
    /// Upper-layer protocol (after IPv6 extension headers).
    pub proto: u8,
    /// Whether `sport`/`dport` hold real ports (TCP/UDP, not a later fragment).
    pub has_ports: bool,
    /// Host byte order.
    pub sport: u16,
    pub dport: u16,
    /// Addresses as on the wire; IPv4 uses the first 4 bytes.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub frag: Frag,
    /// Offset of the IP header from the start of the frame.
    pub l3_off: usize,
    /// Offset of the L4 header (meaningless for later fragments).
    pub l4_off: usize,
}

pub enum Parsed {
    /// Not IPv4 or IPv6: the firewall passes it.
    NonIp,
    /// Cut short or inconsistent: the firewall drops it and counts it under this `stat` index.
    Malformed(u32),
    Ip(Packet),
}

/// A pointer to `len` bytes at `off`, or `None` if the frame is shorter.
#[inline(always)]
fn bytes_at(ctx: &XdpContext, off: usize, len: usize) -> Option<*const u8> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + len > end {
        return None;
    }
    Some((start + off) as *const u8)
}

#[inline(always)]
fn u8_at(ctx: &XdpContext, off: usize) -> Option<u8> {
    // SAFETY: bounds-checked by bytes_at.
    bytes_at(ctx, off, 1).map(|p| unsafe { *p })
}

#[inline(always)]
fn be16_at(ctx: &XdpContext, off: usize) -> Option<u16> {
    // SAFETY: bounds-checked by bytes_at.
    bytes_at(ctx, off, 2).map(|p| unsafe { u16::from_be_bytes([*p, *p.add(1)]) })
}

#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Parsed {
    let Some(mut ethertype) = be16_at(ctx, 12) else {
        return Parsed::Malformed(stat::MALFORMED_ETH);
    };
    let mut off = ETH_HLEN;
    let mut tags = 0;
    while ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        if tags == MAX_VLAN_TAGS {
            return Parsed::Malformed(stat::MALFORMED_VLAN);
        }
        // A tag is TCI (2 bytes) then the inner ethertype (2 bytes).
        let Some(inner) = be16_at(ctx, off + 2) else {
            return Parsed::Malformed(stat::MALFORMED_VLAN);
        };
        ethertype = inner;
        off += 4;
        tags += 1;
    }
    match ethertype {
        ETH_P_IP => parse_ipv4(ctx, off),
        ETH_P_IPV6 => parse_ipv6(ctx, off),
        _ => Parsed::NonIp,
    }
}

#[inline(always)]
fn parse_ipv4(ctx: &XdpContext, l3: usize) -> Parsed {
    let Some(hdr) = bytes_at(ctx, l3, 20) else {
        return Parsed::Malformed(stat::MALFORMED_IPV4);
    };
    // SAFETY: 20 bytes bounds-checked above.
    let (vihl, tot_len, frag_off, proto) = unsafe {
        (
            *hdr,
            u16::from_be_bytes([*hdr.add(2), *hdr.add(3)]),
            u16::from_be_bytes([*hdr.add(6), *hdr.add(7)]),
            *hdr.add(9),
        )
    };
    let ihl = (vihl & 0x0f) as usize * 4;
    if vihl >> 4 != 4 || ihl < 20 || (tot_len as usize) < ihl || bytes_at(ctx, l3, ihl).is_none() {
        return Parsed::Malformed(stat::MALFORMED_IPV4);
    }
    let mut pkt = Packet {
        family: 4,
        proto,
        has_ports: false,
        sport: 0,
        dport: 0,
        src: [0; 16],
        dst: [0; 16],
        frag: Frag::None,
        l3_off: l3,
        l4_off: l3 + ihl,
    };
    // SAFETY: bytes 12..20 are inside the 20 checked above.
    unsafe {
        for i in 0..4 {
            pkt.src[i] = *hdr.add(12 + i);
            pkt.dst[i] = *hdr.add(16 + i);
        }
    }
    // MF (0x2000) and the 13-bit offset; DF (0x4000) does not matter.
    if frag_off & 0x1fff != 0 {
        pkt.frag = Frag::Later;
        return Parsed::Ip(pkt);
    }
    if frag_off & 0x2000 != 0 {
        pkt.frag = Frag::First;
    }
    parse_l4(ctx, pkt)
}

/// IPv6 extension headers we walk over (RFC 8200 §4 and the IANA list).
#[inline(always)]
fn is_ipv6_ext(nh: u8) -> bool {
    matches!(nh, 0 | 43 | 44 | 51 | 60 | 135 | 139 | 140)
}

#[inline(always)]
fn parse_ipv6(ctx: &XdpContext, l3: usize) -> Parsed {
    let Some(hdr) = bytes_at(ctx, l3, 40) else {
        return Parsed::Malformed(stat::MALFORMED_IPV6);
    };
    // SAFETY: 40 bytes bounds-checked above.
    let (ver, mut nh) = unsafe { (*hdr >> 4, *hdr.add(6)) };
    if ver != 6 {
        return Parsed::Malformed(stat::MALFORMED_IPV6);
    }
    let mut pkt = Packet {
        family: 6,
        proto: 0,
        has_ports: false,
        sport: 0,
        dport: 0,
        src: [0; 16],
        dst: [0; 16],
        frag: Frag::None,
        l3_off: l3,
        l4_off: 0,
    };
    // SAFETY: bytes 8..40 are inside the 40 checked above.
    unsafe {
        for i in 0..16 {
            pkt.src[i] = *hdr.add(8 + i);
            pkt.dst[i] = *hdr.add(24 + i);
        }
    }
    let mut off = l3 + 40;
    let mut walked = 0;
    while is_ipv6_ext(nh) {
        if walked == MAX_IPV6_EXT {
            return Parsed::Malformed(stat::MALFORMED_IPV6_EXT);
        }
        walked += 1;
        if nh == 44 {
            // Fragment header: next header, reserved, offset (13 bits) + flags, id.
            let (Some(next), Some(fo)) = (u8_at(ctx, off), be16_at(ctx, off + 2)) else {
                return Parsed::Malformed(stat::MALFORMED_IPV6_EXT);
            };
            if bytes_at(ctx, off, 8).is_none() {
                return Parsed::Malformed(stat::MALFORMED_IPV6_EXT);
            }
            nh = next;
            off += 8;
            if fo >> 3 != 0 {
                // A later fragment: what follows is payload, not headers.
                pkt.proto = nh;
                pkt.frag = Frag::Later;
                return Parsed::Ip(pkt);
            }
            if fo & 1 != 0 {
                pkt.frag = Frag::First;
            }
            continue;
        }
        let (Some(next), Some(len)) = (u8_at(ctx, off), u8_at(ctx, off + 1)) else {
            return Parsed::Malformed(stat::MALFORMED_IPV6_EXT);
        };
        // AH counts its length in 4-byte units minus 2, the others in 8-byte units minus 1.
        let hlen = if nh == 51 { (len as usize + 2) * 4 } else { (len as usize + 1) * 8 };
        if bytes_at(ctx, off, hlen).is_none() {
            return Parsed::Malformed(stat::MALFORMED_IPV6_EXT);
        }
        nh = next;
        off += hlen;
    }
    pkt.proto = nh;
    pkt.l4_off = off;
    parse_l4(ctx, pkt)
}

/// Checks the L4 header is whole and reads the ports. `pkt` is not a later fragment.
#[inline(always)]
fn parse_l4(ctx: &XdpContext, mut pkt: Packet) -> Parsed {
    let off = pkt.l4_off;
    match pkt.proto {
        IPPROTO_TCP => {
            let Some(h) = bytes_at(ctx, off, 20) else {
                return Parsed::Malformed(stat::MALFORMED_L4);
            };
            // SAFETY: 20 bytes bounds-checked above.
            let doff = unsafe { (*h.add(12) >> 4) as usize * 4 };
            if doff < 20 || bytes_at(ctx, off, doff).is_none() {
                return Parsed::Malformed(stat::MALFORMED_L4);
            }
            // SAFETY: inside the 20 bytes checked above.
            unsafe {
                pkt.sport = u16::from_be_bytes([*h, *h.add(1)]);
                pkt.dport = u16::from_be_bytes([*h.add(2), *h.add(3)]);
            }
            pkt.has_ports = true;
        }
        IPPROTO_UDP => {
            let Some(h) = bytes_at(ctx, off, 8) else {
                return Parsed::Malformed(stat::MALFORMED_L4);
            };
            // SAFETY: inside the 8 bytes checked above.
            unsafe {
                pkt.sport = u16::from_be_bytes([*h, *h.add(1)]);
                pkt.dport = u16::from_be_bytes([*h.add(2), *h.add(3)]);
            }
            pkt.has_ports = true;
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            if bytes_at(ctx, off, 4).is_none() {
                return Parsed::Malformed(stat::MALFORMED_L4);
            }
        }
        _ => {}
    }
    Parsed::Ip(pkt)
}
