//! rampart's userspace: loading and driving the XDP programs, the configuration file, and the
//! daemon (`rampart serve`: TLS termination and the HTTP reverse proxy).
/// The version `rampart --version` prints (git commit and build, from build.rs).
pub const VERSION: &str = env!("RAMPART_VERSION");

pub mod bpf;
pub mod config;
pub mod fw;
pub mod labels;
pub mod lb;
pub mod netns;
pub mod paths;
pub mod pipeline;
pub mod pki;
pub mod probe;
pub mod serve;
pub mod snapshot;
pub mod top;
pub mod xdp;
