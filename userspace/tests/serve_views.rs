//! The views of one snapshot against a live daemon: `rampart stats --json`, `status --json`,
//! the control socket's `snapshot` and `/api/snapshot` count requests exactly per backend and
//! status class; `rampart top` runs in a real terminal (tmux) and shows the backends with rates,
//! then quits on `q` with status 0; the status page at `/` is loaded in headless Chromium: it
//! lists the live backends, its request chart moves while traffic runs and is flat without it,
//! the browser fetches nothing but the page, its script and `/api/snapshot` from the admin
//! address, and a screenshot is kept under target/.
//!
//! Needs root (a network namespace per test), tmux and chromium (Debian's, installed by
//! `cargo xtask setup`).

mod serve_support;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use serde_json::Value;
use serve_support::*;

fn two_pools(a: SocketAddr, dead: SocketAddr) -> String {
    format!(
        "[[route]]\npath = \"/a\"\npool = \"pa\"\n\n[[route]]\npath = \"/dead\"\npool = \"pdead\"\n\n\
         [[pool]]\nname = \"pa\"\nbackends = [\"{a}\"]\n\n\
         [[pool]]\nname = \"pdead\"\nbackends = [\"{dead}\"]\n"
    )
}

/// The backend `addr` of pool `pool` in a snapshot's JSON.
fn backend<'a>(snap: &'a Value, pool: &str, addr: SocketAddr) -> &'a Value {
    snap["daemon"]["pools"]
        .as_array()
        .unwrap_or_else(|| panic!("no daemon pools in {snap}"))
        .iter()
        .find(|p| p["name"] == pool)
        .and_then(|p| p["backends"].as_array()?.iter().find(|b| b["addr"] == addr.to_string()))
        .unwrap_or_else(|| panic!("no backend {addr} in pool {pool}: {snap}"))
}

fn json_of(out: &std::process::Output) -> Value {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn stats_status_and_snapshot_count_exactly() {
    isolated(|| async move {
        let site = Site::new("views-stats");
        let (listen, admin, a_addr, dead) = (free_addr(), free_addr(), free_addr(), free_addr());
        let _a = TestBackend::start("a", a_addr).await;
        let cfg = site.config(listen, admin, "", &two_pools(a_addr, dead));
        let _d = Daemon::start(&cfg, &site.dir.path("daemon.log"));
        let sock = site.dir.path("control.sock");
        let sock = sock.to_str().unwrap();

        for _ in 0..6 {
            assert_eq!(curl_https(listen, "site.test", "/a/x", &site.ca_file, &[]).status, 200);
        }
        for _ in 0..2 {
            assert_eq!(curl_https(listen, "site.test", "/a/status?code=404", &site.ca_file, &[]).status, 404);
        }
        assert_eq!(curl_https(listen, "site.test", "/dead/x", &site.ca_file, &[]).status, 502);

        let check = |snap: &Value, what: &str| {
            let a = backend(snap, "pa", a_addr);
            assert_eq!(a["requests"]["2xx"], 6, "{what}: {a}");
            assert_eq!(a["requests"]["4xx"], 2, "{what}: {a}");
            assert_eq!(a["requests"]["5xx"], 0, "{what}: {a}");
            assert_eq!(a["connect_errors"], 0, "{what}: {a}");
            assert_eq!(a["state"], "up", "{what}: {a}");
            let d = backend(snap, "pdead", dead);
            assert_eq!(d["requests"]["5xx"], 0, "{what}: the 502 is the pool's, not the backend's: {d}");
            assert_eq!(d["connect_errors"], 1, "{what}: {d}");
            let routes = snap["daemon"]["routes"].as_array().unwrap();
            let ra = routes.iter().find(|r| r["pool"] == "pa").unwrap();
            assert_eq!(ra["requests"]["200"], 6, "{what}: {ra}");
            assert_eq!(ra["requests"]["404"], 2, "{what}: {ra}");
            let certs = snap["daemon"]["listeners"][0]["certificates"].as_array().unwrap();
            assert_eq!(certs.len(), 2, "{what}: {snap}");
            assert!(
                certs
                    .iter()
                    .all(|c| c["not_after_unix"].as_i64().unwrap() > snap["taken_unix"].as_f64().unwrap() as i64)
            );
            assert!(snap["monotonic_ns"].as_u64().unwrap() > 0);
        };
        let stats = json_of(&rampart(&["stats", "--json", "--control-socket", sock]));
        check(&stats, "stats --json");
        let status = json_of(&rampart(&["status", "--json", "--control-socket", sock]));
        check(&status["snapshot"], "status --json");
        assert!(status["daemon"].as_str().unwrap().contains("pool pa"), "the text status stays: {status}");
        let api: Value = serde_json::from_str(&http_get(admin, "/api/snapshot")).unwrap();
        check(&api, "/api/snapshot");
        // Cumulative: a later snapshot is later on the monotonic clock.
        let again = json_of(&rampart(&["stats", "--json", "--control-socket", sock]));
        assert!(again["monotonic_ns"].as_u64() > stats["monotonic_ns"].as_u64());

        let text = rampart(&["stats", "--control-socket", sock]);
        let text = String::from_utf8_lossy(&text.stdout);
        assert!(text.contains(&format!("{a_addr}")) && text.contains("2xx 6"), "{text}");
        // The text status for curl stays at /, as before the page.
        assert!(http_get(admin, "/").contains(&format!("pool pa")));

        // Without a daemon: kernel figures only, and it says so.
        let none = json_of(&rampart(&["stats", "--json", "--control-socket", "/nonexistent/control.sock"]));
        assert!(none["daemon"].is_null(), "{none}");
    });
}

/// A tmux server of its own (its socket in a scratch directory), killed on drop.
struct Tmux {
    socket: PathBuf,
}

impl Tmux {
    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("tmux (Debian's tmux, installed by cargo xtask setup): {e}"));
        assert!(out.status.success(), "tmux {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux").arg("-S").arg(&self.socket).arg("kill-server").output();
    }
}

#[test]
fn top_in_a_terminal_shows_backends_and_quits_on_q() {
    isolated(|| async move {
        let site = Site::new("views-top");
        let (listen, admin, a_addr, dead) = (free_addr(), free_addr(), free_addr(), free_addr());
        let _a = TestBackend::start("a", a_addr).await;
        let cfg = site.config(listen, admin, "", &two_pools(a_addr, dead));
        let _d = Daemon::start(&cfg, &site.dir.path("daemon.log"));
        let sock = site.dir.path("control.sock");
        for _ in 0..3 {
            assert_eq!(curl_https(listen, "site.test", "/a/x", &site.ca_file, &[]).status, 200);
        }

        // Batch mode: two screens, the second with rates.
        let out =
            rampart(&["top", "--iterations", "2", "--interval", "0.3", "--control-socket", sock.to_str().unwrap()]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(text.matches("rampart top ").count(), 2, "{text}");
        assert!(text.contains("first look") && text.contains("over 0."), "{text}");
        let row = text.lines().rfind(|l| l.starts_with(&a_addr.to_string())).unwrap_or_else(|| panic!("{text}"));
        // No request between the two screens: exactly 0 requests/s, health up.
        assert_eq!(
            row.split_whitespace().collect::<Vec<_>>(),
            [&a_addr.to_string(), "pa", "0.0", "-", "-", "0.0", "up"]
        );

        // A real terminal, 80 columns.
        let tmux = Tmux { socket: site.dir.path("tmux.sock") };
        let done = site.dir.path("top.exit");
        let cmd = format!(
            "{} top --interval 0.5 --control-socket {}; echo $? > {}",
            env!("CARGO_BIN_EXE_rampart"),
            sock.display(),
            done.display()
        );
        tmux.run(&["new-session", "-d", "-s", "top", "-x", "80", "-y", "30", &cmd]);
        let mut pane = String::new();
        // Traffic while it runs; wait (bounded) for a screen with rates and the backends.
        for _ in 0..100 {
            let _ = curl_https(listen, "site.test", "/a/x", &site.ca_file, &[]);
            pane = tmux.run(&["capture-pane", "-p", "-t", "top"]);
            if pane.contains("over 0.") && pane.contains(&a_addr.to_string()) && pane.contains(&dead.to_string()) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(pane.contains("over 0.") && pane.contains(&a_addr.to_string()), "{pane}");
        assert!(pane.contains(&dead.to_string()) && pane.contains("q quits"), "{pane}");
        assert!(pane.lines().all(|l| l.chars().count() <= 80), "{pane}");
        assert!(!done.exists(), "top ended by itself: {pane}");
        tmux.run(&["send-keys", "-t", "top", "q"]);
        let mut code = None;
        for _ in 0..100 {
            if let Ok(c) = std::fs::read_to_string(&done) {
                code = Some(c.trim().to_string());
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(code.as_deref(), Some("0"), "top's exit status after q");
    });
}

/// Chromium in a process group of its own, killed (with its helpers) on drop.
struct Browser(Child);

impl Drop for Browser {
    fn drop(&mut self) {
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

/// Runs headless Chromium on `url` with `args` (virtual time: the page's timers run as fast as
/// its requests allow), bounded by 60 s; its stdout.
fn chromium(profile: &Path, url: &str, args: &[&str]) -> String {
    use std::os::unix::process::CommandExt as _;
    let child = Command::new("chromium")
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(["--disable-background-networking", "--disable-component-update", "--disable-sync"])
        .args(args)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("chromium (Debian's chromium, installed by cargo xtask setup): {e}"));
    let mut b = Browser(child);
    for _ in 0..600 {
        if b.0.try_wait().unwrap().is_some() {
            let mut out = String::new();
            std::io::Read::read_to_string(b.0.stdout.as_mut().unwrap(), &mut out).unwrap();
            return out;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("chromium did not finish within 60 s");
}

/// The `points` of a chart's polyline in a DOM dump, as y values (higher = more).
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
fn status_page_in_headless_chromium() {
    isolated(|| async move {
        let site = Site::new("views-page");
        let (listen, admin, a_addr, dead) = (free_addr(), free_addr(), free_addr(), free_addr());
        let _a = TestBackend::start("a", a_addr).await;
        let cfg = site.config(listen, admin, "", &two_pools(a_addr, dead));
        let d = Daemon::start_logging(&cfg, &site.dir.path("daemon.log"), "info,rampart::serve::admin=debug");
        let url = format!("http://{admin}/");
        let profile = site.dir.path("chromium");

        // Traffic from another thread until told to stop (bounded: 3,000 requests).
        let stop = Arc::new(AtomicBool::new(false));
        let traffic = {
            let (stop, ca) = (stop.clone(), site.ca_file.clone());
            std::thread::spawn(move || {
                for _ in 0..3000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let _ = curl_https(listen, "site.test", "/a/x", &ca, &["--max-time", "5"]);
                }
            })
        };
        // While traffic runs: the page lists both backends, and the request chart shows a rate
        // above zero. Each load polls the snapshot about five times; a load whose polls all fell
        // between two requests shows none, so a few loads are allowed.
        let mut moving = Vec::new();
        let mut last = String::new();
        for _ in 0..8 {
            last = chromium(&profile, &url, &["--dump-dom", "--virtual-time-budget=5000"]);
            let pts = chart(&last, "req");
            if pts.iter().any(|&y| y > 0.5) {
                moving.push(pts);
                if moving.len() == 2 {
                    break;
                }
            }
        }
        assert_eq!(moving.len(), 2, "the request chart never moved while traffic ran:\n{last}");
        assert!(last.contains(&a_addr.to_string()) && last.contains(&dead.to_string()), "{last}");
        assert!(last.contains(">pa<") && last.contains(">pdead<"), "{last}");
        let shot_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
        std::fs::create_dir_all(&shot_dir).unwrap();
        let shot = shot_dir.join("status-page.png");
        let _ = std::fs::remove_file(&shot);
        chromium(
            &profile,
            &url,
            &[&format!("--screenshot={}", shot.display()), "--window-size=1280,1400", "--virtual-time-budget=5000"],
        );
        stop.store(true, Ordering::Relaxed);
        traffic.join().unwrap();
        let png = std::fs::read(&shot).unwrap_or_else(|e| panic!("no screenshot at {}: {e}", shot.display()));
        assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "screenshot {}", shot.display());
        println!("status page screenshot: {}", shot.display());

        // Without traffic, every rate is exactly zero: the chart is flat at the bottom.
        let idle = chromium(&profile, &url, &["--dump-dom", "--virtual-time-budget=4000"]);
        let pts = chart(&idle, "req");
        assert!(pts.len() >= 2 && pts.iter().all(|&y| y.abs() < 1e-6), "{pts:?}\n{idle}");

        // Every request the browser made went to the admin address, for these paths only.
        let log = d.log_text();
        let paths: Vec<&str> = log.lines().filter_map(|l| l.split("admin: GET ").nth(1)).collect();
        assert!(paths.contains(&"/") && paths.contains(&"/status.js") && paths.contains(&"/api/snapshot"), "{log}");
        let unexpected: Vec<&&str> =
            paths.iter().filter(|p| !["/", "/status.js", "/api/snapshot", "/favicon.ico"].contains(p)).collect();
        assert!(unexpected.is_empty(), "unexpected requests: {unexpected:?}");
    });
}
