//! Backends coming and going: active health checks take a dead backend out and bring it back,
//! connect failures are retried on another backend, timeouts answer 504, passive marking, and
//! balancing across test servers and nginx.

mod serve_support;

use std::{net::SocketAddr, path::PathBuf};

use serve_support::*;

/// rampart.toml with two routes, `/` to pool "web" and `/other` to pool "other", and `pools`.
fn config(s: &Site, listen: SocketAddr, admin: SocketAddr, pools: &str) -> PathBuf {
    s.config(
        listen,
        admin,
        "",
        &format!("[[route]]\npool = \"web\"\n\n[[route]]\npath = \"/other\"\npool = \"other\"\n\n{pools}"),
    )
}

fn get(s: &Site, listen: SocketAddr, path: &str) -> Curl {
    curl_https(listen, "site.test", path, &s.ca_file, &[])
}

fn up(admin: SocketAddr, backend: SocketAddr) -> f64 {
    metric(&http_get(admin, "/metrics"), "rampart_backend_up", &[&format!("backend=\"{backend}\"")])
}

#[test]
fn health_check_takes_dead_backend_out_and_brings_it_back() {
    isolated(|| async {
        let s = Site::new("health");
        let b1 = TestBackend::start("b1", free_addr()).await;
        let b2_addr = free_addr();
        let b2 = TestBackend::start("b2", b2_addr).await;
        let (listen, admin) = (free_addr(), free_addr());
        let cfg = config(
            &s,
            listen,
            admin,
            &format!(
                r#"[[pool]]
name = "web"
backends = ["{}", "{b2_addr}"]
balance = "round-robin"
health = {{ path = "/healthz", interval = "100ms", timeout = "500ms", rise = 2, fall = 2 }}

[[pool]]
name = "other"
backends = ["{}"]
"#,
                b1.addr, b1.addr
            ),
        );
        let d = Daemon::start(&cfg, &s.dir.path("daemon.log"));
        assert!(eventually(50, || b2.state.health_hits.load(std::sync::atomic::Ordering::SeqCst) >= 2).await);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..4 {
            seen.insert(field(&get(&s, listen, "/").body, "backend").to_string());
        }
        assert_eq!(seen.len(), 2, "round-robin over both backends");

        // b2 dies: checks take it down, and every request goes to b1.
        b2.kill();
        drop(b2);
        assert!(eventually(100, || up(admin, b2_addr) == 0.0).await, "{}", d.log_text());
        d.wait_log(&format!("backend {b2_addr}: up -> down (check)"));
        for _ in 0..6 {
            let r = get(&s, listen, "/");
            assert_eq!(r.status, 200, "{r:?}");
            assert_eq!(field(&r.body, "backend"), "b1");
        }

        // b2 comes back on the same address: after `rise` passing checks it takes traffic again.
        let b2 = TestBackend::start("b2", b2_addr).await;
        assert!(eventually(100, || up(admin, b2_addr) == 1.0).await, "{}", d.log_text());
        d.wait_log(&format!("backend {b2_addr}: down -> up (check)"));
        let mut got_b2 = false;
        for _ in 0..4 {
            got_b2 |= field(&get(&s, listen, "/").body, "backend") == "b2";
        }
        assert!(got_b2);

        // A failing status (not a dead server) also counts as a failed check.
        b2.state.health.store(503, std::sync::atomic::Ordering::SeqCst);
        assert!(eventually(100, || up(admin, b2_addr) == 0.0).await, "{}", d.log_text());
        let m = http_get(admin, "/metrics");
        assert!(metric(&m, "rampart_health_checks_failed_total", &[&b2_addr.to_string()]) >= 4.0, "{m}");
    })
}

#[test]
fn retries_on_connect_failure_then_502_503_504() {
    isolated(|| async {
        let s = Site::new("retry");
        let b1 = TestBackend::start("b1", free_addr()).await;
        // Nothing listens on these: connecting is refused.
        let (dead1, dead2) = (free_addr(), free_addr());
        let (listen, admin) = (free_addr(), free_addr());
        let cfg = config(
            &s,
            listen,
            admin,
            &format!(
                r#"[[pool]]
name = "web"
backends = ["{dead1}", "{}"]
retries = 2
response_timeout = "300ms"

[[pool]]
name = "other"
backends = ["{dead1}", "{dead2}"]
retries = 1
"#,
                b1.addr
            ),
        );
        let d = Daemon::start(&cfg, &s.dir.path("daemon.log"));
        for _ in 0..6 {
            let r = get(&s, listen, "/");
            assert_eq!(r.status, 200, "{r:?}\n{}", d.log_text());
            assert_eq!(field(&r.body, "backend"), "b1");
        }
        let m = http_get(admin, "/metrics");
        assert!(metric(&m, "rampart_backend_retries_total", &["pool=\"web\""]) >= 3.0, "{m}");
        assert!(metric(&m, "rampart_backend_connect_errors_total", &[&format!("backend=\"{dead1}\"")]) >= 3.0, "{m}");

        // Every backend refuses: 502 after trying both.
        let r = get(&s, listen, "/other");
        assert_eq!(r.status, 502, "{r:?}");
        assert!(r.body.contains("No backend could be reached"), "{r:?}");
        // A backend that answers too late: 504, and the request is not retried elsewhere.
        let before = b1.hits();
        // Round-robin may try the dead backend first, then b1; either way the answer is 504.
        let r = get(&s, listen, "/slow?ms=2000");
        assert_eq!(r.status, 504, "{r:?}");
        assert!(r.body.contains("did not answer in time"));
        assert_eq!(b1.hits(), before + 1);
    })
}

#[test]
fn passive_marking_drain_and_nginx_backend() {
    isolated(|| async {
        let s = Site::new("passive");
        let nginx_addr = free_addr();
        let Some(_nginx) = Nginx::start(nginx_addr, "nginx-web", false) else {
            panic!("nginx is not installed (apt-get install nginx-light)");
        };
        let b1 = TestBackend::start("b1", free_addr()).await;
        let drained = TestBackend::start("drained", free_addr()).await;
        // Accepts TCP but never answers checks in time... and refuses live traffic: a dead port
        // with checks slow enough that passive marking acts first.
        let dead = free_addr();
        let (listen, admin) = (free_addr(), free_addr());
        let cfg = config(
            &s,
            listen,
            admin,
            &format!(
                r#"[[pool]]
name = "web"
backends = ["{nginx_addr}", "{}", {{ addr = "{}", state = "drain" }}]
balance = "least-conn"

[[pool]]
name = "other"
backends = ["{dead}", "{}"]
health = {{ path = "/healthz", interval = "1h", rise = 1, fall = 2 }}
"#,
                b1.addr, drained.addr, b1.addr
            ),
        );
        let d = Daemon::start(&cfg, &s.dir.path("daemon.log"));

        let mut names = std::collections::HashSet::new();
        for _ in 0..6 {
            let r = get(&s, listen, "/");
            assert_eq!(r.status, 200, "{r:?}");
            names.insert(r.body.lines().next().unwrap_or("").to_string());
            assert!(r.body.contains("xff=127.0.0.1"), "{r:?}");
        }
        assert!(names.contains("nginx-web"), "{names:?}");
        assert!(names.contains("backend=b1"), "{names:?}");
        assert_eq!(drained.hits(), 0, "a drained backend gets no new requests");
        assert_eq!(up(admin, drained.addr), 0.0);

        // Live connect failures (fall = 2) take the dead backend down before any check runs.
        for _ in 0..4 {
            assert_eq!(get(&s, listen, "/other").status, 200);
        }
        d.wait_log(&format!("backend {dead}: up -> down (live traffic)"));
        assert_eq!(up(admin, dead), 0.0);
        let m = http_get(admin, "/metrics");
        let errors = metric(&m, "rampart_backend_connect_errors_total", &[&format!("backend=\"{dead}\"")]);
        for _ in 0..4 {
            assert_eq!(get(&s, listen, "/other").status, 200);
        }
        let m = http_get(admin, "/metrics");
        assert_eq!(
            metric(&m, "rampart_backend_connect_errors_total", &[&format!("backend=\"{dead}\"")]),
            errors,
            "a down backend is not tried"
        );

        // At run time (`rampart backend`): the drained backend back to ready, b1 to maintenance.
        let sock = s.dir.path("control.sock");
        let sock = sock.to_str().unwrap();
        let cli = |args: &[&str]| rampart(&[&["backend", "--control-socket", sock][..], args].concat());
        let out = cli(&["web", &drained.addr.to_string(), "ready"]);
        assert!(out.status.success(), "{out:?}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("is up"), "{out:?}");
        assert_eq!(up(admin, drained.addr), 1.0);
        let out = cli(&["web", &b1.addr.to_string(), "maint"]);
        assert!(out.status.success(), "{out:?}");
        let b1_hits = b1.hits();
        for _ in 0..6 {
            assert_eq!(get(&s, listen, "/").status, 200);
        }
        assert!(drained.hits() > 0, "a backend set ready takes requests");
        assert_eq!(b1.hits(), b1_hits, "a backend in maintenance takes none");
        // Mistakes are refused with what exists, and change nothing.
        let drained_s = drained.addr.to_string();
        for (args, says) in [
            (["nope", "127.0.0.1:1", "drain"], "no pool \"nope\" (pools: web, other)"),
            (["web", "127.0.0.1:1", "drain"], "pool web has no backend \"127.0.0.1:1\""),
            (["web", drained_s.as_str(), "sleep"], "unknown state \"sleep\""),
        ] {
            let out = cli(&args);
            assert!(!out.status.success(), "{out:?}");
            assert!(String::from_utf8_lossy(&out.stderr).contains(says), "{out:?}");
        }
        assert_eq!(up(admin, drained.addr), 1.0);
        // A reload applies the file's states again.
        let out = rampart(&["reload", "--control-socket", sock]);
        assert!(out.status.success(), "{out:?}");
        assert_eq!(up(admin, drained.addr), 0.0);
        // (b1 is in both pools: each reports it up.)
        assert_eq!(up(admin, b1.addr), 2.0);
    })
}

#[test]
fn hash_on_a_header_keeps_a_user_on_one_backend() {
    isolated(|| async {
        let s = Site::new("hash");
        let backends = [
            TestBackend::start("h1", free_addr()).await,
            TestBackend::start("h2", free_addr()).await,
            TestBackend::start("h3", free_addr()).await,
        ];
        let (listen, admin) = (free_addr(), free_addr());
        let list = backends.iter().map(|b| format!("\"{}\"", b.addr)).collect::<Vec<_>>().join(", ");
        let cfg = config(
            &s,
            listen,
            admin,
            &format!(
                "[[pool]]\nname = \"web\"\nbackends = [{list}]\nbalance = \"hash(header:X-User)\"\n\n[[pool]]\nname = \"other\"\nbackends = [{list}]\nbalance = \"p2c\"\n"
            ),
        );
        let _d = Daemon::start(&cfg, &s.dir.path("daemon.log"));
        let mut owners = std::collections::HashSet::new();
        for user in (0..20).map(|n| format!("user{n}")) {
            let header = format!("X-User: {user}");
            let first =
                field(&curl_https(listen, "site.test", "/", &s.ca_file, &["-H", &header]).body, "backend").to_string();
            for _ in 0..2 {
                let again = curl_https(listen, "site.test", "/", &s.ca_file, &["-H", &header, "--http2"]);
                assert_eq!(field(&again.body, "backend"), first, "{user}");
            }
            owners.insert(first);
        }
        assert!(owners.len() >= 2, "20 users all hashed to one of three backends: {owners:?}");
        for _ in 0..6 {
            assert_eq!(curl_https(listen, "site.test", "/other", &s.ca_file, &[]).status, 200);
        }
    })
}
