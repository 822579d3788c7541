//! Helpers for the benchmark binaries (`src/bin/*-bench.rs`): shell-outs, a markdown table,
//! flood rigs in throwaway network namespaces ([`rampart_netlab`]), and peers' counters.

use std::{
    fmt::Write as _,
    fs,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use rampart_netlab::{Lab, Ns, run, veth};

use crate::tls_bench::procs::CpuSample;

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
    bpftool_run(None, id, frame, repeat)
}

/// [`run_bpftool`] from inside network namespace `ns`: the test run's device is then that
/// namespace's loopback, so what the program looks up (routes, neighbours) is the namespace's.
pub fn run_bpftool_in(ns: &str, id: u32, frame: &[u8], repeat: u32) -> Result<f64> {
    bpftool_run(Some(ns), id, frame, repeat)
}

fn bpftool_run(ns: Option<&str>, id: u32, frame: &[u8], repeat: u32) -> Result<f64> {
    let f = std::env::temp_dir().join(format!("rampart-bench-{}-{id}.bin", std::process::id()));
    fs::write(&f, frame)?;
    let (id, repeat) = (id.to_string(), repeat.to_string());
    let run = ["prog", "run", "id", &id, "data_in", f.to_str().unwrap(), "repeat", &repeat];
    let r = match ns {
        Some(ns) => sh("ip", &[&["netns", "exec", ns, "bpftool"][..], &run[..]].concat()),
        None => sh("bpftool", &run),
    };
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

/// The source prefix of deny rule `i` of [`rampart_rules`]: 10.a.b.0/24, a different /24 per
/// rule.
pub fn rule_net(i: u32) -> [u8; 4] {
    [10, (i >> 8) as u8, (i & 0xff) as u8, 0]
}

/// A rule file of `n` rules rampart's way: CIDRs, port ranges and order that xdp-filter cannot
/// express. Every fourth rule is an allow with a TCP port range, the others (and the last) deny
/// a /24 ([`rule_net`]).
pub fn rampart_rules(n: u32) -> String {
    let mut s = String::from("default = \"allow\"\n");
    for i in 0..n {
        let [a, b, c, d] = rule_net(i);
        if i % 4 == 3 && i + 1 != n {
            let lo = 1000 + (i % 50_000) as u16;
            writeln!(
                s,
                "[[rule]]\naction = \"allow\"\nproto = \"tcp\"\nsrc = \"{a}.{b}.{c}.{d}/24\"\ndport = \"{lo}-{}\"",
                lo + 10
            )
            .unwrap();
        } else {
            writeln!(s, "[[rule]]\naction = \"deny\"\nsrc = \"{a}.{b}.{c}.{d}/24\"").unwrap();
        }
    }
    s
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

/// Two namespaces joined by a veth pair, for a trafgen flood from `tx` into `rx`. Removed on
/// drop, with every process in them.
pub struct Flood {
    pub tx_ns: String,
    pub rx_ns: String,
    pub tx_if: String,
    pub rx_if: String,
    pub rx_mac: [u8; 6],
    pub rx_addr: [u8; 4],
    lab: Lab,
}

impl Flood {
    pub fn new(tag: &str) -> Result<Self> {
        Self::with_queues(tag, 1)
    }

    /// The same with `queues` receive and transmit queues on each veth end, so that native XDP
    /// on either end runs one NAPI instance per queue (one per CPU) instead of one for all.
    pub fn with_queues(tag: &str, queues: usize) -> Result<Self> {
        let q = queues.max(1) as u32;
        let mut lab = Lab::new(&format!("rb-{tag}"))?;
        let (tx, rx) = (lab.ns("tx")?, lab.ns("rx")?);
        let (tx_if, rx_if) = ("rbtx0", "rbrx0");
        // trafgen gives up on the first EAGAIN from a full veth ring; a long queue and a real
        // qdisc on the sender absorb the back-pressure (trafgen then goes through it:
        // --qdisc-path).
        veth(
            tx.end(tx_if).mac("02:00:00:00:00:01").addr("198.51.100.2/24").txqueuelen(10000).queues(q),
            rx.end(rx_if).mac("02:00:00:00:00:02").addr("198.51.100.1/24").queues(q),
        )?;
        tx.run("tc", &["qdisc", "replace", "dev", tx_if, "root", "pfifo", "limit", "10000"])?;
        Ok(Self {
            tx_ns: tx.name().into(),
            rx_ns: rx.name().into(),
            tx_if: tx_if.into(),
            rx_if: rx_if.into(),
            rx_mac: [0x02, 0, 0, 0, 0, 0x02],
            rx_addr: [198, 51, 100, 1],
            lab,
        })
    }

    /// Floods `frame` (destination MAC rewritten to the receiver's) from `senders` trafgen
    /// processes (one per CPU) for `seconds`, after half a second of flood not measured, and
    /// returns what the receiver processed, read through `count` before and after, with how busy
    /// each CPU was meanwhile. On veth the receiving program runs in the softirq of the CPU that
    /// sent, so senders on every CPU keep every CPU busy with sending and receiving: the rate is
    /// then bounded by the whole per-packet cost, of which the receiving program is a part.
    pub fn measure(
        &mut self,
        frame: &[u8],
        seconds: f64,
        senders: usize,
        count: impl FnMut() -> Result<u64>,
    ) -> Result<FloodSample> {
        let mut frame = frame.to_vec();
        frame[..6].copy_from_slice(&self.rx_mac);
        frame[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
        let bytes: Vec<String> = frame.iter().map(|b| format!("0x{b:02x}")).collect();
        self.measure_conf(&format!("{{ {} }}\n", bytes.join(", ")), seconds, senders, count)
    }

    /// [`Flood::measure`] with a trafgen configuration of its own (`man trafgen`: counters,
    /// random bytes and checksums computed per packet), for floods whose packets vary. Its
    /// frames must be addressed to `rx_mac` from 02:00:00:00:00:01.
    pub fn measure_conf(
        &mut self,
        trafgen_conf: &str,
        seconds: f64,
        senders: usize,
        mut count: impl FnMut() -> Result<u64>,
    ) -> Result<FloodSample> {
        let conf = std::env::temp_dir().join(format!("{}.trafgen", self.tx_ns));
        fs::write(&conf, trafgen_conf)?;
        // Bounded by count as well as by the kill below (trafgen ignores SIGTERM mid-flood).
        let tx = Ns::named(&self.tx_ns);
        let mut trafgen = tx.command("trafgen");
        trafgen
            .args(["--dev", &self.tx_if, "--conf", conf.to_str().unwrap()])
            .args(["--cpus", &senders.max(1).to_string(), "-n", "500000000", "--no-sock-mem", "--qdisc-path"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = self.lab.spawn(&mut trafgen)?;
        thread::sleep(Duration::from_millis(500));
        let r = (|| -> Result<FloodSample> {
            let c0 = count()?;
            let cpu0 = CpuSample::now();
            let t0 = Instant::now();
            thread::sleep(Duration::from_secs_f64(seconds));
            let c1 = count()?;
            let cpu1 = CpuSample::now();
            let dt = t0.elapsed().as_secs_f64();
            if std::env::var_os("RAMPART_BENCH_DEBUG").is_some() {
                eprintln!("{}: counter {c0} -> {c1} in {dt:.2} s", self.rx_ns);
            }
            let packets = c1.saturating_sub(c0);
            Ok(FloodSample { pps: packets as f64 / dt, busy: cpu0.busy_since(&cpu1) })
        })();
        // trafgen runs a process per CPU: all of them go.
        let killed = self.lab.kill_all(&tx);
        self.lab.kill(child);
        let _ = fs::remove_file(&conf);
        killed?;
        let sample = r?;
        if sample.pps <= 0.0 {
            bail!("the receiver in {} processed no packets", self.rx_ns);
        }
        Ok(sample)
    }
}

/// One flood measurement.
#[derive(Clone, Debug)]
pub struct FloodSample {
    /// Packets per second the receiver processed.
    pub pps: f64,
    /// How busy each CPU was (%), from /proc/stat.
    pub busy: Vec<f64>,
}

impl FloodSample {
    /// CPU time the machine spent per packet processed (ns): all CPUs' busy time over the
    /// packets, so sending, the stack and the receiving program together.
    pub fn cpu_ns_per_packet(&self) -> f64 {
        let cores: f64 = self.busy.iter().sum::<f64>() / 100.0;
        if self.pps > 0.0 { cores * 1e9 / self.pps } else { 0.0 }
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

/// BPF run-time statistics (each program's run count and time), on while this lives: the
/// kernel turns them off when the descriptor BPF_ENABLE_STATS returned closes, also if the
/// process dies. They add two clock reads per run to every program alike.
pub struct BpfStats {
    /// Holding it open is what keeps the statistics on.
    _fd: std::os::fd::OwnedFd,
}

impl BpfStats {
    pub fn enable() -> Result<Self> {
        use std::os::fd::FromRawFd as _;
        const BPF_ENABLE_STATS: libc::c_long = 32;
        // union bpf_attr: enable_stats.type = BPF_STATS_RUN_TIME (0), the rest zero.
        let attr = [0u8; 128];
        // SAFETY: the attribute buffer is valid for its whole length.
        let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_ENABLE_STATS, attr.as_ptr(), attr.len() as u32) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("BPF_ENABLE_STATS");
        }
        // SAFETY: the kernel returned a new descriptor we own.
        Ok(Self { _fd: unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) } })
    }

    /// (run time ns, runs) of program `id` so far.
    pub fn of(&self, id: u32) -> Result<(u64, u64)> {
        let out = sh("bpftool", &["prog", "show", "id", &id.to_string(), "-j"])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        // bpftool leaves both out while they are zero.
        Ok((v["run_time_ns"].as_u64().unwrap_or(0), v["run_cnt"].as_u64().unwrap_or(0)))
    }

    /// Runs `f` (a flood, say) and returns its result with program `prog`'s own ns per run
    /// meanwhile: `None` without a program or when it did not run.
    pub fn during<T>(&self, prog: Option<u32>, f: impl FnOnce() -> Result<T>) -> Result<(T, Option<f64>)> {
        let before = prog.map(|id| self.of(id)).transpose()?;
        let out = f()?;
        let ns = match (prog, before) {
            (Some(id), Some((t0, n0))) => {
                let (t1, n1) = self.of(id)?;
                (n1 > n0).then(|| (t1 - t0) as f64 / (n1 - n0) as f64)
            }
            _ => None,
        };
        Ok((out, ns))
    }
}

/// The round's order of `n` contenders: A B C, then B C A, then C A B, … so that no contender is
/// always first (on a warming or drifting machine) or always after the same one.
pub fn rotation(n: usize, round: usize) -> Vec<usize> {
    (0..n).map(|i| (i + round) % n).collect()
}

/// What a packet filter rule set asks of xdp-filter, to choose its `-f` features.
#[derive(Clone, Copy, Debug, Default)]
pub struct XdpFilterNeeds {
    pub ipv4: bool,
    pub ipv6: bool,
    pub tcp_ports: bool,
    pub udp_ports: bool,
    pub ethernet: bool,
}

impl XdpFilterNeeds {
    /// The `-f` list: only what the rules use, as xdp-filter(8) says ("the fewer features are
    /// enabled, the better the performance"); it loads the smallest build that covers it.
    pub fn features(&self) -> String {
        let mut f = Vec::new();
        for (on, name) in [
            (self.tcp_ports, "tcp"),
            (self.udp_ports, "udp"),
            (self.ipv6, "ipv6"),
            (self.ipv4, "ipv4"),
            (self.ethernet, "ethernet"),
        ] {
            if on {
                f.push(name);
            }
        }
        f.join(",")
    }

    /// The program xdp-filter 1.3 must load for these features with policy allow (its
    /// `progs[]` table: the first build whose features cover the request).
    pub fn expected_program(&self) -> &'static str {
        let ip = self.ipv4 || self.ipv6;
        match (self.tcp_ports, self.udp_ports, ip, self.ethernet) {
            (false, true, false, false) => "xdpfilt_alw_udp",
            (true, false, false, false) => "xdpfilt_alw_tcp",
            (false, false, _, false) => "xdpfilt_alw_ip",
            (false, false, false, true) => "xdpfilt_alw_eth",
            _ => "xdpfilt_alw_all",
        }
    }
}

/// The XDP program attached to an interface, as the kernel reports it, and the one a test run
/// must measure: the program itself, or the component behind libxdp's dispatcher.
#[derive(Clone, Debug, PartialEq)]
pub struct AttachedXdp {
    pub id: u32,
    pub name: String,
    /// "native", "skb" or "offload".
    pub mode: &'static str,
    /// When `name` is libxdp's dispatcher: the component programs (id, name).
    pub components: Vec<(u32, String)>,
}

impl AttachedXdp {
    /// Reads `ip -d -j link show IF` in namespace `ns`, and `xdp-loader status IF` when the
    /// program there is libxdp's dispatcher.
    pub fn of(ns: &str, iface: &str) -> Result<Self> {
        let out = Ns::named(ns).ip(&["-d", "-j", "link", "show", "dev", iface])?;
        let mut me = Self::parse_link(&out).with_context(|| format!("no XDP program on {iface} in {ns}"))?;
        if me.name == "xdp_dispatcher" {
            let out = run(Ns::named(ns).nsenter("xdp-loader").args(["status", iface]))?;
            me.components = parse_xdp_loader_components(&String::from_utf8_lossy(&out.stdout));
        }
        Ok(me)
    }

    fn parse_link(json: &str) -> Option<Self> {
        let v: serde_json::Value = serde_json::from_str(json).ok()?;
        let xdp = &v.as_array()?.first()?["xdp"];
        let prog = &xdp["prog"];
        let mode = match xdp["mode"].as_u64()? {
            1 => "native",
            2 => "skb",
            3 => "offload",
            _ => "multiple",
        };
        Some(Self {
            id: prog["id"].as_u64()? as u32,
            name: prog["name"].as_str()?.to_string(),
            mode,
            components: Vec::new(),
        })
    }

    /// The program a test run measures: the one whose name starts with `prefix`, attached
    /// directly or as the dispatcher's only such component.
    pub fn program(&self, prefix: &str) -> Result<(u32, &str)> {
        if self.name.starts_with(prefix) {
            return Ok((self.id, &self.name));
        }
        let found: Vec<&(u32, String)> = self.components.iter().filter(|(_, n)| n.starts_with(prefix)).collect();
        match found.as_slice() {
            [(id, name)] => Ok((*id, name)),
            _ => bail!(
                "{} (id {}) is attached, with components {:?}: not one `{prefix}*` program",
                self.name,
                self.id,
                self.components
            ),
        }
    }

    /// One line for the report: what runs, in which mode, through the dispatcher or not.
    pub fn describe(&self) -> String {
        if self.components.is_empty() {
            format!("`{}` (id {}), {} mode, attached directly (no libxdp dispatcher)", self.name, self.id, self.mode)
        } else {
            let c: Vec<String> = self.components.iter().map(|(id, n)| format!("`{n}` (id {id})")).collect();
            format!(
                "libxdp's dispatcher `{}` (id {}), {} mode, running {}",
                self.name,
                self.id,
                self.mode,
                c.join(", ")
            )
        }
    }
}

/// The components under a dispatcher in `xdp-loader status` output: lines `=> PRIO NAME ID TAG …`.
fn parse_xdp_loader_components(status: &str) -> Vec<(u32, String)> {
    status
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            if w.next()? != "=>" {
                return None;
            }
            let _prio = w.next()?;
            let name = w.next()?.to_string();
            let id = w.next()?.parse().ok()?;
            Some((id, name))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_puts_each_contender_first_once() {
        assert_eq!(rotation(3, 0), [0, 1, 2]);
        assert_eq!(rotation(3, 1), [1, 2, 0]);
        assert_eq!(rotation(3, 2), [2, 0, 1]);
        assert_eq!(rotation(3, 3), [0, 1, 2]);
    }

    #[test]
    fn xdp_filter_gets_the_smallest_build() {
        let addr = XdpFilterNeeds { ipv4: true, ..Default::default() };
        assert_eq!(addr.features(), "ipv4");
        assert_eq!(addr.expected_program(), "xdpfilt_alw_ip");
        let port = XdpFilterNeeds { udp_ports: true, ..Default::default() };
        assert_eq!(port.expected_program(), "xdpfilt_alw_udp");
        let both = XdpFilterNeeds { ipv4: true, udp_ports: true, tcp_ports: true, ..Default::default() };
        assert_eq!(both.features(), "tcp,udp,ipv4");
        assert_eq!(both.expected_program(), "xdpfilt_alw_all");
    }

    #[test]
    fn finds_the_attached_program_and_dispatcher_components() {
        let direct = r#"[{"ifname":"rbrx0","xdp":{"mode":1,"prog":{"id":140,"name":"xdpfilt_alw_ip","tag":"6c"},"attached":[]}}]"#;
        let a = AttachedXdp::parse_link(direct).unwrap();
        assert_eq!((a.id, a.name.as_str(), a.mode), (140, "xdpfilt_alw_ip", "native"));
        assert_eq!(a.program("xdpfilt_").unwrap(), (140, "xdpfilt_alw_ip"));
        assert!(AttachedXdp::parse_link(r#"[{"ifname":"rbrx0"}]"#).is_none());

        let status = "CURRENT XDP PROGRAM STATUS:\n\nInterface        Prio  Program name      Mode     ID   Tag               Chain actions\n\
            --------------------------------------------------------------------------------------\n\
            rbrx0                  xdp_dispatcher    native   59   d51e469e988d81da\n \
            =>              50     xdpfilt_alw_ip            68   6c368739f9d2d2ce  XDP_PASS\n";
        let mut d = AttachedXdp { id: 59, name: "xdp_dispatcher".into(), mode: "native", components: Vec::new() };
        d.components = parse_xdp_loader_components(status);
        assert_eq!(d.components, [(68, "xdpfilt_alw_ip".to_string())]);
        assert_eq!(d.program("xdpfilt_").unwrap(), (68, "xdpfilt_alw_ip"));
        assert!(d.program("rampart").is_err());
    }
}
