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

use rampart_common::lb::{DEFAULT_CONNTRACK_ENTRIES, MAX_CONNTRACK_ENTRIES, MIN_CONNTRACK_ENTRIES};

/// Checks a connection-table size (`--conntrack-entries`, `conntrack_entries`).
pub fn check_conntrack_entries(n: u32) -> Result<(), String> {
    if (MIN_CONNTRACK_ENTRIES..=MAX_CONNTRACK_ENTRIES).contains(&n) {
        Ok(())
    } else {
        Err(format!(
            "conntrack_entries {n} is out of range: {MIN_CONNTRACK_ENTRIES}..={MAX_CONNTRACK_ENTRIES} \
             (the default is {DEFAULT_CONNTRACK_ENTRIES})"
        ))
    }
}
