//! Helpers for the `rampart serve` integration tests: certificates made at test time (rcgen),
//! small hyper backends, the daemon as a child process, and real clients (curl, openssl,
//! h2load, nginx). Each test runs in a network namespace of its own ([`isolated`]), so
//! everything it starts listens on that namespace's loopback, never the host's.
#![allow(dead_code)]

use std::{
    convert::Infallible,
    io::Write,
    net::{SocketAddr, TcpListener as StdListener},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU16, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Runs a test's body in a network namespace of its own (only loopback, up), on a two-thread
/// tokio runtime: the daemon, backends, clients and nginx it starts are all inside. The namespace
/// ends with the test. Without root the test fails, saying so.
pub fn isolated<F, Fut>(body: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    rampart::netns::in_private_netns(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(body());
    })
    .unwrap_or_else(|e| panic!("{e}"));
}

/// A scratch directory with a test CA (also written as ca.pem) and two certificates:
/// `site.test` (the default, also valid for 127.0.0.1) and `api.test`.
pub struct Site {
    pub dir: TestDir,
    pub ca: Ca,
    pub ca_file: PathBuf,
}

impl Site {
    pub fn new(name: &str) -> Self {
        let dir = TestDir::new(name);
        let ca = Ca::new("rampart test CA");
        let ca_file = dir.write("ca.pem", &ca.pem);
        ca.write_leaf(&dir, "site", "site.test", &["site.test", "127.0.0.1"]);
        ca.write_leaf(&dir, "api", "api.test", &["api.test"]);
        Site { dir, ca, ca_file }
    }

    /// The text of a rampart.toml: the admin listener and control socket (relative, so at
    /// `dir/control.sock` beside the file, whatever the daemon's working directory), one https listener
    /// serving both certificates (with `https_extra` added to its table), then `rest`.
    pub fn config_text(&self, listen: SocketAddr, admin: SocketAddr, https_extra: &str, rest: &str) -> String {
        format!(
            r#"[admin]
listen = "{admin}"
control_socket = "control.sock"
drain_timeout = "5s"

[[https]]
listen = "{listen}"
certs = [
  {{ cert = "site.pem", key = "site.key" }},
  {{ cert = "api.pem", key = "api.key", names = ["api.test"] }},
]
{https_extra}

{rest}
"#
        )
    }

    /// Writes `config_text` as rampart.toml and returns its path.
    pub fn config(&self, listen: SocketAddr, admin: SocketAddr, https_extra: &str, rest: &str) -> PathBuf {
        self.dir.write("rampart.toml", &self.config_text(listen, admin, https_extra, rest))
    }
}

/// The routes and pools of a site with one pool, `web`, of one backend, that takes every request.
pub fn one_pool(backend: SocketAddr) -> String {
    format!("[[route]]\npool = \"web\"\n\n[[pool]]\nname = \"web\"\nbackends = [\"{backend}\"]\n")
}

/// A loopback address with a port that was free a moment ago.
pub fn free_addr() -> SocketAddr {
    let l = StdListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A scratch directory removed on drop.
pub struct TestDir(pub PathBuf);

impl TestDir {
    pub fn new(name: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "rampart-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TestDir(p)
    }
    pub fn path(&self, f: &str) -> PathBuf {
        self.0.join(f)
    }
    pub fn write(&self, f: &str, content: &str) -> PathBuf {
        let p = self.path(f);
        std::fs::write(&p, content).unwrap();
        p
    }
    /// Replaces a file atomically (write aside, rename), as deployment tools do.
    pub fn replace(&self, f: &str, content: &str) {
        let tmp = self.path(&format!(".{f}.tmp"));
        std::fs::write(&tmp, content).unwrap();
        std::fs::rename(&tmp, self.path(f)).unwrap();
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A test CA that signs leaf certificates (ECDSA P-256, generated per run; never committed).
pub struct Ca {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
    pub pem: String,
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        let pem = cert.pem();
        Ca { cert, key, pem }
    }

    /// A leaf certificate for `names` (DNS names or IP addresses), CN = `cn`: (cert PEM, key PEM).
    pub fn leaf(&self, cn: &str, names: &[&str]) -> (String, String) {
        let mut p = rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Writes a leaf pair as NAME.pem / NAME.key into `dir`.
    pub fn write_leaf(&self, dir: &TestDir, name: &str, cn: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let (c, k) = self.leaf(cn, names);
        (dir.write(&format!("{name}.pem"), &c), dir.write(&format!("{name}.key"), &k))
    }
}

/// What a test backend saw and can be told to do.
#[derive(Default)]
pub struct BackendState {
    pub hits: AtomicUsize,
    /// Status of `/healthz` (200 unless changed).
    pub health: AtomicU16,
    pub health_hits: AtomicUsize,
    /// Source addresses announced by PROXY headers, in arrival order.
    pub proxy_sources: Mutex<Vec<String>>,
    pub local_headers: AtomicUsize,
}

/// A small HTTP/1.1 backend. Answers `/healthz` with the configured status, `/slow?ms=N` after N
/// milliseconds, a path ending in `/status?code=N` with status N, anything else at once (200);
/// the body names the backend and echoes the forwarding headers it received.
pub struct TestBackend {
    pub addr: SocketAddr,
    pub name: String,
    pub state: Arc<BackendState>,
    stop: CancellationToken,
}

impl TestBackend {
    pub async fn start(name: &str, addr: SocketAddr) -> Self {
        Self::start_with(name, addr, None, false).await
    }

    /// `tls`: (cert PEM, key PEM) to serve HTTPS; `proxy_protocol`: expect a PROXY header first.
    pub async fn start_with(name: &str, addr: SocketAddr, tls: Option<(String, String)>, proxy_protocol: bool) -> Self {
        let state = Arc::new(BackendState::default());
        state.health.store(200, Ordering::SeqCst);
        let stop = CancellationToken::new();
        let listener = TcpListener::bind(addr).await.unwrap();
        let acceptor = tls.map(|(c, k)| {
            use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
            let chain: Vec<_> = CertificateDer::pem_slice_iter(c.as_bytes()).map(|c| c.unwrap()).collect();
            let key = PrivateKeyDer::from_pem_slice(k.as_bytes()).unwrap();
            let cfg =
                rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
                    .with_safe_default_protocol_versions()
                    .unwrap()
                    .with_no_client_auth()
                    .with_single_cert(chain, key)
                    .unwrap();
            tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
        });
        let (st, stp, nm) = (state.clone(), stop.clone(), name.to_string());
        tokio::spawn(async move {
            loop {
                let (mut tcp, peer) = tokio::select! {
                    _ = stp.cancelled() => return,
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                };
                let (st, stp, nm, acceptor) = (st.clone(), stp.clone(), nm.clone(), acceptor.clone());
                tokio::spawn(async move {
                    let mut pp_src = None;
                    if proxy_protocol {
                        match rampart::serve::proxy_protocol::read_header(&mut tcp, Duration::from_secs(5)).await {
                            Ok(rampart::serve::proxy_protocol::ProxyHeader::Proxied { src, .. }) => {
                                st.proxy_sources.lock().unwrap().push(src.to_string());
                                pp_src = Some(src);
                            }
                            Ok(rampart::serve::proxy_protocol::ProxyHeader::Local) => {
                                st.local_headers.fetch_add(1, Ordering::SeqCst);
                            }
                            Err(_) => return,
                        }
                    }
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (st, nm) = (st.clone(), nm.clone());
                        async move { Ok::<_, Infallible>(answer(&st, &nm, peer, pp_src, req).await) }
                    });
                    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    match acceptor {
                        Some(a) => {
                            let Ok(tls) = a.accept(tcp).await else { return };
                            tokio::select! {
                                _ = stp.cancelled() => {}
                                _ = builder.serve_connection(TokioIo::new(tls), svc) => {}
                            }
                        }
                        None => {
                            tokio::select! {
                                _ = stp.cancelled() => {}
                                _ = builder.serve_connection(TokioIo::new(tcp), svc) => {}
                            }
                        }
                    }
                });
            }
        });
        TestBackend { addr, name: name.to_string(), state, stop }
    }

    /// Stops listening and drops every open connection (a dead server).
    pub fn kill(&self) {
        self.stop.cancel();
    }

    pub fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn answer(
    st: &BackendState,
    name: &str,
    peer: SocketAddr,
    pp: Option<SocketAddr>,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    if path == "/healthz" {
        st.health_hits.fetch_add(1, Ordering::SeqCst);
        let mut r = Response::new(Full::new(Bytes::from_static(b"health\n")));
        *r.status_mut() = http::StatusCode::from_u16(st.health.load(Ordering::SeqCst)).unwrap();
        return r;
    }
    st.hits.fetch_add(1, Ordering::SeqCst);
    if path == "/slow" {
        let ms: u64 =
            req.uri().query().and_then(|q| q.strip_prefix("ms=")).and_then(|v| v.parse().ok()).unwrap_or(1000);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let h = |n: &str| {
        req.headers().get_all(n).iter().map(|v| v.to_str().unwrap_or("?").to_string()).collect::<Vec<_>>().join(" | ")
    };
    let head = format!(
        "backend={name}\nmethod={}\nversion={:?}\npath={path}\nhost={}\nxff={}\nxfp={}\nforwarded={}\npeer={}\npp_src={}\n",
        req.method(),
        req.version(),
        h("host"),
        h("x-forwarded-for"),
        h("x-forwarded-proto"),
        h("forwarded"),
        peer.ip(),
        pp.map(|p| p.to_string()).unwrap_or_default(),
    );
    let status = match req.uri().query().and_then(|q| q.strip_prefix("code=")) {
        Some(code) if path.ends_with("/status") => http::StatusCode::from_bytes(code.as_bytes()).unwrap(),
        _ => http::StatusCode::OK,
    };
    let body = req.into_body().collect().await.map(|b| b.to_bytes().len()).unwrap_or(0);
    let text = format!("{head}body_len={body}\n");
    let mut r = Response::new(Full::new(Bytes::from(text)));
    *r.status_mut() = status;
    r.headers_mut().insert("x-backend", http::HeaderValue::from_str(name).unwrap());
    r
}

/// A value from a test backend's answer (`key=value` lines).
pub fn field<'a>(body: &'a str, key: &str) -> &'a str {
    body.lines().find_map(|l| l.strip_prefix(&format!("{key}="))).unwrap_or_else(|| panic!("no {key} in {body:?}"))
}

/// The daemon as a child process; killed on drop if still running.
pub struct Daemon {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Daemon {
    pub fn start(config: &Path, log: &Path) -> Self {
        Self::start_logging(config, log, "info")
    }

    /// Starts the daemon with `RUST_LOG` set to `filter`.
    pub fn start_logging(config: &Path, log: &Path, filter: &str) -> Self {
        let out = std::fs::File::create(log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_rampart"))
            .args(["serve", "--config"])
            .arg(config)
            .env("RUST_LOG", filter)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let d = Daemon { child: Some(child), log: log.to_path_buf() };
        d.wait_log("rampart serve: ready");
        d
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (bounded: 20 s) for a line containing `needle` in the daemon's log.
    pub fn wait_log(&self, needle: &str) {
        for _ in 0..400 {
            if self.log_text().contains(needle) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("daemon log never showed {needle:?}:\n{}", self.log_text());
    }

    pub fn count_log(&self, needle: &str) -> usize {
        self.log_text().matches(needle).count()
    }

    pub fn signal(&self, sig: i32) {
        let pid = self.child.as_ref().unwrap().id() as i32;
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    }

    /// Waits (bounded: 30 s) for the daemon to exit.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let c = self.child.as_mut().unwrap();
        for _ in 0..600 {
            if let Some(s) = c.try_wait().unwrap() {
                return s;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("daemon did not exit:\n{}", self.log_text());
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs rampart's CLI.
pub fn rampart(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rampart")).args(args).output().unwrap()
}

/// A response as curl saw it.
#[derive(Debug)]
pub struct Curl {
    pub status: u16,
    pub version: String,
    pub headers: String,
    pub body: String,
}

impl Curl {
    pub fn header(&self, name: &str) -> Option<String> {
        let want = format!("{}:", name.to_ascii_lowercase());
        self.headers.lines().find_map(|l| {
            let lower = l.to_ascii_lowercase();
            lower.starts_with(&want).then(|| l[want.len()..].trim().to_string())
        })
    }
}

/// `curl` against `https://HOST:PORT/PATH` resolved to `addr`, trusting `cacert`.
pub fn curl_https(addr: SocketAddr, host: &str, path: &str, cacert: &Path, extra: &[&str]) -> Curl {
    let url = format!("https://{host}:{}{path}", addr.port());
    let resolve = format!("{host}:{}:{}", addr.port(), addr.ip());
    let mut args = vec!["--resolve", &resolve, "--cacert", cacert.to_str().unwrap()];
    args.extend_from_slice(extra);
    curl(&url, &args)
}

pub fn curl(url: &str, extra: &[&str]) -> Curl {
    let dir = TestDir::new("curl");
    let hdr = dir.path("headers");
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "-o", "-", "-D"])
        .arg(&hdr)
        .args(["-w", "\n@@%{http_code} %{http_version}"])
        .args(extra)
        .arg(url)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, meta) = stdout.rsplit_once("\n@@").unwrap_or((&stdout, "0 0"));
    let (status, version) = meta.split_once(' ').unwrap_or(("0", "0"));
    Curl {
        status: status.trim().parse().unwrap_or(0),
        version: version.trim().to_string(),
        headers: std::fs::read_to_string(&hdr).unwrap_or_default(),
        body: body.to_string(),
    }
}

/// Blocking HTTP GET over plain TCP, for the admin listener.
pub fn http_get(addr: SocketAddr, path: &str) -> String {
    curl(&format!("http://{addr}{path}"), &[]).body
}

/// A metric's value from `/metrics` text (sum over the series whose labels contain all of `labels`).
pub fn metric(metrics: &str, name: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

/// Polls `f` (bounded: `tries` × 100 ms) until it returns true.
pub async fn eventually(tries: usize, mut f: impl FnMut() -> bool) -> bool {
    for _ in 0..tries {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// nginx from Debian, on a generated config; stopped on drop.
pub struct Nginx {
    child: Option<Child>,
    pub dir: TestDir,
}

impl Nginx {
    /// Starts nginx serving `body` at every path on `addr` (and 200 on /healthz); with
    /// `proxy_protocol`, the listener expects PROXY headers and echoes the address they carry.
    pub fn start(addr: SocketAddr, body: &str, proxy_protocol: bool) -> Option<Self> {
        if Command::new("nginx").arg("-v").output().is_err() {
            return None;
        }
        let dir = TestDir::new("nginx");
        let pp = if proxy_protocol { " proxy_protocol" } else { "" };
        let conf = format!(
            "daemon off;\nworker_processes 1;\npid {pid};\nerror_log {dir}/error.log;\nevents {{ worker_connections 256; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {dir}/body;\n  proxy_temp_path {dir}/proxy;\n  fastcgi_temp_path {dir}/fcgi;\n  uwsgi_temp_path {dir}/uwsgi;\n  scgi_temp_path {dir}/scgi;\n\
             server {{\n    listen {addr}{pp};\n    location / {{ default_type text/plain; return 200 \"{body}\\nxff=$http_x_forwarded_for\\npp=$proxy_protocol_addr\\n\"; }}\n  }}\n}}\n",
            pid = dir.path("nginx.pid").display(),
            dir = dir.0.display(),
        );
        let conf_path = dir.write("nginx.conf", &conf);
        let child = Command::new("nginx")
            .args(["-p"])
            .arg(&dir.0)
            .arg("-c")
            .arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        // Bounded wait for the port.
        for _ in 0..100 {
            if std::net::TcpStream::connect(addr).is_ok() {
                return Some(Nginx { child: Some(child), dir });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("nginx did not start: {}", std::fs::read_to_string(dir.path("error.log")).unwrap_or_default());
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGQUIT) };
            for _ in 0..40 {
                if c.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Appends `text` to a file (e.g. more config).
pub fn append(path: &Path, text: &str) {
    let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

/// A TLS client connection over `tcp` for `host`, trusting `ca_pem` and offering no ALPN (so
/// the daemon serves it HTTP/1.1).
pub async fn tls_client(
    tcp: tokio::net::TcpStream,
    host: &str,
    ca_pem: &str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rustls_pki_types::{CertificateDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from(host.to_string()).unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await.unwrap()
}

/// Reads until the server closes the connection (bounded: 10 s); returns what was read, or
/// None if the connection was still open at the bound.
pub async fn read_to_close<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    let done = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => all.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    done.ok().map(|()| String::from_utf8_lossy(&all).to_string())
}
