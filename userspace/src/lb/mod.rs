//! The XDP L4 balancer, userspace side (the kernel stage is `firewall-ebpf/src/lb/`).
//!
//! - [`tables`]: typed handles on the balancer's pinned maps; writes and counter reads.
//! - [`state`]: services and backends of an attached interface (`lb.json`), the edits the CLI
//!   and `attach --config` make, and [`state::sync`], which writes an edit into the maps.
//! - [`view`]: every interface's services and counters read without the lock (snapshot,
//!   `/metrics`).
//! - [`decap`]: the backends' side, their decapsulation program.
pub mod decap;
pub mod state;
pub mod tables;
pub mod view;
