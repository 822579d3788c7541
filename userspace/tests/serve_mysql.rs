//! The MySQL router of `rampart serve` against real MariaDB from Debian: a primary and a GTID
//! replica started by the test on its own network namespace's loopback (one data directory is
//! initialised once per test binary and copied for each server), with clients that users run
//! (`mariadb`, sysbench) and the `mysql` crate for sessions held across changes.

mod serve_support;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use mysql::prelude::Queryable;
use serve_support::*;

/// One data directory made by mariadb-install-db, copied for every server of this test binary
/// (install-db takes seconds; a copy, milliseconds). Removed when the test binary exits.
fn template() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("rampart-mariadb-template-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        extern "C" fn remove_template() {
            let dir = std::env::temp_dir().join(format!("rampart-mariadb-template-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(dir);
        }
        // SAFETY: registers a plain function that only removes a directory, run at exit.
        unsafe { libc::atexit(remove_template) };
        mariadb_lab::install(&dir.join("data")).unwrap();
        dir.join("data")
    })
}

/// A mariadbd process on 127.0.0.1 of the test's namespace (a free port); killed on drop.
struct Mariadb(mariadb_lab::Server);

impl Mariadb {
    fn start(base: &TestDir, name: &str, server_id: u32, tls: (&Path, &Path)) -> Mariadb {
        let addr = free_addr();
        let mut opts = mariadb_lab::Options::new(name, &base.path(name), addr.ip(), addr.port(), server_id);
        opts.tls = Some((tls.0.to_path_buf(), tls.1.to_path_buf()));
        Mariadb(mariadb_lab::Server::start(template(), &opts).unwrap_or_else(|e| panic!("{e}")))
    }

    fn addr(&self) -> SocketAddr {
        self.0.addr()
    }

    /// Runs SQL as root over the server's own socket (not through rampart).
    fn sql(&self, q: &str) -> String {
        self.0.try_sql(q).unwrap_or_else(|e| panic!("{e}"))
    }

    fn kill(&mut self) {
        self.0.kill();
    }
}

impl std::ops::Deref for Mariadb {
    type Target = mariadb_lab::Server;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

/// A primary, a GTID replica, and rampart in front of them.
struct Cluster {
    // Dropped in this order: the daemon, the servers, then their files.
    daemon: Daemon,
    primary: Mariadb,
    replica: Mariadb,
    dir: TestDir,
    ca: PathBuf,
    rw: SocketAddr,
    ro: SocketAddr,
    admin: SocketAddr,
}

const GRACE: &str = "1s";

impl Cluster {
    fn config(&self, rw: SocketAddr, ro: SocketAddr, servers: &[SocketAddr]) -> String {
        cluster_config(&self.dir, self.admin, rw, ro, servers)
    }

    fn start(name: &str) -> Cluster {
        let dir = TestDir::new(name);
        let ca = Ca::new("rampart mysql test CA");
        let ca_file = dir.write("ca.pem", &ca.pem);
        let (cert, key) = ca.write_leaf(&dir, "db", "db.test", &["db.test", "127.0.0.1"]);
        let primary = Mariadb::start(&dir, "primary", 1, (&cert, &key));
        let replica = Mariadb::start(&dir, "replica", 2, (&cert, &key));
        // Users are made on the primary only: replication brings them to the replica. The app
        // user has no privilege that writes through read_only.
        primary.sql(
            "CREATE USER 'app'@'%' IDENTIFIED BY 'apppw'; \
             GRANT SELECT, INSERT, UPDATE, DELETE, CREATE, DROP, INDEX, ALTER ON *.* TO 'app'@'%'; \
             CREATE USER 'mon'@'%' IDENTIFIED BY 'monpw'; \
             GRANT PROCESS, REPLICATION CLIENT, SLAVE MONITOR ON *.* TO 'mon'@'%'; \
             CREATE USER 'repl'@'%' IDENTIFIED BY 'replpw'; GRANT REPLICATION SLAVE ON *.* TO 'repl'@'%'; \
             CREATE DATABASE t; CREATE TABLE t.w (id INT AUTO_INCREMENT PRIMARY KEY, v INT NOT NULL);",
        );
        replica.replicate_from(primary.addr(), "repl", "replpw").unwrap();
        wait_caught_up(&primary, &replica);
        dir.write("mon.pass", "monpw\n");
        let (rw, ro, admin) = (free_addr(), free_addr(), free_addr());
        let text = cluster_config(&dir, admin, rw, ro, &[primary.addr(), replica.addr()]);
        let cfg = dir.write("rampart.toml", &text);
        let daemon = Daemon::start(&cfg, &dir.path("daemon.log"));
        let c = Cluster { daemon, primary, replica, dir, ca: ca_file, rw, ro, admin };
        // Ready: the primary found and the replica in the read pool.
        c.wait_metric("rampart_mysql_server_up", &c.replica.addr(), 1.0);
        c.wait_metric("rampart_mysql_server_up", &c.primary.addr(), 1.0);
        c
    }

    /// Waits (bounded: 20 s) until `/metrics` shows `value` for `name` of `server`.
    fn wait_metric(&self, name: &str, server: &SocketAddr, value: f64) {
        let label = format!("server=\"{server}\"");
        let mut last = String::new();
        for _ in 0..200 {
            last = http_get(self.admin, "/metrics");
            if metric(&last, name, &[&label]) == value {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("{name}{{{label}}} never became {value}:\n{last}\n{}", self.daemon.log_text());
    }

    /// A `mariadb` client run through rampart on `port`.
    fn client(&self, port: SocketAddr, q: &str, extra: &[&str]) -> Output {
        Command::new("mariadb")
            .args(["--no-defaults", "-h", "127.0.0.1", "-P", &port.port().to_string()])
            .args(["-uapp", "-papppw", "-N", "-B", "--connect-timeout=5"])
            .args(extra)
            .args(["-e", q])
            .output()
            .unwrap()
    }

    /// `SELECT @@port` through rampart: which server a new connection on `port` reaches.
    fn reaches(&self, port: SocketAddr) -> Result<u16, String> {
        let out = self.client(port, "SELECT @@port", &[]);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().parse().unwrap())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    /// Polls (bounded: 10 s) until a new connection on `port` gives `want`; returns how long it took.
    fn wait_reaches(&self, port: SocketAddr, want: Result<u16, &str>) -> Duration {
        let t = Instant::now();
        let mut last = Err(String::new());
        for _ in 0..200 {
            last = self.reaches(port);
            let hit = match (&last, want) {
                (Ok(p), Ok(w)) => *p == w,
                (Err(e), Err(w)) => e.contains(w),
                _ => false,
            };
            if hit {
                return t.elapsed();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{port} never gave {want:?}; last {last:?}\n{}", self.daemon.log_text());
    }

    fn conn(&self, port: SocketAddr) -> mysql::Conn {
        mysql::Conn::new(opts(port)).unwrap_or_else(|e| panic!("connect through {port}: {e}"))
    }
}

fn cluster_config(dir: &TestDir, admin: SocketAddr, rw: SocketAddr, ro: SocketAddr, servers: &[SocketAddr]) -> String {
    let servers: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
    format!(
        r#"[admin]
listen = "{admin}"
control_socket = "{sock}"
drain_timeout = "1s"

[[mysql]]
name = "main"
rw_listen = "{rw}"
ro_listen = "{ro}"
servers = [{servers}]
monitor_user = "mon"
monitor_password_file = "mon.pass"
check_interval = "1s"
max_lag = "5s"
demoted_grace = "{GRACE}"
"#,
        sock = dir.path("control.sock").display(),
        servers = servers.join(", "),
    )
}

fn opts(port: SocketAddr) -> mysql::Opts {
    mysql::OptsBuilder::new()
        .ip_or_hostname(Some("127.0.0.1"))
        .tcp_port(port.port())
        .user(Some("app"))
        .pass(Some("apppw"))
        .prefer_socket(false)
        .tcp_connect_timeout(Some(Duration::from_secs(5)))
        .read_timeout(Some(Duration::from_secs(10)))
        .into()
}

/// Waits (bounded: 20 s) until the replica has applied everything the primary has logged.
fn wait_caught_up(primary: &Mariadb, replica: &Mariadb) {
    replica.wait_caught_up(primary, Duration::from_secs(20)).unwrap_or_else(|e| panic!("{e}"));
}

/// The number after `key` in sysbench's report.
fn count(report: &str, key: &str) -> u64 {
    let line =
        report.lines().find(|l| l.trim_start().starts_with(key)).unwrap_or_else(|| panic!("no {key} in {report}"));
    line.trim_start()[key.len()..].split_whitespace().next().unwrap().parse().unwrap()
}

fn mysql_available() {
    let ok = Command::new("mariadbd").arg("--version").output().is_ok_and(|o| o.status.success());
    assert!(ok, "mariadbd not found: Debian's mariadb-server is installed by `cargo xtask setup`");
}

#[test]
fn clients_work_on_both_ports_with_tls_sysbench_status_and_metrics() {
    mysql_available();
    isolated(|| async {
        let c = Cluster::start("mysql-ports");
        let (p, r) = (c.primary.port(), c.replica.port());
        assert_eq!(c.reaches(c.rw), Ok(p));
        assert_eq!(c.reaches(c.ro), Ok(r));
        let out = c.client(c.rw, "INSERT INTO t.w (v) VALUES (42); SELECT COUNT(*) FROM t.w WHERE v = 42", &[]);
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1", "{}", String::from_utf8_lossy(&out.stderr));
        wait_caught_up(&c.primary, &c.replica);
        let out = c.client(c.ro, "SELECT COUNT(*) FROM t.w WHERE v = 42", &[]);
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");
        // A write on the read-only port reaches a read-only replica, which refuses it.
        let out = c.client(c.ro, "INSERT INTO t.w (v) VALUES (1)", &[]);
        assert!(String::from_utf8_lossy(&out.stderr).contains("read-only"), "{out:?}");

        // Messages many times the session's copy buffers, both ways, arrive whole and in order:
        // a 98,000-byte query (the server compares it with what it should be) and a
        // 1,000,000-byte value back.
        let big = "rampart".repeat(14_000);
        let q = format!("SELECT '{big}' = REPEAT('rampart', 14000); SELECT REPEAT('0123456789', 100000)");
        let out = c.client(c.rw, &q, &[]);
        let text = String::from_utf8_lossy(&out.stdout);
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("1"), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(lines.next() == Some("0123456789".repeat(100_000).as_str()) && lines.next().is_none());

        // TLS passes through: the client negotiates it with the server and verifies the
        // server's certificate, rampart only carries the bytes.
        let ca = format!("--ssl-ca={}", c.ca.display());
        for port in [c.rw, c.ro] {
            let out =
                c.client(port, "SHOW SESSION STATUS LIKE 'Ssl_version'", &["--ssl", &ca, "--ssl-verify-server-cert"]);
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.contains("TLSv1."), "{port}: {text} {}", String::from_utf8_lossy(&out.stderr));
        }

        // sysbench: tables made through the read-write port, read-write load there, point
        // selects on the read-only port.
        c.primary.sql("CREATE DATABASE sb");
        let sb = |port: SocketAddr, args: &[&str]| -> String {
            let out = Command::new("sysbench")
                .args(args)
                .args(["--db-driver=mysql", "--mysql-host=127.0.0.1", "--mysql-user=app", "--mysql-password=apppw"])
                .args(["--mysql-db=sb", "--tables=1", "--table-size=1000", "--threads=2"])
                .arg(format!("--mysql-port={}", port.port()))
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            assert!(out.status.success(), "sysbench {args:?}: {text}\n{}", String::from_utf8_lossy(&out.stderr));
            text
        };
        sb(c.rw, &["oltp_read_write", "prepare"]);
        let rw = sb(c.rw, &["oltp_read_write", "--time=2", "run"]);
        // Deadlocks between sysbench's own threads are the server's to report (and sysbench's to
        // retry); what rampart owns is that no connection broke.
        assert!(count(&rw, "transactions:") > 0 && count(&rw, "reconnects:") == 0, "{rw}");
        wait_caught_up(&c.primary, &c.replica);
        let ro = sb(c.ro, &["oltp_point_select", "--time=2", "run"]);
        assert!(count(&ro, "transactions:") > 0 && count(&ro, "reconnects:") == 0, "{ro}");
        assert_eq!(count(&ro, "ignored errors:"), 0, "{ro}");

        // Status and metrics: roles, health, lag, connections, last change of primary.
        let held = c.conn(c.ro);
        c.wait_metric("rampart_mysql_connections", &c.replica.addr(), 1.0);
        let status = http_get(c.admin, "/");
        assert!(status.contains(&format!("primary {}", c.primary.addr())), "{status}");
        assert!(status.contains("no change of primary seen"), "{status}");
        let line = status.lines().find(|l| l.contains(&c.replica.addr().to_string()) && l.contains("replica")).unwrap();
        assert!(line.contains(" up ") && line.contains("lag 0s") && line.contains("connections 1"), "{line}");
        let m = http_get(c.admin, "/metrics");
        let pl = format!("server=\"{}\"", c.primary.addr());
        let rl = format!("server=\"{}\"", c.replica.addr());
        assert_eq!(metric(&m, "rampart_mysql_server_role", &[&pl, "role=\"primary\""]), 1.0, "{m}");
        assert_eq!(metric(&m, "rampart_mysql_server_role", &[&rl, "role=\"replica\""]), 1.0, "{m}");
        assert_eq!(metric(&m, "rampart_mysql_replication_lag_seconds", &[&rl]), 0.0, "{m}");
        // `rampart status` has the same in its daemon section.
        let sock = c.dir.path("control.sock");
        let out = rampart(&["status", "--control-socket", sock.to_str().unwrap()]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("mysql main (rw ") && text.contains(&format!("primary {}", c.primary.addr())), "{text}");
        // And `rampart stats --json` (the daemon's snapshot) field by field.
        let out = rampart(&["stats", "--json", "--control-socket", sock.to_str().unwrap()]);
        let snap: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stats --json");
        let cl = &snap["daemon"]["mysql"][0];
        assert_eq!(cl["name"], "main", "{snap}");
        assert_eq!(cl["primary"], c.primary.addr().to_string(), "{snap}");
        assert!(cl["last_primary_change"].is_null(), "{snap}");
        let server =
            |addr: String| cl["servers"].as_array().unwrap().iter().find(|s| s["addr"] == addr).unwrap().clone();
        let (ps, rs) = (server(c.primary.addr().to_string()), server(c.replica.addr().to_string()));
        assert_eq!((&ps["role"], &ps["health"]), (&"primary".into(), &"up".into()), "{ps}");
        assert_eq!(
            (&rs["role"], &rs["health"], &rs["lag_seconds"], &rs["connections"]),
            (&"replica".into(), &"up".into(), &0.into(), &1.into()),
            "{rs}"
        );
        drop(held);
        // The monitor's password never reaches the log.
        assert!(!c.daemon.log_text().contains("monpw"));
    })
}

#[test]
fn stopped_replication_leaves_the_read_pool_and_split_brain_refuses_writes() {
    mysql_available();
    isolated(|| async {
        let c = Cluster::start("mysql-lag");
        let (p, r) = (c.primary.port(), c.replica.port());
        c.replica.sql("STOP SLAVE");
        c.wait_metric("rampart_mysql_server_up", &c.replica.addr(), 0.0);
        // No healthy replica: the read-only port leads to the primary.
        assert_eq!(c.reaches(c.ro), Ok(p));
        let status = http_get(c.admin, "/");
        assert!(status.contains("replication stopped"), "{status}");
        c.replica.sql("START SLAVE");
        c.wait_reaches(c.ro, Ok(r));

        // Split brain: the replica stopped and made writable while the primary stays writable.
        let before = c.conn(c.rw);
        c.replica.sql("STOP SLAVE; SET GLOBAL read_only=0");
        c.wait_reaches(c.rw, Err("split brain in cluster main"));
        let err = c.reaches(c.rw).unwrap_err();
        assert!(err.contains("1105") && err.contains(&c.primary.addr().to_string()), "{err}");
        let m = http_get(c.admin, "/metrics");
        let rl = format!("server=\"{}\"", c.replica.addr());
        assert_eq!(metric(&m, "rampart_mysql_server_role", &[&rl, "role=\"writable\""]), 1.0, "{m}");
        assert!(metric(&m, "rampart_mysql_refused_connections_total", &["port=\"rw\""]) >= 1.0, "{m}");
        // The session opened before is closed after demoted_grace: no server is the primary.
        c.daemon.wait_log(&format!("closing a rw session on {}", c.primary.addr()));
        let mut before = before;
        assert!(before.query_drop("SELECT 1").is_err());
        // Back to one writable server: writes are accepted again.
        c.replica.sql("SET GLOBAL read_only=1");
        c.wait_reaches(c.rw, Ok(p));
    })
}

#[test]
fn failover_drill_moves_writes_closes_old_sessions_and_keeps_every_acknowledged_row() {
    mysql_available();
    isolated(|| async {
        let c = Cluster::start("mysql-failover");
        let (p, r) = (c.primary.port(), c.replica.port());
        let old = c.conn(c.rw);
        // A writer that reconnects on any error and records what the server acknowledged.
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::<i32>::new()));
        let writer = {
            let (stop, acked, rw) = (stop.clone(), acked.clone(), c.rw);
            std::thread::spawn(move || {
                let mut conn: Option<mysql::Conn> = None;
                let mut errors = 0;
                for i in 0..200_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    if conn.is_none() {
                        conn = mysql::Conn::new(opts(rw)).ok();
                    }
                    let ok = conn.as_mut().is_some_and(|c| c.exec_drop("INSERT INTO t.w (v) VALUES (?)", (i,)).is_ok());
                    if ok {
                        acked.lock().unwrap().push(i);
                    } else {
                        errors += 1;
                        conn = None;
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
                errors
            })
        };
        let acked_before = || acked.lock().unwrap().len();
        assert!(eventually(100, || acked_before() >= 100).await, "the writer did not get going");

        // The drill, as an operator does it: the old primary read-only, the replica caught up,
        // stopped and made writable.
        c.primary.sql("SET GLOBAL read_only=1");
        wait_caught_up(&c.primary, &c.replica);
        c.replica.sql("STOP SLAVE; SET GLOBAL read_only=0");
        let switched = Instant::now();
        let took = c.wait_reaches(c.rw, Ok(r));
        eprintln!("new read-write connections reached the new primary {took:?} after it became writable");
        let at_switch = acked_before();
        assert!(eventually(100, || acked_before() >= at_switch + 100).await, "writes did not continue");
        stop.store(true, Ordering::Relaxed);
        let errors = writer.join().unwrap();
        eprintln!(
            "writer: {} acknowledged inserts, {errors} errors, {:?} after the switch",
            acked_before(),
            switched.elapsed()
        );

        // The session held on the old primary was closed after demoted_grace.
        c.daemon.wait_log(&format!("closing a rw session on {}", c.primary.addr()));
        let mut old = old;
        assert!(old.query_drop("SELECT 1").is_err(), "a session on the demoted primary stayed open");

        // Every acknowledged insert is on the new primary.
        let rows = c.replica.sql("SELECT v FROM t.w ORDER BY v");
        let have: std::collections::HashSet<i32> = rows.lines().map(|l| l.parse().unwrap()).collect();
        let acked = acked.lock().unwrap();
        let lost: Vec<_> = acked.iter().filter(|v| !have.contains(v)).collect();
        assert!(lost.is_empty(), "{} acknowledged rows missing on the new primary: {lost:?}", lost.len());

        // Status and metrics name the change.
        let status = http_get(c.admin, "/");
        assert!(
            status.contains(&format!("to {}", c.replica.addr())) && status.contains("last change of primary"),
            "{status}"
        );
        let m = http_get(c.admin, "/metrics");
        assert!(metric(&m, "rampart_mysql_primary_changes_total", &["cluster=\"main\""]) >= 1.0, "{m}");
        assert!(metric(&m, "rampart_mysql_last_primary_change_timestamp_seconds", &[]) > 1.7e9, "{m}");
        assert_ne!(c.reaches(c.rw), Ok(p));
    })
}

#[test]
fn killed_primary_makes_the_rw_port_refuse_with_a_mysql_error() {
    mysql_available();
    isolated(|| async {
        let mut c = Cluster::start("mysql-kill");
        let r = c.replica.port();
        c.primary.kill();
        let killed = Instant::now();
        let took = c.wait_reaches(c.rw, Err("no writable primary in cluster main"));
        eprintln!("the read-write port refused {took:?} after the primary was killed ({:?})", killed.elapsed());
        // A proper ERR packet: the client prints the server-side error, code and message. (By
        // default this client asks for TLS, and says that an error sent before TLS cannot be
        // authenticated, as it does for a server's own.)
        let out = c.client(c.rw, "SELECT 1", &["--skip-ssl"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("ERROR 1105 (HY000): no writable primary in cluster main"), "{err}");
        let out = c.client(c.rw, "SELECT 1", &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("1105 - no writable primary in cluster main"), "{err}");
        // Reads go on: the replica (its source gone) is the last resort of the read-only port.
        assert_eq!(c.reaches(c.ro), Ok(r));
        let m = http_get(c.admin, "/metrics");
        let pl = format!("server=\"{}\"", c.primary.addr());
        assert_eq!(metric(&m, "rampart_mysql_server_role", &[&pl, "role=\"unreachable\""]), 1.0, "{m}");
    })
}

#[test]
fn reload_changes_ports_and_servers_without_dropping_sessions_that_stay() {
    mysql_available();
    isolated(|| async {
        let c = Cluster::start("mysql-reload");
        let (p, r) = (c.primary.port(), c.replica.port());
        let mut on_primary = c.conn(c.rw);
        let mut on_replica = c.conn(c.ro);
        let ro2 = free_addr();
        // The replica leaves the cluster and the read-only port moves.
        c.dir.replace("rampart.toml", &c.config(c.rw, ro2, &[c.primary.addr()]));
        let out = rampart(&["reload", "--control-socket", c.dir.path("control.sock").to_str().unwrap()]);
        assert!(out.status.success(), "{out:?}");
        c.daemon.wait_log(&format!("closing a ro session on {}", c.replica.addr()));
        assert!(on_replica.query_drop("SELECT 1").is_err(), "a session to a removed server stayed open");
        let port: u16 = on_primary.query_first("SELECT @@port").unwrap().unwrap();
        assert_eq!(port, p, "the session to the primary, which stays, was dropped");
        assert_eq!(c.reaches(ro2), Ok(p));
        assert!(c.reaches(c.ro).is_err(), "the old read-only port still answers");
        // The replica comes back.
        c.dir.replace("rampart.toml", &c.config(c.rw, ro2, &[c.primary.addr(), c.replica.addr()]));
        let out = rampart(&["reload", "--control-socket", c.dir.path("control.sock").to_str().unwrap()]);
        assert!(out.status.success(), "{out:?}");
        c.wait_reaches(ro2, Ok(r));
        let port: u16 = on_primary.query_first("SELECT @@port").unwrap().unwrap();
        assert_eq!(port, p);
    })
}
