//! Process figures under the names every Prometheus client library uses (`process_*`, so
//! stock dashboards work), read from /proc at scrape time, and `rampart_build_info`.

use std::fs;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, NoLabelSet},
    metrics::MetricType,
    registry::Unit,
};

pub use crate::VERSION;

/// `process_*`: start time, CPU, memory and file descriptors of this process.
#[derive(Debug)]
pub struct ProcessCollector {
    /// Seconds since the epoch (fixed for the process's life, so read once).
    start_time: Option<f64>,
}

impl Default for ProcessCollector {
    fn default() -> Self {
        ProcessCollector { start_time: start_time() }
    }
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

fn page_size() -> u64 {
    // SAFETY: as above.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 { p as u64 } else { 4096 }
}

/// Fields of /proc/self/stat after the command name (which may hold spaces and parentheses);
/// index 0 is field 3 (state).
fn stat_fields() -> Option<Vec<String>> {
    let s = fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// Boot time (`btime` of /proc/stat) plus the process's start in ticks after boot.
pub fn start_time() -> Option<f64> {
    let ticks: f64 = stat_fields()?.get(19)?.parse().ok()?;
    let btime: f64 =
        fs::read_to_string("/proc/stat").ok()?.lines().find_map(|l| l.strip_prefix("btime "))?.trim().parse().ok()?;
    Some(btime + ticks / clock_ticks())
}

fn cpu_seconds() -> Option<f64> {
    let f = stat_fields()?;
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks())
}

/// (virtual, resident) bytes from /proc/self/statm.
fn memory() -> Option<(u64, u64)> {
    let s = fs::read_to_string("/proc/self/statm").ok()?;
    let mut it = s.split_whitespace().map(|v| v.parse::<u64>().ok());
    let size = it.next()??;
    let rss = it.next()??;
    Some((size * page_size(), rss * page_size()))
}

fn open_fds() -> Option<u64> {
    // The directory's own descriptor, open while it is listed, is among the entries.
    Some(fs::read_dir("/proc/self/fd").ok()?.count().saturating_sub(1) as u64)
}

fn max_fds() -> Option<u64> {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct we pass.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0).then_some(r.rlim_cur)
}

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, unit: Option<Unit>, v: f64) -> std::fmt::Result {
    enc.encode_descriptor(name, help, unit.as_ref(), MetricType::Gauge)?.encode_gauge(&v)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        if let Some(t) = self.start_time {
            gauge(
                &mut enc,
                "process_start_time",
                "Start time of the process since the Unix epoch",
                Some(Unit::Seconds),
                t,
            )?;
        }
        if let Some(t) = cpu_seconds() {
            enc.encode_descriptor(
                "process_cpu",
                "User and system CPU time spent",
                Some(&Unit::Seconds),
                MetricType::Counter,
            )?
            .encode_counter::<NoLabelSet, _, u64>(&t, None)?;
        }
        if let Some((virt, rss)) = memory() {
            gauge(&mut enc, "process_resident_memory", "Resident memory size", Some(Unit::Bytes), rss as f64)?;
            gauge(&mut enc, "process_virtual_memory", "Virtual memory size", Some(Unit::Bytes), virt as f64)?;
        }
        if let Some(n) = open_fds() {
            gauge(&mut enc, "process_open_fds", "Open file descriptors", None, n as f64)?;
        }
        if let Some(n) = max_fds() {
            gauge(&mut enc, "process_max_fds", "Limit of open file descriptors", None, n as f64)?;
        }
        Ok(())
    }
}

/// `rampart_build_info{version}`: 1, with the version `rampart --version` prints.
#[derive(Debug)]
pub struct BuildInfo;

impl Collector for BuildInfo {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        enc.encode_descriptor(
            "build",
            "The running build (the version `rampart --version` prints)",
            None,
            MetricType::Info,
        )?
        .encode_info(&[("version", super::stats::escape(VERSION))].as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_of_this_process() {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        let start = start_time().expect("start time");
        // This test process started within the last day, and not in the future (tick rounding).
        assert!(start <= now + 1.0 && start > now - 86_400.0, "start {start} now {now}");
        let (virt, rss) = memory().expect("statm");
        assert!(rss > 0 && virt >= rss);
        let before = open_fds().expect("fds");
        let f = fs::File::open("/proc/self/stat").unwrap();
        assert_eq!(open_fds(), Some(before + 1));
        drop(f);
        assert!(max_fds().unwrap() >= before);
        assert!(cpu_seconds().is_some());
    }
}
