//! `rampart lb …`: services and backends of the XDP balancer, and `lb list`.
use std::{
    collections::BTreeMap,
    fs,
    net::IpAddr,
    process::ExitCode,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use rampart::{
    lb::state::{Admin, Balancer, LB_LAST_FILE, ServiceId},
    paths::Scope,
};
use rampart_common::lb::{LbCounter, stat};
use serde::{Deserialize, Serialize};

use crate::{LbBackendOp, LbCmd, LbServiceOp};

fn service(s: &str) -> Result<ServiceId> {
    Ok(s.parse()?)
}

fn addr(s: &str) -> Result<IpAddr> {
    s.parse().with_context(|| format!("`{s}`: a backend is an IP address, e.g. 10.0.1.11 or 2001:db8::11"))
}

pub fn run(scope: &Scope, iface: String, cmd: LbCmd) -> Result<ExitCode> {
    let mut lb = Balancer::open(scope, &iface)?;
    match cmd {
        LbCmd::Service { op: LbServiceOp::Add { service: s, table_size } } => {
            let id = service(&s)?;
            lb.change(|st| st.add_service(id, table_size))?;
            println!("{iface}: service {id} added (Maglev table of {table_size}); it has no backend yet");
        }
        LbCmd::Service { op: LbServiceOp::Delete { service: s } } => {
            let id = service(&s)?;
            lb.change(|st| st.delete_service(&id))?;
            println!("{iface}: service {id} deleted");
        }
        LbCmd::Backend { op } => {
            let (verb, s, a) = match &op {
                LbBackendOp::Add { service, addr, .. } => ("added to", service, addr),
                LbBackendOp::Delete { service, addr } => ("deleted from", service, addr),
                LbBackendOp::Drain { service, addr } => ("draining in", service, addr),
                LbBackendOp::Ready { service, addr } => ("ready in", service, addr),
            };
            let (id, ip) = (service(s)?, addr(a)?);
            lb.change(|st| match op {
                LbBackendOp::Add { weight, .. } => st.add_backend(&id, ip, weight),
                LbBackendOp::Delete { .. } => st.delete_backend(&id, ip),
                LbBackendOp::Drain { .. } => st.set_admin(&id, ip, Admin::Drain),
                LbBackendOp::Ready { .. } => st.set_admin(&id, ip, Admin::Ready),
            })?;
            println!("{iface}: backend {ip} {verb} {id}");
        }
        LbCmd::List { json } => list(scope, &lb, json)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// Counters as the last `lb list` saw them, for rates.
#[derive(Default, Serialize, Deserialize)]
struct Last {
    at_ms: u64,
    services: BTreeMap<u32, [u64; 3]>,
    backends: BTreeMap<u32, [u64; 3]>,
}

fn triple(c: &LbCounter) -> [u64; 3] {
    [c.packets, c.bytes, c.new_flows]
}

#[derive(Serialize)]
struct Figures {
    packets: u64,
    bytes: u64,
    new_flows: u64,
    /// Per second since the last `lb list` (absent on the first).
    packets_per_s: Option<f64>,
    bytes_per_s: Option<f64>,
    new_flows_per_s: Option<f64>,
}

#[derive(Serialize)]
struct BackendOut {
    addr: IpAddr,
    weight: u32,
    admin: Admin,
    health: rampart::lb::state::Health,
    #[serde(flatten)]
    figures: Figures,
}

#[derive(Serialize)]
struct ServiceOut {
    service: String,
    table_size: u32,
    #[serde(flatten)]
    figures: Figures,
    backends: Vec<BackendOut>,
}

#[derive(Serialize)]
struct ListOut {
    iface: String,
    services: Vec<ServiceOut>,
    /// What happened to service packets besides balancing (`forwarded`, `no_backend`, …).
    events: BTreeMap<&'static str, u64>,
}

fn list(scope: &Scope, lb: &Balancer, json: bool) -> Result<()> {
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    let last_path = scope.state_dir(lb.iface()).join(LB_LAST_FILE);
    let last: Last = fs::read(&last_path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
    let secs = (last.at_ms > 0 && now_ms > last.at_ms).then(|| (now_ms - last.at_ms) as f64 / 1000.0);
    let (services, backends) = lb.counters()?;
    let figures = |c: &LbCounter, before: Option<&[u64; 3]>| {
        let rate = |i: usize, v: u64| match (secs, before) {
            (Some(s), Some(b)) if v >= b[i] => Some((v - b[i]) as f64 / s),
            _ => None,
        };
        Figures {
            packets: c.packets,
            bytes: c.bytes,
            new_flows: c.new_flows,
            packets_per_s: rate(0, c.packets),
            bytes_per_s: rate(1, c.bytes),
            new_flows_per_s: rate(2, c.new_flows),
        }
    };
    let zero = LbCounter::default();
    let out = ListOut {
        iface: lb.iface().to_string(),
        services: lb
            .state()
            .services
            .iter()
            .map(|s| ServiceOut {
                service: s.id.to_string(),
                table_size: s.table_size,
                figures: figures(services.get(&s.index).unwrap_or(&zero), last.services.get(&s.index)),
                backends: s
                    .backends
                    .iter()
                    .map(|b| BackendOut {
                        addr: b.addr,
                        weight: b.weight,
                        admin: b.admin,
                        health: b.health,
                        figures: figures(backends.get(&b.id).unwrap_or(&zero), last.backends.get(&b.id)),
                    })
                    .collect(),
            })
            .collect(),
        events: stat::NAMES.iter().zip(lb.tables().stats()?).map(|(n, c)| (*n, c.packets)).collect(),
    };
    let next = Last {
        at_ms: now_ms,
        services: services.iter().map(|(k, c)| (*k, triple(c))).collect(),
        backends: backends.iter().map(|(k, c)| (*k, triple(c))).collect(),
    };
    // Rates are a convenience: a state directory that cannot be written must not fail the list.
    if let Err(e) = fs::write(&last_path, serde_json::to_vec(&next)?) {
        log::warn!("{}: {e}", last_path.display());
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let rate = |r: Option<f64>| r.map_or("-".to_string(), |r| format!("{r:.1}"));
    if out.services.is_empty() {
        println!("{}: no services", out.iface);
    }
    for s in &out.services {
        println!(
            "service {} (table {}): {} packets, {} bytes, {} new flows   ({} pkt/s, {} flows/s)",
            s.service,
            s.table_size,
            s.figures.packets,
            s.figures.bytes,
            s.figures.new_flows,
            rate(s.figures.packets_per_s),
            rate(s.figures.new_flows_per_s)
        );
        println!(
            "  {:<40} {:>6} {:>6} {:>5} {:>12} {:>14} {:>10} {:>10} {:>9}",
            "backend", "weight", "admin", "health", "packets", "bytes", "new flows", "pkt/s", "flows/s"
        );
        for b in &s.backends {
            let admin = if b.admin == Admin::Ready { "ready" } else { "drain" };
            let health = if b.health == rampart::lb::state::Health::Up { "up" } else { "down" };
            println!(
                "  {:<40} {:>6} {:>6} {:>5} {:>12} {:>14} {:>10} {:>10} {:>9}",
                b.addr.to_string(),
                b.weight,
                admin,
                health,
                b.figures.packets,
                b.figures.bytes,
                b.figures.new_flows,
                rate(b.figures.packets_per_s),
                rate(b.figures.new_flows_per_s)
            );
        }
    }
    let events: Vec<String> = out.events.iter().filter(|(_, v)| **v > 0).map(|(k, v)| format!("{k} {v}")).collect();
    if !events.is_empty() {
        println!("events: {}", events.join(", "));
    }
    Ok(())
}
