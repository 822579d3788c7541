//! The balancer stage (`balance`): a packet the firewall allowed, addressed to a service, goes to
//! one of the service's backends, encapsulated (IPv4 in IPv4, IPv6 in IPv6) for direct server
//! return. The scheme, and why the kernel picks what `loadbalancer::Maglev` computes, are in
//! `rampart_common::lb`.

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibParams, xdp_action, xdp_md},
    helpers::{
        bpf_csum_diff, bpf_fib_lookup, bpf_ktime_get_coarse_ns, bpf_redirect, bpf_xdp_adjust_head, bpf_xdp_adjust_tail,
    },
    maps::LruHashMap,
    programs::XdpContext,
};
use rampart_common::{
    lb::{
        BACKEND_LIVE, BackendInfo, FAMILY_V4, FAMILY_V6, Flow4Key, FlowKey, FlowValue, LbConfig, NEXTHOP_TTL_SECS,
        NO_BACKEND, NextHop, VipKey, flow_hash6, stat,
    },
    net::{
        DEFAULT_TTL, ETH_HLEN, ETH_P_IP, ETH_P_IPV6, ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, ICMP_HLEN, ICMPV6_PKT_TOOBIG,
        IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_IPIP, IPPROTO_IPV6, IPPROTO_TCP, IPPROTO_UDP, IPV4_HLEN, IPV6_HLEN,
        TCP_ACK, TCP_FLAGS_OFFSET, TCP_SYN,
    },
};

use self::maps::{
    LB_BACKENDS, LB_BE_STATS, LB_CONFIG, LB_CT4, LB_CT6, LB_NEXTHOPS, LB_PORTS, LB_RING, LB_STATS, LB_SVC_STATS,
    LB_VIPS,
};
use crate::{
    count,
    parse::{Frag, Packet},
};

pub mod maps;

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// Bytes of the offending packet an ICMP Fragmentation Needed quotes: the longest IPv4 header
/// and 8 bytes of payload (RFC 792), so the client can match it to its socket.
const ICMP4_QUOTE: usize = 68;
/// Bytes an ICMPv6 Packet Too Big quotes (Katran quotes the same 200; RFC 4443 allows up to
/// the 1280-byte minimum MTU).
const ICMP6_QUOTE: usize = 200;

/// What the stage decided for a packet addressed to a service (`None`: not a service, the
/// firewall's verdict stands).
///
/// The work is done in BPF *global* functions, [`rampart_lb_choose`] (which backend),
/// `rampart_lb_encap4/6` (rewrite and send) and the ICMP answers: the verifier checks each once on its own instead of
/// once per state the classifier leaves behind (inlined, the stage took the program from 77,000
/// to 278,000 verified instructions), and each has its own 512-byte stack beside the
/// classifier's. What they need of the packet goes in one scalar; they read the addresses and
/// ports again at the offsets the parser found.
#[inline(always)]
pub fn balance(ctx: &XdpContext, pkt: &Packet) -> Option<u32> {
    if !pkt.has_ports {
        return None;
    }
    // No service on this port (or none at all): the stage costs one inlined array read.
    let word = *LB_PORTS.get(pkt.dport as u32 >> 6)?;
    if word & (1u64 << (pkt.dport & 63)) == 0 {
        return None;
    }
    let meta = (pkt.l3_off as u64 & meta::L3_MASK)
        | (pkt.l4_off as u64 & meta::L4_MASK) << meta::L4_SHIFT
        | (pkt.proto as u64) << meta::PROTO_SHIFT
        | if pkt.family == 6 { meta::V6 } else { 0 }
        | if pkt.frag != Frag::None { meta::FRAGMENT } else { 0 };
    let r = rampart_lb(ctx.ctx, meta);
    if r == choice::NOT_A_SERVICE { None } else { Some(r as u32) }
}

/// The stage: choose, then encapsulate (or answer "too big"). One global function called once
/// from the pipeline, so the classifier's paths meet one call and one result.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn rampart_lb(raw: *mut xdp_md, meta: u64) -> u64 {
    let r = rampart_lb_choose(raw, meta);
    if r == choice::NOT_A_SERVICE || r & choice::FORWARD == 0 {
        return r;
    }
    let v6 = meta & meta::V6 != 0;
    let sent = if v6 { rampart_lb_encap6(raw, r) } else { rampart_lb_encap4(raw, r) };
    if sent & sent::TOO_BIG == 0 {
        return sent;
    }
    let mtu = sent & sent::MTU_MASK;
    if v6 { rampart_lb_icmp6_too_big(raw, mtu) } else { rampart_lb_icmp4_too_big(raw, mtu) }
}

/// The packing of the encapsulating functions' answer.
mod sent {
    /// Set: too big once encapsulated; bits 0..16 the MTU to announce. Clear: an XDP action.
    pub const TOO_BIG: u64 = 1 << 32;
    pub const MTU_MASK: u64 = 0xffff;
}

/// The packing of the functions' argument.
mod meta {
    /// Bits 0..8: the IP header's offset (at most 22: two VLAN tags).
    pub const L3_MASK: u64 = 0xff;
    /// Bits 8..23: the L4 header's offset (15 bits, as the parser's).
    pub const L4_SHIFT: u32 = 8;
    pub const L4_MASK: u64 = 0x7fff;
    /// Bits 24..32: the protocol.
    pub const PROTO_SHIFT: u32 = 24;
    pub const V6: u64 = 1 << 32;
    pub const FRAGMENT: u64 = 1 << 33;
}

/// The packing of [`rampart_lb_choose`]'s answer.
mod choice {
    /// Not addressed to a service.
    pub const NOT_A_SERVICE: u64 = u64::MAX;
    /// Set: forward to a backend (bits 0..16 its id, 16..48 the flow hash's low word); clear:
    /// an XDP action.
    pub const FORWARD: u64 = 1 << 48;
    pub const ID_MASK: u64 = 0xffff;
    pub const HASH_SHIFT: u32 = 16;
}

/// Which backend the packet in `ctx` goes to (see [`balance`] for `meta`): a [`choice`].
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn rampart_lb_choose(raw: *mut xdp_md, meta: u64) -> u64 {
    let ctx = XdpContext::new(raw);
    let l3 = (meta & meta::L3_MASK) as usize;
    let l4 = ((meta >> meta::L4_SHIFT) & meta::L4_MASK) as usize;
    let proto = (meta >> meta::PROTO_SHIFT) as u8;
    let Some(ports) = at(&ctx, l4, 4) else {
        return choice::NOT_A_SERVICE;
    };
    // SAFETY: 4 bytes bounds-checked above.
    let (sport, dport) =
        unsafe { (u16::from_be_bytes([*ports, *ports.add(1)]), u16::from_be_bytes([*ports.add(2), *ports.add(3)])) };
    // Each family its own key and table: an IPv4 flow hashes and compares 16 bytes, not 40.
    if meta & meta::V6 != 0 {
        let Some(h) = at(&ctx, l3, IPV6_HLEN) else {
            return choice::NOT_A_SERVICE;
        };
        // SAFETY: 40 bytes bounds-checked above.
        let (src, dst) = unsafe { ([word(h.add(8)), word(h.add(16))], [word(h.add(24)), word(h.add(32))]) };
        let flow = FlowKey { src, dst, sport, dport, proto, family: FAMILY_V6, _pad: 0 };
        let vip = VipKey { addr: dst, port: dport, proto, family: FAMILY_V6, _pad: 0 };
        choose(&ctx, &LB_CT6, &flow, &vip, || flow_hash6(&flow.src, &flow.dst, flow.tail_word()), l3, l4, meta)
    } else {
        let Some(h) = at(&ctx, l3, IPV4_HLEN) else {
            return choice::NOT_A_SERVICE;
        };
        // SAFETY: 20 bytes bounds-checked above.
        let (src, dst) = unsafe { (addr4(h.add(12)), addr4(h.add(16))) };
        let flow = Flow4Key { src, dst, sport, dport, proto, _pad: 0, _pad2: 0 };
        let d = dst.to_ne_bytes();
        let vip = VipKey {
            addr: [u64::from_ne_bytes([d[0], d[1], d[2], d[3], 0, 0, 0, 0]), 0],
            port: dport,
            proto,
            family: FAMILY_V4,
            _pad: 0,
        };
        choose(&ctx, &LB_CT4, &flow, &vip, || flow.hash(), l3, l4, meta)
    }
}

/// The coarse clock in seconds (what UDP flows' `seen` holds).
#[inline(always)]
fn now_secs() -> u32 {
    // SAFETY: a helper without arguments.
    (unsafe { bpf_ktime_get_coarse_ns() } / 1_000_000_000) as u32
}

/// [`rampart_lb_choose`] for one family: the service, then the connection table (`table`,
/// keyed by `flow`), then on a miss the Maglev table at `hash() % ring_size`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn choose<K>(
    ctx: &XdpContext,
    table: &LruHashMap<K, FlowValue>,
    flow: &K,
    vip_key: &VipKey,
    hash: impl FnOnce() -> u64,
    l3: usize,
    l4: usize,
    meta: u64,
) -> u64 {
    let bytes = frame_len(ctx) as u64;
    // SAFETY: the value is only read.
    let Some(vip) = (unsafe { LB_VIPS.get(vip_key) }) else {
        return choice::NOT_A_SERVICE;
    };
    add_lb(&LB_SVC_STATS, vip.service, bytes, false);
    // The encapsulation moves the Ethernet header as a fixed 14 bytes, and a fragment's later
    // pieces could not follow its first: such packets are not balanced.
    if l3 != ETH_HLEN || meta & meta::FRAGMENT != 0 {
        count(&LB_STATS, stat::NOT_BALANCED, bytes);
        return xdp_action::XDP_PASS as u64;
    }
    let udp = vip_key.proto == IPPROTO_UDP;
    let hash = hash();
    let forward = |id: u32| choice::FORWARD | (hash & 0xffff_ffff) << choice::HASH_SHIFT | id as u64 & choice::ID_MASK;

    // A flow stays with its backend while that backend is live for this service (removed
    // backends are cleared of BACKEND_LIVE; drained ones keep it) and, for UDP, while it is
    // not idle longer than the timeout. A TCP SYN (without ACK) opens a new connection, so it
    // is hashed by the current table whatever the table remembers, as Katran does: a client
    // port reused after its backend failed or was drained must not follow the old entry.
    let slot = if opens_connection(ctx, l4, vip_key.proto) { None } else { table.get_ptr_mut(flow) };
    // Only UDP flows age; TCP's clock read (and its division) is saved.
    let now = if udp { now_secs() } else { 0 };
    // SAFETY: the entry is copied out at once.
    if let Some(entry) = slot.map(|p| unsafe { *p })
        && (!udp || LB_CONFIG.get(0).is_some_and(|c| now.wrapping_sub(entry.seen) <= c.udp_timeout))
        && let Some(b) = LB_BACKENDS.get(entry.backend)
        && b.flags & BACKEND_LIVE != 0
        && b.service == vip.service
    {
        // Refreshed in place, as Katran does: an update would take a new LRU node and free
        // the old one (once a second per UDP flow; with the table full it evicts another flow),
        // while the lookup has already marked the entry recently used. A racing CPU writes the
        // same second.
        if udp
            && entry.seen != now
            && let Some(p) = slot
        {
            // SAFETY: the map's own value, valid while this program runs.
            unsafe { (*p).seen = now };
        }
        add_lb(&LB_BE_STATS, entry.backend, bytes, false);
        return forward(entry.backend);
    }
    // ring_size is a prime (never 0); checked_rem keeps a panic path out of the program.
    let Some(pos) = hash.checked_rem(vip.ring_size as u64) else {
        return xdp_action::XDP_ABORTED as u64;
    };
    let id = LB_RING.get(vip.ring_base + pos as u32).copied().unwrap_or(NO_BACKEND);
    if id == NO_BACKEND || LB_BACKENDS.get(id).is_none() {
        count(&LB_STATS, stat::NO_BACKEND, bytes);
        return xdp_action::XDP_DROP as u64;
    }
    let _ = table.insert(flow, &FlowValue { backend: id, seen: now }, 0);
    add_lb(&LB_SVC_STATS, vip.service, 0, true);
    add_lb(&LB_BE_STATS, id, bytes, true);
    forward(id)
}

/// Whether the packet is a TCP SYN without ACK: a client opening a connection.
#[inline(always)]
fn opens_connection(ctx: &XdpContext, l4: usize, proto: u8) -> bool {
    if proto != IPPROTO_TCP {
        return false;
    }
    match at(ctx, l4 + TCP_FLAGS_OFFSET, 1) {
        // SAFETY: 1 byte bounds-checked above.
        Some(f) => (unsafe { *f }) & (TCP_SYN | TCP_ACK) == TCP_SYN,
        None => false,
    }
}

/// An IPv4 address at `p` as a [`Flow4Key`] holds it.
///
/// # Safety
/// `p..p + 4` must be inside the frame.
#[inline(always)]
unsafe fn addr4(p: *const u8) -> u32 {
    // SAFETY: the caller guarantees the bytes.
    u32::from_ne_bytes(unsafe { core::ptr::read_unaligned(p as *const [u8; 4]) })
}

/// The backend (its id and entry) and the flow hash's low word that [`rampart_lb_choose`] chose.
#[inline(always)]
fn chosen(chosen: u64) -> Option<(u32, &'static BackendInfo, &'static LbConfig, u32)> {
    let id = (chosen & choice::ID_MASK) as u32;
    Some((id, LB_BACKENDS.get(id)?, LB_CONFIG.get(0)?, (chosen >> choice::HASH_SHIFT) as u32))
}

/// Encapsulates the IPv4 packet in `ctx` towards the backend [`rampart_lb_choose`] chose and
/// sends it on: an XDP action, or [`sent::TOO_BIG`] with the MTU. A global function for the
/// same reasons as `rampart_lb_choose`; one per family keeps each stack small.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn rampart_lb_encap4(raw: *mut xdp_md, choice: u64) -> u64 {
    let ctx = XdpContext::new(raw);
    match chosen(choice) {
        Some((id, backend, config, hash)) => encap_v4(&ctx, id, backend, config, hash),
        None => xdp_action::XDP_ABORTED as u64,
    }
}

/// [`rampart_lb_encap4`] for IPv6.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn rampart_lb_encap6(raw: *mut xdp_md, choice: u64) -> u64 {
    let ctx = XdpContext::new(raw);
    match chosen(choice) {
        Some((id, backend, config, hash)) => encap_v6(&ctx, id, backend, config, hash),
        None => xdp_action::XDP_ABORTED as u64,
    }
}

/// Adds a packet (and a new flow) to a per-CPU [`LbCounter`](rampart_common::lb::LbCounter).
#[inline(always)]
fn add_lb(map: &aya_ebpf::maps::PerCpuArray<rampart_common::lb::LbCounter>, index: u32, bytes: u64, new_flow: bool) {
    if let Some(c) = map.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot; XDP does not preempt itself on one CPU.
        unsafe {
            if new_flow {
                (*c).new_flows += 1;
            }
            if bytes != 0 {
                (*c).packets += 1;
                (*c).bytes += bytes;
            }
        }
    }
}

/// The frame's length now.
#[inline(always)]
fn frame_len(ctx: &XdpContext) -> usize {
    ctx.data_end() - ctx.data()
}

/// A pointer to `len` writable bytes at `off`, or `None` if the frame is shorter.
#[inline(always)]
fn at(ctx: &XdpContext, off: usize, len: usize) -> Option<*mut u8> {
    let start = ctx.data();
    if start + off + len > ctx.data_end() {
        return None;
    }
    Some((start + off) as *mut u8)
}

/// A ones' complement sum folded to 16 bits.
#[inline(always)]
fn fold_sum(mut sum: u64) -> u16 {
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The Internet checksum from a sum of big-endian 16-bit words.
#[inline(always)]
fn fold(sum: u64) -> u16 {
    !fold_sum(sum)
}

/// The ones' complement sum of `len` bytes of packet memory at `p` (a multiple of 4), as a
/// sum of big-endian 16-bit words. `bpf_csum_diff` sums in the CPU's byte order; a ones'
/// complement sum of byte-swapped words is the byte-swapped sum.
///
/// # Safety
/// `p..p + len` must be inside the frame.
#[inline(always)]
unsafe fn sum_bytes(p: *mut u8, len: u32) -> u64 {
    // SAFETY: the caller guarantees the bytes.
    let raw = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, p as *mut u32, len, 0) } as u32;
    fold_sum(raw as u64).swap_bytes() as u64
}

/// Sum of the big-endian 16-bit words of an IPv4 address in wire order held as in `Packet`.
#[inline(always)]
fn sum_v4(addr: u64) -> u64 {
    let b = addr.to_ne_bytes();
    u16::from_be_bytes([b[0], b[1]]) as u64 + u16::from_be_bytes([b[2], b[3]]) as u64
}

/// Writes an IPv4 header (no options, DF set) at `p`.
///
/// # Safety
/// `p..p + 20` must be inside the frame.
#[inline(always)]
unsafe fn write_ipv4(p: *mut u8, tot_len: u16, proto: u8, src: u64, dst: u64) {
    let len = tot_len.to_be_bytes();
    let mut sum = 0x4500u64 + tot_len as u64 + 0x4000 + ((DEFAULT_TTL as u64) << 8 | proto as u64);
    sum += sum_v4(src) + sum_v4(dst);
    let csum = fold(sum).to_be_bytes();
    let (s, d) = (src.to_ne_bytes(), dst.to_ne_bytes());
    let hdr: [u8; 20] = [
        0x45,
        0,
        len[0],
        len[1],
        0,
        0,
        0x40,
        0,
        DEFAULT_TTL,
        proto,
        csum[0],
        csum[1],
        s[0],
        s[1],
        s[2],
        s[3],
        d[0],
        d[1],
        d[2],
        d[3],
    ];
    // SAFETY: the caller guarantees the bytes.
    unsafe { core::ptr::write_unaligned(p as *mut [u8; 20], hdr) };
}

/// Writes an IPv6 header at `p`.
///
/// # Safety
/// `p..p + 40` must be inside the frame.
#[inline(always)]
unsafe fn write_ipv6(p: *mut u8, payload_len: u16, next: u8, flow_label: u32, src: &[u64; 2], dst: &[u64; 2]) {
    let first = (6u32 << 28 | (flow_label & 0xf_ffff)).to_be_bytes();
    let len = payload_len.to_be_bytes();
    let head: [u8; 8] = [first[0], first[1], first[2], first[3], len[0], len[1], next, DEFAULT_TTL];
    // SAFETY: the caller guarantees the bytes.
    unsafe {
        core::ptr::write_unaligned(p as *mut [u8; 8], head);
        core::ptr::write_unaligned(p.add(8) as *mut [u64; 2], *src);
        core::ptr::write_unaligned(p.add(24) as *mut [u64; 2], *dst);
    }
}

/// Zeroes `*p` with sixteen 4-byte stores and returns it. `mem::zeroed()` compiled to a call
/// to a byte-at-a-time `memset` subprogram (64 iterations per balanced packet); volatile stores
/// keep LLVM from turning them back into one.
///
/// # Safety
/// `p` must be valid for writes of a `FibParams`.
#[inline(always)]
unsafe fn zeroed_fib_params<'a>(p: *mut FibParams) -> &'a mut FibParams {
    let w = p as *mut u32;
    let mut i = 0;
    while i < core::mem::size_of::<FibParams>() / 4 {
        // SAFETY: within `*p`, which the caller guarantees; FibParams is 4-aligned.
        unsafe { core::ptr::write_volatile(w.add(i), 0) };
        i += 1;
    }
    // SAFETY: every byte written above; all zero is a valid value.
    unsafe { &mut *p }
}

/// Writes a MAC address byte by byte: a 6-byte `write_unaligned` compiled to a call to a
/// byte-loop `memmove` subprogram; volatile keeps LLVM from forming that call again.
///
/// # Safety
/// `p..p + 6` must be writable.
#[inline(always)]
unsafe fn write_mac(p: *mut u8, mac: &[u8; 6]) {
    let mut i = 0;
    while i < 6 {
        // SAFETY: the caller guarantees the bytes.
        unsafe { core::ptr::write_volatile(p.add(i), mac[i]) };
        i += 1;
    }
}

/// Writes an Ethernet header at the frame's start.
///
/// # Safety
/// `p..p + 14` must be inside the frame.
#[inline(always)]
unsafe fn write_eth(p: *mut u8, dst: &[u8; 6], src: &[u8; 6], ethertype: u16) {
    let t = ethertype.to_be_bytes();
    // SAFETY: the caller guarantees the bytes.
    unsafe {
        write_mac(p, dst);
        write_mac(p.add(6), src);
        core::ptr::write_unaligned(p.add(12) as *mut [u8; 2], t);
    }
}

/// The Ethernet header of a frame whose head just grew by `grown` bytes (the original header
/// now starts there): the next hop's MACs when it is known; else the original MACs, so the
/// stack still takes the frame as addressed to this host and forwards it. The EtherType stays:
/// the outer header is of the inner's family.
///
/// # Safety
/// `p..p + grown + 14` must be inside the frame.
#[inline(always)]
unsafe fn keep_or_set_macs(p: *mut u8, grown: usize, hop: Option<&NextHop>) {
    // SAFETY: the caller guarantees the bytes; the two ranges do not overlap (grown >= 20).
    unsafe {
        if let Some(hop) = hop {
            write_mac(p, &hop.dmac);
            write_mac(p.add(6), &hop.smac);
        } else {
            let old = core::ptr::read_unaligned(p.add(grown) as *const [u8; 12]);
            core::ptr::write_unaligned(p as *mut [u8; 12], old);
        }
        let t = core::ptr::read_unaligned(p.add(grown + 12) as *const [u8; 2]);
        core::ptr::write_unaligned(p.add(12) as *mut [u8; 2], t);
    }
}

/// What became of a packet's next hop.
enum Hop {
    /// Known: this CPU's cached entry (fresh, or just looked up).
    Known(&'static NextHop),
    /// No neighbour entry yet: the kernel must forward it (and resolve the neighbour).
    NoNeigh,
    /// No route, or another failure (counted): dropped.
    Failed,
}

/// The next hop towards backend `id` (address `backend.addr`) for a packet that came in on
/// this interface: this CPU's cached entry while it is fresh and made for the same address and
/// ingress interface, else a `bpf_fib_lookup` whose success is cached for [`NEXTHOP_TTL_SECS`]
/// (see `rampart_common::lb`, "The next hop"). `src` is the outer source, as the lookup's.
#[inline(always)]
fn next_hop(ctx: &XdpContext, id: u32, backend: &BackendInfo, v6: bool, src: &[u64; 2], bytes: u64) -> Hop {
    let Some(nh) = LB_NEXTHOPS.get_ptr_mut(id) else {
        count(&LB_STATS, stat::FIB_FAILED, bytes);
        return Hop::Failed;
    };
    // SAFETY: reading the context the kernel gave us.
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // SAFETY: this CPU's own slot of a per-CPU array; XDP does not preempt itself on one CPU,
    // so nothing writes it while it is read.
    let hop = unsafe { &mut *nh };
    if now < hop.expires && hop.addr == backend.addr && hop.ingress == ingress {
        return Hop::Known(hop);
    }
    count(&LB_STATS, stat::NEXTHOP_LOOKUPS, bytes);
    let mut raw = core::mem::MaybeUninit::<FibParams>::uninit();
    // SAFETY: zeroed whole, and an all-zero bpf_fib_lookup is a valid value.
    let params = unsafe { zeroed_fib_params(raw.as_mut_ptr()) };
    params.ifindex = ingress;
    // tot_len stays 0: the lookup then never answers "fragmentation needed" and returns the
    // route's MTU, which is cached and checked against each packet.
    if v6 {
        params.family = AF_INET6;
        params.l4_protocol = IPPROTO_IPV6;
        // SAFETY: [u64; 2] and [u32; 4] have the same size; the bytes are the address.
        params.__bindgen_anon_3.ipv6_src = unsafe { core::mem::transmute::<[u64; 2], [u32; 4]>(*src) };
        params.__bindgen_anon_4.ipv6_dst = unsafe { core::mem::transmute::<[u64; 2], [u32; 4]>(backend.addr) };
    } else {
        params.family = AF_INET;
        params.l4_protocol = IPPROTO_IPIP;
        params.__bindgen_anon_3.ipv4_src = src[0] as u32;
        params.__bindgen_anon_4.ipv4_dst = backend.addr[0] as u32;
    }
    // SAFETY: the params struct is ours, of the size passed.
    let rc =
        unsafe { bpf_fib_lookup(ctx.ctx as *mut _, params as *mut _, core::mem::size_of::<FibParams>() as i32, 0) };
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => {
            hop.addr = backend.addr;
            hop.dmac = params.dmac;
            hop.smac = params.smac;
            hop.ifindex = params.ifindex;
            hop.ingress = ingress;
            // SAFETY: the helper wrote the MTU in the union.
            hop.mtu = unsafe { params.__bindgen_anon_1.mtu_result } as u32;
            // In the coarse clock's nanoseconds (no division on the packet path).
            hop.expires = now + NEXTHOP_TTL_SECS as u64 * 1_000_000_000;
            Hop::Known(hop)
        }
        BPF_FIB_LKUP_RET_NO_NEIGH => Hop::NoNeigh,
        _ => {
            count(&LB_STATS, stat::FIB_FAILED, bytes);
            Hop::Failed
        }
    }
}

/// XDP_TX when the next hop is out of the interface the packet came in on (one-arm, as Katran),
/// else a redirect.
#[inline(always)]
fn send(ctx: &XdpContext, ifindex: u32, bytes: u64) -> u32 {
    count(&LB_STATS, stat::FORWARDED, bytes);
    // SAFETY: reading the context the kernel gave us.
    if ifindex == unsafe { (*ctx.ctx).ingress_ifindex } {
        return xdp_action::XDP_TX;
    }
    // SAFETY: a helper taking plain values.
    unsafe { bpf_redirect(ifindex, 0) as u32 }
}

#[inline(always)]
fn encap_v4(ctx: &XdpContext, id: u32, backend: &BackendInfo, config: &LbConfig, hash: u32) -> u64 {
    let bytes = frame_len(ctx) as u64;
    let inner_len = frame_len(ctx) - ETH_HLEN;
    let outer_len = inner_len + IPV4_HLEN;
    let h = hash.to_be_bytes();
    let src = u64::from_ne_bytes([config.src4[0], config.src4[1], h[2], h[3], 0, 0, 0, 0]);
    let dst = backend.addr[0];
    let hop = match next_hop(ctx, id, backend, false, &[src, 0], bytes) {
        Hop::Known(hop) => {
            if outer_len > hop.mtu as usize {
                return sent::TOO_BIG | (hop.mtu as u64).saturating_sub(IPV4_HLEN as u64) & sent::MTU_MASK;
            }
            Some(hop)
        }
        Hop::NoNeigh => None,
        Hop::Failed => return xdp_action::XDP_DROP as u64,
    };
    if outer_len > 0xffff {
        return xdp_action::XDP_DROP as u64;
    }
    // SAFETY: growing the head by a header; checked below.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(IPV4_HLEN as i32)) } != 0 {
        count(&LB_STATS, stat::ADJUST_FAILED, bytes);
        return xdp_action::XDP_DROP as u64;
    }
    let Some(p) = at(ctx, 0, ETH_HLEN + IPV4_HLEN) else {
        return xdp_action::XDP_DROP as u64;
    };
    // SAFETY: 34 bytes bounds-checked above.
    unsafe {
        keep_or_set_macs(p, IPV4_HLEN, hop);
        write_ipv4(p.add(ETH_HLEN), outer_len as u16, IPPROTO_IPIP, src, dst);
    }
    match hop {
        Some(hop) => send(ctx, hop.ifindex, bytes) as u64,
        None => {
            // No neighbour yet: the kernel forwards this one and resolves it; the MACs it sees
            // are the original frame's (to us), as for any packet it routes.
            count(&LB_STATS, stat::FIB_NO_NEIGH, bytes);
            xdp_action::XDP_PASS as u64
        }
    }
}

#[inline(always)]
fn encap_v6(ctx: &XdpContext, id: u32, backend: &BackendInfo, config: &LbConfig, hash: u32) -> u64 {
    let bytes = frame_len(ctx) as u64;
    let inner_len = frame_len(ctx) - ETH_HLEN;
    let outer_len = inner_len + IPV6_HLEN;
    let s = config.src6;
    let h = hash.to_be_bytes();
    let src = [
        u64::from_ne_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]]),
        u64::from_ne_bytes([s[8], s[9], s[10], s[11], h[0], h[1], h[2], h[3]]),
    ];
    let hop = match next_hop(ctx, id, backend, true, &src, bytes) {
        Hop::Known(hop) => {
            if outer_len > hop.mtu as usize {
                return sent::TOO_BIG | (hop.mtu as u64).saturating_sub(IPV6_HLEN as u64) & sent::MTU_MASK;
            }
            Some(hop)
        }
        Hop::NoNeigh => None,
        Hop::Failed => return xdp_action::XDP_DROP as u64,
    };
    if inner_len > 0xffff {
        return xdp_action::XDP_DROP as u64;
    }
    // SAFETY: growing the head by a header; checked below.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(IPV6_HLEN as i32)) } != 0 {
        count(&LB_STATS, stat::ADJUST_FAILED, bytes);
        return xdp_action::XDP_DROP as u64;
    }
    let Some(p) = at(ctx, 0, ETH_HLEN + IPV6_HLEN) else {
        return xdp_action::XDP_DROP as u64;
    };
    // SAFETY: 54 bytes bounds-checked above.
    unsafe {
        keep_or_set_macs(p, IPV6_HLEN, hop);
        write_ipv6(p.add(ETH_HLEN), inner_len as u16, IPPROTO_IPV6, hash, &src, &backend.addr);
    }
    match hop {
        Some(hop) => send(ctx, hop.ifindex, bytes) as u64,
        None => {
            count(&LB_STATS, stat::FIB_NO_NEIGH, bytes);
            xdp_action::XDP_PASS as u64
        }
    }
}

/// The frame's two MACs (destination, source), to answer the sender.
#[inline(always)]
fn macs(ctx: &XdpContext) -> Option<([u8; 6], [u8; 6])> {
    let p = at(ctx, 0, ETH_HLEN)?;
    // SAFETY: 14 bytes bounds-checked above.
    unsafe {
        Some((core::ptr::read_unaligned(p as *const [u8; 6]), core::ptr::read_unaligned(p.add(6) as *const [u8; 6])))
    }
}

/// Cuts the frame to `keep` bytes and grows its head by `grow`: what is left of the original
/// IP packet becomes the quote of an ICMP error written in front of it.
#[inline(always)]
fn reshape(ctx: &XdpContext, keep: usize, grow: usize, bytes: u64) -> bool {
    let len = frame_len(ctx);
    if len < keep {
        count(&LB_STATS, stat::NOT_BALANCED, bytes);
        return false;
    }
    // SAFETY: shrinking the tail and growing the head; results checked.
    let ok = unsafe {
        bpf_xdp_adjust_tail(ctx.ctx, -((len - keep) as i32)) == 0 && bpf_xdp_adjust_head(ctx.ctx, -(grow as i32)) == 0
    };
    if !ok {
        count(&LB_STATS, stat::ADJUST_FAILED, bytes);
    }
    ok
}

/// Answers a packet too big to encapsulate with ICMP Fragmentation Needed (type 3, code 4)
/// carrying `mtu`, from the VIP to the client, out of the interface it came in on.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn rampart_lb_icmp4_too_big(raw: *mut xdp_md, mtu: u64) -> u64 {
    let ctx = XdpContext::new(raw);
    icmp4_too_big(&ctx, mtu as u16, frame_len(&ctx) as u64) as u64
}

/// Answers a packet too big to encapsulate with ICMPv6 Packet Too Big carrying `mtu`.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn rampart_lb_icmp6_too_big(raw: *mut xdp_md, mtu: u64) -> u64 {
    let ctx = XdpContext::new(raw);
    icmp6_too_big(&ctx, (mtu & 0xffff) as u32, frame_len(&ctx) as u64) as u64
}

/// An 8-byte word of the frame at `p`, in memory order.
///
/// # Safety
/// `p..p + 8` must be inside the frame.
#[inline(always)]
unsafe fn word(p: *const u8) -> u64 {
    // SAFETY: the caller guarantees the bytes.
    unsafe { u64::from_ne_bytes(core::ptr::read_unaligned(p as *const [u8; 8])) }
}

// The ICMP answers read the addresses from the quote (the original IP header, which the
// reshaped frame keeps just after the new headers) rather than carrying them on the stack:
// these functions run beside the classifier's stack and must stay small.

#[inline(always)]
fn icmp4_too_big(ctx: &XdpContext, mtu: u16, bytes: u64) -> u32 {
    let Some((our_mac, client_mac)) = macs(ctx) else {
        return xdp_action::XDP_DROP;
    };
    if !reshape(ctx, ETH_HLEN + ICMP4_QUOTE, IPV4_HLEN + ICMP_HLEN, bytes) {
        return xdp_action::XDP_DROP;
    }
    let Some(p) = at(ctx, 0, ETH_HLEN + IPV4_HLEN + ICMP_HLEN + ICMP4_QUOTE) else {
        return xdp_action::XDP_DROP;
    };
    // SAFETY: the whole new frame is bounds-checked above; the quote is packet memory of the
    // size given.
    unsafe {
        let quote = p.add(ETH_HLEN + IPV4_HLEN + ICMP_HLEN);
        // The original source and destination: bytes 12..20 of its header.
        let addrs = word(quote.add(12)).to_ne_bytes();
        let client = u64::from_ne_bytes([addrs[0], addrs[1], addrs[2], addrs[3], 0, 0, 0, 0]);
        let vip = u64::from_ne_bytes([addrs[4], addrs[5], addrs[6], addrs[7], 0, 0, 0, 0]);
        let sum = sum_bytes(quote, ICMP4_QUOTE as u32)
            + ((ICMP_DEST_UNREACH as u64) << 8 | ICMP_FRAG_NEEDED as u64)
            + mtu as u64;
        let c = fold(sum).to_be_bytes();
        let m = mtu.to_be_bytes();
        write_eth(p, &client_mac, &our_mac, ETH_P_IP);
        write_ipv4(p.add(ETH_HLEN), (IPV4_HLEN + ICMP_HLEN + ICMP4_QUOTE) as u16, IPPROTO_ICMP, vip, client);
        let icmp = u64::from_ne_bytes([ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, c[0], c[1], 0, 0, m[0], m[1]]);
        core::ptr::write_unaligned(p.add(ETH_HLEN + IPV4_HLEN) as *mut u64, icmp);
    }
    count(&LB_STATS, stat::ICMP_TOO_BIG, bytes);
    xdp_action::XDP_TX
}

#[inline(always)]
fn icmp6_too_big(ctx: &XdpContext, mtu: u32, bytes: u64) -> u32 {
    let Some((our_mac, client_mac)) = macs(ctx) else {
        return xdp_action::XDP_DROP;
    };
    if !reshape(ctx, ETH_HLEN + ICMP6_QUOTE, IPV6_HLEN + ICMP_HLEN, bytes) {
        return xdp_action::XDP_DROP;
    }
    let Some(p) = at(ctx, 0, ETH_HLEN + IPV6_HLEN + ICMP_HLEN + ICMP6_QUOTE) else {
        return xdp_action::XDP_DROP;
    };
    let len = (ICMP_HLEN + ICMP6_QUOTE) as u64;
    // SAFETY: as in icmp4_too_big.
    unsafe {
        let quote = p.add(ETH_HLEN + IPV6_HLEN + ICMP_HLEN);
        // The pseudo-header: both addresses (the quoted header's), the upper-layer length and
        // the next header.
        let sum = sum_bytes(quote, ICMP6_QUOTE as u32)
            + sum_bytes(quote.add(8), 32)
            + len
            + IPPROTO_ICMPV6 as u64
            + ((ICMPV6_PKT_TOOBIG as u64) << 8)
            + (mtu >> 16) as u64
            + (mtu & 0xffff) as u64;
        let c = fold(sum).to_be_bytes();
        let m = mtu.to_be_bytes();
        write_eth(p, &client_mac, &our_mac, ETH_P_IPV6);
        // From the VIP (the quoted destination) to the client (the quoted source), word by word.
        let ip = p.add(ETH_HLEN);
        let l = (len as u16).to_be_bytes();
        let head = u64::from_ne_bytes([0x60, 0, 0, 0, l[0], l[1], IPPROTO_ICMPV6, DEFAULT_TTL]);
        core::ptr::write_unaligned(ip as *mut u64, head);
        for (to, from) in [(8, 24), (16, 32), (24, 8), (32, 16)] {
            core::ptr::write_unaligned(ip.add(to) as *mut u64, word(quote.add(from)));
        }
        let icmp = u64::from_ne_bytes([ICMPV6_PKT_TOOBIG, 0, c[0], c[1], m[0], m[1], m[2], m[3]]);
        core::ptr::write_unaligned(p.add(ETH_HLEN + IPV6_HLEN) as *mut u64, icmp);
    }
    count(&LB_STATS, stat::ICMP_TOO_BIG, bytes);
    xdp_action::XDP_TX
}
