//! Results per contender and round, their medians, and the markdown report.

use std::fmt::Write as _;

use super::{
    cgroup::Throttling,
    clients::{HsResult, RATE_TOLERANCE, RateResult, WrkResult, percentile_us},
    contenders::Kind,
    instructions::PerRequest,
};

/// The measurements of a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Run {
    /// wrk, closed loop, under the CPU budget: throughput.
    KeepAlive,
    /// The fixed-rate client, open loop, without the CPU budget: latency.
    FixedRate,
    /// New connections, under the CPU budget: handshakes/s.
    Handshakes,
}

impl Run {
    pub const ALL: [Run; 3] = [Run::KeepAlive, Run::FixedRate, Run::Handshakes];

    pub fn name(self) -> &'static str {
        match self {
            Run::KeepAlive => "keep-alive",
            Run::FixedRate => "fixed rate",
            Run::Handshakes => "handshakes",
        }
    }
}

/// What one measurement cost, and what else ran meanwhile.
#[derive(Clone, Debug, Default)]
pub struct Usage {
    /// CPU used by the contender's processes, in % of one core.
    pub cpu: f64,
    /// CPU used by the backend nginx, in % of one core.
    pub backend_cpu: f64,
    /// Busy % of each CPU.
    pub busy: Vec<f64>,
    /// CPU other programs on the machine used meanwhile, in % of one core.
    pub foreign: f64,
    /// Fixed-rate runs: how late the client woke for its sends, p99, µs (0 for other runs).
    pub client_late_us: f64,
    /// How often the contender's CPU budget stopped it (when it has one).
    pub throttle: Option<Throttling>,
}

impl Usage {
    /// Why the measurement does not count, if it does not: other programs took CPU, or the
    /// client itself (the measuring instrument) was stalled.
    pub fn disturbance(&self) -> Option<String> {
        if self.foreign > FOREIGN_LIMIT {
            Some(format!("other programs used {:.0}% of a core", self.foreign))
        } else if self.client_late_us > CLIENT_LATE_LIMIT_US {
            Some(format!(
                "the client itself woke {} late (p99) for requests it was waiting to send, over the {} limit",
                latency(self.client_late_us),
                latency(CLIENT_LATE_LIMIT_US)
            ))
        } else {
            None
        }
    }

    pub fn disturbed(&self) -> bool {
        self.disturbance().is_some()
    }
}

/// One round of one contender.
#[derive(Clone, Debug, Default)]
pub struct Round {
    pub keepalive: WrkResult,
    pub fixed_rate: RateResult,
    pub handshakes: HsResult,
    pub keepalive_usage: Usage,
    pub fixed_rate_usage: Usage,
    pub handshake_usage: Usage,
}

impl Round {
    pub fn usage(&self, run: Run) -> &Usage {
        match run {
            Run::KeepAlive => &self.keepalive_usage,
            Run::FixedRate => &self.fixed_rate_usage,
            Run::Handshakes => &self.handshake_usage,
        }
    }

    /// Requests/s or handshakes/s of a run.
    pub fn rate(&self, run: Run) -> f64 {
        match run {
            Run::KeepAlive => self.keepalive.rps,
            Run::FixedRate => self.fixed_rate.rps,
            Run::Handshakes => self.handshakes.rate(),
        }
    }

    /// (p50, p99) of a run, µs.
    pub fn latency(&self, run: Run) -> (f64, f64) {
        match run {
            Run::KeepAlive => (self.keepalive.p50_us, self.keepalive.p99_us),
            Run::FixedRate => (self.fixed_rate.p50_us, self.fixed_rate.p99_us),
            Run::Handshakes => (self.handshakes.p50_us, self.handshakes.p99_us),
        }
    }

    pub fn errors(&self, run: Run) -> u64 {
        match run {
            Run::KeepAlive => self.keepalive.errors(),
            Run::FixedRate => self.fixed_rate.error_count(),
            Run::Handshakes => self.handshakes.error_count(),
        }
    }
}

pub struct Contender {
    pub kind: Kind,
    pub label: String,
    pub setup: String,
    pub negotiated_openssl: String,
    pub rounds: Vec<Round>,
    /// Memory of idle keep-alive connections, when measured.
    pub idle: Option<IdleMemory>,
}

/// What a contender's processes held in memory with `connections` idle TLS keep-alive
/// connections open (each after one request), against just before they were opened.
#[derive(Clone, Debug, Default)]
pub struct IdleMemory {
    pub connections: usize,
    /// Resident set size summed over all the contender's processes, KiB.
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub processes: usize,
    /// How long opening them took.
    pub open_seconds: f64,
}

impl IdleMemory {
    /// KiB per connection: the RSS it added, averaged.
    pub fn per_connection_kib(&self) -> f64 {
        if self.connections == 0 {
            0.0
        } else {
            self.rss_after_kib.saturating_sub(self.rss_before_kib) as f64 / self.connections as f64
        }
    }
}

pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

/// (lowest, highest): the spread a median is reported with.
pub fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| (lo.min(x), hi.max(x)))
}

/// Median figures of one contender.
#[derive(Clone, Copy, Debug, Default)]
pub struct Summary {
    /// wrk's keep-alive requests/s under the budget.
    pub rps: f64,
    pub hps: f64,
    /// At the fixed rate, without the budget, from each request's scheduled time: percentiles of
    /// all the rounds' requests pooled.
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    /// The rate the fixed-rate client achieved.
    pub fixed_rps: f64,
    /// wrk's own (closed loop, under the budget): for reference.
    pub wrk_p50_us: f64,
    pub wrk_p99_us: f64,
    pub hs_p50_us: f64,
    pub hs_p99_us: f64,
}

/// A keep-alive measurement with the client CPU busier than this (%) was limited by the client:
/// the contenders' ratios understate their difference.
pub const CLIENT_BOUND: f64 = 90.0;

/// A measurement counts only if other programs used at most this much CPU meanwhile (% of one
/// core): on a shared machine, other work would be measured too.
pub const FOREIGN_LIMIT: f64 = 10.0;

/// A fixed-rate measurement counts only if the client woke for its sends at most this late at
/// p99 (µs). Its sleeps end on a timerfd, so lateness beyond a few tens of µs is the client CPU
/// stalled (in quiet rounds 40-90 µs); the backend shares that CPU, and every request in a
/// stall is charged to the contender. Seen on the 2-vCPU VM: the rounds with the worst p99
/// (3.8 ms against 0.3-1.7 ms) were those whose client was 1.6-1.8 ms late, for each contender.
pub const CLIENT_LATE_LIMIT_US: f64 = 500.0;

impl Contender {
    fn undisturbed(&self, run: Run) -> Vec<&Round> {
        self.rounds.iter().filter(|r| !r.usage(run).disturbed()).collect()
    }

    /// The rounds a figure comes from: the undisturbed ones, or all when every one was disturbed.
    fn used(&self, run: Run) -> Vec<&Round> {
        let v = self.undisturbed(run);
        if v.is_empty() { self.rounds.iter().collect() } else { v }
    }

    fn col(&self, run: Run, f: impl Fn(&Round) -> f64) -> Vec<f64> {
        self.used(run).into_iter().map(f).collect()
    }

    pub fn summary(&self) -> Summary {
        let fr = |f: fn(&RateResult) -> f64| median(self.col(Run::FixedRate, |r| f(&r.fixed_rate)));
        // Percentiles of every request of the rounds used, not medians of per-round percentiles: a
        // 3 s round's p99 is either the machine's quiet floor (~150 µs) or one of its stalls
        // (2-7 ms), depending on whether a stall fell into it, so per-round p99s are bimodal and
        // their median flips with a single round. Pooled, each contender's p99 covers all the
        // stalls it met, over the same interleaved minutes as the others.
        let mut pooled: Vec<u64> =
            self.used(Run::FixedRate).iter().flat_map(|r| r.fixed_rate.latencies_ns.iter().copied()).collect();
        pooled.sort_unstable();
        let (p50_us, p99_us, p999_us, max_us) = if pooled.is_empty() {
            // Results without their samples (the unit tests): medians of the rounds.
            (fr(|r| r.p50_us), fr(|r| r.p99_us), fr(|r| r.p999_us), fr(|r| r.max_us))
        } else {
            let pct = |p| percentile_us(&pooled, p);
            (pct(50.0), pct(99.0), pct(99.9), pct(100.0))
        };
        Summary {
            rps: median(self.col(Run::KeepAlive, |r| r.keepalive.rps)),
            hps: median(self.col(Run::Handshakes, |r| r.handshakes.rate())),
            p50_us,
            p99_us,
            p999_us,
            max_us,
            fixed_rps: fr(|r| r.rps),
            wrk_p50_us: median(self.col(Run::KeepAlive, |r| r.keepalive.p50_us)),
            wrk_p99_us: median(self.col(Run::KeepAlive, |r| r.keepalive.p99_us)),
            hs_p50_us: median(self.col(Run::Handshakes, |r| r.handshakes.p50_us)),
            hs_p99_us: median(self.col(Run::Handshakes, |r| r.handshakes.p99_us)),
        }
    }

    /// (undisturbed rounds, all rounds) of a run.
    pub fn clean_rounds(&self, run: Run) -> (usize, usize) {
        (self.undisturbed(run).len(), self.rounds.len())
    }

    /// Errors over all rounds of a run.
    pub fn errors(&self, run: Run) -> u64 {
        self.rounds.iter().map(|r| r.errors(run)).sum()
    }

    /// Rounds (1-based) whose fixed-rate run, among those the medians use, did not keep the rate.
    pub fn missed_rate(&self) -> Vec<usize> {
        let used = self.used(Run::FixedRate);
        self.rounds
            .iter()
            .enumerate()
            .filter(|(_, r)| !r.fixed_rate.kept_rate() && used.iter().any(|u| std::ptr::eq(*u, *r)))
            .map(|(i, _)| i + 1)
            .collect()
    }

    /// Round by round against `other`: the ratio `f(self) / f(other)` for every round that
    /// both measured undisturbed (the two ran one after the other, so a machine that slows
    /// down for a while slows both).
    pub fn paired(&self, other: &Contender, run: Run, f: impl Fn(&Round) -> f64) -> Vec<f64> {
        self.rounds
            .iter()
            .zip(&other.rounds)
            .filter(|(a, b)| !a.usage(run).disturbed() && !b.usage(run).disturbed())
            .map(|(a, b)| f(a) / f(b))
            .filter(|r| r.is_finite())
            .collect()
    }

    /// Every counted connection was checked to be a full handshake.
    pub fn handshakes_checked(&self) -> (u64, u64) {
        (self.rounds.iter().map(|r| r.handshakes.ok).sum(), self.rounds.iter().map(|r| r.handshakes.not_full).sum())
    }
}

pub fn thousands(x: f64) -> String {
    let n = x.round() as i64;
    let s = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

pub fn latency(us: f64) -> String {
    if us >= 1000.0 { format!("{:.2} ms", us / 1000.0) } else { format!("{us:.0} µs") }
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 { format!("{:.2}×", a / b) } else { "–".into() }
}

/// The CPU budget every contender gets.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    /// Percent of one core.
    pub percent: u32,
    /// Longest a contender that used up its quota stands stopped: period minus quota.
    pub stall_ms: f64,
}

/// Everything the report states besides the numbers.
pub struct Context {
    pub title: String,
    pub machine: String,
    pub versions: String,
    pub layout: String,
    /// The CPUs the clients and the backend run on (empty when not pinned).
    pub client_cpus: Vec<usize>,
    /// Each contender's CPU budget, when it has one.
    pub budget: Option<Budget>,
    /// How the main table's p50/p99 were measured (one sentence).
    pub latency: String,
    pub tls: String,
    pub backend: String,
    pub method: String,
    pub commands: Vec<String>,
    pub verification: Vec<String>,
    pub warnings: Vec<String>,
    pub configs: Vec<(String, String)>,
}

pub fn render(ctx: &Context, contenders: &[Contender]) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "### {}\n", ctx.title);
    for (k, v) in [
        ("Machine", &ctx.machine),
        ("Software", &ctx.versions),
        ("Layout", &ctx.layout),
        ("TLS", &ctx.tls),
        ("Backend", &ctx.backend),
        ("Method", &ctx.method),
    ] {
        let _ = writeln!(o, "- {k}: {v}");
    }
    let _ = writeln!(o);
    let _ = writeln!(o, "{}\n", ctx.latency);
    let _ = writeln!(o, "| contender | keep-alive req/s | full handshakes/s | p50 | p99 |");
    let _ = writeln!(o, "|---|---:|---:|---:|---:|");
    let sums: Vec<(Kind, Summary)> = contenders.iter().map(|c| (c.kind, c.summary())).collect();
    let mut missed = Vec::new();
    for (c, (_, s)) in contenders.iter().zip(&sums) {
        let rounds = c.missed_rate();
        let mark = if rounds.is_empty() { "" } else { " ⚠" };
        if !rounds.is_empty() {
            let target = c.rounds.first().map_or(0.0, |r| r.fixed_rate.target_rps);
            missed.push(format!(
                "{} (round(s) {}; median achieved {} of {} req/s)",
                c.label,
                rounds.iter().map(usize::to_string).collect::<Vec<_>>().join(", "),
                thousands(s.fixed_rps),
                thousands(target)
            ));
        }
        let _ = writeln!(
            o,
            "| {} | {} | {} | {}{mark} | {}{mark} |",
            c.label,
            thousands(s.rps),
            thousands(s.hps),
            latency(s.p50_us),
            latency(s.p99_us)
        );
    }
    let find = |k: Kind| sums.iter().find(|(kk, _)| *kk == k).map(|(_, s)| *s);
    if let Some(r) = find(Kind::Rampart) {
        for other in [Kind::Haproxy, Kind::Nginx] {
            if let Some(b) = find(other) {
                let _ = writeln!(
                    o,
                    "| **rampart / {}** | {} | {} | {} | {} |",
                    other.name(),
                    ratio(r.rps, b.rps),
                    ratio(r.hps, b.hps),
                    ratio(r.p50_us, b.p50_us),
                    ratio(r.p99_us, b.p99_us)
                );
            }
        }
        let _ =
            writeln!(o, "\nRatios above 1 are better for req/s and handshakes/s; below 1 are better for p50 and p99.");
    }
    if !missed.is_empty() {
        let _ = writeln!(
            o,
            "⚠ **could not keep the rate**: {}. That contender is saturated at this rate (achieved rate more than \
             {:.0}% off the target, or requests left unsent): its p50/p99 measure its queue, not its latency.",
            missed.join("; "),
            RATE_TOLERANCE * 100.0
        );
    }
    if let (Some(r), Some(h)) = (find(Kind::Rampart), find(Kind::Haproxy)) {
        let verdict = |ok: bool| if ok { "met" } else { "**not met**" };
        let _ = writeln!(
            o,
            "Targets (issue 3) against HAProxy: req/s ≥ 1.2×: {} ({}); full handshakes/s ≥ 1.5×: {} ({}); \
             p99 no worse: {} ({} vs {}, at the fixed rate).",
            verdict(r.rps >= 1.2 * h.rps),
            ratio(r.rps, h.rps),
            verdict(r.hps >= 1.5 * h.hps),
            ratio(r.hps, h.hps),
            verdict(r.p99_us <= h.p99_us),
            latency(r.p99_us),
            latency(h.p99_us),
        );
    }

    if let (Some(r), Some(h)) =
        (contenders.iter().find(|c| c.kind == Kind::Rampart), contenders.iter().find(|c| c.kind == Kind::Haproxy))
    {
        let _ = writeln!(o, "\n{}", paired_line(r, h));
    }

    if let (Some(r), Some(n)) = (
        contenders.iter().find(|c| c.kind == Kind::Rampart),
        contenders.iter().find(|c| c.kind == Kind::RampartNoHistograms),
    ) {
        let twin = contenders.iter().find(|c| c.kind == Kind::RampartTwin);
        let _ = writeln!(o, "\n{}", histogram_cost(r, n, twin));
    }

    idle_table(&mut o, contenders);

    if let Some(line) = client_bound(ctx, contenders) {
        let _ = writeln!(o, "\n{line}");
    }

    let _ = writeln!(
        o,
        "\nWhere the CPU went (medians over the rounds that other programs left alone; \"per core-second\" = \
         rate ÷ the contender's own CPU use{}):\n",
        ctx.budget
            .map(|b| format!(
                "; every contender's budget is {}% of one core in the keep-alive and handshake runs, none in the \
                 fixed-rate runs",
                b.percent
            ))
            .unwrap_or_default()
    );
    let _ = writeln!(
        o,
        "| contender | run | rate (min–max) | rounds used | contender CPU | backend CPU | CPU busy (each core) | per core-second | errors | p50 / p99 |"
    );
    let _ = writeln!(o, "|---|---|---|---|---:|---:|---|---:|---:|---|");
    for c in contenders {
        let summary = c.summary();
        for run in Run::ALL {
            let rounds = c.used(run);
            let med = |f: &dyn Fn(&Round) -> f64| median(rounds.iter().map(|r| f(r)).collect());
            let rates: Vec<f64> = rounds.iter().map(|r| r.rate(run)).collect();
            let (rate, cpu) = (median(rates.clone()), med(&|r| r.usage(run).cpu));
            let busy = {
                let n = rounds.first().map_or(0, |r| r.usage(run).busy.len());
                (0..n)
                    .map(|i| format!("{:.0}%", med(&|r| r.usage(run).busy.get(i).copied().unwrap_or(0.0))))
                    .collect::<Vec<_>>()
                    .join(" / ")
            };
            let used = {
                let (clean, all) = c.clean_rounds(run);
                if clean == 0 { format!("all {all}, **all disturbed**") } else { format!("{clean} of {all}") }
            };
            let (lo, hi) = min_max(&rates);
            let unit = if run == Run::Handshakes { "hs" } else { "req" };
            let _ = writeln!(
                o,
                "| {} | {} | {} ({}–{}) | {} | {:.0}% | {:.0}% | {} | {} | {} | {} / {} |",
                c.label,
                run.name(),
                thousands(rate),
                thousands(lo),
                thousands(hi),
                used,
                cpu,
                med(&|r| r.usage(run).backend_cpu),
                busy,
                if cpu > 0.0 { format!("{} {unit}", thousands(rate / (cpu / 100.0))) } else { "–".into() },
                c.errors(run),
                latency(if run == Run::FixedRate { summary.p50_us } else { med(&|r| r.latency(run).0) }),
                latency(if run == Run::FixedRate { summary.p99_us } else { med(&|r| r.latency(run).1) }),
            );
        }
    }
    let _ = writeln!(
        o,
        "\np50 / p99 per run: keep-alive: wrk's own, for reference only (closed loop: {} connections always \
         waiting{}); fixed rate: as in the main table; handshakes: TCP connect to the last response byte.",
        contenders
            .first()
            .and_then(|c| c.rounds.first())
            .map_or_else(|| "all".to_string(), |r| r.fixed_rate.connections.to_string()),
        ctx.budget
            .map(|b| format!(
                ", under the budget, which stops a contender that used up its quota for up to {:.0} ms, so every \
                 stall hits requests in flight and these mostly measure the budget",
                b.stall_ms
            ))
            .unwrap_or_default()
    );

    throttling_table(&mut o, contenders);

    let _ = writeln!(o, "\nSetup per contender:\n");
    for c in contenders {
        let _ = writeln!(o, "- {}: {}; an OpenSSL client negotiates {}.", c.label, c.setup, c.negotiated_openssl);
    }
    let _ = writeln!(o, "\nClient commands:\n");
    for cmd in &ctx.commands {
        let _ = writeln!(o, "- {cmd}");
    }
    let _ = writeln!(o, "\nChecks in the handshake runs (no session resumption, real handshakes):\n");
    for v in &ctx.verification {
        let _ = writeln!(o, "- {v}");
    }
    if !ctx.warnings.is_empty() {
        let _ = writeln!(o, "\nWarnings:\n");
        for w in &ctx.warnings {
            let _ = writeln!(o, "- {w}");
        }
    }

    let _ = writeln!(o, "\n<details><summary>Every round</summary>\n");
    let _ = writeln!(
        o,
        "| round | contender | req/s | wrk p50 | wrk p99 | wrk errors | handshakes/s | handshake errors | other programs' CPU (keep-alive / handshakes) |"
    );
    let _ = writeln!(o, "|---:|---|---:|---:|---:|---:|---:|---|---|");
    let rounds = contenders.iter().map(|c| c.rounds.len()).max().unwrap_or(0);
    for i in 0..rounds {
        for c in contenders {
            let Some(r) = c.rounds.get(i) else { continue };
            let errs = if r.handshakes.errors.is_empty() && r.handshakes.not_full == 0 {
                "0".to_string()
            } else {
                let mut v: Vec<String> = r.handshakes.errors.iter().map(|(k, n)| format!("{k}: {n}")).collect();
                if r.handshakes.not_full > 0 {
                    v.push(format!("not a full handshake: {}", r.handshakes.not_full));
                }
                v.join(", ")
            };
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {:.0}% / {:.0}% |",
                i + 1,
                c.label,
                thousands(r.keepalive.rps),
                latency(r.keepalive.p50_us),
                latency(r.keepalive.p99_us),
                r.keepalive.errors(),
                thousands(r.handshakes.rate()),
                errs,
                r.keepalive_usage.foreign,
                r.handshake_usage.foreign
            );
        }
    }
    let _ = writeln!(
        o,
        "\nFixed rate, every round (latency from each request's scheduled send time; \"sent late\": how long after \
         its scheduled time a request went out, p99 / max; \"client woke late\": the same for the requests whose \
         connection was idle, so only the client's own lateness, p99; ⚠: over {}, so the measurement was taken \
         again and, if still over, left out):\n",
        latency(CLIENT_LATE_LIMIT_US)
    );
    let _ = writeln!(
        o,
        "| round | contender | target req/s | achieved req/s | p50 | p99 | p99.9 | max | sent late | client woke late | errors | other programs' CPU |"
    );
    let _ = writeln!(o, "|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---|---:|");
    for i in 0..rounds {
        for c in contenders {
            let Some(r) = c.rounds.get(i) else { continue };
            let f = &r.fixed_rate;
            let errs = if f.errors.is_empty() {
                "0".to_string()
            } else {
                f.errors.iter().map(|(k, n)| format!("{k}: {n}")).collect::<Vec<_>>().join(", ")
            };
            let achieved = if f.kept_rate() {
                thousands(f.rps)
            } else {
                let unsent =
                    if f.unsent > 0 { format!(", {} unsent", thousands(f.unsent as f64)) } else { String::new() };
                format!("{} ⚠ could not keep the rate{unsent}", thousands(f.rps))
            };
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} / {} | {}{} | {} | {:.0}% |",
                i + 1,
                c.label,
                thousands(f.target_rps),
                achieved,
                latency(f.p50_us),
                latency(f.p99_us),
                latency(f.p999_us),
                latency(f.max_us),
                latency(f.lag_p99_us),
                latency(f.lag_max_us),
                latency(f.wake_late_p99_us),
                if r.fixed_rate_usage.client_late_us > CLIENT_LATE_LIMIT_US { " ⚠" } else { "" },
                errs,
                r.fixed_rate_usage.foreign
            );
        }
    }
    let _ = writeln!(o, "\n</details>");
    for (name, text) in &ctx.configs {
        let _ = writeln!(o, "\n<details><summary>{name}</summary>\n\n```\n{}\n```\n</details>", text.trim_end());
    }
    o
}

/// Mean busy % of the client CPUs during a keep-alive measurement.
/// The targets round by round: how often each held, and the spread of the per-round ratios.
/// Memory per idle TLS keep-alive connection, with rampart's ratios.
fn idle_table(o: &mut String, contenders: &[Contender]) {
    let measured: Vec<(&Contender, &IdleMemory)> =
        contenders.iter().filter_map(|c| Some((c, c.idle.as_ref()?))).collect();
    let Some((_, first)) = measured.first() else { return };
    let _ = writeln!(
        o,
        "\nMemory per idle TLS keep-alive connection: {} TLS 1.3 connections opened (full handshake, one `GET {}` \
         checked), then held open and idle; the resident set size (VmRSS) of all the contender's processes summed, \
         just before they were opened (after the rounds above) and with all of them open, 1 s after the last \
         opened. The difference ÷ the connections is what one connection costs in the contender's own memory \
         (kernel socket buffers are not in it, and are alike for all):\n",
        thousands(first.connections as f64),
        super::PATH
    );
    let _ = writeln!(o, "| contender | processes | RSS before | RSS with the connections open | per idle connection |");
    let _ = writeln!(o, "|---|---:|---:|---:|---:|");
    for (c, m) in &measured {
        let _ = writeln!(
            o,
            "| {} | {} | {} KiB | {} KiB | {:.1} KiB |",
            c.label,
            m.processes,
            thousands(m.rss_before_kib as f64),
            thousands(m.rss_after_kib as f64),
            m.per_connection_kib()
        );
    }
    let find = |k: Kind| measured.iter().find(|(c, _)| c.kind == k).map(|(_, m)| m.per_connection_kib());
    if let Some(r) = find(Kind::Rampart) {
        for other in [Kind::Haproxy, Kind::Nginx] {
            if let Some(b) = find(other) {
                let _ = writeln!(o, "| **rampart / {}** | | | | {} |", other.name(), ratio(r, b));
            }
        }
        let _ = writeln!(o, "\nBelow 1 is better: less memory per connection.");
    }
}

fn paired_line(r: &Contender, h: &Contender) -> String {
    let part = |what: &str, ratios: Vec<f64>, ok: fn(f64) -> bool| {
        if ratios.is_empty() {
            return format!("{what}: no round where both were undisturbed");
        }
        let held = ratios.iter().filter(|&&x| ok(x)).count();
        let (lo, hi) = min_max(&ratios);
        let n = ratios.len();
        format!("{what}: {held} of {n} (ratios {lo:.2}–{hi:.2}×, median {:.2}×)", median(ratios))
    };
    format!(
        "Round by round against HAProxy (each round's two measurements of a kind, taken one after the other; \
         undisturbed rounds only), the rounds in which the target held: {}; {}; {}.",
        part("req/s ≥ 1.2×", r.paired(h, Run::KeepAlive, |x| x.keepalive.rps), |x| x >= 1.2),
        part("full handshakes/s ≥ 1.5×", r.paired(h, Run::Handshakes, |x| x.handshakes.rate()), |x| x >= 1.5),
        part("p99 no worse", r.paired(h, Run::FixedRate, |x| x.fixed_rate.p99_us), |x| x <= 1.0),
    )
}

/// The latency histograms' cost (issue 14: under 2 % of keep-alive req/s): rampart with them
/// (`r`) against the same binary without them (`n`, `[admin] latency_histograms = false`), round
/// by round, beside the noise. With `twin` (a second rampart identical to `r`), the noise is the
/// A/A control's: how far the paired ratio of two contenders doing the same work strays from 1
/// (the bench's own bias between positions, cgroups and processes); without it, how far apart
/// `n`'s own rounds are (which also holds the machine's drift, so it overstates the noise).
pub fn histogram_cost(r: &Contender, n: &Contender, twin: Option<&Contender>) -> String {
    let keepalive = |a: &Contender, b: &Contender| {
        let ratios = a.paired(b, Run::KeepAlive, |x| x.keepalive.rps);
        if !ratios.is_empty() {
            return (ratios, false);
        }
        // As the medians do: disturbed rounds rather than none, said as such.
        let mut all: Vec<f64> =
            a.rounds.iter().zip(&b.rounds).map(|(x, y)| x.keepalive.rps / y.keepalive.rps).collect();
        all.retain(|x| x.is_finite());
        (all, true)
    };
    let list = |v: &[f64]| v.iter().map(|x| format!("{x:.3}×")).collect::<Vec<_>>().join(", ");
    let (ratios, disturbed) = keepalive(r, n);
    let mut caveat = if disturbed {
        " **Every round was disturbed by other programs' CPU use: these figures are from disturbed rounds.**"
    } else {
        ""
    };
    if ratios.is_empty() {
        return "Latency histograms' cost: no round measured both rampart contenders.".into();
    }
    let (lo, hi) = min_max(&ratios);
    let cost = 1.0 - median(ratios.clone());
    let (noise, noise_said) = match twin.map(|t| keepalive(r, t)) {
        Some((control, control_disturbed)) if !control.is_empty() => {
            if control_disturbed {
                caveat = " **Every round was disturbed by other programs' CPU use: these figures are from disturbed rounds.**";
            }
            let (clo, chi) = min_max(&control);
            let bias = median(control.clone()) - 1.0;
            // The largest distance from 1 of any A/A round: what the bench alone can make of
            // two identical contenders.
            let noise = control.iter().map(|x| (x - 1.0).abs()).fold(0.0, f64::max);
            (
                noise,
                format!(
                    "the noise, from the A/A control (rampart ÷ rampart-twin, two identical contenders with histograms, paired the same way), per round: {} (median {:.3}×, so a bias of {:+.1} %; range {clo:.3}–{chi:.3}×): the farthest round is {:.1} % from 1×",
                    list(&control),
                    1.0 + bias,
                    bias * 100.0,
                    noise * 100.0
                ),
            )
        }
        _ => {
            let own = n.col(Run::KeepAlive, |x| x.keepalive.rps);
            let (nlo, nhi) = min_max(&own);
            let noise = if median(own.clone()) > 0.0 { (nhi - nlo) / median(own) } else { f64::NAN };
            (
                noise,
                format!(
                    "the noise, the spread of the no-histogram contender's own rounds ((max − min) ÷ median; add rampart-twin for an A/A control), is {:.1} %",
                    noise * 100.0
                ),
            )
        }
    };
    // Only a run whose own noise is under the 2 % can say the cost is under it.
    let verdict = if cost >= 0.02 && cost > noise {
        "**not met**".to_string()
    } else if noise < 0.02 {
        if cost < 0.02 { "met".into() } else { "**not met**".into() }
    } else {
        format!("**cannot tell**: this run's noise ({:.1} %) is larger than the 2 % to tell", noise * 100.0)
    };
    let inside = if cost.abs() <= noise { "inside" } else { "outside" };
    format!(
        "Latency histograms' cost (issue 14: under 2 % of keep-alive req/s): {verdict}. Keep-alive req/s of rampart \
         with histograms ÷ without (`[admin] latency_histograms = false`, same binary, alternating within rounds), \
         per round: {} (median {:.3}×, range {lo:.3}–{hi:.3}×), so the histograms cost {:.1} % of req/s; {noise_said}: \
         the difference is {inside} it.{caveat}",
        list(&ratios),
        1.0 - cost,
        cost * 100.0,
    )
}

/// The histograms' cost in the daemon's own instructions per request (callgrind; see
/// [`super::instructions`]), against the same 2 % target.
pub fn instruction_cost(on: &PerRequest, off: &PerRequest) -> String {
    let (a, b) = (on.instructions(), off.instructions());
    let cost = a / b - 1.0;
    let verdict = if cost < 0.02 { "met" } else { "**not met**" };
    let runs = |p: &PerRequest| {
        let v: Vec<String> = p
            .runs
            .iter()
            .map(|(n, i)| format!("{} requests: {}", thousands(*n as f64), thousands(*i as f64)))
            .collect();
        v.join("; ")
    };
    format!(
        "Latency histograms' cost in instructions (callgrind; the daemon's own user-space instructions, the same \
         from run to run whatever else the machine does; the kernel's share of a request, equal in both, is left \
         out, so this overstates the cost): {verdict}. With histograms {} instructions per request, without {}: \
         {:+.2} % (each the slope between two runs serving different numbers of keep-alive requests over 4 TLS \
         connections, so start-up, handshakes and shutdown cancel out; with: {}; without: {}).",
        thousands(a),
        thousands(b),
        cost * 100.0,
        runs(on),
        runs(off),
    )
}

fn client_busy(ctx: &Context, r: &Round) -> Option<f64> {
    let v: Vec<f64> = ctx.client_cpus.iter().filter_map(|&c| r.keepalive_usage.busy.get(c).copied()).collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// Flags keep-alive measurements in which the client CPU, not the contender, set the rate (of
/// those the medians use: a disturbed one was busy with other programs' work too).
fn client_bound(ctx: &Context, contenders: &[Contender]) -> Option<String> {
    let cpus = format!("CPU {}", ctx.client_cpus.iter().map(usize::to_string).collect::<Vec<_>>().join(","));
    let mut any = false;
    let mut hits = Vec::new();
    for c in contenders {
        let all_disturbed = c.undisturbed(Run::KeepAlive).is_empty();
        for (i, r) in c.rounds.iter().enumerate() {
            if !all_disturbed && r.keepalive_usage.foreign > FOREIGN_LIMIT {
                continue;
            }
            let Some(busy) = client_busy(ctx, r) else { continue };
            any = true;
            if busy > CLIENT_BOUND {
                hits.push(format!("{} round {} ({busy:.0}%)", c.label, i + 1));
            }
        }
    }
    if hits.is_empty() {
        return any.then(|| {
            format!(
                "The client CPU ({cpus}) stayed under {CLIENT_BOUND:.0}% busy in every keep-alive measurement the \
                 medians use."
            )
        });
    }
    Some(format!(
        "**client-bound: ratios understate the difference** — the client CPU ({cpus}) was over {CLIENT_BOUND:.0}% \
         busy in {} keep-alive measurement(s) the medians use: {}.",
        hits.len(),
        hits.join(", ")
    ))
}

/// How often each contender's CPU budget stopped it (from its cgroup's cpu.stat).
fn throttling_table(o: &mut String, contenders: &[Contender]) {
    if !contenders.iter().flat_map(|c| &c.rounds).any(|r| r.keepalive_usage.throttle.is_some()) {
        return;
    }
    let _ = writeln!(
        o,
        "\nThe CPU budget at work (the contender's cgroup cpu.stat, medians over the rounds used): enforcement \
         periods in which the contender ran, those in which it used up its quota and was stopped until the next, \
         and how long it was stopped per second. The fixed-rate runs have the quota lifted, so they must show \
         none:\n"
    );
    let _ = writeln!(o, "| contender | run | periods | throttled periods | stopped per second |");
    let _ = writeln!(o, "|---|---|---:|---:|---:|");
    for c in contenders {
        for run in Run::ALL {
            let t: Vec<Throttling> = c.used(run).into_iter().filter_map(|r| r.usage(run).throttle).collect();
            if t.is_empty() {
                continue;
            }
            let periods = median(t.iter().map(|t| t.periods as f64).collect());
            let throttled = median(t.iter().map(|t| t.throttled as f64).collect());
            let share = if periods > 0.0 { format!(" ({:.0}%)", 100.0 * throttled / periods) } else { String::new() };
            let _ = writeln!(
                o,
                "| {} | {} | {} | {}{share} | {:.0} ms |",
                c.label,
                run.name(),
                thousands(periods),
                thousands(throttled),
                median(t.iter().map(|t| t.throttled_ms_per_s).collect())
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_formats() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(thousands(1234567.4), "1,234,567");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(latency(812.0), "812 µs");
        assert_eq!(latency(2740.0), "2.74 ms");
        assert_eq!(ratio(3.0, 2.0), "1.50×");
    }

    /// A contender with these rounds and nothing else.
    fn contender(kind: Kind, rounds: Vec<Round>) -> Contender {
        Contender {
            kind,
            label: kind.name().into(),
            setup: String::new(),
            negotiated_openssl: String::new(),
            rounds,
            idle: None,
        }
    }

    #[test]
    fn flags_client_bound_runs() {
        let ctx = Context {
            title: String::new(),
            machine: String::new(),
            versions: String::new(),
            layout: String::new(),
            client_cpus: vec![0],
            budget: None,
            latency: String::new(),
            tls: String::new(),
            backend: String::new(),
            method: String::new(),
            commands: Vec::new(),
            verification: Vec::new(),
            warnings: Vec::new(),
            configs: Vec::new(),
        };
        let round = |client: f64| Round {
            keepalive_usage: Usage { busy: vec![client, 50.0], ..Usage::default() },
            ..Round::default()
        };
        let c = |rounds| contender(Kind::Nginx, rounds);
        let calm = client_bound(&ctx, &[c(vec![round(60.0), round(90.0)])]).unwrap();
        assert!(calm.starts_with("The client CPU (CPU 0) stayed under 90%"), "{calm}");
        let bound = client_bound(&ctx, &[c(vec![round(60.0), round(97.0)])]).unwrap();
        assert!(bound.contains("ratios understate the difference") && bound.contains("nginx round 2 (97%)"), "{bound}");
        // A measurement left out of the medians (other programs were busy) is not flagged.
        let mut disturbed = round(97.0);
        disturbed.keepalive_usage.foreign = 50.0;
        let calm = client_bound(&ctx, &[c(vec![round(60.0), disturbed])]).unwrap();
        assert!(calm.starts_with("The client CPU"), "{calm}");
        assert_eq!(client_bound(&Context { client_cpus: Vec::new(), ..ctx }, &[c(vec![round(99.0)])]), None);
    }

    #[test]
    fn pairs_rounds_and_skips_disturbed_ones() {
        let round = |rps: f64, p99: f64, foreign: f64| Round {
            keepalive: WrkResult { rps, ..WrkResult::default() },
            fixed_rate: RateResult { p99_us: p99, ..RateResult::default() },
            keepalive_usage: Usage { foreign, ..Usage::default() },
            ..Round::default()
        };
        let r = contender(
            Kind::Rampart,
            vec![round(130.0, 900.0, 0.0), round(110.0, 1100.0, 0.0), round(500.0, 1.0, 50.0)],
        );
        let h = contender(
            Kind::Haproxy,
            vec![round(100.0, 1000.0, 0.0), round(100.0, 1000.0, 0.0), round(100.0, 1000.0, 0.0)],
        );
        // Round 3's keep-alive run was disturbed: left out of req/s, kept for p99.
        assert_eq!(r.paired(&h, Run::KeepAlive, |x| x.keepalive.rps), vec![1.3, 1.1]);
        let line = paired_line(&r, &h);
        assert!(line.contains("req/s ≥ 1.2×: 1 of 2 (ratios 1.10–1.30×, median 1.20×)"), "{line}");
        assert!(line.contains("p99 no worse: 2 of 3"), "{line}");
        assert!(line.contains("full handshakes/s ≥ 1.5×: no round where both were undisturbed"), "{line}");
    }

    #[test]
    fn histogram_cost_against_the_noise() {
        let round = |rps: f64, foreign: f64| Round {
            keepalive: WrkResult { rps, ..WrkResult::default() },
            keepalive_usage: Usage { foreign, ..Usage::default() },
            ..Round::default()
        };
        let n = contender(Kind::RampartNoHistograms, vec![round(1000.0, 0.0), round(1010.0, 0.0), round(995.0, 0.0)]);
        let r = contender(Kind::Rampart, vec![round(990.0, 0.0), round(999.9, 0.0), round(500.0, 50.0)]);
        let line = histogram_cost(&r, &n, None);
        // Rounds 1 and 2 (round 3 was disturbed): 0.99 each, so 1 %; the noise 15 / 1000.
        assert!(line.contains(": met.") && line.contains("0.990×, 0.990×"), "{line}");
        assert!(
            line.contains("cost 1.0 % of req/s") && line.contains("is 1.5 %: the difference is inside it"),
            "{line}"
        );
        let r = contender(Kind::Rampart, vec![round(900.0, 0.0), round(909.0, 0.0), round(895.5, 0.0)]);
        let line = histogram_cost(&r, &n, None);
        assert!(line.contains("**not met**") && line.contains("cost 10.0 %") && line.contains("outside it"), "{line}");
        // A noisy run cannot say 1 % is under 2 %.
        let n = contender(Kind::RampartNoHistograms, vec![round(1000.0, 0.0), round(1040.0, 0.0), round(980.0, 0.0)]);
        let r = contender(Kind::Rampart, vec![round(990.0, 0.0), round(1029.6, 0.0), round(970.2, 0.0)]);
        let line = histogram_cost(&r, &n, None);
        assert!(line.contains("**cannot tell**: this run's noise (6.0 %)"), "{line}");
        let all = |rps| contender(Kind::Rampart, vec![round(rps, 50.0)]);
        let line = histogram_cost(&all(990.0), &contender(Kind::RampartNoHistograms, vec![round(1000.0, 50.0)]), None);
        assert!(line.contains("cost 1.0 %") && line.contains("from disturbed rounds"), "{line}");
    }

    #[test]
    fn histogram_cost_against_an_a_a_control() {
        let round = |rps: f64| Round { keepalive: WrkResult { rps, ..WrkResult::default() }, ..Round::default() };
        // The machine drifts between rounds (n's own spread is 50 %), but paired rounds agree.
        let n = contender(Kind::RampartNoHistograms, vec![round(1000.0), round(1500.0), round(1200.0)]);
        let r = contender(Kind::Rampart, vec![round(995.0), round(1491.0), round(1194.0)]);
        let twin = contender(Kind::RampartTwin, vec![round(1000.0), round(1497.0), round(1200.0)]);
        let line = histogram_cost(&r, &n, Some(&twin));
        // Cost: 0.995, 0.994, 0.995 → 0.5 %; the control strays at most 0.5 % from 1.
        assert!(line.contains(": met.") && line.contains("cost 0.5 % of req/s"), "{line}");
        assert!(line.contains("A/A control") && line.contains("0.995×, 0.996×, 0.995×"), "{line}");
        assert!(line.contains("the farthest round is 0.5 % from 1×"), "{line}");
        // Without the control, the drift makes the same run unable to tell.
        assert!(histogram_cost(&r, &n, None).contains("**cannot tell**"));
        // A control that strays as far as the cost: the difference is the bench's own.
        let twin = contender(Kind::RampartTwin, vec![round(1100.0), round(1400.0), round(1300.0)]);
        let line = histogram_cost(&r, &n, Some(&twin));
        assert!(line.contains("**cannot tell**") && line.contains("inside it"), "{line}");
    }

    #[test]
    fn a_stalled_client_disturbs_a_measurement() {
        let quiet = Usage { client_late_us: 80.0, ..Usage::default() };
        assert_eq!(quiet.disturbance(), None);
        let stalled = Usage { client_late_us: 1800.0, ..Usage::default() };
        assert!(stalled.disturbance().is_some_and(|w| w.contains("1.80 ms late")), "{:?}", stalled.disturbance());
        let busy = Usage { foreign: 30.0, ..Usage::default() };
        assert!(busy.disturbance().is_some_and(|w| w.contains("30% of a core")));
        // A stalled fixed-rate round drops out of the pooled percentiles and of the pairs.
        let round = |p99: f64, late: f64| Round {
            fixed_rate: RateResult { p99_us: p99, ..RateResult::default() },
            fixed_rate_usage: Usage { client_late_us: late, ..Usage::default() },
            ..Round::default()
        };
        let r = contender(Kind::Rampart, vec![round(300.0, 50.0), round(3800.0, 1700.0), round(400.0, 60.0)]);
        let h = contender(Kind::Haproxy, vec![round(350.0, 50.0), round(500.0, 70.0), round(300.0, 60.0)]);
        assert_eq!(r.summary().p99_us, 350.0, "median of rounds 1 and 3");
        assert_eq!(r.paired(&h, Run::FixedRate, |x| x.fixed_rate.p99_us).len(), 2);
    }

    #[test]
    fn memory_per_idle_connection() {
        let idle = |before, after| {
            Some(IdleMemory {
                connections: 1000,
                rss_before_kib: before,
                rss_after_kib: after,
                processes: 1,
                open_seconds: 1.0,
            })
        };
        let mut r = contender(Kind::Rampart, Vec::new());
        r.idle = idle(10_000, 30_000);
        let mut h = contender(Kind::Haproxy, Vec::new());
        h.idle = idle(20_000, 30_000);
        assert_eq!(r.idle.as_ref().unwrap().per_connection_kib(), 20.0);
        let mut o = String::new();
        idle_table(&mut o, &[r, h]);
        assert!(o.contains("| rampart | 1 | 10,000 KiB | 30,000 KiB | 20.0 KiB |"), "{o}");
        assert!(o.contains("| **rampart / HAProxy** | | | | 2.00× |"), "{o}");
        // Not measured: no table.
        let mut o = String::new();
        idle_table(&mut o, &[contender(Kind::Rampart, Vec::new())]);
        assert!(o.is_empty());
    }
}
