//! rampart's userspace: loading and driving the XDP programs, and (later) the daemon.
pub mod bpf;
pub mod fw;
pub mod netns;
pub mod paths;
pub mod xdp;
