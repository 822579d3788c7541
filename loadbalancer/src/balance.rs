//! Balancing algorithms: which eligible backend gets the next pick.
//!
//! "Eligible" means: state [`Up`](crate::BackendState::Up), weight above 0, not excluded by
//! [`Pool::pick_excluding`](crate::Pool::pick_excluding).
//!
//! | config string | [`Algorithm`] | rule |
//! | --- | --- | --- |
//! | `round-robin` | `RoundRobin` | smooth weighted round-robin (nginx): over any `Σw` consecutive picks each backend gets exactly `w` of them, interleaved (`a a b` for 2:1 comes out `a b a`) |
//! | `least-conn` | `LeastConn` | fewest requests in flight relative to weight (`in_flight / w`); ties go to smooth weighted round-robin among the tied backends |
//! | `p2c` | `PowerOfTwo` | two distinct backends drawn at random in proportion to weight (per-pool seeded generator); the less loaded (`in_flight / w`) wins, the first draw on a tie |
//! | `hash(client)`, `hash(header:NAME)` | `Hash(HashOn)` | Maglev table over all backends with weight > 0; the key's position, then the key's probe sequence ([`Maglev::probe`]) until an eligible backend; without a key (e.g. the header is absent) round-robin, as HAProxy's `balance hdr()` does |
//!
//! Under `hash`, a backend going Down, draining or being excluded moves only its own keys; the
//! table itself is rebuilt only when the backend list or weights change.

use std::{
    fmt,
    str::FromStr,
    sync::atomic::{AtomicU64, Ordering},
};

use crate::maglev::Maglev;

/// Errors of parsing an [`Algorithm`] from a config string.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BalanceError {
    #[error(
        "unknown balance {value:?}: expected round-robin, least-conn, p2c, hash(client) or hash(header:NAME)"
    )]
    Unknown { value: String },
    #[error("balance {value:?}: {name:?} is not a valid HTTP header name")]
    BadHeader { value: String, name: String },
}

/// What a consistent-hash pool hashes; the caller extracts it and passes the bytes to
/// [`Pool::pick`](crate::Pool::pick).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HashOn {
    /// The client's IP address (suggested bytes: `IpAddr` octets, 4 or 16; without the port so
    /// a client's connections stay together).
    ClientAddr,
    /// The value of this request header (name as written in the config; compare it
    /// case-insensitively). When the header is absent, pick with `key = None`.
    Header(String),
}

/// A pool's balancing algorithm (see the module table).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum Algorithm {
    #[default]
    RoundRobin,
    LeastConn,
    PowerOfTwo,
    Hash(HashOn),
}

impl Algorithm {
    /// What to hash, for `Hash` pools.
    pub fn hash_on(&self) -> Option<&HashOn> {
        match self {
            Self::Hash(on) => Some(on),
            _ => None,
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::RoundRobin => f.write_str("round-robin"),
            Self::LeastConn => f.write_str("least-conn"),
            Self::PowerOfTwo => f.write_str("p2c"),
            Self::Hash(HashOn::ClientAddr) => f.write_str("hash(client)"),
            Self::Hash(HashOn::Header(h)) => write!(f, "hash(header:{h})"),
        }
    }
}

/// RFC 9110 `token` characters.
fn is_tchar(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)
}

impl FromStr for Algorithm {
    type Err = BalanceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let v = s.trim();
        match v {
            "round-robin" => return Ok(Self::RoundRobin),
            "least-conn" => return Ok(Self::LeastConn),
            "p2c" => return Ok(Self::PowerOfTwo),
            "hash(client)" => return Ok(Self::Hash(HashOn::ClientAddr)),
            _ => {}
        }
        if let Some(name) = v
            .strip_prefix("hash(header:")
            .and_then(|r| r.strip_suffix(')'))
        {
            let name = name.trim();
            if name.is_empty() || !name.chars().all(is_tchar) {
                return Err(BalanceError::BadHeader {
                    value: s.to_string(),
                    name: name.to_string(),
                });
            }
            return Ok(Self::Hash(HashOn::Header(name.to_string())));
        }
        Err(BalanceError::Unknown {
            value: s.to_string(),
        })
    }
}

/// What the algorithms need to know about each backend (index = position in the pool).
pub(crate) trait View {
    fn len(&self) -> usize;
    fn weight(&self, i: usize) -> u32;
    fn in_flight(&self, i: usize) -> usize;
    /// Eligible for a new pick (state, weight > 0, not excluded).
    fn eligible(&self, i: usize) -> bool;
}

/// Smooth weighted round-robin (nginx's `ngx_http_upstream_get_peer` rule): every candidate
/// gains its weight, the highest current weight wins and loses the sum of weights. `current`
/// persists between picks; non-candidates keep theirs.
pub(crate) fn smooth_rr(
    view: &impl View,
    current: &mut [i64],
    candidate: impl Fn(usize) -> bool,
) -> Option<usize> {
    let mut best: Option<usize> = None;
    let mut total = 0i64;
    for i in 0..view.len() {
        if !candidate(i) {
            continue;
        }
        let w = i64::from(view.weight(i));
        current[i] += w;
        total += w;
        if best.is_none_or(|b| current[i] > current[b]) {
            best = Some(i);
        }
    }
    let b = best?;
    current[b] -= total;
    Some(b)
}

/// Compare loads `a_in/a_w` and `b_in/b_w` without division (weights are > 0 here).
fn load_cmp(a_in: usize, a_w: u32, b_in: usize, b_w: u32) -> std::cmp::Ordering {
    (a_in as u128 * u128::from(b_w)).cmp(&(b_in as u128 * u128::from(a_w)))
}

/// Weighted least-connections; ties by smooth weighted round-robin.
pub(crate) fn least_conn(view: &impl View, current: &mut [i64]) -> Option<usize> {
    let mut min: Option<(usize, u32)> = None;
    for i in 0..view.len() {
        if !view.eligible(i) {
            continue;
        }
        let (n, w) = (view.in_flight(i), view.weight(i));
        if min.is_none_or(|(mn, mw)| load_cmp(n, w, mn, mw).is_lt()) {
            min = Some((n, w));
        }
    }
    let (mn, mw) = min?;
    // In-flight counts may have moved since the first pass (other tasks ending requests);
    // `<=` keeps every backend at the minimum a candidate, and there is at least one as long as
    // loads only fell. If they all rose meanwhile, round-robin over all eligible ones.
    smooth_rr(view, current, |i| {
        view.eligible(i) && load_cmp(view.in_flight(i), view.weight(i), mn, mw).is_le()
    })
    .or_else(|| smooth_rr(view, current, |i| view.eligible(i)))
}

/// Power of two choices with weighted draws.
pub(crate) fn power_of_two(view: &impl View, rng: &Rng) -> Option<usize> {
    let total: u64 = (0..view.len())
        .filter(|&i| view.eligible(i))
        .map(|i| u64::from(view.weight(i)))
        .sum();
    let first = draw(view, rng.below(total)?, None)?;
    let rest = total - u64::from(view.weight(first));
    let Some(r) = rng.below(rest) else {
        return Some(first); // the only eligible backend
    };
    let Some(second) = draw(view, r, Some(first)) else {
        return Some(first);
    };
    let (a, b) = (first, second);
    if load_cmp(
        view.in_flight(b),
        view.weight(b),
        view.in_flight(a),
        view.weight(a),
    )
    .is_lt()
    {
        Some(b)
    } else {
        Some(a)
    }
}

/// The eligible backend (other than `skip`) under cumulative weight `r`.
fn draw(view: &impl View, mut r: u64, skip: Option<usize>) -> Option<usize> {
    for i in 0..view.len() {
        if Some(i) == skip || !view.eligible(i) {
            continue;
        }
        let w = u64::from(view.weight(i));
        if r < w {
            return Some(i);
        }
        r -= w;
    }
    None
}

/// Consistent hash: the first eligible backend along the key's probe sequence
/// ([`Maglev::probe`]: its own position first). Table ids are pool indices.
pub(crate) fn hash(view: &impl View, maglev: &Maglev, key: &[u8]) -> Option<usize> {
    for pos in maglev.probe(key) {
        // An empty table has no backend at all.
        let i = maglev.get(pos)? as usize;
        if view.eligible(i) {
            return Some(i);
        }
    }
    None
}

/// A lock-free seeded generator: SplitMix64 over an atomic counter. Reproducible for one
/// thread; under concurrency every draw still gets a distinct counter value.
#[derive(Debug)]
pub(crate) struct Rng(AtomicU64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(AtomicU64::new(seed))
    }

    pub(crate) fn next(&self) -> u64 {
        let mut z = self
            .0
            .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
            .wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (Lemire's multiply-shift; the bias is below n/2^64), `None` for 0.
    pub(crate) fn below(&self, n: u64) -> Option<u64> {
        (n > 0).then(|| ((u128::from(self.next()) * u128::from(n)) >> 64) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake {
        weights: Vec<u32>,
        in_flight: Vec<usize>,
        down: Vec<bool>,
    }

    impl Fake {
        fn new(weights: &[u32]) -> Self {
            Self {
                weights: weights.to_vec(),
                in_flight: vec![0; weights.len()],
                down: vec![false; weights.len()],
            }
        }
    }

    impl View for Fake {
        fn len(&self) -> usize {
            self.weights.len()
        }
        fn weight(&self, i: usize) -> u32 {
            self.weights[i]
        }
        fn in_flight(&self, i: usize) -> usize {
            self.in_flight[i]
        }
        fn eligible(&self, i: usize) -> bool {
            self.weights[i] > 0 && !self.down[i]
        }
    }

    #[test]
    fn parse_and_display_round_trip() {
        for s in [
            "round-robin",
            "least-conn",
            "p2c",
            "hash(client)",
            "hash(header:X-User-Id)",
        ] {
            let a: Algorithm = s.parse().unwrap();
            assert_eq!(a.to_string(), s);
        }
        assert_eq!(
            "hash(header:Cookie)"
                .parse::<Algorithm>()
                .unwrap()
                .hash_on(),
            Some(&HashOn::Header("Cookie".into()))
        );
        assert_eq!(Algorithm::default(), Algorithm::RoundRobin);
        assert!(matches!(
            "leastconn".parse::<Algorithm>(),
            Err(BalanceError::Unknown { .. })
        ));
        assert!(matches!(
            "hash(header:)".parse::<Algorithm>(),
            Err(BalanceError::BadHeader { .. })
        ));
        assert!(matches!(
            "hash(header:a b)".parse::<Algorithm>(),
            Err(BalanceError::BadHeader { .. })
        ));
        let msg = "random".parse::<Algorithm>().unwrap_err().to_string();
        assert!(
            msg.contains("least-conn") && msg.contains("\"random\""),
            "{msg}"
        );
    }

    #[test]
    fn smooth_rr_interleaves_like_nginx() {
        // nginx's documented example: weights 5, 1, 1 give a a b a c a a.
        let v = Fake::new(&[5, 1, 1]);
        let mut cur = vec![0; 3];
        let seq: Vec<usize> = (0..7)
            .map(|_| smooth_rr(&v, &mut cur, |i| v.eligible(i)).unwrap())
            .collect();
        assert_eq!(seq, [0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(cur, [0, 0, 0], "back to the start after one cycle");
    }

    #[test]
    fn least_conn_prefers_the_least_loaded_per_weight() {
        let mut v = Fake::new(&[1, 2, 1]);
        v.in_flight = vec![2, 3, 1];
        let mut cur = vec![0; 3];
        // Loads: 2, 1.5, 1 → backend 2.
        assert_eq!(least_conn(&v, &mut cur), Some(2));
        v.in_flight = vec![2, 3, 3];
        assert_eq!(least_conn(&v, &mut cur), Some(1));
        v.down[1] = true;
        assert_eq!(least_conn(&v, &mut cur), Some(0));
    }

    #[test]
    fn least_conn_ties_follow_the_weights() {
        let v = Fake::new(&[3, 1]);
        let mut cur = vec![0; 2];
        let mut counts = [0; 2];
        for _ in 0..400 {
            counts[least_conn(&v, &mut cur).unwrap()] += 1;
        }
        assert_eq!(counts, [300, 100]);
    }

    #[test]
    fn p2c_draws_by_weight_and_prefers_the_lighter() {
        let rng = Rng::new(7);
        let v = Fake::new(&[1, 1, 2]);
        let mut counts = [0u32; 3];
        for _ in 0..40_000 {
            counts[power_of_two(&v, &rng).unwrap()] += 1;
        }
        // Equal loads: the first draw wins, so picks follow the weights 1:1:2.
        for (i, ideal) in [10_000.0, 10_000.0, 20_000.0].into_iter().enumerate() {
            assert!(
                (f64::from(counts[i]) - ideal).abs() / ideal < 0.03,
                "{counts:?}"
            );
        }
        // A loaded backend loses every comparison it takes part in.
        let mut v = Fake::new(&[1, 1, 1]);
        v.in_flight = vec![0, 0, 5];
        let mut counts = [0u32; 3];
        for _ in 0..3_000 {
            counts[power_of_two(&v, &rng).unwrap()] += 1;
        }
        // It wins only when drawn twice, which distinct draws forbid.
        assert_eq!(counts[2], 0, "{counts:?}");
        // Only one eligible: always it.
        v.down = vec![true, false, true];
        assert_eq!(power_of_two(&v, &rng), Some(1));
        v.down = vec![true; 3];
        assert_eq!(power_of_two(&v, &rng), None);
    }

    #[test]
    fn rng_is_reproducible_and_spreads() {
        let a = Rng::new(42);
        let b = Rng::new(42);
        let xs: Vec<u64> = (0..100).map(|_| a.next()).collect();
        let ys: Vec<u64> = (0..100).map(|_| b.next()).collect();
        assert_eq!(xs, ys);
        let mut buckets = [0u32; 10];
        for _ in 0..100_000 {
            buckets[a.below(10).unwrap() as usize] += 1;
        }
        assert!(
            buckets.iter().all(|&c| (9_500..10_500).contains(&c)),
            "{buckets:?}"
        );
        assert_eq!(a.below(0), None);
    }
}
