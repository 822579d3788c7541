//! `cargo xtask bench fw`: rampart's XDP firewall beside its peers, one run, same packets, the
//! contenders alternating within rounds (A B C, B C A, …) and every figure a median over the
//! rounds with its spread.
//!
//! 1. ns per packet (BPF_PROG_TEST_RUN through `bpftool prog run`, the same tool for every
//!    program): the minimal XDP program and the calibration program (minimal plus a fixed extra
//!    cost), rampart at 10 / 1,000 / 10,000 rules and with a 1,000,000-prefix set, xdp-filter at
//!    10 / 1,000 / 10,000 addresses, loaded with the smallest feature set that covers them
//!    (`-f ipv4`) and test-run through the program attached to its interface.
//! 2. packets per second a receiving veth processes under a trafgen flood from senders on every
//!    CPU: minimal, calibration, rampart, xdp-filter, nftables (netdev ingress: linear rules, and
//!    a named interval set), iptables (raw PREROUTING: linear rules, and an ipset `hash:net`),
//!    each with the 1,000-rule set and the flood packet matching its last rule. The flood counts
//!    only if it tells the calibration program from the minimal one; otherwise the report says
//!    the run is invalid and the binary fails.
//!
//! Everything runs in network namespaces this binary creates and removes (also on failure).

use std::{
    fmt::Write as _,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::Stdio,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf,
    maps::{PerCpuArray, PerCpuValues},
    programs::{Xdp, XdpMode},
};
use clap::Parser;
use rampart::{
    bpf::{CALIBRATION_OBJ, FIREWALL_OBJ, MINIMAL_OBJ},
    fw::{rules, tables::FwTables},
    netns::NetnsGuard,
};
use rampart_common::{Counter, fw::stat};
use rampart_netlab::{Ns, run};
use rampart_tests::{
    bench::{
        AttachedXdp, BpfStats, Flood, FloodSample, Table, XdpFilterNeeds, rampart_rules, rotation, rule_net,
        run_bpftool, sh, udp4_frame, xdp_filter_hits,
    },
    tls_bench::report::{median, min_max, thousands},
};

#[derive(Parser, Debug)]
#[command(name = "fw-bench", about = "rampart's XDP firewall beside xdp-filter, nftables and iptables, one run")]
struct Args {
    /// Smoke run: 2 rounds, 100,000 test-run repeats, 1 s floods (proves the rig works; the
    /// figures mean nothing).
    #[arg(long)]
    quick: bool,
    /// Only the flood section (the calibration's test-run cost is still measured).
    #[arg(long)]
    flood_only: bool,
    /// Rounds; the contenders' order rotates each round [default: 5; quick: 2].
    #[arg(long)]
    rounds: Option<usize>,
    /// BPF_PROG_TEST_RUN repeats per measurement [default: 10,000,000; quick: 100,000].
    #[arg(long)]
    repeat: Option<u32>,
    /// Seconds each flood measurement lasts [default: 3; quick: 1].
    #[arg(long)]
    seconds: Option<f64>,
    /// trafgen sender processes, one per CPU [default: every CPU].
    #[arg(long)]
    senders: Option<usize>,
}

const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

fn udp(src: [u8; 4]) -> Vec<u8> {
    udp4_frame(MAC_A, MAC_B, src, [198, 51, 100, 1], 40000, 9999)
}

const NO_MATCH: &str = "no match → default";
const LAST_RULE: &str = "last rule matches";

/// Frames: one no rule matches (default allow), one the last deny rule matches.
fn probes(last_src: [u8; 4]) -> [(&'static str, Vec<u8>); 2] {
    [(NO_MATCH, udp([192, 0, 2, 1])), (LAST_RULE, udp(last_src))]
}

/// The address xdp-filter is given for rule `i` (it matches whole addresses, not prefixes).
fn rule_addr(i: u32) -> [u8; 4] {
    let mut a = rule_net(i);
    a[3] = 1;
    a
}

/// xdp-filter's rule set for the rows: source addresses only, so `-f ipv4`.
const XF_NEEDS: XdpFilterNeeds =
    XdpFilterNeeds { ipv4: true, ipv6: false, tcp_ports: false, udp_ports: false, ethernet: false };

/// A deny rule over a 1,000,000-prefix set (distinct /32s spread over 11.0.0.0/8 … 26.0.0.0/8),
/// then three rules; the probe's source is in the set.
fn rampart_big_set(dir: &Path) -> Result<(String, [u8; 4])> {
    let mut f = std::io::BufWriter::new(fs::File::create(dir.join("big.txt"))?);
    let mut last = [0; 4];
    for i in 0..1_000_000u32 {
        let a = 11 + (i >> 16) as u8;
        last = [a, (i >> 8) as u8, i as u8, 1];
        writeln!(f, "{}.{}.{}.{}/32", last[0], last[1], last[2], last[3])?;
    }
    f.flush()?;
    let text = "default = \"allow\"\n[sets]\nbig = { file = \"big.txt\" }\n\
        [[rule]]\naction = \"allow\"\nproto = \"tcp\"\ndport = [80, 443]\n\
        [[rule]]\naction = \"allow\"\nproto = \"icmp\"\n\
        [[rule]]\naction = \"deny\"\nsrc = \"@big\"\n"
        .to_string();
    Ok((text, last))
}

/// rampart loaded with a rule set: its program id for `bpftool prog run`, or attached.
struct Rampart {
    ebpf: Ebpf,
    tables: FwTables,
}

impl Rampart {
    fn load(rule_text: &str, dir: &Path) -> Result<Self> {
        let path = dir.join("rules.toml");
        fs::write(&path, rule_text)?;
        let rs = rules::parse_file(&path)?;
        let mut ebpf = Ebpf::load(FIREWALL_OBJ)?;
        let prog: &mut Xdp = ebpf.program_mut(rampart_common::fw::PROGRAM_NAME).context("program")?.try_into()?;
        prog.load()?;
        let mut tables = FwTables::from_ebpf(&mut ebpf)?;
        tables.install(&rs)?;
        Ok(Self { ebpf, tables })
    }
    fn prog_id(&self) -> Result<u32> {
        let prog: &Xdp = self.ebpf.program(rampart_common::fw::PROGRAM_NAME).context("program")?.try_into()?;
        Ok(prog.info()?.id())
    }
    /// Which classification path the compiler chose for the live rule set, for the report.
    fn path(&self) -> Result<&'static str> {
        let info = self.tables.slot_info(self.tables.active_slot()?)?;
        Ok(if info.flags & rampart_common::fw::SLOT_KEYED != 0 {
            "keyed (one address lookup, then the class's few candidate rules)"
        } else {
            "general (a lookup per field, then the AND of bit vectors)"
        })
    }
    /// Attaches in native mode to `iface` in namespace `ns` (tables are already installed, so
    /// the first packet sees the whole rule set).
    fn attach(&mut self, ns: &str, iface: &str) -> Result<()> {
        let prog: &mut Xdp = self.ebpf.program_mut(rampart_common::fw::PROGRAM_NAME).context("program")?.try_into()?;
        let _g = NetnsGuard::enter(ns)?;
        prog.attach(iface, XdpMode::Driver)?;
        Ok(())
    }
    /// Packets the program gave a verdict.
    fn processed(&self) -> Result<u64> {
        let s = self.tables.stats()?;
        Ok(s[..=stat::LAST_VERDICT as usize].iter().map(|c: &Counter| c.packets).sum())
    }
}

/// The minimal program (parse, count, drop) or the calibration program (the same plus a fixed
/// extra cost); both count dropped packets in slot 0 of their per-CPU map.
struct Floor {
    ebpf: Ebpf,
    prog: &'static str,
    map: &'static str,
}

impl Floor {
    fn minimal() -> Result<Self> {
        Self::load(MINIMAL_OBJ, "xdp_minimal", "MINIMAL_COUNT")
    }
    fn calibration() -> Result<Self> {
        Self::load(CALIBRATION_OBJ, "xdp_calibration", "CALIBRATION_COUNT")
    }
    fn load(obj: &[u8], prog: &'static str, map: &'static str) -> Result<Self> {
        let mut ebpf = Ebpf::load(obj)?;
        let p: &mut Xdp = ebpf.program_mut(prog).context("program")?.try_into()?;
        p.load()?;
        Ok(Self { ebpf, prog, map })
    }
    fn prog_id(&self) -> Result<u32> {
        let prog: &Xdp = self.ebpf.program(self.prog).context("program")?.try_into()?;
        Ok(prog.info()?.id())
    }
    fn attach(&mut self, ns: &str, iface: &str) -> Result<()> {
        let prog: &mut Xdp = self.ebpf.program_mut(self.prog).context("program")?.try_into()?;
        let _g = NetnsGuard::enter(ns)?;
        prog.attach(iface, XdpMode::Driver)?;
        Ok(())
    }
    fn processed(&self) -> Result<u64> {
        let map: PerCpuArray<_, u64> = PerCpuArray::try_from(self.ebpf.map(self.map).context("map")?)?;
        let v: PerCpuValues<u64> = map.get(&0, 0)?;
        Ok(v.iter().sum())
    }
}

/// xdp-filter from Debian's xdp-tools, loaded on a veth in `ns` (entering only the network
/// namespace, so its pins stay in the root mount namespace's bpffs).
struct XdpFilter {
    ns: String,
    iface: String,
    /// What the kernel has attached to the interface.
    attached: AttachedXdp,
}

impl XdpFilter {
    /// Loads it with the features `needs` asks for, fills its address map, and checks that
    /// libxdp loaded the build those features select (a heavier build would flatter rampart).
    fn load(ns: &str, iface: &str, needs: XdpFilterNeeds, addrs: &[[u8; 4]]) -> Result<Self> {
        let mut load = Ns::named(ns).nsenter("xdp-filter");
        run(load.args(["load", "-m", "native", "-p", "allow", "-f", &needs.features(), iface]))?;
        // From here on Drop unloads it.
        let mut me = Self {
            ns: ns.into(),
            iface: iface.into(),
            attached: AttachedXdp { id: 0, name: String::new(), mode: "", components: Vec::new() },
        };
        me.attached = AttachedXdp::of(ns, iface)?;
        let (_, name) = me.attached.program("xdpfilt_")?;
        if name != needs.expected_program() {
            bail!(
                "xdp-filter -f {} loaded {name}, not {}: the comparison would not be fair",
                needs.features(),
                needs.expected_program()
            );
        }
        // One process per entry is slow (~ms each); bpftool batch writes straight to its map.
        let mut batch = String::new();
        for a in addrs {
            // xdp-filter's ipv4 map value: flags in the low bits (MAP_FLAG_SRC = 1), counter above.
            writeln!(batch, "map update pinned /sys/fs/bpf/xdp-filter/filter_ipv4 key {} {} {} {} value 1 0 0 0 0 0 0 0", a[0], a[1], a[2], a[3])?;
        }
        if !batch.is_empty() {
            let f = std::env::temp_dir().join(format!("fw-bench-xf-{}.batch", std::process::id()));
            fs::write(&f, batch)?;
            let r = sh("bpftool", &["batch", "file", f.to_str().unwrap()]);
            let _ = fs::remove_file(&f);
            r?;
        }
        Ok(me)
    }
    /// The program to test-run: found through the interface, never by name among all loaded.
    fn prog_id(&self) -> Result<u32> {
        Ok(self.attached.program("xdpfilt_")?.0)
    }
}

impl Drop for XdpFilter {
    fn drop(&mut self) {
        let ns = Ns::named(&self.ns);
        let _ = run(ns.nsenter("xdp-filter").args(["unload", &self.iface, "--all"]));
        let _ = run(ns.nsenter("xdp-filter").args(["unload", &self.iface]));
        let _ = fs::remove_dir_all("/sys/fs/bpf/xdp-filter");
        // libxdp's own directory, left empty after an unload (remove_dir leaves it if not).
        let _ = fs::remove_dir("/sys/fs/bpf/xdp");
    }
}

/// One test-run measurement slot: a program on a probe frame.
struct Item {
    program: &'static str,
    rules: String,
    probe: &'static str,
    id: u32,
    frame: Vec<u8>,
}

/// ns per packet of every item, one measurement per item per round, the items' order rotated
/// each round (all of a group are loaded together, so the rotation covers them all).
fn run_group(items: &[Item], rounds: usize, repeat: u32) -> Result<Vec<Vec<f64>>> {
    let mut ns = vec![Vec::with_capacity(rounds); items.len()];
    for round in 0..rounds {
        for i in rotation(items.len(), round) {
            ns[i].push(run_bpftool(items[i].id, &items[i].frame, repeat)?);
        }
    }
    Ok(ns)
}

/// "median (min–max)".
fn spread(v: &[f64], fmt: impl Fn(f64) -> String) -> String {
    let (lo, hi) = min_max(v);
    format!("{} ({}–{})", fmt(median(v.to_vec())), fmt(lo), fmt(hi))
}

/// Per-round ratios a[i] / b[i].
fn paired(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x / y).filter(|r| r.is_finite()).collect()
}

/// The test-run section's results that the flood section needs.
struct Floors {
    minimal_ns: f64,
    calibration_ns: f64,
}

/// The minimal and calibration programs alone, alternating: the calibration's extra cost.
fn floor_group(rounds: usize, repeat: u32) -> Result<(Vec<Item>, Vec<Vec<f64>>)> {
    let (minimal, calibration) = (Floor::minimal()?, Floor::calibration()?);
    let frame = udp([192, 0, 2, 1]);
    let items = vec![
        Item {
            program: "minimal XDP_DROP",
            rules: "-".into(),
            probe: "udp",
            id: minimal.prog_id()?,
            frame: frame.clone(),
        },
        Item {
            program: "calibration (minimal + fixed extra work)",
            rules: "-".into(),
            probe: "udp",
            id: calibration.prog_id()?,
            frame,
        },
    ];
    let ns = run_group(&items, rounds, repeat)?;
    Ok((items, ns))
}

fn testrun_section(dir: &Path, rounds: usize, repeat: u32, out: &mut String) -> Result<Floors> {
    let mut table = Table::new(&[
        "program",
        "rules",
        "probe",
        "ns/packet: median (min–max)",
        "× minimal",
        "rampart ÷ xdp-filter: median (min–max)",
    ]);
    let mut loaded = Vec::new();
    // Each row: the items measured together, their ns per round, and which item is the
    // minimal program of the group.
    let (floor_items, floor_ns) = floor_group(rounds, repeat)?;
    let floors = Floors { minimal_ns: median(floor_ns[0].clone()), calibration_ns: median(floor_ns[1].clone()) };
    for (it, ns) in floor_items.iter().zip(&floor_ns) {
        table.row(vec![
            it.program.into(),
            it.rules.clone(),
            it.probe.into(),
            spread(ns, |x| format!("{x:.1}")),
            format!("{:.2}", median(paired(ns, &floor_ns[0]))),
            String::new(),
        ]);
    }

    let minimal = Floor::minimal()?;
    let min_item = |rules: &str| -> Result<Item> {
        Ok(Item {
            program: "minimal XDP_DROP",
            rules: rules.into(),
            probe: "udp",
            id: minimal.prog_id()?,
            frame: udp([192, 0, 2, 1]),
        })
    };
    // xdp-filter needs an interface: a throwaway pair of namespaces joined by a veth.
    let net = Flood::new("xf")?;
    let mut paths = Vec::new();
    for n in [10u32, 1_000, 10_000] {
        let addrs: Vec<[u8; 4]> = (0..n).map(rule_addr).collect();
        let last = rule_addr(n - 1);
        let xf = XdpFilter::load(&net.rx_ns, &net.rx_if, XF_NEEDS, &addrs)?;
        loaded.push(format!("{} addresses: `xdp-filter load -m native -p allow -f {}` → {}", thousands(n as f64), XF_NEEDS.features(), xf.attached.describe()));
        let rp = Rampart::load(&rampart_rules(n), dir)?;
        paths.push(format!("{} rules: {}", thousands(n as f64), rp.path()?));
        let mut items = vec![min_item(&format!("- (in the {} group)", thousands(n as f64)))?];
        for (probe, frame) in probes(last) {
            items.push(Item { program: "xdp-filter", rules: format!("{} addresses", thousands(n as f64)), probe, id: xf.prog_id()?, frame });
        }
        for (probe, frame) in probes(last) {
            items.push(Item { program: "rampart", rules: format!("{} rules", thousands(n as f64)), probe, id: rp.prog_id()?, frame });
        }
        let ns = run_group(&items, rounds, repeat)?;
        for (k, (it, v)) in items.iter().zip(&ns).enumerate() {
            // Items 1, 2: xdp-filter's probes; 3, 4: rampart's, in the same probe order.
            let vs_xf = if k >= 3 {
                let r = paired(v, &ns[k - 2]);
                spread(&r, |x| format!("{x:.2}×"))
            } else {
                String::new()
            };
            let vs_min = if k == 0 { "1.00".into() } else { format!("{:.2}", median(paired(v, &ns[0]))) };
            table.row(vec![it.program.into(), it.rules.clone(), it.probe.into(), spread(v, |x| format!("{x:.1}")), vs_min, vs_xf]);
        }
        drop(xf);
    }
    drop(net);

    let (text, last) = rampart_big_set(dir)?;
    let t0 = Instant::now();
    let rp = Rampart::load(&text, dir)?;
    let load_s = t0.elapsed().as_secs_f64();
    paths.push(format!("3 rules + 1,000,000-prefix set: {}", rp.path()?));
    let mut items = vec![min_item("- (in the set group)")?];
    for (probe, frame) in probes(last) {
        items.push(Item {
            program: "rampart",
            rules: "3 rules + 1,000,000-prefix set".into(),
            probe,
            id: rp.prog_id()?,
            frame,
        });
    }
    let ns = run_group(&items, rounds, repeat)?;
    for (it, v) in items.iter().zip(&ns).skip(1) {
        table.row(vec![
            it.program.into(),
            it.rules.clone(),
            it.probe.into(),
            spread(v, |x| format!("{x:.1}")),
            format!("{:.2}", median(paired(v, &ns[0]))),
            String::new(),
        ]);
    }

    writeln!(
        out,
        "### ns per packet (BPF_PROG_TEST_RUN via `bpftool prog run`, repeat {}, {rounds} rounds)\n",
        thousands(repeat as f64)
    )?;
    writeln!(
        out,
        "Each group of rows was loaded together and measured in {rounds} rounds, the programs' order rotated each \
         round; figures are medians over the rounds with their range. \"× minimal\" and \"rampart ÷ xdp-filter\" are \
         medians of each round's ratio between programs measured in the same round.\n"
    )?;
    out.push_str(&table.markdown());
    writeln!(
        out,
        "\nWhat xdp-filter loaded (found through the interface: `ip -d link show`, and `xdp-loader status` for libxdp's dispatcher):\n"
    )?;
    for l in &loaded {
        writeln!(out, "- {l}")?;
    }
    writeln!(
        out,
        "\nrampart: `{}` loaded with its tables filled, test-run by its id. The path its compiler chose \
         from each rule set's shape: {}.",
        rampart_common::fw::PROGRAM_NAME,
        paths.join("; ")
    )?;
    writeln!(out, "\nLoading the 1,000,000-prefix rule set (parse + compile + map writes) took {load_s:.1} s.\n")?;
    Ok(floors)
}

const FLOOD_RULES: u32 = 1_000;

/// One receiver of the flood: its own pair of namespaces, what it runs, and how to read how
/// many packets it processed. `count` owns what was loaded and is dropped before `net`.
struct Receiver {
    name: String,
    rules: String,
    loaded: String,
    /// The XDP program that processes the flood (for its run-time statistics).
    prog: Option<u32>,
    count: Box<dyn FnMut() -> Result<u64>>,
    /// What must stay loaded besides what `count` holds (xdp-filter, unloaded on drop).
    _guard: Option<XdpFilter>,
    net: Flood,
}

fn nft_count(ns: &str) -> Result<u64> {
    let o = Ns::named(ns).run("nft", &["-j", "list", "table", "netdev", "rbench"])?;
    rampart_tests::bench::nft_counter_packets(&o)
}

fn ipt_count(ns: &str) -> Result<u64> {
    let o = Ns::named(ns).run("iptables", &["-t", "raw", "-L", "PREROUTING", "-v", "-x", "-n"])?;
    rampart_tests::bench::iptables_packets(&o)
}

fn run_stdin(ns: &str, cmd: &[&str], input: &[u8]) -> Result<()> {
    let mut child = Ns::named(ns)
        .command(cmd[0])
        .args(&cmd[1..])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", cmd[0]))?;
    child.stdin.take().context("stdin")?.write_all(input)?;
    let o = child.wait_with_output()?;
    if !o.status.success() {
        bail!("{} failed: {}", cmd.join(" "), String::from_utf8_lossy(&o.stderr).trim());
    }
    Ok(())
}

fn receivers(dir: &Path) -> Result<Vec<Receiver>> {
    let mut v = Vec::new();
    let n = FLOOD_RULES;
    let nets: Vec<String> = (0..n)
        .map(|i| {
            let [a, b, c, _] = rule_net(i);
            format!("{a}.{b}.{c}.0/24")
        })
        .collect();
    let xdp = |net: &Flood| AttachedXdp::of(&net.rx_ns, &net.rx_if).map(|a| (a.describe(), Some(a.id)));

    for calibration in [false, true] {
        let net = Flood::new(if calibration { "cal" } else { "min" })?;
        let mut f = if calibration { Floor::calibration()? } else { Floor::minimal()? };
        f.attach(&net.rx_ns, &net.rx_if)?;
        let name = if calibration { "calibration (minimal + fixed extra work)" } else { "minimal XDP_DROP" };
        let (loaded, prog) = xdp(&net)?;
        v.push(Receiver {
            name: name.into(),
            rules: "-".into(),
            loaded,
            prog,
            count: Box::new(move || f.processed()),
            _guard: None,
            net,
        });
    }
    {
        let net = Flood::new("rp")?;
        let mut rp = Rampart::load(&rampart_rules(n), dir)?;
        rp.attach(&net.rx_ns, &net.rx_if)?;
        let (loaded, prog) = xdp(&net)?;
        v.push(Receiver {
            name: "rampart".into(),
            rules: format!("{} CIDR rules", thousands(n as f64)),
            loaded,
            prog,
            count: Box::new(move || rp.processed()),
            _guard: None,
            net,
        });
    }
    {
        let net = Flood::new("xf")?;
        let addrs: Vec<[u8; 4]> = (0..n).map(rule_addr).collect();
        let xf = XdpFilter::load(&net.rx_ns, &net.rx_if, XF_NEEDS, &addrs)?;
        let loaded =
            format!("`xdp-filter load -m native -p allow -f {}` → {}", XF_NEEDS.features(), xf.attached.describe());
        // Its own per-entry hit counter: the flood packet's source is the last address.
        let last = rule_addr(n - 1);
        v.push(Receiver {
            name: "xdp-filter".into(),
            rules: format!("{} addresses", thousands(n as f64)),
            loaded,
            prog: Some(xf.prog_id()?),
            count: Box::new(move || xdp_filter_hits(last)),
            _guard: Some(xf),
            net,
        });
    }
    {
        let net = Flood::new("nft")?;
        let mut script = format!("table netdev rbench {{\n chain ingress {{ type filter hook ingress device \"{}\" priority -500; policy accept;\n", net.rx_if);
        for (i, p) in nets.iter().enumerate() {
            let counter = if i + 1 == nets.len() { "counter " } else { "" };
            writeln!(script, "  ip saddr {p} {counter}drop")?;
        }
        script.push_str(" }\n}\n");
        run_stdin(&net.rx_ns, &["nft", "-f", "-"], script.as_bytes())?;
        let ns = net.rx_ns.clone();
        v.push(Receiver {
            name: "nftables, linear rules".into(),
            prog: None,
            rules: format!("{} rules", thousands(n as f64)),
            loaded: format!("table netdev, ingress chain at priority -500, {} rules `ip saddr A.B.C.0/24 drop` (the last with a counter)", thousands(n as f64)),
            count: Box::new(move || nft_count(&ns)),
            _guard: None,
            net,
        });
    }
    {
        let net = Flood::new("nfs")?;
        let script = format!(
            "table netdev rbench {{\n set blocked {{ type ipv4_addr; flags interval; elements = {{ {} }} }}\n \
             chain ingress {{ type filter hook ingress device \"{}\" priority -500; policy accept;\n  ip saddr @blocked counter drop\n }}\n}}\n",
            nets.join(", "),
            net.rx_if
        );
        run_stdin(&net.rx_ns, &["nft", "-f", "-"], script.as_bytes())?;
        let ns = net.rx_ns.clone();
        v.push(Receiver {
            name: "nftables, named interval set".into(),
            prog: None,
            rules: format!("1 rule, set of {} prefixes", thousands(n as f64)),
            loaded: format!("table netdev, ingress chain at priority -500, `set blocked {{ type ipv4_addr; flags interval }}` of {} /24s, one rule `ip saddr @blocked counter drop`", thousands(n as f64)),
            count: Box::new(move || nft_count(&ns)),
            _guard: None,
            net,
        });
    }
    {
        let net = Flood::new("ipt")?;
        let mut rules = String::from("*raw\n:PREROUTING ACCEPT [0:0]\n");
        for p in &nets {
            writeln!(rules, "-A PREROUTING -s {p} -j DROP")?;
        }
        rules.push_str("COMMIT\n");
        run_stdin(&net.rx_ns, &["iptables-restore"], rules.as_bytes())?;
        let ns = net.rx_ns.clone();
        v.push(Receiver {
            name: "iptables, linear rules".into(),
            prog: None,
            rules: format!("{} rules", thousands(n as f64)),
            loaded: format!(
                "raw table, PREROUTING, {} rules `-s A.B.C.0/24 -j DROP` ({})",
                thousands(n as f64),
                sh("iptables", &["-V"])?.trim()
            ),
            count: Box::new(move || ipt_count(&ns)),
            _guard: None,
            net,
        });
    }
    {
        let net = Flood::new("ips")?;
        let mut set = String::from("create rbench-blocked hash:net family inet maxelem 65536\n");
        for p in &nets {
            writeln!(set, "add rbench-blocked {p}")?;
        }
        // ipset's sets belong to the network namespace, so this one goes with the namespace.
        run_stdin(&net.rx_ns, &["ipset", "restore"], set.as_bytes())?;
        let rules =
            "*raw\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -m set --match-set rbench-blocked src -j DROP\nCOMMIT\n";
        run_stdin(&net.rx_ns, &["iptables-restore"], rules.as_bytes())?;
        let ns = net.rx_ns.clone();
        v.push(Receiver {
            name: "iptables + ipset hash:net".into(),
            prog: None,
            rules: format!("1 rule, set of {} prefixes", thousands(n as f64)),
            loaded: format!("`ipset create rbench-blocked hash:net` of {} /24s, raw PREROUTING `-m set --match-set rbench-blocked src -j DROP` ({})", thousands(n as f64), sh("ipset", &["--version"])?.trim()),
            count: Box::new(move || ipt_count(&ns)),
            _guard: None,
            net,
        });
    }
    Ok(v)
}

/// The flood section. Returns whether it was valid (the calibration measured slower).
fn flood_section(
    dir: &Path,
    floors: &Floors,
    rounds: usize,
    seconds: f64,
    senders: usize,
    out: &mut String,
) -> Result<bool> {
    let mut last = rule_net(FLOOD_RULES - 1);
    last[3] = 1;
    let frame = udp(last);
    let mut rx = receivers(dir)?;
    let stats = BpfStats::enable()?;
    let mut samples: Vec<Vec<FloodSample>> = vec![Vec::new(); rx.len()];
    // Per XDP receiver and round: the program's own ns per run over the flood.
    let mut prog_ns: Vec<Vec<f64>> = vec![Vec::new(); rx.len()];
    for round in 0..rounds {
        for i in rotation(rx.len(), round) {
            let r = &mut rx[i];
            let (s, ns) = stats.during(r.prog, || {
                r.net.measure(&frame, seconds, senders, &mut r.count).with_context(|| format!("flooding {}", r.name))
            })?;
            prog_ns[i].extend(ns);
            eprintln!("fw-bench: round {}/{rounds}: {}: {:.0} packets/s", round + 1, r.name, s.pps);
            samples[i].push(s);
        }
    }
    drop(stats);
    let pps: Vec<Vec<f64>> = samples.iter().map(|v| v.iter().map(|s| s.pps).collect()).collect();
    let (min_pps, cal_pps) = (&pps[0], &pps[1]);

    let mut table = Table::new(&[
        "receiver",
        "rules",
        "packets/s: median (min–max)",
        "× minimal",
        "CPUs busy",
        "CPU ns per packet (all CPUs)",
        "XDP program's own ns per packet in the flood: median (min–max)",
        "× xdp-filter's",
    ]);
    let xf_prog_ns = rx.iter().position(|r| r.name == "xdp-filter").map(|k| prog_ns[k].clone()).unwrap_or_default();
    for (k, r) in rx.iter().enumerate() {
        let busy: Vec<f64> =
            samples[k].iter().map(|s| s.busy.iter().sum::<f64>() / s.busy.len().max(1) as f64).collect();
        let cpu_ns: Vec<f64> = samples[k].iter().map(FloodSample::cpu_ns_per_packet).collect();
        table.row(vec![
            r.name.clone(),
            r.rules.clone(),
            spread(&pps[k], thousands),
            format!("{:.2}", median(paired(&pps[k], min_pps))),
            format!("{:.0}%", median(busy)),
            format!("{:.0}", median(cpu_ns)),
            if prog_ns[k].is_empty() { "-".into() } else { spread(&prog_ns[k], |x| format!("{x:.1}")) },
            if prog_ns[k].is_empty() || xf_prog_ns.is_empty() {
                String::new()
            } else {
                format!("{:.2}", median(paired(&prog_ns[k], &xf_prog_ns)))
            },
        ]);
    }

    // The calibration: its extra cost per packet is known from the test run; with every CPU
    // busy, each packet's whole CPU cost bounds the rate, so that extra cost must show.
    let extra_ns = floors.calibration_ns - floors.minimal_ns;
    let min_cpu_ns = median(samples[0].iter().map(FloodSample::cpu_ns_per_packet).collect());
    let expected = if min_cpu_ns > 0.0 { min_cpu_ns / (min_cpu_ns + extra_ns) } else { 1.0 };
    let ratios = paired(cal_pps, min_pps);
    let measured = median(ratios.clone());
    let slower_every_round = ratios.iter().all(|&r| r < 1.0);
    // Half the slow-down the extra cost predicts must show, and in every round.
    let valid = slower_every_round && measured <= 1.0 - (1.0 - expected) / 2.0;

    writeln!(
        out,
        "### Flood: packets/s the receiving veth processed ({rounds} rounds of {seconds} s per receiver, order rotated each round; \
         trafgen on {senders} CPU(s); the flood packet matches the last rule)\n"
    )?;
    writeln!(
        out,
        "**Calibration: {}.** The calibration program costs {extra_ns:.1} ns more per packet than the minimal one \
         (test run: {:.1} against {:.1} ns). With the minimal program the machine spent {min_cpu_ns:.0} ns of CPU per \
         packet, so a saturated receiver should run the calibration at {expected:.2}× the minimal program's rate; \
         measured {measured:.2}× (per round: {}). {}\n",
        if valid {
            "valid run, the flood tells the calibration program from the minimal one"
        } else {
            "INVALID RUN: the flood does not tell the programs apart"
        },
        floors.calibration_ns,
        floors.minimal_ns,
        ratios.iter().map(|r| format!("{r:.2}×")).collect::<Vec<_>>().join(", "),
        if valid {
            "The rates tell receivers apart to about the calibration's extra cost; smaller differences show in the \
             last columns, each XDP program's own cost under the flood."
        } else {
            "The run is invalid unless the calibration is slower than the minimal program in every round, by at least \
             half the slow-down its extra cost predicts: the rates below do not measure the receivers."
        }
    )?;
    out.push_str(&table.markdown());
    writeln!(
        out,
        "\n\"× minimal\": median of each round's ratio to the minimal program's rate. \"CPUs busy\": the mean over all \
         CPUs (/proc/stat), median over the rounds; \"CPU ns per packet\": all CPUs' busy time over the packets the \
         receiver processed (sending, the stack and the receiver together). \"XDP program's own ns per packet\": the \
         kernel's run-time statistics of the receiving program (BPF_ENABLE_STATS: run time ÷ runs over each flood, \
         which adds two clock reads per run to every program alike), so the receiver's own cost under real traffic, \
         undiluted by the sender's; \"× xdp-filter's\": median of the rounds' ratios.\n\nWhat each receiver ran:\n"
    )?;
    for r in &rx {
        writeln!(out, "- {}: {}", r.name, r.loaded)?;
    }
    writeln!(out)?;
    Ok(valid)
}

fn main() -> Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("fw-bench needs root (BPF_PROG_TEST_RUN, XDP attach, network namespaces)");
    }
    let args = Args::parse();
    let q = args.quick;
    let rounds = args.rounds.unwrap_or(if q { 2 } else { 5 }).max(1);
    let repeat = args.repeat.unwrap_or(if q { 100_000 } else { 10_000_000 });
    let seconds = args.seconds.unwrap_or(if q { 1.0 } else { 3.0 });
    let senders = args.senders.unwrap_or_else(|| thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    let dir: PathBuf = std::env::temp_dir().join(format!("fw-bench-{}", std::process::id()));
    fs::create_dir_all(&dir)?;
    let mut out = String::new();
    writeln!(
        out,
        "## fw: {}{}\n",
        rampart_tests::bench::machine(),
        if q { " (quick smoke run, figures not meaningful)" } else { "" }
    )?;
    let r = (|| {
        let floors = if args.flood_only {
            let (_, ns) = floor_group(rounds, repeat)?;
            Floors { minimal_ns: median(ns[0].clone()), calibration_ns: median(ns[1].clone()) }
        } else {
            testrun_section(&dir, rounds, repeat, &mut out)?
        };
        thread::sleep(Duration::from_millis(200));
        flood_section(&dir, &floors, rounds, seconds, senders, &mut out)
    })();
    let _ = fs::remove_dir_all(&dir);
    println!("{out}");
    if !r? {
        bail!("the flood did not tell the calibration program from the minimal one: the run is invalid");
    }
    Ok(())
}
