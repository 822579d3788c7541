//! State of an attached interface, kept under /run/rampart, and the operations that change its
//! rules ([`Firewall`]).
//!
//! `/run/rampart/<scope>/<iface>/state.json` holds what the maps cannot tell: the rule set as
//! written (with ids), the next rule id, the live slot and, per rule id, the counts the rule
//! collected in earlier slots. A rule's counters as users see them are that base plus the live
//! slot's per-CPU counters. Every operation holds an exclusive `flock` on `lock` beside it.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs::{self, File, OpenOptions},
    io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    time::Duration,
};

use rampart_common::Counter;
use serde::{Deserialize, Serialize};

use super::{
    rules::{Cidr, Rule, RuleSet},
    tables::{FwTables, InstallReport, TablesError},
};
use crate::{paths::Scope, xdp::UsedMode};

pub const STATE_VERSION: u32 = 1;
pub const STATE_FILE: &str = "state.json";
const STATE_TMP: &str = "state.json.tmp";
pub const LOCK_FILE: &str = "lock";
/// Every file rampart makes in a state directory (detach removes these and nothing else).
pub const FILES: [&str; 3] = [STATE_FILE, STATE_TMP, LOCK_FILE];
/// Time for packets still using the old slot to finish after a flip (an XDP program runs in
/// an RCU read-side section of well under a millisecond) before its counters are read.
const GRACE: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{iface}: not attached{}", in_scope(.scope))]
    NotAttached { iface: String, scope: Scope },
    #[error("{}: {op}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: bad state file", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}: state version {found}, this rampart reads {STATE_VERSION}", path.display())]
    Version { path: PathBuf, found: u32 },
    #[error("{iface}")]
    Tables {
        iface: String,
        #[source]
        source: Box<TablesError>,
    },
    #[error("{iface}: rejected rule set: {message}")]
    Invalid { iface: String, message: String },
    #[error("{iface}: no rule with id {id}")]
    NoRule { iface: String, id: u32 },
    #[error("{iface}: position {position} out of range 1..={max}")]
    Position { iface: String, position: usize, max: usize },
    #[error("{iface}: no set named `{name}`")]
    NoSet { iface: String, name: String },
    #[error("{iface}: set `{name}` does not hold {}", prefixes.join(", "))]
    NotInSet { iface: String, name: String, prefixes: Vec<String> },
}

fn in_scope(scope: &Scope) -> String {
    match scope {
        Scope::Host => String::new(),
        Scope::Netns(n) => format!(" in network namespace {n}"),
    }
}

type Result<T, E = StateError> = std::result::Result<T, E>;

/// A packet and byte count (what `state.json` and the CLI show).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub packets: u64,
    pub bytes: u64,
}

impl From<Counter> for Counts {
    fn from(c: Counter) -> Self {
        Counts { packets: c.packets, bytes: c.bytes }
    }
}

impl std::ops::Add for Counts {
    type Output = Counts;
    fn add(self, o: Counts) -> Counts {
        Counts { packets: self.packets.wrapping_add(o.packets), bytes: self.bytes.wrapping_add(o.bytes) }
    }
}

/// `state.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FwState {
    pub version: u32,
    pub iface: String,
    pub ifindex: u32,
    pub mode: UsedMode,
    pub rules: RuleSet,
    /// Id the next `fw add` gets.
    pub next_id: u32,
    /// The slot holding `rules` (what `FW_ACTIVE` says after a completed update).
    pub active_slot: u32,
    /// Per rule id: counts collected in slots before the live one.
    pub counter_bases: BTreeMap<u32, Counts>,
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StateError + use<> {
    let path = path.to_path_buf();
    move |source| StateError::Io { op, path, source }
}

/// An exclusive `flock` on an interface's lock file, released on drop.
#[derive(Debug)]
pub struct Lock {
    _file: File,
}

fn flock(file: File, path: &Path) -> Result<Lock> {
    loop {
        // SAFETY: flock on a valid descriptor.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc == 0 {
            return Ok(Lock { _file: file });
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(io_err("lock", path)(e));
        }
    }
}

/// Takes the lock of an attached interface (waits for a running operation).
pub fn lock(scope: &Scope, iface: &str) -> Result<Lock> {
    let path = scope.state_dir(iface).join(LOCK_FILE);
    let file = match OpenOptions::new().read(true).write(true).open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(StateError::NotAttached { iface: iface.to_string(), scope: scope.clone() });
        }
        Err(e) => return Err(io_err("open", &path)(e)),
    };
    flock(file, &path)
}

/// Creates the state directory of a new attachment with its lock and first state.
pub fn create(scope: &Scope, iface: &str, st: &FwState) -> Result<()> {
    let dir = scope.state_dir(iface);
    fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
    let path = dir.join(LOCK_FILE);
    let file =
        OpenOptions::new().read(true).write(true).create_new(true).open(&path).map_err(io_err("create", &path))?;
    let _lock = flock(file, &path)?;
    save(scope, iface, st)
}

/// Reads `state.json`.
pub fn load(scope: &Scope, iface: &str) -> Result<FwState> {
    let path = scope.state_dir(iface).join(STATE_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(StateError::NotAttached { iface: iface.to_string(), scope: scope.clone() });
        }
        Err(e) => return Err(io_err("read", &path)(e)),
    };
    let st: FwState = serde_json::from_str(&text).map_err(|source| StateError::Parse { path: path.clone(), source })?;
    if st.version != STATE_VERSION {
        return Err(StateError::Version { path, found: st.version });
    }
    Ok(st)
}

/// Writes `state.json` whole or not at all (temporary file, then rename).
pub fn save(scope: &Scope, iface: &str, st: &FwState) -> Result<()> {
    let dir = scope.state_dir(iface);
    let tmp = dir.join(STATE_TMP);
    let path = dir.join(STATE_FILE);
    let text = serde_json::to_string_pretty(st).map_err(|source| StateError::Parse { path: path.clone(), source })?;
    fs::write(&tmp, text).map_err(io_err("write", &tmp))?;
    fs::rename(&tmp, &path).map_err(io_err("rename into place", &path))
}

/// One rule's counters as shown to users.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RuleCounts {
    pub id: u32,
    /// 1-based position in the rule set.
    pub position: usize,
    pub packets: u64,
    pub bytes: u64,
}

/// An attached interface, locked for one operation.
pub struct Firewall {
    scope: Scope,
    iface: String,
    state: FwState,
    tables: FwTables,
    _lock: Lock,
}

impl Firewall {
    /// Locks `iface`, reads its state and reopens its pinned maps.
    pub fn open(scope: &Scope, iface: &str) -> Result<Self> {
        crate::xdp::check_iface(iface)
            .map_err(|_| StateError::NotAttached { iface: iface.to_string(), scope: scope.clone() })?;
        let lock = lock(scope, iface)?;
        let state = load(scope, iface)?;
        let tables = FwTables::from_pins(&scope.pin_dir(iface))
            .map_err(|source| StateError::Tables { iface: iface.to_string(), source: Box::new(source) })?;
        let mut fw = Firewall { scope: scope.clone(), iface: iface.to_string(), state, tables, _lock: lock };
        fw.reconcile()?;
        Ok(fw)
    }

    fn terr(&self) -> impl FnOnce(TablesError) -> StateError + '_ {
        |source| StateError::Tables { iface: self.iface.clone(), source: Box::new(source) }
    }

    /// An update that died between the flip and saving its state left packets on a slot the
    /// state does not describe; the state's slot is intact (nothing writes the live slot), so
    /// flip back to it.
    fn reconcile(&mut self) -> Result<()> {
        let live = self.tables.active_slot().map_err(self.terr())?;
        if live != self.state.active_slot {
            log::warn!(
                "{}: slot {live} is live but the state describes slot {}; switching back",
                self.iface,
                self.state.active_slot
            );
            let slot = self.state.active_slot;
            self.tables.set_active(slot).map_err(self.terr())?;
        }
        Ok(())
    }

    pub fn iface(&self) -> &str {
        &self.iface
    }
    pub fn scope(&self) -> &Scope {
        &self.scope
    }
    pub fn state(&self) -> &FwState {
        &self.state
    }
    pub fn rules(&self) -> &RuleSet {
        &self.state.rules
    }
    pub fn tables(&self) -> &FwTables {
        &self.tables
    }

    /// Replaces the whole rule set. Rules are renumbered 1, 2, … in order and their counters
    /// start from zero (they are new rules, whatever their ids were before).
    pub fn load(&mut self, mut rs: RuleSet) -> Result<InstallReport> {
        for (i, r) in rs.rules.iter_mut().enumerate() {
            r.id = i as u32 + 1;
        }
        let next_id = rs.rules.len() as u32 + 1;
        self.update(rs, next_id, false)
    }

    /// Inserts `rule` at 1-based `position` (default: last) with the next id; returns the id.
    pub fn add_rule(&mut self, mut rule: Rule, position: Option<usize>) -> Result<u32> {
        let mut rs = self.state.rules.clone();
        let max = rs.rules.len() + 1;
        let position = position.unwrap_or(max);
        if position == 0 || position > max {
            return Err(StateError::Position { iface: self.iface.clone(), position, max });
        }
        let id = self.state.next_id;
        rule.id = id;
        rs.rules.insert(position - 1, rule);
        self.update(rs, id + 1, true)?;
        Ok(id)
    }

    /// Removes the rule with `id`.
    pub fn delete_rule(&mut self, id: u32) -> Result<()> {
        let mut rs = self.state.rules.clone();
        let before = rs.rules.len();
        rs.rules.retain(|r| r.id != id);
        if rs.rules.len() == before {
            return Err(StateError::NoRule { iface: self.iface.clone(), id });
        }
        let next_id = self.state.next_id;
        self.update(rs, next_id, true).map(|_| ())
    }

    /// Adds prefixes to set `name`, creating it if missing; returns how many were new.
    pub fn set_add(&mut self, name: &str, prefixes: &[Cidr]) -> Result<usize> {
        let mut rs = self.state.rules.clone();
        let set = rs.sets.entry(name.to_string()).or_default();
        let mut have: BTreeSet<Cidr> = set.iter().copied().collect();
        let mut added = 0;
        for p in prefixes {
            if have.insert(*p) {
                set.push(*p);
                added += 1;
            }
        }
        let next_id = self.state.next_id;
        self.update(rs, next_id, true)?;
        Ok(added)
    }

    /// Removes prefixes from set `name`; every one must be in it (else nothing changes).
    pub fn set_delete(&mut self, name: &str, prefixes: &[Cidr]) -> Result<()> {
        let mut rs = self.state.rules.clone();
        let Some(set) = rs.sets.get_mut(name) else {
            return Err(StateError::NoSet { iface: self.iface.clone(), name: name.to_string() });
        };
        let have: BTreeSet<Cidr> = set.iter().copied().collect();
        let missing: Vec<String> = prefixes.iter().filter(|p| !have.contains(p)).map(|p| p.to_string()).collect();
        if !missing.is_empty() {
            return Err(StateError::NotInSet { iface: self.iface.clone(), name: name.to_string(), prefixes: missing });
        }
        let drop: BTreeSet<Cidr> = prefixes.iter().copied().collect();
        set.retain(|p| !drop.contains(p));
        let next_id = self.state.next_id;
        self.update(rs, next_id, true).map(|_| ())
    }

    /// Replaces the contents of set `name` (created if missing).
    pub fn set_replace(&mut self, name: &str, prefixes: Vec<Cidr>) -> Result<()> {
        let mut rs = self.state.rules.clone();
        let mut seen = BTreeSet::new();
        let unique: Vec<Cidr> = prefixes.into_iter().filter(|p| seen.insert(*p)).collect();
        rs.sets.insert(name.to_string(), unique);
        let next_id = self.state.next_id;
        self.update(rs, next_id, true).map(|_| ())
    }

    /// validate → install into the spare slot (atomic flip) → grace → carry the old slot's
    /// counts of surviving rules into their bases → save. Any failure before the flip changes
    /// nothing live; a failure after it flips back, so maps and state stay as they were.
    fn update(&mut self, rs: RuleSet, next_id: u32, carry: bool) -> Result<InstallReport> {
        rs.validate().map_err(|message| StateError::Invalid { iface: self.iface.clone(), message })?;
        let old_slot = self.state.active_slot;
        let report = self.tables.install(&rs).map_err(self.terr())?;
        log::info!(
            "{}: slot {} live: {} rules, {} classes, {} words, {} prefixes ({} stale removed); \
             compile {:?}, write {:?}",
            self.iface,
            report.slot,
            report.rules,
            report.classes,
            report.words,
            report.prefixes,
            report.stale_removed,
            report.compile_time,
            report.write_time
        );
        match self.after_flip(rs, next_id, carry, old_slot, report.slot) {
            Ok(()) => Ok(report),
            Err(e) => {
                if let Err(back) = self.tables.set_active(old_slot) {
                    log::error!("{}: could not switch back to slot {old_slot}: {back}", self.iface);
                }
                Err(e)
            }
        }
    }

    fn after_flip(&mut self, rs: RuleSet, next_id: u32, carry: bool, old_slot: u32, new_slot: u32) -> Result<()> {
        // Always wait: the next update may overwrite the old slot.
        std::thread::sleep(GRACE);
        let mut bases = BTreeMap::new();
        if carry {
            let live = self.tables.rule_counters(old_slot).map_err(self.terr())?;
            let survivors: BTreeSet<u32> = rs.rules.iter().map(|r| r.id).collect();
            for (i, rule) in self.state.rules.rules.iter().enumerate() {
                if survivors.contains(&rule.id) {
                    let base = self.state.counter_bases.get(&rule.id).copied().unwrap_or_default();
                    let now = live.get(i).copied().map(Counts::from).unwrap_or_default();
                    bases.insert(rule.id, base + now);
                }
            }
        }
        let st = FwState { rules: rs, next_id, active_slot: new_slot, counter_bases: bases, ..self.state.clone() };
        save(&self.scope, &self.iface, &st)?;
        self.state = st;
        Ok(())
    }

    /// Every rule's counters (base + live), in rule order.
    pub fn rule_counts(&self) -> Result<Vec<RuleCounts>> {
        let live = self.tables.rule_counters(self.state.active_slot).map_err(self.terr())?;
        Ok(self
            .state
            .rules
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let c = self.state.counter_bases.get(&r.id).copied().unwrap_or_default()
                    + live.get(i).copied().map(Counts::from).unwrap_or_default();
                RuleCounts { id: r.id, position: i + 1, packets: c.packets, bytes: c.bytes }
            })
            .collect())
    }

    /// `FW_STATS` summed over CPUs, indexed by `rampart_common::fw::stat`.
    pub fn stats(&self) -> Result<Vec<Counts>> {
        Ok(self.tables.stats().map_err(self.terr())?.into_iter().map(Counts::from).collect())
    }
}
