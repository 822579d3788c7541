//! The reference classifier (the spec). CONTRACT:
//! `pub fn classify(rules: &RuleSet, frame: &[u8]) -> RefVerdict`
//!
//! Written from the contract (the `stat` docs in `rampart_common::fw` and README "Parsing"),
//! not from the kernel code, and as plainly as possible: slices and bounds-checked `get`s for
//! parsing, a linear first-match scan over the rules. The differential tests hold the XDP
//! program (and `compile::eval`) to it.
//!
//! Parsing, in order:
//! - Ethernet: 14 bytes, else `MALFORMED_ETH`. Up to two 802.1Q/802.1ad tags (4 bytes each); a
//!   third tag or a tag cut short is `MALFORMED_VLAN`. Other ethertypes than IPv4/IPv6: `NON_IP`
//!   (passed).
//! - IPv4: 20 bytes, version 4, IHL ≥ 5, the IHL·4-byte header inside the frame and total length
//!   ≥ IHL·4, else `MALFORMED_IPV4`. Fragment offset ≠ 0: a later fragment (no ports, the L4
//!   header is not looked at). MF with offset 0: a first fragment (ports read as usual).
//! - IPv6: 40 bytes and version 6, else `MALFORMED_IPV6`. Extension headers 0, 43, 44, 51, 60,
//!   135, 139, 140 are walked, at most eight (a ninth is `MALFORMED_IPV6_EXT`), each of which must
//!   fit in the frame (fragment header 8 bytes, AH (len+2)·4, the others (len+1)·8). A fragment
//!   header with offset ≠ 0 ends the walk: a later fragment whose protocol is that header's next
//!   header. Offset 0 with M set: a first fragment.
//! - L4 (not for later fragments): TCP needs 20 bytes and a data offset ≥ 5 whose header fits,
//!   UDP 8 bytes, ICMP (1) and ICMPv6 (58) 4 bytes, else `MALFORMED_L4`. Other protocols: no check,
//!   no ports. Malformed frames are dropped.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use rampart_common::{
    fw::{
        parse::{MAX_IPV6_EXT, MAX_VLAN_TAGS},
        stat,
    },
    xdp_action,
};

use super::rules::{Action, AddrMatch, PortRange, Rule, RuleSet};

/// A packet's place with respect to IP fragmentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frag {
    None,
    /// Offset 0, more fragments follow: carries the L4 header and ports.
    First,
    /// Offset > 0: payload only, no ports.
    Later,
}

impl Frag {
    /// The `stat` counter this fragment is counted in (besides its verdict), if any.
    pub fn stat(self) -> Option<u32> {
        match self {
            Frag::None => None,
            Frag::First => Some(stat::FRAGMENT_FIRST),
            Frag::Later => Some(stat::FRAGMENT_LATER),
        }
    }
}

/// What rules match on, taken from an IP packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PacketFields {
    /// 4 or 6 (the variant of `src` and `dst`).
    pub family: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// Upper-layer protocol (after IPv6 extension headers; a later fragment's next header).
    pub proto: u8,
    /// TCP/UDP ports; `None` for other protocols and later fragments.
    pub sport: Option<u16>,
    pub dport: Option<u16>,
    pub frag: Frag,
}

/// What the XDP program must do with a frame, and how it must count it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefVerdict {
    /// XDP action: `xdp_action::DROP` (1) or `PASS` (2).
    pub action: u32,
    /// Index in `rs.rules` of the matching rule.
    pub rule: Option<usize>,
    /// The `stat` verdict index (0..=`stat::LAST_VERDICT`).
    pub stat: u32,
    /// `stat::FRAGMENT_FIRST`/`FRAGMENT_LATER` when the packet is a fragment (not for malformed
    /// frames, which are counted only as malformed).
    pub frag: Option<u32>,
}

use rampart_common::net::{
    ETH_P_8021AD as ETHERTYPE_QINQ, ETH_P_8021Q as ETHERTYPE_VLAN, ETH_P_IP as ETHERTYPE_IPV4,
    ETH_P_IPV6 as ETHERTYPE_IPV6, is_ipv6_ext,
};

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

/// Parses an Ethernet frame. `Ok(None)`: not IP. `Err(stat)`: malformed, with its counter.
pub fn parse_frame(frame: &[u8]) -> Result<Option<PacketFields>, u32> {
    let eth = frame.get(..14).ok_or(stat::MALFORMED_ETH)?;
    let mut ethertype = be16(&eth[12..14]);
    let mut l3 = 14;
    let mut tags = 0;
    while ethertype == ETHERTYPE_VLAN || ethertype == ETHERTYPE_QINQ {
        tags += 1;
        if tags > MAX_VLAN_TAGS {
            return Err(stat::MALFORMED_VLAN);
        }
        let tag = frame.get(l3..l3 + 4).ok_or(stat::MALFORMED_VLAN)?;
        ethertype = be16(&tag[2..4]);
        l3 += 4;
    }
    match ethertype {
        ETHERTYPE_IPV4 => parse_ipv4(frame, l3).map(Some),
        ETHERTYPE_IPV6 => parse_ipv6(frame, l3).map(Some),
        _ => Ok(None),
    }
}

fn parse_ipv4(frame: &[u8], l3: usize) -> Result<PacketFields, u32> {
    let h = frame.get(l3..l3 + 20).ok_or(stat::MALFORMED_IPV4)?;
    let version = h[0] >> 4;
    let header_len = usize::from(h[0] & 0x0f) * 4;
    let total_len = usize::from(be16(&h[2..4]));
    if version != 4 || header_len < 20 || total_len < header_len || frame.len() < l3 + header_len {
        return Err(stat::MALFORMED_IPV4);
    }
    let src = IpAddr::V4(Ipv4Addr::new(h[12], h[13], h[14], h[15]));
    let dst = IpAddr::V4(Ipv4Addr::new(h[16], h[17], h[18], h[19]));
    let proto = h[9];
    let flags_offset = be16(&h[6..8]);
    let offset = flags_offset & 0x1fff;
    let more_fragments = flags_offset & 0x2000 != 0;
    let mut pkt = PacketFields { family: 4, src, dst, proto, sport: None, dport: None, frag: Frag::None };
    if offset != 0 {
        pkt.frag = Frag::Later;
        return Ok(pkt);
    }
    if more_fragments {
        pkt.frag = Frag::First;
    }
    let ports = parse_l4(frame, l3 + header_len, proto)?;
    pkt.sport = ports.map(|p| p.0);
    pkt.dport = ports.map(|p| p.1);
    Ok(pkt)
}

fn parse_ipv6(frame: &[u8], l3: usize) -> Result<PacketFields, u32> {
    let h = frame.get(l3..l3 + 40).ok_or(stat::MALFORMED_IPV6)?;
    if h[0] >> 4 != 6 {
        return Err(stat::MALFORMED_IPV6);
    }
    let addr = |b: &[u8]| {
        let mut a = [0u8; 16];
        a.copy_from_slice(b);
        IpAddr::V6(Ipv6Addr::from(a))
    };
    let mut pkt = PacketFields {
        family: 6,
        src: addr(&h[8..24]),
        dst: addr(&h[24..40]),
        proto: 0,
        sport: None,
        dport: None,
        frag: Frag::None,
    };
    let mut next = h[6];
    let mut off = l3 + 40;
    let mut seen = 0;
    while is_ipv6_ext(next) {
        seen += 1;
        if seen > MAX_IPV6_EXT {
            return Err(stat::MALFORMED_IPV6_EXT);
        }
        if next == 44 {
            let fh = frame.get(off..off + 8).ok_or(stat::MALFORMED_IPV6_EXT)?;
            let offset_flags = be16(&fh[2..4]);
            next = fh[0];
            off += 8;
            if offset_flags >> 3 != 0 {
                pkt.proto = next;
                pkt.frag = Frag::Later;
                return Ok(pkt);
            }
            if offset_flags & 1 != 0 {
                pkt.frag = Frag::First;
            }
        } else {
            let eh = frame.get(off..off + 2).ok_or(stat::MALFORMED_IPV6_EXT)?;
            let len = if next == 51 { (usize::from(eh[1]) + 2) * 4 } else { (usize::from(eh[1]) + 1) * 8 };
            if frame.len() < off + len {
                return Err(stat::MALFORMED_IPV6_EXT);
            }
            next = eh[0];
            off += len;
        }
    }
    pkt.proto = next;
    let ports = parse_l4(frame, off, next)?;
    pkt.sport = ports.map(|p| p.0);
    pkt.dport = ports.map(|p| p.1);
    Ok(pkt)
}

/// Checks the L4 header at `off` is whole; returns (sport, dport) for TCP and UDP.
fn parse_l4(frame: &[u8], off: usize, proto: u8) -> Result<Option<(u16, u16)>, u32> {
    let need = |n: usize| frame.get(off..off + n).ok_or(stat::MALFORMED_L4);
    match proto {
        6 => {
            let t = need(20)?;
            let data_offset = usize::from(t[12] >> 4) * 4;
            if data_offset < 20 {
                return Err(stat::MALFORMED_L4);
            }
            need(data_offset)?;
            Ok(Some((be16(&t[0..2]), be16(&t[2..4]))))
        }
        17 => {
            let u = need(8)?;
            Ok(Some((be16(&u[0..2]), be16(&u[2..4]))))
        }
        1 | 58 => need(4).map(|_| None),
        _ => Ok(None),
    }
}

fn addr_holds(rs: &RuleSet, cond: &Option<AddrMatch>, addr: IpAddr) -> bool {
    match cond {
        None => true,
        Some(m) => m.expand(&rs.sets).any(|c| c.contains(addr)),
    }
}

fn port_holds(cond: &Option<Vec<PortRange>>, port: Option<u16>) -> bool {
    match (cond, port) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(ranges), Some(p)) => ranges.iter().any(|r| r.contains(p)),
    }
}

/// Whether `rule` matches the packet (every condition it has holds).
pub fn rule_matches(rs: &RuleSet, rule: &Rule, pkt: &PacketFields) -> bool {
    addr_holds(rs, &rule.src, pkt.src)
        && addr_holds(rs, &rule.dst, pkt.dst)
        && rule.proto.is_none_or(|p| p == pkt.proto)
        && port_holds(&rule.sport, pkt.sport)
        && port_holds(&rule.dport, pkt.dport)
}

/// Index in `rs.rules` of the first rule that matches.
pub fn match_fields(rs: &RuleSet, pkt: &PacketFields) -> Option<usize> {
    rs.rules.iter().position(|r| rule_matches(rs, r, pkt))
}

/// The verdict for an IP packet's fields: first matching rule, else the default policy.
pub fn verdict_for(rs: &RuleSet, pkt: &PacketFields) -> RefVerdict {
    let rule = match_fields(rs, pkt);
    let action = rule.map_or(rs.default, |i| rs.rules[i].action);
    let stat = match (rule, action) {
        (Some(_), Action::Allow) => stat::RULE_ALLOW,
        (Some(_), Action::Deny) => stat::RULE_DENY,
        (None, Action::Allow) => stat::DEFAULT_ALLOW,
        (None, Action::Deny) => stat::DEFAULT_DENY,
    };
    RefVerdict { action: action.xdp(), rule, stat, frag: pkt.frag.stat() }
}

/// What the XDP program must decide for `frame` under `rs`.
pub fn classify(rs: &RuleSet, frame: &[u8]) -> RefVerdict {
    match parse_frame(frame) {
        Err(stat) => RefVerdict { action: xdp_action::DROP, rule: None, stat, frag: None },
        Ok(None) => RefVerdict { action: xdp_action::PASS, rule: None, stat: stat::NON_IP, frag: None },
        Ok(Some(pkt)) => verdict_for(rs, &pkt),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::fw::rules::parse_str;

    // Frame builders. Checksums are not filled in: neither parser looks at them.

    fn eth(ethertype: u16, tags: &[u16], payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
        for &tpid in tags {
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&[0x00, 0x64]); // TCI: VLAN 100
        }
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn tcp(sport: u16, dport: u16, doff_words: u8) -> Vec<u8> {
        let mut h = vec![0u8; (usize::from(doff_words) * 4).max(20)];
        h[0..2].copy_from_slice(&sport.to_be_bytes());
        h[2..4].copy_from_slice(&dport.to_be_bytes());
        h[12] = doff_words << 4;
        h
    }

    fn udp(sport: u16, dport: u16) -> Vec<u8> {
        let mut h = vec![0u8; 8];
        h[0..2].copy_from_slice(&sport.to_be_bytes());
        h[2..4].copy_from_slice(&dport.to_be_bytes());
        h
    }

    /// IPv4 header (with `options` bytes, a multiple of 4) and payload.
    fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, frag: u16, options: &[u8], payload: &[u8]) -> Vec<u8> {
        let hl = 20 + options.len();
        let mut h = vec![0u8; hl];
        h[0] = 0x40 | (hl / 4) as u8;
        h[2..4].copy_from_slice(&((hl + payload.len()) as u16).to_be_bytes());
        h[6..8].copy_from_slice(&frag.to_be_bytes());
        h[8] = 64;
        h[9] = proto;
        h[12..16].copy_from_slice(&src);
        h[16..20].copy_from_slice(&dst);
        h[20..].copy_from_slice(options);
        h.extend_from_slice(payload);
        h
    }

    fn ipv6(src: &str, dst: &str, next: u8, payload: &[u8]) -> Vec<u8> {
        let mut h = vec![0u8; 40];
        h[0] = 0x60;
        h[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
        h[6] = next;
        h[7] = 64;
        h[8..24].copy_from_slice(&src.parse::<Ipv6Addr>().unwrap().octets());
        h[24..40].copy_from_slice(&dst.parse::<Ipv6Addr>().unwrap().octets());
        h.extend_from_slice(payload);
        h
    }

    /// An extension header of kind `kind` (not 44) announcing `next`, `units` length units long.
    fn ext(kind: u8, next: u8, len_field: u8) -> Vec<u8> {
        let total = if kind == 51 { (usize::from(len_field) + 2) * 4 } else { (usize::from(len_field) + 1) * 8 };
        let mut h = vec![0u8; total];
        h[0] = next;
        h[1] = len_field;
        h
    }

    fn frag6(next: u8, offset: u16, more: bool) -> Vec<u8> {
        let mut h = vec![0u8; 8];
        h[0] = next;
        h[2..4].copy_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
        h[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        h
    }

    const A: [u8; 4] = [192, 0, 2, 1];
    const B: [u8; 4] = [198, 51, 100, 2];

    fn v4_tcp(sport: u16, dport: u16) -> Vec<u8> {
        eth(0x0800, &[], &ipv4(A, B, 6, 0, &[], &tcp(sport, dport, 5)))
    }

    fn fields(frame: &[u8]) -> PacketFields {
        parse_frame(frame).expect("well-formed").expect("IP")
    }

    #[test]
    fn ethernet_and_vlan() {
        assert_eq!(parse_frame(&[0u8; 13]), Err(stat::MALFORMED_ETH));
        assert_eq!(parse_frame(&[]), Err(stat::MALFORMED_ETH));
        // ARP, LLDP: not IP, passed.
        assert_eq!(parse_frame(&eth(0x0806, &[], &[0u8; 28])), Ok(None));
        assert_eq!(parse_frame(&eth(0x88cc, &[], &[])), Ok(None));
        let inner = ipv4(A, B, 17, 0, &[], &udp(53, 5353));
        for tags in [&[0x8100][..], &[0x88a8], &[0x88a8, 0x8100], &[0x8100, 0x8100]] {
            let p = fields(&eth(0x0800, tags, &inner));
            assert_eq!((p.proto, p.sport, p.dport), (17, Some(53), Some(5353)), "tags {tags:?}");
        }
        assert_eq!(parse_frame(&eth(0x0800, &[0x8100, 0x88a8, 0x8100], &inner)), Err(stat::MALFORMED_VLAN));
        // A tag cut short: the TPID is there, the inner ethertype is not.
        let mut f = eth(0x0800, &[0x8100], &[]);
        f.truncate(16);
        assert_eq!(parse_frame(&f), Err(stat::MALFORMED_VLAN));
        f.truncate(14);
        assert_eq!(parse_frame(&f), Err(stat::MALFORMED_VLAN));
        // Two tags then a non-IP ethertype.
        assert_eq!(parse_frame(&eth(0x0806, &[0x88a8, 0x8100], &[])), Ok(None));
    }

    #[test]
    fn ipv4_headers() {
        let p = fields(&v4_tcp(1234, 80));
        assert_eq!(
            p,
            PacketFields {
                family: 4,
                src: IpAddr::V4(Ipv4Addr::from(A)),
                dst: IpAddr::V4(Ipv4Addr::from(B)),
                proto: 6,
                sport: Some(1234),
                dport: Some(80),
                frag: Frag::None,
            }
        );
        // Options: the ports are found after IHL*4 bytes.
        let p = fields(&eth(0x0800, &[], &ipv4(A, B, 17, 0, &[1, 1, 1, 0, 7, 7, 7, 7], &udp(7, 9))));
        assert_eq!((p.sport, p.dport), (Some(7), Some(9)));
        let bad = |mutate: &dyn Fn(&mut Vec<u8>)| {
            let mut ip = ipv4(A, B, 6, 0, &[], &tcp(1, 2, 5));
            mutate(&mut ip);
            parse_frame(&eth(0x0800, &[], &ip))
        };
        assert_eq!(bad(&|ip| ip[0] = 0x65), Err(stat::MALFORMED_IPV4), "version 6 in an IPv4 ethertype");
        assert_eq!(bad(&|ip| ip[0] = 0x44), Err(stat::MALFORMED_IPV4), "IHL 4");
        assert_eq!(bad(&|ip| ip[2..4].copy_from_slice(&19u16.to_be_bytes())), Err(stat::MALFORMED_IPV4));
        assert!(bad(&|ip| ip[2..4].copy_from_slice(&20u16.to_be_bytes())).is_ok(), "total length = header");
        // IHL 15: 60 bytes of header, more than the 40 the frame has after the IP start.
        assert_eq!(bad(&|ip| ip[0] = 0x4f), Err(stat::MALFORMED_IPV4));
        // IHL 10: the 40-byte header fits the frame, but the TCP header after it does not.
        assert_eq!(
            bad(&|ip| {
                ip[0] = 0x4a;
                ip[2..4].copy_from_slice(&40u16.to_be_bytes());
            }),
            Err(stat::MALFORMED_L4)
        );
        assert_eq!(parse_frame(&eth(0x0800, &[], &[0x45; 19])), Err(stat::MALFORMED_IPV4));
    }

    #[test]
    fn ipv4_fragments() {
        // Later fragment: no ports, and the (absent) L4 header is not checked.
        let p = fields(&eth(0x0800, &[], &ipv4(A, B, 6, 185, &[], &[])));
        assert_eq!((p.proto, p.sport, p.dport, p.frag), (6, None, None, Frag::Later));
        let p = fields(&eth(0x0800, &[], &ipv4(A, B, 17, 0x2000 | 1, &[], &[1, 2])));
        assert_eq!(p.frag, Frag::Later, "MF and an offset: still a later fragment");
        // First fragment: ports as usual, L4 checked.
        let p = fields(&eth(0x0800, &[], &ipv4(A, B, 6, 0x2000, &[], &tcp(5, 6, 5))));
        assert_eq!((p.sport, p.dport, p.frag), (Some(5), Some(6), Frag::First));
        assert_eq!(parse_frame(&eth(0x0800, &[], &ipv4(A, B, 6, 0x2000, &[], &[0; 19]))), Err(stat::MALFORMED_L4));
        // DF alone is no fragment.
        let p = fields(&eth(0x0800, &[], &ipv4(A, B, 6, 0x4000, &[], &tcp(5, 6, 5))));
        assert_eq!(p.frag, Frag::None);
    }

    #[test]
    fn l4_headers() {
        let v4 = |proto: u8, l4: &[u8]| parse_frame(&eth(0x0800, &[], &ipv4(A, B, proto, 0, &[], l4)));
        assert_eq!(v4(6, &tcp(1, 2, 5)[..19]), Err(stat::MALFORMED_L4));
        assert_eq!(v4(6, &tcp(1, 2, 4)), Err(stat::MALFORMED_L4), "data offset 4");
        let mut short_opts = tcp(1, 2, 8);
        short_opts.truncate(31);
        assert_eq!(v4(6, &short_opts), Err(stat::MALFORMED_L4), "data offset beyond the frame");
        assert_eq!(v4(6, &tcp(1, 2, 8)).unwrap().unwrap().dport, Some(2), "TCP options");
        assert_eq!(v4(17, &[0; 7]), Err(stat::MALFORMED_L4));
        assert_eq!(v4(1, &[0; 3]), Err(stat::MALFORMED_L4));
        assert_eq!(v4(58, &[0; 3]), Err(stat::MALFORMED_L4), "ICMPv6 number in IPv4 is checked too");
        let p = v4(1, &[8, 0, 0, 0]).unwrap().unwrap();
        assert_eq!((p.proto, p.sport, p.dport), (1, None, None));
        let p = v4(47, &[]).unwrap().unwrap();
        assert_eq!((p.proto, p.sport), (47, None), "other protocols: no check, no ports");
    }

    #[test]
    fn ipv6_headers_and_extensions() {
        let s = "2001:db8::1";
        let d = "2001:db8::2";
        let p = fields(&eth(0x86dd, &[], &ipv6(s, d, 17, &udp(1, 2))));
        assert_eq!((p.family, p.proto, p.sport, p.dport, p.frag), (6, 17, Some(1), Some(2), Frag::None));
        assert_eq!(p.src, IpAddr::V6(s.parse().unwrap()));
        assert_eq!(p.dst, IpAddr::V6(d.parse().unwrap()));
        let mut v = ipv6(s, d, 17, &udp(1, 2));
        v[0] = 0x40;
        assert_eq!(parse_frame(&eth(0x86dd, &[], &v)), Err(stat::MALFORMED_IPV6));
        assert_eq!(parse_frame(&eth(0x86dd, &[], &ipv6(s, d, 59, &[])[..39])), Err(stat::MALFORMED_IPV6));
        // No next header (59): no L4.
        assert_eq!(fields(&eth(0x86dd, &[], &ipv6(s, d, 59, &[]))).proto, 59);

        // Hop-by-hop → routing (2 units) → AH (len 4: 24 bytes) → destination options → TCP.
        let mut chain = ext(0, 43, 0);
        chain.extend(ext(43, 51, 2));
        chain.extend(ext(51, 60, 4));
        chain.extend(ext(60, 6, 0));
        chain.extend(tcp(443, 8443, 5));
        let p = fields(&eth(0x86dd, &[0x8100], &ipv6(s, d, 0, &chain)));
        assert_eq!((p.proto, p.sport, p.dport), (6, Some(443), Some(8443)));

        // Eight extension headers are walked; a ninth is malformed.
        let chain_of = |n: usize| {
            let mut c = Vec::new();
            for i in 0..n {
                c.extend(ext(60, if i + 1 == n { 17 } else { 60 }, 0));
            }
            c.extend(udp(3, 4));
            c
        };
        assert_eq!(fields(&eth(0x86dd, &[], &ipv6(s, d, 60, &chain_of(8)))).dport, Some(4));
        assert_eq!(parse_frame(&eth(0x86dd, &[], &ipv6(s, d, 60, &chain_of(9)))), Err(stat::MALFORMED_IPV6_EXT));
        // Every extension kind counts toward the eight, the fragment header too.
        let mut c = frag6(60, 0, false);
        c.extend(chain_of(7));
        assert_eq!(fields(&eth(0x86dd, &[], &ipv6(s, d, 44, &c))).dport, Some(4));
        let mut c = frag6(60, 0, false);
        c.extend(chain_of(8));
        assert_eq!(parse_frame(&eth(0x86dd, &[], &ipv6(s, d, 44, &c))), Err(stat::MALFORMED_IPV6_EXT));

        // Cut short: the header's first two bytes, then its announced length.
        for kind in [0u8, 43, 51, 60, 135, 139, 140] {
            let mut c = ext(kind, 17, 1);
            let full = c.len();
            c.extend(udp(1, 2));
            assert!(parse_frame(&eth(0x86dd, &[], &ipv6(s, d, kind, &c))).is_ok(), "kind {kind}");
            for cut in [1, full - 1] {
                assert_eq!(
                    parse_frame(&eth(0x86dd, &[], &ipv6(s, d, kind, &c[..cut]))),
                    Err(stat::MALFORMED_IPV6_EXT),
                    "kind {kind} cut at {cut}"
                );
            }
        }
        // An extension header, then a cut UDP header: L4.
        let mut c = ext(0, 17, 0);
        c.extend(&udp(1, 2)[..7]);
        assert_eq!(parse_frame(&eth(0x86dd, &[], &ipv6(s, d, 0, &c))), Err(stat::MALFORMED_L4));
    }

    #[test]
    fn ipv6_fragments() {
        let s = "2001:db8::1";
        let d = "2001:db8::2";
        // Later fragment: the walk stops, proto is the fragment's next header, no ports.
        let p = fields(&eth(0x86dd, &[], &ipv6(s, d, 44, &frag6(6, 100, true))));
        assert_eq!((p.proto, p.sport, p.frag), (6, None, Frag::Later));
        // What follows a later fragment is payload, even if it looks like a header.
        let mut c = frag6(60, 3, false);
        c.extend([0xff; 3]);
        let p = fields(&eth(0x86dd, &[], &ipv6(s, d, 44, &c)));
        assert_eq!((p.proto, p.frag), (60, Frag::Later));
        // First fragment: ports, L4 checked.
        let mut c = frag6(17, 0, true);
        c.extend(udp(10, 20));
        let p = fields(&eth(0x86dd, &[], &ipv6(s, d, 44, &c)));
        assert_eq!((p.proto, p.sport, p.dport, p.frag), (17, Some(10), Some(20), Frag::First));
        let mut c = frag6(17, 0, true);
        c.extend(&udp(10, 20)[..4]);
        assert_eq!(parse_frame(&eth(0x86dd, &[], &ipv6(s, d, 44, &c))), Err(stat::MALFORMED_L4));
        // Offset 0 without M (an atomic fragment): no fragment.
        let mut c = frag6(17, 0, false);
        c.extend(udp(10, 20));
        assert_eq!(fields(&eth(0x86dd, &[], &ipv6(s, d, 44, &c))).frag, Frag::None);
        // Fragment header cut short.
        assert_eq!(
            parse_frame(&eth(0x86dd, &[], &ipv6(s, d, 44, &frag6(6, 100, true)[..7]))),
            Err(stat::MALFORMED_IPV6_EXT)
        );
    }

    #[test]
    fn truncation_at_every_offset() {
        // Ethernet (14) + one tag (4) + IPv4 with 4 option bytes (24) + TCP with 4 option bytes (24).
        let f = eth(0x0800, &[0x8100], &ipv4(A, B, 6, 0, &[1, 1, 1, 1], &tcp(1, 2, 6)));
        assert_eq!(f.len(), 66);
        for len in 0..f.len() {
            let want = match len {
                0..14 => stat::MALFORMED_ETH,
                14..18 => stat::MALFORMED_VLAN,
                18..42 => stat::MALFORMED_IPV4,
                _ => stat::MALFORMED_L4,
            };
            assert_eq!(parse_frame(&f[..len]), Err(want), "cut at {len}");
        }
        assert!(parse_frame(&f).is_ok());
        // IPv6 + hop-by-hop (8) + UDP.
        let mut c = ext(0, 17, 0);
        c.extend(udp(1, 2));
        let f = eth(0x86dd, &[], &ipv6("::1", "::2", 0, &c));
        for len in 0..f.len() {
            let want = match len {
                0..14 => stat::MALFORMED_ETH,
                14..54 => stat::MALFORMED_IPV6,
                54..62 => stat::MALFORMED_IPV6_EXT,
                _ => stat::MALFORMED_L4,
            };
            assert_eq!(parse_frame(&f[..len]), Err(want), "cut at {len}");
        }
    }

    fn rules() -> RuleSet {
        parse_str(
            r#"default = "deny"
[sets]
bad = ["192.0.2.0/24", "2001:db8:bad::/48"]
[[rule]]
action = "deny"
src = "@bad"
[[rule]]
action = "allow"
proto = "tcp"
dport = [80, "443"]
[[rule]]
action = "allow"
proto = "icmp"
[[rule]]
action = "allow"
proto = "udp"
"#,
            Path::new("t.toml"),
        )
        .unwrap()
    }

    #[test]
    fn verdicts_and_counters() {
        let rs = rules();
        let v = |f: &[u8]| classify(&rs, f);
        // Source 192.0.2.1 is in @bad.
        assert_eq!(
            v(&v4_tcp(1, 80)),
            RefVerdict { action: xdp_action::DROP, rule: Some(0), stat: stat::RULE_DENY, frag: None }
        );
        let from =
            |src: [u8; 4], proto: u8, frag: u16, l4: &[u8]| eth(0x0800, &[], &ipv4(src, B, proto, frag, &[], l4));
        let ok = [203, 0, 113, 9];
        assert_eq!(
            v(&from(ok, 6, 0, &tcp(1, 443, 5))),
            RefVerdict { action: xdp_action::PASS, rule: Some(1), stat: stat::RULE_ALLOW, frag: None }
        );
        assert_eq!(
            v(&from(ok, 6, 0, &tcp(1, 22, 5))),
            RefVerdict { action: xdp_action::DROP, rule: None, stat: stat::DEFAULT_DENY, frag: None }
        );
        assert_eq!(v(&from(ok, 1, 0, &[8, 0, 0, 0])).rule, Some(2));
        // A later TCP fragment has no port: rule 1 cannot match it.
        assert_eq!(
            v(&from(ok, 6, 100, &[])),
            RefVerdict {
                action: xdp_action::DROP,
                rule: None,
                stat: stat::DEFAULT_DENY,
                frag: Some(stat::FRAGMENT_LATER)
            }
        );
        // A later UDP fragment matches the port-less UDP rule.
        assert_eq!(
            v(&from(ok, 17, 100, &[])),
            RefVerdict {
                action: xdp_action::PASS,
                rule: Some(3),
                stat: stat::RULE_ALLOW,
                frag: Some(stat::FRAGMENT_LATER)
            }
        );
        assert_eq!(v(&from(ok, 6, 0x2000, &tcp(1, 80, 5))).frag, Some(stat::FRAGMENT_FIRST));
        // Malformed: dropped, counted as such, never as a fragment.
        assert_eq!(
            v(&from(ok, 6, 0x2000, &[0; 10])),
            RefVerdict { action: xdp_action::DROP, rule: None, stat: stat::MALFORMED_L4, frag: None }
        );
        assert_eq!(
            v(&eth(0x0806, &[], &[0; 28])),
            RefVerdict { action: xdp_action::PASS, rule: None, stat: stat::NON_IP, frag: None }
        );
        // IPv6 from the bad /48, and from elsewhere.
        assert_eq!(v(&eth(0x86dd, &[], &ipv6("2001:db8:bad::7", "::1", 17, &udp(1, 2)))).rule, Some(0));
        assert_eq!(v(&eth(0x86dd, &[], &ipv6("2001:db8:bae::7", "::1", 17, &udp(1, 2)))).rule, Some(3));
        // An IPv4-mapped address is IPv6, outside any IPv4 prefix.
        assert_eq!(v(&eth(0x86dd, &[], &ipv6("::ffff:192.0.2.1", "::1", 17, &udp(1, 2)))).rule, Some(3));

        let mut allow = rs.clone();
        allow.default = Action::Allow;
        assert_eq!(
            classify(&allow, &from(ok, 6, 0, &tcp(1, 22, 5))),
            RefVerdict { action: xdp_action::PASS, rule: None, stat: stat::DEFAULT_ALLOW, frag: None }
        );
    }

    /// The database zone's example rule file (examples/db.rules.toml, shown in the README):
    /// only the application tier reaches the MySQL ports; the database servers' answers come
    /// back; nothing else does.
    #[test]
    fn example_database_zone_rules() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/db.rules.toml");
        let rs = crate::fw::rules::parse_file(std::path::Path::new(path)).unwrap();
        let tcp = |src: &str, sport: u16, dport: u16| PacketFields {
            family: 4,
            src: src.parse().unwrap(),
            dst: "10.0.2.1".parse().unwrap(),
            proto: 6,
            sport: Some(sport),
            dport: Some(dport),
            frag: Frag::None,
        };
        let allowed = |p: PacketFields| verdict_for(&rs, &p).action == Action::Allow.xdp();
        assert!(allowed(tcp("10.0.1.7", 40000, 3306)), "app tier to the rw port");
        assert!(allowed(tcp("10.0.1.7", 40000, 3307)), "app tier to the ro port");
        assert!(allowed(tcp("10.0.3.41", 3306, 51000)), "a database server's answer");
        assert!(!allowed(tcp("10.0.1.7", 40000, 22)), "app tier to SSH");
        assert!(!allowed(tcp("10.0.3.41", 40000, 3306)), "a database server opening a connection to the router");
        assert!(!allowed(tcp("10.0.3.99", 3306, 51000)), "an unknown host posing as a database server");
        assert!(!allowed(tcp("10.0.2.50", 40000, 3306)), "another host of the zone");
    }
}
