//! Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software Network
//! Load Balancer", NSDI 2016, §3.4), with weights and delta updates.
//!
//! # The table
//! A lookup table of prime size `M` (65,537 by default). Each backend has a preference list, a
//! permutation of `0..M`: `offset + j·skip (mod M)`. Backends take turns claiming their next
//! preferred empty slot until the table is full, so each gets about `M / N` slots and removing
//! one backend mostly moves only that backend's slots.
//!
//! **Weights**: in each turn every backend adds its weight to a credit and claims a slot when
//! the credit reaches the largest weight (then subtracts it). The heaviest backends claim one
//! slot per turn, a backend of half that weight one every second turn, and so on: slot counts
//! follow the weights. Weight 0 means "no slots".
//!
//! # Same table on every node
//! The table depends only on the set of `(name, weight, id)` and on `M`, never on process state
//! or list order (backends are sorted by name before populating). The hash is SipHash-1-3
//! (`siphasher` crate) over the bytes of `name`, with fixed keys:
//! - `offset = sip13(OFFSET_KEYS, name) mod M`
//! - `skip   = sip13(SKIP_KEYS, name) mod (M − 1) + 1`
//! - a lookup key's position is `sip13(LOOKUP_KEYS, key) mod M` (and its fallback positions
//!   are given by [`Maglev::probe`])
//!
//! The keys are `k0 = "rampart "` and `k1 = "mglv-off"`, `"mglv-skp"`, `"mglv-key"`
//! respectively (8 ASCII bytes read as a little-endian u64). They are part of the format:
//! changing them changes every table, and a test pins the resulting values.
//!
//! # Delta updates
//! [`Maglev::rebuild`] returns only the `(position, id)` pairs that changed, so a BPF array map
//! can be updated with the few writes a backend change causes (as Katran does) instead of
//! rewriting 65,537 entries. Empty positions hold [`NO_BACKEND`].

use siphasher::sip::SipHasher13;
use std::hash::Hasher;

/// Default table size: the prime Maglev's paper and Katran use.
pub const DEFAULT_TABLE_SIZE: u32 = 65_537;

/// Value of a table position that has no backend (the table is empty when no backend has a
/// weight above 0). Backend ids must differ from it.
pub const NO_BACKEND: u32 = u32::MAX;

/// Fixed SipHash keys: the little-endian words of these 8-byte ASCII strings.
const OFFSET_KEYS: (u64, u64) = (
    u64::from_le_bytes(*b"rampart "),
    u64::from_le_bytes(*b"mglv-off"),
);
const SKIP_KEYS: (u64, u64) = (
    u64::from_le_bytes(*b"rampart "),
    u64::from_le_bytes(*b"mglv-skp"),
);
/// The lookup keys of [`Maglev::position`]; the kernel's flow hash (`rampart_common::lb::flow_hash`,
/// see [`Maglev::flow_position`]) is seeded with the same two words.
const LOOKUP_KEYS: (u64, u64) = rampart_common::lb::HASH_KEYS;

/// Errors of table construction.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MaglevError {
    #[error("Maglev table size {size} is not a prime (try 251, 65537 or 655373)")]
    NotPrime { size: u32 },
    #[error("Maglev table size {size} is too small (at least 3)")]
    TooSmall { size: u32 },
    #[error(
        "{backends} backends do not fit a Maglev table of {size} positions (use a prime far above the backend count)"
    )]
    TooManyBackends { backends: usize, size: u32 },
    #[error("backend name {name:?} appears twice")]
    DuplicateName { name: String },
    #[error("backend id {id} is used by both {first:?} and {second:?}")]
    DuplicateId {
        id: u32,
        first: String,
        second: String,
    },
    #[error("backend {name:?} has id {id}, which is reserved for empty positions")]
    ReservedId { name: String, id: u32 },
}

/// One backend as the table sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaglevBackend {
    /// Value written into the table positions this backend owns (e.g. an index into a BPF map
    /// of backends). Must be unique and not [`NO_BACKEND`].
    pub id: u32,
    /// Identity that is hashed: the same name gets the same preference list on every node.
    pub name: String,
    /// Relative share of positions; 0 = none.
    pub weight: u32,
}

/// A Maglev lookup table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Maglev {
    table: Vec<u32>,
}

/// True if `n` is prime (trial division; at most 2^16 steps for a u32).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n < 4 {
        return true;
    }
    if n.is_multiple_of(2) {
        return false;
    }
    let n = u64::from(n);
    let mut d = 3u64;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

fn sip13(keys: (u64, u64), bytes: &[u8]) -> u64 {
    let mut h = SipHasher13::new_with_keys(keys.0, keys.1);
    h.write(bytes);
    h.finish()
}

impl Maglev {
    /// An empty table (every position [`NO_BACKEND`]) of `size` positions; `size` must be a
    /// prime ≥ 3.
    pub fn new(size: u32) -> Result<Self, MaglevError> {
        if size < 3 {
            return Err(MaglevError::TooSmall { size });
        }
        if !is_prime(size) {
            return Err(MaglevError::NotPrime { size });
        }
        Ok(Self {
            table: vec![NO_BACKEND; size as usize],
        })
    }

    /// A table of `size` positions filled from `backends`.
    pub fn with_backends(size: u32, backends: &[MaglevBackend]) -> Result<Self, MaglevError> {
        let mut m = Self::new(size)?;
        m.rebuild(backends)?;
        Ok(m)
    }

    /// Number of positions (the prime `M`).
    pub fn size(&self) -> u32 {
        // The length came from a u32 in `new`.
        self.table.len() as u32
    }

    /// The whole table: position → backend id ([`NO_BACKEND`] when empty).
    pub fn table(&self) -> &[u32] {
        &self.table
    }

    /// Backend id at `position`, `None` when empty or out of range.
    pub fn get(&self, position: u32) -> Option<u32> {
        self.table
            .get(position as usize)
            .copied()
            .filter(|&id| id != NO_BACKEND)
    }

    /// Position a lookup key hashes to (documented hash: see the module docs).
    pub fn position(&self, key: &[u8]) -> u32 {
        // The remainder is below the size, itself a u32.
        (sip13(LOOKUP_KEYS, key) % u64::from(self.size())) as u32
    }

    /// Position of an L4 flow: what the XDP balancer reads (`rampart_common::lb::flow_hash`, the
    /// kernel's own flow hash: cheaper than the SipHash of [`Maglev::position`], and the same
    /// function on both sides).
    pub fn flow_position(&self, flow: &rampart_common::lb::FlowKey) -> u32 {
        (rampart_common::lb::flow_hash(flow) % u64::from(self.size())) as u32
    }

    /// Backend id for a lookup key (`None` only when the table is empty).
    pub fn lookup(&self, key: &[u8]) -> Option<u32> {
        self.get(self.position(key))
    }

    /// Every position, in the order a key tries them when the backends at the first ones
    /// cannot be used: `position(key) + k·step (mod M)` for `k = 0..M`, with
    /// `step = (h / M) mod (M − 1) + 1` from the same hash `h = sip13(LOOKUP_KEYS, key)`.
    ///
    /// The step depends on the key because a fixed step (the next position) is not neutral:
    /// Maglev's population makes the owner of the next position depend on the owner of this
    /// one, so one neighbour would inherit most of a lost backend's keys. With a per-key step
    /// they spread over the others in proportion to their slots.
    pub fn probe(&self, key: &[u8]) -> impl Iterator<Item = u32> + use<> {
        let m = u64::from(self.size());
        let h = sip13(LOOKUP_KEYS, key);
        let start = h % m;
        let step = (h / m) % (m - 1) + 1;
        // Positions are below M, itself a u32.
        (0..m).map(move |k| ((start + (k * step) % m) % m) as u32)
    }

    /// Refill the table from `backends` and return the positions whose backend changed, as
    /// `(position, new id)` sorted by position (`new id` is [`NO_BACKEND`] when the table
    /// became empty). The first build returns every position. On error the table is unchanged.
    ///
    /// The order of `backends` does not matter.
    pub fn rebuild(&mut self, backends: &[MaglevBackend]) -> Result<Vec<(u32, u32)>, MaglevError> {
        let new = populate(self.size(), backends)?;
        let changed = self
            .table
            .iter()
            .zip(&new)
            .enumerate()
            .filter(|(_, (old, new))| old != new)
            .map(|(pos, (_, &id))| (pos as u32, id))
            .collect();
        self.table = new;
        Ok(changed)
    }
}

/// Build a full table (the paper's Pseudocode 1 with weighted turns).
fn populate(size: u32, backends: &[MaglevBackend]) -> Result<Vec<u32>, MaglevError> {
    validate(size, backends)?;
    let m = u64::from(size);
    let mut members: Vec<&MaglevBackend> = backends.iter().filter(|b| b.weight > 0).collect();
    // Sorted so that list order cannot change the table.
    members.sort_by(|a, b| a.name.cmp(&b.name));
    let mut table = vec![NO_BACKEND; size as usize];
    if members.is_empty() {
        return Ok(table);
    }
    // next[i]: the next candidate position of member i; skip[i]: its step (1..M−1, coprime
    // with the prime M, so the preference list visits every position once).
    let mut next: Vec<u64> = members
        .iter()
        .map(|b| sip13(OFFSET_KEYS, b.name.as_bytes()) % m)
        .collect();
    let skip: Vec<u64> = members
        .iter()
        .map(|b| sip13(SKIP_KEYS, b.name.as_bytes()) % (m - 1) + 1)
        .collect();
    let max_weight = members
        .iter()
        .map(|b| u64::from(b.weight))
        .max()
        .unwrap_or(1);
    let mut credit = vec![0u64; members.len()];
    let mut filled = 0u64;
    // Each full turn fills at least one slot (the heaviest member claims every turn), so this
    // ends after at most M turns.
    while filled < m {
        for (i, b) in members.iter().enumerate() {
            credit[i] += u64::from(b.weight);
            if credit[i] < max_weight {
                continue;
            }
            credit[i] -= max_weight;
            // Walk the preference list to the first empty slot; one exists since filled < M.
            loop {
                let c = next[i] as usize;
                next[i] = (next[i] + skip[i]) % m;
                if table[c] == NO_BACKEND {
                    table[c] = b.id;
                    filled += 1;
                    break;
                }
            }
            if filled == m {
                break;
            }
        }
    }
    Ok(table)
}

fn validate(size: u32, backends: &[MaglevBackend]) -> Result<(), MaglevError> {
    let active = backends.iter().filter(|b| b.weight > 0).count();
    if active > size as usize {
        return Err(MaglevError::TooManyBackends {
            backends: active,
            size,
        });
    }
    let mut by_name: Vec<&MaglevBackend> = backends.iter().collect();
    by_name.sort_by(|a, b| a.name.cmp(&b.name));
    for w in by_name.windows(2) {
        if w[0].name == w[1].name {
            return Err(MaglevError::DuplicateName {
                name: w[0].name.clone(),
            });
        }
    }
    let mut by_id = by_name;
    by_id.sort_by_key(|b| b.id);
    for w in by_id.windows(2) {
        if w[0].id == w[1].id {
            return Err(MaglevError::DuplicateId {
                id: w[0].id,
                first: w[0].name.clone(),
                second: w[1].name.clone(),
            });
        }
    }
    if let Some(b) = backends.iter().find(|b| b.id == NO_BACKEND) {
        return Err(MaglevError::ReservedId {
            name: b.name.clone(),
            id: b.id,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(n: u32) -> Vec<MaglevBackend> {
        (0..n)
            .map(|i| MaglevBackend {
                id: i,
                name: format!("10.0.{}.{}:80", i / 250, i % 250 + 1),
                weight: 1,
            })
            .collect()
    }

    fn counts(m: &Maglev, n: usize) -> Vec<usize> {
        let mut c = vec![0usize; n];
        for &id in m.table() {
            c[id as usize] += 1;
        }
        c
    }

    #[test]
    fn primes() {
        for p in [2, 3, 5, 251, 65_537, 655_373, 4_294_967_291] {
            assert!(is_prime(p), "{p}");
        }
        for c in [
            0,
            1,
            4,
            9,
            255,
            65_535,
            65_536,
            4_294_967_295,
            3_215_031_751,
        ] {
            assert!(!is_prime(c), "{c}");
        }
    }

    #[test]
    fn size_must_be_prime_and_at_least_three() {
        assert_eq!(
            Maglev::new(65_536),
            Err(MaglevError::NotPrime { size: 65_536 })
        );
        assert_eq!(Maglev::new(2), Err(MaglevError::TooSmall { size: 2 }));
        assert_eq!(Maglev::new(251).unwrap().size(), 251);
        assert_eq!(
            Maglev::new(DEFAULT_TABLE_SIZE).unwrap().table().len(),
            65_537
        );
    }

    #[test]
    fn invalid_backend_lists_are_refused_and_leave_the_table_alone() {
        let mut m = Maglev::with_backends(251, &backends(3)).unwrap();
        let before = m.clone();
        let mut dup = backends(3);
        dup[2].name = dup[0].name.clone();
        assert!(matches!(
            m.rebuild(&dup),
            Err(MaglevError::DuplicateName { .. })
        ));
        let mut dup = backends(3);
        dup[2].id = 0;
        assert!(matches!(
            m.rebuild(&dup),
            Err(MaglevError::DuplicateId { id: 0, .. })
        ));
        let mut reserved = backends(3);
        reserved[1].id = NO_BACKEND;
        assert!(matches!(
            m.rebuild(&reserved),
            Err(MaglevError::ReservedId { .. })
        ));
        assert_eq!(
            m.rebuild(&backends(252)),
            Err(MaglevError::TooManyBackends {
                backends: 252,
                size: 251
            })
        );
        assert_eq!(m, before);
    }

    #[test]
    fn equal_weights_balance_within_one_percent() {
        for (size, n) in [(251, 5), (65_537, 10), (65_537, 100)] {
            let m = Maglev::with_backends(size, &backends(n)).unwrap();
            assert!(m.table().iter().all(|&id| id < n));
            let ideal = f64::from(size) / f64::from(n);
            for (id, c) in counts(&m, n as usize).into_iter().enumerate() {
                let dev = (c as f64 - ideal).abs() / ideal;
                assert!(
                    dev < 0.01 || (c as f64 - ideal).abs() <= 1.0,
                    "size {size} backend {id}: {c} vs {ideal}"
                );
            }
        }
    }

    #[test]
    fn keys_spread_evenly() {
        let n = 8;
        let m = Maglev::with_backends(DEFAULT_TABLE_SIZE, &backends(n)).unwrap();
        let mut c = vec![0u32; n as usize];
        let keys = 80_000u32;
        for k in 0..keys {
            c[m.lookup(&k.to_be_bytes()).unwrap() as usize] += 1;
        }
        let ideal = f64::from(keys) / f64::from(n);
        for x in c {
            assert!(
                (f64::from(x) - ideal).abs() / ideal < 0.03,
                "{x} vs {ideal}"
            );
        }
    }

    #[test]
    fn weights_are_respected() {
        let mut b = backends(4);
        let weights = [1, 2, 3, 10];
        for (b, w) in b.iter_mut().zip(weights) {
            b.weight = w;
        }
        for size in [251, 65_537] {
            let m = Maglev::with_backends(size, &b).unwrap();
            let total: u32 = weights.iter().sum();
            for (id, c) in counts(&m, 4).into_iter().enumerate() {
                let ideal = f64::from(size) * f64::from(weights[id]) / f64::from(total);
                assert!(
                    (c as f64 - ideal).abs() <= (ideal * 0.01).max(2.0),
                    "size {size} backend {id}: {c} slots vs {ideal}"
                );
            }
        }
    }

    #[test]
    fn weight_zero_gets_nothing_and_all_zero_is_empty() {
        let mut b = backends(3);
        b[1].weight = 0;
        let m = Maglev::with_backends(251, &b).unwrap();
        assert!(!m.table().contains(&1));
        for b in &mut b {
            b.weight = 0;
        }
        let mut m2 = m.clone();
        let changed = m2.rebuild(&b).unwrap();
        assert_eq!(changed.len(), 251);
        assert!(changed.iter().all(|&(_, id)| id == NO_BACKEND));
        assert_eq!(m2.lookup(b"anything"), None);
    }

    #[test]
    fn identical_tables_regardless_of_instance_or_order() {
        let b = backends(17);
        let a = Maglev::with_backends(DEFAULT_TABLE_SIZE, &b).unwrap();
        let mut reversed = b.clone();
        reversed.reverse();
        let mut other = Maglev::new(DEFAULT_TABLE_SIZE).unwrap();
        // Built through a different history: first a subset, then the full list.
        other.rebuild(&reversed[3..]).unwrap();
        other.rebuild(&reversed).unwrap();
        assert_eq!(a, other);
    }

    #[test]
    fn the_hash_is_pinned() {
        // If this fails, tables differ from those of earlier builds (a mixed-version cluster
        // would disagree): the hash, its keys or the populate order changed. The values come
        // from `reference/maglev.py`, a second implementation of the documented rules.
        let mut h = SipHasher13::new_with_keys(
            u64::from_le_bytes([0, 1, 2, 3, 4, 5, 6, 7]),
            u64::from_le_bytes([8, 9, 10, 11, 12, 13, 14, 15]),
        );
        h.write(b"");
        assert_eq!(
            h.finish(),
            0xabac_0158_050f_c4dc,
            "SipHash-1-3 known answer"
        );

        let m = Maglev::with_backends(251, &backends(3)).unwrap();
        assert_eq!(&m.table()[..12], &[0, 2, 1, 0, 2, 0, 0, 2, 0, 1, 2, 1]);
        assert_eq!(m.position(b"203.0.113.7"), 150);
        let probe: Vec<u32> = m.probe(b"203.0.113.7").take(4).collect();
        assert_eq!(probe, [150, 212, 23, 85]);

        let mut b = backends(5);
        for (b, w) in b.iter_mut().zip([1, 2, 3, 0, 5]) {
            b.weight = w;
        }
        let m = Maglev::with_backends(DEFAULT_TABLE_SIZE, &b).unwrap();
        let checksum = m.table().iter().enumerate().fold(0u64, |acc, (pos, &id)| {
            acc.wrapping_add((pos as u64 + 1).wrapping_mul(u64::from(id) + 1))
        });
        assert_eq!(checksum, 7_613_060_010);
        assert_eq!(counts(&m, 5), [5958, 11916, 17874, 0, 29789]);
    }

    fn random_flow(next: &mut impl FnMut() -> u64, family: u8) -> rampart_common::lb::FlowKey {
        let v6 = |w: u64| if family == 6 { w } else { 0 };
        let mask = if family == 4 { 0xffff_ffff } else { u64::MAX };
        rampart_common::lb::FlowKey {
            src: [next() & mask, v6(next())],
            dst: [next() & mask, v6(next())],
            sport: next() as u16,
            dport: next() as u16,
            proto: if next() % 3 == 0 { 17 } else { 6 },
            family,
            _pad: 0,
        }
    }

    /// The kernel's flow hash is part of the format (balancers behind one ECMP router must agree):
    /// pinned values for one flow of each family, and the IPv4 table's key hashes as the flow.
    #[test]
    fn flow_hash_is_pinned_and_the_ipv4_key_hashes_as_its_flow() {
        use rampart_common::lb::{FAMILY_V4, Flow4Key, FlowKey, flow_hash};
        let word = |b: &[u8]| {
            let mut w = [0u8; 8];
            w[..b.len()].copy_from_slice(b);
            u64::from_ne_bytes(w)
        };
        let v4 = FlowKey {
            src: [word(&[192, 0, 2, 7]), 0],
            dst: [word(&[10, 100, 0, 1]), 0],
            sport: 40000,
            dport: 80,
            proto: 6,
            family: FAMILY_V4,
            _pad: 0,
        };
        assert_eq!(flow_hash(&v4), 0x9900_808f_8e52_8822);
        let m = Maglev::new(DEFAULT_TABLE_SIZE).unwrap();
        assert_eq!(m.flow_position(&v4), 57_696);
        let a: std::net::Ipv6Addr = "2001:db8::7".parse().unwrap();
        let b: std::net::Ipv6Addr = "fd00:100::1".parse().unwrap();
        let v6 = FlowKey {
            src: [word(&a.octets()[..8]), word(&a.octets()[8..])],
            dst: [word(&b.octets()[..8]), word(&b.octets()[8..])],
            sport: 40000,
            dport: 80,
            proto: 6,
            family: 6,
            _pad: 0,
        };
        assert_eq!(flow_hash(&v6), 0xeedf_2d05_b8fe_9e4a);
        assert_eq!(m.flow_position(&v6), 9_075);

        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..10_000 {
            let k = random_flow(&mut next, 4);
            assert_eq!(Flow4Key::from_flow(&k).hash(), flow_hash(&k), "{k:?}");
        }
    }

    /// The cheap hash spreads flows as evenly as SipHash would: 300,000 random flows (both
    /// families) over three equal backends land within 1 % of a third each, and flows that
    /// differ only in the source port (one client's connections) spread as well.
    #[test]
    fn flow_hash_spreads_flows_evenly() {
        let m = Maglev::with_backends(DEFAULT_TABLE_SIZE, &backends(3)).unwrap();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let n = 300_000u32;
        let mut counts = [0u32; 3];
        for i in 0..n {
            let k = random_flow(&mut next, if i % 2 == 0 { 4 } else { 6 });
            counts[m.get(m.flow_position(&k)).unwrap() as usize] += 1;
        }
        for c in counts {
            assert!((c as f64 - n as f64 / 3.0).abs() < n as f64 / 300.0, "{counts:?}");
        }
        let mut counts = [0u32; 3];
        let mut k = random_flow(&mut next, 4);
        for port in 1024..=u16::MAX {
            k.sport = port;
            counts[m.get(m.flow_position(&k)).unwrap() as usize] += 1;
        }
        let n = (u16::MAX - 1023) as f64;
        for c in counts {
            assert!((c as f64 - n / 3.0).abs() < n / 100.0, "one client's ports: {counts:?}");
        }
    }

    #[test]
    fn probe_visits_every_position_once() {
        let m = Maglev::new(251).unwrap();
        for key in [&b"a"[..], b"203.0.113.7", b""] {
            let mut seen: Vec<u32> = m.probe(key).collect();
            assert_eq!(seen[0], m.position(key));
            seen.sort_unstable();
            assert_eq!(seen, (0..251).collect::<Vec<u32>>());
        }
    }

    #[test]
    fn delta_lists_exactly_the_changed_positions() {
        let mut m = Maglev::new(251).unwrap();
        let first = m.rebuild(&backends(5)).unwrap();
        assert_eq!(first.len(), 251, "the first build writes every position");
        let before = m.table().to_vec();
        let changed = m.rebuild(&backends(4)).unwrap();
        let mut replayed = before.clone();
        for &(pos, id) in &changed {
            replayed[pos as usize] = id;
        }
        assert_eq!(replayed, m.table());
        assert!(changed.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(changed.iter().all(|&(pos, id)| before[pos as usize] != id));
        assert!(
            m.rebuild(&backends(4)).unwrap().is_empty(),
            "same list: no writes"
        );
    }

    /// Fraction of positions whose backend changes when one of `n` backends is removed.
    fn disruption(size: u32, n: u32, removed: usize) -> f64 {
        let all = backends(n);
        let mut m = Maglev::with_backends(size, &all).unwrap();
        let mut rest = all.clone();
        rest.remove(removed);
        let changed = m.rebuild(&rest).unwrap();
        changed.len() as f64 / f64::from(size)
    }

    #[test]
    fn removing_one_backend_moves_little_more_than_its_share() {
        for n in [5u32, 10, 20, 50, 100] {
            for removed in [0, n as usize / 2, n as usize - 1] {
                let d = disruption(DEFAULT_TABLE_SIZE, n, removed);
                let min = 1.0 / f64::from(n);
                assert!(d >= min - 0.001, "n {n}: {d} below the removed share {min}");
                assert!(
                    d <= min + 0.01,
                    "n {n} removed {removed}: {d} moved, bound {}",
                    min + 0.01
                );
            }
        }
    }

    #[test]
    fn small_table_also_keeps_most_positions() {
        // 251 positions for 5 backends: coarser, but most positions still stay.
        let d = disruption(251, 5, 2);
        assert!(d <= 0.2 + 0.05, "{d}");
    }
}
