//! Every map of the balancer stage, declared in one place. Types, names and sizes come from
//! `rampart_common::lb`; userspace pins each map beside the firewall's.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use rampart_common::{
    Counter,
    lb::{
        BackendInfo, DEFAULT_CONNTRACK_ENTRIES, Flow4Key, FlowKey, FlowValue, LbConfig, LbCounter, MAX_BACKENDS,
        MAX_SERVICES, NextHop, PORT_WORDS, RING_ENTRIES, VipInfo, VipKey, stat,
    },
};

const BPF_F_NO_COMMON_LRU: u32 = 1 << 1;

#[map]
pub static LB_CONFIG: Array<LbConfig> = Array::with_max_entries(1, 0);
/// Service → its index and Maglev table.
#[map]
pub static LB_VIPS: HashMap<VipKey, VipInfo> = HashMap::with_max_entries(MAX_SERVICES, 0);
#[map]
pub static LB_BACKENDS: Array<BackendInfo> = Array::with_max_entries(MAX_BACKENDS, 0);
/// Every service's Maglev table: backend ids.
#[map]
pub static LB_RING: Array<u32> = Array::with_max_entries(RING_ENTRIES, 0);
/// Flow → backend, one table per family (IPv4 keys are 16 bytes, IPv6 keys 40). Each is an LRU
/// hash with one LRU list per CPU (`BPF_F_NO_COMMON_LRU`: no shared lock on the packet path);
/// entries are shared, so a flow whose packets move to another CPU keeps its backend (an
/// `LRU_PERCPU_HASH` would show that CPU a zeroed entry). A full table evicts the least recently
/// used flow, which is hashed again if it comes back. Userspace sizes both when loading
/// (`conntrack_entries`).
#[map]
pub static LB_CT4: LruHashMap<Flow4Key, FlowValue> =
    LruHashMap::with_max_entries(DEFAULT_CONNTRACK_ENTRIES, BPF_F_NO_COMMON_LRU);
#[map]
pub static LB_CT6: LruHashMap<FlowKey, FlowValue> =
    LruHashMap::with_max_entries(DEFAULT_CONNTRACK_ENTRIES, BPF_F_NO_COMMON_LRU);
/// Each backend's next hop as this CPU last looked it up (`rampart_common::lb::NextHop`).
#[map]
pub static LB_NEXTHOPS: PerCpuArray<NextHop> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);
#[map]
pub static LB_SVC_STATS: PerCpuArray<LbCounter> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);
#[map]
pub static LB_BE_STATS: PerCpuArray<LbCounter> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);
/// What happened to service packets (`rampart_common::lb::stat`).
#[map]
pub static LB_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(stat::COUNT, 0);
/// Ports some service uses, one bit each (`rampart_common::lb::PORT_WORDS`).
#[map]
pub static LB_PORTS: Array<u64> = Array::with_max_entries(PORT_WORDS, 0);
