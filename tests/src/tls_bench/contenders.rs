//! The backend (nginx serving a static file) and the three TLS-terminating proxies, each from
//! a config generated here, listening on free loopback ports.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use super::{
    BODY, BenchCert, BenchError, PATH, WorkDir,
    cgroup::{Cgroup, CpuLimit, Throttling},
    procs::{Cpus, Proc, descendants, free_loopback_addr},
    write_file,
};

const START_WITHIN: Duration = Duration::from_secs(20);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Rampart,
    /// rampart with `[admin] latency_histograms = false`: beside [`Kind::Rampart`], the cost of
    /// the per-request latency histograms (same binary, same run).
    RampartNoHistograms,
    /// A second, identical rampart (histograms on): beside [`Kind::Rampart`], the bench's own
    /// bias and noise for a pair of contenders that do exactly the same work (an A/A control
    /// for the histograms' cost).
    RampartTwin,
    Haproxy,
    Nginx,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Rampart => "rampart",
            Kind::RampartNoHistograms => "rampart-nohist",
            Kind::RampartTwin => "rampart-twin",
            Kind::Haproxy => "HAProxy",
            Kind::Nginx => "nginx",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        match s.to_ascii_lowercase().as_str() {
            "rampart" => Some(Kind::Rampart),
            "rampart-nohist" => Some(Kind::RampartNoHistograms),
            "rampart-twin" => Some(Kind::RampartTwin),
            "haproxy" => Some(Kind::Haproxy),
            "nginx" => Some(Kind::Nginx),
            _ => None,
        }
    }
}

/// A running server; stopped on drop.
pub struct Server {
    pub kind: Option<Kind>,
    pub addr: SocketAddr,
    pub version: String,
    /// How it was set up, for the report (threads, notable settings).
    pub setup: String,
    pub config: PathBuf,
    pub proc: Proc,
    /// The contender's CPU budget. Declared after `proc` so that drop stops the server before
    /// the cgroup is emptied and removed.
    pub cgroup: Option<Cgroup>,
}

impl Server {
    /// CPU time (ticks) of the server and its worker processes so far.
    pub fn ticks(&self) -> u64 {
        super::procs::tree_ticks(self.proc.pid())
    }

    /// Fails unless every process of the server is in its cgroup (when it has one).
    pub fn check_cgroup(&self) -> Result<(), BenchError> {
        let Some(cg) = &self.cgroup else { return Ok(()) };
        let mut pids = vec![self.proc.pid()];
        pids.extend(descendants(self.proc.pid()));
        Ok(cg.check_holds(&self.proc.name, &pids)?)
    }

    /// Throttling counters of its cgroup, to take differences of.
    pub fn cpu_stat(&self) -> Option<super::cgroup::CpuStat> {
        self.cgroup.as_ref().map(Cgroup::stat)
    }

    /// Throttling since `before` (from [`Server::cpu_stat`]) over `wall`.
    pub fn throttling_since(&self, before: Option<super::cgroup::CpuStat>, wall: Duration) -> Option<Throttling> {
        Some(Throttling::between(&before?, &self.cpu_stat()?, wall))
    }

    /// Runs `f` with the contender's CPU quota lifted (when it has one; its pinning stays) and
    /// sets the quota again afterwards, also when `f` fails.
    pub fn without_budget<T>(&mut self, f: impl FnOnce(&mut Server) -> Result<T, BenchError>) -> Result<T, BenchError> {
        if let Some(cg) = &self.cgroup {
            cg.lift()?;
        }
        let result = f(self);
        if let Some(cg) = &self.cgroup {
            cg.restore()?;
        }
        result
    }

    /// The server's process and all its descendants (nginx's workers).
    pub fn pids(&self) -> Vec<u32> {
        let mut pids = vec![self.proc.pid()];
        pids.extend(descendants(self.proc.pid()));
        pids
    }

    /// Resident set size of all its processes summed, KiB.
    pub fn rss_kib(&self) -> u64 {
        self.pids().into_iter().filter_map(super::procs::rss_kib).sum()
    }

    /// Threads of the server's processes (for the report): (processes, threads).
    pub fn threads(&self) -> (usize, usize) {
        let mut pids = vec![self.proc.pid()];
        if let Ok(rd) = std::fs::read_dir("/proc") {
            for e in rd.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                let ppid = stat
                    .rfind(')')
                    .and_then(|i| stat.get(i + 2..))
                    .and_then(|r| r.split_whitespace().nth(1))
                    .and_then(|p| p.parse::<u32>().ok());
                if ppid == Some(self.proc.pid()) {
                    pids.push(pid);
                }
            }
        }
        let threads =
            pids.iter().map(|p| std::fs::read_dir(format!("/proc/{p}/task")).map(|d| d.count()).unwrap_or(0)).sum();
        (pids.len(), threads)
    }
}

fn first_line(out: &std::process::Output) -> String {
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    text.lines().next().unwrap_or("").trim().to_string()
}

pub fn nginx_version() -> String {
    Command::new("nginx")
        .arg("-v")
        .output()
        .map(|o| first_line(&o))
        .map(|l| l.rsplit('/').next().unwrap_or(&l).to_string())
        .unwrap_or_else(|_| "?".into())
}

pub fn haproxy_version() -> String {
    Command::new("haproxy")
        .arg("-v")
        .output()
        .map(|o| first_line(&o))
        .map(|l| l.split_whitespace().nth(2).unwrap_or("?").to_string())
        .unwrap_or_else(|_| "?".into())
}

/// Keeps nginx's temp directories inside `dir` (the defaults are under /var/lib/nginx).
fn nginx_http_paths(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  \
         uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n"
    )
}

fn start_nginx(
    name: &str,
    dir: &Path,
    conf: &str,
    cpus: &Cpus,
    addr: SocketAddr,
    cgroup: Option<&Cgroup>,
) -> Result<Proc, BenchError> {
    let conf_path = write_file(&dir.join("nginx.conf"), conf)?;
    let mut cmd = cpus.command("nginx");
    cmd.arg("-p").arg(dir).arg("-e").arg(dir.join("error.log")).arg("-c").arg(&conf_path);
    let mut p = Proc::spawn_in(name, cmd, &dir.join("stdout.log"), cgroup)?;
    p.wait_port(addr, START_WITHIN).map_err(|e| with_log(e, &dir.join("error.log")))?;
    Ok(p)
}

/// Adds nginx's error log (where it says why it did not start) to a start-up error.
fn with_log(e: BenchError, log: &Path) -> BenchError {
    match std::fs::read_to_string(log) {
        Ok(text) if !text.trim().is_empty() => BenchError::Msg(format!("{e}\n{}:\n{text}", log.display())),
        _ => e,
    }
}

/// The one backend every contender proxies to: nginx serving [`BODY`] from a static file at
/// [`PATH`], HTTP/1.1 keep-alive without a request limit.
pub fn start_backend(work: &WorkDir, cpus: &Cpus) -> Result<Server, BenchError> {
    let dir = work.sub("backend")?;
    let www = dir.join("www");
    std::fs::create_dir_all(&www).map_err(|e| BenchError::io("create www", e))?;
    write_file(&www.join(PATH.trim_start_matches('/')), BODY)?;
    let addr = free_loopback_addr()?;
    let conf = format!(
        "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nevents {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n{paths}  default_type text/plain;\n  sendfile off;\n  tcp_nodelay on;\n  \
         open_file_cache max=16;\n  keepalive_requests 1000000;\n  keepalive_timeout 300s;\n  \
         server {{\n    listen {addr} backlog=4096;\n    root {www};\n  }}\n}}\n",
        d = dir.display(),
        paths = nginx_http_paths(&dir),
        www = www.display(),
    );
    let proc = start_nginx("backend nginx", &dir, &conf, cpus, addr, None)?;
    Ok(Server {
        kind: None,
        addr,
        version: nginx_version(),
        // sendfile off: for a 100-byte file, pread + one writev costs the backend ~8 µs a request
        // here against ~12 µs for writev + sendfile (two segments), and the backend shares the
        // clients' CPU.
        setup: "1 worker process, static file, sendfile off, keep-alive (keepalive_requests 1000000)".into(),
        config: dir.join("nginx.conf"),
        proc,
        cgroup: None,
    })
}

/// What every contender is started with.
#[derive(Clone, Copy)]
pub struct Setup<'a> {
    pub work: &'a WorkDir,
    pub cert: &'a BenchCert,
    /// The backend every contender proxies to.
    pub backend: SocketAddr,
    pub threads: usize,
    pub cpus: &'a Cpus,
    pub rampart_bin: &'a Path,
    /// The CPU budget; each contender gets a cgroup of its own with it.
    pub limit: Option<&'a CpuLimit>,
    /// Client connections each contender must hold at once (the idle-memory measurement);
    /// HAProxy's maxconn and nginx's worker_connections are raised to fit them.
    pub max_clients: usize,
}

/// Starts one contender terminating TLS with the bench certificate and proxying to the
/// backend, in a cgroup of its own when there is a CPU budget.
pub fn start(kind: Kind, setup: &Setup) -> Result<Server, BenchError> {
    let addr = free_loopback_addr()?;
    let cgroup = setup.limit.map(|l| l.create(kind.name())).transpose()?;
    let cg = cgroup.as_ref();
    let mut server = match kind {
        Kind::Rampart | Kind::RampartNoHistograms | Kind::RampartTwin => start_rampart(setup, addr, cg, kind),
        Kind::Haproxy => start_haproxy(setup, addr, cg),
        Kind::Nginx => start_nginx_proxy(setup, addr, cg),
    }?;
    server.cgroup = cgroup;
    server.check_cgroup()?;
    Ok(server)
}

/// rampart's config as every rampart contender runs it (`kind` says whether histograms are on),
/// written in the work directory's `dir` (its own control socket there): (its path, `dir`).
pub fn rampart_config(
    setup: &Setup,
    addr: SocketAddr,
    kind: Kind,
    dir: &str,
) -> Result<(PathBuf, PathBuf), BenchError> {
    let Setup { work, cert, backend, .. } = *setup;
    let histograms = kind != Kind::RampartNoHistograms;
    let dir = work.sub(dir)?;
    let conf = format!(
        "[admin]\ncontrol_socket = \"{sock}\"\ndrain_timeout = \"1s\"\nlatency_histograms = {histograms}\n\n\
         [[https]]\nlisten = \"{addr}\"\ncerts = [{{ cert = \"{c}\", key = \"{k}\" }}]\nidle_timeout = \"5m\"\n\n\
         [[route]]\npath = \"/\"\npool = \"bench\"\n\n\
         [[pool]]\nname = \"bench\"\nbackends = [\"{backend}\"]\nbalance = \"round-robin\"\n\
         max_idle = 1024\nidle_timeout = \"5m\"\n",
        sock = dir.join("control.sock").display(),
        c = cert.cert_pem.display(),
        k = cert.key_pem.display(),
    );
    Ok((write_file(&dir.join("rampart.toml"), conf)?, dir))
}

fn start_rampart(setup: &Setup, addr: SocketAddr, cgroup: Option<&Cgroup>, kind: Kind) -> Result<Server, BenchError> {
    let Setup { threads, cpus, rampart_bin: bin, .. } = *setup;
    let histograms = kind != Kind::RampartNoHistograms;
    let (config, dir) = rampart_config(setup, addr, kind, kind.name())?;
    let mut cmd = cpus.command(&bin.to_string_lossy());
    cmd.args(["serve", "--config"]).arg(&config);
    // The tokio runtime's worker count; tokio reads this variable when the program sets none.
    cmd.env("TOKIO_WORKER_THREADS", threads.to_string());
    cmd.env("RUST_LOG", "info");
    let mut proc = Proc::spawn_in(kind.name(), cmd, &dir.join("rampart.log"), cgroup)?;
    proc.wait_port(addr, START_WITHIN)?;
    let version = Command::new(bin)
        .arg("--version")
        .output()
        .map(|o| first_line(&o))
        .map(|l| l.split_whitespace().nth(1).unwrap_or("?").to_string())
        .unwrap_or_else(|_| "?".into());
    Ok(Server {
        kind: Some(kind),
        addr,
        version,
        setup: format!(
            "tokio multi-thread runtime with {threads} worker thread(s) (TOKIO_WORKER_THREADS={threads}), \
             rustls aws-lc-rs, session tickets + cache as shipped, no health checks, latency histograms {}",
            if histograms { "on (the default)" } else { "off (`[admin] latency_histograms = false`)" }
        ),
        config,
        proc,
        cgroup: None,
    })
}

fn start_haproxy(setup: &Setup, addr: SocketAddr, cgroup: Option<&Cgroup>) -> Result<Server, BenchError> {
    let Setup { work, cert, backend, threads, cpus, max_clients, .. } = *setup;
    let dir = work.sub("haproxy")?;
    let maxconn = (max_clients + 1024).max(4096);
    let mut conf = String::new();
    let _ = write!(
        conf,
        "global\n  nbthread {threads}\n  maxconn {maxconn}\n  ssl-default-bind-options ssl-min-ver TLSv1.2\n\n\
         defaults\n  mode http\n  http-reuse always\n  option forwardfor\n  timeout connect 5s\n  \
         timeout client 300s\n  timeout server 300s\n  timeout http-keep-alive 300s\n\n\
         frontend bench\n  bind {addr} ssl crt {crt} alpn h2,http/1.1 ssl-min-ver TLSv1.2\n  \
         http-request set-header X-Forwarded-Proto https\n  \
         http-request set-header Forwarded \"for=%[src];proto=https\"\n  default_backend web\n\n\
         backend web\n  server s1 {backend}\n",
        crt = cert.combined_pem.display(),
    );
    let config = write_file(&dir.join("haproxy.cfg"), conf)?;
    let mut cmd = cpus.command("haproxy");
    // -db: stay in the foreground, no master process; one process with `nbthread` threads.
    cmd.arg("-db").arg("-f").arg(&config);
    let mut proc = Proc::spawn_in("haproxy", cmd, &dir.join("haproxy.log"), cgroup)?;
    proc.wait_port(addr, START_WITHIN)?;
    Ok(Server {
        kind: Some(Kind::Haproxy),
        addr,
        version: haproxy_version(),
        setup: format!(
            "nbthread {threads}, mode http, http-reuse always, option forwardfor, OpenSSL {} (Debian), \
             session cache + tickets as shipped",
            openssl_version()
        ),
        config,
        proc,
        cgroup: None,
    })
}

fn start_nginx_proxy(setup: &Setup, addr: SocketAddr, cgroup: Option<&Cgroup>) -> Result<Server, BenchError> {
    let Setup { work, cert, backend, threads, cpus, max_clients, .. } = *setup;
    let dir = work.sub("nginx")?;
    // Each client connection and each backend connection counts.
    let worker_connections = (2 * max_clients + 1024).max(8192);
    let conf = format!(
        "daemon off;\nworker_processes {threads};\npid {d}/nginx.pid;\nevents {{ worker_connections {worker_connections}; }}\n\
         http {{\n  access_log off;\n{paths}  tcp_nodelay on;\n  keepalive_requests 1000000;\n  \
         keepalive_timeout 300s;\n  ssl_protocols TLSv1.2 TLSv1.3;\n  ssl_session_cache shared:SSL:10m;\n  \
         ssl_session_tickets on;\n\
         \x20 upstream web {{\n    server {backend};\n    keepalive 1024;\n    keepalive_requests 1000000;\n    \
         keepalive_timeout 300s;\n  }}\n\
         \x20 server {{\n    listen {addr} ssl http2 backlog=4096;\n    ssl_certificate {c};\n    \
         ssl_certificate_key {k};\n    location / {{\n      proxy_pass http://web;\n      \
         proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_set_header Host $host;\n      \
         proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n      \
         proxy_set_header X-Forwarded-Proto https;\n      \
         proxy_set_header Forwarded \"for=$remote_addr;proto=https\";\n    }}\n  }}\n}}\n",
        d = dir.display(),
        paths = nginx_http_paths(&dir),
        c = cert.cert_pem.display(),
        k = cert.key_pem.display(),
    );
    let proc = start_nginx("nginx proxy", &dir, &conf, cpus, addr, cgroup)?;
    Ok(Server {
        kind: Some(Kind::Nginx),
        addr,
        version: nginx_version(),
        setup: format!(
            "worker_processes {threads}, proxy_http_version 1.1, upstream keepalive 1024, \
             OpenSSL {} (Debian), ssl_session_cache shared + tickets",
            openssl_version()
        ),
        config: dir.join("nginx.conf"),
        proc,
        cgroup: None,
    })
}

pub fn openssl_version() -> String {
    Command::new("openssl")
        .arg("version")
        .output()
        .map(|o| first_line(&o))
        .map(|l| l.split_whitespace().nth(1).unwrap_or("?").to_string())
        .unwrap_or_else(|_| "?".into())
}
