//! `cargo xtask demo`: the seeds' whole stack (`examples/stack/`, brought up by
//! [`rampart_stack`], the same files and topology as the system test `tests/tests/stack.rs`),
//! narrated. Each claim is checked as it is made and printed ✔ or ✘:
//! HTTPS from the client spreads over web1 and web2; the attacker is dropped at the edge (the
//! blocklist rule's counter shows it) and the zones keep MySQL to the application tier; `/api/`
//! writes land on the primary and reads come from the replica; `rampart top` on the edge shows
//! each web node's flows per second; a web node's daemon is killed and the MySQL primary fails
//! over while traffic runs, and Prometheus fires the matching alerts and resolves them.
//! It exits 0 only if every claim held. The stack is removed at the end, also on failure or
//! Ctrl-C; with `--keep` it stays up (and the demo says where to look) until Ctrl-C.
mod faults;

use std::{
    fmt::Write as _,
    fs,
    path::Path,
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use rampart_stack::{Conn, Options, PROMETHEUS, Req, SITE, Stack, VIP, WEB, admin_addr, wait_for};

use crate::proc::{self, check_interrupt, interrupted};

/// The edge's two backends (web1, web2 on the front network).
const WEB_FRONT: [(&str, &str); 2] = [("web1", "10.0.1.11"), ("web2", "10.0.1.12")];

/// The claims made so far, and those that did not hold.
#[derive(Default)]
pub struct Tally {
    total: usize,
    failures: Vec<String>,
}

impl Tally {
    /// Prints `✔ text` or `✘ text` and records it.
    pub fn expect(&mut self, ok: bool, text: &str) -> bool {
        println!("  {} {text}", if ok { "✔" } else { "✘" });
        self.total += 1;
        if !ok {
            self.failures.push(text.to_string());
        }
        ok
    }
}

pub fn heading(n: usize, title: &str) {
    println!("\n── {n}. {title} {}", "─".repeat(80usize.saturating_sub(title.chars().count() + 6)));
}

pub fn indent(text: &str, by: usize) -> String {
    let pad = " ".repeat(by);
    text.lines().map(|l| if l.is_empty() { "\n".to_string() } else { format!("{pad}{l}\n") }).collect()
}

/// `rampart -n NETNS ARGS` on `node` (from the node's directory), shown as a user would type
/// it, with its output; fails if it fails.
pub fn show_rampart(s: &Stack, node: &str, args: &[&str]) -> Result<String> {
    check_interrupt()?;
    println!("  $ rampart -n {} {}", s.ns(node).name(), args.join(" "));
    let out = s.rampart(node, args)?;
    print!("{}", indent(out.trim_end(), 4));
    Ok(out)
}

/// `node`'s control socket, as an absolute path (the commands shown can be pasted).
fn control(s: &Stack, node: &str) -> String {
    s.dir(node).join("control.sock").display().to_string()
}

/// The curl command the client runs for `path` (shown, then run by [`Stack::curl`]).
fn curl_line(s: &Stack, path: &str, extra: &str) -> String {
    format!(
        "ip netns exec {} curl{extra} --resolve {SITE}:443:{VIP} --cacert {} https://{SITE}{path}",
        s.ns("client").name(),
        s.public_ca.display()
    )
}

/// The value of a one-sample Prometheus query answer, or every (label value, value) of a
/// vector answer, by `label`.
fn prom_vector(s: &Stack, query: &str, label: &str) -> Result<Vec<(String, f64)>> {
    let q: String = query
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let text = s.prometheus(&format!("/api/v1/query?query={q}"))?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("Prometheus said {text}"))?;
    let mut out = Vec::new();
    for r in v["data"]["result"].as_array().context("no result in Prometheus's answer")? {
        let name = r["metric"][label].as_str().unwrap_or("").to_string();
        let value = r["value"][1].as_str().and_then(|x| x.parse().ok()).unwrap_or(f64::NAN);
        out.push((name, value));
    }
    Ok(out)
}

fn stack_options(rampart: &Path) -> Options {
    Options {
        rampart: rampart.to_path_buf(),
        examples: crate::tasks::root().join("examples"),
        work: std::env::temp_dir().join(format!("rampart-demo-{}", std::process::id())),
        tag: "demo".to_string(),
        // The shipped alert rules wait up to a minute before firing; the demo waits a tenth.
        alert_speedup: 10,
        narrate: true,
    }
}

/// The demo. Fails if any claim did not hold (after removing the stack).
pub fn run(rampart: &Path, keep: bool) -> Result<()> {
    proc::catch_interrupts();
    let started = Instant::now();
    let mut tally = Tally::default();
    println!("\nrampart demo: the seeds' whole stack (examples/stack/), in network namespaces on this machine");
    println!("Using {}. Everything is removed at the end (also on failure or Ctrl-C).", rampart.display());

    heading(1, "The stack");
    print!("{}", indent(TOPOLOGY, 2));
    println!("  (drawn in examples/stack/topology.svg; every node's files are those of examples/stack/)\n");
    let opts = stack_options(rampart);
    let stack = match Stack::up(opts) {
        Ok(s) => s,
        Err(rampart_stack::StackError::Interrupted { .. }) => bail!("interrupted"),
        Err(e) => return Err(e).context("bringing the stack up"),
    };
    tally.expect(true, &format!("the stack is up and answers end to end ({} s)", started.elapsed().as_secs()));
    let result = claims(&stack, &mut tally);
    if let Err(e) = &result {
        tally.expect(false, &format!("the demo stopped: {e:#}"));
    }
    if keep && result.is_ok() {
        where_to_look(&stack);
        while !interrupted() {
            thread::sleep(Duration::from_millis(200));
        }
        println!();
    }

    heading(11, "Clean up");
    let prefix = stack.lab().prefix().to_string();
    let work = stack.opts.work.clone();
    let problems = match stack.teardown() {
        Ok(()) => leftovers(&prefix, &work),
        Err(e) => vec![e.to_string()],
    };
    tally.expect(
        problems.is_empty(),
        &if problems.is_empty() {
            format!("removed: every process, pin and namespace ({prefix}-*), and {}", work.display())
        } else {
            format!("left behind: {}", problems.join("; "))
        },
    );

    println!();
    let took = started.elapsed().as_secs();
    if tally.failures.is_empty() {
        println!("All {} claims held ({took} s).", tally.total);
        return Ok(());
    }
    let mut msg = format!("{} of {} claim(s) did not hold ({took} s):", tally.failures.len(), tally.total);
    for f in &tally.failures {
        let _ = write!(msg, "\n  - {f}");
    }
    bail!(msg)
}

const TOPOLOGY: &str = "\
client 198.51.100.10, attacker 198.51.100.66 (blocklisted)      internet 198.51.100.0/24
        │
edge    XDP: front-zone firewall, then the L4 balancer for 203.0.113.10:80,443
        │ IP-in-IP (front 10.0.1.0/24)            replies go straight back (DSR)
web1 10.0.1.11, web2 10.0.1.12   decap, rampart serve: TLS, nginx for static files,
        │ TLS (internal CA)                      /api/ re-encrypted to the app tier
app1 10.1.2.21, app2 10.1.2.22   rampart serve: TLS, app.py, MySQL router rw :3306 / ro :3307
        │ MySQL (database zone)
db1 10.1.3.31 (primary), db2 10.1.3.32 (semi-sync GTID replica)
mon 10.1.9.10   Prometheus, scraping every rampart, with examples/monitoring/ alerts
";

/// Everything the demo claims, in order; the first error stops it (cleanup follows).
fn claims(s: &Stack, tally: &mut Tally) -> Result<()> {
    spread(s, tally)?;
    front_zone(s, tally)?;
    api(s, tally)?;
    top(s, tally)?;
    status_pages(s, tally)?;
    faults::run(s, tally)?;
    Ok(())
}

/// Section 2: static pages through the VIP, each on a new connection, spread over the web tier.
fn spread(s: &Stack, tally: &mut Tally) -> Result<()> {
    heading(2, "HTTPS through the VIP: the edge spreads connections over web1 and web2");
    println!("  $ {}", curl_line(s, "/", " -sS"));
    let (code, body) = s.curl("client", "/", &[])?;
    print!("{}", indent(body.trim_end(), 4));
    tally.expect(code == 200, &format!("{code}: the static page, TLS verified against the site's CA"));
    let n = 100;
    let pages: Vec<Req> = (0..n).map(|_| Req::Get("/".into())).collect();
    let answers = s.batch("client", &pages, Conn::NewEach)?;
    let per: Vec<usize> =
        WEB.iter().map(|w| answers.iter().filter(|a| a.body.contains(&format!("from {w}"))).count()).collect();
    let ok = answers.iter().filter(|a| a.status == 200).count();
    let fair = per.iter().all(|&c| c * 100 >= n * 35 && c * 100 <= n * 65);
    tally.expect(
        ok == n && fair,
        &format!(
            "{ok} of {n} requests on new connections answered: {} by web1, {} by web2 (each between 35 and 65 %)",
            per[0], per[1]
        ),
    );
    let h2: Vec<Req> = (0..10).map(|_| Req::Get("/".into())).collect();
    let answers = s.batch("client", &h2, Conn::KeepAlive2)?;
    let all_h2 = answers.iter().all(|a| a.status == 200 && a.version == "h2");
    let connects: u32 = answers.iter().map(|a| a.connects).sum();
    tally.expect(
        all_h2 && connects == 1,
        &format!("10 requests over one HTTP/2 connection (ALPN h2): {connects} connection(s), all answered"),
    );
    println!("  The edge balances connections (layer 4), not requests; its counters per backend:");
    let out = show_rampart(s, "edge", &["lb", "list"])?;
    let listed = WEB_FRONT.iter().all(|(_, ip)| out.contains(ip));
    tally.expect(listed, "rampart lb list: both web nodes behind 203.0.113.10:443/tcp and :80/tcp, with their flows");
    Ok(())
}

/// Section 3: the attacker gets nothing through the edge; the zones behind it.
fn front_zone(s: &Stack, tally: &mut Tally) -> Result<()> {
    heading(3, "The front zone: the attacker is dropped at the edge, before TLS");
    let deny = |s: &Stack| s.metric_sum("edge", "rampart_fw_rule_packets_total", "action=\"deny\"");
    let handshakes = |s: &Stack| -> Result<f64> {
        WEB.iter().map(|w| Ok(s.metric_sum(w, "rampart_tls_handshakes_total", "")?)).sum()
    };
    let (before, tls_before) = (deny(s)?, handshakes(s)?);
    println!("  $ {}", curl_line(s, "/", " -sS --max-time 3").replace(s.ns("client").name(), s.ns("attacker").name()));
    let r = s.curl("attacker", "/", &["--max-time", "3"]);
    let shown = match &r {
        Ok((code, _)) => format!("answered {code}"),
        // curl's own words, without the command line the error repeats.
        Err(e) => {
            let e = e.to_string();
            e.find("curl: (").map_or(e.clone(), |i| e[i..].trim().to_string())
        }
    };
    println!("    {shown}");
    let dropped = deny(s)? - before;
    let tls = handshakes(s)? - tls_before;
    tally.expect(r.is_err(), "the attacker (198.51.100.66, in the blocklist) got no answer at all");
    tally.expect(
        dropped >= 1.0,
        &format!("the blocklist rule counted {dropped} more packet(s) at the edge (the SYN and its retries)"),
    );
    tally.expect(tls == 0.0, "no TLS handshake reached the web tier from it");
    show_rampart(s, "edge", &["fw", "list"])?;

    println!("\n  The zones behind the edge (nmap, one port each):");
    let mut zones = |node: &str, target: &str, port: u16, want: &str, why: &str| -> Result<()> {
        check_interrupt()?;
        let state = nmap(s, node, target, port)?;
        tally.expect(state == want, &format!("{node} → {target}:{port} {state} ({why})"));
        Ok(())
    };
    zones("client", VIP, 22, "filtered", "front zone: only 80 and 443")?;
    zones("client", VIP, 443, "open", "the service")?;
    zones("web1", "10.1.3.31", 3306, "filtered", "database zone: not from the web tier")?;
    zones("app1", "10.1.3.31", 3306, "open", "database zone: the application tier only")?;
    Ok(())
}

/// nmap's state of one TCP port (`open`, `filtered`, …).
fn nmap(s: &Stack, node: &str, target: &str, port: u16) -> Result<String> {
    let mut cmd = s.ns(node).command("nmap");
    cmd.args(["-Pn", "-n", "-sS", "--max-retries", "1", "--host-timeout", "30s", "-T4", "-p", &port.to_string()]);
    let out = rampart_stack::capture(cmd.arg(target))?;
    Ok(out
        .lines()
        .find(|l| l.starts_with(&format!("{port}/tcp")))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("missing")
        .to_string())
}

/// A field of app.py's JSON answer, as text (`"server_id": 1` → `1`).
fn field(body: &str, name: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(body.trim()).ok()?;
    match &v[name] {
        serde_json::Value::String(x) => Some(x.clone()),
        serde_json::Value::Null => None,
        x => Some(x.to_string()),
    }
}

/// Section 4: `/api/` through both TLS hops to the application and MariaDB.
fn api(s: &Stack, tally: &mut Tally) -> Result<()> {
    heading(4, "/api/: writes land on the primary, reads come from the replica");
    println!(
        "  web → app over TLS verified against the internal CA; app.py knows only rampart's ports 3306 (rw) and 3307 (ro)"
    );
    println!("  $ {}", curl_line(s, "/api/notes", " -sS -X POST --data-binary 'hello from the demo'"));
    let (code, body) = s.curl("client", "/api/notes", &["-X", "POST", "--data-binary", "hello from the demo"])?;
    print!("{}", indent(body.trim_end(), 4));
    let id = field(&body, "id").unwrap_or_default();
    let writer = field(&body, "server_id");
    tally.expect(
        code == 201 && writer.as_deref() == Some("1"),
        &format!("{code}: note {id} written on server_id {} (db1, the primary)", writer.as_deref().unwrap_or("?")),
    );
    let path = format!("/api/notes/{id}");
    println!("  $ {}", curl_line(s, &path, " -sS"));
    // Semi-synchronous replication acknowledges once the replica has the write in its log;
    // applying it may take a moment more (a 404 until then).
    let (code, body) =
        wait_for("the note on the replica", Duration::from_secs(10), || match s.curl("client", &path, &[]) {
            Ok((200, body)) => Ok(Some((200, body))),
            Ok((code, body)) => Err(format!("{code} {body}")),
            Err(e) => Err(e.to_string()),
        })?;
    print!("{}", indent(body.trim_end(), 4));
    let reader = field(&body, "server_id");
    tally.expect(
        code == 200 && reader.as_deref() == Some("2") && field(&body, "body").as_deref() == Some("hello from the demo"),
        &format!("{code}: note {id} read back from server_id {} (db2, the replica)", reader.as_deref().unwrap_or("?")),
    );
    let out = show_rampart(s, "app1", &["status", "--control-socket", &control(s, "app1")])?;
    tally.expect(
        out.contains("10.1.3.31") && out.contains("10.1.3.32") && out.to_lowercase().contains("primary"),
        "rampart status on app1: its MySQL router sees db1 as the primary and db2 as a replica",
    );
    Ok(())
}

/// Section 5: `rampart top` on the edge while the client sends requests.
fn top(s: &Stack, tally: &mut Tally) -> Result<()> {
    heading(5, "rampart top on the edge, while the client sends requests");
    let stop = AtomicBool::new(false);
    let frame = thread::scope(|sc| -> Result<String> {
        sc.spawn(|| {
            let pages: Vec<Req> = (0..10).map(|_| Req::Get("/".into())).collect();
            while !stop.load(Ordering::Relaxed) && !interrupted() {
                let _ = s.batch("client", &pages, Conn::NewEach);
            }
        });
        thread::sleep(Duration::from_secs(1));
        let args = ["top", "--control-socket", &control(s, "edge"), "--iterations", "2", "--interval", "2"];
        println!("  $ rampart -n {} {}", s.ns("edge").name(), args.join(" "));
        let out = s.rampart("edge", &args);
        stop.store(true, Ordering::Relaxed);
        let out = out?;
        // The second screen: rates over the 2 s between the two.
        let last = out.rfind("rampart top").map_or(out.as_str(), |i| &out[i..]);
        print!("{}", indent(last.trim_end(), 4));
        Ok(last.to_string())
    })?;
    // A backend's row: address, "l4", REQ/S "-", FLOWS/S, PKT/S, …
    let rate = |ip: &str| -> f64 {
        frame
            .lines()
            .find(|l| l.trim_start().starts_with(ip) && l.contains(" l4 "))
            .and_then(|l| l.split_whitespace().nth(3))
            .and_then(|x| x.parse().ok())
            .unwrap_or(0.0)
    };
    let rates: Vec<f64> = WEB_FRONT.iter().map(|(_, ip)| rate(ip)).collect();
    tally.expect(
        rates.iter().all(|&r| r > 0.0),
        &format!(
            "rampart top shows each web node's new flows/s (one request per connection here, so its requests/s): \
             web1 {}, web2 {}",
            rates[0], rates[1]
        ),
    );
    println!("  TLS ends on the web nodes: there, rampart top counts requests per backend (nginx, app1, app2), e.g.");
    println!("    rampart -n {} top --control-socket {}", s.ns("web1").name(), control(s, "web1"));
    Ok(())
}

/// Section 6: every daemon's status page and Prometheus.
fn status_pages(s: &Stack, tally: &mut Tally) -> Result<()> {
    heading(6, "Status pages and Prometheus");
    let mut all = true;
    for node in ["edge", "web1", "web2", "app1", "app2"] {
        let addr = admin_addr(node);
        let mut cmd = s.ns("mon").command("curl");
        cmd.args(["-sS", "--max-time", "5", "-o", "/dev/null", "-w", "%{http_code}", &format!("http://{addr}/")]);
        let code = rampart_stack::capture(&mut cmd).unwrap_or_default();
        all &= code.trim() == "200";
        println!("    {node:<5} http://{addr}/  ({})", code.trim());
    }
    tally.expect(all, "every rampart serves its status page (and /metrics) on its admin listener, internal side only");
    // Over the last minute: sections 2 to 5 sent requests to both (a shorter window may fall
    // between two scrapes of one of them). The next scrape may still be due: wait for it.
    let query = "sum by (instance) (rate(rampart_http_requests_total{tier=\"web\"}[1m]))";
    let mut qps = Vec::new();
    let both = wait_for("each web node's requests/s in Prometheus", Duration::from_secs(20), || {
        qps = prom_vector(s, query, "instance").map_err(|e| e.to_string())?;
        Ok((qps.len() == 2 && qps.iter().all(|(_, v)| *v > 0.0)).then_some(()))
    });
    let text = qps.iter().map(|(i, v)| format!("{i} {v:.2}/s")).collect::<Vec<_>>().join(", ");
    tally.expect(
        both.is_ok(),
        &format!("Prometheus ({PROMETHEUS}) has each web node's requests/s over the last minute: {text}"),
    );
    Ok(())
}

/// With `--keep`: what to look at while the stack runs.
fn where_to_look(s: &Stack) {
    let mon = s.ns("mon").name();
    println!("\n── The stack stays up until Ctrl-C ─────────────────────────────────────────────────");
    println!("  Status pages (inside the namespaces; from the monitoring node):");
    for node in ["edge", "web1", "web2", "app1", "app2"] {
        println!("    ip netns exec {mon} curl -s http://{}/          ({node})", admin_addr(node));
    }
    println!("  Prometheus: http://{PROMETHEUS}/ inside namespace {mon}, e.g.");
    println!("    ip netns exec {mon} curl -s http://{PROMETHEUS}/api/v1/alerts");
    println!("  (the namespaces are not reachable from the host's own network; for a browser, forward a port:");
    println!(
        "    socat TCP-LISTEN:19090,bind=127.0.0.1,fork,reuseaddr EXEC:'ip netns exec {mon} socat STDIO TCP:{PROMETHEUS}'"
    );
    println!("   then open http://127.0.0.1:19090/, and the same for a status page)");
    println!("  rampart top (q quits):");
    println!("    rampart -n {} top --control-socket {}", s.ns("edge").name(), control(s, "edge"));
    println!("    rampart -n {} top --control-socket {}", s.ns("web1").name(), control(s, "web1"));
    println!("  A request as the client:");
    println!("    {}", curl_line(s, "/", " -s"));
    println!("  Logs and files of each node: {}/<node>/", s.opts.work.display());
    println!("  rampart is {}", s.opts.rampart.display());
}

/// What teardown should have removed and did not: namespaces named `PREFIX-*`, pins and
/// runtime state of their scopes, the work directory.
fn leftovers(prefix: &str, work: &Path) -> Vec<String> {
    let mut left = Vec::new();
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for l in String::from_utf8_lossy(&out.stdout).lines() {
            let name = l.split_whitespace().next().unwrap_or("");
            if name.starts_with(&format!("{prefix}-")) {
                left.push(format!("namespace {name}"));
            }
        }
    }
    let scope = format!("netns-{prefix}-");
    for base in ["/sys/fs/bpf/rampart", "/sys/fs/bpf/rampart/decap", "/run/rampart", "/run/rampart/decap"] {
        let Ok(entries) = fs::read_dir(base) else { continue };
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&scope) {
                left.push(e.path().display().to_string());
            }
        }
    }
    if work.exists() {
        left.push(work.display().to_string());
    }
    left
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_of_the_application_answers() {
        let body = "{\"id\": 12, \"app\": \"app2\", \"server_id\": 1}\n";
        assert_eq!(field(body, "id").as_deref(), Some("12"));
        assert_eq!(field(body, "app").as_deref(), Some("app2"));
        assert_eq!(field(body, "body"), None);
        assert_eq!(field("not json", "id"), None);
    }

    #[test]
    fn leftovers_name_only_this_run() {
        let work = std::env::temp_dir().join("rampart-demo-test-no-such-dir");
        assert!(leftovers("no-such-prefix-0-0", &work).is_empty());
    }
}
