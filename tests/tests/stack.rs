//! The seeds' whole stack (`examples/stack/`), end to end, with numbers asserted: the files
//! as they ship, real MariaDB, nginx, Prometheus and the application server, every rampart
//! role (edge firewall and L4 balancer, web TLS and routing, app TLS and MySQL routing) in
//! network namespaces this test makes and removes (`rampart_stack`).
//!
//! One test, in phases, on one stack (bringing it up takes about 20 s):
//! 1. traffic: 2,000 HTTPS requests through the VIP, static and /api/ writes and reads, on new
//!    connections and on HTTP/1.1 and h2 keep-alive connections; every answer right, the web
//!    tier's shares of the balanced flows within ±10 %, and exact counts in /metrics and in
//!    Prometheus;
//! 2. zones: what nmap sees from the internet, the attacker and the web tier;
//! 3. faults under steady traffic: web1's rampart killed, the MySQL primary killed and the
//!    replica promoted, an application server hung; no acknowledged write lost, failures only
//!    while a fault is being noticed, the alerts fire in Prometheus and resolve;
//! 4. reloads under steady traffic: a new rule file at the edge (an address added to the
//!    blocklist), a renewed certificate on the web tier, a new backend in an application
//!    server's pool; each in force afterwards, and not one request failed.
//!
//! Needs root (namespaces, XDP); fails saying so without it.

use std::{path::PathBuf, time::Duration};

use rampart_stack::*;

fn stack(tag: &str) -> Stack {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let rampart =
        std::env::var_os("RAMPART_BIN").map(PathBuf::from).unwrap_or_else(|| root.join("target/release/rampart"));
    assert!(rampart.exists(), "{}: build it first (`cargo xtask test` does)", rampart.display());
    let opts = Options {
        rampart,
        examples: root.join("examples"),
        work: std::env::temp_dir().join(format!("rampart-stack-{tag}-{}", std::process::id())),
        tag: format!("st{tag}"),
        // The shipped alert rules wait up to a minute before firing; a test waits a tenth.
        alert_speedup: 10,
        narrate: true,
    };
    match Stack::up(opts) {
        Ok(s) => s,
        Err(StackError::Netlab(rampart_netlab::NetlabError::NotRoot)) => {
            panic!("the whole-stack test makes network namespaces and attaches XDP programs: run it as root")
        }
        Err(e) => panic!("bringing the stack up: {e}"),
    }
}

#[test]
fn whole_stack_traffic_zones_and_faults() {
    let s = stack("w");
    traffic(&s);
    zones(&s);
    faults(&s);
    reloads(&s);
}

fn web_requests(s: &Stack) -> f64 {
    WEB.iter().map(|w| s.metric_sum(w, "rampart_http_requests_total", "").unwrap()).sum()
}
fn web_backend(s: &Stack, pool: &str) -> f64 {
    WEB.iter()
        .map(|w| s.metric_sum(w, "rampart_http_backend_requests_total", &format!("pool=\"{pool}\"")).unwrap())
        .sum()
}
fn new_flows(s: &Stack) -> Vec<f64> {
    let m = s.metrics("edge").unwrap();
    ["10.0.1.11", "10.0.1.12"]
        .iter()
        .map(|b| {
            let labels =
                format!("netns=\"{}\",iface=\"eth0\",service=\"{VIP}:443/tcp\",backend=\"{b}\"", s.ns("edge").name());
            sum_samples(&m, "rampart_lb_backend_new_flows_total", &labels)
        })
        .collect()
}

fn prom_value(s: &Stack, q: &str) -> Option<f64> {
    let out = s.prometheus(&format!("/api/v1/query?query={}", q.replace(' ', "%20"))).ok()?;
    let i = out.find("\"value\":[")?;
    let rest = &out[i..];
    let v = rest.split('"').nth(3)?;
    v.parse().ok()
}

fn traffic(s: &Stack) {
    let before = (web_requests(s), web_backend(s, "app"), web_backend(s, "static"), new_flows(s));
    let prom_q = "sum(rampart_http_requests_total{tier=\"web\"})";
    let prom_before = wait_for("Prometheus has the web tier's count", Duration::from_secs(30), || {
        Ok(prom_value(s, prom_q).filter(|v| *v == before.0))
    })
    .expect("prometheus before");

    // 500 writes, each on a new connection (HTTP/1.1).
    let mut ids = Vec::new();
    let writes: Vec<Req> = (0..100).map(|i| Req::Post("/api/notes".into(), format!("note {i}"))).collect();
    for _ in 0..5 {
        for a in s.batch("client", &writes, Conn::NewEach).expect("writes") {
            assert_eq!(a.status, 201, "{a:?}");
            assert!(a.body.contains("\"server_id\": 1"), "a write not on the primary: {a:?}");
            assert_eq!(a.connects, 1, "{a:?}");
            let id: u64 = a.body.split("\"id\": ").nth(1).unwrap().split(',').next().unwrap().parse().unwrap();
            ids.push(id);
        }
    }
    // The replica has them all.
    let max = *ids.iter().max().unwrap();
    wait_for("the replica has every note", Duration::from_secs(30), || {
        let n =
            s.sql("db2", &format!("SELECT COUNT(*) FROM shop.notes WHERE id <= {max}")).map_err(|e| e.to_string())?;
        Ok((n.trim().parse::<usize>().unwrap_or(0) >= ids.len()).then_some(()))
    })
    .expect("replica");
    // 500 reads: 10 h2 and 10 HTTP/1.1 keep-alive connections of 25.
    for (k, chunk) in ids.chunks(25).enumerate() {
        let reads: Vec<Req> = chunk.iter().map(|id| Req::Get(format!("/api/notes/{id}"))).collect();
        let conn = if k % 2 == 0 { Conn::KeepAlive2 } else { Conn::KeepAlive1 };
        let answers = s.batch("client", &reads, conn).expect("reads");
        for a in &answers {
            assert_eq!(a.status, 200, "{a:?}");
            assert!(a.body.contains("\"server_id\": 2"), "a read not from the replica: {a:?}");
            assert_eq!(a.version, if conn == Conn::KeepAlive2 { "h2" } else { "h1.1" }, "{a:?}");
        }
        let connects: u32 = answers.iter().map(|a| a.connects).sum();
        assert_eq!(connects, 1, "keep-alive batch used {connects} connections");
    }
    // 1,000 static pages, each on a new connection.
    let pages: Vec<Req> = (0..100).map(|_| Req::Get("/".into())).collect();
    let mut per_web = [0usize; 2];
    for _ in 0..10 {
        for a in s.batch("client", &pages, Conn::NewEach).expect("pages") {
            assert_eq!(a.status, 200, "{a:?}");
            let w = if a.body.contains("from web1") {
                0
            } else if a.body.contains("from web2") {
                1
            } else {
                panic!("{a:?}")
            };
            per_web[w] += 1;
        }
    }
    let after = (web_requests(s), web_backend(s, "app"), web_backend(s, "static"), new_flows(s));
    println!(
        "web tier: {} requests ({} /api/, {} static); balanced flows {:?} -> {:?}; static pages per web node {per_web:?}",
        after.0 - before.0,
        after.1 - before.1,
        after.2 - before.2,
        before.3,
        after.3
    );
    assert_eq!(after.0 - before.0, 2000.0);
    assert_eq!(after.1 - before.1, 1000.0);
    assert_eq!(after.2 - before.2, 1000.0);
    let flows: Vec<f64> = after.3.iter().zip(&before.3).map(|(a, b)| a - b).collect();
    let total: f64 = flows.iter().sum();
    // 1,520 connections; a client port reused for a later connection finds its flow still in
    // the connection table (a hit, not a new flow), so a few fewer.
    assert!((1400.0..=1520.0).contains(&total), "{flows:?}");
    for f in &flows {
        assert!((f / total - 0.5).abs() <= 0.05, "web tier share off by more than 10%: {flows:?}");
    }
    let prom_after = wait_for("Prometheus has the web tier's new count", Duration::from_secs(30), || {
        Ok(prom_value(s, prom_q).filter(|v| *v == after.0))
    })
    .expect("prometheus after");
    assert_eq!(prom_after - prom_before, 2000.0);
}

fn zones(s: &Stack) {
    let nmap = |node: &str, target: &str, ports: &str| -> String {
        let mut cmd = s.ns(node).command("nmap");
        cmd.args(["-Pn", "-n", "-sS", "--max-retries", "1", "--host-timeout", "60s", "-T4", "-p", ports, target]);
        capture(&mut cmd).expect("nmap (Debian's nmap, installed by `cargo xtask setup`)")
    };
    let state = |out: &str, port: u16| -> String {
        out.lines()
            .find(|l| l.starts_with(&format!("{port}/tcp")))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or("missing")
            .to_string()
    };
    // From the internet: the VIP's web ports only.
    let drops_before = s.metric_sum("edge", "rampart_fw_packets_total", "verdict=\"rule_deny\"").unwrap();
    let out = nmap("client", VIP, "22,80,443,3306,8443,9100");
    for (port, want) in
        [(22, "filtered"), (80, "open"), (443, "open"), (3306, "filtered"), (8443, "filtered"), (9100, "filtered")]
    {
        assert_eq!(state(&out, port), want, "client → VIP:{port}\n{out}");
    }
    // The attacker is in the blocklist: nothing at all, and the edge counts its drops.
    let out = nmap("attacker", VIP, "80,443");
    for port in [80, 443] {
        assert_eq!(state(&out, port), "filtered", "attacker → VIP:{port}\n{out}");
    }
    let drops = s.metric_sum("edge", "rampart_fw_packets_total", "verdict=\"rule_deny\"").unwrap() - drops_before;
    assert!(drops >= 2.0, "the edge counted {drops} rule drops for the attacker's scan");
    // MySQL: closed to the web tier, open to the application tier.
    assert_eq!(state(&nmap("web1", "10.1.3.31", "3306"), 3306), "filtered", "web1 → db1:3306");
    assert_eq!(state(&nmap("app1", "10.1.3.31", "3306"), 3306), "open", "app1 → db1:3306");
    // The application tier's TLS port: the web tier only.
    assert_eq!(state(&nmap("web1", "10.1.2.21", "8443"), 8443), "open", "web1 → app1:8443");
    assert_eq!(state(&nmap("db1", "10.1.2.21", "8443"), 8443), "filtered", "db1 → app1:8443");
}

/// Names of the alerts Prometheus has firing now.
fn firing(s: &Stack) -> Vec<String> {
    let Ok(out) = s.prometheus("/api/v1/alerts") else { return vec![] };
    let mut v = Vec::new();
    let mut rest = out.as_str();
    while let Some(i) = rest.find("\"alertname\":\"") {
        rest = &rest[i + 13..];
        let name = rest.split('"').next().unwrap_or("").to_string();
        if let Some(j) = rest.find("\"state\":\"") {
            if rest[j + 9..].starts_with("firing") {
                v.push(name);
            }
        }
    }
    v.sort();
    v.dedup();
    v
}

struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// One request of the steady traffic: when its batch started and ended (s), and how it went.
#[derive(Debug, Clone)]
struct Sent {
    from: f64,
    at: f64,
    ok: bool,
    what: String,
}

fn faults(s: &Stack) {
    use std::sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    };
    use std::time::Instant;
    let start = Instant::now();
    let stop = AtomicBool::new(false);
    let sent: Mutex<Vec<Sent>> = Mutex::default();
    let acked: Mutex<Vec<u64>> = Mutex::default();
    let events: Mutex<Vec<(f64, String)>> = Mutex::default();
    let mark = |what: &str| {
        let t = start.elapsed().as_secs_f64();
        println!("{t:6.1}s {what}");
        events.lock().unwrap().push((t, what.to_string()));
    };
    let wait_alert = |name: &str, firing_wanted: bool| {
        let r = wait_for(&format!("alert {name} firing={firing_wanted}"), Duration::from_secs(60), || {
            Ok((firing(s).iter().any(|a| a == name) == firing_wanted).then_some(()))
        });
        match r {
            Ok(()) => mark(&format!("alert {name} {}", if firing_wanted { "firing" } else { "resolved" })),
            Err(e) => panic!("{e}; firing: {:?}", firing(s)),
        }
    };
    std::thread::scope(|sc| {
        sc.spawn(|| {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let reqs: Vec<Req> = (0..5).map(|i| Req::Post("/api/notes".into(), format!("fault {n} {i}"))).collect();
                n += 1;
                let from = start.elapsed().as_secs_f64();
                let answers = s.batch("client", &reqs, Conn::NewEach).expect("writes");
                let at = start.elapsed().as_secs_f64();
                for a in answers {
                    // Acknowledged: a 201 whose whole answer arrived (a node killed mid-answer
                    // leaves a status without the body: in flight, not acknowledged).
                    let id =
                        a.body.split("\"id\": ").nth(1).and_then(|r| r.split(',').next()?.trim().parse::<u64>().ok());
                    let ok = a.status == 201 && a.error.is_empty() && id.is_some();
                    if let (true, Some(id)) = (ok, id) {
                        acked.lock().unwrap().push(id);
                    }
                    let body: String = a.body.trim().chars().take(140).collect();
                    sent.lock().unwrap().push(Sent {
                        from,
                        at,
                        ok,
                        what: format!("write {} {} {body}", a.status, a.error),
                    });
                }
            }
        });
        sc.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let reqs: Vec<Req> = (0..5).map(|_| Req::Get("/".into())).collect();
                let from = start.elapsed().as_secs_f64();
                let answers = s.batch("client", &reqs, Conn::NewEach).expect("pages");
                let at = start.elapsed().as_secs_f64();
                for a in answers {
                    let what = format!("page {} {}", a.status, a.error);
                    sent.lock().unwrap().push(Sent { from, at, ok: a.status == 200 && a.error.is_empty(), what });
                }
            }
        });
        // A failure below stops the traffic threads too (else the scope would wait forever).
        let _stop = StopOnDrop(&stop);
        std::thread::sleep(Duration::from_secs(3));
        mark("kill web1's rampart serve");
        s.kill_serve("web1");
        wait_alert("RampartL4BackendDown", true);
        mark("kill db1 (the primary)");
        s.kill_db("db1");
        wait_alert("RampartMysqlNoPrimary", true);
        mark("promote db2");
        s.promote("db2").expect("promote");
        wait_alert("RampartMysqlNoPrimary", false);
        mark("hang app1 (SIGSTOP)");
        s.hang_app("app1", true).expect("hang");
        wait_alert("RampartBackendDown", true);
        mark("recover: app1 continues, web1's rampart serve starts again");
        s.hang_app("app1", false).expect("continue");
        s.start_serve("web1").expect("restart web1");
        wait_alert("RampartBackendDown", false);
        wait_alert("RampartL4BackendDown", false);
        std::thread::sleep(Duration::from_secs(5));
        mark("end");
    });
    let sent = sent.into_inner().unwrap();
    let acked = acked.into_inner().unwrap();
    let failed: Vec<&Sent> = sent.iter().filter(|x| !x.ok).collect();
    println!("{} requests, {} failed, {} writes acknowledged", sent.len(), failed.len(), acked.len());
    let mut groups: std::collections::BTreeMap<String, (f64, f64, usize)> = Default::default();
    for f in &failed {
        let g = groups.entry(f.what.clone()).or_insert((f.at, f.at, 0));
        g.1 = f.at;
        g.2 += 1;
    }
    for (what, (a, b, n)) in groups {
        println!("  {n:5} × {what}  ({a:.1}s … {b:.1}s)");
    }
    // No acknowledged write is lost (semi-synchronous replication: the promoted replica had
    // every commit the primary acknowledged).
    assert!(acked.len() > 100, "only {} writes were acknowledged", acked.len());
    let ids = acked.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",");
    let found = s.sql("db2", &format!("SELECT COUNT(*) FROM shop.notes WHERE id IN ({ids})")).unwrap();
    assert_eq!(found.trim(), acked.len().to_string(), "acknowledged writes lost");
    // Requests fail only while a fault is being noticed: a dead web node until the edge's
    // checks take it out (interval 1 s, fall 2: 3 s), no primary until the promoted one is
    // found (check interval 500 ms: 2 s after the promotion), a hung application server until
    // the web tier's checks take it out (3 s) plus the requests it held (response_timeout 5 s).
    let events = events.into_inner().unwrap();
    let at = |prefix: &str| events.iter().find(|(_, e)| e.starts_with(prefix)).map(|(t, _)| *t).unwrap();
    let windows = [
        ("web1 lost", at("kill web1"), at("kill web1") + 3.0),
        ("no primary", at("kill db1"), at("promote db2") + 2.0),
        ("app1 hung", at("hang app1"), at("hang app1") + 3.0 + 5.0),
    ];
    for f in &failed {
        assert!(
            windows.iter().any(|(_, a, b)| f.from <= *b && f.at >= *a),
            "a request failed outside every fault's window ({:.1}–{:.1} s): {}; windows {windows:?}",
            f.from,
            f.at,
            f.what
        );
    }
    let tail = at("recover");
    let late: Vec<&&Sent> = failed.iter().filter(|f| f.from > tail).collect();
    assert!(late.is_empty(), "requests failed after recovery: {late:?}");
    println!("events: {events:?}");
}

/// A static page on a new connection, with the certificate it came with: (web node, serial
/// of the site's certificate in lower-case hex), or curl's complaint.
fn page_and_serial(s: &Stack) -> Result<(String, String), String> {
    const CERTS: &str = "\n@@certs@@\n";
    let mut cmd = s.ns("client").command("curl");
    cmd.args(["-sS", "--max-time", "10", "--http1.1", "-H", "Connection: close", "-o", "-"]);
    cmd.args(["-w", &format!("{CERTS}%{{certs}}")]);
    cmd.args(["--resolve", &format!("{SITE}:443:{VIP}"), "--cacert"]).arg(&s.public_ca);
    cmd.arg(format!("https://{SITE}/"));
    let out = capture(&mut cmd).map_err(|e| e.to_string())?;
    let (body, certs) = out.split_once(CERTS).ok_or_else(|| format!("no certificates in {out:?}"))?;
    let web = WEB.iter().find(|w| body.contains(&format!("from {w}"))).ok_or_else(|| format!("page {body:?}"))?;
    // The first certificate of the chain is the site's.
    let serial = certs
        .lines()
        .find_map(|l| l.strip_prefix("Serial Number:"))
        .ok_or_else(|| format!("no serial in {certs:?}"))?;
    Ok((web.to_string(), serial.trim().replace(':', "").to_ascii_lowercase()))
}

/// The attacker, from an address outside the blocklist: (HTTP status) or curl's error.
fn attacker_from(s: &Stack, addr: &str) -> Result<u16, String> {
    s.curl("attacker", "/", &["--interface", addr, "--max-time", "3"]).map(|(code, _)| code).map_err(|e| e.to_string())
}

fn reloads(s: &Stack) {
    use std::sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    };
    let started = std::time::Instant::now();
    let stop = AtomicBool::new(false);
    // (ok, what) of every request of the steady traffic.
    let sent: Mutex<Vec<(bool, String)>> = Mutex::default();
    let record = |answers: Vec<Answer>, want: u16| {
        let mut v = sent.lock().unwrap();
        for a in answers {
            let ok = a.status == want && a.error.is_empty();
            v.push((ok, format!("{} {} {}", a.status, a.error, a.body.trim().chars().take(120).collect::<String>())));
        }
    };
    let new_addr = "198.51.100.30";
    s.ns("attacker").addr("eth0", &format!("{new_addr}/24")).expect("the attacker's new address");
    let deny = |s: &Stack| s.metric_sum("edge", "rampart_fw_rule_packets_total", "action=\"deny\"").unwrap();
    std::thread::scope(|sc| {
        // Static pages and /api/ writes, each on a new connection, and h2 connections that
        // stay open across the reloads (the edge's rules and the web tier's certificate change
        // under them).
        sc.spawn(|| {
            let pages: Vec<Req> = (0..5).map(|_| Req::Get("/".into())).collect();
            while !stop.load(Ordering::Relaxed) {
                record(s.batch("client", &pages, Conn::NewEach).expect("pages"), 200);
            }
        });
        sc.spawn(|| {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let writes: Vec<Req> =
                    (0..5).map(|i| Req::Post("/api/notes".into(), format!("reload {n} {i}"))).collect();
                n += 1;
                record(s.batch("client", &writes, Conn::NewEach).expect("writes"), 201);
            }
        });
        sc.spawn(|| {
            let pages: Vec<Req> = (0..40).map(|_| Req::Get("/".into())).collect();
            while !stop.load(Ordering::Relaxed) {
                record(s.batch("client", &pages, Conn::KeepAlive2).expect("h2 pages"), 200);
            }
        });
        let _stop = StopOnDrop(&stop);
        std::thread::sleep(Duration::from_secs(2));

        // (a) The attacker comes back from an address outside the blocklist and gets through;
        // the operator adds it to the edge's rule file and applies the file again.
        assert_eq!(attacker_from(s, new_addr), Ok(200), "{new_addr} is not in the shipped blocklist");
        let rules = s.dir("edge").join("front.rules.toml");
        let text = std::fs::read_to_string(&rules).unwrap();
        let edited = text.replacen("blocklist = [", &format!("blocklist = [\"{new_addr}/32\", "), 1);
        assert_ne!(text, edited, "front.rules.toml has no blocklist set");
        std::fs::write(rules.with_extension("new"), edited).unwrap();
        std::fs::rename(rules.with_extension("new"), &rules).unwrap();
        let out = s.rampart("edge", &["attach", "--config", "edge.toml"]).expect("rampart attach --config edge.toml");
        println!("edge: rampart attach --config edge.toml:\n{}", out.trim_end());
        let before = deny(s);
        let r = attacker_from(s, new_addr);
        assert!(r.is_err(), "{new_addr} still got an answer after the reload: {r:?}");
        let dropped = deny(s) - before;
        assert!(dropped >= 1.0, "the blocklist rule counted {dropped} packets from {new_addr}");
        println!("edge: {new_addr} blocked by the reloaded rules ({dropped} packets dropped by the blocklist rule)");

        // (b) A renewed certificate on the web tier, then `rampart reload` on each web node.
        let (_, old) = page_and_serial(s).expect("a page before the renewal");
        let new = s.renew_site_certificate().expect("renew the certificate").to_ascii_lowercase();
        assert_ne!(old, new);
        for w in WEB {
            let out = s.reload(w).expect("rampart reload");
            println!("{w}: {}", out.trim());
        }
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..30 {
            let (web, serial) = page_and_serial(s).expect("a page after the renewal");
            assert_eq!(serial, new, "{web} served serial {serial} after the reload (old {old}, new {new})");
            seen.insert(web);
            if seen.len() == WEB.len() {
                break;
            }
        }
        assert_eq!(seen.len(), WEB.len(), "30 connections reached only {seen:?}");
        println!("web tier: the renewed certificate (serial {new}, was {old}) from both web nodes");

        // (c) A second application process on app1, added to its pool.
        s.start_app_worker("app1", "app1-b", "127.0.0.1:8001").expect("start app1-b");
        wait_for("app1-b listening", Duration::from_secs(20), || {
            let mut cmd = s.ns("app1").command("curl");
            cmd.args(["-sS", "--max-time", "2", "http://127.0.0.1:8001/api/health"]);
            Ok(capture(&mut cmd).ok().filter(|b| b.contains("app1-b")).map(|_| ()))
        })
        .expect("app1-b");
        let conf = s.dir("app1").join("app.toml");
        let text = std::fs::read_to_string(&conf).unwrap();
        let edited =
            text.replacen("backends = [\"127.0.0.1:8000\"]", "backends = [\"127.0.0.1:8000\", \"127.0.0.1:8001\"]", 1);
        assert_ne!(text, edited, "app.toml's pool is not as shipped");
        std::fs::write(&conf, edited).unwrap();
        println!("app1: {}", s.reload("app1").expect("rampart reload").trim());
        let new_backend = "pool=\"api\",backend=\"127.0.0.1:8001\"";
        let took = wait_for("requests on app1's new backend", Duration::from_secs(20), || {
            let n =
                s.metric_sum("app1", "rampart_http_backend_requests_total", new_backend).map_err(|e| e.to_string())?;
            let answered = sent.lock().unwrap().iter().filter(|(_, w)| w.contains("\"app\": \"app1-b\"")).count();
            Ok((n >= 5.0 && answered >= 1).then_some((n, answered)))
        })
        .expect("app1-b in the pool");
        println!(
            "app1: the new backend 127.0.0.1:8001 took {} requests ({} writes answered by app1-b)",
            took.0, took.1
        );
        std::thread::sleep(Duration::from_secs(1));
    });
    let sent = sent.into_inner().unwrap();
    let failed: Vec<&(bool, String)> = sent.iter().filter(|(ok, _)| !ok).collect();
    println!(
        "reloads: {} requests under steady traffic in {:.0} s, {} failed",
        sent.len(),
        started.elapsed().as_secs_f64(),
        failed.len()
    );
    assert!(sent.len() >= 100, "only {} requests during the reloads", sent.len());
    assert!(failed.is_empty(), "requests failed during the reloads: {failed:#?}");
}
