//! `rampart serve`: TLS termination, the HTTP reverse proxy and the MySQL router.
//!
//! Layout: this folder holds what every protocol shares; [`http`] is the HTTP reverse proxy and
//! [`mysql`] the MySQL router. [`runtime`] builds one generation of state from a config (HTTP
//! routes and pools, MySQL clusters: a reload swaps them together); [`listener`] accepts TLS
//! clients (and redirects) and hands them to [`http`]; [`tls`], [`tcp`] (the socket under rustls),
//! [`timer`] (a connection's timeouts), [`proxy_protocol`], [`metrics`] (with [`stats`],
//! [`process`] and [`exposition`]) and [`admin`] (metrics listener and control socket) do one job
//! each. Reloads (SIGHUP,
//! `rampart reload`) build a new generation and swap it in; a config that fails to load or
//! build is refused and the running one stays.

pub mod admin;
pub mod exposition;
pub mod http;
pub mod l4health;
pub mod listener;
pub mod metrics;
pub mod mysql;
pub mod pinned;
pub mod process;
pub mod proxy_protocol;
pub mod runtime;
pub mod stats;
pub mod tcp;
pub mod timer;
pub mod tls;
pub mod tls_stream;

// admin.rs answers with the proxy's pages and bodies.
use http::proxy;

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::config::{Config, ConfigError};
use metrics::{Metrics, RequestLabels, ResultLabels};
use runtime::{Generation, TlsShared};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    ConfigFile(#[from] ConfigError),
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("control socket {}: {source}", path.display())]
    Control { path: PathBuf, source: std::io::Error },
    #[error("signal handler: {0}")]
    Signal(std::io::Error),
    #[error("starting the connection threads: {0}")]
    Threads(std::io::Error),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Https,
    Redirect,
    Admin,
    /// A `[[mysql]]` cluster's rw_listen or ro_listen (the cluster is looked up by address).
    Mysql,
}

struct Bound {
    kind: Kind,
    stop: CancellationToken,
}

/// State shared by every task of the daemon.
pub struct Shared {
    config_path: PathBuf,
    generation: ArcSwap<Generation>,
    pub metrics: Arc<Metrics>,
    /// Client connections, waited for on shutdown.
    pub connections: TaskTracker,
    /// The connection threads that proxied MySQL sessions run on.
    pub pinned: pinned::Pinned,
    /// Cancelled on SIGTERM/SIGINT: connections finish their requests and close.
    pub shutdown: CancellationToken,
    /// Set with `shutdown`: read after every request, where the token's lock showed in profiles.
    stopping: AtomicBool,
    /// Listening sockets by address; its lock also serialises reloads.
    listeners: tokio::sync::Mutex<HashMap<SocketAddr, Bound>>,
    tls_shared: TlsShared,
    /// The network namespace the daemon runs in, where the balancer's interfaces are attached.
    scope: crate::paths::Scope,
}

impl Shared {
    /// The daemon is shutting down (`shutdown` is cancelled).
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    pub fn current(&self) -> Arc<Generation> {
        self.generation.load_full()
    }

    /// Everything the daemon and the kernel show now: the firewall from the pinned maps, and
    /// this generation's pools, routes, listeners and MySQL clusters. Reads BPF maps (system
    /// calls): call it off the async workers.
    pub fn snapshot(&self) -> crate::snapshot::Snapshot {
        let mut s = crate::snapshot::Snapshot::kernel(None);
        s.daemon = Some(self.current().snapshot(&self.metrics));
        s
    }

    pub fn count(&self, labels: &RequestLabels) {
        self.metrics.requests.get_or_create(labels).inc();
    }

    /// The https listener port a redirect listener points to.
    pub fn redirect_target(&self, redirect_addr: SocketAddr) -> u16 {
        self.current()
            .config
            .https
            .iter()
            .find(|h| h.redirect_http.as_ref().is_some_and(|r| *r.get_ref() == redirect_addr))
            .map_or(443, |h| h.listen.get_ref().port())
    }

    /// Loads the config file again and switches to it; on any error the running config stays.
    pub async fn reload(self: &Arc<Self>) -> Result<String, String> {
        let mut bound = self.listeners.lock().await;
        let r = self.reload_locked(&mut bound).await;
        let result = if r.is_ok() { "ok" } else { "error" };
        self.metrics.config_reloads.get_or_create(&ResultLabels { result }).inc();
        match &r {
            Ok(msg) => log::info!("reload: {msg}"),
            Err(e) => log::error!("reload refused, the running configuration stays:\n{e}"),
        }
        r
    }

    async fn reload_locked(self: &Arc<Self>, bound: &mut HashMap<SocketAddr, Bound>) -> Result<String, String> {
        let path = self.config_path.clone();
        let config = tokio::task::spawn_blocking(move || Config::load(&path))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let old = self.current();
        if config.admin.control_socket != old.config.admin.control_socket {
            log::warn!(
                "control_socket changes to {} at the next start; this daemon keeps {}",
                config.admin.control_socket.display(),
                old.config.admin.control_socket.display()
            );
        }
        let notes = config.not_applied_by_serve();
        let path = self.config_path.clone();
        let g = Generation::build(config, &path, Some(&old), &self.tls_shared, &self.metrics.http)
            .map_err(|e| e.to_string())?;
        let fresh = bind_new(bound, &g.config).map_err(|e| e.to_string())?;
        let g = Arc::new(g);
        self.generation.store(g.clone());
        old.tasks.cancel();
        old.retire_metrics(&g, &self.metrics);
        g.start(&self.metrics, &self.scope);
        let wanted = wanted_listeners(&g.config);
        let mut removed = 0;
        bound.retain(|addr, b| {
            let keep = wanted.iter().any(|(a, _)| a == addr);
            if !keep {
                b.stop.cancel();
                removed += 1;
            }
            keep
        });
        let added = fresh.len();
        self.spawn_listeners(bound, fresh);
        for n in notes {
            log::warn!("not applied by the daemon in this version: {n}");
        }
        Ok(format!("configuration reloaded ({}; {added} listener(s) added, {removed} removed)", g.config.summary()))
    }

    fn spawn_listeners(
        self: &Arc<Self>,
        bound: &mut HashMap<SocketAddr, Bound>,
        fresh: Vec<(SocketAddr, Kind, TcpListener)>,
    ) {
        for (addr, kind, l) in fresh {
            let stop = CancellationToken::new();
            let shared = self.clone();
            match kind {
                Kind::Https => {
                    tokio::spawn(listener::run_https(shared, l, addr, stop.clone()));
                }
                Kind::Redirect => {
                    tokio::spawn(listener::run_redirect(shared, l, addr, stop.clone()));
                }
                Kind::Admin => {
                    tokio::spawn(admin::run_admin(shared, l, stop.clone()));
                }
                Kind::Mysql => {
                    tokio::spawn(mysql::session::run_listener(shared, l, addr, stop.clone()));
                }
            }
            log::info!("listening on {addr} ({kind:?})");
            bound.insert(addr, Bound { kind, stop });
        }
    }
}

fn wanted_listeners(cfg: &Config) -> Vec<(SocketAddr, Kind)> {
    let mut v = Vec::new();
    for h in &cfg.https {
        v.push((*h.listen.get_ref(), Kind::Https));
        if let Some(r) = &h.redirect_http {
            v.push((*r.get_ref(), Kind::Redirect));
        }
    }
    if let Some(a) = &cfg.admin.listen {
        v.push((*a.get_ref(), Kind::Admin));
    }
    for m in &cfg.mysql {
        v.push((m.rw_listen, Kind::Mysql));
        v.extend(m.ro_listen.map(|a| (a, Kind::Mysql)));
    }
    v
}

/// Binds the listeners `cfg` wants that are not bound yet. Nothing is kept on error.
fn bind_new(
    bound: &HashMap<SocketAddr, Bound>,
    cfg: &Config,
) -> Result<Vec<(SocketAddr, Kind, TcpListener)>, ServeError> {
    let mut fresh = Vec::new();
    for (addr, kind) in wanted_listeners(cfg) {
        match bound.get(&addr) {
            Some(b) if b.kind == kind => continue,
            Some(b) => {
                return Err(ServeError::Config(format!(
                    "{addr} changes from {:?} to {kind:?} listener: that needs a restart",
                    b.kind
                )));
            }
            None => {}
        }
        let bind = || -> std::io::Result<TcpListener> {
            let s = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
            s.set_reuseaddr(true)?;
            s.bind(addr)?;
            s.listen(1024)
        };
        fresh.push((addr, kind, bind().map_err(|source| ServeError::Bind { addr, source })?));
    }
    Ok(fresh)
}

/// Makes a write to a connection the peer has reset fail with EPIPE instead of killing the
/// process. rustls and hyper write with `writev`, which (unlike std's `send`) does not pass
/// MSG_NOSIGNAL; with SIGPIPE at its default action (which `main` restores for the one-shot
/// commands, `rampart fw list | head`), one client closing abruptly ended the whole daemon and
/// reset every other client's connection.
fn ignore_sigpipe() -> Result<(), ServeError> {
    // SAFETY: sets the process-wide action of one signal to "ignore"; no handler code is involved.
    if unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) } == libc::SIG_ERR {
        return Err(ServeError::Signal(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Runs the daemon until SIGTERM or SIGINT, then drains.
/// `scope` is the network namespace the daemon runs in (`-n`), where the balancer's interfaces
/// are attached: `[[service]]` health checks write their results there.
pub async fn run(config_path: &Path, scope: crate::paths::Scope) -> Result<(), ServeError> {
    ignore_sigpipe()?;
    let config = Config::load(config_path)?;
    for n in config.not_applied_by_serve() {
        log::warn!("not applied by the daemon in this version: {n}");
    }
    let tls_shared = TlsShared::default();
    // Relative to the config file, as every other path in it.
    let control_path = config.resolve(config_path.parent().unwrap_or(Path::new(".")), &config.admin.control_socket);
    let metrics = Arc::new(Metrics::new());
    let g = Arc::new(Generation::build(config, config_path, None, &tls_shared, &metrics.http)?);
    let shared = Arc::new(Shared {
        config_path: config_path.to_path_buf(),
        generation: ArcSwap::new(g.clone()),
        metrics: metrics.clone(),
        connections: TaskTracker::new(),
        pinned: pinned::Pinned::per_cpu().map_err(ServeError::Threads)?,
        shutdown: CancellationToken::new(),
        stopping: AtomicBool::new(false),
        listeners: tokio::sync::Mutex::new(HashMap::new()),
        tls_shared,
        scope,
    });
    {
        let mut bound = shared.listeners.lock().await;
        let fresh = bind_new(&bound, &g.config)?;
        shared.spawn_listeners(&mut bound, fresh);
    }
    g.start(&metrics, &shared.scope);
    let control = admin::bind_control(&control_path)
        .map_err(|source| ServeError::Control { path: control_path.clone(), source })?;
    let control_stop = CancellationToken::new();
    tokio::spawn(admin::run_control(shared.clone(), control, control_stop.clone()));
    log::info!("rampart serve: ready ({}); control socket {}", g.config.summary(), control_path.display());
    drop(g);

    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup()).map_err(ServeError::Signal)?;
    let mut term = signal(SignalKind::terminate()).map_err(ServeError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(ServeError::Signal)?;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                log::info!("SIGHUP: reloading {}", config_path.display());
                let _ = shared.reload().await;
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }

    // Stop accepting, let connections finish what they have in flight, bounded by drain_timeout.
    // A reload may have changed drain_timeout; the one in force now applies.
    let drain = shared.current().config.admin.drain_timeout.0;
    log::info!("shutting down: no new connections; waiting up to {drain:?} for requests in flight");
    {
        let bound = shared.listeners.lock().await;
        for b in bound.values() {
            b.stop.cancel();
        }
    }
    control_stop.cancel();
    let _ = std::fs::remove_file(&control_path);
    shared.current().tasks.cancel();
    shared.stopping.store(true, Ordering::Relaxed);
    shared.shutdown.cancel();
    shared.connections.close();
    match tokio::time::timeout(drain, shared.connections.wait()).await {
        Ok(()) => log::info!("all connections finished"),
        Err(_) => log::warn!("{} connection(s) still open after {drain:?}; closing them", shared.connections.len()),
    }
    Ok(())
}

/// Milliseconds on the coarse monotonic clock (a few ms resolution, no hardware clock read).
/// Activity is stamped on every socket read and write, where the precise clock showed up in
/// profiles; the timeouts it serves are whole seconds.
pub(crate) fn coarse_ms() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime only writes the timespec we pass; CLOCK_MONOTONIC_COARSE always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1000) + (ts.tv_nsec as u64) / 1_000_000
}
