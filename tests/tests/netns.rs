//! Real traffic between network namespaces through the attached firewall, in native and in skb
//! mode: TCP (connect + transfer), UDP and ICMP over IPv4, UDP and TCP over IPv6. What is denied
//! never arrives, what is allowed does, and every rule counter in `fw list --json` equals the
//! packets the client sent for it. A rule file that fails to load leaves the old rules in force;
//! `detach` leaves no pin, no state and no XDP program behind.
//!
//! Each test builds its own namespaces (unique names), so the tests run in parallel. Needs root
//! and the `rampart` binary (`RAMPART_BIN`, else `target/<profile>/rampart`).

use std::{
    io::{Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use rampart_netlab::output;
use rampart_tests::netns::{SERVER_IF, TestNet, in_netns};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

// Ports of the rules below. Client source ports are fixed too, so each rule sees one flow only.
const TCP_OK: u16 = 5001;
const TCP_DENIED: u16 = 5002;
const TCP6_OK: u16 = 5003;
const UDP_OK: u16 = 6001;
const UDP_DENIED: u16 = 6002;
const UDP6_OK: u16 = 6003;
const UDP_OK_SRC: u16 = 40001;
const UDP_DENIED_SRC: u16 = 40002;
const UDP6_OK_SRC: u16 = 40003;

/// Rule ids (1-based, file order) of [`rules`].
const R_TCP_OK: u64 = 1;
const R_TCP_DENIED: u64 = 2;
const R_UDP_OK: u64 = 3;
const R_UDP_DENIED: u64 = 4;
const R_ICMP_OK: u64 = 5;
const R_ICMP_DENIED: u64 = 6;
const R_UDP6_OK: u64 = 7;
const R_TCP6_OK: u64 = 8;

/// `tcpi_state` of a connect in progress (include/net/tcp_states.h).
const TCP_SYN_SENT: u8 = 2;

const UDP_PAYLOAD: usize = 100;
/// Ethernet + IPv4 + UDP headers; + 20 for IPv6.
const UDP4_FRAME: u64 = 14 + 20 + 8 + UDP_PAYLOAD as u64;
const UDP6_FRAME: u64 = 14 + 40 + 8 + UDP_PAYLOAD as u64;

/// Every rule names the client's address and the exact ports, so nothing but the test's own
/// traffic can touch its counter.
fn rules(net: &TestNet) -> String {
    let (c, s, s2) = (net.client_v4, net.server_v4, net.server2_v4);
    let (c6, s6) = (net.client_v6, net.server_v6);
    format!(
        r#"default = "deny"

[[rule]]
action = "allow"
proto = "tcp"
src = "{c}/32"
dst = "{s}/32"
dport = {TCP_OK}

[[rule]]
action = "deny"
proto = "tcp"
src = "{c}/32"
dst = "{s}/32"
dport = {TCP_DENIED}

[[rule]]
action = "allow"
proto = "udp"
src = "{c}"
dst = "{s}"
sport = {UDP_OK_SRC}
dport = {UDP_OK}

[[rule]]
action = "deny"
proto = "udp"
src = "{c}"
dst = "{s}"
sport = {UDP_DENIED_SRC}
dport = {UDP_DENIED}

[[rule]]
action = "allow"
proto = "icmp"
src = "{c}"
dst = "{s}"

[[rule]]
action = "deny"
proto = "icmp"
src = "{c}"
dst = "{s2}"

[[rule]]
action = "allow"
proto = "udp"
src = "{c6}/128"
dst = "{s6}/128"
sport = {UDP6_OK_SRC}
dport = {UDP6_OK}

[[rule]]
action = "allow"
proto = "tcp"
src = "{c6}"
dst = "{s6}"
dport = {TCP6_OK}
"#
    )
}

/// The same file with one error on line 5 (a port out of range).
const BAD_LINE: usize = 5;
const BAD_RULES: &str = "default = \"allow\"\n\n[[rule]]\naction = \"deny\"\ndport = 70000\nproto = \"tcp\"\n";

fn net() -> TestNet {
    TestNet::new().unwrap_or_else(|e| panic!("setting up namespaces: {e}"))
}

/// `(packets, bytes)` of rule `id` in `fw list --json`.
fn rule_counter(net: &TestNet, id: u64) -> (u64, u64) {
    let list = net.fw_list().unwrap_or_else(|e| panic!("fw list: {e}"));
    let rules = list["rules"].as_array().unwrap_or_else(|| panic!("fw list --json has no rules array: {list}"));
    let r = rules
        .iter()
        .find(|r| r["id"].as_u64() == Some(id))
        .unwrap_or_else(|| panic!("fw list --json has no rule id {id}: {list}"));
    let n = |k: &str| r[k].as_u64().unwrap_or_else(|| panic!("rule {id}: no {k} in {r}"));
    (n("packets"), n("bytes"))
}

/// Waits (bounded) until rule `id` has counted `packets`; returns what it counted last. The
/// program counts on the receiving side, a moment after the sender's call returns.
fn settle(net: &TestNet, id: u64, packets: u64) -> (u64, u64) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let c = rule_counter(net, id);
        if c.0 >= packets || Instant::now() > deadline {
            return c;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn tcp_info(fd: i32) -> libc::tcp_info {
    // SAFETY: tcp_info is plain data; getsockopt writes at most `len` bytes into it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    let rc = unsafe { libc::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, (&raw mut info).cast(), &mut len) };
    assert_eq!(rc, 0, "getsockopt(TCP_INFO): {}", std::io::Error::last_os_error());
    info
}

fn segs_out(fd: i32) -> u64 {
    u64::from(tcp_info(fd).tcpi_segs_out)
}

/// A TCP server in the server namespace: accepts one connection, reads to EOF, answers with the
/// byte count and closes. Returns its thread (bytes read, or None if nobody connected in time).
fn tcp_server(net: &TestNet, addr: SocketAddr) -> thread::JoinHandle<Option<u64>> {
    let listener = in_netns(&net.server, move || TcpListener::bind(addr))
        .expect("enter server namespace")
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    listener.set_nonblocking(true).expect("nonblocking listener");
    thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(6);
        let mut conn = loop {
            match listener.accept() {
                Ok((c, _)) => break c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(20));
                }
                Err(_) => return None,
            }
        };
        conn.set_nonblocking(false).ok()?;
        conn.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        loop {
            match conn.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => total += n as u64,
                Err(_) => return None,
            }
        }
        conn.write_all(format!("got {total}").as_bytes()).ok()?;
        Some(total)
    })
}

/// Connects from the client namespace, sends `bytes`, reads the answer to EOF. Returns the
/// answer and the client's TCP segment count (every segment it put on the wire).
fn tcp_transfer(net: &TestNet, to: SocketAddr, bytes: usize) -> (String, u64) {
    in_netns(&net.client, move || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3)).unwrap_or_else(|e| panic!("connect {to}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let chunk = vec![0x5au8; 16 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len());
            s.write_all(&chunk[..n]).unwrap_or_else(|e| panic!("send to {to}: {e}"));
            left -= n;
        }
        s.shutdown(Shutdown::Write).expect("shutdown");
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap_or_else(|e| panic!("read answer from {to}: {e}"));
        // The server's FIN was acknowledged before read() saw EOF: nothing more will be sent.
        (answer, segs_out(s.as_raw_fd()))
    })
    .expect("enter client namespace")
}

/// A connection attempt whose SYNs are dropped: TCP_SYNCNT 1 makes the kernel give up after
/// about 3 s. Returns the socket error and the SYNs sent. The connect is non-blocking:
/// a blocking connect that fails resets the socket and its counters before returning.
fn tcp_denied(net: &TestNet, to: SocketAddr) -> (std::io::Error, u64) {
    in_netns(&net.client, move || {
        let s = Socket::new(Domain::for_address(to), Type::STREAM, Some(Protocol::TCP)).expect("socket");
        let one: libc::c_int = 1;
        // SAFETY: setsockopt reads one c_int.
        let rc = unsafe {
            libc::setsockopt(s.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_SYNCNT, (&raw const one).cast(), size_of::<libc::c_int>() as u32)
        };
        assert_eq!(rc, 0, "TCP_SYNCNT: {}", std::io::Error::last_os_error());
        s.set_nonblocking(true).expect("nonblocking");
        match s.connect(&SockAddr::from(to)) {
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            other => panic!("connect to {to}: {other:?}, want EINPROGRESS"),
        }
        // SYN at 0 s, again at 1 s, given up at 3 s.
        let deadline = Instant::now() + Duration::from_secs(10);
        while tcp_info(s.as_raw_fd()).tcpi_state == TCP_SYN_SENT {
            assert!(Instant::now() < deadline, "connect to {to} still pending after 10 s");
            thread::sleep(Duration::from_millis(50));
        }
        let err = s.take_error().expect("SO_ERROR").unwrap_or_else(|| panic!("connect to {to} succeeded through a deny rule"));
        (err, segs_out(s.as_raw_fd()))
    })
    .expect("enter client namespace")
}

/// Sends `count` datagrams from `from` to `to`; returns how many the server socket got.
fn udp(net: &TestNet, from: SocketAddr, to: SocketAddr, count: usize) -> usize {
    let server = in_netns(&net.server, move || UdpSocket::bind(to))
        .expect("enter server namespace")
        .unwrap_or_else(|e| panic!("bind {to}: {e}"));
    let client = in_netns(&net.client, move || UdpSocket::bind(from))
        .expect("enter client namespace")
        .unwrap_or_else(|e| panic!("bind {from}: {e}"));
    let payload = [0xa5u8; UDP_PAYLOAD];
    for _ in 0..count {
        client.send_to(&payload, to).unwrap_or_else(|e| panic!("send {from} → {to}: {e}"));
        // A short pause keeps the receiver's backlog from overflowing in skb mode.
        thread::sleep(Duration::from_micros(200));
    }
    server.set_read_timeout(Some(Duration::from_millis(500))).expect("timeout");
    let mut buf = [0u8; 2048];
    let mut got = 0;
    // Until `count` arrived, or nothing came for 500 ms (what a denied flow looks like).
    while got < count {
        match server.recv_from(&mut buf) {
            Ok((n, src)) => {
                assert_eq!((n, src), (UDP_PAYLOAD, from), "unexpected datagram");
                got += 1;
            }
            Err(_) => break,
        }
    }
    got
}

/// `ping -c count` from the client; returns (transmitted, received).
fn ping(net: &TestNet, to: IpAddr, count: u32) -> (u32, u32) {
    let out = output(
        TestNet::exec(&net.client, "ping")
            .args(["-n", "-q", "-c", &count.to_string(), "-i", "0.05", "-W", "1"])
            .arg(to.to_string()),
    )
    .unwrap_or_else(|e| panic!("ping: {e}"));
    let text = String::from_utf8_lossy(&out.stdout);
    // "5 packets transmitted, 5 received, ..."
    let line = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| panic!("ping printed no summary: {text} {}", String::from_utf8_lossy(&out.stderr)));
    let nums: Vec<u32> = line.split(|c: char| !c.is_ascii_digit()).filter_map(|s| s.parse().ok()).collect();
    (nums[0], nums[1])
}

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// Checks rule `id` counted exactly `packets` (and `bytes` when given).
fn expect_counter(net: &TestNet, id: u64, packets: u64, bytes: Option<u64>, what: &str) {
    let (p, b) = settle(net, id, packets);
    assert_eq!(p, packets, "{what}: rule {id} counted {p} packets, the client sent {packets}");
    if let Some(bytes) = bytes {
        assert_eq!(b, bytes, "{what}: rule {id} counted {b} bytes, want {bytes}");
    }
}

fn traffic_through_firewall(mode: &str) {
    let mut net = net();
    let file = net.write_file("rules.toml", &rules(&net)).expect("write rules");
    let out = net.attach(mode).unwrap_or_else(|e| panic!("attach --mode {mode}: {e}"));
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(said.contains(mode), "attach --mode {mode} does not say which mode it used: {said}");
    let out = net.fw_load(&file).expect("run fw load");
    assert!(out.status.success(), "fw load: {}", String::from_utf8_lossy(&out.stderr));
    let list = net.fw_list().expect("fw list");
    assert_eq!(list["mode"].as_str(), Some(mode), "fw list --json mode: {list}");
    assert_eq!(list["rules"].as_array().map(Vec::len), Some(8), "fw list --json rules: {list}");
    let link = net.server_link().expect("ip link");
    assert!(link.contains("xdp"), "no XDP program on {SERVER_IF} per ip link: {link}");

    let (c4, s4) = (net.client_v4, net.server_v4);
    let (c6, s6) = (net.client_v6, net.server_v6);

    // TCP allowed: a 256 KiB transfer and its answer; the rule counts every client segment.
    let server = tcp_server(&net, sa(s4, TCP_OK));
    let (answer, segs) = tcp_transfer(&net, sa(s4, TCP_OK), 256 * 1024);
    assert_eq!(server.join().expect("server thread"), Some(256 * 1024), "server got the whole transfer");
    assert_eq!(answer, format!("got {}", 256 * 1024));
    assert!(segs > 256 * 1024 / 1500, "a 256 KiB transfer in only {segs} segments");
    expect_counter(&net, R_TCP_OK, segs, None, "tcp allowed");

    // TCP denied: the SYNs never arrive, the server never accepts.
    let server = tcp_server(&net, sa(s4, TCP_DENIED));
    let (err, syns) = tcp_denied(&net, sa(s4, TCP_DENIED));
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "denied connect: {err}");
    assert_eq!(server.join().expect("server thread"), None, "a connection got through a deny rule");
    // TCP_SYNCNT bounds the retries by time (1 s + 2 s): two or three SYNs.
    assert!((2..=3).contains(&syns), "{syns} SYNs sent, want the SYN and its retransmission(s)");
    expect_counter(&net, R_TCP_DENIED, syns, None, "tcp denied");

    // UDP allowed and denied: counters equal datagrams sent, bytes equal their frames.
    assert_eq!(udp(&net, sa(c4, UDP_OK_SRC), sa(s4, UDP_OK), 50), 50, "allowed UDP lost");
    expect_counter(&net, R_UDP_OK, 50, Some(50 * UDP4_FRAME), "udp allowed");
    assert_eq!(udp(&net, sa(c4, UDP_DENIED_SRC), sa(s4, UDP_DENIED), 50), 0, "denied UDP arrived");
    expect_counter(&net, R_UDP_DENIED, 50, Some(50 * UDP4_FRAME), "udp denied");

    // ICMP: echo requests to one server address allowed, to the other denied.
    assert_eq!(ping(&net, s4.into(), 5), (5, 5), "ping to the allowed address");
    expect_counter(&net, R_ICMP_OK, 5, None, "icmp allowed");
    assert_eq!(ping(&net, net.server2_v4.into(), 5), (5, 0), "ping to the denied address");
    expect_counter(&net, R_ICMP_DENIED, 5, None, "icmp denied");

    // IPv6.
    assert_eq!(udp(&net, sa(c6, UDP6_OK_SRC), sa(s6, UDP6_OK), 20), 20, "allowed UDP over IPv6 lost");
    expect_counter(&net, R_UDP6_OK, 20, Some(20 * UDP6_FRAME), "udp6 allowed");
    let server = tcp_server(&net, sa(s6, TCP6_OK));
    let (answer, segs6) = tcp_transfer(&net, sa(s6, TCP6_OK), 64 * 1024);
    assert_eq!(server.join().expect("server thread"), Some(64 * 1024));
    assert_eq!(answer, format!("got {}", 64 * 1024));
    expect_counter(&net, R_TCP6_OK, segs6, None, "tcp6 allowed");
    // Default deny: UDP to a port no rule allows never arrives.
    assert_eq!(udp(&net, sa(c4, 40009), sa(s4, 6009), 10), 0, "default deny let UDP through");

    // A rule file with an error changes nothing: same rules, same counters, same behaviour.
    let before = net.fw_list().expect("fw list");
    let bad = net.write_file("bad.toml", BAD_RULES).expect("write bad rules");
    let out = net.fw_load(&bad).expect("run fw load");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "fw load of a bad file succeeded");
    let at = format!("{}:{BAD_LINE}", bad.display());
    assert!(err.contains(&at), "the error does not name {at}: {err}");
    assert!(err.contains("70000"), "the error does not name the bad value: {err}");
    let after = net.fw_list().expect("fw list");
    assert_eq!(before["rules"], after["rules"], "a failed load changed the rules or counters");
    assert_eq!(before["default"]["action"], after["default"]["action"]);
    assert_eq!(udp(&net, sa(c4, UDP_OK_SRC), sa(s4, UDP_OK), 20), 20, "allowed UDP lost after a failed load");
    expect_counter(&net, R_UDP_OK, 70, Some(70 * UDP4_FRAME), "udp allowed after failed load");
    assert_eq!(udp(&net, sa(c4, UDP_DENIED_SRC), sa(s4, UDP_DENIED), 20), 0, "denied UDP arrived after a failed load");
    expect_counter(&net, R_UDP_DENIED, 70, Some(70 * UDP4_FRAME), "udp denied after failed load");

    // Detach leaves nothing, and traffic flows unfiltered again.
    net.detach().unwrap_or_else(|e| panic!("detach: {e}"));
    let link = net.server_link().expect("ip link");
    assert!(!link.contains("xdp"), "an XDP program is still on {SERVER_IF}: {link}");
    for dir in TestNet::scope_dirs(&net.server) {
        assert!(!dir.exists(), "detach left {} behind: {:?}", dir.display(), list_tree(&dir));
    }
    assert_eq!(udp(&net, sa(c4, UDP_DENIED_SRC), sa(s4, UDP_DENIED), 10), 10, "UDP still dropped after detach");
    let st = net.rampart_json(&net.server, &["status", "--json"]).expect("status --json");
    assert_eq!(st["interfaces"].as_array().map(Vec::len), Some(0), "status after detach: {st}");
}

/// An interface deleted under rampart: `status` names it as gone (exit 1, so scripts notice)
/// instead of reporting a firewall that no longer filters, and `detach` still removes every pin.
#[test]
fn status_names_a_deleted_interface_and_detach_cleans_it() {
    let mut net = net();
    net.attach("skb").expect("attach");
    net.delete_server_link().expect("delete the server veth");
    let out = net.rampart(&net.server, &["status", "--json"]).expect("run status");
    assert_eq!(out.status.code(), Some(1), "status with a deleted interface must exit 1: {out:?}");
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status --json is JSON");
    let ifaces = st["interfaces"].as_array().expect("interfaces");
    assert_eq!(ifaces.len(), 1, "{st}");
    assert_eq!(ifaces[0]["iface"], SERVER_IF, "{st}");
    let gone = ifaces[0]["gone"].as_str().unwrap_or_else(|| panic!("no `gone` entry: {st}"));
    assert!(gone.contains("no longer exists") && gone.contains("detach --iface"), "{gone}");
    let text = net.rampart(&net.server, &["status"]).expect("run status");
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains(&format!("{SERVER_IF}: gone:")), "{text}");

    net.detach().unwrap_or_else(|e| panic!("detach of a deleted interface: {e}"));
    for dir in TestNet::scope_dirs(&net.server) {
        assert!(!dir.exists(), "detach left {} behind: {:?}", dir.display(), list_tree(&dir));
    }
    let st = net.rampart_json(&net.server, &["status", "--json"]).expect("status --json");
    assert_eq!(st["interfaces"].as_array().map(Vec::len), Some(0), "status after detach: {st}");
}

/// `attach --config`: every `[[interface]]` of a rampart.toml, with its mode and rule file, or
/// nothing at all when a rule file is bad or an attach fails; run again, it loads the rule files
/// into the interfaces attached already.
#[test]
fn attach_from_a_config_file_applies_every_interface_or_none() {
    let mut net = net();
    net.write_file("front.rules.toml", &rules(&net)).expect("write rules");
    net.write_file("lo.rules.toml", "default = \"allow\"\n\n[[rule]]\naction = \"deny\"\nproto = \"udp\"\ndport = 9\n")
        .expect("write rules");
    net.write_file("bad.rules.toml", BAD_RULES).expect("write rules");
    // Relative rule paths are relative to the config file.
    let config_ct = |second_iface: &str, second_rules: &str, conntrack: u32| {
        format!(
            "[[interface]]\nname = \"{SERVER_IF}\"\nmode = \"skb\"\nrules = \"front.rules.toml\"\n\
             conntrack_entries = {conntrack}\n\n\
             [[interface]]\nname = \"{second_iface}\"\nmode = \"skb\"\nrules = \"{second_rules}\"\n"
        )
    };
    let config = |second_iface: &str, second_rules: &str| config_ct(second_iface, second_rules, 8192);
    let attached = |net: &TestNet| -> Vec<String> {
        let st = net.rampart_json(&net.server, &["status", "--json"]).expect("status --json");
        let mut names: Vec<String> = st["interfaces"]
            .as_array()
            .expect("interfaces")
            .iter()
            .map(|i| i["iface"].as_str().unwrap().to_string())
            .collect();
        names.sort();
        names
    };
    let attach = |net: &TestNet, file: &Path| {
        net.rampart(&net.server, &["attach", "--config", file.to_str().unwrap()]).expect("run attach --config")
    };
    // Both may end up attached if the command misbehaves: Drop detaches them whatever happens.
    let server = net.server.clone();
    net.track_attached(&server, SERVER_IF);
    net.track_attached(&server, "lo");

    // A bad rule file: refused before anything is attached, naming the file and its line.
    let bad = net.write_file("bad.toml", &config("lo", "bad.rules.toml")).expect("write config");
    let out = attach(&net, &bad);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "attach --config with a bad rule file succeeded: {out:?}");
    assert!(err.contains(&format!("bad.rules.toml:{BAD_LINE}")) && err.contains("[[interface]] lo"), "{err}");
    assert!(attached(&net).is_empty(), "a refused config attached {:?}", attached(&net));

    // An interface that does not exist: the one attached before it is detached again.
    let missing = format!("{}x", &net.id[..net.id.len().min(13)]);
    let nosuch = net.write_file("nosuch.toml", &config(&missing, "lo.rules.toml")).expect("write config");
    let out = attach(&net, &nosuch);
    let (said, err) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "attach --config with a missing interface succeeded: {said}");
    assert!(err.contains(&missing), "the error does not name the missing interface: {err}");
    assert!(said.contains(&format!("detached {SERVER_IF} again")), "{said}");
    assert!(attached(&net).is_empty(), "a failed attach --config left {:?} attached", attached(&net));

    // The good config: both interfaces, each with its own rules, in the mode the file names.
    let good = net.write_file("rampart.toml", &config("lo", "lo.rules.toml")).expect("write config");
    let out = attach(&net, &good);
    assert!(out.status.success(), "attach --config: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(attached(&net), ["lo".to_string(), SERVER_IF.to_string()]);
    // The connection table has the size the file gives, the default where it gives none.
    let st = net.rampart_json(&net.server, &["status", "--json"]).expect("status --json");
    let sizes: Vec<(String, u64)> = st["interfaces"]
        .as_array()
        .expect("interfaces")
        .iter()
        .map(|i| (i["iface"].as_str().unwrap().to_string(), i["conntrack_entries"].as_u64().unwrap_or(0)))
        .collect();
    assert!(sizes.contains(&(SERVER_IF.to_string(), 8192)) && sizes.contains(&("lo".to_string(), 65536)), "{st}");
    let list = net.fw_list().expect("fw list");
    assert_eq!(list["mode"].as_str(), Some("skb"), "{list}");
    assert_eq!(list["rules"].as_array().map(Vec::len), Some(8), "{list}");
    let lo = net.rampart_json(&net.server, &["fw", "list", "--iface", "lo", "--json"]).expect("fw list lo");
    assert_eq!(lo["rules"].as_array().map(Vec::len), Some(1), "{lo}");
    // The rules are in force: the allowed TCP transfer is counted by its rule.
    let server = tcp_server(&net, sa(net.server_v4, TCP_OK));
    let (_, segs) = tcp_transfer(&net, sa(net.server_v4, TCP_OK), 64 * 1024);
    assert_eq!(server.join().expect("server thread"), Some(64 * 1024));
    expect_counter(&net, R_TCP_OK, segs, None, "tcp allowed after attach --config");

    // Run again with a changed rule file: both attached already, the new rules loaded.
    net.write_file(
        "front.rules.toml",
        "default = \"allow\"\n\n[[rule]]\naction = \"deny\"\nproto = \"tcp\"\ndport = 1\n",
    )
    .expect("write rules");
    // But not with another connection-table size, which only a new attach can give: refused,
    // saying so, with the rules in force left as they were.
    let resized = net.write_file("resized.toml", &config_ct("lo", "lo.rules.toml", 16384)).expect("write config");
    let out = attach(&net, &resized);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "attach --config with another conntrack_entries succeeded: {out:?}");
    assert!(err.contains("conntrack_entries = 16384") && err.contains("8192") && err.contains("detach"), "{err}");
    let list = net.fw_list().expect("fw list");
    assert_eq!(list["rules"].as_array().map(Vec::len), Some(8), "a refused config changed the rules: {list}");
    let out = attach(&net, &good);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "attach --config again: {}", String::from_utf8_lossy(&out.stderr));
    assert!(said.contains(&format!("{SERVER_IF}: attached already")), "{said}");
    let list = net.fw_list().expect("fw list");
    assert_eq!(list["rules"].as_array().map(Vec::len), Some(1), "the changed rule file was not loaded: {list}");

    let server = net.server.clone();
    for iface in [SERVER_IF, "lo"] {
        net.detach_iface(&server, iface).unwrap_or_else(|e| panic!("detach {iface}: {e}"));
    }
    for dir in TestNet::scope_dirs(&net.server) {
        assert!(!dir.exists(), "detach left {} behind: {:?}", dir.display(), list_tree(&dir));
    }
}

fn list_tree(dir: &Path) -> Vec<String> {
    let out = Command::new("find").arg(dir).output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).lines().map(str::to_string).collect()).unwrap_or_default()
}

#[test]
fn native_mode_tcp_udp_icmp() {
    traffic_through_firewall("native");
}

#[test]
fn skb_mode_tcp_udp_icmp() {
    traffic_through_firewall("skb");
}

/// The guard itself: everything it made is gone after drop, also when the test body panics.
#[test]
fn testnet_cleans_up_after_a_failed_test() {
    let (client, server) = {
        let names = std::sync::Arc::new(std::sync::Mutex::new(None));
        let n2 = names.clone();
        let r = std::panic::catch_unwind(move || {
            let mut net = net();
            *n2.lock().expect("lock") = Some((net.client.clone(), net.server.clone()));
            net.attach("skb").expect("attach");
            panic!("deliberate failure with rampart attached");
        });
        assert!(r.is_err());
        let names = names.lock().expect("lock").clone();
        names.expect("namespaces were made")
    };
    for ns in [&client, &server] {
        assert!(!Path::new("/run/netns").join(ns).exists(), "namespace {ns} left behind");
        for dir in TestNet::scope_dirs(ns) {
            assert!(!dir.exists(), "{} left behind", dir.display());
        }
    }
}
