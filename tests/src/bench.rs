//! Helpers for the benchmark binaries (`src/bin/*-bench.rs`): shell-outs, a markdown table,
//! flood rigs in throwaway network namespaces, and peers' counters.

use std::{
    fmt::Write as _,
    fs,
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// Runs a command, returns stdout; fails with its stderr.
pub fn sh(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd).args(args).output().with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!("{cmd} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One line naming the machine, for BENCHMARKS.md.
pub fn machine() -> String {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string()))
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let kernel = sh("uname", &["-r"]).unwrap_or_default();
    format!("{cpu}, {cores} cores, kernel {}", kernel.trim())
}

/// A markdown table.
pub struct Table {
    head: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(head: &[&str]) -> Self {
        Self { head: head.iter().map(|s| s.to_string()).collect(), rows: Vec::new() }
    }
    pub fn row(&mut self, r: Vec<String>) {
        self.rows.push(r);
    }
    pub fn markdown(&self) -> String {
        let mut s = format!("| {} |\n|{}\n", self.head.join(" | "), " --- |".repeat(self.head.len()));
        for r in &self.rows {
            writeln!(s, "| {} |", r.join(" | ")).unwrap();
        }
        s
    }
}

/// Average ns per run of program `id` on `frame`, measured by `bpftool prog run` (the same tool
/// for every program, ours or a peer's).
pub fn run_bpftool(id: u32, frame: &[u8], repeat: u32) -> Result<f64> {
    let f = std::env::temp_dir().join(format!("rampart-bench-{}-{id}.bin", std::process::id()));
    fs::write(&f, frame)?;
    let r = sh("bpftool", &["prog", "run", "id", &id.to_string(), "data_in", f.to_str().unwrap(), "repeat", &repeat.to_string()]);
    let _ = fs::remove_file(&f);
    let out = r?;
    // "Return value: 2, duration (average): 12ns"
    let ns = out
        .split("duration (average):")
        .nth(1)
        .and_then(|s| s.trim().trim_end_matches("ns").trim().parse::<f64>().ok())
        .with_context(|| format!("unexpected bpftool output: {out}"))?;
    Ok(ns)
}

/// A 60-byte Ethernet/IPv4/UDP frame with a valid IP checksum (the stack checks it before
/// netfilter sees the packet).
pub fn udp4_frame(src_mac: [u8; 6], dst_mac: [u8; 6], src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let ip_len: u16 = 20 + 8 + 18;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let mut sum: u32 = ip.chunks(2).map(|c| u16::from_be_bytes([c[0], c[1]]) as u32).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&(8u16 + 18).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.resize(60, 0);
    f
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Two namespaces joined by a veth pair, for a trafgen flood from `tx` into `rx`. Removed on
/// drop (deleting a namespace deletes its veth end, and the peer with it).
pub struct Flood {
    pub tx_ns: String,
    pub rx_ns: String,
    pub tx_if: String,
    pub rx_if: String,
    pub rx_mac: [u8; 6],
    pub rx_addr: [u8; 4],
}

impl Flood {
    pub fn new(tag: &str) -> Result<Self> {
        let id = format!("{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
        let me = Self {
            tx_ns: format!("rb-{tag}-{id}-tx"),
            rx_ns: format!("rb-{tag}-{id}-rx"),
            tx_if: "rbtx0".into(),
            rx_if: "rbrx0".into(),
            rx_mac: [0x02, 0, 0, 0, 0, 0x02],
            rx_addr: [198, 51, 100, 1],
        };
        sh("ip", &["netns", "add", &me.tx_ns])?;
        sh("ip", &["netns", "add", &me.rx_ns])?;
        sh("ip", &["-n", &me.tx_ns, "link", "add", &me.tx_if, "address", "02:00:00:00:00:01", "type", "veth", "peer", "name", &me.rx_if, "netns", &me.rx_ns, "address", "02:00:00:00:00:02"])?;
        sh("ip", &["-n", &me.rx_ns, "addr", "add", "198.51.100.1/24", "dev", &me.rx_if])?;
        sh("ip", &["-n", &me.tx_ns, "addr", "add", "198.51.100.2/24", "dev", &me.tx_if])?;
        for (ns, dev) in [(&me.tx_ns, &me.tx_if), (&me.rx_ns, &me.rx_if)] {
            sh("ip", &["-n", ns, "link", "set", dev, "up"])?;
        }
        // trafgen gives up on the first EAGAIN from a full veth ring; a real qdisc on the
        // sender absorbs the back-pressure (trafgen then goes through it: --qdisc-path).
        sh("ip", &["-n", &me.tx_ns, "link", "set", &me.tx_if, "txqueuelen", "10000"])?;
        sh("tc", &["-n", &me.tx_ns, "qdisc", "replace", "dev", &me.tx_if, "root", "pfifo", "limit", "10000"])?;
        Ok(me)
    }

    /// Floods `frame` (destination MAC rewritten to the receiver's) for `seconds` and returns
    /// the receiver's processed packets per second, read through `count` before and after.
    pub fn measure(&self, frame: &[u8], seconds: u64, mut count: impl FnMut() -> Result<u64>) -> Result<f64> {
        let mut frame = frame.to_vec();
        frame[..6].copy_from_slice(&self.rx_mac);
        frame[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
        let conf = std::env::temp_dir().join(format!("{}.trafgen", self.tx_ns));
        let bytes: Vec<String> = frame.iter().map(|b| format!("0x{b:02x}")).collect();
        fs::write(&conf, format!("{{ {} }}\n", bytes.join(", ")))?;
        // Bounded by count as well as by the kill below (trafgen ignores SIGTERM mid-flood).
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.tx_ns, "trafgen", "--dev", &self.tx_if, "--conf", conf.to_str().unwrap(), "--cpus", "1", "-n", "200000000", "--no-sock-mem", "--qdisc-path"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting trafgen")?;
        thread::sleep(Duration::from_millis(500));
        let r = (|| -> Result<f64> {
            let c0 = count()?;
            let t0 = Instant::now();
            thread::sleep(Duration::from_secs(seconds));
            let c1 = count()?;
            let dt = t0.elapsed().as_secs_f64();
            if std::env::var_os("RAMPART_BENCH_DEBUG").is_some() {
                eprintln!("{}: counter {c0} -> {c1} in {dt:.2} s", self.rx_ns);
            }
            Ok((c1.saturating_sub(c0)) as f64 / dt)
        })();
        let _ = Command::new("ip").args(["netns", "pids", &self.tx_ns]).output().map(|o| {
            for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        });
        let _ = child.kill();
        let _ = child.wait();
        let _ = fs::remove_file(&conf);
        let pps = r?;
        if pps <= 0.0 {
            bail!("the receiver in {} processed no packets", self.rx_ns);
        }
        Ok(pps)
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        for ns in [&self.tx_ns, &self.rx_ns] {
            if let Ok(o) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Sum of the packet counts of every `counter` in `nft -j list table …` output.
pub fn nft_counter_packets(json: &str) -> Result<u64> {
    let v: serde_json::Value = serde_json::from_str(json)?;
    let mut sum = 0;
    fn walk(v: &serde_json::Value, sum: &mut u64) {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(c) = m.get("counter").and_then(|c| c.get("packets")).and_then(|p| p.as_u64()) {
                    *sum += c;
                }
                m.values().for_each(|x| walk(x, sum));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, sum)),
            _ => {}
        }
    }
    walk(&v, &mut sum);
    Ok(sum)
}

/// Sum of the packet column of `iptables -L CHAIN -v -x -n` output.
pub fn iptables_packets(out: &str) -> Result<u64> {
    Ok(out.lines().skip(2).filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok()).sum())
}

/// Hits on one xdp-filter IPv4 entry: its per-CPU values hold flags in the low 6 bits and a
/// counter above them.
pub fn xdp_filter_hits(addr: [u8; 4]) -> Result<u64> {
    let a: Vec<String> = addr.iter().map(|b| b.to_string()).collect();
    let mut args = vec!["map", "lookup", "pinned", "/sys/fs/bpf/xdp-filter/filter_ipv4", "key"];
    args.extend(a.iter().map(|s| s.as_str()));
    args.push("-j");
    let out = sh("bpftool", &args)?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    // With BTF, bpftool puts the decoded values under "formatted" (raw bytes under "values").
    let values = v["formatted"]["values"].as_array().context("no formatted values in bpftool's output")?;
    Ok(values.iter().filter_map(|c| c["value"].as_u64()).map(|x| x >> 6).sum())
}
