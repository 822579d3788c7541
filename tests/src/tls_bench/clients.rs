//! The load generators: wrk for keep-alive requests (throughput and latency percentiles), and a
//! rustls client for new full handshakes (one request per connection, resumption disabled and
//! checked on every connection), plus a probe that reports what OpenSSL clients negotiate.

use std::{
    cell::RefCell,
    collections::BTreeMap,
    net::SocketAddr,
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
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

pub fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    f64::from(sorted[i.min(sorted.len() - 1)])
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
    fn percentiles() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 51.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&[], 99.0), 0.0);
    }
}
