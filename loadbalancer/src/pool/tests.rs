use std::{
    collections::HashSet,
    sync::{
        Arc, Barrier,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
};

use super::*;
use crate::{Cause, HashOn};

fn config(algorithm: Algorithm) -> PoolConfig {
    PoolConfig {
        algorithm,
        seed: Some(1),
        ..PoolConfig::default()
    }
}

fn hash_config() -> PoolConfig {
    config(Algorithm::Hash(HashOn::ClientAddr))
}

/// Backends `b0`, `b1`, ... with the given weights; the data is the index.
fn specs(weights: &[u32]) -> Vec<BackendSpec<usize>> {
    weights
        .iter()
        .enumerate()
        .map(|(i, &w)| BackendSpec::new(format!("b{i}"), i).with_weight(w))
        .collect()
}

fn pool(algorithm: Algorithm, weights: &[u32]) -> Pool<usize> {
    Pool::new(config(algorithm), specs(weights)).unwrap()
}

const ALL: [Algorithm; 4] = [
    Algorithm::RoundRobin,
    Algorithm::LeastConn,
    Algorithm::PowerOfTwo,
    Algorithm::Hash(HashOn::ClientAddr),
];

/// Pick `n` times, dropping each guard at once; `key_of(i)` gives the i-th key.
fn counts_sequential(
    p: &Pool<usize>,
    n: usize,
    key_of: impl Fn(usize) -> Option<Vec<u8>>,
) -> Vec<usize> {
    let mut c = vec![0; p.len()];
    for i in 0..n {
        let key = key_of(i);
        c[*p.pick(key.as_deref()).unwrap().data()] += 1;
    }
    c
}

fn assert_near(counts: &[usize], ideal: &[f64], tolerance: f64) {
    for (i, (&c, &e)) in counts.iter().zip(ideal).enumerate() {
        assert!(
            (c as f64 - e).abs() <= e * tolerance,
            "backend {i}: {c} picks, expected {e} ± {}%: {counts:?}",
            tolerance * 100.0
        );
    }
}

fn key(i: usize) -> Option<Vec<u8>> {
    Some((i as u32).to_be_bytes().to_vec())
}

#[test]
fn pool_is_send_and_sync() {
    fn check<X: Send + Sync>() {}
    check::<Pool<String>>();
    check::<PickGuard<String>>();
    check::<Arc<Backend<String>>>();
}

#[test]
fn round_robin_is_exact_and_smooth() {
    let p = pool(Algorithm::RoundRobin, &[5, 1, 1]);
    let seq: Vec<usize> = (0..7).map(|_| *p.pick(None).unwrap().data()).collect();
    assert_eq!(seq, [0, 0, 1, 0, 2, 0, 0]);
    assert_eq!(
        counts_sequential(&p, 7_000, |_| None),
        [5_000, 1_000, 1_000]
    );
    let p = pool(Algorithm::RoundRobin, &[1, 1, 1, 1]);
    assert_eq!(counts_sequential(&p, 4_000, |_| None), [1_000; 4]);
}

#[test]
fn least_conn_follows_load_and_weights() {
    // Held guards: in-flight counts end in proportion to the weights.
    let p = pool(Algorithm::LeastConn, &[2, 1, 1]);
    let held: Vec<_> = (0..400).map(|_| p.pick(None).unwrap()).collect();
    let in_flight: Vec<usize> = p.backends().iter().map(|b| b.in_flight()).collect();
    assert_eq!(in_flight, [200, 100, 100]);
    drop(held);
    assert!(p.backends().iter().all(|b| b.in_flight() == 0));
    // Released at once: ties every time, broken by weighted round-robin.
    assert_eq!(
        counts_sequential(&p, 4_000, |_| None),
        [2_000, 1_000, 1_000]
    );
    // A busy backend is avoided until the others catch up.
    let busy: Vec<_> = (0..3)
        .map(|_| p.pick_excluding(None, &[1, 2]).unwrap())
        .collect();
    assert!(busy.iter().all(|g| g.index() == 0));
    let next: Vec<usize> = (0..2).map(|_| p.pick(None).unwrap().index()).collect();
    assert!(next.iter().all(|&i| i != 0), "{next:?}");
}

#[test]
fn p2c_follows_weights_and_avoids_load() {
    let p = pool(Algorithm::PowerOfTwo, &[1, 1, 2]);
    let c = counts_sequential(&p, 40_000, |_| None);
    assert_near(&c, &[10_000.0, 10_000.0, 20_000.0], 0.03);
    // With guards held, the choices even out the load per weight much more tightly than
    // random draws alone would.
    let held: Vec<_> = (0..4_000).map(|_| p.pick(None).unwrap()).collect();
    let in_flight: Vec<usize> = p.backends().iter().map(|b| b.in_flight()).collect();
    assert_near(&in_flight, &[1_000.0, 1_000.0, 2_000.0], 0.02);
    drop(held);
}

#[test]
fn p2c_is_reproducible_with_a_seed() {
    let a = pool(Algorithm::PowerOfTwo, &[1, 2, 3, 4]);
    let b = pool(Algorithm::PowerOfTwo, &[1, 2, 3, 4]);
    let sa: Vec<usize> = (0..200).map(|_| a.pick(None).unwrap().index()).collect();
    let sb: Vec<usize> = (0..200).map(|_| b.pick(None).unwrap().index()).collect();
    assert_eq!(sa, sb);
    let c = Pool::new(
        PoolConfig {
            seed: Some(2),
            ..config(Algorithm::PowerOfTwo)
        },
        specs(&[1, 2, 3, 4]),
    )
    .unwrap();
    let sc: Vec<usize> = (0..200).map(|_| c.pick(None).unwrap().index()).collect();
    assert_ne!(sa, sc, "another seed, another sequence");
}

#[test]
fn hash_is_sticky_and_weighted() {
    let p = Pool::new(hash_config(), specs(&[1, 1, 2])).unwrap();
    for i in 0..500 {
        let k = key(i);
        let first = p.pick(k.as_deref()).unwrap().index();
        assert_eq!(p.pick(k.as_deref()).unwrap().index(), first);
    }
    assert_near(
        &counts_sequential(&p, 40_000, key),
        &[10_000.0, 10_000.0, 20_000.0],
        0.04,
    );
    // Another pool (another "node") with the same list maps keys identically.
    let q = Pool::new(hash_config(), specs(&[1, 1, 2])).unwrap();
    for i in 0..500 {
        let k = key(i);
        assert_eq!(
            p.pick(k.as_deref()).unwrap().index(),
            q.pick(k.as_deref()).unwrap().index()
        );
    }
    // Without a key: round-robin.
    assert_eq!(counts_sequential(&p, 400, |_| None), [100, 100, 200]);
}

#[test]
fn hash_moves_only_the_keys_of_an_unavailable_backend() {
    let p = Pool::new(hash_config(), specs(&[1, 1, 1, 1])).unwrap();
    let keys = 4_000;
    let before: Vec<usize> = (0..keys)
        .map(|i| p.pick(key(i).as_deref()).unwrap().index())
        .collect();
    p.set_health(2, Health::Down).unwrap();
    let after: Vec<usize> = (0..keys)
        .map(|i| p.pick(key(i).as_deref()).unwrap().index())
        .collect();
    let mut moved_to = vec![0usize; 4];
    for (b, a) in before.iter().zip(&after) {
        if *b == 2 {
            moved_to[*a] += 1;
        } else {
            assert_eq!(a, b, "a key of a healthy backend moved");
        }
    }
    assert_eq!(moved_to[2], 0);
    let moved: usize = moved_to.iter().sum();
    // The moved keys spread over the remaining backends (walking the table, not to one
    // neighbour).
    for i in [0, 1, 3] {
        assert!(moved_to[i] * 5 > moved, "{moved_to:?}");
    }
    // Deterministic fallback, and back home when it returns.
    let again: Vec<usize> = (0..keys)
        .map(|i| p.pick(key(i).as_deref()).unwrap().index())
        .collect();
    assert_eq!(after, again);
    p.set_health(2, Health::Up).unwrap();
    let home: Vec<usize> = (0..keys)
        .map(|i| p.pick(key(i).as_deref()).unwrap().index())
        .collect();
    assert_eq!(before, home);
}

#[test]
fn every_algorithm_skips_unavailable_backends() {
    for algorithm in ALL {
        let p = pool(algorithm.clone(), &[1, 1, 1, 1, 0]);
        p.set_health(0, Health::Down).unwrap();
        p.set_admin(1, Admin::Drain).unwrap();
        p.set_admin(2, Admin::Maint).unwrap();
        assert_eq!(p.available(), 1);
        for i in 0..200 {
            let k = key(i);
            assert_eq!(p.pick(k.as_deref()).unwrap().index(), 3, "{algorithm}");
        }
        p.set_admin(3, Admin::Maint).unwrap();
        assert!(
            p.pick(key(1).as_deref()).is_none(),
            "{algorithm}: weight 0 is never picked"
        );
        assert!(p.pick(None).is_none(), "{algorithm}");
    }
}

#[test]
fn retry_excludes_the_backends_already_tried() {
    for algorithm in ALL {
        let p = pool(algorithm.clone(), &[1, 1, 1]);
        for i in 0..100 {
            let k = key(i);
            let first = p.pick(k.as_deref()).unwrap();
            let tried = [first.index()];
            let second = p.pick_excluding(k.as_deref(), &tried).unwrap();
            assert_ne!(second.index(), first.index(), "{algorithm}");
            let tried = [first.index(), second.index()];
            let third = p.pick_excluding(k.as_deref(), &tried).unwrap();
            assert!(!tried.contains(&third.index()), "{algorithm}");
            assert!(
                p.pick_excluding(k.as_deref(), &[0, 1, 2]).is_none(),
                "{algorithm}"
            );
        }
    }
    // Under hash the retry target is deterministic.
    let p = Pool::new(hash_config(), specs(&[1, 1, 1, 1])).unwrap();
    for i in 0..100 {
        let k = key(i);
        let first = p.pick(k.as_deref()).unwrap().index();
        let a = p.pick_excluding(k.as_deref(), &[first]).unwrap().index();
        let b = p.pick_excluding(k.as_deref(), &[first]).unwrap().index();
        assert_eq!(a, b);
    }
}

#[test]
fn drain_keeps_what_is_in_flight_and_takes_nothing_new() {
    let p = pool(Algorithm::RoundRobin, &[1, 1]);
    let on_0: Vec<_> = (0..4)
        .map(|_| p.pick(None).unwrap())
        .filter(|g| g.index() == 0)
        .collect();
    assert_eq!(on_0.len(), 2);
    let change = p.set_admin(0, Admin::Drain).unwrap().unwrap();
    assert_eq!(
        (change.from, change.to, change.cause, change.id.as_str()),
        (BackendState::Up, BackendState::Drain, Cause::Admin, "b0")
    );
    // The guards still work and count; nothing new lands on b0.
    assert_eq!(on_0[0].data(), &0);
    let b0 = p.backend(0).unwrap();
    assert_eq!(b0.in_flight(), 2);
    for _ in 0..50 {
        assert_eq!(p.pick(None).unwrap().index(), 1);
    }
    drop(on_0);
    assert_eq!(b0.in_flight(), 0, "drained");
    // Maint behaves the same for picks; back to Ready resumes.
    p.set_admin(0, Admin::Maint).unwrap();
    assert_eq!(b0.state(), BackendState::Maint);
    assert!((0..10).all(|_| p.pick(None).unwrap().index() == 1));
    p.set_admin(0, Admin::Ready).unwrap();
    assert_eq!(counts_sequential(&p, 100, |_| None), [50, 50]);
}

#[test]
fn health_reports_change_state_and_return_events() {
    let p = pool(Algorithm::RoundRobin, &[1, 1]);
    assert_eq!(p.report_check(0, false), Ok(None));
    assert_eq!(p.report_check(0, false), Ok(None));
    let down = p.report_check(0, false).unwrap().unwrap();
    assert_eq!(
        down,
        StateChange {
            index: 0,
            id: "b0".into(),
            from: BackendState::Up,
            to: BackendState::Down,
            health: Health::Down,
            cause: Cause::Check,
        }
    );
    assert!((0..10).all(|_| p.pick(None).unwrap().index() == 1));
    assert_eq!(p.report_check(0, true), Ok(None));
    let up = p.report_check(0, true).unwrap().unwrap();
    assert_eq!((up.from, up.to), (BackendState::Down, BackendState::Up));
    // Passive marking through the guard.
    for expect_change in [false, false, true] {
        let g = p.pick_excluding(None, &[0]).unwrap();
        assert_eq!(g.report_live_failure().is_some(), expect_change);
    }
    assert_eq!(p.backend(1).unwrap().state(), BackendState::Down);
    assert_eq!(p.report_live_success(1), Ok(None));
    assert_eq!(p.report_live_failure(0), Ok(None));
    assert_eq!(
        p.report_check(7, true),
        Err(PoolError::NoSuchBackend { index: 7, len: 2 })
    );
}

#[test]
fn initial_health_down_waits_for_rise() {
    let cfg = PoolConfig {
        health: HealthConfig {
            initial: Health::Down,
            ..HealthConfig::default()
        },
        ..config(Algorithm::RoundRobin)
    };
    let p = Pool::new(cfg, specs(&[1])).unwrap();
    assert!(p.pick(None).is_none());
    p.report_check(0, true).unwrap();
    assert!(p.pick(None).is_none());
    assert!(p.report_check(0, true).unwrap().is_some());
    assert!(p.pick(None).is_some());
}

#[test]
fn invalid_pools_are_refused() {
    let dup = vec![BackendSpec::new("a", 0), BackendSpec::new("a", 1)];
    assert_eq!(
        Pool::new(PoolConfig::default(), dup).unwrap_err(),
        PoolError::DuplicateBackend { id: "a".into() }
    );
    assert_eq!(
        Pool::new(PoolConfig::default(), vec![BackendSpec::new("", 0)]).unwrap_err(),
        PoolError::EmptyId
    );
    let bad_health = PoolConfig {
        health: HealthConfig {
            rise: 0,
            ..HealthConfig::default()
        },
        ..PoolConfig::default()
    };
    assert!(matches!(
        Pool::new(bad_health, specs(&[1])),
        Err(PoolError::BadHealth { rise: 0, fall: 3 })
    ));
    let bad_table = PoolConfig {
        table_size: 1000,
        ..hash_config()
    };
    assert_eq!(
        Pool::new(bad_table, specs(&[1])).unwrap_err(),
        PoolError::Maglev(MaglevError::NotPrime { size: 1000 })
    );
    let empty = pool(Algorithm::LeastConn, &[]);
    assert!(empty.is_empty() && empty.pick(None).is_none());
}

#[test]
fn reload_keeps_state_of_backends_that_stay() {
    let p = pool(Algorithm::LeastConn, &[1, 1, 1]);
    for _ in 0..3 {
        p.report_check(1, false).unwrap();
    }
    p.set_admin(2, Admin::Drain).unwrap();
    let held = p.pick(None).unwrap();
    assert_eq!(held.id(), "b0");

    // New list: b2 (weight changed) and b1 stay in another order, b0 goes, b3 comes.
    let new_specs = vec![
        BackendSpec::new("b3", 3),
        BackendSpec::new("b2", 2).with_weight(5),
        BackendSpec::new("b1", 1),
    ];
    let q = Pool::with_state_from(&p, config(Algorithm::RoundRobin), new_specs.clone()).unwrap();
    assert_eq!(
        UpdateSummary::between(&p, &q),
        UpdateSummary {
            added: vec!["b3".into()],
            removed: vec!["b0".into()],
            kept: vec!["b2".into(), "b1".into()],
        }
    );
    let b1 = q.find("b1").unwrap();
    assert_eq!((b1.index(), b1.health()), (2, Health::Down));
    let b2 = q.find("b2").unwrap();
    assert_eq!((b2.state(), b2.weight()), (BackendState::Drain, 5));
    assert_eq!(q.find("b3").unwrap().state(), BackendState::Up);
    assert_eq!(q.algorithm(), Algorithm::RoundRobin);
    // The old pool is untouched; the guard of a removed backend still works.
    assert_eq!(p.len(), 3);
    assert_eq!(held.in_flight(), 1);
    drop(held);
    assert_eq!(p.backend(0).unwrap().in_flight(), 0);

    // Streaks carry over too: one more passed check after the reload brings b1 up (rise 2).
    p.report_check(1, true).unwrap();
    let up = q.report_check(2, true).unwrap().unwrap();
    assert_eq!((up.index, up.to), (2, BackendState::Up));

    // In place.
    let summary = p.update(config(Algorithm::RoundRobin), new_specs).unwrap();
    assert_eq!(summary.removed, ["b0"]);
    assert_eq!(p.find("b1").unwrap().state(), BackendState::Up);
    assert_eq!(p.find("b2").unwrap().state(), BackendState::Drain);
    assert!(p.find("b0").is_none());
}

#[test]
fn reload_keeps_in_flight_counts_for_least_conn() {
    let p = pool(Algorithm::LeastConn, &[1, 1]);
    let held: Vec<_> = (0..10).map(|_| p.pick_excluding(None, &[1])).collect();
    // Reordered list: b0 is now index 1, still with 10 in flight.
    p.update(
        config(Algorithm::LeastConn),
        vec![BackendSpec::new("b1", 1), BackendSpec::new("b0", 0)],
    )
    .unwrap();
    assert_eq!(p.backend(1).unwrap().in_flight(), 10);
    let next: Vec<_> = (0..9).map(|_| p.pick(None).unwrap()).collect();
    assert!(next.iter().all(|g| g.id() == "b1"));
    drop(held);
    assert_eq!(p.backend(1).unwrap().in_flight(), 0);
}

#[test]
fn a_failed_update_changes_nothing() {
    let p = pool(Algorithm::RoundRobin, &[1, 1]);
    p.set_admin(0, Admin::Maint).unwrap();
    let bad = vec![BackendSpec::new("b0", 0), BackendSpec::new("b0", 1)];
    assert!(p.update(config(Algorithm::LeastConn), bad).is_err());
    assert_eq!(p.len(), 2);
    assert_eq!(p.algorithm(), Algorithm::RoundRobin);
    assert_eq!(p.backend(0).unwrap().state(), BackendState::Maint);
}

#[test]
fn hash_reload_with_a_backend_added_moves_few_keys() {
    let p = Pool::new(hash_config(), specs(&[1; 10])).unwrap();
    let keys = 20_000;
    let before: Vec<String> = (0..keys)
        .map(|i| p.pick(key(i).as_deref()).unwrap().id().to_string())
        .collect();
    p.update(hash_config(), specs(&[1; 11])).unwrap();
    let moved = (0..keys)
        .filter(|&i| p.pick(key(i).as_deref()).unwrap().id() != before[i])
        .count();
    // Ideal: 1/11 of the keys (to the new backend). Allow Maglev's small extra.
    let frac = moved as f64 / keys as f64;
    assert!(frac > 0.07 && frac < 1.0 / 11.0 + 0.02, "{frac}");
}

/// Threads hammer pick/drop (and least-conn's accounting) concurrently.
#[test]
fn concurrent_picks_keep_exact_accounting() {
    for algorithm in ALL {
        let p = Arc::new(pool(algorithm.clone(), &[1, 2, 3, 4]));
        let threads = 4;
        let per_thread = 5_000;
        let start = Arc::new(Barrier::new(threads));
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let p = Arc::clone(&p);
                let start = Arc::clone(&start);
                thread::spawn(move || {
                    start.wait();
                    let mut held = Vec::new();
                    for i in 0..per_thread {
                        let k = ((t * per_thread + i) as u32).to_be_bytes();
                        let g = p.pick(Some(&k)).unwrap();
                        held.push(g);
                        // Hold a varying number of guards, release in another order.
                        if held.len() > i % 7 {
                            held.swap_remove(i % held.len());
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let backends = p.backends();
        assert!(backends.iter().all(|b| b.in_flight() == 0), "{algorithm}");
        let total: u64 = backends.iter().map(|b| b.picks()).sum();
        assert_eq!(total, (threads * per_thread) as u64, "{algorithm}");
    }
}

#[test]
fn concurrent_least_conn_never_stacks_while_a_backend_is_idle() {
    // N threads each hold at most one guard over N backends: when a thread picks, at most
    // N − 1 backends are busy, so least-conn must always find an idle one. This holds only if
    // the in-flight increment happens under the same lock as the choice. The skewed weights
    // make a lost race visible: with the increment outside the lock, a thread could see the
    // heavy backend still idle and, by the round-robin tie break, stack onto it.
    for weights in [&[1000u32, 1][..], &[1, 1, 1, 1]] {
        let n = weights.len();
        let p = Arc::new(pool(Algorithm::LeastConn, weights));
        let stacked = Arc::new(AtomicUsize::new(0));
        let start = Arc::new(Barrier::new(n));
        let handles: Vec<_> = (0..n)
            .map(|_| {
                let (p, stacked, start) =
                    (Arc::clone(&p), Arc::clone(&stacked), Arc::clone(&start));
                thread::spawn(move || {
                    start.wait();
                    for _ in 0..50_000 {
                        let g = p.pick(None).unwrap();
                        if g.in_flight() > 1 {
                            stacked.fetch_add(1, Ordering::Relaxed);
                        }
                        drop(g);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(stacked.load(Ordering::Relaxed), 0, "weights {weights:?}");
    }
}

#[test]
fn concurrent_reports_updates_and_picks() {
    let p = Arc::new(Pool::new(hash_config(), specs(&[1, 1, 1, 1])).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let pickers: Vec<_> = (0..2)
        .map(|t| {
            let (p, stop) = (Arc::clone(&p), Arc::clone(&stop));
            thread::spawn(move || {
                let mut n = 0u32;
                let mut seen = HashSet::new();
                // Bounded: stops when told, or after a fixed number of picks.
                while !stop.load(Ordering::Relaxed) && n < 2_000_000 {
                    n += 1;
                    let k = (n ^ t).to_be_bytes();
                    if let Some(g) = p.pick_excluding(Some(&k), &[0]) {
                        assert_ne!(g.id(), "b0", "excluded by index 0 in every generation");
                        seen.insert(g.id().to_string());
                    }
                }
                seen
            })
        })
        .collect();
    let reporter = {
        let p = Arc::clone(&p);
        thread::spawn(move || {
            let mut changes = 0;
            for i in 0..3_000 {
                let b = 1 + i % 3;
                // Two rounds of failures (down at the third failure), then two of passes (up).
                let ok = (i / 3) % 4 >= 2;
                changes += usize::from(p.report_check(b, ok).unwrap().is_some());
                changes += usize::from(p.report_live_failure(b).unwrap().is_some());
            }
            changes
        })
    };
    for round in 0..200 {
        let w = 1 + (round % 3) as u32;
        p.update(hash_config(), specs(&[1, w, 1, w])).unwrap();
    }
    let changes = reporter.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    for h in pickers {
        let seen = h.join().unwrap();
        assert!(!seen.contains("b0"));
    }
    assert!(changes > 0, "the reporter saw state changes");
    assert!(p.backends().iter().all(|b| b.in_flight() == 0));
}
