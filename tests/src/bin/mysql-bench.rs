//! `mysql-bench`: sysbench `oltp_point_select` and `oltp_read_write` against one MariaDB server
//! directly, through `rampart serve` (the `[[mysql]]` read-write port) and through HAProxy 2.6 in
//! `mode tcp`, on this machine, in one run. The contenders alternate within each round (the
//! order rotates every round); figures are medians over the rounds. Prints a markdown report
//! (transactions/s, p99 latency, and rampart's ratios to direct and to HAProxy) on stdout, with
//! what was loaded; progress goes to stderr. `--quick` is a smoke run of a few seconds per
//! contender. Everything runs in a network namespace of its own (loopback only).
//!
//! Run it as `cargo xtask bench mysql` or
//! `RAMPART_BIN=target/release/rampart cargo run --release -p rampart-tests --bin mysql-bench -- [--quick]`.

use std::{
    fmt::Write as _,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(name = "mysql-bench", about = "MariaDB directly vs through rampart vs through HAProxy (mode tcp), sysbench")]
struct Args {
    /// Smoke run: one round of 3 s runs on a small table.
    #[arg(long)]
    quick: bool,
    /// Seconds per sysbench run [default: 20; quick: 3].
    #[arg(long)]
    time: Option<u64>,
    /// Rounds; the contenders' order rotates each round [default: 5; quick: 1].
    #[arg(long)]
    rounds: Option<usize>,
    /// sysbench client threads (= connections).
    #[arg(long, default_value_t = 8)]
    threads: usize,
    /// Rows per table [default: 100000; quick: 5000].
    #[arg(long)]
    table_size: Option<u64>,
    /// Tables [default: 4; quick: 1].
    #[arg(long)]
    tables: Option<u64>,
}

/// A child process, killed on drop.
struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn start(name: &'static str, cmd: &mut Command, log: &Path) -> Result<Proc> {
        let out = std::fs::File::create(log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        Ok(Proc { name, child, log: log.to_path_buf() })
    }

    fn alive(&mut self) -> Result<()> {
        if let Some(st) = self.child.try_wait()? {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            bail!("{} exited ({st}):\n{log}", self.name);
        }
        Ok(())
    }
}

/// A scratch directory, removed on drop.
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

fn first_line(cmd: &mut Command) -> String {
    cmd.output()
        .map(|o| {
            let text = if o.stdout.is_empty() { o.stderr } else { o.stdout };
            String::from_utf8_lossy(&text).lines().next().unwrap_or("?").trim().to_string()
        })
        .unwrap_or_else(|_| "?".into())
}

/// Waits (bounded: 30 s) until a TCP connection to `port` works.
fn wait_port(port: u16, proc: &mut Proc) -> Result<()> {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(30) {
        proc.alive()?;
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("{} did not listen on {port} within 30 s", proc.name)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Contender {
    Direct,
    Rampart,
    Haproxy,
}

impl Contender {
    fn name(self) -> &'static str {
        match self {
            Contender::Direct => "direct",
            Contender::Rampart => "rampart",
            Contender::Haproxy => "HAProxy",
        }
    }
}

/// One sysbench run's result.
#[derive(Clone, Copy, Debug)]
struct Sample {
    tps: f64,
    p99_ms: f64,
    transactions: u64,
    /// CPU time the proxy process used during the run, per transaction (µs); none for direct.
    proxy_cpu_us: Option<f64>,
    /// Context switches of the proxy's threads during the run, per transaction: how often it
    /// slept and was woken (or preempted) for each one; none for direct.
    proxy_switches: Option<f64>,
}

/// Reads transactions/s and the 99th percentile from sysbench's report.
fn parse_sysbench(report: &str) -> Result<Sample> {
    let value = |key: &str| -> Result<&str> {
        report
            .lines()
            .map(str::trim_start)
            .find_map(|l| l.strip_prefix(key))
            .with_context(|| format!("no {key:?} in sysbench's report:\n{report}"))
    };
    // "transactions:                        458    (226.51 per sec.)"
    let tps = value("transactions:")?
        .split('(')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .context("transactions per second")?;
    let transactions =
        value("transactions:")?.split_whitespace().next().and_then(|s| s.parse().ok()).context("transactions")?;
    let p99 = value("99th percentile:")?.trim().parse().context("99th percentile")?;
    Ok(Sample { tps, p99_ms: p99, transactions, proxy_cpu_us: None, proxy_switches: None })
}

/// CPU time (user + system, all threads) process `pid` has used so far, from /proc/PID/stat.
/// On a shared machine this is steadier than throughput: other loads slow a proxy down but do
/// not make it spend more CPU per transaction.
fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The fields after the command name (in parentheses, which may hold spaces): utime is the
    // 14th field of the line, stime the 15th, in clock ticks.
    let rest = stat.rsplit_once(')').context("/proc/PID/stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Ok(Duration::from_secs_f64(ticks as f64 / hz as f64))
}

/// Context switches (voluntary and involuntary) of all threads of process `pid` so far, from
/// /proc/PID/task/*/status.
fn context_switches(pid: u32) -> Result<u64> {
    let mut n = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        // A thread may end between the listing and the read.
        let Ok(status) = std::fs::read_to_string(task?.path().join("status")) else { continue };
        for l in status.lines() {
            if let Some(v) =
                l.strip_prefix("voluntary_ctxt_switches:").or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                n += v.trim().parse::<u64>()?;
            }
        }
    }
    Ok(n)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let q = args.quick;
    let time = args.time.unwrap_or(if q { 3 } else { 20 });
    let rounds = args.rounds.unwrap_or(if q { 1 } else { 5 });
    let table_size = args.table_size.unwrap_or(if q { 5_000 } else { 100_000 });
    let tables = args.tables.unwrap_or(if q { 1 } else { 4 });
    for tool in ["mariadbd", "mariadb-install-db", "mariadb", "sysbench", "haproxy"] {
        if Command::new("which").arg(tool).output().map(|o| !o.status.success()).unwrap_or(true) {
            bail!(
                "{tool} not found: `cargo xtask setup` installs it (mariadb-server, mariadb-client, sysbench, haproxy)"
            );
        }
    }
    let rampart_bin = PathBuf::from(std::env::var_os("RAMPART_BIN").context(
        "RAMPART_BIN is not set: run `cargo xtask bench mysql`, which builds the release rampart and sets it",
    )?);
    rampart::netns::enter_private_netns().context("a network namespace of its own")?;

    let dir = WorkDir(std::env::temp_dir().join(format!("rampart-mysql-bench-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0)?;
    let d = &dir.0;

    // MariaDB: one server, as the Debian package ships it apart from the buffer pool (sized so
    // the tables stay in memory) and the binary log (on, as a primary's is).
    eprintln!("mysql-bench: initialising MariaDB in {}", d.display());
    mariadb_lab::install(&d.join("template"))?;
    let db_port = free_port()?;
    let mut db_opts = mariadb_lab::Options::new("mariadbd", &d.join("data"), [127, 0, 0, 1].into(), db_port, 1);
    db_opts.buffer_pool = "256M".into();
    db_opts.max_connections = 1000;
    let db = mariadb_lab::Server::start(&d.join("template"), &db_opts)?;
    let db_args = db_opts.args().join(" ");
    let root_sql = |q: &str| db.try_sql(q);
    root_sql(
        "CREATE USER 'sb'@'%' IDENTIFIED BY 'sbpw'; GRANT ALL ON sbtest.* TO 'sb'@'%'; \
         CREATE USER 'mon'@'%' IDENTIFIED BY 'monpw'; GRANT PROCESS, REPLICATION CLIENT, SLAVE MONITOR ON *.* TO 'mon'@'%'; \
         CREATE DATABASE sbtest;",
    )?;

    // rampart: one [[mysql]] cluster of that one server, its read-write port.
    let rampart_port = free_port()?;
    std::fs::write(d.join("mon.pass"), "monpw\n")?;
    let rampart_conf = format!(
        "[admin]\ncontrol_socket = \"{}\"\ndrain_timeout = \"1s\"\n\n[[mysql]]\nname = \"bench\"\n\
         rw_listen = \"127.0.0.1:{rampart_port}\"\nservers = [\"127.0.0.1:{db_port}\"]\nmonitor_user = \"mon\"\n\
         monitor_password_file = \"mon.pass\"\ncheck_interval = \"1s\"\n",
        d.join("control.sock").display()
    );
    std::fs::write(d.join("rampart.toml"), &rampart_conf)?;
    let mut rampart = Proc::start(
        "rampart",
        Command::new(&rampart_bin).args(["serve", "--config"]).arg(d.join("rampart.toml")).env("RUST_LOG", "warn"),
        &d.join("rampart.log"),
    )?;
    wait_port(rampart_port, &mut rampart)?;

    // HAProxy as its own experts set it up for MySQL: mode tcp, one frontend, one server, long
    // client/server timeouts (sessions are long-lived), threads = CPUs (HAProxy's default, said
    // explicitly), as rampart's tokio runtime uses one worker per CPU.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let haproxy_port = free_port()?;
    let haproxy_conf = format!(
        "global\n  nbthread {cpus}\n  maxconn 4096\n\ndefaults\n  mode tcp\n  timeout connect 5s\n  \
         timeout client 1h\n  timeout server 1h\n\nfrontend mysql\n  bind 127.0.0.1:{haproxy_port}\n  \
         default_backend db\n\nbackend db\n  server primary 127.0.0.1:{db_port}\n"
    );
    std::fs::write(d.join("haproxy.cfg"), &haproxy_conf)?;
    let mut haproxy = Proc::start(
        "haproxy",
        Command::new("haproxy").args(["-db", "-f"]).arg(d.join("haproxy.cfg")),
        &d.join("haproxy.log"),
    )?;
    wait_port(haproxy_port, &mut haproxy)?;

    let port_of = |c: Contender| match c {
        Contender::Direct => db_port,
        Contender::Rampart => rampart_port,
        Contender::Haproxy => haproxy_port,
    };
    let sysbench = |workload: &str, port: u16, extra: &[String]| -> Result<String> {
        output(
            Command::new("sysbench")
                .arg(workload)
                .args(["--db-driver=mysql", "--mysql-host=127.0.0.1", "--mysql-user=sb", "--mysql-password=sbpw"])
                .args(["--mysql-db=sbtest", "--percentile=99", "--report-interval=0"])
                .arg(format!("--mysql-port={port}"))
                .arg(format!("--tables={tables}"))
                .arg(format!("--table-size={table_size}"))
                .args(extra),
        )
    };
    eprintln!("mysql-bench: sysbench prepare ({tables} table(s) of {table_size} rows)");
    sysbench("oltp_read_write", db_port, &["prepare".into()])?;

    let contenders = [Contender::Direct, Contender::Rampart, Contender::Haproxy];
    let workloads = ["oltp_point_select", "oltp_read_write"];
    // samples[workload][contender] over rounds.
    let mut samples = vec![vec![Vec::<Sample>::new(); contenders.len()]; workloads.len()];
    for round in 0..rounds {
        for (w, workload) in workloads.iter().enumerate() {
            for k in 0..contenders.len() {
                let ci = (k + round) % contenders.len();
                let c = contenders[ci];
                for p in [&mut rampart, &mut haproxy] {
                    p.alive()?;
                }
                db.try_sql("SELECT 1").context("MariaDB stopped answering")?;
                eprintln!("mysql-bench: round {}/{rounds}: {workload} {} ({time} s)", round + 1, c.name());
                let extra = [format!("--threads={}", args.threads), format!("--time={time}"), "run".to_string()];
                let pid = match c {
                    Contender::Direct => None,
                    Contender::Rampart => Some(rampart.child.id()),
                    Contender::Haproxy => Some(haproxy.child.id()),
                };
                let cpu_before = pid.map(cpu_time).transpose()?;
                let switches_before = pid.map(context_switches).transpose()?;
                let report = sysbench(workload, port_of(c), &extra)?;
                let mut sample = parse_sysbench(&report)?;
                if let (Some(pid), Some(before)) = (pid, cpu_before) {
                    let used = cpu_time(pid)?.saturating_sub(before);
                    sample.proxy_cpu_us = Some(used.as_secs_f64() * 1e6 / sample.transactions.max(1) as f64);
                }
                if let (Some(pid), Some(before)) = (pid, switches_before) {
                    let n = context_switches(pid)?.saturating_sub(before);
                    sample.proxy_switches = Some(n as f64 / sample.transactions.max(1) as f64);
                }
                eprintln!(
                    "mysql-bench:   {:.0} transactions/s, p99 {:.2} ms{}{}",
                    sample.tps,
                    sample.p99_ms,
                    sample.proxy_cpu_us.map_or(String::new(), |u| format!(", proxy CPU {u:.1} µs/transaction")),
                    sample
                        .proxy_switches
                        .map_or(String::new(), |n| format!(", {n:.2} proxy context switches/transaction"))
                );
                samples[w][ci].push(sample);
            }
        }
    }

    // The report.
    let mut out = String::new();
    let mariadb_version = first_line(Command::new("mariadbd").arg("--version"));
    let haproxy_version = first_line(Command::new("haproxy").arg("-v"));
    let rampart_version = first_line(Command::new(&rampart_bin).arg("--version"));
    let sysbench_version = first_line(Command::new("sysbench").arg("--version"));
    writeln!(out, "## MySQL routing: sysbench through rampart and HAProxy (`cargo xtask bench mysql`)\n")?;
    writeln!(
        out,
        "{rounds} round(s) of {time} s per workload and contender, contenders alternating (order rotated each \
         round), medians; sysbench {} thread(s) = connections, {tables} table(s) of {table_size} rows; \
         {cpus} CPU(s), everything on one machine in one network namespace (loopback).\n",
        args.threads
    )?;
    writeln!(
        out,
        "| workload | contender | transactions/s | p99 ms | tps vs direct | tps vs HAProxy | p99 vs HAProxy | \
         proxy CPU µs/transaction | proxy context switches/transaction |"
    )?;
    writeln!(out, "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")?;
    for (w, workload) in workloads.iter().enumerate() {
        let med: Vec<(f64, f64, Option<f64>, Option<f64>)> = samples[w]
            .iter()
            .map(|s| {
                let mut tps: Vec<f64> = s.iter().map(|x| x.tps).collect();
                let mut p99: Vec<f64> = s.iter().map(|x| x.p99_ms).collect();
                let mut cpu: Vec<f64> = s.iter().filter_map(|x| x.proxy_cpu_us).collect();
                let mut sw: Vec<f64> = s.iter().filter_map(|x| x.proxy_switches).collect();
                (
                    median(&mut tps),
                    median(&mut p99),
                    (!cpu.is_empty()).then(|| median(&mut cpu)),
                    (!sw.is_empty()).then(|| median(&mut sw)),
                )
            })
            .collect();
        let (direct, haproxy) = (med[0], med[2]);
        for (ci, c) in contenders.iter().enumerate() {
            let (tps, p99, cpu, sw) = med[ci];
            writeln!(
                out,
                "| {workload} | {} | {tps:.0} | {p99:.2} | {:.3}x | {:.3}x | {:.3}x | {} | {} |",
                c.name(),
                tps / direct.0,
                tps / haproxy.0,
                p99 / haproxy.1,
                cpu.map_or("-".to_string(), |u| format!("{u:.1}")),
                sw.map_or("-".to_string(), |n| format!("{n:.2}"))
            )?;
        }
    }
    writeln!(out, "\nLoaded: {mariadb_version}; {haproxy_version}; {rampart_version}; {sysbench_version}.\n")?;
    writeln!(out, "rampart.toml:\n```toml\n{rampart_conf}```\nhaproxy.cfg:\n```\n{haproxy_conf}```")?;
    writeln!(out, "MariaDB: `mariadbd {db_args}`")?;
    print!("{out}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_sysbench_report() {
        let report = "SQL statistics:\n    transactions:                        458    (226.51 per sec.)\n\
                      Latency (ms):\n         min:                                    2.77\n\
                               99th percentile:                       12.30\n";
        let s = parse_sysbench(report).unwrap();
        assert_eq!((s.tps, s.p99_ms), (226.51, 12.30));
        assert!(parse_sysbench("nothing").is_err());
    }

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
