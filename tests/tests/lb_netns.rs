//! The XDP balancer end to end, between network namespaces the test makes: a client, the
//! balancer and three backends on one bridge (in a switch namespace). The balancer runs
//! `rampart attach` + `rampart lb` for VIP:80/tcp; each backend runs `rampart decap` for the VIP
//! and an HTTP server that names itself, and answers the client directly (direct server
//! return). Real TCP connections, through the kernel's stacks:
//! - 3,000 fresh connections all complete, each backend within ±10 % of its share;
//! - removing a backend breaks no open connection to the others; draining one keeps its open
//!   connections working while no new ones arrive; adding one takes about 1/N of new flows;
//! - 1 MB up and down completes (the upload's full-size segments are answered with ICMP
//!   Fragmentation Needed by the balancer, so the client's path MTU drops by the 20 bytes of
//!   the outer header).
//!
//! Needs root and the `rampart` binary (`RAMPART_BIN`, else `target/<profile>/rampart`).

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use rampart_netlab::{self as netlab, NetlabError, Ns, Proc, Undo, run, veth};
use rampart_tests::netns::{in_netns, rampart_bin};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 77, 100, 1);
const LB: &str = "10.77.0.3";
const BACKENDS: [&str; 4] = ["10.77.0.11", "10.77.0.12", "10.77.0.13", "10.77.0.14"];
const SERVICE: &str = "10.77.100.1:80/tcp";

/// The backends' HTTP server: answers `GET /` with its name, `GET /big` with 1 MB, and reads a
/// POST's body whole before answering with its length; HTTP/1.1 keep-alive.
const SERVER: &str = r#"
import http.server, socketserver, sys
name = sys.argv[1]
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def send(self, body):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        self.send(b"x" * 1048576 if self.path == "/big" else name.encode())
    def do_POST(self):
        n = int(self.headers["Content-Length"])
        got = 0
        while got < n:
            got += len(self.rfile.read(min(65536, n - got)))
        self.send(str(got).encode())
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
S(("0.0.0.0", 80), H).serve_forever()
"#;

/// The balancer's lab: every host a namespace on one bridge (in a switch namespace), built with
/// [`rampart_netlab`]; what rampart attached is detached at teardown, before the namespaces go.
struct Lab {
    net: netlab::Lab,
    /// The backends' HTTP servers, b1.. in order.
    servers: Vec<Proc>,
    rampart: std::path::PathBuf,
    /// `rampart detach` at teardown, per balancer namespace (short name).
    detach: Vec<(String, Undo)>,
}

impl Lab {
    fn ns(&self, name: &str) -> String {
        self.net.name(name)
    }

    fn rampart(&self, ns: &str, args: &[&str]) -> String {
        let out =
            run(Command::new(&self.rampart).arg("-n").arg(self.ns(ns)).args(args)).unwrap_or_else(|e| panic!("{e}"));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A teardown command `rampart -n NS ARGS…` (NS by short name).
    fn undo(&mut self, ns: &str, args: &[&str]) -> Undo {
        let mut cmd = Command::new(&self.rampart);
        cmd.arg("-n").arg(self.ns(ns)).args(args);
        self.net.on_teardown(cmd)
    }

    /// `rampart attach` on balancer `ns`'s `iface`, detached at teardown.
    fn attach(&mut self, ns: &str, iface: &str) {
        self.rampart(ns, &["attach", "--iface", iface, "--mode", "skb"]);
        let undo = self.undo(ns, &["detach", "--iface", iface]);
        self.detach.push((ns.to_string(), undo));
    }

    /// Balancer `ns` was detached by the test: teardown must not detach it again.
    fn detached(&mut self, ns: &str) {
        if let Some(i) = self.detach.iter().position(|(n, _)| n == ns) {
            let (_, undo) = self.detach.remove(i);
            self.net.cancel(undo);
        }
    }

    /// Backend `name`: `rampart decap` for the VIP on `iface` (detached at teardown) and the
    /// HTTP server that names itself.
    fn backend(&mut self, name: &str, iface: &str) {
        self.rampart(name, &["decap", "attach", "--iface", iface, "--vip", &VIP.to_string(), "--mode", "skb"]);
        self.undo(name, &["decap", "detach", "--iface", iface]);
        let server = self.start_server(name);
        self.servers.push(server);
    }

    fn start_server(&mut self, name: &str) -> Proc {
        let mut cmd = Ns::named(self.ns(name)).command("/usr/bin/python3");
        cmd.args(["-c", SERVER, name]).stdout(Stdio::null()).stderr(Stdio::null());
        self.net.spawn(&mut cmd).expect("start a backend's HTTP server")
    }

    fn new() -> Lab {
        Self::build(true)
    }

    /// A switch namespace with a bridge, nothing on it yet; names start with `tag` and are
    /// unique per test run.
    fn empty(tag: &str) -> Lab {
        let mut net = netlab::Lab::new(tag).unwrap_or_else(|e| panic!("the balancer's netns test: {e}"));
        net.ns("sw").and_then(|sw| sw.bridge("br0")).unwrap_or_else(|e| panic!("{e}"));
        Lab { net, servers: Vec::new(), rampart: rampart_bin().unwrap_or_else(|e| panic!("{e}")), detach: Vec::new() }
    }

    /// A new namespace `name` (loopback up), removed at teardown.
    fn add_ns(&mut self, name: &str) -> Ns {
        self.net.ns(name).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Puts namespace `name` (made if `new`) on the bridge: interface `iface` with `addr`/24.
    fn join(&mut self, name: &str, addr: &str, iface: &str, new: bool) {
        let ns = if new { self.add_ns(name) } else { Ns::named(self.ns(name)) };
        let sw = Ns::named(self.ns("sw"));
        veth(sw.end(&format!("p-{name}")).master("br0"), ns.end(iface).addr(&format!("{addr}/24")))
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// `cli_service`: the service and three backends made with `rampart lb`; else none (a test
    /// applies a config).
    fn build(cli_service: bool) -> Lab {
        let mut lab = Lab::empty("rl");
        lab.join("c", "10.77.0.2", "eth0", true);
        lab.join("lb", LB, "eth0", true);
        for (i, addr) in BACKENDS.iter().enumerate() {
            lab.join(&format!("b{}", i + 1), addr, "eth0", true);
        }
        let ok = |r: Result<(), NetlabError>| r.unwrap_or_else(|e| panic!("{e}"));
        // The client reaches the VIP through the balancer, in frames as a wire carries them.
        ok(Ns::named(lab.ns("c")).route(&format!("{VIP}/32"), LB));
        ok(wire_like(&Ns::named(lab.ns("c")), "eth0"));
        // The balancer forwards (the FIB lookup needs it, and so does the first packet to a
        // backend whose MAC is not known yet).
        ok(Ns::named(lab.ns("lb")).sysctl("net.ipv4.ip_forward", "1"));
        if cli_service {
            lab.attach("lb", "eth0");
            lab.rampart("lb", &["lb", "service", "add", SERVICE]);
        }
        for (i, b) in BACKENDS.iter().enumerate() {
            lab.backend(&format!("b{}", i + 1), "eth0");
            if i < 3 && cli_service {
                lab.rampart("lb", &["lb", "backend", "add", SERVICE, b]);
            }
        }
        // The servers listen within a second or so; wait until each answers directly.
        for (i, b) in BACKENDS.iter().enumerate() {
            let addr: SocketAddr = format!("{b}:80").parse().unwrap();
            let ok = wait_listening(&lab.ns("c"), addr);
            assert!(ok, "backend b{} did not start listening", i + 1);
        }
        lab
    }
}

/// From namespace `ns`: true once `addr` accepts a TCP connection (bounded: 20 s).
fn wait_listening(ns: &str, addr: SocketAddr) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    in_netns(ns, move || {
        while Instant::now() < deadline {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    })
    .unwrap()
}

/// One request on `s`; the body.
fn request(s: &mut TcpStream, head: &str, body: &[u8]) -> std::io::Result<Vec<u8>> {
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::Error::other("closed before the answer ended"));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return Ok(buf[end + 4..end + 4 + len].to_vec());
            }
        }
    }
}

fn get_name(s: &mut TcpStream) -> std::io::Result<String> {
    let body = request(s, &format!("GET / HTTP/1.1\r\nHost: {VIP}\r\n\r\n"), b"")?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

fn connect() -> TcpStream {
    let s = TcpStream::connect_timeout(&SocketAddr::new(VIP.into(), 80), Duration::from_secs(5))
        .expect("connect to the VIP");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// `n` fresh connections from the client, one request each: how many each backend answered.
fn spread(lab: &Lab, n: usize) -> std::collections::BTreeMap<String, usize> {
    in_netns(&lab.ns("c"), move || {
        let mut count = std::collections::BTreeMap::new();
        for i in 0..n {
            let mut s = connect();
            let name = get_name(&mut s).unwrap_or_else(|e| panic!("connection {i}: {e}"));
            *count.entry(name).or_insert(0) += 1;
        }
        count
    })
    .unwrap()
}

#[test]
fn connections_spread_survive_changes_and_carry_bulk_data() {
    let lab = Lab::new();

    // 1. 3,000 fresh connections: all answered, each backend within ±10 % of a third.
    let count = spread(&lab, 3000);
    assert_eq!(count.values().sum::<usize>(), 3000);
    assert_eq!(count.keys().cloned().collect::<Vec<_>>(), ["b1", "b2", "b3"], "{count:?}");
    for (b, n) in &count {
        assert!((900..=1100).contains(n), "{b} got {n} of 3000: {count:?}");
    }
    let list = lab.rampart("lb", &["lb", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    let flows: u64 =
        v["services"][0]["backends"].as_array().unwrap().iter().map(|b| b["new_flows"].as_u64().unwrap()).sum();
    assert!(flows >= 3000, "lb list counts {flows} new flows for 3000 connections: {list}");

    // 2. Long-lived connections, then a backend removed: none of the others' connections breaks.
    let c = lab.ns("c");
    let (mut open, names) = in_netns(&c, || {
        let mut open = Vec::new();
        let mut names = Vec::new();
        for _ in 0..60 {
            let mut s = connect();
            names.push(get_name(&mut s).unwrap());
            open.push(s);
        }
        (open, names)
    })
    .unwrap();
    for b in ["b1", "b2", "b3"] {
        assert!(names.iter().any(|n| n == b), "no open connection reached {b}: {names:?}");
    }
    lab.rampart("lb", &["lb", "backend", "delete", SERVICE, BACKENDS[2]]);
    for (s, was) in open.iter_mut().zip(&names) {
        if was != "b3" {
            assert_eq!(&get_name(s).expect("a connection to a remaining backend broke"), was);
        }
    }
    // 3. Drain b2: its open connections still work, and no new connection reaches it.
    lab.rampart("lb", &["lb", "backend", "drain", SERVICE, BACKENDS[1]]);
    for (s, was) in open.iter_mut().zip(&names) {
        if was == "b2" {
            assert_eq!(get_name(s).expect("a drained backend's connection broke"), "b2");
        }
    }
    let count = spread(&lab, 300);
    assert_eq!(count.keys().cloned().collect::<Vec<_>>(), ["b1"], "{count:?}");
    // 4. Add b4 (and bring b2 back): about a third of new flows go to it.
    lab.rampart("lb", &["lb", "backend", "ready", SERVICE, BACKENDS[1]]);
    lab.rampart("lb", &["lb", "backend", "add", SERVICE, BACKENDS[3]]);
    let count = spread(&lab, 900);
    let b4 = count.get("b4").copied().unwrap_or(0);
    assert!((240..=360).contains(&b4), "b4 took {b4} of 900 new flows: {count:?}");
    drop(open);

    // 5. 1 MB down (direct from the backend) and 1 MB up (through the balancer, whose
    // full-size segments it answers with ICMP Fragmentation Needed).
    let (down, up) = in_netns(&c, || {
        let mut s = connect();
        let down = request(&mut s, &format!("GET /big HTTP/1.1\r\nHost: {VIP}\r\n\r\n"), b"").unwrap().len();
        let body = vec![b'u'; 1 << 20];
        let head = format!("POST /up HTTP/1.1\r\nHost: {VIP}\r\nContent-Length: {}\r\n\r\n", body.len());
        let up = String::from_utf8(request(&mut s, &head, &body).unwrap()).unwrap();
        (down, up)
    })
    .unwrap();
    assert_eq!(down, 1 << 20);
    assert_eq!(up, (1 << 20).to_string());
    let list = lab.rampart("lb", &["lb", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert!(v["events"]["icmp_too_big"].as_u64().unwrap() >= 1, "no ICMP too-big was sent: {list}");
}

fn backends_json(lab: &Lab) -> Vec<serde_json::Value> {
    let list = lab.rampart("lb", &["lb", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    v["services"][0]["backends"].as_array().cloned().unwrap_or_default()
}

/// `[[service]]` applied by `attach --config`, and `rampart serve`'s health checks: a backend
/// whose server stops is taken out of the table (new connections avoid it) and put back when
/// it listens again.
#[test]
fn config_applies_services_and_the_daemon_checks_their_health() {
    let mut lab = Lab::build(false);
    let dir = std::env::temp_dir().join(format!("{}-cfg", lab.net.prefix()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("rampart.toml");
    std::fs::write(
        &config,
        format!(
            r#"[admin]
listen = "127.0.0.1:9109"
control_socket = "{}/control.sock"

[[interface]]
name = "eth0"
mode = "skb"

[[service]]
vip = "{VIP}:80"
backends = [{{ addr = "{}" }}, {{ addr = "{}" }}, {{ addr = "{}", weight = 100 }}]
health = {{ kind = "tcp", interval = "300ms", timeout = "200ms", rise = 2, fall = 2 }}
"#,
            dir.display(),
            BACKENDS[0],
            BACKENDS[1],
            BACKENDS[2]
        ),
    )
    .unwrap();
    let out = lab.rampart("lb", &["attach", "--config", config.to_str().unwrap()]);
    lab.undo("lb", &["detach", "--iface", "eth0"]);
    assert!(out.contains("balancing 1 service(s) over 3 backend(s)"), "{out}");
    let first = spread(&lab, 300);
    assert_eq!(first.keys().cloned().collect::<Vec<_>>(), ["b1", "b2", "b3"], "{first:?}");

    // The daemon, in the balancer's namespace, checks the backends.
    let mut daemon = Command::new(&lab.rampart);
    daemon.args(["-n", &lab.ns("lb"), "serve", "--config", config.to_str().unwrap()]);
    lab.net.spawn(daemon.stdout(Stdio::null()).stderr(Stdio::null())).expect("start rampart serve");

    // /metrics counts exactly the flows each backend got (one SYN, one connection-table miss,
    // per connection), and promtool finds the exposition clean.
    let scrape = in_netns(&lab.ns("lb"), || {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut s) = TcpStream::connect("127.0.0.1:9109") {
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
                let mut text = String::new();
                let _ = s.read_to_string(&mut text);
                if let Some(i) = text.find("\r\n\r\n") {
                    return text[i + 4..].to_string();
                }
            }
            assert!(Instant::now() < deadline, "the daemon's admin address never answered");
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .unwrap();
    for (i, name) in ["b1", "b2", "b3"].iter().enumerate() {
        let series = format!(
            "rampart_lb_backend_new_flows_total{{netns=\"{}\",iface=\"eth0\",service=\"{SERVICE}\",backend=\"{}\"}}",
            lab.ns("lb"),
            BACKENDS[i]
        );
        let got: Option<u64> = scrape.lines().find_map(|l| l.strip_prefix(&series)).and_then(|v| v.trim().parse().ok());
        assert_eq!(got, Some(first[*name] as u64), "{series} in:\n{scrape}");
    }
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; cargo xtask setup installs it)");
    promtool.stdin.take().unwrap().write_all(scrape.as_bytes()).unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let wait_health = |lab: &Lab, addr: &str, want: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let b = backends_json(lab);
            let h = b.iter().find(|x| x["addr"] == addr).map(|x| x["health"].clone());
            if h.as_ref().and_then(|h| h.as_str()) == Some(want) {
                return;
            }
            assert!(Instant::now() < deadline, "{addr} never became {want}: {b:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    // b1's server stops: the checks take it down, new connections go to b2 and b3 only.
    lab.net.kill(lab.servers[0]);
    wait_health(&lab, BACKENDS[0], "down");
    let count = spread(&lab, 200);
    assert!(!count.contains_key("b1"), "{count:?}");
    assert_eq!(count.values().sum::<usize>(), 200);
    // It listens again: back up, and it takes new connections again.
    lab.servers[0] = lab.start_server("b1");
    wait_health(&lab, BACKENDS[0], "up");
    let count = spread(&lab, 300);
    assert!(count.get("b1").copied().unwrap_or(0) > 50, "{count:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Two balancers behind an ECMP router (roadmap 5's first step): the router spreads flows to
/// the VIP over both by an L4 hash; one balancer is lost (its program detached and the router's
/// route withdrawn, as a routing daemon would); the flows it carried now reach the other one,
/// which has no connection-table entry for them but computes the same Maglev table, so they
/// reach the same backends: established connections survive.
#[test]
fn ecmp_two_balancers_one_lost_connections_survive() {
    let mut lab = Lab::empty("re");
    // Client ── router ── bridge { lb1, lb2, b1, b2, b3 }.
    let (c, r) = (lab.add_ns("c"), lab.add_ns("r"));
    let ok = |r: Result<(), NetlabError>| r.unwrap_or_else(|e| panic!("{e}"));
    ok(veth(c.end("eth0").addr("10.78.1.2/24"), r.end("up0").addr("10.78.1.1/24")));
    ok(c.route("default", "10.78.1.1"));
    let hosts = [
        ("r", "10.77.0.1"),
        ("lb1", "10.77.0.3"),
        ("lb2", "10.77.0.4"),
        ("b1", BACKENDS[0]),
        ("b2", BACKENDS[1]),
        ("b3", BACKENDS[2]),
    ];
    for (name, addr) in hosts {
        lab.join(name, addr, "eth1", name != "r");
    }
    ok(r.sysctl("net.ipv4.ip_forward", "1"));
    ok(r.sysctl("net.ipv4.fib_multipath_hash_policy", "1"));
    ok(wire_like(&c, "eth0"));
    ok(wire_like(&r, "eth1"));
    let vip = format!("{VIP}/32");
    ok(r.multipath_route(&vip, &["10.77.0.3", "10.77.0.4"]));
    for lb in ["lb1", "lb2"] {
        ok(Ns::named(lab.ns(lb)).sysctl("net.ipv4.ip_forward", "1"));
        // Attached in the balancer's own scope (its namespace): detached at teardown.
        lab.attach(lb, "eth1");
        lab.rampart(lb, &["lb", "service", "add", SERVICE]);
        for b in &BACKENDS[..3] {
            lab.rampart(lb, &["lb", "backend", "add", SERVICE, b]);
        }
    }
    for (i, name) in ["b1", "b2", "b3"].iter().enumerate() {
        ok(Ns::named(lab.ns(name)).route("10.78.1.0/24", "10.77.0.1"));
        lab.backend(name, "eth1");
        let addr: SocketAddr = format!("{}:80", BACKENDS[i]).parse().unwrap();
        let up = wait_listening(r.name(), addr);
        assert!(up, "backend {name} did not start listening");
    }

    // 200 established connections, through both balancers.
    let (mut open, names) = in_netns(c.name(), || {
        let mut open = Vec::new();
        let mut names = Vec::new();
        for _ in 0..200 {
            let mut s = connect();
            names.push(get_name(&mut s).unwrap());
            open.push(s);
        }
        (open, names)
    })
    .unwrap();
    let via = |lb: &str| -> u64 {
        let list = lab.rampart(lb, &["lb", "list", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&list).unwrap();
        v["services"][0]["new_flows"].as_u64().unwrap()
    };
    let (f1, f2) = (via("lb1"), via("lb2"));
    assert!(f1 >= 20 && f2 >= 20, "the router did not spread the flows over both balancers: {f1} and {f2}");

    // lb1 is lost: its program goes, and the router withdraws its route.
    lab.rampart("lb1", &["detach", "--iface", "eth1"]);
    ok(r.ip(&["route", "replace", &vip, "via", "10.77.0.4"]).map(drop));
    let mut survived = 0;
    for (s, was) in open.iter_mut().zip(&names) {
        if get_name(s).ok().as_deref() == Some(was.as_str()) {
            survived += 1;
        }
    }
    assert!(survived >= 198, "only {survived} of 200 established connections survived losing a balancer");
    assert!(via("lb2") > f2, "lb2 took over no flow");
    lab.detached("lb1");
}

/// Makes `iface` send frames as a NIC puts them on the wire: no segmentation offload (a veth
/// otherwise hands its peer TCP super-packets of up to 64 KiB, which the balancer's XDP would
/// see as one frame far above the MTU and answer with ICMP too-big, over and over) and finished
/// checksums.
fn wire_like(ns: &Ns, iface: &str) -> Result<(), NetlabError> {
    ns.run("ethtool", &["-K", iface, "tx", "off", "tso", "off", "gso", "off"]).map(|_| ())
}
