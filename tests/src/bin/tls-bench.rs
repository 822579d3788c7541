//! `tls-bench`: rampart vs HAProxy 2.6 vs nginx 1.22 terminating TLS (same ECDSA P-256
//! certificate, TLS 1.3 AES-128-GCM X25519) in front of the same nginx backend, on this machine,
//! in one run. Prints a markdown report (keep-alive requests/s, full handshakes/s, p50/p99 at a
//! fixed request rate, and rampart's ratios) on stdout; progress goes to stderr. `--quick` is a
//! smoke run of a few seconds. On a machine where the clients get a single CPU, each contender
//! runs under a CPU budget (a cgroup quota, `--cpu-quota`) so that it, and not the client CPU, is
//! the bottleneck of the throughput runs; the latency run lifts it, since its stalls would be
//! all the percentiles measure. Everything runs in a network namespace of its own (loopback only),
//! never on the host's interfaces.
//!
//! Run it as `cargo xtask bench tls` or
//! `cargo run --release -p rampart-tests --bin tls-bench -- [--quick]`.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Parser;
use rampart_tests::tls_bench::{
    BenchCert, BenchError, PATH, WorkDir,
    cgroup::CpuLimit,
    clients::{self, FixedRate, OPENSSL_CLIENT_CONF},
    contenders::{self, Kind, Server, Setup},
    instructions,
    procs::{CPU_DMA_LATENCY, CpuSample, Cpus, Interference, PollingIdle, ticks_per_second},
    report::FOREIGN_LIMIT,
    report::{self, Contender, Round, Run, Usage},
    require_tool,
};

#[derive(Parser, Debug)]
#[command(
    name = "tls-bench",
    about = "rampart vs HAProxy vs nginx: TLS termination and proxying, one machine, one run"
)]
struct Args {
    /// Smoke run: one round of 1 s runs, no warm-up (a few seconds in all).
    #[arg(long)]
    quick: bool,
    /// Seconds per measurement (keep-alive, fixed-rate latency, handshakes) per contender per round
    /// [default: 3; quick: 1].
    #[arg(long)]
    duration: Option<u64>,
    /// Seconds of load, not measured, before each keep-alive and each fixed-rate measurement
    /// [default: 1; quick: 0].
    #[arg(long)]
    warmup: Option<u64>,
    /// Rounds; the contenders' order rotates each round, figures are medians [default: 9; quick: 1].
    #[arg(long)]
    rounds: Option<usize>,
    /// Client connections at a time (wrk -c, and the handshake client's concurrency).
    #[arg(long, default_value_t = 50)]
    connections: usize,
    /// Keep-alive connections of the fixed-rate latency client (p50/p99 in the main table).
    #[arg(long, value_name = "N", default_value_t = 50)]
    latency_connections: usize,
    /// Requests/s, over all its connections, the fixed-rate latency client sends; each contender
    /// must keep up without its CPU budget (within 2%), or it is flagged as saturated.
    // 10,000: on the 2-core machine, 15,000 kept the client CPU 80-85% busy and the client's own
    // lateness (the "sent late" column) then moved p99 by milliseconds between rounds.
    #[arg(long, value_name = "REQ_PER_S", default_value_t = 10_000)]
    latency_rate: u32,
    /// Threads (rampart's tokio workers, HAProxy's nbthread, nginx's worker_processes).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Contenders to run, in order: rampart, haproxy, nginx, rampart-nohist (rampart with
    /// `[admin] latency_histograms = false`; beside rampart, the report gives the latency
    /// histograms' cost) and rampart-twin (a second, identical rampart: the pair's A/A control,
    /// the bench's own bias between two contenders doing the same work). The histograms' cost:
    /// `--only rampart,rampart-nohist,rampart-twin`.
    #[arg(long, value_delimiter = ',', default_value = "rampart,haproxy,nginx")]
    only: Vec<String>,
    /// Do not pin the contenders and the clients to separate CPUs.
    #[arg(long)]
    no_pin: bool,
    /// Percent of one core each contender (all its processes) may use in the keep-alive and
    /// handshake runs, enforced by a cgroup CPU quota (lifted for the fixed-rate latency run);
    /// 0: no limit [default: 50 when the contenders and the clients are pinned apart and the
    /// clients have one CPU, so the contender and not the client CPU is the bottleneck; else 0].
    #[arg(long, value_name = "PCT")]
    cpu_quota: Option<u32>,
    /// The period the CPU quota applies to, in µs (the quota is PCT% of it).
    #[arg(long, value_name = "US", default_value_t = QUOTA_PERIOD_US)]
    cpu_period_us: u64,
    /// The rampart binary [env RAMPART_BIN; default: build target/release/rampart with cargo].
    #[arg(long)]
    rampart_bin: Option<PathBuf>,
    /// Seconds to wait, before each measurement, for other work on the machine to stop
    /// (every CPU under 15% busy) [default: 120; quick: 0].
    #[arg(long)]
    quiet_wait: Option<u64>,
    /// Keep the scratch directory (configs, logs) and print where it is.
    #[arg(long)]
    keep: bool,
    /// Idle TLS keep-alive connections each contender holds, after the rounds, to measure its
    /// memory per connection (0: skip) [default: 5,000; quick: 1,000].
    #[arg(long, value_name = "N")]
    idle_connections: Option<usize>,
    /// Let idle CPUs halt, as they do outside the bench. By default the bench holds
    /// /dev/cpu_dma_latency at 0 so that idle CPUs poll: a halted vCPU's wake-up adds its delay to
    /// every request that finds it idle, and more often to the contender that uses less CPU.
    #[arg(long)]
    halting_idle: bool,
    /// With rampart and rampart-nohist: keep-alive requests of the longer of the two callgrind
    /// runs that count each one's instructions per request (the shorter serves a sixth as
    /// many); 0: skip [default: 12,000; quick: 1,200].
    #[arg(long, value_name = "N")]
    callgrind_requests: Option<u64>,
}

/// The CFS period the CPU quota applies to: 10 ms. Measured against 2 ms (50%, 5 s runs): at
/// 10 ms every contender used 49–50% of a core in every run; at 2 ms (quota 1 ms, the kernel's
/// minimum) HAProxy got its 50% but nginx only 39–44% and rampart 41–49%, so the budget differed
/// by contender; and the tick-sampled busy-per-core figures (HZ=250: a 4 ms tick) locked in
/// phase with the period, reading 5% for busy cores. p99 did not favour 2 ms clearly (4–10 ms
/// against 7–10 ms): a throttled contender waits out its period either way.
const QUOTA_PERIOD_US: u64 = 10_000;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Before any thread or process starts, so that all of them (contenders, backend, clients) talk
    // over this namespace's loopback and never the host's interfaces.
    rampart::netns::enter_private_netns().context("run the benchmark in a network namespace of its own")?;
    let (duration, warmup, rounds) = if args.quick {
        (args.duration.unwrap_or(1), args.warmup.unwrap_or(0), args.rounds.unwrap_or(1))
    } else {
        // Many short rounds rather than a few long ones: this VM's speed drifts over tens of
        // seconds (one contender's req/s moved 21,781-30,218 between 8 s rounds), so contenders
        // measured close together see the same machine, and a median over 9 rounds is steadier.
        (args.duration.unwrap_or(3), args.warmup.unwrap_or(1), args.rounds.unwrap_or(9))
    };
    let (duration, warmup) = (Duration::from_secs(duration.max(1)), Duration::from_secs(warmup));
    let idle_connections = args.idle_connections.unwrap_or(if args.quick { 1_000 } else { 5_000 });
    // The client holds every idle connection in this process, and the contenders inherit its
    // limit: both need a descriptor per connection and then some.
    raise_fd_limit(idle_connections + 1024).context("the idle-connection measurement")?;
    let quiet_wait = Duration::from_secs(args.quiet_wait.unwrap_or(if args.quick { 0 } else { 120 }));
    let kinds: Vec<Kind> = args
        .only
        .iter()
        .map(|s| {
            Kind::parse(s).with_context(|| {
                format!("unknown contender {s:?} (rampart, rampart-nohist, rampart-twin, haproxy, nginx)")
            })
        })
        .collect::<anyhow::Result<_>>()?;
    if kinds.is_empty() {
        bail!("no contender to run");
    }
    for tool in ["wrk", "openssl", "nginx", "taskset"] {
        require_tool(tool)?;
    }
    if kinds.contains(&Kind::Haproxy) {
        require_tool("haproxy")?;
    }
    let rampart_bin = if kinds
        .iter()
        .any(|k| matches!(k, Kind::Rampart | Kind::RampartNoHistograms | Kind::RampartTwin))
    {
        Some(locate_rampart(args.rampart_bin.clone().or_else(|| std::env::var_os("RAMPART_BIN").map(PathBuf::from)))?)
    } else {
        None
    };

    // Clients and the backend on some CPUs, the contender on the others.
    let (server_cpus, client_cpus, mut layout) = plan_cpus(args.threads, args.no_pin)?;
    layout.push_str("; all traffic over the loopback of a network namespace the bench made for itself");
    if let Some(ids) = client_cpus.0.as_ref().map(|_| client_cpus.ids()) {
        pin_self(&ids).context("pin the bench (and its handshake client) to the client CPUs")?;
    }
    // One client CPU drives wrk and the backend; unlimited, every contender serves more than that
    // CPU can ask for, so the budget keeps the contender the bottleneck.
    let one_client_cpu = server_cpus.0.is_some() && client_cpus.ids().len() == 1;
    let quota = args.cpu_quota.unwrap_or(if one_client_cpu { 50 } else { 0 });
    let limit = if quota == 0 { None } else { Some(CpuLimit::new(quota, args.cpu_period_us)?) };
    match &limit {
        Some(l) => layout.push_str(&format!(
            "; in the keep-alive and handshake runs each contender is limited to {quota}% of one core by a cgroup \
             CPU quota ({}){}; the quota is lifted ({}) for the fixed-rate latency run and set again after it, \
             because a contender stopped for the rest of every period would make the stalls all its latency \
             percentiles measure",
            l.describe(),
            if one_client_cpu {
                ", because otherwise the client CPU, which runs wrk and the backend, saturates before any contender \
                 does and the comparison measures the client"
            } else {
                ", as asked with --cpu-quota"
            },
            l.describe_lifted(),
        )),
        None if args.cpu_quota == Some(0) => layout.push_str("; no CPU quota for the contenders (--cpu-quota 0)"),
        None => layout.push_str("; no CPU quota for the contenders"),
    }

    let _polling = if args.halting_idle {
        layout.push_str("; idle CPUs may halt (--halting-idle)");
        None
    } else {
        layout.push_str(&format!(
            "; idle CPUs poll instead of halting ({CPU_DMA_LATENCY} held at 0 µs for the run, as cyclictest does), \
             so that no contender's requests wait for a halted vCPU to wake"
        ));
        Some(PollingIdle::hold()?)
    };

    let work = WorkDir::new(args.keep)?;
    let cert = BenchCert::generate(&work)?;
    let openssl_conf = work.write("client-openssl.cnf", OPENSSL_CLIENT_CONF)?;
    let tls_client = clients::client_config(&cert.der)?;
    // Its own config, so that the handshake runs' count of verified signatures stays theirs.
    let latency_tls = clients::client_config(&cert.der)?;
    let pace =
        FixedRate { connections: args.latency_connections, rate: f64::from(args.latency_rate), warmup, duration };
    if pace.connections == 0 || args.latency_rate == 0 {
        bail!("--latency-connections and --latency-rate must be positive");
    }

    eprintln!("tls-bench: starting the backend and {} contender(s) in {}", kinds.len(), work.path.display());
    let backend = contenders::start_backend(&work, &client_cpus)?;
    let setup = Setup {
        work: &work,
        cert: &cert,
        backend: backend.addr,
        threads: args.threads,
        cpus: &server_cpus,
        rampart_bin: rampart_bin.as_deref().unwrap_or(Path::new("rampart")),
        limit: limit.as_ref(),
        max_clients: idle_connections,
    };
    let mut servers: Vec<Server> = Vec::new();
    for &k in &kinds {
        servers.push(contenders::start(k, &setup)?);
    }

    // Each contender must answer correctly before anything is measured.
    let mut results: Vec<Contender> = Vec::new();
    for s in &mut servers {
        let kind = s.kind.context("contender without kind")?;
        let probe = clients::run_handshakes(tls_client.config.clone(), s.addr, 1, Duration::from_millis(300))?;
        if probe.ok == 0 || probe.error_count() > 0 {
            bail!(
                "{} does not answer GET {PATH} with the backend's body over TLS: {:?}\nits log:\n{}",
                kind.name(),
                probe,
                s.proc.log_text()
            );
        }
        // Now that it has served, every worker exists: all must be within the budget.
        s.check_cgroup()?;
        let negotiated_openssl =
            clients::openssl_probe(&openssl_conf, s.addr, &work.path.join(format!("probe-{}.log", kind.name())))?;
        let (procs, threads) = s.threads();
        results.push(Contender {
            kind,
            label: format!("{} {}", kind.name(), s.version),
            setup: format!("{} ({procs} process(es), {threads} thread(s) in all)", s.setup),
            negotiated_openssl,
            rounds: Vec::new(),
            idle: None,
        });
    }

    let guard = Guard { quiet_wait, attempts: if args.quick { 1 } else { 3 } };
    let started = Instant::now();
    let mut warnings = Vec::new();
    // Like with like: each round measures every contender's keep-alive run, then every fixed-rate
    // run, then every handshake run, so the two measurements a ratio compares are seconds apart,
    // not a whole contender's turn (this VM's speed drifts within a minute).
    for round in 0..rounds {
        let order: Vec<usize> = (0..servers.len()).map(|i| (i + round) % servers.len()).collect();
        for r in results.iter_mut() {
            r.rounds.push(Round::default());
        }
        for run in Run::ALL {
            for &idx in &order {
                let s = &mut servers[idx];
                let tag = format!("round {}/{rounds}: {}", round + 1, results[idx].label);
                let this = results[idx].rounds.last_mut().context("round just pushed")?;
                match run {
                    Run::KeepAlive => {
                        let log = work.path.join(format!("wrk-{}-{round}.log", s.kind.map_or("x", Kind::name)));
                        (this.keepalive, this.keepalive_usage) =
                            measured(&guard, &mut warnings, &format!("{tag}: keep-alive {duration:?}"), || {
                                if !warmup.is_zero() {
                                    clients::run_wrk(
                                        &client_cpus,
                                        &openssl_conf,
                                        s.addr,
                                        args.connections,
                                        warmup,
                                        &log,
                                    )?;
                                }
                                with_usage(s, &backend, |s| {
                                    clients::run_wrk(
                                        &client_cpus,
                                        &openssl_conf,
                                        s.addr,
                                        args.connections,
                                        duration,
                                        &log,
                                    )
                                })
                            })?;
                        eprintln!("tls-bench:   {:.0} req/s ({} errors)", this.keepalive.rps, this.keepalive.errors());
                    }
                    Run::FixedRate => {
                        let what = format!(
                            "{tag}: fixed rate {} req/s over {} connections {duration:?}{}",
                            args.latency_rate,
                            pace.connections,
                            if limit.is_some() { ", CPU quota lifted" } else { "" }
                        );
                        (this.fixed_rate, this.fixed_rate_usage) = measured(&guard, &mut warnings, &what, || {
                            let (fr, mut usage) = s.without_budget(|s| {
                                with_usage(s, &backend, |s| {
                                    clients::run_fixed_rate(latency_tls.config.clone(), s.addr, &pace)
                                })
                            })?;
                            usage.client_late_us = fr.wake_late_p99_us;
                            Ok((fr, usage))
                        })?;
                        let fr = &this.fixed_rate;
                        eprintln!(
                            "tls-bench:   {:.0} of {} req/s{}, p50 {:.0} µs, p99 {:.0} µs, p99.9 {:.0} µs, max {:.0} µs, \
                             sent late p99 {:.0} µs (client woke late p99 {:.0} µs) ({} errors)",
                            fr.rps,
                            args.latency_rate,
                            if fr.kept_rate() { "" } else { " (could not keep the rate)" },
                            fr.p50_us,
                            fr.p99_us,
                            fr.p999_us,
                            fr.max_us,
                            fr.lag_p99_us,
                            fr.wake_late_p99_us,
                            fr.error_count(),
                        );
                        if !fr.kept_rate() {
                            warnings.push(format!(
                                "{tag}: could not keep the fixed rate: {:.0} of {} req/s achieved, {} scheduled \
                                 request(s) never sent; the contender is saturated at this rate",
                                fr.rps, args.latency_rate, fr.unsent
                            ));
                        }
                    }
                    Run::Handshakes => {
                        (this.handshakes, this.handshake_usage) =
                            measured(&guard, &mut warnings, &format!("{tag}: new handshakes {duration:?}"), || {
                                with_usage(s, &backend, |s| {
                                    clients::run_handshakes(
                                        tls_client.config.clone(),
                                        s.addr,
                                        args.connections,
                                        duration,
                                    )
                                })
                            })?;
                        eprintln!(
                            "tls-bench:   {:.0} handshakes/s ({} errors)",
                            this.handshakes.rate(),
                            this.handshakes.error_count()
                        );
                    }
                }
            }
        }
    }
    let elapsed = started.elapsed();

    // Memory per idle connection, after the rounds, so that each contender's allocator has
    // already grown to its working size and what the connections add stands out.
    if idle_connections > 0 {
        for idx in 0..servers.len() {
            let s = &mut servers[idx];
            let label = &results[idx].label;
            eprintln!("tls-bench: {label}: opening {idle_connections} idle TLS keep-alive connections");
            let m = s.without_budget(|s| {
                let rss_before_kib = s.rss_kib();
                let held = clients::open_idle(tls_client.config.clone(), s.addr, idle_connections, args.connections)?;
                std::thread::sleep(Duration::from_secs(1));
                s.proc.check_alive()?;
                let m = report::IdleMemory {
                    connections: held.open,
                    rss_before_kib,
                    rss_after_kib: s.rss_kib(),
                    processes: s.pids().len(),
                    open_seconds: held.seconds,
                };
                drop(held);
                Ok(m)
            })?;
            eprintln!("tls-bench:   {:.1} KiB per connection", m.per_connection_kib());
            results[idx].idle = Some(m);
            // Let it close them all before the next contender is measured.
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    // The histograms' cost in instructions, where req/s is too noisy to tell 2 %.
    let callgrind_requests = args.callgrind_requests.unwrap_or(if args.quick { 1_200 } else { 12_000 });
    let counted =
        if kinds.contains(&Kind::Rampart) && kinds.contains(&Kind::RampartNoHistograms) && callgrind_requests > 0 {
            require_tool("valgrind")?;
            require_tool("h2load")?;
            let mut counts = Vec::new();
            for kind in [Kind::Rampart, Kind::RampartNoHistograms] {
                eprintln!("tls-bench: {}: counting instructions per request under callgrind", kind.name());
                let c = instructions::per_request(&setup, kind, callgrind_requests / 6, callgrind_requests)?;
                eprintln!("tls-bench:   {:.0} instructions per request", c.instructions());
                counts.push(c);
            }
            Some((counts[0], counts[1]))
        } else {
            None
        };

    // Sanity: every contender served requests and handshakes, all full handshakes.
    let mut failed = Vec::new();
    for c in &results {
        let s = c.summary();
        if s.rps <= 0.0 || s.hps <= 0.0 {
            failed.push(format!("{}: no successful requests or handshakes", c.label));
        }
        let [ka_err, fr_err, hs_err] = Run::ALL.map(|run| c.errors(run));
        if ka_err > 0 || fr_err > 0 || hs_err > 0 {
            warnings.push(format!(
                "{}: {ka_err} keep-alive error(s), {fr_err} fixed-rate error(s), {hs_err} handshake error(s)",
                c.label
            ));
        }
    }

    let url = format!("https://127.0.0.1:PORT{PATH}");
    let ctx = report::Context {
        title: format!(
            "TLS termination: {} ({})",
            results.iter().map(|c| c.kind.name()).collect::<Vec<_>>().join(" vs "),
            if args.quick { "quick smoke run, numbers not meaningful" } else { "full run" }
        ),
        machine: machine_line(),
        versions: versions_line(&results, &backend, rampart_bin.as_deref()),
        layout,
        client_cpus: client_cpus.ids(),
        budget: limit.as_ref().map(|l| report::Budget {
            percent: l.percent,
            stall_ms: l.period_us.saturating_sub(l.quota_us) as f64 / 1000.0,
        }),
        tls: format!(
            "one ECDSA P-256 certificate generated for the run (rcgen), served by every contender; \
             clients offer only TLS 1.3, TLS_AES_128_GCM_SHA256 and X25519, so every contender \
             negotiates the same (see \"Setup\"); HAProxy and nginx use Debian's OpenSSL {} (the system \
             libssl3 they are linked against), rampart uses rustls with aws-lc-rs (built into its binary)",
            contenders::openssl_version()
        ),
        backend: format!(
            "nginx {} on 127.0.0.1 (same CPUs as the clients), 1 worker, serving a 100-byte static file at {PATH} \
             over HTTP/1.1 keep-alive; every contender proxies to it with keep-alive connections and adds \
             X-Forwarded-For, X-Forwarded-Proto and Forwarded",
            backend.version
        ),
        latency: format!(
            "p50/p99: at a fixed {} requests/s over {} keep-alive connections, {}, measured from each request's \
             scheduled send time to the end of its response (a request held up by a slow earlier response counts \
             the wait; no coordinated omission). Requests/s and handshakes/s: {}.",
            report::thousands(pace.rate),
            pace.connections,
            if limit.is_some() { "without the CPU budget" } else { "no CPU budget" },
            if limit.is_some() { "closed loop under the CPU budget" } else { "closed loop" }
        ),
        method: format!(
            "{rounds} round(s); in each, the contenders in turn (order rotated each round) get {}{} s of \
             keep-alive load (wrk) one after another, then {}{} s at a fixed {} requests/s{} each, then {} s of \
             new connections each, so that the measurements a ratio compares are seconds apart; rates \
             are medians over the rounds, p50/p99 percentiles of all the rounds' fixed-rate requests pooled; \
             a measurement during which other programs used more than \
             {FOREIGN_LIMIT}% of a core, or at the fixed rate whose client itself woke more than {:.0} µs late \
             at p99 (its CPU stalled), is taken again (at most {} attempts) and left out; measuring took {:.0} s",
            if warmup.is_zero() { String::new() } else { format!("{} s of warm-up, ", warmup.as_secs()) },
            duration.as_secs(),
            if warmup.is_zero() { String::new() } else { format!("{} s of warm-up, ", warmup.as_secs()) },
            duration.as_secs(),
            report::thousands(pace.rate),
            if limit.is_some() { " with the CPU quota lifted" } else { "" },
            duration.as_secs(),
            report::CLIENT_LATE_LIMIT_US,
            guard.attempts,
            elapsed.as_secs_f64()
        ),
        commands: vec![
            format!(
                "keep-alive (req/s): `OPENSSL_CONF=client-openssl.cnf {}wrk {}`, with client-openssl.cnf \
                 setting `MinProtocol = TLSv1.3`, `Ciphersuites = TLS_AES_128_GCM_SHA256`, `Groups = X25519`",
                client_cpus.prefix(),
                clients::wrk_args(&url, args.connections, duration).join(" ")
            ),
            format!(
                "fixed rate (p50, p99, p99.9, max): tls-bench's own client{} on one thread (tokio, rustls 0.23 / \
                 aws-lc-rs, the same TLS settings as the handshake client): {} keep-alive connections opened before \
                 the schedule starts, each sending `GET {PATH} HTTP/1.1` with `Host: bench` every {} / {} s, \
                 connection i offset by i/{} of that, so requests are evenly spread; send times are kept by timerfds \
                 (microseconds; tokio's own timers round to milliseconds); a request due while its connection still \
                 waits for the previous response goes out as soon as that arrives and is timed from when it was due; \
                 every response must be status 200 with `Content-Length: 100` and the backend's 100 bytes, nothing \
                 more, and the connection kept open (anything else, or no response within 5 s, is an error and the \
                 connection is opened again); {}{} s recorded; the achieved rate is the responses completed within \
                 those seconds, and must be within {:.0}% of the target",
                client_cpus.0.as_ref().map(|l| format!(" pinned to CPU {l}")).unwrap_or_default(),
                pace.connections,
                pace.connections,
                report::thousands(pace.rate),
                pace.connections,
                if warmup.is_zero() {
                    String::new()
                } else {
                    format!("{} s of warm-up not recorded, then ", warmup.as_secs())
                },
                duration.as_secs(),
                clients::RATE_TOLERANCE * 100.0,
            ),
            format!(
                "full handshakes: tls-bench's own client{} ({} connections at a time for {} s; each: TCP connect, \
                 TLS 1.3 handshake with rustls 0.23 / aws-lc-rs offering only TLS_AES_128_GCM_SHA256 and X25519, \
                 the bench certificate pinned, the server's CertificateVerify signature verified on every {}th \
                 connection (verifying all would make the client the bottleneck), then \
                 `GET {PATH}` with `Connection: close`, read to the end, status 200 and the 100-byte body checked). \
                 wrk and h2load are not used here because both resume TLS sessions when they reconnect",
                client_cpus.0.as_ref().map(|l| format!(" pinned to CPU {l}")).unwrap_or_default(),
                args.connections,
                duration.as_secs(),
                clients::SIGNATURE_SAMPLE,
            ),
        ],
        verification: {
            let (checked, not_full): (u64, u64) =
                results.iter().map(|c| c.handshakes_checked()).fold((0, 0), |(a, b), (c, d)| (a + c, b + d));
            vec![
                "the client keeps no sessions (rustls `Resumption::disabled()`: no tickets or session IDs are \
                 stored, so none can be offered)"
                    .into(),
                format!(
                    "every connection is checked after its handshake: rustls reported `HandshakeKind::Full` for all \
                     {} counted connections; {not_full} were anything else (those are counted as errors, not as \
                     handshakes)",
                    report::thousands(checked as f64)
                ),
                format!(
                    "{} server signatures were verified (a bad one fails the handshake and counts as an error)",
                    report::thousands(tls_client.signatures_checked.load(std::sync::atomic::Ordering::Relaxed) as f64)
                ),
            ]
        },
        warnings: warnings.clone(),
        configs: servers
            .iter()
            .chain(std::iter::once(&backend))
            .map(|s| {
                let name = match s.kind {
                    Some(k) => format!("{} config ({})", k.name(), s.config.display()),
                    None => format!("backend config ({})", s.config.display()),
                };
                (name, std::fs::read_to_string(&s.config).unwrap_or_default())
            })
            .collect(),
    };
    print!("{}", report::render(&ctx, &results));
    if let Some((on, off)) = counted {
        println!("\n{}", report::instruction_cost(&on, &off));
    }
    if args.keep {
        eprintln!("tls-bench: configs and logs kept in {}", work.path.display());
    }
    drop(servers);
    drop(backend);
    if !failed.is_empty() {
        bail!("the bench did not work:\n{}", failed.join("\n"));
    }
    Ok(())
}

/// How measurements protect themselves from other work on a shared machine.
struct Guard {
    quiet_wait: Duration,
    attempts: usize,
}

/// Runs `f` once the machine is quiet; runs it again (up to `attempts` in all) when other
/// programs took more than [`FOREIGN_LIMIT`] of CPU meanwhile. Returns f's result with that share
/// in its usage; the report leaves disturbed measurements out of its medians.
fn measured<T>(
    guard: &Guard,
    warnings: &mut Vec<String>,
    what: &str,
    mut f: impl FnMut() -> Result<(T, Usage), BenchError>,
) -> anyhow::Result<(T, Usage)> {
    let mut attempt = 1;
    loop {
        let noisy_start = wait_for_quiet(guard.quiet_wait);
        eprintln!("tls-bench: {what}");
        let watch = Interference::start();
        let (t, mut usage) = f()?;
        usage.foreign = watch.foreign_percent();
        let Some(why) = usage.disturbance() else {
            return Ok((t, usage));
        };
        if attempt >= guard.attempts {
            warnings.push(format!(
                "{what}: {why} during the measurement, after {attempt} attempt(s){}; left out of the medians \
                 unless no round was clean",
                noisy_start.map(|w| format!(" ({w})")).unwrap_or_default()
            ));
            return Ok((t, usage));
        }
        eprintln!("tls-bench:   {why} meanwhile; measuring again");
        attempt += 1;
    }
}

/// Runs one measurement against `s` and records what it cost: the contender's and the backend's
/// CPU, each core's busy share, and the budget's throttling; then checks that the contender is
/// still running, all of it within its cgroup.
fn with_usage<T>(
    s: &mut Server,
    backend: &Server,
    run: impl FnOnce(&Server) -> Result<T, BenchError>,
) -> Result<(T, Usage), BenchError> {
    let (t0, b0, c0, q0, w0) = (s.ticks(), backend.ticks(), CpuSample::now(), s.cpu_stat(), Instant::now());
    let r = run(s)?;
    let wall = w0.elapsed();
    let pct = |ticks: u64| 100.0 * ticks as f64 / ticks_per_second() / wall.as_secs_f64().max(1e-3);
    let usage = Usage {
        cpu: pct(s.ticks().saturating_sub(t0)),
        backend_cpu: pct(backend.ticks().saturating_sub(b0)),
        busy: c0.busy_since(&CpuSample::now()),
        foreign: 0.0,
        client_late_us: 0.0,
        throttle: s.throttling_since(q0, wall),
    };
    s.proc.check_alive()?;
    s.check_cgroup()?;
    Ok((r, usage))
}

/// Waits (at most `within`) until no CPU is more than 15% busy over half a second: other work on
/// a shared machine would skew the measurement. Returns a warning when it never got quiet.
/// Raises this process's soft RLIMIT_NOFILE to at least `need` (up to the hard limit).
fn raise_fd_limit(need: usize) -> anyhow::Result<()> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit write or read the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
    }
    let need = need as libc::rlim_t;
    if lim.rlim_cur >= need {
        return Ok(());
    }
    if lim.rlim_max < need {
        bail!(
            "needs {need} open files, but the hard limit (ulimit -Hn) is {}; use --idle-connections with fewer",
            lim.rlim_max
        );
    }
    lim.rlim_cur = need;
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setrlimit(RLIMIT_NOFILE)");
    }
    Ok(())
}

fn wait_for_quiet(within: Duration) -> Option<String> {
    let deadline = Instant::now() + within;
    let mut said = false;
    loop {
        let c0 = CpuSample::now();
        std::thread::sleep(Duration::from_millis(500));
        let busy = c0.busy_since(&CpuSample::now());
        if busy.iter().all(|b| *b <= 15.0) {
            return None;
        }
        let text = busy.iter().map(|b| format!("{b:.0}%")).collect::<Vec<_>>().join(" / ");
        if Instant::now() >= deadline {
            return Some(format!("the machine was busy ({text}) and did not get quiet within {within:?}"));
        }
        if !said {
            eprintln!("tls-bench: waiting (up to {within:?}) for other work to stop: CPUs busy {text}");
            said = true;
        }
    }
}

/// The rampart binary: the given path, or a release build made now (a no-op when up to date).
fn locate_rampart(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        if !p.is_file() {
            bail!("RAMPART_BIN/--rampart-bin {} is not a file", p.display());
        }
        return Ok(p);
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("workspace dir")?.to_path_buf();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("tls-bench: building rampart (cargo build --release -p rampart --bin rampart)");
    // Cargo names the binary it built (whatever the target dir is) in its JSON messages.
    let out = Command::new(cargo)
        .args(["build", "--release", "-p", "rampart", "--bin", "rampart", "--message-format=json-render-diagnostics"])
        .current_dir(&workspace)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("run cargo build")?;
    if !out.status.success() {
        bail!("cargo build of rampart failed ({}); set RAMPART_BIN to use a built binary", out.status);
    }
    let bin = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "rampart")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .context("cargo did not report the rampart binary it built")?;
    Ok(bin)
}

/// CPUs this process may use.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it for this process.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &set)).collect()
    }
}

fn pin_self(cpus: &[usize]) -> std::io::Result<()> {
    // SAFETY: as above; the set only names CPUs we were allowed to use.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn list(cpus: &[usize]) -> String {
    cpus.iter().map(usize::to_string).collect::<Vec<_>>().join(",")
}

/// (contender CPUs, client + backend CPUs, description).
fn plan_cpus(threads: usize, no_pin: bool) -> anyhow::Result<(Cpus, Cpus, String)> {
    let cpus = allowed_cpus();
    let threads_line = format!(
        "{threads} thread(s) per contender: rampart {threads} tokio worker(s) (TOKIO_WORKER_THREADS), \
         HAProxy `nbthread {threads}`, nginx `worker_processes {threads}`"
    );
    if no_pin || cpus.len() <= threads {
        let why = if no_pin { "--no-pin" } else { "not enough CPUs to separate them" };
        return Ok((
            Cpus(None),
            Cpus(None),
            format!("no pinning ({why}): contenders, clients and the backend share all CPUs; {threads_line}"),
        ));
    }
    let (client, server) = cpus.split_at(cpus.len() - threads);
    Ok((
        Cpus(Some(list(server))),
        Cpus(Some(list(client))),
        format!(
            "contenders pinned to CPU {} (`taskset -c {}`); clients (wrk, the handshake client) and the backend \
             pinned to CPU {}; {threads_line}",
            list(server),
            list(server),
            list(client)
        ),
    ))
}

fn machine_line() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |k: &str| {
        cpuinfo
            .lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "?".into())
    };
    let model = field("model name");
    let cores = cpuinfo.lines().filter(|l| l.starts_with("processor")).count();
    let mhz = field("cpu MHz");
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    let os = std::fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME=").map(|v| v.trim_matches('"').to_string()))
        .unwrap_or_else(|| "?".into());
    let virt = if cpuinfo.contains(" hypervisor") { ", virtual machine" } else { "" };
    let load = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    format!("{model} ({cores} cores, {mhz} MHz{virt}), Linux {kernel}, {os}; load average before the run {load}")
}

fn versions_line(results: &[Contender], backend: &Server, rampart_bin: Option<&Path>) -> String {
    // What the binary says of its build (`rampart --version`: commit and profile), which holds
    // also for a RAMPART_BIN built from other sources than this checkout.
    let build = rampart_bin
        .and_then(|bin| Command::new(bin).arg("--version").output().ok())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .and_then(|v| Some(v.split_once('(')?.1.split_once(')')?.0.to_string()))
        .unwrap_or_else(|| "build unknown".into());
    let wrk = Command::new("wrk")
        .arg("-v")
        .output()
        .map(|o| {
            let t = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
            t.split_whitespace().nth(1).unwrap_or("?").to_string()
        })
        .unwrap_or_else(|_| "?".into());
    let mut parts: Vec<String> = results
        .iter()
        .map(|c| {
            if matches!(c.kind, Kind::Rampart | Kind::RampartNoHistograms | Kind::RampartTwin) {
                format!("{} ({build})", c.label)
            } else {
                c.label.clone()
            }
        })
        .collect();
    parts.push(format!("backend nginx {}", backend.version));
    parts.push(format!("OpenSSL {}", contenders::openssl_version()));
    parts.push(format!("wrk {wrk}"));
    parts.join(", ")
}
