//! The MySQL router: per `[[mysql]]` cluster, a read-write port that leads to the one writable
//! primary and a read-only port that leads to healthy replicas (least connections; the primary
//! when none is healthy). Whole connections are proxied, bytes untouched (TLS included).
//!
//! [`discovery`](ClusterRt::start) probes every server concurrently each `check_interval`
//! ([`crate::probe::MysqlProbe`]), [`roles::decide`] names the primary, and the result is
//! published on a watch channel that [`session`]s follow: a session on a server that stopped
//! being primary is closed after `demoted_grace`. Replica health goes through `loadbalancer`'s
//! state machine (the read pool). [`ClusterState`] outlives reloads, so sessions keep following
//! their cluster after a reload changes its servers or ports.

pub mod metrics;
pub mod packet;
pub mod roles;
pub mod session;

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use loadbalancer::{Algorithm, BackendSpec, Health, HealthConfig, PoolConfig};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use self::{
    metrics::{ClusterLabels, MysqlMetrics, RoleLabels, ServerLabels},
    roles::{Decision, Primary, Role},
};
use super::ServeError;
use crate::{
    config,
    probe::{self, MysqlProbe, Secret},
};

/// The read pool: every server of the cluster, with replica health in its state machine.
pub type ReadPool = loadbalancer::Pool<SocketAddr>;

/// A cluster's state that outlives reloads: the last decision (which sessions watch), when the
/// primary last changed, and open connections per server.
pub struct ClusterState {
    decision: watch::Sender<Arc<Decision>>,
    last_change: Mutex<Option<(SystemTime, Option<SocketAddr>)>>,
    conns: Mutex<HashMap<SocketAddr, Arc<AtomicI64>>>,
    /// Per server, the discovery round in which a failed connection to it was last logged.
    connect_failures: Mutex<HashMap<SocketAddr, u64>>,
}

impl ClusterState {
    fn new(servers: &[SocketAddr]) -> Self {
        ClusterState {
            decision: watch::Sender::new(Arc::new(Decision::unknown(servers))),
            last_change: Mutex::new(None),
            conns: Mutex::new(HashMap::new()),
            connect_failures: Mutex::new(HashMap::new()),
        }
    }

    /// True for the first failed connection to `server` in discovery round `round`: a server
    /// that dies fails every client until the next round notices, and one line per round says
    /// so without flooding the log (the refusals are counted in the metrics).
    pub fn first_connect_failure(&self, server: SocketAddr, round: u64) -> bool {
        let mut seen = self.connect_failures.lock().unwrap_or_else(|p| p.into_inner());
        seen.insert(server, round) != Some(round)
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Decision>> {
        self.decision.subscribe()
    }

    pub fn decision(&self) -> Arc<Decision> {
        self.decision.borrow().clone()
    }

    /// The counter of open connections to `server`.
    pub fn conns(&self, server: SocketAddr) -> Arc<AtomicI64> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner()).entry(server).or_default().clone()
    }
}

/// One cluster in one generation.
pub struct ClusterRt {
    pub name: String,
    pub cfg: config::Mysql,
    pub state: Arc<ClusterState>,
    pub read_pool: Arc<ReadPool>,
    password: Option<Secret>,
}

impl ClusterRt {
    /// Builds a cluster; one of the same name in the previous generation hands over its state
    /// (decision, connections, replica health), so a reload drops no session.
    pub fn build(
        cfg: &config::Mysql,
        config: &config::Config,
        base: &Path,
        old: Option<&ClusterRt>,
    ) -> Result<Self, ServeError> {
        let name = cfg.name.get_ref().clone();
        let password = match &cfg.monitor_password_file {
            None => None,
            Some(f) => {
                let path = config.resolve(base, f);
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    ServeError::Config(format!("[[mysql]] {name}: monitor_password_file {}: {e}", path.display()))
                })?;
                // The file's last line break is not part of the password.
                Some(Secret::new(
                    text.strip_suffix('\n').map(|t| t.strip_suffix('\r').unwrap_or(t)).unwrap_or(&text).to_string(),
                ))
            }
        };
        let specs: Vec<_> = cfg.servers.iter().map(|a| BackendSpec::new(a.to_string(), *a)).collect();
        // Discovery decides eligibility each round; one failed round takes a replica out, two
        // good ones bring it back, and a new server starts out until it is checked.
        let health = HealthConfig { rise: 2, fall: 1, initial: Health::Down };
        let pool_cfg = PoolConfig { algorithm: Algorithm::LeastConn, health, ..PoolConfig::default() };
        let read_pool = match old {
            Some(o) => ReadPool::with_state_from(&o.read_pool, pool_cfg, specs),
            None => ReadPool::new(pool_cfg, specs),
        }
        .map_err(|e| ServeError::Config(format!("[[mysql]] {name}: {e}")))?;
        let state = match old {
            Some(o) => o.state.clone(),
            None => Arc::new(ClusterState::new(&cfg.servers)),
        };
        Ok(ClusterRt { name, cfg: cfg.clone(), state, read_pool: Arc::new(read_pool), password })
    }

    /// The limit of one discovery probe: below the interval, so a hung server never delays
    /// the next round.
    pub fn probe_timeout(&self) -> Duration {
        self.cfg.check_interval.0.mul_f64(0.8)
    }

    /// Starts discovery until `stop` (the generation's tasks token).
    pub fn start(self: &Arc<Self>, metrics: Arc<MysqlMetrics>, stop: CancellationToken) {
        let me = self.clone();
        tokio::spawn(async move { me.discover(metrics, stop).await });
    }

    async fn discover(&self, metrics: Arc<MysqlMetrics>, stop: CancellationToken) {
        let probes: Vec<Arc<MysqlProbe>> = self
            .cfg
            .servers
            .iter()
            .map(|&addr| {
                Arc::new(MysqlProbe {
                    addr,
                    user: self.cfg.monitor_user.clone(),
                    password: self.password.clone(),
                    timeout: self.probe_timeout(),
                })
            })
            .collect();
        let mut tick = tokio::time::interval(self.cfg.check_interval.0);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut round = self.state.decision().round;
        // Failed checks of the primary in a row (roles::hold_primary).
        let mut missed = 0;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let mut set = tokio::task::JoinSet::new();
            for (i, p) in probes.iter().enumerate() {
                let (p, timeout) = (p.clone(), self.probe_timeout());
                set.spawn(async move { (i, probe::once(&*p, timeout).await.map_err(|e| e.to_string())) });
            }
            let mut seen: Vec<_> = self.cfg.servers.iter().map(|&a| (a, Err("not checked".to_string()))).collect();
            let all = async {
                while let Some(r) = set.join_next().await {
                    if let Ok((i, r)) = r {
                        seen[i].1 = r;
                    }
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = all => {}
            }
            round += 1;
            let d = roles::decide(&seen, self.cfg.max_lag.0, round);
            let d = roles::hold_primary(&self.state.decision().primary, d, &mut missed);
            self.apply(d, &metrics);
        }
    }

    /// Publishes one round's decision: read-pool health, logs of changes, metrics, and the
    /// watch channel that sessions and new connections read.
    fn apply(&self, d: Decision, metrics: &MysqlMetrics) {
        let prev = self.state.decision();
        for (i, s) in d.servers.iter().enumerate() {
            if let Some(b) = self.read_pool.backend(i) {
                let change = b.report_check(s.ro_eligible);
                if let Some(c) = change {
                    log::warn!("mysql {}: read pool: {c}", self.name);
                }
            }
            let before = prev.servers.iter().find(|p| p.addr == s.addr);
            if prev.round > 0 && before.is_none_or(|b| b.role != s.role || b.note != s.note) {
                match &s.note {
                    Some(n) => log::warn!("mysql {}: {} is {} ({n})", self.name, s.addr, s.role),
                    None => log::info!("mysql {}: {} is {}", self.name, s.addr, s.role),
                }
            }
        }
        if d.primary != prev.primary {
            match (&prev.primary, &d.primary) {
                (_, Primary::One(a)) => log::warn!("mysql {}: primary is now {a}", self.name),
                (_, p) => log::error!("mysql {}: {}", self.name, p.refusal(&self.name).unwrap_or_default()),
            }
            if prev.primary.addr() != d.primary.addr() && prev.round > 0 {
                let now = SystemTime::now();
                *self.state.last_change.lock().unwrap_or_else(|p| p.into_inner()) = Some((now, d.primary.addr()));
                let l = ClusterLabels { cluster: self.name.clone() };
                metrics.primary_changes.get_or_create(&l).inc();
                let t = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
                metrics.last_primary_change.get_or_create(&l).set(t);
            }
        }
        self.state.decision.send_replace(Arc::new(d));
        self.publish(metrics);
    }

    /// The server takes read-only connections (found by address: until this generation's
    /// first round, the decision is the previous generation's, with its own server list).
    fn in_read_pool(&self, server: SocketAddr) -> bool {
        self.read_pool.find(&server.to_string()).is_some_and(|b| b.state().accepts_new())
    }

    /// Sets this cluster's per-server gauges from the last decision.
    pub fn publish(&self, metrics: &MysqlMetrics) {
        let d = self.state.decision();
        let writable = d.servers.iter().filter(|s| matches!(s.role, Role::Primary | Role::Writable)).count();
        let cl = ClusterLabels { cluster: self.name.clone() };
        metrics.writable_primaries.get_or_create(&cl).set(writable as i64);
        for s in &d.servers {
            let sl = ServerLabels { cluster: self.name.clone(), server: s.addr.to_string() };
            for r in Role::ALL {
                let rl = RoleLabels { cluster: self.name.clone(), server: s.addr.to_string(), role: r.as_str() };
                metrics.role.get_or_create(&rl).set(i64::from(r == s.role));
            }
            let in_read_pool = self.in_read_pool(s.addr);
            metrics.up.get_or_create(&sl).set(i64::from(s.role == Role::Primary || in_read_pool));
            match s.lag {
                Some(l) => {
                    metrics.lag.get_or_create(&sl).set(l.as_secs_f64());
                }
                None => {
                    metrics.lag.remove(&sl);
                }
            }
            metrics.connections.get_or_create(&sl).set(self.state.conns(s.addr).load(Ordering::Relaxed));
        }
    }

    /// Removes the series of servers (and clusters) that `next` no longer has.
    pub fn retire_metrics(&self, next: Option<&ClusterRt>, metrics: &MysqlMetrics) {
        for &addr in &self.cfg.servers {
            if next.is_some_and(|n| n.cfg.servers.contains(&addr)) {
                continue;
            }
            let sl = ServerLabels { cluster: self.name.clone(), server: addr.to_string() };
            for r in Role::ALL {
                metrics.role.remove(&RoleLabels {
                    cluster: self.name.clone(),
                    server: addr.to_string(),
                    role: r.as_str(),
                });
            }
            metrics.up.remove(&sl);
            metrics.lag.remove(&sl);
            metrics.connections.remove(&sl);
        }
        if next.is_none() {
            let l = ClusterLabels { cluster: self.name.clone() };
            metrics.primary_changes.remove(&l);
            metrics.last_primary_change.remove(&l);
            metrics.writable_primaries.remove(&l);
        }
    }

    /// The cluster's part of a snapshot.
    pub fn snapshot(&self) -> crate::snapshot::Cluster {
        let d = self.state.decision();
        let primary = match &d.primary {
            Primary::One(a) => a.to_string(),
            Primary::Unknown => "unknown".to_string(),
            Primary::None => "none".to_string(),
            Primary::Several(v) => {
                format!("split brain: {}", v.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "))
            }
        };
        let last_primary_change = self.state.last_change.lock().unwrap_or_else(|p| p.into_inner()).map(|(t, to)| {
            crate::snapshot::PrimaryChange {
                unix: t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs(),
                to: to.map(|a| a.to_string()),
            }
        });
        crate::snapshot::Cluster {
            name: self.name.clone(),
            rw_listen: self.cfg.rw_listen.to_string(),
            ro_listen: self.cfg.ro_listen.map(|a| a.to_string()),
            primary,
            last_primary_change,
            servers: d
                .servers
                .iter()
                .map(|v| crate::snapshot::MysqlServer {
                    addr: v.addr.to_string(),
                    role: v.role.as_str().to_string(),
                    health: if v.role == Role::Primary || self.in_read_pool(v.addr) { "up" } else { "down" }
                        .to_string(),
                    lag_seconds: v.lag.map(|l| l.as_secs()),
                    connections: self.state.conns(v.addr).load(Ordering::Relaxed),
                    note: v.note.clone(),
                })
                .collect(),
        }
    }

    /// The cluster's part of the status text.
    pub fn status(&self) -> String {
        let d = self.state.decision();
        let mut s = format!(
            "mysql {} (rw {}, ro {})\n",
            self.name,
            self.cfg.rw_listen,
            self.cfg.ro_listen.map_or("-".to_string(), |a| a.to_string())
        );
        let primary = match &d.primary {
            Primary::One(a) => format!("primary {a}"),
            p => p.refusal(&self.name).unwrap_or_default(),
        };
        let change = match *self.state.last_change.lock().unwrap_or_else(|p| p.into_inner()) {
            None => "no change of primary seen".to_string(),
            Some((t, to)) => {
                let unix = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
                let ago = SystemTime::now().duration_since(t).unwrap_or_default().as_secs();
                format!(
                    "last change of primary {ago}s ago (unix {unix}) to {}",
                    to.map_or("none".into(), |a| a.to_string())
                )
            }
        };
        s.push_str(&format!("  {primary}; {change}\n"));
        for v in &d.servers {
            let health = if v.role == Role::Primary || self.in_read_pool(v.addr) { "up" } else { "down" };
            s.push_str(&format!(
                "  {:<22} {:<11} {:<4} lag {:<5} connections {}{}\n",
                v.addr.to_string(),
                v.role.as_str(),
                health,
                v.lag.map_or("-".to_string(), |l| format!("{}s", l.as_secs())),
                self.state.conns(v.addr).load(Ordering::Relaxed),
                v.note.as_ref().map_or(String::new(), |n| format!(" ({n})")),
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_connection_is_logged_once_per_server_and_round() {
        let (a, b): (SocketAddr, SocketAddr) = ("10.0.3.41:3306".parse().unwrap(), "10.0.3.42:3306".parse().unwrap());
        let s = ClusterState::new(&[a, b]);
        assert!(s.first_connect_failure(a, 7));
        assert!(!s.first_connect_failure(a, 7));
        assert!(s.first_connect_failure(b, 7));
        assert!(s.first_connect_failure(a, 8));
        assert!(!s.first_connect_failure(a, 8));
    }
}
