//! Shared helpers for rampart's packet-level tests: frames ([`packet`]), random rule sets and
//! traffic ([`random`]), BPF_PROG_TEST_RUN ([`testrun`]) and network namespaces ([`netns`]);
//! and for the benchmark binaries ([`bench`] for fw-bench, [`tls_bench`] for tls-bench).
pub mod bench;
pub mod decap;
pub mod netns;
pub mod packet;
pub mod random;
pub mod testrun;
pub mod tls_bench;
