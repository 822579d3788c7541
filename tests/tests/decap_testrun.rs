//! Test-run fixtures of `rampart_decap`, table-driven in Katran's manner: for each frame, the
//! action, the exact frame the program leaves and the counter that moves (README.md, "Backends:
//! decapsulation"). Every IP-in-IP fixture is also cut at every length: a cut frame passes
//! untouched, counted as malformed once the outer header's fixed part is there. And the object
//! holds only the program's own two maps.
//!
//! Needs root (BPF_PROG_TEST_RUN); fails with a clear message otherwise.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use rampart_common::{
    Counter,
    lb::{DECAP_PROGRAM_NAME, DECAP_STATS, DECAP_VIPS, decap_stat},
    net::{ETH_HLEN, IPPROTO_IPIP, IPPROTO_IPV6, IPV4_HLEN, IPV6_HLEN},
    xdp_action::PASS,
};
use rampart_tests::{
    decap::DecapTestRun,
    packet::{ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, Frame, IPPROTO_GRE, Packet, Transport},
};

const VIP4: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const OTHER4: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x99, 0, 0, 0, 0, 1);
const OTHER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x99, 0, 0, 0, 0, 2);
const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc1, 0, 0, 0, 0, 7);
/// Outer addresses as the balancer writes them: its source range, the backend.
const LB4: Ipv4Addr = Ipv4Addr::new(172, 16, 0x12, 0x34);
const BACKEND4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 21);
const LB6: Ipv6Addr = Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0x12, 0x34);
const BACKEND6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 21);

/// See `decap_program_stays_small`.
const BUDGET: u32 = 1_500;

fn runner() -> DecapTestRun {
    DecapTestRun::new(&[IpAddr::V4(VIP4), IpAddr::V6(VIP6)]).unwrap_or_else(|e| panic!("{e}"))
}

/// The inner packet of `inner` (its bytes after Ethernet) inside an outer header of `outer_v6`'s
/// family, as the balancer sends it; `tweak` edits the outer header before it is built.
fn encap(inner: &Frame, outer_v6: bool, tweak: impl FnOnce(&mut Packet)) -> Frame {
    let proto = if inner.bytes[12..14] == ETH_P_IP.to_be_bytes() { IPPROTO_IPIP } else { IPPROTO_IPV6 };
    let mut p = if outer_v6 {
        Packet::ipv6(LB6, BACKEND6, Transport::Raw { proto })
    } else {
        Packet::ipv4(LB4, BACKEND4, Transport::Raw { proto })
    };
    p.payload = inner.bytes[ETH_HLEN..].to_vec();
    tweak(&mut p);
    p.build()
}

fn syn4(dst: Ipv4Addr) -> Frame {
    Packet::tcp4(CLIENT4, dst, 40000, 80).build()
}

fn syn6(dst: Ipv6Addr) -> Frame {
    Packet::tcp6(CLIENT6, dst, 40000, 443).build()
}

/// What a fixture must do.
enum Want {
    /// Decapsulated: this exact frame comes out (the Ethernet header kept, its EtherType the
    /// inner family's), counted as decapsulated.
    Decap(Vec<u8>),
    /// Passed untouched, counted under this index.
    Untouched(u32),
    /// Passed untouched, not counted (not IP-in-IP).
    Plain,
}

struct Fixture {
    name: &'static str,
    frame: Vec<u8>,
    want: Want,
}

fn fixtures() -> Vec<Fixture> {
    let f = |name, frame: Frame, want| Fixture { name, frame: frame.bytes, want };
    let inner4 = syn4(VIP4);
    let inner6 = syn6(VIP6);
    let inner4_opts = Packet::tcp4(CLIENT4, VIP4, 40001, 80).ipv4_options([1, 1, 1, 0, 0x44, 4, 5, 0]).build();
    let inner4_udp = Packet::udp4(CLIENT4, VIP4, 5353, 53).payload_len(100).build();
    let inner4_frag = Packet::udp4(CLIENT4, VIP4, 5353, 53).payload_len(64).fragment(0, true).build();
    let inner6_icmp = Packet::icmp6(CLIENT6, VIP6).build();
    let mut padded = encap(&inner4, false, |_| {});
    padded.bytes.extend_from_slice(&[0; 6]); // Ethernet padding after the outer packet
    let mut inner4_padded = inner4.bytes.clone();
    inner4_padded.extend_from_slice(&[0; 6]);
    vec![
        f("4in4 TCP SYN to the VIP", encap(&inner4, false, |_| {}), Want::Decap(inner4.bytes.clone())),
        f("4in4, inner IPv4 options", encap(&inner4_opts, false, |_| {}), Want::Decap(inner4_opts.bytes.clone())),
        f("4in4 UDP with payload", encap(&inner4_udp, false, |_| {}), Want::Decap(inner4_udp.bytes.clone())),
        f("4in4, inner first fragment", encap(&inner4_frag, false, |_| {}), Want::Decap(inner4_frag.bytes.clone())),
        f(
            "4in4, outer IPv4 options (IHL 7)",
            encap(&inner4, false, |p| p.v4_mut().options = vec![1; 8]),
            Want::Decap(inner4.bytes.clone()),
        ),
        f(
            "4in4, outer DF set",
            encap(&inner4, false, |p| p.v4_mut().dont_frag = true),
            Want::Decap(inner4.bytes.clone()),
        ),
        f("4in4, Ethernet padding after the outer packet", padded, Want::Decap(inner4_padded)),
        f("6in6 TCP SYN to the VIP", encap(&inner6, true, |_| {}), Want::Decap(inner6.bytes.clone())),
        f("6in6 ICMPv6 echo to the VIP", encap(&inner6_icmp, true, |_| {}), Want::Decap(inner6_icmp.bytes.clone())),
        f("4in6: the EtherType becomes IPv4", encap(&inner4, true, |_| {}), Want::Decap(inner4.bytes.clone())),
        f("6in4: the EtherType becomes IPv6", encap(&inner6, false, |_| {}), Want::Decap(inner6.bytes.clone())),
        f("4in4 to another address", encap(&syn4(OTHER4), false, |_| {}), Want::Untouched(decap_stat::NOT_OURS)),
        f("6in6 to another address", encap(&syn6(OTHER6), true, |_| {}), Want::Untouched(decap_stat::NOT_OURS)),
        f("4in6 to another address", encap(&syn4(OTHER4), true, |_| {}), Want::Untouched(decap_stat::NOT_OURS)),
        f("plain TCP to the VIP", syn4(VIP4), Want::Plain),
        f("plain TCPv6 to the VIP", syn6(VIP6), Want::Plain),
        f("plain UDP", Packet::udp4(CLIENT4, BACKEND4, 1, 2).build(), Want::Plain),
        f("ARP", Packet::arp().build(), Want::Plain),
        f(
            "GRE is not ours to take apart",
            Packet::ipv4(LB4, BACKEND4, Transport::Raw { proto: IPPROTO_GRE })
                .payload(inner4.bytes[ETH_HLEN..].to_vec())
                .build(),
            Want::Plain,
        ),
        f(
            "VLAN-tagged 4in4 (tags are not parsed)",
            {
                let mut p = Packet::ipv4(LB4, BACKEND4, Transport::Raw { proto: IPPROTO_IPIP }).vlan(ETH_P_8021Q, 7);
                p.payload = inner4.bytes[ETH_HLEN..].to_vec();
                p.build()
            },
            Want::Plain,
        ),
        f(
            "6in6 behind an outer extension header (the balancer adds none)",
            {
                let mut p = Packet::ipv6(LB6, BACKEND6, Transport::Raw { proto: IPPROTO_IPV6 })
                    .ext(rampart_tests::packet::Ext::DestOpts { len: 0 });
                p.payload = inner6.bytes[ETH_HLEN..].to_vec();
                p.build()
            },
            Want::Plain,
        ),
        f(
            "4in4, outer MF set",
            encap(&inner4, false, |p| p.v4_mut().more_frags = true),
            Want::Untouched(decap_stat::FRAGMENT),
        ),
        f(
            "4in4, outer fragment offset",
            encap(&inner4, false, |p| p.v4_mut().frag_offset = 8),
            Want::Untouched(decap_stat::FRAGMENT),
        ),
        f(
            "4in4, outer IHL 4",
            encap(&inner4, false, |p| p.v4_mut().ihl = Some(4)),
            Want::Untouched(decap_stat::MALFORMED),
        ),
        f(
            "4in4, outer version 6",
            encap(&inner4, false, |p| p.v4_mut().version = 6),
            Want::Untouched(decap_stat::MALFORMED),
        ),
        f(
            "4in4, outer total length past the frame",
            encap(&inner4, false, |p| p.v4_mut().tot_len = Some(200)),
            Want::Untouched(decap_stat::MALFORMED),
        ),
        f(
            "4in4, outer total length shorter than both headers",
            encap(&inner4, false, |p| p.v4_mut().tot_len = Some(39)),
            Want::Untouched(decap_stat::MALFORMED),
        ),
        f(
            "4in4, inner version 6",
            encap(&inner4, false, |p| p.payload[0] = 0x65),
            Want::Untouched(decap_stat::MALFORMED),
        ),
        f(
            "6in6, inner version 4",
            encap(&inner6, true, |p| p.payload[0] = 0x45),
            Want::Untouched(decap_stat::MALFORMED),
        ),
        f(
            "6in6, outer version 4",
            encap(&inner6, true, |p| p.v6_mut().version = 4),
            Want::Untouched(decap_stat::MALFORMED),
        ),
        f(
            "4in4, inner header cut (outer says so too)",
            encap(&inner4, false, |p| p.payload.truncate(19)),
            Want::Untouched(decap_stat::MALFORMED),
        ),
        f(
            "6in6, inner header cut (outer says so too)",
            encap(&inner6, true, |p| p.payload.truncate(39)),
            Want::Untouched(decap_stat::MALFORMED),
        ),
    ]
}

fn check(run: &mut DecapTestRun, name: &str, frame: &[u8], want: &Want) {
    let o = run.run(frame).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(o.action, PASS, "{name}: action");
    let len = frame.len() as u64;
    let (out, stats): (&[u8], Vec<(u32, Counter)>) = match want {
        Want::Decap(inner) => (inner, vec![(decap_stat::DECAPSULATED, Counter { packets: 1, bytes: len })]),
        Want::Untouched(i) => (frame, vec![(*i, Counter { packets: 1, bytes: len })]),
        Want::Plain => (frame, Vec::new()),
    };
    assert_eq!(hex(&o.out), hex(out), "{name}: the frame out");
    assert_eq!(o.stats, stats, "{name}: counters");
}

fn hex(b: &[u8]) -> String {
    rampart_tests::packet::hex(b)
}

#[test]
fn fixtures_give_the_documented_action_frame_and_counter() {
    let mut run = runner();
    for fx in fixtures() {
        check(&mut run, fx.name, &fx.frame, &fx.want);
    }
}

#[test]
fn decapsulated_frames_are_exact() {
    // Spelled out once by hand, independent of the frame builder: 4in4 to 10.99.0.1.
    let inner = syn4(VIP4);
    let outer = encap(&inner, false, |_| {});
    assert_eq!(&outer.bytes[12..14], &[0x08, 0x00]);
    assert_eq!(outer.bytes[14], 0x45);
    assert_eq!(outer.bytes[14 + 9], IPPROTO_IPIP);
    assert_eq!(&outer.bytes[14 + 20..], &inner.bytes[14..], "the outer payload is the inner packet");
    let o = runner().run(&outer.bytes).unwrap();
    assert_eq!(o.out.len(), outer.len() - IPV4_HLEN);
    assert_eq!(&o.out[..12], &outer.bytes[..12], "MACs kept");
    assert_eq!(&o.out[12..14], &[0x08, 0x00]);
    assert_eq!(&o.out[14..], &outer.bytes[34..]);
    // 4in6: 40 bytes go and the EtherType changes.
    let outer = encap(&inner, true, |_| {});
    let o = runner().run(&outer.bytes).unwrap();
    assert_eq!(o.out.len(), outer.len() - IPV6_HLEN);
    assert_eq!(&o.out[12..14], &ETH_P_IP.to_be_bytes());
    assert_eq!(&outer.bytes[12..14], &ETH_P_IPV6.to_be_bytes());
}

#[test]
fn cut_frames_pass_untouched() {
    let mut run = runner();
    for fx in fixtures() {
        let Want::Decap(_) = fx.want else { continue };
        let outer_v6 = fx.frame[12..14] == ETH_P_IPV6.to_be_bytes();
        // Shorter than the fixed outer header (and the first check, Ethernet + 20): not
        // recognisable as IP-in-IP.
        let min = ETH_HLEN + if outer_v6 { IPV6_HLEN } else { IPV4_HLEN };
        // BPF_PROG_TEST_RUN refuses XDP frames shorter than an Ethernet header.
        for len in ETH_HLEN..fx.frame.len() {
            let cut = &fx.frame[..len];
            let name = format!("{} cut at {len}", fx.name);
            let want = if len < min { Want::Plain } else { Want::Untouched(decap_stat::MALFORMED) };
            // A frame with Ethernet padding is whole before the padding is.
            let whole = fx.frame.len() - if fx.name.contains("padding") { 6 } else { 0 };
            if len >= whole {
                continue;
            }
            check(&mut run, &name, cut, &want);
        }
    }
}

#[test]
fn a_vip_removed_is_no_longer_decapsulated() {
    let mut run = runner();
    let frame = encap(&syn4(VIP4), false, |_| {});
    check(&mut run, "before", &frame.bytes, &Want::Decap(syn4(VIP4).bytes));
    run.remove_vip(IpAddr::V4(VIP4)).unwrap();
    check(&mut run, "after", &frame.bytes, &Want::Untouched(decap_stat::NOT_OURS));
    // The IPv6 VIP is still there.
    let frame6 = encap(&syn6(VIP6), true, |_| {});
    check(&mut run, "v6", &frame6.bytes, &Want::Decap(syn6(VIP6).bytes));
}

#[test]
fn decap_object_holds_only_its_own_maps() {
    // bpf-linker keeps every map of a library a program links: the firewall's and the
    // balancer's (its ring alone is 4 million entries) must not come with the backend's program.
    let ebpf = aya::Ebpf::load(rampart::bpf::DECAP_OBJ).expect("load the decap object");
    let mut maps: Vec<&str> = ebpf.maps().map(|(name, _)| name).collect();
    maps.sort_unstable();
    assert_eq!(maps, vec![DECAP_STATS, DECAP_VIPS]);
    let progs: Vec<&str> = ebpf.programs().map(|(name, _)| name).collect();
    assert_eq!(progs, vec![DECAP_PROGRAM_NAME]);
    drop(ebpf);
    // And what the kernel sees once the program is loaded.
    let run = runner();
    let ids = run.prog().unwrap().info().unwrap().map_ids().unwrap().unwrap_or_default();
    assert_eq!(ids.len(), 2, "maps the loaded program uses: {ids:?}");
}

/// The backend's hot path stays small: the verifier walks it in a few hundred instructions (no
/// loops, one lookup). A regression guard, about twice today's 726.
#[test]
fn decap_program_stays_small() {
    let run = runner();
    let info = run.prog().unwrap().info().unwrap();
    let insns = info.verified_instruction_count().expect("the kernel reports verified_insns (5.16+)");
    println!("{DECAP_PROGRAM_NAME}: {insns} instructions processed by the verifier");
    assert!(insns <= BUDGET, "{DECAP_PROGRAM_NAME} needs {insns} verifier instructions, over the budget of {BUDGET}");
}
