//! `/metrics` of a live daemon: requests of known kinds (HTTP/1.1 and h2, answered 2xx, 4xx,
//! 5xx, by a dead backend, by no route) show up exactly in the right series per backend, route
//! and status class; latency histograms count what they observed; process figures and build
//! info are there; the classic text passes `promtool check metrics`, and the OpenMetrics text
//! (sent to a scraper that asks for it as Prometheus does) passes the OpenMetrics parser of
//! Python's prometheus_client. Both carry the same figures, and a real Prometheus server
//! (Debian's) scrapes and stores them. The examples in examples/monitoring/ pass promtool and use
//! only exported names; a reload keeps counts.

mod serve_support;

use std::{
    io::Write as _,
    path::PathBuf,
    process::{Command, Stdio},
};

use serve_support::*;

/// The Accept header Prometheus 2.x sends.
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
                                 version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// `promtool`, from Debian's `prometheus` package (installed by `cargo xtask setup`).
fn promtool() -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join("promtool")).find(|p| p.is_file()))
        .unwrap_or_else(|| {
            panic!("promtool not found on PATH: run `cargo xtask setup` (it installs Debian's prometheus package)")
        })
}

/// Runs `program args` with `input` on stdin; returns (success, stdout + stderr).
fn with_stdin(program: &std::path::Path, args: &[&str], input: &str) -> (bool, String) {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {}: {e}", program.display()));
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// `promtool check metrics` finds nothing to say about `text`.
fn assert_promtool_clean(text: &str) {
    let (ok, said) = with_stdin(&promtool(), &["check", "metrics"], text);
    assert!(ok && said.trim().is_empty(), "promtool check metrics: {said}\non:\n{text}");
}

/// The OpenMetrics parser of Python's prometheus_client accepts `text`; it is strict (EOF,
/// `_total`, `le` order, types). Debian's python3-prometheus-client (installed by setup), run by
/// Debian's python3 rather than whatever python3 comes first on PATH.
fn assert_openmetrics_valid(text: &str) {
    let script = "import sys\n\
                  from prometheus_client.openmetrics.parser import text_string_to_metric_families as p\n\
                  n = sum(len(f.samples) for f in p(sys.stdin.read()))\n\
                  print(n)\n";
    let (ok, said) = with_stdin(std::path::Path::new("/usr/bin/python3"), &["-c", script], text);
    assert!(ok, "OpenMetrics parser (python3-prometheus-client; `cargo xtask setup` installs it): {said}\non:\n{text}");
}

fn scrape(admin: std::net::SocketAddr, accept: Option<&str>) -> Curl {
    let h = accept.map(|a| format!("Accept: {a}"));
    let extra: Vec<&str> = h.as_deref().map(|h| vec!["-H", h]).unwrap_or_default();
    let c = curl(&format!("http://{admin}/metrics"), &extra);
    assert_eq!(c.status, 200, "{c:?}");
    c
}

#[test]
fn exact_counts_per_backend_and_both_formats() {
    isolated(|| async move {
        let site = Site::new("metrics-exact");
        let (listen, admin) = (free_addr(), free_addr());
        let (a_addr, b_addr, dead) = (free_addr(), free_addr(), free_addr());
        let _a = TestBackend::start("a", a_addr).await;
        let _b = TestBackend::start("b", b_addr).await;
        let rest = format!(
            "[[route]]\npath = \"/a\"\npool = \"pa\"\n\n[[route]]\npath = \"/b\"\npool = \"pb\"\n\n\
             [[route]]\npath = \"/dead\"\npool = \"pdead\"\n\n\
             [[pool]]\nname = \"pa\"\nbackends = [\"{a_addr}\"]\n\n\
             [[pool]]\nname = \"pb\"\nbackends = [\"{b_addr}\"]\n\n\
             [[pool]]\nname = \"pdead\"\nbackends = [\"{dead}\"]\n"
        );
        let cfg = site.config(listen, admin, "", &rest);
        let _d = Daemon::start(&cfg, &site.dir.path("daemon.log"));

        let get = |path: &str, proto: &str, want: u16| {
            let c = curl_https(listen, "site.test", path, &site.ca_file, &[proto]);
            assert_eq!(c.status, want, "{path} over {proto}: {c:?}");
        };
        // One curl, one client connection, one TLS handshake each: 16 in all.
        for _ in 0..5 {
            get("/a/x", "--http1.1", 200);
        }
        for _ in 0..3 {
            get("/a/status?code=404", "--http1.1", 404);
        }
        for _ in 0..4 {
            get("/b/x", "--http2", 200);
        }
        for _ in 0..2 {
            get("/b/status?code=503", "--http2", 503);
        }
        get("/dead/x", "--http1.1", 502);
        get("/elsewhere", "--http1.1", 404);

        // No Accept header: the classic text format.
        let classic = scrape(admin, None);
        assert_eq!(classic.header("content-type").as_deref(), Some("text/plain; version=0.0.4; charset=utf-8"));
        let m = &classic.body;
        assert!(!m.contains("# EOF"), "{m}");
        let (a, b, d) =
            (format!("backend=\"{a_addr}\""), format!("backend=\"{b_addr}\""), format!("backend=\"{dead}\""));
        let requests = |m: &str, backend: &str, code: &str| {
            metric(m, "rampart_http_backend_requests_total", &[backend, &format!("code=\"{code}\"")])
        };
        for (backend, code, n) in [
            (&a, "2xx", 5.0),
            (&a, "4xx", 3.0),
            (&a, "5xx", 0.0),
            (&a, "1xx", 0.0),
            (&a, "3xx", 0.0),
            (&b, "2xx", 4.0),
            (&b, "5xx", 2.0),
            (&b, "4xx", 0.0),
            // Its connection was refused: no request reached it (the 502 is the pool's).
            (&d, "5xx", 0.0),
        ] {
            assert_eq!(requests(m, backend, code), n, "{backend} {code}:\n{m}");
            // The series exists (a 0 is written, not left out).
            assert!(
                m.lines().any(|l| l.starts_with("rampart_http_backend_requests_total{")
                    && l.contains(backend.as_str())
                    && l.contains(&format!("code=\"{code}\""))),
                "no series for {backend} {code}:\n{m}"
            );
        }
        assert_eq!(metric(m, "rampart_http_backend_requests_total", &["pool=\"pa\""]), 8.0, "{m}");
        assert_eq!(metric(m, "rampart_backend_connect_errors_total", &[&d]), 1.0, "{m}");
        assert_eq!(metric(m, "rampart_http_requests_total", &["pool=\"pdead\"", "status=\"502\""]), 1.0, "{m}");
        assert_eq!(metric(m, "rampart_http_requests_total", &["route=\"-\"", "status=\"404\""]), 1.0, "{m}");
        // Histograms: one observation per request that reached the backend / the route.
        let count = |name: &str, labels: &[&str]| metric(m, &format!("{name}_count"), labels);
        assert_eq!(count("rampart_http_backend_first_byte_duration_seconds", &[&a]), 8.0, "{m}");
        assert_eq!(count("rampart_http_backend_first_byte_duration_seconds", &[&b]), 6.0, "{m}");
        assert_eq!(count("rampart_http_backend_first_byte_duration_seconds", &[&d]), 0.0, "{m}");
        let connects = count("rampart_http_backend_connect_duration_seconds", &[&a]);
        assert!((1.0..=8.0).contains(&connects), "{connects} connects to a:\n{m}");
        assert_eq!(count("rampart_http_backend_connect_duration_seconds", &[&d]), 0.0, "{m}");
        assert_eq!(count("rampart_http_request_duration_seconds", &["route=\"*/a\""]), 8.0, "{m}");
        assert_eq!(count("rampart_http_request_duration_seconds", &["route=\"*/b\""]), 6.0, "{m}");
        assert_eq!(count("rampart_http_request_duration_seconds", &["route=\"*/dead\""]), 1.0, "{m}");
        assert_eq!(count("rampart_tls_handshake_duration_seconds", &[]), 16.0, "{m}");
        assert_eq!(metric(m, "rampart_tls_handshakes_total", &[]), 16.0, "{m}");
        // A bucket's count never exceeds the next one's, and +Inf equals _count.
        let inf = metric(m, "rampart_http_backend_first_byte_duration_seconds_bucket", &[&a, "le=\"+Inf\""]);
        assert_eq!(inf, 8.0, "{m}");
        assert!(metric(m, "rampart_http_request_duration_seconds_sum", &["route=\"*/a\""]) > 0.0, "{m}");

        // Process figures and build info.
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        let start = metric(m, "process_start_time_seconds", &[]);
        assert!(start > now - 600.0 && start <= now + 1.0, "start {start}, now {now}");
        assert!(metric(m, "process_open_fds", &[]) >= 5.0, "{m}");
        assert!(metric(m, "process_resident_memory_bytes", &[]) > 1e6, "{m}");
        assert!(metric(m, "process_max_fds", &[]) >= metric(m, "process_open_fds", &[]), "{m}");
        assert!(m.contains("# TYPE process_cpu_seconds_total counter"), "{m}");
        let version = String::from_utf8(rampart(&["--version"]).stdout).unwrap();
        let version = version.trim().strip_prefix("rampart ").expect("rampart --version starts with rampart");
        assert_eq!(metric(m, "rampart_build_info", &[&format!("version=\"{version}\"")]), 1.0, "{m}");

        assert_promtool_clean(m);

        // As Prometheus asks: OpenMetrics, with the same figures.
        let om = scrape(admin, Some(PROMETHEUS_ACCEPT));
        assert_eq!(
            om.header("content-type").as_deref(),
            Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
        );
        let o = &om.body;
        assert!(o.ends_with("# EOF\n"), "{o}");
        assert!(o.contains("# TYPE rampart_http_backend_requests counter\n"), "{o}");
        assert!(o.contains("# UNIT rampart_http_request_duration_seconds seconds\n"), "{o}");
        assert_openmetrics_valid(o);
        for (backend, code, n) in [(&a, "2xx", 5.0), (&a, "4xx", 3.0), (&b, "2xx", 4.0), (&b, "5xx", 2.0)] {
            assert_eq!(requests(o, backend, code), n, "{backend} {code}:\n{o}");
        }
        assert_eq!(metric(o, "rampart_tls_handshake_duration_seconds_count", &[]), 16.0, "{o}");
        assert_eq!(metric(o, "rampart_build_info", &[&format!("version=\"{version}\"")]), 1.0, "{o}");

        // A scraper that names only the classic format gets it.
        let plain = scrape(admin, Some("text/plain;version=0.0.4"));
        assert!(plain.header("content-type").unwrap_or_default().starts_with("text/plain; version=0.0.4"));
        assert_promtool_clean(&plain.body);
    });
}

/// examples/monitoring/.
fn examples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/monitoring")
}

fn promtool_in(dir: &std::path::Path, args: &[&str]) {
    let out = Command::new(promtool()).args(args).current_dir(dir).output().expect("run promtool");
    assert!(
        out.status.success(),
        "promtool {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The alert rules are valid, and their unit tests (each alert fires on a series that should
/// trigger it, stays silent on one that should not) pass; the scrape config is valid.
#[test]
fn example_rules_and_scrape_config_pass_promtool() {
    let dir = examples_dir();
    promtool_in(&dir, &["check", "rules", "rampart.rules.yml"]);
    promtool_in(&dir, &["test", "rules", "rampart.rules.test.yml"]);
    promtool_in(&dir, &["check", "config", "prometheus.yml"]);
}

/// Every PromQL expression of the Grafana dashboard, with its variables filled in.
fn dashboard_exprs() -> Vec<String> {
    let text = std::fs::read_to_string(examples_dir().join("grafana-dashboard.json")).expect("read dashboard");
    let d: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().into_iter().flatten() {
            let e = t["expr"].as_str().expect("expr");
            out.push(e.replace("$__rate_interval", "5m").replace("$instance", ".*"));
        }
    }
    assert!(out.len() > 10, "{out:?}");
    out
}

/// Metric names (`rampart_*`, `process_*`) an expression or rule file mentions.
fn names_in(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let b = text.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    let mut i = 0;
    while i < b.len() {
        if ident(b[i]) && (i == 0 || !ident(b[i - 1])) {
            let start = i;
            while i < b.len() && ident(b[i]) {
                i += 1;
            }
            let w = &text[start..i];
            if (w.starts_with("rampart_") || w.starts_with("process_")) && !w.contains(':') {
                out.push(w.to_string());
            }
        } else {
            i += 1;
        }
    }
    out
}

/// The dashboard's expressions parse (checked by promtool as recording rules), and every metric
/// the dashboard and the alert rules use is one the daemon exports, so a renamed metric cannot
/// leave them silently empty. The MySQL router's metrics are the exception until it lands.
#[test]
fn example_dashboard_and_rules_use_exported_metrics() {
    let exprs = dashboard_exprs();
    let tmp = TestDir::new("dashboard-rules");
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in exprs.iter().enumerate() {
        rules.push_str(&format!("      - record: dashboard:expr{i}\n        expr: {}\n", serde_json::json!(e)));
    }
    tmp.write("dashboard.rules.yml", &rules);
    promtool_in(&tmp.0, &["check", "rules", "dashboard.rules.yml"]);

    let rules = std::fs::read_to_string(examples_dir().join("rampart.rules.yml")).unwrap();
    let mut used: Vec<String> = exprs.iter().flat_map(|e| names_in(e)).collect();
    used.extend(names_in(&rules));
    used.sort();
    used.dedup();
    assert!(used.len() >= 20, "{used:?}");
    // Exported by the MySQL router (issue 14's names, see examples/monitoring/README.md).
    const PENDING: [&str; 0] = [];

    isolated(move || async move {
        let site = Site::new("metrics-names");
        let (listen, admin, backend) = (free_addr(), free_addr(), free_addr());
        let _b = TestBackend::start("b", backend).await;
        let cfg = site.config(listen, admin, "", &one_pool(backend));
        let _d = Daemon::start(&cfg, &site.dir.path("daemon.log"));
        let m = scrape(admin, None).body;
        let families: Vec<&str> = m.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next()).collect();
        let histograms: Vec<&str> =
            m.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" histogram")).collect();
        for name in &used {
            let exported = families.contains(&name.as_str())
                || ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|s| name.strip_suffix(s).is_some_and(|base| histograms.contains(&base)));
            assert!(
                exported || PENDING.contains(&name.as_str()),
                "{name} is used by examples/monitoring but the daemon does not export it; families: {families:?}"
            );
        }
    });
}

/// A reload keeps the counts of the backends and routes that stay (no reset for `rate()` to
/// see), and the series of a backend the new configuration drops leave `/metrics`.
#[test]
fn reload_keeps_counts_and_retires_removed_backends() {
    isolated(|| async move {
        let site = Site::new("metrics-reload");
        let (listen, admin) = (free_addr(), free_addr());
        let (a_addr, b_addr) = (free_addr(), free_addr());
        let _a = TestBackend::start("a", a_addr).await;
        let _b = TestBackend::start("b", b_addr).await;
        let pools = |backends: &str| {
            format!(
                "[[route]]\npath = \"/a\"\npool = \"pa\"\n\n[[route]]\npath = \"/b\"\npool = \"pb\"\n\n\
                 [[pool]]\nname = \"pa\"\nbackends = [\"{a_addr}\"]\n\n[[pool]]\nname = \"pb\"\nbackends = [{backends}]\n"
            )
        };
        let cfg = site.config(listen, admin, "", &pools(&format!("\"{b_addr}\"")));
        let d = Daemon::start(&cfg, &site.dir.path("daemon.log"));
        let get = |path: &str| {
            let c = curl_https(listen, "site.test", path, &site.ca_file, &["--http1.1"]);
            assert_eq!(c.status, 200, "{path}: {c:?}");
        };
        for _ in 0..3 {
            get("/a/x");
            get("/b/x");
        }
        let (a, b) = (format!("backend=\"{a_addr}\""), format!("backend=\"{b_addr}\""));
        let requests = |m: &str, backend: &str| metric(m, "rampart_http_backend_requests_total", &[backend]);

        // pb loses its backend b (to a); pa keeps a.
        site.dir.replace("rampart.toml", &site.config_text(listen, admin, "", &pools(&format!("\"{a_addr}\""))));
        let sock = site.dir.path("control.sock");
        let out = rampart(&["reload", "--control-socket", sock.to_str().unwrap()]);
        assert!(out.status.success(), "reload: {}", String::from_utf8_lossy(&out.stderr));
        d.wait_log("configuration reloaded");
        get("/a/x");
        get("/b/x");
        let m = scrape(admin, None).body;
        assert_eq!(metric(&m, "rampart_http_backend_requests_total", &["pool=\"pa\"", &a]), 4.0, "{m}");
        assert_eq!(metric(&m, "rampart_http_backend_requests_total", &["pool=\"pb\"", &a]), 1.0, "{m}");
        assert!(!m.contains(&b), "backend b left pb, yet its series stay:\n{m}");
        assert_eq!(requests(&m, &a), 5.0, "{m}");
        assert_eq!(metric(&m, "rampart_http_request_duration_seconds_count", &["route=\"*/a\""]), 4.0, "{m}");
        assert_eq!(metric(&m, "rampart_http_request_duration_seconds_count", &["route=\"*/b\""]), 4.0, "{m}");
        assert_promtool_clean(&m);
    });
}

/// `[admin] latency_histograms = false`: requests are counted, no histogram is written; a
/// reload that turns them on times only the requests after it.
#[test]
fn latency_histograms_switch_off_and_on_by_reload() {
    isolated(|| async move {
        let site = Site::new("metrics-nohist");
        let (listen, admin, backend) = (free_addr(), free_addr(), free_addr());
        let _b = TestBackend::start("b", backend).await;
        let text = site.config_text(listen, admin, "", &one_pool(backend));
        let off = text.replacen("drain_timeout = \"5s\"\n", "drain_timeout = \"5s\"\nlatency_histograms = false\n", 1);
        assert_ne!(off, text);
        let cfg = site.dir.write("rampart.toml", &off);
        let d = Daemon::start(&cfg, &site.dir.path("daemon.log"));
        let get = || {
            let c = curl_https(listen, "site.test", "/x", &site.ca_file, &["--http1.1"]);
            assert_eq!(c.status, 200, "{c:?}");
        };
        for _ in 0..3 {
            get();
        }
        let b = format!("backend=\"{backend}\"");
        let m = scrape(admin, None).body;
        assert_eq!(metric(&m, "rampart_http_backend_requests_total", &[&b, "code=\"2xx\""]), 3.0, "{m}");
        assert!(!m.contains("_duration_seconds"), "histograms are off, yet:\n{m}");
        assert_promtool_clean(&m);

        site.dir.replace("rampart.toml", &text);
        let sock = site.dir.path("control.sock");
        let out = rampart(&["reload", "--control-socket", sock.to_str().unwrap()]);
        assert!(out.status.success(), "reload: {}", String::from_utf8_lossy(&out.stderr));
        d.wait_log("configuration reloaded");
        get();
        let m = scrape(admin, None).body;
        assert_eq!(metric(&m, "rampart_http_backend_requests_total", &[&b, "code=\"2xx\""]), 4.0, "{m}");
        assert_eq!(metric(&m, "rampart_http_request_duration_seconds_count", &[]), 1.0, "{m}");
        assert_eq!(metric(&m, "rampart_http_backend_first_byte_duration_seconds_count", &[&b]), 1.0, "{m}");
        assert_promtool_clean(&m);
    });
}

/// A Prometheus server (Debian's, from the package setup installs), killed on drop.
struct PrometheusServer(std::process::Child);

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The value of the one series a PromQL query returns, if it returns one.
fn query_one(prom: std::net::SocketAddr, q: &str) -> Option<String> {
    let c = curl(&format!("http://{prom}/api/v1/query"), &["--get", "--data-urlencode", &format!("query={q}")]);
    let v: serde_json::Value = serde_json::from_str(&c.body).ok()?;
    let r = v["data"]["result"].as_array()?;
    (r.len() == 1).then(|| r[0]["value"][1].as_str().map(str::to_string)).flatten()
}

/// A real Prometheus scrapes the daemon, negotiates OpenMetrics (its metadata shows what only
/// OpenMetrics carries) and stores the figures: the target is up with no scrape error, and the
/// per-backend counter reads what was sent.
#[test]
fn real_prometheus_scrapes_the_daemon() {
    let prometheus = std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join("prometheus")).find(|p| p.is_file()))
        .unwrap_or_else(|| panic!("prometheus not found on PATH: run `cargo xtask setup` (Debian's prometheus)"));
    isolated(move || async move {
        let site = Site::new("metrics-prometheus");
        let (listen, admin, backend, prom) = (free_addr(), free_addr(), free_addr(), free_addr());
        let _b = TestBackend::start("b", backend).await;
        let cfg = site.config(listen, admin, "", &one_pool(backend));
        let _d = Daemon::start(&cfg, &site.dir.path("daemon.log"));
        for _ in 0..3 {
            let c = curl_https(listen, "site.test", "/x", &site.ca_file, &[]);
            assert_eq!(c.status, 200, "{c:?}");
        }
        let conf = site.dir.write(
            "prometheus.yml",
            &format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: rampart\n    static_configs:\n      - targets: [\"{admin}\"]\n"
            ),
        );
        let log = std::fs::File::create(site.dir.path("prometheus.log")).unwrap();
        let _p = PrometheusServer(
            Command::new(prometheus)
                .arg(format!("--config.file={}", conf.display()))
                .arg(format!("--storage.tsdb.path={}", site.dir.path("tsdb").display()))
                .arg(format!("--web.listen-address={prom}"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("start prometheus"),
        );
        let q = format!("rampart_http_backend_requests_total{{backend=\"{backend}\",code=\"2xx\"}}");
        let stored = eventually(300, || query_one(prom, &q).as_deref() == Some("3")).await;
        let targets = curl(&format!("http://{prom}/api/v1/targets"), &[]).body;
        assert!(
            stored,
            "Prometheus never stored 3 for {q}; targets: {targets}\nits log:\n{}",
            std::fs::read_to_string(site.dir.path("prometheus.log")).unwrap_or_default()
        );
        assert_eq!(query_one(prom, "up{job=\"rampart\"}").as_deref(), Some("1"), "{targets}");
        assert!(targets.contains("\"lastError\":\"\""), "{targets}");
        // Metadata only OpenMetrics carries (an `info` type, a UNIT): Prometheus asked for it and
        // got it.
        let meta = curl(&format!("http://{prom}/api/v1/metadata"), &[]).body;
        assert!(meta.contains("\"rampart_build\":[{\"type\":\"info\""), "{meta}");
        assert!(meta.contains("\"unit\":\"seconds\""), "{meta}");
        let version = String::from_utf8(rampart(&["--version"]).stdout).unwrap();
        let version = version.trim().strip_prefix("rampart ").unwrap().to_string();
        assert_eq!(
            query_one(prom, &format!("rampart_build_info{{version=\"{version}\"}}")).as_deref(),
            Some("1"),
            "{targets}"
        );
        assert_eq!(
            query_one(
                prom,
                &format!("rampart_http_backend_first_byte_duration_seconds_count{{backend=\"{backend}\"}}")
            )
            .as_deref(),
            Some("3")
        );
    });
}
