//! Writing compiled slots into the firewall's maps, flipping the active slot, reading counters.
//!
//! [`FwTables`] holds typed handles on the 17 maps of `rampart_fw`, taken from a freshly loaded
//! object ([`FwTables::from_ebpf`]) or reopened from their pins ([`FwTables::from_pins`]).
//! [`FwTables::install`] compiles a rule set into the slot packets are NOT using, then makes it
//! live with one update of `FW_ACTIVE` (see `rampart_common::fw`, "Atomic updates").
//!
//! Bulk writes use `BPF_MAP_UPDATE_BATCH` / `BPF_MAP_DELETE_BATCH` (one syscall per chunk instead
//! of one per entry: a slot has 131,074 port entries and up to millions of words and prefixes);
//! kernels without batch support for a map type fall back to one update per entry.
use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::{Path, PathBuf},
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use aya::{
    Ebpf, Pod,
    maps::{Array, HashMap, IterableMap, LpmTrie, Map, MapData, MapError, PerCpuArray, lpm_trie::Key},
};
use rampart_common::{
    Counter,
    fw::{
        ADDR_HASH_LENS, ADDR_HASH_MAX_ENTRIES, ADDR_MODE_HASH, ADDR_MODE_LPM, Active, Addr4Key, Addr6Key, AddrDesc,
        ClassInfo, FIELD_DST, FIELD_SRC, LPM_SLOT_BITS, Lpm4Data, Lpm6Data, MAX_CLASSES, MAX_RULES, PORT_ENTRIES,
        PROTO_ENTRIES, RuleInfo, SLOTS, SlotInfo, addr_desc_index, map_names as names, stat,
    },
};

use crate::bpf::batch::{
    BATCH_CHUNK, BPF_MAP_DELETE_BATCH, BPF_MAP_LOOKUP_BATCH, BPF_MAP_UPDATE_BATCH, BatchAttr, BatchError, NO_BATCH,
    as_bytes, sum, try_batch, unsupported, write_array, zero_counters,
};

use super::{
    compile::{CompileError, CompiledSlot, Layout, compile},
    rules::RuleSet,
};

#[derive(Debug, thiserror::Error)]
pub enum TablesError {
    #[error("map {map}: not in the program object")]
    Missing { map: &'static str },
    #[error("map {map}: open pin {}", path.display())]
    FromPin {
        map: &'static str,
        path: PathBuf,
        #[source]
        source: MapError,
    },
    #[error("map {map}: pin at {}", path.display())]
    Pin {
        map: &'static str,
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("map {map}: {op}")]
    Map {
        map: &'static str,
        op: &'static str,
        #[source]
        source: MapError,
    },
    #[error("map {map}: {op}")]
    Sys {
        map: &'static str,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("map {map}: compiled slot {slot} does not fit: {what}")]
    Fit { map: &'static str, slot: u32, what: String },
    #[error("FW_ACTIVE holds slot {0}, not 0 or 1")]
    BadActive(u32),
    #[error(transparent)]
    Compile(#[from] CompileError),
    #[error(transparent)]
    Batch(#[from] BatchError),
}

type Result<T, E = TablesError> = std::result::Result<T, E>;

/// What an install did (for logs and the benchmark).
#[derive(Clone, Debug)]
pub struct InstallReport {
    /// The slot now live.
    pub slot: u32,
    /// The slot that was live before (its tables and counters are still intact).
    pub previous: u32,
    pub rules: u32,
    pub classes: u32,
    pub words: u32,
    /// Address entries written: LPM entries and hash entries (a hashed table's /0 lives in its
    /// descriptor).
    pub prefixes: usize,
    /// Stale LPM and hash entries of the slot removed before writing.
    pub stale_removed: usize,
    pub compile_time: Duration,
    pub write_time: Duration,
}

/// Typed handles on every map of the firewall program.
pub struct FwTables {
    active: Array<MapData, Active>,
    slots: Array<MapData, SlotInfo>,
    src4: LpmTrie<MapData, Lpm4Data, u32>,
    dst4: LpmTrie<MapData, Lpm4Data, u32>,
    src6: LpmTrie<MapData, Lpm6Data, u32>,
    dst6: LpmTrie<MapData, Lpm6Data, u32>,
    proto: Array<MapData, u32>,
    sport: Array<MapData, u32>,
    dport: Array<MapData, u32>,
    classes: Array<MapData, ClassInfo>,
    words: Array<MapData, u64>,
    rules: Array<MapData, RuleInfo>,
    rule_stats: PerCpuArray<MapData, Counter>,
    stats: PerCpuArray<MapData, Counter>,
    addr_desc: Array<MapData, AddrDesc>,
    addr4: HashMap<MapData, Addr4Key, u32>,
    addr6: HashMap<MapData, Addr6Key, u32>,
}

fn typed<T: TryFrom<Map, Error = MapError>>(map: &'static str, m: Map) -> Result<T> {
    T::try_from(m).map_err(|source| TablesError::Map { map, op: "check key/value types", source })
}

impl FwTables {
    /// Takes the maps out of a loaded object (the object keeps its programs).
    pub fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self> {
        Self::build(|name| ebpf.take_map(name).ok_or(TablesError::Missing { map: name }))
    }

    /// Reopens the maps pinned in `dir` (as [`FwTables::pin_all`] left them).
    pub fn from_pins(dir: &Path) -> Result<Self> {
        Self::build(|name| {
            let path = dir.join(name);
            let data = MapData::from_pin(&path).map_err(|source| TablesError::FromPin {
                map: name,
                path: path.clone(),
                source,
            })?;
            Map::from_map_data(data).map_err(|source| TablesError::FromPin { map: name, path, source })
        })
    }

    fn build(mut get: impl FnMut(&'static str) -> Result<Map>) -> Result<Self> {
        Ok(FwTables {
            active: typed(names::ACTIVE, get(names::ACTIVE)?)?,
            slots: typed(names::SLOTS, get(names::SLOTS)?)?,
            src4: typed(names::SRC4, get(names::SRC4)?)?,
            dst4: typed(names::DST4, get(names::DST4)?)?,
            src6: typed(names::SRC6, get(names::SRC6)?)?,
            dst6: typed(names::DST6, get(names::DST6)?)?,
            proto: typed(names::PROTO, get(names::PROTO)?)?,
            sport: typed(names::SPORT, get(names::SPORT)?)?,
            dport: typed(names::DPORT, get(names::DPORT)?)?,
            classes: typed(names::CLASSES, get(names::CLASSES)?)?,
            words: typed(names::WORDS, get(names::WORDS)?)?,
            rules: typed(names::RULES, get(names::RULES)?)?,
            rule_stats: typed(names::RULE_STATS, get(names::RULE_STATS)?)?,
            stats: typed(names::STATS, get(names::STATS)?)?,
            addr_desc: typed(names::ADDR_DESC, get(names::ADDR_DESC)?)?,
            addr4: typed(names::ADDR4, get(names::ADDR4)?)?,
            addr6: typed(names::ADDR6, get(names::ADDR6)?)?,
        })
    }

    /// Every map with its name, in `map_names::ALL` order.
    fn all(&self) -> [(&'static str, &MapData); 17] {
        [
            (names::ACTIVE, self.active.map()),
            (names::SLOTS, self.slots.map()),
            (names::SRC4, self.src4.map()),
            (names::DST4, self.dst4.map()),
            (names::SRC6, self.src6.map()),
            (names::DST6, self.dst6.map()),
            (names::PROTO, self.proto.map()),
            (names::SPORT, self.sport.map()),
            (names::DPORT, self.dport.map()),
            (names::CLASSES, self.classes.map()),
            (names::WORDS, self.words.map()),
            (names::RULES, self.rules.map()),
            (names::RULE_STATS, self.rule_stats.map()),
            (names::STATS, self.stats.map()),
            (names::ADDR_DESC, self.addr_desc.map()),
            (names::ADDR4, self.addr4.map()),
            (names::ADDR6, self.addr6.map()),
        ]
    }

    /// Pins every map as `dir/<map name>`; `dir` must exist on a bpffs.
    pub fn pin_all(&self, dir: &Path) -> Result<()> {
        for (map, data) in self.all() {
            let path = dir.join(map);
            data.pin(&path).map_err(|source| TablesError::Pin { map, path, source })?;
        }
        Ok(())
    }

    /// Capacity of `FW_WORDS` given to each slot.
    pub fn words_per_slot(&self) -> u32 {
        self.words.len() / SLOTS
    }

    /// The slot packets use now.
    pub fn active_slot(&self) -> Result<u32> {
        let a = self.active.get(&0, 0).map_err(|source| TablesError::Map { map: names::ACTIVE, op: "read", source })?;
        if a.slot >= SLOTS {
            return Err(TablesError::BadActive(a.slot));
        }
        Ok(a.slot)
    }

    /// Points packets at `slot` (one map update). Used by `install` and to roll an install back.
    pub fn set_active(&mut self, slot: u32) -> Result<()> {
        if slot >= SLOTS {
            return Err(TablesError::BadActive(slot));
        }
        self.active.set(0, Active { slot, _pad: 0 }, 0).map_err(|source| TablesError::Map {
            map: names::ACTIVE,
            op: "flip active slot",
            source,
        })
    }

    /// `FW_SLOTS[slot]`.
    pub fn slot_info(&self, slot: u32) -> Result<SlotInfo> {
        self.slots.get(&slot, 0).map_err(|source| TablesError::Map { map: names::SLOTS, op: "read", source })
    }

    /// Compiles `rs` into the inactive slot and makes it live. A rule set that does not compile
    /// changes nothing; a failure while writing leaves the live slot (and so every packet's
    /// verdict) untouched.
    pub fn install(&mut self, rs: &RuleSet) -> Result<InstallReport> {
        let previous = self.active_slot()?;
        let slot = SLOTS - 1 - previous;
        let t0 = Instant::now();
        let compiled = compile(rs, Layout { slot, words_per_slot: self.words_per_slot() })?;
        let compile_time = t0.elapsed();
        let mut report = self.install_compiled(&compiled)?;
        report.compile_time = compile_time;
        Ok(report)
    }

    /// Writes an already compiled slot (its layout must name the inactive slot) and flips to it.
    pub fn install_compiled(&mut self, c: &CompiledSlot) -> Result<InstallReport> {
        let previous = self.active_slot()?;
        let slot = c.layout.slot;
        if slot != SLOTS - 1 - previous {
            return Err(TablesError::Fit { map: names::ACTIVE, slot, what: format!("slot {slot} is the live one") });
        }
        self.check_fits(c)?;
        let t0 = Instant::now();

        let stale_removed = self.clear_lpm_slot(slot)? + self.clear_hash_slot(slot)?;
        // Each table goes where its descriptor sends the program: the trie, or (all but /0,
        // which the descriptor holds) the family's hash map.
        let desc = |field, v6| c.addr_desc[addr_desc_index(0, field, v6) as usize];
        let (s4, d4, s6, d6) =
            (desc(FIELD_SRC, false), desc(FIELD_DST, false), desc(FIELD_SRC, true), desc(FIELD_DST, true));
        let lpm_part = |d: AddrDesc| d.mode == ADDR_MODE_LPM;
        let mut written = 0;
        for (d, n) in [(s4, c.src4.len()), (d4, c.dst4.len()), (s6, c.src6.len()), (d6, c.dst6.len())] {
            written += if lpm_part(d) { n } else { 0 };
        }
        write_lpm(&mut self.src4, names::SRC4, slot, if lpm_part(s4) { &c.src4 } else { &[] })?;
        write_lpm(&mut self.dst4, names::DST4, slot, if lpm_part(d4) { &c.dst4 } else { &[] })?;
        write_lpm(&mut self.src6, names::SRC6, slot, if lpm_part(s6) { &c.src6 } else { &[] })?;
        write_lpm(&mut self.dst6, names::DST6, slot, if lpm_part(d6) { &c.dst6 } else { &[] })?;
        let mut keys4 = Vec::new();
        let mut values4 = Vec::new();
        for (field, d, t) in [(FIELD_SRC, s4, &c.src4), (FIELD_DST, d4, &c.dst4)] {
            if d.mode == ADDR_MODE_HASH {
                for &(len, addr, class) in t.iter().filter(|e| e.0 != 0) {
                    keys4.push(Addr4Key { slot: slot as u8, field, len, _pad: 0, addr });
                    values4.push(class);
                }
            }
        }
        let mut keys6 = Vec::new();
        let mut values6 = Vec::new();
        for (field, d, t) in [(FIELD_SRC, s6, &c.src6), (FIELD_DST, d6, &c.dst6)] {
            if d.mode == ADDR_MODE_HASH {
                for &(len, addr, class) in t.iter().filter(|e| e.0 != 0) {
                    keys6.push(Addr6Key { slot: slot as u8, field, len, _pad: 0, addr });
                    values6.push(class);
                }
            }
        }
        write_hash(&mut self.addr4, names::ADDR4, &keys4, &values4)?;
        write_hash(&mut self.addr6, names::ADDR6, &keys6, &values6)?;
        written += keys4.len() + keys6.len();
        write_array(&mut self.addr_desc, names::ADDR_DESC, addr_desc_index(slot, FIELD_SRC, false), &c.addr_desc)?;
        write_array(&mut self.proto, names::PROTO, slot * PROTO_ENTRIES, &c.proto)?;
        write_array(&mut self.sport, names::SPORT, slot * PORT_ENTRIES, &c.sport)?;
        write_array(&mut self.dport, names::DPORT, slot * PORT_ENTRIES, &c.dport)?;
        write_array(&mut self.classes, names::CLASSES, slot * MAX_CLASSES, &c.classes)?;
        write_array(&mut self.words, names::WORDS, slot * c.layout.words_per_slot, &c.words)?;
        write_array(&mut self.rules, names::RULES, c.info.rule_base, &c.rules)?;
        zero_counters(&mut self.rule_stats, names::RULE_STATS, c.info.rule_base, c.rules.len())?;
        self.slots.set(slot, c.info, 0).map_err(|source| TablesError::Map {
            map: names::SLOTS,
            op: "write slot info",
            source,
        })?;
        self.set_active(slot)?;

        Ok(InstallReport {
            slot,
            previous,
            rules: c.info.rule_count,
            classes: c.classes.len() as u32,
            words: c.words.len() as u32,
            prefixes: written,
            stale_removed,
            compile_time: Duration::ZERO,
            write_time: t0.elapsed(),
        })
    }

    /// Refuses a compiled slot that would write outside its own slot's part of a map (the other
    /// part is live) or point packets at classes it does not define.
    fn check_fits(&self, c: &CompiledSlot) -> Result<()> {
        let slot = c.layout.slot;
        let fit = |map: &'static str, what: String| Err(TablesError::Fit { map, slot, what });
        if c.layout.words_per_slot != self.words_per_slot() {
            return fit(
                names::WORDS,
                format!(
                    "compiled for {} words per slot, the map has {}",
                    c.layout.words_per_slot,
                    self.words_per_slot()
                ),
            );
        }
        if c.proto.len() != PROTO_ENTRIES as usize {
            return fit(names::PROTO, format!("{} entries, want {PROTO_ENTRIES}", c.proto.len()));
        }
        for (map, v) in [(names::SPORT, &c.sport), (names::DPORT, &c.dport)] {
            if v.len() != PORT_ENTRIES as usize {
                return fit(map, format!("{} entries, want {PORT_ENTRIES}", v.len()));
            }
        }
        if c.classes.len() > MAX_CLASSES as usize {
            return fit(names::CLASSES, format!("{} classes > {MAX_CLASSES}", c.classes.len()));
        }
        if c.words.len() > c.layout.words_per_slot as usize {
            return fit(names::WORDS, format!("{} words > {} per slot", c.words.len(), c.layout.words_per_slot));
        }
        let rules_lo = slot * MAX_RULES;
        let rules_hi = rules_lo + MAX_RULES;
        let rule_end = c.info.rule_base as u64 + c.rules.len() as u64;
        if c.info.rule_base < rules_lo || rule_end > rules_hi as u64 {
            return fit(
                names::RULES,
                format!("rules {}..{rule_end} outside the slot's {rules_lo}..{rules_hi}", c.info.rule_base),
            );
        }
        if c.info.rule_count as usize != c.rules.len() {
            return fit(names::RULES, format!("rule_count {} but {} rules", c.info.rule_count, c.rules.len()));
        }
        let class_lo = slot * MAX_CLASSES;
        let class_hi = class_lo + c.classes.len() as u32;
        let bad = |id: u32| id < class_lo || id >= class_hi;
        let check = |map: &'static str, ids: &mut dyn Iterator<Item = u32>| -> Result<()> {
            for id in ids {
                if bad(id) {
                    return fit(map, format!("class {id} outside {class_lo}..{class_hi}"));
                }
            }
            Ok(())
        };
        check(names::SLOTS, &mut std::iter::once(c.info.all_class))?;
        check(names::PROTO, &mut c.proto.iter().copied())?;
        check(names::SPORT, &mut c.sport.iter().copied())?;
        check(names::DPORT, &mut c.dport.iter().copied())?;
        check(names::SRC4, &mut c.src4.iter().map(|e| e.2))?;
        check(names::DST4, &mut c.dst4.iter().map(|e| e.2))?;
        check(names::SRC6, &mut c.src6.iter().map(|e| e.2))?;
        check(names::DST6, &mut c.dst6.iter().map(|e| e.2))?;
        // A descriptor the program reads must name a valid class, at most ADDR_HASH_LENS lengths
        // that fit the family (longest first, so the first hit is the longest match), and every
        // hash-mode entry's length; the hash entries must fit this slot's half of the map.
        let (mut hashed4, mut hashed6) = (0usize, 0usize);
        for (flag, field) in [(rampart_common::fw::SLOT_USES_SRC, FIELD_SRC), (rampart_common::fw::SLOT_USES_DST, FIELD_DST)] {
            if c.info.flags & flag == 0 {
                continue;
            }
            for v6 in [false, true] {
                let d = c.addr_desc[addr_desc_index(0, field, v6) as usize];
                let width = if v6 { 128 } else { 32 };
                let lens: Vec<u8> = if v6 {
                    let t = if field == FIELD_SRC { &c.src6 } else { &c.dst6 };
                    t.iter().map(|e| e.0).collect()
                } else {
                    let t = if field == FIELD_SRC { &c.src4 } else { &c.dst4 };
                    t.iter().map(|e| e.0).collect()
                };
                match d.mode {
                    ADDR_MODE_LPM => continue,
                    ADDR_MODE_HASH => {}
                    m => return fit(names::ADDR_DESC, format!("field {field} v6 {v6}: mode {m}")),
                }
                check(names::ADDR_DESC, &mut std::iter::once(d.zero_class))?;
                let n = d.count as usize;
                let used = &d.lens[..n.min(ADDR_HASH_LENS)];
                let sorted = used.windows(2).all(|w| w[0] > w[1]);
                if n > ADDR_HASH_LENS || !sorted || used.iter().any(|&l| l == 0 || l > width) {
                    return fit(names::ADDR_DESC, format!("field {field} v6 {v6}: lengths {:?} (count {n})", d.lens));
                }
                if let Some(l) = lens.iter().find(|&&l| l != 0 && !used.contains(&l)) {
                    return fit(names::ADDR_DESC, format!("field {field} v6 {v6}: entry of length {l} never probed"));
                }
                *(if v6 { &mut hashed6 } else { &mut hashed4 }) += lens.iter().filter(|&&l| l != 0).count();
            }
        }
        for (map, n) in [(names::ADDR4, hashed4), (names::ADDR6, hashed6)] {
            if n > (ADDR_HASH_MAX_ENTRIES / SLOTS) as usize {
                return fit(map, format!("{n} entries > {} per slot", ADDR_HASH_MAX_ENTRIES / SLOTS));
            }
        }
        // Sparse vectors (see `ClassInfo`): a class reads `words_base + rank[s] + popcount(..)`,
        // so its stored words, one per summary bit, must lie in what this install writes, and
        // `rank` must be the prefix popcounts or the program reads another class's words.
        let words_lo = slot as u64 * c.layout.words_per_slot as u64;
        let words_hi = words_lo + c.words.len() as u64;
        for (i, ci) in c.classes.iter().enumerate() {
            let id = class_lo as u64 + i as u64;
            let mut below = 0u32;
            for (s, &bits) in ci.summary.iter().enumerate() {
                if u32::from(ci.rank[s]) != below {
                    return fit(
                        names::CLASSES,
                        format!("class {id}: rank[{s}] {} but {below} words before", ci.rank[s]),
                    );
                }
                below += bits.count_ones();
            }
            let base = u64::from(ci.words_base);
            if base < words_lo || base + u64::from(below) > words_hi {
                return fit(
                    names::CLASSES,
                    format!(
                        "class {id}: words {base}..{} outside the slot's written words {words_lo}..{words_hi}",
                        base + u64::from(below)
                    ),
                );
            }
        }
        Ok(())
    }

    /// Removes every LPM entry of `slot` (left from the rule set before the live one).
    fn clear_lpm_slot(&mut self, slot: u32) -> Result<usize> {
        Ok(clear_lpm(&mut self.src4, names::SRC4, slot)?
            + clear_lpm(&mut self.dst4, names::DST4, slot)?
            + clear_lpm(&mut self.src6, names::SRC6, slot)?
            + clear_lpm(&mut self.dst6, names::DST6, slot)?)
    }

    /// Removes every hash entry of `slot` (left from the rule set before the live one).
    fn clear_hash_slot(&mut self, slot: u32) -> Result<usize> {
        Ok(clear_hash(&mut self.addr4, names::ADDR4, slot, |k| k.slot)?
            + clear_hash(&mut self.addr6, names::ADDR6, slot, |k| k.slot)?)
    }

    /// Per-rule counters of `slot`, summed over CPUs, in rule order (`rule_count` of them).
    pub fn rule_counters(&self, slot: u32) -> Result<Vec<Counter>> {
        let info = self.slot_info(slot)?;
        (info.rule_base..info.rule_base + info.rule_count)
            .map(|i| {
                self.rule_stats.get(&i, 0).map(|v| sum(&v)).map_err(|source| TablesError::Map {
                    map: names::RULE_STATS,
                    op: "read",
                    source,
                })
            })
            .collect()
    }

    /// `FW_STATS`, summed over CPUs, indexed by `rampart_common::fw::stat`.
    pub fn stats(&self) -> Result<Vec<Counter>> {
        (0..stat::COUNT)
            .map(|i| {
                self.stats.get(&i, 0).map(|v| sum(&v)).map_err(|source| TablesError::Map {
                    map: names::STATS,
                    op: "read",
                    source,
                })
            })
            .collect()
    }
}

// ---- bulk map operations ------------------------------------------------------------------

/// LPM key data: the slot (big-endian) then the address.
trait SlotKey: Pod {
    type Addr: Copy;
    const ADDR_BITS: u32;
    fn new(slot: u32, addr: Self::Addr) -> Self;
    fn slot(&self) -> u32;
}

impl SlotKey for Lpm4Data {
    type Addr = [u8; 4];
    const ADDR_BITS: u32 = 32;
    fn new(slot: u32, addr: [u8; 4]) -> Self {
        let mut d = [0u8; 8];
        d[..4].copy_from_slice(&slot.to_be_bytes());
        d[4..].copy_from_slice(&addr);
        d
    }
    fn slot(&self) -> u32 {
        u32::from_be_bytes([self[0], self[1], self[2], self[3]])
    }
}

impl SlotKey for Lpm6Data {
    type Addr = [u8; 16];
    const ADDR_BITS: u32 = 128;
    fn new(slot: u32, addr: [u8; 16]) -> Self {
        let mut d = [0u8; 20];
        d[..4].copy_from_slice(&slot.to_be_bytes());
        d[4..].copy_from_slice(&addr);
        d
    }
    fn slot(&self) -> u32 {
        u32::from_be_bytes([self[0], self[1], self[2], self[3]])
    }
}

/// Writes `(prefix length, address, class)` entries of `slot`.
fn write_lpm<K: SlotKey>(
    map: &mut LpmTrie<MapData, K, u32>,
    name: &'static str,
    slot: u32,
    entries: &[(u8, K::Addr, u32)],
) -> Result<()> {
    if entries.is_empty() {
        return Ok(());
    }
    let mut keys = Vec::with_capacity(entries.len());
    let mut values = Vec::with_capacity(entries.len());
    for &(len, addr, class) in entries {
        if len as u32 > K::ADDR_BITS {
            return Err(TablesError::Fit { map: name, slot, what: format!("prefix length {len}") });
        }
        keys.push(Key::new(LPM_SLOT_BITS + len as u32, K::new(slot, addr)));
        values.push(class);
    }
    let fd = map.map().fd().as_fd();
    let ksize = size_of::<Key<K>>();
    if try_batch(name, "write", BPF_MAP_UPDATE_BATCH, fd, as_bytes(&keys), ksize, Some((as_bytes(&values), 4)))? {
        return Ok(());
    }
    for (k, v) in keys.iter().zip(&values) {
        map.insert(k, v, 0).map_err(|source| TablesError::Map { map: name, op: "write", source })?;
    }
    Ok(())
}

/// Every key of a map with `u32` values (both slots), in the kernel's order; `fallback` lists
/// them key by key when the kernel has no batch lookup.
fn list_keys<K: Pod>(
    fd: BorrowedFd<'_>,
    name: &'static str,
    fallback: impl FnOnce() -> Result<Vec<K>>,
) -> Result<Vec<K>> {
    // The batch cursor is a key for LPM tries, a u32 bucket index for hash maps.
    let ksize = size_of::<K>();
    let mut out: Vec<K> = Vec::new();
    if !NO_BATCH.load(Ordering::Relaxed) {
        // BPF_MAP_LOOKUP_BATCH walks the trie in the kernel, a chunk of entries per syscall
        // (one get_next_key syscall per entry costs seconds for a million prefixes).
        let mut keys = vec![0u8; BATCH_CHUNK * ksize];
        let mut values = vec![0u8; BATCH_CHUNK * 4];
        let mut cursor = vec![0u8; ksize.max(4)];
        let mut next = vec![0u8; ksize.max(4)];
        let mut first = true;
        loop {
            let mut attr = BatchAttr {
                in_batch: if first { 0 } else { cursor.as_ptr() as u64 },
                out_batch: next.as_mut_ptr() as u64,
                keys: keys.as_mut_ptr() as u64,
                values: values.as_mut_ptr() as u64,
                count: BATCH_CHUNK as u32,
                map_fd: fd.as_raw_fd() as u32,
                ..Default::default()
            };
            // SAFETY: buffers sized for `count` keys and values and one batch cursor.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    BPF_MAP_LOOKUP_BATCH,
                    &mut attr as *mut BatchAttr,
                    size_of::<BatchAttr>() as u32,
                )
            };
            let err = (rc < 0).then(io::Error::last_os_error);
            let got = attr.count as usize;
            for chunk in keys[..got * ksize].chunks_exact(ksize) {
                // SAFETY: `chunk` holds one key as the kernel wrote it; K is plain bytes.
                out.push(unsafe { std::ptr::read_unaligned(chunk.as_ptr().cast::<K>()) });
            }
            match err {
                None => {}
                // ENOENT: the walk is over (possibly after a partial chunk).
                Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
                Some(e) if first && out.is_empty() && unsupported(&e) => {
                    log::warn!("map {name}: batch lookup unsupported ({e}); listing key by key");
                    break;
                }
                Some(source) => return Err(TablesError::Sys { map: name, op: "list keys", source }),
            }
            std::mem::swap(&mut cursor, &mut next);
            first = false;
        }
    }
    fallback()
}

/// Deletes every entry of `slot`; returns how many.
fn clear_lpm<K: SlotKey>(map: &mut LpmTrie<MapData, K, u32>, name: &'static str, slot: u32) -> Result<usize> {
    // Collect first: deleting while walking with get_next_key restarts the walk.
    let t0 = Instant::now();
    let keys = list_keys(map.map().fd().as_fd(), name, || {
        map.keys().map(|k| k.map_err(|source| TablesError::Map { map: name, op: "list keys", source })).collect()
    })?;
    // Every key has at least the 32 slot bits; compare the slot only.
    let stale: Vec<Key<K>> =
        keys.into_iter().filter(|k| k.prefix_len() >= LPM_SLOT_BITS && k.data().slot() == slot).collect();
    log::debug!("map {name}: listed keys in {:?}", t0.elapsed());
    if stale.is_empty() {
        return Ok(0);
    }
    let fd = map.map().fd().as_fd();
    let ksize = size_of::<Key<K>>();
    if !try_batch(name, "delete stale entries", BPF_MAP_DELETE_BATCH, fd, as_bytes(&stale), ksize, None)? {
        for k in &stale {
            map.remove(k).map_err(|source| TablesError::Map { map: name, op: "delete stale entries", source })?;
        }
    }
    Ok(stale.len())
}

/// Writes exact-match entries.
fn write_hash<K: Pod>(map: &mut HashMap<MapData, K, u32>, name: &'static str, keys: &[K], values: &[u32]) -> Result<()> {
    if keys.is_empty() {
        return Ok(());
    }
    let fd = map.map().fd().as_fd();
    if try_batch(name, "write", BPF_MAP_UPDATE_BATCH, fd, as_bytes(keys), size_of::<K>(), Some((as_bytes(values), 4)))? {
        return Ok(());
    }
    for (k, v) in keys.iter().zip(values) {
        map.insert(k, v, 0).map_err(|source| TablesError::Map { map: name, op: "write", source })?;
    }
    Ok(())
}

/// Deletes every hash entry whose key (`slot_of`) names `slot`; returns how many.
fn clear_hash<K: Pod>(
    map: &mut HashMap<MapData, K, u32>,
    name: &'static str,
    slot: u32,
    slot_of: fn(&K) -> u8,
) -> Result<usize> {
    let keys = list_keys(map.map().fd().as_fd(), name, || {
        map.keys().map(|k| k.map_err(|source| TablesError::Map { map: name, op: "list keys", source })).collect()
    })?;
    let stale: Vec<K> = keys.into_iter().filter(|k| u32::from(slot_of(k)) == slot).collect();
    if stale.is_empty() {
        return Ok(0);
    }
    let fd = map.map().fd().as_fd();
    if !try_batch(name, "delete stale entries", BPF_MAP_DELETE_BATCH, fd, as_bytes(&stale), size_of::<K>(), None)? {
        for k in &stale {
            map.remove(k).map_err(|source| TablesError::Map { map: name, op: "delete stale entries", source })?;
        }
    }
    Ok(stale.len())
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, net::IpAddr};

    use aya::{
        EbpfLoader,
        programs::{TestRun, TestRunOptions, Xdp},
    };
    use rampart_common::{fw::PROGRAM_NAME, xdp_action};

    use super::*;
    use crate::fw::rules::{Action, AddrMatch, Cidr, Rule};

    fn require_root() {
        // SAFETY: plain syscall.
        assert!(unsafe { libc::geteuid() } == 0, "these tests load BPF programs and maps: run them as root");
    }

    fn rule(id: u32, action: Action, src: Option<AddrMatch>, proto: Option<u8>) -> Rule {
        Rule { id, action, src, dst: None, proto, sport: None, dport: None, comment: None }
    }

    /// deny src @big (n /32s in 11.0.0.0/8), allow udp; default `default`.
    fn with_set(n: u32, default: Action) -> RuleSet {
        let big: Vec<Cidr> = (0..n)
            .map(|i| Cidr { addr: IpAddr::from([11, (i >> 16) as u8, (i >> 8) as u8, i as u8]), len: 32 })
            .collect();
        RuleSet {
            default,
            sets: BTreeMap::from([("big".to_string(), big)]),
            rules: vec![
                rule(1, Action::Deny, Some(AddrMatch::Set("big".into())), None),
                rule(2, Action::Allow, None, Some(17)),
            ],
        }
    }

    fn udp_frame(src: [u8; 4]) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 8 + 4];
        f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        let ip = &mut f[14..34];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&32u16.to_be_bytes());
        ip[8] = 64;
        ip[9] = 17;
        ip[12..16].copy_from_slice(&src);
        ip[16..20].copy_from_slice(&[10, 0, 0, 2]);
        let udp = &mut f[34..42];
        udp[0..2].copy_from_slice(&4000u16.to_be_bytes());
        udp[2..4].copy_from_slice(&53u16.to_be_bytes());
        udp[4..6].copy_from_slice(&12u16.to_be_bytes());
        f
    }

    struct Loaded {
        ebpf: aya::Ebpf,
        tables: FwTables,
    }

    fn load() -> Loaded {
        require_root();
        let mut ebpf = EbpfLoader::new().load(crate::bpf::FIREWALL_OBJ).expect("load object");
        let tables = FwTables::from_ebpf(&mut ebpf).expect("take maps");
        let prog: &mut Xdp = ebpf.program_mut(PROGRAM_NAME).expect("program").try_into().expect("xdp");
        prog.load().expect("verifier");
        Loaded { ebpf, tables }
    }

    impl Loaded {
        fn run(&self, frame: &[u8]) -> u32 {
            let prog: &Xdp = self.ebpf.program(PROGRAM_NAME).expect("program").try_into().expect("xdp");
            let opts = TestRunOptions { data_in: Some(frame), repeat: 1, ..Default::default() };
            prog.test_run(opts).expect("test run").return_value
        }
    }

    fn keys_of<K: Pod>(fd: BorrowedFd<'_>, name: &'static str) -> Vec<K> {
        list_keys(fd, name, || -> Result<Vec<K>> { panic!("{name}: this kernel has no batch lookup") }).expect("list")
    }

    /// Source-address LPM entries of `slot` (IPv4 and IPv6).
    fn lpm_keys(t: &FwTables, slot: u32) -> usize {
        let (s4, s6) = (t.src4.map().fd().as_fd(), t.src6.map().fd().as_fd());
        keys_of::<Key<Lpm4Data>>(s4, names::SRC4).iter().filter(|k| k.data().slot() == slot).count()
            + keys_of::<Key<Lpm6Data>>(s6, names::SRC6).iter().filter(|k| k.data().slot() == slot).count()
    }

    /// Hash entries of `slot` (IPv4 and IPv6).
    fn hash_keys(t: &FwTables, slot: u32) -> usize {
        let (a4, a6) = (t.addr4.map().fd().as_fd(), t.addr6.map().fd().as_fd());
        keys_of::<Addr4Key>(a4, names::ADDR4).iter().filter(|k| u32::from(k.slot) == slot).count()
            + keys_of::<Addr6Key>(a6, names::ADDR6).iter().filter(|k| u32::from(k.slot) == slot).count()
    }

    /// Address entries of `slot`: source LPM entries and hash entries.
    fn slot_keys(t: &FwTables, slot: u32) -> usize {
        lpm_keys(t, slot) + hash_keys(t, slot)
    }

    /// deny src `prefixes`, allow udp; default allow.
    fn prefix_rules(prefixes: &[&str]) -> RuleSet {
        let cidrs = prefixes.iter().map(|p| p.parse().expect("cidr")).collect();
        RuleSet {
            default: Action::Allow,
            sets: BTreeMap::new(),
            rules: vec![
                rule(1, Action::Deny, Some(AddrMatch::Cidrs(cidrs)), None),
                rule(2, Action::Allow, None, Some(17)),
            ],
        }
    }

    /// Few prefix lengths go to the hash map, more to the trie; flipping between the two leaves
    /// no stale entries and the program gives the longest match either way.
    #[test]
    fn hash_and_lpm_modes_through_the_program() {
        let mut l = load();
        let few = prefix_rules(&["11.1.2.3/32", "11.1.2.0/24", "11.1.0.0/16", "12.0.0.0/8", "2001:db8::/32"]);
        let many = prefix_rules(&["11.1.2.3/32", "11.1.2.0/24", "11.1.0.0/16", "12.0.0.0/8", "11.1.3.0/25"]);
        let frames = [([11, 1, 2, 3], true), ([11, 1, 9, 9], true), ([12, 9, 9, 9], true), ([11, 2, 0, 1], false)];
        let check = |l: &Loaded| {
            for (src, denied) in frames {
                let want = if denied { xdp_action::DROP } else { xdp_action::PASS };
                assert_eq!(l.run(&udp_frame(src)), want, "{src:?}");
            }
        };
        let r = l.tables.install(&few).unwrap(); // slot 1: hash (4 v4 lengths, 1 v6)
        assert_eq!((r.slot, r.prefixes), (1, 5));
        assert_eq!((hash_keys(&l.tables, 1), lpm_keys(&l.tables, 1)), (5, 0));
        check(&l);
        let r = l.tables.install(&many).unwrap(); // slot 0: 5 v4 lengths, the trie; v6 /0 only: hash
        assert_eq!((r.slot, r.prefixes), (0, 6));
        assert_eq!((hash_keys(&l.tables, 0), lpm_keys(&l.tables, 0)), (0, 6));
        check(&l);
        assert_eq!(l.run(&udp_frame([11, 1, 3, 1])), xdp_action::DROP);
        let r = l.tables.install(&many).unwrap(); // slot 1 again: its hash entries go
        assert_eq!((r.slot, r.stale_removed), (1, 5));
        assert_eq!((hash_keys(&l.tables, 1), lpm_keys(&l.tables, 1)), (0, 6));
        let r = l.tables.install(&few).unwrap(); // slot 0: its LPM entries go
        assert_eq!((r.slot, r.stale_removed), (0, 6));
        assert_eq!((hash_keys(&l.tables, 0), lpm_keys(&l.tables, 0)), (5, 0));
        check(&l);
        assert_eq!(l.run(&udp_frame([11, 1, 3, 1])), xdp_action::DROP, "11.1.0.0/16");
        assert_eq!(l.run(&udp_frame([13, 1, 3, 1])), xdp_action::PASS);
    }

    #[test]
    fn flips_slots_and_removes_stale_prefixes() {
        let mut l = load();
        assert_eq!(l.tables.active_slot().unwrap(), 0);
        let r = l.tables.install(&with_set(5000, Action::Allow)).unwrap();
        assert_eq!((r.previous, r.slot), (0, 1));
        assert_eq!(l.tables.active_slot().unwrap(), 1);
        let in_set = udp_frame([11, 0, 3, 7]);
        let other = udp_frame([12, 0, 0, 1]);
        assert_eq!(l.run(&in_set), xdp_action::DROP);
        assert_eq!(l.run(&other), xdp_action::PASS);
        // Slot 1 holds the set's 5000 prefixes plus the /0 catch-alls the compiler adds.
        let big = slot_keys(&l.tables, 1);
        assert!(big >= 5000, "{big}");

        // Slot 0 (no prefixes), then slot 1 again with a small set: the 5000 go.
        l.tables.install(&with_set(0, Action::Deny)).unwrap();
        assert_eq!(l.tables.active_slot().unwrap(), 0);
        assert_eq!(l.run(&other), xdp_action::PASS, "udp allowed by rule 2");
        let r = l.tables.install(&with_set(3, Action::Allow)).unwrap();
        assert_eq!(r.slot, 1);
        assert!(r.stale_removed >= 5000, "{r:?}");
        assert_eq!(slot_keys(&l.tables, 1), r.prefixes);
        assert_eq!(l.run(&in_set), xdp_action::PASS, "11.0.3.7 is no longer in the set");
        assert_eq!(l.run(&udp_frame([11, 0, 0, 2])), xdp_action::DROP);
    }

    #[test]
    fn rule_counters_start_from_zero_in_a_reused_slot() {
        let mut l = load();
        let rs = with_set(10, Action::Allow);
        l.tables.install(&rs).unwrap(); // slot 1
        for _ in 0..3 {
            assert_eq!(l.run(&udp_frame([11, 0, 0, 1])), xdp_action::DROP);
        }
        let c = l.tables.rule_counters(1).unwrap();
        assert_eq!(c.iter().map(|c| c.packets).collect::<Vec<_>>(), vec![3, 0]);
        assert_eq!(c[0].bytes, 3 * 46);
        l.tables.install(&rs).unwrap(); // slot 0
        l.tables.install(&rs).unwrap(); // slot 1 again: zeroed
        assert_eq!(l.tables.rule_counters(1).unwrap().iter().map(|c| c.packets).sum::<u64>(), 0);
        let stats = l.tables.stats().unwrap();
        assert_eq!(stats.len(), stat::COUNT as usize);
        assert_eq!(stats[stat::RULE_DENY as usize].packets, 3);
    }

    #[test]
    fn a_rule_set_that_does_not_compile_changes_nothing() {
        let mut l = load();
        l.tables.install(&with_set(100, Action::Deny)).unwrap();
        let before = (
            l.tables.active_slot().unwrap(),
            l.tables.slot_info(0).unwrap(),
            l.tables.slot_info(1).unwrap(),
            slot_keys(&l.tables, 0),
            slot_keys(&l.tables, 1),
        );
        let mut bad = with_set(1, Action::Allow);
        bad.rules.push(rule(3, Action::Deny, Some(AddrMatch::Set("missing".into())), None));
        let err = l.tables.install(&bad).unwrap_err();
        assert!(matches!(err, TablesError::Compile(_)), "{err:?}");
        let after = (
            l.tables.active_slot().unwrap(),
            l.tables.slot_info(0).unwrap(),
            l.tables.slot_info(1).unwrap(),
            slot_keys(&l.tables, 0),
            slot_keys(&l.tables, 1),
        );
        assert_eq!(before, after);
        assert_eq!(l.run(&udp_frame([11, 0, 0, 5])), xdp_action::DROP);
    }

    #[test]
    fn a_compiled_slot_aimed_at_the_live_slot_is_refused() {
        let mut l = load();
        l.tables.install(&with_set(1, Action::Allow)).unwrap(); // slot 1 live
        let wps = l.tables.words_per_slot();
        let c = compile(&with_set(1, Action::Deny), Layout { slot: 1, words_per_slot: wps }).unwrap();
        assert!(matches!(l.tables.install_compiled(&c), Err(TablesError::Fit { .. })));
        assert_eq!(l.tables.active_slot().unwrap(), 1);
    }

    /// 10,000 rules on distinct /24s (one per rule, as fw-bench's set) and a last `allow udp`:
    /// each /24's class stores one or two of the 157 words, in all three summary words, so the
    /// program's sparse lookups (`rank`, popcount) are checked against the reference end to end.
    #[test]
    fn sparse_vectors_across_summary_words() {
        use crate::fw::reference::{Frag, PacketFields, match_fields};
        let mut l = load();
        let net = |i: u32| [10, (i >> 8) as u8, i as u8, 0];
        let mut rules: Vec<Rule> = (0..10_000u32)
            .map(|i| {
                let src = AddrMatch::Cidrs(vec![Cidr { addr: IpAddr::from(net(i)), len: 24 }]);
                // Every fourth allows TCP only: UDP from there falls through to the last rule.
                let (action, proto) = if i % 4 == 3 { (Action::Allow, Some(6)) } else { (Action::Deny, None) };
                rule(i + 1, action, Some(src), proto)
            })
            .collect();
        rules.push(rule(10_001, Action::Allow, None, Some(17)));
        let rs = RuleSet { default: Action::Deny, sets: BTreeMap::new(), rules };
        let r = l.tables.install(&rs).unwrap();
        assert_eq!((r.rules, r.slot), (10_001, 1));
        assert!(r.words < r.classes * 157, "{r:?}");

        let mut want_counts = vec![0u64; rs.rules.len()];
        let probes = [0, 1, 3, 63, 64, 127, 4095, 4096, 4097, 4098, 8191, 8192, 8195, 9998, 9999, 10_000, 60_000];
        for i in probes {
            let [a, b, c, _] = net(i);
            let src = [a, b, c, 77];
            let fields = PacketFields {
                family: 4,
                src: IpAddr::from(src),
                dst: IpAddr::from([10, 0, 0, 2]),
                proto: 17,
                sport: Some(4000),
                dport: Some(53),
                frag: Frag::None,
            };
            let want = match_fields(&rs, &fields);
            let action = want.map_or(rs.default, |m| rs.rules[m].action).xdp();
            assert_eq!(l.run(&udp_frame(src)), action, "source {src:?}, want rule {want:?}");
            if let Some(m) = want {
                want_counts[m] += 1;
            }
        }
        // The reference matched both deny rules and the final allow: the probes mean something.
        assert!(want_counts[10_000] >= 4 && want_counts[4096] == 1, "{want_counts:?}");
        let counts: Vec<u64> = l.tables.rule_counters(1).unwrap().iter().map(|c| c.packets).collect();
        assert_eq!(counts, want_counts);
    }

    #[test]
    fn inconsistent_sparse_classes_are_refused() {
        let mut l = load();
        let wps = l.tables.words_per_slot();
        let rs = RuleSet {
            default: Action::Deny,
            sets: BTreeMap::new(),
            rules: (0..200).map(|i| rule(i + 1, Action::Allow, None, Some(i as u8))).collect(),
        };
        let good = compile(&rs, Layout { slot: 1, words_per_slot: wps }).unwrap();
        // Proto 199's class ({rule 199}) stores word 3 only: rank [0, 1, 1, 1].
        let last = (good.proto[199] - MAX_CLASSES) as usize;
        assert_eq!(good.classes[last].summary[0], 1 << 3);

        let mut bad = good.clone();
        bad.classes[last].words_base = wps + bad.words.len() as u32;
        let e = l.tables.install_compiled(&bad).unwrap_err();
        assert!(matches!(e, TablesError::Fit { map: "FW_CLASSES", .. }), "{e}");
        assert!(e.to_string().contains("outside the slot's written words"), "{e}");

        let mut bad = good.clone();
        bad.classes[last].rank[1] = 0;
        let e = l.tables.install_compiled(&bad).unwrap_err();
        assert!(e.to_string().contains("rank[1] 0 but 1 words before"), "{e}");

        let mut bad = good.clone();
        bad.classes[last].words_base = wps - 1;
        assert!(matches!(l.tables.install_compiled(&bad), Err(TablesError::Fit { .. })));
        assert_eq!(l.tables.active_slot().unwrap(), 0, "nothing was installed");

        l.tables.install_compiled(&good).unwrap();
        assert_eq!(l.tables.active_slot().unwrap(), 1);
    }

    /// A bpffs directory removed (with its pins) on drop.
    struct PinDir(PathBuf);
    impl Drop for PinDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn pins_reopen_the_same_maps() {
        let l = load();
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = PinDir(PathBuf::from(format!(
            "/sys/fs/bpf/rampart-tables-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        )));
        std::fs::create_dir(&dir.0).expect("bpffs directory (is /sys/fs/bpf mounted?)");
        l.tables.pin_all(&dir.0).unwrap();
        for name in names::ALL {
            assert!(dir.0.join(name).exists(), "{name}");
        }
        let mut other = FwTables::from_pins(&dir.0).unwrap();
        assert_eq!(other.words_per_slot(), l.tables.words_per_slot());
        other.install(&with_set(2, Action::Deny)).unwrap();
        // The program reads what the reopened handles wrote.
        assert_eq!(l.tables.active_slot().unwrap(), 1);
        assert_eq!(l.run(&udp_frame([11, 0, 0, 1])), xdp_action::DROP);
        let missing = FwTables::from_pins(&dir.0.join("nope")).err().expect("no pins there");
        assert!(missing.to_string().contains("FW_ACTIVE"), "{missing}");
    }
}
