//! `cargo xtask bench fw`: rampart's XDP firewall beside its peers, one run, same packets.
//!
//! 1. ns per packet (BPF_PROG_TEST_RUN through `bpftool prog run`, the same tool for every
//!    program): the minimal XDP program, rampart at 10 / 1,000 / 10,000 rules and with a
//!    1,000,000-prefix set, xdp-filter at 10 / 1,000 / 10,000 addresses.
//! 2. packets per second a receiving veth processes under a trafgen flood: minimal program,
//!    rampart, xdp-filter, nftables (netdev ingress), iptables (raw PREROUTING), each with the
//!    1,000-rule set and the flood packet matching its last rule.
//!
//! Everything runs in network namespaces this binary creates and removes (also on failure).

use std::{
    fmt::Write as _,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf,
    maps::{PerCpuArray, PerCpuValues},
    programs::{Xdp, XdpMode},
};
use rampart::{
    bpf::{FIREWALL_OBJ, MINIMAL_OBJ},
    fw::{rules, tables::FwTables},
    netns::NetnsGuard,
};
use rampart_common::{Counter, fw::stat};
use rampart_tests::bench::{Flood, Table, run_bpftool, sh, udp4_frame, xdp_filter_hits};

const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

fn udp(src: [u8; 4]) -> Vec<u8> {
    udp4_frame(MAC_A, MAC_B, src, [198, 51, 100, 1], 40000, 9999)
}

/// Frames: one no rule matches (default allow), one the last deny rule matches.
struct Probe {
    name: &'static str,
    frame: Vec<u8>,
}

fn probes(last_src: [u8; 4]) -> Vec<Probe> {
    vec![
        Probe {
            name: "no match → default",
            frame: udp([192, 0, 2, 1]),
        },
        Probe {
            name: "last rule matches",
            frame: udp(last_src),
        },
    ]
}

/// The source prefix of deny rule `i`: 10.a.b.0/24, a different /24 per rule.
fn rule_net(i: u32) -> [u8; 4] {
    [10, (i >> 8) as u8, (i & 0xff) as u8, 0]
}

/// A rule file of `n` rules rampart's way: CIDRs, port ranges and order that xdp-filter cannot
/// express. Every fourth rule is an allow with a TCP port range, the others deny a /24.
fn rampart_rules(n: u32) -> String {
    let mut s = String::from("default = \"allow\"\n");
    for i in 0..n {
        let [a, b, c, d] = rule_net(i);
        if i % 4 == 3 && i + 1 != n {
            let lo = 1000 + (i % 50_000) as u16;
            writeln!(s, "[[rule]]\naction = \"allow\"\nproto = \"tcp\"\nsrc = \"{a}.{b}.{c}.{d}/24\"\ndport = \"{lo}-{}\"", lo + 10).unwrap();
        } else {
            writeln!(s, "[[rule]]\naction = \"deny\"\nsrc = \"{a}.{b}.{c}.{d}/24\"").unwrap();
        }
    }
    s
}

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

/// rampart loaded (not attached) with a rule set: its program id for `bpftool prog run`.
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

/// The minimal program: parse, count, drop.
struct Minimal {
    ebpf: Ebpf,
}

impl Minimal {
    fn load() -> Result<Self> {
        let mut ebpf = Ebpf::load(MINIMAL_OBJ)?;
        let prog: &mut Xdp = ebpf.program_mut("xdp_minimal").context("program")?.try_into()?;
        prog.load()?;
        Ok(Self { ebpf })
    }
    fn prog_id(&self) -> Result<u32> {
        let prog: &Xdp = self.ebpf.program("xdp_minimal").context("program")?.try_into()?;
        Ok(prog.info()?.id())
    }
    fn attach(&mut self, iface: &str) -> Result<()> {
        let prog: &mut Xdp = self.ebpf.program_mut("xdp_minimal").context("program")?.try_into()?;
        prog.attach(iface, XdpMode::Driver)?;
        Ok(())
    }
    fn processed(&self) -> Result<u64> {
        let map: PerCpuArray<_, u64> = PerCpuArray::try_from(self.ebpf.map("MINIMAL_COUNT").context("map")?)?;
        let v: PerCpuValues<u64> = map.get(&0, 0)?;
        Ok(v.iter().sum())
    }
}

/// xdp-filter from Debian's xdp-tools, loaded on a veth in `ns` (entering only the network
/// namespace, so its pins stay in the root mount namespace's bpffs).
struct XdpFilter {
    ns: String,
    iface: String,
}

impl XdpFilter {
    fn load(ns: &str, iface: &str, addrs: &[[u8; 4]], port: Option<u16>) -> Result<Self> {
        let me = Self { ns: ns.into(), iface: iface.into() };
        me.run(&["load", "-m", "native", "-p", "allow", "-f", "ipv4,udp,tcp", iface])?;
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
        if let Some(p) = port {
            me.run(&["port", "-m", "dst", "-p", "udp", &p.to_string()])?;
        }
        Ok(me)
    }
    fn run(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["--net=/run/netns/".to_string() + &self.ns, "xdp-filter".into()];
        full.extend(args.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = full.iter().map(|s| s.as_str()).collect();
        sh("nsenter", &refs)
    }
    fn prog_id(&self) -> Result<u32> {
        let out = sh("bpftool", &["prog", "show", "-j"])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        v.as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"].as_str().is_some_and(|n| n.starts_with("xdpfilt_")))
            .and_then(|p| p["id"].as_u64())
            .map(|id| id as u32)
            .context("xdp-filter's program not found in `bpftool prog show`")
    }
}

impl Drop for XdpFilter {
    fn drop(&mut self) {
        let _ = self.run(&["unload", &self.iface.clone(), "--all"]);
        let _ = self.run(&["unload", &self.iface.clone()]);
        let _ = fs::remove_dir_all("/sys/fs/bpf/xdp-filter");
    }
}

fn testrun_section(dir: &Path, repeat: u32, out: &mut String) -> Result<()> {
    let mut table = Table::new(&["program", "rules", "probe", "ns/packet", "× minimal", "× xdp-filter"]);
    let minimal = Minimal::load()?;
    let min_probe = udp([192, 0, 2, 1]);
    let min_ns = run_bpftool(minimal.prog_id()?, &min_probe, repeat)?;
    table.row(vec!["minimal XDP_DROP".into(), "-".into(), "udp".into(), format!("{min_ns:.1}"), "1.00".into(), String::new()]);

    // xdp-filter needs an interface: a throwaway namespace with a dummy-free veth pair.
    let net = Flood::new("xf")?;
    let mut xf_ns = Vec::new();
    for n in [10u32, 1_000, 10_000] {
        let addrs: Vec<[u8; 4]> = (0..n).map(|i| { let mut a = rule_net(i); a[3] = 1; a }).collect();
        let last = *addrs.last().unwrap();
        let xf = XdpFilter::load(&net.rx_ns, &net.rx_if, &addrs, None)?;
        let id = xf.prog_id()?;
        let mut per = Vec::new();
        for p in probes(last) {
            let ns = run_bpftool(id, &p.frame, repeat)?;
            per.push(ns);
            table.row(vec!["xdp-filter".into(), format!("{n} addresses"), p.name.into(), format!("{ns:.1}"), format!("{:.2}", ns / min_ns), "1.00".into()]);
        }
        xf_ns.push(per);
        drop(xf);
    }
    drop(net);

    for (k, n) in [10u32, 1_000, 10_000].into_iter().enumerate() {
        let mut last = rule_net(n - 1);
        last[3] = 1;
        let rp = Rampart::load(&rampart_rules(n), dir)?;
        let id = rp.prog_id()?;
        for (j, p) in probes(last).into_iter().enumerate() {
            let ns = run_bpftool(id, &p.frame, repeat)?;
            table.row(vec!["rampart".into(), format!("{n} rules"), p.name.into(), format!("{ns:.1}"), format!("{:.2}", ns / min_ns), format!("{:.2}", ns / xf_ns[k][j])]);
        }
    }
    let (text, last) = rampart_big_set(dir)?;
    let t0 = Instant::now();
    let rp = Rampart::load(&text, dir)?;
    let load_s = t0.elapsed().as_secs_f64();
    let id = rp.prog_id()?;
    for p in probes(last) {
        let ns = run_bpftool(id, &p.frame, repeat)?;
        table.row(vec!["rampart".into(), "3 rules + 1,000,000-prefix set".into(), p.name.into(), format!("{ns:.1}"), format!("{:.2}", ns / min_ns), String::new()]);
    }
    writeln!(out, "### ns per packet (BPF_PROG_TEST_RUN via `bpftool prog run`, repeat {repeat})\n")?;
    out.push_str(&table.markdown());
    writeln!(out, "\nLoading the 1,000,000-prefix rule set (parse + compile + map writes) took {load_s:.1} s.\n")?;
    Ok(())
}

const FLOOD_RULES: u32 = 1_000;

fn flood_section(dir: &Path, seconds: u64, out: &mut String) -> Result<()> {
    let mut table = Table::new(&["receiver", "rules", "packets/s processed", "× minimal"]);
    let mut last = rule_net(FLOOD_RULES - 1);
    last[3] = 1;
    let frame = udp(last);
    let mut results: Vec<(String, String, f64)> = Vec::new();

    {
        let net = Flood::new("min")?;
        let mut m = Minimal::load()?;
        {
            let _g = NetnsGuard::enter(&net.rx_ns)?;
            m.attach(&net.rx_if)?;
        }
        let pps = net.measure(&frame, seconds, || m.processed())?;
        results.push(("minimal XDP_DROP".into(), "-".into(), pps));
    }
    {
        let net = Flood::new("rp")?;
        let mut rp = Rampart::load(&rampart_rules(FLOOD_RULES), dir)?;
        rp.attach(&net.rx_ns, &net.rx_if)?;
        let pps = net.measure(&frame, seconds, || rp.processed())?;
        results.push(("rampart (native XDP)".into(), format!("{FLOOD_RULES} CIDR rules"), pps));
    }
    {
        let net = Flood::new("xf")?;
        let addrs: Vec<[u8; 4]> = (0..FLOOD_RULES).map(|i| { let mut a = rule_net(i); a[3] = 1; a }).collect();
        let xf = XdpFilter::load(&net.rx_ns, &net.rx_if, &addrs, None)?;
        // Its own per-entry hit counter: the flood packet's source is the last address.
        let pps = net.measure(&frame, seconds, || xdp_filter_hits(last))?;
        results.push(("xdp-filter (native XDP)".into(), format!("{FLOOD_RULES} addresses"), pps));
        drop(xf);
    }
    {
        let net = Flood::new("nft")?;
        let mut script = format!("table netdev rbench {{\n chain ingress {{ type filter hook ingress device \"{}\" priority -500; policy accept;\n", net.rx_if);
        for i in 0..FLOOD_RULES {
            let [a, b, c, _] = rule_net(i);
            if i == FLOOD_RULES - 1 {
                writeln!(script, "  ip saddr {a}.{b}.{c}.0/24 counter drop")?;
            } else {
                writeln!(script, "  ip saddr {a}.{b}.{c}.0/24 drop")?;
            }
        }
        script.push_str(" }\n}\n");
        let f = dir.join("nft.conf");
        fs::write(&f, script)?;
        sh("ip", &["netns", "exec", &net.rx_ns, "nft", "-f", f.to_str().unwrap()])?;
        let ns = net.rx_ns.clone();
        let pps = net.measure(&frame, seconds, || {
            let o = sh("ip", &["netns", "exec", &ns, "nft", "-j", "list", "table", "netdev", "rbench"])?;
            rampart_tests::bench::nft_counter_packets(&o)
        })?;
        results.push(("nftables (netdev ingress)".into(), format!("{FLOOD_RULES} rules, linear"), pps));
    }
    {
        let net = Flood::new("ipt")?;
        let mut rules = String::from("*raw\n:PREROUTING ACCEPT [0:0]\n");
        for i in 0..FLOOD_RULES {
            let [a, b, c, _] = rule_net(i);
            writeln!(rules, "-A PREROUTING -s {a}.{b}.{c}.0/24 -j DROP")?;
        }
        rules.push_str("COMMIT\n");
        let f = dir.join("ipt.rules");
        fs::write(&f, rules)?;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &net.rx_ns, "iptables-restore"])
            .stdin(Stdio::piped())
            .spawn()?;
        child.stdin.take().unwrap().write_all(&fs::read(&f)?)?;
        if !child.wait()?.success() {
            bail!("iptables-restore failed");
        }
        let ns = net.rx_ns.clone();
        let pps = net.measure(&frame, seconds, || {
            let o = sh("ip", &["netns", "exec", &ns, "iptables", "-t", "raw", "-L", "PREROUTING", "-v", "-x", "-n"])?;
            rampart_tests::bench::iptables_packets(&o)
        })?;
        results.push(("iptables (raw PREROUTING)".into(), format!("{FLOOD_RULES} rules, linear"), pps));
    }
    let min_pps = results[0].2;
    for (name, rules, pps) in &results {
        table.row(vec![name.clone(), rules.clone(), format!("{pps:.0}"), format!("{:.2}", pps / min_pps)]);
    }
    writeln!(out, "### Flood: packets/s processed by the receiving veth ({seconds} s per contender, trafgen on one core, flood packet matches the last rule)\n")?;
    out.push_str(&table.markdown());
    Ok(())
}

fn main() -> Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("fw-bench needs root (BPF_PROG_TEST_RUN, XDP attach, network namespaces)");
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let repeat = if quick { 100_000 } else { 10_000_000 };
    let seconds = if quick { 1 } else { 5 };
    let dir: PathBuf = std::env::temp_dir().join(format!("fw-bench-{}", std::process::id()));
    fs::create_dir_all(&dir)?;
    let mut out = String::new();
    writeln!(out, "## fw: {}\n", rampart_tests::bench::machine())?;
    let flood_only = args.iter().any(|a| a == "--flood-only");
    let r = (|| {
        if !flood_only {
            testrun_section(&dir, repeat, &mut out)?;
            thread::sleep(Duration::from_millis(200));
        }
        flood_section(&dir, seconds, &mut out)
    })();
    let _ = fs::remove_dir_all(&dir);
    println!("{out}");
    r
}

