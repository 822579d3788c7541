//! Every map of the firewall stage, declared in one place. Types, names and sizes come from
//! `rampart_common::fw`; userspace pins each map under `/sys/fs/bpf/rampart/<scope>/<iface>/`.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, PerCpuArray},
};
use rampart_common::{
    Counter,
    fw::{
        ADDR_DESCS, ADDR_HASH_MAX_ENTRIES, Active, Addr4Key, Addr6Key, AddrDesc, ClassInfo,
        DEFAULT_WORDS, LPM_MAX_ENTRIES, Lpm4Data, Lpm6Data, MAX_CLASSES, MAX_RULES, PORT_ENTRIES,
        PROTO_ENTRIES, RuleInfo, SLOTS, SlotInfo, stat,
    },
};

#[map]
pub static FW_ACTIVE: Array<Active> = Array::with_max_entries(1, 0);
#[map]
pub static FW_SLOTS: Array<SlotInfo> = Array::with_max_entries(SLOTS, 0);

// Address → class. LPM tries need BPF_F_NO_PREALLOC; aya-ebpf adds it.
#[map]
pub static FW_SRC4: LpmTrie<Lpm4Data, u32> = LpmTrie::with_max_entries(LPM_MAX_ENTRIES, 0);
#[map]
pub static FW_DST4: LpmTrie<Lpm4Data, u32> = LpmTrie::with_max_entries(LPM_MAX_ENTRIES, 0);
#[map]
pub static FW_SRC6: LpmTrie<Lpm6Data, u32> = LpmTrie::with_max_entries(LPM_MAX_ENTRIES, 0);
#[map]
pub static FW_DST6: LpmTrie<Lpm6Data, u32> = LpmTrie::with_max_entries(LPM_MAX_ENTRIES, 0);

// Address → class when a (slot, field, family) uses few prefix lengths: a descriptor per
// (slot, field, family), then exact-match probes (see `AddrDesc`). No preallocation: memory
// follows the entries, not the capacity.
const BPF_F_NO_PREALLOC: u32 = 1;
#[map]
pub static FW_ADDR_DESC: Array<AddrDesc> = Array::with_max_entries(ADDR_DESCS, 0);
#[map]
pub static FW_ADDR4: HashMap<Addr4Key, u32> = HashMap::with_max_entries(ADDR_HASH_MAX_ENTRIES, BPF_F_NO_PREALLOC);
#[map]
pub static FW_ADDR6: HashMap<Addr6Key, u32> = HashMap::with_max_entries(ADDR_HASH_MAX_ENTRIES, BPF_F_NO_PREALLOC);

// Protocol / port → class, indexed `slot * ENTRIES + value`.
#[map]
pub static FW_PROTO: Array<u32> = Array::with_max_entries(SLOTS * PROTO_ENTRIES, 0);
#[map]
pub static FW_SPORT: Array<u32> = Array::with_max_entries(SLOTS * PORT_ENTRIES, 0);
#[map]
pub static FW_DPORT: Array<u32> = Array::with_max_entries(SLOTS * PORT_ENTRIES, 0);

// Class → bit vector.
#[map]
pub static FW_CLASSES: Array<ClassInfo> = Array::with_max_entries(SLOTS * MAX_CLASSES, 0);
#[map]
pub static FW_WORDS: Array<u64> = Array::with_max_entries(DEFAULT_WORDS, 0);

// Rule → action and counters, indexed `SlotInfo::rule_base + rule`.
#[map]
pub static FW_RULES: Array<RuleInfo> = Array::with_max_entries(SLOTS * MAX_RULES, 0);
#[map]
pub static FW_RULE_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(SLOTS * MAX_RULES, 0);

/// Verdict, malformed-class and fragment counters (`rampart_common::fw::stat`).
#[map]
pub static FW_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(stat::COUNT, 0);
