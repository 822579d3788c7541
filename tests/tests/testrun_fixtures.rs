//! Table-driven test-run fixtures (in the manner of Katran's `katran_tester` fixtures): for each
//! parsing case, a frame, the verdict the README documents, the counters that must move and the
//! rule that must match. Every well-formed fixture is also cut at every length, and each cut
//! frame must get the verdict of the first header it cuts short (hand-written model below), the
//! same as `reference::classify`, from the XDP program via BPF_PROG_TEST_RUN.
//!
//! Needs root (BPF_PROG_TEST_RUN); fails with a clear message otherwise.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
};

use rampart::fw::{
    compile::{Layout, compile},
    reference::{self, RefVerdict},
    rules::{RuleSet, parse_str},
};
use rampart_common::{
    fw::{DEFAULT_WORDS, SLOT_KEYED, stat},
    xdp_action::{DROP, PASS},
};
use rampart_tests::{
    packet::{
        ETH_P_8021AD, ETH_P_8021Q, ETH_P_LLDP, Ext, Frame, HeaderKind, IPPROTO_FRAGMENT, IPPROTO_GRE,
        Packet, Transport,
    },
    testrun::FwTestRun,
};

/// The fixture rule set. Rule indexes (0-based) are what the fixtures name.
const RULES: &str = r#"
default = "deny"

[sets]
web = ["192.0.2.0/24", "2001:db8:1::/48"]

# 0: telnet is denied everywhere
[[rule]]
action = "deny"
proto = "tcp"
dport = 23

# 1: web servers
[[rule]]
action = "allow"
proto = "tcp"
dst = "@web"
dport = [80, 443]

# 2: answers from our resolver
[[rule]]
action = "allow"
proto = "udp"
src = "198.51.100.53"
sport = 53

# 3, 4
[[rule]]
action = "allow"
proto = "icmp"

[[rule]]
action = "allow"
proto = "icmpv6"

# 5: a bad host (after rule 1: its web traffic is still allowed, first match wins)
[[rule]]
action = "deny"
src = "203.0.113.66"

# 6: one host takes any TCP, no ports named: later fragments to it match
[[rule]]
action = "allow"
proto = "tcp"
dst = ["192.0.2.200", "2001:db8:1::200"]

# 7: a UDP port range on the v6 web net
[[rule]]
action = "allow"
proto = "udp"
dst = "2001:db8:1::/48"
dport = "1000-2000"
"#;

fn rules() -> RuleSet {
    parse_str(RULES, Path::new("fixtures.toml")).expect("fixture rule set parses")
}

fn runner(rs: &RuleSet) -> FwTestRun {
    let mut t = FwTestRun::new().unwrap_or_else(|e| panic!("{e}"));
    t.install(rs).unwrap_or_else(|e| panic!("install fixture rules: {e:?}"));
    t
}

const WEB4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const HOST200: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 200);
const OTHER4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const CLIENT4: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
const RESOLVER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 53);
const BAD: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 66);
const WEB6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 5);
const HOST200_6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x200);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 1);

/// What a frame must do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Expect {
    action: u32,
    stat: u32,
    frag: Option<u32>,
    rule: Option<usize>,
}

const fn allow(rule: usize) -> Expect {
    Expect { action: PASS, stat: stat::RULE_ALLOW, frag: None, rule: Some(rule) }
}
const fn deny(rule: usize) -> Expect {
    Expect { action: DROP, stat: stat::RULE_DENY, frag: None, rule: Some(rule) }
}
const DEFAULT_DENY: Expect = Expect { action: DROP, stat: stat::DEFAULT_DENY, frag: None, rule: None };
const NON_IP: Expect = Expect { action: PASS, stat: stat::NON_IP, frag: None, rule: None };
const fn malformed(stat: u32) -> Expect {
    Expect { action: DROP, stat, frag: None, rule: None }
}
impl Expect {
    const fn first(mut self) -> Self {
        self.frag = Some(stat::FRAGMENT_FIRST);
        self
    }
    const fn later(mut self) -> Self {
        self.frag = Some(stat::FRAGMENT_LATER);
        self
    }
}

impl From<RefVerdict> for Expect {
    fn from(v: RefVerdict) -> Self {
        Expect { action: v.action, stat: v.stat, frag: v.frag, rule: v.rule }
    }
}

struct Fixture {
    name: String,
    frame: Frame,
    expect: Expect,
    /// Cut at every length and check each cut against the hand-written model.
    sweep: bool,
}

fn fx(name: impl Into<String>, p: Packet, expect: Expect) -> Fixture {
    Fixture { name: name.into(), frame: p.build(), expect, sweep: true }
}

/// A fixture whose full frame is malformed: cuts are compared with the reference only.
fn fx_bad(name: impl Into<String>, p: Packet, expect: Expect) -> Fixture {
    Fixture { name: name.into(), frame: p.build(), expect, sweep: false }
}

fn web4(dport: u16) -> Packet {
    Packet::tcp4(CLIENT4, WEB4, 40000, dport).payload_len(10)
}

fn fixtures() -> Vec<Fixture> {
    let mut v = vec![
        // Plain L4 over IPv4 and IPv6.
        fx("tcp4 to a web server :80", web4(80), allow(1)),
        fx("tcp4 to a web server :443, no payload", Packet::tcp4(CLIENT4, WEB4, 1, 443), allow(1)),
        fx("tcp4 :23 is denied (rule 0 before rule 1)", web4(23), deny(0)),
        fx("tcp4 outside the web set: default", Packet::tcp4(CLIENT4, OTHER4, 40000, 80), DEFAULT_DENY),
        fx("udp4 from the resolver :53", Packet::udp4(RESOLVER, CLIENT4, 53, 33000).payload_len(20), allow(2)),
        fx("udp4 from the resolver, other sport: default", Packet::udp4(RESOLVER, CLIENT4, 54, 33000), DEFAULT_DENY),
        fx("icmp4 echo", Packet::icmp4(CLIENT4, OTHER4).payload_len(16), allow(3)),
        fx("tcp6 to a web server :443", Packet::tcp6(CLIENT6, WEB6, 40000, 443).payload_len(5), allow(1)),
        fx("udp6 into the port range (1000)", Packet::udp6(CLIENT6, WEB6, 5, 1000), allow(7)),
        fx("udp6 into the port range (2000)", Packet::udp6(CLIENT6, WEB6, 5, 2000), allow(7)),
        fx("udp6 past the port range (2001)", Packet::udp6(CLIENT6, WEB6, 5, 2001), DEFAULT_DENY),
        fx("icmpv6 echo", Packet::icmp6(CLIENT6, WEB6).payload_len(8), allow(4)),
        fx(
            "icmpv6's protocol number inside IPv4 matches proto icmpv6 (protocols, not families)",
            Packet::ipv4(CLIENT4, OTHER4, Transport::Icmpv6 { ty: 128, code: 0 }),
            allow(4),
        ),
        fx("GRE over IPv4: no rule, default", Packet::ipv4(CLIENT4, WEB4, Transport::Raw { proto: IPPROTO_GRE }).payload_len(24), DEFAULT_DENY),
        fx("bad host to a web server: rule 1 wins over rule 5", Packet::tcp4(BAD, WEB4, 1, 80), allow(1)),
        fx("bad host, UDP: rule 5", Packet::udp4(BAD, WEB4, 1, 80), deny(5)),
        fx("tcp4 any port to host .200: rule 6", Packet::tcp4(CLIENT4, HOST200, 1, 9999), allow(6)),
        // Non-IP passes.
        fx("ARP", Packet::arp(), NON_IP),
        fx("LLDP", Packet::other(ETH_P_LLDP, vec![2, 7, 4, 0, 0, 0, 0, 0, 1]), NON_IP),
        fx("ARP behind a VLAN tag", Packet::arp().vlan(ETH_P_8021Q, 5), NON_IP),
        fx("unknown ethertype, empty", Packet::other(0x1234, Vec::new()), NON_IP),
        // VLAN tags: up to two, either TPID.
        fx("802.1Q tag", web4(80).vlan(ETH_P_8021Q, 10), allow(1)),
        fx("802.1ad tag", web4(80).vlan(ETH_P_8021AD, 10), allow(1)),
        fx("QinQ 88a8+8100", web4(80).vlan(ETH_P_8021AD, 10).vlan(ETH_P_8021Q, 20), allow(1)),
        fx("two 8100 tags", Packet::udp6(CLIENT6, WEB6, 5, 1500).vlan(ETH_P_8021Q, 1).vlan(ETH_P_8021Q, 2), allow(7)),
        fx_bad(
            "three tags: malformed_vlan",
            web4(80).vlan(ETH_P_8021AD, 1).vlan(ETH_P_8021Q, 2).vlan(ETH_P_8021Q, 3),
            malformed(stat::MALFORMED_VLAN),
        ),
        fx_bad(
            "three tags in front of ARP: malformed_vlan (the walk stops before the ethertype)",
            Packet::arp().vlan(ETH_P_8021Q, 1).vlan(ETH_P_8021Q, 2).vlan(ETH_P_8021Q, 3),
            malformed(stat::MALFORMED_VLAN),
        ),
    ];

    // IPv4 options: every IHL from 6 to 15.
    for ihl in 6..=15u8 {
        let opts = vec![1u8; (ihl as usize - 5) * 4]; // NOPs
        v.push(fx(format!("IPv4 IHL {ihl} (options) tcp :80"), web4(80).ipv4_options(opts), allow(1)));
    }
    // IHL below 5, bad version, total length shorter than the header.
    for ihl in 0..5u8 {
        let mut p = web4(80);
        p.v4_mut().ihl = Some(ihl);
        v.push(fx_bad(format!("IPv4 IHL {ihl}: malformed"), p, malformed(stat::MALFORMED_IPV4)));
    }
    for version in [0u8, 5, 6, 15] {
        let mut p = web4(80);
        p.v4_mut().version = version;
        v.push(fx_bad(format!("IPv4 ethertype, version {version}: malformed"), p, malformed(stat::MALFORMED_IPV4)));
    }
    for tot in [0u16, 19] {
        let mut p = web4(80);
        p.v4_mut().tot_len = Some(tot);
        v.push(fx_bad(format!("IPv4 tot_len {tot} < 20: malformed"), p, malformed(stat::MALFORMED_IPV4)));
    }
    {
        let mut p = web4(80).ipv4_options(vec![1; 8]);
        p.v4_mut().tot_len = Some(24);
        v.push(fx_bad("IPv4 tot_len 24 < IHL 7 x 4: malformed", p, malformed(stat::MALFORMED_IPV4)));
        let mut p = web4(80);
        p.v4_mut().tot_len = Some(20);
        v.push(fx("IPv4 tot_len = header (L4 read from the frame anyway)", p, allow(1)));
        let mut p = web4(80);
        p.v4_mut().tot_len = Some(1500);
        v.push(fx("IPv4 tot_len past the frame", p, allow(1)));
        let mut p = web4(80);
        p.v4_mut().ihl = Some(15);
        v.push(fx_bad("IPv4 IHL 15 without the options: header cut short", p, malformed(stat::MALFORMED_IPV4)));
        let mut p = web4(80);
        p.v4_mut().dont_frag = true;
        v.push(fx("IPv4 DF set: not a fragment", p, allow(1)));
    }

    // IPv4 fragments. Later fragments carry no ports: port rules cannot match them.
    v.push(fx("v4 first fragment :80", web4(80).fragment(0, true), allow(1).first()));
    v.push(fx("v4 first fragment :23", web4(23).fragment(0, true), deny(0).first()));
    v.push(fx(
        "v4 later fragment to a web server: rule 1 needs ports, default",
        web4(80).fragment(185, false),
        DEFAULT_DENY.later(),
    ));
    v.push(fx(
        "v4 later fragment, payload looks like :23: rule 0 not matched",
        web4(23).fragment(3, true),
        DEFAULT_DENY.later(),
    ));
    v.push(fx("v4 middle fragment to host .200: rule 6 (no ports)", Packet::tcp4(CLIENT4, HOST200, 1, 2).fragment(100, true), allow(6).later()));
    v.push(fx("v4 fragment at the highest offset to host .200", Packet::tcp4(CLIENT4, HOST200, 1, 2).fragment(8191, false), allow(6).later()));
    v.push(fx(
        "v4 later UDP fragment from the resolver: rule 2 needs sport, default",
        Packet::udp4(RESOLVER, CLIENT4, 53, 1).fragment(1, false),
        DEFAULT_DENY.later(),
    ));
    v.push(fx("v4 later ICMP fragment: rule 3 (no ports needed)", Packet::icmp4(CLIENT4, OTHER4).fragment(1, false), allow(3).later()));
    {
        // A later fragment whose IP header ends the frame: nothing more is needed.
        let mut p = web4(80).fragment(5, false);
        p.transport = Some(Transport::Raw { proto: 6 });
        p.payload.clear();
        p.v4_mut().proto = Some(6);
        v.push(fx("v4 later fragment, IP header only", p, DEFAULT_DENY.later()));
    }

    // IPv6 fragments (fragment header), first and later.
    let web6 = |dport| Packet::tcp6(CLIENT6, WEB6, 40000, dport).payload_len(10);
    v.push(fx("v6 first fragment :443", web6(443).fragment(0, true), allow(1).first()));
    v.push(fx("v6 atomic fragment (offset 0, M clear): not a fragment", web6(443).fragment(0, false), allow(1)));
    v.push(fx("v6 later fragment: no ports, default", web6(443).fragment(100, true), DEFAULT_DENY.later()));
    v.push(fx(
        "v6 later fragment to host ::200: rule 6",
        Packet::tcp6(CLIENT6, HOST200_6, 1, 2).fragment(7, false),
        allow(6).later(),
    ));
    v.push(fx(
        "v6 later fragment of ICMPv6: rule 4",
        Packet::icmp6(CLIENT6, WEB6).fragment(7, false),
        allow(4).later(),
    ));
    v.push(fx(
        "v6 first fragment behind hop-by-hop and dest opts",
        web6(80).ext(Ext::HopByHop { len: 0 }).ext(Ext::DestOpts { len: 1 }).fragment(0, true),
        allow(1).first(),
    ));
    {
        // After a later fragment's header comes payload, even if it says "extension header".
        let mut p = web6(80).fragment(9, false);
        p.v6_mut().proto = Some(60);
        v.push(fx("v6 later fragment whose next header is dest opts: proto 60, default", p, DEFAULT_DENY.later()));
    }

    // IPv6 extension headers: each kind, chains of 1..8, and 9 (malformed).
    let udp6 = || Packet::udp6(CLIENT6, WEB6, 5, 1500).payload_len(4);
    for (label, e) in [
        ("hop-by-hop", Ext::HopByHop { len: 0 }),
        ("routing", Ext::Routing { len: 2 }),
        ("dest opts", Ext::DestOpts { len: 1 }),
        ("AH", Ext::Ah { len: 4 }),
        ("mobility (135)", Ext::Generic { kind: 135, len: 0 }),
        ("HIP (139)", Ext::Generic { kind: 139, len: 1 }),
        ("shim6 (140)", Ext::Generic { kind: 140, len: 0 }),
    ] {
        v.push(fx(format!("v6 ext {label} then udp"), udp6().ext(e), allow(7)));
    }
    let chain = [
        Ext::HopByHop { len: 0 },
        Ext::DestOpts { len: 0 },
        Ext::Routing { len: 0 },
        Ext::Ah { len: 1 },
        Ext::Fragment { offset: 0, more: false, id: 1 },
        Ext::Generic { kind: 135, len: 0 },
        Ext::Generic { kind: 139, len: 0 },
        Ext::DestOpts { len: 1 },
        Ext::DestOpts { len: 0 },
    ];
    for n in 1..=8 {
        let mut p = udp6();
        for e in &chain[..n] {
            p = p.ext(e.clone());
        }
        v.push(fx(format!("v6 chain of {n} extension headers"), p, allow(7)));
    }
    {
        let mut p = udp6();
        for e in &chain {
            p = p.ext(e.clone());
        }
        v.push(fx_bad("v6 chain of 9 extension headers: malformed", p, malformed(stat::MALFORMED_IPV6_EXT)));
        let mut p = udp6();
        for e in &chain[..8] {
            p = p.ext(e.clone());
        }
        p = p.fragment(4, false);
        v.push(fx_bad("v6 9th header a later fragment: malformed (the bound comes first)", p, malformed(stat::MALFORMED_IPV6_EXT)));
        let mut p = udp6();
        for e in &chain[..7] {
            p = p.ext(e.clone());
        }
        p = p.fragment(4, false);
        v.push(fx("v6 8th header a later fragment", p, DEFAULT_DENY.later()));
        let mut p = udp6();
        p.v6_mut().version = 4;
        v.push(fx_bad("IPv6 ethertype, version 4: malformed", p, malformed(stat::MALFORMED_IPV6)));
        let mut p = Packet::icmp6(CLIENT6, WEB6);
        p.v6_mut().proto = Some(IPPROTO_FRAGMENT);
        p.transport = None;
        v.push(fx_bad("v6 next header = fragment, nothing after: malformed", p, malformed(stat::MALFORMED_IPV6_EXT)));
    }

    // L4 headers.
    {
        let mut p = web4(80);
        if let Some(Transport::Tcp { doff, .. }) = &mut p.transport {
            *doff = Some(4);
        }
        v.push(fx_bad("TCP data offset 4: malformed_l4", p, malformed(stat::MALFORMED_L4)));
        let mut p = Packet::tcp4(CLIENT4, WEB4, 1, 80);
        if let Some(Transport::Tcp { doff, .. }) = &mut p.transport {
            *doff = Some(15);
        }
        v.push(fx_bad("TCP data offset 15, header cut short: malformed_l4", p, malformed(stat::MALFORMED_L4)));
        let mut p = web4(80);
        if let Some(Transport::Tcp { options, .. }) = &mut p.transport {
            *options = vec![1; 40];
        }
        v.push(fx("TCP data offset 15 with 40 option bytes", p, allow(1)));
    }
    v.push(fx(
        "icmp's protocol number inside IPv6 matches proto icmp",
        Packet::ipv6(CLIENT6, WEB6, Transport::Icmp { ty: 8, code: 0 }),
        allow(3),
    ));
    v
}

/// The documented verdict of `frame` cut to `n` bytes (hand-written from README "Parsing"):
/// the class of the first header the cut leaves incomplete, else `full`.
fn cut_model(frame: &Frame, n: usize, full: Expect) -> Expect {
    let b = &frame.bytes;
    for h in &frame.headers {
        let (need_end, class) = match h.kind {
            HeaderKind::Ethernet => (h.end, stat::MALFORMED_ETH),
            HeaderKind::Vlan => (h.end, stat::MALFORMED_VLAN),
            HeaderKind::Ipv4 => (h.end, stat::MALFORMED_IPV4),
            HeaderKind::Ipv6 => (h.end, stat::MALFORMED_IPV6),
            HeaderKind::Ipv6Ext(_) => (h.end, stat::MALFORMED_IPV6_EXT),
            HeaderKind::Tcp | HeaderKind::Udp => (h.end, stat::MALFORMED_L4),
            // Type, code and checksum are read; the rest of the ICMP header is not needed.
            HeaderKind::Icmp => (h.start + 4, stat::MALFORMED_L4),
            HeaderKind::Payload => return full,
        };
        if n < need_end {
            return malformed(class);
        }
        // A later fragment ends the headers: what follows is payload.
        let later = match h.kind {
            HeaderKind::Ipv4 => u16::from_be_bytes([b[h.start + 6], b[h.start + 7]]) & 0x1fff != 0,
            HeaderKind::Ipv6Ext(IPPROTO_FRAGMENT) => u16::from_be_bytes([b[h.start + 2], b[h.start + 3]]) >> 3 != 0,
            _ => false,
        };
        if later {
            return full;
        }
    }
    full
}

/// Runs `frame` and holds both the reference and the kernel to `expect`: action, verdict
/// counter, fragment counter, rule counter, and byte counts equal to the frame's length.
fn check(t: &mut FwTestRun, rs: &RuleSet, name: &str, frame: &[u8], expect: Expect) -> Result<(), String> {
    let mut problems = Vec::new();
    let reference = Expect::from(reference::classify(rs, frame));
    if reference != expect {
        problems.push(format!("reference::classify gives {reference:?}"));
    }
    let out = t.run(frame, expect.rule).map_err(|e| format!("{name}: test run: {e:?}"))?;
    let len = frame.len() as u64;
    if out.action != expect.action {
        problems.push(format!("XDP action {}", out.action));
    }
    if out.verdict != Some(expect.stat) {
        problems.push(format!("verdict counter {:?}", out.verdict));
    }
    if out.frag != expect.frag {
        problems.push(format!("fragment counter {:?}", out.frag));
    }
    let want_moves = 1 + usize::from(expect.frag.is_some());
    if out.stat_deltas.len() != want_moves || out.stat_deltas.iter().any(|(_, d)| d.packets != 1 || d.bytes != len) {
        problems.push(format!("FW_STATS moved {:?}, want {want_moves} entries by 1 packet / {len} bytes", out.stat_deltas));
    }
    match (out.rule, expect.rule) {
        (None, None) => {}
        (Some((r, d)), Some(w)) if r == w && d.packets == 1 && d.bytes == len && out.extra_rules.is_empty() => {}
        (got, _) => problems.push(format!("rule counter {got:?} (extra {:?})", out.extra_rules)),
    }
    if problems.is_empty() {
        return Ok(());
    }
    Err(format!(
        "{name} ({} bytes: {}): want {expect:?}; got {}",
        frame.len(),
        rampart_tests::packet::hex(frame),
        problems.join("; ")
    ))
}

fn report(errors: Vec<String>, what: &str, cases: usize) {
    if !errors.is_empty() {
        let shown: Vec<_> = errors.iter().take(30).cloned().collect();
        panic!("{} of {cases} {what} failed:\n{}", errors.len(), shown.join("\n"));
    }
    eprintln!("{cases} {what} passed");
}

#[test]
fn fixtures_full_frames() {
    let rs = rules();
    let mut t = runner(&rs);
    let fixtures = fixtures();
    let mut errors = Vec::new();
    for f in &fixtures {
        if let Err(e) = check(&mut t, &rs, &f.name, &f.frame.bytes, f.expect) {
            errors.push(e);
        }
    }
    // Every rule of the fixture set is hit by some fixture, and its counter holds exactly the
    // fixtures that expect it.
    let counters = t.rule_counters().expect("read rule counters");
    for (r, c) in counters.iter().enumerate() {
        let want: Vec<&Fixture> = fixtures.iter().filter(|f| f.expect.rule == Some(r)).collect();
        let packets = want.len() as u64;
        let bytes: u64 = want.iter().map(|f| f.frame.len() as u64).sum();
        if packets == 0 {
            errors.push(format!("rule {r}: no fixture exercises it"));
        }
        if c.packets != packets || c.bytes != bytes {
            errors.push(format!("rule {r}: counter {c:?}, want {packets} packets / {bytes} bytes"));
        }
    }
    report(errors, "fixtures", fixtures.len());
}

#[test]
fn fixtures_truncated_at_every_offset() {
    let rs = rules();
    let mut t = runner(&rs);
    let mut errors = Vec::new();
    let mut cases = 0;
    for f in fixtures() {
        // Frames below an Ethernet header: BPF_PROG_TEST_RUN refuses them (the kernel needs
        // ETH_HLEN bytes), so only the reference is held to MALFORMED_ETH there.
        for n in 0..crate_eth_min(&f.frame) {
            let r = reference::classify(&rs, f.frame.truncated(n));
            if Expect::from(r) != malformed(stat::MALFORMED_ETH) {
                errors.push(format!("{} cut to {n}: reference gives {r:?}, want malformed_eth", f.name));
            }
            cases += 1;
        }
        for n in crate_eth_min(&f.frame)..=f.frame.len() {
            let cut = f.frame.truncated(n);
            let expect = if f.sweep {
                cut_model(&f.frame, n, f.expect)
            } else {
                // Malformed at full length: the reference says what each cut gets.
                Expect::from(reference::classify(&rs, cut))
            };
            cases += 1;
            if let Err(e) = check(&mut t, &rs, &format!("{} cut to {n}", f.name), cut, expect) {
                errors.push(e);
            }
        }
    }
    report(errors, "truncated frames", cases);
}

/// Shortest frame BPF_PROG_TEST_RUN takes for XDP.
fn crate_eth_min(f: &Frame) -> usize {
    rampart_tests::packet::ETH_HLEN.min(f.len())
}

/// The kernel refuses frames shorter than an Ethernet header; this pins that down so the sweep
/// above does not silently skip more than it says.
#[test]
fn test_run_refuses_frames_below_ethernet_header() {
    let rs = rules();
    let mut t = runner(&rs);
    for n in 0..rampart_tests::packet::ETH_HLEN {
        assert!(t.run_action(&vec![0u8; n]).is_err(), "a {n}-byte frame was accepted by BPF_PROG_TEST_RUN");
    }
    assert_eq!(t.run_action(&[0u8; 14]).expect("14-byte frame"), PASS, "ethertype 0: non-IP passes");
}

/// The fixture table itself is sane: names unique and the model agrees with each full frame.
#[test]
fn fixture_table_is_consistent() {
    let fixtures = fixtures();
    let mut names = std::collections::HashSet::new();
    for f in &fixtures {
        assert!(names.insert(f.name.clone()), "duplicate fixture name {}", f.name);
        if f.sweep {
            assert_eq!(cut_model(&f.frame, f.frame.len(), f.expect), f.expect, "{}", f.name);
        }
    }
}

/// A rule set of the keyed shape (`SLOT_KEYED`: only source addresses, one range per port), so
/// the program decides from the source class's rule list. Rule indexes are what the fixtures
/// name; `SPORTS` is rule 1's source ports.
const KEYED_RULES: &str = r#"
default = "allow"

# 0: no DNS from the bad net
[[rule]]
action = "deny"
src = "203.0.113.0/24"
proto = "udp"
dport = "53"

# 1: but one host of it may open TCP from some source ports
[[rule]]
action = "allow"
src = "203.0.113.66"
proto = "tcp"
sport = SPORTS

# 2: and one v6 host may ping
[[rule]]
action = "allow"
src = "2001:db8:bad::1"
proto = "icmpv6"

# 3: the rest of both nets is denied
[[rule]]
action = "deny"
src = ["203.0.113.0/24", "2001:db8:bad::/48"]
"#;

/// `second`: rule 1 also takes source port 5000.
fn keyed_fixtures(second: bool) -> Vec<Fixture> {
    const BAD66: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 66);
    const BAD5: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 5);
    const BAD6_1: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xbad, 0, 0, 0, 0, 1);
    const BAD6_2: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xbad, 0, 0, 0, 0, 2);
    const DEFAULT_ALLOW: Expect = Expect { action: PASS, stat: stat::DEFAULT_ALLOW, frag: None, rule: None };
    vec![
        fx("keyed: udp4 :53 from the bad net", Packet::udp4(BAD5, OTHER4, 1, 53), deny(0)),
        fx("keyed: udp4 :53 from the allowed host (rule 0 first)", Packet::udp4(BAD66, OTHER4, 1500, 53), deny(0)),
        fx("keyed: tcp4 from sport 1000 (range start)", Packet::tcp4(BAD66, OTHER4, 1000, 80), allow(1)),
        fx("keyed: tcp4 from sport 2000 (range end)", Packet::tcp4(BAD66, OTHER4, 2000, 80), allow(1)),
        fx("keyed: tcp4 from sport 2001 (past the range)", Packet::tcp4(BAD66, OTHER4, 2001, 80), deny(3)),
        fx(
            "keyed: tcp4 from sport 5000 (rule 1's second range, if any)",
            Packet::tcp4(BAD66, OTHER4, 5000, 80),
            if second { allow(1) } else { deny(3) },
        ),
        fx("keyed: udp4 from sport 1500 (not tcp)", Packet::udp4(BAD66, OTHER4, 1500, 80), deny(3)),
        fx("keyed: icmp4 from the host (no ports)", Packet::icmp4(BAD66, OTHER4), deny(3)),
        fx("keyed: icmpv6 from the v6 host", Packet::icmp6(BAD6_1, WEB6), allow(2)),
        fx("keyed: tcp6 from the v6 host", Packet::tcp6(BAD6_1, WEB6, 1500, 80), deny(3)),
        fx("keyed: icmpv6 from another v6 host", Packet::icmp6(BAD6_2, WEB6), deny(3)),
        fx("keyed: udp4 from elsewhere: default", Packet::udp4(CLIENT4, OTHER4, 1, 53), DEFAULT_ALLOW),
        fx("keyed: tcp6 from elsewhere: default", Packet::tcp6(CLIENT6, WEB6, 1500, 80), DEFAULT_ALLOW),
    ]
}

/// The keyed fixtures through the keyed path (rule 1 with one source-port range, and with two),
/// and through the general path (three ranges, more than `KEYED_PORT_RANGES`); the extra ranges
/// are ports no fixture uses. The same verdicts and rule counters every way.
#[test]
fn keyed_rule_sets_and_their_general_twin() {
    for (sports, keyed) in
        [("\"1000-2000\"", true), ("[\"1000-2000\", 5000]", true), ("[\"1000-2000\", 5000, 6000]", false)]
    {
        let rs =
            parse_str(&KEYED_RULES.replace("SPORTS", sports), Path::new("keyed.toml")).expect("keyed rule set parses");
        let c = compile(&rs, Layout { slot: 0, words_per_slot: DEFAULT_WORDS / 2 }).expect("compiles");
        assert_eq!(c.info.flags & SLOT_KEYED != 0, keyed, "sport = {sports}: keyed shape");
        let mut t = runner(&rs);
        let fixtures = keyed_fixtures(sports.contains("5000"));
        let mut errors = Vec::new();
        for f in &fixtures {
            if let Err(e) = check(&mut t, &rs, &f.name, &f.frame.bytes, f.expect) {
                errors.push(format!("sport = {sports}: {e}"));
            }
        }
        let counters = t.rule_counters().expect("read rule counters");
        for (r, c) in counters.iter().enumerate() {
            let want: Vec<&Fixture> = fixtures.iter().filter(|f| f.expect.rule == Some(r)).collect();
            let bytes: u64 = want.iter().map(|f| f.frame.len() as u64).sum();
            if want.is_empty() || c.packets != want.len() as u64 || c.bytes != bytes {
                errors.push(format!(
                    "sport = {sports}: rule {r}: counter {c:?}, want {} packets / {bytes} bytes",
                    want.len()
                ));
            }
        }
        report(errors, "keyed fixtures", fixtures.len());
    }
}
