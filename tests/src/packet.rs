//! Frame builder for test-run fixtures, the differential test and raw sends.
//!
//! A [`Packet`] describes a frame layer by layer; [`Packet::build`] writes it with lengths and
//! checksums filled in (unless overridden) and returns a [`Frame`]: the bytes plus where each
//! header starts and ends, so tests can cut a frame inside any header and know what they cut.
//! Fields that a parser checks (IHL, versions, total length, fragment bits, next headers) can be
//! set to wrong values on purpose.

use std::net::{Ipv4Addr, Ipv6Addr};

pub use rampart_common::net::{
    ETH_HLEN, ETH_P_8021AD, ETH_P_8021Q, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, ETH_P_LLDP, IPPROTO_AH, IPPROTO_DSTOPTS,
    IPPROTO_FRAGMENT, IPPROTO_GRE, IPPROTO_HIP, IPPROTO_HOPOPTS, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_MOBILITY,
    IPPROTO_NONE, IPPROTO_ROUTING, IPPROTO_SCTP, IPPROTO_SHIM6, IPPROTO_TCP, IPPROTO_UDP,
};

/// An IPv6 extension header. `len` is the header's own length field (units differ: AH counts
/// 4-byte words minus 2, the others 8-byte words minus 1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ext {
    HopByHop {
        len: u8,
    },
    Routing {
        len: u8,
    },
    DestOpts {
        len: u8,
    },
    /// `offset` in 8-byte units (13 bits), `more` = the M flag.
    Fragment {
        offset: u16,
        more: bool,
        id: u32,
    },
    Ah {
        len: u8,
    },
    /// Any other header in the generic (next, len, data) shape: Mobility, HIP, Shim6.
    Generic {
        kind: u8,
        len: u8,
    },
}

impl Ext {
    /// The protocol number that announces this header.
    pub fn kind(&self) -> u8 {
        match self {
            Ext::HopByHop { .. } => IPPROTO_HOPOPTS,
            Ext::Routing { .. } => IPPROTO_ROUTING,
            Ext::DestOpts { .. } => IPPROTO_DSTOPTS,
            Ext::Fragment { .. } => IPPROTO_FRAGMENT,
            Ext::Ah { .. } => IPPROTO_AH,
            Ext::Generic { kind, .. } => *kind,
        }
    }

    /// Bytes this header occupies on the wire.
    pub fn wire_len(&self) -> usize {
        match self {
            Ext::Fragment { .. } => 8,
            Ext::Ah { len } => (*len as usize + 2) * 4,
            Ext::HopByHop { len } | Ext::Routing { len } | Ext::DestOpts { len } | Ext::Generic { len, .. } => {
                (*len as usize + 1) * 8
            }
        }
    }

    fn write(&self, next: u8, out: &mut Vec<u8>) {
        let start = out.len();
        match self {
            Ext::Fragment { offset, more, id } => {
                out.push(next);
                out.push(0);
                let fo = (offset << 3) | u16::from(*more);
                out.extend_from_slice(&fo.to_be_bytes());
                out.extend_from_slice(&id.to_be_bytes());
            }
            Ext::Routing { len } => {
                // Type 0 is deprecated; use segments-left 0 so any stack ignores it.
                out.extend_from_slice(&[next, *len, 4, 0]);
            }
            Ext::Ah { len } => {
                out.extend_from_slice(&[next, *len, 0, 0]);
                out.extend_from_slice(&0x1000u32.to_be_bytes()); // SPI
            }
            Ext::HopByHop { len } | Ext::DestOpts { len } | Ext::Generic { len, .. } => {
                out.extend_from_slice(&[next, *len]);
            }
        }
        // The rest is PadN/zero filling: its content does not matter to a parser.
        out.resize(start + self.wire_len(), 0);
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ipv4 {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// Protocol field; `None`: from the transport.
    pub proto: Option<u8>,
    pub ttl: u8,
    pub id: u16,
    /// Options, padded with zeros (end-of-options) to a multiple of 4.
    pub options: Vec<u8>,
    /// IHL field override (else 5 + options / 4).
    pub ihl: Option<u8>,
    pub version: u8,
    pub dont_frag: bool,
    pub more_frags: bool,
    /// Fragment offset in 8-byte units (13 bits).
    pub frag_offset: u16,
    /// Total length override (else header + everything after it).
    pub tot_len: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ipv6 {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub hop_limit: u8,
    pub version: u8,
    pub ext: Vec<Ext>,
    /// Next header after the last extension header; `None`: from the transport.
    pub proto: Option<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Net {
    Ipv4(Ipv4),
    Ipv6(Ipv6),
    /// Anything else behind an ethertype (ARP, LLDP…): `payload` follows the Ethernet header.
    Other {
        ethertype: u16,
        payload: Vec<u8>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    /// `doff`: data offset field override (else 5 + options / 4).
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
        seq: u32,
        options: Vec<u8>,
        doff: Option<u8>,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    Icmp {
        ty: u8,
        code: u8,
    },
    Icmpv6 {
        ty: u8,
        code: u8,
    },
    /// No transport header we know: the payload follows the IP header directly.
    Raw {
        proto: u8,
    },
}

impl Transport {
    pub fn proto(&self) -> u8 {
        match self {
            Transport::Tcp { .. } => IPPROTO_TCP,
            Transport::Udp { .. } => IPPROTO_UDP,
            Transport::Icmp { .. } => IPPROTO_ICMP,
            Transport::Icmpv6 { .. } => IPPROTO_ICMPV6,
            Transport::Raw { proto } => *proto,
        }
    }
}

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

/// One frame, described layer by layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    /// VLAN tags outermost first: (TPID, TCI).
    pub tags: Vec<(u16, u16)>,
    pub net: Net,
    /// Ignored for [`Net::Other`].
    pub transport: Option<Transport>,
    pub payload: Vec<u8>,
}

/// What a stretch of a built frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderKind {
    /// Destination MAC, source MAC, ethertype.
    Ethernet,
    /// One tag: TCI and the inner ethertype (the TPID is the previous header's ethertype).
    Vlan,
    /// IPv4 header including options (IHL as written, or 20 bytes if the IHL is below 5).
    Ipv4,
    Ipv6,
    /// An IPv6 extension header of this protocol number.
    Ipv6Ext(u8),
    /// TCP header including options.
    Tcp,
    Udp,
    /// ICMP or ICMPv6 header (type, code, checksum, rest-of-header: 8 bytes).
    Icmp,
    /// Anything after the headers: payload, or a later fragment's data.
    Payload,
}

/// A header's place in a frame: bytes `start..end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: HeaderKind,
    pub start: usize,
    pub end: usize,
}

/// A built frame and its layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub bytes: Vec<u8>,
    pub headers: Vec<Header>,
}

impl Frame {
    pub fn len(&self) -> usize {
        self.bytes.len()
    }
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
    /// The first `len` bytes (the whole frame if it is shorter).
    pub fn truncated(&self, len: usize) -> &[u8] {
        &self.bytes[..len.min(self.bytes.len())]
    }
    /// The first header of this kind.
    pub fn header(&self, kind: HeaderKind) -> Option<Header> {
        self.headers.iter().copied().find(|h| h.kind == kind)
    }
    /// The header that byte `offset` belongs to.
    pub fn header_at(&self, offset: usize) -> Option<Header> {
        self.headers.iter().copied().find(|h| h.start <= offset && offset < h.end)
    }
    pub fn hex(&self) -> String {
        hex(&self.bytes)
    }
}

/// Lower-case hex, no separators.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const SERVER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

impl Packet {
    fn with(net: Net, transport: Option<Transport>) -> Self {
        Packet { dst_mac: SERVER_MAC, src_mac: CLIENT_MAC, tags: Vec::new(), net, transport, payload: Vec::new() }
    }

    pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, transport: Transport) -> Self {
        Self::with(
            Net::Ipv4(Ipv4 {
                src,
                dst,
                proto: None,
                ttl: 64,
                id: 0x1234,
                options: Vec::new(),
                ihl: None,
                version: 4,
                dont_frag: false,
                more_frags: false,
                frag_offset: 0,
                tot_len: None,
            }),
            Some(transport),
        )
    }

    pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, transport: Transport) -> Self {
        Self::with(
            Net::Ipv6(Ipv6 { src, dst, hop_limit: 64, version: 6, ext: Vec::new(), proto: None }),
            Some(transport),
        )
    }

    pub fn tcp4(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Self {
        Self::ipv4(src, dst, tcp(sport, dport))
    }
    pub fn udp4(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Self {
        Self::ipv4(src, dst, Transport::Udp { sport, dport })
    }
    /// An echo request.
    pub fn icmp4(src: Ipv4Addr, dst: Ipv4Addr) -> Self {
        Self::ipv4(src, dst, Transport::Icmp { ty: 8, code: 0 })
    }
    pub fn tcp6(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16) -> Self {
        Self::ipv6(src, dst, tcp(sport, dport))
    }
    pub fn udp6(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16) -> Self {
        Self::ipv6(src, dst, Transport::Udp { sport, dport })
    }
    /// An echo request.
    pub fn icmp6(src: Ipv6Addr, dst: Ipv6Addr) -> Self {
        Self::ipv6(src, dst, Transport::Icmpv6 { ty: 128, code: 0 })
    }

    /// An ARP request (who-has 10.0.0.2 tell 10.0.0.1).
    pub fn arp() -> Self {
        let mut p = Vec::with_capacity(28);
        p.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        p.extend_from_slice(&CLIENT_MAC);
        p.extend_from_slice(&[10, 0, 0, 1]);
        p.extend_from_slice(&[0; 6]);
        p.extend_from_slice(&[10, 0, 0, 2]);
        let mut pkt = Self::with(Net::Other { ethertype: ETH_P_ARP, payload: p }, None);
        pkt.dst_mac = [0xff; 6];
        pkt
    }

    /// Any other ethertype with a payload.
    pub fn other(ethertype: u16, payload: Vec<u8>) -> Self {
        Self::with(Net::Other { ethertype, payload }, None)
    }

    /// Adds a VLAN tag inside the ones already there.
    pub fn vlan(mut self, tpid: u16, vid: u16) -> Self {
        self.tags.push((tpid, vid & 0x0fff));
        self
    }

    pub fn payload(mut self, payload: impl Into<Vec<u8>>) -> Self {
        self.payload = payload.into();
        self
    }

    /// The TCP flags (a TCP packet; panics otherwise, a test bug). `tcp4`/`tcp6` build a SYN.
    pub fn tcp_flags(mut self, f: u8) -> Self {
        match &mut self.transport {
            Some(Transport::Tcp { flags, .. }) => *flags = f,
            other => panic!("tcp_flags() on a non-TCP packet: {other:?}"),
        }
        self
    }

    /// A payload of `n` bytes counting up.
    pub fn payload_len(mut self, n: usize) -> Self {
        self.payload = (0..n).map(|i| i as u8).collect();
        self
    }

    /// Mutable access to the IPv4 header. Panics on a non-IPv4 packet (a test bug).
    pub fn v4_mut(&mut self) -> &mut Ipv4 {
        match &mut self.net {
            Net::Ipv4(h) => h,
            other => panic!("not an IPv4 packet: {other:?}"),
        }
    }

    /// Mutable access to the IPv6 header. Panics on a non-IPv6 packet (a test bug).
    pub fn v6_mut(&mut self) -> &mut Ipv6 {
        match &mut self.net {
            Net::Ipv6(h) => h,
            other => panic!("not an IPv6 packet: {other:?}"),
        }
    }

    /// IPv4 options (padded to a multiple of 4 when built).
    pub fn ipv4_options(mut self, options: impl Into<Vec<u8>>) -> Self {
        self.v4_mut().options = options.into();
        self
    }

    /// IPv4: sets MF and the fragment offset (8-byte units). IPv6: appends a fragment header.
    pub fn fragment(mut self, offset: u16, more: bool) -> Self {
        match &mut self.net {
            Net::Ipv4(h) => {
                h.frag_offset = offset;
                h.more_frags = more;
            }
            Net::Ipv6(h) => h.ext.push(Ext::Fragment { offset, more, id: 0xabcd }),
            Net::Other { .. } => panic!("fragment() on a non-IP packet"),
        }
        self
    }

    /// Appends an IPv6 extension header.
    pub fn ext(mut self, ext: Ext) -> Self {
        self.v6_mut().ext.push(ext);
        self
    }

    pub fn build(&self) -> Frame {
        let mut out = Vec::with_capacity(128);
        let mut headers = Vec::new();
        out.extend_from_slice(&self.dst_mac);
        out.extend_from_slice(&self.src_mac);
        let ethertype = match &self.net {
            Net::Ipv4(_) => ETH_P_IP,
            Net::Ipv6(_) => ETH_P_IPV6,
            Net::Other { ethertype, .. } => *ethertype,
        };
        let mut types: Vec<u16> = self.tags.iter().map(|t| t.0).collect();
        types.push(ethertype);
        out.extend_from_slice(&types[0].to_be_bytes());
        headers.push(Header { kind: HeaderKind::Ethernet, start: 0, end: ETH_HLEN });
        for (i, (_, tci)) in self.tags.iter().enumerate() {
            let start = out.len();
            out.extend_from_slice(&tci.to_be_bytes());
            out.extend_from_slice(&types[i + 1].to_be_bytes());
            headers.push(Header { kind: HeaderKind::Vlan, start, end: out.len() });
        }
        match &self.net {
            Net::Other { payload, .. } => {
                let start = out.len();
                out.extend_from_slice(payload);
                if !payload.is_empty() {
                    headers.push(Header { kind: HeaderKind::Payload, start, end: out.len() });
                }
            }
            Net::Ipv4(ip) => self.build_v4(ip, &mut out, &mut headers),
            Net::Ipv6(ip) => self.build_v6(ip, &mut out, &mut headers),
        }
        Frame { bytes: out, headers }
    }

    /// Transport header bytes (checksum zero) and its kind.
    fn transport_bytes(&self) -> Option<(Vec<u8>, HeaderKind)> {
        let t = self.transport.as_ref()?;
        let mut h = Vec::new();
        let kind = match t {
            Transport::Tcp { sport, dport, flags, seq, options, doff } => {
                h.extend_from_slice(&sport.to_be_bytes());
                h.extend_from_slice(&dport.to_be_bytes());
                h.extend_from_slice(&seq.to_be_bytes());
                h.extend_from_slice(&0u32.to_be_bytes()); // ack
                let mut opts = options.clone();
                opts.resize(opts.len().div_ceil(4) * 4, 0);
                let d = doff.unwrap_or(5 + (opts.len() / 4) as u8);
                h.push(d << 4);
                h.push(*flags);
                h.extend_from_slice(&65535u16.to_be_bytes()); // window
                h.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
                h.extend_from_slice(&opts);
                HeaderKind::Tcp
            }
            Transport::Udp { sport, dport } => {
                h.extend_from_slice(&sport.to_be_bytes());
                h.extend_from_slice(&dport.to_be_bytes());
                h.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                h.extend_from_slice(&[0, 0]);
                HeaderKind::Udp
            }
            Transport::Icmp { ty, code } | Transport::Icmpv6 { ty, code } => {
                // Echo: identifier 0x4242, sequence 1.
                h.extend_from_slice(&[*ty, *code, 0, 0, 0x42, 0x42, 0, 1]);
                HeaderKind::Icmp
            }
            Transport::Raw { .. } => return None,
        };
        Some((h, kind))
    }

    /// Offset of the checksum inside the transport header, if it has one we fill.
    fn checksum_offset(&self) -> Option<usize> {
        match self.transport.as_ref()? {
            Transport::Tcp { .. } => Some(16),
            Transport::Udp { .. } => Some(6),
            Transport::Icmp { .. } | Transport::Icmpv6 { .. } => Some(2),
            Transport::Raw { .. } => None,
        }
    }

    fn upper_proto(&self) -> u8 {
        self.transport.as_ref().map(Transport::proto).unwrap_or(IPPROTO_NONE)
    }

    fn build_v4(&self, ip: &Ipv4, out: &mut Vec<u8>, headers: &mut Vec<Header>) {
        let l3 = out.len();
        let mut opts = ip.options.clone();
        opts.resize(opts.len().div_ceil(4) * 4, 0);
        let hlen = 20 + opts.len();
        let ihl = ip.ihl.unwrap_or((hlen / 4) as u8);
        let l4 = self.transport_bytes();
        let l4_len = l4.as_ref().map_or(0, |(b, _)| b.len());
        let tot_len = ip.tot_len.unwrap_or((hlen + l4_len + self.payload.len()) as u16);
        let proto = ip.proto.unwrap_or_else(|| self.upper_proto());
        let frag = (u16::from(ip.dont_frag) << 14) | (u16::from(ip.more_frags) << 13) | (ip.frag_offset & 0x1fff);
        out.push((ip.version << 4) | (ihl & 0x0f));
        out.push(0);
        out.extend_from_slice(&tot_len.to_be_bytes());
        out.extend_from_slice(&ip.id.to_be_bytes());
        out.extend_from_slice(&frag.to_be_bytes());
        out.push(ip.ttl);
        out.push(proto);
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&ip.src.octets());
        out.extend_from_slice(&ip.dst.octets());
        out.extend_from_slice(&opts);
        let sum = checksum(&out[l3..], 0);
        out[l3 + 10..l3 + 12].copy_from_slice(&sum.to_be_bytes());
        headers.push(Header { kind: HeaderKind::Ipv4, start: l3, end: out.len() });

        let pseudo = |len: usize| {
            let mut p = Vec::with_capacity(12);
            p.extend_from_slice(&ip.src.octets());
            p.extend_from_slice(&ip.dst.octets());
            p.extend_from_slice(&[0, proto]);
            p.extend_from_slice(&(len as u16).to_be_bytes());
            p
        };
        // ICMPv4 has no pseudo-header.
        let with_pseudo = !matches!(self.transport, Some(Transport::Icmp { .. }));
        self.write_l4(l4, out, headers, |len| if with_pseudo { pseudo(len) } else { Vec::new() });
    }

    fn build_v6(&self, ip: &Ipv6, out: &mut Vec<u8>, headers: &mut Vec<Header>) {
        let l3 = out.len();
        let l4 = self.transport_bytes();
        let l4_len = l4.as_ref().map_or(0, |(b, _)| b.len());
        let ext_len: usize = ip.ext.iter().map(Ext::wire_len).sum();
        let upper = ip.proto.unwrap_or_else(|| self.upper_proto());
        let first_nh = ip.ext.first().map_or(upper, Ext::kind);
        out.push(ip.version << 4);
        out.extend_from_slice(&[0, 0, 0]);
        out.extend_from_slice(&((ext_len + l4_len + self.payload.len()) as u16).to_be_bytes());
        out.push(first_nh);
        out.push(ip.hop_limit);
        out.extend_from_slice(&ip.src.octets());
        out.extend_from_slice(&ip.dst.octets());
        headers.push(Header { kind: HeaderKind::Ipv6, start: l3, end: out.len() });
        for (i, e) in ip.ext.iter().enumerate() {
            let next = ip.ext.get(i + 1).map_or(upper, Ext::kind);
            let start = out.len();
            e.write(next, out);
            headers.push(Header { kind: HeaderKind::Ipv6Ext(e.kind()), start, end: out.len() });
        }
        let pseudo = |len: usize| {
            let mut p = Vec::with_capacity(40);
            p.extend_from_slice(&ip.src.octets());
            p.extend_from_slice(&ip.dst.octets());
            p.extend_from_slice(&(len as u32).to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, upper]);
            p
        };
        self.write_l4(l4, out, headers, pseudo);
    }

    fn write_l4(
        &self,
        l4: Option<(Vec<u8>, HeaderKind)>,
        out: &mut Vec<u8>,
        headers: &mut Vec<Header>,
        pseudo: impl Fn(usize) -> Vec<u8>,
    ) {
        let start = out.len();
        if let Some((bytes, kind)) = l4 {
            out.extend_from_slice(&bytes);
            headers.push(Header { kind, start, end: out.len() });
        }
        let pstart = out.len();
        out.extend_from_slice(&self.payload);
        if !self.payload.is_empty() {
            headers.push(Header { kind: HeaderKind::Payload, start: pstart, end: out.len() });
        }
        if let Some(off) = self.checksum_offset() {
            let seg_len = out.len() - start;
            let init = sum_words(&pseudo(seg_len), 0);
            let mut sum = checksum(&out[start..], init);
            if sum == 0 && matches!(self.transport, Some(Transport::Udp { .. })) {
                sum = 0xffff; // UDP: zero means "no checksum"
            }
            out[start + off..start + off + 2].copy_from_slice(&sum.to_be_bytes());
        }
    }
}

/// A TCP SYN from `sport` to `dport`.
pub fn tcp(sport: u16, dport: u16) -> Transport {
    Transport::Tcp { sport, dport, flags: TCP_SYN, seq: 1, options: Vec::new(), doff: None }
}

fn sum_words(data: &[u8], mut acc: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc = acc.wrapping_add(u32::from(u16::from_be_bytes([c[0], c[1]])));
    }
    if let [last] = chunks.remainder() {
        acc = acc.wrapping_add(u32::from(*last) << 8);
    }
    acc
}

/// The Internet checksum (RFC 1071) of `data`, starting from a partial sum.
pub fn checksum(data: &[u8], init: u32) -> u16 {
    let mut acc = u64::from(sum_words(data, init));
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verify(data: &[u8], init: u32) -> bool {
        checksum(data, init) == 0
    }

    #[test]
    fn ipv4_udp_layout_and_checksums() {
        let f = Packet::udp4(Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2), 1000, 53).payload_len(5).build();
        assert_eq!(f.len(), 14 + 20 + 8 + 5);
        assert_eq!(&f.bytes[12..14], &[0x08, 0x00]);
        assert_eq!(f.bytes[14], 0x45);
        assert_eq!(u16::from_be_bytes([f.bytes[16], f.bytes[17]]), 33);
        assert!(verify(&f.bytes[14..34], 0), "IPv4 header checksum");
        let mut pseudo = vec![10, 0, 0, 1, 10, 0, 0, 2, 0, 17, 0, 13];
        pseudo.extend_from_slice(&f.bytes[34..]);
        assert!(verify(&pseudo, 0), "UDP checksum");
        assert_eq!(f.header(HeaderKind::Udp), Some(Header { kind: HeaderKind::Udp, start: 34, end: 42 }));
        assert_eq!(f.header_at(40).map(|h| h.kind), Some(HeaderKind::Udp));
    }

    #[test]
    fn vlan_tags_and_options() {
        let f = Packet::tcp4(Ipv4Addr::LOCALHOST, Ipv4Addr::LOCALHOST, 1, 2)
            .vlan(ETH_P_8021AD, 100)
            .vlan(ETH_P_8021Q, 200)
            .ipv4_options([1, 1, 1])
            .build();
        assert_eq!(&f.bytes[12..14], &[0x88, 0xa8]);
        assert_eq!(&f.bytes[14..18], &[0x00, 100, 0x81, 0x00]);
        assert_eq!(&f.bytes[18..22], &[0x00, 200, 0x08, 0x00]);
        assert_eq!(f.bytes[22], 0x46);
        let ip = f.header(HeaderKind::Ipv4).unwrap();
        assert_eq!((ip.start, ip.end), (22, 46));
        assert!(verify(&f.bytes[22..46], 0));
        assert_eq!(f.header(HeaderKind::Tcp).unwrap().end, 66);
    }

    #[test]
    fn ipv6_ext_chain() {
        let f = Packet::udp6(Ipv6Addr::LOCALHOST, Ipv6Addr::LOCALHOST, 7, 9)
            .ext(Ext::HopByHop { len: 0 })
            .ext(Ext::Ah { len: 4 })
            .fragment(0, true)
            .build();
        assert_eq!(f.bytes[14 + 6], IPPROTO_HOPOPTS);
        let kinds: Vec<_> = f.headers.iter().map(|h| h.kind).collect();
        assert_eq!(
            kinds,
            vec![
                HeaderKind::Ethernet,
                HeaderKind::Ipv6,
                HeaderKind::Ipv6Ext(IPPROTO_HOPOPTS),
                HeaderKind::Ipv6Ext(IPPROTO_AH),
                HeaderKind::Ipv6Ext(IPPROTO_FRAGMENT),
                HeaderKind::Udp
            ]
        );
        let hbh = f.headers[2];
        assert_eq!(f.bytes[hbh.start], IPPROTO_AH);
        let ah = f.headers[3];
        assert_eq!(ah.end - ah.start, 24);
        assert_eq!(f.bytes[ah.start], IPPROTO_FRAGMENT);
        let fr = f.headers[4];
        assert_eq!(f.bytes[fr.start], IPPROTO_UDP);
        assert_eq!(&f.bytes[fr.start + 2..fr.start + 4], &[0, 1]);
        let payload_len = u16::from_be_bytes([f.bytes[18], f.bytes[19]]) as usize;
        assert_eq!(payload_len, f.len() - 54);
    }
}
