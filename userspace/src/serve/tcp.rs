//! The TCP stream under rustls toward https:// backends (clients are served by `tls_stream.rs`,
//! which writes with send(2) itself).
//!
//! rustls hands its finished records to `write_vectored`, and tokio's `TcpStream` turns that
//! into writev(2) even when there is one buffer, which is nearly always (one answer, one
//! record). The kernel's vectored path (iovec import, file position lock, `write_iter`) costs
//! more than send(2)'s; a profile of the keep-alive hot path put the difference at about 0.3 µs
//! of a request's 18 µs. So one buffer goes out with send(2), several with writev(2).

use std::{
    io::{self, IoSlice},
    pin::Pin,
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

pub struct Tcp(pub TcpStream);

impl AsyncRead for Tcp {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tcp {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, b)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let tcp = Pin::new(&mut self.get_mut().0);
        let mut full = bufs.iter().filter(|b| !b.is_empty());
        match (full.next(), full.next()) {
            (None, _) => Poll::Ready(Ok(0)),
            (Some(one), None) => tcp.poll_write(cx, one),
            _ => tcp.poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Every byte of every buffer arrives, in order, whichever system call sent it.
    #[test]
    fn vectored_writes_deliver_every_buffer() {
        // In a namespace of its own: tests never use the host's loopback.
        crate::netns::in_private_netns(|| {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let addr = l.local_addr().unwrap();
                let send = tokio::spawn(async move {
                    let mut t = Tcp(TcpStream::connect(addr).await.unwrap());
                    let cases: [&[&[u8]]; 4] = [&[b"", b"one", b""], &[b"two", b"three"], &[b"", b""], &[b"four"]];
                    for bufs in cases {
                        let slices: Vec<IoSlice<'_>> = bufs.iter().map(|b| IoSlice::new(b)).collect();
                        // A few bytes into an empty loopback socket buffer: always written whole.
                        let n = t.write_vectored(&slices).await.unwrap();
                        assert_eq!(n, bufs.iter().map(|b| b.len()).sum::<usize>());
                    }
                    t.shutdown().await.unwrap();
                });
                let (mut s, _) = l.accept().await.unwrap();
                let mut got = Vec::new();
                s.read_to_end(&mut got).await.unwrap();
                send.await.unwrap();
                assert_eq!(got, b"onetwothreefour");
            })
        })
        .unwrap_or_else(|e| panic!("{e}"));
    }
}
