//! A read-only view of every interface's balancer, without its lock: `lb.json` is replaced
//! whole by a rename, and the counters are per-CPU map reads. It feeds the snapshot
//! (`rampart stats`, `top`, the status page) and `/metrics` ([`LbCollector`]).
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, NoLabelSet},
    metrics::MetricType,
};
use rampart_common::lb::{LbCounter, stat};

use super::{
    state::{self, Service},
    tables::LbTables,
};
use crate::{fw::view::iface_labels, labels::Rendered, paths::Scope};

/// One interface's services with their counters.
pub struct IfaceLb {
    pub scope: Scope,
    pub iface: String,
    /// Each service with its counter and its backends' counters (same order as `backends`).
    pub services: Vec<(Service, LbCounter, Vec<LbCounter>)>,
    /// `LB_STATS` by `rampart_common::lb::stat` index (packets).
    pub events: Vec<u64>,
}

/// The balancer of `iface` in `scope`, or `None` when it balances nothing (or cannot be read).
pub fn read(scope: &Scope, iface: &str) -> Option<IfaceLb> {
    let st = state::load(scope, iface).ok()?;
    if st.services.is_empty() {
        return None;
    }
    let tables = LbTables::from_pins(&scope.pin_dir(iface)).ok()?;
    let services = st
        .services
        .into_iter()
        .map(|s| {
            let c = tables.service_counters(s.index).unwrap_or_default();
            let b = s.backends.iter().map(|b| tables.backend_counters(b.id).unwrap_or_default()).collect();
            (s, c, b)
        })
        .collect();
    let events = tables.stats().map(|v| v.iter().map(|c| c.packets).collect()).unwrap_or_default();
    Some(IfaceLb { scope: scope.clone(), iface: iface.to_string(), services, events })
}

/// Every attached interface (all scopes, or one) that balances something.
pub fn read_all(only: Option<&Scope>) -> Vec<IfaceLb> {
    let mut out = Vec::new();
    for scope in crate::fw::view::scopes() {
        if only.is_some_and(|o| *o != scope) {
            continue;
        }
        let Ok(ifaces) = crate::xdp::attached_ifaces(&scope) else { continue };
        out.extend(ifaces.iter().filter_map(|i| read(&scope, i)));
    }
    out
}

/// The balancer's figures for prometheus-client, read at scrape time.
#[derive(Debug, Default)]
pub struct LbCollector;

impl Collector for LbCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let all = read_all(None);
        // Each backend's labels, rendered once for its four families.
        let backend_labels: Vec<Vec<Vec<Rendered>>> = all
            .iter()
            .map(|i| {
                let [(k1, netns), (k2, iface)] = iface_labels(&i.scope, &i.iface);
                let base = Rendered::new([(k1, netns.as_str()), (k2, iface.as_str())]);
                i.services
                    .iter()
                    .map(|(s, _, _)| {
                        let svc = base.with("service", &s.id.to_string());
                        s.backends.iter().map(|b| svc.with("backend", &b.addr.to_string())).collect()
                    })
                    .collect()
            })
            .collect();
        type Pick = fn(&LbCounter) -> u64;
        let figures: [(&str, &str, Pick); 3] = [
            ("packets", "Packets", |c| c.packets),
            ("bytes", "Bytes", |c| c.bytes),
            ("new_flows", "New flows (connection-table misses placed by the Maglev table)", |c| c.new_flows),
        ];
        for (what, help, pick) in figures {
            let name = format!("lb_service_{what}");
            let mut m = enc.encode_descriptor(&name, &format!("{help} of an L4 service"), None, MetricType::Counter)?;
            for i in &all {
                let [netns, iface] = iface_labels(&i.scope, &i.iface);
                for (s, c, _) in &i.services {
                    let labels = [netns.clone(), iface.clone(), ("service", s.id.to_string())];
                    m.encode_family(&labels.as_slice())?.encode_counter::<NoLabelSet, _, u64>(&pick(c), None)?;
                }
            }
            let name = format!("lb_backend_{what}");
            let mut m =
                enc.encode_descriptor(&name, &format!("{help} sent to an L4 backend"), None, MetricType::Counter)?;
            for (i, labels) in all.iter().zip(&backend_labels) {
                for ((_, _, bc), labels) in i.services.iter().zip(labels) {
                    for (c, l) in bc.iter().zip(labels) {
                        m.encode_family(l)?.encode_counter::<NoLabelSet, _, u64>(&pick(c), None)?;
                    }
                }
            }
        }
        let mut m = enc.encode_descriptor(
            "lb_backend_up",
            "1 if the L4 backend takes new flows (ready and healthy), else 0",
            None,
            MetricType::Gauge,
        )?;
        for (i, labels) in all.iter().zip(&backend_labels) {
            for ((s, _, _), labels) in i.services.iter().zip(labels) {
                for (b, l) in s.backends.iter().zip(labels) {
                    let up = i64::from(b.effective_weight() > 0);
                    m.encode_family(l)?.encode_gauge(&up)?;
                }
            }
        }
        let mut m = enc.encode_descriptor(
            "lb_events",
            "What happened to packets addressed to L4 services (forwarded, no_backend, icmp_too_big, …); \
             nexthop_lookups counts next-hop (FIB) lookups, not packets",
            None,
            MetricType::Counter,
        )?;
        for i in &all {
            let [netns, iface] = iface_labels(&i.scope, &i.iface);
            for (k, name) in stat::NAMES.iter().enumerate() {
                let n = i.events.get(k).copied().unwrap_or(0);
                let labels = [netns.clone(), iface.clone(), ("event", (*name).to_string())];
                m.encode_family(&labels.as_slice())?.encode_counter::<NoLabelSet, _, u64>(&n, None)?;
            }
        }
        Ok(())
    }
}
