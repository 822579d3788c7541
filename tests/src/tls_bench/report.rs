//! Results per contender and round, their medians, and the markdown report.

use std::fmt::Write as _;

use super::{
    cgroup::Throttling,
    clients::{HsResult, WrkResult},
    contenders::Kind,
};

/// One round of one contender.
#[derive(Clone, Debug, Default)]
pub struct Round {
    pub keepalive: WrkResult,
    /// CPU used by the contender's processes during the run, in % of one core.
    pub keepalive_cpu: f64,
    /// CPU used by the backend nginx, in % of one core.
    pub keepalive_backend_cpu: f64,
    /// Busy % of each CPU during the run.
    pub keepalive_busy: Vec<f64>,
    /// CPU other programs on the machine used meanwhile, in % of one core.
    pub keepalive_foreign: f64,
    /// How often the contender's CPU budget stopped it (when it has one).
    pub keepalive_throttle: Option<Throttling>,
    pub handshakes: HsResult,
    pub handshake_cpu: f64,
    pub handshake_backend_cpu: f64,
    pub handshake_busy: Vec<f64>,
    pub handshake_foreign: f64,
    pub handshake_throttle: Option<Throttling>,
}

pub struct Contender {
    pub kind: Kind,
    pub label: String,
    pub setup: String,
    pub negotiated_openssl: String,
    pub rounds: Vec<Round>,
}

pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| (lo.min(x), hi.max(x)))
}

/// Median figures of one contender.
#[derive(Clone, Copy, Debug, Default)]
pub struct Summary {
    pub rps: f64,
    pub hps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub ka_cpu: f64,
    pub hs_cpu: f64,
    pub ka_backend_cpu: f64,
    pub hs_backend_cpu: f64,
    pub hs_p50_us: f64,
    pub hs_p99_us: f64,
}

/// A keep-alive measurement with the client CPU busier than this (%) was limited by the client:
/// the contenders' ratios understate their difference.
pub const CLIENT_BOUND: f64 = 90.0;

/// A measurement counts only if other programs used at most this much CPU meanwhile (% of one
/// core): on a shared machine, other work would be measured too.
pub const FOREIGN_LIMIT: f64 = 10.0;

impl Contender {
    fn undisturbed(&self, handshakes: bool) -> Vec<&Round> {
        let foreign = |r: &Round| if handshakes { r.handshake_foreign } else { r.keepalive_foreign };
        self.rounds.iter().filter(|r| foreign(r) <= FOREIGN_LIMIT).collect()
    }

    /// The rounds a figure comes from: the undisturbed ones, or all when every one was disturbed.
    fn used(&self, handshakes: bool) -> Vec<&Round> {
        let v = self.undisturbed(handshakes);
        if v.is_empty() { self.rounds.iter().collect() } else { v }
    }

    fn col(&self, handshakes: bool, f: impl Fn(&Round) -> f64) -> Vec<f64> {
        self.used(handshakes).into_iter().map(f).collect()
    }

    pub fn summary(&self) -> Summary {
        Summary {
            rps: median(self.col(false, |r| r.keepalive.rps)),
            hps: median(self.col(true, |r| r.handshakes.rate())),
            p50_us: median(self.col(false, |r| r.keepalive.p50_us)),
            p99_us: median(self.col(false, |r| r.keepalive.p99_us)),
            ka_cpu: median(self.col(false, |r| r.keepalive_cpu)),
            hs_cpu: median(self.col(true, |r| r.handshake_cpu)),
            ka_backend_cpu: median(self.col(false, |r| r.keepalive_backend_cpu)),
            hs_backend_cpu: median(self.col(true, |r| r.handshake_backend_cpu)),
            hs_p50_us: median(self.col(true, |r| r.handshakes.p50_us)),
            hs_p99_us: median(self.col(true, |r| r.handshakes.p99_us)),
        }
    }

    /// (undisturbed rounds, all rounds) of the keep-alive or handshake runs.
    pub fn clean_rounds(&self, handshakes: bool) -> (usize, usize) {
        (self.undisturbed(handshakes).len(), self.rounds.len())
    }

    pub fn errors(&self) -> (u64, u64) {
        (
            self.rounds.iter().map(|r| r.keepalive.errors()).sum(),
            self.rounds.iter().map(|r| r.handshakes.error_count()).sum(),
        )
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
    let _ = writeln!(o, "| contender | keep-alive req/s | full handshakes/s | p50 | p99 |");
    let _ = writeln!(o, "|---|---:|---:|---:|---:|");
    let sums: Vec<(Kind, Summary)> = contenders.iter().map(|c| (c.kind, c.summary())).collect();
    for (c, (_, s)) in contenders.iter().zip(&sums) {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} |",
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
        if let Some(b) = ctx.budget {
            let _ = writeln!(
                o,
                "Under the CPU budget a contender that has used up its quota is stopped until the next \
                 period (up to {:.0} ms), so p50 and p99 include such waits.",
                b.stall_ms
            );
        }
        if let Some(h) = find(Kind::Haproxy) {
            let verdict = |ok: bool| if ok { "met" } else { "**not met**" };
            let _ = writeln!(
                o,
                "Targets (issue 3) against HAProxy: req/s ≥ 1.2×: {} ({}); full handshakes/s ≥ 1.5×: {} ({}); \
                 p99 no worse: {} ({} vs {}).",
                verdict(r.rps >= 1.2 * h.rps),
                ratio(r.rps, h.rps),
                verdict(r.hps >= 1.5 * h.hps),
                ratio(r.hps, h.hps),
                verdict(r.p99_us <= h.p99_us),
                latency(r.p99_us),
                latency(h.p99_us),
            );
        }
    }

    if let Some(line) = client_bound(ctx, contenders) {
        let _ = writeln!(o, "\n{line}");
    }

    let _ = writeln!(
        o,
        "\nWhere the CPU went (medians over the rounds that other programs left alone; \"per core-second\" = \
         rate ÷ the contender's own CPU use{}):\n",
        ctx.budget.map(|b| format!("; every contender's budget is {}% of one core", b.percent)).unwrap_or_default()
    );
    let _ = writeln!(
        o,
        "| contender | run | rate (min–max) | rounds used | contender CPU | backend CPU | CPU busy (each core) | per core-second | errors | new-connection p50 / p99 |"
    );
    let _ = writeln!(o, "|---|---|---|---|---:|---:|---|---:|---:|---|");
    for (c, (_, s)) in contenders.iter().zip(&sums) {
        let (ka_err, hs_err) = c.errors();
        let rps: Vec<f64> = c.col(false, |r| r.keepalive.rps);
        let hps: Vec<f64> = c.col(true, |r| r.handshakes.rate());
        let busy = |handshakes: bool, f: &dyn Fn(&Round) -> &Vec<f64>| -> String {
            let rounds = c.used(handshakes);
            let n = rounds.first().map_or(0, |r| f(r).len());
            (0..n)
                .map(|i| {
                    format!("{:.0}%", median(rounds.iter().map(|r| f(r).get(i).copied().unwrap_or(0.0)).collect()))
                })
                .collect::<Vec<_>>()
                .join(" / ")
        };
        let used = |handshakes: bool| {
            let (clean, all) = c.clean_rounds(handshakes);
            if clean == 0 { format!("all {all}, **all disturbed**") } else { format!("{clean} of {all}") }
        };
        let (lo, hi) = min_max(&rps);
        let _ = writeln!(
            o,
            "| {} | keep-alive | {} ({}–{}) | {} | {:.0}% | {:.0}% | {} | {} req | {} | – |",
            c.label,
            thousands(s.rps),
            thousands(lo),
            thousands(hi),
            used(false),
            s.ka_cpu,
            s.ka_backend_cpu,
            busy(false, &|r| &r.keepalive_busy),
            if s.ka_cpu > 0.0 { thousands(s.rps / (s.ka_cpu / 100.0)) } else { "–".into() },
            ka_err,
        );
        let (lo, hi) = min_max(&hps);
        let _ = writeln!(
            o,
            "| {} | handshakes | {} ({}–{}) | {} | {:.0}% | {:.0}% | {} | {} hs | {} | {} / {} |",
            c.label,
            thousands(s.hps),
            thousands(lo),
            thousands(hi),
            used(true),
            s.hs_cpu,
            s.hs_backend_cpu,
            busy(true, &|r| &r.handshake_busy),
            if s.hs_cpu > 0.0 { thousands(s.hps / (s.hs_cpu / 100.0)) } else { "–".into() },
            hs_err,
            latency(s.hs_p50_us),
            latency(s.hs_p99_us),
        );
    }

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
        "| round | contender | req/s | p50 | p99 | wrk errors | handshakes/s | handshake errors | other programs' CPU (keep-alive / handshakes) |"
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
                r.keepalive_foreign,
                r.handshake_foreign
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
fn client_busy(ctx: &Context, r: &Round) -> Option<f64> {
    let v: Vec<f64> = ctx.client_cpus.iter().filter_map(|&c| r.keepalive_busy.get(c).copied()).collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// Flags keep-alive measurements in which the client CPU, not the contender, set the rate (of
/// those the medians use: a disturbed one was busy with other programs' work too).
fn client_bound(ctx: &Context, contenders: &[Contender]) -> Option<String> {
    let cpus = format!("CPU {}", ctx.client_cpus.iter().map(usize::to_string).collect::<Vec<_>>().join(","));
    let mut any = false;
    let mut hits = Vec::new();
    for c in contenders {
        let all_disturbed = c.undisturbed(false).is_empty();
        for (i, r) in c.rounds.iter().enumerate() {
            if !all_disturbed && r.keepalive_foreign > FOREIGN_LIMIT {
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
    if !contenders.iter().flat_map(|c| &c.rounds).any(|r| r.keepalive_throttle.is_some()) {
        return;
    }
    let _ = writeln!(
        o,
        "\nThe CPU budget at work (the contender's cgroup cpu.stat, medians over the rounds used): enforcement \
         periods in which the contender ran, those in which it used up its quota and was stopped until the next, \
         and how long it was stopped per second:\n"
    );
    let _ = writeln!(o, "| contender | run | periods | throttled periods | stopped per second |");
    let _ = writeln!(o, "|---|---|---:|---:|---:|");
    for c in contenders {
        for (handshakes, run) in [(false, "keep-alive"), (true, "handshakes")] {
            let t: Vec<Throttling> = c
                .used(handshakes)
                .into_iter()
                .filter_map(|r| if handshakes { r.handshake_throttle } else { r.keepalive_throttle })
                .collect();
            if t.is_empty() {
                continue;
            }
            let periods = median(t.iter().map(|t| t.periods as f64).collect());
            let throttled = median(t.iter().map(|t| t.throttled as f64).collect());
            let share = if periods > 0.0 { format!(" ({:.0}%)", 100.0 * throttled / periods) } else { String::new() };
            let _ = writeln!(
                o,
                "| {} | {run} | {} | {}{share} | {:.0} ms |",
                c.label,
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

    #[test]
    fn flags_client_bound_runs() {
        let ctx = Context {
            title: String::new(),
            machine: String::new(),
            versions: String::new(),
            layout: String::new(),
            client_cpus: vec![0],
            budget: None,
            tls: String::new(),
            backend: String::new(),
            method: String::new(),
            commands: Vec::new(),
            verification: Vec::new(),
            warnings: Vec::new(),
            configs: Vec::new(),
        };
        let round = |client: f64| Round { keepalive_busy: vec![client, 50.0], ..Round::default() };
        let c = |rounds| Contender {
            kind: Kind::Nginx,
            label: "nginx".into(),
            setup: String::new(),
            negotiated_openssl: String::new(),
            rounds,
        };
        let calm = client_bound(&ctx, &[c(vec![round(60.0), round(90.0)])]).unwrap();
        assert!(calm.starts_with("The client CPU (CPU 0) stayed under 90%"), "{calm}");
        let bound = client_bound(&ctx, &[c(vec![round(60.0), round(97.0)])]).unwrap();
        assert!(bound.contains("ratios understate the difference") && bound.contains("nginx round 2 (97%)"), "{bound}");
        // A measurement left out of the medians (other programs were busy) is not flagged.
        let disturbed = Round { keepalive_foreign: 50.0, ..round(97.0) };
        let calm = client_bound(&ctx, &[c(vec![round(60.0), disturbed])]).unwrap();
        assert!(calm.starts_with("The client CPU"), "{calm}");
        assert_eq!(client_bound(&Context { client_cpus: Vec::new(), ..ctx }, &[c(vec![round(99.0)])]), None);
    }
}
