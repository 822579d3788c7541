//! Health checks of the XDP balancer's backends: for each `[[service]]` with `health`, every
//! backend is probed ([`crate::probe::TcpProbe`] or [`crate::probe::HttpGetProbe`]); the
//! results feed `loadbalancer`'s rise/fall state machine (a `Pool` per service, used for its
//! health only), and each change is written into the interface's balancer with
//! `Balancer::change(set_health)`: a backend that goes down leaves the Maglev table (its flows
//! are hashed onto the others) and comes back when it passes again.
//!
//! The daemon owns only `health`; the operator (CLI, `attach --config`) owns services, backends,
//! weights and drains. A backend the operator removed is simply no longer found, and the change
//! is logged and dropped.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use loadbalancer::{BackendSpec, Health, HealthConfig, Pool, PoolConfig};
use tokio_util::sync::CancellationToken;

use crate::{
    config::{Config, L4HealthKind, L4Proto},
    lb::state::{self, Balancer, Proto, ServiceId},
    paths::Scope,
    probe::{self, HttpGetProbe, Probe, Schedule, TcpProbe},
};

/// Starts the checks of every `[[service]]` of `config` that has `health`, until `stop`.
pub fn start(config: &Config, scope: &Scope, stop: &CancellationToken) {
    for s in &config.services {
        let Some(h) = &s.health else { continue };
        let iface = match (&s.interface, config.interfaces.as_slice()) {
            (Some(i), _) => i.get_ref().clone(),
            (None, [only]) => only.name.get_ref().clone(),
            _ => continue, // refused by the config check
        };
        let vip = *s.vip.get_ref();
        let id = ServiceId { vip, proto: if s.proto == L4Proto::Udp { Proto::Udp } else { Proto::Tcp } };
        let specs = s.backends.iter().map(|b| BackendSpec::new(b.addr.to_string(), ())).collect();
        let health = HealthConfig { rise: h.rise.max(1), fall: h.fall.max(1), initial: Health::Up };
        let pool = match Pool::new(PoolConfig { health, ..PoolConfig::default() }, specs) {
            Ok(p) => Arc::new(p),
            Err(e) => {
                log::error!("[[service]] {id}: health checks not started: {e}");
                continue;
            }
        };
        // Start from what the balancer holds, so a restart does not flap a down backend up.
        if let Ok(st) = state::load(scope, &iface)
            && let Ok(svc) = st.service(&id)
        {
            for b in &svc.backends {
                if let Some(pb) = pool.find(&b.addr.to_string()) {
                    pb.set_health(if b.health == state::Health::Down { Health::Down } else { Health::Up });
                }
            }
        }
        let port = h.port.unwrap_or(vip.port());
        let interval = h.interval.0.max(Duration::from_millis(100));
        let timeout = h.timeout.0.min(interval.mul_f64(0.8));
        for (i, b) in s.backends.iter().enumerate() {
            let addr = SocketAddr::new(b.addr, port);
            let schedule = Schedule { interval, timeout, offset: interval.mul_f64(i as f64 / s.backends.len() as f64) };
            let ctx =
                Check { pool: pool.clone(), scope: scope.clone(), iface: iface.clone(), service: id, addr: b.addr };
            let stop = stop.clone();
            match h.kind {
                L4HealthKind::Tcp => {
                    tokio::spawn(async move { ctx.run(TcpProbe { addr }, schedule, stop).await });
                }
                L4HealthKind::Http => {
                    let path = h.path.clone().unwrap_or_else(|| "/".to_string());
                    tokio::spawn(async move { ctx.run(HttpGetProbe { addr, path }, schedule, stop).await });
                }
            }
        }
    }
}

struct Check {
    pool: Arc<Pool<()>>,
    scope: Scope,
    iface: String,
    service: ServiceId,
    addr: std::net::IpAddr,
}

impl Check {
    async fn run<P: Probe>(self, probe: P, schedule: Schedule, stop: CancellationToken) {
        let key = self.addr.to_string();
        let Some(backend) = self.pool.find(&key) else { return };
        probe::run(
            &probe,
            schedule,
            &stop,
            || true,
            |r| {
                if let Err(e) = &r {
                    log::debug!("[[service]] {}: check failed: {e}", self.service);
                }
                if let Some(change) = backend.report_check(r.is_ok()) {
                    let health = if change.health == Health::Up { state::Health::Up } else { state::Health::Down };
                    log::warn!("[[service]] {}: {change}", self.service);
                    let (scope, iface, service, addr) =
                        (self.scope.clone(), self.iface.clone(), self.service, self.addr);
                    // The balancer's lock and map writes are blocking file and bpf(2) calls.
                    tokio::task::spawn_blocking(move || {
                        let r = Balancer::open(&scope, &iface)
                            .and_then(|mut lb| lb.change(|st| st.set_health(&service, addr, health)));
                        if let Err(e) = r {
                            log::error!("[[service]] {service}: backend {addr} {health:?} not applied on {iface}: {e}");
                        }
                    });
                }
            },
        )
        .await;
    }
}
