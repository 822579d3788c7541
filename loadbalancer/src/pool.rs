//! A pool of backends: picking, in-flight accounting, health and admin state, reload.
//!
//! [`Pool<T>`] is `Send + Sync` (for `T: Send + Sync`): share it in an `Arc` between tasks.
//! A pick takes a read lock just long enough to clone an `Arc` of the current generation, then
//! reads per-backend atomics; round-robin and least-connections add one short mutex (the
//! round-robin weights, O(backends)); power-of-two and hash picks take no mutex at all.
//!
//! Per-backend state (health, admin state, in-flight and pick counters) lives apart from the
//! backend list and is handed over to the next generation on reload for every backend whose
//! [`id`](BackendSpec::id) stays, so a reload loses neither health nor drains, and requests in
//! flight keep counting against the right backend.

use std::{
    collections::HashMap,
    collections::hash_map::RandomState,
    fmt,
    hash::BuildHasher,
    ops::Deref,
    sync::{Arc, Mutex, PoisonError, RwLock},
};

use crate::{
    balance::{self, Algorithm, Rng, View},
    maglev::{DEFAULT_TABLE_SIZE, Maglev, MaglevBackend, MaglevError},
    state::{Admin, BackendState, Event, Health, HealthConfig, Shared, StateChange},
};

/// Weight of a backend whose config gives none (as in HAProxy and nginx).
pub const DEFAULT_WEIGHT: u32 = 1;

/// Errors of building a pool or addressing its backends.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PoolError {
    #[error("backend {id:?} is listed twice in the pool")]
    DuplicateBackend { id: String },
    #[error("a backend has an empty id")]
    EmptyId,
    #[error("health rise and fall must be at least 1 (got rise {rise}, fall {fall})")]
    BadHealth { rise: u32, fall: u32 },
    #[error("consistent hash table: {0}")]
    Maglev(#[from] MaglevError),
    #[error("no backend at index {index} (the pool has {len})")]
    NoSuchBackend { index: usize, len: usize },
}

/// One backend as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec<T> {
    /// Identity: unique in the pool, stable across reloads (state is carried over by it), and
    /// what consistent hashing hashes (so the same ids give the same key → backend mapping on
    /// every node). Use the address as written in the config, e.g. `"10.0.1.21:80"` or
    /// `"https://10.0.2.31:8443"`.
    pub id: String,
    /// Relative share of picks; 0 = never picked (but still health-checked).
    pub weight: u32,
    /// Whatever the caller needs per backend (address, TLS settings, connection pool, ...).
    pub data: T,
}

impl<T> BackendSpec<T> {
    /// A backend of weight [`DEFAULT_WEIGHT`].
    pub fn new(id: impl Into<String>, data: T) -> Self {
        Self {
            id: id.into(),
            weight: DEFAULT_WEIGHT,
            data,
        }
    }

    pub fn with_weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }
}

/// How a pool balances and judges health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    pub algorithm: Algorithm,
    pub health: HealthConfig,
    /// Maglev table size for `Hash` pools: a prime, far above the number of backends (default
    /// [`DEFAULT_TABLE_SIZE`] = 65,537, i.e. 256 KiB per hash pool).
    pub table_size: u32,
    /// Seed of the `p2c` generator; `None` = a random seed per pool.
    pub seed: Option<u64>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            algorithm: Algorithm::default(),
            health: HealthConfig::default(),
            table_size: DEFAULT_TABLE_SIZE,
            seed: None,
        }
    }
}

/// A backend of a pool: its spec plus live state. Handed out by [`Pool::backend`],
/// [`Pool::find`] and (through `Deref`) by [`PickGuard`]; keeping an `Arc<Backend<T>>` (e.g.
/// in a health-check task) keeps reporting into the same state even across reloads, as long
/// as the backend stays in the pool.
#[derive(Debug)]
pub struct Backend<T> {
    index: usize,
    id: String,
    weight: u32,
    data: T,
    health_config: HealthConfig,
    shared: Arc<Shared>,
}

impl<T> Backend<T> {
    /// Position in the pool's backend list (the order given to [`Pool::new`]).
    pub fn index(&self) -> usize {
        self.index
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn weight(&self) -> u32 {
        self.weight
    }

    pub fn data(&self) -> &T {
        &self.data
    }

    /// What picking sees (admin state combined with health).
    pub fn state(&self) -> BackendState {
        self.shared.state()
    }

    pub fn health(&self) -> Health {
        self.shared.health()
    }

    pub fn admin(&self) -> Admin {
        self.shared.admin()
    }

    /// Picks whose [`PickGuard`] is still alive (requests or connections in progress). A
    /// draining backend is drained when this reaches 0.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight()
    }

    /// Picks since the backend joined the pool (kept across reloads), for metrics.
    pub fn picks(&self) -> u64 {
        self.shared.picks()
    }

    /// Result of one active health check. See [the rule](crate::state).
    pub fn report_check(&self, ok: bool) -> Option<StateChange> {
        self.apply(Event::Check(ok))
    }

    /// A live request failed in a way that blames the backend (connect refused or timed out,
    /// reset, 502-class answer). `fall` consecutive live failures (no live success between)
    /// mark it Down; see [the rule](crate::state).
    pub fn report_live_failure(&self) -> Option<StateChange> {
        self.apply(Event::LiveFailure)
    }

    /// A live request succeeded: ends the live failure streak (never raises a Down backend).
    pub fn report_live_success(&self) -> Option<StateChange> {
        self.apply(Event::LiveSuccess)
    }

    /// Operator: `Ready`, `Drain` or `Maint`.
    pub fn set_admin(&self, admin: Admin) -> Option<StateChange> {
        self.apply(Event::SetAdmin(admin))
    }

    /// Operator override of the health (like HAProxy's `set server health`); the next checks
    /// keep applying the rise/fall rule from there.
    pub fn set_health(&self, health: Health) -> Option<StateChange> {
        self.apply(Event::SetHealth(health))
    }

    fn apply(&self, event: Event) -> Option<StateChange> {
        let (from, to, health, cause) = self.shared.apply(&self.health_config, event)?;
        Some(StateChange {
            index: self.index,
            id: self.id.clone(),
            from,
            to,
            health,
            cause,
        })
    }

    fn eligible(&self) -> bool {
        self.weight > 0 && self.shared.state().accepts_new()
    }
}

/// A picked backend. Counts as one in-flight request/connection on it until dropped: keep it
/// for as long as the request (or the connection, for least-conn over connections) lasts.
/// Dereferences to [`Backend<T>`] (`guard.data()`, `guard.id()`, `guard.report_live_failure()`).
pub struct PickGuard<T> {
    backend: Arc<Backend<T>>,
}

impl<T> PickGuard<T> {
    fn new(backend: &Arc<Backend<T>>) -> Self {
        backend.shared.acquire();
        Self {
            backend: Arc::clone(backend),
        }
    }

    /// The backend, to keep beyond the guard's life.
    pub fn backend(&self) -> &Arc<Backend<T>> {
        &self.backend
    }
}

impl<T> Deref for PickGuard<T> {
    type Target = Backend<T>;

    fn deref(&self) -> &Backend<T> {
        &self.backend
    }
}

impl<T> Drop for PickGuard<T> {
    fn drop(&mut self) {
        self.backend.shared.release();
    }
}

impl<T> fmt::Debug for PickGuard<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PickGuard")
            .field("index", &self.backend.index)
            .field("id", &self.backend.id)
            .finish()
    }
}

/// Backend ids added, removed and kept by a reload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpdateSummary {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub kept: Vec<String>,
}

impl UpdateSummary {
    /// Compare the backend lists of two pools (e.g. before and after
    /// [`Pool::with_state_from`]).
    pub fn between<U, T>(old: &Pool<U>, new: &Pool<T>) -> Self {
        let old = old.generation();
        let new = new.generation();
        Self::of(
            old.backends.iter().map(|b| b.id.as_str()),
            new.backends.iter().map(|b| b.id.as_str()),
        )
    }

    fn of<'a>(old: impl Iterator<Item = &'a str>, new: impl Iterator<Item = &'a str>) -> Self {
        let old: Vec<&str> = old.collect();
        let new: Vec<&str> = new.collect();
        let mut s = Self::default();
        for id in &new {
            if old.contains(id) {
                s.kept.push(id.to_string());
            } else {
                s.added.push(id.to_string());
            }
        }
        s.removed = old
            .iter()
            .filter(|id| !new.contains(id))
            .map(|id| id.to_string())
            .collect();
        s
    }
}

/// One backend list with everything derived from it; replaced as a whole on reload.
#[derive(Debug)]
struct Generation<T> {
    config: PoolConfig,
    backends: Vec<Arc<Backend<T>>>,
    /// Smooth round-robin current weights (round-robin, least-conn ties, hash without key).
    rr: Mutex<Vec<i64>>,
    /// Built for `Hash` pools only; table ids are indices into `backends`.
    maglev: Option<Maglev>,
}

impl<T> Generation<T> {
    fn build<U>(
        config: PoolConfig,
        specs: Vec<BackendSpec<T>>,
        previous: Option<&Generation<U>>,
    ) -> Result<Self, PoolError> {
        let HealthConfig { rise, fall, .. } = config.health;
        if rise == 0 || fall == 0 {
            return Err(PoolError::BadHealth { rise, fall });
        }
        let mut seen = HashMap::with_capacity(specs.len());
        for s in &specs {
            if s.id.is_empty() {
                return Err(PoolError::EmptyId);
            }
            if seen.insert(s.id.as_str(), ()).is_some() {
                return Err(PoolError::DuplicateBackend { id: s.id.clone() });
            }
        }
        let maglev = match config.algorithm {
            Algorithm::Hash(_) => {
                let members: Vec<MaglevBackend> = specs
                    .iter()
                    .enumerate()
                    .map(|(i, s)| MaglevBackend {
                        // More backends than u32 ids cannot fit a u32-sized table anyway:
                        // saturate and let the table's own checks refuse the list.
                        id: u32::try_from(i).unwrap_or(u32::MAX),
                        name: s.id.clone(),
                        weight: s.weight,
                    })
                    .collect();
                Some(Maglev::with_backends(config.table_size, &members)?)
            }
            _ => None,
        };
        let old: HashMap<&str, &Arc<Shared>> = previous
            .map(|p| {
                p.backends
                    .iter()
                    .map(|b| (b.id.as_str(), &b.shared))
                    .collect()
            })
            .unwrap_or_default();
        let backends: Vec<Arc<Backend<T>>> = specs
            .into_iter()
            .enumerate()
            .map(|(index, s)| {
                let shared = old
                    .get(s.id.as_str())
                    .map(|&sh| Arc::clone(sh))
                    .unwrap_or_else(|| Arc::new(Shared::new(config.health.initial)));
                Arc::new(Backend {
                    index,
                    id: s.id,
                    weight: s.weight,
                    data: s.data,
                    health_config: config.health,
                    shared,
                })
            })
            .collect();
        Ok(Self {
            rr: Mutex::new(vec![0; backends.len()]),
            config,
            backends,
            maglev,
        })
    }
}

/// The algorithms' view of one generation, minus the excluded indices.
struct Candidates<'a, T> {
    backends: &'a [Arc<Backend<T>>],
    exclude: &'a [usize],
}

impl<T> View for Candidates<'_, T> {
    fn len(&self) -> usize {
        self.backends.len()
    }

    fn weight(&self, i: usize) -> u32 {
        self.backends[i].weight
    }

    fn in_flight(&self, i: usize) -> usize {
        self.backends[i].shared.in_flight()
    }

    fn eligible(&self, i: usize) -> bool {
        self.backends[i].eligible() && !self.exclude.contains(&i)
    }
}

/// A set of backends and the rule for choosing among them. See the [crate docs](crate) for
/// an example.
#[derive(Debug)]
pub struct Pool<T> {
    current: RwLock<Arc<Generation<T>>>,
    /// Serialises [`Pool::update`] calls (picks never take it).
    updating: Mutex<()>,
    rng: Rng,
}

impl<T> Pool<T> {
    /// A pool of new backends (health `config.health.initial`, admin `Ready`).
    pub fn new(config: PoolConfig, backends: Vec<BackendSpec<T>>) -> Result<Self, PoolError> {
        let generation = Generation::build::<T>(config, backends, None)?;
        Ok(Self::from_generation(generation))
    }

    /// A new pool whose backends take over the state (health, admin state, in-flight and pick
    /// counts) of the backends of `previous` with the same id. `previous` is not changed, so
    /// a reload can build every new pool first and switch only if all succeed. Both pools share
    /// that state until `previous` is dropped.
    pub fn with_state_from<U>(
        previous: &Pool<U>,
        config: PoolConfig,
        backends: Vec<BackendSpec<T>>,
    ) -> Result<Self, PoolError> {
        let old = previous.generation();
        let generation = Generation::build(config, backends, Some(&*old))?;
        Ok(Self::from_generation(generation))
    }

    /// Replace config and backend list in place, keeping the state of backends that stay
    /// (as [`Pool::with_state_from`]). On error nothing changes. Guards of removed backends
    /// stay valid.
    pub fn update(
        &self,
        config: PoolConfig,
        backends: Vec<BackendSpec<T>>,
    ) -> Result<UpdateSummary, PoolError> {
        let _serial = self.updating.lock().unwrap_or_else(PoisonError::into_inner);
        let old = self.generation();
        let new = Generation::build(config, backends, Some(&*old))?;
        let summary = UpdateSummary::of(
            old.backends.iter().map(|b| b.id.as_str()),
            new.backends.iter().map(|b| b.id.as_str()),
        );
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(new);
        Ok(summary)
    }

    fn from_generation(generation: Generation<T>) -> Self {
        let seed = generation
            .config
            .seed
            .unwrap_or_else(|| RandomState::new().hash_one(0u8));
        Self {
            current: RwLock::new(Arc::new(generation)),
            updating: Mutex::new(()),
            rng: Rng::new(seed),
        }
    }

    fn generation(&self) -> Arc<Generation<T>> {
        // The lock only guards an Arc swap, which cannot be left half-done.
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// The current config.
    pub fn config(&self) -> PoolConfig {
        self.generation().config.clone()
    }

    /// The current algorithm (tells a hash pool's caller what key to pass).
    pub fn algorithm(&self) -> Algorithm {
        self.generation().config.algorithm.clone()
    }

    /// Choose a backend for a new request or connection; `None` when no backend is eligible
    /// (all Down, Drain, Maint or weight 0: answer 503).
    ///
    /// `key` is read by `Hash` pools only (client address bytes or the header value); a hash
    /// pool given `None` picks round-robin.
    pub fn pick(&self, key: Option<&[u8]>) -> Option<PickGuard<T>> {
        self.pick_excluding(key, &[])
    }

    /// [`Pool::pick`] skipping the backends at the `exclude` indices (those already tried by
    /// this request), for retrying on another backend. A `Hash` pool walks on from the key's
    /// position, so the retry target is deterministic too.
    ///
    /// Indices are positions in the pool's current list ([`Backend::index`] of a guard). If a reload
    /// reorders the list between two attempts, an index may name another backend: the retry
    /// then avoids the wrong one, which costs balance, never correctness.
    pub fn pick_excluding(&self, key: Option<&[u8]>, exclude: &[usize]) -> Option<PickGuard<T>> {
        let g = self.generation();
        let view = Candidates {
            backends: &g.backends,
            exclude,
        };
        let rr = || g.rr.lock().unwrap_or_else(PoisonError::into_inner);
        match (&g.config.algorithm, key, &g.maglev) {
            (Algorithm::Hash(_), Some(key), Some(maglev)) => {
                balance::hash(&view, maglev, key).map(|i| PickGuard::new(&g.backends[i]))
            }
            (Algorithm::PowerOfTwo, _, _) => {
                balance::power_of_two(&view, &self.rng).map(|i| PickGuard::new(&g.backends[i]))
            }
            (Algorithm::LeastConn, _, _) => {
                let mut current = rr();
                // Counted before the lock is released, so concurrent least-conn picks see it.
                balance::least_conn(&view, &mut current).map(|i| PickGuard::new(&g.backends[i]))
            }
            _ => {
                let mut current = rr();
                balance::smooth_rr(&view, &mut current, |i| view.eligible(i))
                    .map(|i| PickGuard::new(&g.backends[i]))
            }
        }
    }

    /// Number of backends (in any state).
    pub fn len(&self) -> usize {
        self.generation().backends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of backends that can take new picks now (state Up, weight > 0).
    pub fn available(&self) -> usize {
        self.generation()
            .backends
            .iter()
            .filter(|b| b.eligible())
            .count()
    }

    /// All backends, in configured order (for status pages and metrics).
    pub fn backends(&self) -> Vec<Arc<Backend<T>>> {
        self.generation().backends.clone()
    }

    pub fn backend(&self, index: usize) -> Option<Arc<Backend<T>>> {
        self.generation().backends.get(index).cloned()
    }

    /// The backend with this id.
    pub fn find(&self, id: &str) -> Option<Arc<Backend<T>>> {
        self.generation()
            .backends
            .iter()
            .find(|b| b.id == id)
            .cloned()
    }

    fn at(&self, index: usize) -> Result<Arc<Backend<T>>, PoolError> {
        let g = self.generation();
        g.backends
            .get(index)
            .cloned()
            .ok_or(PoolError::NoSuchBackend {
                index,
                len: g.backends.len(),
            })
    }

    /// [`Backend::report_check`] by index.
    pub fn report_check(&self, index: usize, ok: bool) -> Result<Option<StateChange>, PoolError> {
        Ok(self.at(index)?.report_check(ok))
    }

    /// [`Backend::report_live_failure`] by index.
    pub fn report_live_failure(&self, index: usize) -> Result<Option<StateChange>, PoolError> {
        Ok(self.at(index)?.report_live_failure())
    }

    /// [`Backend::report_live_success`] by index.
    pub fn report_live_success(&self, index: usize) -> Result<Option<StateChange>, PoolError> {
        Ok(self.at(index)?.report_live_success())
    }

    /// [`Backend::set_admin`] by index.
    pub fn set_admin(&self, index: usize, admin: Admin) -> Result<Option<StateChange>, PoolError> {
        Ok(self.at(index)?.set_admin(admin))
    }

    /// [`Backend::set_health`] by index.
    pub fn set_health(
        &self,
        index: usize,
        health: Health,
    ) -> Result<Option<StateChange>, PoolError> {
        Ok(self.at(index)?.set_health(health))
    }
}

#[cfg(test)]
mod tests;
