//! rampart's userspace: loading and driving the XDP programs, and (later) the daemon.
pub mod bpf;
