//! The reverse proxy: one client request in, route, application firewall, header rewriting,
//! a backend picked by the pool's balancer, retries when connecting fails, the response out.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, Version, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use loadbalancer::HashOn;

use super::{
    Shared,
    backend::{BackendConn, BoxError, ConnectError, PooledBody, ProxyHeader, ReqBody, publish},
    firewall::{self, Block},
    metrics::{BlockLabels, PoolLabels, RequestLabels},
    runtime::{ListenerRt, PoolRt},
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

/// A small HTML page for answers the proxy makes itself.
pub fn error_page(status: StatusCode, detail: &str) -> Response<RespBody> {
    let reason = status.canonical_reason().unwrap_or("");
    let body = format!(
        "<!DOCTYPE html>\n<html><head><title>{code} {reason}</title></head>\n<body><h1>{code} {reason}</h1>\n<p>{detail}</p>\n<hr><p>rampart</p></body></html>\n",
        code = status.as_u16(),
        detail = html_escape(detail),
    );
    let mut r = Response::new(full(body));
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

/// The request's host, lower case and without port: `:authority` (h2, absolute-form), else `Host`.
pub fn request_host(uri: &Uri, headers: &HeaderMap) -> Option<String> {
    let raw = match uri.authority() {
        Some(a) => a.host().to_string(),
        None => {
            let h = headers.get(header::HOST)?.to_str().ok()?;
            match h.rsplit_once(':') {
                // Keep `[v6]` whole; strip a port only after the closing bracket.
                Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !host.ends_with(':') => {
                    host.to_string()
                }
                _ => h.to_string(),
            }
        }
    };
    let mut host = raw;
    host.truncate(host.trim_end_matches('.').len());
    host.make_ascii_lowercase();
    Some(host)
}

/// Hop-by-hop headers (RFC 9110 §7.6.1); pre-parsed names, since this runs twice per request.
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
    // One pass over the (few) headers finds what is there: most messages carry none of these,
    // or only Connection, and each removal is a hashed lookup.
    let mut present = [false; HOP_BY_HOP.len()];
    for name in h.keys() {
        // Names in a HeaderMap are lower case; the order is HOP_BY_HOP's.
        let i = match name.as_str() {
            "connection" => 0,
            "keep-alive" => 1,
            "proxy-connection" => 2,
            "te" => 3,
            "trailer" => 4,
            "transfer-encoding" => 5,
            "upgrade" => 6,
            _ => continue,
        };
        present[i] = true;
    }
    if present[0] {
        // `close` and `keep-alive` (the usual values) name no header left to remove.
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
    for (n, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, p)| *p) {
        h.remove(n);
    }
}

/// The client address to rate-limit and hash on: behind trusted proxies, the right-most
/// X-Forwarded-For entry that is not itself a trusted proxy.
fn effective_client(ctx: &ConnCtx, headers: &HeaderMap) -> IpAddr {
    let direct = ctx.client.ip();
    if !ctx.trusted {
        return direct;
    }
    let entries: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    entries.into_iter().rev().find(|ip| !ctx.listener.is_trusted(*ip)).unwrap_or(direct)
}

/// X-Forwarded-For / -Proto and Forwarded: appended to when the peer is trusted, replaced
/// otherwise (so a client cannot forge its address).
pub fn rewrite_forwarding(h: &mut HeaderMap, client: IpAddr, trusted: bool, host: Option<&str>) {
    use std::fmt::Write as _;
    // One formatting of the address serves both headers, and the strings built here become the
    // header values without another copy (this runs once per request).
    let mut client_s = String::with_capacity(48);
    let mut element = String::with_capacity(64);
    match client {
        IpAddr::V4(v4) => {
            push_ipv4(&mut client_s, v4);
            element.push_str("for=");
            element.push_str(&client_s);
            element.push_str(";proto=https");
        }
        IpAddr::V6(v6) => {
            let _ = write!(client_s, "{v6}");
            let _ = write!(element, "for=\"[{client_s}]\";proto=https");
        }
    }
    if let Some(host) = host
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
    {
        element.push_str(";host=");
        element.push_str(host);
    }
    let value = |s: String| HeaderValue::from_maybe_shared(Bytes::from(s));
    let xff = if trusted {
        let prior: Vec<&str> = h.get_all(&X_FORWARDED_FOR).iter().filter_map(|v| v.to_str().ok()).collect();
        if prior.is_empty() { client_s } else { format!("{}, {client_s}", prior.join(", ")) }
    } else {
        client_s
    };
    if let Ok(v) = value(xff) {
        h.insert(&X_FORWARDED_FOR, v);
    }
    if !(trusted && h.contains_key(&X_FORWARDED_PROTO)) {
        h.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("https"));
    }
    let forwarded = if trusted {
        let prior: Vec<&str> = h.get_all(header::FORWARDED).iter().filter_map(|v| v.to_str().ok()).collect();
        if prior.is_empty() { element } else { format!("{}, {element}", prior.join(", ")) }
    } else {
        element
    };
    if let Ok(v) = value(forwarded) {
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

/// Serves one request of a TLS client connection.
pub async fn handle(shared: Arc<Shared>, ctx: Arc<ConnCtx>, req: Request<Incoming>) -> Response<RespBody> {
    let g = shared.current();
    let host = request_host(req.uri(), req.headers());
    let path = req.uri().path();
    let Some(route) = g.route(host.as_deref(), path) else {
        drain(req.into_body());
        let r = error_page(StatusCode::NOT_FOUND, "No route for this host and path.");
        shared.count(&RequestLabels { route: "-".into(), pool: "-".into(), status: 404 });
        return r;
    };
    let pool = route.pool.clone();
    let labels = |status: StatusCode| RequestLabels {
        route: route.label.clone(),
        pool: pool.name.clone(),
        status: status.as_u16(),
    };
    let client = effective_client(&ctx, req.headers());

    let mut max_body = None;
    if let Some(fw) = &route.firewall {
        let size = firewall::head_size(req.method(), req.uri(), req.headers());
        if let Err(block) = fw.check(req.method(), path, size, req.headers(), client) {
            shared
                .metrics
                .firewall_blocks
                .get_or_create(&BlockLabels { route: route.label.clone(), reason: block.reason() })
                .inc();
            drain(req.into_body());
            let mut r = error_page(block.status(), block_detail(block));
            match block {
                Block::Rate { retry_after } => {
                    r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
                }
                Block::Method => {
                    if let Some(allow) = fw.allowed_methods().and_then(|a| HeaderValue::from_str(&a).ok()) {
                        r.headers_mut().insert(header::ALLOW, allow);
                    }
                }
                _ => {}
            }
            shared.count(&labels(r.status()));
            return r;
        }
        max_body = fw.max_body;
    }

    let (mut parts, body) = req.into_parts();
    let hash_key: Option<Vec<u8>> = match pool.lb.algorithm().hash_on() {
        Some(HashOn::ClientAddr) => Some(match client {
            IpAddr::V4(v4) => v4.octets().to_vec(),
            IpAddr::V6(v6) => v6.octets().to_vec(),
        }),
        Some(HashOn::Header(name)) => parts.headers.get(name.as_str()).map(|v| v.as_bytes().to_vec()),
        None => None,
    };
    strip_hop_by_hop(&mut parts.headers);
    if !parts.headers.contains_key(header::HOST)
        && let Some(a) = parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        parts.headers.insert(header::HOST, a);
    }
    rewrite_forwarding(&mut parts.headers, ctx.client.ip(), ctx.trusted, host.as_deref());
    parts.uri = parts.uri.path_and_query().map_or_else(
        || Uri::from_static("/"),
        |pq| Uri::builder().path_and_query(pq.clone()).build().unwrap_or_else(|_| Uri::from_static("/")),
    );
    parts.version = Version::HTTP_11;
    let declared = parts.headers.contains_key(header::CONTENT_LENGTH);
    let body: ReqBody = match max_body {
        // Without a declared length, read up to the limit before choosing a backend, so an
        // oversized body gets a clean 413 instead of an aborted upload.
        Some(max) if !declared && !http_body::Body::is_end_stream(&body) => match read_limited(body, max).await {
            Ok(full_body) => full_body,
            Err(status) => {
                shared
                    .metrics
                    .firewall_blocks
                    .get_or_create(&BlockLabels { route: route.label.clone(), reason: "max_body" })
                    .inc();
                let r = error_page(
                    status,
                    if status == StatusCode::PAYLOAD_TOO_LARGE {
                        "The request body is too large."
                    } else {
                        "The request body could not be read."
                    },
                );
                shared.count(&labels(r.status()));
                return r;
            }
        },
        // A declared length is enforced by hyper; the firewall already compared it.
        _ => body.map_err(BoxError::from).boxed(),
    };
    let req = Request::from_parts(parts, body);

    let r = forward(&shared, &ctx, &pool, req, hash_key.as_deref()).await;
    shared.count(&labels(r.status()));
    r
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

enum Attempt {
    Response(Response<Incoming>, hyper::client::conn::http1::SendRequest<ReqBody>),
    /// The request never left: safe to send to another backend.
    NotSent(String, Request<ReqBody>, bool),
    /// Sent, then failed or timed out: answer the client, do not retry.
    Failed(StatusCode, String),
}

/// Sends `req` to one backend: an idle connection first (a stale one gives the request back
/// untouched and the next is tried), then a new one.
async fn attempt(
    bc: &BackendConn,
    header: ProxyHeader,
    mut req: Request<ReqBody>,
    response_timeout: Duration,
) -> Attempt {
    let mut fresh = false;
    loop {
        let mut sender = match if fresh { None } else { bc.checkout(header) } {
            Some(s) => s,
            None => {
                fresh = true;
                match bc.connect(header).await {
                    Ok(s) => s,
                    Err(e) => {
                        let timed_out = matches!(e, ConnectError::Timeout { .. });
                        return Attempt::NotSent(e.to_string(), req, timed_out);
                    }
                }
            }
        };
        match tokio::time::timeout(response_timeout, sender.try_send_request(req)).await {
            Err(_) => {
                return Attempt::Failed(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!("backend {} sent no response within {response_timeout:?}", bc.addr),
                );
            }
            Ok(Ok(resp)) => return Attempt::Response(resp, sender),
            Ok(Err(mut e)) => match e.take_message() {
                Some(back) if !fresh => req = back,
                Some(back) => return Attempt::NotSent(format!("backend {}: {}", bc.addr, e.error()), back, false),
                None => {
                    let err = e.into_error();
                    // A request body over the route's max_body aborts the upload.
                    let too_big = std::error::Error::source(&err)
                        .is_some_and(|s| s.downcast_ref::<http_body_util::LengthLimitError>().is_some());
                    if too_big {
                        return Attempt::Failed(StatusCode::PAYLOAD_TOO_LARGE, "The request body is too large.".into());
                    }
                    return Attempt::Failed(StatusCode::BAD_GATEWAY, format!("backend {}: {err}", bc.addr));
                }
            },
        }
    }
}

async fn forward(
    shared: &Shared,
    ctx: &ConnCtx,
    pool: &PoolRt,
    req: Request<ReqBody>,
    key: Option<&[u8]>,
) -> Response<RespBody> {
    let header =
        if pool.cfg.sends_proxy_protocol() { ProxyHeader::Client(ctx.client, ctx.local) } else { ProxyHeader::None };
    let mut tried = Vec::new();
    let mut req = Some(req);
    let mut last: Option<(StatusCode, String)> = None;
    for n in 0..=pool.cfg.retries {
        let Some(guard) = pool.lb.pick_excluding(key, &tried) else { break };
        tried.push(guard.index());
        if n > 0 {
            shared.metrics.backend_retries.get_or_create(&PoolLabels { pool: pool.name.clone() }).inc();
        }
        let bc = guard.data().clone();
        let Some(r) = req.take() else { break };
        match attempt(&bc, header, r, pool.cfg.response_timeout.0).await {
            Attempt::Response(resp, sender) => {
                if pool.passive {
                    publish(&shared.metrics, &pool.name, guard.report_live_success());
                }
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                let body = PooledBody::new(body, sender, header, guard).map_err(BoxError::from).boxed();
                return Response::from_parts(parts, body);
            }
            Attempt::NotSent(msg, back, timed_out) => {
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
                last = Some((status, "No backend could be reached.".into()));
                req = Some(back);
            }
            Attempt::Failed(status, msg) => {
                log::warn!("pool {}: {msg}", pool.name);
                if pool.passive && status != StatusCode::PAYLOAD_TOO_LARGE {
                    publish(&shared.metrics, &pool.name, guard.report_live_failure());
                }
                let detail = match status {
                    StatusCode::GATEWAY_TIMEOUT => "The backend did not answer in time.",
                    StatusCode::PAYLOAD_TOO_LARGE => "The request body is too large.",
                    _ => "The backend failed to answer.",
                };
                return error_page(status, detail);
            }
        }
    }
    if let Some(r) = req {
        drain(r.into_body());
    }
    match last {
        Some((status, detail)) => error_page(status, &detail),
        None => error_page(StatusCode::SERVICE_UNAVAILABLE, "No backend is available to serve this request."),
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
