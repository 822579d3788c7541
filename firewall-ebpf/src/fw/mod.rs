//! The firewall stage (`classify`): the five per-field lookups, then the first rule in the AND of their bit
//! vectors (see `rampart_common::fw` for the scheme, and `userspace/src/fw/compile.rs` for how the
//! tables are built).

use aya_ebpf::maps::lpm_trie::Key;
use rampart_common::fw::{
    ADDR_HASH_LENS, ADDR_MODE_HASH, Addr4Key, Addr6Key, AddrDesc, ClassInfo, FIELD_DST, FIELD_SRC, KEYED_MAX,
    LPM_SLOT_BITS, NO_PORT, PORT_ENTRIES, PROTO_ANY, PROTO_ENTRIES, SLOT_KEYED, SLOT_USES_DST, SLOT_USES_SRC,
    SUMMARY_WORDS, SlotInfo, addr_desc_index,
};

use self::maps::{
        FW_ACTIVE, FW_ADDR_DESC, FW_ADDR4, FW_ADDR6, FW_CLASSES, FW_DPORT, FW_DST4, FW_DST6, FW_PROTO, FW_SLOTS,
        FW_SPORT, FW_SRC4, FW_SRC6, FW_WORDS,
};
use crate::parse::Packet;

pub mod maps;

/// The decision for one IP packet.
pub struct Verdict {
    /// XDP action.
    pub action: u32,
    /// Absolute index in `FW_RULES`/`FW_RULE_STATS` of the matching rule, if one matched.
    pub rule: Option<u32>,
}

/// Set bits in a word (SWAR: the BPF target has no popcount instruction).
#[inline(always)]
fn popcount(mut x: u64) -> u32 {
    x -= (x >> 1) & 0x5555_5555_5555_5555;
    x = (x & 0x3333_3333_3333_3333) + ((x >> 2) & 0x3333_3333_3333_3333);
    x = (x + (x >> 4)) & 0x0f0f_0f0f_0f0f_0f0f;
    (x.wrapping_mul(0x0101_0101_0101_0101) >> 56) as u32
}

/// Index of the lowest set bit of a non-zero word. Branch-free on purpose: every branch inside
/// the candidate loop multiplies the paths the verifier walks.
#[inline(always)]
fn lowest_bit(x: u64) -> u32 {
    popcount((x & x.wrapping_neg()).wrapping_sub(1))
}

#[inline(always)]
fn word(index: u32) -> Option<u64> {
    FW_WORDS.get(index).copied()
}

/// Word `64·s + b` of class `c`'s sparse vector; the caller knows `c.summary[s]` has bit `b`.
/// `None` (tables inconsistent) ends classification at once rather than adding a path.
#[inline(always)]
fn class_word(c: &ClassInfo, s: usize, b: u32) -> Option<u64> {
    let below = c.summary[s] & ((1u64 << b) - 1);
    word(c.words_base + c.rank[s] as u32 + popcount(below))
}

#[inline(always)]
fn class(id: u32) -> Option<&'static ClassInfo> {
    FW_CLASSES.get(id)
}

/// The class of an address (`addr` as in [`Packet::src`]) in the active slot: by exact-match
/// probes at the descriptor's few prefix lengths, longest first (a cost flat in the number of
/// prefixes), or in the LPM trie when the rules use more lengths (see `AddrDesc`).
#[inline(always)]
fn addr_class(pkt: &Packet, slot: u32, src: bool) -> Option<u32> {
    let addr = if src { &pkt.src } else { &pkt.dst };
    let field = if src { FIELD_SRC } else { FIELD_DST };
    let v4 = pkt.family == 4;
    let desc: &AddrDesc = FW_ADDR_DESC.get(addr_desc_index(slot, field, !v4))?;
    if desc.mode == ADDR_MODE_HASH {
        for i in 0..ADDR_HASH_LENS {
            if i as u32 >= desc.count {
                break;
            }
            let m = &desc.masks[i];
            let a0 = (addr[0] & m[0]).to_ne_bytes();
            let hit = if v4 {
                let key = Addr4Key {
                    slot: slot as u8,
                    field,
                    len: desc.lens[i],
                    _pad: 0,
                    addr: [a0[0], a0[1], a0[2], a0[3]],
                };
                // SAFETY: the value is copied out at once; userspace never deletes a live slot's
                // entries.
                unsafe { FW_ADDR4.get(&key) }.copied()
            } else {
                let a1 = (addr[1] & m[1]).to_ne_bytes();
                let mut a = [0u8; 16];
                a[..8].copy_from_slice(&a0);
                a[8..].copy_from_slice(&a1);
                let key = Addr6Key { slot: slot as u8, field, len: desc.lens[i], _pad: 0, addr: a };
                // SAFETY: as above.
                unsafe { FW_ADDR6.get(&key) }.copied()
            };
            if hit.is_some() {
                return hit;
            }
        }
        return Some(desc.zero_class);
    }
    let slot_be = slot.to_be_bytes();
    let a0 = addr[0].to_ne_bytes();
    if v4 {
        let mut data = [0u8; 8];
        data[..4].copy_from_slice(&slot_be);
        data[4..].copy_from_slice(&a0[..4]);
        let key = Key::new(LPM_SLOT_BITS + 32, data);
        let map = if src { &FW_SRC4 } else { &FW_DST4 };
        map.get(&key).copied()
    } else {
        let mut data = [0u8; 20];
        data[..4].copy_from_slice(&slot_be);
        data[4..12].copy_from_slice(&a0);
        data[12..].copy_from_slice(&addr[1].to_ne_bytes());
        let key = Key::new(LPM_SLOT_BITS + 128, data);
        let map = if src { &FW_SRC6 } else { &FW_DST6 };
        map.get(&key).copied()
    }
}

/// A [`SLOT_KEYED`] slot: one address lookup, then the few rules its class lists, in order; the
/// first whose protocol and ports hold wins. Two array reads besides the address lookup, where
/// the general path makes five lookups and ANDs five vectors.
#[inline(always)]
fn keyed(pkt: &Packet, slot: u32, info: &SlotInfo, sp: u32, dp: u32) -> Option<Verdict> {
    let c = class(addr_class(pkt, slot, info.flags & SLOT_USES_SRC != 0)?)?;
    let proto = pkt.proto as u32;
    for i in 0..KEYED_MAX {
        if i as u32 >= c.cand_count {
            break;
        }
        let rule = info.rule_base + c.cands[i] as u32;
        let r = maps::FW_RULES.get(rule)?;
        // KEYED_PORT_RANGES = 2 ranges per port, written out (a rule with one repeats it).
        let sport = (sp >= r.sport[0][0] && sp <= r.sport[0][1]) || (sp >= r.sport[1][0] && sp <= r.sport[1][1]);
        let dport = (dp >= r.dport[0][0] && dp <= r.dport[0][1]) || (dp >= r.dport[1][0] && dp <= r.dport[1][1]);
        if (r.proto == PROTO_ANY || r.proto == proto) && sport && dport {
            return Some(Verdict { action: r.action, rule: Some(rule) });
        }
    }
    Some(Verdict { action: info.default_action, rule: None })
}

/// Classifies an IP packet against the active rule set. `None` only if the tables are
/// inconsistent (a map lookup that userspace guarantees cannot fail did): the caller aborts.
///
/// Verifier cost: the candidate loop is most of the program's (4 × 64 iterations of about 230
/// instructions, ~60,000 of the ~78,000). It stays inline: as a BPF global function the verifier
/// would check it once on its own, but the call costs packets 3-10 ns here (return thunks). The
/// verifier walks it once only while every parser path reaches the loop in a state it can prune
/// against one already checked; the IPv6 extension-header walk, inlined, broke that (~360,000,
/// see parse.rs). After changing the parser or this function, check `verifier_budget`: a jump
/// means the loop is walked once per parser path again.
#[inline(always)]
pub fn classify(pkt: &Packet) -> Option<Verdict> {
    let slot = FW_ACTIVE.get(0)?.slot;
    let info: &SlotInfo = FW_SLOTS.get(slot)?;
    let (sp, dp) = if pkt.has_ports { (pkt.sport as u32, pkt.dport as u32) } else { (NO_PORT, NO_PORT) };
    if info.flags & SLOT_KEYED != 0 {
        return keyed(pkt, slot, info, sp, dp);
    }
    let src = if info.flags & SLOT_USES_SRC != 0 { addr_class(pkt, slot, true)? } else { info.all_class };
    let dst = if info.flags & SLOT_USES_DST != 0 { addr_class(pkt, slot, false)? } else { info.all_class };
    let proto = *FW_PROTO.get(slot * PROTO_ENTRIES + pkt.proto as u32)?;
    let sport = *FW_SPORT.get(slot * PORT_ENTRIES + sp)?;
    let dport = *FW_DPORT.get(slot * PORT_ENTRIES + dp)?;

    let (c1, c2, c3, c4, c5) = (class(src)?, class(dst)?, class(proto)?, class(sport)?, class(dport)?);
    for s in 0..SUMMARY_WORDS {
        if s as u32 >= info.summary_words {
            break;
        }
        let mut candidates = c1.summary[s] & c2.summary[s] & c3.summary[s] & c4.summary[s] & c5.summary[s];
        // At most 64 candidate words per summary word; the explicit bound is for the verifier.
        for _ in 0..64 {
            if candidates == 0 {
                break;
            }
            let b = lowest_bit(candidates);
            candidates &= candidates - 1;
            let w = s as u32 * 64 + b;
            let hits = class_word(c1, s, b)?
                & class_word(c2, s, b)?
                & class_word(c3, s, b)?
                & class_word(c4, s, b)?
                & class_word(c5, s, b)?;
            if hits != 0 {
                let rule = info.rule_base + w * 64 + lowest_bit(hits);
                let action = maps::FW_RULES.get(rule)?.action;
                return Some(Verdict { action, rule: Some(rule) });
            }
        }
    }
    Some(Verdict { action: info.default_action, rule: None })
}
