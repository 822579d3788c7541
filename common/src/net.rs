//! Protocol numbers, EtherTypes and header sizes: one place for the kernel programs, the
//! reference parser, the packet builders of the tests and the benchmarks.

/// Ethernet header: two MACs and the EtherType.
pub const ETH_HLEN: usize = 14;
/// An 802.1Q / 802.1ad tag: TCI and the inner EtherType.
pub const VLAN_HLEN: usize = 4;
/// IPv4 header without options.
pub const IPV4_HLEN: usize = 20;
/// IPv6 fixed header.
pub const IPV6_HLEN: usize = 40;
/// TCP header without options.
pub const TCP_HLEN: usize = 20;
/// Offset of the flags byte in the TCP header, and two of its bits.
pub const TCP_FLAGS_OFFSET: usize = 13;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;
pub const UDP_HLEN: usize = 8;
/// ICMP and ICMPv6 headers: type, code, checksum, then 4 bytes that depend on the type.
pub const ICMP_HLEN: usize = 8;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_LLDP: u16 = 0x88cc;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

pub const IPPROTO_HOPOPTS: u8 = 0;
pub const IPPROTO_ICMP: u8 = 1;
/// IPv4 in IP (RFC 2003): the balancer's IPv4 encapsulation.
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
/// IPv6 in IP (RFC 2473): the balancer's IPv6 encapsulation.
pub const IPPROTO_IPV6: u8 = 41;
pub const IPPROTO_GRE: u8 = 47;
pub const IPPROTO_ROUTING: u8 = 43;
pub const IPPROTO_FRAGMENT: u8 = 44;
pub const IPPROTO_AH: u8 = 51;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_NONE: u8 = 59;
pub const IPPROTO_DSTOPTS: u8 = 60;
pub const IPPROTO_SCTP: u8 = 132;
pub const IPPROTO_MOBILITY: u8 = 135;
pub const IPPROTO_HIP: u8 = 139;
pub const IPPROTO_SHIM6: u8 = 140;

/// IPv6 extension headers the parsers walk over (RFC 8200 §4 and the IANA list).
#[inline(always)]
pub fn is_ipv6_ext(nh: u8) -> bool {
    matches!(
        nh,
        IPPROTO_HOPOPTS
            | IPPROTO_ROUTING
            | IPPROTO_FRAGMENT
            | IPPROTO_AH
            | IPPROTO_DSTOPTS
            | IPPROTO_MOBILITY
            | IPPROTO_HIP
            | IPPROTO_SHIM6
    )
}

/// ICMP Destination Unreachable, and its code Fragmentation Needed (RFC 792, RFC 1191).
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_FRAG_NEEDED: u8 = 4;
/// ICMPv6 Packet Too Big (RFC 4443).
pub const ICMPV6_PKT_TOOBIG: u8 = 2;
/// The smallest MTU an IPv6 link may have; an ICMPv6 error is at most this long (RFC 4443 §2.4).
pub const IPV6_MIN_MTU: usize = 1280;

/// TTL / hop limit of headers rampart writes.
pub const DEFAULT_TTL: u8 = 64;
