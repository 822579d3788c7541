//! One generation of the daemon's state, built from one config: routes, pools (balancers and
//! backend connections), TLS per listener, MySQL clusters. A reload builds a new generation and swaps it in;
//! requests already running keep the Arc of the old one.

use std::{collections::HashMap, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use loadbalancer::{Admin, BackendSpec, BackendState, HealthConfig, PoolConfig};
use rustls::server::{ProducesTickets, ServerSessionMemoryCache};
use tokio_util::sync::CancellationToken;

use super::{
    ServeError,
    http::{
        backend::{self, BackendConn},
        firewall::Firewall,
    },
    metrics::{BackendLabels, Metrics, RouteCounters},
    mysql::{ClusterRt, session::Port},
    stats::{HttpStats, ListenerStats, RouteStats},
    tls::{self, CertStore},
};
use crate::{
    config::{self, AdminState, Cidr, Config, Scheme},
    snapshot,
};

pub type LbPool = loadbalancer::Pool<Arc<BackendConn>>;

pub struct PoolRt {
    pub name: String,
    pub lb: Arc<LbPool>,
    pub cfg: config::Pool,
    /// Live failures count toward `fall` only when active checks can bring a backend back.
    pub passive: bool,
}

pub struct RouteRt {
    /// `host/path` (`*` for any host): the `route` label of metrics.
    pub label: String,
    host: Option<String>,
    path: String,
    pub pool: Arc<PoolRt>,
    pub firewall: Option<Firewall>,
    /// This route's request counters by status.
    pub requests: RouteCounters,
    /// This route's request durations.
    pub stats: Arc<RouteStats>,
}

/// What a TLS listener needs per connection.
pub struct ListenerRt {
    pub name: String,
    pub tls: Arc<rustls::ServerConfig>,
    pub certs: Arc<CertStore>,
    pub trusted: Vec<Cidr>,
    pub accept_proxy_protocol: bool,
    pub client_header_timeout: Duration,
    pub idle_timeout: Duration,
    pub tunnel_timeout: Duration,
    pub stats: Arc<ListenerStats>,
}

impl ListenerRt {
    pub fn is_trusted(&self, ip: std::net::IpAddr) -> bool {
        self.trusted.iter().any(|c| c.contains(ip))
    }
}

/// State kept across generations: ticket keys and the session cache, so that clients resume
/// sessions across reloads.
pub struct TlsShared {
    pub sessions: Arc<ServerSessionMemoryCache>,
    pub ticketers: std::sync::Mutex<HashMap<Duration, Arc<dyn ProducesTickets>>>,
}

impl Default for TlsShared {
    fn default() -> Self {
        TlsShared { sessions: ServerSessionMemoryCache::new(20_000), ticketers: Default::default() }
    }
}

impl TlsShared {
    fn ticketer(&self, rotation: Duration) -> Result<Arc<dyn ProducesTickets>, tls::TlsError> {
        let mut map = self.ticketers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = map.get(&rotation) {
            return Ok(t.clone());
        }
        let t: Arc<dyn ProducesTickets> = Arc::new(tls::RotatingTicketer::new(rotation)?);
        map.insert(rotation, t.clone());
        Ok(t)
    }
}

pub struct Generation {
    pub config: Arc<Config>,
    routes: Vec<RouteRt>,
    pub pools: Vec<Arc<PoolRt>>,
    pub listeners: HashMap<SocketAddr, Arc<ListenerRt>>,
    /// MySQL clusters, in config order.
    pub mysql: Vec<Arc<ClusterRt>>,
    /// Cancelled when this generation is replaced: stops its health checks, cert watchers and
    /// MySQL discovery.
    pub tasks: CancellationToken,
}

impl Generation {
    /// Builds a generation; pools take over the health state of same-named pools of `previous`;
    /// backends, routes and listeners take their figures' handles from `http`.
    pub fn build(
        config: Config,
        config_path: &Path,
        previous: Option<&Generation>,
        tls_shared: &TlsShared,
        http: &HttpStats,
    ) -> Result<Generation, ServeError> {
        let base = config_path.parent().unwrap_or(Path::new("."));
        // Before any handle is resolved: they share the switch, a reload flips it in place.
        http.set_histograms(config.admin.latency_histograms);
        let mut pools: Vec<Arc<PoolRt>> = Vec::new();
        for p in &config.pools {
            let old = previous.and_then(|g| g.pools.iter().find(|o| o.name == p.name()));
            pools.push(Arc::new(build_pool(p, &config, base, old.map(|o| &*o.lb), http)?));
        }
        let by_name: HashMap<&str, &Arc<PoolRt>> = pools.iter().map(|p| (p.name.as_str(), p)).collect();
        let mut routes = Vec::new();
        for r in &config.routes {
            let host = r.host.as_ref().map(|h| h.get_ref().to_ascii_lowercase());
            let path = r.path.get_ref().clone();
            let pool = by_name
                .get(r.pool.get_ref().as_str())
                .ok_or_else(|| ServeError::Config(format!("route to unknown pool {}", r.pool.get_ref())))?;
            let label = format!("{}{}", host.as_deref().unwrap_or("*"), path);
            routes.push(RouteRt {
                requests: RouteCounters::new(&label, &pool.name),
                stats: http.route(&label, &pool.name),
                label,
                host,
                path,
                pool: Arc::clone(pool),
                firewall: r.firewall.as_ref().map(Firewall::new),
            });
        }
        let mut listeners = HashMap::new();
        for h in &config.https {
            let addr = *h.listen.get_ref();
            let name = addr.to_string();
            let certs = Arc::new(CertStore::load(&name, h.certs.get_ref(), base, &config)?);
            let ticketer = tls_shared.ticketer(h.session_ticket_rotation.get_ref().0)?;
            let tls = tls::server_config(certs.clone(), ticketer, tls_shared.sessions.clone())?;
            listeners.insert(
                addr,
                Arc::new(ListenerRt {
                    stats: http.listener(&name),
                    name,
                    tls,
                    certs,
                    trusted: h.trusted_proxies.clone(),
                    accept_proxy_protocol: *h.accept_proxy_protocol.get_ref(),
                    client_header_timeout: h.client_header_timeout.0,
                    idle_timeout: h.idle_timeout.0,
                    tunnel_timeout: h.tunnel_timeout.0,
                }),
            );
        }
        let mut mysql = Vec::new();
        for m in &config.mysql {
            let old = previous.and_then(|g| g.mysql.iter().find(|o| o.name == *m.name.get_ref()));
            mysql.push(Arc::new(ClusterRt::build(m, &config, base, old.map(|o| &**o))?));
        }
        Ok(Generation { config: Arc::new(config), routes, pools, listeners, mysql, tasks: CancellationToken::new() })
    }

    /// The MySQL cluster listening on `addr`, and which of its ports that is.
    pub fn mysql_for(&self, addr: SocketAddr) -> Option<(Arc<ClusterRt>, Port)> {
        self.mysql.iter().find_map(|c| {
            if c.cfg.rw_listen == addr {
                Some((c.clone(), Port::ReadWrite))
            } else if c.cfg.ro_listen == Some(addr) {
                Some((c.clone(), Port::ReadOnly))
            } else {
                None
            }
        })
    }

    /// The route for a host (lower case, no port) and path: exact host before wildcard before
    /// any host; within those, the longest path prefix.
    pub fn route(&self, host: Option<&str>, path: &str) -> Option<&RouteRt> {
        let rank = |r: &RouteRt| -> Option<u8> {
            match (&r.host, host) {
                (None, _) => Some(0),
                (Some(rh), Some(h)) if rh == h => Some(2),
                (Some(rh), Some(h)) => {
                    let suffix = rh.strip_prefix("*.")?;
                    let (_, parent) = h.split_once('.')?;
                    (parent == suffix).then_some(1)
                }
                (Some(_), None) => None,
            }
        };
        self.routes
            .iter()
            .filter(|r| super::http::firewall::path_has_prefix(path, &r.path))
            .filter_map(|r| rank(r).map(|k| (k, r.path.len(), r)))
            .max_by_key(|(k, len, _)| (*k, *len))
            .map(|(_, _, r)| r)
    }

    /// Starts this generation's background tasks: health checks, certificate watchers, idle
    /// connection sweeping; publishes backend and certificate gauges.
    pub fn start(&self, metrics: &Arc<Metrics>, scope: &crate::paths::Scope) {
        super::l4health::start(&self.config, scope, &self.tasks);
        for p in &self.pools {
            for b in p.lb.backends() {
                let labels = BackendLabels { pool: p.name.clone(), backend: b.id().to_string() };
                metrics.backend_up.get_or_create(&labels).set(i64::from(b.state() == BackendState::Up));
            }
            if let Some(check) = &p.cfg.health {
                for b in p.lb.backends() {
                    let host = check
                        .host
                        .clone()
                        .or_else(|| p.cfg.sni.clone())
                        .unwrap_or_else(|| b.data().addr.addr.to_string());
                    tokio::spawn(backend::health_loop(
                        p.lb.clone(),
                        b.index(),
                        check.clone(),
                        host,
                        p.cfg.sends_proxy_protocol(),
                        metrics.clone(),
                        self.tasks.clone(),
                    ));
                }
            }
        }
        for c in &self.mysql {
            c.publish(&metrics.mysql);
            c.start(metrics.mysql.clone(), self.tasks.clone());
        }
        let stores: Vec<Arc<CertStore>> = self.listeners.values().map(|l| l.certs.clone()).collect();
        let pools = self.pools.clone();
        let stop = self.tasks.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            // Certificates are polled every second (stat, then a content hash on change).
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                for s in &stores {
                    let s2 = s.clone();
                    // File reads and parsing stay off the async workers.
                    let _ = tokio::task::spawn_blocking(move || s2.poll()).await;
                    s.update_expiry(&metrics);
                }
                for p in &pools {
                    for b in p.lb.backends() {
                        b.data().sweep();
                    }
                }
            }
        });
    }

    /// Removes gauges of backends and certificates that the `next` generation no longer has.
    pub fn retire_metrics(&self, next: &Generation, metrics: &Metrics) {
        let keep: std::collections::HashSet<BackendLabels> = next
            .pools
            .iter()
            .flat_map(|p| {
                p.lb.backends().into_iter().map(|b| BackendLabels { pool: p.name.clone(), backend: b.id().to_string() })
            })
            .collect();
        for p in &self.pools {
            for b in p.lb.backends() {
                let l = BackendLabels { pool: p.name.clone(), backend: b.id().to_string() };
                if !keep.contains(&l) {
                    metrics.backend_up.remove(&l);
                }
            }
        }
        for c in &self.mysql {
            c.retire_metrics(next.mysql.iter().find(|n| n.name == c.name).map(|n| &**n), &metrics.mysql);
        }
        let keep_certs: std::collections::HashSet<_> =
            next.listeners.values().flat_map(|l| l.certs.cert_labels()).collect();
        for l in self.listeners.values() {
            for c in l.certs.cert_labels() {
                if !keep_certs.contains(&c) {
                    metrics.cert_expiry.remove(&c);
                }
            }
        }
        let backends = keep.into_iter().map(|l| (l.pool, l.backend)).collect();
        let routes = next.routes.iter().map(|r| (r.stats.route.clone(), r.stats.pool.clone())).collect();
        let listeners = next.listeners.values().map(|l| l.name.clone()).collect();
        metrics.http.retain(&backends, &routes, &listeners);
    }

    /// Sets a backend's admin state at run time (`rampart backend`): it lasts until the next
    /// reload, which applies the file's `state` again (the file stays the source of truth, as
    /// with HAProxy's runtime API without a state file).
    pub fn set_backend_state(
        &self,
        pool: &str,
        backend: &str,
        state: &str,
        metrics: &Metrics,
    ) -> Result<String, String> {
        let admin = match state {
            "ready" | "up" => Admin::Ready,
            "drain" => Admin::Drain,
            "maint" => Admin::Maint,
            other => return Err(format!("unknown state {other:?} (expected ready, drain or maint)")),
        };
        let p = self.pools.iter().find(|p| p.name == pool).ok_or_else(|| {
            let names: Vec<&str> = self.pools.iter().map(|p| p.name.as_str()).collect();
            format!("no pool {pool:?} (pools: {})", names.join(", "))
        })?;
        let b = p.lb.find(backend).ok_or_else(|| {
            let ids: Vec<String> = p.lb.backends().iter().map(|b| b.id().to_string()).collect();
            format!("pool {pool} has no backend {backend:?} (backends: {})", ids.join(", "))
        })?;
        let change = b.set_admin(admin);
        let now = b.state();
        backend::publish(metrics, pool, change);
        Ok(format!("pool {pool}: backend {backend} is {now} (until the next reload)"))
    }

    /// This generation's part of a [`snapshot::Daemon`] (pools, routes, listeners, MySQL).
    pub fn snapshot(&self, metrics: &Metrics) -> snapshot::Daemon {
        let pools = self
            .pools
            .iter()
            .map(|p| snapshot::Pool {
                name: p.name.clone(),
                balance: p.cfg.balance.0.to_string(),
                backends: p
                    .lb
                    .backends()
                    .iter()
                    .map(|b| {
                        let labels = BackendLabels { pool: p.name.clone(), backend: b.id().to_string() };
                        let stats = &b.data().stats;
                        snapshot::Backend {
                            addr: b.id().to_string(),
                            state: b.state().to_string(),
                            in_flight: b.in_flight() as u64,
                            requests: super::stats::CLASSES
                                .iter()
                                .map(|c| (c.to_string(), stats.requests(c)))
                                .collect(),
                            connect_errors: metrics.backend_connect_errors.get(&labels).map_or(0, |c| c.get()),
                        }
                    })
                    .collect(),
            })
            .collect();
        let routes = self
            .routes
            .iter()
            .map(|r| snapshot::Route {
                route: r.label.clone(),
                pool: r.pool.name.clone(),
                requests: r.requests.counts().into_iter().map(|(s, n)| (s.to_string(), n)).collect(),
            })
            .collect();
        let mut listeners: Vec<snapshot::Listener> = self
            .listeners
            .values()
            .map(|l| snapshot::Listener {
                name: l.name.clone(),
                certificates: l
                    .certs
                    .certificates()
                    .into_iter()
                    .map(|(file, subject, not_after_unix)| snapshot::Certificate { file, subject, not_after_unix })
                    .collect(),
            })
            .collect();
        listeners.sort_by(|a, b| a.name.cmp(&b.name));
        listeners.dedup_by(|a, b| a.name == b.name);
        snapshot::Daemon {
            version: super::process::VERSION.to_string(),
            started_unix: super::process::start_time(),
            pools,
            routes,
            listeners,
            mysql: self.mysql.iter().map(|c| c.snapshot()).collect(),
        }
    }

    /// A short text status (the admin listener's `/`).
    pub fn status(&self) -> String {
        let mut s = String::new();
        for p in &self.pools {
            s.push_str(&format!("pool {} ({})\n", p.name, p.cfg.balance.0));
            for b in p.lb.backends() {
                s.push_str(&format!("  {:<28} {:<6} in-flight {}\n", b.id(), b.state().to_string(), b.in_flight()));
            }
        }
        for c in &self.mysql {
            s.push_str(&c.status());
        }
        s
    }
}

fn build_pool(
    p: &config::Pool,
    config: &Config,
    base: &Path,
    old: Option<&LbPool>,
    http: &HttpStats,
) -> Result<PoolRt, ServeError> {
    let backends = p.backends.get_ref();
    let tls = if backends.iter().any(|b| b.addr.scheme == Scheme::Https) {
        if !p.tls_verify {
            log::warn!(
                "pool {}: tls_verify = false: the certificates of its https:// backends are NOT verified; \
                 anyone on the path to them can read and change the traffic",
                p.name()
            );
        }
        let ca = p.ca.as_ref().map(|c| config.resolve(base, c.get_ref()));
        Some(tls::client_config(ca.as_deref(), p.tls_verify)?)
    } else {
        None
    };
    let mut specs = Vec::new();
    for b in backends {
        let mut conn = BackendConn::new(p, b.addr, tls.as_ref()).map_err(ServeError::Config)?;
        conn.stats = http.backend(p.name(), &b.addr.to_string());
        specs.push(BackendSpec::new(b.addr.to_string(), Arc::new(conn)).with_weight(b.weight));
    }
    let health = match &p.health {
        Some(h) => HealthConfig { rise: *h.rise.get_ref(), fall: *h.fall.get_ref(), ..HealthConfig::default() },
        None => HealthConfig::default(),
    };
    let cfg = PoolConfig { algorithm: p.balance.0.clone(), health, ..PoolConfig::default() };
    let lb = match old {
        Some(old) => LbPool::with_state_from(old, cfg, specs),
        None => LbPool::new(cfg, specs),
    }
    .map_err(|e| ServeError::Config(format!("pool {}: {e}", p.name())))?;
    for (i, b) in backends.iter().enumerate() {
        let admin = match b.state {
            AdminState::Ready => Admin::Ready,
            AdminState::Drain => Admin::Drain,
            AdminState::Maint => Admin::Maint,
        };
        if let Ok(Some(change)) = lb.set_admin(i, admin) {
            log::info!("pool {}: {change}", p.name());
        }
    }
    Ok(PoolRt { name: p.name().to_string(), lb: Arc::new(lb), cfg: p.clone(), passive: p.health.is_some() })
}
