//! A connection switched to another protocol (a WebSocket, after `101 Switching Protocols`):
//! the client and the backend are joined byte for byte, both directions at once, until both
//! have closed their side, either fails, or nothing moves either way for the tunnel timeout.

use std::{
    io,
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering},
    task::{Context, Poll},
    time::Duration,
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::coarse_ms;

/// Bytes carried each way, client to backend and backend to client.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Carried {
    pub up: u64,
    pub down: u64,
}

/// Why a tunnel ended other than by both sides closing.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("no bytes either way for {0:?}")]
    Idle(Duration),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Joins `client` and `backend` until both directions end. When one side stops sending (EOF),
/// the other side's write half is shut, and the other direction runs on: a half-close is
/// passed along, as TCP has it.
pub async fn join<C, B>(client: &mut C, backend: &mut B, idle: Duration) -> Result<Carried, TunnelError>
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let last = AtomicU64::new(coarse_ms());
    let mut c = Stamped { io: client, last: &last };
    let mut b = Stamped { io: backend, last: &last };
    let copy = tokio::io::copy_bidirectional(&mut c, &mut b);
    tokio::pin!(copy);
    let idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
    loop {
        // One timer per quiet period, not one per byte: activity only moves a stamp.
        let quiet = coarse_ms().saturating_sub(last.load(Ordering::Relaxed));
        if quiet >= idle_ms {
            return Err(TunnelError::Idle(idle));
        }
        tokio::select! {
            r = &mut copy => {
                let (up, down) = r?;
                return Ok(Carried { up, down });
            }
            _ = tokio::time::sleep(Duration::from_millis(idle_ms - quiet)) => {}
        }
    }
}

/// A stream that stamps `last` (coarse ms) whenever bytes move through it.
struct Stamped<'a, T> {
    io: &'a mut T,
    last: &'a AtomicU64,
}

impl<T> Stamped<'_, T> {
    fn touch(&self) {
        self.last.store(coarse_ms(), Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Stamped<'_, T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut *this.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Stamped<'_, T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut *this.io).poll_write(cx, b);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.touch();
        }
        r
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    use super::*;

    /// Bounds every wait in these tests; a tunnel that never ends fails instead of hanging.
    const BOUND: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn carries_both_ways_and_passes_half_closes_on() {
        // client_end <-> (c) tunnel (b) <-> backend_end
        let (mut client_end, mut c) = duplex(64);
        let (mut b, mut backend_end) = duplex(64);
        let tunnel = tokio::spawn(async move { join(&mut c, &mut b, BOUND).await });

        client_end.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        backend_end.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        // More than the pipes hold at once, so both directions must move together.
        let big = vec![7u8; 100_000];
        let (w, r) = tokio::join!(backend_end.write_all(&big), async {
            let mut v = vec![0u8; big.len()];
            client_end.read_exact(&mut v).await.map(|_| v)
        });
        w.unwrap();
        assert_eq!(r.unwrap(), big);

        // The client stops sending: the backend sees EOF and may still answer.
        client_end.shutdown().await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(BOUND, backend_end.read_to_end(&mut rest)).await.unwrap().unwrap();
        assert!(rest.is_empty());
        backend_end.write_all(b"bye").await.unwrap();
        backend_end.shutdown().await.unwrap();
        let mut tail = Vec::new();
        tokio::time::timeout(BOUND, client_end.read_to_end(&mut tail)).await.unwrap().unwrap();
        assert_eq!(tail, b"bye");

        let carried = tokio::time::timeout(BOUND, tunnel).await.unwrap().unwrap().unwrap();
        assert_eq!(carried, Carried { up: 4, down: 100_003 });
    }

    #[tokio::test]
    async fn ends_when_nothing_moves_for_the_timeout() {
        let (mut client_end, mut c) = duplex(64);
        let (mut b, _backend_end) = duplex(64);
        let tunnel = tokio::spawn(async move { join(&mut c, &mut b, Duration::from_millis(200)).await });
        client_end.write_all(b"x").await.unwrap();
        let r = tokio::time::timeout(BOUND, tunnel).await.expect("an idle tunnel ends").unwrap();
        assert!(matches!(r, Err(TunnelError::Idle(_))), "{r:?}");
    }
}
