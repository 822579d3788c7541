//! The balancer stage of `rampart_fw` on single frames (BPF_PROG_TEST_RUN), Katran style: each
//! fixture is an input frame, the expected XDP action and the exact output bytes (outer header,
//! checksums, MACs), and the counters that must move. Then the differential test: for 100,000
//! random flows the backend the kernel encapsulates towards is the one `loadbalancer::Maglev`
//! computes for the same flow.
//!
//! Every test runs in a network namespace of its own (`in_private_netns`): a veth `lb0` with the
//! balancer's addresses, IP forwarding on (the FIB lookup needs it), and permanent neighbour
//! entries for the backends, so `bpf_fib_lookup` finds MACs without any traffic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray},
    programs::{TestRun, TestRunOptions, Xdp},
};
use loadbalancer::{Maglev, MaglevBackend};
use rampart::{
    fw::{
        rules::{Action, RuleSet},
        tables::FwTables,
    },
    lb::{
        state::{LbState, ServiceId, default_config, sync},
        tables::LbTables,
    },
    netns::in_private_netns,
};
use rampart_common::{
    fw::PROGRAM_NAME,
    lb::{FlowKey, LbCounter, flow_hash, map_names, stat},
    net::{ETH_HLEN, IPPROTO_TCP, IPPROTO_UDP},
    xdp_action,
};
use rampart_netlab::{NetlabError, Ns, veth};
use rampart_tests::{
    packet::{Packet, checksum},
    testrun::is_root,
};

const CLIENT4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
const VIP4: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 1);
const BACKENDS4: [&str; 3] = ["10.200.0.11", "10.200.0.12", "10.200.0.13"];
const BACKENDS6: [&str; 3] = ["fd00:200::11", "fd00:200::12", "fd00:200::13"];
/// A backend on the link without a neighbour entry.
const UNRESOLVED4: &str = "10.200.0.99";

/// The backend's MAC in the neighbour table: 02:00:00:00:00:<last byte of its address>.
fn backend_mac(ip: IpAddr) -> [u8; 6] {
    let last = match ip {
        IpAddr::V4(a) => a.octets()[3],
        IpAddr::V6(a) => a.octets()[15],
    };
    [2, 0, 0, 0, 0, last]
}

/// The interface's MAC, through `ip` (/sys shows the host's namespace, not this thread's).
fn mac_of(iface: &str) -> [u8; 6] {
    let text = Ns::current().ip(&["-br", "link", "show", iface]).expect("ip link");
    let mac = text.split_whitespace().nth(2).expect("a MAC column");
    let v: Vec<u8> = mac.split(':').map(|h| u8::from_str_radix(h, 16).unwrap()).collect();
    v.try_into().unwrap()
}

fn ifindex(iface: &str) -> u32 {
    let c = std::ffi::CString::new(iface).unwrap();
    // SAFETY: a valid C string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(i, 0, "{iface} not found");
    i
}

/// The balancer: the pipeline loaded (not attached) with an allow-all firewall, a service per
/// family with three backends each, in this thread's namespace.
struct Lab {
    ebpf: Ebpf,
    lb: LbTables,
    state: LbState,
    ifindex: u32,
    mac: [u8; 6],
    backend_stats: PerCpuArray<MapData, LbCounter>,
    stats: PerCpuArray<MapData, rampart_common::Counter>,
}

fn svc4() -> ServiceId {
    format!("{VIP4}:80/tcp").parse().unwrap()
}
fn svc6() -> ServiceId {
    format!("[{VIP6}]:80/tcp").parse().unwrap()
}
fn svc4_udp() -> ServiceId {
    format!("{VIP4}:53/udp").parse().unwrap()
}

impl Lab {
    fn new() -> Lab {
        assert!(is_root(), "the balancer's test-run tests load BPF programs and make namespaces: run them as root");
        // This thread's own namespace (see `lab_test`), which goes with the thread.
        let here = Ns::current();
        let ok = |r: Result<(), NetlabError>| r.unwrap_or_else(|e| panic!("{e}"));
        ok(veth(here.end("lb0").addr("10.200.0.1/24").addr("fd00:200::1/64"), here.end("lb1")));
        ok(here.sysctl("net.ipv4.conf.all.forwarding", "1"));
        ok(here.sysctl("net.ipv6.conf.all.forwarding", "1"));
        for b in BACKENDS4.iter().chain(&BACKENDS6) {
            let ip: IpAddr = b.parse().unwrap();
            let m = backend_mac(ip);
            let mac = m.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(":");
            ok(here.neigh("lb0", b, &mac));
        }
        let mut ebpf = Ebpf::load(rampart::bpf::FIREWALL_OBJ).expect("load the object");
        let mut fw = FwTables::from_ebpf(&mut ebpf).expect("firewall maps");
        fw.install(&RuleSet { default: Action::Allow, sets: Default::default(), rules: Vec::new() }).unwrap();
        let mut lb = LbTables::from_ebpf(&mut ebpf).expect("balancer maps");
        lb.set_config(&default_config()).unwrap();
        let prog: &mut Xdp = ebpf.program_mut(PROGRAM_NAME).unwrap().try_into().unwrap();
        prog.load().expect("the verifier accepts the pipeline");
        let (backend_stats, stats) = counters(prog);
        let mut state = LbState::default();
        for (svc, backends) in [(svc4(), &BACKENDS4[..]), (svc6(), &BACKENDS6[..]), (svc4_udp(), &BACKENDS4[..1])] {
            state.add_service(svc, 251).unwrap();
            for b in backends {
                state.add_backend(&svc, b.parse().unwrap(), 100).unwrap();
            }
        }
        sync(&mut lb, &LbState::default(), &state).expect("write the services");
        Lab { ebpf, lb, state, ifindex: ifindex("lb0"), mac: mac_of("lb0"), backend_stats, stats }
    }

    fn set(&mut self, edit: impl FnOnce(&mut LbState)) {
        let mut next = self.state.clone();
        edit(&mut next);
        sync(&mut self.lb, &self.state, &next).unwrap();
        self.state = next;
    }

    /// Runs `frame` as if it arrived on lb0: the action and the frame as the program left it.
    fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let prog: &mut Xdp = self.ebpf.program_mut(PROGRAM_NAME).unwrap().try_into().unwrap();
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
        let mut ctx = Vec::with_capacity(24);
        for v in [0, frame.len() as u32, 0, self.ifindex, 0, 0] {
            ctx.extend_from_slice(&v.to_ne_bytes());
        }
        let mut out = vec![0u8; frame.len() + 256];
        let opts =
            TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ctx_in: Some(&ctx), ..Default::default() };
        let r = prog.test_run(opts).expect("BPF_PROG_TEST_RUN");
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    fn backend_counter(&self, svc: &ServiceId, addr: &str) -> LbCounter {
        let id = self.state.service(svc).unwrap().backend(addr.parse().unwrap()).unwrap().id;
        sum(&self.backend_stats.get(&id, 0).unwrap())
    }

    fn stat(&self, index: u32) -> u64 {
        self.stats.get(&index, 0).unwrap().iter().map(|c| c.packets).sum()
    }
}

fn sum(v: &aya::maps::PerCpuValues<LbCounter>) -> LbCounter {
    v.iter().fold(LbCounter::default(), |a, c| LbCounter {
        packets: a.packets + c.packets,
        bytes: a.bytes + c.bytes,
        new_flows: a.new_flows + c.new_flows,
        _pad: 0,
    })
}

/// Second handles on two counter maps of the loaded program, found by name.
fn counters(prog: &Xdp) -> (PerCpuArray<MapData, LbCounter>, PerCpuArray<MapData, rampart_common::Counter>) {
    let mut backend_stats = None;
    let mut stats = None;
    for id in prog.info().unwrap().map_ids().unwrap().unwrap_or_default() {
        let data = MapData::from_id(id).unwrap();
        let name = data.info().unwrap().name_as_str().map(str::to_owned);
        match name.as_deref() {
            Some(map_names::BACKEND_STATS) => {
                backend_stats = Some(PerCpuArray::try_from(aya::maps::Map::from_map_data(data).unwrap()).unwrap())
            }
            Some(map_names::STATS) => {
                stats = Some(PerCpuArray::try_from(aya::maps::Map::from_map_data(data).unwrap()).unwrap())
            }
            _ => {}
        }
    }
    (backend_stats.expect("LB_BE_STATS"), stats.expect("LB_STATS"))
}

fn words(ip: IpAddr) -> [u64; 2] {
    rampart::lb::state::addr_words(ip)
}

fn flow(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, proto: u8) -> FlowKey {
    FlowKey {
        src: words(src),
        dst: words(dst),
        sport,
        dport,
        proto,
        family: if src.is_ipv4() { 4 } else { 6 },
        _pad: 0,
    }
}

/// The backend `loadbalancer::Maglev` gives this flow, from the service's backend list alone.
fn expected_backend(state: &LbState, svc: &ServiceId, f: &FlowKey) -> IpAddr {
    let s = state.service(svc).unwrap();
    let members: Vec<MaglevBackend> = s
        .backends
        .iter()
        .map(|b| MaglevBackend { id: b.id, name: b.addr.to_string(), weight: b.effective_weight() })
        .collect();
    let m = Maglev::with_backends(s.table_size, &members).unwrap();
    let id = m.get(m.flow_position(f)).expect("a backend");
    s.backends.iter().find(|b| b.id == id).unwrap().addr
}

/// The frame the balancer must send for `inner` (a whole Ethernet frame) towards `backend`.
fn encapsulated(lab: &Lab, inner: &[u8], backend: IpAddr, f: &FlowKey) -> Vec<u8> {
    let h = (flow_hash(f) as u32).to_be_bytes();
    let ip = &inner[ETH_HLEN..];
    let mut out = Vec::new();
    out.extend_from_slice(&backend_mac(backend));
    out.extend_from_slice(&lab.mac);
    match backend {
        IpAddr::V4(b) => {
            out.extend_from_slice(&0x0800u16.to_be_bytes());
            let mut hdr = vec![0x45, 0];
            hdr.extend_from_slice(&((ip.len() + 20) as u16).to_be_bytes());
            hdr.extend_from_slice(&[0, 0, 0x40, 0, 64, 4, 0, 0, 172, 16, h[2], h[3]]);
            hdr.extend_from_slice(&b.octets());
            let c = checksum(&hdr, 0).to_be_bytes();
            hdr[10..12].copy_from_slice(&c);
            out.extend_from_slice(&hdr);
        }
        IpAddr::V6(b) => {
            out.extend_from_slice(&0x86ddu16.to_be_bytes());
            let label = u32::from_be_bytes(h) & 0xf_ffff;
            out.extend_from_slice(&(6u32 << 28 | label).to_be_bytes());
            out.extend_from_slice(&(ip.len() as u16).to_be_bytes());
            out.extend_from_slice(&[41, 64]);
            out.extend_from_slice(&[0xfd, 0, 0x72, 0x61, 0x6d, 0x70, 0, 0, 0, 0, 0, 0, h[0], h[1], h[2], h[3]]);
            out.extend_from_slice(&b.octets());
        }
    }
    out.extend_from_slice(ip);
    out
}

fn lab_test(f: impl FnOnce(&mut Lab) + Send + 'static) {
    in_private_netns(move || {
        let mut lab = Lab::new();
        f(&mut lab);
    })
    .expect("a network namespace of the test's own (needs root)");
}

#[test]
fn fixtures_encapsulate_exactly() {
    lab_test(|lab| {
        // (name, frame, service) — every one is forwarded with XDP_TX out of lb0.
        let cases: Vec<(&str, Vec<u8>, ServiceId, FlowKey)> = vec![
            (
                "tcp4 SYN to the VIP",
                Packet::tcp4(CLIENT4, VIP4, 40000, 80).build().bytes,
                svc4(),
                flow(CLIENT4.into(), VIP4.into(), 40000, 80, IPPROTO_TCP),
            ),
            (
                "tcp4 with 1000 bytes of payload",
                Packet::tcp4(CLIENT4, VIP4, 40001, 80).payload_len(1000).build().bytes,
                svc4(),
                flow(CLIENT4.into(), VIP4.into(), 40001, 80, IPPROTO_TCP),
            ),
            (
                "udp4 to the UDP service",
                Packet::udp4(CLIENT4, VIP4, 5353, 53).payload_len(30).build().bytes,
                svc4_udp(),
                flow(CLIENT4.into(), VIP4.into(), 5353, 53, IPPROTO_UDP),
            ),
            (
                "tcp6 to the VIP",
                Packet::tcp6(CLIENT6, VIP6, 40000, 80).payload_len(100).build().bytes,
                svc6(),
                flow(CLIENT6.into(), VIP6.into(), 40000, 80, IPPROTO_TCP),
            ),
        ];
        for (name, frame, svc, f) in cases {
            let backend = expected_backend(&lab.state, &svc, &f);
            let before = lab.backend_counter(&svc, &backend.to_string());
            // A miss (new flow), then a hit (the connection table). A TCP connection's later
            // packets carry ACK (a SYN always opens a new flow, see below).
            let next = acked(&frame);
            for (round, frame) in [&frame, &next].into_iter().enumerate() {
                let (action, out) = lab.run(frame);
                assert_eq!(action, xdp_action::TX, "{name}, round {round}");
                assert_eq!(out, encapsulated(lab, frame, backend, &f), "{name}, round {round}: output bytes");
            }
            let after = lab.backend_counter(&svc, &backend.to_string());
            assert_eq!(after.packets - before.packets, 2, "{name}: backend packets");
            assert_eq!(after.bytes - before.bytes, (frame.len() + next.len()) as u64, "{name}: backend bytes");
            assert_eq!(after.new_flows - before.new_flows, 1, "{name}: one new flow, then a hit");
        }
        assert_eq!(lab.stat(stat::FORWARDED), 8);
    });
}

#[test]
fn other_traffic_is_untouched() {
    lab_test(|lab| {
        for (name, frame) in [
            ("tcp4 to the VIP, another port", Packet::tcp4(CLIENT4, VIP4, 40000, 81).build().bytes),
            ("udp4 to the TCP service's port", Packet::udp4(CLIENT4, VIP4, 40000, 80).build().bytes),
            ("tcp4 elsewhere", Packet::tcp4(CLIENT4, Ipv4Addr::new(10, 100, 0, 2), 40000, 80).build().bytes),
            ("icmp4 to the VIP", Packet::icmp4(CLIENT4, VIP4).build().bytes),
            ("tcp6 to the VIP, another port", Packet::tcp6(CLIENT6, VIP6, 40000, 8080).build().bytes),
        ] {
            let (action, out) = lab.run(&frame);
            assert_eq!((action, out), (xdp_action::PASS, frame), "{name}");
        }
        assert_eq!(lab.stat(stat::FORWARDED), 0);
    });
}

#[test]
fn no_backend_drops_and_unresolved_next_hop_passes_encapsulated() {
    lab_test(|lab| {
        let empty: ServiceId = format!("{VIP4}:8443/tcp").parse().unwrap();
        lab.set(|s| s.add_service(empty, 251).unwrap());
        let frame = Packet::tcp4(CLIENT4, VIP4, 40000, 8443).build().bytes;
        assert_eq!(lab.run(&frame).0, xdp_action::DROP);
        assert_eq!(lab.stat(stat::NO_BACKEND), 1);

        // A backend with no neighbour entry yet: the kernel forwards the encapsulated packet
        // (and resolves the neighbour); the Ethernet header is still the client's.
        lab.set(|s| s.add_backend(&empty, UNRESOLVED4.parse().unwrap(), 1).unwrap());
        let (action, out) = lab.run(&frame);
        assert_eq!(action, xdp_action::PASS);
        let f = flow(CLIENT4.into(), VIP4.into(), 40000, 8443, IPPROTO_TCP);
        let mut want = encapsulated(lab, &frame, UNRESOLVED4.parse().unwrap(), &f);
        want[..12].copy_from_slice(&frame[..12]);
        assert_eq!(out, want);
        assert_eq!(lab.stat(stat::FIB_NO_NEIGH), 1);
    });
}

#[test]
fn drained_backend_keeps_its_flows_and_removed_one_loses_them() {
    lab_test(|lab| {
        let svc = svc4();
        // Flows until each backend has one.
        let mut owned: Vec<(IpAddr, Vec<u8>, FlowKey)> = Vec::new();
        for port in 30000..30100 {
            let frame = Packet::tcp4(CLIENT4, VIP4, port, 80).build().bytes;
            let f = flow(CLIENT4.into(), VIP4.into(), port, 80, IPPROTO_TCP);
            let b = expected_backend(&lab.state, &svc, &f);
            assert_eq!(lab.run(&frame).1, encapsulated(lab, &frame, b, &f));
            if !owned.iter().any(|(x, ..)| *x == b) {
                owned.push((b, frame, f));
            }
        }
        assert_eq!(owned.len(), 3, "100 flows reach all three backends");
        let (drained, syn, f) = owned[0].clone();
        let frame = acked(&syn);
        lab.set(|s| s.set_admin(&svc, drained, rampart::lb::state::Admin::Drain).unwrap());
        // Its established flow stays; new flows never reach it, not even a new connection
        // from the same client port (a SYN is hashed by the table whatever the flow's entry).
        assert_eq!(lab.run(&frame).1, encapsulated(lab, &frame, drained, &f), "a drained backend's flow moved");
        let reopened = expected_backend(&lab.state, &svc, &f);
        assert_ne!(reopened, drained);
        assert_eq!(
            lab.run(&syn).1,
            encapsulated(lab, &syn, reopened, &f),
            "a new connection went to the drained backend"
        );
        // That SYN recorded the flow anew: its later packets follow it.
        assert_eq!(lab.run(&frame).1, encapsulated(lab, &frame, reopened, &f), "the reopened flow's packets");
        lab.set(|s| s.set_admin(&svc, drained, rampart::lb::state::Admin::Ready).unwrap());
        lab.run(&syn);
        lab.set(|s| s.set_admin(&svc, drained, rampart::lb::state::Admin::Drain).unwrap());
        assert_eq!(lab.run(&frame).1, encapsulated(lab, &frame, drained, &f), "a drained backend's flow moved");
        for port in 31000..31200 {
            let frame = Packet::tcp4(CLIENT4, VIP4, port, 80).build().bytes;
            let (_, out) = lab.run(&frame);
            assert_ne!(
                &out[30..34],
                &match drained {
                    IpAddr::V4(a) => a.octets(),
                    _ => unreachable!(),
                },
                "a new flow went to the drained backend"
            );
        }
        // Removed: its flow goes where the table now says; the others' flows do not move.
        lab.set(|s| s.delete_backend(&svc, drained).unwrap());
        let moved_to = expected_backend(&lab.state, &svc, &f);
        assert_ne!(moved_to, drained);
        assert_eq!(lab.run(&frame).1, encapsulated(lab, &frame, moved_to, &f));
        for (b, frame, f) in &owned[1..] {
            let frame = acked(frame);
            assert_eq!(lab.run(&frame).1, encapsulated(lab, &frame, *b, f), "flow of {b} moved");
        }
    });
}

/// The next hop is cached per backend (and CPU): a burst of one flow's packets makes only a
/// few FIB lookups, not one each; and a neighbour change (the backend's MAC) reaches the packets
/// once the cached entry expires, with no userspace involved.
#[test]
fn next_hop_is_cached_and_a_neighbour_change_is_picked_up() {
    lab_test(|lab| {
        let svc = svc4();
        let syn = Packet::tcp4(CLIENT4, VIP4, 40000, 80).build().bytes;
        let f = flow(CLIENT4.into(), VIP4.into(), 40000, 80, IPPROTO_TCP);
        let backend = expected_backend(&lab.state, &svc, &f);
        assert_eq!(lab.run(&syn).1, encapsulated(lab, &syn, backend, &f));
        let frame = acked(&syn);
        let before = lab.stat(stat::NEXTHOP_LOOKUPS);
        let runs = 1_000;
        for i in 0..runs {
            assert_eq!(lab.run(&frame).1, encapsulated(lab, &frame, backend, &f), "packet {i}");
        }
        // A lookup is made again only per CPU and second: a burst this short makes a handful.
        let lookups = lab.stat(stat::NEXTHOP_LOOKUPS) - before;
        assert!(lookups < runs / 2, "{lookups} next-hop lookups for {runs} packets of one flow: no cache");

        // The backend moves to another MAC (a failover, a replaced NIC).
        let new_mac = [2, 0, 0, 0, 0x77, 0x77];
        let text = new_mac.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(":");
        Ns::current().neigh("lb0", &backend.to_string(), &text).unwrap_or_else(|e| panic!("{e}"));
        let mut want = encapsulated(lab, &frame, backend, &f);
        want[..6].copy_from_slice(&new_mac);
        // Bounded by count and time; the entry lives about a second.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let mut seen = None;
        for _ in 0..2_000 {
            let out = lab.run(&frame).1;
            if out[..6] == new_mac {
                seen = Some(out);
                break;
            }
            assert_eq!(out, encapsulated(lab, &frame, backend, &f), "neither the old next hop nor the new one");
            if std::time::Instant::now() > deadline {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(seen.expect("the new MAC never reached the packets"), want, "the packet after the change");
    });
}

/// ICMP Fragmentation Needed / Packet Too Big: the whole answer, checksums included.
#[test]
fn too_big_is_answered_with_icmp() {
    lab_test(|lab| {
        Ns::current().link_set("lb0", &["mtu", "1300"]).unwrap_or_else(|e| panic!("{e}"));
        let client_mac = [0x02, 0xc1, 0, 0, 0, 7];

        let mut p = Packet::tcp4(CLIENT4, VIP4, 40000, 80).payload_len(1300 - 40);
        p.src_mac = client_mac;
        p.dst_mac = lab.mac;
        let frame = p.build().bytes;
        let (action, out) = lab.run(&frame);
        assert_eq!(action, xdp_action::TX);
        let mut want = Vec::new();
        want.extend_from_slice(&client_mac);
        want.extend_from_slice(&lab.mac);
        want.extend_from_slice(&[0x08, 0x00]);
        let mut ip = vec![0x45, 0, 0, 20 + 8 + 68, 0, 0, 0x40, 0, 64, 1, 0, 0];
        ip.extend_from_slice(&VIP4.octets());
        ip.extend_from_slice(&CLIENT4.octets());
        let c = checksum(&ip, 0).to_be_bytes();
        ip[10..12].copy_from_slice(&c);
        want.extend_from_slice(&ip);
        let mtu = (1300u16 - 20).to_be_bytes();
        let mut icmp = vec![3, 4, 0, 0, 0, 0, mtu[0], mtu[1]];
        icmp.extend_from_slice(&frame[ETH_HLEN..ETH_HLEN + 68]);
        let c = checksum(&icmp, 0).to_be_bytes();
        icmp[2..4].copy_from_slice(&c);
        want.extend_from_slice(&icmp);
        assert_eq!(out, want, "ICMP fragmentation needed");

        let mut p = Packet::tcp6(CLIENT6, VIP6, 40000, 80).payload_len(1300 - 60);
        p.src_mac = client_mac;
        p.dst_mac = lab.mac;
        let frame = p.build().bytes;
        let (action, out) = lab.run(&frame);
        assert_eq!(action, xdp_action::TX);
        let mut want = Vec::new();
        want.extend_from_slice(&client_mac);
        want.extend_from_slice(&lab.mac);
        want.extend_from_slice(&[0x86, 0xdd]);
        want.extend_from_slice(&[0x60, 0, 0, 0, 0, 208, 58, 64]);
        want.extend_from_slice(&VIP6.octets());
        want.extend_from_slice(&CLIENT6.octets());
        let mtu = (1300u32 - 40).to_be_bytes();
        let mut icmp = vec![2, 0, 0, 0, mtu[0], mtu[1], mtu[2], mtu[3]];
        icmp.extend_from_slice(&frame[ETH_HLEN..ETH_HLEN + 200]);
        // The pseudo-header: source, destination, upper-layer length, next header.
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&VIP6.octets());
        pseudo.extend_from_slice(&CLIENT6.octets());
        pseudo.extend_from_slice(&(icmp.len() as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, 58]);
        pseudo.extend_from_slice(&icmp);
        let c = checksum(&pseudo, 0).to_be_bytes();
        icmp[2..4].copy_from_slice(&c);
        want.extend_from_slice(&icmp);
        assert_eq!(out, want, "ICMPv6 packet too big");
        assert_eq!(lab.stat(stat::ICMP_TOO_BIG), 2);
    });
}

/// The kernel's choice equals `loadbalancer`'s for 100,000 random flows over both families and
/// unequal weights.
#[test]
fn differential_kernel_backend_equals_maglev() {
    lab_test(|lab| {
        let (s4, s6) = (svc4(), svc6());
        lab.set(|s| {
            s.set_weight(&s4, BACKENDS4[0].parse().unwrap(), 300).unwrap();
            s.set_weight(&s6, BACKENDS6[2].parse().unwrap(), 50).unwrap();
        });
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut seen = std::collections::BTreeMap::<IpAddr, u32>::new();
        for i in 0..100_000u32 {
            let r = next();
            let (sport, v6) = (r as u16 | 1024, i % 2 == 1);
            let (frame, svc, f) = if v6 {
                let mut o = CLIENT6.octets();
                o[8..16].copy_from_slice(&next().to_be_bytes());
                let c = Ipv6Addr::from(o);
                (
                    Packet::tcp6(c, VIP6, sport, 80).build().bytes,
                    s6,
                    flow(c.into(), VIP6.into(), sport, 80, IPPROTO_TCP),
                )
            } else {
                let c = Ipv4Addr::from((r >> 32) as u32 | 0x0100_0000);
                (
                    Packet::tcp4(c, VIP4, sport, 80).build().bytes,
                    s4,
                    flow(c.into(), VIP4.into(), sport, 80, IPPROTO_TCP),
                )
            };
            let want = expected_backend(&lab.state, &svc, &f);
            let (action, out) = lab.run(&frame);
            assert_eq!(action, xdp_action::TX, "flow {i}");
            let got: IpAddr = if v6 {
                Ipv6Addr::from(<[u8; 16]>::try_from(&out[38..54]).unwrap()).into()
            } else {
                Ipv4Addr::from(<[u8; 4]>::try_from(&out[30..34]).unwrap()).into()
            };
            assert_eq!(got, want, "flow {i}: {f:?}");
            *seen.entry(got).or_default() += 1;
        }
        assert_eq!(seen.len(), 6, "every backend got flows: {seen:?}");
    });
}

/// `frame` as its connection's later packets are: a TCP SYN turned into an ACK (checksum
/// fixed); any other frame as it is.
fn acked(frame: &[u8]) -> Vec<u8> {
    let v6 = u16::from_be_bytes([frame[12], frame[13]]) == 0x86dd;
    let (proto, l4) = if v6 { (frame[20], 14 + 40) } else { (frame[23], 14 + 4 * (frame[14] & 0x0f) as usize) };
    let mut out = frame.to_vec();
    if proto != IPPROTO_TCP {
        return out;
    }
    // One 16-bit word of the header changes (data offset + flags): the checksum follows it
    // (RFC 1624, incremental update).
    let old = u16::from_be_bytes([out[l4 + 12], out[l4 + 13]]);
    out[l4 + 13] = rampart_tests::packet::TCP_ACK;
    let new = u16::from_be_bytes([out[l4 + 12], out[l4 + 13]]);
    let sum = !u16::from_be_bytes([out[l4 + 16], out[l4 + 17]]) as u32 + (!old) as u32 + new as u32;
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    out[l4 + 16..l4 + 18].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    out
}
