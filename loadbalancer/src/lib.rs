//! Backend pools for rampart: which backend gets the next request or flow.
//!
//! Pure `std` (no async runtime), so the same code serves the HTTPS proxy's pools today and the
//! XDP L4 balancer later (its Maglev tables are written into BPF array maps).
//!
//! - [`maglev`]: Maglev consistent hashing (Eisenbud et al., NSDI 2016): prime table size
//!   (65,537 by default), weights, identical tables on every node given the same backend list
//!   (SipHash-1-3 with fixed keys), and delta updates ([`Maglev::rebuild`] returns only the
//!   positions that changed, ready to be written into a BPF array map).
//! - [`balance`]: the algorithms a pool can use ([`Algorithm`]), parsed from the config strings
//!   `round-robin | least-conn | p2c | hash(client) | hash(header:NAME)`.
//! - [`state`]: backend states ([`BackendState`] = admin [`Admin`] × health [`Health`]), the
//!   rise/fall health state machine and the [`StateChange`] events it returns.
//! - [`pool`]: [`Pool`], a `Send + Sync` set of backends that hands out [`PickGuard`]s.
//!
//! # Using a pool (the HTTPS proxy's view)
//!
//! ```
//! use loadbalancer::{Admin, Algorithm, BackendSpec, Pool, PoolConfig};
//!
//! // `T` is whatever the caller wants to carry per backend (here: its URL).
//! let config = PoolConfig {
//!     algorithm: "least-conn".parse::<Algorithm>()?,
//!     ..PoolConfig::default()
//! };
//! let pool: Pool<String> = Pool::new(
//!     config,
//!     vec![
//!         BackendSpec::new("10.0.1.21:80", "http://10.0.1.21:80".to_string()),
//!         BackendSpec::new("10.0.1.22:80", "http://10.0.1.22:80".to_string()).with_weight(2),
//!     ],
//! )?;
//!
//! // Per request. `key` is only read by hash pools: the client address bytes or the header
//! // value (`pool.algorithm()` says which); a hash pool given `None` falls back to round-robin.
//! let first = pool.pick(None).expect("no backend available: answer 503");
//! let url: &String = first.data(); // connect to it ...
//! # let _ = url;
//! # let connect_failed = true;
//! if connect_failed {
//!     // Passive marking: `fall` consecutive live failures mark the backend Down.
//!     if let Some(change) = first.report_live_failure() {
//!         eprintln!("{change}"); // log / count it
//!     }
//!     // The request was never sent: retry on another backend.
//!     let tried = [first.index()];
//!     drop(first); // ends the in-flight count of the failed attempt
//!     let second = pool.pick_excluding(None, &tried).expect("no other backend");
//!     assert_ne!(second.index(), tried[0]);
//!     // ... proxy the request; dropping `second` when the response is done ends its
//!     // in-flight count (least-conn and p2c read it).
//! }
//!
//! // Active health checks (one task per backend, e.g. every `interval`):
//! let b = pool.find("10.0.1.22:80").unwrap();
//! for ok in [false, false, false] {
//!     if let Some(change) = b.report_check(ok) {
//!         eprintln!("{change}"); // "backend 10.0.1.22:80: up -> down (check)"
//!     }
//! }
//!
//! // Admin commands.
//! pool.set_admin(0, Admin::Drain)?; // no new picks; requests in flight continue
//!
//! // Reload: build the new pool from the old one; backends that stay keep health, admin state
//! // and in-flight counts. A failed build leaves the running pool untouched.
//! let reloaded: Pool<String> = Pool::with_state_from(&pool, pool.config(), vec![
//!     BackendSpec::new("10.0.1.22:80", "http://10.0.1.22:80".to_string()),
//! ])?;
//! assert_eq!(reloaded.backend(0).unwrap().health(), loadbalancer::Health::Down);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Using a Maglev table directly (the XDP balancer's view)
//!
//! ```
//! use loadbalancer::{Maglev, MaglevBackend, DEFAULT_TABLE_SIZE};
//!
//! let mut table = Maglev::new(DEFAULT_TABLE_SIZE)?;
//! // `id` is the value stored in the table (e.g. the index into a BPF backends map);
//! // `name` is the identity that is hashed (same names + weights ⇒ same table on every node).
//! let backends = vec![
//!     MaglevBackend { id: 0, name: "10.0.1.11".into(), weight: 100 },
//!     MaglevBackend { id: 1, name: "10.0.1.12".into(), weight: 100 },
//! ];
//! let changed: Vec<(u32, u32)> = table.rebuild(&backends)?; // first build: every position
//! assert_eq!(changed.len(), DEFAULT_TABLE_SIZE as usize);
//! let changed = table.rebuild(&backends[..1])?; // only the positions that moved
//! assert!(changed.iter().all(|&(_, id)| id == 0));
//! # Ok::<(), loadbalancer::MaglevError>(())
//! ```

pub mod balance;
pub mod maglev;
pub mod pool;
pub mod state;

pub use balance::{Algorithm, BalanceError, HashOn};
pub use maglev::{DEFAULT_TABLE_SIZE, Maglev, MaglevBackend, MaglevError, NO_BACKEND, is_prime};
pub use pool::{
    Backend, BackendSpec, DEFAULT_WEIGHT, PickGuard, Pool, PoolConfig, PoolError, UpdateSummary,
};
pub use state::{Admin, BackendState, Cause, Health, HealthConfig, StateChange};
