//! The kernel objects, embedded at build time by `build.rs`, and the map plumbing every stage
//! shares ([`batch`]).
pub mod batch;

pub static FIREWALL_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/rampart"));
/// The backends' decapsulation program (`rampart_common::lb::DECAP_PROGRAM_NAME`).
pub static DECAP_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/rampart-decap"));
pub static MINIMAL_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdp-minimal"));
pub static CALIBRATION_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdp-calibration"));
/// The balancer benchmark's floor: parse, count, swap MACs, XDP_TX.
pub static MINIMAL_TX_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdp-minimal-tx"));
/// The balancer flood's calibration: that floor plus a fixed extra cost per packet.
pub static CALIBRATION_TX_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdp-calibration-tx"));
/// The balancer benchmark's count point at the backends: count by destination, drop.
pub static SINK_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdp-sink"));
