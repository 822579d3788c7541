//! Changes while serving: certificate files replaced under load, config reloads (good and
//! bad, through `rampart reload` and SIGHUP), graceful shutdown, and `rampart check-config`.

mod serve_support;

use std::{net::SocketAddr, os::unix::fs::PermissionsExt, process::Command, time::Duration};

use serve_support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// LINE:COLUMN (from 1) where `needle` first appears in `text`: where an error about that
/// value must point.
fn at(text: &str, needle: &str) -> String {
    let i = text.find(needle).unwrap_or_else(|| panic!("{needle} not in the config"));
    let line = text[..i].matches('\n').count() + 1;
    let col = i - text[..i].rfind('\n').map_or(0, |n| n + 1) + 1;
    format!("{line}:{col}")
}

fn subject(addr: SocketAddr, ca: &std::path::Path) -> String {
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &addr.to_string(), "-servername", "site.test", "-CAfile"])
        .arg(ca)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.lines().find(|l| l.starts_with("subject=")).unwrap_or("").to_string()
}

#[test]
fn certificate_hot_reload_under_load_without_failures() {
    isolated(|| async {
        let s = Site::new("certreload");
        let b1 = TestBackend::start("b1", free_addr()).await;
        let (listen, admin) = (free_addr(), free_addr());
        let cfg = s.config(listen, admin, "", &one_pool(b1.addr));
        let d = Daemon::start(&cfg, &s.dir.path("daemon.log"));
        assert_eq!(subject(listen, &s.ca_file), "subject=CN = site.test");

        // Keep-alive load (h2load, h2) and new handshakes (curl, one connection per request) run
        // while the certificate and key files are replaced, one after the other.
        let url = format!("https://127.0.0.1:{}/load", listen.port());
        let load = std::thread::spawn(move || {
            Command::new("h2load").args(["-n", "8000", "-c", "2", "-m", "2", "--rps", "1000", &url]).output().unwrap()
        });
        let handshakes = {
            let ca = s.ca_file.clone();
            std::thread::spawn(move || {
                (0..40).map(|_| curl_https(listen, "site.test", "/hs", &ca, &[]).status).collect::<Vec<u16>>()
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (cert, key) = s.ca.leaf("site.test v2", &["site.test", "127.0.0.1"]);
        // A broken certificate first: logged, the last good one stays.
        s.dir.replace("site.pem", "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n");
        d.wait_log("keeping the last good certificate");
        s.dir.replace("site.pem", &cert);
        s.dir.replace("site.key", &key);
        d.wait_log("reloaded");
        let reloaded_during_load = !load.is_finished();

        let out = load.join().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("8000 succeeded, 0 failed, 0 errored, 0 timeout"), "{text}\n{}", d.log_text());
        let statuses = handshakes.join().unwrap();
        assert!(statuses.iter().all(|&st| st == 200), "{statuses:?}");
        assert!(reloaded_during_load, "the load run ended before the reload; make it longer");
        assert_eq!(subject(listen, &s.ca_file), "subject=CN = site.test v2");
        let m = http_get(admin, "/metrics");
        assert!(metric(&m, "rampart_tls_cert_expiry_seconds", &[]) > 0.0, "{m}");
    })
}

#[test]
fn config_reload_applies_good_and_refuses_bad() {
    isolated(|| async {
        let s = Site::new("cfgreload");
        let b1 = TestBackend::start("b1", free_addr()).await;
        let b2 = TestBackend::start("b2", free_addr()).await;
        let (listen, admin) = (free_addr(), free_addr());
        let pools = |backend: SocketAddr, state: &str| {
            format!(
                "[[route]]\npool = \"web\"\n\n[[pool]]\nname = \"web\"\nbackends = [{{ addr = \"{backend}\", state = \"{state}\" }}]\n"
            )
        };
        let cfg = s.dir.write("rampart.toml", &s.config_text(listen, admin, "", &pools(b1.addr, "ready")));
        let d = Daemon::start(&cfg, &s.dir.path("daemon.log"));
        let sock = s.dir.path("control.sock");
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let sock_s = sock.to_str().unwrap();
        assert_eq!(field(&curl_https(listen, "site.test", "/", &s.ca_file, &[]).body, "backend"), "b1");

        // A request in flight across a reload finishes on the old configuration.
        let slow = {
            let ca = s.ca_file.clone();
            std::thread::spawn(move || curl_https(listen, "site.test", "/slow?ms=1500", &ca, &[]))
        };
        assert!(eventually(50, || b1.hits() >= 2).await);
        // The new file also adds a listener (the redirect).
        let redirect = free_addr();
        let with_redirect = format!("redirect_http = \"{redirect}\"\n{}", pools(b2.addr, "ready"));
        s.dir.replace("rampart.toml", &s.config_text(listen, admin, "", &with_redirect));
        let out = rampart(&["reload", "--control-socket", sock_s]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains("configuration reloaded"));
        assert_eq!(field(&curl_https(listen, "site.test", "/", &s.ca_file, &[]).body, "backend"), "b2");
        let r = curl(&format!("http://127.0.0.1:{}/x", redirect.port()), &[]);
        assert_eq!(r.status, 301, "{r:?}");
        let r = slow.join().unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(field(&r.body, "backend"), "b1");

        // A bad file is refused with its location; the running config stays.
        let bad = s
            .config_text(listen, admin, "", &pools(b1.addr, "ready"))
            .replace("pool = \"web\"\n\n", "pool = \"nope\"\n\n");
        s.dir.replace("rampart.toml", &bad);
        let out = rampart(&["reload", "--control-socket", sock_s]);
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("{}:{}: unknown pool \"nope\"", cfg.display(), at(&bad, "\"nope\""))), "{err}");
        assert_eq!(field(&curl_https(listen, "site.test", "/", &s.ca_file, &[]).body, "backend"), "b2");
        // The same through SIGHUP.
        d.signal(libc::SIGHUP);
        assert!(eventually(50, || d.count_log("reload refused") >= 2).await, "{}", d.log_text());
        assert_eq!(field(&curl_https(listen, "site.test", "/", &s.ca_file, &[]).body, "backend"), "b2");

        // A good file through SIGHUP: the backend in maintenance leaves the pool empty: 503.
        s.dir.replace("rampart.toml", &s.config_text(listen, admin, "", &pools(b2.addr, "maint")));
        d.signal(libc::SIGHUP);
        assert!(eventually(50, || d.count_log("configuration reloaded") >= 2).await, "{}", d.log_text());
        let r = curl_https(listen, "site.test", "/", &s.ca_file, &[]);
        assert_eq!(r.status, 503, "{r:?}");
        let m = http_get(admin, "/metrics");
        assert_eq!(metric(&m, "rampart_config_reloads_total", &["result=\"ok\""]), 2.0, "{m}");
        assert_eq!(metric(&m, "rampart_config_reloads_total", &["result=\"error\""]), 2.0, "{m}");
    })
}

#[test]
fn graceful_shutdown_finishes_requests_in_flight() {
    isolated(|| async {
        let s = Site::new("shutdown");
        let b1 = TestBackend::start("b1", free_addr()).await;
        let (listen, admin) = (free_addr(), free_addr());
        let cfg = s.config(listen, admin, "", &one_pool(b1.addr));
        let mut d = Daemon::start(&cfg, &s.dir.path("daemon.log"));
        let slow: Vec<_> = ["--http1.1", "--http2"]
            .into_iter()
            .map(|proto| {
                let ca = s.ca_file.clone();
                std::thread::spawn(move || curl_https(listen, "site.test", "/slow?ms=1500", &ca, &[proto]))
            })
            .collect();
        assert!(eventually(50, || b1.hits() >= 2).await);
        // A keep-alive connection, idle between requests: shutdown closes it (close_notify, FIN)
        // rather than leaving it to the idle timeout, or the drain would wait for it.
        let mut idle = tls_client(tokio::net::TcpStream::connect(listen).await.unwrap(), "site.test", &s.ca.pem).await;
        idle.write_all(b"GET /idle HTTP/1.1\r\nHost: site.test\r\n\r\n").await.unwrap();
        let mut first = [0u8; 15];
        idle.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"HTTP/1.1 200 OK");
        assert!(eventually(50, || b1.hits() >= 3).await);
        d.signal(libc::SIGTERM);
        d.wait_log("shutting down");
        // No new connections once shutdown began.
        assert!(eventually(20, || std::net::TcpStream::connect(listen).is_err()).await);
        for t in slow {
            let r = t.join().unwrap();
            assert_eq!(r.status, 200, "{r:?}\n{}", d.log_text());
            assert_eq!(field(&r.body, "path"), "/slow");
        }
        let rest = read_to_close(&mut idle).await.expect("the idle connection is closed at shutdown");
        assert!(
            rest.contains("path=/idle") && !rest.contains("HTTP/1.1 "),
            "the rest of the first answer only: {rest}"
        );
        let status = d.wait_exit();
        assert!(status.success(), "{status:?}\n{}", d.log_text());
        assert!(d.log_text().contains("all connections finished"), "{}", d.log_text());
        assert!(!s.dir.path("control.sock").exists());
    })
}

#[test]
fn check_config_reports_locations_and_what_serve_does_not_apply() {
    let s = Site::new("checkcfg");
    let good = s.config_text(free_addr(),
        free_addr(), "",
        "[[route]]\npool = \"web\"\n\n[[pool]]\nname = \"web\"\nbackends = [\"127.0.0.1:9\"]\n\n[[interface]]\nname = \"eth0\"\n",
    );
    let path = s.dir.write("good.toml", &good);
    let out = rampart(&["check-config", path.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(": OK: 1 https listener(s), 1 route(s), 1 pool(s)"), "{stdout}");
    assert!(stdout.contains("not applied by `rampart serve`") && stdout.contains("[[interface]]"), "{stdout}");

    // Several errors at once, each FILE:LINE:COL.
    let bad = good
        .replace("pool = \"web\"\n\n", "pool = \"web2\"\n\n")
        .replace("backends = [\"127.0.0.1:9\"]", "backends = [\"127.0.0.1:9\"]\nconnect_timeout = \"3 weeks\"");
    let path = s.dir.write("bad.toml", &bad);
    let out = rampart(&["check-config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:{}: invalid duration \"3 weeks\"", path.display(), at(&bad, "\"3 weeks\""))),
        "{err}"
    );

    let bad = good.replace("pool = \"web\"\n\n", "pool = \"web2\"\n\n");
    let path = s.dir.write("bad2.toml", &bad);
    let out = rampart(&["check-config", path.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{}:{}: unknown pool \"web2\"", path.display(), at(&bad, "\"web2\""))), "{err}");

    // A missing key file is reported where the config names it.
    let bad = good.replace("key = \"site.key\"", "key = \"missing.key\"");
    let path = s.dir.write("bad3.toml", &bad);
    let out = rampart(&["check-config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:{}:", path.display(), at(&bad, "\"missing.key\"")))
            && err.contains("missing.key: cannot read"),
        "{err}"
    );

    // The documented example at the repository root parses (its files are not on this machine).
    let example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../rampart.example.toml")).unwrap();
    rampart::config::Config::parse(&example, std::path::Path::new("rampart.example.toml")).unwrap();
}
