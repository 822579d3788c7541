//! Running `rampart_fw` on single frames with BPF_PROG_TEST_RUN, and seeing what it counted.
//!
//! [`FwTestRun`] loads the firewall object on its own (no attach, no pins: everything goes when
//! it is dropped), installs rule sets through `FwTables` exactly as the CLI does, runs frames and
//! reports each frame's [`Outcome`]: the XDP action plus which verdict, fragment and rule
//! counters moved. Every instance has its own maps, so tests can run in parallel.

use aya::{
    Ebpf,
    maps::{Map, MapData, MapError, PerCpuArray, PerCpuValues},
    programs::{ProgramError, TestRun, TestRunOptions, Xdp},
};
use rampart::fw::{
    rules::RuleSet,
    tables::{FwTables, TablesError},
};
use rampart_common::{
    Counter,
    fw::{PROGRAM_NAME, map_names, stat},
};

#[derive(Debug, thiserror::Error)]
pub enum TestRunError {
    #[error(
        "BPF_PROG_TEST_RUN needs root (CAP_BPF and CAP_NET_ADMIN): run the packet tests as root, \
         e.g. with `sudo -E cargo xtask test`"
    )]
    NotRoot,
    #[error("loading the firewall object (rampart::bpf::FIREWALL_OBJ)")]
    Load(#[source] aya::EbpfError),
    #[error("program {PROGRAM_NAME}: {what}")]
    Program { what: &'static str, #[source] source: ProgramError },
    #[error("program {PROGRAM_NAME}: not in the object, or not XDP")]
    NoProgram,
    #[error("firewall tables")]
    Tables(#[from] TablesError),
    #[error("map {map}: {what}")]
    Map { map: &'static str, what: &'static str, #[source] source: MapError },
    #[error("map {0}: not among the program's maps")]
    MissingMap(&'static str),
    #[error("BPF_PROG_TEST_RUN on a {len}-byte frame")]
    Run { len: usize, #[source] source: ProgramError },
}

type Result<T, E = TestRunError> = std::result::Result<T, E>;

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// What one frame did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// XDP action returned.
    pub action: u32,
    /// The verdict counter (`stat::RULE_ALLOW..=stat::LAST_VERDICT`) that moved, if exactly one
    /// did by one packet. `None` if none or several did (see `stat_deltas`).
    pub verdict: Option<u32>,
    /// `stat::FRAGMENT_FIRST` or `stat::FRAGMENT_LATER` if one of them moved.
    pub frag: Option<u32>,
    /// Every `FW_STATS` index that moved, with its delta.
    pub stat_deltas: Vec<(u32, Counter)>,
    /// Rule (0-based, in the installed rule set) whose counter moved, with its delta; `None` if
    /// no rule counter moved.
    pub rule: Option<(usize, Counter)>,
    /// More than one rule counter moved (a kernel bug the caller reports).
    pub extra_rules: Vec<(usize, Counter)>,
}

/// The firewall program loaded for test runs, with its maps.
pub struct FwTestRun {
    ebpf: Ebpf,
    tables: FwTables,
    /// Second handles on the counter maps (FwTables owns the first), for single-entry reads.
    stats: PerCpuArray<MapData, Counter>,
    rule_stats: PerCpuArray<MapData, Counter>,
    /// `FW_STATS` as of the end of the last run.
    base: Vec<Counter>,
    /// The installed rules' counters as of the end of the last run.
    rules: Vec<Counter>,
    rule_base: u32,
    rule_count: u32,
}

fn sum(values: &PerCpuValues<Counter>) -> Counter {
    values.iter().fold(Counter::default(), |a, c| Counter {
        packets: a.packets.wrapping_add(c.packets),
        bytes: a.bytes.wrapping_add(c.bytes),
    })
}

fn delta(now: Counter, before: Counter) -> Counter {
    Counter { packets: now.packets.wrapping_sub(before.packets), bytes: now.bytes.wrapping_sub(before.bytes) }
}

impl FwTestRun {
    /// Loads `rampart::bpf::FIREWALL_OBJ` and its program; no rules yet (install before running:
    /// with an empty `FW_SLOTS` the program aborts IP packets).
    pub fn new() -> Result<Self> {
        if !is_root() {
            return Err(TestRunError::NotRoot);
        }
        let mut ebpf = Ebpf::load(rampart::bpf::FIREWALL_OBJ).map_err(TestRunError::Load)?;
        let prog: &mut Xdp = ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or(TestRunError::NoProgram)?
            .try_into()
            .map_err(|_| TestRunError::NoProgram)?;
        prog.load().map_err(|source| TestRunError::Program { what: "load (verifier)", source })?;
        let info = prog.info().map_err(|source| TestRunError::Program { what: "read info", source })?;
        let ids = info
            .map_ids()
            .map_err(|source| TestRunError::Program { what: "list maps", source })?
            .unwrap_or_default();
        let mut stats = None;
        let mut rule_stats = None;
        for id in ids {
            let data = MapData::from_id(id)
                .map_err(|source| TestRunError::Map { map: "(by id)", what: "open", source })?;
            let name = data
                .info()
                .map_err(|source| TestRunError::Map { map: "(by id)", what: "read info", source })?
                .name_as_str()
                .map(str::to_owned);
            let slot = match name.as_deref() {
                Some(map_names::STATS) => (&mut stats, map_names::STATS),
                Some(map_names::RULE_STATS) => (&mut rule_stats, map_names::RULE_STATS),
                _ => continue,
            };
            let map = Map::from_map_data(data)
                .map_err(|source| TestRunError::Map { map: slot.1, what: "open", source })?;
            let arr = PerCpuArray::try_from(map)
                .map_err(|source| TestRunError::Map { map: slot.1, what: "check types", source })?;
            *slot.0 = Some(arr);
        }
        let stats = stats.ok_or(TestRunError::MissingMap(map_names::STATS))?;
        let rule_stats = rule_stats.ok_or(TestRunError::MissingMap(map_names::RULE_STATS))?;
        let tables = FwTables::from_ebpf(&mut ebpf)?;
        let mut me = FwTestRun { ebpf, tables, stats, rule_stats, base: Vec::new(), rules: Vec::new(), rule_base: 0, rule_count: 0 };
        me.resync()?;
        Ok(me)
    }

    /// Installs `rs` (compile + write the inactive slot + flip), as `rampart fw load` does.
    pub fn install(&mut self, rs: &RuleSet) -> Result<()> {
        let report = self.tables.install(rs)?;
        let info = self.tables.slot_info(report.slot)?;
        self.rule_base = info.rule_base;
        self.rule_count = info.rule_count;
        self.resync()
    }

    /// The tables, for tests that look at them directly.
    pub fn tables(&mut self) -> &mut FwTables {
        &mut self.tables
    }

    fn prog(&self) -> Result<&Xdp> {
        self.ebpf
            .program(PROGRAM_NAME)
            .ok_or(TestRunError::NoProgram)?
            .try_into()
            .map_err(|_| TestRunError::NoProgram)
    }

    fn test_run(&self, frame: &[u8], repeat: u32) -> Result<aya::programs::TestRunResult> {
        let opts = TestRunOptions { data_in: Some(frame), repeat, ..Default::default() };
        self.prog()?.test_run(opts).map_err(|source| TestRunError::Run { len: frame.len(), source })
    }

    /// Runs `frame` once; returns the XDP action (counters move as for a real packet).
    pub fn run_action(&mut self, frame: &[u8]) -> Result<u32> {
        let res = self.test_run(frame, 1)?;
        self.resync()?;
        Ok(res.return_value)
    }

    /// Runs `frame` `repeat` times in the kernel; returns the action and the average time per run
    /// as the kernel measured it.
    pub fn run_repeat(&mut self, frame: &[u8], repeat: u32) -> Result<(u32, std::time::Duration)> {
        let res = self.test_run(frame, repeat)?;
        self.resync()?;
        Ok((res.return_value, res.duration))
    }

    /// Re-reads every counter as the base for the next [`FwTestRun::run`].
    fn resync(&mut self) -> Result<()> {
        self.base = self.read_stats()?;
        self.rules = self.rule_counters()?;
        Ok(())
    }

    fn read_stat(&self, i: u32) -> Result<Counter> {
        self.stats
            .get(&i, 0)
            .map(|v| sum(&v))
            .map_err(|source| TestRunError::Map { map: map_names::STATS, what: "read", source })
    }

    /// `FW_STATS`, summed over CPUs, indexed by `stat::*`.
    pub fn read_stats(&self) -> Result<Vec<Counter>> {
        (0..stat::COUNT).map(|i| self.read_stat(i)).collect()
    }

    fn read_rule(&self, r: usize) -> Result<Counter> {
        self.rule_stats
            .get(&(self.rule_base + r as u32), 0)
            .map(|v| sum(&v))
            .map_err(|source| TestRunError::Map { map: map_names::RULE_STATS, what: "read", source })
    }

    /// Counters of the installed rule set's rules, in rule order (zeroed by each install).
    pub fn rule_counters(&self) -> Result<Vec<Counter>> {
        (0..self.rule_count as usize).map(|r| self.read_rule(r)).collect()
    }

    /// Runs `frame` once and reports what moved. `rule_hint` is the rule the caller expects to
    /// match: only its counter is read when it moved as it should (one read instead of a scan);
    /// otherwise every rule counter is compared with the totals known from earlier runs.
    pub fn run(&mut self, frame: &[u8], rule_hint: Option<usize>) -> Result<Outcome> {
        let action = self.test_run(frame, 1)?.return_value;
        let now = self.read_stats()?;
        let stat_deltas: Vec<(u32, Counter)> = now
            .iter()
            .zip(&self.base)
            .enumerate()
            .map(|(i, (n, b))| (i as u32, delta(*n, *b)))
            .filter(|(_, d)| *d != Counter::default())
            .collect();
        self.base = now;
        let verdicts: Vec<_> = stat_deltas.iter().filter(|(i, _)| *i <= stat::LAST_VERDICT).collect();
        let verdict = match verdicts.as_slice() {
            [(i, d)] if d.packets == 1 => Some(*i),
            _ => None,
        };
        let frag = stat_deltas
            .iter()
            .find(|(i, _)| *i == stat::FRAGMENT_FIRST || *i == stat::FRAGMENT_LATER)
            .map(|(i, _)| *i);
        let rule_verdict = verdict == Some(stat::RULE_ALLOW) || verdict == Some(stat::RULE_DENY);

        let mut moved = Vec::new();
        let hinted = match rule_hint.filter(|&r| r < self.rules.len()) {
            Some(r) if rule_verdict => {
                let d = delta(self.read_rule(r)?, self.rules[r]);
                // The program counts one rule per packet, and only with a rule verdict: when
                // the hinted rule took this one packet, no other rule moved.
                if d.packets == 1 {
                    self.rules[r] = add(self.rules[r], d);
                    moved.push((r, d));
                    true
                } else {
                    false
                }
            }
            _ => false,
        };
        // Scan every rule when a rule verdict was not explained by the hint, or the verdicts
        // are off. A clean non-rule verdict skips the scan (the program counts rules only with
        // a rule verdict); callers compare `rule_counters()` with their own tallies at the end
        // to catch any stray count.
        if !hinted && (rule_verdict || verdict.is_none()) {
            let after = self.rule_counters()?;
            for (r, a) in after.iter().enumerate() {
                let d = delta(*a, self.rules[r]);
                if d != Counter::default() {
                    moved.push((r, d));
                }
            }
            self.rules = after;
        }
        Ok(self.outcome(action, verdict, frag, stat_deltas, moved))
    }

    fn outcome(
        &self,
        action: u32,
        verdict: Option<u32>,
        frag: Option<u32>,
        stat_deltas: Vec<(u32, Counter)>,
        moved: Vec<(usize, Counter)>,
    ) -> Outcome {
        let mut moved = moved.into_iter();
        let rule = moved.next();
        Outcome { action, verdict, frag, stat_deltas, rule, extra_rules: moved.collect() }
    }
}

fn add(a: Counter, d: Counter) -> Counter {
    Counter { packets: a.packets.wrapping_add(d.packets), bytes: a.bytes.wrapping_add(d.bytes) }
}
