//! Backend states and the rise/fall health state machine.
//!
//! A backend has two independent parts of state:
//! - [`Admin`] (set by the operator): `Ready`, `Drain` (no new picks; what is in flight
//!   continues) or `Maint` (administratively disabled).
//! - [`Health`] (set by checks and live traffic): `Up` or `Down`.
//!
//! Picking only looks at their combination, [`BackendState`]: `Maint` wins over `Drain`, which
//! wins over the health. Health keeps being tracked while a backend is in `Drain` or `Maint`, so
//! it comes back with a known health when the operator sets it `Ready` again.
//!
//! # The health rule (HAProxy's `rise`/`fall`, defaults 2/3)
//! - An `Up` backend goes `Down` after `fall` consecutive failed active checks
//!   ([`report_check`](crate::Backend::report_check)`(false)`; a passed check ends that
//!   streak), **or** after `fall` consecutive failed live requests
//!   ([`report_live_failure`](crate::Backend::report_live_failure); a
//!   [`report_live_success`](crate::Backend::report_live_success) ends that streak).
//!   The two streaks are kept apart so that neither masks the other: live successes must not
//!   keep up a backend whose health endpoint says "take me out", and passing checks must not
//!   hide a backend that fails every real request (HAProxy's `observe` likewise keeps live
//!   errors in their own counter).
//! - A `Down` backend goes `Up` after `rise` consecutive passed **active checks**. Live
//!   successes never raise a backend: a `Down` backend gets no new traffic, so the only live
//!   answers it gives are to requests picked before it went down, which prove little. A failed
//!   check ends the rise streak; live failures while `Down` are ignored.
//! - Consequence: a pool that runs no active checks should not report live failures, or a
//!   backend marked `Down` stays down until an operator calls
//!   [`set_health`](crate::Backend::set_health).

use std::{
    fmt,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering},
    },
};

/// Result of health checks and passive observation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Health {
    Up,
    Down,
}

/// State set by the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Admin {
    /// Normal operation: gets traffic when healthy.
    #[default]
    Ready,
    /// No new picks; requests and flows already on the backend continue.
    Drain,
    /// Administratively disabled: no new picks.
    Maint,
}

/// What picking sees: the admin state combined with the health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendState {
    /// Ready and healthy: the only state that gets new picks.
    Up,
    /// Ready but failing its health checks.
    Down,
    Drain,
    Maint,
}

impl BackendState {
    /// Combine admin state and health (`Maint` > `Drain` > health).
    pub fn of(admin: Admin, health: Health) -> Self {
        match (admin, health) {
            (Admin::Maint, _) => Self::Maint,
            (Admin::Drain, _) => Self::Drain,
            (Admin::Ready, Health::Up) => Self::Up,
            (Admin::Ready, Health::Down) => Self::Down,
        }
    }

    /// True when the backend may receive new requests or flows.
    pub fn accepts_new(self) -> bool {
        self == Self::Up
    }

    fn to_u8(self) -> u8 {
        match self {
            Self::Up => 0,
            Self::Down => 1,
            Self::Drain => 2,
            Self::Maint => 3,
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Up,
            1 => Self::Down,
            2 => Self::Drain,
            _ => Self::Maint,
        }
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Up => "up",
            Self::Down => "down",
        })
    }
}

impl fmt::Display for Admin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ready => "ready",
            Self::Drain => "drain",
            Self::Maint => "maint",
        })
    }
}

impl fmt::Display for BackendState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Up => "up",
            Self::Down => "down",
            Self::Drain => "drain",
            Self::Maint => "maint",
        })
    }
}

/// Thresholds of the health state machine (see the module docs for the rule).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthConfig {
    /// Consecutive passed checks that bring a `Down` backend `Up` (≥ 1; default 2).
    pub rise: u32,
    /// Consecutive failures (checks or live) that take an `Up` backend `Down` (≥ 1; default 3).
    pub fall: u32,
    /// Health of a backend that is new to the pool (default `Up`, so a pool serves at once;
    /// backends that stay across a reload keep theirs).
    pub initial: Health,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            rise: 2,
            fall: 3,
            initial: Health::Up,
        }
    }
}

/// What caused a [`StateChange`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cause {
    /// Active health checks (`report_check`).
    Check,
    /// Live traffic (`report_live_failure` / `report_live_success`).
    Live,
    /// An operator (`set_admin` / `set_health`).
    Admin,
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Check => "check",
            Self::Live => "live traffic",
            Self::Admin => "admin",
        })
    }
}

/// Returned whenever a backend's health or admin state changes, for logs and metrics.
///
/// `from`/`to` are the states picking sees; they can be equal when the health changes under
/// `Drain` or `Maint` (then `health` tells what changed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateChange {
    /// Index of the backend in the pool that reported it.
    pub index: usize,
    /// The backend's identity ([`BackendSpec::id`](crate::BackendSpec::id)).
    pub id: String,
    pub from: BackendState,
    pub to: BackendState,
    /// Health after the change.
    pub health: Health,
    pub cause: Cause,
}

impl fmt::Display for StateChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "backend {}: {} -> {}", self.id, self.from, self.to)?;
        if self.to != BackendState::of(Admin::Ready, self.health) {
            write!(f, " (health {})", self.health)?;
        }
        write!(f, " ({})", self.cause)
    }
}

/// What the streak counters look like inside the mutex.
#[derive(Debug)]
struct Machine {
    admin: Admin,
    health: Health,
    /// Consecutive passed checks while `Down`.
    rise_streak: u32,
    /// Consecutive failed checks while `Up`.
    check_fails: u32,
    /// Consecutive failed live requests while `Up`.
    live_fails: u32,
}

impl Machine {
    fn set_health(&mut self, health: Health) {
        self.health = health;
        self.rise_streak = 0;
        self.check_fails = 0;
        self.live_fails = 0;
    }
}

/// Per-backend state shared by every pool generation that contains the backend (a reload
/// hands the same `Shared` to the new pool), and by the guards of requests in flight.
#[derive(Debug)]
pub(crate) struct Shared {
    /// `BackendState` as u8, read lock-free by every pick.
    state: AtomicU8,
    in_flight: AtomicUsize,
    picks: AtomicU64,
    machine: Mutex<Machine>,
}

/// One report fed into the machine.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Event {
    Check(bool),
    LiveFailure,
    LiveSuccess,
    SetAdmin(Admin),
    SetHealth(Health),
}

impl Shared {
    pub(crate) fn new(health: Health) -> Self {
        Self {
            state: AtomicU8::new(BackendState::of(Admin::Ready, health).to_u8()),
            in_flight: AtomicUsize::new(0),
            picks: AtomicU64::new(0),
            machine: Mutex::new(Machine {
                admin: Admin::Ready,
                health,
                rise_streak: 0,
                check_fails: 0,
                live_fails: 0,
            }),
        }
    }

    pub(crate) fn state(&self) -> BackendState {
        BackendState::from_u8(self.state.load(Ordering::Acquire))
    }

    pub(crate) fn health(&self) -> Health {
        self.lock().health
    }

    pub(crate) fn admin(&self) -> Admin {
        self.lock().admin
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub(crate) fn picks(&self) -> u64 {
        self.picks.load(Ordering::Relaxed)
    }

    /// Count a new pick (the guard calls [`Shared::release`] on drop).
    pub(crate) fn acquire(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.picks.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn release(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Machine> {
        // The machine is a few counters that are always left consistent: a panic elsewhere
        // while holding the lock cannot leave it half-updated, so poisoning is ignored.
        self.machine.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Feed one event; returns `(from, to, health, cause)` when health or admin changed.
    pub(crate) fn apply(
        &self,
        cfg: &HealthConfig,
        event: Event,
    ) -> Option<(BackendState, BackendState, Health, Cause)> {
        let mut m = self.lock();
        let before = (m.admin, m.health);
        let cause = match event {
            Event::Check(true) => {
                m.check_fails = 0;
                if m.health == Health::Down {
                    m.rise_streak += 1;
                    if m.rise_streak >= cfg.rise {
                        m.set_health(Health::Up);
                    }
                }
                Cause::Check
            }
            Event::Check(false) => {
                m.rise_streak = 0;
                if m.health == Health::Up {
                    m.check_fails += 1;
                    if m.check_fails >= cfg.fall {
                        m.set_health(Health::Down);
                    }
                }
                Cause::Check
            }
            Event::LiveFailure => {
                if m.health == Health::Up {
                    m.live_fails += 1;
                    if m.live_fails >= cfg.fall {
                        m.set_health(Health::Down);
                    }
                }
                Cause::Live
            }
            Event::LiveSuccess => {
                m.live_fails = 0;
                Cause::Live
            }
            Event::SetAdmin(admin) => {
                m.admin = admin;
                Cause::Admin
            }
            Event::SetHealth(health) => {
                if m.health != health {
                    m.set_health(health);
                }
                Cause::Admin
            }
        };
        if (m.admin, m.health) == before {
            return None;
        }
        let from = BackendState::of(before.0, before.1);
        let to = BackendState::of(m.admin, m.health);
        // Published while the mutex is held, so concurrent reports publish in order.
        self.state.store(to.to_u8(), Ordering::Release);
        Some((from, to, m.health, cause))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> HealthConfig {
        HealthConfig::default()
    }

    fn changed(s: &Shared, e: Event) -> Option<(BackendState, BackendState)> {
        s.apply(&cfg(), e).map(|(from, to, _, _)| (from, to))
    }

    #[test]
    fn fall_after_three_failed_checks_rise_after_two_passed() {
        let s = Shared::new(Health::Up);
        assert_eq!(changed(&s, Event::Check(false)), None);
        assert_eq!(changed(&s, Event::Check(false)), None);
        assert_eq!(
            changed(&s, Event::Check(false)),
            Some((BackendState::Up, BackendState::Down))
        );
        assert_eq!(s.state(), BackendState::Down);
        assert_eq!(changed(&s, Event::Check(true)), None);
        assert_eq!(
            changed(&s, Event::Check(true)),
            Some((BackendState::Down, BackendState::Up))
        );
        assert_eq!(s.state(), BackendState::Up);
    }

    #[test]
    fn a_pass_breaks_the_fall_streak_and_a_fail_breaks_the_rise_streak() {
        let s = Shared::new(Health::Up);
        for _ in 0..10 {
            assert_eq!(changed(&s, Event::Check(false)), None);
            assert_eq!(changed(&s, Event::Check(false)), None);
            assert_eq!(changed(&s, Event::Check(true)), None);
        }
        assert_eq!(s.state(), BackendState::Up);
        for _ in 0..3 {
            s.apply(&cfg(), Event::Check(false));
        }
        assert_eq!(s.state(), BackendState::Down);
        for _ in 0..10 {
            assert_eq!(changed(&s, Event::Check(true)), None);
            assert_eq!(changed(&s, Event::Check(false)), None);
        }
        assert_eq!(s.state(), BackendState::Down);
    }

    #[test]
    fn live_failures_have_their_own_streak() {
        let s = Shared::new(Health::Up);
        assert_eq!(changed(&s, Event::LiveFailure), None);
        assert_eq!(changed(&s, Event::LiveFailure), None);
        assert_eq!(changed(&s, Event::LiveSuccess), None);
        assert_eq!(changed(&s, Event::LiveFailure), None);
        assert_eq!(changed(&s, Event::LiveFailure), None);
        // A passed check does not excuse failing live traffic ...
        assert_eq!(changed(&s, Event::Check(true)), None);
        let (from, to, health, cause) = s.apply(&cfg(), Event::LiveFailure).unwrap();
        assert_eq!(
            (from, to, health, cause),
            (
                BackendState::Up,
                BackendState::Down,
                Health::Down,
                Cause::Live
            )
        );
        // Live successes never raise it; only checks do.
        for _ in 0..10 {
            assert_eq!(changed(&s, Event::LiveSuccess), None);
            assert_eq!(changed(&s, Event::LiveFailure), None);
        }
        assert_eq!(s.state(), BackendState::Down);
        assert_eq!(changed(&s, Event::Check(true)), None);
        assert_eq!(changed(&s, Event::LiveFailure), None, "ignored while down");
        assert_eq!(
            changed(&s, Event::Check(true)),
            Some((BackendState::Down, BackendState::Up))
        );
        // Back up with clean streaks: two more live failures are not enough.
        assert_eq!(changed(&s, Event::LiveFailure), None);
        assert_eq!(changed(&s, Event::LiveFailure), None);
        assert_eq!(s.state(), BackendState::Up);
    }

    #[test]
    fn live_successes_do_not_mask_failing_checks() {
        let s = Shared::new(Health::Up);
        for _ in 0..2 {
            assert_eq!(changed(&s, Event::Check(false)), None);
            for _ in 0..100 {
                assert_eq!(changed(&s, Event::LiveSuccess), None);
            }
        }
        assert_eq!(
            changed(&s, Event::Check(false)),
            Some((BackendState::Up, BackendState::Down))
        );
    }

    #[test]
    fn rise_and_fall_of_one() {
        let c = HealthConfig {
            rise: 1,
            fall: 1,
            initial: Health::Down,
        };
        let s = Shared::new(c.initial);
        assert_eq!(s.state(), BackendState::Down);
        assert!(s.apply(&c, Event::Check(true)).is_some());
        assert_eq!(s.state(), BackendState::Up);
        assert!(s.apply(&c, Event::LiveFailure).is_some());
        assert_eq!(s.state(), BackendState::Down);
    }

    #[test]
    fn admin_states_override_health_which_is_still_tracked() {
        let s = Shared::new(Health::Up);
        assert_eq!(
            changed(&s, Event::SetAdmin(Admin::Drain)),
            Some((BackendState::Up, BackendState::Drain))
        );
        assert_eq!(
            changed(&s, Event::SetAdmin(Admin::Drain)),
            None,
            "no change, no event"
        );
        assert_eq!(
            changed(&s, Event::SetAdmin(Admin::Maint)),
            Some((BackendState::Drain, BackendState::Maint))
        );
        s.apply(&cfg(), Event::Check(false));
        s.apply(&cfg(), Event::Check(false));
        // The health changes under Maint: an event with equal effective states.
        let (from, to, health, cause) = s.apply(&cfg(), Event::Check(false)).unwrap();
        assert_eq!(
            (from, to, health, cause),
            (
                BackendState::Maint,
                BackendState::Maint,
                Health::Down,
                Cause::Check
            )
        );
        assert_eq!(
            changed(&s, Event::SetAdmin(Admin::Ready)),
            Some((BackendState::Maint, BackendState::Down))
        );
        assert_eq!(
            changed(&s, Event::SetHealth(Health::Up)),
            Some((BackendState::Down, BackendState::Up))
        );
    }

    #[test]
    fn display_of_a_change() {
        let c = StateChange {
            index: 1,
            id: "10.0.1.21:80".into(),
            from: BackendState::Up,
            to: BackendState::Down,
            health: Health::Down,
            cause: Cause::Check,
        };
        assert_eq!(c.to_string(), "backend 10.0.1.21:80: up -> down (check)");
        let c = StateChange {
            from: BackendState::Maint,
            to: BackendState::Maint,
            ..c
        };
        assert_eq!(
            c.to_string(),
            "backend 10.0.1.21:80: maint -> maint (health down) (check)"
        );
    }
}
