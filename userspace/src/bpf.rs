//! The kernel objects, embedded at build time by `build.rs`.
pub static FIREWALL_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/rampart-fw"));
pub static MINIMAL_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdp-minimal"));
pub static CALIBRATION_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdp-calibration"));
