//! Connection threads: one single-threaded tokio runtime per CPU, each with its own epoll and
//! timers, for proxied TCP sessions (the MySQL router's). A connection handed to one stays on
//! it, with both its sockets, as in HAProxy's threads.
//!
//! Why not the daemon's work-stealing runtime: a proxied session is a chain of small round
//! trips, and there each wake-up may land on either worker, so the runtime keeps waking the
//! other worker to steal, and a session waits whenever the worker holding it was preempted by
//! the peer it just woke. On 2 CPUs under sysbench (5-s runs interleaved with HAProxy's, medians)
//! pinned sessions took about 7 % fewer context switches and 9 % less CPU per `oltp_read_write`
//! transaction than on the shared runtime, and `oltp_point_select`'s p99 went from about 1.5 ms
//! to HAProxy's 1.0-1.3.

use std::{
    future::Future,
    sync::atomic::{AtomicUsize, Ordering},
};

use tokio::runtime::Handle;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// The connection threads; they stop (and drop their sessions) when this is dropped.
pub struct Pinned {
    handles: Vec<Handle>,
    next: AtomicUsize,
    stop: CancellationToken,
}

impl Pinned {
    /// Starts `threads` connection threads (at least one).
    pub fn start(threads: usize) -> std::io::Result<Pinned> {
        let stop = CancellationToken::new();
        let mut handles = Vec::new();
        for i in 0..threads.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            handles.push(rt.handle().clone());
            let stop = stop.clone();
            std::thread::Builder::new().name(format!("rampart-conn-{i}")).spawn(move || {
                rt.block_on(stop.cancelled());
            })?;
        }
        Ok(Pinned { handles, next: AtomicUsize::new(0), stop })
    }

    /// One thread per CPU the process may use.
    pub fn per_cpu() -> std::io::Result<Pinned> {
        Self::start(std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    pub fn threads(&self) -> usize {
        self.handles.len()
    }

    /// Runs `session` with `tcp` on the next connection thread (round robin), tracked by
    /// `tracker` (the daemon's drain waits for it). The socket moves to that thread's epoll;
    /// connections it opens itself are registered there too.
    pub fn spawn<F, Fut>(&self, tracker: &TaskTracker, tcp: tokio::net::TcpStream, session: F)
    where
        F: FnOnce(tokio::net::TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let std = match tcp.into_std() {
            Ok(s) => s,
            Err(e) => {
                log::error!("handing a connection to a connection thread: {e}");
                return;
            }
        };
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        tracker.spawn_on(
            async move {
                // Registers the socket with this thread's runtime (the task runs there).
                match tokio::net::TcpStream::from_std(std) {
                    Ok(tcp) => session(tcp).await,
                    Err(e) => log::error!("a connection thread could not take a connection: {e}"),
                }
            },
            &self.handles[i],
        );
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sessions_run_round_robin_on_their_own_threads_and_are_tracked() {
        let pinned = Pinned::start(2).unwrap();
        let tracker = TaskTracker::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        for _ in 0..4 {
            let client = tokio::spawn(async move {
                let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
                c.write_all(b"ping").await.unwrap();
                let mut b = [0u8; 4];
                c.read_exact(&mut b).await.unwrap();
                b
            });
            let (tcp, _) = listener.accept().await.unwrap();
            let seen = seen.clone();
            pinned.spawn(&tracker, tcp, move |mut tcp| async move {
                seen.lock().unwrap().push(std::thread::current().name().unwrap_or("").to_string());
                let mut b = [0u8; 4];
                tcp.read_exact(&mut b).await.unwrap();
                tcp.write_all(b"pong").await.unwrap();
            });
            assert_eq!(&client.await.unwrap(), b"pong");
        }
        tracker.close();
        tracker.wait().await;
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen, ["rampart-conn-0", "rampart-conn-1", "rampart-conn-0", "rampart-conn-1"]);
    }
}
