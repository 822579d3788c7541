//! The demo's second part: `rampart serve` in the server namespace terminates HTTPS on the
//! server's port 443 (a certificate made by `openssl` at demo time) and proxies to a pool of two
//! web backends (`xtask __web` on 127.0.0.1:8081 and :8082), while the XDP firewall of part one
//! stays attached. curl in the internet namespace shows round-robin, HTTP/2 through ALPN, the
//! X-Forwarded-For the backend saw, health checks at work, a blocklisted client dropped
//! before TLS starts, and `rampart top` while requests run.
use std::{
    fs,
    net::{Ipv4Addr, SocketAddrV4},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::{BLOCKED, COMMAND_LIMIT, CUSTOMER, Lab, SERVER_IP, Tally, heading, indent, shown, start_helper};
use crate::proc::{capture, capture_ok, check_interrupt, show};

/// The site's name: in the certificate, and what curl asks for (`--resolve`, no DNS).
const HOST: &str = "www.example.test";
const HTTPS_PORT: u16 = 443;
/// The web pool. On the server's loopback: only rampart, in the same namespace, reaches them.
const BACKENDS: [(&str, SocketAddrV4); 2] =
    [("web-1", SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8081)), ("web-2", SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8082))];
/// rampart's [admin] listener (`/metrics`, status page), also on the server's loopback.
const ADMIN: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9100);
/// How long the health checks may take to notice a change (they run every 500 ms; 2 in a row).
const HEALTH_LIMIT: Duration = Duration::from_secs(10);
/// `rampart serve`'s log, in the demo's directory.
const LOG: &str = "serve.log";

/// The certificate: a throwaway CA, and a leaf for [`HOST`] that it signs (ECDSA P-256, 1 day).
fn make_certificate(lab: &Lab) -> Result<()> {
    let ext = format!(
        "subjectAltName = DNS:{HOST}\nbasicConstraints = critical, CA:FALSE\n\
         keyUsage = critical, digitalSignature\nextendedKeyUsage = serverAuth\n"
    );
    fs::write(lab.dir.join("site.ext"), &ext).context("writing site.ext")?;
    let subject = format!("/CN={HOST}");
    let p256 = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    let steps: [&[&str]; 3] = [
        &["req", "-x509", "-days", "1", "-subj", "/CN=rampart demo CA", "-keyout", "ca.key", "-out", "ca.pem"],
        &["req", "-new", "-subj", &subject, "-keyout", "site.key", "-out", "site.csr"],
        &[
            "x509", "-req", "-in", "site.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-days", "1", "-sha256",
            "-extfile", "site.ext", "-out", "site.pem",
        ],
    ];
    for (i, args) in steps.iter().enumerate() {
        check_interrupt()?;
        let mut cmd = Command::new("openssl");
        cmd.current_dir(&lab.dir).args(&args[..2]);
        if i < 2 {
            cmd.args(p256);
        }
        cmd.args(&args[2..]);
        println!("  $ {}", show(&cmd));
        capture_ok(&mut cmd, COMMAND_LIMIT)?;
    }
    print!("{}", indent(&format!("site.ext:\n{}", indent(&ext, 2)), 2));
    Ok(())
}

fn config(lab: &Lab) -> String {
    let backends = BACKENDS.iter().map(|(_, a)| format!("\"{a}\"")).collect::<Vec<_>>().join(", ");
    format!(
        r#"# The whole format, documented: rampart.example.toml
[admin]
listen = "{ADMIN}"                 # /metrics and a status page at /
control_socket = "{control}"
drain_timeout = "5s"

[[https]]
listen = "{SERVER_IP}:{HTTPS_PORT}"
certs = [{{ cert = "site.pem", key = "site.key" }}]

[[route]]
host = "{HOST}"
path = "/"
pool = "web"

[[pool]]
name = "web"
backends = [{backends}]
balance = "round-robin"
health = {{ path = "/healthz", interval = "500ms", timeout = "250ms", rise = 2, fall = 2 }}
"#,
        control = lab.dir.join("control.sock").display(),
    )
}

fn start_backend(lab: &mut Lab, name: &str, addr: SocketAddrV4) -> Result<()> {
    let args = ["__web", "--name", name, "--listen", &addr.to_string()];
    let server = lab.server.clone();
    let backend = start_helper(lab, &server, &args, name)?;
    lab.backends.push((name.to_string(), backend));
    Ok(())
}

fn stop_backend(lab: &mut Lab, name: &str) {
    if let Some(i) = lab.backends.iter().position(|(n, _)| n == name) {
        let (_, backend) = lab.backends.remove(i);
        lab.net.kill(backend);
    }
}

/// env_logger's `[TIME LEVEL target] message`, as `LEVEL message`.
fn log_line(l: &str) -> String {
    if let Some(rest) = l.strip_prefix('[')
        && let Some((head, msg)) = rest.split_once("] ")
    {
        let level = head.split_whitespace().nth(1).unwrap_or("");
        return format!("{level:<5} {msg}");
    }
    l.to_string()
}

fn log_text(lab: &Lab, log: &str) -> String {
    fs::read_to_string(lab.dir.join(log)).unwrap_or_default()
}

/// Prints the daemon's log `log` from line `from` on; returns the number of lines it has.
pub(super) fn print_log(lab: &Lab, log: &str, from: usize) -> usize {
    let text = log_text(lab, log);
    let lines: Vec<&str> = text.lines().collect();
    for l in lines.iter().skip(from) {
        println!("    {}", log_line(l));
    }
    lines.len()
}

/// `rampart -n NETNS serve --config CONFIG` (a file in the demo's directory), logging to `log`
/// there; waits until it is ready.
pub(super) fn start_daemon(lab: &mut Lab, netns: &str, config: &str, log: &str) -> Result<()> {
    let file = fs::File::create(lab.dir.join(log)).with_context(|| format!("creating {log}"))?;
    let mut cmd = Command::new(&lab.rampart);
    cmd.args(["-n", netns, "serve", "--config", config])
        .current_dir(&lab.dir)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(file.try_clone().with_context(|| log.to_string())?)
        .stderr(file);
    println!("  $ {} > {log} 2>&1 &", shown(lab, &cmd));
    lab.daemon = Some(cmd.spawn().with_context(|| format!("cannot start `{}`", show(&cmd)))?);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        check_interrupt()?;
        if log_text(lab, log).contains("rampart serve: ready") {
            return Ok(());
        }
        if let Some(child) = lab.daemon.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            lab.daemon = None;
            bail!("rampart serve exited ({status}) before it was ready:\n{}", log_text(lab, log));
        }
        if Instant::now() >= deadline {
            bail!("rampart serve was not ready within 15 s:\n{}", log_text(lab, log));
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// curl in the internet namespace, from `from`, to `https://www.example.test/` at the server's
/// address, trusting the demo CA. Run in the demo's directory (`ca.pem` is relative).
fn curl(lab: &Lab, from: Ipv4Addr, extra: &[&str]) -> Command {
    let mut cmd = lab.internet.command("curl");
    cmd.current_dir(&lab.dir)
        .args(["-sS", "--cacert", "ca.pem", "--resolve", &format!("{HOST}:{HTTPS_PORT}:{SERVER_IP}")])
        .args(["--interface", &from.to_string()])
        .args(extra)
        .arg(format!("https://{HOST}/"));
    cmd
}

/// What a web backend answered (see `web.rs`): which backend, and the headers it saw.
struct Page {
    text: String,
}

impl Page {
    fn backend(&self) -> &str {
        self.text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("hello from "))
            .and_then(|l| l.split(' ').next())
            .unwrap_or("?")
    }
    fn field(&self, name: &str) -> &str {
        self.text.lines().find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(": "))).unwrap_or("")
    }
}

/// One request through rampart; fails unless curl got a page from a backend.
fn get(lab: &Lab, from: Ipv4Addr, extra: &[&str]) -> Result<Page> {
    check_interrupt()?;
    let mut cmd = curl(lab, from, &[&["--max-time", "10"], extra].concat());
    let out = capture_ok(&mut cmd, COMMAND_LIMIT)?;
    let page = Page { text: out.stdout };
    if !page.text.starts_with("hello from ") {
        bail!("`{}` got no backend's page:\n{}", show(&cmd), page.text);
    }
    Ok(page)
}

/// `n` requests; the backends that answered, in order.
fn backends_of(lab: &Lab, n: usize) -> Result<Vec<String>> {
    (0..n).map(|_| get(lab, CUSTOMER, &[]).map(|p| p.backend().to_string())).collect()
}

/// A GET to rampart's admin listener, from inside the server namespace.
fn admin_get(lab: &Lab, path: &str) -> Result<String> {
    let mut cmd = lab.server.command("curl");
    cmd.args(["-sS", "--max-time", "5", &format!("http://{ADMIN}{path}")]);
    Ok(capture_ok(&mut cmd, COMMAND_LIMIT)?.stdout)
}

/// A backend's state on rampart's status page (`  127.0.0.1:8082   down   in-flight 0`).
fn state_of(status: &str, addr: SocketAddrV4) -> String {
    let addr = addr.to_string();
    status
        .lines()
        .find_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some(addr.as_str())).then(|| words.next().unwrap_or("").to_string())
        })
        .unwrap_or_default()
}

/// Polls the status page until `addr` is in `state` (bounded by [`HEALTH_LIMIT`]); the time it
/// took, or `None`.
fn wait_state(lab: &Lab, addr: SocketAddrV4, state: &str) -> Result<Option<Duration>> {
    let start = Instant::now();
    while start.elapsed() < HEALTH_LIMIT {
        if state_of(&admin_get(lab, "/")?, addr) == state {
            return Ok(Some(start.elapsed()));
        }
        thread::sleep(Duration::from_millis(100));
    }
    Ok(None)
}

/// The sum of a metric's series in `/metrics` text.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|r| r.starts_with(['{', ' '])))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Packets counted by the rule at `position` (1-based), from `rampart fw list --json`.
fn rule_packets(lab: &Lab, position: u64) -> Result<u64> {
    let out = capture_ok(&mut lab.rampart(&["fw", "list", "--json"]), COMMAND_LIMIT)?;
    let v: serde_json::Value = serde_json::from_str(&out.stdout).context("reading `rampart fw list --json`")?;
    v["rules"]
        .as_array()
        .and_then(|rules| rules.iter().find(|r| r["position"] == position))
        .and_then(|r| r["packets"].as_u64())
        .with_context(|| format!("no rule at position {position} in `rampart fw list --json`"))
}

fn handshakes(lab: &Lab) -> Result<f64> {
    let m = admin_get(lab, "/metrics")?;
    Ok(metric(&m, "rampart_tls_handshakes_total") + metric(&m, "rampart_tls_handshake_failures_total"))
}

/// Sections 7 to 11: the certificate, the backends and the daemon, then HTTPS through it.
/// Returns how many lines of the daemon's log have been shown.
pub(super) fn run(lab: &mut Lab, tally: &mut Tally) -> Result<usize> {
    heading(7, "A certificate for www.example.test, made with openssl");
    println!("  In {}: a throwaway CA, and a leaf it signs (ECDSA P-256, valid 1 day).", lab.dir.display());
    make_certificate(lab)?;

    heading(8, "rampart serve: HTTPS on port 443, a pool of two web backends");
    // Part one's listeners held port 443 on every address; from here on it is rampart's.
    if let Some(listeners) = lab.listeners.take() {
        lab.net.kill(listeners);
    }
    for (name, addr) in BACKENDS {
        start_backend(lab, name, addr)?;
    }
    println!("  Part one's listeners are stopped. In the server namespace, two web backends answer");
    println!("  with their name: web-1 on {}, web-2 on {}.", BACKENDS[0].1, BACKENDS[1].1);
    let cfg = config(lab);
    fs::write(lab.dir.join("rampart.toml"), &cfg).context("writing rampart.toml")?;
    println!("  rampart.toml:");
    print!("{}", indent(&cfg, 4));
    let mut check = Command::new(&lab.rampart);
    check.current_dir(&lab.dir).args(["check-config", "rampart.toml"]);
    if !super::show_run(lab, &mut check)?.success() {
        bail!("the demo's rampart.toml does not check");
    }
    let server = lab.server.name().to_string();
    start_daemon(lab, &server, "rampart.toml", LOG)?;
    let log_seen = print_log(lab, LOG, 0);

    heading(9, "HTTPS from the internet, through rampart, to the web pool");
    let first = curl(lab, CUSTOMER, &[]);
    println!("  $ {}", show(&first));
    let page = get(lab, CUSTOMER, &[])?;
    print!("{}", indent(&page.text, 4));
    let mut seen = vec![page.backend().to_string()];
    seen.extend(backends_of(lab, 3)?);
    let alternates = seen.windows(2).all(|w| w[0] != w[1]) && BACKENDS.iter().all(|(n, _)| seen.iter().any(|s| s == n));
    tally.expect(alternates, &format!("4 requests answered by {}: round-robin over the pool", seen.join(", ")));
    tally.expect(
        page.field("x-forwarded-for") == CUSTOMER.to_string() && page.field("x-forwarded-proto") == "https",
        &format!(
            "the backend saw X-Forwarded-For: {}, X-Forwarded-Proto: {} (its TCP peer is rampart, 127.0.0.1)",
            page.field("x-forwarded-for"),
            page.field("x-forwarded-proto")
        ),
    );

    println!("\n  HTTP/2, negotiated with ALPN (curl -v shows the handshake):");
    let mut h2 = curl(lab, CUSTOMER, &["--http2", "-v", "--max-time", "10"]);
    println!("  $ {}", show(&h2));
    let out = capture(&mut h2, COMMAND_LIMIT)?;
    let wanted = ["SSL connection using", "ALPN: server accepted", " subject:", " issuer:", "SSL certificate verify"];
    for l in out.stderr.lines().filter(|l| wanted.iter().any(|w| l.contains(w)) || l.starts_with("< HTTP/")) {
        println!("    {l}");
    }
    let h2_page = Page { text: out.stdout };
    let h2_ok = out.status.success()
        && out.stderr.lines().any(|l| l.contains("ALPN: server accepted h2"))
        && out.stderr.lines().any(|l| l.starts_with("< HTTP/2 200"));
    tally.expect(h2_ok, "HTTP/2 via ALPN (h2), the certificate verified against the demo CA");
    tally.expect(
        h2_page.field("request").ends_with("HTTP/1.1"),
        &format!("{} got \"{}\": rampart speaks HTTP/1.1 to backends", h2_page.backend(), h2_page.field("request")),
    );

    println!("\n  A client that sends its own X-Forwarded-For:");
    let spoof = ["-H", "X-Forwarded-For: 6.6.6.6"];
    println!("  $ {}", show(&curl(lab, CUSTOMER, &spoof)));
    let page = get(lab, CUSTOMER, &spoof)?;
    tally.expect(
        page.field("x-forwarded-for") == CUSTOMER.to_string(),
        &format!(
            "the backend saw X-Forwarded-For: {}: replaced, since {CUSTOMER} is no trusted proxy",
            page.field("x-forwarded-for")
        ),
    );

    heading(10, "A blocklisted client: dropped in XDP, before TLS starts");
    let (packets_before, handshakes_before) = (rule_packets(lab, 1)?, handshakes(lab)?);
    let mut blocked = curl(lab, BLOCKED, &["--connect-timeout", "2"]);
    let out = super::show_run(lab, &mut blocked)?;
    let (packets_after, handshakes_after) = (rule_packets(lab, 1)?, handshakes(lab)?);
    // curl's exit status 28: the operation timed out (here: connecting).
    tally.expect(out.status.code() == Some(28), "no connection: curl gave up connecting after 2 s (exit status 28)");
    tally.expect(
        packets_after > packets_before,
        &format!(
            "rule 1 (deny @blocklist) dropped {} more packet(s): the SYN and its retry",
            packets_after.saturating_sub(packets_before)
        ),
    );
    tally.expect(
        handshakes_after == handshakes_before,
        &format!("rampart serve saw no TLS handshake from it (handshakes so far: {handshakes_after})"),
    );

    heading(11, "Health checks: a backend dies, then comes back");
    let (name, addr) = BACKENDS[1];
    stop_backend(lab, name);
    println!("  {name} is killed. rampart checks GET /healthz every 500 ms; 2 failures take it out.");
    let down = wait_state(lab, addr, "down")?;
    tally.expect(
        down.is_some(),
        &match down {
            Some(t) => format!("{name} ({addr}) marked down after {:.1} s", t.as_secs_f64()),
            None => format!("{name} ({addr}) still not down after {} s", HEALTH_LIMIT.as_secs()),
        },
    );
    println!("  rampart's status page (curl http://{ADMIN}/ in the server namespace):");
    print!("{}", indent(&admin_get(lab, "/")?, 4));
    let seen = backends_of(lab, 4)?;
    tally.expect(
        seen.iter().all(|s| s == BACKENDS[0].0),
        &format!("4 requests answered by {}: only the healthy backend", seen.join(", ")),
    );
    start_backend(lab, name, addr)?;
    println!("  {name} starts again; 2 passed checks bring it back.");
    let up = wait_state(lab, addr, "up")?;
    tally.expect(
        up.is_some(),
        &match up {
            Some(t) => format!("{name} back up after {:.1} s", t.as_secs_f64()),
            None => format!("{name} still not up after {} s", HEALTH_LIMIT.as_secs()),
        },
    );
    let seen = backends_of(lab, 2)?;
    tally.expect(
        BACKENDS.iter().all(|(n, _)| seen.iter().any(|s| s == n)),
        &format!("2 requests answered by {}: both backends again", seen.join(", ")),
    );
    live_figures(lab, tally)?;
    println!("  What rampart serve logged meanwhile:");
    Ok(print_log(lab, LOG, log_seen))
}

/// `rampart top` while requests run (three screens, then it exits; interactive, it refreshes
/// every second until `q`), and where the status page is.
fn live_figures(lab: &Lab, tally: &mut Tally) -> Result<()> {
    let control = lab.dir.join("control.sock");
    println!("\n  rampart top while 30 requests run (--iterations 3 prints three screens a second apart;");
    println!("  without it, top refreshes every second until q):");
    let mut cmd = lab.rampart(&["top", "--iterations", "3", "--control-socket", &control.to_string_lossy()]);
    println!("  $ {}", shown(lab, &cmd));
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().context("starting rampart top")?;
    let answered = (0..30).filter(|_| get(lab, CUSTOMER, &[]).is_ok()).count();
    let status = crate::proc::wait_bounded(
        &mut child,
        "rampart top",
        Duration::from_secs(20),
        crate::proc::OnInterrupt::Finish,
    )?;
    let mut text = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().context("top's output")?, &mut text).context("top's output")?;
    print!("{}", indent(&text, 4));
    // The last screen: both backends with a rate (not "-", which only the first screen shows).
    let last = text.rsplit("rampart top ").next().unwrap_or("");
    let rated = BACKENDS.iter().all(|(_, a)| {
        last.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.first() == Some(&a.to_string().as_str()) && f.get(2).is_some_and(|r| r.parse::<f64>().is_ok())
        })
    });
    tally.expect(
        status.success() && rated && answered == 30,
        &format!("rampart top showed both backends with their requests/s while {answered} requests ran"),
    );
    println!("  The status page, with live charts of requests/s and drops/s: http://{ADMIN}/ in the");
    println!("  server namespace (`ip netns exec {} chromium http://{ADMIN}/`, or a tunnel to it).", lab.server);
    Ok(())
}

/// Part of section 12: the daemon's counters, then SIGTERM, then the backends. `log_seen`: the
/// lines of the daemon's log shown so far.
pub(super) fn stop(lab: &mut Lab, tally: &mut Tally, log_seen: usize) -> Result<()> {
    println!("  rampart serve's counters (curl http://{ADMIN}/metrics, some lines):");
    let metrics = admin_get(lab, "/metrics")?;
    for l in metrics.lines().filter(|l| {
        ["rampart_http_requests_total{", "rampart_tls_handshakes_total{", "rampart_backend_up{"]
            .iter()
            .any(|p| l.starts_with(p))
    }) {
        println!("    {l}");
    }
    let pid = lab.daemon.as_ref().map(|c| c.id()).context("rampart serve is not running")?;
    println!("  $ kill -TERM {pid}");
    let status = lab.stop_daemon()?.context("rampart serve is not running")?;
    print_log(lab, LOG, log_seen);
    let drained = log_text(lab, LOG).contains("all connections finished");
    tally.expect(status.success() && drained, &format!("rampart serve finished its connections and exited ({status})"));
    for (name, _) in BACKENDS {
        stop_backend(lab, name);
    }
    println!("  web-1 and web-2 are stopped.");
    Ok(())
}
