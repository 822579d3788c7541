//! One timer per client connection, for all of its timeouts.
//!
//! `tokio::time::timeout` reads the precise clock when it is made, and registers in tokio's
//! timer wheel when it waits and unregisters when dropped. A keep-alive request waits twice
//! (the client's next request, the backend's answer), and that came to about 2% of a request's
//! CPU in profiles (BENCHMARKS.md). A connection's waits come one after another, so one `Sleep`
//! serves them all: a wait reads the coarse clock only if it has to wait, and moves the `Sleep`
//! only when it is set later than the wait's deadline. When the `Sleep` fires before the
//! deadline of the wait in progress (it was set for an earlier one), it is set again. So a
//! connection re-arms about once per timeout period instead of twice per request.

use std::{
    future::{Future, poll_fn},
    pin::{Pin, pin},
    task::{Poll, Waker},
    time::Duration,
};

use tokio::time::{Instant, Sleep};

use super::coarse_ms;

/// A wait ran past its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

impl From<Elapsed> for std::io::Error {
    fn from(_: Elapsed) -> Self {
        std::io::ErrorKind::TimedOut.into()
    }
}

#[derive(Default)]
pub struct Timer {
    /// Made on the first wait that has to wait (many connections never do).
    sleep: Option<Pin<Box<Sleep>>>,
    /// The coarse-clock millisecond `sleep` is set for.
    armed: u64,
    /// The task `sleep` will wake, once polled since it was set: it need not be polled again
    /// (each poll re-registers the waker) until it has fired.
    waker: Option<Waker>,
}

impl Timer {
    pub fn new() -> Timer {
        Timer::default()
    }

    /// Runs `fut` to completion, or until `limit` has passed with it still pending. Waits are
    /// accurate to the coarse clock's tick (a few ms): the timeouts they serve are seconds.
    pub async fn within<F: Future>(&mut self, limit: Duration, fut: F) -> Result<F::Output, Elapsed> {
        let mut fut = pin!(fut);
        let mut deadline = None;
        poll_fn(|cx| {
            if let Poll::Ready(v) = fut.as_mut().poll(cx) {
                return Poll::Ready(Ok(v));
            }
            // The deadline counts from the first time the work is found waiting.
            let d = *deadline.get_or_insert_with(|| coarse_ms().saturating_add(limit.as_millis() as u64));
            loop {
                if self.sleep.is_none() || self.armed > d {
                    self.arm(d);
                }
                let Some(sleep) = self.sleep.as_mut() else { unreachable!("armed above") };
                if self.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) && !sleep.is_elapsed() {
                    return Poll::Pending;
                }
                match sleep.as_mut().poll(cx) {
                    Poll::Pending => {
                        self.waker = Some(cx.waker().clone());
                        return Poll::Pending;
                    }
                    Poll::Ready(()) if coarse_ms() >= d => return Poll::Ready(Err(Elapsed)),
                    // Set for an earlier wait's deadline (or a tick early): wait on for this one's.
                    Poll::Ready(()) => self.arm(d),
                }
            }
        })
        .await
    }

    /// Sets the `Sleep` for coarse-clock millisecond `at` (at least 1 ms ahead, so that a
    /// deadline the coarse clock has not reached yet is not polled in a loop).
    fn arm(&mut self, at: u64) {
        let ahead = Duration::from_millis(at.saturating_sub(coarse_ms()).max(1));
        let when = Instant::now() + ahead;
        self.armed = at;
        self.waker = None;
        match &mut self.sleep {
            Some(s) => s.as_mut().reset(when),
            none => drop(none.insert(Box::pin(tokio::time::sleep_until(when)))),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::pending;

    use super::*;

    /// Bounds waits that must end (the tests assert what ends them, not how fast).
    const BOUND: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn ready_work_is_never_timed() {
        let mut t = Timer::new();
        assert_eq!(t.within(Duration::ZERO, async { 7 }).await, Ok(7));
        assert!(t.sleep.is_none(), "no timer is made for work that did not wait");
    }

    #[tokio::test]
    async fn pending_work_times_out_and_the_timer_serves_the_next_wait() {
        let mut t = Timer::new();
        let started = std::time::Instant::now();
        assert_eq!(t.within(Duration::from_millis(100), pending::<()>()).await, Err(Elapsed));
        // Not before its limit, give or take the coarse clock's tick.
        assert!(started.elapsed() >= Duration::from_millis(80));
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let _ = tx.send(5);
        });
        assert_eq!(t.within(BOUND, rx).await, Ok(Ok(5)));
    }

    #[tokio::test]
    async fn a_shorter_wait_brings_the_timer_forward() {
        let mut t = Timer::new();
        // Arms the Sleep far ahead, then finishes.
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let long = t.within(Duration::from_secs(3600), rx);
        let finish = async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let _ = tx.send(());
        };
        let (r, ()) = tokio::join!(long, finish);
        assert!(r.is_ok());
        // A wait with a nearer deadline must not wait for the hour.
        let r = tokio::time::timeout(BOUND, t.within(Duration::from_millis(30), pending::<()>())).await;
        assert_eq!(r, Ok(Err(Elapsed)));
    }

    #[tokio::test]
    async fn a_longer_wait_outlasts_the_timer_set_for_an_earlier_one() {
        let mut t = Timer::new();
        // Leaves the Sleep set 30 ms ahead.
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let short = t.within(Duration::from_millis(30), rx);
        let finish = async {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let _ = tx.send(());
        };
        let (r, ()) = tokio::join!(short, finish);
        assert!(r.is_ok());
        // This wait's work finishes after the Sleep fires but well within its own limit.
        let slow = async {
            tokio::time::sleep(Duration::from_millis(150)).await;
            "done"
        };
        assert_eq!(t.within(BOUND, slow).await, Ok("done"));
    }

    #[tokio::test]
    async fn work_that_keeps_waking_its_task_still_times_out() {
        // Each poll finds the timer already polled by this task; it must still see it fire.
        let mut t = Timer::new();
        let busy = async {
            loop {
                tokio::task::yield_now().await;
            }
        };
        let r = tokio::time::timeout(BOUND, t.within(Duration::from_millis(30), busy)).await;
        assert_eq!(r, Ok(Err(Elapsed)));
    }
}
