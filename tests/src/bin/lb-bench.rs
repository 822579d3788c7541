//! `cargo xtask bench lb`: rampart's XDP layer-4 balancer beside its floor and its peers, one
//! run, the contenders alternating within rounds (A B C, B C A, …), every figure a median over
//! the rounds with its spread and every ratio the median of per-round ratios.
//!
//! 1. ns per packet (BPF_PROG_TEST_RUN): rampart's pipeline (allow-all firewall, then the
//!    balancer with one TCP service and 3 backends) on a connection-table hit, a miss and
//!    non-service traffic, beside the floor `xdp_minimal_tx` (parse, count, swap MACs, XDP_TX).
//!    The balancer rewrites the frame in place and test-run repeats run on the rewritten buffer,
//!    so `repeat N` would measure one hit and N−1 runs of an already encapsulated frame: every
//!    case is measured as single runs on fresh frames (a miss: a flow never seen before).
//! 2. Forwarded packets/s on veth under a trafgen flood from 16,384 flows, counted by one
//!    program (`xdp_sink`) on the backends' side of the link for every contender: the floor,
//!    the calibration (the floor plus a known extra cost: it must measure slower than the floor,
//!    or the run is reported invalid, as fw-bench's), rampart, and nftables DNAT (`jhash` and
//!    `numgen` maps).
//! 3. Connections/s end to end (wrk, `Connection: close`) to the VIP through rampart (direct
//!    server return, `rampart decap` on the backends) and through HAProxy in `mode tcp`, to the
//!    same three nginx backends.
//!
//! Everything runs in network namespaces this binary creates (through `rampart_netlab`) and
//! removes in Drop, also on failure and after Ctrl-C (the signal only sets a flag the loops
//! check).

use std::{
    fmt::Write as _,
    fs,
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use aya::{
    Ebpf,
    maps::{Array, PerCpuArray, PerCpuValues},
    programs::{TestRun, TestRunOptions, Xdp, XdpMode},
};
use clap::Parser;
use rampart::{
    bpf::{CALIBRATION_TX_OBJ, FIREWALL_OBJ, MINIMAL_TX_OBJ, SINK_OBJ},
    fw::{
        rules::{Action, RuleSet},
        tables::FwTables,
    },
    lb::{
        state::{LbState, ServiceId, default_config, sync},
        tables::LbTables,
    },
    netns::NetnsGuard,
};
use rampart_common::{fw::PROGRAM_NAME, xdp_action};
use rampart_netlab::{Lab, Ns, veth};
use rampart_tests::{
    bench::{BpfStats, Flood, FloodSample, Table, rotation, run_bpftool, sh, udp4_frame},
    netns::rampart_bin,
    packet::{Packet, TCP_ACK},
    tls_bench::report::{median, min_max, thousands},
};

#[derive(Parser, Debug)]
#[command(name = "lb-bench", about = "rampart's XDP balancer beside its floor, nftables DNAT and HAProxy, one run")]
struct Args {
    /// Smoke run: 2 rounds, few frames, 1 s floods and connection runs (proves the rig works;
    /// the figures mean nothing).
    #[arg(long)]
    quick: bool,
    /// Rounds; the contenders' order rotates each round [default: 5; quick: 2].
    #[arg(long)]
    rounds: Option<usize>,
    /// Test-run frames per case per round, one run each [default: 5,000; quick: 500].
    #[arg(long)]
    frames: Option<u32>,
    /// `bpftool prog run` repeats for the cases a repeat can measure [default: 10,000,000;
    /// quick: 100,000].
    #[arg(long)]
    repeat: Option<u32>,
    /// Seconds each flood measurement lasts [default: 3; quick: 1].
    #[arg(long)]
    seconds: Option<f64>,
    /// trafgen sender processes, one per CPU [default: every CPU].
    #[arg(long)]
    senders: Option<usize>,
    /// Seconds each connections/s measurement lasts [default: 5; quick: 1].
    #[arg(long)]
    conn_seconds: Option<u64>,
    /// Connections wrk keeps open at once [default: 64].
    #[arg(long, default_value_t = 64)]
    concurrency: u32,
    /// Skip sections: any of `testrun`, `flood`, `conn` (comma-separated).
    #[arg(long, value_delimiter = ',')]
    skip: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// Ctrl-C: the handler only sets a flag; loops check it between measurements and return an
// error, so every namespace, program and process is removed by the Drops on the way out.

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn install_signal_flag() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

fn check_stop() -> Result<()> {
    if STOP.load(Ordering::SeqCst) {
        bail!("interrupted: cleaning up");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Addresses. Sections 1 and 2: the balancer is `Flood`'s receiving namespace and the backends
// live on the sender's side of the same veth (one-arm, as Katran), in 198.51.100.0/24.

const VIP: Ipv4Addr = Ipv4Addr::new(10, 77, 100, 1);
const BACKENDS: [Ipv4Addr; 3] =
    [Ipv4Addr::new(198, 51, 100, 11), Ipv4Addr::new(198, 51, 100, 12), Ipv4Addr::new(198, 51, 100, 13)];
const TCP_PORT: u16 = 80;
const UDP_PORT: u16 = 9000;
/// The flood's flows: 64 source addresses × 256 source ports.
const FLOOD_FLOWS: u32 = 64 * 256;

fn tcp_service() -> ServiceId {
    format!("{VIP}:{TCP_PORT}/tcp").parse().expect("a service")
}
fn udp_service() -> ServiceId {
    format!("{VIP}:{UDP_PORT}/udp").parse().expect("a service")
}

/// The balancer's side of a `Flood` pair made ready to forward: forwarding on, no reverse-path
/// filter (the flood's sources are not routed back), the backends' MACs known (permanent
/// neighbour entries: no ARP during a measurement), and the backends' addresses on the sender's
/// side. One place for all of it, so a shared namespace builder can replace it.
fn balancer_pair(tag: &str, queues: usize) -> Result<Flood> {
    let net = Flood::with_queues(tag, queues)?;
    let ns = net.rx_ns.clone();
    sh("ip", &["netns", "exec", &ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
    for k in ["all", "default", net.rx_if.as_str()] {
        sh("ip", &["netns", "exec", &ns, "sysctl", "-qw", &format!("net.ipv4.conf.{k}.rp_filter=0")])?;
    }
    for b in BACKENDS {
        sh(
            "ip",
            &[
                "-n",
                &ns,
                "neigh",
                "replace",
                &b.to_string(),
                "lladdr",
                "02:00:00:00:00:01",
                "dev",
                &net.rx_if,
                "nud",
                "permanent",
            ],
        )?;
        sh("ip", &["-n", &net.tx_ns, "addr", "add", &format!("{b}/32"), "dev", &net.tx_if])?;
    }
    Ok(net)
}

fn ifindex_in(ns: &str, iface: &str) -> Result<u32> {
    let out = sh("ip", &["-n", ns, "-j", "link", "show", "dev", iface])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    v[0]["ifindex"].as_u64().map(|i| i as u32).with_context(|| format!("no ifindex for {iface} in {ns}"))
}

// ---------------------------------------------------------------------------------------------
// The programs.

/// rampart's pipeline loaded in this process: an allow-all firewall, then the balancer with
/// `services`, each with the three backends at weight 100 and the default 65,537-slot table.
struct Pipeline {
    ebpf: Ebpf,
    lb: LbTables,
    state: LbState,
    _fw: FwTables,
}

impl Pipeline {
    fn load(services: &[ServiceId]) -> Result<Self> {
        let mut ebpf = Ebpf::load(FIREWALL_OBJ)?;
        let mut fw = FwTables::from_ebpf(&mut ebpf)?;
        fw.install(&RuleSet { default: Action::Allow, sets: Default::default(), rules: Vec::new() })?;
        let mut lb = LbTables::from_ebpf(&mut ebpf)?;
        lb.set_config(&default_config())?;
        let prog: &mut Xdp = ebpf.program_mut(PROGRAM_NAME).context("the pipeline program")?.try_into()?;
        prog.load()?;
        let mut state = LbState::default();
        for s in services {
            state.add_service(s.clone(), 65_537)?;
            for b in BACKENDS {
                state.add_backend(s, b.into(), 100)?;
            }
        }
        sync(&mut lb, &LbState::default(), &state)?;
        Ok(Self { ebpf, lb, state, _fw: fw })
    }
    fn prog(&mut self) -> Result<&mut Xdp> {
        Ok(self.ebpf.program_mut(PROGRAM_NAME).context("the pipeline program")?.try_into()?)
    }
    fn prog_id(&self) -> Result<u32> {
        let p: &Xdp = self.ebpf.program(PROGRAM_NAME).context("the pipeline program")?.try_into()?;
        Ok(p.info()?.id())
    }
    fn attach(&mut self, ns: &str, iface: &str) -> Result<()> {
        let _g = NetnsGuard::enter(ns)?;
        self.prog()?.attach(iface, XdpMode::Driver)?;
        Ok(())
    }
    /// New flows (connection-table misses) over every backend of `svc`.
    fn new_flows(&self, svc: &ServiceId) -> Result<u64> {
        let s = self.state.service(svc)?;
        let mut n = 0;
        for b in &s.backends {
            n += self.lb.backend_counters(b.id)?.new_flows;
        }
        Ok(n)
    }
}

/// The floor: `xdp_minimal_tx` (parse Ethernet/IPv4, count, swap MACs, XDP_TX); or the flood's
/// calibration, `xdp_calibration_tx` (the same plus a fixed extra cost per packet).
struct MinimalTx {
    ebpf: Ebpf,
    prog: &'static str,
}

impl MinimalTx {
    fn load() -> Result<Self> {
        Self::load_obj(MINIMAL_TX_OBJ, "xdp_minimal_tx")
    }
    fn calibration() -> Result<Self> {
        Self::load_obj(CALIBRATION_TX_OBJ, "xdp_calibration_tx")
    }
    fn load_obj(obj: &[u8], prog: &'static str) -> Result<Self> {
        let mut ebpf = Ebpf::load(obj)?;
        let p: &mut Xdp = ebpf.program_mut(prog).context("program")?.try_into()?;
        p.load()?;
        Ok(Self { ebpf, prog })
    }
    fn prog(&mut self) -> Result<&mut Xdp> {
        Ok(self.ebpf.program_mut(self.prog).context("program")?.try_into()?)
    }
    fn prog_id(&self) -> Result<u32> {
        let p: &Xdp = self.ebpf.program(self.prog).context("program")?.try_into()?;
        Ok(p.info()?.id())
    }
    fn attach(&mut self, ns: &str, iface: &str) -> Result<()> {
        let _g = NetnsGuard::enter(ns)?;
        self.prog()?.attach(iface, XdpMode::Driver)?;
        Ok(())
    }
}

/// The count point on the backends' side: `xdp_sink` counts each IPv4 frame by destination
/// (the three backends, the VIP, anything else) and drops it.
struct Sink {
    ebpf: Ebpf,
}

/// Sink slots: 0..3 the backends, 3 the VIP, 4 anything else.
const SINK_VIP: usize = 3;
const SINK_SLOTS: usize = 5;

impl Sink {
    fn attach(ns: &str, iface: &str) -> Result<Self> {
        let mut ebpf = Ebpf::load(SINK_OBJ)?;
        {
            let mut dst: Array<_, u32> = Array::try_from(ebpf.map_mut("SINK_DST").context("SINK_DST")?)?;
            for (i, a) in BACKENDS.iter().chain([&VIP]).enumerate() {
                dst.set(i as u32, u32::from_ne_bytes(a.octets()), 0)?;
            }
        }
        let p: &mut Xdp = ebpf.program_mut("xdp_sink").context("program")?.try_into()?;
        p.load()?;
        let _g = NetnsGuard::enter(ns)?;
        p.attach(iface, XdpMode::Driver)?;
        Ok(Self { ebpf })
    }
    fn counts(&self) -> Result<[u64; SINK_SLOTS]> {
        let map: PerCpuArray<_, u64> = PerCpuArray::try_from(self.ebpf.map("SINK_COUNT").context("SINK_COUNT")?)?;
        let mut out = [0; SINK_SLOTS];
        for (i, o) in out.iter_mut().enumerate() {
            let v: PerCpuValues<u64> = map.get(&(i as u32), 0)?;
            *o = v.iter().sum();
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------------
// Section 1: ns per packet by test run.

/// "median (min–max)".
fn spread(v: &[f64], fmt: impl Fn(f64) -> String) -> String {
    let (lo, hi) = min_max(v);
    format!("{} ({}–{})", fmt(median(v.to_vec())), fmt(lo), fmt(hi))
}

/// Per-round ratios a[i] / b[i].
fn paired(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x / y).filter(|r| r.is_finite()).collect()
}

/// The mean of single-run durations without the slowest 1 % (runs an interrupt landed in).
fn trimmed_mean(mut ns: Vec<u64>) -> f64 {
    ns.sort_unstable();
    let keep = (ns.len() - ns.len() / 100).max(1);
    ns[..keep].iter().sum::<u64>() as f64 / keep as f64
}

/// One BPF_PROG_TEST_RUN of `frame` as if it arrived on interface `ifindex`: (action, ns).
fn run_once(prog: &mut Xdp, frame: &[u8], ifindex: u32, out: &mut [u8]) -> Result<(u32, u64)> {
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
    let mut ctx = [0u8; 24];
    for (i, v) in [0, frame.len() as u32, 0, ifindex, 0, 0].into_iter().enumerate() {
        ctx[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
    }
    let r = prog.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(out),
        ctx_in: Some(&ctx),
        repeat: 1,
        ..Default::default()
    })?;
    Ok((r.return_value, r.duration.as_nanos() as u64))
}

#[derive(Clone, Copy, PartialEq)]
enum Case {
    Floor,
    NonService,
    Hit,
    Miss,
}

impl Case {
    fn name(self) -> &'static str {
        match self {
            Case::Floor => "floor: xdp_minimal_tx",
            Case::NonService => "rampart, non-service packet",
            Case::Hit => "rampart, connection-table hit",
            Case::Miss => "rampart, connection-table miss (new flow)",
        }
    }
    fn expected(self) -> u32 {
        if self == Case::NonService { xdp_action::PASS } else { xdp_action::TX }
    }
}

/// A TCP SYN to the service (a new connection) from a source that encodes `i` (10.128.0.0/9:
/// a flow no other frame of the run uses).
fn miss_frame(i: u32) -> Vec<u8> {
    let src = Ipv4Addr::from(0x0a80_0000 | (i & 0x7f_ffff));
    Packet::tcp4(src, VIP, 40000, TCP_PORT).build().bytes
}

/// A packet of an established connection (ACK): a SYN always opens a new flow (hashed again),
/// so the connection table's hit is measured on what an open connection sends.
fn hit_frame() -> Vec<u8> {
    Packet::tcp4(Ipv4Addr::new(192, 0, 2, 7), VIP, 40000, TCP_PORT).tcp_flags(TCP_ACK).build().bytes
}

fn non_service_frame() -> Vec<u8> {
    udp4_frame([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2], [192, 0, 2, 7], [198, 51, 100, 1], 40000, 9999)
}

fn testrun_section(rounds: usize, frames: u32, repeat: u32, out: &mut String) -> Result<()> {
    let net = balancer_pair("tr", 1)?;
    let ifindex = ifindex_in(&net.rx_ns, &net.rx_if)?;
    let mut rp = Pipeline::load(&[tcp_service()])?;
    let mut floor = MinimalTx::load()?;
    let svc = tcp_service();
    // The test runs look the next hop up in the namespace of the calling thread.
    let guard = NetnsGuard::enter(&net.rx_ns)?;
    let mut buf = vec![0u8; 2048];
    let hit = hit_frame();
    // The hit's flow enters the table here, once.
    let (a, _) = run_once(rp.prog()?, &hit, ifindex, &mut buf)?;
    ensure!(a == xdp_action::TX, "the service's first packet got action {a}, not XDP_TX");
    let non_service = non_service_frame();
    let cases = [Case::Floor, Case::NonService, Case::Hit, Case::Miss];
    let mut ns: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    let mut next_miss = 0u32;
    for round in 0..rounds {
        for k in rotation(cases.len(), round) {
            check_stop()?;
            let case = cases[k];
            let flows0 = rp.new_flows(&svc)?;
            let mut times = Vec::with_capacity(frames as usize);
            for _ in 0..frames {
                let miss;
                let (prog, frame): (&mut Xdp, &[u8]) = match case {
                    Case::Floor => (floor.prog()?, &hit),
                    Case::NonService => (rp.prog()?, &non_service),
                    Case::Hit => (rp.prog()?, &hit),
                    Case::Miss => {
                        miss = miss_frame(next_miss);
                        next_miss += 1;
                        (rp.prog()?, &miss)
                    }
                };
                let (action, t) = run_once(prog, frame, ifindex, &mut buf)?;
                ensure!(action == case.expected(), "{}: action {action}, expected {}", case.name(), case.expected());
                times.push(t);
            }
            // The counters prove what was measured: every miss a new flow, no hit one.
            let new = rp.new_flows(&svc)? - flows0;
            let want = if case == Case::Miss { frames as u64 } else { 0 };
            ensure!(new == want, "{}: {new} new flows in the connection table, expected {want}", case.name());
            ns[k].push(trimmed_mean(times));
        }
    }
    guard.restore()?;
    // The cases a repeat can measure (the frame is not rewritten, or rewritten the same way each
    // time): the classic figure, with the test-run's per-call overhead spread over the repeats.
    let floor_id = floor.prog_id()?;
    let rp_id = rp.prog_id()?;
    let mut rep: Vec<Vec<f64>> = vec![Vec::new(); 2];
    for round in 0..rounds {
        for k in rotation(2, round) {
            check_stop()?;
            rep[k].push(if k == 0 {
                run_bpftool(floor_id, &hit, repeat)?
            } else {
                run_bpftool(rp_id, &non_service, repeat)?
            });
        }
    }

    writeln!(
        out,
        "### ns per packet (BPF_PROG_TEST_RUN, {} single runs per case per round, {rounds} rounds)\n",
        thousands(frames as f64)
    )?;
    let mut table = Table::new(&[
        "case",
        "ns/packet, one run per frame: median (min–max)",
        "× floor",
        "− floor (ns)",
        &format!("`bpftool prog run` repeat {}: median (min–max)", thousands(repeat as f64)),
    ]);
    for (k, c) in cases.iter().enumerate() {
        let diff: Vec<f64> = ns[k].iter().zip(&ns[0]).map(|(a, b)| a - b).collect();
        let bpftool = match c {
            Case::Floor => spread(&rep[0], |x| format!("{x:.1}")),
            Case::NonService => spread(&rep[1], |x| format!("{x:.1}")),
            _ => "not measurable this way (see below)".into(),
        };
        table.row(vec![
            c.name().into(),
            spread(&ns[k], |x| format!("{x:.1}")),
            format!("{:.2}", median(paired(&ns[k], &ns[0]))),
            if k == 0 { "-".into() } else { format!("{:.1}", median(diff)) },
            bpftool,
        ]);
    }
    out.push_str(&table.markdown());
    writeln!(
        out,
        "\nThe programs: rampart's pipeline `{PROGRAM_NAME}` (firewall with no rules and default allow, then the balancer \
         with one service {} and 3 backends, Maglev table of 65,537, IPv4-in-IPv4 towards the backend, next hop from \
         the per-CPU cache of `bpf_fib_lookup` answers (warm: one lookup per backend, CPU and second), XDP_TX); the floor `xdp_minimal_tx` parses Ethernet/IPv4, counts per CPU, swaps the MACs and \
         returns XDP_TX. Each run is given the ingress interface of a veth in the balancer's namespace (the FIB lookup \
         needs it), and every run's action is checked (XDP_TX; XDP_PASS for non-service traffic).\n\n\
         Why single runs: the balancer rewrites the frame in place (the outer header goes in front), and test-run \
         repeats run on the same, rewritten buffer, so with `repeat N` only the first run balances and the other N−1 \
         see an encapsulated frame to a backend, which is non-service traffic. Each case is therefore {} separate \
         BPF_PROG_TEST_RUN calls per round on a fresh copy of its frame, the kernel's own timing of each (which includes \
         about two clock reads and the test-run loop's bookkeeping, the same for every case: \"− floor\" removes it), the \
         slowest 1 % dropped (interrupts), averaged. Hit: one flow, entered in the table before the measurement. Miss: \
         every frame a TCP flow never sent before (source address 10.128.0.0/9 + frame number), so each run looks the \
         flow up, hashes it into the Maglev table and inserts it; {} flows in all, under the table's {} entries, so \
         the table is never full (a full LRU would add an eviction to each miss). After each case the backends' \
         new-flow counters are checked: exactly one new flow per miss frame, none for the hit. The last column is the \
         usual `bpftool prog run … repeat N` where a repeat measures the same thing each time.\n",
        tcp_service(),
        thousands(frames as f64),
        thousands(next_miss as f64),
        thousands(rampart_common::lb::DEFAULT_CONNTRACK_ENTRIES as f64),
    )?;
    drop(rp);
    drop(floor);
    drop(net);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Section 2: forwarded packets/s under a flood.

/// The flood's trafgen configuration: UDP to VIP:UDP_PORT, 46-byte IP packets (60-byte frames),
/// source 10.64.0.1–64 (a counter) and source port 0x9c00 + a random byte, so 16,384 flows; the
/// IP checksum computed per packet.
fn flood_conf(rx_mac: [u8; 6]) -> String {
    let hex = |b: &[u8]| b.iter().map(|x| format!("0x{x:02x}")).collect::<Vec<_>>().join(", ");
    let vip = VIP.octets();
    let port = UDP_PORT.to_be_bytes();
    format!(
        "{{\n  {}, 0x02, 0x00, 0x00, 0x00, 0x00, 0x01, 0x08, 0x00,\n  \
         0x45, 0x00, 0x00, 0x2e, 0x00, 0x00, 0x00, 0x00, 0x40, 0x11, csumip(14, 33),\n  \
         0x0a, 0x40, 0x00, dinc(1, 64), {},\n  \
         0x9c, drnd(), {}, 0x00, 0x1a, 0x00, 0x00,\n  {}\n}}\n",
        hex(&rx_mac),
        hex(&vip),
        hex(&port),
        hex(&[0u8; 18])
    )
}

/// One contender of the flood: its own pair of namespaces, what it loaded on the balancer's
/// side, and the sink on the backends' side. Fields drop in order: programs first, then the
/// namespaces.
struct FloodContender {
    name: &'static str,
    /// What it does per packet, for the report.
    does: String,
    loaded: String,
    /// The balancer's XDP program, for its run-time statistics.
    prog: Option<u32>,
    /// Sink slots that count as delivered for this contender.
    slots: std::ops::Range<usize>,
    sink: Sink,
    rp: Option<Pipeline>,
    _floor: Option<MinimalTx>,
    net: Flood,
}

fn nft_contender(name: &'static str, expr: &str, queues: usize, dir: &Path) -> Result<FloodContender> {
    let net = balancer_pair(if name.contains("jhash") { "nj" } else { "nn" }, queues)?;
    let map: Vec<String> = BACKENDS.iter().enumerate().map(|(i, b)| format!("{i} : {b}")).collect();
    let script = format!(
        "table ip rbench_lb {{\n  chain prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n    \
         ip daddr {VIP} udp dport {UDP_PORT} dnat to {expr} mod 3 map {{ {} }}\n  }}\n}}\n",
        map.join(", ")
    );
    let f = dir.join(format!("{}.nft", net.rx_ns));
    fs::write(&f, &script)?;
    sh("ip", &["netns", "exec", &net.rx_ns, "nft", "-f", f.to_str().unwrap()])?;
    let listed = sh("ip", &["netns", "exec", &net.rx_ns, "nft", "list", "ruleset"])?;
    let sink = Sink::attach(&net.tx_ns, &net.tx_if)?;
    Ok(FloodContender {
        name,
        does: "the stack: conntrack lookup (a new entry per new flow), DNAT to the mapped backend, route lookup, \
               neighbour output, veth transmit; no XDP program on the balancer"
            .into(),
        loaded: format!(
            "{} with `net.ipv4.ip_forward=1`, ruleset as listed by `nft list ruleset`:\n\n```\n{}```",
            sh("nft", &["--version"])?.trim(),
            listed
        ),
        prog: None,
        slots: 0..3,
        sink,
        rp: None,
        _floor: None,
        net,
    })
}

fn flood_contenders(queues: usize, dir: &Path) -> Result<Vec<FloodContender>> {
    let mut v = Vec::new();
    // The floor and its calibration: the same rig, one program each.
    let floors: [(&str, fn() -> Result<MinimalTx>, &'static str, String); 2] = [
        (
            "fl",
            MinimalTx::load,
            "floor: xdp_minimal_tx",
            "XDP: parse Ethernet/IPv4, count, swap MACs, XDP_TX back out of the same veth (the frame goes back to \
             its source's side unchanged: counted there, as addressed to the VIP)"
                .into(),
        ),
        (
            "cal",
            MinimalTx::calibration,
            CALIBRATION,
            "the floor plus a fixed extra cost per packet (256 dependent multiply-xorshift steps), to prove the \
             flood tells a costlier program from the floor"
                .into(),
        ),
    ];
    for (tag, load, name, does) in floors {
        let net = balancer_pair(tag, queues)?;
        let mut f = load()?;
        f.attach(&net.rx_ns, &net.rx_if)?;
        let sink = Sink::attach(&net.tx_ns, &net.tx_if)?;
        v.push(FloodContender {
            name,
            does,
            loaded: format!("`{}` (id {}), native mode on the balancer's veth", f.prog, f.prog_id()?),
            prog: Some(f.prog_id()?),
            slots: SINK_VIP..SINK_VIP + 1,
            sink,
            rp: None,
            _floor: Some(f),
            net,
        });
    }
    {
        let net = balancer_pair("rp", queues)?;
        let mut rp = Pipeline::load(&[udp_service()])?;
        rp.attach(&net.rx_ns, &net.rx_if)?;
        let sink = Sink::attach(&net.tx_ns, &net.tx_if)?;
        v.push(FloodContender {
            name: "rampart",
            does:
                "XDP: the whole pipeline (parse, firewall with no rules and default allow, balancer: service lookup, \
                   connection table, Maglev on a miss, IPv4-in-IPv4 with a per-flow outer source, the cached next hop, \
                   XDP_TX out of the same veth)"
                    .into(),
            loaded: format!(
                "`{PROGRAM_NAME}` (id {}), native mode, service {} with 3 backends (weight 100, Maglev 65,537), \
                 connection table of {} entries",
                rp.prog_id()?,
                udp_service(),
                thousands(rampart_common::lb::DEFAULT_CONNTRACK_ENTRIES as f64)
            ),
            prog: Some(rp.prog_id()?),
            slots: 0..3,
            sink,
            rp: Some(rp),
            _floor: None,
            net,
        });
    }
    v.push(nft_contender("nftables DNAT, jhash map", "jhash ip saddr . udp sport", queues, dir)?);
    v.push(nft_contender("nftables DNAT, numgen map", "numgen inc", queues, dir)?);
    Ok(v)
}

/// The flood's calibration contender (index 1, after the floor).
const CALIBRATION: &str = "calibration: floor + fixed extra work";

/// Flood results the targets need: per contender, packets/s per round; whether the calibration
/// showed the flood tells the programs apart.
struct FloodResult {
    names: Vec<&'static str>,
    pps: Vec<Vec<f64>>,
    valid: bool,
}

fn flood_section(rounds: usize, seconds: f64, senders: usize, dir: &Path, out: &mut String) -> Result<FloodResult> {
    let queues = thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mut cs = flood_contenders(queues, dir)?;
    let stats = BpfStats::enable()?;
    let mut samples: Vec<Vec<FloodSample>> = vec![Vec::new(); cs.len()];
    let mut prog_ns: Vec<Vec<f64>> = vec![Vec::new(); cs.len()];
    for round in 0..rounds {
        for i in rotation(cs.len(), round) {
            check_stop()?;
            let c = &mut cs[i];
            let conf = flood_conf(c.net.rx_mac);
            let (sink, slots) = (&c.sink, c.slots.clone());
            let (s, ns) = stats.during(c.prog, || {
                c.net
                    .measure_conf(&conf, seconds, senders, || Ok(sink.counts()?[slots.clone()].iter().sum()))
                    .with_context(|| format!("flooding {}", c.name))
            })?;
            prog_ns[i].extend(ns);
            eprintln!("lb-bench: flood round {}/{rounds}: {}: {:.0} packets/s", round + 1, c.name, s.pps);
            samples[i].push(s);
        }
    }
    drop(stats);
    let pps: Vec<Vec<f64>> = samples.iter().map(|v| v.iter().map(|s| s.pps).collect()).collect();
    writeln!(
        out,
        "### Forwarded packets/s on veth ({rounds} rounds of {seconds} s per contender, order rotated each round; trafgen \
         on {senders} CPU(s), {} flows)\n",
        thousands(FLOOD_FLOWS as f64)
    )?;
    // The calibration, as fw-bench's: its extra cost per packet is known from a test run; with
    // every CPU busy, each packet's whole CPU cost bounds the rate, so that extra cost must show.
    let cal = cs.iter().position(|c| c.name == CALIBRATION).context("calibration contender")?;
    let frame = hit_frame();
    let (mut floor_ns, mut cal_ns) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        floor_ns.push(run_bpftool(cs[0].prog.context("floor id")?, &frame, 1_000_000)?);
        cal_ns.push(run_bpftool(cs[cal].prog.context("calibration id")?, &frame, 1_000_000)?);
    }
    let (floor_ns, cal_ns) = (median(floor_ns), median(cal_ns));
    let extra_ns = cal_ns - floor_ns;
    let floor_cpu_ns = median(samples[0].iter().map(FloodSample::cpu_ns_per_packet).collect());
    let expected = if floor_cpu_ns > 0.0 { floor_cpu_ns / (floor_cpu_ns + extra_ns) } else { 1.0 };
    let ratios = paired(&pps[cal], &pps[0]);
    let measured = median(ratios.clone());
    // Slower in every round, by at least half the slow-down the extra cost predicts.
    let valid = extra_ns > 0.0 && ratios.iter().all(|&r| r < 1.0) && measured <= 1.0 - (1.0 - expected) / 2.0;
    writeln!(
        out,
        "**Calibration: {}.** The calibration program costs {extra_ns:.1} ns more per packet than the floor (test run, \
         `bpftool prog run` repeat 1,000,000: {cal_ns:.1} against {floor_ns:.1} ns). With the floor the machine spent \
         {floor_cpu_ns:.0} ns of CPU per packet, so a saturated balancer should run the calibration at {expected:.2}× \
         the floor's rate; measured {measured:.2}× (per round: {}). {}\n",
        if valid {
            "valid run, the flood tells the calibration program from the floor"
        } else {
            "INVALID RUN: the flood does not tell the programs apart"
        },
        ratios.iter().map(|r| format!("{r:.2}×")).collect::<Vec<_>>().join(", "),
        if valid {
            "The rates tell balancers apart to about the calibration's extra cost; smaller differences show in the \
             column of each XDP program's own cost under the flood."
        } else {
            "The run is invalid unless the calibration is slower than the floor in every round, by at least half \
             the slow-down its extra cost predicts: the rates below do not measure the balancers, and the targets on \
             them are not judged."
        }
    )?;
    let mut table = Table::new(&[
        "contender",
        "packets/s at the backends: median (min–max)",
        "× floor",
        "rampart ÷ this",
        "CPUs busy",
        "CPU ns per packet (all CPUs)",
        "XDP program's own ns per packet: median (min–max)",
        "where the packets went (whole run)",
    ]);
    let rp = cs.iter().position(|c| c.name == "rampart").context("rampart contender")?;
    for (k, c) in cs.iter().enumerate() {
        let busy: Vec<f64> =
            samples[k].iter().map(|s| s.busy.iter().sum::<f64>() / s.busy.len().max(1) as f64).collect();
        let cpu_ns: Vec<f64> = samples[k].iter().map(FloodSample::cpu_ns_per_packet).collect();
        let counts = c.sink.counts()?;
        let total: u64 = counts.iter().sum::<u64>().max(1);
        let pct = |n: u64| format!("{:.1} %", n as f64 * 100.0 / total as f64);
        let went = format!(
            "b1 {}, b2 {}, b3 {}, VIP {}, other {}",
            pct(counts[0]),
            pct(counts[1]),
            pct(counts[2]),
            pct(counts[3]),
            pct(counts[4])
        );
        table.row(vec![
            c.name.into(),
            spread(&pps[k], thousands),
            format!("{:.2}", median(paired(&pps[k], &pps[0]))),
            if k == rp { "-".into() } else { format!("{:.2}", median(paired(&pps[rp], &pps[k]))) },
            format!("{:.0}%", median(busy)),
            format!("{:.0}", median(cpu_ns)),
            if prog_ns[k].is_empty() { "-".into() } else { spread(&prog_ns[k], |x| format!("{x:.1}")) },
            went,
        ]);
    }
    out.push_str(&table.markdown());
    if let Some(p) = &cs[rp].rp {
        let svc = udp_service();
        let s = p.state.service(&svc)?;
        let mut packets = 0;
        for b in &s.backends {
            packets += p.lb.backend_counters(b.id)?.packets;
        }
        let new = p.new_flows(&svc)?;
        writeln!(
            out,
            "\nrampart's connection table over all its floods: {} packets balanced, {} of them new flows (misses: \
             {:.2} %; the flood has {} flows, the table {} entries).",
            thousands(packets as f64),
            thousands(new as f64),
            new as f64 * 100.0 / packets.max(1) as f64,
            thousands(FLOOD_FLOWS as f64),
            thousands(rampart_common::lb::DEFAULT_CONNTRACK_ENTRIES as f64)
        )?;
    }
    writeln!(
        out,
        "\nSetup: per contender a pair of namespaces joined by one veth ({queues} queues per end, so native XDP runs one \
         NAPI instance per CPU). The balancer's end receives the flood; the other end is the sender and the backends' \
         side of this one-arm link (the backends' addresses are on it, and the balancer has permanent neighbour entries \
         for them). On that end `xdp_sink` (native mode, the same for every contender) counts every frame by its \
         (outer) destination and drops it before the stack, so the backends' own work is no part of any figure; it also \
         gives XDP_TX on veth the program it needs on the peer. A contender's rate is the frames to the backends \
         (the floor's: the frames it bounced, which stay addressed to the VIP) over the interval, after 0.5 s of \
         flood not measured. \"× floor\" and \"rampart ÷ this\": medians of per-round ratios. \"CPU ns per packet\": \
         all CPUs' busy time over the packets counted (sending, the balancer, the sink together). \"XDP program's own \
         ns\": the kernel's run-time statistics of the balancer's program over each flood (BPF_ENABLE_STATS). The \
         flood's flows are unidirectional, so nftables cannot use a flowtable (it offloads only established, \
         two-way flows) and every packet takes its conntrack + NAT + forwarding path. When \"CPU ns per packet\" \
         is far above the programs' own cost (sending, veth copies and other load on a shared machine), the rates \
         are diluted towards 1×: the calibration above says how far apart two programs must be for the rates to \
         show it, and the programs' own ns tell them apart better than the rates do.\n\nWhat each contender does \
         per packet, and what was loaded:\n"
    )?;
    for c in &cs {
        writeln!(out, "- {}: {}. Loaded: {}", c.name, c.does, c.loaded)?;
    }
    writeln!(
        out,
        "\ntrafgen configuration (`--qdisc-path`, the destination MAC per contender):\n\n```\n{}```\n",
        flood_conf([2, 0, 0, 0, 0, 2])
    )?;
    Ok(FloodResult { names: cs.iter().map(|c| c.name).collect(), pps, valid })
}

// ---------------------------------------------------------------------------------------------
// Section 3: connections/s end to end. One place for the whole topology: a switch namespace
// with a bridge; client, balancer and three backends each on it by a veth.

const E2E_NET: &str = "10.78.0";
const E2E_VIP: &str = "10.78.100.1";
/// HAProxy's address, on the balancer's loopback (rampart's VIP stays rampart's service).
const E2E_VIP_HAPROXY: &str = "10.78.100.2";

fn e2e_lb() -> String {
    format!("{E2E_NET}.3")
}
fn e2e_backend(i: usize) -> String {
    format!("{E2E_NET}.{}", 11 + i)
}

/// The connections/s rig on `rampart_netlab`: a switch namespace with a bridge; client,
/// balancer and three backends each on it by a veth. The lab removes everything on drop (also on
/// failure and Ctrl-C): processes killed, `rampart detach` / `decap detach` run, namespaces
/// deleted.
struct E2e {
    net: Lab,
    rampart: PathBuf,
    dir: PathBuf,
    /// The XDP mode rampart and decap were attached in.
    mode: &'static str,
    haproxy_cfg: String,
    nginx_cfg: String,
}

impl E2e {
    fn ns(&self, name: &str) -> String {
        self.net.name(name)
    }

    fn rampart(&self, ns: &str, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.rampart).arg("-n").arg(self.ns(ns)).args(args).output()?;
        if !out.status.success() {
            bail!("rampart -n {} {}: {}", self.ns(ns), args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `rampart -n NS ARGS…` at teardown, before the namespace goes.
    fn undo(&mut self, ns: &str, args: &[&str]) {
        let mut cmd = Command::new(&self.rampart);
        cmd.arg("-n").arg(self.ns(ns)).args(args);
        self.net.on_teardown(cmd);
    }

    /// Namespace `name` on the bridge: `eth0` with `addr`/24, and the client-side sysctls a
    /// connection benchmark needs (wide port range, TIME_WAIT reuse, a deep accept queue).
    fn join(&mut self, name: &str, addr: &str) -> Result<Ns> {
        let ns = self.net.ns(name)?;
        let sw = Ns::named(self.ns("sw"));
        veth(sw.end(&format!("p-{name}")).master("br0"), ns.end("eth0").addr(&format!("{addr}/24")))?;
        for (k, v) in [
            ("net.ipv4.ip_local_port_range", "1024 65535"),
            ("net.ipv4.tcp_tw_reuse", "1"),
            ("net.core.somaxconn", "4096"),
        ] {
            ns.sysctl(k, v)?;
        }
        Ok(ns)
    }

    fn spawn(&mut self, ns: &Ns, args: &[&str], log: &str) -> Result<()> {
        let log = fs::File::create(self.dir.join(log))?;
        let mut cmd = ns.command(args[0]);
        cmd.args(&args[1..]).stdout(Stdio::null()).stderr(log);
        self.net.spawn(&mut cmd).with_context(|| format!("starting {}", args[0]))?;
        Ok(())
    }

    fn new(dir: &Path) -> Result<Self> {
        let cpus = thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let mut me = E2e {
            net: Lab::new("rlb")?,
            rampart: rampart_bin()?,
            dir: dir.to_path_buf(),
            // Generic (skb) mode, as lb_netns runs it: on this rig native XDP_TX towards a bridge
            // port (a veth whose end has no XDP program) did not reach the backends.
            mode: "skb",
            haproxy_cfg: String::new(),
            nginx_cfg: String::new(),
        };
        me.net.ns("sw")?.bridge("br0")?;
        let c = me.join("c", &format!("{E2E_NET}.2"))?;
        let lb = me.join("lb", &e2e_lb())?;
        for i in 0..3 {
            me.join(&format!("b{}", i + 1), &e2e_backend(i))?;
        }
        lb.sysctl("net.ipv4.ip_forward", "1")?;
        lb.addr("lo", &format!("{E2E_VIP_HAPROXY}/32"))?;
        for vip in [E2E_VIP, E2E_VIP_HAPROXY] {
            c.route(&format!("{vip}/32"), &e2e_lb())?;
        }
        // rampart on the balancer.
        me.rampart("lb", &["attach", "--iface", "eth0", "--mode", me.mode])?;
        me.undo("lb", &["detach", "--iface", "eth0"]);
        let svc = format!("{E2E_VIP}:80/tcp");
        me.rampart("lb", &["lb", "service", "add", &svc])?;
        // Backends: decap for the VIP, nginx answering a small body.
        me.nginx_cfg = format!(
            "worker_processes auto;\ndaemon off;\nmaster_process on;\nerror_log stderr error;\npid {{PID}};\n\
             events {{ worker_connections 16384; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {{TMP}};\n  proxy_temp_path {{TMP}};\n  \
             fastcgi_temp_path {{TMP}};\n  uwsgi_temp_path {{TMP}};\n  scgi_temp_path {{TMP}};\n  \
             server {{\n    listen 80 reuseport backlog=4096;\n    location / {{ return 200 \"{{NAME}}\\n\"; }}\n  }}\n}}\n"
        );
        for i in 0..3 {
            let name = format!("b{}", i + 1);
            let ns = Ns::named(me.ns(&name));
            me.rampart(&name, &["decap", "attach", "--iface", "eth0", "--vip", E2E_VIP, "--mode", me.mode])?;
            me.undo(&name, &["decap", "detach", "--iface", "eth0"]);
            let tmp = dir.join(format!("nginx-{name}"));
            fs::create_dir_all(&tmp)?;
            let cfg = me
                .nginx_cfg
                .replace("{PID}", tmp.join("pid").to_str().unwrap())
                .replace("{TMP}", tmp.to_str().unwrap())
                .replace("{NAME}", &name);
            let path = tmp.join("nginx.conf");
            fs::write(&path, cfg)?;
            me.spawn(
                &ns,
                &["nginx", "-c", path.to_str().unwrap(), "-p", tmp.to_str().unwrap()],
                &format!("nginx-{name}.log"),
            )?;
            me.rampart("lb", &["lb", "backend", "add", &svc, &e2e_backend(i)])?;
        }
        // HAProxy in the balancer's namespace, as its documentation sets up a plain TCP
        // balancer: one process, a thread per CPU, no logging; `option splice-auto` is left out
        // (responses of a few bytes: nothing to splice); `tcp-smart-connect` saves the lone ACK
        // of each server connection.
        let mut hp = format!(
            "global\n    nbthread {cpus}\n    maxconn 8000\n\ndefaults\n    mode tcp\n    option tcp-smart-connect\n    \
             timeout connect 5s\n    timeout client 30s\n    timeout server 30s\n    maxconn 8000\n\n\
             frontend fe\n    bind {E2E_VIP_HAPROXY}:80 backlog 4096\n    default_backend be\n\n\
             backend be\n    balance roundrobin\n"
        );
        for i in 0..3 {
            writeln!(hp, "    server b{} {}:80", i + 1, e2e_backend(i))?;
        }
        me.haproxy_cfg = hp;
        let hp_path = dir.join("haproxy.cfg");
        fs::write(&hp_path, &me.haproxy_cfg)?;
        sh("haproxy", &["-c", "-f", hp_path.to_str().unwrap()])?;
        me.spawn(&lb, &["haproxy", "-db", "-f", hp_path.to_str().unwrap()], "haproxy.log")?;
        me.wait_ready()?;
        Ok(me)
    }

    /// Waits until every backend answers directly, HAProxy answers, and the VIP answers through
    /// rampart, with a real HTTP exchange each.
    fn wait_ready(&self) -> Result<()> {
        let mut targets: Vec<String> = (0..3).map(e2e_backend).collect();
        targets.push(E2E_VIP_HAPROXY.into());
        targets.push(E2E_VIP.into());
        let c = self.ns("c");
        for t in targets {
            let deadline = Instant::now() + Duration::from_secs(20);
            let addr: SocketAddr = format!("{t}:80").parse()?;
            let ok = rampart_tests::netns::in_netns(&c, move || {
                while Instant::now() < deadline {
                    if let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
                        use std::io::{Read, Write};
                        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                        let mut body = String::new();
                        if s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").is_ok()
                            && s.read_to_string(&mut body).is_ok()
                            && body.starts_with("HTTP/1.1 200")
                        {
                            return true;
                        }
                    }
                    thread::sleep(Duration::from_millis(100));
                }
                false
            })?;
            if !ok {
                let logs: Vec<String> = ["haproxy.log", "nginx-b1.log"]
                    .iter()
                    .map(|l| format!("{l}: {}", fs::read_to_string(self.dir.join(l)).unwrap_or_default().trim()))
                    .collect();
                bail!("{t}:80 does not answer from the client's namespace ({})", logs.join("; "));
            }
            check_stop()?;
        }
        Ok(())
    }

    /// wrk from the client's namespace: (requests = connections per second, errors).
    fn wrk(&self, target: &str, seconds: u64, concurrency: u32) -> Result<(f64, u64)> {
        let threads = thread::available_parallelism().map(|n| n.get()).unwrap_or(1).to_string();
        let out = sh(
            "ip",
            &[
                "netns",
                "exec",
                &self.ns("c"),
                "wrk",
                "-t",
                &threads,
                "-c",
                &concurrency.to_string(),
                "-d",
                &format!("{seconds}s"),
                "--timeout",
                "5s",
                "-H",
                "Connection: close",
                &format!("http://{target}/"),
            ],
        )?;
        parse_wrk(&out).with_context(|| format!("wrk's output: {out}"))
    }
}

/// Requests/s and errors (socket errors of every kind, non-2xx answers) from wrk's summary.
fn parse_wrk(out: &str) -> Option<(f64, u64)> {
    let rate = out.lines().find_map(|l| l.trim().strip_prefix("Requests/sec:"))?.trim().parse().ok()?;
    let mut errors = 0;
    for l in out.lines() {
        let l = l.trim();
        if let Some(rest) = l.strip_prefix("Socket errors:") {
            errors += rest.split(',').filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok()).sum::<u64>();
        }
        if let Some(rest) = l.strip_prefix("Non-2xx or 3xx responses:") {
            errors += rest.trim().parse::<u64>().ok()?;
        }
    }
    Some((rate, errors))
}

struct ConnResult {
    rampart: Vec<f64>,
    haproxy: Vec<f64>,
}

fn conn_section(rounds: usize, seconds: u64, concurrency: u32, dir: &Path, out: &mut String) -> Result<ConnResult> {
    let e = E2e::new(dir)?;
    let names = ["rampart (XDP, DSR)", "HAProxy mode tcp"];
    let targets = [E2E_VIP, E2E_VIP_HAPROXY];
    let mut rate: Vec<Vec<f64>> = vec![Vec::new(); 2];
    let mut errors = [0u64; 2];
    // A short warm-up of each (page cache, nginx workers, ARP), not measured.
    for t in targets {
        e.wrk(t, 1, concurrency)?;
    }
    for round in 0..rounds {
        for k in rotation(2, round) {
            check_stop()?;
            let (r, err) = e.wrk(targets[k], seconds, concurrency)?;
            eprintln!("lb-bench: connections round {}/{rounds}: {}: {r:.0}/s, {err} errors", round + 1, names[k]);
            rate[k].push(r);
            errors[k] += err;
        }
    }
    let list = e.rampart("lb", &["lb", "list"])?;
    writeln!(
        out,
        "### Connections/s end to end ({rounds} rounds of {seconds} s per contender, order rotated each round; wrk, \
         {concurrency} connections at once, each a new TCP connection: connect, `GET /`, a 3-byte body, close)\n"
    )?;
    let mut table = Table::new(&[
        "path",
        "connections/s: median (min–max)",
        "÷ HAProxy (median of per-round ratios)",
        "errors (all rounds)",
    ]);
    for k in 0..2 {
        table.row(vec![
            names[k].into(),
            spread(&rate[k], thousands),
            if k == 0 { format!("{:.2}", median(paired(&rate[0], &rate[1]))) } else { "-".into() },
            errors[k].to_string(),
        ]);
    }
    out.push_str(&table.markdown());
    writeln!(
        out,
        "\nSetup: namespaces for a client, the balancer and three backends on one bridge (in a switch namespace). \
         Backends: nginx ({}), the same for both paths, answering `GET /` with a 3-byte body, configured as:\n\n```\n{}```\n\n\
         rampart: `rampart attach --iface eth0 --mode {}` and `rampart lb service add {E2E_VIP}:80/tcp` + three \
         `lb backend add` on the balancer; `rampart decap attach --iface eth0 --vip {E2E_VIP} --mode {}` on each backend, \
         which then answers the client directly (direct server return): per connection the balancer sees only the \
         client's packets, encapsulates them and sends them back out (XDP_TX). HAProxy ({}) in the balancer's \
         namespace on {E2E_VIP_HAPROXY} (on its loopback) terminates each connection and opens one to a backend: both \
         directions of both connections go through its sockets. rampart stays attached during HAProxy's turns, so \
         HAProxy's packets also pass through rampart's program as non-service traffic (tens of ns per packet). \
         HAProxy's configuration:\n\n```\n{}```\n\n`rampart lb list` after the run:\n\n```\n{}```\n",
        // nginx prints its version on stderr.
        Command::new("nginx").arg("-v").output().map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())?,
        e.nginx_cfg,
        e.mode,
        e.mode,
        sh("haproxy", &["-v"])?.lines().next().unwrap_or("").trim(),
        e.haproxy_cfg,
        list
    )?;
    ensure!(errors[0] == 0 && errors[1] == 0, "connection errors: rampart {}, HAProxy {}", errors[0], errors[1]);
    Ok(ConnResult { rampart: rate[0].clone(), haproxy: rate[1].clone() })
}

// ---------------------------------------------------------------------------------------------

fn target_line(out: &mut String, what: &str, ratios: &[f64], need: f64) -> Result<bool> {
    let m = median(ratios.to_vec());
    let pass = m >= need;
    writeln!(
        out,
        "- **{}** {what}: {m:.2}× (per round: {}; target ≥ {need}×)",
        if pass { "PASS" } else { "FAIL" },
        ratios.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>().join(", ")
    )?;
    Ok(pass)
}

fn main() -> Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("lb-bench needs root (BPF_PROG_TEST_RUN, XDP attach, network namespaces)");
    }
    let args = Args::parse();
    install_signal_flag();
    let q = args.quick;
    let rounds = args.rounds.unwrap_or(if q { 2 } else { 5 }).max(1);
    let frames = args.frames.unwrap_or(if q { 500 } else { 5_000 }).max(1);
    let repeat = args.repeat.unwrap_or(if q { 100_000 } else { 10_000_000 });
    let seconds = args.seconds.unwrap_or(if q { 1.0 } else { 3.0 });
    let conn_seconds = args.conn_seconds.unwrap_or(if q { 1 } else { 5 });
    let senders = args.senders.unwrap_or_else(|| thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    for s in &args.skip {
        ensure!(["testrun", "flood", "conn"].contains(&s.as_str()), "--skip {s}: not one of testrun, flood, conn");
    }
    let skip = |s: &str| args.skip.iter().any(|x| x == s);
    let dir: PathBuf = std::env::temp_dir().join(format!("lb-bench-{}", std::process::id()));
    fs::create_dir_all(&dir)?;
    let mut out = String::new();
    writeln!(
        out,
        "## lb: {}{}\n",
        rampart_tests::bench::machine(),
        if q { " (quick smoke run, figures not meaningful)" } else { "" }
    )?;
    let mut targets = String::from("### Targets (issue 12)\n\n");
    let mut flood_invalid = false;
    let r = (|| -> Result<bool> {
        let mut all = true;
        if !skip("testrun") {
            testrun_section(rounds, frames, repeat, &mut out)?;
        }
        if !skip("flood") {
            let f = flood_section(rounds, seconds, senders, &dir, &mut out)?;
            if !f.valid {
                writeln!(targets, "- **NOT JUDGED**: the flood's calibration failed (see the flood section)")?;
                flood_invalid = true;
            }
            let idx = |n: &str| f.names.iter().position(|x| *x == n).context("contender");
            let rp = &f.pps[idx("rampart")?];
            all &= target_line(
                &mut targets,
                "forwarding rate ≥ 0.8× the floor (xdp_minimal_tx)",
                &paired(rp, &f.pps[0]),
                0.8,
            )?;
            for n in ["nftables DNAT, jhash map", "nftables DNAT, numgen map"] {
                all &=
                    target_line(&mut targets, &format!("forwarding rate ≥ 4× {n}"), &paired(rp, &f.pps[idx(n)?]), 4.0)?;
            }
        }
        if !skip("conn") {
            let c = conn_section(rounds, conn_seconds, args.concurrency, &dir, &mut out)?;
            all &= target_line(&mut targets, "connections/s ≥ HAProxy's", &paired(&c.rampart, &c.haproxy), 1.0)?;
        }
        Ok(all)
    })();
    let _ = fs::remove_dir_all(&dir);
    out.push_str(&targets);
    println!("{out}");
    let all = r?;
    if flood_invalid && !q {
        bail!("the flood did not tell the calibration program from the floor: its rates are invalid");
    }
    if q {
        eprintln!("lb-bench: quick run: the rig works; figures and targets mean nothing");
    } else if !all {
        eprintln!("lb-bench: at least one target FAILED (see the report)");
    }
    Ok(())
}
