//! Differential test: random rule sets × random frames through BPF_PROG_TEST_RUN must give what
//! `reference::classify` (the spec) gives: the XDP action, the verdict counter, the fragment
//! counter and the matched rule (seen as the rule counter that moved).
//!
//! 100 rule sets × 1,000 frames by default (`RAMPART_DIFF_RULESETS` / `RAMPART_DIFF_PACKETS`
//! change that), split over two threads with one loaded program each. `RAMPART_SEED=N` replays a
//! run; the seed is printed always and with every failure, together with the rule set (as a rule
//! file) and the frame (hex). Needs root.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Instant,
};

use rampart::fw::{
    compile::{Layout, compile},
    reference,
    rules::RuleSet,
};
use rampart_common::{
    Counter,
    fw::{ADDR_MODE_HASH, ADDR_MODE_LPM, DEFAULT_WORDS, SLOT_KEYED, SLOT_USES_DST, SLOT_USES_SRC, stat},
};
use rampart_tests::{
    packet::hex,
    random::{Universe, random_frame, random_keyed_ruleset, random_ruleset},
    testrun::FwTestRun,
};
use rand::{Rng, SeedableRng, rngs::StdRng};

fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v.parse().unwrap_or_else(|_| panic!("{name}={v}: not a number")),
        Err(_) => default,
    }
}

/// How many rules (and how many of them filler) rule set `i` has. Most are small; some cross a
/// 64-rule word, one crosses a 4,096-rule summary word, some have none at all.
fn shape(i: usize, rng: &mut StdRng) -> (usize, usize) {
    match i % 50 {
        0 => (0, 0),
        7 => (rng.gen_range(65..200), rng.gen_range(0..64)),
        17 => (4200, 4150),
        27 => (300, 250),
        37 => (rng.gen_range(65..130), 64),
        _ => (rng.gen_range(1..48), 0),
    }
}

/// The rule set and the seed of its frames, from the run's seed and the rule set's index: any
/// one rule set can be rebuilt on its own.
fn case(seed: u64, i: usize) -> (Universe, RuleSet, StdRng) {
    let mut rng = StdRng::seed_from_u64(seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let u = Universe::random(&mut rng);
    // Every fifth rule set has the keyed shape (one address field, mostly ≤ 2 ranges per port), so the
    // program's keyed path (`SLOT_KEYED`) is compared as often as the general one.
    let rs = if i % 5 == 4 {
        // Few enough rules that most sets keep every class list within KEYED_MAX.
        let n = rng.gen_range(1..20);
        random_keyed_ruleset(&u, &mut rng, n)
    } else {
        let (n, filler) = shape(i, &mut rng);
        random_ruleset(&u, &mut rng, n, filler)
    };
    (u, rs, rng)
}

#[derive(Default)]
struct Tally {
    cases: usize,
    /// Frames per verdict counter.
    verdicts: BTreeMap<u32, usize>,
    fragments: usize,
    /// Frames that matched a rule (not the default, not malformed or non-IP).
    rule_matches: usize,
    /// Address tables (used field × family) looked up by the LPM trie, by hash probes.
    lpm_tables: usize,
    hash_tables: usize,
    /// Rule sets compiled to the keyed path (`SLOT_KEYED`), and frames they classified.
    keyed_sets: usize,
    keyed_cases: usize,
}

fn run_rule_set(
    t: &mut FwTestRun,
    seed: u64,
    i: usize,
    packets: usize,
    tally: &mut Tally,
) -> Result<(), String> {
    let (u, rs, mut rng) = case(seed, i);
    rs.validate().map_err(|e| format!("rule set {i}: generator made an invalid rule set: {e}"))?;
    t.install(&rs).map_err(|e| format!("rule set {i}: install: {e:?}\n{}", rs.to_toml()))?;
    // Which address lookups this rule set exercises (the install compiles the same way).
    let c = compile(&rs, Layout { slot: 0, words_per_slot: DEFAULT_WORDS / 2 })
        .map_err(|e| format!("rule set {i}: compile: {e}"))?;
    let keyed = c.info.flags & SLOT_KEYED != 0;
    tally.keyed_sets += usize::from(keyed);
    if keyed {
        tally.keyed_cases += packets;
    }
    // addr_desc order: src v4, src v6, dst v4, dst v6.
    for (k, d) in c.addr_desc.iter().enumerate() {
        let flag = if k < 2 { SLOT_USES_SRC } else { SLOT_USES_DST };
        if c.info.flags & flag != 0 {
            tally.lpm_tables += usize::from(d.mode == ADDR_MODE_LPM);
            tally.hash_tables += usize::from(d.mode == ADDR_MODE_HASH);
        }
    }
    let mut expected_rules = vec![Counter::default(); rs.rules.len()];
    for p in 0..packets {
        let frame = random_frame(&u, &mut rng);
        let want = reference::classify(&rs, &frame.bytes);
        let got = t.run(&frame.bytes, want.rule).map_err(|e| format!("rule set {i} frame {p}: {e:?}"))?;
        let got_rule = got.rule.map(|(r, _)| r);
        let mut problems = Vec::new();
        if got.action != want.action {
            problems.push(format!("action {} (reference {})", got.action, want.action));
        }
        if got.verdict != Some(want.stat) {
            problems.push(format!("verdict counter {:?} (reference {})", got.verdict, want.stat));
        }
        if got.frag != want.frag {
            problems.push(format!("fragment counter {:?} (reference {:?})", got.frag, want.frag));
        }
        if got_rule != want.rule || !got.extra_rules.is_empty() {
            problems.push(format!("rule {got_rule:?} extra {:?} (reference {:?})", got.extra_rules, want.rule));
        }
        if let Some((_, d)) = got.rule
            && (d.packets != 1 || d.bytes != frame.len() as u64)
        {
            problems.push(format!("rule counter moved by {d:?}, want 1 packet / {} bytes", frame.len()));
        }
        if !problems.is_empty() {
            return Err(format!(
                "RAMPART_SEED={seed}: rule set {i}, frame {p}: {}\nframe ({} bytes): {}\nreference: {want:?}\n\
                 kernel: {got:?}\nrule set:\n{}",
                problems.join("; "),
                frame.len(),
                hex(&frame.bytes),
                rs.to_toml()
            ));
        }
        if let Some(r) = want.rule {
            expected_rules[r].packets += 1;
            expected_rules[r].bytes += frame.len() as u64;
            tally.rule_matches += 1;
        }
        tally.cases += 1;
        *tally.verdicts.entry(want.stat).or_default() += 1;
        tally.fragments += usize::from(want.frag.is_some());
    }
    // Every rule's counter, including rules no frame should have touched.
    let counters = t.rule_counters().map_err(|e| format!("rule set {i}: read counters: {e:?}"))?;
    if counters != expected_rules {
        let diff: Vec<String> = counters
            .iter()
            .zip(&expected_rules)
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(r, (a, b))| format!("rule {r}: kernel {a:?}, reference {b:?}"))
            .collect();
        return Err(format!("RAMPART_SEED={seed}: rule set {i}: rule counters differ: {}\n{}", diff.join("; "), rs.to_toml()));
    }
    Ok(())
}

#[test]
fn kernel_matches_reference_on_random_rule_sets() {
    let seed: u64 = match std::env::var("RAMPART_SEED") {
        Ok(v) => v.parse().unwrap_or_else(|_| panic!("RAMPART_SEED={v}: not a u64")),
        Err(_) => rand::random(),
    };
    let rule_sets = env_usize("RAMPART_DIFF_RULESETS", 100);
    let packets = env_usize("RAMPART_DIFF_PACKETS", 1000);
    let threads = env_usize("RAMPART_DIFF_THREADS", 2).max(1);
    eprintln!("differential: RAMPART_SEED={seed}, {rule_sets} rule sets x {packets} frames, {threads} threads");
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = (0..threads)
        .map(|k| {
            let stop = stop.clone();
            thread::spawn(move || -> Result<Tally, String> {
                let mut t = FwTestRun::new().map_err(|e| format!("{e}"))?;
                let mut tally = Tally::default();
                for i in (k..rule_sets).step_by(threads) {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    if let Err(e) = run_rule_set(&mut t, seed, i, packets, &mut tally) {
                        stop.store(true, Ordering::Relaxed);
                        return Err(e);
                    }
                }
                Ok(tally)
            })
        })
        .collect();
    let mut total = Tally::default();
    let mut errors = Vec::new();
    for h in handles {
        match h.join() {
            Ok(Ok(t)) => {
                total.cases += t.cases;
                total.fragments += t.fragments;
                total.rule_matches += t.rule_matches;
                total.lpm_tables += t.lpm_tables;
                total.hash_tables += t.hash_tables;
                total.keyed_sets += t.keyed_sets;
                total.keyed_cases += t.keyed_cases;
                for (k, v) in t.verdicts {
                    *total.verdicts.entry(k).or_default() += v;
                }
            }
            Ok(Err(e)) => errors.push(e),
            Err(p) => std::panic::resume_unwind(p),
        }
    }
    assert!(errors.is_empty(), "differential test failed (replay with RAMPART_SEED={seed}):\n{}", errors.join("\n\n"));
    let secs = start.elapsed().as_secs_f64();
    let by_name: Vec<String> = total
        .verdicts
        .iter()
        .map(|(k, v)| format!("{}={v}", stat::NAMES.get(*k as usize).copied().unwrap_or("?")))
        .collect();
    eprintln!(
        "differential: {} cases in {secs:.1} s (RAMPART_SEED={seed}); matched a rule: {}, fragments: {}; \
         address tables: {} LPM, {} hash; keyed rule sets: {} ({} frames); {}",
        total.cases,
        total.rule_matches,
        total.fragments,
        total.lpm_tables,
        total.hash_tables,
        total.keyed_sets,
        total.keyed_cases,
        by_name.join(" ")
    );
    assert_eq!(total.cases, rule_sets * packets, "every case ran");
    // The generator must keep the comparison meaningful: a good share of frames match a rule
    // (not just the default). Checked on runs big enough for the share to be stable.
    assert!(rule_sets < 20 || total.rule_matches * 4 >= total.cases, "only {} of {} frames matched a rule", total.rule_matches, total.cases);
    // Both address lookups must be compared: few prefix lengths (hash probes) and many (LPM).
    assert!(
        rule_sets < 20 || (total.lpm_tables >= 10 && total.hash_tables >= 10),
        "address tables: {} LPM, {} hash",
        total.lpm_tables,
        total.hash_tables
    );
    // Both classification paths must be compared: keyed and general.
    assert!(
        rule_sets < 20 || (total.keyed_sets * 20 >= rule_sets && total.keyed_sets * 2 <= rule_sets),
        "{} of {rule_sets} rule sets keyed",
        total.keyed_sets
    );
}
