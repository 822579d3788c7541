//! `rampart top`'s screen: a pure function from two snapshots and a width to text, so that what
//! it shows is tested on known figures (golden text) and the terminal loop only draws it.
//!
//! Rates are the difference of cumulative counters over the monotonic time between the two
//! snapshots; a counter that went down (a daemon restarted, a firewall attached again) counts
//! as 0 for that interval. Plain ASCII, no colours: it must read the same over any SSH session.

use std::fmt::Write as _;

use crate::{
    fw::rules::Action,
    snapshot::{Backend, FwIface, L4Backend, L4Service, Snapshot},
};

/// The narrowest screen laid out; narrower ones get the same lines cut.
const MIN_WIDTH: usize = 60;

struct Rates {
    dt: Option<f64>,
}

impl Rates {
    fn of(&self, now: u64, before: Option<u64>) -> Option<f64> {
        let dt = self.dt?;
        Some(now.saturating_sub(before?) as f64 / dt)
    }
}

fn fmt_rate(r: Option<f64>) -> String {
    match r {
        None => "-".to_string(),
        Some(x) if x >= 100.0 => format!("{x:.0}"),
        Some(x) => format!("{x:.1}"),
    }
}

fn add(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a + b),
        (x, None) | (None, x) => x,
    }
}

/// `s` cut or padded to exactly `w` characters (cut ones end in `~`).
fn fit(s: &str, w: usize) -> String {
    let n = s.chars().count();
    if n <= w {
        format!("{s:<w$}")
    } else if w == 0 {
        String::new()
    } else {
        let mut t: String = s.chars().take(w - 1).collect();
        t.push('~');
        t
    }
}

/// `s` in exactly `w` characters, cut at the front (`~` first) when longer: the end of
/// `NETNS/IFACE` is the part that tells interfaces apart.
fn fit_tail(s: &str, w: usize) -> String {
    let n = s.chars().count();
    if n <= w {
        format!("{s:<w$}")
    } else if w == 0 {
        String::new()
    } else {
        let mut t = String::from("~");
        t.extend(s.chars().skip(n - (w - 1)));
        t
    }
}

/// UTC `YYYY-MM-DD HH:MM:SS` of a Unix time (days to civil date: Howard Hinnant's algorithm).
pub fn utc(unix: f64) -> String {
    let secs = unix.max(0.0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}", rem / 3600, rem / 60 % 60, rem % 60)
}

fn errors(b: &Backend) -> u64 {
    b.requests.get("5xx").copied().unwrap_or(0).wrapping_add(b.connect_errors)
}

fn prev_backend<'a>(prev: Option<&'a Snapshot>, pool: &str, addr: &str) -> Option<&'a Backend> {
    prev?.daemon.as_ref()?.pools.iter().find(|p| p.name == pool)?.backends.iter().find(|b| b.addr == addr)
}

fn prev_service<'a>(prev: Option<&'a Snapshot>, name: &str) -> Option<&'a L4Service> {
    prev?.l4.as_ref()?.services.iter().find(|s| s.name == name)
}

fn prev_l4_backend<'a>(svc: Option<&'a L4Service>, addr: &str) -> Option<&'a L4Backend> {
    svc?.backends.iter().find(|b| b.addr == addr)
}

fn prev_iface<'a>(prev: Option<&'a Snapshot>, f: &FwIface) -> Option<&'a FwIface> {
    prev?.firewall.iter().find(|p| p.netns == f.netns && p.iface == f.iface)
}

/// The screen for `cur`, with rates since `prev` (none on the first screen), `width` columns
/// wide. Every line is at most `width` characters; lines end in `\n`.
pub fn render(prev: Option<&Snapshot>, cur: &Snapshot, width: usize) -> String {
    let w = width.max(MIN_WIDTH);
    let rates = Rates { dt: prev.map(|p| cur.seconds_since(p)).filter(|dt| *dt > 0.0) };
    let mut lines: Vec<String> = Vec::new();

    // Backends: HTTP (per pool), then L4 (per service).
    let name_w = w - 54;
    let mut rows = Vec::new();
    let (mut req_total, mut err_total, mut flows_total, mut pkts_total) = (None, None, None, None);
    if let Some(d) = &cur.daemon {
        for p in &d.pools {
            for b in &p.backends {
                let old = prev_backend(prev, &p.name, &b.addr);
                let req = rates.of(b.requests_total(), old.map(Backend::requests_total));
                let err = rates.of(errors(b), old.map(errors));
                req_total = add(req_total, req);
                err_total = add(err_total, err);
                rows.push(format!(
                    "{} {} {:>8} {:>8} {:>9} {:>7} {:<6}",
                    fit(&b.addr, name_w),
                    fit(&p.name, 10),
                    fmt_rate(req),
                    "-",
                    "-",
                    fmt_rate(err),
                    fit(&b.state, 6)
                ));
            }
        }
    }
    if let Some(l4) = &cur.l4 {
        for s in &l4.services {
            let old_s = prev_service(prev, &s.name);
            let flows = rates.of(s.new_flows, old_s.map(|o| o.new_flows));
            let pkts = rates.of(s.packets, old_s.map(|o| o.packets));
            flows_total = add(flows_total, flows);
            pkts_total = add(pkts_total, pkts);
            // The service's own row (its name is too wide for the pool column), then its backends.
            rows.push(format!(
                "{} {} {:>8} {:>8} {:>9} {:>7} {:<6}",
                fit(&s.name, name_w),
                fit("l4 service", 10),
                "-",
                fmt_rate(flows),
                fmt_rate(pkts),
                "-",
                "-"
            ));
            for b in &s.backends {
                let old = prev_l4_backend(old_s, &b.addr);
                rows.push(format!(
                    "{} {} {:>8} {:>8} {:>9} {:>7} {:<6}",
                    fit(&format!("  {}", b.addr), name_w),
                    fit("l4", 10),
                    "-",
                    fmt_rate(rates.of(b.new_flows, old.map(|o| o.new_flows))),
                    fmt_rate(rates.of(b.packets, old.map(|o| o.packets))),
                    "-",
                    "-"
                ));
            }
        }
    }

    // Firewall rules, with each interface's default policy and malformed drops.
    let mut fw_rows = Vec::new();
    let (mut fw_pkts, mut fw_drops) = (None, None);
    let iface_w = 14;
    let comment_w = w - iface_w - 41;
    for f in &cur.firewall {
        let old = prev_iface(prev, f);
        fw_pkts = add(fw_pkts, rates.of(f.packets(), old.map(FwIface::packets)));
        fw_drops = add(fw_drops, rates.of(f.dropped(), old.map(FwIface::dropped)));
        let label = f.label();
        let mut row = |id: &str, action: &str, pkts: Option<f64>, drops: Option<f64>, total: u64, what: &str| {
            fw_rows.push(format!(
                "{} {:>6} {:<6} {:>8} {:>8} {:>7} {}",
                fit_tail(&label, iface_w),
                id,
                action,
                fmt_rate(pkts),
                fmt_rate(drops),
                short(total),
                fit(what, comment_w).trim_end()
            ));
        };
        for r in &f.rules {
            let before = old.and_then(|o| o.rules.iter().find(|x| x.id == r.id)).map(|x| x.packets);
            let pkts = rates.of(r.packets, before);
            let drops = match r.action {
                Action::Deny => pkts,
                Action::Allow => pkts.map(|_| 0.0),
            };
            row(&r.id.to_string(), r.action.as_str(), pkts, drops, r.packets, r.comment.as_deref().unwrap_or(""));
        }
        let dflt = |f: &FwIface| f.counter("default_allow").wrapping_add(f.counter("default_deny"));
        let dflt_pkts = rates.of(dflt(f), old.map(dflt));
        let dflt_drops = rates.of(f.counter("default_deny"), old.map(|o| o.counter("default_deny")));
        row("-", "policy", dflt_pkts, dflt_drops, dflt(f), "default (no rule matched)");
        let bad = |f: &FwIface| {
            f.counters.iter().filter(|c| c.name.starts_with("malformed_")).map(|c| c.packets).fold(0, u64::wrapping_add)
        };
        let bad_rate = rates.of(bad(f), old.map(bad));
        row("-", "drop", bad_rate, bad_rate, bad(f), "malformed");
    }

    // The screen.
    // The number only: the build details ("(git …, debug build)") do not fit a narrow screen.
    let version = cur.daemon.as_ref().map_or(cur.version.as_str(), |d| d.version.as_str());
    let version = version.split_whitespace().next().unwrap_or("");
    lines.push(format!(
        "rampart top {version}  {} UTC  {}",
        utc(cur.taken_unix),
        match rates.dt {
            Some(dt) => format!("over {dt:.1}s"),
            None => "first look".to_string(),
        }
    ));
    lines.push(format!(
        "totals: http req/s {}  err/s {}    l4 flows/s {}  pkt/s {}",
        fmt_rate(req_total),
        fmt_rate(err_total),
        fmt_rate(flows_total),
        fmt_rate(pkts_total),
    ));
    lines.push(format!("        firewall pkt/s {}  drops/s {}", fmt_rate(fw_pkts), fmt_rate(fw_drops)));
    if cur.daemon.is_none() {
        lines.push("daemon: not running (kernel figures only)".to_string());
    }
    lines.push(String::new());
    lines.push(format!(
        "{} {} {:>8} {:>8} {:>9} {:>7} {:<6}",
        fit("BACKEND", name_w),
        fit("POOL/SVC", 10),
        "REQ/S",
        "FLOWS/S",
        "PKT/S",
        "ERR/S",
        "HEALTH"
    ));
    if rows.is_empty() {
        lines.push("(no backends)".to_string());
    }
    lines.extend(rows);
    lines.push(String::new());
    lines.push(format!(
        "{} {:>6} {:<6} {:>8} {:>8} {:>7} {}",
        fit("IFACE", iface_w),
        "RULE",
        "ACTION",
        "PKT/S",
        "DROPS/S",
        "PACKETS",
        "COMMENT"
    ));
    if fw_rows.is_empty() {
        lines.push("(no firewall attached)".to_string());
    }
    lines.extend(fw_rows);
    if let Some(d) = &cur.daemon
        && !d.mysql.is_empty()
    {
        lines.push(String::new());
        lines.push(format!(
            "{} {} {:<11} {:<6} {:>5} {:>6}",
            fit("MYSQL SERVER", name_w),
            fit("CLUSTER", 10),
            "ROLE",
            "HEALTH",
            "LAG",
            "CONNS"
        ));
        for c in &d.mysql {
            for s in &c.servers {
                lines.push(format!(
                    "{} {} {:<11} {:<6} {:>5} {:>6}",
                    fit(&s.addr, name_w),
                    fit(&c.name, 10),
                    s.role,
                    s.health,
                    s.lag_seconds.map_or("-".to_string(), |l| format!("{l}s")),
                    s.connections
                ));
            }
        }
    }
    let mut out = String::new();
    for l in lines {
        let l = l.trim_end();
        let l: String = if l.chars().count() > width { l.chars().take(width).collect() } else { l.to_string() };
        let _ = writeln!(out, "{l}");
    }
    out
}

/// A count in at most 7 characters: `1234567`, `12.3M`, `4.5G`.
fn short(n: u64) -> String {
    if n < 10_000_000 {
        n.to_string()
    } else if n < 10_000_000_000 {
        format!("{:.1}M", n as f64 / 1e6)
    } else {
        format!("{:.1}G", n as f64 / 1e9)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::snapshot::{Cluster, Daemon, FwRule, L4, MysqlServer, Named, Pool};

    fn backend(addr: &str, state: &str, ok: u64, err5: u64, connect_errors: u64) -> Backend {
        let requests: BTreeMap<String, u64> =
            [("2xx", ok), ("4xx", 1), ("5xx", err5)].into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        Backend { addr: addr.into(), state: state.into(), in_flight: 0, requests, connect_errors }
    }

    fn iface(rule_pkts: [u64; 2], default_deny: u64, malformed: u64) -> FwIface {
        let named = |name: &str, packets: u64| Named { name: name.into(), packets, bytes: packets * 100 };
        FwIface {
            netns: Some("edge".into()),
            iface: "eth0".into(),
            rules: vec![
                FwRule {
                    id: 1,
                    position: 1,
                    action: Action::Allow,
                    comment: Some("web".into()),
                    packets: rule_pkts[0],
                    bytes: rule_pkts[0] * 100,
                },
                FwRule {
                    id: 7,
                    position: 2,
                    action: Action::Deny,
                    comment: Some("block a scanner, this comment is far too long for the column".into()),
                    packets: rule_pkts[1],
                    bytes: rule_pkts[1] * 60,
                },
            ],
            counters: vec![
                named("rule_allow", rule_pkts[0]),
                named("rule_deny", rule_pkts[1]),
                named("default_allow", 0),
                named("default_deny", default_deny),
                named("non_ip", 3),
                named("malformed_ipv4", malformed),
                named("fragment_first", 2),
            ],
        }
    }

    fn snap(t: f64, k: u64, with_l4: bool) -> Snapshot {
        let l4 = with_l4.then(|| L4 {
            services: vec![L4Service {
                name: "203.0.113.10:443/tcp".into(),
                packets: 1000 * k,
                bytes: 0,
                new_flows: 10 * k,
                backends: vec![
                    L4Backend { addr: "10.0.2.1".into(), packets: 600 * k, bytes: 0, new_flows: 6 * k },
                    L4Backend { addr: "10.0.2.2".into(), packets: 400 * k, bytes: 0, new_flows: 4 * k },
                ],
            }],
        });
        Snapshot {
            schema: 1,
            version: "0.1.0".into(),
            taken_unix: 1_796_670_000.0 + t,
            monotonic_ns: (t * 1e9) as u64,
            firewall: vec![iface([500 * k, 40 * k], 5 * k, k)],
            l4,
            daemon: Some(Daemon {
                version: "0.1.0".into(),
                started_unix: Some(1_796_660_000.0),
                pools: vec![Pool {
                    name: "web".into(),
                    balance: "round_robin".into(),
                    backends: vec![
                        backend("10.0.1.21:80", "up", 120 * k, 0, 0),
                        backend("10.0.1.22:80", "down", 30 * k, 2 * k, k),
                    ],
                }],
                routes: vec![],
                listeners: vec![],
                mysql: vec![Cluster {
                    name: "main".into(),
                    rw_listen: "127.0.0.1:3306".into(),
                    ro_listen: None,
                    primary: "10.0.3.1:3306".into(),
                    last_primary_change: None,
                    servers: vec![MysqlServer {
                        addr: "10.0.3.1:3306".into(),
                        role: "primary".into(),
                        health: "up".into(),
                        lag_seconds: None,
                        connections: 4,
                        note: None,
                    }],
                }],
            }),
        }
    }

    /// Checked by hand: over 2 s every counter grew by twice its per-k figure, e.g. backend
    /// 10.0.1.22:80 by 2 × (30 + 2) requests (64 / 2 s = 32.0 req/s) and 2 × (2 + 1) errors
    /// (5xx and connect errors: 3.0/s); the firewall by 2 × 546 packets of all verdicts (546/s)
    /// of which 2 × (40 + 5 + 1) dropped by rule 7, the policy and as malformed (46.0/s).
    const GOLDEN: &str = "\
rampart top 0.1.0  2026-12-07 19:00:02 UTC  over 2.0s
totals: http req/s 152  err/s 3.0    l4 flows/s 10.0  pkt/s 1000
        firewall pkt/s 546  drops/s 46.0

BACKEND                    POOL/SVC      REQ/S  FLOWS/S     PKT/S   ERR/S HEALTH
10.0.1.21:80               web             120        -         -     0.0 up
10.0.1.22:80               web            32.0        -         -     3.0 down
203.0.113.10:443/tcp       l4 service        -     10.0      1000       - -
  10.0.2.1                 l4                -      6.0       600       - -
  10.0.2.2                 l4                -      4.0       400       - -

IFACE            RULE ACTION    PKT/S  DROPS/S PACKETS COMMENT
edge/eth0           1 allow       500      0.0    1500 web
edge/eth0           7 deny       40.0     40.0     120 block a scanner, this co~
edge/eth0           - policy      5.0      5.0      15 default (no rule matched)
edge/eth0           - drop        1.0      1.0       3 malformed

MYSQL SERVER               CLUSTER    ROLE        HEALTH   LAG  CONNS
10.0.3.1:3306              main       primary     up         -      4
";

    #[test]
    fn golden_two_snapshots_80_columns() {
        let a = snap(0.0, 1, true);
        let b = snap(2.0, 3, true);
        let text = render(Some(&a), &b, 80);
        assert_eq!(text, GOLDEN, "got:\n{text}");
        assert!(text.lines().all(|l| l.len() <= 80 && l.is_ascii()));
    }

    #[test]
    fn first_screen_has_no_rates_and_no_l4_without_balancer() {
        let b = snap(2.0, 3, false);
        let text = render(None, &b, 80);
        assert!(text.contains("first look"), "{text}");
        assert!(
            text.contains(
                "totals: http req/s -  err/s -    l4 flows/s -  pkt/s -\n        firewall pkt/s -  drops/s -\n"
            ),
            "{text}"
        );
        let row = text.lines().find(|l| l.starts_with("10.0.1.22:80")).unwrap();
        assert_eq!(row.split_whitespace().collect::<Vec<_>>(), ["10.0.1.22:80", "web", "-", "-", "-", "-", "down"]);
        assert!(!text.contains("10.0.2.1"), "{text}");
    }

    #[test]
    fn counters_that_went_down_count_as_zero_and_narrow_screens_are_cut() {
        let a = snap(0.0, 3, false);
        let b = snap(1.0, 1, false);
        let text = render(Some(&a), &b, 40);
        assert!(text.lines().all(|l| l.chars().count() <= 40), "{text}");
        assert!(text.contains("totals: http req/s 0.0  err/s 0.0"), "{text}");
    }

    #[test]
    fn kernel_only() {
        let mut b = snap(1.0, 1, false);
        b.daemon = None;
        let text = render(None, &b, 80);
        assert!(text.contains("daemon: not running"), "{text}");
        assert!(text.contains("(no backends)"), "{text}");
    }

    #[test]
    fn long_interface_labels_keep_their_end() {
        assert_eq!(fit_tail("rampart-srv-4242-0/veth-s", 14), "~4242-0/veth-s");
        assert_eq!(fit_tail("edge/eth0", 14), "edge/eth0     ");
    }

    #[test]
    fn civil_dates() {
        assert_eq!(utc(0.0), "1970-01-01 00:00:00");
        assert_eq!(utc(951_782_400.0), "2000-02-29 00:00:00");
        assert_eq!(utc(1_796_670_002.0), "2026-12-07 19:00:02");
    }
}
