//! One serializable snapshot of every figure rampart keeps: what `rampart status --json`,
//! `rampart stats`, the control socket's `snapshot`, the status page (`/api/snapshot`) and
//! `rampart top` show.
//!
//! Counters are cumulative (since attach, or since the daemon started); a consumer computes
//! rates from two snapshots with [`Snapshot::seconds_since`], which uses the monotonic clock
//! (CLOCK_MONOTONIC is system-wide, so snapshots taken by different processes compare).
//! The JSON shape is an interface: add fields, never rename or remove them.

use std::{
    collections::BTreeMap,
    time::{SystemTime, UNIX_EPOCH},
};

use rampart_common::fw::stat;
use serde::{Deserialize, Serialize};

use crate::{
    fw::{rules::Action, view},
    paths::Scope,
};

/// Bumped when a field changes meaning (never for an added field).
pub const SCHEMA: u32 = 1;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub schema: u32,
    /// `rampart --version` of the process that took the kernel part.
    pub version: String,
    /// When it was taken: Unix time in seconds (wall clock, for people).
    pub taken_unix: f64,
    /// When it was taken: CLOCK_MONOTONIC in nanoseconds (for rates).
    pub monotonic_ns: u64,
    /// Every attached firewall, all scopes (or the one asked for).
    pub firewall: Vec<FwIface>,
    /// The L4 balancer's figures; `None` where nothing balances.
    pub l4: Option<L4>,
    /// The daemon's figures; `None` when no daemon answered.
    pub daemon: Option<Daemon>,
}

/// A packet and byte counter pair with its name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Named {
    pub name: String,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FwIface {
    /// `None` for the host's network namespace.
    pub netns: Option<String>,
    pub iface: String,
    pub rules: Vec<FwRule>,
    /// Every `FW_STATS` counter, named as in `rampart_common::fw::stat::NAMES`, in index order:
    /// verdicts (rule_allow … non_ip), malformed classes (malformed_*), fragments (fragment_*).
    pub counters: Vec<Named>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FwRule {
    pub id: u32,
    /// 1-based.
    pub position: usize,
    pub action: Action,
    pub comment: Option<String>,
    pub packets: u64,
    pub bytes: u64,
}

impl FwIface {
    pub fn counter(&self, name: &str) -> u64 {
        self.counters.iter().find(|c| c.name == name).map_or(0, |c| c.packets)
    }

    /// Packets dropped: by a rule, by the default policy, or as malformed.
    pub fn dropped(&self) -> u64 {
        self.counters
            .iter()
            .filter(|c| c.name == "rule_deny" || c.name == "default_deny" || c.name.starts_with("malformed_"))
            .map(|c| c.packets)
            .fold(0, u64::wrapping_add)
    }

    /// Packets seen, each in one verdict (fragments are counted besides their verdict).
    pub fn packets(&self) -> u64 {
        self.counters.iter().filter(|c| !c.name.starts_with("fragment_")).map(|c| c.packets).fold(0, u64::wrapping_add)
    }

    /// `IFACE` or `NETNS/IFACE`.
    pub fn label(&self) -> String {
        match &self.netns {
            None => self.iface.clone(),
            Some(n) => format!("{n}/{}", self.iface),
        }
    }
}

/// The L4 balancer (XDP): per service and per backend. Filled from the balancer's per-CPU
/// stat maps (`LB_SVC_STATS`, `LB_BE_STATS`) by its userspace (`lb/`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct L4 {
    pub services: Vec<L4Service>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct L4Service {
    /// As configured: `ADDR:PORT/PROTO`.
    pub name: String,
    pub packets: u64,
    pub bytes: u64,
    /// Connections placed by the Maglev ring (new connection-table entries).
    pub new_flows: u64,
    pub backends: Vec<L4Backend>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct L4Backend {
    /// The backend's address.
    pub addr: String,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

/// The running daemon's part.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Daemon {
    /// The daemon's `rampart --version`.
    pub version: String,
    /// The daemon process's start, Unix time in seconds.
    pub started_unix: Option<f64>,
    pub pools: Vec<Pool>,
    pub routes: Vec<Route>,
    pub listeners: Vec<Listener>,
    pub mysql: Vec<Cluster>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    pub name: String,
    pub balance: String,
    pub backends: Vec<Backend>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backend {
    /// As written in the pool's `backends`.
    pub addr: String,
    /// up | down | drain | maint (health and admin state together, as the balancer sees it).
    pub state: String,
    pub in_flight: u64,
    /// Answered requests by status class: `1xx` … `5xx`, `other`.
    pub requests: BTreeMap<String, u64>,
    /// Connections to it that failed (TCP, TLS, timeout).
    pub connect_errors: u64,
}

impl Backend {
    pub fn requests_total(&self) -> u64 {
        self.requests.values().copied().fold(0, u64::wrapping_add)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// `host/path` (`*` for any host).
    pub route: String,
    pub pool: String,
    /// Requests by HTTP status (as text: JSON keys are strings).
    pub requests: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listener {
    pub name: String,
    pub certificates: Vec<Certificate>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Certificate {
    pub file: String,
    pub subject: String,
    /// notAfter, Unix time in seconds.
    pub not_after_unix: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cluster {
    pub name: String,
    pub rw_listen: String,
    pub ro_listen: Option<String>,
    /// The primary's address, or why there is none: `unknown` (not checked yet), `none`,
    /// `split brain: A, B`.
    pub primary: String,
    pub last_primary_change: Option<PrimaryChange>,
    pub servers: Vec<MysqlServer>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrimaryChange {
    pub unix: u64,
    /// The new primary, `None` when the cluster was left without one.
    pub to: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MysqlServer {
    pub addr: String,
    /// primary | replica | writable | read_only | unreachable
    pub role: String,
    /// up | down: takes connections (the primary, or a replica in the read pool).
    pub health: String,
    pub lag_seconds: Option<u64>,
    pub connections: i64,
    pub note: Option<String>,
}

/// CLOCK_MONOTONIC now, in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid pointer to a timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec as u64)
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64()
}

impl Snapshot {
    /// An empty snapshot stamped now.
    pub fn now() -> Self {
        Snapshot {
            schema: SCHEMA,
            version: crate::VERSION.to_string(),
            taken_unix: unix_now(),
            monotonic_ns: monotonic_ns(),
            ..Snapshot::default()
        }
    }

    /// The kernel's figures from the pinned maps, read without any lock (`fw::view`): every
    /// scope, or only `scope`. An interface that cannot be read is left out and logged.
    pub fn kernel(scope: Option<&Scope>) -> Self {
        let mut s = Snapshot::now();
        let ifaces: Vec<(Scope, view::IfaceView)> =
            view::read_all().into_iter().filter(|(sc, _)| scope.is_none_or(|want| want == sc)).collect();
        let lbs = crate::lb::view::read_all(scope);
        let qualify = lbs.len() > 1;
        let services: Vec<L4Service> = lbs.iter().flat_map(|i| l4_services(i, qualify)).collect();
        s.l4 = (!services.is_empty()).then_some(L4 { services });
        s.firewall = ifaces.into_iter().map(|(sc, v)| fw_iface(&sc, v)).collect();
        s
    }

    /// Seconds from `earlier` to this one (0 when not later).
    pub fn seconds_since(&self, earlier: &Snapshot) -> f64 {
        self.monotonic_ns.saturating_sub(earlier.monotonic_ns) as f64 / 1e9
    }
}

/// An interface's services as the snapshot shows them; `qualify` prefixes the interface when
/// several are shown.
fn l4_services(i: &crate::lb::view::IfaceLb, qualify: bool) -> Vec<L4Service> {
    i.services
        .iter()
        .map(|(svc, c, bc)| L4Service {
            name: if qualify { format!("{} {}", i.iface, svc.id) } else { svc.id.to_string() },
            packets: c.packets,
            bytes: c.bytes,
            new_flows: c.new_flows,
            backends: svc
                .backends
                .iter()
                .zip(bc)
                .map(|(b, c)| L4Backend {
                    addr: b.addr.to_string(),
                    packets: c.packets,
                    bytes: c.bytes,
                    new_flows: c.new_flows,
                })
                .collect(),
        })
        .collect()
}

fn fw_iface(scope: &Scope, v: view::IfaceView) -> FwIface {
    FwIface {
        netns: match scope {
            Scope::Host => None,
            Scope::Netns(n) => Some(n.clone()),
        },
        iface: v.iface,
        rules: v
            .rules
            .into_iter()
            .enumerate()
            .map(|(i, r)| FwRule {
                id: r.id,
                position: i + 1,
                action: r.action,
                comment: r.comment,
                packets: r.counts.packets,
                bytes: r.counts.bytes,
            })
            .collect(),
        counters: stat::NAMES
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let c = v.stats.get(i).copied().unwrap_or_default();
                Named { name: n.to_string(), packets: c.packets, bytes: c.bytes }
            })
            .collect(),
    }
}
