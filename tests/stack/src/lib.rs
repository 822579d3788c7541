//! The seeds' whole stack (`examples/stack/`), brought up in network namespaces on one machine
//! with real software everywhere: the demo (`cargo xtask demo`) and the system test
//! (`tests/tests/stack.rs`) both run this, with the example files as they ship.
//!
//! ```text
//! client, attacker ── inet ── edge (XDP firewall + L4 balancer, serve) ── front ── web1, web2
//!                                 └───────────────── internal 10.1.0.0/16 ──────────┘
//!                          app1, app2 (serve: TLS + MySQL router, app.py)  db1, db2  mon
//! ```
//!
//! [`Stack::up`] makes the namespaces and links, installs each node's files into its own
//! directory (as a deployment would: the role's config, rule files, certificates, passwords),
//! starts MariaDB with GTID replication, attaches every firewall and the backends'
//! decapsulation, starts nginx, the application servers, every `rampart serve` and Prometheus,
//! and waits until traffic flows end to end. Dropping the [`Stack`] detaches what was attached
//! (pins included), kills every process and deletes every namespace, also after a failure.
//!
//! Only std, thiserror and the namespace builder: xtask depends on this crate.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use rampart_netlab::{Lab, NetlabError, Ns, Proc, output, show, veth};

/// The service address the edge balances (ports 80 and 443).
pub const VIP: &str = "203.0.113.10";
/// The site's name, in the public certificate.
pub const SITE: &str = "www.stack.test";
/// Where Prometheus listens (in the monitoring namespace).
pub const PROMETHEUS: &str = "10.1.9.10:9090";

/// Every link: (node, interface, switch, address). Each switch is a bridge in the `sw`
/// namespace; the front network carries IP-in-IP, so its MTU is 20 bytes above the others'
/// (a full-size client packet fits once encapsulated).
const LINKS: &[(&str, &str, &str, &str)] = &[
    ("client", "eth0", "inet", "198.51.100.10/24"),
    ("attacker", "eth0", "inet", "198.51.100.66/24"),
    ("edge", "eth0", "inet", "198.51.100.1/24"),
    ("edge", "eth1", "front", "10.0.1.1/24"),
    ("edge", "eth2", "int", "10.1.0.1/16"),
    ("web1", "eth0", "front", "10.0.1.11/24"),
    ("web1", "eth1", "int", "10.1.1.11/16"),
    ("web2", "eth0", "front", "10.0.1.12/24"),
    ("web2", "eth1", "int", "10.1.1.12/16"),
    ("app1", "eth0", "int", "10.1.2.21/16"),
    ("app2", "eth0", "int", "10.1.2.22/16"),
    ("db1", "eth0", "int", "10.1.3.31/16"),
    ("db2", "eth0", "int", "10.1.3.32/16"),
    ("mon", "eth0", "int", "10.1.9.10/16"),
];
const FRONT_MTU: u32 = 1520;

/// (node, destination, gateway).
const ROUTES: &[(&str, &str, &str)] = &[
    ("client", "203.0.113.0/24", "198.51.100.1"),
    ("attacker", "203.0.113.0/24", "198.51.100.1"),
    ("web1", "default", "10.0.1.1"),
    ("web2", "default", "10.0.1.1"),
];

pub const WEB: [&str; 2] = ["web1", "web2"];
pub const APP: [&str; 2] = ["app1", "app2"];
pub const DB: [(&str, &str, u32); 2] = [("db1", "10.1.3.31", 1), ("db2", "10.1.3.32", 2)];

/// How long the stack may take to come up, and a fault to be noticed.
pub const READY_LIMIT: Duration = Duration::from_secs(90);

#[derive(Debug, thiserror::Error)]
pub enum StackError {
    #[error(transparent)]
    Netlab(#[from] NetlabError),
    #[error("{what}: {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {detail}")]
    Step { what: String, detail: String },
    #[error(transparent)]
    Mariadb(#[from] mariadb_lab::Error),
    #[error("{what}: not within {limit:?}; last: {last}")]
    Timeout { what: String, limit: Duration, last: String },
    #[error("{what}: interrupted")]
    Interrupted { what: String },
}

pub type Result<T, E = StackError> = std::result::Result<T, E>;

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StackError + use<> {
    let path = path.to_path_buf();
    move |source| StackError::Io { what, path, source }
}

fn step(what: impl Into<String>, detail: impl Into<String>) -> StackError {
    StackError::Step { what: what.into(), detail: detail.into() }
}

/// Runs `cmd`; its stdout, or an error with what it printed.
pub fn capture(cmd: &mut Command) -> Result<String> {
    let out = output(cmd)?;
    if !out.status.success() {
        return Err(step(
            show(cmd),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
                .trim()
                .to_string(),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Makes every wait of this crate give up from now on (the demo's Ctrl-C: the stack is then
/// dropped, which removes it). Only stores to an atomic, so a signal handler may call it.
pub fn interrupt() {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Polls `f` every 200 ms until it gives `Some`, for at most `limit` (or until [`interrupt`]).
pub fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Result<Option<T>, String>) -> Result<T> {
    let start = Instant::now();
    loop {
        if INTERRUPTED.load(Ordering::SeqCst) {
            return Err(StackError::Interrupted { what: what.to_string() });
        }
        let last = match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => "not yet".to_string(),
            Err(e) => e,
        };
        if start.elapsed() > limit {
            return Err(StackError::Timeout { what: what.to_string(), limit, last });
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// Where the programs and files come from.
#[derive(Clone, Debug)]
pub struct Options {
    /// The release `rampart` binary.
    pub rampart: PathBuf,
    /// The repository's `examples/` (with `stack/` and `monitoring/`).
    pub examples: PathBuf,
    /// A fresh directory for every node's files, logs and data; removed with the stack.
    pub work: PathBuf,
    /// Namespace name tag (`TAG-PID-N-node`).
    pub tag: String,
    /// Alert rules' `for:` durations are divided by this (1: as shipped). A demo cannot wait
    /// the minute an operator wants before a page; the rules are otherwise the same.
    pub alert_speedup: u32,
    /// Prints each step as it is done.
    pub narrate: bool,
}

/// The running stack.
pub struct Stack {
    /// Namespaces, links and processes (behind a lock: faults are injected while other
    /// threads send traffic through the stack).
    lab: Mutex<Lab>,
    pub opts: Options,
    nodes: BTreeMap<&'static str, Ns>,
    /// Each daemon's process, with its pid, by node.
    serves: Mutex<BTreeMap<&'static str, (Proc, u32)>>,
    mariadb: Mutex<BTreeMap<&'static str, mariadb_lab::Server>>,
    apps: Mutex<BTreeMap<&'static str, (Proc, u32)>>,
    /// The client's trust anchor for the site's certificate.
    pub public_ca: PathBuf,
    passwords: BTreeMap<&'static str, String>,
}

impl Drop for Stack {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("stack teardown: {e}");
        }
    }
}

impl Stack {
    /// Removes everything: the databases first, then processes and namespaces with the lab
    /// (the attaches' pins were registered as undo commands, which run while the namespaces
    /// still exist), then the work directory. Goes on past failures and reports them; a second
    /// call (the drop after an explicit one) has nothing left to do.
    pub fn teardown(&self) -> Result<()> {
        self.mariadb.lock().unwrap_or_else(|e| e.into_inner()).clear();
        let lab = self.lab().teardown();
        let dir = match fs::remove_dir_all(&self.opts.work) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io("remove", &self.opts.work)(e)),
            _ => Ok(()),
        };
        lab?;
        dir
    }

    /// Brings the whole stack up and waits until a request through the VIP reaches MariaDB.
    pub fn up(opts: Options) -> Result<Stack> {
        let s = Stack::start(opts)?;
        s.wait_ready()?;
        Ok(s)
    }

    /// Brings the whole stack up without waiting for it to answer ([`Stack::wait_ready`]).
    pub fn start(opts: Options) -> Result<Stack> {
        let _ = fs::remove_dir_all(&opts.work);
        fs::create_dir_all(&opts.work).map_err(io("create the work directory", &opts.work))?;
        let lab = Lab::new(&opts.tag)?;
        let mut s = Stack {
            lab: Mutex::new(lab),
            public_ca: opts.work.join("pki/public-ca.pem"),
            opts,
            nodes: BTreeMap::new(),
            serves: Mutex::default(),
            mariadb: Mutex::default(),
            apps: Mutex::default(),
            passwords: BTreeMap::new(),
        };
        s.network()?;
        s.pki()?;
        s.install()?;
        s.databases()?;
        s.firewalls()?;
        s.services()?;
        Ok(s)
    }

    fn say(&self, what: &str) {
        if self.opts.narrate {
            println!("  {what}");
        }
    }

    /// The namespace of `node`.
    pub fn ns(&self, node: &str) -> &Ns {
        self.nodes.get(node).unwrap_or_else(|| panic!("no node {node} in the stack"))
    }

    /// `node`'s directory: its installed files, logs and data.
    pub fn dir(&self, node: &str) -> PathBuf {
        self.opts.work.join(node)
    }

    fn network(&mut self) -> Result<()> {
        let sw = self.lab().ns("sw")?;
        for br in ["inet", "front", "int"] {
            sw.bridge(&format!("br-{br}"))?;
        }
        let mut names: Vec<&'static str> = LINKS.iter().map(|l| l.0).collect();
        names.dedup();
        for n in names {
            let ns = self.lab().ns(n)?;
            self.nodes.insert(n, ns);
        }
        for &(node, iface, switch, addr) in LINKS {
            let mtu = if switch == "front" { FRONT_MTU } else { 1500 };
            let port = format!("{node}-{iface}");
            veth(self.ns(node).end(iface).mtu(mtu).addr(addr), sw.end(&port).mtu(mtu).master(&format!("br-{switch}")))?;
        }
        if FRONT_MTU > 1500 {
            sw.link_set("br-front", &["mtu", &FRONT_MTU.to_string()])?;
        }
        for &(node, dest, via) in ROUTES {
            self.ns(node).route(dest, via)?;
        }
        // Two properties of veth that a NIC does not have. A packet a local socket sends on a
        // veth leaves with its TCP/UDP checksum unfinished (offloaded to a NIC that does not
        // exist): the clients' packets must carry full checksums, as from a wire, or the web
        // nodes drop them once the edge has wrapped them in IP-in-IP. And a frame redirected
        // by XDP into a veth is taken by its peer only if that peer runs XDP or GRO.
        for node in ["client", "attacker"] {
            self.ns(node).run("ethtool", &["-K", "eth0", "tx", "off"])?;
        }
        sw.run("ethtool", &["-K", "edge-eth1", "gro", "on"])?;
        // The edge routes the web nodes' direct replies back to the internet, and the kernel's
        // FIB lookup for XDP needs forwarding on.
        self.ns("edge").sysctl("net.ipv4.ip_forward", "1")?;
        self.nodes.insert("sw", sw);
        self.say("network: 12 namespaces, 3 switches (internet, front, internal)");
        Ok(())
    }

    /// Two throwaway CAs: the public one (the client trusts it) signs the site's certificate,
    /// the internal one signs app.internal (the web tier trusts only it for /api/).
    fn pki(&mut self) -> Result<()> {
        let dir = self.opts.work.join("pki");
        fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        let p256 = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
        for (ca, cn) in [("public-ca", "stack public CA"), ("internal-ca", "stack internal CA")] {
            let mut cmd = Command::new("openssl");
            cmd.current_dir(&dir).args(["req", "-x509"]).args(p256).args(["-days", "2", "-subj"]);
            cmd.arg(format!("/CN={cn}")).args(["-keyout", &format!("{ca}.key"), "-out", &format!("{ca}.pem")]);
            capture(&mut cmd)?;
        }
        self.leaf("www", "public-ca", SITE, Some(VIP))?;
        self.leaf("app", "internal-ca", "app.internal", None)?;
        for who in ["shop", "monitor", "repl"] {
            let pw = format!("{who}-{:x}", random_u64());
            self.passwords.insert(who, pw);
        }
        self.say("certificates: a public CA for www.stack.test, an internal CA for app.internal");
        Ok(())
    }

    /// A leaf certificate `pki/NAME.pem` + `pki/NAME.key` for `dns` (and `ip`), signed by `ca`
    /// (`public-ca` or `internal-ca`), with a random serial (openssl's default).
    fn leaf(&self, leaf: &str, ca: &str, dns: &str, ip: Option<&str>) -> Result<()> {
        let dir = self.opts.work.join("pki");
        let p256 = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
        let mut san = format!("DNS:{dns}");
        if let Some(ip) = ip {
            san.push_str(&format!(",IP:{ip}"));
        }
        let ext = format!(
            "subjectAltName = {san}\nbasicConstraints = critical, CA:FALSE\n\
             keyUsage = critical, digitalSignature\nextendedKeyUsage = serverAuth\n"
        );
        let ext_file = dir.join(format!("{leaf}.ext"));
        fs::write(&ext_file, ext).map_err(io("write", &ext_file))?;
        let mut req = Command::new("openssl");
        req.current_dir(&dir).args(["req", "-new"]).args(p256).args(["-subj", &format!("/CN={dns}")]);
        req.args(["-keyout", &format!("{leaf}.key"), "-out", &format!("{leaf}.csr")]);
        capture(&mut req)?;
        let mut sign = Command::new("openssl");
        sign.current_dir(&dir).args(["x509", "-req", "-in", &format!("{leaf}.csr"), "-CA", &format!("{ca}.pem")]);
        sign.args(["-CAkey", &format!("{ca}.key"), "-days", "2", "-sha256", "-extfile", &format!("{leaf}.ext")]);
        sign.args(["-out", &format!("{leaf}.pem")]);
        capture(&mut sign)?;
        Ok(())
    }

    /// A new certificate for the site (same name, same public CA, a new key and serial),
    /// installed on every web node the way an operator renews one: each file written beside
    /// the old one and renamed over it. The daemons pick it up on their next reload (or
    /// within a second, when they notice the files changed). Returns the new serial, as
    /// `openssl x509 -serial` prints it (hex, upper case).
    pub fn renew_site_certificate(&self) -> Result<String> {
        self.leaf("www-renewed", "public-ca", SITE, Some(VIP))?;
        let pki = self.opts.work.join("pki");
        for w in WEB {
            let tls = self.dir(w).join("tls");
            // The key first: a daemon that reads the pair between the two renames sees a
            // mismatch, keeps the old pair and reads both again once the certificate changes.
            for (from, to) in [("www-renewed.key", "www.key"), ("www-renewed.pem", "www.pem")] {
                let tmp = tls.join(format!("{to}.new"));
                fs::copy(pki.join(from), &tmp).map_err(io("copy", &pki.join(from)))?;
                fs::rename(&tmp, tls.join(to)).map_err(io("rename", &tmp))?;
            }
        }
        let mut cmd = Command::new("openssl");
        cmd.args(["x509", "-noout", "-serial", "-in"]).arg(pki.join("www-renewed.pem"));
        let out = capture(&mut cmd)?;
        let serial = out.trim().strip_prefix("serial=").ok_or_else(|| step("openssl x509 -serial", out.clone()))?;
        Ok(serial.to_ascii_uppercase())
    }

    /// Copies each role's files from `examples/stack/` into each node's directory, with the
    /// certificates and passwords an installation adds.
    fn install(&mut self) -> Result<()> {
        let stack = self.opts.examples.join("stack");
        let pki = self.opts.work.join("pki");
        let copy = |from: &Path, to: &Path| fs::copy(from, to).map(|_| ()).map_err(io("copy", from));
        let mut roles: Vec<(&str, Vec<&str>)> = vec![("edge", vec!["edge.toml", "front.rules.toml"])];
        for w in WEB {
            roles.push((w, vec!["web.toml", "web.rules.toml"]));
        }
        for a in APP {
            roles.push((a, vec!["app.toml", "app.rules.toml", "app.py"]));
        }
        for (d, ..) in DB {
            roles.push((d, vec!["mariadb.cnf", "db.rules.toml", "schema.sql"]));
        }
        roles.push(("mon", vec!["prometheus.yml"]));
        for (node, files) in roles {
            let dir = self.dir(node);
            fs::create_dir_all(dir.join("tls")).map_err(io("create", &dir))?;
            for f in files {
                copy(&stack.join(f), &dir.join(f))?;
            }
        }
        for w in WEB {
            let tls = self.dir(w).join("tls");
            for (from, to) in [("www.pem", "www.pem"), ("www.key", "www.key"), ("internal-ca.pem", "internal-ca.pem")] {
                copy(&pki.join(from), &tls.join(to))?;
            }
            self.nginx_files(w)?;
        }
        for a in APP {
            let tls = self.dir(a).join("tls");
            for f in ["app.pem", "app.key"] {
                copy(&pki.join(f), &tls.join(f))?;
            }
            write(&self.dir(a).join("mysql-monitor.pass"), &format!("{}\n", self.passwords["monitor"]))?;
            write(&self.dir(a).join("app.pass"), &format!("{}\n", self.passwords["shop"]))?;
        }
        // prometheus.yml names ../monitoring/rampart.rules.yml.
        let mon_rules = self.opts.work.join("monitoring");
        fs::create_dir_all(&mon_rules).map_err(io("create", &mon_rules))?;
        let rules_src = self.opts.examples.join("monitoring/rampart.rules.yml");
        let rules = fs::read_to_string(&rules_src).map_err(io("read", &rules_src))?;
        write(&mon_rules.join("rampart.rules.yml"), &speed_up_alerts(&rules, self.opts.alert_speedup))?;
        self.say("installed: each node's files from examples/stack/ into its own directory");
        Ok(())
    }

    /// nginx serving the web node's static files on 127.0.0.1:8080 (a page naming the node).
    fn nginx_files(&self, node: &str) -> Result<()> {
        let dir = self.dir(node);
        let root = dir.join("static");
        fs::create_dir_all(root.join("tmp")).map_err(io("create", &root))?;
        write(
            &root.join("index.html"),
            &format!("<!doctype html><title>stack</title><p>static page from {node}</p>\n"),
        )?;
        let d = dir.display();
        let conf = format!(
            "worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/nginx.err;\ndaemon off;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/static/tmp;\n  proxy_temp_path {d}/static/tmp;\n\
               fastcgi_temp_path {d}/static/tmp;\n  uwsgi_temp_path {d}/static/tmp;\n  scgi_temp_path {d}/static/tmp;\n\
               server {{\n    listen 127.0.0.1:8080;\n    root {d}/static;\n\
                 location = /healthz {{ return 200 \"ok\\n\"; }}\n  }}\n}}\n"
        );
        write(&dir.join("nginx.conf"), &conf)
    }

    /// MariaDB on db1 (primary) and db2 (replica by GTID, semi-synchronous), with the shipped
    /// `mariadb.cnf`; the schema and users on the primary.
    fn databases(&mut self) -> Result<()> {
        let template = self.opts.work.join("mariadb-template");
        mariadb_lab::install(&template)?;
        for (db, addr, id) in DB {
            // Listening on every address of the node, as the shipped mariadb.cnf says.
            let _ = addr;
            let mut o = mariadb_lab::Options::new(db, &self.dir(db).join("data"), "0.0.0.0".parse().unwrap(), 3306, id);
            o.netns = Some(self.ns(db).name().to_string());
            o.defaults_file = Some(self.dir(db).join("mariadb.cnf"));
            let server = mariadb_lab::Server::start(&template, &o)?;
            self.mariadb.lock().unwrap().insert(db, server);
        }
        let schema_path = self.dir("db1").join("schema.sql");
        let schema = fs::read_to_string(&schema_path).map_err(io("read", &schema_path))?;
        let schema = schema
            .replace("SHOP_PASSWORD", &self.passwords["shop"])
            .replace("MONITOR_PASSWORD", &self.passwords["monitor"])
            .replace("REPL_PASSWORD", &self.passwords["repl"]);
        self.sql("db1", &format!("SET GLOBAL read_only = 0; {schema}"))?;
        self.sql(
            "db2",
            &format!(
                "CHANGE MASTER TO MASTER_HOST='{}', MASTER_PORT=3306, MASTER_USER='repl', \
                 MASTER_PASSWORD='{}', MASTER_USE_GTID=slave_pos; START SLAVE;",
                DB[0].1, self.passwords["repl"]
            ),
        )?;
        wait_for("db2 replicating db1", Duration::from_secs(30), || {
            let ok = self.sql("db2", "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema='shop'");
            Ok(ok.map_err(|e| e.to_string())?.trim() == "1").map(|v| v.then_some(()))
        })?;
        self.say("MariaDB: db1 primary (read_only off), db2 its semi-synchronous GTID replica (read_only on)");
        Ok(())
    }

    /// Runs SQL as root over `db`'s own socket (the operator's access, not through rampart).
    pub fn sql(&self, db: &str, q: &str) -> Result<String> {
        let servers = self.mariadb.lock().unwrap();
        let server = servers.get(db).ok_or_else(|| step("sql", format!("MariaDB on {db} is not running")))?;
        Ok(server.try_sql(q)?.trim().to_string())
    }

    /// `rampart -n NODE ARGS`, run from the node's directory.
    pub fn rampart(&self, node: &str, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new(&self.opts.rampart);
        cmd.current_dir(self.dir(node)).arg("-n").arg(self.ns(node).name()).args(args);
        capture(&mut cmd)
    }

    /// Registers the undo of an attach (run at teardown while the namespace exists).
    fn undo_rampart(&mut self, node: &str, args: &[&str]) {
        let mut cmd = Command::new(&self.opts.rampart);
        cmd.arg("-n").arg(self.ns(node).name()).args(args);
        self.lab().on_teardown(cmd);
    }

    /// The zones' XDP firewalls, the edge's services and the web nodes' decapsulation.
    fn firewalls(&mut self) -> Result<()> {
        for w in WEB {
            self.undo_rampart(w, &["decap", "detach", "--iface", "eth0"]);
            self.rampart(w, &["decap", "attach", "--iface", "eth0", "--vip", VIP])?;
        }
        for (node, config) in [
            ("edge", "edge.toml"),
            ("web1", "web.toml"),
            ("web2", "web.toml"),
            ("app1", "app.toml"),
            ("app2", "app.toml"),
        ] {
            let iface = if WEB.contains(&node) { "eth1" } else { "eth0" };
            self.undo_rampart(node, &["detach", "--iface", iface]);
            self.rampart(node, &["attach", "--config", config])?;
        }
        for (db, ..) in DB {
            self.undo_rampart(db, &["detach", "--iface", "eth0"]);
            self.rampart(db, &["attach", "--iface", "eth0", "--rules", "db.rules.toml"])?;
        }
        self.say("XDP: front zone + L4 balancer on the edge, decap on the web nodes, zone rules everywhere");
        Ok(())
    }

    /// The lab, locked.
    pub fn lab(&self) -> MutexGuard<'_, Lab> {
        self.lab.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn spawn(&self, cmd: &mut Command) -> Result<(Proc, u32)> {
        let mut lab = self.lab();
        let p = lab.spawn(cmd)?;
        let pid = lab.child(p).id();
        Ok((p, pid))
    }

    fn spawn_logged(&self, node: &str, log: &str, mut cmd: Command) -> Result<(Proc, u32)> {
        let path = self.dir(node).join(log);
        // Appended to: a daemon started again keeps its earlier log.
        let f = fs::OpenOptions::new().create(true).append(true).open(&path).map_err(io("open", &path))?;
        cmd.current_dir(self.dir(node)).stdin(Stdio::null()).stdout(f.try_clone().map_err(io("log", &path))?).stderr(f);
        self.spawn(&mut cmd)
    }

    /// `rampart serve` on `node` (edge, web or app), logging to serve.log in its directory.
    pub fn start_serve(&self, node: &'static str) -> Result<()> {
        let config = match node {
            "edge" => "edge.toml",
            n if WEB.contains(&n) => "web.toml",
            _ => "app.toml",
        };
        let mut cmd = Command::new(&self.opts.rampart);
        cmd.arg("-n").arg(self.ns(node).name()).args(["serve", "--config", config]).env("RUST_LOG", "info");
        let p = self.spawn_logged(node, "serve.log", cmd)?;
        self.serves.lock().unwrap().insert(node, p);
        Ok(())
    }

    /// Kills `node`'s `rampart serve` (SIGKILL: a crash, not a drain).
    pub fn kill_serve(&self, node: &str) {
        let p = self.serves.lock().unwrap().remove(node);
        if let Some((p, _)) = p {
            self.lab().kill(p);
        }
    }

    fn services(&self) -> Result<()> {
        for w in WEB {
            let conf = self.dir(w).join("nginx.conf");
            let mut cmd = self.ns(w).command("nginx");
            cmd.arg("-e").arg(self.dir(w).join("nginx.err")).arg("-c").arg(&conf);
            self.spawn_logged(w, "nginx.log", cmd)?;
        }
        for a in APP {
            let mut cmd = self.ns(a).command("/usr/bin/python3");
            cmd.args(["app.py", "--name", a, "--password-file", "app.pass"]);
            let p = self.spawn_logged(a, "app.log", cmd)?;
            self.apps.lock().unwrap().insert(a, p);
        }
        for node in ["app1", "app2", "web1", "web2", "edge"] {
            self.start_serve(node)?;
        }
        let mut cmd = self.ns("mon").command("prometheus");
        cmd.arg(format!("--config.file={}", self.dir("mon").join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", self.dir("mon").join("data").display()))
            .arg(format!("--web.listen-address={PROMETHEUS}"));
        self.spawn_logged("mon", "prometheus.log", cmd)?;
        self.say("started: nginx (web), app.py (app), rampart serve (edge, web, app), Prometheus (mon)");
        Ok(())
    }

    /// Another application server process on `app` (`app.py --name NAME --listen LISTEN`, the
    /// same program and database user), e.g. a second worker to add to the node's pool.
    pub fn start_app_worker(&self, app: &'static str, name: &str, listen: &str) -> Result<()> {
        let mut cmd = self.ns(app).command("/usr/bin/python3");
        cmd.args(["app.py", "--name", name, "--listen", listen, "--password-file", "app.pass"]);
        self.spawn_logged(app, &format!("{name}.log"), cmd)?;
        Ok(())
    }

    /// `rampart reload` of `node`'s daemon (through its control socket): what it answered.
    pub fn reload(&self, node: &str) -> Result<String> {
        self.rampart(node, &["reload", "--control-socket", "control.sock"])
    }

    /// Stops or resumes `app`'s application server (SIGSTOP/SIGCONT: it hangs, connections
    /// stay open and nothing answers).
    pub fn hang_app(&self, app: &str, hang: bool) -> Result<()> {
        let pid = self.apps.lock().unwrap().get(app).map(|p| p.1);
        let pid = pid.ok_or_else(|| step("hang", format!("no application server {app}")))?;
        capture(Command::new("kill").args([if hang { "-STOP" } else { "-CONT" }, &pid.to_string()]))?;
        Ok(())
    }

    /// Kills MariaDB on `db` (SIGKILL: the primary's machine is lost).
    pub fn kill_db(&self, db: &str) {
        if let Some(mut server) = self.mariadb.lock().unwrap().remove(db) {
            server.kill();
        }
    }

    /// What an operator (or an orchestrator) does when the primary is lost: the replica stops
    /// replicating and becomes writable. rampart follows; it never does this itself.
    pub fn promote(&self, db: &str) -> Result<()> {
        self.sql(db, "STOP SLAVE; RESET SLAVE ALL; SET GLOBAL read_only = 0;").map(|_| ())
    }

    /// curl from `node` (client or attacker) to the site through the VIP; returns
    /// (HTTP status, body). `extra` goes before the URL.
    pub fn curl(&self, node: &str, path: &str, extra: &[&str]) -> Result<(u16, String)> {
        let mut cmd = self.ns(node).command("curl");
        cmd.args(["-sS", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}"]);
        cmd.args(["--resolve", &format!("{SITE}:443:{VIP}"), "--cacert"]).arg(&self.public_ca);
        cmd.args(extra).arg(format!("https://{SITE}{path}"));
        let out = capture(&mut cmd)?;
        let (body, code) = out.rsplit_once('\n').unwrap_or(("", out.as_str()));
        let code = code.trim().parse().map_err(|_| step("curl", format!("no status in {out:?}")))?;
        Ok((code, body.to_string()))
    }

    /// The text of `node`'s /metrics (from the monitoring namespace, as Prometheus sees it).
    pub fn metrics(&self, node: &str) -> Result<String> {
        let addr = admin_addr(node);
        capture(self.ns("mon").command("curl").args(["-sS", "--max-time", "5", &format!("http://{addr}/metrics")]))
    }

    /// A Prometheus HTTP API call (`/api/v1/…`), from the monitoring namespace.
    pub fn prometheus(&self, api: &str) -> Result<String> {
        capture(self.ns("mon").command("curl").args([
            "-sS",
            "--max-time",
            "5",
            "-g",
            &format!("http://{PROMETHEUS}{api}"),
        ]))
    }

    /// Waits until the site answers through the VIP, /api/ writes reach the primary and reads
    /// come from the replica, and every rampart is scraped.
    pub fn wait_ready(&self) -> Result<()> {
        wait_for("the static page through the VIP", READY_LIMIT, || match self.curl("client", "/", &[]) {
            Ok((200, body)) if body.contains("static page from") => Ok(Some(())),
            Ok((code, body)) => Err(format!("{code} {body}")),
            Err(e) => Err(e.to_string()),
        })?;
        wait_for("an /api/ write", READY_LIMIT, || {
            match self.curl("client", "/api/notes", &["-X", "POST", "--data-binary", "ready?"]) {
                Ok((201, body)) => Ok(Some(body)),
                Ok((code, body)) => Err(format!("{code} {body}")),
                Err(e) => Err(e.to_string()),
            }
        })?;
        wait_for("Prometheus scraping every rampart", READY_LIMIT, || {
            let up = self.prometheus("/api/v1/query?query=sum(up{job=\"rampart\"})").map_err(|e| e.to_string())?;
            Ok(up.contains("\"5\"").then_some(()))
        })?;
        self.say("ready: HTTPS through the VIP, /api/ writes on the primary, 5 rampart daemons scraped");
        Ok(())
    }
}

/// The admin listener Prometheus scrapes on `node`.
pub fn admin_addr(node: &str) -> &'static str {
    match node {
        "edge" => "10.1.0.1:9100",
        "web1" => "10.1.1.11:9100",
        "web2" => "10.1.1.12:9100",
        "app1" => "10.1.2.21:9100",
        "app2" => "10.1.2.22:9100",
        _ => panic!("{node} runs no rampart serve"),
    }
}

fn write(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).map_err(io("write", path))
}

/// The alert rules with every `for: Nm`/`Ns` divided by `speedup` (at least 1 s).
pub fn speed_up_alerts(rules: &str, speedup: u32) -> String {
    if speedup <= 1 {
        return rules.to_string();
    }
    rules
        .lines()
        .map(|l| {
            let Some((head, dur)) = l.split_once("for: ") else { return l.to_string() };
            let secs = match dur.trim() {
                d if d.ends_with('m') => d[..d.len() - 1].parse::<u64>().ok().map(|m| m * 60),
                d if d.ends_with('s') => d[..d.len() - 1].parse::<u64>().ok(),
                _ => None,
            };
            match secs {
                Some(s) => format!("{head}for: {}s", (s / u64::from(speedup)).max(1)),
                None => l.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

/// Not for secrets that matter: throwaway passwords of a throwaway stack.
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alert_durations_are_divided() {
        let rules = "      - alert: A\n        for: 1m\n      - alert: B\n        for: 30s\n        expr: x\n";
        let fast = speed_up_alerts(rules, 10);
        assert!(fast.contains("for: 6s") && fast.contains("for: 3s") && fast.contains("expr: x"), "{fast}");
        assert_eq!(speed_up_alerts(rules, 1), rules);
    }

    #[test]
    fn every_node_with_a_link_is_named_once() {
        let mut seen = std::collections::BTreeSet::new();
        for (node, iface, ..) in LINKS {
            assert!(seen.insert((node, iface)), "{node} {iface} twice");
            assert!(format!("{node}-{iface}").len() <= 15, "switch port name too long for {node}");
        }
    }
}

/// One HTTPS request to the site through the VIP.
#[derive(Clone, Debug)]
pub enum Req {
    /// GET `path`.
    Get(String),
    /// POST `path` with `body`.
    Post(String, String),
}

/// How a batch of requests uses connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conn {
    /// HTTP/1.1, `Connection: close`: a new TCP and TLS connection per request.
    NewEach,
    /// HTTP/1.1 keep-alive: one connection for the batch (while the server keeps it).
    KeepAlive1,
    /// HTTP/2 (ALPN): one connection for the batch.
    KeepAlive2,
}

/// What one request got back.
#[derive(Clone, Debug)]
pub struct Answer {
    pub status: u16,
    pub body: String,
    /// `h1.1`/`h2`, as curl negotiated it.
    pub version: String,
    /// New connections curl made for it (0: reused).
    pub connects: u32,
    /// curl's error, when it could not complete the request.
    pub error: String,
}

const MARK: &str = "\n@@rampart-stack@@";

impl Stack {
    /// Sends `reqs` from `node` with one curl process, in order, and returns every answer (a
    /// request curl could not complete has status 0). Bounded: 10 s per request.
    pub fn batch(&self, node: &str, reqs: &[Req], conn: Conn) -> Result<Vec<Answer>> {
        let mut cmd = self.ns(node).command("curl");
        for (i, r) in reqs.iter().enumerate() {
            if i > 0 {
                cmd.arg("--next");
            }
            cmd.args(["-sS", "--max-time", "10", "-o", "-", "-w"]);
            cmd.arg(format!("{MARK}%{{http_code}} %{{http_version}} %{{num_connects}} %{{errormsg}}\n"));
            cmd.args(["--resolve", &format!("{SITE}:443:{VIP}"), "--cacert"]).arg(&self.public_ca);
            match conn {
                Conn::NewEach => {
                    cmd.args(["--http1.1", "-H", "Connection: close"]);
                }
                Conn::KeepAlive1 => {
                    cmd.arg("--http1.1");
                }
                Conn::KeepAlive2 => {
                    cmd.arg("--http2");
                }
            }
            let path = match r {
                Req::Get(p) => p,
                Req::Post(p, body) => {
                    cmd.args(["-X", "POST", "--data-binary", body]);
                    p
                }
            };
            cmd.arg(format!("https://{SITE}{path}"));
        }
        // Failures are answers with status 0, not an error of the batch: curl's exit status is
        // the last transfer's.
        let out = output(&mut cmd)?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut answers = Vec::new();
        let mut rest: &str = &text;
        while let Some(i) = rest.find(MARK) {
            let body = &rest[..i];
            let after = &rest[i + MARK.len()..];
            let (line, tail) = after.split_once('\n').unwrap_or((after, ""));
            let mut f = line.split_whitespace();
            let status = f.next().and_then(|s| s.parse().ok()).unwrap_or(0);
            let version = match f.next() {
                Some("2") => "h2".to_string(),
                Some(v) => format!("h{v}"),
                None => String::new(),
            };
            let connects = f.next().and_then(|s| s.parse().ok()).unwrap_or(0);
            let error = f.collect::<Vec<_>>().join(" ");
            answers.push(Answer { status, body: body.to_string(), version, connects, error });
            rest = tail;
        }
        if answers.len() != reqs.len() {
            return Err(step(
                format!("curl batch of {} from {node}", reqs.len()),
                format!("{} answers; stderr: {}", answers.len(), String::from_utf8_lossy(&out.stderr)),
            ));
        }
        Ok(answers)
    }

    /// The sum of every sample of `metric` (a family name, labels ignored unless `filter`
    /// appears in the sample's line) in `node`'s /metrics.
    pub fn metric_sum(&self, node: &str, metric: &str, filter: &str) -> Result<f64> {
        Ok(sum_samples(&self.metrics(node)?, metric, filter))
    }
}

/// The sum of the samples of `metric` in an exposition text whose line contains `filter`.
pub fn sum_samples(text: &str, metric: &str, filter: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.strip_prefix(metric).is_some_and(|r| r.starts_with('{') || r.starts_with(' ')))
        .filter(|l| l.contains(filter))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
