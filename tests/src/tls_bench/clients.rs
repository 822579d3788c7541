//! The load generators: wrk for keep-alive requests (throughput, closed loop), a rustls client
//! that sends keep-alive requests at a fixed rate (latency, open loop), a rustls client for new
//! full handshakes (one request per connection, resumption disabled and checked on every
//! connection), plus a probe that reports what OpenSSL clients negotiate.

use std::{
    cell::RefCell,
    collections::BTreeMap,
    io,
    net::SocketAddr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
    rc::Rc,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use rustls::{
    ClientConfig, DigitallySignedStruct, HandshakeKind, SignatureScheme,
    client::{
        Resumption,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::CryptoProvider,
    pki_types::{CertificateDer, ServerName, UnixTime},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, unix::AsyncFd};

use super::{
    BODY, BenchError, PATH,
    procs::{Cpus, Proc, assert_loopback},
};

/// What OpenSSL-based clients (wrk, openssl s_client) are held to, through OPENSSL_CONF: TLS 1.3
/// only, AES-128-GCM, X25519. The handshake client offers exactly the same.
pub const OPENSSL_CLIENT_CONF: &str = "openssl_conf = openssl_init\n[openssl_init]\nssl_conf = ssl_sect\n\
[ssl_sect]\nsystem_default = system_default_sect\n[system_default_sect]\nMinProtocol = TLSv1.3\n\
Ciphersuites = TLS_AES_128_GCM_SHA256\nGroups = X25519\n";

/// Result of one wrk run.
#[derive(Clone, Debug, Default)]
pub struct WrkResult {
    pub requests: u64,
    pub seconds: f64,
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// connect, read, write, timeout.
    pub socket_errors: [u64; 4],
    pub non_2xx: u64,
}

impl WrkResult {
    pub fn errors(&self) -> u64 {
        self.socket_errors.iter().sum::<u64>() + self.non_2xx
    }
}

/// The wrk command line (keep-alive, fixed connections, one thread, latency percentiles).
pub fn wrk_args(url: &str, connections: usize, duration: Duration) -> Vec<String> {
    vec![
        "-t1".into(),
        format!("-c{connections}"),
        format!("-d{}s", duration.as_secs().max(1)),
        "--latency".into(),
        "--timeout".into(),
        "5s".into(),
        url.into(),
    ]
}

pub fn run_wrk(
    cpus: &Cpus,
    openssl_conf: &Path,
    addr: SocketAddr,
    connections: usize,
    duration: Duration,
    log: &Path,
) -> Result<WrkResult, BenchError> {
    assert_loopback(addr)?;
    let url = format!("https://{addr}{PATH}");
    let mut cmd = cpus.command("wrk");
    cmd.args(wrk_args(&url, connections, duration)).env("OPENSSL_CONF", openssl_conf);
    let mut p = Proc::spawn("wrk", cmd, log)?;
    let status = p.wait_bounded(duration + Duration::from_secs(30))?;
    let out = p.log_text();
    if !status.success() {
        return Err(BenchError::Msg(format!("wrk failed ({status}):\n{out}")));
    }
    parse_wrk(&out)
}

/// "1.23ms" / "456.78us" / "1.02s" / "2.00m" → microseconds.
fn parse_duration_us(s: &str) -> Option<f64> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (n, unit) = s.split_at(split);
    let n: f64 = n.parse().ok()?;
    Some(match unit {
        "us" => n,
        "ms" => n * 1e3,
        "s" => n * 1e6,
        "m" => n * 60e6,
        "h" => n * 3600e6,
        _ => return None,
    })
}

pub fn parse_wrk(out: &str) -> Result<WrkResult, BenchError> {
    let err = |what| BenchError::Parse { tool: "wrk", what, output: out.to_string() };
    let mut r = WrkResult::default();
    let mut saw_rps = false;
    for line in out.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            r.rps = v.trim().parse().map_err(|_| err("Requests/sec"))?;
            saw_rps = true;
        } else if let Some(v) = line.strip_prefix("50%") {
            r.p50_us = parse_duration_us(v).ok_or_else(|| err("50% latency"))?;
        } else if let Some(v) = line.strip_prefix("99%") {
            r.p99_us = parse_duration_us(v).ok_or_else(|| err("99% latency"))?;
        } else if line.contains(" requests in ") {
            // "401234 requests in 10.00s, 80.12MB read"
            let mut it = line.split_whitespace();
            r.requests = it.next().and_then(|n| n.parse().ok()).ok_or_else(|| err("requests"))?;
            r.seconds = it
                .nth(2)
                .map(|s| s.trim_end_matches(','))
                .and_then(parse_duration_us)
                .map(|us| us / 1e6)
                .ok_or_else(|| err("duration"))?;
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            for (i, part) in v.split(',').enumerate().take(4) {
                r.socket_errors[i] = part.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or(0);
            }
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            r.non_2xx = v.trim().parse().unwrap_or(0);
        }
    }
    if !saw_rps || r.p99_us == 0.0 {
        return Err(err("Requests/sec and latency distribution"));
    }
    Ok(r)
}

/// What an OpenSSL client (with [`OPENSSL_CLIENT_CONF`]) negotiates with a server.
pub fn openssl_probe(openssl_conf: &Path, addr: SocketAddr, log: &Path) -> Result<String, BenchError> {
    assert_loopback(addr)?;
    let mut cmd = std::process::Command::new("openssl");
    cmd.args(["s_client", "-brief", "-connect", &addr.to_string()]).env("OPENSSL_CONF", openssl_conf);
    let mut p = Proc::spawn("openssl s_client", cmd, log)?;
    let _ = p.wait_bounded(Duration::from_secs(10))?;
    let out = p.log_text();
    let pick = |key: &str| {
        out.lines().find_map(|l| l.trim().strip_prefix(key).map(|v| v.trim_start_matches(':').trim().to_string()))
    };
    match (pick("Protocol version"), pick("Ciphersuite")) {
        (Some(v), Some(c)) => {
            let kx = pick("Peer Temp Key").or_else(|| pick("Server Temp Key")).unwrap_or_else(|| "?".into());
            Ok(format!("{v} {c} {kx}"))
        }
        _ => Err(BenchError::Parse { tool: "openssl s_client", what: "protocol and cipher", output: out }),
    }
}

/// Accepts exactly the bench's certificate (pinned by its DER) and checks the server's
/// handshake signature on the first and then every [`SIGNATURE_SAMPLE`]th connection. Checking
/// every one (ECDSA P-256 verify) took a quarter of the client's CPU here and made the client,
/// not the server, the limit; the server signs on every handshake either way.
#[derive(Debug)]
struct Pinned {
    der: Vec<u8>,
    provider: Arc<CryptoProvider>,
    seen: AtomicU64,
    checked: Arc<AtomicU64>,
}

/// Every this many connections, the server's handshake signature is verified.
pub const SIGNATURE_SAMPLE: u64 = 32;

impl Pinned {
    fn sample(&self) -> bool {
        let n = self.seen.fetch_add(1, Ordering::Relaxed);
        let check = n.is_multiple_of(SIGNATURE_SAMPLE);
        if check {
            self.checked.fetch_add(1, Ordering::Relaxed);
        }
        check
    }
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.der.as_slice() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General("not the bench certificate".into()))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if !self.sample() {
            return Ok(HandshakeSignatureValid::assertion());
        }
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The handshake client's TLS settings: TLS 1.3, AES-128-GCM, X25519 (what the OpenSSL clients
/// are held to), ALPN http/1.1, and no resumption: no tickets or session IDs are stored, so
/// every connection is a full handshake.
pub struct HandshakeClient {
    pub config: Arc<ClientConfig>,
    /// Server signatures verified so far (see [`SIGNATURE_SAMPLE`]).
    pub signatures_checked: Arc<AtomicU64>,
}

pub fn client_config(pinned_der: &[u8]) -> Result<HandshakeClient, BenchError> {
    let base = rustls::crypto::aws_lc_rs::default_provider();
    let provider = Arc::new(CryptoProvider {
        cipher_suites: vec![rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256],
        kx_groups: vec![rustls::crypto::aws_lc_rs::kx_group::X25519],
        ..base
    });
    let checked = Arc::new(AtomicU64::new(0));
    let mut cfg = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned {
            der: pinned_der.to_vec(),
            provider,
            seen: AtomicU64::new(0),
            checked: checked.clone(),
        }))
        .with_no_client_auth();
    cfg.resumption = Resumption::disabled();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(HandshakeClient { config: Arc::new(cfg), signatures_checked: checked })
}

/// Result of one handshake run.
#[derive(Clone, Debug, Default)]
pub struct HsResult {
    /// Connections that completed a full handshake and a 200 response with the expected body.
    pub ok: u64,
    pub seconds: f64,
    /// Handshakes rustls reported as anything but a plain full handshake (must stay 0).
    pub not_full: u64,
    pub errors: BTreeMap<String, u64>,
    /// Per-connection time (TCP connect to last response byte), microseconds.
    pub p50_us: f64,
    pub p99_us: f64,
    /// Protocol and cipher suite seen.
    pub negotiated: String,
}

impl HsResult {
    pub fn rate(&self) -> f64 {
        if self.seconds > 0.0 { self.ok as f64 / self.seconds } else { 0.0 }
    }
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum::<u64>() + self.not_full
    }
}

/// Index of the `p`th percentile (nearest rank) in a sorted, non-empty slice of `len`.
fn rank(len: usize, p: f64) -> usize {
    (((p / 100.0) * (len - 1) as f64).round() as usize).min(len - 1)
}

pub fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() { 0.0 } else { f64::from(sorted[rank(sorted.len(), p)]) }
}

/// The same, of nanoseconds, in microseconds.
pub fn percentile_us(sorted_ns: &[u64], p: f64) -> f64 {
    if sorted_ns.is_empty() { 0.0 } else { sorted_ns[rank(sorted_ns.len(), p)] as f64 / 1000.0 }
}

#[derive(Default)]
struct HsState {
    ok: u64,
    not_full: u64,
    errors: BTreeMap<String, u64>,
    lat: Vec<u32>,
    negotiated: Option<String>,
}

/// New connections for `duration` from `concurrency` connections at a time, each doing one
/// full TLS handshake and one `GET PATH` with `Connection: close`, read to the end. Runs on the
/// calling thread (the bench pins itself to the client CPUs).
pub fn run_handshakes(
    cfg: Arc<ClientConfig>,
    addr: SocketAddr,
    concurrency: usize,
    duration: Duration,
) -> Result<HsResult, BenchError> {
    assert_loopback(addr)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| BenchError::io("tokio runtime", e))?;
    let state = Rc::new(RefCell::new(HsState::default()));
    let connector = tokio_rustls::TlsConnector::from(cfg);
    let request = format!(
        "GET {PATH} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: rampart-tls-bench\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    let start = Instant::now();
    let deadline = tokio::time::Instant::from_std(start + duration);
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        for _ in 0..concurrency.max(1) {
            let (state, connector, request) = (state.clone(), connector.clone(), request.clone());
            tokio::task::spawn_local(async move {
                loop {
                    let t0 = Instant::now();
                    let one = tokio::time::timeout(Duration::from_secs(10), one_connection(&connector, addr, &request));
                    // Work still in flight at the deadline is dropped, not counted.
                    let Ok(r) = tokio::time::timeout_at(deadline, one).await else { return };
                    let mut s = state.borrow_mut();
                    match r {
                        Ok(Ok(negotiated)) => {
                            s.ok += 1;
                            s.lat.push(t0.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                            if s.negotiated.is_none() {
                                s.negotiated = Some(negotiated);
                            }
                        }
                        Ok(Err(ConnFail::NotFull)) => s.not_full += 1,
                        Ok(Err(ConnFail::Other(kind))) => *s.errors.entry(kind).or_default() += 1,
                        Err(_) => *s.errors.entry("timeout (10 s)".into()).or_default() += 1,
                    }
                }
            });
        }
        tokio::time::sleep_until(deadline).await;
    });
    let seconds = start.elapsed().as_secs_f64().min(duration.as_secs_f64()).max(1e-3);
    drop(local);
    drop(rt);
    let mut s =
        Rc::try_unwrap(state).map_err(|_| BenchError::Msg("handshake tasks still hold state".into()))?.into_inner();
    s.lat.sort_unstable();
    Ok(HsResult {
        ok: s.ok,
        seconds,
        not_full: s.not_full,
        p50_us: percentile(&s.lat, 50.0),
        p99_us: percentile(&s.lat, 99.0),
        errors: s.errors,
        negotiated: s.negotiated.unwrap_or_default(),
    })
}

enum ConnFail {
    NotFull,
    Other(String),
}

async fn one_connection(
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
    request: &str,
) -> Result<String, ConnFail> {
    let fail = |what: &str| ConnFail::Other(what.to_string());
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|_| fail("connect"))?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::IpAddress(addr.ip().into());
    let mut tls = connector.connect(name, tcp).await.map_err(|_| fail("handshake"))?;
    let negotiated = {
        let c = tls.get_ref().1;
        if c.handshake_kind() != Some(HandshakeKind::Full) {
            return Err(ConnFail::NotFull);
        }
        format!(
            "{:?} {:?}",
            c.protocol_version().map_or(rustls::ProtocolVersion::Unknown(0), |v| v),
            c.negotiated_cipher_suite().map(|s| s.suite())
        )
    };
    tls.write_all(request.as_bytes()).await.map_err(|_| fail("write"))?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        match tls.read(&mut chunk).await {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.len() > 64 * 1024 {
                    return Err(fail("response too long"));
                }
            }
            // A server that closes without close_notify: fine once the response is complete.
            Err(_) if response_complete(&buf) => break,
            Err(_) => return Err(fail("read")),
        }
    }
    if !buf.starts_with(b"HTTP/1.1 200") {
        return Err(fail("status not 200"));
    }
    if !response_complete(&buf) {
        return Err(fail("truncated response"));
    }
    Ok(negotiated)
}

/// The whole expected body arrived after the head.
fn response_complete(buf: &[u8]) -> bool {
    buf.windows(4).position(|w| w == b"\r\n\r\n").is_some_and(|end| buf[end + 4..] == *BODY)
}

/// What the fixed-rate client does: `rate` requests/s in all over `connections` keep-alive
/// connections, `warmup` not recorded, then `duration` measured.
#[derive(Clone, Copy, Debug)]
pub struct FixedRate {
    pub connections: usize,
    pub rate: f64,
    pub warmup: Duration,
    pub duration: Duration,
}

/// The achieved rate may miss the target by this share before the contender counts as saturated.
pub const RATE_TOLERANCE: f64 = 0.02;

/// A request (or a reconnection and the request) that takes longer counts as an error, as with
/// wrk's `--timeout 5s`.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How long after the end of the schedule a connection still behind it may go on sending.
const DRAIN_NS: u64 = 2_000_000_000;

/// Result of one fixed-rate run.
#[derive(Clone, Debug, Default)]
pub struct RateResult {
    /// Requests/s asked for, over all connections.
    pub target_rps: f64,
    pub connections: usize,
    /// Responses completed within the measured window, per second of it.
    pub rps: f64,
    pub seconds: f64,
    /// Requests scheduled within the window and answered: the percentiles are theirs.
    pub recorded: u64,
    /// Requests scheduled within the window but never sent: their connection was still more
    /// than 2 s behind its schedule at the end.
    pub unsent: u64,
    /// From each request's scheduled send time to the last byte of its response, µs.
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    /// How late requests went out after their scheduled time (the timer's wake-up, or the
    /// previous response on the connection still outstanding), µs.
    pub lag_p99_us: f64,
    pub lag_max_us: f64,
    /// How late the client woke for requests it had to wait for (no response outstanding), p99,
    /// µs: its own stalls, or its CPU's, which the contender cannot cause.
    pub wake_late_p99_us: f64,
    /// Failed requests by kind, warm-up included; the connection is opened again after each.
    pub errors: BTreeMap<String, u64>,
    /// Every recorded latency, ns, sorted: the report pools the rounds' requests.
    pub latencies_ns: Vec<u64>,
}

impl RateResult {
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// The achieved rate is within [`RATE_TOLERANCE`] of the target and every scheduled request
    /// went out; otherwise the contender could not keep up and its latencies mean little.
    pub fn kept_rate(&self) -> bool {
        self.target_rps > 0.0
            && (self.rps - self.target_rps).abs() <= RATE_TOLERANCE * self.target_rps
            && self.unsent == 0
    }
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// CLOCK_MONOTONIC in nanoseconds: the timerfds' clock, so schedules and timers agree.
fn mono_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A timer with microsecond precision: tokio's timers round up to whole milliseconds, which
/// would add up to 1 ms to latencies counted from the scheduled time. A timerfd wakes the
/// runtime's epoll when it fires.
struct Alarm(AsyncFd<OwnedFd>);

impl Alarm {
    fn new() -> io::Result<Alarm> {
        // SAFETY: timerfd_create has no pointer arguments; the fd is checked before use.
        let fd = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new fd that nothing else owns; the OwnedFd keeps it open, unchanged, for as
        // long as the AsyncFd holds it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: as above.
        Ok(Alarm(unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }?))
    }

    /// Returns at `at_ns` (CLOCK_MONOTONIC), at once when that has passed.
    async fn until(&self, at_ns: u64) -> io::Result<()> {
        if mono_ns() >= at_ns {
            return Ok(());
        }
        let zero = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        let value = libc::timespec {
            tv_sec: (at_ns / 1_000_000_000) as libc::time_t,
            tv_nsec: (at_ns % 1_000_000_000) as libc::c_long,
        };
        let spec = libc::itimerspec { it_interval: zero, it_value: value };
        let fd = self.0.get_ref().as_raw_fd();
        // SAFETY: our fd; spec outlives the call; no old value is asked for.
        if unsafe { libc::timerfd_settime(fd, libc::TFD_TIMER_ABSTIME, &spec, std::ptr::null_mut()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        loop {
            let mut guard = self.0.readable().await?;
            let read = guard.try_io(|inner| {
                let mut expirations = 0u64;
                // SAFETY: reads 8 bytes into a u64 we own.
                let n = unsafe { libc::read(inner.as_raw_fd(), (&raw mut expirations).cast(), 8) };
                if n == 8 { Ok(()) } else { Err(io::Error::last_os_error()) }
            });
            // Err: readiness was stale (would block); wait for the timer.
            if let Ok(r) = read {
                return r;
            }
        }
    }
}

#[derive(Default)]
struct RateState {
    latencies_ns: Vec<u64>,
    lags_ns: Vec<u64>,
    wakes_ns: Vec<u64>,
    in_window: u64,
    unsent: u64,
    errors: BTreeMap<String, u64>,
}

impl RateState {
    fn error(&mut self, kind: &str) {
        *self.errors.entry(kind.to_string()).or_default() += 1;
    }
}

/// One schedule for all connections (CLOCK_MONOTONIC ns).
struct Pacing {
    /// Connection 0's first request.
    start: u64,
    /// Requests scheduled from here on are recorded.
    t0: u64,
    /// Nothing is scheduled from here on.
    end: u64,
    /// Between two requests on one connection: connections / rate.
    interval_ns: f64,
    connections: usize,
}

impl Pacing {
    /// Connection `i`'s `k`th request: connections start `interval / connections` apart, so the
    /// requests of all of them are evenly spread.
    fn at(&self, i: usize, k: u64) -> u64 {
        self.start + ((i as f64 / self.connections as f64 + k as f64) * self.interval_ns) as u64
    }
}

/// Keep-alive requests at a fixed rate (open loop): `plan.rate` requests/s in all, over
/// `plan.connections` connections opened before the schedule starts; each connection sends
/// every `connections / rate` seconds, connection i offset by i/connections of that. A request
/// whose time comes while the previous response on its connection is still outstanding goes
/// out as soon as that response is in, and its latency still counts from its scheduled time, so
/// a stall is charged to every request it delays (no coordinated omission, as in wrk2). Runs
/// on the calling thread (the bench pins itself to the client CPUs).
pub fn run_fixed_rate(cfg: Arc<ClientConfig>, addr: SocketAddr, plan: &FixedRate) -> Result<RateResult, BenchError> {
    assert_loopback(addr)?;
    if plan.connections == 0 || plan.rate.is_nan() || plan.rate <= 0.0 {
        return Err(BenchError::Msg(format!(
            "fixed-rate client: needs at least one connection and a positive rate (got {} and {})",
            plan.connections, plan.rate
        )));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| BenchError::io("fixed-rate client: tokio runtime", e))?;
    let connector = tokio_rustls::TlsConnector::from(cfg);
    let request: Rc<[u8]> = format!("GET {PATH} HTTP/1.1\r\nHost: bench\r\n\r\n").into_bytes().into();
    let state = Rc::new(RefCell::new(RateState::default()));
    let local = tokio::task::LocalSet::new();
    let joined: Result<(), BenchError> = local.block_on(&rt, async {
        // Every connection is open (handshake done) before the schedule starts, so no measured
        // request pays for a handshake unless its connection failed.
        let opening: Vec<_> = (0..plan.connections)
            .map(|_| {
                let connector = connector.clone();
                tokio::task::spawn_local(async move {
                    tokio::time::timeout(REQUEST_TIMEOUT, connect(&connector, addr)).await
                })
            })
            .collect();
        let mut conns = Vec::with_capacity(opening.len());
        for h in opening {
            let open = h.await.map_err(|e| BenchError::Msg(format!("fixed-rate client: connect task: {e}")))?;
            conns.push(match open {
                Ok(Ok(tls)) => Some(tls),
                Ok(Err(kind)) => {
                    state.borrow_mut().error(kind);
                    None
                }
                Err(_) => {
                    state.borrow_mut().error("timeout (5 s)");
                    None
                }
            });
        }
        let start = mono_ns() + 1_000_000;
        let t0 = start + plan.warmup.as_nanos() as u64;
        let pacing = Rc::new(Pacing {
            start,
            t0,
            end: t0 + plan.duration.as_nanos() as u64,
            interval_ns: plan.connections as f64 * 1e9 / plan.rate,
            connections: plan.connections,
        });
        let tasks: Vec<_> = conns
            .into_iter()
            .enumerate()
            .map(|(i, conn)| {
                let (pacing, state, connector, request) =
                    (pacing.clone(), state.clone(), connector.clone(), request.clone());
                tokio::task::spawn_local(async move {
                    paced_connection(i, &pacing, &state, &connector, addr, &request, conn).await;
                })
            })
            .collect();
        for t in tasks {
            t.await.map_err(|e| BenchError::Msg(format!("fixed-rate client: connection task: {e}")))?;
        }
        Ok(())
    });
    drop(local);
    drop(rt);
    joined?;
    let mut s = Rc::try_unwrap(state)
        .map_err(|_| BenchError::Msg("fixed-rate client: tasks still hold state".into()))?
        .into_inner();
    s.latencies_ns.sort_unstable();
    s.lags_ns.sort_unstable();
    s.wakes_ns.sort_unstable();
    let seconds = plan.duration.as_secs_f64();
    Ok(RateResult {
        target_rps: plan.rate,
        connections: plan.connections,
        rps: s.in_window as f64 / seconds,
        seconds,
        recorded: s.latencies_ns.len() as u64,
        unsent: s.unsent,
        p50_us: percentile_us(&s.latencies_ns, 50.0),
        p99_us: percentile_us(&s.latencies_ns, 99.0),
        p999_us: percentile_us(&s.latencies_ns, 99.9),
        max_us: percentile_us(&s.latencies_ns, 100.0),
        lag_p99_us: percentile_us(&s.lags_ns, 99.0),
        lag_max_us: percentile_us(&s.lags_ns, 100.0),
        wake_late_p99_us: percentile_us(&s.wakes_ns, 99.0),
        errors: s.errors,
        latencies_ns: s.latencies_ns,
    })
}

/// One connection's schedule, from the first request to the end of the window (or, when it is
/// behind, [`DRAIN_NS`] past it). A failed request drops the connection; the next opens a new one.
async fn paced_connection(
    i: usize,
    pacing: &Pacing,
    state: &RefCell<RateState>,
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
    request: &[u8],
    mut conn: Option<Tls>,
) {
    let alarm = match Alarm::new() {
        Ok(a) => a,
        Err(_) => {
            state.borrow_mut().error("timerfd");
            return;
        }
    };
    let mut buf = Vec::with_capacity(1024);
    let mut k = 0u64;
    loop {
        let due = pacing.at(i, k);
        if due >= pacing.end {
            return;
        }
        if mono_ns() >= pacing.end + DRAIN_NS {
            // Still behind its schedule long after the end: what is left was never sent.
            let mut s = state.borrow_mut();
            while pacing.at(i, k) < pacing.end {
                if pacing.at(i, k) >= pacing.t0 {
                    s.unsent += 1;
                }
                k += 1;
            }
            return;
        }
        // Due in the future: the client sleeps, and how late it wakes is its own (or its CPU's)
        // lateness, whatever the contender does; due already: the previous response was late.
        let sleeps = mono_ns() < due;
        if alarm.until(due).await.is_err() {
            state.borrow_mut().error("timerfd");
            return;
        }
        let sent = mono_ns();
        if sleeps && due >= pacing.t0 && due < pacing.end {
            state.borrow_mut().wakes_ns.push(sent.saturating_sub(due));
        }
        let exchange = async {
            let tls = match &mut conn {
                Some(tls) => tls,
                None => conn.insert(connect(connector, addr).await?),
            };
            exchange(tls, request, &mut buf).await
        };
        let outcome = tokio::time::timeout(REQUEST_TIMEOUT, exchange).await;
        let done = mono_ns();
        let mut s = state.borrow_mut();
        match outcome {
            Ok(Ok(())) => {
                if due >= pacing.t0 {
                    s.latencies_ns.push(done - due);
                    s.lags_ns.push(sent.saturating_sub(due));
                }
                if (pacing.t0..pacing.end).contains(&done) {
                    s.in_window += 1;
                }
            }
            Ok(Err(kind)) => {
                conn = None;
                s.error(kind);
            }
            Err(_) => {
                conn = None;
                s.error("timeout (5 s)");
            }
        }
        k += 1;
    }
}

/// `n` TLS keep-alive connections, each after one checked request, held open and idle until
/// dropped (then all close). The runtime stays with them so that their sockets stay registered.
pub struct IdleConnections {
    pub open: usize,
    pub seconds: f64,
    conns: Vec<Tls>,
    rt: tokio::runtime::Runtime,
}

impl Drop for IdleConnections {
    fn drop(&mut self) {
        let conns = std::mem::take(&mut self.conns);
        self.rt.block_on(async move { drop(conns) });
    }
}

/// Opens `n` connections to `addr`, `concurrency` at a time: TCP connect, a full TLS 1.3
/// handshake, one `GET PATH` whose response is checked as in the fixed-rate client, then the
/// connection is kept open and left idle. Fails on the first connection that does not serve.
pub fn open_idle(
    cfg: Arc<ClientConfig>,
    addr: SocketAddr,
    n: usize,
    concurrency: usize,
) -> Result<IdleConnections, BenchError> {
    assert_loopback(addr)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| BenchError::io("tokio runtime", e))?;
    let started = Instant::now();
    let request: Arc<[u8]> = format!("GET {PATH} HTTP/1.1\r\nHost: bench\r\n\r\n").into_bytes().into();
    let connector = tokio_rustls::TlsConnector::from(cfg);
    let conns = rt.block_on(async {
        let next = Arc::new(AtomicU64::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..concurrency.max(1) {
            let (next, connector, request) = (next.clone(), connector.clone(), request.clone());
            tasks.spawn(async move {
                let mut mine = Vec::new();
                let mut buf = Vec::new();
                while next.fetch_add(1, Ordering::Relaxed) < n as u64 {
                    let one = async {
                        let mut tls = connect(&connector, addr).await?;
                        exchange(&mut tls, &request, &mut buf).await?;
                        Ok::<_, &'static str>(tls)
                    };
                    match tokio::time::timeout(Duration::from_secs(10), one).await {
                        Ok(Ok(tls)) => mine.push(tls),
                        Ok(Err(e)) => return Err(format!("connection {}: {e}", mine.len())),
                        Err(_) => return Err("connection: no response within 10 s".to_string()),
                    }
                }
                Ok(mine)
            });
        }
        let mut all = Vec::with_capacity(n);
        while let Some(r) = tasks.join_next().await {
            match r {
                Ok(Ok(v)) => all.extend(v),
                Ok(Err(e)) => return Err(e),
                Err(e) => return Err(format!("client task: {e}")),
            }
        }
        Ok(all)
    });
    let conns = conns.map_err(|e| BenchError::Msg(format!("opening {n} idle connections to {addr}: {e}")))?;
    Ok(IdleConnections { open: conns.len(), seconds: started.elapsed().as_secs_f64(), conns, rt })
}

async fn connect(connector: &tokio_rustls::TlsConnector, addr: SocketAddr) -> Result<Tls, &'static str> {
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|_| "connect")?;
    let _ = tcp.set_nodelay(true);
    connector.connect(ServerName::IpAddress(addr.ip().into()), tcp).await.map_err(|_| "handshake")
}

/// One request and its response on a kept-alive connection: status 200, `Content-Length: 100`
/// and exactly [`BODY`], nothing after it, and the connection left open.
async fn exchange(tls: &mut Tls, request: &[u8], buf: &mut Vec<u8>) -> Result<(), &'static str> {
    tls.write_all(request).await.map_err(|_| "write")?;
    // tokio-rustls may hold encrypted bytes back until flushed.
    tls.flush().await.map_err(|_| "write")?;
    buf.clear();
    let mut total = None;
    let mut chunk = [0u8; 2048];
    loop {
        let n = tls.read(&mut chunk).await.map_err(|_| "read")?;
        if n == 0 {
            return Err("closed before the response ended");
        }
        buf.extend_from_slice(&chunk[..n]);
        if total.is_none() {
            match buf.windows(4).position(|w| w == b"\r\n\r\n") {
                Some(head) => total = Some(head + 4 + check_head(&buf[..head])?),
                None if buf.len() > 16 * 1024 => return Err("response head over 16 KiB"),
                None => continue,
            }
        }
        if let Some(total) = total
            && buf.len() >= total
        {
            if buf.len() > total {
                return Err("bytes after the response");
            }
            return if buf[total - BODY.len()..] == *BODY { Ok(()) } else { Err("body differs") };
        }
    }
}

/// Checks a response head (without its final blank line): `HTTP/1.1 200`, one
/// `Content-Length: 100`, no `Transfer-Encoding`, no `Connection: close`. Returns the body length.
fn check_head(head: &[u8]) -> Result<usize, &'static str> {
    let text = std::str::from_utf8(head).map_err(|_| "response head not UTF-8")?;
    let mut lines = text.split("\r\n");
    let status = lines.next().unwrap_or_default();
    if !(status == "HTTP/1.1 200" || status.starts_with("HTTP/1.1 200 ")) {
        return Err("status not 200");
    }
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { return Err("malformed header line") };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            if length.is_some() {
                return Err("two Content-Length headers");
            }
            length = Some(value.parse::<usize>().map_err(|_| "bad Content-Length")?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err("Transfer-Encoding instead of Content-Length");
        } else if name.eq_ignore_ascii_case("connection")
            && value.split(',').any(|t| t.trim().eq_ignore_ascii_case("close"))
        {
            // The next request would need a new connection: not keep-alive any more.
            return Err("Connection: close");
        }
    }
    match length {
        Some(n) if n == BODY.len() => Ok(n),
        Some(_) => Err("Content-Length not 100"),
        None => Err("no Content-Length"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK_OUT: &str = "Running 10s test @ https://127.0.0.1:8443/bench.txt
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.23ms  456.00us   12.34ms   87.65%
    Req/Sec    40.12k     1.23k   42.00k    70.00%
  Latency Distribution
     50%  812.00us
     75%    1.40ms
     90%    1.67ms
     99%    2.74ms
  401234 requests in 10.00s, 80.12MB read
  Socket errors: connect 1, read 2, write 3, timeout 4
  Non-2xx or 3xx responses: 5
Requests/sec:  40123.45
Transfer/sec:      8.01MB
";

    #[test]
    fn wrk_output_parses() {
        let r = parse_wrk(WRK_OUT).unwrap();
        assert_eq!(r.requests, 401_234);
        assert!((r.seconds - 10.0).abs() < 1e-9);
        assert!((r.rps - 40123.45).abs() < 1e-9);
        assert!((r.p50_us - 812.0).abs() < 1e-9);
        assert!((r.p99_us - 2740.0).abs() < 1e-9);
        assert_eq!(r.socket_errors, [1, 2, 3, 4]);
        assert_eq!(r.non_2xx, 5);
        assert_eq!(r.errors(), 15);
    }

    #[test]
    fn wrk_output_without_latency_is_refused() {
        assert!(parse_wrk("Requests/sec: 10\n").is_err());
    }

    #[test]
    fn body_is_100_bytes_and_responses_are_checked() {
        assert_eq!(BODY.len(), 100);
        let mut ok = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n".to_vec();
        ok.extend_from_slice(BODY);
        assert!(response_complete(&ok));
        assert!(!response_complete(&ok[..ok.len() - 1]));
    }

    #[test]
    fn response_heads_are_checked() {
        assert_eq!(check_head(b"HTTP/1.1 200 OK\r\nServer: x\r\ncontent-length: 100"), Ok(100));
        assert_eq!(check_head(b"HTTP/1.1 404 Not Found\r\nContent-Length: 100"), Err("status not 200"));
        assert_eq!(check_head(b"HTTP/1.1 2000\r\nContent-Length: 100"), Err("status not 200"));
        assert_eq!(check_head(b"HTTP/1.1 200 OK\r\nContent-Length: 99"), Err("Content-Length not 100"));
        assert_eq!(
            check_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked"),
            Err("Transfer-Encoding instead of Content-Length")
        );
        assert_eq!(
            check_head(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nConnection: close"),
            Err("Connection: close")
        );
        assert_eq!(check_head(b"HTTP/1.1 200 OK"), Err("no Content-Length"));
    }

    #[test]
    fn schedule_spreads_connections_evenly() {
        // 4 connections, 1000 requests/s: each every 4 ms, starting 1 ms apart.
        let p = Pacing { start: 0, t0: 0, end: u64::MAX, interval_ns: 4e6, connections: 4 };
        let mut all: Vec<u64> = (0..4).flat_map(|i| (0..3).map(move |k| (i, k))).map(|(i, k)| p.at(i, k)).collect();
        all.sort_unstable();
        assert_eq!(all, (0..12).map(|n| n * 1_000_000).collect::<Vec<u64>>());
        let r = RateResult { target_rps: 1000.0, rps: 981.0, ..RateResult::default() };
        assert!(r.kept_rate());
        assert!(!RateResult { rps: 979.0, ..r.clone() }.kept_rate());
        assert!(!RateResult { unsent: 1, ..r }.kept_rate());
    }

    #[test]
    fn percentiles() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 51.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&[], 99.0), 0.0);
    }
}
