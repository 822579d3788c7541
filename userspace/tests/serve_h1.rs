//! The HTTP/1.1 client path of `rampart serve` (`serve/http/h1.rs`, `serve/http/upstream.rs`) on the
//! wire: a raw TLS client writes exact bytes and reads exact answers; a raw TCP backend records
//! what it received byte for byte and answers from a script chosen by the request path.

mod serve_support;

use std::{
    io,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use serve_support::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_util::sync::CancellationToken;

/// Bound on every single read by the client and the backend: a hang fails instead of waiting.
const READ_BOUND: Duration = Duration::from_secs(10);
const MIB: usize = 1 << 20;

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A recognisable body: a wrong offset or a lost piece changes it.
fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

/// A decoded chunked body: (its length on the wire, the decoded bytes, the trailer section).
type Chunked = (usize, Vec<u8>, Vec<u8>);

/// A complete chunked body at the start of `data`. `Ok(None)`: not all of it is here yet.
fn decode_chunked(data: &[u8]) -> Result<Option<Chunked>, String> {
    let mut at = 0;
    let mut body = Vec::new();
    loop {
        let Some(eol) = find(&data[at..], b"\r\n") else { return Ok(None) };
        let line = &data[at..at + eol];
        let hex = text(line.split(|b| *b == b';').next().unwrap_or_default());
        let size =
            usize::from_str_radix(hex.trim(), 16).map_err(|_| format!("bad chunk size line {:?}", text(line)))?;
        at += eol + 2;
        if size == 0 {
            let start = at;
            loop {
                let Some(eol) = find(&data[at..], b"\r\n") else { return Ok(None) };
                at += eol + 2;
                if eol == 0 {
                    return Ok(Some((at, body, data[start..at - 2].to_vec())));
                }
            }
        }
        if data.len() < at + size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&data[at..at + size]);
        if &data[at + size..at + size + 2] != b"\r\n" {
            return Err("chunk data not followed by CRLF".into());
        }
        at += size + 2;
    }
}

// ---- The backend --------------------------------------------------------------------------

#[derive(Default)]
struct RawState {
    accepted: AtomicUsize,
    /// Complete requests, head and body, exactly as they arrived.
    requests: Mutex<Vec<Vec<u8>>>,
    /// Request heads whose body never completed before the connection ended.
    incomplete: AtomicUsize,
    /// Connections closed by `/bye` after its answer.
    byes: AtomicUsize,
}

/// A scripted HTTP/1.1 backend over plain TCP. By the last path segment: `chunked` (several
/// chunks, a trailer, and a header named by Connection), `close` (no length, then close), `head`
/// (Content-Length 1234, no body for HEAD), `204`, `304`, `big` (1 MiB), `echo` (the request
/// body back), `early-close` (half the declared body, then close), `bye` (an answer, then
/// close), `stale` (on a connection that already answered: close without answering); anything
/// else a short body naming the connection and the path.
struct RawBackend {
    addr: SocketAddr,
    state: Arc<RawState>,
    stop: CancellationToken,
}

impl RawBackend {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(RawState::default());
        let stop = CancellationToken::new();
        let (st, stp) = (state.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let tcp = tokio::select! {
                    _ = stp.cancelled() => return,
                    r = listener.accept() => match r { Ok((t, _)) => t, Err(_) => continue },
                };
                let id = st.accepted.fetch_add(1, Ordering::SeqCst) + 1;
                let (st, stp) = (st.clone(), stp.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        _ = stp.cancelled() => {}
                        _ = raw_conn(tcp, st, id) => {}
                    }
                });
            }
        });
        RawBackend { addr, state, stop }
    }

    fn requests(&self) -> Vec<Vec<u8>> {
        self.state.requests.lock().unwrap().clone()
    }

    fn count(&self) -> usize {
        self.state.requests.lock().unwrap().len()
    }

    fn last(&self) -> String {
        text(self.state.requests.lock().unwrap().last().expect("the backend got no request"))
    }

    fn accepted(&self) -> usize {
        self.state.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Reads more into `buf`; false at end of stream, error, time bound or an absurd size.
async fn read_more(tcp: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut tmp = [0u8; 16 * 1024];
    match tokio::time::timeout(READ_BOUND, tcp.read(&mut tmp)).await {
        Ok(Ok(n)) if n > 0 && buf.len() < 4 * MIB => {
            buf.extend_from_slice(&tmp[..n]);
            true
        }
        _ => false,
    }
}

async fn raw_conn(mut tcp: TcpStream, st: Arc<RawState>, id: usize) {
    let mut buf = Vec::new();
    let mut seen = 0usize;
    loop {
        let head_len = loop {
            if let Some(p) = find(&buf, b"\r\n\r\n") {
                break p + 4;
            }
            if !read_more(&mut tcp, &mut buf).await {
                return;
            }
        };
        let (method, path, chunked, length, upgrade) = {
            let mut hdrs = [httparse::EMPTY_HEADER; 128];
            let mut req = httparse::Request::new(&mut hdrs);
            let Ok(httparse::Status::Complete(_)) = req.parse(&buf[..head_len]) else { return };
            let value = |n: &str| req.headers.iter().find(|h| h.name.eq_ignore_ascii_case(n)).map(|h| text(h.value));
            let chunked = value("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
            let length = value("content-length").and_then(|v| v.parse::<usize>().ok()).unwrap_or(0);
            // A switch asked for as RFC 9110 §7.8 has it: Upgrade, named by Connection.
            let upgrade = value("upgrade").filter(|_| {
                value("connection").is_some_and(|c| c.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
            });
            let (m, p) = (req.method.unwrap_or_default().to_string(), req.path.unwrap_or_default().to_string());
            (m, p, chunked, length, upgrade)
        };
        // Takes the head, then reads nothing more: an upload to it stalls.
        if path.ends_with("/stall-upload") {
            tokio::time::sleep(READ_BOUND).await;
            return;
        }
        let (wire, body) = loop {
            let rest = &buf[head_len..];
            let done = if chunked {
                match decode_chunked(rest) {
                    Ok(d) => d.map(|(n, b, _)| (n, b)),
                    Err(_) => return,
                }
            } else {
                (rest.len() >= length).then(|| (length, rest[..length].to_vec()))
            };
            if let Some(d) = done {
                break d;
            }
            if !read_more(&mut tcp, &mut buf).await {
                st.incomplete.fetch_add(1, Ordering::SeqCst);
                return;
            }
        };
        st.requests.lock().unwrap().push(buf.drain(..head_len + wire).collect());
        seen += 1;

        let seg = path.split('?').next().unwrap_or_default().rsplit('/').next().unwrap_or_default().to_string();
        let mut parts: Vec<Vec<u8>> = Vec::new();
        let mut close = false;
        match seg.as_str() {
            "chunked" => {
                parts.push(
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-sum\r\nConnection: x-private\r\nX-Private: secret\r\nx-kind: chunked\r\n\r\n"
                        .to_vec(),
                );
                for p in [&b"5\r\nhello\r\n"[..], b"1;ext=1\r\n \r\n", b"5\r\nworld\r\n", b"0\r\nx-sum: 42\r\n\r\n"] {
                    parts.push(p.to_vec());
                }
            }
            "close" => {
                parts.push(b"HTTP/1.1 200 OK\r\nx-kind: close\r\n\r\n".to_vec());
                parts.push(b"close-".to_vec());
                parts.push(b"delimited".to_vec());
                close = true;
            }
            "head" => {
                let mut r = b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nx-kind: head\r\n\r\n".to_vec();
                if method != "HEAD" {
                    r.extend_from_slice(&[b'h'; 1234]);
                }
                parts.push(r);
            }
            "204" => parts.push(b"HTTP/1.1 204 No Content\r\nx-kind: 204\r\n\r\n".to_vec()),
            "304" => parts.push(b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\nContent-Length: 1234\r\n\r\n".to_vec()),
            "big" => {
                parts.push(format!("HTTP/1.1 200 OK\r\nContent-Length: {MIB}\r\n\r\n").into_bytes());
                parts.push(pattern(MIB));
            }
            "echo" => {
                parts.push(format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes());
                parts.push(body);
            }
            // Reads the request and never answers.
            "silent" => {
                tokio::time::sleep(READ_BOUND).await;
                return;
            }
            // Half an answer, then nothing.
            "stall-mid" => {
                if tcp.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n").await.is_ok() {
                    let _ = tcp.write_all(&[b's'; 500]).await;
                }
                tokio::time::sleep(READ_BOUND).await;
                return;
            }
            "early-close" => {
                parts.push(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n".to_vec());
                parts.push(vec![b'e'; 500]);
                close = true;
            }
            // Switches to the protocol asked for, sends "hi" behind the 101 in the same write,
            // then answers each read with its bytes upper-cased; at end of stream, "bye".
            "ws" if upgrade.is_some() => {
                let p = upgrade.unwrap_or_default();
                let hello = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: {p}\r\nConnection: Upgrade\r\n\
                     Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\nhi"
                );
                if tcp.write_all(hello.as_bytes()).await.is_err() {
                    return;
                }
                let mut pending = std::mem::take(&mut buf);
                loop {
                    if !pending.is_empty() && tcp.write_all(&pending.to_ascii_uppercase()).await.is_err() {
                        return;
                    }
                    pending.clear();
                    if !read_more(&mut tcp, &mut pending).await {
                        let _ = tcp.write_all(b"bye").await;
                        let _ = tcp.shutdown().await;
                        return;
                    }
                }
            }
            // A 101 that does not say to what.
            "ws-bare" if upgrade.is_some() => {
                parts.push(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n\r\n".to_vec());
                close = true;
            }
            // A keep-alive connection the backend gave up on just as a request came: the
            // request is read, nothing is answered.
            "stale" if seen > 1 => return,
            _ => {
                let b = format!("conn={id} n={seen} path={path}\n");
                parts.push(
                    format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nx-conn: {id}\r\n\r\n{b}", b.len()).into_bytes(),
                );
                close = seg == "bye";
            }
        }
        for p in parts {
            if tcp.write_all(&p).await.is_err() || tcp.flush().await.is_err() {
                return;
            }
        }
        if close {
            let _ = tcp.shutdown().await;
            drop(tcp);
            if seg == "bye" {
                st.byes.fetch_add(1, Ordering::SeqCst);
            }
            return;
        }
    }
}

// ---- The daemon and the client ------------------------------------------------------------

/// A daemon with one https listener (certificates for site.test and api.test) and `routes`.
struct Fixture {
    // Declared first: the daemon goes before its directory.
    daemon: Daemon,
    listen: SocketAddr,
    admin: SocketAddr,
    site: Site,
}

impl Fixture {
    fn start(name: &str, routes: &str) -> Self {
        let site = Site::new(name);
        let (listen, admin) = (free_addr(), free_addr());
        let cfg = site.config(listen, admin, "", routes);
        let daemon = Daemon::start(&cfg, &site.dir.path("daemon.log"));
        Fixture { daemon, listen, admin, site }
    }

    /// A TLS connection without ALPN, so the daemon serves it with h1.rs.
    async fn conn(&self) -> Conn {
        let tcp = TcpStream::connect(self.listen).await.unwrap();
        let tls = tls_client(tcp, "site.test", &self.site.ca.pem).await;
        Conn { tls, buf: Vec::new() }
    }

    fn log(&self) -> String {
        self.daemon.log_text()
    }

    fn metrics(&self) -> String {
        http_get(self.admin, "/metrics")
    }
}

/// A response as read off the wire.
#[derive(Debug)]
struct Resp {
    status: u16,
    /// The head, status line to the blank line.
    head: String,
    body: Vec<u8>,
    /// The body as framed on the wire (chunk lines included).
    wire: Vec<u8>,
    /// A chunked body's trailer section.
    trailers: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }

    fn body_text(&self) -> String {
        text(&self.body)
    }
}

/// How a read for a response ended early.
#[derive(Debug)]
enum Cut {
    /// Nothing more came within the bound: the connection hangs.
    TimedOut(String),
    /// The connection ended (cleanly or not) before the message did.
    Closed(String),
}

/// How a connection ended.
#[derive(Debug, PartialEq)]
enum End {
    /// TLS close_notify, then end of stream.
    Clean,
    /// End of stream or reset without close_notify.
    Unclean(io::ErrorKind),
    /// Still open at the bound.
    Open,
    /// More bytes came instead.
    Data(String),
}

struct Conn {
    tls: tokio_rustls::client::TlsStream<TcpStream>,
    buf: Vec<u8>,
}

impl Conn {
    async fn send(&mut self, b: &[u8]) {
        self.tls.write_all(b).await.unwrap();
        self.tls.flush().await.unwrap();
    }

    /// Reads more; `Ok(0)` after close_notify (rustls reports a bare end of stream as an error).
    async fn fill(&mut self) -> io::Result<usize> {
        let mut tmp = [0u8; 16 * 1024];
        match tokio::time::timeout(READ_BOUND, self.tls.read(&mut tmp)).await {
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&tmp[..n]);
                Ok(n)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(io::ErrorKind::TimedOut.into()),
        }
    }

    /// Reads more of a message; `had`: what of it was already taken from the buffer.
    async fn more(&mut self, had: &[u8]) -> Result<(), Cut> {
        let r = self.fill().await;
        let had = |what: &str| format!("{what} after {:?}", text(&[had, &self.buf[..]].concat()));
        match r {
            Ok(0) => Err(Cut::Closed(had("close_notify"))),
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::TimedOut => Err(Cut::TimedOut(had("nothing more"))),
            Err(e) => Err(Cut::Closed(had(&e.to_string()))),
        }
    }

    /// Reads one response; `head_request`: it answers a HEAD (no body whatever it says).
    async fn response(&mut self, head_request: bool) -> Result<Resp, Cut> {
        let head_len = loop {
            if let Some(p) = find(&self.buf, b"\r\n\r\n") {
                break p + 4;
            }
            self.more(b"").await?;
        };
        let head_bytes: Vec<u8> = self.buf.drain(..head_len).collect();
        let head = text(&head_bytes);
        let status: u16 = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let mut r = Resp { status, head, body: Vec::new(), wire: Vec::new(), trailers: Vec::new() };
        let chunked = r.header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
        let length = r.header("content-length").map(|v| v.parse::<usize>().expect("content-length"));
        if head_request || (100..200).contains(&status) || status == 204 || status == 304 {
        } else if chunked {
            loop {
                if let Some((n, body, trailers)) = decode_chunked(&self.buf).expect("valid chunked body") {
                    r.wire = self.buf.drain(..n).collect();
                    (r.body, r.trailers) = (body, trailers);
                    break;
                }
                self.more(&head_bytes).await?;
            }
        } else if let Some(n) = length {
            while self.buf.len() < n {
                self.more(&head_bytes).await?;
            }
            r.body = self.buf.drain(..n).collect();
            r.wire = r.body.clone();
        } else {
            // Delimited by the close, which must be a clean one (else it may be truncated).
            loop {
                match self.fill().await {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) => {
                        return Err(Cut::Closed(format!("{e} in a close-delimited body after {:?}", text(&self.buf))));
                    }
                }
            }
            r.body = std::mem::take(&mut self.buf);
            r.wire = r.body.clone();
        }
        Ok(r)
    }

    /// Sends a request and reads its answer, which must come whole.
    async fn exchange(&mut self, req: &[u8]) -> Resp {
        self.send(req).await;
        let head = req.starts_with(b"HEAD ");
        self.response(head).await.unwrap_or_else(|c| panic!("{:?}: {c:?}", text(&req[..req.len().min(200)])))
    }

    /// Waits for the connection to end (bounded).
    async fn end(&mut self) -> End {
        if !self.buf.is_empty() {
            return End::Data(text(&self.buf));
        }
        match self.fill().await {
            Ok(0) => End::Clean,
            Ok(_) => End::Data(text(&self.buf)),
            Err(e) if e.kind() == io::ErrorKind::TimedOut => End::Open,
            Err(e) => End::Unclean(e.kind()),
        }
    }
}

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: site.test\r\n\r\n").into_bytes()
}

const FWD: &str = "x-forwarded-for: 127.0.0.1\r\nx-forwarded-proto: https\r\n";

// ---- The tests ----------------------------------------------------------------------------

/// What the backend receives: origin-form request line, the client's end-to-end headers in
/// order, hop-by-hop ones gone, forwarding headers ours alone, bodies re-framed intact.
#[test]
fn request_framing_and_forwarding() {
    isolated(|| async {
        let (web, api) = (RawBackend::start().await, RawBackend::start().await);
        let f = Fixture::start(
            "h1-fwd",
            &format!(
                "[[route]]\nhost = \"site.test\"\npool = \"web\"\n\n[[route]]\nhost = \"api.test\"\npool = \"api\"\n\n\
                 [[pool]]\nname = \"web\"\nbackends = [\"{}\"]\n\n[[pool]]\nname = \"api\"\nbackends = [\"{}\"]\n",
                web.addr, api.addr
            ),
        );
        let mut c = f.conn().await;

        // Hop-by-hop headers (the fixed list and those Connection names) go; a forged
        // X-Forwarded-For, -Proto and Forwarded from an untrusted client are replaced.
        let r = c
            .exchange(
                b"GET /fwd?q=1 HTTP/1.1\r\nHost: site.test\r\nUser-Agent: raw\r\nConnection: keep-alive, X-Private\r\n\
                  X-Private: secret\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\n\
                  Trailer: x-t\r\nUpgrade: h2c\r\nX-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: http\r\n\
                  Forwarded: for=6.6.6.6\r\nAccept: */*\r\n\r\n",
            )
            .await;
        assert_eq!(r.status, 200, "{r:?}\n{}", f.log());
        assert_eq!(
            web.last(),
            format!(
                "GET /fwd?q=1 HTTP/1.1\r\nHost: site.test\r\nUser-Agent: raw\r\nAccept: */*\r\n{FWD}\
                 forwarded: for=127.0.0.1;proto=https;host=site.test\r\n\r\n"
            )
        );

        // Absolute-form: routed by its authority (api.test, while SNI said site.test), sent on in
        // origin-form with the authority as Host.
        let r = c.exchange(b"GET https://api.test:8443/abs?x=1 HTTP/1.1\r\nUser-Agent: raw\r\n\r\n").await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(
            api.last(),
            format!(
                "GET /abs?x=1 HTTP/1.1\r\nUser-Agent: raw\r\nhost: api.test:8443\r\n{FWD}\
                 forwarded: for=127.0.0.1;proto=https;host=api.test\r\n\r\n"
            )
        );
        let r = c.exchange(b"GET https://site.test HTTP/1.1\r\nHost: site.test\r\n\r\n").await;
        assert_eq!(r.status, 200, "{r:?}");
        // The authority replaces the client's Host (RFC 9112 §3.2.2).
        assert!(web.last().starts_with("GET / HTTP/1.1\r\nhost: site.test\r\n"), "{}", web.last());
        assert_eq!((web.count(), api.count()), (2, 1));

        // A Content-Length body, byte for byte.
        let r = c
            .exchange(b"POST /echo HTTP/1.1\r\nHost: site.test\r\nContent-Length: 11\r\nContent-Type: text/plain\r\n\r\nhello world")
            .await;
        assert_eq!((r.status, r.body_text().as_str()), (200, "hello world"), "{r:?}");
        assert_eq!(
            web.last(),
            format!(
                "POST /echo HTTP/1.1\r\nHost: site.test\r\nContent-Type: text/plain\r\n{FWD}\
                 forwarded: for=127.0.0.1;proto=https;host=site.test\r\ncontent-length: 11\r\n\r\nhello world"
            )
        );

        // A chunked body, in two writes cut inside a chunk, with an extension and a trailer: it
        // arrives re-chunked (our own chunk lines, no trailer) and decodes to the same bytes.
        c.send(b"POST /echo HTTP/1.1\r\nHost: site.test\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nWi").await;
        c.send(b"ki\r\n5;ext=1\r\npedia\r\n0\r\nX-Trailer: 1\r\n\r\n").await;
        let r = c.response(false).await.unwrap();
        assert_eq!((r.status, r.body_text().as_str()), (200, "Wikipedia"), "{r:?}");
        let got = web.requests().pop().unwrap();
        let head = format!(
            "POST /echo HTTP/1.1\r\nHost: site.test\r\n{FWD}forwarded: for=127.0.0.1;proto=https;host=site.test\r\n\
             transfer-encoding: chunked\r\n\r\n"
        );
        assert!(got.starts_with(head.as_bytes()), "{}", text(&got));
        let (n, body, trailers) = decode_chunked(&got[head.len()..]).unwrap().unwrap();
        assert_eq!((n, body.as_slice(), trailers.as_slice()), (got.len() - head.len(), &b"Wikipedia"[..], &b""[..]));
        assert!(!text(&got).contains("ext=1"), "{}", text(&got));

        // Expect: 100-continue: the interim answer comes before the body is sent; the backend does
        // not see Expect.
        c.send(b"POST /echo HTTP/1.1\r\nHost: site.test\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n").await;
        let interim = c.response(false).await.unwrap();
        assert_eq!(interim.head, "HTTP/1.1 100 Continue\r\n\r\n");
        let r = c.exchange(b"later").await;
        assert_eq!((r.status, r.body_text().as_str()), (200, "later"), "{r:?}");
        assert!(!web.last().to_ascii_lowercase().contains("expect"), "{}", web.last());
        assert!(web.last().ends_with("content-length: 5\r\n\r\nlater"), "{}", web.last());

        // 1 MiB up, echoed back intact.
        let payload = pattern(MIB);
        let mut req = format!("PUT /up/echo HTTP/1.1\r\nHost: site.test\r\nContent-Length: {MIB}\r\n\r\n").into_bytes();
        req.extend_from_slice(&payload);
        let r = c.exchange(&req).await;
        assert_eq!(r.status, 200, "{}", r.head);
        assert!(r.body == payload, "1 MiB echo differs ({} bytes back)", r.body.len());

        // Absolute-form with a Host that disagrees: the route comes from the authority, so the
        // backend must see that authority as Host too (RFC 9112 §3.2.2: a proxy replaces Host),
        // or a Host-based backend serves another site than the one routed and firewalled.
        let r = c.exchange(b"GET https://api.test/abs2 HTTP/1.1\r\nHost: site.test\r\n\r\n").await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(api.count(), 2, "routed by the authority");
        let got = api.last().to_ascii_lowercase();
        assert_eq!(got.matches("\r\nhost:").count(), 1, "backend got:\n{got}");
        assert!(got.contains("\r\nhost: api.test\r\n"), "backend got:\n{got}");
    })
}

/// Requests two parsers could read differently, or that are malformed, get an error and the
/// connection closes; the backend never sees a complete one.
#[test]
fn smuggling_and_bad_input_refused() {
    isolated(|| async {
        let web = RawBackend::start().await;
        let f = Fixture::start(
            "h1-bad",
            &format!(
                "[[route]]\nhost = \"site.test\"\npool = \"web\"\n\n[[pool]]\nname = \"web\"\nbackends = [\"{}\"]\n",
                web.addr
            ),
        );

        // The header-count limit is 100 lines: exactly 100 pass.
        let hundred: String = (1..100).map(|i| format!("X-H{i}: v\r\n")).collect();
        let r = f
            .conn()
            .await
            .exchange(format!("GET /hundred HTTP/1.1\r\nHost: site.test\r\n{hundred}\r\n").as_bytes())
            .await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(web.count(), 1);

        let big_head = format!("GET / HTTP/1.1\r\nHost: site.test\r\nX-Big: {}\r\n\r\n", "b".repeat(200 * 1024));
        let cases: Vec<(&str, Vec<u8>, u16)> = vec![
            (
                "Content-Length and Transfer-Encoding",
                b"POST /echo HTTP/1.1\r\nHost: site.test\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(),
                400,
            ),
            ("Transfer-Encoding gzip", b"POST /echo HTTP/1.1\r\nHost: site.test\r\nTransfer-Encoding: gzip\r\n\r\nabc".to_vec(), 400),
            (
                "chunked not last",
                b"POST /echo HTTP/1.1\r\nHost: site.test\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n"
                    .to_vec(),
                400,
            ),
            (
                "chunked in HTTP/1.0",
                b"POST /echo HTTP/1.0\r\nHost: site.test\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(),
                400,
            ),
            (
                "two Content-Length values",
                b"POST /echo HTTP/1.1\r\nHost: site.test\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd".to_vec(),
                400,
            ),
            ("a Content-Length list that differs", b"POST /echo HTTP/1.1\r\nHost: site.test\r\nContent-Length: 3, 4\r\n\r\nabcd".to_vec(), 400),
            ("a signed Content-Length", b"POST /echo HTTP/1.1\r\nHost: site.test\r\nContent-Length: +3\r\n\r\nabc".to_vec(), 400),
            ("HTTP/1.1 without Host", b"GET / HTTP/1.1\r\nUser-Agent: raw\r\n\r\n".to_vec(), 400),
            ("two Host headers", b"GET / HTTP/1.1\r\nHost: site.test\r\nHost: api.test\r\n\r\n".to_vec(), 400),
            (
                "invalid chunk size",
                b"POST /echo HTTP/1.1\r\nHost: site.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n".to_vec(),
                400,
            ),
            ("obs-fold", b"GET / HTTP/1.1\r\nHost: site.test\r\nX-A: a\r\n b\r\n\r\n".to_vec(), 400),
            ("101 header lines", format!("GET / HTTP/1.1\r\nHost: site.test\r\n{hundred}X-H100: v\r\n\r\n").into_bytes(), 431),
            ("a 200 KiB head", big_head.into_bytes(), 431),
            ("CONNECT", b"CONNECT site.test:443 HTTP/1.1\r\nHost: site.test:443\r\n\r\n".to_vec(), 405),
        ];
        for (what, bytes, status) in &cases {
            let mut c = f.conn().await;
            c.send(bytes).await;
            let r = c.response(false).await.unwrap_or_else(|e| panic!("{what}: {e:?}\n{}", f.log()));
            assert_eq!(r.status, *status, "{what}: {r:?}");
            assert_eq!(r.header("connection").as_deref(), Some("close"), "{what}: {r:?}");
            assert_eq!(c.end().await, End::Clean, "{what}");
        }
        assert_eq!(
            web.count(),
            1,
            "a refused request reached the backend: {:?}",
            web.requests().iter().map(|r| text(r)).collect::<Vec<_>>()
        );
        // The body of the bad-chunk request is checked as it streams: its head went out before the
        // bad chunk line was read, and that backend connection was dropped, not completed.
        assert!(eventually(50, || web.state.incomplete.load(Ordering::SeqCst) == 1).await);

        // No route: a 404 that keeps the connection.
        let mut c = f.conn().await;
        let r = c.exchange(b"GET / HTTP/1.1\r\nHost: nowhere.test\r\n\r\n").await;
        assert_eq!(r.status, 404, "{r:?}");
        assert_eq!(r.header("connection"), None, "{r:?}");

        // The daemon still serves, on that same connection.
        let r = c.exchange(&get("/after")).await;
        assert_eq!(r.status, 200, "{r:?}\n{}", f.log());
        assert_eq!(web.count(), 2);
        assert!(web.last().starts_with("GET /after "), "{}", web.last());
        drop(c);

        // Every answer is counted: the bad chunk (found after routing) as a 400 of its route; the
        // 404 and the requests refused while parsing or framing (before any route is known) under
        // route "-".
        let m = f.metrics();
        let route = "route=\"site.test/\"";
        let unrouted = "route=\"-\"";
        assert_eq!(metric(&m, "rampart_http_requests_total", &[route, "status=\"200\""]), 2.0, "{m}");
        assert_eq!(metric(&m, "rampart_http_requests_total", &[route, "status=\"400\""]), 1.0, "{m}");
        assert_eq!(metric(&m, "rampart_http_requests_total", &[unrouted, "status=\"404\""]), 1.0, "{m}");
        assert_eq!(metric(&m, "rampart_http_requests_total", &[unrouted, "status=\"400\""]), 10.0, "{m}");
        assert_eq!(metric(&m, "rampart_http_requests_total", &[unrouted, "status=\"431\""]), 2.0, "{m}");
        assert_eq!(metric(&m, "rampart_http_requests_total", &[unrouted, "status=\"405\""]), 1.0, "{m}");
        assert_eq!(metric(&m, "rampart_http_requests_total", &[]), 17.0, "{m}");
        // Every connection above has ended on both sides (the lingering closes included).
        let closed = || metric(&http_get(f.admin, "/metrics"), "rampart_client_connections", &[]) == 0.0;
        assert!(eventually(50, closed).await, "{}", f.metrics());
    })
}

/// Backend answers as the client gets them: re-framed for its HTTP version, bodiless where the
/// status or method says, truncation shown as truncation, closes announced and clean.
#[test]
fn responses_relayed() {
    isolated(|| async {
        let web = RawBackend::start().await;
        let f = Fixture::start(
            "h1-resp",
            &format!(
                "[[route]]\nhost = \"site.test\"\npool = \"web\"\n\n[[pool]]\nname = \"web\"\nbackends = [\"{}\"]\n",
                web.addr
            ),
        );
        let mut c = f.conn().await;

        // Chunked: relayed chunked, same bytes; the trailer, the Trailer header and the header
        // the backend's Connection named are dropped.
        let r = c.exchange(&get("/chunked")).await;
        assert_eq!(r.head, "HTTP/1.1 200 OK\r\nx-kind: chunked\r\ntransfer-encoding: chunked\r\n\r\n", "{r:?}");
        assert_eq!(r.body_text(), "hello world");
        assert_eq!(r.trailers, b"", "{r:?}");

        // Delimited by the backend's close: chunked for an HTTP/1.1 client, which keeps its
        // connection (the next requests run on it).
        let r = c.exchange(&get("/close")).await;
        assert_eq!(r.header("transfer-encoding").as_deref(), Some("chunked"), "{r:?}");
        assert_eq!(r.header("connection"), None, "{r:?}");
        assert_eq!(r.body_text(), "close-delimited");

        // HEAD keeps Content-Length and has no body; 204 and 304 have none either. Pipelined, so
        // a stray body byte would break the next answer.
        c.send(
            &[&b"HEAD /head HTTP/1.1\r\nHost: site.test\r\n\r\n"[..], &get("/204"), &get("/304"), &get("/plain")]
                .concat(),
        )
        .await;
        let r = c.response(true).await.unwrap();
        assert_eq!(r.head, "HTTP/1.1 200 OK\r\nx-kind: head\r\ncontent-length: 1234\r\n\r\n", "{r:?}");
        let r = c.response(false).await.unwrap();
        assert_eq!(r.head, "HTTP/1.1 204 No Content\r\nx-kind: 204\r\n\r\n", "{r:?}");
        let r = c.response(false).await.unwrap();
        assert_eq!(r.status, 304, "{r:?}");
        assert_eq!(r.header("content-length").as_deref(), Some("1234"), "{r:?}");
        assert_eq!(r.header("transfer-encoding"), None, "{r:?}");
        let r = c.response(false).await.unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert!(r.body_text().ends_with("path=/plain\n"), "{r:?}");

        // 1 MiB down, intact.
        let r = c.exchange(&get("/big")).await;
        assert_eq!(r.header("content-length"), Some(MIB.to_string()), "{}", r.head);
        assert!(r.body == pattern(MIB), "1 MiB body differs ({} bytes)", r.body.len());

        // Connection: close from the client: announced, then close_notify and end of stream.
        let r = c.exchange(b"GET /last HTTP/1.1\r\nHost: site.test\r\nConnection: close\r\n\r\n").await;
        assert_eq!((r.status, r.header("connection").as_deref()), (200, Some("close")), "{r:?}");
        assert_eq!(c.end().await, End::Clean);

        // HTTP/1.0 clients get bodies of unknown length by the close, not chunked.
        for (path, body) in [("/close", "close-delimited"), ("/chunked", "hello world")] {
            let mut c = f.conn().await;
            let r = c.exchange(format!("GET {path} HTTP/1.0\r\nHost: site.test\r\n\r\n").as_bytes()).await;
            assert_eq!(r.status, 200, "{r:?}");
            assert_eq!(r.header("transfer-encoding"), None, "{r:?}");
            assert_eq!(r.header("connection").as_deref(), Some("close"), "{r:?}");
            assert_eq!(r.body_text(), body);
        }

        // HTTP/1.0 with keep-alive stays open for another request.
        let mut c = f.conn().await;
        let r = c.exchange(b"GET /ka1 HTTP/1.0\r\nHost: site.test\r\nConnection: keep-alive\r\n\r\n").await;
        assert_eq!(r.header("connection").as_deref(), Some("keep-alive"), "{r:?}");
        assert!(r.header("content-length").is_some(), "{r:?}");
        let r = c.exchange(b"GET /ka2 HTTP/1.0\r\nHost: site.test\r\nConnection: keep-alive\r\n\r\n").await;
        assert!(r.body_text().ends_with("path=/ka2\n"), "{r:?}");

        // A backend that closes mid-body: the client's connection ends without a complete message
        // (no hang, no made-up end).
        let mut c = f.conn().await;
        c.send(&get("/early-close")).await;
        match c.response(false).await {
            Err(Cut::Closed(what)) => assert!(what.contains("content-length: 1000"), "{what}"),
            Err(Cut::TimedOut(what)) => panic!("the client connection hangs: {what}"),
            Ok(r) => panic!("a complete answer from a backend that closed mid-body: {r:?}"),
        }
    })
}

/// Connections last: pipelined requests answered in order, backend connections reused across
/// client requests, and one the backend closed while idle never fails a request.
#[test]
fn keep_alive_pipelining_and_backend_reuse() {
    isolated(|| async {
        let (web, st) = (RawBackend::start().await, RawBackend::start().await);
        let f = Fixture::start(
            "h1-ka",
            &format!(
                "[[route]]\nhost = \"site.test\"\npool = \"web\"\n\n[[route]]\nhost = \"site.test\"\npath = \"/st/\"\npool = \"st\"\n\n\
                 [[pool]]\nname = \"web\"\nbackends = [\"{}\"]\n\n[[pool]]\nname = \"st\"\nbackends = [\"{}\"]\n",
                web.addr, st.addr
            ),
        );
        let mut c = f.conn().await;

        // Three requests in one write, one with a body: three answers, in order.
        c.send(
            &[
                &get("/p1")[..],
                b"POST /echo HTTP/1.1\r\nHost: site.test\r\nContent-Length: 5\r\n\r\nhello",
                &get("/p2"),
            ]
            .concat(),
        )
        .await;
        let mut got = Vec::new();
        for _ in 0..3 {
            let r = c.response(false).await.unwrap();
            assert_eq!(r.status, 200, "{r:?}");
            got.push(r.body_text());
        }
        assert!(got[0].ends_with("path=/p1\n") && got[1] == "hello" && got[2].ends_with("path=/p2\n"), "{got:?}");

        // 50 requests one after the other ride one or two backend connections.
        for i in 0..50 {
            let r = c.exchange(&get(&format!("/seq/{i}"))).await;
            assert!(r.status == 200 && r.body_text().ends_with(&format!("path=/seq/{i}\n")), "{r:?}");
        }
        assert_eq!(web.count(), 53);
        assert!(web.accepted() <= 2, "{} backend connections for 53 requests", web.accepted());
        let m = f.metrics();
        assert_eq!(metric(&m, "rampart_http_requests_total", &["route=\"site.test/\"", "status=\"200\""]), 53.0, "{m}");

        // The backend closes an idle connection: it is noticed before reuse.
        let r = c.exchange(&get("/st/bye")).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert!(eventually(50, || st.state.byes.load(Ordering::SeqCst) == 1).await);
        let r = c.exchange(&get("/st/after")).await;
        assert_eq!(r.status, 200, "{r:?}\n{}", f.log());
        assert!(r.body_text().starts_with("conn=2 n=1 "), "{r:?}");

        // The backend closes an idle connection just as a request comes on it (the close and the
        // request cross): nothing was answered, the GET can go again, so the client gets a 200
        // from a new connection rather than a 502.
        let r = c.exchange(&get("/st/stale")).await;
        assert_eq!(r.status, 200, "{r:?}\n{}", f.log());
        assert!(r.body_text().starts_with("conn=3 n=1 "), "{r:?}");
    })
}

/// A switch of protocols (WebSocket): the Upgrade goes to the backend on rampart's terms, the
/// 101 comes back, then bytes flow both ways (including those sent behind the heads) until
/// each side has closed. A backend that declines answers as usual and the connection stays
/// HTTP; h2c is never asked of a backend; a 101 that names no protocol is a 502.
#[test]
fn upgrade_switches_to_a_tunnel() {
    isolated(|| async {
        let web = RawBackend::start().await;
        let f = Fixture::start(
            "h1-upgrade",
            &format!("[[route]]\npool = \"web\"\n\n[[pool]]\nname = \"web\"\nbackends = [\"{}\"]\n", web.addr),
        );
        let ws = |path: &str, proto: &str| {
            format!(
                "GET {path} HTTP/1.1\r\nHost: site.test\r\nConnection: keep-alive, Upgrade\r\nUpgrade: {proto}\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            .into_bytes()
        };

        let mut c = f.conn().await;
        let r = c.exchange(&ws("/chat/ws", "websocket")).await;
        assert_eq!(r.status, 101, "{r:?}\n{}", f.log());
        assert_eq!(r.header("upgrade").as_deref(), Some("websocket"), "{r:?}");
        assert_eq!(r.header("connection").as_deref(), Some("upgrade"), "{r:?}");
        assert_eq!(r.header("sec-websocket-accept").as_deref(), Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{r:?}");
        assert_eq!(
            web.last(),
            format!(
                "GET /chat/ws HTTP/1.1\r\nHost: site.test\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                 Sec-WebSocket-Version: 13\r\n{FWD}forwarded: for=127.0.0.1;proto=https;host=site.test\r\n\
                 connection: upgrade\r\nupgrade: websocket\r\n\r\n"
            )
        );
        // The bytes the backend sent behind its 101, then each message echoed.
        while c.buf.len() < 2 {
            c.more(b"").await.unwrap();
        }
        assert_eq!(c.buf.drain(..2).collect::<Vec<u8>>(), b"hi");
        for msg in [&b"hello"[..], b"frame two", &pattern(40_000)] {
            c.send(msg).await;
            while c.buf.len() < msg.len() {
                c.more(b"").await.unwrap();
            }
            assert_eq!(c.buf.drain(..msg.len()).collect::<Vec<u8>>(), msg.to_ascii_uppercase());
        }
        // The client closes its side; the backend sees the end, says goodbye and closes too.
        c.tls.shutdown().await.unwrap();
        while c.buf.len() < 3 {
            c.more(b"").await.unwrap_or_else(|e| panic!("{e:?}\n{}", f.log()));
        }
        assert_eq!(c.buf.drain(..3).collect::<Vec<u8>>(), b"bye");
        assert_eq!(c.end().await, End::Clean);
        let m = f.metrics();
        assert_eq!(metric(&m, "rampart_http_requests_total", &["status=\"101\""]), 1.0, "{m}");

        // A backend that does not switch answers as usual, and the connection stays HTTP.
        let mut c = f.conn().await;
        let r = c.exchange(&ws("/chat/plain", "websocket")).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert!(r.body_text().ends_with("path=/chat/plain\n"), "{r:?}");
        assert_eq!(c.exchange(&get("/after")).await.status, 200);

        // h2c is not passed on: the backend sees an ordinary request.
        let r = c.exchange(&ws("/h2c/ws", "h2c")).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert!(!web.last().to_ascii_lowercase().contains("upgrade"), "{}", web.last());

        // Nor is an Upgrade that Connection does not name, or one on a request with a body.
        let r = c.exchange(b"GET /lone/ws HTTP/1.1\r\nHost: site.test\r\nUpgrade: websocket\r\n\r\n").await;
        assert_eq!(r.status, 200, "{r:?}");
        let r = c
            .exchange(b"POST /body/ws HTTP/1.1\r\nHost: site.test\r\nConnection: upgrade\r\nUpgrade: websocket\r\nContent-Length: 2\r\n\r\nhi")
            .await;
        assert_eq!(r.status, 200, "{r:?}");
        assert!(!web.last().to_ascii_lowercase().contains("upgrade"), "{}", web.last());

        // A 101 without an Upgrade header: the client gets a 502, not a half-switched connection.
        let mut c = f.conn().await;
        let r = c.exchange(&ws("/x/ws-bare", "websocket")).await;
        assert_eq!(r.status, 502, "{r:?}");
    })
}

/// Backends that stop, bounded by the pool's response_timeout: one that never answers gets a
/// 504 and the client connection stays; one that stalls halfway through its answer has the
/// client connection closed (the head is out, so the client sees a short body); one that stops
/// reading an upload gets a 504 instead of holding the client for good.
#[test]
fn stalled_backends_time_out() {
    isolated(|| async {
        let web = RawBackend::start().await;
        let f = Fixture::start(
            "h1-stall",
            &format!(
                "[[route]]\npool = \"web\"\n\n[[pool]]\nname = \"web\"\nbackends = [\"{}\"]\nresponse_timeout = \"500ms\"\n",
                web.addr
            ),
        );
        let mut c = f.conn().await;
        let r = c.exchange(&get("/silent")).await;
        assert_eq!(r.status, 504, "{r:?}");
        let r = c.exchange(&get("/after-silent")).await;
        assert_eq!(r.status, 200, "the connection is kept after a 504: {r:?}");

        c.send(&get("/stall-mid")).await;
        match c.response(false).await {
            Err(Cut::Closed(_)) => {}
            other => panic!("a response stalled halfway must end the connection, not {other:?}"),
        }

        // 64 MiB: more than the socket buffers between client, rampart and backend hold, so
        // rampart's writes to the backend stop.
        let tcp = TcpStream::connect(f.listen).await.unwrap();
        let tls = tls_client(tcp, "site.test", &f.site.ca.pem).await;
        let (mut rd, mut wr) = tokio::io::split(tls);
        let total = 64 * MIB;
        let writer = tokio::spawn(async move {
            let head = format!("POST /stall-upload HTTP/1.1\r\nHost: site.test\r\nContent-Length: {total}\r\n\r\n");
            let chunk = vec![b'u'; 64 * 1024];
            let mut sent = 0;
            if wr.write_all(head.as_bytes()).await.is_ok() {
                while sent < total && wr.write_all(&chunk).await.is_ok() {
                    sent += chunk.len();
                }
            }
            sent
        });
        let mut answer = Vec::new();
        let mut tmp = [0u8; 4096];
        while find(&answer, b"\r\n\r\n").is_none() {
            match tokio::time::timeout(READ_BOUND, rd.read(&mut tmp)).await {
                Ok(Ok(n)) if n > 0 => answer.extend_from_slice(&tmp[..n]),
                other => panic!("no answer to a stalled upload: {other:?} after {:?}\n{}", text(&answer), f.log()),
            }
        }
        writer.abort();
        assert!(answer.starts_with(b"HTTP/1.1 504 "), "{}", text(&answer));
        assert_eq!(web.count(), 3, "the upload never reached the backend whole");
        assert!(f.log().contains("read none of the request body"), "{}", f.log());
    })
}
