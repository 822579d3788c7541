//! The reverse proxy's decisions, shared by both client paths: routing, the application
//! firewall, forwarding headers, the backend pick with retries ([`exchange`]), and the pages the
//! proxy answers itself. HTTP/1.1 clients are served by `h1.rs`; h2 clients by hyper through
//! [`handle`] here. Both speak HTTP/1.1 to backends through `upstream.rs`.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use loadbalancer::{HashOn, PickGuard};

use super::{
    Shared,
    backend::{BackendConn, BoxError, ConnectError, ProxyHeader, ReqBody, UpstreamBody, publish},
    firewall::{self, Block},
    metrics::{BlockLabels, PoolLabels, RequestLabels},
    runtime::{ListenerRt, PoolRt, RouteRt},
    stats::Timing,
    timer::Timer,
    upstream::{self, Asks, Framing, ResponseHead, Upstream, UpstreamError},
};

pub type RespBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// What the proxy knows about the client connection a request came on.
pub struct ConnCtx {
    pub listener: Arc<ListenerRt>,
    /// The address HTTP came from: the TCP peer, or the client a trusted PROXY header named.
    pub client: SocketAddr,
    /// The address the client connected to (ours, or the balancer's from the PROXY header).
    pub local: SocketAddr,
    /// `client` is in the listener's trusted_proxies: its forwarding headers are kept.
    pub trusted: bool,
}

impl ConnCtx {
    /// The PROXY header a backend connection for this client starts with.
    pub fn proxy_header(&self, pool: &PoolRt) -> ProxyHeader {
        if pool.cfg.sends_proxy_protocol() { ProxyHeader::Client(self.client, self.local) } else { ProxyHeader::None }
    }
}

/// The body of a small HTML page for answers the proxy makes itself.
pub fn error_html(status: StatusCode, detail: &str) -> String {
    let reason = status.canonical_reason().unwrap_or("");
    format!(
        "<!DOCTYPE html>\n<html><head><title>{code} {reason}</title></head>\n<body><h1>{code} {reason}</h1>\n<p>{detail}</p>\n<hr><p>rampart</p></body></html>\n",
        code = status.as_u16(),
        detail = html_escape(detail),
    )
}

/// [`error_html`] as a hyper response.
pub fn error_page(status: StatusCode, detail: &str) -> Response<RespBody> {
    let mut r = Response::new(full(error_html(status, detail)));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

pub fn full(s: impl Into<Bytes>) -> RespBody {
    Full::new(s.into()).map_err(|never| match never {}).boxed()
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// A Host value (or authority) as routes compare it: lower case, no port, no trailing dot.
pub fn normalize_host(h: &str) -> String {
    let mut host = match h.rsplit_once(':') {
        // Keep `[v6]` whole; strip a port only after the closing bracket.
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !host.ends_with(':') => host.to_string(),
        _ => h.to_string(),
    };
    host.truncate(host.trim_end_matches('.').len());
    host.make_ascii_lowercase();
    host
}

/// The request's host, lower case and without port: `:authority` (h2, absolute-form), else `Host`.
pub fn request_host(uri: &Uri, headers: &HeaderMap) -> Option<String> {
    match uri.authority() {
        Some(a) => Some(normalize_host(a.host())),
        None => Some(normalize_host(headers.get(header::HOST)?.to_str().ok()?)),
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1); pre-parsed names, since this runs for every h2 request.
static HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Hop-by-hop headers (RFC 9110 §7.6.1) and those the Connection header names.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    if h.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|n| !n.eq_ignore_ascii_case("close") && !n.eq_ignore_ascii_case("keep-alive"))
            .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
            .collect();
        for n in named {
            h.remove(n);
        }
    }
    for n in &HOP_BY_HOP {
        h.remove(n);
    }
}

/// The client address to rate-limit and hash on: behind trusted proxies, the right-most
/// X-Forwarded-For entry that is not itself a trusted proxy.
pub fn effective_client<'a>(ctx: &ConnCtx, xff: impl Iterator<Item = &'a [u8]>) -> IpAddr {
    let direct = ctx.client.ip();
    if !ctx.trusted {
        return direct;
    }
    let entries: Vec<IpAddr> = xff
        .filter_map(|v| std::str::from_utf8(v).ok())
        .flat_map(|v| v.split(','))
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    entries.into_iter().rev().find(|ip| !ctx.listener.is_trusted(*ip)).unwrap_or(direct)
}

/// The X-Forwarded-For and Forwarded values for a request from `client`: appended to the
/// `prior` values (only ever given for trusted peers), else ours alone, so a client cannot
/// forge its address.
pub struct Forwarding {
    pub xff: String,
    pub forwarded: String,
}

impl Forwarding {
    pub fn new(client: IpAddr, host: Option<&str>, prior_xff: Option<&str>, prior_forwarded: Option<&str>) -> Self {
        use std::fmt::Write as _;
        let mut xff = String::with_capacity(48);
        let mut forwarded = String::with_capacity(64);
        if let Some(p) = prior_xff {
            xff.push_str(p);
            xff.push_str(", ");
        }
        if let Some(p) = prior_forwarded {
            forwarded.push_str(p);
            forwarded.push_str(", ");
        }
        match client {
            IpAddr::V4(v4) => {
                let at = xff.len();
                push_ipv4(&mut xff, v4);
                forwarded.push_str("for=");
                forwarded.push_str(&xff[at..]);
                forwarded.push_str(";proto=https");
            }
            IpAddr::V6(v6) => {
                let _ = write!(xff, "{v6}");
                let _ = write!(forwarded, "for=\"[{v6}]\";proto=https");
            }
        }
        if let Some(host) = host
            && host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        {
            forwarded.push_str(";host=");
            forwarded.push_str(host);
        }
        Forwarding { xff, forwarded }
    }
}

/// X-Forwarded-For / -Proto and Forwarded on a header map (the h2 path).
pub fn rewrite_forwarding(h: &mut HeaderMap, client: IpAddr, trusted: bool, host: Option<&str>) {
    let joined = |h: &HeaderMap, name: &HeaderName| -> Option<String> {
        let v: Vec<&str> = h.get_all(name).iter().filter_map(|v| v.to_str().ok()).collect();
        (!v.is_empty()).then(|| v.join(", "))
    };
    let (prior_xff, prior_fwd) =
        if trusted { (joined(h, &X_FORWARDED_FOR), joined(h, &header::FORWARDED)) } else { (None, None) };
    let f = Forwarding::new(client, host, prior_xff.as_deref(), prior_fwd.as_deref());
    let value = |s: String| HeaderValue::from_maybe_shared(Bytes::from(s));
    if let Ok(v) = value(f.xff) {
        h.insert(&X_FORWARDED_FOR, v);
    }
    if !(trusted && h.contains_key(&X_FORWARDED_PROTO)) {
        h.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("https"));
    }
    if let Ok(v) = value(f.forwarded) {
        h.insert(header::FORWARDED, v);
    }
}

/// Appends `a.b.c.d`; cheaper than the formatting machinery, and it runs for every request.
fn push_ipv4(out: &mut String, ip: std::net::Ipv4Addr) {
    for (i, o) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        if o >= 100 {
            out.push(char::from(b'0' + o / 100));
        }
        if o >= 10 {
            out.push(char::from(b'0' + o / 10 % 10));
        }
        out.push(char::from(b'0' + o % 10));
    }
}

/// The balancer's hash key for a request, when the pool hashes.
pub fn hash_key<'a>(pool: &PoolRt, client: IpAddr, header: impl FnOnce(&str) -> Option<&'a [u8]>) -> Option<Vec<u8>> {
    match pool.lb.algorithm().hash_on() {
        Some(HashOn::ClientAddr) => Some(match client {
            IpAddr::V4(v4) => v4.octets().to_vec(),
            IpAddr::V6(v6) => v6.octets().to_vec(),
        }),
        Some(HashOn::Header(name)) => header(name.as_str()).map(<[u8]>::to_vec),
        None => None,
    }
}

/// A request the route's firewall refused: counted, and the page to answer with.
pub struct Refusal {
    pub status: StatusCode,
    pub detail: &'static str,
    /// Extra header for the answer (Retry-After, Allow).
    pub header: Option<(HeaderName, HeaderValue)>,
}

/// Runs the route's firewall on a request head.
pub fn check_firewall(
    shared: &Shared,
    route: &RouteRt,
    method: &Method,
    path: &str,
    head_size: u64,
    declared_body: Option<u64>,
    client: IpAddr,
) -> Result<(), Refusal> {
    let Some(fw) = &route.firewall else { return Ok(()) };
    let Err(block) = fw.check(method, path, head_size, declared_body, client) else { return Ok(()) };
    count_block(shared, route, block.reason());
    let header = match block {
        Block::Rate { retry_after } => Some((header::RETRY_AFTER, HeaderValue::from(retry_after))),
        Block::Method => fw.allowed_methods().and_then(|a| HeaderValue::from_str(&a).ok()).map(|v| (header::ALLOW, v)),
        _ => None,
    };
    Err(Refusal { status: block.status(), detail: block_detail(block), header })
}

pub fn count_block(shared: &Shared, route: &RouteRt, reason: &'static str) {
    shared.metrics.firewall_blocks.get_or_create(&BlockLabels { route: route.label.clone(), reason }).inc();
}

/// Counts an answer given before any route was chosen (no route, or a request that could not
/// be parsed) under `route="-"`.
pub fn count_unrouted(shared: &Shared, status: StatusCode) {
    shared.count(&RequestLabels { route: "-".into(), pool: "-".into(), status: status.as_u16() });
}

/// Serves one request of an h2 client connection.
pub async fn handle(shared: Arc<Shared>, ctx: Arc<ConnCtx>, req: Request<Incoming>) -> Response<RespBody> {
    let g = shared.current();
    let host = request_host(req.uri(), req.headers());
    let path = req.uri().path();
    let Some(route) = g.route(host.as_deref(), path) else {
        drain(req.into_body());
        count_unrouted(&shared, StatusCode::NOT_FOUND);
        return error_page(StatusCode::NOT_FOUND, "No route for this host and path.");
    };
    let timing = Timing::start(route.stats.clone());
    let pool = route.pool.clone();
    let client = effective_client(&ctx, req.headers().get_all(&X_FORWARDED_FOR).iter().map(HeaderValue::as_bytes));
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let size = firewall::head_size(req.method(), req.uri(), req.headers());
    if let Err(refusal) = check_firewall(&shared, route, req.method(), path, size, declared, client) {
        drain(req.into_body());
        let mut r = error_page(refusal.status, refusal.detail);
        if let Some((n, v)) = refusal.header {
            r.headers_mut().insert(n, v);
        }
        route.requests.inc(&shared.metrics, r.status().as_u16());
        return r;
    }
    let max_body = route.firewall.as_ref().and_then(|f| f.max_body);

    let (mut parts, body) = req.into_parts();
    let key = hash_key(&pool, client, |name| parts.headers.get(name).map(HeaderValue::as_bytes));
    strip_hop_by_hop(&mut parts.headers);
    // The target's authority (h2 `:authority`, HTTP/1 absolute-form) routed the request, so it
    // is the Host the backend sees (RFC 9112 §3.2.2), whatever Host the client also sent.
    if let Some(a) = parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()) {
        parts.headers.insert(header::HOST, a);
    }
    rewrite_forwarding(&mut parts.headers, ctx.client.ip(), ctx.trusted, host.as_deref());
    let body: ReqBody = match max_body {
        // Without a declared length, read up to the limit before choosing a backend, so an
        // oversized body gets a clean 413 instead of an aborted upload.
        Some(max) if declared.is_none() && !http_body::Body::is_end_stream(&body) => {
            match read_limited(body, max).await {
                Ok(full_body) => full_body,
                Err(status) => {
                    count_block(&shared, route, "max_body");
                    let r = error_page(
                        status,
                        if status == StatusCode::PAYLOAD_TOO_LARGE {
                            "The request body is too large."
                        } else {
                            "The request body could not be read."
                        },
                    );
                    route.requests.inc(&shared.metrics, r.status().as_u16());
                    return r;
                }
            }
        }
        // A declared length is enforced by hyper; the firewall already compared it.
        _ => body.map_err(BoxError::from).boxed(),
    };
    let Ok(mut out) = H2Body::new(body, declared, pool.cfg.response_timeout.0).await else {
        let r = error_page(StatusCode::BAD_REQUEST, "The request body could not be read.");
        route.requests.inc(&shared.metrics, r.status().as_u16());
        return r;
    };
    let pq = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let mut head = Vec::with_capacity(512);
    write_request_line(&mut head, parts.method.as_str().as_bytes(), pq.as_bytes());
    for (n, v) in &parts.headers {
        if n != header::CONTENT_LENGTH {
            write_header(&mut head, n.as_str().as_bytes(), v.as_bytes());
        }
    }
    write_framing(&mut head, out.framing);
    head.extend_from_slice(b"\r\n");
    if let Some(b) = &out.buffered {
        head.extend_from_slice(b);
    }
    let idempotent = is_idempotent(&parts.method);
    let header = ctx.proxy_header(&pool);
    let r = match exchange(
        &shared,
        &pool,
        header,
        &head,
        &mut out,
        key.as_deref(),
        idempotent,
        if parts.method == Method::HEAD { Asks::Head } else { Asks::Plain },
    )
    .await
    {
        Outcome::Response(x) => response_from(x),
        Outcome::Error { status, detail } => error_page(status, detail),
    };
    route.requests.inc(&shared.metrics, r.status().as_u16());
    // The request's time ends when hyper is done with the body (sent, or the stream reset).
    r.map(|b| {
        b.map_frame(move |f| {
            let _ = &timing;
            f
        })
        .boxed()
    })
}

/// A hyper response streaming a backend's answer.
fn response_from(x: Exchange) -> Response<RespBody> {
    let Exchange { head, up, guard, backend, key } = x;
    let Ok(status) = StatusCode::from_u16(head.status) else {
        return error_page(StatusCode::BAD_GATEWAY, "The backend failed to answer.");
    };
    let mut r = Response::builder().status(status);
    if let Some(h) = r.headers_mut() {
        for (n, v) in head.end_to_end() {
            if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(n), HeaderValue::from_bytes(v)) {
                h.append(n, v);
            }
        }
        let length = match head.framing {
            Framing::Length(n) => Some(n),
            Framing::Empty => head.content_length(),
            _ => None,
        };
        if let Some(n) = length {
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
    }
    let body = UpstreamBody::new(up, &head, (backend, key), guard).map_err(BoxError::from).boxed();
    r.body(body).unwrap_or_else(|_| error_page(StatusCode::BAD_GATEWAY, "The backend failed to answer."))
}

/// An h2 request's body on its way to the backend: small ones in memory (sent with the head,
/// and resent if a stale connection must be replaced), others streamed.
struct H2Body {
    buffered: Option<Bytes>,
    stream: Option<ReqBody>,
    framing: Framing,
    started: bool,
    /// The pool's response_timeout, which also bounds each write to the backend.
    backend_timeout: Duration,
    /// Per request: h2 streams run in their own tasks.
    timer: Timer,
}

/// Bodies up to this size are read before the backend is chosen.
const BUFFER_BODY: u64 = 64 * 1024;

impl H2Body {
    /// `Err` when the client's (small) body could not be read.
    async fn new(body: ReqBody, declared: Option<u64>, backend_timeout: Duration) -> Result<Self, BoxError> {
        use http_body::Body as _;
        let (buffered, stream, framing) = if body.is_end_stream() {
            (None, None, if declared.is_some() { Framing::Length(0) } else { Framing::Empty })
        } else {
            let exact = body.size_hint().exact().or(declared);
            if exact.is_some_and(|n| n <= BUFFER_BODY) {
                let b = body.collect().await?.to_bytes();
                let framing = Framing::Length(b.len() as u64);
                (Some(b), None, framing)
            } else {
                (None, Some(body), exact.map_or(Framing::Chunked, Framing::Length))
            }
        };
        Ok(H2Body { buffered, stream, framing, started: false, backend_timeout, timer: Timer::new() })
    }
}

impl RequestBody for H2Body {
    async fn send(&mut self, up: &mut Upstream) -> Result<(), SendError> {
        let Some(mut body) = self.stream.take() else { return Ok(()) };
        self.started = true;
        let chunked = self.framing == Framing::Chunked;
        let mut out = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| SendError::Client(e.to_string()))?;
            let Some(data) = frame.data_ref() else { continue };
            if chunked {
                out.clear();
                upstream::encode_chunk(&mut out, data);
                body_to_backend(&mut self.timer, self.backend_timeout, up, &out).await?;
            } else {
                body_to_backend(&mut self.timer, self.backend_timeout, up, data).await?;
            }
        }
        if chunked {
            body_to_backend(&mut self.timer, self.backend_timeout, up, upstream::LAST_CHUNK).await?;
        }
        Ok(())
    }

    fn replayable(&self) -> bool {
        !self.started
    }

    fn timer(&mut self) -> &mut Timer {
        &mut self.timer
    }
}

/// `METHOD target HTTP/1.1` and CRLF.
pub fn write_request_line(out: &mut Vec<u8>, method: &[u8], target: &[u8]) {
    out.extend_from_slice(method);
    out.push(b' ');
    out.extend_from_slice(target);
    out.extend_from_slice(b" HTTP/1.1\r\n");
}

pub fn write_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The framing header of a message we write.
pub fn write_framing(out: &mut Vec<u8>, f: Framing) {
    match f {
        Framing::Length(n) => {
            use std::io::Write as _;
            let _ = write!(out, "content-length: {n}\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Framing::Empty | Framing::Close => {}
    }
}

pub fn is_idempotent(m: &Method) -> bool {
    matches!(*m, Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS | Method::TRACE)
}

/// Reads a request body of at most `max` bytes; the rest of a longer one is drained.
async fn read_limited(mut body: Incoming, max: u64) -> Result<ReqBody, StatusCode> {
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| StatusCode::BAD_REQUEST)?;
        if let Some(d) = frame.data_ref() {
            if (buf.len() + d.len()) as u64 > max {
                drain(body);
                return Err(StatusCode::PAYLOAD_TOO_LARGE);
            }
            buf.extend_from_slice(d);
        }
    }
    Ok(Full::new(buf.freeze()).map_err(|never| match never {}).boxed())
}

/// Reads and discards what is left of a request body the proxy answered without using (bounded:
/// 1 MiB, 5 s), so the client reads the answer instead of a reset, and keep-alive survives.
pub fn drain<B>(body: B)
where
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
{
    if body.is_end_stream() {
        return;
    }
    tokio::spawn(async move {
        let mut body = body;
        let mut left: usize = 1 << 20;
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(Ok(f)) = body.frame().await {
                if let Some(d) = f.data_ref() {
                    left = left.saturating_sub(bytes::Buf::remaining(d));
                    if left == 0 {
                        break;
                    }
                }
            }
        })
        .await;
    });
}

fn block_detail(b: Block) -> &'static str {
    match b {
        Block::Method => "This method is not allowed here.",
        Block::DeniedPath | Block::NotAllowedPath => "Access to this path is not allowed.",
        Block::HeaderTooLarge => "The request headers are too large.",
        Block::BodyTooLarge => "The request body is too large.",
        Block::Rate { .. } => "Too many requests from your address; retry later.",
    }
}

/// A request body as [`exchange`] sends it after the head. (Only our own types implement it, so
/// the futures' Send-ness is known where they are spawned.)
#[allow(async_fn_in_trait)]
pub trait RequestBody {
    /// Writes what is left of the body to the backend.
    async fn send(&mut self, up: &mut Upstream) -> Result<(), SendError>;
    /// Nothing of the body has been consumed (or it all went with the head): the request can
    /// be sent again on another connection.
    fn replayable(&self) -> bool;
    /// The timer of the client connection the request came on: waits on the backend use it too
    /// (one timer per connection, see timer.rs).
    fn timer(&mut self) -> &mut Timer;
}

/// Writes part of a request body to the backend, bounded by the pool's response_timeout: a
/// backend that stops reading must not hold the client for good.
pub async fn body_to_backend(
    timer: &mut Timer,
    limit: Duration,
    up: &mut Upstream,
    data: &[u8],
) -> Result<(), SendError> {
    match timer.within(limit, up.send(data)).await {
        Ok(r) => r.map_err(SendError::Backend),
        Err(e) => Err(SendError::Backend(e.into())),
    }
}

pub enum SendError {
    /// Reading the client's body failed (reset, timeout, bad framing).
    Client(String),
    /// Writing to the backend failed.
    Backend(std::io::Error),
    /// The body grew past the route's max_body.
    TooLarge,
}

/// A backend's answer, with what is needed to read its body and give the connection back.
pub struct Exchange {
    pub head: ResponseHead,
    pub up: Upstream,
    /// Held while the body streams: least-connections counts it in flight.
    pub guard: PickGuard<Arc<BackendConn>>,
    pub backend: Arc<BackendConn>,
    pub key: ProxyHeader,
}

// Built once per request and moved straight into a match: boxing the large variant would cost
// an allocation per request for nothing.
#[allow(clippy::large_enum_variant)]
pub enum Outcome {
    Response(Exchange),
    /// No answer from a backend: the proxy answers with this status and page.
    Error {
        status: StatusCode,
        detail: &'static str,
    },
}

enum Attempt {
    Response(ResponseHead, Upstream),
    /// The request never left: safe to send to another backend.
    NotSent(String, bool),
    /// Sent, then failed or timed out: answer the client, do not retry.
    Failed(StatusCode, String),
}

/// Sends one request to one backend: an idle connection first (one the backend closed in the
/// meantime is replaced by a new one, when the request can be sent again), then a new one.
#[allow(clippy::too_many_arguments)]
async fn attempt<B: RequestBody>(
    bc: &BackendConn,
    header: ProxyHeader,
    head: &[u8],
    body: &mut B,
    idempotent: bool,
    asks: Asks,
    response_timeout: Duration,
) -> Attempt {
    let mut fresh = false;
    loop {
        let mut up = match if fresh { None } else { bc.checkout(header) } {
            Some(u) => u,
            None => {
                fresh = true;
                // Boxed: a new backend connection is rare on the keep-alive path and costs a TCP
                // (and maybe TLS) handshake anyway, while its 1.5 KiB future inline would size
                // the state of every client connection, idle ones too.
                let t0 = bc.stats.connect.start();
                match Box::pin(bc.connect(header)).await {
                    Ok(u) => {
                        bc.stats.connect.since(t0);
                        u
                    }
                    Err(e) => return Attempt::NotSent(e.to_string(), matches!(e, ConnectError::Timeout { .. })),
                }
            }
        };
        let sent_at = bc.stats.first_byte.start();
        let sent = body.timer().within(response_timeout, up.send(head)).await;
        if let Err(e) = sent.unwrap_or_else(|t| Err(t.into())) {
            if !fresh && body.replayable() {
                fresh = true;
                continue;
            }
            if body.replayable() && idempotent {
                return Attempt::NotSent(format!("backend {}: {e}", bc.addr), false);
            }
            return Attempt::Failed(StatusCode::BAD_GATEWAY, format!("backend {}: {e}", bc.addr));
        }
        match body.send(&mut up).await {
            Ok(()) => {}
            Err(SendError::Client(e)) => {
                return Attempt::Failed(StatusCode::BAD_REQUEST, format!("client body to backend {}: {e}", bc.addr));
            }
            Err(SendError::TooLarge) => {
                return Attempt::Failed(StatusCode::PAYLOAD_TOO_LARGE, "The request body is too large.".into());
            }
            // A backend that stopped reading the body for response_timeout.
            Err(SendError::Backend(e)) if e.kind() == std::io::ErrorKind::TimedOut => {
                return Attempt::Failed(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!("backend {} read none of the request body for {response_timeout:?}", bc.addr),
                );
            }
            Err(SendError::Backend(e)) => {
                return Attempt::Failed(StatusCode::BAD_GATEWAY, format!("backend {}: {e}", bc.addr));
            }
        }
        match body.timer().within(response_timeout, up.read_head(asks)).await {
            Err(_) => {
                return Attempt::Failed(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!("backend {} sent no response within {response_timeout:?}", bc.addr),
                );
            }
            Ok(Ok(h)) => {
                bc.stats.first_byte.since(sent_at);
                return Attempt::Response(h, up);
            }
            // A kept-alive connection the backend closed just as it was reused: nothing was
            // processed, so a request that can be replayed goes out again on a new connection.
            Ok(Err(UpstreamError::Closed { empty: true })) if !fresh && body.replayable() && idempotent => {
                fresh = true;
            }
            Ok(Err(e)) => return Attempt::Failed(StatusCode::BAD_GATEWAY, format!("backend {}: {e}", bc.addr)),
        }
    }
}

/// Sends a request to the pool: picks a backend, retries on others when connecting fails (up to
/// the pool's `retries`), reports live successes and failures to passive health, and counts.
#[allow(clippy::too_many_arguments)]
pub async fn exchange<B: RequestBody>(
    shared: &Shared,
    pool: &PoolRt,
    header: ProxyHeader,
    head: &[u8],
    body: &mut B,
    key: Option<&[u8]>,
    idempotent: bool,
    asks: Asks,
) -> Outcome {
    let mut tried = Vec::new();
    let mut last: Option<(StatusCode, &'static str)> = None;
    for n in 0..=pool.cfg.retries {
        let Some(guard) = pool.lb.pick_excluding(key, &tried) else { break };
        if n > 0 {
            shared.metrics.backend_retries.get_or_create(&PoolLabels { pool: pool.name.clone() }).inc();
        }
        let bc = guard.data().clone();
        match attempt(&bc, header, head, body, idempotent, asks, pool.cfg.response_timeout.0).await {
            Attempt::Response(head, up) => {
                bc.stats.count(head.status);
                if pool.passive {
                    publish(&shared.metrics, &pool.name, guard.report_live_success());
                }
                return Outcome::Response(Exchange { head, up, guard, backend: bc, key: header });
            }
            Attempt::NotSent(msg, timed_out) => {
                log::warn!("pool {}: {msg}; trying another backend", pool.name);
                shared
                    .metrics
                    .backend_connect_errors
                    .get_or_create(&super::metrics::BackendLabels {
                        pool: pool.name.clone(),
                        backend: bc.addr.to_string(),
                    })
                    .inc();
                if pool.passive {
                    publish(&shared.metrics, &pool.name, guard.report_live_failure());
                }
                let status = if timed_out { StatusCode::GATEWAY_TIMEOUT } else { StatusCode::BAD_GATEWAY };
                last = Some((status, "No backend could be reached."));
                // Only a retry needs the list (no allocation on the usual path).
                tried.push(guard.index());
                if !body.replayable() {
                    break;
                }
            }
            Attempt::Failed(status, msg) => {
                bc.stats.count(status.as_u16());
                log::warn!("pool {}: {msg}", pool.name);
                let backend_fault = status == StatusCode::BAD_GATEWAY || status == StatusCode::GATEWAY_TIMEOUT;
                if pool.passive && backend_fault {
                    publish(&shared.metrics, &pool.name, guard.report_live_failure());
                }
                let detail = match status {
                    StatusCode::GATEWAY_TIMEOUT => "The backend did not answer in time.",
                    StatusCode::PAYLOAD_TOO_LARGE => "The request body is too large.",
                    StatusCode::BAD_REQUEST => "The request body could not be read.",
                    _ => "The backend failed to answer.",
                };
                return Outcome::Error { status, detail };
            }
        }
    }
    match last {
        Some((status, detail)) => Outcome::Error { status, detail },
        None => Outcome::Error {
            status: StatusCode::SERVICE_UNAVAILABLE,
            detail: "No backend is available to serve this request.",
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarding_headers_replaced_for_untrusted_peers() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
        h.insert(header::FORWARDED, HeaderValue::from_static("for=6.6.6.6"));
        h.insert("x-forwarded-proto", HeaderValue::from_static("http"));
        rewrite_forwarding(&mut h, "192.0.2.7".parse().unwrap(), false, Some("example.com"));
        assert_eq!(h["x-forwarded-for"], "192.0.2.7");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h[header::FORWARDED], "for=192.0.2.7;proto=https;host=example.com");
    }

    #[test]
    fn forwarding_headers_appended_for_trusted_peers() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", HeaderValue::from_static("198.51.100.9"));
        h.append("x-forwarded-for", HeaderValue::from_static("203.0.113.1"));
        rewrite_forwarding(&mut h, "2001:db8::5".parse().unwrap(), true, None);
        assert_eq!(h["x-forwarded-for"], "198.51.100.9, 203.0.113.1, 2001:db8::5");
        assert_eq!(h[header::FORWARDED], "for=\"[2001:db8::5]\";proto=https");
    }

    #[test]
    fn ipv4_text() {
        for ip in ["0.0.0.0", "10.9.100.255", "192.0.2.7", "255.255.255.255", "1.20.199.0"] {
            let mut s = String::new();
            push_ipv4(&mut s, ip.parse().unwrap());
            assert_eq!(s, ip);
        }
    }

    #[test]
    fn hop_by_hop_keeps_end_to_end_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("100"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h[header::CONTENT_LENGTH], "100");
    }

    #[test]
    fn hosts() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("Example.COM:8443"));
        assert_eq!(request_host(&Uri::from_static("/x"), &h).as_deref(), Some("example.com"));
        h.insert(header::HOST, HeaderValue::from_static("[::1]:8443"));
        assert_eq!(request_host(&Uri::from_static("/x"), &h).as_deref(), Some("[::1]"));
        assert_eq!(
            request_host(&Uri::from_static("https://a.example.com/x"), &HeaderMap::new()).as_deref(),
            Some("a.example.com")
        );
    }

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("close, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }
}
