//! What `fw list` and `status` print, as text and as JSON. The JSON shapes are an interface
//! (tests and scripts read them): add fields, never rename or remove them.
use std::{collections::BTreeMap, path::Path, process::ExitCode, time::Duration};

use anyhow::Result;
use rampart::{
    fw::{
        rules::{self, Action, Rule},
        state::{Counts, Firewall},
    },
    paths::Scope,
    xdp::{self, UsedMode},
};
use rampart_common::fw::stat;
use serde::{Serialize, Serializer};

/// `fw list --json`.
#[derive(Serialize)]
struct ListJson<'a> {
    iface: &'a str,
    mode: UsedMode,
    /// The default policy; its counters are IP packets no rule matched since attach.
    default: DefaultJson,
    rules: Vec<RuleJson>,
    /// Set name → number of prefixes.
    sets: BTreeMap<&'a str, usize>,
}

#[derive(Serialize)]
struct DefaultJson {
    action: Action,
    packets: u64,
    bytes: u64,
}

#[derive(Serialize)]
struct RuleJson {
    id: u32,
    /// 1-based.
    position: usize,
    action: Action,
    /// Items as written: CIDRs and `@set`s; `null` = any.
    src: Option<Vec<String>>,
    dst: Option<Vec<String>>,
    /// `tcp`, `udp`, `icmp`, `icmpv6` or the number as a string; `null` = any.
    proto: Option<String>,
    /// `"80"` or `"1000-2000"` items; `null` = any.
    sport: Option<Vec<String>>,
    dport: Option<Vec<String>>,
    comment: Option<String>,
    packets: u64,
    bytes: u64,
}

fn proto_string(p: u8) -> String {
    rules::proto_name(p).map_or_else(|| p.to_string(), str::to_string)
}

fn rule_json(r: &Rule, position: usize, c: Counts) -> RuleJson {
    let addr = |m: &Option<rules::AddrMatch>| m.as_ref().map(|m| m.to_items().iter().map(|i| i.to_string()).collect());
    let ports = |p: &Option<Vec<rules::PortRange>>| p.as_ref().map(|v| v.iter().map(|r| r.to_string()).collect());
    RuleJson {
        id: r.id,
        position,
        action: r.action,
        src: addr(&r.src),
        dst: addr(&r.dst),
        proto: r.proto.map(proto_string),
        sport: ports(&r.sport),
        dport: ports(&r.dport),
        comment: r.comment.clone(),
        packets: c.packets,
        bytes: c.bytes,
    }
}

/// The MATCH column: `proto tcp sport … dport … src … dst …`, `any` when unconstrained.
fn match_text(r: &RuleJson) -> String {
    let mut parts = Vec::new();
    if let Some(p) = &r.proto {
        parts.push(format!("proto {p}"));
    }
    for (name, v) in [("sport", &r.sport), ("dport", &r.dport), ("src", &r.src), ("dst", &r.dst)] {
        if let Some(v) = v {
            parts.push(format!("{name} {}", v.join(",")));
        }
    }
    if parts.is_empty() {
        parts.push("any".to_string());
    }
    if let Some(c) = &r.comment {
        parts.push(format!("# {c}"));
    }
    parts.join(" ")
}

pub fn list(fw: &Firewall, json: bool) -> Result<()> {
    let counts = fw.rule_counts()?;
    let stats = fw.stats()?;
    let rs = fw.rules();
    let no_match = stats[stat::DEFAULT_ALLOW as usize] + stats[stat::DEFAULT_DENY as usize];
    let out = ListJson {
        iface: fw.iface(),
        mode: fw.state().mode,
        default: DefaultJson { action: rs.default, packets: no_match.packets, bytes: no_match.bytes },
        rules: rs
            .rules
            .iter()
            .zip(&counts)
            .map(|(r, c)| rule_json(r, c.position, Counts { packets: c.packets, bytes: c.bytes }))
            .collect(),
        sets: rs.sets.iter().map(|(k, v)| (k.as_str(), v.len())).collect(),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let rules_n = if out.rules.len() == 1 { "1 rule".to_string() } else { format!("{} rules", out.rules.len()) };
    println!("{}: {} mode, {rules_n}, default {}", out.iface, out.mode, out.default.action);
    let row = |id: &str, pos: &str, action: &str, p: u64, b: u64, m: &str| {
        println!("{id:>5}  {pos:>4}  {action:<6}  {p:>12}  {b:>14}  {m}");
    };
    println!("{:>5}  {:>4}  {:<6}  {:>12}  {:>14}  MATCH", "ID", "POS", "ACTION", "PACKETS", "BYTES");
    for r in &out.rules {
        row(&r.id.to_string(), &r.position.to_string(), r.action.as_str(), r.packets, r.bytes, &match_text(r));
    }
    row("-", "-", out.default.action.as_str(), out.default.packets, out.default.bytes, "default (no rule matched)");
    for (name, n) in &out.sets {
        println!("set {name}: {n} {}", if *n == 1 { "prefix" } else { "prefixes" });
    }
    Ok(())
}

/// Counters by `stat::NAMES`, in index order.
struct Named(Vec<(&'static str, Counts)>);

impl Serialize for Named {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, v)| (*k, v)))
    }
}

/// `status --json`.
#[derive(Serialize)]
struct StatusJson {
    /// `-n` namespace, `null` for the host.
    netns: Option<String>,
    interfaces: Vec<IfaceJson>,
    /// The daemon's status text (pools, MySQL clusters), `null` when no daemon answers on the
    /// control socket.
    daemon: Option<String>,
    /// Every figure of this scope's firewalls and of the daemon (the shape of `stats --json`).
    snapshot: rampart::snapshot::Snapshot,
}

#[derive(Serialize)]
#[serde(untagged)]
enum IfaceJson {
    Ok {
        iface: String,
        ifindex: u32,
        mode: UsedMode,
        program_id: u32,
        rules: usize,
        sets: usize,
        default: Action,
        /// Entries of the balancer's connection table (fixed when the program was loaded).
        conntrack_entries: u32,
        /// Every `FW_STATS` counter by name: verdicts (rule_allow … malformed_l4), then
        /// fragment_later / fragment_first.
        counters: Named,
    },
    /// Pins of an interface that was deleted, or deleted and created again under the same name:
    /// the kernel detached the program with the old interface; the pins stay until `detach`.
    Gone { iface: String, ifindex: u32, gone: String },
    /// Pins or state of an interface that cannot be read (e.g. half removed).
    Broken { iface: String, error: String },
}

fn iface_status(scope: &Scope, iface: &str) -> Result<IfaceJson> {
    let fw = Firewall::open(scope, iface)?;
    let ifindex = fw.state().ifindex;
    let gone = match xdp::ifindex(iface, scope) {
        Ok(now) if now == ifindex => None,
        Ok(now) => Some(format!("{iface} was deleted and created again (ifindex {ifindex}, now {now})")),
        Err(_) => Some(format!("{iface} (ifindex {ifindex}) no longer exists")),
    };
    if let Some(what) = gone {
        let gone = format!(
            "{what}; the firewall went with the old interface and nothing filters now. \
             `rampart{} detach --iface {iface}` removes what is left of it",
            match scope {
                Scope::Host => String::new(),
                Scope::Netns(n) => format!(" -n {n}"),
            }
        );
        return Ok(IfaceJson::Gone { iface: iface.to_string(), ifindex, gone });
    }
    let program_id = xdp::program_id(scope, iface)?;
    let conntrack_entries = rampart::pipeline::conntrack_entries(scope, iface)?;
    let stats = fw.stats()?;
    let counters = Named(stat::NAMES.iter().enumerate().map(|(i, n)| (*n, stats[i])).collect());
    let st = fw.state();
    Ok(IfaceJson::Ok {
        iface: iface.to_string(),
        ifindex: st.ifindex,
        mode: st.mode,
        program_id,
        rules: st.rules.rules.len(),
        sets: st.rules.sets.len(),
        default: st.rules.default,
        conntrack_entries,
        counters,
    })
}

/// The running daemon's status text, if one answers on `control_socket` (within 2 s).
fn daemon_status(control_socket: &Path) -> Option<String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
    rt.block_on(async {
        let ask = rampart::serve::admin::send_command(control_socket, "status");
        tokio::time::timeout(Duration::from_secs(2), ask).await.ok()?.ok()
    })
}

pub fn status(scope: &Scope, json: bool, control_socket: &Path) -> Result<ExitCode> {
    let ifaces: Vec<IfaceJson> = xdp::attached_ifaces(scope)?
        .into_iter()
        .map(|i| {
            iface_status(scope, &i).unwrap_or_else(|e| IfaceJson::Broken { iface: i.clone(), error: format!("{e:#}") })
        })
        .collect();
    let netns = match scope {
        Scope::Host => None,
        Scope::Netns(n) => Some(n.clone()),
    };
    let broken = ifaces.iter().any(|i| !matches!(i, IfaceJson::Ok { .. }));
    let daemon = daemon_status(control_socket);
    let snapshot = if json {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        super::views::take(&rt, Some(scope), control_socket)
    } else {
        rampart::snapshot::Snapshot::default()
    };
    let out = StatusJson { netns, interfaces: ifaces, daemon, snapshot };
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else if out.interfaces.is_empty() {
        println!("nothing attached");
    } else {
        for i in &out.interfaces {
            match i {
                IfaceJson::Ok { iface, ifindex, mode, program_id, rules, sets, default, conntrack_entries, counters } => {
                    let n = |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
                    println!(
                        "{iface} (ifindex {ifindex}): {mode} mode, program id {program_id}, {}, {}, default {default}, \
                         connection table {conntrack_entries} entries",
                        n(*rules, "rule", "rules"),
                        n(*sets, "set", "sets"),
                    );
                    for (name, c) in &counters.0 {
                        println!("  {name:<20} {:>12} packets {:>14} bytes", c.packets, c.bytes);
                    }
                }
                IfaceJson::Gone { iface, gone, .. } => println!("{iface}: gone: {gone}"),
                IfaceJson::Broken { iface, error } => println!("{iface}: broken: {error}"),
            }
        }
    }
    if !json {
        match &out.daemon {
            None => println!("daemon: no answer on {}", control_socket.display()),
            Some(text) if text.is_empty() => println!("daemon: running (no pools, no mysql clusters)"),
            Some(text) => println!("daemon ({}):\n{text}", control_socket.display()),
        }
    }
    // A broken or orphaned attachment is worth a non-zero exit: scripts should notice.
    Ok(if broken { ExitCode::from(1) } else { ExitCode::SUCCESS })
}
