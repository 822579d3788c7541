//! Connections to backends: TCP (+ PROXY v2 header) (+ TLS), kept alive in an idle list per
//! backend between requests ([`upstream`](super::upstream) speaks HTTP/1.1 on them; the h2
//! path's [`UpstreamBody`] gives them back), and the active health checks that feed the
//! `loadbalancer` state machine.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use loadbalancer::{Admin, BackendState, PickGuard, StateChange};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::{io::AsyncWriteExt, net::TcpStream};
use tokio_util::sync::CancellationToken;

use super::{
    coarse_ms,
    metrics::{BackendLabels, Metrics},
    proxy_protocol,
    stats::BackendStats,
    tcp::Tcp,
    upstream::{Asks, BodyDecoder, Io, ResponseHead, Upstream, UpstreamError},
};
use crate::{
    config::{self, BackendAddr, Scheme},
    probe::{self, Probe, ProbeError},
};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Bodies sent to backends.
pub type ReqBody = BoxBody<Bytes, BoxError>;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {addr}: {source}")]
    Tcp { addr: SocketAddr, source: std::io::Error },
    #[error("connect to {addr}: timed out after {after:?}")]
    Timeout { addr: SocketAddr, after: Duration },
    #[error("TLS with {addr}: {source}")]
    Tls { addr: SocketAddr, source: std::io::Error },
}

/// What PROXY header a new backend connection starts with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProxyHeader {
    None,
    /// Our own connection (health checks).
    Local,
    /// On behalf of a client: (client address, address the client connected to).
    Client(SocketAddr, SocketAddr),
}

struct Idle {
    conn: Upstream,
    key: ProxyHeader,
    /// Coarse-clock ms when it went idle (the precise clock, read twice per request here,
    /// showed in profiles; idle timeouts are seconds).
    since: u64,
}

/// One backend's connection settings and its idle keep-alive connections.
pub struct BackendConn {
    pub addr: BackendAddr,
    pub pool_name: String,
    tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle: usize,
    idle: Mutex<Vec<Idle>>,
    /// This backend's figures; the generation's build puts the registered handle here.
    pub stats: Arc<BackendStats>,
}

impl std::fmt::Debug for BackendConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BackendConn({})", self.addr)
    }
}

impl BackendConn {
    pub fn new(pool: &config::Pool, addr: BackendAddr, tls: Option<&Arc<ClientConfig>>) -> Result<Self, String> {
        let tls = match (addr.scheme, tls) {
            (Scheme::Https, Some(cfg)) => {
                let name = match &pool.sni {
                    Some(n) => {
                        ServerName::try_from(n.clone()).map_err(|e| format!("pool {}: sni {n:?}: {e}", pool.name()))?
                    }
                    None => ServerName::IpAddress(addr.addr.ip().into()),
                };
                Some((cfg.clone(), name))
            }
            _ => None,
        };
        Ok(BackendConn {
            addr,
            pool_name: pool.name().to_string(),
            tls,
            connect_timeout: pool.connect_timeout.0,
            idle_timeout: pool.idle_timeout.0,
            max_idle: pool.max_idle,
            idle: Mutex::new(Vec::new()),
            stats: Arc::new(BackendStats::new(pool.name(), &addr.to_string())),
        })
    }

    fn labels(&self) -> BackendLabels {
        BackendLabels { pool: self.pool_name.clone(), backend: self.addr.to_string() }
    }

    /// An idle connection opened with the same PROXY header, if one is still usable.
    pub fn checkout(&self, key: ProxyHeader) -> Option<Upstream> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(pos) = idle.iter().rposition(|i| i.key == key) {
            let mut i = idle.swap_remove(pos);
            if self.fresh(i.since, coarse_ms()) && i.conn.is_alive() {
                return Some(i.conn);
            }
        }
        None
    }

    /// Gives a connection whose last response was read to its end back to the idle list.
    pub fn checkin(&self, conn: Upstream, key: ProxyHeader) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() >= self.max_idle {
            // The oldest goes; connections are reused newest first.
            let oldest = idle.iter().enumerate().min_by_key(|(_, i)| i.since).map(|(n, _)| n);
            if let Some(n) = oldest {
                idle.swap_remove(n);
            }
        }
        idle.push(Idle { conn, key, since: coarse_ms() });
    }

    /// Closes idle connections past their idle timeout or closed by the backend.
    pub fn sweep(&self) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let now = coarse_ms();
        idle.retain_mut(|i| self.fresh(i.since, now) && i.conn.is_alive());
    }

    /// An idle connection since `since` is within the idle timeout at `now`.
    fn fresh(&self, since: u64, now: u64) -> bool {
        u128::from(now.saturating_sub(since)) < self.idle_timeout.as_millis()
    }

    /// Opens a new connection: TCP, then the PROXY header, then TLS for https:// backends.
    pub async fn connect(&self, header: ProxyHeader) -> Result<Upstream, ConnectError> {
        let addr = self.addr.addr;
        let work = async {
            let mut tcp = TcpStream::connect(addr).await.map_err(|source| ConnectError::Tcp { addr, source })?;
            let _ = tcp.set_nodelay(true);
            let pp = match header {
                ProxyHeader::None => None,
                ProxyHeader::Local => Some(proxy_protocol::encode_v2_local()),
                ProxyHeader::Client(src, dst) => Some(proxy_protocol::encode_v2(src, dst)),
            };
            if let Some(pp) = pp {
                tcp.write_all(&pp).await.map_err(|source| ConnectError::Tcp { addr, source })?;
            }
            let io = match &self.tls {
                None => Io::Plain(tcp),
                Some((cfg, name)) => Io::Tls(Box::new(
                    tokio_rustls::TlsConnector::from(cfg.clone())
                        .connect(name.clone(), Tcp(tcp))
                        .await
                        .map_err(|source| ConnectError::Tls { addr, source })?,
                )),
            };
            Ok(Upstream::new(io))
        };
        match tokio::time::timeout(self.connect_timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(ConnectError::Timeout { addr, after: self.connect_timeout }),
        }
    }
}

/// Logs a state change and publishes the backend's up gauge.
pub fn publish(metrics: &Metrics, pool: &str, change: Option<StateChange>) {
    if let Some(c) = change {
        if c.to == BackendState::Up || c.from == BackendState::Up {
            log::warn!("pool {pool}: {c}");
        } else {
            log::info!("pool {pool}: {c}");
        }
        let labels = BackendLabels { pool: pool.to_string(), backend: c.id.clone() };
        metrics.backend_up.get_or_create(&labels).set(i64::from(c.to == BackendState::Up));
    }
}

/// The HTTP health check of one backend: a GET of the pool's health path whose status must be
/// the expected one.
pub struct HttpProbe {
    pub conn: Arc<BackendConn>,
    pub check: config::PoolHealth,
    pub host: String,
    pub header: ProxyHeader,
}

impl Probe for HttpProbe {
    type Seen = ();

    fn target(&self) -> String {
        format!("pool {}: check of {}", self.conn.pool_name, self.conn.addr)
    }

    async fn probe(&self) -> Result<(), ProbeError> {
        match check_once(&self.conn, &self.check, &self.host, self.header).await {
            Ok(status) if status == *self.check.expect.get_ref() => Ok(()),
            Ok(status) => Err(ProbeError::Failed { target: self.target(), msg: format!("status {status}") }),
            Err(e) => Err(ProbeError::Failed { target: self.target(), msg: e.to_string() }),
        }
    }
}

/// Active health checks of one backend until `stop` is cancelled.
pub async fn health_loop(
    pool: Arc<loadbalancer::Pool<Arc<BackendConn>>>,
    index: usize,
    check: config::PoolHealth,
    host: String,
    uses_pp: bool,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let Some(backend) = pool.backend(index) else { return };
    let conn = backend.data().clone();
    let pool_name = conn.pool_name.clone();
    let schedule = probe::Schedule {
        interval: check.interval.0,
        timeout: check.timeout.0,
        // Spread the first checks of a pool over one interval so they do not all fire at once.
        offset: check.interval.0.mul_f64((index % 8) as f64 / 8.0),
    };
    let header = if uses_pp { ProxyHeader::Local } else { ProxyHeader::None };
    let probe = HttpProbe { conn: conn.clone(), check, host, header };
    probe::run(
        &probe,
        schedule,
        &stop,
        || backend.admin() != Admin::Maint,
        |r| {
            if let Err(e) = &r {
                log::debug!("{e}");
                metrics.health_checks_failed.get_or_create(&conn.labels()).inc();
            }
            publish(&metrics, &pool_name, backend.report_check(r.is_ok()));
        },
    )
    .await;
}

async fn check_once(
    conn: &BackendConn,
    check: &config::PoolHealth,
    host: &str,
    header: ProxyHeader,
) -> Result<u16, BoxError> {
    let mut up = conn.connect(header).await?;
    let path = check.path.get_ref();
    // The config checked the path; the host is a config name or address. Neither may carry
    // anything that would end a header line.
    if path.bytes().chain(host.bytes()).any(|b| b.is_ascii_control() || b == b' ') {
        return Err(format!("health check path {path:?} or host {host:?} is not sendable").into());
    }
    let req =
        format!("GET {path} HTTP/1.1\r\nhost: {host}\r\nuser-agent: rampart-health-check\r\nconnection: close\r\n\r\n");
    up.send(req.as_bytes()).await?;
    let head = up.read_head(Asks::Plain).await?;
    // Read (a bounded part of) the body so the backend sees a clean close.
    let mut dec = BodyDecoder::new(head.framing);
    let mut left = 64 * 1024usize;
    while let Some(b) = up.read_body(&mut dec).await? {
        left = left.saturating_sub(b.len());
        if left == 0 {
            break;
        }
    }
    Ok(head.status)
}

/// A backend response body for hyper (the h2 client path): reads from the connection it owns,
/// gives the connection back to its backend's idle list at the end, and ends the pick's
/// in-flight count when dropped.
pub struct UpstreamBody {
    up: Option<Upstream>,
    head_reusable: bool,
    dec: BodyDecoder,
    home: Option<(Arc<BackendConn>, ProxyHeader)>,
    _guard: Option<PickGuard<Arc<BackendConn>>>,
}

impl UpstreamBody {
    pub fn new(
        up: Upstream,
        head: &ResponseHead,
        home: (Arc<BackendConn>, ProxyHeader),
        guard: PickGuard<Arc<BackendConn>>,
    ) -> Self {
        let mut b = UpstreamBody {
            up: Some(up),
            head_reusable: head.reusable,
            dec: BodyDecoder::new(head.framing),
            home: Some(home),
            _guard: Some(guard),
        };
        b.release_if_done();
        b
    }

    fn release_if_done(&mut self) {
        if !self.dec.is_done() {
            return;
        }
        if let (Some(up), Some((backend, key))) = (self.up.take(), self.home.take())
            && self.head_reusable
            && up.drained()
        {
            backend.checkin(up, key);
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = UpstreamError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        let this = &mut *self;
        let Some(up) = this.up.as_mut() else { return Poll::Ready(None) };
        match std::task::ready!(up.poll_body(cx, &mut this.dec)) {
            Ok(Some(data)) => {
                this.release_if_done();
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Ok(None) => {
                this.release_if_done();
                Poll::Ready(None)
            }
            Err(e) => {
                this.up = None;
                Poll::Ready(Some(Err(e)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.dec.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        self.dec.remaining().map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}
