//! Client-facing listeners: TLS (PROXY header from trusted peers, handshake, then HTTP/1.1 in
//! `h1` or h2 in hyper by ALPN), the plain-HTTP redirect listener, and the h2 connections'
//! timeouts and drain.

use std::{
    convert::Infallible,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body::{Body, Frame};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
};
use tokio_util::sync::CancellationToken;

use super::{
    Shared, coarse_ms,
    http::{
        h1,
        proxy::{self, ConnCtx, RespBody},
    },
    metrics::ListenerLabels,
    proxy_protocol::{self, ProxyHeader},
    tls_stream::{self, TlsStream},
};

/// Activity of one client connection, for the idle and header-read timeouts.
struct Activity {
    /// [`coarse_ms`] when the connection began.
    start: u64,
    /// Milliseconds since `start` of the last byte read or written.
    last: AtomicU64,
    /// Milliseconds since `start` (+1) when bytes of a request head began arriving; 0 = none.
    head_started: AtomicU64,
    in_flight: AtomicUsize,
    track_head: bool,
}

impl Activity {
    fn new(track_head: bool) -> Arc<Self> {
        Arc::new(Activity {
            start: coarse_ms(),
            last: AtomicU64::new(0),
            head_started: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            track_head,
        })
    }
    fn now_ms(&self) -> u64 {
        coarse_ms().saturating_sub(self.start)
    }
    fn touch(&self, read: bool) {
        let now = self.now_ms();
        self.last.store(now, Ordering::Relaxed);
        if read && self.track_head && self.in_flight.load(Ordering::Acquire) == 0 {
            let _ = self.head_started.compare_exchange(0, now + 1, Ordering::AcqRel, Ordering::Relaxed);
        }
    }
    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.head_started.store(0, Ordering::Release);
        InFlight(self.clone())
    }
}

/// Counts a request as in flight until its response body is dropped.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch(false);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request counted in flight.
struct Tracked {
    inner: RespBody,
    _in_flight: InFlight,
}

impl Body for Tracked {
    type Data = bytes::Bytes;
    type Error = super::http::backend::BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// An IO stream that records activity.
struct ActivityIo<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T: AsyncRead + Unpin> AsyncRead for ActivityIo<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch(true);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ActivityIo<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, b);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch(false);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, b);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch(false);
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts TLS clients on `listener` until `stop` is cancelled.
pub async fn run_https(shared: Arc<Shared>, listener: TcpListener, addr: SocketAddr, stop: CancellationToken) {
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning.
                    log::error!("listener {addr}: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let shared2 = shared.clone();
        shared.connections.spawn(async move {
            let labels = ListenerLabels { listener: addr.to_string() };
            shared2.metrics.client_connections.get_or_create(&labels).inc();
            if let Err(e) = serve_tls_conn(shared2.clone(), tcp, peer, addr).await {
                log::debug!("connection from {peer}: {e}");
            }
            shared2.metrics.client_connections.get_or_create(&labels).dec();
        });
    }
}

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("{0}")]
    ProxyHeader(#[from] proxy_protocol::ProxyProtoError),
    #[error("TLS handshake: {0}")]
    Tls(io::Error),
    #[error("TLS handshake timed out")]
    TlsTimeout,
    #[error("listener removed")]
    Gone,
}

async fn serve_tls_conn(
    shared: Arc<Shared>,
    mut tcp: TcpStream,
    peer: SocketAddr,
    addr: SocketAddr,
) -> Result<(), ConnError> {
    let Some(lrt) = shared.current().listeners.get(&addr).cloned() else { return Err(ConnError::Gone) };
    let _ = tcp.set_nodelay(true);
    let local = tcp.local_addr().unwrap_or(addr);
    let (client, local) = if lrt.accept_proxy_protocol && lrt.is_trusted(peer.ip()) {
        match proxy_protocol::read_header(&mut tcp, lrt.client_header_timeout).await? {
            ProxyHeader::Local => (peer, local),
            ProxyHeader::Proxied { src, dst } => (src, dst),
        }
    } else {
        (peer, local)
    };
    let labels = ListenerLabels { listener: lrt.name.clone() };
    let t0 = lrt.stats.handshake.start();
    // ALPN is read here, not from `tls` below: a borrowed local keeps its slot in this future's
    // state after it is moved into `h1::serve`, 1.2 KiB more for every connection.
    let handshake = tls_stream::accept(tcp, lrt.tls.clone());
    let (tls, h2) = match tokio::time::timeout(lrt.client_header_timeout, handshake).await {
        Ok(Ok(s)) => {
            let h2 = s.alpn_protocol() == Some(b"h2");
            (s, h2)
        }
        Ok(Err(e)) => {
            shared.metrics.tls_handshake_failures.get_or_create(&labels).inc();
            return Err(ConnError::Tls(e));
        }
        Err(_) => {
            shared.metrics.tls_handshake_failures.get_or_create(&labels).inc();
            return Err(ConnError::TlsTimeout);
        }
    };
    shared.metrics.tls_handshakes.get_or_create(&labels).inc();
    lrt.stats.handshake.since(t0);
    let ctx = Arc::new(ConnCtx { trusted: lrt.is_trusted(client.ip()), listener: lrt.clone(), client, local });
    if !h2 {
        h1::serve(shared, ctx, tls).await;
        return Ok(());
    }
    // Boxed: inline, hyper's h2 connection would size every connection's state, the h1 ones'
    // too (about 0.9 KiB more each).
    Box::pin(serve_h2(shared, ctx, tls)).await;
    Ok(())
}

async fn serve_h2(shared: Arc<Shared>, ctx: Arc<ConnCtx>, tls: TlsStream) {
    let lrt = ctx.listener.clone();
    let activity = Activity::new(false);
    let io = TokioIo::new(ActivityIo { inner: tls, activity: activity.clone() });
    let shutdown = shared.shutdown.clone();
    let svc = {
        let activity = activity.clone();
        service_fn(move |req: Request<Incoming>| {
            let in_flight = activity.begin();
            let shared = shared.clone();
            let ctx = ctx.clone();
            async move {
                let resp = proxy::handle(shared, ctx, req).await;
                Ok::<_, Infallible>(resp.map(|inner| Tracked { inner, _in_flight: in_flight }))
            }
        })
    };
    let timeouts = (lrt.client_header_timeout, lrt.idle_timeout);
    let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new()).max_concurrent_streams(256);
    let conn = b.serve_connection(io, svc);
    drive(conn, &activity, timeouts, shutdown, |c| c.graceful_shutdown()).await;
}

/// Runs a hyper connection to its end, enforcing the header-read and idle timeouts and
/// shutting it down gracefully (finish in-flight requests, then close) on `shutdown`.
async fn drive<C, E>(
    conn: C,
    activity: &Arc<Activity>,
    (header_timeout, idle_timeout): (Duration, Duration),
    shutdown: CancellationToken,
    graceful: impl Fn(Pin<&mut C>),
) where
    C: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let mut conn = std::pin::pin!(conn);
    let mut closing = false;
    let step = (header_timeout.min(idle_timeout) / 4).clamp(Duration::from_millis(20), Duration::from_secs(1));
    let mut tick = tokio::time::interval(step);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let header_ms = header_timeout.as_millis() as u64;
    let idle_ms = idle_timeout.as_millis() as u64;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    log::debug!("client connection: {e}");
                }
                return;
            }
            _ = shutdown.cancelled(), if !closing => {
                graceful(conn.as_mut());
                closing = true;
            }
            _ = tick.tick() => {
                if activity.in_flight.load(Ordering::Acquire) > 0 {
                    continue;
                }
                let now = activity.now_ms();
                let head = activity.head_started.load(Ordering::Acquire);
                if head > 0 && now.saturating_sub(head - 1) > header_ms {
                    // A request head that does not arrive in time: close without a word.
                    return;
                }
                if head == 0 && !closing && now.saturating_sub(activity.last.load(Ordering::Relaxed)) > idle_ms {
                    graceful(conn.as_mut());
                    closing = true;
                }
            }
        }
    }
}

/// Answers every plain-HTTP request with a 301 to the same host and path over HTTPS.
pub async fn run_redirect(shared: Arc<Shared>, listener: TcpListener, addr: SocketAddr, stop: CancellationToken) {
    loop {
        let (tcp, _peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    log::error!("redirect listener: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let shutdown = shared.shutdown.clone();
        let https_port = shared.redirect_target(addr);
        shared.connections.spawn(async move {
            let activity = Activity::new(true);
            let io = TokioIo::new(ActivityIo { inner: tcp, activity: activity.clone() });
            let act2 = activity.clone();
            let svc = service_fn(move |req: Request<Incoming>| {
                let in_flight = act2.begin();
                async move {
                    let r = redirect_response(&req, https_port);
                    Ok::<_, Infallible>(r.map(|inner| Tracked { inner, _in_flight: in_flight }))
                }
            });
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(TokioTimer::new()).header_read_timeout(None);
            let conn = b.serve_connection(io, svc);
            drive(conn, &activity, (Duration::from_secs(10), Duration::from_secs(30)), shutdown, |c| {
                c.graceful_shutdown()
            })
            .await;
        });
    }
}

fn redirect_response<B>(req: &Request<B>, https_port: u16) -> Response<RespBody> {
    let Some(host) = proxy::request_host(req.uri(), req.headers()) else {
        return proxy::error_page(StatusCode::BAD_REQUEST, "A Host header is needed.");
    };
    let port = if https_port == 443 { String::new() } else { format!(":{https_port}") };
    let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let location = format!("https://{host}{port}{pq}");
    let mut r = proxy::error_page(StatusCode::MOVED_PERMANENTLY, &format!("Moved to {location}"));
    match HeaderValue::from_str(&location) {
        Ok(v) => {
            r.headers_mut().insert(header::LOCATION, v);
            r
        }
        Err(_) => proxy::error_page(StatusCode::BAD_REQUEST, "Bad Host header."),
    }
}
