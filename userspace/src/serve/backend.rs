//! Connections to backends: TCP (+ PROXY v2 header) (+ TLS), HTTP/1.1 with keep-alive pools,
//! and the active health checks that feed the `loadbalancer` state machine.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Empty, combinators::BoxBody};
use hyper::{body::Incoming, client::conn::http1};
use hyper_util::rt::TokioIo;
use loadbalancer::{Admin, BackendState, PickGuard, StateChange};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::{io::AsyncWriteExt, net::TcpStream};
use tokio_util::sync::CancellationToken;

use super::{
    metrics::{BackendLabels, Metrics},
    proxy_protocol,
};
use crate::config::{self, BackendAddr, Scheme};

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
    #[error("HTTP handshake with {addr}: {source}")]
    Http { addr: SocketAddr, source: hyper::Error },
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
    sender: http1::SendRequest<ReqBody>,
    key: ProxyHeader,
    since: Instant,
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
        })
    }

    fn labels(&self) -> BackendLabels {
        BackendLabels { pool: self.pool_name.clone(), backend: self.addr.to_string() }
    }

    /// An idle connection opened with the same PROXY header, if one is still usable.
    pub fn checkout(&self, key: ProxyHeader) -> Option<http1::SendRequest<ReqBody>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(pos) = idle.iter().rposition(|i| i.key == key) {
            let i = idle.swap_remove(pos);
            if i.since.elapsed() < self.idle_timeout && i.sender.is_ready() {
                return Some(i.sender);
            }
        }
        None
    }

    fn checkin(&self, sender: http1::SendRequest<ReqBody>, key: ProxyHeader) {
        if !sender.is_ready() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() >= self.max_idle {
            // The oldest goes; connections are reused newest first.
            let oldest = idle.iter().enumerate().min_by_key(|(_, i)| i.since).map(|(n, _)| n);
            if let Some(n) = oldest {
                idle.swap_remove(n);
            }
        }
        idle.push(Idle { sender, key, since: Instant::now() });
    }

    /// Closes idle connections past their idle timeout or closed by the backend.
    pub fn sweep(&self) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.retain(|i| i.since.elapsed() < self.idle_timeout && !i.sender.is_closed());
    }

    /// Opens a new HTTP/1.1 connection (TCP, then the PROXY header, then TLS).
    pub async fn connect(&self, header: ProxyHeader) -> Result<http1::SendRequest<ReqBody>, ConnectError> {
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
            let sender = match &self.tls {
                None => handshake(addr, tcp).await?,
                Some((cfg, name)) => {
                    let tls = tokio_rustls::TlsConnector::from(cfg.clone())
                        .connect(name.clone(), tcp)
                        .await
                        .map_err(|source| ConnectError::Tls { addr, source })?;
                    handshake(addr, tls).await?
                }
            };
            Ok(sender)
        };
        match tokio::time::timeout(self.connect_timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(ConnectError::Timeout { addr, after: self.connect_timeout }),
        }
    }
}

async fn handshake<IO>(addr: SocketAddr, io: IO) -> Result<http1::SendRequest<ReqBody>, ConnectError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) =
        http1::handshake(TokioIo::new(io)).await.map_err(|source| ConnectError::Http { addr, source })?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            log::debug!("backend connection {addr}: {e}");
        }
    });
    Ok(sender)
}

/// A backend response body that gives its connection back to the pool once it has been read
/// to the end, and ends the pick's in-flight count when dropped.
pub struct PooledBody {
    inner: Incoming,
    conn: Option<(http1::SendRequest<ReqBody>, ProxyHeader)>,
    guard: Option<PickGuard<Arc<BackendConn>>>,
}

impl PooledBody {
    pub fn new(
        inner: Incoming,
        sender: http1::SendRequest<ReqBody>,
        key: ProxyHeader,
        guard: PickGuard<Arc<BackendConn>>,
    ) -> Self {
        let mut b = PooledBody { inner, conn: Some((sender, key)), guard: Some(guard) };
        if b.inner.is_end_stream() {
            b.release();
        }
        b
    }

    fn release(&mut self) {
        if let (Some((sender, key)), Some(guard)) = (self.conn.take(), self.guard.as_ref()) {
            let backend = guard.data().clone();
            if sender.is_ready() {
                backend.checkin(sender, key);
                return;
            }
            // The connection becomes ready once hyper has seen the end of the message; give it
            // back when that happens rather than blocking this body.
            tokio::spawn(async move {
                let mut sender = sender;
                if tokio::time::timeout(Duration::from_secs(1), sender.ready()).await.is_ok_and(|r| r.is_ok()) {
                    backend.checkin(sender, key);
                }
            });
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Ready(None) => this.release(),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.release(),
            Poll::Ready(Some(Err(_))) => this.conn = None,
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
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
    // Spread the first checks of a pool over one interval so they do not all fire at once.
    let offset = check.interval.0.mul_f64((index % 8) as f64 / 8.0);
    tokio::select! {
        _ = stop.cancelled() => return,
        _ = tokio::time::sleep(offset) => {}
    }
    let mut tick = tokio::time::interval(check.interval.0);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if backend.admin() == Admin::Maint {
            continue;
        }
        let header = if uses_pp { ProxyHeader::Local } else { ProxyHeader::None };
        let result = tokio::time::timeout(check.timeout.0, check_once(&conn, &check, &host, header)).await;
        let ok = match result {
            Ok(Ok(status)) if status == *check.expect.get_ref() => true,
            Ok(Ok(status)) => {
                log::debug!("pool {pool_name}: check of {}: status {status}", conn.addr);
                false
            }
            Ok(Err(e)) => {
                log::debug!("pool {pool_name}: check of {}: {e}", conn.addr);
                false
            }
            Err(_) => {
                log::debug!("pool {pool_name}: check of {}: timed out", conn.addr);
                false
            }
        };
        if !ok {
            metrics.health_checks_failed.get_or_create(&conn.labels()).inc();
        }
        publish(&metrics, &pool_name, backend.report_check(ok));
    }
}

async fn check_once(
    conn: &BackendConn,
    check: &config::PoolHealth,
    host: &str,
    header: ProxyHeader,
) -> Result<u16, BoxError> {
    let mut sender = conn.connect(header).await?;
    let req = Request::get(check.path.get_ref().as_str())
        .header(http::header::HOST, host)
        .header(http::header::USER_AGENT, "rampart-health-check")
        .header(http::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new().map_err(|never| match never {}).boxed())?;
    let resp: Response<Incoming> = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    // Read the body so the backend sees a clean close.
    let _ = resp.into_body().collect().await;
    Ok(status)
}
