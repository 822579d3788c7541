//! `rampart decap` on a backend, between network namespaces: the client namespace plays the
//! balancer and sends IPv4-in-IPv4 TCP SYNs (built with the frame builder, sent on a packet
//! socket) to the server namespace, the backend, where `decap attach` put the VIP on lo, set the
//! ARP sysctls and attached `rampart_decap`; the backend's stack answers with a SYN-ACK from the
//! VIP straight to the client (direct server return). `decap detach` then leaves nothing behind:
//! no pins, no state, no VIP on lo, the sysctls as they were, no XDP program. A failed attach
//! undoes what it did, and a detach after the interface was deleted still cleans up.
//!
//! Needs root and the `rampart` binary (`RAMPART_BIN`, else `target/<profile>/rampart`).

use std::{
    ffi::CString,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener},
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use rampart::paths::Scope;
use rampart_common::net::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IPPROTO_IPIP, IPPROTO_IPV6, IPPROTO_TCP};
use rampart_netlab::{Ns, run, veth};
use rampart_tests::{
    netns::{CLIENT_IF, SERVER_IF, TestNet, in_netns},
    packet::{Packet, TCP_ACK, TCP_SYN, Transport, tcp},
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const NOT_VIP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 1);
const PORT: u16 = 8080;
const SYSCTLS: [&str; 4] = [
    "/proc/sys/net/ipv4/conf/all/arp_ignore",
    "/proc/sys/net/ipv4/conf/all/arp_announce",
    "/proc/sys/net/ipv4/conf/rt-s/arp_ignore",
    "/proc/sys/net/ipv4/conf/rt-s/arp_announce",
];

/// A backend lab: [`TestNet`] plus `decap detach` in Drop (before the namespaces go, so a
/// failing test leaves no pins), then a check that the decap directories are gone.
struct Lab {
    attached: bool,
    net: TestNet,
}

impl Lab {
    fn new() -> Lab {
        Lab { attached: false, net: TestNet::new().unwrap_or_else(|e| panic!("{e}")) }
    }
    fn server(&self) -> String {
        self.net.server.clone()
    }
    fn server_ns(&self) -> Ns {
        Ns::named(&self.net.server)
    }
    fn decap(&mut self, args: &[&str]) -> std::process::Output {
        let mut all = vec!["decap"];
        all.extend_from_slice(args);
        let out = self.net.rampart(&self.server(), &all).expect("run rampart");
        if out.status.success() {
            match args.first() {
                Some(&"attach") => self.attached = true,
                Some(&"detach") => self.attached = false,
                _ => {}
            }
        }
        out
    }
    fn decap_ok(&mut self, args: &[&str]) -> String {
        let out = self.decap(args);
        assert!(out.status.success(), "rampart decap {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
    /// `/sys/fs/bpf/rampart/decap/<scope>` and `/run/rampart/decap/<scope>`.
    fn decap_dirs(&self) -> [PathBuf; 2] {
        let scope = Scope::Netns(self.server());
        [scope.decap_pin_root(), scope.decap_state_root()]
    }
    fn sysctls(&self) -> Vec<String> {
        let ns = self.server();
        in_netns(&ns, || {
            SYSCTLS
                .iter()
                .map(|p| std::fs::read_to_string(p).map(|s| s.trim().to_string()).unwrap_or_default())
                .collect()
        })
        .expect("read sysctls")
    }
    fn lo_addrs(&self) -> String {
        self.server_ns().ip(&["-o", "addr", "show", "dev", "lo"]).expect("ip addr")
    }
    fn xdp_attached(&self) -> bool {
        self.net.server_link().expect("ip link").contains("prog/xdp")
    }
    /// Everything a detach must have removed.
    fn assert_clean(&self, before: &[String]) {
        for d in self.decap_dirs() {
            assert!(!d.exists(), "{} left behind", d.display());
        }
        let lo = self.lo_addrs();
        assert!(!lo.contains(&format!("{VIP}/32")) && !lo.contains(&format!("{VIP6}/128")), "VIP still on lo: {lo}");
        assert_eq!(self.sysctls(), before, "sysctls not restored");
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.attached {
            let out = self.net.rampart(&self.server(), &["decap", "detach", "--iface", SERVER_IF]);
            if !matches!(&out, Ok(o) if o.status.success()) && !std::thread::panicking() {
                panic!("decap detach in cleanup: {out:?}");
            }
        }
        let left: Vec<_> = self.decap_dirs().into_iter().filter(|d| d.exists()).collect();
        for d in &left {
            let _ = std::fs::remove_dir_all(d);
        }
        if !left.is_empty() && !std::thread::panicking() {
            panic!("decap directories left behind (removed now): {left:?}");
        }
    }
}

/// An IP-in-IP TCP SYN as the balancer would send it: client → `vip:PORT` inside (IPv4 in
/// IPv4, or IPv6 in IPv6), the client's address → the server's outside, between the veth's MACs.
fn ipip_syn(lab: &Lab, vip: IpAddr, sport: u16) -> Vec<u8> {
    let (inner, mut outer) = match vip {
        IpAddr::V4(v) => (
            Packet::ipv4(lab.net.client_v4, v, tcp(sport, PORT)).build(),
            Packet::ipv4(lab.net.client_v4, lab.net.server_v4, Transport::Raw { proto: IPPROTO_IPIP }),
        ),
        IpAddr::V6(v) => (
            Packet::ipv6(lab.net.client_v6, v, tcp(sport, PORT)).build(),
            Packet::ipv6(lab.net.client_v6, lab.net.server_v6, Transport::Raw { proto: IPPROTO_IPV6 }),
        ),
    };
    outer.payload = inner.bytes[ETH_HLEN..].to_vec();
    outer.dst_mac = mac(rampart_tests::netns::SERVER_MAC);
    outer.src_mac = mac(rampart_tests::netns::CLIENT_MAC);
    outer.build().bytes
}

fn mac(s: &str) -> [u8; 6] {
    let v: Vec<u8> = s.split(':').map(|h| u8::from_str_radix(h, 16).expect("hex")).collect();
    v.try_into().expect("6 bytes")
}

/// In the client namespace: sends `frame` on the client veth with a packet socket and watches
/// the same interface (bounded: 3 s) for a TCP SYN-ACK from `from:PORT` to `to_port`. Returns
/// the answering frame.
fn send_and_watch(ns: &str, frame: Vec<u8>, from: IpAddr, to_port: u16) -> Option<Vec<u8>> {
    in_netns(ns, move || {
        let ifname = CString::new(CLIENT_IF).unwrap();
        // SAFETY: plain syscalls on a socket this closure owns; buffers outlive the calls.
        unsafe {
            let ifindex = libc::if_nametoindex(ifname.as_ptr());
            assert!(ifindex != 0, "{CLIENT_IF} not found");
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, (libc::ETH_P_ALL as u16).to_be() as i32);
            assert!(fd >= 0, "packet socket: {}", std::io::Error::last_os_error());
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
            sll.sll_ifindex = ifindex as i32;
            let sll_len = size_of::<libc::sockaddr_ll>() as u32;
            assert_eq!(libc::bind(fd, (&raw const sll).cast(), sll_len), 0, "bind");
            let tv = libc::timeval { tv_sec: 0, tv_usec: 100_000 };
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                size_of::<libc::timeval>() as u32,
            );
            let sent = libc::sendto(fd, frame.as_ptr().cast(), frame.len(), 0, (&raw const sll).cast(), sll_len);
            assert_eq!(sent, frame.len() as isize, "send: {}", std::io::Error::last_os_error());
            let deadline = Instant::now() + Duration::from_secs(3);
            let mut buf = vec![0u8; 2048];
            let mut found = None;
            while Instant::now() < deadline {
                let n = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
                if n <= 0 {
                    continue;
                }
                let f = &buf[..n as usize];
                if is_syn_ack(f, from, to_port) {
                    found = Some(f.to_vec());
                    break;
                }
            }
            libc::close(fd);
            found
        }
    })
    .expect("enter the client namespace")
}

/// A TCP SYN-ACK from `from:PORT` to `to_port` (IPv4 with any IHL, or IPv6 without
/// extension headers, as the stack sends it).
fn is_syn_ack(f: &[u8], from: IpAddr, to_port: u16) -> bool {
    if f.len() < ETH_HLEN + 20 {
        return false;
    }
    let ethertype = [f[12], f[13]];
    let (src, proto, tcp) = match from {
        IpAddr::V4(_) if ethertype == ETH_P_IP.to_be_bytes() => {
            let ihl = (f[14] & 0x0f) as usize * 4;
            (IpAddr::from(<[u8; 4]>::try_from(&f[26..30]).unwrap()), f[14 + 9], ETH_HLEN + ihl)
        }
        IpAddr::V6(_) if ethertype == ETH_P_IPV6.to_be_bytes() && f.len() >= ETH_HLEN + 40 => {
            (IpAddr::from(<[u8; 16]>::try_from(&f[22..38]).unwrap()), f[14 + 6], ETH_HLEN + 40)
        }
        _ => return false,
    };
    proto == IPPROTO_TCP
        && src == from
        && f.len() >= tcp + 20
        && u16::from_be_bytes([f[tcp], f[tcp + 1]]) == PORT
        && u16::from_be_bytes([f[tcp + 2], f[tcp + 3]]) == to_port
        && f[tcp + 13] & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK
}

fn counters(lab: &mut Lab) -> serde_json::Value {
    let out = lab.decap_ok(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("decap status --json");
    v[0]["counters"].clone()
}

#[test]
fn decapsulated_syn_is_answered_from_the_vip_and_detach_leaves_nothing() {
    let mut lab = Lab::new();
    let before = lab.sysctls();
    assert_eq!(&before[..2], &["0", "0"], "a fresh namespace's ARP sysctls");
    // A listener on the VIP:PORT, in the server namespace, before the VIP exists (freebind).
    let server = lab.server();
    // Listeners on VIP:PORT (both families), in the server namespace, before the VIPs exist.
    let listeners = in_netns(&server, || {
        [IpAddr::V4(VIP), IpAddr::V6(VIP6)].map(|ip| {
            let s = socket2::Socket::new(
                socket2::Domain::for_address(SocketAddr::new(ip, PORT)),
                socket2::Type::STREAM,
                None,
            )
            .unwrap();
            if ip.is_ipv6() {
                s.set_freebind_v6(true).unwrap();
                s.set_only_v6(true).unwrap();
            } else {
                s.set_freebind_v4(true).unwrap();
            }
            s.bind(&SocketAddr::new(ip, PORT).into()).unwrap();
            s.listen(16).unwrap();
            TcpListener::from(s)
        })
    })
    .unwrap();

    let out = lab.decap_ok(&["attach", "--iface", SERVER_IF, "--vip", &format!("{VIP},{VIP6}")]);
    assert!(out.contains("decap attached to rt-s") && out.contains("program id"), "{out}");
    let lo = lab.lo_addrs();
    assert!(lo.contains(&format!("{VIP}/32")) && lo.contains(&format!("{VIP6}/128")), "VIPs not on lo: {lo}");
    assert_eq!(lab.sysctls(), ["1", "2", "1", "2"], "ARP sysctls");
    assert!(lab.xdp_attached(), "no XDP program on {SERVER_IF}");
    let pins = Scope::Netns(server.clone()).decap_pin_dir(SERVER_IF);
    for p in ["link", "DECAP_VIPS", "DECAP_STATS"] {
        assert!(pins.join(p).exists(), "{p} not pinned");
    }
    // Attached twice, a missing interface, a bad VIP: clear errors, nothing changes.
    let again = lab.decap(&["attach", "--iface", SERVER_IF, "--vip", "10.99.0.9"]);
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(!again.status.success() && err.contains("already attached"), "{err}");
    let missing = lab.decap(&["attach", "--iface", "nosuch0", "--vip", "10.99.0.9"]);
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(!missing.status.success() && err.contains("interface nosuch0 not found"), "{err}");
    let bad = lab.decap(&["attach", "--iface", SERVER_IF, "--vip", "10.99.0.1,nope"]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("`nope` is not an IP address"), "{err}");
    assert!(!lab.lo_addrs().contains("10.99.0.9"), "a refused attach changed lo");

    // Without the program the SYN would meet a kernel with no ipip driver; with it, the stack
    // sees a SYN to the VIP and answers from the VIP, straight to the client.
    let client = lab.net.client.clone();
    let frame = ipip_syn(&lab, VIP.into(), 40100);
    let answer = send_and_watch(&client, frame.clone(), VIP.into(), 40100);
    let answer = answer.unwrap_or_else(|| panic!("no SYN-ACK from {VIP}:{PORT}; counters {}", counters(&mut lab)));
    assert_eq!(&answer[30..34], &lab.net.client_v4.octets(), "the SYN-ACK goes to the client itself");
    let c = counters(&mut lab);
    assert_eq!(c["decapsulated"]["packets"], 1, "{c}");
    assert_eq!(c["decapsulated"]["bytes"], frame.len() as u64, "{c}");

    // The same for IPv6 in IPv6.
    let frame6 = ipip_syn(&lab, VIP6.into(), 40102);
    let answer = send_and_watch(&client, frame6.clone(), VIP6.into(), 40102);
    let answer = answer.unwrap_or_else(|| panic!("no SYN-ACK from [{VIP6}]:{PORT}; counters {}", counters(&mut lab)));
    assert_eq!(&answer[38..54], &lab.net.client_v6.octets(), "the SYN-ACK goes to the client itself");
    let c = counters(&mut lab);
    assert_eq!(c["decapsulated"]["packets"], 2, "{c}");

    // IP-in-IP to an address that is not a VIP: untouched, counted, unanswered.
    let other = send_and_watch(&client, ipip_syn(&lab, NOT_VIP.into(), 40101), NOT_VIP.into(), 40101);
    assert!(other.is_none(), "an answer for a non-VIP");
    let c = counters(&mut lab);
    assert_eq!((c["not_ours"]["packets"].as_u64(), c["decapsulated"]["packets"].as_u64()), (Some(1), Some(2)), "{c}");
    drop(listeners);

    let out = lab.decap_ok(&["detach", "--iface", SERVER_IF]);
    assert!(out.contains("decap detached from rt-s"), "{out}");
    assert!(!lab.xdp_attached(), "XDP program still on {SERVER_IF}");
    lab.assert_clean(&before);
    let again = lab.decap(&["detach", "--iface", SERVER_IF]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("decap is not attached"), "{again:?}");
}

#[test]
fn a_failed_attach_undoes_what_it_did() {
    let mut lab = Lab::new();
    let before = lab.sysctls();
    // The firewall holds the interface: decap gets as far as the attach itself, then fails.
    lab.net.attach("native").expect("attach the firewall");
    let out = lab.decap(&["attach", "--iface", SERVER_IF, "--vip", &VIP.to_string(), "--mode", "native"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "decap attached over the firewall");
    assert!(err.contains("another XDP program is attached"), "{err}");
    lab.assert_clean(&before);
    lab.net.detach().expect("detach the firewall");
}

#[test]
fn detach_after_the_interface_was_deleted_cleans_up() {
    let mut lab = Lab::new();
    let before = lab.sysctls();
    lab.decap_ok(&["attach", "--iface", SERVER_IF, "--vip", &format!("{VIP},fd00:99::1"), "--mode", "skb"]);
    assert!(lab.lo_addrs().contains("fd00:99::1/128"), "{}", lab.lo_addrs());
    lab.net.delete_server_link().expect("delete the veth");
    let out = lab.decap_ok(&["detach", "--iface", SERVER_IF]);
    assert!(out.contains("removed from lo: 10.99.0.1, fd00:99::1"), "{out}");
    for d in lab.decap_dirs() {
        assert!(!d.exists(), "{} left behind", d.display());
    }
    let lo = lab.lo_addrs();
    assert!(!lo.contains("10.99.0.1") && !lo.contains("fd00:99::1"), "{lo}");
    // The interface's own sysctls went with it; `all` is back as it was.
    assert_eq!(&lab.sysctls()[..2], &before[..2]);
}

/// Two interfaces of one backend share the `all` sysctls and a VIP: the first detach leaves
/// both in place for the other, the last one removes the VIP and restores the sysctls. A VIP
/// someone else put on lo stays.
#[test]
fn attachments_in_one_scope_share_the_vip_and_the_sysctls() {
    let mut lab = Lab::new();
    let before = lab.sysctls();
    let server = lab.server();
    let ns = lab.server_ns();
    veth(ns.end("rt-x"), ns.end("rt-y")).expect("a second veth");
    ns.addr("lo", "10.99.0.7/32").expect("ip addr"); // not rampart's
    lab.decap_ok(&["attach", "--iface", SERVER_IF, "--vip", &format!("{VIP},10.99.0.7"), "--mode", "skb"]);
    let out = lab.net.rampart(&server, &["decap", "attach", "--iface", "rt-x", "--vip", &format!("{VIP},10.99.0.8")]);
    let out = out.expect("run rampart");
    assert!(out.status.success(), "second attach: {}", String::from_utf8_lossy(&out.stderr));
    let status = lab.decap_ok(&["status", "--json"]);
    let st: serde_json::Value = serde_json::from_str(&status).unwrap();
    let names: Vec<&str> = st.as_array().unwrap().iter().map(|a| a["iface"].as_str().unwrap()).collect();
    assert_eq!(names, ["rt-s", "rt-x"], "{status}");

    lab.decap_ok(&["detach", "--iface", SERVER_IF]);
    lab.attached = true; // rt-x is still attached: Drop must detach it if the test fails here
    let lo = lab.lo_addrs();
    assert!(lo.contains(&format!("{VIP}/32")) && lo.contains("10.99.0.8/32"), "rt-x's VIPs went: {lo}");
    assert_eq!(&lab.sysctls()[..2], ["1", "2"], "the all sysctls went back while rt-x needs them");
    let out = lab.net.rampart(&server, &["decap", "detach", "--iface", "rt-x"]).expect("run rampart");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    lab.attached = false;
    let lo = lab.lo_addrs();
    assert!(lo.contains("10.99.0.7/32"), "an address rampart did not add was removed: {lo}");
    ns.ip(&["addr", "del", "10.99.0.7/32", "dev", "lo"]).expect("ip addr");
    lab.assert_clean(&before);
}

/// The backend's namespace deleted under rampart: detach still removes the pins and the state
/// (and touches no other namespace's sysctls or addresses).
#[test]
fn detach_after_the_namespace_was_deleted_removes_pins_and_state() {
    let mut lab = Lab::new();
    lab.decap_ok(&["attach", "--iface", SERVER_IF, "--vip", &VIP.to_string(), "--mode", "skb"]);
    run(Command::new("ip").args(["netns", "del", &lab.server()])).expect("delete the namespace");
    let out = lab.decap(&["detach", "--iface", SERVER_IF]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for d in lab.decap_dirs() {
        assert!(!d.exists(), "{} left behind", d.display());
    }
}
