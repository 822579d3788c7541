//! A read-only, lock-free view of an attached firewall's counters, for scrapers.
//!
//! [`state::Firewall`](super::state::Firewall) takes the interface's exclusive lock and may
//! repair slots; a scrape must do neither (it would stall behind a long `fw load`, or repair
//! under an operation's feet). The view reads `state.json` (replaced whole by rename, so always
//! complete), then the live slot's per-CPU counters, then checks that `state.json` is still the
//! same file, and retries if not: every write into a slot's counters happens only after a
//! state naming the other slot was saved (updates install into the slot the saved state does
//! not name, under the lock), so an unchanged state file means the counters read belong to the
//! rules it lists.

use std::{
    collections::BTreeMap,
    fs,
    io::Read as _,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use aya::maps::{Array, IterableMap as _, Map, MapData, MapError, PerCpuArray, PerCpuValues};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, NoLabelSet},
    metrics::MetricType,
};
use rampart_common::{
    Counter,
    fw::{SlotInfo, map_names as names, stat},
};

use super::{
    rules::Action,
    state::{Counts, FwState, STATE_FILE, STATE_VERSION},
};
use crate::{labels::Rendered, paths, paths::Scope};

#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("{}: {op}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: bad state file", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}: state version {found}, this rampart reads {STATE_VERSION}", path.display())]
    Version { path: PathBuf, found: u32 },
    #[error("map {map} at {}: {op}", path.display())]
    Map {
        map: &'static str,
        op: &'static str,
        path: PathBuf,
        #[source]
        source: Box<MapError>,
    },
    #[error("map {map} at {}: batch lookup", path.display())]
    Sys {
        map: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{iface}: its state changed under every one of {tries} reads")]
    Busy { iface: String, tries: u32 },
}

type Result<T, E = ViewError> = std::result::Result<T, E>;

/// One rule's counters: the base carried from earlier slots plus the live slot's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleView {
    pub id: u32,
    pub action: Action,
    pub comment: Option<String>,
    pub counts: Counts,
}

/// What a scrape shows of one attached interface.
#[derive(Clone, Debug)]
pub struct IfaceView {
    pub iface: String,
    pub rules: Vec<RuleView>,
    /// `FW_STATS` summed over CPUs, indexed by `rampart_common::fw::stat`.
    pub stats: Vec<Counts>,
}

/// How often a read starts again when an update changed the state meanwhile.
const TRIES: u32 = 20;

/// The identity of a `state.json` version: each save renames a new file into place.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    mtime_ns: i128,
    size: u64,
}

fn stamp(m: &fs::Metadata) -> Stamp {
    Stamp { ino: m.ino(), mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()), size: m.size() }
}

/// The last parsed version of each `state.json` read, by path: a scrape every few seconds of
/// an interface with 10,000 rules would otherwise parse the same megabytes each time (about half
/// of its firewall part). [`read_all`] keeps only the interfaces it read.
static STATES: Mutex<BTreeMap<PathBuf, (Stamp, Arc<FwState>)>> = Mutex::new(BTreeMap::new());

fn states() -> std::sync::MutexGuard<'static, BTreeMap<PathBuf, (Stamp, Arc<FwState>)>> {
    STATES.lock().unwrap_or_else(|p| p.into_inner())
}

fn read_state(path: &Path) -> Result<(Arc<FwState>, Stamp)> {
    let io = |op| {
        let path = path.to_path_buf();
        move |source| ViewError::Io { op, path, source }
    };
    let mut f = fs::File::open(path).map_err(io("open"))?;
    let st = stamp(&f.metadata().map_err(io("stat"))?);
    // Saves replace the file by a rename, never in place: the same stamp is the same content.
    if let Some((cached, state)) = states().get(path)
        && *cached == st
    {
        return Ok((state.clone(), st));
    }
    let mut text = String::new();
    f.read_to_string(&mut text).map_err(io("read"))?;
    let state: FwState =
        serde_json::from_str(&text).map_err(|source| ViewError::Parse { path: path.to_path_buf(), source })?;
    if state.version != STATE_VERSION {
        return Err(ViewError::Version { path: path.to_path_buf(), found: state.version });
    }
    let state = Arc::new(state);
    states().insert(path.to_path_buf(), (st, state.clone()));
    Ok((state, st))
}

fn open_map(dir: &Path, map: &'static str) -> Result<Map> {
    let path = dir.join(map);
    let data = MapData::from_pin(&path).map_err(|source| ViewError::Map {
        map,
        op: "open pin",
        path: path.clone(),
        source: Box::new(source),
    })?;
    Map::from_map_data(data).map_err(|source| ViewError::Map { map, op: "open", path, source: Box::new(source) })
}

fn typed<T: TryFrom<Map, Error = MapError>>(dir: &Path, map: &'static str) -> Result<T> {
    T::try_from(open_map(dir, map)?).map_err(|source| ViewError::Map {
        map,
        op: "check key/value types",
        path: dir.join(map),
        source: Box::new(source),
    })
}

fn sum(values: &PerCpuValues<Counter>) -> Counts {
    values.iter().fold(Counts::default(), |a, c| a + Counts::from(*c))
}

/// The pinned maps a view reads (opened read-only in intent: nothing here writes them).
struct Maps {
    dir: PathBuf,
    slots: Array<MapData, SlotInfo>,
    rule_stats: PerCpuArray<MapData, Counter>,
    stats: PerCpuArray<MapData, Counter>,
}

impl Maps {
    fn open(dir: &Path) -> Result<Self> {
        Ok(Maps {
            dir: dir.to_path_buf(),
            slots: typed(dir, names::SLOTS)?,
            rule_stats: typed(dir, names::RULE_STATS)?,
            stats: typed(dir, names::STATS)?,
        })
    }

    fn err(&self, map: &'static str) -> impl FnOnce(MapError) -> ViewError + '_ {
        move |source| ViewError::Map { map, op: "read", path: self.dir.join(map), source: Box::new(source) }
    }

    /// `map[first..first + n]`, summed over CPUs: in batches where the kernel can, else entry by
    /// entry.
    fn counters(
        &self,
        map: &PerCpuArray<MapData, Counter>,
        name: &'static str,
        first: u32,
        n: u32,
    ) -> Result<Vec<Counts>> {
        match batch_counts(map, first, n) {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(source) => {
                return Err(ViewError::Sys { map: name, path: self.dir.join(name), source });
            }
        }
        (first..first + n).map(|i| map.get(&i, 0).map(|v| sum(&v)).map_err(self.err(name))).collect()
    }

    fn slot_rules(&self, slot: u32) -> Result<Vec<Counts>> {
        let info = self.slots.get(&slot, 0).map_err(self.err(names::SLOTS))?;
        self.counters(&self.rule_stats, names::RULE_STATS, info.rule_base, info.rule_count)
    }

    fn stats(&self) -> Result<Vec<Counts>> {
        self.counters(&self.stats, names::STATS, 0, stat::COUNT)
    }
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// Entries per lookup batch: bounds the buffer (entries × CPUs × 16 bytes).
const BATCH: u32 = 4096;

/// `union bpf_attr`, the part `BPF_MAP_LOOKUP_BATCH` reads.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// `map[first..first + n]` summed over CPUs with `BPF_MAP_LOOKUP_BATCH`: one system call per
/// 4,096 entries instead of one each (10,000 rules took about 30 ms entry by entry). `Ok(None)`
/// when the kernel has no batch lookup for the map.
fn batch_counts(map: &PerCpuArray<MapData, Counter>, first: u32, n: u32) -> std::io::Result<Option<Vec<Counts>>> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
    let fd = map.map().fd().as_fd().as_raw_fd();
    let mut out = Vec::with_capacity(n as usize);
    let mut keys = vec![0u32; BATCH.min(n) as usize];
    // Per-CPU values come as one value per possible CPU, each rounded up to 8 bytes (Counter
    // is 16).
    let mut values = vec![Counter::default(); keys.len() * cpus];
    while (out.len() as u32) < n {
        let want = BATCH.min(n - out.len() as u32);
        let next = first + out.len() as u32;
        // The kernel continues after the key in `in_batch`; none: from the first key.
        let prev = next.checked_sub(1);
        let in_batch = prev.unwrap_or(0);
        let mut out_batch = 0u32;
        let mut attr = BatchAttr {
            in_batch: if prev.is_some() { &in_batch as *const u32 as u64 } else { 0 },
            out_batch: &mut out_batch as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: want,
            map_fd: fd as u32,
            ..Default::default()
        };
        // SAFETY: the buffers hold `want` keys and `want × cpus` values of the map's sizes and
        // live through the call; the kernel reads `size_of::<BatchAttr>()` bytes of `attr`.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                size_of::<BatchAttr>() as u32,
            )
        };
        let got = attr.count as usize;
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                // The end of the map: what was asked for may still all be there.
                Some(libc::ENOENT) if got == want as usize => {}
                // 524 = ENOTSUPP, the kernel-internal code some map types return.
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) | Some(524) if out.is_empty() => return Ok(None),
                _ => return Err(e),
            }
        }
        if got != want as usize || keys[..got].iter().enumerate().any(|(i, k)| *k != next + i as u32) {
            return Err(std::io::Error::other(format!(
                "batch lookup from key {next} returned {got} of {want} entries, not in order"
            )));
        }
        out.extend(
            values[..got * cpus]
                .chunks(cpus)
                .map(|per_cpu| per_cpu.iter().fold(Counts::default(), |a, c| a + Counts::from(*c))),
        );
    }
    Ok(Some(out))
}

/// Reads the counters of the firewall attached to `iface` in `scope`, without its lock.
pub fn read(scope: &Scope, iface: &str) -> Result<IfaceView> {
    let state_path = scope.state_dir(iface).join(STATE_FILE);
    let maps = Maps::open(&scope.pin_dir(iface))?;
    for attempt in 0..TRIES {
        let (state, before) = read_state(&state_path)?;
        let live = maps.slot_rules(state.active_slot)?;
        let stats = maps.stats()?;
        let after = fs::metadata(&state_path).map_err(|source| ViewError::Io {
            op: "stat",
            path: state_path.clone(),
            source,
        })?;
        if stamp(&after) != before {
            // An update saved meanwhile: what was read may mix two rule sets.
            std::thread::sleep(Duration::from_millis(1 << attempt.min(5)));
            continue;
        }
        let rules = state
            .rules
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| RuleView {
                id: r.id,
                action: r.action,
                comment: r.comment.clone(),
                counts: state.counter_bases.get(&r.id).copied().unwrap_or_default()
                    + live.get(i).copied().unwrap_or_default(),
            })
            .collect();
        return Ok(IfaceView { iface: iface.to_string(), rules, stats });
    }
    Err(ViewError::Busy { iface: iface.to_string(), tries: TRIES })
}

/// Every scope with attached interfaces: the host, and each network namespace under
/// `/run/rampart/netns-*`.
pub fn scopes() -> Vec<Scope> {
    let Ok(rd) = fs::read_dir(paths::RUN_ROOT) else { return Vec::new() };
    let mut out: Vec<Scope> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            if name == "host" {
                Some(Scope::Host)
            } else {
                name.strip_prefix("netns-").map(|n| Scope::Netns(n.to_string()))
            }
        })
        .collect();
    out.sort_by_key(|s| s.dir_name());
    out
}

/// The verdicts of `FW_STATS` exported as `rampart_fw_packets_total{verdict}`; every packet
/// is in exactly one (the malformed classes are summed into `malformed`).
const VERDICTS: [(&str, &[u32]); 6] = [
    ("rule_allow", &[stat::RULE_ALLOW]),
    ("rule_deny", &[stat::RULE_DENY]),
    ("default_allow", &[stat::DEFAULT_ALLOW]),
    ("default_deny", &[stat::DEFAULT_DENY]),
    ("non_ip", &[stat::NON_IP]),
    (
        "malformed",
        &[
            stat::MALFORMED_ETH,
            stat::MALFORMED_VLAN,
            stat::MALFORMED_IPV4,
            stat::MALFORMED_IPV6,
            stat::MALFORMED_IPV6_EXT,
            stat::MALFORMED_L4,
        ],
    ),
];

const MALFORMED: [(&str, u32); 6] = [
    ("eth", stat::MALFORMED_ETH),
    ("vlan", stat::MALFORMED_VLAN),
    ("ipv4", stat::MALFORMED_IPV4),
    ("ipv6", stat::MALFORMED_IPV6),
    ("ipv6_ext", stat::MALFORMED_IPV6_EXT),
    ("l4", stat::MALFORMED_L4),
];

const FRAGMENTS: [(&str, u32); 2] = [("first", stat::FRAGMENT_FIRST), ("later", stat::FRAGMENT_LATER)];

/// The firewall stage's figures for prometheus-client: every attached interface (all scopes),
/// read through [`read`] at scrape time. An interface that cannot be read (detached
/// meanwhile) is left out of that scrape and logged.
#[derive(Debug, Default)]
pub struct FwCollector;

/// The label set of one interface: `netns` (empty for the host's) and `iface`.
pub(crate) fn iface_labels(scope: &Scope, iface: &str) -> [(&'static str, String); 2] {
    let netns = match scope {
        Scope::Host => String::new(),
        Scope::Netns(n) => n.clone(),
    };
    [("netns", crate::labels::escape(&netns)), ("iface", crate::labels::escape(iface))]
}

/// Every readable interface's view.
pub fn read_all() -> Vec<(Scope, IfaceView)> {
    let mut out = Vec::new();
    let mut seen = Vec::new();
    for scope in scopes() {
        let Ok(ifaces) = crate::xdp::attached_ifaces(&scope) else { continue };
        for iface in ifaces {
            seen.push(scope.state_dir(&iface).join(STATE_FILE));
            match read(&scope, &iface) {
                Ok(v) => out.push((scope.clone(), v)),
                Err(e) => log::warn!("metrics: firewall on {iface} ({}): {e}", scope.dir_name()),
            }
        }
    }
    // Detached interfaces' states go.
    states().retain(|p, _| seen.contains(p));
    out
}

impl Collector for FwCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let views = read_all();
        // Each rule's labels, rendered once for both families (10,000 rules: 20,000 series).
        let rule_labels: Vec<Vec<Rendered>> = views
            .iter()
            .map(|(scope, v)| {
                let [(k1, netns), (k2, iface)] = iface_labels(scope, &v.iface);
                let base = Rendered::new([(k1, netns.as_str()), (k2, iface.as_str())]);
                v.rules
                    .iter()
                    .map(|r| {
                        let action = match r.action {
                            Action::Allow => "allow",
                            Action::Deny => "deny",
                        };
                        base.with("rule", &r.id.to_string()).with("action", action)
                    })
                    .collect()
            })
            .collect();
        type Pick = fn(&Counts) -> u64;
        let packets: Pick = |c| c.packets;
        let bytes: Pick = |c| c.bytes;
        for (name, help, pick) in [
            ("fw_rule_packets", "Packets a firewall rule matched (its verdict applied)", packets),
            ("fw_rule_bytes", "Bytes of the packets a firewall rule matched", bytes),
        ] {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for ((_, v), labels) in views.iter().zip(&rule_labels) {
                for (r, l) in v.rules.iter().zip(labels) {
                    m.encode_family(l)?.encode_counter::<NoLabelSet, _, u64>(&pick(&r.counts), None)?;
                }
            }
        }
        for (name, help, pick) in [
            ("fw_packets", "Packets seen by the firewall, by verdict (every packet in one)", packets),
            ("fw_bytes", "Bytes of the packets seen by the firewall, by verdict", bytes),
        ] {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (scope, v) in &views {
                let [netns, iface] = iface_labels(scope, &v.iface);
                for (verdict, idx) in VERDICTS {
                    let n: u64 =
                        idx.iter().map(|&i| v.stats.get(i as usize).map_or(0, pick)).fold(0, u64::wrapping_add);
                    let labels = [netns.clone(), iface.clone(), ("verdict", verdict.into())];
                    m.encode_family(&labels.as_slice())?.encode_counter::<NoLabelSet, _, u64>(&n, None)?;
                }
            }
        }
        let mut m = enc.encode_descriptor(
            "fw_malformed_packets",
            "Malformed packets dropped by the firewall, by what was wrong",
            None,
            MetricType::Counter,
        )?;
        for (scope, v) in &views {
            let [netns, iface] = iface_labels(scope, &v.iface);
            for (class, i) in MALFORMED {
                let n = v.stats.get(i as usize).map_or(0, |c| c.packets);
                let labels = [netns.clone(), iface.clone(), ("class", class.into())];
                m.encode_family(&labels.as_slice())?.encode_counter::<NoLabelSet, _, u64>(&n, None)?;
            }
        }
        let mut m = enc.encode_descriptor(
            "fw_fragments",
            "IP fragments seen by the firewall (first fragments carry ports, later ones do not)",
            None,
            MetricType::Counter,
        )?;
        for (scope, v) in &views {
            let [netns, iface] = iface_labels(scope, &v.iface);
            for (kind, i) in FRAGMENTS {
                let n = v.stats.get(i as usize).map_or(0, |c| c.packets);
                let labels = [netns.clone(), iface.clone(), ("kind", kind.into())];
                m.encode_family(&labels.as_slice())?.encode_counter::<NoLabelSet, _, u64>(&n, None)?;
            }
        }
        Ok(())
    }
}
