//! The firewall's counters as scrapers see them: UDP datagrams of known kinds sent between
//! namespaces through the attached firewall show up exactly in a live daemon's `/metrics` (per
//! rule, per verdict), while the interface's lock is held by someone else (a scrape never takes
//! it); the read-only view (`fw::view`) never shows a rule's count going down while rule-set
//! updates run under it; the scrape passes `promtool check metrics`; `rampart stats --json` and
//! `rampart top` show the same counts; the status page (headless Chromium) lists the rules and
//! its drops chart moves while denied datagrams arrive.
//!
//! Needs root, the `rampart` binary (`RAMPART_BIN`, else `target/<profile>/rampart`) and
//! promtool (Debian's prometheus, installed by `cargo xtask setup`).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use rampart::{fw::view, paths::Scope};
use rampart_tests::netns::{SERVER_IF, TestNet, in_netns, rampart_bin};

const UDP_OK: u16 = 6101;
const UDP_DENIED: u16 = 6102;
const OK_SRC: u16 = 41001;
const DENIED_SRC: u16 = 41002;
const PAYLOAD: usize = 100;
/// Ethernet + IPv4 + UDP headers and the payload.
const FRAME: u64 = 14 + 20 + 8 + PAYLOAD as u64;
const N_OK: u64 = 37;
const N_DENIED: u64 = 23;

fn rules(net: &TestNet) -> String {
    let (c, s) = (net.client_v4, net.server_v4);
    format!(
        "default = \"allow\"\n\n\
         [[rule]]\naction = \"allow\"\nproto = \"udp\"\nsrc = \"{c}\"\ndst = \"{s}\"\nsport = {OK_SRC}\ndport = {UDP_OK}\n\n\
         [[rule]]\naction = \"deny\"\nproto = \"udp\"\nsrc = \"{c}\"\ndst = \"{s}\"\nsport = {DENIED_SRC}\ndport = {UDP_DENIED}\n"
    )
}

/// Sends `count` datagrams from the client's `sport` to the server's `dport`.
fn send(net: &TestNet, sport: u16, dport: u16, count: u64) {
    let (from, to) = (SocketAddr::from((net.client_v4, sport)), SocketAddr::from((net.server_v4, dport)));
    let sock = in_netns(&net.client, move || UdpSocket::bind(from)).expect("enter client").expect("bind client");
    for _ in 0..count {
        sock.send_to(&[0x5a; PAYLOAD], to).expect("send");
        // Keeps the receiving veth's backlog from overflowing.
        thread::sleep(Duration::from_micros(200));
    }
}

/// (packets, bytes) of rule `id` through the read-only view.
fn view_counts(scope: &Scope, id: u32) -> (u64, u64) {
    let v = view::read(scope, SERVER_IF).unwrap_or_else(|e| panic!("view: {e}"));
    let r = v.rules.iter().find(|r| r.id == id).unwrap_or_else(|| panic!("no rule {id} in {v:?}"));
    (r.counts.packets, r.counts.bytes)
}

/// One GET over a socket made inside `ns`; the body.
fn get(net: &TestNet, addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut s = in_netns(&net.server, move || TcpStream::connect_timeout(&addr, Duration::from_secs(2)))
        .expect("enter server")?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    Ok(body.to_string())
}

/// The value of the one series of `name` whose line holds every one of `labels`.
fn series(metrics: &str, name: &str, labels: &[String]) -> Option<u64> {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| labels.iter().all(|x| l.contains(x.as_str())))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

fn promtool_clean(text: &str) {
    let promtool = std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join("promtool")).find(|p| p.is_file()))
        .unwrap_or_else(|| panic!("promtool not found on PATH: run `cargo xtask setup` (Debian's prometheus)"));
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "promtool check metrics: {said}\non:\n{text}");
}

/// Chromium killed with its helpers (its own process group) when dropped.
struct Browser(std::process::Child);

impl Drop for Browser {
    fn drop(&mut self) {
        // SAFETY: signals the process group this test started.
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

/// The DOM of `url` after headless Chromium (in the server's namespace, virtual time: the
/// page's timers run as fast as its requests allow) ran its scripts; bounded by 60 s.
fn chromium(net: &TestNet, url: &str) -> String {
    use std::os::unix::process::CommandExt as _;
    let child = TestNet::exec(&net.server, "chromium")
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions"])
        .args(["--disable-background-networking", "--disable-component-update", "--disable-sync"])
        .arg(format!("--user-data-dir={}", net.dir.join("chromium").display()))
        .args(["--dump-dom", "--virtual-time-budget=5000", url])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("chromium (Debian's, installed by cargo xtask setup): {e}"));
    let mut b = Browser(child);
    for _ in 0..600 {
        if b.0.try_wait().expect("wait").is_some() {
            let mut out = String::new();
            b.0.stdout.as_mut().unwrap().read_to_string(&mut out).expect("read the DOM");
            return out;
        }
        thread::sleep(Duration::from_millis(100));
    }
    panic!("chromium did not finish within 60 s");
}

/// The values of a status page chart's polyline in a DOM dump (0 = the bottom line).
fn chart(dom: &str, id: &str) -> Vec<f64> {
    let at = dom.find(&format!("id=\"{id}\"")).unwrap_or_else(|| panic!("no chart {id}: {dom}"));
    let rest = &dom[at..];
    let p = rest.find("points=\"").unwrap_or_else(|| panic!("no polyline in {id}")) + 8;
    let end = rest[p..].find('"').unwrap();
    rest[p..p + end]
        .split_whitespace()
        .map(|xy| 116.0 - xy.split_once(',').unwrap().1.parse::<f64>().unwrap())
        .collect()
}

#[test]
fn firewall_counters_exact_in_metrics_without_the_lock() {
    let mut net = TestNet::new().unwrap_or_else(|e| panic!("setting up namespaces: {e}"));
    let file = net.write_file("rules.toml", &rules(&net)).expect("write rules");
    net.attach("native").unwrap_or_else(|e| panic!("attach: {e}"));
    let out = net.fw_load(&file).expect("run fw load");
    assert!(out.status.success(), "fw load: {}", String::from_utf8_lossy(&out.stderr));
    let scope = Scope::Netns(net.server.clone());

    let ok_to = SocketAddr::from((net.server_v4, UDP_OK));
    let _sink = in_netns(&net.server, move || UdpSocket::bind(ok_to)).expect("enter server").expect("bind");
    send(&net, OK_SRC, UDP_OK, N_OK);
    send(&net, DENIED_SRC, UDP_DENIED, N_DENIED);
    // The program counts on the receiving side, a moment after the sends return.
    let deadline = Instant::now() + Duration::from_secs(3);
    while (view_counts(&scope, 1).0, view_counts(&scope, 2).0) != (N_OK, N_DENIED) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(view_counts(&scope, 1), (N_OK, N_OK * FRAME));
    assert_eq!(view_counts(&scope, 2), (N_DENIED, N_DENIED * FRAME));
    // The same as `fw list`, which reads under the lock.
    let list = net.fw_list().expect("fw list");
    let listed: Vec<(u64, u64)> = list["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .map(|r| (r["packets"].as_u64().unwrap(), r["bytes"].as_u64().unwrap()))
        .collect();
    assert_eq!(listed, [(N_OK, N_OK * FRAME), (N_DENIED, N_DENIED * FRAME)], "{list}");

    // The daemon, with only its admin listener, in the server's namespace (setns only: the
    // pins stay visible).
    let admin: SocketAddr = {
        let l = in_netns(&net.server, || TcpListener::bind("127.0.0.1:0")).expect("enter").expect("bind");
        l.local_addr().unwrap()
    };
    let cfg = net
        .write_file(
            "rampart.toml",
            &format!(
                "[admin]\nlisten = \"{admin}\"\ncontrol_socket = \"{}\"\n",
                net.dir.join("control.sock").display()
            ),
        )
        .expect("write config");
    let log = std::fs::File::create(net.dir.join("daemon.log")).expect("log");
    let mut cmd = Command::new(rampart_bin().expect("rampart binary"));
    cmd.args(["-n", &net.server, "serve", "--config"])
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    net.spawn(&mut cmd).expect("start daemon");
    let deadline = Instant::now() + Duration::from_secs(20);
    while get(&net, admin, "/healthz").is_err() {
        assert!(
            Instant::now() < deadline,
            "daemon not up: {}",
            std::fs::read_to_string(net.dir.join("daemon.log")).unwrap_or_default()
        );
        thread::sleep(Duration::from_millis(50));
    }

    // Someone holds the interface's lock (a long `fw load`, say): the scrape does not wait for
    // it (a `fw` command waits for the lock without end; `get` gives up after 10 s and fails).
    let lock = rampart::fw::state::lock(&scope, SERVER_IF).expect("take the lock");
    let m = get(&net, admin, "/metrics").expect("scrape while the interface's lock is held");
    drop(lock);
    let iface = |extra: &[&str]| {
        let mut l = vec![format!("netns=\"{}\"", net.server), format!("iface=\"{SERVER_IF}\"")];
        l.extend(extra.iter().map(|s| s.to_string()));
        l
    };
    let rule = |name: &str, id: &str| series(&m, name, &iface(&[&format!("rule=\"{id}\"")]));
    assert_eq!(rule("rampart_fw_rule_packets_total", "1"), Some(N_OK), "{m}");
    assert_eq!(rule("rampart_fw_rule_bytes_total", "1"), Some(N_OK * FRAME), "{m}");
    assert_eq!(rule("rampart_fw_rule_packets_total", "2"), Some(N_DENIED), "{m}");
    assert_eq!(rule("rampart_fw_rule_bytes_total", "2"), Some(N_DENIED * FRAME), "{m}");
    assert!(m.contains("rule=\"2\",action=\"deny\""), "{m}");
    let verdict = |v: &str| series(&m, "rampart_fw_packets_total", &iface(&[&format!("verdict=\"{v}\"")]));
    assert_eq!(verdict("rule_allow"), Some(N_OK), "{m}");
    assert_eq!(verdict("rule_deny"), Some(N_DENIED), "{m}");
    assert_eq!(verdict("default_deny"), Some(0), "{m}");
    assert_eq!(verdict("malformed"), Some(0), "{m}");
    assert_eq!(
        series(&m, "rampart_fw_malformed_packets_total", &iface(&["class=\"l4\""])),
        Some(0),
        "per-class malformed series missing:\n{m}"
    );
    promtool_clean(&m);

    // The same counts in `rampart stats --json`, read from the pins without the interface's
    // lock (held again), with the daemon's part from its control socket; and in `rampart top`.
    let sock = net.dir.join("control.sock");
    let lock = rampart::fw::state::lock(&scope, SERVER_IF).expect("take the lock");
    let stats = Command::new(rampart_bin().expect("rampart binary"))
        .args(["-n", &net.server, "stats", "--json", "--control-socket"])
        .arg(&sock)
        .output()
        .expect("run rampart stats");
    let top = Command::new(rampart_bin().expect("rampart binary"))
        .args(["-n", &net.server, "top", "--iterations", "1", "--control-socket"])
        .arg(&sock)
        .output()
        .expect("run rampart top");
    drop(lock);
    assert!(stats.status.success(), "stats: {}", String::from_utf8_lossy(&stats.stderr));
    let snap: serde_json::Value = serde_json::from_slice(&stats.stdout).expect("stats --json");
    let fw = snap["firewall"]
        .as_array()
        .expect("firewall")
        .iter()
        .find(|f| f["netns"] == net.server.as_str() && f["iface"] == SERVER_IF)
        .unwrap_or_else(|| panic!("{SERVER_IF} not in {snap}"));
    let rules: Vec<(u64, u64, u64, &str)> = fw["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .map(|r| {
            (
                r["id"].as_u64().unwrap(),
                r["packets"].as_u64().unwrap(),
                r["bytes"].as_u64().unwrap(),
                r["action"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(rules, [(1, N_OK, N_OK * FRAME, "allow"), (2, N_DENIED, N_DENIED * FRAME, "deny")], "{snap}");
    let counter = |name: &str| {
        fw["counters"].as_array().unwrap().iter().find(|c| c["name"] == name).and_then(|c| c["packets"].as_u64())
    };
    assert_eq!(
        (counter("rule_allow"), counter("rule_deny"), counter("default_deny")),
        (Some(N_OK), Some(N_DENIED), Some(0))
    );
    assert!(snap["daemon"]["version"].is_string(), "the daemon's part is missing: {snap}");
    assert!(top.status.success(), "top: {}", String::from_utf8_lossy(&top.stderr));
    let top = String::from_utf8_lossy(&top.stdout);
    let row = |id: &str| {
        top.lines()
            .find(|l| l.split_whitespace().nth(1) == Some(id) && l.contains(SERVER_IF))
            .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
            .unwrap_or_else(|| panic!("no rule {id} in:\n{top}"))
    };
    assert_eq!(row("1")[2..6], ["allow", "-", "-", &N_OK.to_string()], "{top}");
    assert_eq!(row("2")[2..6], ["deny", "-", "-", &N_DENIED.to_string()], "{top}");

    // The status page, in headless Chromium in the server's namespace: it lists both rules, and
    // its drops chart moves while denied datagrams arrive (sent until told to stop, bounded).
    let stop = AtomicBool::new(false);
    let page = thread::scope(|sc| {
        sc.spawn(|| {
            let (from, to) =
                (SocketAddr::from((net.client_v4, DENIED_SRC)), SocketAddr::from((net.server_v4, UDP_DENIED)));
            let sock = in_netns(&net.client, move || UdpSocket::bind(from)).expect("enter client").expect("bind");
            for _ in 0..40_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                sock.send_to(&[0x5a; PAYLOAD], to).expect("send");
                thread::sleep(Duration::from_micros(250));
            }
        });
        let mut last = String::new();
        // Each load polls the snapshot about five times, as fast as virtual time allows; one
        // whose polls all fell between two datagrams shows no drop, so a few loads are allowed.
        for _ in 0..6 {
            last = chromium(&net, &format!("http://{admin}/"));
            if chart(&last, "drops").iter().any(|&y| y > 0.5) {
                break;
            }
        }
        stop.store(true, Ordering::Relaxed);
        last
    });
    assert!(chart(&page, "drops").iter().any(|&y| y > 0.5), "the drops chart never moved:\n{page}");
    let label = format!(">{}/{SERVER_IF}<", net.server);
    assert!(page.matches(&label).count() >= 3, "both rules and the interface: {page}");
    assert!(page.contains(">deny<") && page.contains(">allow<"), "{page}");

    // Rule-set updates (each carries the counts into new bases and flips slots) while the view
    // reads in a loop: rule 1's count is never anything but what was sent.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (scope, stop) = (scope.clone(), stop.clone());
        thread::spawn(move || {
            let mut reads = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let (p, _) = view_counts(&scope, 1);
                assert_eq!(p, N_OK, "rule 1 read as {p} during updates (read {reads})");
                reads += 1;
            }
            reads
        })
    };
    let (c, s) = (net.client_v4, net.server_v4);
    for i in 0..12u16 {
        let (c, s, dport) = (c.to_string(), s.to_string(), (7000 + i).to_string());
        let args = ["fw", "add", "--iface", SERVER_IF, "--action", "deny", "--proto", "udp", "--src", &c, "--dst", &s];
        let out = net.rampart(&net.server, &[&args[..], &["--dport", &dport]].concat()).expect("fw add");
        assert!(out.status.success(), "fw add: {}", String::from_utf8_lossy(&out.stderr));
    }
    stop.store(true, Ordering::Relaxed);
    let reads = reader.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
    assert!(reads > 0);
    assert_eq!(view_counts(&scope, 1), (N_OK, N_OK * FRAME));
}
