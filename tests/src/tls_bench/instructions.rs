//! Instructions per request, counted by callgrind: the latency histograms' cost free of the
//! machine's noise. A count of the daemon's own (user-space) instructions is the same from run
//! to run whatever else the machine does, where req/s on a shared 2-core VM moves by more than
//! the 2 % to tell. It leaves out the kernel's share of each request (TCP, syscalls), which is
//! the same with and without histograms, so the ratio it gives overstates their cost.
//!
//! Each configuration runs twice under `valgrind --tool=callgrind`, serving `small` and then
//! `large` keep-alive requests (h2load, HTTP/1.1 over TLS, 4 connections); the difference of
//! the two totals over the difference of the requests is the cost of one request, with
//! start-up, handshakes and shutdown cancelled out.

use std::{net::SocketAddr, path::Path, process::Command, time::Duration};

use super::{
    BenchError, PATH,
    contenders::{Kind, Setup, rampart_config},
    procs::{Proc, free_loopback_addr},
};

/// valgrind runs the daemon ~50× slower; its start (aws-lc's entropy self-test) takes seconds.
const START_WITHIN: Duration = Duration::from_secs(120);

/// One configuration's count.
#[derive(Clone, Copy, Debug)]
pub struct PerRequest {
    pub kind: Kind,
    /// (requests, instructions) of the two runs.
    pub runs: [(u64, u64); 2],
}

impl PerRequest {
    /// Instructions per request: the slope between the two runs.
    pub fn instructions(&self) -> f64 {
        let [(n0, i0), (n1, i1)] = self.runs;
        (i1 as f64 - i0 as f64) / (n1 - n0) as f64
    }
}

/// Counts `kind`'s instructions per request (see the module's doc).
pub fn per_request(setup: &Setup, kind: Kind, small: u64, large: u64) -> Result<PerRequest, BenchError> {
    if large <= small {
        return Err(BenchError::Msg(format!("callgrind runs: {large} requests must be more than {small}")));
    }
    let mut runs = [(0, 0); 2];
    for (slot, n) in runs.iter_mut().zip([small, large]) {
        *slot = (n, one_run(setup, kind, n)?);
    }
    Ok(PerRequest { kind, runs })
}

/// The daemon's total instructions over its whole life, serving `requests`.
fn one_run(setup: &Setup, kind: Kind, requests: u64) -> Result<u64, BenchError> {
    let addr = free_loopback_addr()?;
    let name = format!("{}-callgrind-{requests}", kind.name());
    let (config, dir) = rampart_config(setup, addr, kind, &name)?;
    let out = dir.join("callgrind.out");
    let mut cmd = setup.cpus.command("valgrind");
    cmd.arg("--tool=callgrind").arg(format!("--callgrind-out-file={}", out.display()));
    cmd.arg(setup.rampart_bin).args(["serve", "--config"]).arg(&config);
    // Both configurations on the same number of workers as the req/s rounds.
    cmd.env("TOKIO_WORKER_THREADS", setup.threads.to_string());
    cmd.env("RUST_LOG", "warn");
    let mut proc = Proc::spawn(&name, cmd, &dir.join("rampart.log"))?;
    proc.wait_port(addr, START_WITHIN)?;
    load(addr, requests, &dir.join("h2load.log"))?;
    // SIGTERM: the daemon drains and exits, and callgrind writes its counts at exit.
    // SAFETY: kill(2) on our own child's pid, not yet reaped.
    unsafe { libc::kill(proc.pid() as i32, libc::SIGTERM) };
    let status = proc.wait_bounded(START_WITHIN)?;
    if !status.success() {
        return Err(BenchError::Died { name, status: status.to_string(), log: proc.log_text() });
    }
    totals(&out)
}

/// `requests` keep-alive GETs over 4 TLS connections; every one must succeed.
fn load(addr: SocketAddr, requests: u64, log: &Path) -> Result<(), BenchError> {
    let url = format!("https://{addr}{PATH}");
    let o = Command::new("h2load")
        .args(["--h1", "-c", "4", "-n", &requests.to_string(), &url])
        .output()
        .map_err(|e| BenchError::io("run h2load", e))?;
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    let _ = std::fs::write(log, &text);
    let want = format!("{requests} succeeded, 0 failed");
    if !o.status.success() || !text.contains(&want) || !text.contains(&format!("{requests} 2xx")) {
        return Err(BenchError::Parse { tool: "h2load", what: "every request answered 2xx", output: text });
    }
    Ok(())
}

/// The `totals:` line of a callgrind output file.
fn totals(path: &Path) -> Result<u64, BenchError> {
    let text = std::fs::read_to_string(path).map_err(|e| BenchError::io(format!("read {}", path.display()), e))?;
    parse_totals(&text).ok_or_else(|| BenchError::Parse {
        tool: "callgrind",
        what: "a `totals:` line",
        output: text.lines().rev().take(5).collect::<Vec<_>>().join("\n"),
    })
}

fn parse_totals(text: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix("totals:")).and_then(|v| v.split_whitespace().next()?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_and_totals() {
        let p = PerRequest { kind: Kind::Rampart, runs: [(2_000, 500_000_000), (12_000, 830_000_000)] };
        assert_eq!(p.instructions(), 33_000.0);
        assert_eq!(parse_totals("events: Ir\nsummary: 12\ntotals: 504084748\n"), Some(504_084_748));
        assert_eq!(parse_totals("events: Ir\n"), None);
    }
}
