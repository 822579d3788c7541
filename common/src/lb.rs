//! The L4 balancer's maps: names, sizes, key and value types, and the flow hash. One place, as
//! Katran's `balancer_maps.h`; `firewall-ebpf/src/lb/maps.rs` declares the maps with exactly these.
//!
//! # How a packet is balanced (see ARCHITECTURE.md)
//! A packet the firewall allows whose (destination, port, protocol) is a service ([`VipKey`] in
//! `LB_VIPS`) is sent to one of the service's backends:
//! 1. its flow is looked up in the LRU connection table of its family (one LRU list per CPU):
//!    `LB_CT4` with a 16-byte [`Flow4Key`] for IPv4, `LB_CT6` with a 40-byte [`FlowKey`] for
//!    IPv6 (an IPv4 flow padded to IPv6's size would hash and compare 40 bytes for 13);
//!    a hit whose backend is still live for the service (and, for UDP, was seen less than
//!    [`LbConfig::udp_timeout`] seconds ago) keeps the flow where it is;
//! 2. otherwise ("a miss", counted as a new flow) the backend is `LB_RING[ring_base +
//!    flow_hash(flow) % ring_size]`, the service's Maglev table, and the flow is recorded. An
//!    entry is made on every miss, whatever the TCP flags (Katran's choice): a flow whose entry
//!    was evicted is hashed again and lands on the same backend while the backend set is the same.
//!    A TCP SYN without ACK skips step 1 (as Katran's does): it opens a new connection, which
//!    goes where the table says now, not where an old connection on the same ports went.
//! 3. the packet is encapsulated (IPv4 in IPv4, IPv6 in IPv6) towards the backend and sent on
//!    to the backend's next hop ([`NextHop`], cached per backend and CPU, see below); the
//!    backend decapsulates it and answers the client directly (direct server return).
//!
//! # The next hop
//! `bpf_fib_lookup` (route, then neighbour) was the largest single cost of a forwarded packet,
//! and its answer depends on the backend, not on the flow. So each CPU keeps the answer per
//! backend in `LB_NEXTHOPS` and looks it up again when it is older than
//! [`NEXTHOP_TTL_SECS`] (by the coarse clock, a few milliseconds coarse), when it was made
//! for another backend address or ingress interface (an id reused), or was never made. A route,
//! MTU or neighbour (MAC) change therefore reaches the packets within about a second, with no help
//! from userspace (the CLI leaves no process behind to refresh anything); Katran's fixed gateway
//! MAC never changes at all. Only successful lookups are kept: an unresolved neighbour or a
//! missing route is looked up again on every packet, as before. The MTU check is made against
//! the route MTU the lookup returned. `stat::NEXTHOP_LOOKUPS` counts the lookups made.
//!
//! # Why the kernel and `loadbalancer/` agree
//! [`flow_hash`] (a multiply-xorshift hash with a fixed seed, [`Flow4Key::hash`] and
//! [`flow_hash6`]) is what both sides compute for a flow: the kernel for its packets,
//! `loadbalancer::Maglev::flow_position` for the same [`FlowKey`]. The table in `LB_RING` is
//! the one `loadbalancer::Maglev` built, so for any flow both sides pick the same backend. The
//! hash needs no resistance to an adversary: a client choosing its ports can at most choose its
//! own backend, which any client can do by trying connections; the connection table's LRU and
//! the Maglev table are not made worse by collisions. It is part of the format: two balancers
//! behind one ECMP router must run the same hash (the same rampart version).
//!
//! # Updates
//! A backend change writes only the ring positions that change (Maglev delta updates), each with
//! one map update: a packet reads one position, so it sees the old choice or the new one. A
//! service is written ring first, then its `LB_VIPS` entry; removed in the reverse order. A
//! backend is marked live before any position names it, and retired only after none does.

use crate::map_type;

/// Services (VIP:port/proto) one interface balances.
pub const MAX_SERVICES: u32 = 256;
/// Backends over all services; ids index `LB_BACKENDS` and `LB_BE_STATS`.
pub const MAX_BACKENDS: u32 = 4096;
/// Positions in `LB_RING`, shared by every service's Maglev table (each takes a contiguous run
/// of its `table_size`): room for 64 tables of the default 65,537.
pub const RING_ENTRIES: u32 = 64 * 65_537;
/// A ring position with no backend (the service has no backend with weight > 0): dropped.
pub const NO_BACKEND: u32 = u32::MAX;
/// Default entries of each connection table (IPv4 and IPv6, all CPUs together);
/// `conntrack_entries` sets it. LRU maps are preallocated: about 100 bytes an entry.
pub const DEFAULT_CONNTRACK_ENTRIES: u32 = 1 << 16;
/// Fewest entries `conntrack_entries` takes: the table is split into one LRU list per CPU, and
/// each list needs room for more than a handful of flows.
pub const MIN_CONNTRACK_ENTRIES: u32 = 1 << 10;
/// Most entries `conntrack_entries` takes: 2^26, about 6.4 GiB of preallocated kernel memory
/// per table.
pub const MAX_CONNTRACK_ENTRIES: u32 = 1 << 26;
/// A UDP flow not seen for this long is hashed again (its backend may have changed).
pub const DEFAULT_UDP_TIMEOUT_SECS: u32 = 30;

/// SipHash keys of `loadbalancer::Maglev::position` (the little-endian words of `"rampart "` and
/// `"mglv-key"`); the seed of [`flow_hash`] is made of the same two words.
pub const HASH_KEYS: (u64, u64) = (u64::from_le_bytes(*b"rampart "), u64::from_le_bytes(*b"mglv-key"));
/// How long (seconds of the coarse clock) a CPU uses a backend's cached [`NextHop`] before it
/// looks it up again.
pub const NEXTHOP_TTL_SECS: u32 = 1;

/// Map names, as in the object file and under the pin directory.
pub mod map_names {
    pub const CONFIG: &str = "LB_CONFIG";
    pub const VIPS: &str = "LB_VIPS";
    pub const BACKENDS: &str = "LB_BACKENDS";
    pub const RING: &str = "LB_RING";
    /// The IPv4 connection table; its size is the one `conntrack_entries` gives (and reads).
    pub const CONNTRACK: &str = "LB_CT4";
    /// The IPv6 connection table, of the same size.
    pub const CONNTRACK6: &str = "LB_CT6";
    pub const SERVICE_STATS: &str = "LB_SVC_STATS";
    pub const BACKEND_STATS: &str = "LB_BE_STATS";
    pub const STATS: &str = "LB_STATS";
    pub const PORTS: &str = "LB_PORTS";
    pub const NEXTHOPS: &str = "LB_NEXTHOPS";
    pub const ALL: [&str; 11] =
        [CONFIG, VIPS, BACKENDS, RING, CONNTRACK, CONNTRACK6, SERVICE_STATS, BACKEND_STATS, STATS, PORTS, NEXTHOPS];
    // The kernel keeps 15 bytes of a map's name (BPF_OBJ_NAME_LEN): longer names would not be
    // found by name in `bpftool map` or by tests.
    const _: () = {
        let mut i = 0;
        while i < ALL.len() {
            assert!(ALL[i].len() <= 15);
            i += 1;
        }
    };
}

/// Words of `LB_PORTS`: one bit per destination port, set when some service uses the port. The
/// pipeline tests it (an array read the verifier inlines) before the stage, so traffic to
/// other ports, and all traffic when there are no services, pays about nothing for the stage.
pub const PORT_WORDS: u32 = 65_536 / 64;

/// Address family values in keys: 4 or 6, as `Packet::family`.
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// `LB_VIPS` key: a service. Addresses as in the firewall's `Packet`: the address bytes in
/// memory order in two native words (IPv4 in the first 4 bytes, the rest zero); port in host
/// order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VipKey {
    pub addr: [u64; 2],
    pub port: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: u32,
}
map_type!(VipKey, 24);

/// `LB_VIPS` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipInfo {
    /// Index in `LB_SVC_STATS`; also what a backend's [`BackendInfo::service`] names.
    pub service: u32,
    /// The service's Maglev table: `LB_RING[ring_base .. ring_base + ring_size]`.
    pub ring_base: u32,
    /// A prime.
    pub ring_size: u32,
    pub _pad: u32,
}
map_type!(VipInfo, 16);

/// [`BackendInfo::flags`]: the backend may carry flows of [`BackendInfo::service`]. Cleared when
/// it is removed, so connection-table entries that still name it are hashed again.
pub const BACKEND_LIVE: u32 = 1;

/// `LB_BACKENDS[id]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendInfo {
    /// Address as in [`VipKey::addr`]; the family is the service's.
    pub addr: [u64; 2],
    pub service: u32,
    pub flags: u32,
}
map_type!(BackendInfo, 24);

/// `LB_CT6` key, and a flow of either family as userspace and the tests name it (the input of
/// [`flow_hash`]): a flow as the client sent it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: [u64; 2],
    pub dst: [u64; 2],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: u16,
}
map_type!(FlowKey, 40);

impl FlowKey {
    /// The fifth 8-byte word of the key as it lies in memory (ports, protocol, family, padding).
    #[inline(always)]
    pub fn tail_word(&self) -> u64 {
        (self.sport as u64)
            | (self.dport as u64) << 16
            | (self.proto as u64) << 32
            | (self.family as u64) << 40
            | (self._pad as u64) << 48
    }
}

/// `LB_CT4` key: an IPv4 flow as the client sent it. Addresses are the 4 bytes in memory
/// order read as a native word (as the first half of [`FlowKey::src`]); ports in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Flow4Key {
    pub src: u32,
    pub dst: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// Two fields, not `[u8; 3]`: zeroing a 3-byte array compiled to a call to a byte-loop
    /// `memset` on the packet path.
    pub _pad: u8,
    pub _pad2: u16,
}
map_type!(Flow4Key, 16);

impl Flow4Key {
    /// The IPv4 flow of a [`FlowKey`] whose family is [`FAMILY_V4`].
    pub fn from_flow(k: &FlowKey) -> Self {
        let w = |a: u64| {
            let b = a.to_ne_bytes();
            u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
        };
        Flow4Key {
            src: w(k.src[0]),
            dst: w(k.dst[0]),
            sport: k.sport,
            dport: k.dport,
            proto: k.proto,
            _pad: 0,
            _pad2: 0,
        }
    }

    /// [`flow_hash`] of this flow: two words (the addresses; ports, protocol and family as in
    /// [`FlowKey::tail_word`]).
    #[inline(always)]
    pub fn hash(&self) -> u64 {
        let tail =
            (self.sport as u64) | (self.dport as u64) << 16 | (self.proto as u64) << 32 | (FAMILY_V4 as u64) << 40;
        fmix(absorb(absorb(FLOW_HASH_SEED, self.src as u64 | (self.dst as u64) << 32), tail))
    }
}

/// `LB_CT4` and `LB_CT6` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    pub backend: u32,
    /// When the flow was last seen, in seconds of `bpf_ktime_get_coarse_ns` (UDP only).
    pub seen: u32,
}
map_type!(FlowValue, 8);

/// `LB_NEXTHOPS[backend id]`, one per CPU: where that CPU last found the backend's next hop
/// (see "The next hop" above). All zero: never looked up.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHop {
    /// The backend address it was looked up for (as [`BackendInfo::addr`]).
    pub addr: [u64; 2],
    /// `bpf_ktime_get_coarse_ns` after which it is looked up again (0: never looked up).
    pub expires: u64,
    /// Destination (the next hop's) and source MACs of the outer frame.
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    /// The interface to send on, and the one the looked-up packet came in on.
    pub ifindex: u32,
    pub ingress: u32,
    /// The route's MTU.
    pub mtu: u32,
}
map_type!(NextHop, 48);

/// `LB_CONFIG[0]`: settings of the whole stage.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbConfig {
    /// Outer IPv4 source: its first two bytes (wire order) are kept, the last two come from the
    /// flow hash, so a backend's receive-side scaling spreads flows (Katran uses 172.16.0.0/16).
    pub src4: [u8; 4],
    pub udp_timeout: u32,
    /// Outer IPv6 source: the first 12 bytes are kept, the last 4 come from the flow hash.
    pub src6: [u8; 16],
}
map_type!(LbConfig, 24);

/// Per-CPU counters of a service (`LB_SVC_STATS`) or backend (`LB_BE_STATS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbCounter {
    pub packets: u64,
    pub bytes: u64,
    /// Connection-table misses: flows placed by the Maglev table.
    pub new_flows: u64,
    pub _pad: u64,
}
map_type!(LbCounter, 32);

/// Indexes of `LB_STATS` (per-CPU [`crate::Counter`]s): what happened to packets addressed to a
/// service, besides being forwarded.
pub mod stat {
    /// Encapsulated and sent on (XDP_TX or redirect).
    pub const FORWARDED: u32 = 0;
    /// The service has no backend with weight > 0: dropped.
    pub const NO_BACKEND: u32 = 1;
    /// Too big once encapsulated: an ICMP Fragmentation Needed / Packet Too Big went back.
    pub const ICMP_TOO_BIG: u32 = 2;
    /// No neighbour entry for the next hop yet: passed up encapsulated, so the kernel forwards it
    /// and resolves the neighbour (needs IP forwarding on the balancer).
    pub const FIB_NO_NEIGH: u32 = 3;
    /// No route to the backend, or another lookup failure: dropped.
    pub const FIB_FAILED: u32 = 4;
    /// The packet could not be grown or shrunk (driver headroom): dropped.
    pub const ADJUST_FAILED: u32 = 5;
    /// Addressed to a service but carried VLAN tags, IP options too long to quote, or was a
    /// fragment: not balanced, passed on.
    pub const NOT_BALANCED: u32 = 6;
    /// Next-hop lookups (`bpf_fib_lookup`): a backend's cached next hop was missing, expired or
    /// made for another address (not a packet event: forwarded packets mostly make none).
    pub const NEXTHOP_LOOKUPS: u32 = 7;
    pub const COUNT: u32 = 8;
    /// Names shown by `rampart lb list` and in metrics, by index.
    pub const NAMES: [&str; 8] = [
        "forwarded",
        "no_backend",
        "icmp_too_big",
        "fib_no_neigh",
        "fib_failed",
        "adjust_failed",
        "not_balanced",
        "nexthop_lookups",
    ];
}

/// Name of the decapsulation program in its object file.
pub const DECAP_PROGRAM_NAME: &str = "rampart_decap";
/// The decapsulation program's VIP set: addresses it strips the outer header for.
pub const DECAP_VIPS: &str = "DECAP_VIPS";
/// The decapsulation program's counters ([`decap_stat`]).
pub const DECAP_STATS: &str = "DECAP_STATS";
/// Most VIPs one backend decapsulates for.
pub const MAX_DECAP_VIPS: u32 = 1024;

/// `DECAP_VIPS` key: a VIP address (family and address as in [`VipKey`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DecapKey {
    pub addr: [u64; 2],
    pub family: u8,
    pub _pad: [u8; 7],
}
map_type!(DecapKey, 24);

impl DecapKey {
    /// The key of `ip`: its bytes in memory order in the two words, as [`VipKey::addr`].
    pub fn new(ip: core::net::IpAddr) -> Self {
        let (addr, family) = match ip {
            core::net::IpAddr::V4(a) => {
                let o = a.octets();
                ([u64::from_ne_bytes([o[0], o[1], o[2], o[3], 0, 0, 0, 0]), 0], FAMILY_V4)
            }
            core::net::IpAddr::V6(a) => {
                let o = a.octets();
                let (hi, lo) = o.split_at(8);
                let word = |b: &[u8]| u64::from_ne_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
                ([word(hi), word(lo)], FAMILY_V6)
            }
        };
        DecapKey { addr, family, _pad: [0; 7] }
    }
}

/// Indexes of `DECAP_STATS` (per-CPU [`crate::Counter`]s; bytes are whole frames as received).
/// Frames that are not IP-in-IP (including those too short to hold an outer IP header) pass
/// untouched and are not counted.
pub mod decap_stat {
    /// Outer header removed, inner packet passed to the stack.
    pub const DECAPSULATED: u32 = 0;
    /// IP-in-IP whose inner destination is not one of the VIPs: passed untouched.
    pub const NOT_OURS: u32 = 1;
    /// IP-in-IP with a bad outer header (version, IHL, a total / payload length shorter than
    /// the headers or longer than the frame) or an inner header cut short or of the wrong
    /// version: passed untouched.
    pub const MALFORMED: u32 = 2;
    /// An outer IPv4 fragment (MF or an offset): it cannot be decapsulated alone; passed
    /// untouched. The balancer never fragments (it answers "too big" instead).
    pub const FRAGMENT: u32 = 3;
    /// `bpf_xdp_adjust_head` refused to strip the outer header: dropped (XDP_ABORTED).
    pub const ADJUST_FAILED: u32 = 4;
    pub const COUNT: u32 = 8;
    /// Names shown by `rampart decap status`, by index.
    pub const NAMES: [&str; 5] = ["decapsulated", "not_ours", "malformed", "fragment", "adjust_failed"];
}

/// The seed of [`flow_hash`]: the two words of [`HASH_KEYS`] together.
const FLOW_HASH_SEED: u64 = HASH_KEYS.0 ^ HASH_KEYS.1.rotate_left(32);

/// One word into the state: a multiply by an odd constant and an xor-shift, each a bijection,
/// so two flows that differ in one word differ after it.
#[inline(always)]
fn absorb(h: u64, w: u64) -> u64 {
    let h = (h ^ w).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h ^ (h >> 32)
}

/// MurmurHash3's 64-bit finaliser: every input bit reaches every output bit, so `% table_size`
/// and the low words (the outer source) are evenly spread.
#[inline(always)]
fn fmix(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// [`flow_hash`] of an IPv6 flow: five words (as the [`FlowKey`] lies in memory).
#[inline(always)]
pub fn flow_hash6(src: &[u64; 2], dst: &[u64; 2], tail: u64) -> u64 {
    let mut h = absorb(FLOW_HASH_SEED, src[0]);
    h = absorb(h, src[1]);
    h = absorb(h, dst[0]);
    h = absorb(h, dst[1]);
    fmix(absorb(h, tail))
}

/// The flow hash: the flow's place in a Maglev table is `flow_hash(key) % table_size`, and its
/// low 32 bits vary the outer source address. About 10 instructions for an IPv4 flow (two words)
/// and 20 for IPv6 (five), where SipHash-1-3 over 40 bytes took about 150.
#[inline(always)]
pub fn flow_hash(key: &FlowKey) -> u64 {
    if key.family == FAMILY_V4 {
        Flow4Key::from_flow(key).hash()
    } else {
        flow_hash6(&key.src, &key.dst, key.tail_word())
    }
}
