//! `cargo xtask demo`: rampart in front of a server, between two network namespaces.
//!
//! "internet" holds three client addresses (a customer, the admins' network, a blocklisted host);
//! "server" runs a few services behind rampart. Part one: the same traffic is sent before and
//! after rampart's XDP firewall is attached with the rule file of README.md. Part two ([`https`]):
//! with the firewall still attached, `rampart serve` terminates HTTPS on the server's port 443
//! and proxies to a pool of two web backends, shown with curl. Each expectation is printed as ✔
//! or ✘. Part three ([`lb`]): the XDP L4 balancer in front of three web backends. Part four
//! ([`mysql`]): `rampart serve` routing MySQL to a MariaDB primary and replica, through a crash
//! of the primary and its replica's promotion. The network is built with [`rampart_netlab`];
//! everything the demo creates is removed by [`Lab`]'s `Drop`, on success, failure or Ctrl-C.
mod https;
mod lb;
mod mysql;

use std::{
    fmt::Write as _,
    fs,
    io::{BufRead, BufReader},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use rampart_netlab::{NetlabError, Ns, Proc, Undo, veth};

use crate::{
    probe,
    proc::{self, OnInterrupt, Out, capture, check_interrupt, show, wait_bounded},
};

/// The rule file of issue 2 and README.md, as written to `rules.toml`.
const RULES: &str = r#"default = "deny"

[sets]
blocklist = ["203.0.113.0/24", "2001:db8:bad::/48"]
crawlers = { file = "crawlers.txt" }

[[rule]]
action = "deny"
src = "@blocklist"

[[rule]]
action = "allow"
proto = "tcp"
dport = [80, 443]

[[rule]]
action = "allow"
proto = "tcp"
src = "198.51.100.0/24"
dport = 22

[[rule]]
action = "allow"
proto = "icmp"
"#;

/// The set `crawlers` reads, one prefix per line (no rule uses it: it shows the file form).
const CRAWLERS: &str = "66.249.64.0/19\n157.55.39.0/24\n2001:4860:4801::/48\n";

const SERVER_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const CUSTOMER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const ADMIN: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const BLOCKED: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 66);
/// The NIC on each side of the veth pair (each in its own namespace, so the names never clash).
const IFACE: &str = "eth0";
const TCP_PORTS: [u16; 4] = [22, 80, 443, 8080];
const UDP_PORT: u16 = 53;
/// How long a probe waits for an answer. A dropped SYN is retried after 1 s, so 1.5 s sees two.
const PROBE_TIMEOUT_MS: u64 = 1500;
/// Bound for any one command (`ip`, `rampart`, a probe).
const COMMAND_LIMIT: Duration = Duration::from_secs(60);

fn who(ip: Ipv4Addr) -> &'static str {
    match ip {
        CUSTOMER => "a customer",
        ADMIN => "the admins",
        BLOCKED => "blocklisted",
        _ => "",
    }
}

#[derive(Clone, Copy)]
enum Traffic {
    Ping,
    Tcp(u16),
    Udp(u16),
}

impl Traffic {
    fn label(self) -> String {
        match self {
            Traffic::Ping => "ping (ICMP echo)".to_string(),
            Traffic::Tcp(p) => format!("TCP {p} ({})", service(p)),
            Traffic::Udp(p) => format!("UDP {p} ({})", service(p)),
        }
    }
}

fn service(port: u16) -> &'static str {
    match port {
        22 => "ssh",
        53 => "dns",
        80 => "http",
        443 => "https",
        8080 => "admin app",
        _ => "?",
    }
}

/// One expectation about traffic through the firewall.
struct Check {
    traffic: Traffic,
    from: Ipv4Addr,
    allowed: bool,
    /// Which rule decides, in the words of the rule file.
    why: &'static str,
}

const fn check(traffic: Traffic, from: Ipv4Addr, allowed: bool, why: &'static str) -> Check {
    Check { traffic, from, allowed, why }
}

const CHECKS: [Check; 9] = [
    check(Traffic::Ping, CUSTOMER, true, "rule 4 allows icmp"),
    check(Traffic::Ping, BLOCKED, false, "rule 1 denies @blocklist before rule 4 allows icmp"),
    check(Traffic::Tcp(80), CUSTOMER, true, "rule 2 allows tcp 80 and 443"),
    check(Traffic::Tcp(443), CUSTOMER, true, "rule 2 allows tcp 80 and 443"),
    check(Traffic::Tcp(80), BLOCKED, false, "rule 1 denies @blocklist: first match wins"),
    check(Traffic::Tcp(22), ADMIN, true, "rule 3 allows tcp 22 from 198.51.100.0/24"),
    check(Traffic::Tcp(22), CUSTOMER, false, "no rule matches: default deny"),
    check(Traffic::Tcp(8080), CUSTOMER, false, "no rule matches: default deny"),
    check(Traffic::Udp(UDP_PORT), CUSTOMER, false, "no rule matches: default deny"),
];

/// Everything the demo creates, removed in `Drop` (also on failure and Ctrl-C).
struct Lab {
    /// The namespaces (and with them the veth pairs and the bridge), the helpers running in
    /// them, and the rampart commands that undo what was attached.
    net: rampart_netlab::Lab,
    internet: Ns,
    server: Ns,
    dir: PathBuf,
    /// Part one's listeners (`xtask __serve`).
    listeners: Option<Proc>,
    /// Part two's web backends (`xtask __web`), by name.
    backends: Vec<(String, Proc)>,
    /// `rampart serve`.
    daemon: Option<Child>,
    /// Part four's MariaDB servers (killed when dropped).
    databases: Vec<mariadb_lab::Server>,
    rampart: PathBuf,
    /// While the firewall is attached: the `detach` cleanup runs.
    detach: Option<Undo>,
    cleaned: bool,
}

impl Lab {
    fn new(rampart: &Path) -> Result<Self> {
        let net = rampart_netlab::Lab::new("rampart")?;
        Ok(Lab {
            internet: Ns::named(net.name("internet")),
            server: Ns::named(net.name("server")),
            dir: std::env::temp_dir().join(format!("{}-demo", net.prefix())),
            net,
            listeners: None,
            backends: Vec::new(),
            daemon: None,
            databases: Vec::new(),
            rampart: rampart.to_path_buf(),
            detach: None,
            cleaned: false,
        })
    }

    /// Pins of the program rampart attaches to the server's NIC (see `userspace/src/paths.rs`).
    fn pin_dir(&self) -> PathBuf {
        Path::new("/sys/fs/bpf/rampart").join(format!("netns-{}", self.server)).join(IFACE)
    }

    /// rampart's per-namespace directories: pins and runtime state.
    fn scope_dirs(&self) -> [PathBuf; 2] {
        let scope = format!("netns-{}", self.server);
        [Path::new("/sys/fs/bpf/rampart").join(&scope), Path::new("/run/rampart").join(scope)]
    }

    fn rampart(&self, args: &[&str]) -> Command {
        self.rampart_in(&self.server, args)
    }

    /// `rampart -n NETNS ARGS…`.
    fn rampart_in(&self, netns: &Ns, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.rampart);
        cmd.args(["-n", netns.name()]).args(args);
        cmd
    }

    /// Has cleanup run `rampart -n NETNS ARGS…` before the namespaces go (pins outlive a
    /// deleted namespace).
    fn undo(&mut self, netns: &Ns, args: &[&str]) -> Undo {
        let cmd = self.rampart_in(netns, args);
        self.net.on_teardown(cmd)
    }

    /// Removes everything; returns what could not be removed. Runs to the end even after Ctrl-C.
    fn cleanup(&mut self) -> Vec<String> {
        if self.cleaned {
            return Vec::new();
        }
        self.cleaned = true;
        let mut problems = Vec::new();
        if let Err(e) = self.stop_daemon() {
            problems.push(format!("{e:#}"));
        }
        for mut db in std::mem::take(&mut self.databases) {
            db.kill();
        }
        // The helpers, then rampart's undo commands (newest first), then the namespaces.
        match self.net.teardown() {
            Ok(()) => {}
            Err(NetlabError::Teardown { problems: p, .. }) => problems.extend(p.iter().map(ToString::to_string)),
            Err(e) => problems.push(e.to_string()),
        }
        // Whatever a failed run left pinned for the (now deleted) server namespace.
        for dir in self.scope_dirs().iter().chain([&self.dir]) {
            if dir.exists()
                && let Err(e) = fs::remove_dir_all(dir)
            {
                problems.push(format!("removing {}: {e}", dir.display()));
            }
        }
        problems
    }

    /// Stops `rampart serve` the way an operator does (SIGTERM: it stops accepting, lets
    /// requests in flight finish, exits), killing it if it takes longer than its drain timeout
    /// allows. `None` if it was not running.
    fn stop_daemon(&mut self) -> Result<Option<ExitStatus>> {
        let Some(mut child) = self.daemon.take() else { return Ok(None) };
        if let Ok(Some(status)) = child.try_wait() {
            return Ok(Some(status));
        }
        // SAFETY: kill(2) on the pid of our own child, which has not been reaped yet.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        // The config's drain_timeout is 5 s; what takes longer is a bug (wait_bounded kills it).
        wait_bounded(&mut child, "rampart serve", Duration::from_secs(15), OnInterrupt::Finish).map(Some)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        eprintln!("cleaning up: namespaces {}, {}", self.net.namespaces().join(", "), self.dir.display());
        for p in self.cleanup() {
            eprintln!("cleanup: {p}");
        }
    }
}

fn heading(n: usize, title: &str) {
    println!("\n── {n}. {title} {}", "─".repeat(70usize.saturating_sub(title.len() + 6)));
}

fn indent(text: &str, by: usize) -> String {
    let pad = " ".repeat(by);
    text.lines().map(|l| if l.is_empty() { "\n".to_string() } else { format!("{pad}{l}\n") }).collect()
}

/// The namespaces, the veth pair, the addresses, and the services in "server".
fn build_network(lab: &mut Lab) -> Result<()> {
    let (inet, srv) = (lab.net.ns("internet")?, lab.net.ns("server")?);
    // IPv4 only: without IPv6 the kernel sends no neighbour discovery or MLD of its own, so
    // the counters show exactly the demo's traffic (a kernel without IPv6 has nothing to turn
    // off).
    if Path::new("/proc/sys/net/ipv6").exists() {
        for ns in [&inet, &srv] {
            for conf in ["all", "default"] {
                ns.sysctl(&format!("net.ipv6.conf.{conf}.disable_ipv6"), "1")?;
            }
        }
    }
    let mut client = inet.end(IFACE);
    for addr in [CUSTOMER, ADMIN, BLOCKED] {
        client = client.addr(&format!("{addr}/24"));
    }
    veth(srv.end(IFACE).addr(&format!("{SERVER_IP}/24")), client)?;
    // "internet" is the server's router: replies to 198.51.100.10 and 203.0.113.66 go back
    // through it.
    srv.route("default", &CUSTOMER.to_string())?;
    start_listeners(lab)
}

fn start_listeners(lab: &mut Lab) -> Result<()> {
    let tcp = TCP_PORTS.map(|p| p.to_string()).join(",");
    let args = ["__serve", "--name", "the server", "--tcp", &tcp, "--udp", &UDP_PORT.to_string()];
    let server = lab.server.clone();
    lab.listeners = Some(start_helper(lab, &server, &args, "the server's listeners")?);
    Ok(())
}

/// Starts `xtask ARGS` in `netns` and waits for it to print `ready`. The lab keeps it from the
/// start, so that cleanup stops it even if it never gets ready.
fn start_helper(lab: &mut Lab, netns: &Ns, args: &[&str], what: &str) -> Result<Proc> {
    let me = std::env::current_exe().context("locating the xtask binary")?;
    let mut cmd = netns.command(&me);
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit());
    let helper = lab.net.spawn(&mut cmd)?;
    let stdout = lab.net.child(helper).stdout.take().context("helper without stdout")?;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(line) if line.trim() == "ready" => Ok(helper),
        Ok(line) => bail!("{what} did not start (said {line:?})"),
        Err(_) => bail!("{what} did not start within 10 s"),
    }
}

/// Sends `traffic` from `from` to the server; true if it got an answer (or a refusal, which
/// also proves the packet arrived).
fn reaches(lab: &Lab, traffic: Traffic, from: Ipv4Addr) -> Result<bool> {
    check_interrupt()?;
    let mut cmd = match traffic {
        Traffic::Ping => {
            let mut cmd = lab.internet.command("ping");
            cmd.args(["-n", "-q", "-c", "1", "-W", "1", "-I", &from.to_string(), &SERVER_IP.to_string()]);
            cmd
        }
        Traffic::Tcp(port) | Traffic::Udp(port) => {
            let me = std::env::current_exe().context("locating the xtask binary")?;
            let proto = if matches!(traffic, Traffic::Tcp(_)) { "tcp" } else { "udp" };
            let mut cmd = lab.internet.command(me);
            cmd.args(["__probe", proto, "--from", &from.to_string(), "--to", &SERVER_IP.to_string()]).args([
                "--port",
                &port.to_string(),
                "--timeout-ms",
                &PROBE_TIMEOUT_MS.to_string(),
            ]);
            cmd
        }
    };
    let out = capture(&mut cmd, COMMAND_LIMIT)?;
    let code = out.status.code();
    match traffic {
        // ping: 0 = reply, 1 = no reply; anything else is a failure of ping itself.
        Traffic::Ping if code == Some(0) || code == Some(1) => Ok(code == Some(0)),
        Traffic::Tcp(_) | Traffic::Udp(_) if code == Some(probe::ANSWERED) || code == Some(probe::REFUSED) => Ok(true),
        Traffic::Tcp(_) | Traffic::Udp(_) if code == Some(probe::NO_ANSWER) => Ok(false),
        _ => bail!("`{}` failed ({}):\n{}", show(&cmd), out.status, out.text()),
    }
}

fn mark(ok: bool) -> &'static str {
    if ok { "✔" } else { "✘" }
}

/// The expectations met and not met so far.
#[derive(Default)]
struct Tally {
    total: usize,
    failures: Vec<String>,
}

impl Tally {
    /// Records an expectation the caller has printed; `failure` says what went wrong.
    fn record(&mut self, ok: bool, failure: impl FnOnce() -> String) -> bool {
        self.total += 1;
        if !ok {
            self.failures.push(failure());
        }
        ok
    }

    /// Prints `✔ text` or `✘ text` and records it.
    fn expect(&mut self, ok: bool, text: &str) -> bool {
        println!("  {} {text}", mark(ok));
        self.record(ok, || text.to_string())
    }
}

fn line(ok: bool, c: &Check, result: &str, why: &str) -> String {
    let mark = mark(ok);
    let text = format!(
        "  {mark} {:<20} from {:<14} {:<13} {result:<8} {why}",
        c.traffic.label(),
        c.from.to_string(),
        format!("({})", who(c.from)),
    );
    text.trim_end().to_string()
}

/// Without a firewall every service must answer, or the later "denied" would prove nothing.
fn baseline(lab: &Lab) -> Result<()> {
    let mut failed = 0;
    for c in &CHECKS {
        let ok = reaches(lab, c.traffic, c.from)?;
        failed += usize::from(!ok);
        println!("{}", line(ok, c, if ok { "answered" } else { "NO ANSWER" }, ""));
    }
    if failed > 0 {
        bail!("{failed} service(s) did not answer even without a firewall: the demo network is broken");
    }
    Ok(())
}

/// `cmd` as the user would type it: `rampart` for the binary xtask built.
fn shown(lab: &Lab, cmd: &Command) -> String {
    show(cmd).replacen(&lab.rampart.to_string_lossy().into_owned(), "rampart", 1)
}

/// Runs `cmd`, showing it and its output; any exit status is returned.
fn show_run(lab: &Lab, cmd: &mut Command) -> Result<Out> {
    check_interrupt()?;
    println!("  $ {}", shown(lab, cmd));
    let out = capture(cmd, COMMAND_LIMIT)?;
    print!("{}", indent(&out.text(), 4));
    Ok(out)
}

/// Runs a `rampart` command, showing it and its output; fails if it fails.
fn show_rampart(lab: &Lab, args: &[&str]) -> Result<()> {
    let mut cmd = lab.rampart(args);
    let out = show_run(lab, &mut cmd)?;
    if !out.success() {
        bail!("`{}` failed ({})", shown(lab, &cmd), out.status);
    }
    Ok(())
}

/// The demo. Fails if any expectation fails (after cleaning up).
pub fn run(rampart: &Path) -> Result<()> {
    proc::catch_interrupts();
    let started = Instant::now();
    let mut lab = Lab::new(rampart)?;
    let mut tally = Tally::default();

    println!("\nrampart demo: an XDP firewall, an HTTPS reverse proxy, an XDP L4 balancer and a MySQL router");
    println!("Using {}. Everything below is removed at the end (also on Ctrl-C).", rampart.display());

    heading(1, "A small network in two network namespaces");
    build_network(&mut lab)?;
    let services = TCP_PORTS.iter().map(|p| format!("{p} ({})", service(*p))).collect::<Vec<_>>().join(", ");
    let mut diagram = format!("\"internet\"  netns {}, {IFACE}:\n", lab.internet);
    for addr in [CUSTOMER, ADMIN, BLOCKED] {
        diagram.push_str(&format!("    {:<14} {}\n", addr.to_string(), who(addr)));
    }
    diagram.push_str(&format!(
        "      │  veth pair\n\"server\"    netns {}, {IFACE} (rampart attaches here):\n",
        lab.server
    ));
    diagram.push_str(&format!(
        "    {:<14} TCP {services}; UDP {UDP_PORT} ({})\n",
        SERVER_IP.to_string(),
        service(UDP_PORT)
    ));
    print!("{}", indent(&diagram, 2));

    heading(2, "Without a firewall, everything reaches the server");
    println!("  ✔: the service answered, as it should with nothing in the way.");
    baseline(&lab)?;

    heading(3, "The rule file");
    fs::create_dir_all(&lab.dir).with_context(|| format!("creating {}", lab.dir.display()))?;
    let rules = lab.dir.join("rules.toml");
    fs::write(&rules, RULES).with_context(|| format!("writing {}", rules.display()))?;
    let crawlers = lab.dir.join("crawlers.txt");
    fs::write(&crawlers, CRAWLERS).with_context(|| format!("writing {}", crawlers.display()))?;
    println!("  {}: rules are tried in order, the first that matches decides.", rules.display());
    print!("{}", indent(RULES, 4));
    println!("  ({} lists the set `crawlers`, one prefix per line.)", crawlers.display());

    heading(4, "Attach rampart to the server's NIC and load the rules");
    // From here on, cleanup detaches (it reports a failure if the attach itself failed).
    lab.detach = Some(lab.undo(&lab.server.clone(), &["detach", "--iface", IFACE]));
    show_rampart(&lab, &["attach", "--iface", IFACE])?;
    show_rampart(&lab, &["fw", "load", &rules.to_string_lossy()])?;

    heading(5, "The same traffic, through the firewall");
    println!("  ✔: rampart did what the rules say (denied traffic gets no answer at all).");
    for c in &CHECKS {
        let reached = reaches(&lab, c.traffic, c.from)?;
        let ok = reached == c.allowed;
        let result = if reached { "allowed" } else { "denied" };
        let why = if ok {
            c.why.to_string()
        } else {
            let want = if c.allowed { "allowed" } else { "denied" };
            format!("expected {want}: {}", c.why)
        };
        println!("{}", line(ok, c, result, &why));
        tally.record(ok, || format!("{} from {}: {why}", c.traffic.label(), c.from));
    }

    heading(6, "Per-rule counters and the verdict counters");
    show_rampart(&lab, &["fw", "list"])?;
    println!("  A denied TCP connection counts 2 packets: the SYN, and its retry 1 s later.");
    show_rampart(&lab, &["status"])?;

    // Part two, with the firewall still attached: sections 7 to 11.
    let log_seen = https::run(&mut lab, &mut tally)?;

    heading(12, "Stop rampart serve (SIGTERM: it drains) and detach");
    https::stop(&mut lab, &mut tally, log_seen)?;
    show_rampart(&lab, &["detach", "--iface", IFACE])?;
    if let Some(undo) = lab.detach.take() {
        lab.net.cancel(undo);
    }
    let pins = lab.pin_dir();
    let left = pins.exists();
    tally.expect(
        !left,
        &if left {
            format!("{} still exists after detach", pins.display())
        } else {
            format!("nothing left pinned under {}", pins.display())
        },
    );

    // Part three: the L4 balancer in front of three web backends.
    lb::run(&mut lab, &mut tally, 13)?;

    // Part four: MySQL routing through a failover (sections 14 to 17).
    mysql::run(&mut lab, &mut tally, 14)?;

    heading(18, "Clean up");
    let problems = lab.cleanup();
    if problems.is_empty() {
        tally.expect(
            true,
            &format!("removed every namespace (and the veth pairs and the bridge with them) and {}", lab.dir.display()),
        );
    }
    for p in problems {
        println!("  ✘ {p}");
        tally.record(false, || p);
    }

    println!();
    let took = started.elapsed().as_secs();
    if tally.failures.is_empty() {
        println!("All {} expectations met ({took} s).", tally.total);
        return Ok(());
    }
    let mut msg = format!("{} of {} expectation(s) not met:", tally.failures.len(), tally.total);
    for f in &tally.failures {
        let _ = write!(msg, "\n  - {f}");
    }
    bail!(msg)
}
