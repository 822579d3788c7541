//! Part four of the demo: MySQL routing. Two MariaDB servers (real `mariadbd` processes, each in
//! a namespace of its own: db-1 the primary, db-2 its GTID replica), `rampart serve` with a
//! `[[mysql]]` cluster in a "router" namespace, and an application host ("app") that only knows
//! the router's two ports. The application writes through the read-write port and reads through
//! the read-only one; then db-1 crashes, and the operator promotes db-2 (rampart never
//! promotes): the read-write port refuses while no server is writable, and follows the new
//! primary once there is one. A writer runs all along and its results are counted.
use std::{
    fs,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use rampart_netlab::{Ns, veth};

use super::{COMMAND_LIMIT, Lab, Tally, heading, indent};
use crate::proc::{capture, capture_ok, check_interrupt, show};

/// The router's side of the application tier and of the database zone (one bridge, two
/// subnets), as in `rampart.example.toml` and `examples/db.rules.toml`.
const ROUTER_APP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 1);
const ROUTER_DB: Ipv4Addr = Ipv4Addr::new(10, 0, 3, 1);
const APP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 10);
/// The servers: name, address, server_id.
const DBS: [(&str, Ipv4Addr, u32); 2] =
    [("db-1", Ipv4Addr::new(10, 0, 3, 41), 1), ("db-2", Ipv4Addr::new(10, 0, 3, 42), 2)];
const MYSQL_PORT: u16 = 3306;
const RW: SocketAddrV4 = SocketAddrV4::new(ROUTER_APP, 3306);
const RO: SocketAddrV4 = SocketAddrV4::new(ROUTER_APP, 3307);
/// rampart's admin listener, on the router's loopback.
const ADMIN: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9100);
const LOG: &str = "mysql-serve.log";
/// The issue's bound: new read-write connections reach a new primary within 2 s.
const FOLLOW_BOUND: Duration = Duration::from_secs(2);
/// How long any wait on the cluster may take before the demo calls it a failure.
const WAIT_LIMIT: Duration = Duration::from_secs(10);

/// This part's namespaces: "router", "app", one per server (and the "dbnet" switch).
struct Net {
    router: Ns,
    app: Ns,
    dbs: [Ns; 2],
}

/// The namespaces and their links: every host joins one bridge (in its own "dbnet" namespace)
/// with an `eth1`. All of this part's namespace code is here.
fn build_network(lab: &mut Lab) -> Result<Net> {
    let sw = lab.net.ns("dbnet")?;
    sw.bridge("br0")?;
    let net = Net {
        router: lab.net.ns("router")?,
        app: lab.net.ns("app")?,
        dbs: [lab.net.ns("db-1")?, lab.net.ns("db-2")?],
    };
    let hosts: [(&Ns, Vec<String>, &str); 4] = [
        (&net.router, vec![format!("{ROUTER_APP}/24"), format!("{ROUTER_DB}/24")], "db-r"),
        (&net.app, vec![format!("{APP}/24")], "db-a"),
        (&net.dbs[0], vec![format!("{}/24", DBS[0].1)], "db-s1"),
        (&net.dbs[1], vec![format!("{}/24", DBS[1].1)], "db-s2"),
    ];
    for (netns, addrs, port) in hosts {
        let mut end = netns.end("eth1");
        for a in &addrs {
            end = end.addr(a);
        }
        veth(sw.end(port).master("br0"), end)?;
    }
    Ok(net)
}

fn config(lab: &Lab) -> String {
    let servers = DBS.iter().map(|(_, a, _)| format!("\"{a}:{MYSQL_PORT}\"")).collect::<Vec<_>>().join(", ");
    format!(
        r#"[admin]
listen = "{ADMIN}"
control_socket = "{control}"
drain_timeout = "2s"

[[mysql]]
name = "main"
rw_listen = "{RW}"    # always the primary
ro_listen = "{RO}"    # healthy replicas (the primary when none is)
servers = [{servers}]
monitor_user = "rampart"
monitor_password_file = "monitor.pass"
check_interval = "1s"
max_lag = "5s"
demoted_grace = "2s"
"#,
        control = control(lab).display(),
    )
}

fn control(lab: &Lab) -> std::path::PathBuf {
    lab.dir.join("mysql-control.sock")
}

fn db_name(server_id: u32) -> &'static str {
    DBS.iter().find(|d| d.2 == server_id).map_or("?", |d| d.0)
}

/// The `mariadb` client on the application host, through the router's `port`, as the
/// application's user.
fn app_client(net: &Net, port: SocketAddrV4, query: &str) -> Command {
    let mut cmd = net.app.command("mariadb");
    // --skip-ssl: the demo's servers offer no TLS, and without it the client prints an error
    // sent before the handshake (rampart's refusal) as the message it is, not wrapped in a
    // warning that it could not be authenticated. (TLS passes through rampart untouched:
    // userspace/tests/serve_mysql.rs.)
    cmd.args(["--no-defaults", "-h", &port.ip().to_string(), "-P", &port.port().to_string()]).args([
        "-u",
        "app",
        "-papppw",
        "-N",
        "-B",
        "--skip-ssl",
        "--connect-timeout=3",
        "-e",
        query,
    ]);
    cmd
}

/// One query from the application host: its output, or the client's error line.
fn app_sql(net: &Net, port: SocketAddrV4, query: &str) -> Result<Result<String, String>> {
    check_interrupt()?;
    let out = capture(&mut app_client(net, port, query), COMMAND_LIMIT)?;
    Ok(if out.success() { Ok(out.stdout.trim().to_string()) } else { Err(out.stderr.trim().to_string()) })
}

/// Which server a new connection on `port` reaches (its server_id).
fn reaches(net: &Net, port: SocketAddrV4) -> Result<Result<u32, String>> {
    Ok(app_sql(net, port, "SELECT @@server_id")?
        .and_then(|s| s.parse().map_err(|_| format!("unexpected answer {s:?}"))))
}

/// Polls new connections on `port` (bounded by [`WAIT_LIMIT`]) until `want` holds; the time
/// it took and the last answer.
fn wait_until(
    net: &Net,
    port: SocketAddrV4,
    want: impl Fn(&Result<u32, String>) -> bool,
) -> Result<(Option<Duration>, Result<u32, String>)> {
    let t = Instant::now();
    loop {
        let r = reaches(net, port)?;
        if want(&r) {
            return Ok((Some(t.elapsed()), r));
        }
        if t.elapsed() > WAIT_LIMIT {
            return Ok((None, r));
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Runs root's SQL on `server` over its socket, showing it as an operator would type it.
fn operator_sql(server: &mariadb_lab::Server, query: &str) -> Result<String> {
    check_interrupt()?;
    let statements: Vec<&str> = query.split("; ").collect();
    println!("  {}$ mariadb -e \"{}\"", server.name, statements.join(";\n      "));
    server.try_sql(query).map_err(Into::into)
}

/// The admin listener, from inside the router namespace.
fn admin_get(net: &Net, path: &str) -> Result<String> {
    let mut cmd = net.router.command("curl");
    cmd.args(["-sS", "--max-time", "5", &format!("http://{ADMIN}{path}")]);
    Ok(capture_ok(&mut cmd, COMMAND_LIMIT)?.stdout)
}

/// `/metrics` lines of the MySQL router.
fn mysql_metrics(text: &str) -> Vec<&str> {
    text.lines().filter(|l| l.starts_with("rampart_mysql_") && !l.ends_with(" 0")).collect()
}

fn metric(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .find(|l| labels.iter().all(|x| l.contains(x)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// `rampart status`, daemon section included, shown; its output.
fn show_status(lab: &Lab, net: &Net) -> Result<String> {
    let c = control(lab);
    let mut cmd = Command::new(&lab.rampart);
    cmd.args(["-n", net.router.name(), "status", "--control-socket", &c.to_string_lossy()]);
    let out = super::show_run(lab, &mut cmd)?;
    if !out.success() {
        bail!("`{}` failed ({})", super::shown(lab, &cmd), out.status);
    }
    Ok(out.stdout)
}

/// One insert by the writer: its number, and the server that acknowledged it or the error.
struct Write {
    at: Instant,
    n: u32,
    result: Result<u32, String>,
}

/// The application's writer: inserts one row per new connection through the read-write port
/// until `stop` (bounded: 2,000 inserts), recording every answer.
fn start_writer(net: &Net, stop: Arc<AtomicBool>) -> thread::JoinHandle<Vec<Write>> {
    let cmds: Vec<Command> = (0..2000)
        .map(|n| app_client(net, RW, &format!("INSERT INTO shop.orders (n) VALUES ({n}); SELECT @@server_id")))
        .collect();
    thread::spawn(move || {
        let mut writes = Vec::new();
        for (n, mut cmd) in cmds.into_iter().enumerate() {
            if stop.load(Ordering::Relaxed) || crate::proc::interrupted() {
                break;
            }
            let result = match capture(&mut cmd, Duration::from_secs(10)) {
                Ok(out) if out.success() => {
                    out.stdout.trim().parse::<u32>().map_err(|_| format!("unexpected answer {:?}", out.stdout))
                }
                Ok(out) => Err(out.stderr.trim().to_string()),
                Err(e) => Err(format!("{e:#}")),
            };
            let failed = result.is_err();
            writes.push(Write { at: Instant::now(), n: n as u32, result });
            if failed {
                thread::sleep(Duration::from_millis(50));
            }
        }
        writes
    })
}

/// Sections `first` to `first + 3`.
pub(super) fn run(lab: &mut Lab, tally: &mut Tally, first: usize) -> Result<()> {
    heading(first, "MySQL routing: a MariaDB primary and replica behind rampart serve");
    let net = build_network(lab)?;
    println!("  app    {APP:<11} ──┐   the application: it knows only the router's two ports");
    println!("  router {ROUTER_APP:<11} ──┤   rampart serve: {RW} read-write, {RO} read-only");
    println!("         {ROUTER_DB:<11}   ├── bridge");
    println!("  db-1   {:<11} ──┤   MariaDB primary", DBS[0].1);
    println!("  db-2   {:<11} ──┘   MariaDB replica of db-1 (GTID)", DBS[1].1);
    println!("  Each in a network namespace of its own ({}-<name>).\n", lab.net.prefix());

    let template = lab.dir.join("mariadb-template");
    println!("  $ mariadb-install-db --datadir={}   (once; each server gets a copy)", template.display());
    mariadb_lab::install(&template)?;
    for (i, (name, addr, id)) in DBS.iter().enumerate() {
        let mut opts = mariadb_lab::Options::new(name, &lab.dir.join(name), (*addr).into(), MYSQL_PORT, *id);
        opts.netns = Some(net.dbs[i].name().to_string());
        println!("  $ ip netns exec {} mariadbd {}", net.dbs[i], opts.args().join(" "));
        let server = mariadb_lab::Server::start(&template, &opts)?;
        lab.databases.push(server);
    }
    let (primary, replica) = (&lab.databases[0], &lab.databases[1]);
    // The application connects from the router's address (rampart proxies whole connections);
    // replication runs between the servers; the monitor user only reads state.
    operator_sql(
        primary,
        "CREATE USER app@'10.0.3.1' IDENTIFIED BY 'apppw'; GRANT SELECT, INSERT, UPDATE, DELETE ON shop.* TO app@'10.0.3.1'; \
         CREATE USER rampart@'10.0.3.1' IDENTIFIED BY 'monitorpw'; GRANT PROCESS, REPLICATION CLIENT, SLAVE MONITOR ON *.* TO rampart@'10.0.3.1'; \
         CREATE USER repl@'10.0.3.%' IDENTIFIED BY 'replpw'; GRANT REPLICATION SLAVE ON *.* TO repl@'10.0.3.%'; \
         CREATE DATABASE shop; CREATE TABLE shop.orders (id INT AUTO_INCREMENT PRIMARY KEY, n INT NOT NULL)",
    )?;
    let source = SocketAddr::from((DBS[0].1, MYSQL_PORT));
    println!(
        "  db-2$ mariadb -e \"SET GLOBAL read_only=1; CHANGE MASTER TO MASTER_HOST='{}', MASTER_USE_GTID=slave_pos, …; START SLAVE\"",
        DBS[0].1
    );
    replica.replicate_from(source, "repl", "replpw")?;
    replica.wait_caught_up(primary, WAIT_LIMIT)?;

    let cfg = config(lab);
    fs::write(lab.dir.join("mysql.toml"), &cfg).context("writing mysql.toml")?;
    fs::write(lab.dir.join("monitor.pass"), "monitorpw\n").context("writing monitor.pass")?;
    println!("\n  mysql.toml (monitor.pass holds the monitor user's password):");
    print!("{}", indent(&cfg, 4));
    let router = net.router.clone();
    super::https::start_daemon(lab, router.name(), "mysql.toml", LOG)?;
    // Ready when the first discovery round has named the primary and put db-2 in the read pool.
    let t = Instant::now();
    let ready = loop {
        let m = admin_get(&net, "/metrics")?;
        let up = |a: Ipv4Addr| metric(&m, "rampart_mysql_server_up", &[&format!("server=\"{a}:{MYSQL_PORT}\"")]);
        if up(DBS[0].1) == Some(1.0) && up(DBS[1].1) == Some(1.0) {
            break true;
        }
        if t.elapsed() > WAIT_LIMIT {
            break false;
        }
        thread::sleep(Duration::from_millis(100));
    };
    if !ready {
        bail!("rampart did not find the primary and the replica within {WAIT_LIMIT:?}:\n{}", admin_get(&net, "/")?);
    }
    let log_seen = super::https::print_log(lab, LOG, 0);

    heading(first + 1, "The application writes through the read-write port, reads through the read-only one");
    let rw = reaches(&net, RW)?;
    let ro = reaches(&net, RO)?;
    println!("  $ {}", show(&app_client(&net, RW, "SELECT @@server_id")));
    println!("    {}", rw.as_ref().map_or_else(|e| e.clone(), |id| id.to_string()));
    tally.expect(
        rw == Ok(1) && ro == Ok(2),
        &format!(
            "a new connection on {RW} reaches {}, one on {RO} reaches {}",
            rw.as_ref().map_or_else(|e| e.clone(), |&id| format!("{} (server_id {id})", db_name(id))),
            ro.as_ref().map_or_else(|e| e.clone(), |&id| format!("{} (server_id {id})", db_name(id)))
        ),
    );
    let write = app_sql(&net, RW, "INSERT INTO shop.orders (n) VALUES (-1); SELECT @@server_id")?;
    lab.databases[1].wait_caught_up(&lab.databases[0], WAIT_LIMIT)?;
    let read = app_sql(&net, RO, "SELECT COUNT(*), @@server_id FROM shop.orders WHERE n = -1")?;
    tally.expect(
        write == Ok("1".into()) && read == Ok("1\t2".into()),
        &format!(
            "a row inserted through {RW} (answered by server_id {}) is read through {RO} (count, server_id: {})",
            write.unwrap_or_else(|e| e),
            read.map(|r| r.replace('\t', ", ")).unwrap_or_else(|e| e)
        ),
    );
    let status = show_status(lab, &net)?;
    tally.expect(
        status.contains(&format!("primary {}:{MYSQL_PORT}", DBS[0].1))
            && status.lines().any(|l| l.contains(&DBS[1].1.to_string()) && l.contains("replica") && l.contains(" up ")),
        "rampart status: db-1 is the primary, db-2 a replica that is up (lag 0s)",
    );

    heading(first + 2, "Failover: db-1 crashes, the operator promotes db-2");
    let stop = Arc::new(AtomicBool::new(false));
    let writer = start_writer(&net, stop.clone());
    println!("  A writer on the application host inserts rows through {RW}, one new connection each.");
    thread::sleep(Duration::from_millis(800));
    let pid = lab.databases[0].pid().context("db-1 is not running")?;
    println!("  $ kill -KILL {pid}   (db-1's mariadbd: the primary crashes)");
    lab.databases[0].kill();
    let refusal = "no writable primary in cluster main";
    let (took, last) = wait_until(&net, RW, |r| r.as_ref().is_err_and(|e| e.contains(refusal)))?;
    let last_text = last.as_ref().map_or_else(|e| e.clone(), |id| format!("server_id {id}"));
    tally.expect(
        took.is_some(),
        &match took {
            Some(t) => format!(
                "{:.1} s after the crash, {RW} refuses new connections with a MySQL error: {last_text}",
                t.as_secs_f64()
            ),
            None => format!("{RW} never refused with \"{refusal}\"; last: {last_text}"),
        },
    );
    let ro = reaches(&net, RO)?;
    tally.expect(
        ro == Ok(2),
        &format!(
            "reads go on: {RO} still reaches {} (its source is gone; the last resort of the read-only port)",
            ro.as_ref().map_or_else(|e| e.clone(), |&id| db_name(id).to_string())
        ),
    );
    println!("\n  The operator (or an orchestrator) promotes db-2; rampart only follows:");
    let replica = &lab.databases[1];
    operator_sql(replica, "STOP SLAVE; RESET SLAVE ALL; SET GLOBAL read_only=0")?;
    let promoted = Instant::now();
    let (took, last) = wait_until(&net, RW, |r| r == &Ok(2))?;
    tally.expect(
        took.is_some_and(|t| t <= FOLLOW_BOUND),
        &match took {
            Some(t) => format!(
                "{:.1} s after the promotion, new connections on {RW} reach db-2 (bound: {} s)",
                t.as_secs_f64(),
                FOLLOW_BOUND.as_secs()
            ),
            None => format!("{RW} never reached db-2; last: {last:?}"),
        },
    );
    // Let the writer go on for a while on the new primary.
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(1500) {
        check_interrupt()?;
        thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    let writes = writer.join().map_err(|_| anyhow::anyhow!("the writer panicked"))?;
    let on = |id: u32| writes.iter().filter(|w| w.result == Ok(id)).count();
    let refused = writes.iter().filter(|w| w.result.as_ref().is_err_and(|e| e.contains("1105"))).count();
    let other: Vec<&String> =
        writes.iter().filter_map(|w| w.result.as_ref().err()).filter(|e| !e.contains("1105")).collect();
    println!(
        "  The writer: {} inserts acknowledged by db-1, {refused} refused by rampart (ERROR 1105), {} acknowledged by db-2{}",
        on(1),
        on(2),
        match other.len() {
            0 => String::new(),
            1 => ", 1 other error (a connection db-1 cut as it died):".to_string(),
            n => format!(", {n} other errors (connections db-1 cut as it died):"),
        }
    );
    for e in other.iter().take(3) {
        println!("    {e}");
    }
    // Nothing written after the promotion went anywhere but db-2, and db-2 has every row it
    // acknowledged. (Rows db-1 acknowledged just before it crashed may be missing on db-2:
    // replication is asynchronous; that is MariaDB's to guarantee, with semi-sync.)
    let after: Vec<&Write> = writes.iter().filter(|w| w.at > promoted && w.result.is_ok()).collect();
    let stray = after.iter().filter(|w| w.result != Ok(2)).count();
    let have = replica.try_sql("SELECT n FROM shop.orders")?;
    let have: std::collections::HashSet<u32> = have.lines().filter_map(|l| l.parse().ok()).collect();
    let missing = writes.iter().filter(|w| w.result == Ok(2) && !have.contains(&w.n)).count();
    tally.expect(
        on(1) > 0 && on(2) > 0 && stray == 0 && missing == 0,
        &format!(
            "writes continued on the new primary: {} inserts acknowledged after the promotion, all by db-2, \
             all in its table ({missing} missing)",
            after.len()
        ),
    );
    let before_crash: Vec<u32> = writes.iter().filter(|w| w.result == Ok(1)).map(|w| w.n).collect();
    println!(
        "  Of the {} rows db-1 acknowledged before it crashed, db-2 has {} (asynchronous replication).",
        before_crash.len(),
        before_crash.iter().filter(|n| have.contains(n)).count()
    );

    heading(first + 3, "What rampart saw");
    let status = show_status(lab, &net)?;
    let db1 = format!("{}:{MYSQL_PORT}", DBS[0].1);
    let db2 = format!("{}:{MYSQL_PORT}", DBS[1].1);
    tally.expect(
        status.contains(&format!("primary {db2}"))
            && status.contains("last change of primary")
            && status.lines().any(|l| l.contains(&db1) && l.contains("unreachable")),
        "rampart status: db-2 is the primary, db-1 unreachable, and when the primary last changed",
    );
    println!("  $ ip netns exec {} curl http://{ADMIN}/metrics   (rampart_mysql_*, zeros left out)", net.router);
    let m = admin_get(&net, "/metrics")?;
    for l in mysql_metrics(&m) {
        println!("    {l}");
    }
    let changes = metric(&m, "rampart_mysql_primary_changes_total", &["cluster=\"main\""]).unwrap_or(0.0);
    let refused_m = metric(&m, "rampart_mysql_refused_connections_total", &["port=\"rw\""]).unwrap_or(0.0);
    let writable = metric(&m, "rampart_mysql_writable_primaries", &[]).unwrap_or(-1.0);
    tally.expect(
        changes >= 2.0 && refused_m >= 1.0 && writable == 1.0,
        &format!(
            "/metrics: {changes} changes of primary (db-1 → none → db-2), {refused_m} refused read-write \
             connections, {writable} writable primary"
        ),
    );
    println!("  What rampart serve logged:");
    super::https::print_log(lab, LOG, log_seen);
    let status = lab.stop_daemon()?.context("rampart serve is not running")?;
    tally.expect(status.success(), &format!("rampart serve stopped on SIGTERM ({status})"));
    for mut db in std::mem::take(&mut lab.databases) {
        db.kill();
    }
    Ok(())
}
