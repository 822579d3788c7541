//! Seeded random rule sets and random frames for the differential test.
//!
//! Both draw from one [`Universe`] of anchor addresses and ports, so packets land inside, on the
//! edge of, and just outside the rules' prefixes and port ranges: most packets match some rule
//! and many match several (first match wins is what is being tested). Frames include VLAN tags,
//! IPv4 options, IPv6 extension chains, fragments and malformed headers.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use rampart::fw::rules::{Action, AddrItem, AddrMatch, Cidr, PortRange, Rule, RuleSet};
use rand::{Rng, seq::SliceRandom};

use crate::packet::{
    self, ETH_P_8021AD, ETH_P_8021Q, ETH_P_LLDP, Ext, Frame, IPPROTO_GRE, IPPROTO_ICMP,
    IPPROTO_ICMPV6, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, Packet, Transport,
};

/// Anchor addresses and ports shared by a rule set and the packets thrown at it.
#[derive(Clone, Debug)]
pub struct Universe {
    pub v4: Vec<[u8; 4]>,
    pub v6: Vec<[u8; 16]>,
    pub ports: Vec<u16>,
    /// Prefix lengths rules draw from. Half the universes use /0 and at most three others, so
    /// the address tables fit the kernel's hash lookup (at most `ADDR_HASH_LENS` lengths); the
    /// rest use all, so most tables with several prefixes need the LPM trie.
    pub lens4: Vec<u8>,
    pub lens6: Vec<u8>,
}

const LENS4: [u8; 12] = [0, 8, 12, 16, 20, 24, 24, 28, 30, 31, 32, 32];
const LENS6: [u8; 12] = [0, 16, 32, 48, 64, 64, 96, 112, 120, 127, 128, 128];

fn lens(rng: &mut impl Rng, all: &[u8]) -> Vec<u8> {
    if rng.gen_bool(0.5) {
        return all.to_vec();
    }
    let mut few = vec![0];
    few.extend((0..rng.gen_range(1..=3)).map(|_| *all[1..].choose(rng).expect("non-empty")));
    few
}

impl Universe {
    pub fn random(rng: &mut impl Rng) -> Self {
        // A few anchors share their upper bits, so prefixes around them overlap.
        let base4: [u8; 4] = rng.r#gen();
        let v4 = (0..8)
            .map(|i| {
                let mut a = if i < 4 { base4 } else { rng.r#gen() };
                if i < 4 {
                    a[2 + (i % 2)] = rng.r#gen();
                    a[3] = rng.r#gen();
                }
                a
            })
            .collect();
        let base6: [u8; 16] = rng.r#gen();
        let v6 = (0..8)
            .map(|i| {
                let mut a = if i < 4 { base6 } else { rng.r#gen() };
                if i < 4 {
                    for b in &mut a[6 + 2 * i..] {
                        *b = rng.r#gen();
                    }
                }
                a
            })
            .collect();
        let mut ports: Vec<u16> = vec![0, 1, 53, 80, 443, 1024, 65535];
        ports.extend((0..6).map(|_| rng.gen_range(1..65535)));
        let (lens4, lens6) = (lens(rng, &LENS4), lens(rng, &LENS6));
        Universe { v4, v6, ports, lens4, lens6 }
    }

    /// An IPv4 address near an anchor: the anchor's top bits, random below.
    pub fn addr4(&self, rng: &mut impl Rng) -> [u8; 4] {
        if rng.gen_bool(0.08) {
            return rng.r#gen();
        }
        let a = *self.v4.choose(rng).expect("anchors");
        let keep = *[32u8, 32, 32, 31, 30, 28, 24, 24, 20, 16, 8, 0].choose(rng).expect("non-empty");
        let r: [u8; 4] = rng.r#gen();
        mix(&a, &r, keep)
    }

    pub fn addr6(&self, rng: &mut impl Rng) -> [u8; 16] {
        if rng.gen_bool(0.08) {
            return rng.r#gen();
        }
        let a = *self.v6.choose(rng).expect("anchors");
        let keep = *[128u8, 128, 128, 127, 120, 112, 96, 64, 64, 48, 32, 0].choose(rng).expect("non-empty");
        let r: [u8; 16] = rng.r#gen();
        mix(&a, &r, keep)
    }

    /// A port at or next to an anchor port, sometimes anything.
    pub fn port(&self, rng: &mut impl Rng) -> u16 {
        if rng.gen_bool(0.12) {
            return rng.r#gen();
        }
        let p = *self.ports.choose(rng).expect("anchors");
        match rng.gen_range(0..6) {
            0 => p.wrapping_sub(1),
            1 => p.wrapping_add(1),
            _ => p,
        }
    }
}

/// The first `keep` bits of `a`, then the rest of `r`.
fn mix<const N: usize>(a: &[u8; N], r: &[u8; N], keep: u8) -> [u8; N] {
    let mut out = [0u8; N];
    for i in 0..N {
        let bits = (keep as usize).saturating_sub(i * 8).min(8);
        let mask = if bits == 0 { 0 } else { 0xffu8 << (8 - bits) };
        out[i] = (a[i] & mask) | (r[i] & !mask);
    }
    out
}

/// `addr` with every bit past `len` cleared.
fn masked<const N: usize>(addr: &[u8; N], len: u8) -> [u8; N] {
    mix(addr, &[0; N], len)
}

fn cidr4(u: &Universe, rng: &mut impl Rng) -> Cidr {
    let len = *u.lens4.choose(rng).expect("non-empty");
    let a = masked(&u.addr4(rng), len);
    Cidr { addr: IpAddr::V4(Ipv4Addr::from(a)), len }
}

fn cidr6(u: &Universe, rng: &mut impl Rng) -> Cidr {
    let len = *u.lens6.choose(rng).expect("non-empty");
    let a = masked(&u.addr6(rng), len);
    Cidr { addr: IpAddr::V6(Ipv6Addr::from(a)), len }
}

fn cidr(u: &Universe, rng: &mut impl Rng) -> Cidr {
    if rng.gen_bool(0.6) { cidr4(u, rng) } else { cidr6(u, rng) }
}

fn cidrs(u: &Universe, rng: &mut impl Rng, max: usize) -> Vec<Cidr> {
    (0..rng.gen_range(1..=max)).map(|_| cidr(u, rng)).collect()
}

fn ports(u: &Universe, rng: &mut impl Rng) -> Vec<PortRange> {
    (0..rng.gen_range(1..=3))
        .map(|_| match rng.gen_range(0..10) {
            0 => PortRange { lo: 0, hi: 65535 },
            1..=4 => {
                let p = u.port(rng);
                PortRange { lo: p, hi: p }
            }
            _ => {
                let (a, b) = (u.port(rng), u.port(rng));
                PortRange { lo: a.min(b), hi: a.max(b) }
            }
        })
        .collect()
}

fn proto(rng: &mut impl Rng) -> Option<u8> {
    match rng.gen_range(0..20) {
        0..=6 => None,
        7..=10 => Some(IPPROTO_TCP),
        11..=14 => Some(IPPROTO_UDP),
        15 => Some(IPPROTO_ICMP),
        16 => Some(IPPROTO_ICMPV6),
        17 => Some(IPPROTO_GRE),
        18 => Some(IPPROTO_SCTP),
        _ => Some(rng.r#gen()),
    }
}

fn addr_match(u: &Universe, rng: &mut impl Rng, sets: &[String]) -> Option<AddrMatch> {
    let set = |rng: &mut _| AddrItem::Set(sets.choose(rng).expect("non-empty").clone());
    match rng.gen_range(0..20) {
        0..=8 => None,
        9..=10 if !sets.is_empty() => Some(AddrMatch::from_items(vec![set(rng)])),
        // A list mixing a set and prefixes (the union of its items).
        11 if !sets.is_empty() => {
            let mut items: Vec<AddrItem> = cidrs(u, rng, 2).into_iter().map(AddrItem::Cidr).collect();
            items.insert(rng.gen_range(0..=items.len()), set(rng));
            Some(AddrMatch::from_items(items))
        }
        _ => Some(AddrMatch::Cidrs(cidrs(u, rng, 3))),
    }
}

/// A rule drawn around the universe's anchors.
pub fn random_rule(u: &Universe, rng: &mut impl Rng, sets: &[String], id: u32) -> Rule {
    let proto = proto(rng);
    // Ports go with tcp, udp or any (the rule file refuses them with other protocols).
    let ports_ok = matches!(proto, None | Some(IPPROTO_TCP) | Some(IPPROTO_UDP));
    Rule {
        id,
        action: if rng.gen_bool(0.5) { Action::Allow } else { Action::Deny },
        src: addr_match(u, rng, sets),
        dst: addr_match(u, rng, sets),
        proto,
        sport: (ports_ok && rng.gen_bool(0.3)).then(|| ports(u, rng)),
        dport: (ports_ok && rng.gen_bool(0.55)).then(|| ports(u, rng)),
        comment: None,
    }
}

/// A rule that matches (almost) nothing the packet generator makes: a random /32 or /128
/// source far from the anchors. Used to push the interesting rules past the first bit-vector
/// words and summary words.
fn filler_rule(rng: &mut impl Rng, id: u32) -> Rule {
    let src = if rng.gen_bool(0.5) {
        Cidr { addr: IpAddr::V4(Ipv4Addr::from(rng.r#gen::<[u8; 4]>())), len: 32 }
    } else {
        Cidr { addr: IpAddr::V6(Ipv6Addr::from(rng.r#gen::<[u8; 16]>())), len: 128 }
    };
    Rule {
        id,
        action: if rng.gen_bool(0.5) { Action::Allow } else { Action::Deny },
        src: Some(AddrMatch::Cidrs(vec![src])),
        dst: None,
        proto: proto(rng),
        sport: None,
        dport: None,
        comment: None,
    }
}

/// A random rule set with `rules` rules drawn around `u`, of which the first `filler` are
/// filler rules that packets rarely match. The result passes `RuleSet::validate`.
pub fn random_ruleset(u: &Universe, rng: &mut impl Rng, rules: usize, filler: usize) -> RuleSet {
    let mut sets = BTreeMap::new();
    for i in 0..rng.gen_range(0..=3) {
        sets.insert(format!("set{i}"), cidrs(u, rng, 6));
    }
    let names: Vec<String> = sets.keys().cloned().collect();
    let rules = (0..rules)
        .map(|i| {
            let id = i as u32 + 1;
            if i < filler { filler_rule(rng, id) } else { random_rule(u, rng, &names, id) }
        })
        .collect();
    RuleSet { default: if rng.gen_bool(0.5) { Action::Allow } else { Action::Deny }, sets, rules }
}

/// A rule set of the keyed shape (`rampart_common::fw::SLOT_KEYED`): every rule tests one
/// address field (src, or dst for the whole set), the rare rule no address, and mostly at most
/// two ranges per port. Nested prefixes or many unaddressed rules can still make a class list more
/// than `KEYED_MAX` rules: the compiler then takes the general path, which is checked too.
pub fn random_keyed_ruleset(u: &Universe, rng: &mut impl Rng, rules: usize) -> RuleSet {
    let mut sets = BTreeMap::new();
    for i in 0..rng.gen_range(0..=2) {
        sets.insert(format!("set{i}"), cidrs(u, rng, 4));
    }
    let names: Vec<String> = sets.keys().cloned().collect();
    let dst = rng.gen_bool(0.3);
    let rules = (0..rules)
        .map(|i| {
            let mut r = random_rule(u, rng, &names, i as u32 + 1);
            let mut addr = addr_match(u, rng, &names);
            while addr.is_none() && rng.gen_bool(0.9) {
                addr = addr_match(u, rng, &names);
            }
            (r.src, r.dst) = if dst { (None, addr) } else { (addr, None) };
            // `ports` gives 1-3 ranges: 3 makes the set general (also compared).
            if rng.gen_bool(0.8) {
                r.sport = r.sport.map(|p| p[..p.len().min(2)].to_vec());
                r.dport = r.dport.map(|p| p[..p.len().min(2)].to_vec());
            }
            r
        })
        .collect();
    RuleSet { default: if rng.gen_bool(0.5) { Action::Allow } else { Action::Deny }, sets, rules }
}

fn transport(u: &Universe, rng: &mut impl Rng, v6: bool) -> Transport {
    match rng.gen_range(0..20) {
        0..=7 => Transport::Tcp {
            sport: u.port(rng),
            dport: u.port(rng),
            flags: packet::TCP_SYN,
            seq: rng.r#gen(),
            options: if rng.gen_bool(0.2) { vec![1; rng.gen_range(1..=40)] } else { Vec::new() },
            doff: None,
        },
        8..=14 => Transport::Udp { sport: u.port(rng), dport: u.port(rng) },
        // The "wrong" ICMP for the family now and then: the protocol number is what counts.
        15..=16 => if v6 ^ rng.gen_bool(0.1) {
            Transport::Icmpv6 { ty: 128, code: 0 }
        } else {
            Transport::Icmp { ty: 8, code: 0 }
        },
        17 => Transport::Raw { proto: IPPROTO_GRE },
        18 => Transport::Raw { proto: IPPROTO_SCTP },
        _ => Transport::Raw { proto: rng.r#gen() },
    }
}

fn random_ext(rng: &mut impl Rng) -> Ext {
    match rng.gen_range(0..8) {
        0 => Ext::HopByHop { len: rng.gen_range(0..3) },
        1 => Ext::Routing { len: rng.gen_range(0..3) },
        2 | 3 => Ext::DestOpts { len: rng.gen_range(0..3) },
        4 => Ext::Ah { len: rng.gen_range(1..6) },
        5 => Ext::Fragment { offset: 0, more: rng.gen_bool(0.5), id: rng.r#gen() },
        _ => Ext::Generic { kind: *[135u8, 139, 140].choose(rng).expect("non-empty"), len: rng.gen_range(0..2) },
    }
}

/// A random frame: mostly well-formed IP traffic around `u`'s anchors, plus non-IP, VLAN-tagged,
/// optioned, extension-headed, fragmented, malformed and truncated cases. Never shorter than an
/// Ethernet header (BPF_PROG_TEST_RUN refuses those).
pub fn random_frame(u: &Universe, rng: &mut impl Rng) -> Frame {
    if rng.gen_bool(0.03) {
        let p = match rng.gen_range(0..3) {
            0 => Packet::arp(),
            1 => Packet::other(ETH_P_LLDP, vec![0; 20]),
            _ => Packet::other(rng.r#gen(), vec![0; rng.gen_range(0..30)]),
        };
        return maybe_tag(p, rng).build();
    }
    let v6 = rng.gen_bool(0.4);
    let t = transport(u, rng, v6);
    let mut p = if v6 {
        Packet::ipv6(Ipv6Addr::from(u.addr6(rng)), Ipv6Addr::from(u.addr6(rng)), t)
    } else {
        Packet::ipv4(Ipv4Addr::from(u.addr4(rng)), Ipv4Addr::from(u.addr4(rng)), t)
    };
    p = p.payload_len(rng.gen_range(0..48));
    p = maybe_tag(p, rng);
    if v6 {
        if rng.gen_bool(0.15) {
            let n = *[1usize, 1, 2, 3, 4, 7, 8, 8, 9, 10].choose(rng).expect("non-empty");
            for _ in 0..n {
                p = p.ext(random_ext(rng));
            }
        }
        if rng.gen_bool(0.08) {
            let later = rng.gen_bool(0.5);
            p = p.fragment(if later { rng.gen_range(1..8000) } else { 0 }, !later || rng.gen_bool(0.5));
        }
        if rng.gen_bool(0.01) {
            p.v6_mut().version = rng.gen_range(0..16);
        }
    } else {
        if rng.gen_bool(0.1) {
            p = p.ipv4_options(vec![1u8; rng.gen_range(1..=40)]);
        }
        if rng.gen_bool(0.08) {
            let later = rng.gen_bool(0.5);
            p = p.fragment(if later { rng.gen_range(1..8000) } else { 0 }, !later || rng.gen_bool(0.5));
        }
        if rng.gen_bool(0.05) {
            p.v4_mut().dont_frag = true;
        }
        match rng.gen_range(0..100) {
            0 => p.v4_mut().ihl = Some(rng.gen_range(0..5)),
            1 => p.v4_mut().version = rng.gen_range(0..16),
            2 => p.v4_mut().tot_len = Some(rng.gen_range(0..30)),
            3 => p.v4_mut().ihl = Some(rng.gen_range(6..16)),
            _ => {}
        }
    }
    if rng.gen_bool(0.02)
        && let Some(Transport::Tcp { doff, .. }) = &mut p.transport
    {
        *doff = Some(rng.gen_range(0..16));
    }
    let mut f = p.build();
    if rng.gen_bool(0.06) && f.len() > packet::ETH_HLEN {
        // Mostly near a header's edges, where parsers go wrong; sometimes anywhere.
        let inner: Vec<_> = f.headers.iter().filter(|h| h.start >= packet::ETH_HLEN).copied().collect();
        let n = match inner.choose(rng) {
            Some(h) if rng.gen_bool(0.8) => match rng.gen_range(0..4) {
                0 => h.start + rng.gen_range(0..=(h.end - h.start).min(8)),
                1 => h.end.saturating_sub(rng.gen_range(0..=2)),
                2 => h.end + 1,
                _ => rng.gen_range(h.start..=h.end),
            },
            _ => rng.gen_range(packet::ETH_HLEN..f.len()),
        };
        f.bytes.truncate(n.max(packet::ETH_HLEN));
    }
    f
}

fn maybe_tag(mut p: Packet, rng: &mut impl Rng) -> Packet {
    let tags = match rng.gen_range(0..100) {
        0..=11 => 1,
        12..=17 => 2,
        18..=19 => 3,
        _ => 0,
    };
    for _ in 0..tags {
        let tpid = if rng.gen_bool(0.5) { ETH_P_8021Q } else { ETH_P_8021AD };
        p = p.vlan(tpid, rng.gen_range(1..4095));
    }
    p
}
