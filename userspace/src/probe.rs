//! Health probes, one abstraction for every protocol: a [`Probe`] looks at one server once and
//! says what it saw; [`run`] repeats it every interval with a timeout below the interval and
//! hands each result to the caller, who feeds `loadbalancer`'s health state machine
//! (`Backend::report_check`: rise/fall live there, not here). The HTTP probe lives with the
//! HTTP client code (`serve/http/backend.rs`); protocol-specific probes implement [`Probe`].
//!
//! A leaf module: it imports nothing of the daemon.

use std::{future::Future, time::Duration};

use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{target}: timed out after {after:?}")]
    Timeout { target: String, after: Duration },
    #[error("{target}: {msg}")]
    Failed { target: String, msg: String },
}

/// One look at one server.
pub trait Probe: Send + Sync {
    /// What a passed probe learned (nothing for HTTP; the server's state for MySQL).
    type Seen: Send;
    /// The server, for logs and errors.
    fn target(&self) -> String;
    fn probe(&self) -> impl Future<Output = Result<Self::Seen, ProbeError>> + Send;
}

/// When a probe runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedule {
    pub interval: Duration,
    /// Each probe's limit (below the interval, so one slow server never delays the next round).
    pub timeout: Duration,
    /// Wait before the first probe (spreads a pool's probes over an interval).
    pub offset: Duration,
}

/// One probe with its timeout applied.
pub async fn once<P: Probe>(probe: &P, timeout: Duration) -> Result<P::Seen, ProbeError> {
    match tokio::time::timeout(timeout, probe.probe()).await {
        Ok(r) => r,
        Err(_) => Err(ProbeError::Timeout { target: probe.target(), after: timeout }),
    }
}

/// Probes every `schedule.interval` until `stop`, skipping rounds where `active()` is false
/// (a backend in maintenance), and passes every result to `report`.
pub async fn run<P: Probe>(
    probe: &P,
    schedule: Schedule,
    stop: &CancellationToken,
    active: impl Fn() -> bool,
    mut report: impl FnMut(Result<P::Seen, ProbeError>),
) {
    tokio::select! {
        _ = stop.cancelled() => return,
        _ = tokio::time::sleep(schedule.offset) => {}
    }
    let mut tick = tokio::time::interval(schedule.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if !active() {
            continue;
        }
        let r = tokio::select! {
            _ = stop.cancelled() => return,
            r = once(probe, schedule.timeout) => r,
        };
        report(r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Counting(std::sync::atomic::AtomicU32);
    impl Probe for Counting {
        type Seen = u32;
        fn target(&self) -> String {
            "counting".into()
        }
        async fn probe(&self) -> Result<u32, ProbeError> {
            let n = self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if n == 1 {
                // The second probe hangs past its timeout.
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            Ok(n)
        }
    }

    #[tokio::test]
    async fn run_reports_results_and_timeouts_until_stopped() {
        let p = Counting(Default::default());
        let stop = CancellationToken::new();
        let mut seen = Vec::new();
        let sched = Schedule {
            interval: Duration::from_millis(20),
            timeout: Duration::from_millis(10),
            offset: Duration::from_millis(1),
        };
        let stopper = stop.clone();
        let run = run(
            &p,
            sched,
            &stop,
            || true,
            |r| {
                seen.push(r.map_err(|e| e.to_string()));
                if seen.len() == 3 {
                    stopper.cancel();
                }
            },
        );
        tokio::time::timeout(Duration::from_secs(60), run).await.unwrap();
        assert_eq!(seen[0], Ok(0));
        assert_eq!(seen[1], Err("counting: timed out after 10ms".into()));
        assert_eq!(seen[2], Ok(2));
    }
}
