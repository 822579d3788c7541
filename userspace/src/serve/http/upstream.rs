//! HTTP/1.1 as rampart speaks it to backends, and the message framing both directions share:
//! one connection ([`Upstream`]) writes a request and reads a response head; [`BodyDecoder`]
//! takes a body out of a read buffer (length, chunked, or until close) without doing IO, so the
//! HTTP/1 client path (`h1.rs`, async loops) and the h2 client path (`backend::UpstreamBody`, a
//! polled body) decode the same way. Connections wait between requests in `BackendConn`'s idle list.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, Waker},
};

use bytes::{Buf, Bytes, BytesMut};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpStream,
};

use super::tcp::Tcp;

/// Largest response head accepted from a backend.
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Most header lines in one head (request or response).
pub const MAX_HEADERS: usize = 100;
/// Longest chunk-size line (with extensions) and trailer section accepted.
const MAX_CHUNK_LINE: usize = 4096;
const MAX_TRAILERS: usize = 16 * 1024;
/// Read buffers grow by this much when full.
const READ_RESERVE: usize = 8 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("{0}")]
    Io(#[from] io::Error),
    /// `empty`: not one byte of a response came (a keep-alive connection the backend had closed).
    #[error("connection closed before a complete response")]
    Closed { empty: bool },
    #[error("response head over {MAX_RESPONSE_HEAD} bytes or {MAX_HEADERS} headers")]
    HeadTooLarge,
    #[error("malformed response: {0}")]
    Malformed(&'static str),
    #[error("malformed body: {0}")]
    Body(&'static str),
}

/// A backend connection's byte stream.
pub enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<Tcp>>),
}

impl Io {
    fn tcp(&self) -> &TcpStream {
        match self {
            Io::Plain(t) => t,
            Io::Tls(t) => &t.get_ref().0.0,
        }
    }
}

impl AsyncRead for Io {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(t) => Pin::new(t).poll_read(cx, buf),
            Io::Tls(t) => Pin::new(t.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(t) => Pin::new(t).poll_write(cx, b),
            Io::Tls(t) => Pin::new(t.as_mut()).poll_write(cx, b),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(t) => Pin::new(t).poll_flush(cx),
            Io::Tls(t) => Pin::new(t.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(t) => Pin::new(t).poll_shutdown(cx),
            Io::Tls(t) => Pin::new(t.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Reads into `buf`'s spare capacity (growing it when full); `Ok(0)` is end of stream.
pub fn poll_fill<R: AsyncRead + Unpin>(
    io: &mut R,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    if buf.capacity() - buf.len() < READ_RESERVE / 2 {
        buf.reserve(READ_RESERVE);
    }
    tokio_util::io::poll_read_buf(Pin::new(io), cx, buf)
}

/// How a message body is delimited (RFC 9112 §6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// No body (HEAD answers, 1xx, 204, 304, requests without one).
    Empty,
    Length(u64),
    Chunked,
    /// Until the connection closes (responses only).
    Close,
}

/// Byte ranges of one header line in a head's raw bytes.
#[derive(Clone, Copy, Debug)]
pub struct HeaderPos {
    pub name: (u32, u32),
    pub value: (u32, u32),
}

/// Offsets of `part` inside `base` (both from the same parse).
pub fn range(base: &[u8], part: &[u8]) -> (u32, u32) {
    let start = part.as_ptr() as usize - base.as_ptr() as usize;
    (start as u32, (start + part.len()) as u32)
}

pub fn slice(raw: &[u8], r: (u32, u32)) -> &[u8] {
    &raw[r.0 as usize..r.1 as usize]
}

/// Hop-by-hop header names (RFC 9110 §7.6.1), lower case: never forwarded.
pub fn is_hop_by_hop(name: &[u8]) -> bool {
    const HOP: [&[u8]; 7] =
        [b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade"];
    HOP.iter().any(|h| h.eq_ignore_ascii_case(name))
}

/// What a head's Connection and framing headers say, gathered in one pass.
#[derive(Debug, Default)]
pub struct Semantics {
    pub close: bool,
    pub keep_alive: bool,
    /// Other names the Connection header lists (hop-by-hop for this message), lower case.
    pub named: Vec<Vec<u8>>,
    /// Transfer-Encoding present, and whether `chunked` is its final coding.
    pub te: bool,
    pub te_chunked: bool,
    /// Content-Length: `Some(Ok(n))` when every value agrees, `Some(Err(()))` when they do not parse or differ.
    pub content_length: Option<Result<u64, ()>>,
}

impl Semantics {
    pub fn add(&mut self, name: &[u8], value: &[u8]) {
        if name.eq_ignore_ascii_case(b"connection") {
            for token in value.split(|b| *b == b',') {
                let t = token.trim_ascii();
                if t.eq_ignore_ascii_case(b"close") {
                    self.close = true;
                } else if t.eq_ignore_ascii_case(b"keep-alive") {
                    self.keep_alive = true;
                } else if !t.is_empty() {
                    self.named.push(t.to_ascii_lowercase());
                }
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            self.te = true;
            // Only the last coding counts; a later header line continues the list.
            if let Some(last) = value.split(|b| *b == b',').map(<[u8]>::trim_ascii).rfind(|t| !t.is_empty()) {
                self.te_chunked = last.eq_ignore_ascii_case(b"chunked");
            }
        } else if name.eq_ignore_ascii_case(b"content-length") {
            for v in value.split(|b| *b == b',') {
                let n = parse_decimal(v.trim_ascii()).ok_or(());
                self.content_length = match (self.content_length, n) {
                    (None, n) => Some(n),
                    (Some(Ok(a)), Ok(b)) if a == b => Some(Ok(a)),
                    _ => Some(Err(())),
                };
            }
        }
    }

    /// Whether the Connection header lists `token` (as `upgrade` in `Connection: Upgrade`).
    pub fn names(&self, token: &[u8]) -> bool {
        self.named.iter().any(|n| n.eq_ignore_ascii_case(token))
    }

    /// Whether a header of this message is forwarded: not hop-by-hop, not named by Connection.
    pub fn forwards(&self, name: &[u8]) -> bool {
        !is_hop_by_hop(name) && !self.named.iter().any(|n| n.eq_ignore_ascii_case(name))
    }
}

pub fn parse_decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(s.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

/// A backend's response head, kept as its raw bytes plus offsets.
#[derive(Debug)]
pub struct ResponseHead {
    pub raw: Bytes,
    pub status: u16,
    pub reason: (u32, u32),
    pub headers: Vec<HeaderPos>,
    pub sem: Semantics,
    pub framing: Framing,
    /// The backend keeps the connection open after this response.
    pub reusable: bool,
}

impl ResponseHead {
    pub fn reason(&self) -> &[u8] {
        slice(&self.raw, self.reason)
    }

    /// End-to-end headers, in order, without the framing ones (Content-Length included: writers
    /// emit framing themselves).
    pub fn end_to_end(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.headers
            .iter()
            .map(|h| (slice(&self.raw, h.name), slice(&self.raw, h.value)))
            .filter(|(n, _)| self.sem.forwards(n) && !n.eq_ignore_ascii_case(b"content-length"))
    }

    /// The backend's Content-Length value, when it sent one (HEAD and 304 answers keep it).
    pub fn content_length(&self) -> Option<u64> {
        self.sem.content_length.and_then(Result::ok)
    }
}

/// Parses a complete response head at the start of `buf`; `Ok(None)` = incomplete.
fn parse_response(buf: &[u8], head_request: bool) -> Result<Option<(usize, ResponseHead)>, UpstreamError> {
    let mut hdrs = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut hdrs);
    let n = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(UpstreamError::HeadTooLarge),
        Err(_) => return Err(UpstreamError::Malformed("bad status line or header")),
    };
    let status = resp.code.unwrap_or(0);
    let minor = resp.version.unwrap_or(1);
    let reason = resp.reason.map_or((0, 0), |r| range(buf, r.as_bytes()));
    let mut sem = Semantics::default();
    let mut headers = Vec::with_capacity(resp.headers.len());
    for h in resp.headers.iter() {
        sem.add(h.name.as_bytes(), h.value);
        headers.push(HeaderPos { name: range(buf, h.name.as_bytes()), value: range(buf, h.value) });
    }
    let framing = if head_request || (100..200).contains(&status) || status == 204 || status == 304 {
        Framing::Empty
    } else if sem.te {
        if sem.te_chunked { Framing::Chunked } else { Framing::Close }
    } else {
        match sem.content_length {
            Some(Ok(n)) => Framing::Length(n),
            Some(Err(())) => return Err(UpstreamError::Malformed("invalid Content-Length")),
            None => Framing::Close,
        }
    };
    let keeps = if minor == 0 { sem.keep_alive && !sem.close } else { !sem.close };
    let reusable = keeps && framing != Framing::Close;
    Ok(Some((n, ResponseHead { raw: Bytes::new(), status, reason, headers, sem, framing, reusable })))
}

/// What a request lets its answer be, beyond an ordinary response.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Asks {
    #[default]
    Plain,
    /// A HEAD request: the answer has no body whatever its headers say.
    Head,
    /// The request asked to switch protocols (Upgrade): `101 Switching Protocols` is an answer.
    Upgrade,
}

/// One HTTP/1.1 connection to a backend.
pub struct Upstream {
    io: Io,
    rbuf: BytesMut,
    eof: bool,
}

impl Upstream {
    pub fn new(io: Io) -> Self {
        Upstream { io, rbuf: BytesMut::with_capacity(READ_RESERVE), eof: false }
    }

    /// Nothing is left unread and the backend has not closed: after a response that allows
    /// keep-alive, the connection can go back to the idle list.
    pub fn drained(&self) -> bool {
        !self.eof && self.rbuf.is_empty()
    }

    /// Whether an idle connection can carry another request: the backend has sent nothing since
    /// the last response (no close, no stray bytes). No syscall unless the socket signalled.
    pub fn is_alive(&mut self) -> bool {
        if self.eof || !self.rbuf.is_empty() {
            return false;
        }
        let tcp = self.io.tcp();
        let mut cx = Context::from_waker(Waker::noop());
        match tcp.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            // Readiness may be left over from the last read; look.
            Poll::Ready(Ok(())) => {
                matches!(tcp.try_read(&mut [0u8; 1]), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }

    /// Writes bytes of a request (head and/or body) and flushes them out.
    pub async fn send(&mut self, data: &[u8]) -> io::Result<()> {
        self.io.write_all(data).await?;
        self.io.flush().await
    }

    /// Reads the response head, skipping interim (1xx) answers other than a 101 to a request
    /// that asked for it. After a 101 the connection carries the new protocol: see
    /// [`Upstream::into_parts`].
    pub async fn read_head(&mut self, asks: Asks) -> Result<ResponseHead, UpstreamError> {
        let mut got_any = false;
        loop {
            if !self.rbuf.is_empty() {
                got_any = true;
                if let Some((n, mut head)) = parse_response(&self.rbuf, asks == Asks::Head)? {
                    let raw = self.rbuf.split_to(n).freeze();
                    if head.status == 101 {
                        if asks != Asks::Upgrade {
                            return Err(UpstreamError::Malformed(
                                "101 Switching Protocols to a request without Upgrade",
                            ));
                        }
                        head.raw = raw;
                        head.reusable = false;
                        return Ok(head);
                    }
                    if (100..200).contains(&head.status) {
                        continue;
                    }
                    head.raw = raw;
                    return Ok(head);
                }
                if self.rbuf.len() > MAX_RESPONSE_HEAD {
                    return Err(UpstreamError::HeadTooLarge);
                }
            }
            let n = match std::future::poll_fn(|cx| poll_fill(&mut self.io, cx, &mut self.rbuf)).await {
                Ok(n) => n,
                // A backend closing a kept-alive connection with our request unread resets it:
                // the same as a close for deciding whether the request may go out again.
                Err(e) if !got_any && e.kind() == io::ErrorKind::ConnectionReset => 0,
                Err(e) => return Err(e.into()),
            };
            if n == 0 {
                self.eof = true;
                return Err(UpstreamError::Closed { empty: !got_any });
            }
        }
    }

    /// The connection and what was read from it past the last response head (after a 101: the
    /// first bytes of the new protocol).
    pub fn into_parts(self) -> (Io, BytesMut) {
        (self.io, self.rbuf)
    }

    /// The next piece of the response body; `None` at its end.
    pub fn poll_body(
        &mut self,
        cx: &mut Context<'_>,
        dec: &mut BodyDecoder,
    ) -> Poll<Result<Option<Bytes>, UpstreamError>> {
        loop {
            match dec.step(&mut self.rbuf, self.eof).map_err(UpstreamError::Body)? {
                Step::Data(b) => return Poll::Ready(Ok(Some(b))),
                Step::Done => return Poll::Ready(Ok(None)),
                Step::NeedMore => {}
            }
            let n = std::task::ready!(poll_fill(&mut self.io, cx, &mut self.rbuf))?;
            if n == 0 {
                self.eof = true;
            }
        }
    }

    /// The next piece of the response body from what has been read, without IO.
    pub fn try_body(&mut self, dec: &mut BodyDecoder) -> Result<Step, UpstreamError> {
        dec.step(&mut self.rbuf, self.eof).map_err(UpstreamError::Body)
    }

    /// Reads more of the response; `Ok(0)` at end of stream.
    pub async fn fill(&mut self) -> io::Result<usize> {
        let n = std::future::poll_fn(|cx| poll_fill(&mut self.io, cx, &mut self.rbuf)).await?;
        if n == 0 {
            self.eof = true;
        }
        Ok(n)
    }

    pub async fn read_body(&mut self, dec: &mut BodyDecoder) -> Result<Option<Bytes>, UpstreamError> {
        std::future::poll_fn(|cx| self.poll_body(cx, dec)).await
    }

    /// Whether the connection can go back to the idle list after a response read to its end.
    pub fn reusable_after(&self, head: &ResponseHead, dec: &BodyDecoder) -> bool {
        head.reusable && dec.is_done() && !self.eof && self.rbuf.is_empty()
    }
}

/// Takes a message body out of a read buffer, piece by piece, without IO.
#[derive(Debug)]
pub struct BodyDecoder {
    state: State,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Length(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkEnd,
    Trailers(usize),
    Close,
    Done,
}

/// What [`BodyDecoder::step`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    Data(Bytes),
    /// More bytes are needed.
    NeedMore,
    Done,
}

impl BodyDecoder {
    pub fn new(framing: Framing) -> Self {
        let state = match framing {
            Framing::Empty | Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::ChunkSize,
            Framing::Close => State::Close,
        };
        BodyDecoder { state }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Body bytes still expected, when the framing says.
    pub fn remaining(&self) -> Option<u64> {
        match self.state {
            State::Length(n) => Some(n),
            State::Done => Some(0),
            _ => None,
        }
    }

    /// The next piece of body in `buf` (consumed from it). `eof`: nothing more will arrive.
    pub fn step(&mut self, buf: &mut BytesMut, eof: bool) -> Result<Step, &'static str> {
        loop {
            match self.state {
                State::Done => return Ok(Step::Done),
                State::Length(n) => {
                    if buf.is_empty() {
                        return if eof {
                            Err("connection closed before the end of the body")
                        } else {
                            Ok(Step::NeedMore)
                        };
                    }
                    let take = (n.min(buf.len() as u64)) as usize;
                    let left = n - take as u64;
                    self.state = if left == 0 { State::Done } else { State::Length(left) };
                    return Ok(Step::Data(buf.split_to(take).freeze()));
                }
                State::Close => {
                    if buf.is_empty() {
                        if eof {
                            self.state = State::Done;
                            return Ok(Step::Done);
                        }
                        return Ok(Step::NeedMore);
                    }
                    return Ok(Step::Data(buf.split().freeze()));
                }
                State::ChunkSize => {
                    let Some(end) = find_crlf(buf) else {
                        if buf.len() > MAX_CHUNK_LINE {
                            return Err("chunk size line too long");
                        }
                        return if eof { Err("connection closed inside a chunked body") } else { Ok(Step::NeedMore) };
                    };
                    let size = parse_chunk_size(&buf[..end])?;
                    buf.advance(end + 2);
                    self.state = if size == 0 { State::Trailers(0) } else { State::ChunkData(size) };
                }
                State::ChunkData(n) => {
                    if buf.is_empty() {
                        return if eof { Err("connection closed inside a chunk") } else { Ok(Step::NeedMore) };
                    }
                    let take = (n.min(buf.len() as u64)) as usize;
                    let left = n - take as u64;
                    self.state = if left == 0 { State::ChunkEnd } else { State::ChunkData(left) };
                    return Ok(Step::Data(buf.split_to(take).freeze()));
                }
                State::ChunkEnd => {
                    if buf.len() < 2 {
                        return if eof { Err("connection closed inside a chunk") } else { Ok(Step::NeedMore) };
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err("chunk data not followed by CRLF");
                    }
                    buf.advance(2);
                    self.state = State::ChunkSize;
                }
                State::Trailers(seen) => {
                    // Trailer fields are read and dropped: neither side is promised them.
                    let Some(end) = find_crlf(buf) else {
                        if seen + buf.len() > MAX_TRAILERS {
                            return Err("trailers too large");
                        }
                        return if eof { Err("connection closed inside the trailers") } else { Ok(Step::NeedMore) };
                    };
                    buf.advance(end + 2);
                    self.state = if end == 0 { State::Done } else { State::Trailers(seen + end + 2) };
                    if seen + end + 2 > MAX_TRAILERS {
                        return Err("trailers too large");
                    }
                }
            }
        }
    }
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

/// `1a;ext=v` → 26. Hex digits, at most 15 of them, then optional whitespace and extensions.
fn parse_chunk_size(line: &[u8]) -> Result<u64, &'static str> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 15 {
        return Err("bad chunk size");
    }
    let rest = line[digits..].trim_ascii_start();
    if !(rest.is_empty() || rest[0] == b';') {
        return Err("bad chunk size");
    }
    let mut n = 0u64;
    for d in &line[..digits] {
        n = n * 16 + u64::from(char::from(*d).to_digit(16).unwrap_or(0));
    }
    Ok(n)
}

/// Appends one chunk (size line, data, CRLF) of chunked transfer coding.
pub fn encode_chunk(out: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    use std::io::Write as _;
    let _ = write!(out, "{:x}\r\n", data.len());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(framing: Framing, input: &[&[u8]], eof: bool) -> Result<(Vec<u8>, bool), &'static str> {
        let mut dec = BodyDecoder::new(framing);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for (i, part) in input.iter().enumerate() {
            buf.extend_from_slice(part);
            let last = i + 1 == input.len();
            loop {
                match dec.step(&mut buf, last && eof)? {
                    Step::Data(b) => out.extend_from_slice(&b),
                    Step::NeedMore => break,
                    Step::Done => return Ok((out, true)),
                }
            }
        }
        Ok((out, dec.is_done()))
    }

    #[test]
    fn chunked_split_anywhere() {
        let wire: &[u8] = b"5;ext=1\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nx-t: 1\r\n\r\n";
        for cut in 0..wire.len() {
            let (out, done) = decode_all(Framing::Chunked, &[&wire[..cut], &wire[cut..]], false).unwrap();
            assert!(done, "cut at {cut}");
            assert_eq!(out, b"helloabcdefghijklmnopqrstuvwxyz");
        }
    }

    #[test]
    fn chunked_errors() {
        for bad in [&b"g\r\n"[..], b"5\r\nhelloXX", b"\r\n", b"1234567890123456\r\n", b"5 x\r\nhello\r\n"] {
            assert!(decode_all(Framing::Chunked, &[bad], false).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        assert!(decode_all(Framing::Chunked, &[b"5\r\nhel"], true).is_err());
    }

    #[test]
    fn length_and_close() {
        assert_eq!(decode_all(Framing::Length(5), &[b"hel", b"loEXTRA"], false).unwrap(), (b"hello".to_vec(), true));
        assert!(decode_all(Framing::Length(5), &[b"hel"], true).is_err());
        assert_eq!(decode_all(Framing::Close, &[b"ab", b"cd"], true).unwrap(), (b"abcd".to_vec(), true));
        assert_eq!(decode_all(Framing::Empty, &[b"zz"], false).unwrap(), (vec![], true));
    }

    #[test]
    fn response_framing() {
        let parse =
            |s: &str, head: bool| parse_response(s.as_bytes(), head).map(|r| r.map(|(_, h)| (h.framing, h.reusable)));
        assert_eq!(
            parse("HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n", false).unwrap(),
            Some((Framing::Length(7), true))
        );
        assert_eq!(parse("HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n", true).unwrap(), Some((Framing::Empty, true)));
        assert_eq!(
            parse("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", false).unwrap(),
            Some((Framing::Chunked, true))
        );
        assert_eq!(parse("HTTP/1.1 200 OK\r\n\r\n", false).unwrap(), Some((Framing::Close, false)));
        assert_eq!(parse("HTTP/1.1 204 No Content\r\n\r\n", false).unwrap(), Some((Framing::Empty, true)));
        assert_eq!(
            parse("HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n", false).unwrap(),
            Some((Framing::Length(1), false))
        );
        assert_eq!(
            parse("HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 1\r\n\r\n", false).unwrap(),
            Some((Framing::Length(1), true))
        );
        assert_eq!(
            parse("HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\n", false).unwrap(),
            Some((Framing::Length(1), false))
        );
        assert!(parse("HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n", false).is_err());
        assert!(parse("HTTP/1.1 200 OK\r\ncontent-length: 1x\r\n\r\n", false).is_err());
        assert_eq!(
            parse("HTTP/1.1 200 OK\r\ncontent-length: 3, 3\r\n\r\n", false).unwrap(),
            Some((Framing::Length(3), true))
        );
        assert_eq!(parse("HTTP/1.1 200 OK\r\ncontent-le", false).unwrap(), None);
    }

    #[test]
    fn connection_names_hop_by_hop_headers() {
        let mut s = Semantics::default();
        s.add(b"Connection", b"close, X-Secret");
        assert!(s.close);
        assert!(!s.forwards(b"x-secret"));
        assert!(!s.forwards(b"Keep-Alive"));
        assert!(s.forwards(b"x-kept"));
    }

    #[test]
    fn chunk_encoding_round_trips() {
        let mut out = Vec::new();
        encode_chunk(&mut out, b"hello");
        encode_chunk(&mut out, &[b'x'; 300]);
        out.extend_from_slice(LAST_CHUNK);
        let (body, done) = decode_all(Framing::Chunked, &[&out], false).unwrap();
        assert!(done);
        assert_eq!(body.len(), 305);
    }
}
