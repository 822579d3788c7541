//! HTTP/1.1 clients, served by rampart's own code: the connection's task reads a request head,
//! routes it, applies the route's firewall, writes the request to a backend connection it holds
//! for the exchange only, and relays the answer, usually in one write each way. No task,
//! channel or header map per request: this is the keep-alive hot path (BENCHMARKS.md). h2
//! clients go through hyper (`proxy::handle`); both share routing, firewall and backend picks.
//!
//! Framing follows RFC 9112 strictly where requests could be smuggled: Transfer-Encoding with
//! Content-Length, a Transfer-Encoding that does not end in chunked, or disagreeing
//! Content-Length values get a 400 and the connection closes.

use std::{
    borrow::Cow,
    cell::RefCell,
    io,
    mem::{self, MaybeUninit},
    pin::Pin,
    sync::Arc,
    task::{Poll, ready},
    time::Duration,
};

use bytes::BytesMut;
use http::{HeaderName, HeaderValue, Method, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::{
    Shared,
    proxy::{self, ConnCtx, Forwarding, Outcome, RequestBody, SendError},
    runtime::RouteRt,
    stats::Timing,
    timer::Timer,
    tunnel,
    upstream::{
        self, Asks, BodyDecoder, Framing, HeaderPos, MAX_HEADERS, Semantics, Step, Upstream, poll_fill, range, slice,
    },
};

/// Largest request head accepted (request line and headers); larger ones get a 431.
const MAX_REQUEST_HEAD: usize = 64 * 1024;
/// Response bytes gathered before a write to the client.
const WRITE_BATCH: usize = 64 * 1024;
/// What is read and dropped of a refused request's body before closing (so the client reads
/// the answer instead of a reset).
const LINGER_BYTES: usize = 1 << 20;
const LINGER_TIME: Duration = Duration::from_secs(2);

/// What an idle connection's first read takes at most, through the stack (the rest waits in
/// rustls until the next read).
const FIRST_READ: usize = 4 * 1024;
/// Buffer sets a worker thread keeps for the connections it serves next.
const POOLED: usize = 64;
/// Buffers grown past these (a large head, body or answer) are freed, not pooled.
const POOLED_READ_MAX: usize = 16 * 1024;
const POOLED_WRITE_MAX: usize = 16 * 1024;

/// A connection's buffers while it serves a request. An idle keep-alive connection holds none:
/// they go back to the worker thread's pool when it starts waiting for its next request, and
/// come out when that request's first bytes arrive. So thousands of idle connections do not
/// keep ~14 KiB each, and a busy connection gets buffers back without allocating.
struct Bufs {
    rbuf: BytesMut,
    hdrs: Vec<HeaderPos>,
    out: Vec<u8>,
    up_head: Vec<u8>,
}

thread_local! {
    static POOL: RefCell<Vec<Bufs>> = const { RefCell::new(Vec::new()) };
}

impl Bufs {
    fn take() -> Bufs {
        POOL.with_borrow_mut(Vec::pop).unwrap_or_else(|| Bufs {
            rbuf: BytesMut::with_capacity(8 * 1024),
            hdrs: Vec::with_capacity(32),
            out: Vec::with_capacity(4 * 1024),
            up_head: Vec::with_capacity(1024),
        })
    }

    fn give(mut self) {
        if self.rbuf.capacity() == 0
            || self.rbuf.capacity() > POOLED_READ_MAX
            || self.out.capacity() > POOLED_WRITE_MAX
            || self.up_head.capacity() > POOLED_WRITE_MAX
        {
            return;
        }
        self.rbuf.clear();
        self.hdrs.clear();
        self.out.clear();
        self.up_head.clear();
        POOL.with_borrow_mut(|p| {
            if p.len() < POOLED {
                p.push(self);
            }
        });
    }
}

/// The client side of the connection: the TLS stream, what has been read from it, and the
/// connection's one timer (also used while waiting on its backend).
struct Client<S> {
    io: S,
    rbuf: BytesMut,
    eof: bool,
    timer: Timer,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    async fn fill(&mut self) -> io::Result<usize> {
        let n = std::future::poll_fn(|cx| poll_fill(&mut self.io, cx, &mut self.rbuf)).await?;
        if n == 0 {
            self.eof = true;
        }
        Ok(n)
    }

    /// Reads more, waiting at most `limit`.
    async fn fill_within(&mut self, limit: Duration) -> io::Result<usize> {
        let Client { io, rbuf, eof, timer } = self;
        let n = timer.within(limit, std::future::poll_fn(|cx| poll_fill(io, cx, rbuf))).await??;
        if n == 0 {
            *eof = true;
        }
        Ok(n)
    }

    /// Waits at most `limit` for the next request's first bytes without holding a buffer: they
    /// are read through the stack, into buffers taken from the pool once they are there.
    /// `Ok(None)`: the client closed.
    async fn first_bytes_within(&mut self, limit: Duration) -> io::Result<Option<Bufs>> {
        let Client { io, eof, timer, .. } = self;
        let read = std::future::poll_fn(|cx| {
            let mut stack = [MaybeUninit::<u8>::uninit(); FIRST_READ];
            let mut rb = ReadBuf::uninit(&mut stack);
            ready!(Pin::new(&mut *io).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                return Poll::Ready(Ok::<_, io::Error>(None));
            }
            let mut b = Bufs::take();
            b.rbuf.extend_from_slice(rb.filled());
            Poll::Ready(Ok(Some(b)))
        });
        let got = timer.within(limit, read).await??;
        if got.is_none() {
            *eof = true;
        }
        Ok(got)
    }

    async fn write(&mut self, data: &[u8], limit: Duration) -> io::Result<()> {
        let Client { io, timer, .. } = self;
        let w = async {
            io.write_all(data).await?;
            io.flush().await
        };
        timer.within(limit, w).await?
    }

    /// Closes cleanly: TLS close_notify, then FIN (clients treat a bare FIN as truncation).
    async fn close(&mut self) {
        let _ = tokio::time::timeout(LINGER_TIME, self.io.shutdown()).await;
    }

    /// After an answer to a request whose body was not read: say goodbye (TLS close_notify and
    /// FIN), then read and drop what the client still sends, bounded, so it sees the answer.
    async fn linger_close(&mut self) {
        let _ = tokio::time::timeout(LINGER_TIME, async {
            let _ = self.io.shutdown().await;
            let mut left = LINGER_BYTES;
            while left > 0 {
                self.rbuf.clear();
                match self.fill().await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
        })
        .await;
    }
}

/// Why no request head came.
enum NoHead {
    /// Closed, reset, idle or header timeout, shutdown: close without a word.
    Quiet,
    TooLarge,
    Bad,
}

/// The parts of a request line, as offsets into the head.
struct Line {
    method: (u32, u32),
    target: (u32, u32),
    minor: u8,
}

/// Parses a complete request head at the start of `buf`; `Ok(None)`: not all here yet.
fn parse_head(buf: &[u8], hdrs: &mut Vec<HeaderPos>) -> Result<Option<(usize, Line)>, NoHead> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let n = match req.parse_with_uninit_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(NoHead::TooLarge),
        Err(_) => return Err(NoHead::Bad),
    };
    let (Some(m), Some(t), Some(minor)) = (req.method, req.path, req.version) else { return Err(NoHead::Bad) };
    hdrs.clear();
    for h in req.headers.iter() {
        hdrs.push(HeaderPos { name: range(buf, h.name.as_bytes()), value: range(buf, h.value) });
    }
    Ok(Some((n, Line { method: range(buf, m.as_bytes()), target: range(buf, t.as_bytes()), minor })))
}

/// A request's body as it comes from the client, sent on to the backend.
struct ClientBody<'a, S> {
    c: &'a mut Client<S>,
    dec: BodyDecoder,
    /// Re-encode as chunked toward the backend (the client sent chunked).
    chunked: bool,
    /// Send `100 Continue` to the client before reading the body.
    expect_continue: bool,
    started: bool,
    idle: Duration,
    /// The pool's response_timeout, which also bounds each write to the backend.
    backend_timeout: Duration,
}

impl<S: AsyncRead + AsyncWrite + Unpin> RequestBody for ClientBody<'_, S> {
    async fn send(&mut self, up: &mut Upstream) -> Result<(), SendError> {
        if self.dec.is_done() {
            return Ok(());
        }
        self.started = true;
        if std::mem::take(&mut self.expect_continue) {
            self.c
                .write(b"HTTP/1.1 100 Continue\r\n\r\n", self.idle)
                .await
                .map_err(|e| SendError::Client(e.to_string()))?;
        }
        let mut out = Vec::new();
        loop {
            match self.dec.step(&mut self.c.rbuf, self.c.eof).map_err(|e| SendError::Client(e.into()))? {
                Step::Data(b) => {
                    if self.chunked {
                        upstream::encode_chunk(&mut out, &b);
                    } else {
                        out.extend_from_slice(&b);
                    }
                }
                Step::Done => {
                    if self.chunked {
                        out.extend_from_slice(upstream::LAST_CHUNK);
                    }
                    return proxy::body_to_backend(&mut self.c.timer, self.backend_timeout, up, &out).await;
                }
                Step::NeedMore => {
                    if !out.is_empty() {
                        proxy::body_to_backend(&mut self.c.timer, self.backend_timeout, up, &out).await?;
                        out.clear();
                    }
                    match self.c.fill_within(self.idle).await {
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                            return Err(SendError::Client("timed out".into()));
                        }
                        Err(e) => return Err(SendError::Client(e.to_string())),
                    }
                }
            }
        }
    }

    fn replayable(&self) -> bool {
        !self.started
    }

    fn timer(&mut self) -> &mut Timer {
        &mut self.c.timer
    }
}

/// Serves HTTP/1.1 on one client connection until it closes, times out or the daemon shuts down.
pub fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    shared: Arc<Shared>,
    ctx: Arc<ConnCtx>,
    io: S,
) -> impl Future<Output = ()> {
    // The Client lives in this block and `serve_client` borrows it. A value moved into an async
    // fn (`io`, or a Client) keeps a second slot in the connection's state beside the local it
    // is moved to: 1.2 KiB more per connection for a TLS stream.
    // No buffers until the first request's bytes arrive (Bufs).
    let mut c = Client { io, rbuf: BytesMut::new(), eof: false, timer: Timer::new() };
    async move { serve_client(shared, ctx, &mut c).await }
}

async fn serve_client<S: AsyncRead + AsyncWrite + Unpin>(shared: Arc<Shared>, ctx: Arc<ConnCtx>, c: &mut Client<S>) {
    let lrt = ctx.listener.clone();
    let (idle, header_timeout) = (lrt.idle_timeout, lrt.client_header_timeout);
    let mut hdrs: Vec<HeaderPos> = Vec::new();
    let mut out: Vec<u8> = Vec::new();
    let mut up_head: Vec<u8> = Vec::new();
    // One shutdown waiter for the connection's life, not one per request (each registers with
    // the token under its lock). Once polled it stays registered and wakes this task when the
    // token is cancelled, so later waits read the daemon's flag instead of polling it again
    // (each poll takes the token's locks).
    let shutdown = shared.shutdown.cancelled();
    tokio::pin!(shutdown);
    let mut registered = false;
    loop {
        // The next request: wait for its first byte (idle timeout; a shutdown closes an idle
        // connection), then for the whole head (header timeout).
        if c.rbuf.is_empty() {
            // Idle from here on, maybe for minutes: hold no buffers meanwhile.
            Bufs {
                rbuf: mem::take(&mut c.rbuf),
                hdrs: mem::take(&mut hdrs),
                out: mem::take(&mut out),
                up_head: mem::take(&mut up_head),
            }
            .give();
            let stop = std::future::poll_fn(|cx| {
                if shared.stopping() {
                    return std::task::Poll::Ready(());
                }
                if registered {
                    return std::task::Poll::Pending;
                }
                registered = true;
                shutdown.as_mut().poll(cx)
            });
            let first = tokio::select! {
                biased;
                _ = stop => return c.close().await,
                r = c.first_bytes_within(idle) => r,
            };
            match first {
                Ok(Some(b)) => (c.rbuf, hdrs, out, up_head) = (b.rbuf, b.hdrs, b.out, b.up_head),
                // Idle for too long: say goodbye.
                Err(e) if e.kind() == io::ErrorKind::TimedOut => return c.close().await,
                _ => return,
            }
        }
        // Set when the head is not whole yet (it usually is, and then no clock is read).
        let mut deadline = None;
        let parsed = loop {
            match parse_head(&c.rbuf, &mut hdrs) {
                Ok(Some((n, _))) if n > MAX_REQUEST_HEAD => break Err(NoHead::TooLarge),
                Ok(Some(p)) => break Ok(p),
                Ok(None) if c.rbuf.len() > MAX_REQUEST_HEAD => break Err(NoHead::TooLarge),
                Ok(None) => {}
                Err(e) => break Err(e),
            }
            let at = *deadline.get_or_insert_with(|| tokio::time::Instant::now() + header_timeout);
            match tokio::time::timeout_at(at, c.fill()).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => break Err(NoHead::Quiet),
            }
        };
        let (head_len, line) = match parsed {
            Ok(p) => p,
            Err(NoHead::Quiet) => return,
            Err(e) => {
                let (status, detail) = match e {
                    NoHead::TooLarge => {
                        (StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "The request headers are too large.")
                    }
                    _ => (StatusCode::BAD_REQUEST, "The request could not be parsed."),
                };
                proxy::count_unrouted(&shared, status);
                answer(c, &mut out, status, detail, None, false, true, idle).await;
                return c.linger_close().await;
            }
        };
        // Boxed: inline, the request's future (the exchange with a backend and the relay of
        // its answer, about 2 KiB) would stay in every connection's state while it is idle.
        // One allocation per request instead, freed when the answer is sent.
        match Box::pin(request(&shared, &ctx, c, &hdrs, head_len, line, &mut out, &mut up_head)).await {
            Next::KeepAlive if !shared.stopping() => {}
            Next::KeepAlive | Next::Close => return c.close().await,
            Next::Linger => return c.linger_close().await,
        }
    }
}

/// What the connection does after a request.
enum Next {
    KeepAlive,
    Close,
    /// Close after reading and dropping what is left of an unread request body.
    Linger,
}

/// Writes one of the proxy's own pages (or just its head, for HEAD).
#[allow(clippy::too_many_arguments)]
async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Client<S>,
    out: &mut Vec<u8>,
    status: StatusCode,
    detail: &str,
    extra: Option<(HeaderName, HeaderValue)>,
    head_only: bool,
    close: bool,
    limit: Duration,
) -> bool {
    use std::io::Write as _;
    let body = proxy::error_html(status, detail);
    out.clear();
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\ncontent-type: text/html; charset=utf-8\r\ncache-control: no-store\r\ncontent-length: {}\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    );
    if let Some((n, v)) = extra {
        proxy::write_header(out, n.as_str().as_bytes(), v.as_bytes());
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    c.write(out, limit).await.is_ok()
}

/// The route key of a Host value or authority: lower case, no port, no trailing dot; borrowed
/// when it already is one (the usual case), so no allocation per request.
fn host_key(h: &str) -> Cow<'_, str> {
    let clean = !h.bytes().any(|b| b.is_ascii_uppercase() || b == b':') && !h.ends_with('.');
    if clean { Cow::Borrowed(h) } else { Cow::Owned(proxy::normalize_host(h)) }
}

/// One request, from its parsed head to the end of its answer.
#[allow(clippy::too_many_arguments)]
async fn request<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    ctx: &ConnCtx,
    c: &mut Client<S>,
    hdrs: &[HeaderPos],
    head_len: usize,
    line: Line,
    out: &mut Vec<u8>,
    up_head: &mut Vec<u8>,
) -> Next {
    let idle = ctx.listener.idle_timeout;
    let raw = &c.rbuf[..head_len];
    let method_b = slice(raw, line.method);
    let target = slice(raw, line.target);
    let head_only = method_b == b"HEAD";

    // One pass over the headers: framing, connection options, and what routing needs.
    let mut sem = Semantics::default();
    let mut host: Option<&[u8]> = None;
    let mut hosts = 0;
    let mut expect: Option<&[u8]> = None;
    let mut upgrade_to: Option<&[u8]> = None;
    let mut has_xfp = false;
    for h in hdrs {
        let (n, v) = (slice(raw, h.name), slice(raw, h.value));
        sem.add(n, v);
        if n.eq_ignore_ascii_case(b"host") {
            host = Some(v);
            hosts += 1;
        } else if n.eq_ignore_ascii_case(b"expect") {
            expect = Some(v);
        } else if n.eq_ignore_ascii_case(b"upgrade") {
            upgrade_to = Some(v);
        } else if n.eq_ignore_ascii_case(b"x-forwarded-proto") {
            has_xfp = true;
        }
    }
    let keep = if line.minor == 0 { sem.keep_alive && !sem.close } else { !sem.close };

    // Framing (RFC 9112 §6.1-6.3): anything that two parsers could read differently is refused.
    let bad = |d| (StatusCode::BAD_REQUEST, d);
    let framing = if sem.te {
        if line.minor == 0 {
            Err(bad("Transfer-Encoding is not allowed in HTTP/1.0."))
        } else if !sem.te_chunked {
            Err(bad("The request's transfer coding must end in chunked."))
        } else if sem.content_length.is_some() {
            Err(bad("A request cannot carry both Transfer-Encoding and Content-Length."))
        } else {
            Ok(Framing::Chunked)
        }
    } else {
        match sem.content_length {
            Some(Ok(n)) => Ok(Framing::Length(n)),
            Some(Err(())) => Err(bad("The request's Content-Length is not valid.")),
            None => Ok(Framing::Empty),
        }
    };
    // The request target: origin-form, absolute-form (its authority is the host), or `*`.
    let (authority, origin): (Option<&[u8]>, &[u8]) = if target.first() == Some(&b'/') || target == b"*" {
        (None, target)
    } else if let Some(rest) = strip_scheme(target) {
        let end = rest.iter().position(|b| *b == b'/' || *b == b'?').unwrap_or(rest.len());
        let path = &rest[end..];
        // `http://host?q` would need a "/" added in front of the query: refused instead (rare).
        (
            Some(&rest[..end]),
            if path.is_empty() {
                b"/"
            } else if path[0] == b'?' {
                b""
            } else {
                path
            },
        )
    } else {
        (None, b"")
    };
    let method = Method::from_bytes(method_b);
    let checked = match (&framing, &method) {
        (Err(e), _) => Err(*e),
        (_, Err(_)) => Err(bad("The request method is not valid.")),
        (_, Ok(m)) if *m == Method::CONNECT => Err((StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not supported.")),
        _ if origin.is_empty() || (origin == b"*" && method_b != b"OPTIONS") => {
            Err(bad("The request target is not valid."))
        }
        _ if hosts > 1 => Err(bad("A request must have one Host header.")),
        _ if line.minor == 1 && hosts == 0 && authority.is_none() => Err(bad("A Host header is needed.")),
        _ if expect.is_some_and(|e| !e.trim_ascii().eq_ignore_ascii_case(b"100-continue")) => {
            Err((StatusCode::EXPECTATION_FAILED, "Only 100-continue is understood."))
        }
        _ => Ok(()),
    };
    let path_end = origin.iter().position(|b| *b == b'?').unwrap_or(origin.len());
    let (path, host_s) = match (std::str::from_utf8(&origin[..path_end]), authority.or(host).map(std::str::from_utf8)) {
        (Ok(p), Some(Ok(h))) => (p, Some(host_key(h))),
        (Ok(p), None) => (p, None),
        _ => ("", None),
    };
    let framing = match (checked, framing) {
        (Ok(()), Ok(f)) if !path.is_empty() => f,
        (Err((status, detail)), _) => {
            proxy::count_unrouted(shared, status);
            answer(c, out, status, detail, None, head_only, true, idle).await;
            return Next::Linger;
        }
        _ => {
            proxy::count_unrouted(shared, StatusCode::BAD_REQUEST);
            answer(c, out, StatusCode::BAD_REQUEST, "The request target is not valid.", None, head_only, true, idle)
                .await;
            return Next::Linger;
        }
    };
    let Ok(method) = method else { return Next::Close };
    // A switch to another protocol (WebSocket) goes to the backend when it is well formed:
    // HTTP/1.1, `Connection: upgrade`, a protocol named, no body. Not h2c: a proxy's backend
    // connection cannot become HTTP/2 for one client (RFC 9113 dropped that upgrade anyway).
    // Otherwise the Upgrade header is dropped, as any hop-by-hop header, and the request is an
    // ordinary one.
    let upgrade_to = upgrade_to.filter(|v| {
        line.minor == 1
            && sem.names(b"upgrade")
            && framing == Framing::Empty
            && !head_only
            && v.split(|b| *b == b',').any(|t| !t.trim_ascii().is_empty())
            && !v.split(|b| *b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(b"h2c"))
    });

    let g = shared.current();
    let Some(route) = g.route(host_s.as_deref(), path) else {
        proxy::count_unrouted(shared, StatusCode::NOT_FOUND);
        return refuse(
            c,
            out,
            framing,
            StatusCode::NOT_FOUND,
            "No route for this host and path.",
            None,
            head_only,
            keep,
            idle,
            head_len,
        )
        .await;
    };
    // Observed when this function returns: the answer's last byte is written by then.
    let timing = Timing::start(&*route.stats);
    let pool = route.pool.clone();
    let xff = || {
        hdrs.iter().filter(|h| slice(raw, h.name).eq_ignore_ascii_case(b"x-forwarded-for")).map(|h| slice(raw, h.value))
    };
    let client = proxy::effective_client(ctx, xff());
    let declared = match framing {
        Framing::Length(n) => Some(n),
        _ => None,
    };
    if let Err(r) = proxy::check_firewall(shared, route, &method, path, head_len as u64, declared, client) {
        route.requests.inc(&shared.metrics, r.status.as_u16());
        return refuse(c, out, framing, r.status, r.detail, r.header, head_only, keep, idle, head_len).await;
    }
    let key = proxy::hash_key(&pool, client, |name| {
        hdrs.iter().find(|h| slice(raw, h.name).eq_ignore_ascii_case(name.as_bytes())).map(|h| slice(raw, h.value))
    });

    // The backend's request head, except framing and forwarding headers (written below, once
    // the body's framing is settled).
    let joined = |name: &[u8]| -> Option<String> {
        let v: Vec<&str> = hdrs
            .iter()
            .filter(|h| slice(raw, h.name).eq_ignore_ascii_case(name))
            .filter_map(|h| std::str::from_utf8(slice(raw, h.value)).ok())
            .collect();
        (!v.is_empty()).then(|| v.join(", "))
    };
    let fwd = if ctx.trusted {
        Forwarding::new(
            ctx.client.ip(),
            host_s.as_deref(),
            joined(b"x-forwarded-for").as_deref(),
            joined(b"forwarded").as_deref(),
        )
    } else {
        Forwarding::new(ctx.client.ip(), host_s.as_deref(), None, None)
    };
    up_head.clear();
    proxy::write_request_line(up_head, method_b, origin);
    for h in hdrs {
        let (n, v) = (slice(raw, h.name), slice(raw, h.value));
        let drop = !sem.forwards(n)
            || (authority.is_some() && n.eq_ignore_ascii_case(b"host"))
            || n.eq_ignore_ascii_case(b"content-length")
            || n.eq_ignore_ascii_case(b"expect")
            || n.eq_ignore_ascii_case(b"x-forwarded-for")
            || n.eq_ignore_ascii_case(b"forwarded")
            || (n.eq_ignore_ascii_case(b"x-forwarded-proto") && !ctx.trusted);
        if !drop {
            proxy::write_header(up_head, n, v);
        }
    }
    // An absolute-form target routed the request: its authority is the Host the backend sees
    // (RFC 9112 §3.2.2), whatever Host the client also sent.
    if let Some(a) = authority {
        proxy::write_header(up_head, b"host", a);
    }
    proxy::write_header(up_head, b"x-forwarded-for", fwd.xff.as_bytes());
    if !(ctx.trusted && has_xfp) {
        up_head.extend_from_slice(b"x-forwarded-proto: https\r\n");
    }
    proxy::write_header(up_head, b"forwarded", fwd.forwarded.as_bytes());
    if let Some(p) = upgrade_to {
        up_head.extend_from_slice(b"connection: upgrade\r\n");
        proxy::write_header(up_head, b"upgrade", p);
    }
    let upgrading = upgrade_to.is_some();
    let expect_continue = expect.is_some() && line.minor == 1;
    let _ = c.rbuf.split_to(head_len);

    // A chunked body under a max_body limit is read whole before a backend is chosen, so an
    // oversized one gets a clean 413 (as the h2 path does).
    let max_body = route.firewall.as_ref().and_then(|f| f.max_body);
    let mut body_framing = framing;
    if let (Framing::Chunked, Some(max)) = (framing, max_body) {
        if expect_continue && c.write(b"HTTP/1.1 100 Continue\r\n\r\n", idle).await.is_err() {
            return Next::Close;
        }
        match read_whole(c, max, idle).await {
            Ok(body) => {
                body_framing = Framing::Length(body.len() as u64);
                proxy::write_framing(up_head, body_framing);
                up_head.extend_from_slice(b"\r\n");
                up_head.extend_from_slice(&body);
            }
            Err(status) => {
                proxy::count_block(shared, route, "max_body");
                route.requests.inc(&shared.metrics, status.as_u16());
                let detail = if status == StatusCode::PAYLOAD_TOO_LARGE {
                    "The request body is too large."
                } else {
                    "The request body could not be read."
                };
                answer(c, out, status, detail, None, head_only, true, idle).await;
                return Next::Linger;
            }
        }
    } else {
        proxy::write_framing(up_head, framing);
        up_head.extend_from_slice(b"\r\n");
    }
    let inline = body_framing != framing;
    let dec = BodyDecoder::new(if inline { Framing::Empty } else { framing });
    let mut body = ClientBody {
        c,
        dec,
        chunked: !inline && framing == Framing::Chunked,
        expect_continue: expect_continue && !inline,
        started: false,
        idle,
        backend_timeout: pool.cfg.response_timeout.0,
    };
    let idempotent = proxy::is_idempotent(&method);
    let header = ctx.proxy_header(&pool);
    let asks = if head_only {
        Asks::Head
    } else if upgrading {
        Asks::Upgrade
    } else {
        Asks::Plain
    };
    let outcome = proxy::exchange(shared, &pool, header, up_head, &mut body, key.as_deref(), idempotent, asks).await;
    let body_done = body.dec.is_done();
    let keep = keep && body_done;
    match outcome {
        Outcome::Error { status, detail } => {
            route.requests.inc(&shared.metrics, status.as_u16());
            answer(c, out, status, detail, None, head_only, !keep, idle).await;
            if keep {
                Next::KeepAlive
            } else if body_done {
                Next::Close
            } else {
                Next::Linger
            }
        }
        Outcome::Response(x) if x.head.status == 101 => {
            // A tunnel's time is not a request's.
            timing.cancel();
            switch(shared, ctx, route, c, out, x, idle).await
        }
        Outcome::Response(x) => relay(shared, route, c, out, x, line.minor, keep, idle).await,
    }
}

/// The backend agreed to switch protocols: the client gets the 101, then the two connections
/// are joined byte for byte (tunnel.rs) until both sides close, either fails, or nothing moves
/// for the listener's `tunnel_timeout`. The backend connection is never reused after that, and
/// the pick is held meanwhile (least-connections counts a tunnel as a connection in flight).
async fn switch<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    ctx: &ConnCtx,
    route: &RouteRt,
    c: &mut Client<S>,
    out: &mut Vec<u8>,
    x: proxy::Exchange,
    idle: Duration,
) -> Next {
    let proxy::Exchange { head, up, guard, backend, .. } = x;
    let upgrade = head.headers.iter().find(|h| slice(&head.raw, h.name).eq_ignore_ascii_case(b"upgrade"));
    let Some(proto) = upgrade.map(|h| slice(&head.raw, h.value)) else {
        log::warn!("pool {}: backend {} answered 101 without an Upgrade header", route.pool.name, backend.addr);
        route.requests.inc(&shared.metrics, StatusCode::BAD_GATEWAY.as_u16());
        answer(c, out, StatusCode::BAD_GATEWAY, "The backend failed to answer.", None, false, true, idle).await;
        return Next::Close;
    };
    route.requests.inc(&shared.metrics, head.status);
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\n");
    for (n, v) in head.end_to_end() {
        proxy::write_header(out, n, v);
    }
    out.extend_from_slice(b"connection: upgrade\r\n");
    proxy::write_header(out, b"upgrade", proto);
    out.extend_from_slice(b"\r\n");
    let (mut io, early) = up.into_parts();
    // Bytes that came in behind either head already belong to the new protocol.
    if !early.is_empty() {
        out.extend_from_slice(&early);
    }
    if c.write(out, idle).await.is_err() {
        return Next::Close;
    }
    if !c.rbuf.is_empty() {
        let sent = async {
            io.write_all(&c.rbuf).await?;
            io.flush().await
        };
        if c.timer.within(idle, sent).await.map_or(true, |r| r.is_err()) {
            return Next::Close;
        }
        c.rbuf.clear();
    }
    match tunnel::join(&mut c.io, &mut io, ctx.listener.tunnel_timeout).await {
        Ok(n) => log::debug!("tunnel to backend {} closed: {} bytes up, {} down", backend.addr, n.up, n.down),
        Err(e) => log::debug!("tunnel to backend {} ended: {e}", backend.addr),
    }
    drop(guard);
    Next::Close
}

/// Answers a request refused before any backend saw it. Its body, if any, is unread: a small
/// declared one already here is skipped and the connection kept; otherwise it closes.
#[allow(clippy::too_many_arguments)]
async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Client<S>,
    out: &mut Vec<u8>,
    framing: Framing,
    status: StatusCode,
    detail: &str,
    extra: Option<(HeaderName, HeaderValue)>,
    head_only: bool,
    keep: bool,
    idle: Duration,
    head_len: usize,
) -> Next {
    let skip = match framing {
        Framing::Empty => Some(0),
        Framing::Length(n) if (head_len as u64 + n) <= c.rbuf.len() as u64 => Some(n as usize),
        _ => None,
    };
    let keep = keep && skip.is_some();
    if let Some(n) = skip {
        let _ = c.rbuf.split_to(head_len + n);
    }
    if !answer(c, out, status, detail, extra, head_only, !keep, idle).await {
        return Next::Close;
    }
    if keep { Next::KeepAlive } else { Next::Linger }
}

/// Reads a whole chunked request body of at most `max` bytes.
async fn read_whole<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Client<S>,
    max: u64,
    idle: Duration,
) -> Result<Vec<u8>, StatusCode> {
    let mut dec = BodyDecoder::new(Framing::Chunked);
    let mut body = Vec::new();
    loop {
        match dec.step(&mut c.rbuf, c.eof).map_err(|_| StatusCode::BAD_REQUEST)? {
            Step::Data(b) => {
                if (body.len() + b.len()) as u64 > max {
                    return Err(StatusCode::PAYLOAD_TOO_LARGE);
                }
                body.extend_from_slice(&b);
            }
            Step::Done => return Ok(body),
            Step::NeedMore => match c.fill_within(idle).await {
                Ok(_) => {}
                Err(_) => return Err(StatusCode::BAD_REQUEST),
            },
        }
    }
}

fn strip_scheme(t: &[u8]) -> Option<&[u8]> {
    for s in [&b"http://"[..], b"https://"] {
        if t.len() > s.len() && t[..s.len()].eq_ignore_ascii_case(s) {
            return Some(&t[s.len()..]);
        }
    }
    None
}

/// Writes the backend's answer to the client: the head rewritten (hop-by-hop headers out, our
/// framing and connection headers in), then the body as it arrives, gathered into few writes.
#[allow(clippy::too_many_arguments)]
async fn relay<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    route: &RouteRt,
    c: &mut Client<S>,
    out: &mut Vec<u8>,
    x: proxy::Exchange,
    minor: u8,
    keep: bool,
    idle: Duration,
) -> Next {
    use std::io::Write as _;
    let proxy::Exchange { head, mut up, guard, backend, key } = x;
    let response_timeout = route.pool.cfg.response_timeout.0;
    route.requests.inc(&shared.metrics, head.status);
    // An HTTP/1.0 client gets a body of unknown length by the connection closing.
    let chunked_out = matches!(head.framing, Framing::Chunked | Framing::Close) && minor == 1;
    let keep = keep && (minor == 1 || !matches!(head.framing, Framing::Chunked | Framing::Close));
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    let _ = write!(out, "{} ", head.status);
    match head.reason() {
        r if !r.is_empty() => out.extend_from_slice(r),
        _ => out.extend_from_slice(
            StatusCode::from_u16(head.status).ok().and_then(|s| s.canonical_reason()).unwrap_or("").as_bytes(),
        ),
    }
    out.extend_from_slice(b"\r\n");
    for (n, v) in head.end_to_end() {
        proxy::write_header(out, n, v);
    }
    match head.framing {
        Framing::Length(n) => proxy::write_framing(out, Framing::Length(n)),
        Framing::Empty => {
            if let Some(n) = head.content_length() {
                proxy::write_framing(out, Framing::Length(n));
            }
        }
        Framing::Chunked | Framing::Close if chunked_out => proxy::write_framing(out, Framing::Chunked),
        Framing::Chunked | Framing::Close => {}
    }
    if !keep {
        out.extend_from_slice(b"connection: close\r\n");
    } else if minor == 0 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");

    let mut dec = BodyDecoder::new(head.framing);
    loop {
        match up.try_body(&mut dec) {
            Ok(Step::Data(b)) => {
                if chunked_out {
                    upstream::encode_chunk(out, &b);
                } else {
                    out.extend_from_slice(&b);
                }
                if out.len() >= WRITE_BATCH {
                    if c.write(out, idle).await.is_err() {
                        return Next::Close;
                    }
                    out.clear();
                }
            }
            Ok(Step::Done) => {
                if chunked_out {
                    out.extend_from_slice(upstream::LAST_CHUNK);
                }
                break;
            }
            Ok(Step::NeedMore) => {
                if !out.is_empty() {
                    if c.write(out, idle).await.is_err() {
                        return Next::Close;
                    }
                    out.clear();
                }
                match c.timer.within(response_timeout, up.fill()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        log::warn!("pool {}: backend {} failed mid-response: {e}", route.pool.name, backend.addr);
                        return Next::Close;
                    }
                    Err(_) => {
                        log::warn!("pool {}: backend {} stalled mid-response", route.pool.name, backend.addr);
                        return Next::Close;
                    }
                }
            }
            Err(e) => {
                log::warn!("pool {}: backend {}: {e}", route.pool.name, backend.addr);
                // What was gathered is sent; the client sees the message end early.
                let _ = c.write(out, idle).await;
                return Next::Close;
            }
        }
    }
    // Back to the idle list before the client write: the next request may want it.
    if up.reusable_after(&head, &dec) {
        backend.checkin(up, key);
    }
    drop(guard);
    if c.write(out, idle).await.is_err() {
        return Next::Close;
    }
    if keep { Next::KeepAlive } else { Next::Close }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_heads() {
        let mut hdrs = Vec::new();
        let buf = b"GET /a?b HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc";
        let (n, line) = parse_head(buf, &mut hdrs).ok().flatten().unwrap();
        assert_eq!(&buf[n..], b"abc");
        assert_eq!(slice(buf, line.method), b"GET");
        assert_eq!(slice(buf, line.target), b"/a?b");
        assert_eq!(line.minor, 1);
        assert_eq!(hdrs.len(), 2);
        assert!(matches!(parse_head(b"GET / HTTP/1.1\r\nHost: x\r\n", &mut hdrs), Ok(None)));
        assert!(matches!(parse_head(b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", &mut hdrs), Err(NoHead::Bad)));
        assert!(matches!(parse_head(b"GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n", &mut hdrs), Err(NoHead::Bad)));
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x{i}: y\r\n")).collect();
        assert!(matches!(
            parse_head(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes(), &mut hdrs),
            Err(NoHead::TooLarge)
        ));
    }

    /// Idle connections give their buffers back and busy ones take them again: the same
    /// allocations, cleared; grown or empty ones are not kept.
    #[test]
    fn buffers_go_back_to_the_pool() {
        // The pool is per thread; a test thread starts with none.
        let mut b = Bufs::take();
        b.rbuf.extend_from_slice(b"GET / HTTP/1.1\r\n");
        b.out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        let (rbuf_at, out_at) = (b.rbuf.as_ptr(), b.out.as_ptr());
        b.give();
        let again = Bufs::take();
        assert_eq!((again.rbuf.as_ptr(), again.out.as_ptr()), (rbuf_at, out_at));
        assert!(again.rbuf.is_empty() && again.out.is_empty() && again.hdrs.is_empty() && again.up_head.is_empty());

        let mut big = again;
        big.out.reserve(POOLED_WRITE_MAX + 1);
        big.give();
        Bufs { rbuf: BytesMut::new(), hdrs: Vec::new(), out: Vec::new(), up_head: Vec::new() }.give();
        assert_eq!(POOL.with_borrow(Vec::len), 0, "a grown set and an empty one are not kept");

        // More sets out at once than the pool keeps: the extra ones are freed when given back.
        let out: Vec<Bufs> = (0..POOLED + 3).map(|_| Bufs::take()).collect();
        out.into_iter().for_each(Bufs::give);
        assert_eq!(POOL.with_borrow(Vec::len), POOLED);
    }

    #[test]
    fn host_keys() {
        assert!(matches!(host_key("example.com"), Cow::Borrowed("example.com")));
        assert_eq!(host_key("Example.COM:8443"), "example.com");
        assert_eq!(host_key("example.com."), "example.com");
        assert_eq!(host_key("[::1]:443"), "[::1]");
    }

    #[test]
    fn schemes() {
        assert_eq!(strip_scheme(b"https://a.example/x"), Some(&b"a.example/x"[..]));
        assert_eq!(strip_scheme(b"HTTP://a"), Some(&b"a"[..]));
        assert_eq!(strip_scheme(b"ftp://a"), None);
    }
}
