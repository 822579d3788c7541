//! The MySQL router's Prometheus families (`rampart_mysql_*`), registered in the daemon's one
//! registry. Labels come from the config (cluster names, server addresses) and fixed words.

use std::sync::atomic::AtomicU64;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServerLabels {
    pub cluster: String,
    pub server: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabels {
    pub cluster: String,
    pub server: String,
    pub role: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    pub cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PortLabels {
    pub cluster: String,
    /// `rw` or `ro`.
    pub port: &'static str,
}

#[derive(Default)]
pub struct MysqlMetrics {
    /// 1 for the server's current role, 0 for the others.
    pub role: Family<RoleLabels, Gauge>,
    /// 1 if the server takes new connections on its port (the primary; replicas in the read pool).
    pub up: Family<ServerLabels, Gauge>,
    pub lag: Family<ServerLabels, Gauge<f64, AtomicU64>>,
    pub connections: Family<ServerLabels, Gauge>,
    /// Servers that are writable (`read_only` off): 1 is healthy, 0 no primary, 2+ split brain.
    pub writable_primaries: Family<ClusterLabels, Gauge>,
    pub primary_changes: Family<ClusterLabels, Counter>,
    pub last_primary_change: Family<ClusterLabels, Gauge<f64, AtomicU64>>,
    pub refused: Family<PortLabels, Counter>,
}

impl MysqlMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register("mysql_server_role", "1 for the MySQL server's current role", self.role.clone());
        registry.register(
            "mysql_server_up",
            "1 if the server takes new connections (the primary, or a replica in the read pool)",
            self.up.clone(),
        );
        registry.register(
            "mysql_replication_lag_seconds",
            "Replication lag a replica reports (absent when unknown)",
            self.lag.clone(),
        );
        registry.register("mysql_connections", "Open client connections to the server", self.connections.clone());
        registry.register(
            "mysql_writable_primaries",
            "Writable servers in the cluster: 1 is healthy, 0 means no primary, more means split brain",
            self.writable_primaries.clone(),
        );
        registry.register("mysql_primary_changes", "Changes of the cluster's primary", self.primary_changes.clone());
        registry.register(
            "mysql_last_primary_change_timestamp_seconds",
            "Unix time of the last change of primary",
            self.last_primary_change.clone(),
        );
        registry.register(
            "mysql_refused_connections",
            "Client connections refused with an ERR packet (no primary, split brain, no server)",
            self.refused.clone(),
        );
    }
}
