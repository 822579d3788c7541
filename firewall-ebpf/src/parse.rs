//! The one packet parser of the XDP pipeline: Ethernet, up to two VLAN tags, IPv4 (with options)
//! or IPv6 (with a bounded walk over extension headers), then the TCP/UDP ports.
//!
//! Its contract is written down in README.md ("Parsing") and mirrored line by line by the
//! reference classifier in `userspace/src/fw/reference.rs`; the differential test keeps the two
//! in step.
//!
//! Verifier cost: the kernel walks every path of the program at load time and can drop a path
//! only where its state is within one already proven safe. The IPv6 extension-header walk
//! produces many states (the offset's range differs with the kind and number of headers), and
//! inlined they reached the classifier's candidate loop as different states, so the verifier
//! walked that loop several times (~360,000 instructions in all). The walk is therefore a BPF
//! *global* function ([`rampart_fw_ipv6_ext`]), checked once on its own, whose result reaches
//! the caller as one scalar: every path meets the classifier in agreeing states (~78,000).

use aya_ebpf::{bindings::xdp_md, programs::XdpContext};
use rampart_common::fw::{
    parse::{MAX_IPV6_EXT, MAX_VLAN_TAGS},
    stat,
};

use rampart_common::net::{
    ETH_HLEN, ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, IPPROTO_FRAGMENT, IPPROTO_ICMP, IPPROTO_ICMPV6,
    IPPROTO_AH, IPPROTO_TCP, IPPROTO_UDP, is_ipv6_ext,
};

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
    /// Addresses as on the wire: the bytes of the two words, in memory order, are the address
    /// bytes. IPv4 uses the first 4 bytes; the rest are zero. (Words, not byte arrays: LLVM gave
    /// each byte of an array its own 8-byte stack slot, and zeroed them all for IPv4.)
    pub src: [u64; 2],
    pub dst: [u64; 2],
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
pub fn bytes_at(ctx: &XdpContext, off: usize, len: usize) -> Option<*const u8> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + len > end {
        return None;
    }
    Some((start + off) as *const u8)
}

#[inline(always)]
fn be16_at(ctx: &XdpContext, off: usize) -> Option<u16> {
    // SAFETY: bounds-checked by bytes_at.
    bytes_at(ctx, off, 2).map(|p| unsafe { u16::from_be_bytes([*p, *p.add(1)]) })
}

/// 8 bytes at `p`, in memory order.
///
/// # Safety
/// `p..p + 8` must be inside the frame.
#[inline(always)]
unsafe fn word_at(p: *const u8) -> u64 {
    // SAFETY: the caller guarantees the bytes; the frame has no alignment.
    unsafe { u64::from_ne_bytes(core::ptr::read_unaligned(p as *const [u8; 8])) }
}

/// An IPv4 address at `p` as the first word of [`Packet::src`]/[`Packet::dst`].
///
/// # Safety
/// `p..p + 4` must be inside the frame.
#[inline(always)]
unsafe fn ipv4_word_at(p: *const u8) -> u64 {
    // SAFETY: the caller guarantees the bytes.
    let a = unsafe { core::ptr::read_unaligned(p as *const [u8; 4]) };
    u64::from_ne_bytes([a[0], a[1], a[2], a[3], 0, 0, 0, 0])
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
    let l3 = match ethertype {
        ETH_P_IP => parse_ipv4(ctx, off),
        ETH_P_IPV6 => parse_ipv6(ctx, off),
        _ => return Parsed::NonIp,
    };
    // Both families meet here: the L4 header is parsed in one place.
    let pkt = match l3 {
        Ok(pkt) => pkt,
        Err(class) => return Parsed::Malformed(class),
    };
    if pkt.frag == Frag::Later {
        return Parsed::Ip(pkt);
    }
    parse_l4(ctx, pkt)
}

/// The IP layer of an IPv4 packet: everything but the ports.
#[inline(always)]
fn parse_ipv4(ctx: &XdpContext, l3: usize) -> Result<Packet, u32> {
    let Some(hdr) = bytes_at(ctx, l3, 20) else {
        return Err(stat::MALFORMED_IPV4);
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
        return Err(stat::MALFORMED_IPV4);
    }
    // MF (0x2000) and the 13-bit offset; DF (0x4000) does not matter.
    let frag = if frag_off & 0x1fff != 0 {
        Frag::Later
    } else if frag_off & 0x2000 != 0 {
        Frag::First
    } else {
        Frag::None
    };
    Ok(Packet {
        family: 4,
        proto,
        has_ports: false,
        sport: 0,
        dport: 0,
        // SAFETY: bytes 12..20 are inside the 20 checked above.
        src: [unsafe { ipv4_word_at(hdr.add(12)) }, 0],
        dst: [unsafe { ipv4_word_at(hdr.add(16)) }, 0],
        frag,
        l3_off: l3,
        l4_off: l3 + ihl,
    })
}

/// The IP layer of an IPv6 packet: everything but the ports.
#[inline(always)]
fn parse_ipv6(ctx: &XdpContext, l3: usize) -> Result<Packet, u32> {
    let Some(hdr) = bytes_at(ctx, l3, 40) else {
        return Err(stat::MALFORMED_IPV6);
    };
    // SAFETY: 40 bytes bounds-checked above.
    let (ver, nh) = unsafe { (*hdr >> 4, *hdr.add(6)) };
    if ver != 6 {
        return Err(stat::MALFORMED_IPV6);
    }
    // SAFETY: bytes 8..40 are inside the 40 checked above.
    let (src, dst) =
        unsafe { ([word_at(hdr.add(8)), word_at(hdr.add(16))], [word_at(hdr.add(24)), word_at(hdr.add(32))]) };
    let (proto, frag, l4) = if is_ipv6_ext(nh) {
        let walk = rampart_fw_ipv6_ext(ctx.ctx, (l3 + 40) as u64, nh as u64);
        if walk & ext::MALFORMED != 0 {
            return Err(stat::MALFORMED_IPV6_EXT);
        }
        let frag = if walk & ext::LATER != 0 {
            Frag::Later
        } else if walk & ext::FIRST != 0 {
            Frag::First
        } else {
            Frag::None
        };
        ((walk >> ext::PROTO_SHIFT) as u8, frag, (walk & ext::OFF_MASK) as usize)
    } else {
        (nh, Frag::None, l3 + 40)
    };
    Ok(Packet { family: 6, proto, has_ports: false, sport: 0, dport: 0, src, dst, frag, l3_off: l3, l4_off: l4 })
}

/// The result of [`rampart_fw_ipv6_ext`], one scalar.
mod ext {
    /// Bits 0..15: the offset after the last header walked. It is at most
    /// 22 + 40 + 8 · 2048 = 16,446 (two VLAN tags, the IPv6 header, eight of the longest
    /// extension headers), so 15 bits hold it; and a 15-bit value is what lets the verifier
    /// accept packet accesses at it.
    pub const OFF_MASK: u64 = 0x7fff;
    /// Bits 16..24: the protocol (the first Next Header that is not an extension header, or a
    /// later fragment's Next Header).
    pub const PROTO_SHIFT: u32 = 16;
    /// A Fragment header with offset 0 and M set was walked.
    pub const FIRST: u64 = 1 << 24;
    /// A Fragment header with offset > 0 ended the walk.
    pub const LATER: u64 = 1 << 25;
    /// An extension header cut short, or more than `MAX_IPV6_EXT` of them.
    pub const MALFORMED: u64 = 1 << 26;
}

/// Walks the IPv6 extension headers that start at `off` (just after the IPv6 header), the
/// first being `nh`. Returns the [`ext`] bits.
///
/// A BPF global function: the verifier checks it once, for any arguments, instead of once per
/// path that reaches it, and the caller sees one result whatever path the walk took. The
/// arguments are masked to their real widths (`off` ≤ 62, `nh` a byte) because the verifier
/// assumes nothing about them.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn rampart_fw_ipv6_ext(ctx: *mut xdp_md, off: u64, nh: u64) -> u64 {
    let ctx = XdpContext::new(ctx);
    let mut off = (off & 0xff) as usize;
    let mut nh = nh as u8;
    let mut first = 0;
    let mut walked = 0;
    while is_ipv6_ext(nh) {
        if walked == MAX_IPV6_EXT {
            return ext::MALFORMED;
        }
        walked += 1;
        if nh == IPPROTO_FRAGMENT {
            // Fragment header: next header, reserved, offset (13 bits) + flags, id.
            let Some(h) = bytes_at(&ctx, off, 8) else {
                return ext::MALFORMED;
            };
            // SAFETY: 8 bytes bounds-checked above.
            let (next, fo) = unsafe { (*h, u16::from_be_bytes([*h.add(2), *h.add(3)])) };
            nh = next;
            off += 8;
            if fo >> 3 != 0 {
                // A later fragment: what follows is payload, not headers.
                return ext::LATER | (nh as u64) << ext::PROTO_SHIFT | off as u64;
            }
            if fo & 1 != 0 {
                first = ext::FIRST;
            }
            continue;
        }
        let Some(h) = bytes_at(&ctx, off, 2) else {
            return ext::MALFORMED;
        };
        // SAFETY: 2 bytes bounds-checked above.
        let (next, len) = unsafe { (*h, *h.add(1)) };
        // AH counts its length in 4-byte units minus 2, the others in 8-byte units minus 1.
        let hlen = if nh == IPPROTO_AH { (len as usize + 2) * 4 } else { (len as usize + 1) * 8 };
        if bytes_at(&ctx, off, hlen).is_none() {
            return ext::MALFORMED;
        }
        nh = next;
        off += hlen;
    }
    first | (nh as u64) << ext::PROTO_SHIFT | off as u64
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
