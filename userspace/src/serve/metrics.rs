//! The daemon's Prometheus metrics (`rampart_*`, and `process_*`), served on the [admin]
//! listener's `/metrics` in the format the scraper negotiates ([`exposition`]).
//!
//! Labels are bounded: routes, pools, backends, listeners and certificates come from the config;
//! statuses are HTTP codes or classes; interfaces and rules come from what is attached; no
//! per-client or per-URL label. Besides the families below, one collector per stage writes its
//! figures at scrape time: [`HttpCollector`] (per backend, route and listener),
//! [`FwCollector`] (the XDP firewall's per-CPU maps), `LbCollector` (the balancer's), [`ProcessCollector`] and [`BuildInfo`].

use std::sync::{
    Arc, RwLock,
    atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
};

use super::{
    exposition::{self, Format},
    process::{BuildInfo, ProcessCollector},
    stats::{HttpCollector, HttpStats},
};
use crate::fw::view::FwCollector;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: String,
    pub pool: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub pool: String,
    pub backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BlockLabels {
    pub route: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertLabels {
    pub listener: String,
    pub cert: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

/// One route's `rampart_http_requests_total` counters by status: the family's own counters,
/// found once per status instead of hashing the label strings on every request.
pub struct RouteCounters {
    route: String,
    pool: String,
    by_status: RwLock<Vec<(u16, Counter)>>,
}

impl RouteCounters {
    pub fn new(route: &str, pool: &str) -> Self {
        RouteCounters { route: route.to_string(), pool: pool.to_string(), by_status: RwLock::new(Vec::new()) }
    }

    /// Requests counted so far, by status.
    pub fn counts(&self) -> Vec<(u16, u64)> {
        self.by_status.read().unwrap_or_else(|p| p.into_inner()).iter().map(|(s, c)| (*s, c.get())).collect()
    }

    pub fn inc(&self, metrics: &Metrics, status: u16) {
        let known = self
            .by_status
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|(s, _)| *s == status)
            .map(|(_, c)| c.inc());
        if known.is_none() {
            let labels = RequestLabels { route: self.route.clone(), pool: self.pool.clone(), status };
            let c = metrics.requests.get_or_create(&labels).clone();
            c.inc();
            self.by_status.write().unwrap_or_else(|p| p.into_inner()).push((status, c));
        }
    }
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub backend_up: Family<BackendLabels, Gauge>,
    pub backend_connect_errors: Family<BackendLabels, Counter>,
    pub backend_retries: Family<PoolLabels, Counter>,
    pub health_checks_failed: Family<BackendLabels, Counter>,
    pub firewall_blocks: Family<BlockLabels, Counter>,
    pub tls_handshakes: Family<ListenerLabels, Counter>,
    pub tls_handshake_failures: Family<ListenerLabels, Counter>,
    pub cert_expiry: Family<CertLabels, Gauge<f64, AtomicU64>>,
    pub client_connections: Family<ListenerLabels, Gauge>,
    pub config_reloads: Family<ResultLabels, Counter>,
    pub mysql: std::sync::Arc<super::mysql::metrics::MysqlMetrics>,
    /// Per backend, route and listener handles (see `stats`).
    pub http: Arc<HttpStats>,
    /// Bytes of the last OpenMetrics text, to size the next.
    last_len: AtomicUsize,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut root = Registry::default();
        root.register_collector(Box::new(ProcessCollector::default()));
        let registry = root.sub_registry_with_prefix("rampart");
        let http = Arc::new(HttpStats::default());
        registry.register_collector(Box::new(BuildInfo));
        registry.register_collector(Box::new(HttpCollector(http.clone())));
        registry.register_collector(Box::new(FwCollector));
        registry.register_collector(Box::new(crate::lb::view::LbCollector));
        let m = Metrics {
            requests: Family::default(),
            backend_up: Family::default(),
            backend_connect_errors: Family::default(),
            backend_retries: Family::default(),
            health_checks_failed: Family::default(),
            firewall_blocks: Family::default(),
            tls_handshakes: Family::default(),
            tls_handshake_failures: Family::default(),
            cert_expiry: Family::default(),
            client_connections: Family::default(),
            config_reloads: Family::default(),
            mysql: Default::default(),
            http,
            registry: Registry::default(),
            last_len: AtomicUsize::new(0),
        };
        registry.register("http_requests", "HTTP requests answered, by route, pool and status", m.requests.clone());
        registry.register(
            "backend_up",
            "1 if the backend takes traffic (healthy and ready), else 0",
            m.backend_up.clone(),
        );
        registry.register(
            "backend_connect_errors",
            "Failed connections (TCP, TLS or PROXY header) to a backend",
            m.backend_connect_errors.clone(),
        );
        registry.register(
            "backend_retries",
            "Requests retried on another backend after a failed connect",
            m.backend_retries.clone(),
        );
        registry.register("health_checks_failed", "Failed active health checks", m.health_checks_failed.clone());
        registry.register(
            "http_firewall_blocks",
            "Requests refused by a route's application firewall, by reason",
            m.firewall_blocks.clone(),
        );
        registry.register("tls_handshakes", "Completed TLS handshakes", m.tls_handshakes.clone());
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes that failed or timed out",
            m.tls_handshake_failures.clone(),
        );
        registry.register(
            "tls_cert_expiry_seconds",
            "Seconds until the certificate's notAfter (negative once expired)",
            m.cert_expiry.clone(),
        );
        registry.register("client_connections", "Open client connections", m.client_connections.clone());
        registry.register("config_reloads", "Configuration reloads, by result", m.config_reloads.clone());
        m.mysql.register(registry);
        Metrics { registry: root, ..m }
    }

    /// Every figure, in `format`. Reads the firewall's maps: call it off the async workers.
    pub fn encode(&self, format: Format) -> String {
        // Sized like the last scrape (plus growth): a big scrape (megabytes with thousands of
        // rules and backends) would otherwise copy itself at each doubling.
        let last = self.last_len.load(Relaxed);
        let mut out = String::with_capacity(last + last / 8);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        self.last_len.store(out.len(), Relaxed);
        match format {
            Format::OpenMetrics => out,
            Format::Classic => exposition::to_classic(&out),
        }
    }
}
