//! The server side of a client's TLS connection, on rustls's unbuffered API.
//!
//! rustls's buffered `ServerConnection` keeps a 4 KiB record buffer per connection for as
//! long as the connection lives, idle or not (`DeframerVecBuffer` shrinks to 4 KiB, never to
//! zero). Here rampart owns the buffers instead: received bytes are read through the stack,
//! and only a record split across reads, plaintext the reader has not taken yet, or ciphertext
//! the socket has not taken yet are kept on the heap, each freed as soon as it is used up. So a
//! keep-alive connection waiting for its next request holds no TLS buffer at all, as HAProxy
//! and nginx release theirs when a connection goes idle.

use std::{
    io::{self, IoSlice},
    mem::MaybeUninit,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use rustls::{
    ServerConfig,
    server::{ServerConnectionData, UnbufferedServerConnection},
    unbuffered::{ConnectionState, EncodeError, EncryptError, InsufficientSizeError, UnbufferedStatus, WriteTraffic},
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

/// What one read from the socket takes at most: a whole record of the largest size a peer
/// may send (16 KiB of plaintext and what a cipher adds), read into the stack.
const READ_CHUNK: usize = 16 * 1024 + 2048;
/// Plaintext taken from one write, sent in one system call.
const WRITE_CHUNK: usize = 64 * 1024;
/// Received bytes kept waiting for the rest of a message: a handshake message may span
/// records up to 64 KiB (rustls's own limit for its buffered API), plus one record.
const MAX_INCOMING: usize = 64 * 1024 + READ_CHUNK;
/// What rustls adds to each record at most (header, content type, padding, tag); only a first
/// guess at the room encryption needs, rustls says exactly when it is not enough.
const RECORD_OVERHEAD: usize = 64;
const MAX_FRAGMENT: usize = 16 * 1024;

/// A server-side TLS connection over TCP (see the module documentation).
pub struct TlsStream {
    tcp: TcpStream,
    conn: UnbufferedServerConnection,
    /// Received TLS bytes rustls has not consumed yet (part of a record or message).
    incoming: Vec<u8>,
    /// Decrypted bytes the reader has not taken yet, from `plain_at`.
    plain: Vec<u8>,
    plain_at: usize,
    /// Encrypted bytes the socket has not taken yet, from `out_at`.
    outgoing: Vec<u8>,
    out_at: usize,
    /// The peer sent close_notify or closed its side: reads return end of stream.
    read_eof: bool,
    /// Our close_notify is queued.
    close_sent: bool,
}

/// What the caller wants from [`TlsStream::advance`].
enum Want<'a, 'b> {
    /// Only what rustls has to do by itself (handshake messages, tickets, alerts).
    Nothing,
    /// Plaintext into this buffer.
    Read(&'a mut ReadBuf<'b>),
    /// These bytes encrypted (up to [`WRITE_CHUNK`] of them).
    Write(&'a [IoSlice<'a>]),
    /// close_notify queued.
    Close,
}

/// Where [`TlsStream::advance`] stopped.
enum Advanced {
    /// Nothing more to do without more bytes from the peer.
    NeedInput,
    /// Plaintext was put in the reader's buffer.
    Delivered,
    /// This many bytes of the caller's data were encrypted into `outgoing`.
    Encrypted(usize),
    /// Both sides have sent close_notify.
    Closed,
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Frees a buffer once used up: an idle connection holds no buffer.
fn release(v: &mut Vec<u8>) {
    if v.capacity() > 0 {
        *v = Vec::new();
    }
}

/// Runs `f` with room for `need` more bytes at the end of `out` (zero-filled: rustls writes to
/// an initialised slice), growing it when rustls says it needs more; `out` keeps what was written.
fn append_with<E>(
    out: &mut Vec<u8>,
    mut need: usize,
    mut f: impl FnMut(&mut [u8]) -> Result<usize, E>,
    too_small: impl Fn(&E) -> Option<usize>,
) -> Result<(), E> {
    let at = out.len();
    loop {
        out.resize(at + need, 0);
        match f(&mut out[at..]) {
            Ok(n) => {
                out.truncate(at + n);
                return Ok(());
            }
            Err(e) => match too_small(&e) {
                Some(required) if required > need => need = required,
                _ => {
                    out.truncate(at);
                    return Err(e);
                }
            },
        }
    }
}

fn encrypt_into(wt: &mut WriteTraffic<'_, ServerConnectionData>, data: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
    let records = data.len().div_ceil(MAX_FRAGMENT).max(1);
    append_with(
        out,
        data.len() + records * RECORD_OVERHEAD,
        |room| wt.encrypt(data, room),
        |e| match e {
            EncryptError::InsufficientSize(InsufficientSizeError { required_size }) => Some(*required_size),
            _ => None,
        },
    )
    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Accepts a TLS client on `tcp`: runs the handshake to its end (and sends the session tickets
/// rustls issues after it).
pub async fn accept(tcp: TcpStream, config: Arc<ServerConfig>) -> io::Result<TlsStream> {
    let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
    let mut s = TlsStream {
        tcp,
        conn,
        incoming: Vec::new(),
        plain: Vec::new(),
        plain_at: 0,
        outgoing: Vec::new(),
        out_at: 0,
        read_eof: false,
        close_sent: false,
    };
    std::future::poll_fn(|cx| s.poll_handshake(cx)).await?;
    Ok(s)
}

impl TlsStream {
    /// The protocol the client and we agreed on by ALPN.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.conn.alpn_protocol()
    }

    /// Bytes of buffer this connection holds on the heap (TLS bytes received or to send, and
    /// plaintext not read yet); 0 while it waits, idle, for its next request.
    pub fn buffered_capacity(&self) -> usize {
        self.incoming.capacity() + self.plain.capacity() + self.outgoing.capacity()
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let step = self.advance(&mut Want::Nothing);
            // Our flight goes out before we wait for the peer's answer to it, and an alert
            // before an error is returned.
            let sent = self.poll_send(cx);
            match step? {
                Advanced::Closed => return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into())),
                _ if self.read_eof => return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into())),
                _ => {}
            }
            ready!(sent)?;
            if !self.conn.is_handshaking() {
                return Poll::Ready(Ok(()));
            }
            if ready!(self.poll_recv(cx))? == 0 {
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::UnexpectedEof, "tls handshake eof")));
            }
        }
    }

    /// Reads from the socket once, through the stack, appending to `incoming`. `Ok(0)`: EOF.
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.incoming.len() > MAX_INCOMING {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, "TLS message too large")));
        }
        let mut stack = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
        let mut rb = ReadBuf::uninit(&mut stack);
        ready!(Pin::new(&mut self.tcp).poll_read(cx, &mut rb))?;
        self.incoming.extend_from_slice(rb.filled());
        Poll::Ready(Ok(rb.filled().len()))
    }

    /// Sends what is queued in `outgoing`, and frees it once sent.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_at < self.outgoing.len() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.outgoing[self.out_at..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_at += n;
        }
        self.out_at = 0;
        release(&mut self.outgoing);
        Poll::Ready(Ok(()))
    }

    /// Lets rustls process what was received and queue what it has to send, until it needs
    /// more input or has done what `want` asks.
    fn advance(&mut self, want: &mut Want<'_, '_>) -> io::Result<Advanced> {
        let TlsStream { conn, incoming, plain, outgoing, read_eof, close_sent, .. } = self;
        loop {
            let UnbufferedStatus { mut discard, state } = conn.process_tls_records(incoming);
            let mut done = None;
            let mut failed = None;
            match state {
                Err(e) => failed = Some(tls_error(e)),
                Ok(ConnectionState::ReadTraffic(mut rt)) => {
                    while let Some(record) = rt.next_record() {
                        let record = match record {
                            Ok(r) => r,
                            Err(e) => {
                                failed = Some(tls_error(e));
                                break;
                            }
                        };
                        discard += record.discard;
                        let payload = record.payload;
                        match want {
                            // An empty record (TLS allows them) delivers nothing: a read
                            // that returned no bytes would be taken for the end of the stream.
                            Want::Read(buf) if plain.is_empty() && !payload.is_empty() => {
                                let n = payload.len().min(buf.remaining());
                                buf.put_slice(&payload[..n]);
                                plain.extend_from_slice(&payload[n..]);
                                // The rest waits in rustls for the next read.
                                done = Some(Advanced::Delivered);
                                break;
                            }
                            _ => plain.extend_from_slice(payload),
                        }
                    }
                }
                Ok(ConnectionState::EncodeTlsData(mut enc)) => {
                    if let Err(e) = append_with(
                        outgoing,
                        512,
                        |room| enc.encode(room),
                        |e| match e {
                            EncodeError::InsufficientSize(InsufficientSizeError { required_size }) => {
                                Some(*required_size)
                            }
                            _ => None,
                        },
                    ) {
                        failed = Some(io::Error::other(e));
                    }
                }
                // What was encoded is in `outgoing`, sent before anything queued after it.
                Ok(ConnectionState::TransmitTlsData(t)) => t.done(),
                Ok(ConnectionState::PeerClosed) => *read_eof = true,
                Ok(ConnectionState::Closed) => {
                    *read_eof = true;
                    done = Some(Advanced::Closed);
                }
                Ok(ConnectionState::WriteTraffic(mut wt)) => {
                    done = Some(match want {
                        Want::Write(bufs) => {
                            let mut taken = 0;
                            for b in bufs.iter().filter(|b| !b.is_empty()) {
                                let n = b.len().min(WRITE_CHUNK - taken);
                                if let Err(e) = encrypt_into(&mut wt, &b[..n], outgoing) {
                                    failed = Some(e);
                                    break;
                                }
                                taken += n;
                                if taken == WRITE_CHUNK {
                                    break;
                                }
                            }
                            Advanced::Encrypted(taken)
                        }
                        Want::Close if !*close_sent => {
                            match append_with(
                                outgoing,
                                64,
                                |room| wt.queue_close_notify(room),
                                |e| match e {
                                    EncryptError::InsufficientSize(InsufficientSizeError { required_size }) => {
                                        Some(*required_size)
                                    }
                                    _ => None,
                                },
                            ) {
                                Ok(()) => *close_sent = true,
                                Err(e) => failed = Some(io::Error::new(io::ErrorKind::InvalidData, e)),
                            }
                            Advanced::NeedInput
                        }
                        _ => Advanced::NeedInput,
                    });
                }
                Ok(ConnectionState::BlockedHandshake) => done = Some(Advanced::NeedInput),
                // Early data is not enabled (`max_early_data_size` 0), so rustls never offers it.
                Ok(_) => failed = Some(io::Error::other("unexpected TLS state")),
            }
            incoming.drain(..discard);
            if incoming.is_empty() {
                release(incoming);
            }
            if let Some(e) = failed {
                // rustls queued an alert for the peer: it goes out with the next send.
                if let Ok(ConnectionState::EncodeTlsData(mut enc)) = conn.process_tls_records(&mut []).state {
                    let _ = append_with(outgoing, 64, |room| enc.encode(room), |_| None);
                }
                return Err(e);
            }
            if let Some(d) = done {
                return Ok(d);
            }
        }
    }

    fn poll_write_all_of(&mut self, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        if bufs.iter().all(|b| b.is_empty()) {
            return Poll::Ready(Ok(0));
        }
        // What was encrypted before goes out first: the caller's data waits while the socket
        // is full, so `outgoing` stays bounded.
        ready!(self.poll_send(cx))?;
        let n = match self.advance(&mut Want::Write(bufs))? {
            Advanced::Encrypted(n) => n,
            Advanced::Closed => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            _ => return Poll::Ready(Err(io::Error::other("TLS connection not ready for data"))),
        };
        // Send now; what the socket does not take waits for the next write or flush (the
        // write interest is registered with this task).
        if let Poll::Ready(Err(e)) = self.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.plain_at < this.plain.len() {
                let n = (this.plain.len() - this.plain_at).min(buf.remaining());
                buf.put_slice(&this.plain[this.plain_at..this.plain_at + n]);
                this.plain_at += n;
                if this.plain_at == this.plain.len() {
                    this.plain_at = 0;
                    release(&mut this.plain);
                }
                return Poll::Ready(Ok(()));
            }
            if this.read_eof || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            let step = this.advance(&mut Want::Read(buf));
            // Whatever rustls queued (tickets, a key update's answer) goes out; a full socket
            // does not stop the reading.
            if let Poll::Ready(Err(e)) = this.poll_send(cx) {
                return Poll::Ready(Err(e));
            }
            match step? {
                Advanced::Delivered => return Poll::Ready(Ok(())),
                Advanced::Closed => return Poll::Ready(Ok(())),
                _ if this.read_eof => continue,
                _ => {}
            }
            if ready!(this.poll_recv(cx))? == 0 {
                // TCP closed without close_notify: the end of the stream all the same (HTTP
                // framing tells a cut-off message).
                this.read_eof = true;
            }
        }
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_all_of(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_all_of(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    /// Sends close_notify, then FIN.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_sent {
            ready!(this.poll_send(cx))?;
            // Closed: both close_notify were sent already.
            if let Advanced::Closed = this.advance(&mut Want::Close)? {
                this.close_sent = true;
            }
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use rustls::{ClientConfig, HandshakeKind, RootCertStore};
    use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;
    use crate::pki::provider;

    fn configs() -> (Arc<ServerConfig>, Arc<ClientConfig>) {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.key_pair.serialize_der()));
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![ck.cert.der().clone()], key)
            .unwrap();
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        server.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new().unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(ck.cert.der().clone()).unwrap();
        let mut client = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        (Arc::new(server), Arc::new(client))
    }

    async fn pair(
        server: &Arc<ServerConfig>,
        client: &Arc<ClientConfig>,
    ) -> (TlsStream, tokio_rustls::client::TlsStream<TcpStream>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let connector = tokio_rustls::TlsConnector::from(client.clone());
        let dial = async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await.unwrap()
        };
        let serve = async { accept(l.accept().await.unwrap().0, server.clone()).await.unwrap() };
        tokio::join!(serve, dial)
    }

    /// Reads until `n` bytes came or the stream ended.
    async fn read_n<R: AsyncRead + Unpin>(r: &mut R, n: usize) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 3000];
        while got.len() < n {
            let k = r.read(&mut buf).await.unwrap();
            if k == 0 {
                break;
            }
            got.extend_from_slice(&buf[..k]);
        }
        got
    }

    /// Between requests a connection holds no buffer: not after a small exchange, not after
    /// large ones that needed several records each way; and what went through arrived whole.
    #[tokio::test]
    async fn idle_connection_holds_no_buffers() {
        let (server, client) = configs();
        let (mut s, mut c) = pair(&server, &client).await;
        assert_eq!(s.alpn_protocol(), Some(&b"http/1.1"[..]));
        for size in [100usize, 200_000, 5, 70_000] {
            let ask: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            let answer: Vec<u8> = (0..size * 2).map(|i| (i % 241) as u8).collect();
            let client_side = async {
                c.write_all(&ask).await.unwrap();
                c.flush().await.unwrap();
                read_n(&mut c, answer.len()).await
            };
            let server_side = async {
                let got = read_n(&mut s, ask.len()).await;
                s.write_all(&answer).await.unwrap();
                s.flush().await.unwrap();
                got
            };
            let (back, got) = tokio::join!(client_side, server_side);
            assert!(got == ask, "request of {size} bytes arrived whole");
            assert!(back == answer, "answer of {} bytes arrived whole", size * 2);
            assert_eq!(s.buffered_capacity(), 0, "idle after a {size}-byte exchange");
        }
        // close_notify both ways: each side reads a clean end of stream.
        c.shutdown().await.unwrap();
        assert!(read_n(&mut s, 1).await.is_empty());
        s.shutdown().await.unwrap();
        assert!(read_n(&mut c, 1).await.is_empty());
    }

    /// ALPN picks h2 when the client offers it, and a second connection resumes the first's
    /// session (from the ticket sent after the handshake).
    #[tokio::test]
    async fn alpn_and_resumption() {
        let (server, client) = configs();
        let mut h2 = (*client).clone();
        h2.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let h2 = Arc::new(h2);
        let (mut s, mut c) = pair(&server, &h2).await;
        assert_eq!(s.alpn_protocol(), Some(&b"h2"[..]));
        assert_eq!(c.get_ref().1.handshake_kind(), Some(HandshakeKind::Full));
        // The client takes the session tickets in while it reads.
        s.write_all(b"x").await.unwrap();
        s.flush().await.unwrap();
        assert_eq!(read_n(&mut c, 1).await, b"x");
        let (_s2, c2) = pair(&server, &h2).await;
        assert_eq!(c2.get_ref().1.handshake_kind(), Some(HandshakeKind::Resumed));
    }

    /// A client that does not speak TLS gets an error, not a connection.
    #[tokio::test]
    async fn plain_http_fails_the_handshake() {
        let (server, _) = configs();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let dial = async move {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
            tcp
        };
        let (r, _tcp) = tokio::join!(async { accept(l.accept().await.unwrap().0, server.clone()).await }, dial);
        assert!(r.is_err());
    }
}
