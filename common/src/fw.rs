//! The firewall's maps: names, sizes, key and value types. One place, as Katran's
//! `balancer_maps.h`; `firewall-ebpf/src/maps.rs` declares the maps with exactly these.
//!
//! # How a packet is classified (see ARCHITECTURE.md)
//! Rules are numbered 0..n in order. For each packet field (src, dst, proto, sport, dport) a
//! lookup yields a *class*: a set of values that every rule treats alike. Each class carries a
//! bit vector with bit `r` set when rule `r`'s condition on that field holds for the class. The
//! matching rule is the lowest bit set in the AND of the five vectors. A per-class *summary*
//! (bit `w` set when word `w` of the vector is non-zero) lets the program skip empty words, so
//! the cost follows the number of candidate words, not the number of rules
//! (bpf-iptables' linear bit-vector search, with one more level).
//!
//! # Atomic updates
//! Every table has two *slots*. Userspace fills the inactive slot, then flips [`FW_ACTIVE`] with
//! one map update; a packet reads the active slot once and sees only one rule set.
//!
//! # Byte order
//! LPM keys hold addresses exactly as on the wire (network order), behind the slot number as a
//! big-endian `u32`; the prefix length counts the 32 slot bits too.

use crate::map_type;

/// Slots per table (live + the one being built).
pub const SLOTS: u32 = 2;
/// Largest rule set one slot holds.
pub const MAX_RULES: u32 = 16_384;
/// `u64` words in a full rule bit vector.
pub const RULE_WORDS: u32 = MAX_RULES / 64;
/// `u64` words in a class summary (one bit per rule word).
pub const SUMMARY_WORDS: usize = (RULE_WORDS / 64) as usize;
/// Classes per slot (all five fields together).
pub const MAX_CLASSES: u32 = 32_768;
/// Entries per slot in the port tables: ports 0..=65535, then [`NO_PORT`].
pub const PORT_ENTRIES: u32 = 65_537;
/// The port-table index used by packets that carry no ports (not TCP/UDP, later fragments).
pub const NO_PORT: u32 = 65_536;
/// Entries per slot in the protocol table.
pub const PROTO_ENTRIES: u32 = 256;
/// Default capacity of the rule-word array (both slots); userspace gives each slot half.
pub const DEFAULT_WORDS: u32 = 1 << 22;
/// Capacity of each LPM trie (both slots); big enough for a 1,000,000-prefix set in each.
pub const LPM_MAX_ENTRIES: u32 = 4 << 20;
/// Bits of slot number in front of every LPM key.
pub const LPM_SLOT_BITS: u32 = 32;
/// Most distinct prefix lengths (besides /0) an address table may use to be stored as exact-match
/// hash entries probed longest first ([`AddrDesc`]); with more it stays an LPM trie.
pub const ADDR_HASH_LENS: usize = 4;
/// Capacity of each address hash map (`FW_ADDR4`, `FW_ADDR6`; both slots, src and dst). A
/// (slot, family) whose src and dst entries together exceed half of it uses the LPM tries.
/// Allocated on demand (`BPF_F_NO_PREALLOC`), but the kernel sizes the bucket array up front.
pub const ADDR_HASH_MAX_ENTRIES: u32 = 1 << 20;
/// Entries of `FW_ADDR_DESC`: per slot, src v4, src v6, dst v4, dst v6 ([`addr_desc_index`]).
pub const ADDR_DESCS: u32 = SLOTS * 4;
/// [`AddrDesc::mode`]: look the address up in the LPM trie (`FW_SRC4`…).
pub const ADDR_MODE_LPM: u32 = 0;
/// [`AddrDesc::mode`]: probe `FW_ADDR4`/`FW_ADDR6` at each length of the descriptor.
pub const ADDR_MODE_HASH: u32 = 1;
/// [`Addr4Key::field`] / [`Addr6Key::field`] and [`addr_desc_index`]: the source address.
pub const FIELD_SRC: u8 = 0;
/// The destination address.
pub const FIELD_DST: u8 = 1;

/// Map names, as in the object file and under the pin directory.
pub mod map_names {
    pub const ACTIVE: &str = "FW_ACTIVE";
    pub const SLOTS: &str = "FW_SLOTS";
    pub const SRC4: &str = "FW_SRC4";
    pub const DST4: &str = "FW_DST4";
    pub const SRC6: &str = "FW_SRC6";
    pub const DST6: &str = "FW_DST6";
    pub const PROTO: &str = "FW_PROTO";
    pub const SPORT: &str = "FW_SPORT";
    pub const DPORT: &str = "FW_DPORT";
    pub const CLASSES: &str = "FW_CLASSES";
    pub const WORDS: &str = "FW_WORDS";
    pub const RULES: &str = "FW_RULES";
    pub const RULE_STATS: &str = "FW_RULE_STATS";
    pub const STATS: &str = "FW_STATS";
    pub const ADDR_DESC: &str = "FW_ADDR_DESC";
    pub const ADDR4: &str = "FW_ADDR4";
    pub const ADDR6: &str = "FW_ADDR6";
    /// Every map of the firewall program, for pinning and unpinning.
    pub const ALL: [&str; 17] = [
        ACTIVE, SLOTS, SRC4, DST4, SRC6, DST6, PROTO, SPORT, DPORT, CLASSES, WORDS, RULES,
        RULE_STATS, STATS, ADDR_DESC, ADDR4, ADDR6,
    ];
}

/// Name of the XDP program in the object file.
pub const PROGRAM_NAME: &str = "rampart_fw";

/// `FW_ACTIVE[0]`: which slot packets use.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Active {
    pub slot: u32,
    pub _pad: u32,
}
map_type!(Active, 8);

/// [`SlotInfo::flags`]: some rule constrains the source address (else the lookup is skipped).
pub const SLOT_USES_SRC: u32 = 1 << 0;
/// [`SlotInfo::flags`]: some rule constrains the destination address.
pub const SLOT_USES_DST: u32 = 1 << 1;
/// [`SlotInfo::flags`]: the rule set's shape lets one address lookup decide (see
/// [`ClassInfo::cands`]): exactly one address field is used (the key: src when
/// [`SLOT_USES_SRC`], else dst), every rule has at most [`KEYED_PORT_RANGES`] ranges per port,
/// and every class of
/// the key field holds at most [`KEYED_MAX`] rules. The program then checks those few rules'
/// protocol and ports ([`RuleInfo`]) in order and skips the other lookups and the bit vectors.
pub const SLOT_KEYED: u32 = 1 << 2;
/// Most ranges per port a rule of a [`SLOT_KEYED`] slot has (`dport = [80, 443]` is two).
pub const KEYED_PORT_RANGES: usize = 2;
/// Most rules a class lists in [`ClassInfo::cands`].
pub const KEYED_MAX: usize = 8;
/// [`RuleInfo::proto`] of a rule that tests no protocol.
pub const PROTO_ANY: u32 = 256;

/// `FW_SLOTS[slot]`: what the program needs to know about one rule set.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotInfo {
    /// XDP action for IP packets no rule matches.
    pub default_action: u32,
    /// Number of rules in this slot.
    pub rule_count: u32,
    /// Summary words in use: `ceil(ceil(rule_count / 64) / 64)`, at most [`SUMMARY_WORDS`].
    pub summary_words: u32,
    /// `SLOT_USES_*` bits.
    pub flags: u32,
    /// Absolute class id whose vector holds every rule: used for a field no rule constrains.
    pub all_class: u32,
    /// Absolute rule index of this slot's rule 0 in `FW_RULES`/`FW_RULE_STATS`.
    pub rule_base: u32,
}
map_type!(SlotInfo, 24);

/// `FW_CLASSES[class]` (absolute class id): where the class's bit vector lives.
///
/// Vectors are stored sparsely: only the non-zero words, in word order, from `words_base`. Word
/// `w = 64·s + b` of the vector (when `summary[s]` has bit `b`) is at
/// `words_base + rank[s] + popcount(summary[s] & ((1 << b) - 1))`. Memory then follows the
/// rules a class really holds, not classes × rules (10,000 distinct /24s would otherwise need
/// 10,000 × 157 words).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClassInfo {
    /// Bit `w` set when word `w` of the vector is non-zero.
    pub summary: [u64; SUMMARY_WORDS],
    /// `rank[s]`: non-zero words in summary words `0..s` (prefix popcounts).
    pub rank: [u16; SUMMARY_WORDS],
    /// Index in `FW_WORDS` of the class's first stored (non-zero) word.
    pub words_base: u32,
    /// Rules in the vector when at most [`KEYED_MAX`], else `KEYED_MAX + 1`.
    pub cand_count: u32,
    /// The vector's rules (slot-relative, ascending) when `cand_count ≤ KEYED_MAX`: what a
    /// [`SLOT_KEYED`] slot's program checks instead of ANDing vectors.
    pub cands: [u16; KEYED_MAX],
}
map_type!(ClassInfo, 10 * SUMMARY_WORDS + 8 + 2 * KEYED_MAX);

/// `FW_RULES[rule_base + r]`: the action of rule `r`, and (read only in a [`SLOT_KEYED`] slot)
/// its protocol and port conditions.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleInfo {
    /// XDP action (`xdp_action::PASS` for allow, `DROP` for deny).
    pub action: u32,
    /// Protocol number, or [`PROTO_ANY`].
    pub proto: u32,
    /// Inclusive port-table index ranges ([`NO_PORT`] is 65,536), `[lo, hi]` each: `[0, NO_PORT]`
    /// when the rule tests no source port, so packets without ports match only then. A rule with
    /// one range repeats it.
    pub sport: [[u32; 2]; KEYED_PORT_RANGES],
    pub dport: [[u32; 2]; KEYED_PORT_RANGES],
}
map_type!(RuleInfo, 8 + 16 * KEYED_PORT_RANGES);

/// Index in `FW_ADDR_DESC` of the descriptor of (slot, [`FIELD_SRC`]/[`FIELD_DST`], family).
#[inline(always)]
pub fn addr_desc_index(slot: u32, field: u8, v6: bool) -> u32 {
    slot * 4 + field as u32 * 2 + v6 as u32
}

/// `FW_ADDR_DESC[addr_desc_index(..)]`: how one (slot, field, family) maps addresses to classes.
///
/// In [`ADDR_MODE_HASH`] the table's prefixes (but /0) are exact-match entries of
/// `FW_ADDR4`/`FW_ADDR6` keyed by their length; the program probes `lens[..count]` (longest
/// first, the address ANDed with `masks[i]`) and takes the first hit, else `zero_class`. The
/// first hit is the longest match, and each entry's class already holds the rules of its covering
/// prefixes, so this equals the LPM lookup, at a cost that does not grow with the prefixes
/// (tuple-space search, as OVS and Cilium do). Used only when the field is used
/// ([`SLOT_USES_SRC`]…).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AddrDesc {
    /// [`ADDR_MODE_LPM`] or [`ADDR_MODE_HASH`].
    pub mode: u32,
    /// Lengths in use in `lens`/`masks` (at most [`ADDR_HASH_LENS`]).
    pub count: u32,
    /// Absolute class of the /0 entry: addresses no longer prefix holds.
    pub zero_class: u32,
    /// Prefix lengths, longest first.
    pub lens: [u8; ADDR_HASH_LENS],
    /// `masks[i]`: `lens[i]` leading one bits in wire byte order, as two native-endian words
    /// (`u64::from_ne_bytes` of bytes 0..8 and 8..16; IPv4 uses the first 4 bytes), so the
    /// program masks an address with two word ANDs.
    pub masks: [[u64; 2]; ADDR_HASH_LENS],
}
map_type!(AddrDesc, 16 + 16 * ADDR_HASH_LENS);

/// `FW_ADDR4` key: the prefix's slot, field, length, and address (host bits clear, wire order).
/// Aligned so the program builds it with word stores, not byte by byte.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Addr4Key {
    pub slot: u8,
    pub field: u8,
    pub len: u8,
    pub _pad: u8,
    pub addr: [u8; 4],
}
map_type!(Addr4Key, 8);

/// `FW_ADDR6` key, as [`Addr4Key`].
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Addr6Key {
    pub slot: u8,
    pub field: u8,
    pub len: u8,
    pub _pad: u8,
    pub addr: [u8; 16],
}
map_type!(Addr6Key, 20);

/// LPM key data for IPv4: slot (big-endian) then the address as on the wire.
pub type Lpm4Data = [u8; 8];
/// LPM key data for IPv6: slot (big-endian) then the address as on the wire.
pub type Lpm6Data = [u8; 20];

/// Indexes of `FW_STATS` (per-CPU [`crate::Counter`]s). Indexes 0..=[`stat::LAST_VERDICT`]
/// are verdicts: every packet is counted in exactly one of them.
pub mod stat {
    /// IP packet passed by an `allow` rule.
    pub const RULE_ALLOW: u32 = 0;
    /// IP packet dropped by a `deny` rule.
    pub const RULE_DENY: u32 = 1;
    /// IP packet no rule matched, passed by `default = "allow"`.
    pub const DEFAULT_ALLOW: u32 = 2;
    /// IP packet no rule matched, dropped by `default = "deny"`.
    pub const DEFAULT_DENY: u32 = 3;
    /// Not IPv4/IPv6 (ARP, LLDP…): passed.
    pub const NON_IP: u32 = 4;
    /// Malformed (all dropped): frame shorter than an Ethernet header.
    pub const MALFORMED_ETH: u32 = 5;
    /// Malformed: a VLAN tag cut short, or more than two tags.
    pub const MALFORMED_VLAN: u32 = 6;
    /// Malformed: IPv4 header cut short, version not 4, IHL < 5, or total length < header.
    pub const MALFORMED_IPV4: u32 = 7;
    /// Malformed: IPv6 header cut short or version not 6.
    pub const MALFORMED_IPV6: u32 = 8;
    /// Malformed: an IPv6 extension header cut short, or more than eight of them.
    pub const MALFORMED_IPV6_EXT: u32 = 9;
    /// Malformed: TCP (20 bytes, data offset ≥ 5), UDP (8) or ICMP/ICMPv6 (4) header cut short
    /// in an unfragmented packet or a first fragment.
    pub const MALFORMED_L4: u32 = 10;
    pub const LAST_VERDICT: u32 = MALFORMED_L4;
    /// Not a verdict: non-first fragments seen (they carry no ports).
    pub const FRAGMENT_LATER: u32 = 11;
    /// Not a verdict: first fragments seen.
    pub const FRAGMENT_FIRST: u32 = 12;
    pub const COUNT: u32 = 16;

    /// Names shown by `rampart status` and exported as metric labels, by index.
    pub const NAMES: [&str; 13] = [
        "rule_allow",
        "rule_deny",
        "default_allow",
        "default_deny",
        "non_ip",
        "malformed_eth",
        "malformed_vlan",
        "malformed_ipv4",
        "malformed_ipv6",
        "malformed_ipv6_ext",
        "malformed_l4",
        "fragment_later",
        "fragment_first",
    ];
}

/// Parsing bounds, shared by the kernel parser and the reference classifier.
pub mod parse {
    /// 802.1Q / 802.1ad tags accepted in front of the IP header.
    pub const MAX_VLAN_TAGS: usize = 2;
    /// IPv6 extension headers walked before the packet counts as malformed.
    pub const MAX_IPV6_EXT: usize = 8;
}
