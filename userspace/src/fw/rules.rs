//! The rule file: parsing, validation and the in-memory rule set.
//!
//! CONTRACT (shared by the compiler, the reference classifier, the CLI and state):
//! the types below. Implementation of parsing is in this file.
//!
//! # The file (TOML)
//! ```toml
//! default = "deny"                          # required: "allow" or "deny"
//! [sets]
//! blocklist = ["203.0.113.0/24", "2001:db8:bad::/48"]
//! crawlers = { file = "crawlers.txt" }      # relative to the rule file's directory
//! [[rule]]
//! action = "deny"                           # required
//! src = "@blocklist"                        # CIDR, bare address, "@set", or a list of them
//! dst = ["10.0.0.0/8", "@crawlers"]         # a list is the union of its items
//! proto = "tcp"                             # tcp, udp, icmp, icmpv6, any, or 0..=255
//! sport = [80, "1000-2000"]                 # port, "lo-hi", or a list; needs tcp, udp or any
//! dport = 443
//! comment = "free text"
//! ```
//! A set file holds one prefix per line; `#` starts a comment, blank lines are skipped.
//! Host bits set in a prefix are cleared (as iptables does); a bare address is a /32 or /128.
//! Every error names `FILE:LINE:COL` (for a set file: that file and its line).

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    ops::Range,
    path::{Path, PathBuf},
    str::FromStr,
};

use rampart_common::{fw::MAX_RULES, xdp_action};
use serde::{Deserialize, Deserializer, Serialize, Serializer, de};
use toml::Spanned;

/// IP protocol numbers with a name in rule files.
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;

/// What a rule (or the default policy) does with a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

/// An IPv4 or IPv6 prefix, host bits cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

/// An inclusive port range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

/// One item of a `src`/`dst` list: a prefix or a named set.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum AddrItem {
    Cidr(Cidr),
    Set(String),
}

/// A `src`/`dst` condition: prefixes written in the rule, or a named set, or a list mixing both
/// (the union of its items). Build it with [`AddrMatch::from_items`], which picks the one
/// canonical variant, so that equal conditions compare equal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AddrMatch {
    /// Only prefixes (at least one).
    Cidrs(Vec<Cidr>),
    /// Exactly one set and nothing else.
    Set(String),
    /// Anything else: at least one set, and more than one item. Items in written order.
    List(Vec<AddrItem>),
}

/// One rule. A `None` field matches anything.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    /// Stable id for `fw delete ID` (1-based, assigned in file order on load).
    pub id: u32,
    pub action: Action,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src: Option<AddrMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst: Option<AddrMatch>,
    /// IP protocol number (tcp = 6, udp = 17, icmp = 1, icmpv6 = 58).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proto: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sport: Option<Vec<PortRange>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dport: Option<Vec<PortRange>>,
    /// Free text from the file, shown by `fw list`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

/// A whole, validated rule set: every `@set` a rule names exists in `sets`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleSet {
    pub default: Action,
    pub sets: BTreeMap<String, Vec<Cidr>>,
    pub rules: Vec<Rule>,
}

/// Why a rule file was refused. Display: `file:line:col: message`, or `file: message`.
#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    #[error("{}: cannot read: {source}", file.display())]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `line` and `col` are 1-based; `col` counts characters.
    #[error("{}:{line}:{col}: {message}", file.display())]
    At { file: PathBuf, line: usize, col: usize, message: String },
    #[error("{}: {message}", file.display())]
    File { file: PathBuf, message: String },
}

// ---------------------------------------------------------------------------------------------
// Action, Cidr, PortRange, AddrMatch: single-value parsing and display.

impl Action {
    /// The XDP action the kernel program returns for this action.
    pub fn xdp(self) -> u32 {
        match self {
            Action::Allow => xdp_action::PASS,
            Action::Deny => xdp_action::DROP,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Action {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "allow" => Ok(Action::Allow),
            "deny" => Ok(Action::Deny),
            _ => Err(format!("bad action \"{s}\" (expected \"allow\" or \"deny\")")),
        }
    }
}

fn mask_v4(a: u32, len: u8) -> u32 {
    if len == 0 { 0 } else { a & (u32::MAX << (32 - u32::from(len))) }
}

fn mask_v6(a: u128, len: u8) -> u128 {
    if len == 0 { 0 } else { a & (u128::MAX << (128 - u32::from(len))) }
}

fn too_long(addr: IpAddr, len: u16) -> String {
    let (fam, max) = if addr.is_ipv4() { ("IPv4", 32) } else { ("IPv6", 128) };
    format!("prefix length {len} is too long for {fam} (at most {max})")
}

impl Cidr {
    /// A prefix of `addr` with host bits cleared; `len` must fit the family.
    pub fn new(addr: IpAddr, len: u8) -> Result<Cidr, String> {
        if len > Self::max_len_of(addr) {
            return Err(too_long(addr, len.into()));
        }
        let addr = match addr {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(mask_v4(u32::from(a), len))),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(mask_v6(u128::from(a), len))),
        };
        Ok(Cidr { addr, len })
    }

    fn max_len_of(addr: IpAddr) -> u8 {
        if addr.is_ipv4() { 32 } else { 128 }
    }

    /// 32 for IPv4, 128 for IPv6.
    pub fn max_len(&self) -> u8 {
        Self::max_len_of(self.addr)
    }

    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }

    /// Whether `addr` (of the same family) lies in this prefix. A v4 prefix never holds a v6
    /// address, not even a v4-mapped one, and the other way round.
    pub fn contains(&self, addr: IpAddr) -> bool {
        match (self.addr, addr) {
            (IpAddr::V4(p), IpAddr::V4(a)) => mask_v4(u32::from(a), self.len) == u32::from(p),
            (IpAddr::V6(p), IpAddr::V6(a)) => mask_v6(u128::from(a), self.len) == u128::from(p),
            _ => false,
        }
    }

    /// Whether host bits are clear and the length fits the family (what [`Cidr::new`] makes).
    pub fn is_normalized(&self) -> bool {
        Cidr::new(self.addr, self.len).is_ok_and(|c| c == *self)
    }
}

impl FromStr for Cidr {
    type Err = String;
    /// `ADDR/LEN` or a bare `ADDR` (a /32 or /128). Host bits are cleared.
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().map_err(|_| {
            if s.starts_with('@') {
                format!("bad CIDR \"{s}\": a set cannot be used here")
            } else {
                format!("bad CIDR \"{s}\": \"{a}\" is not an IPv4 or IPv6 address")
            }
        })?;
        let len = match len {
            None => Self::max_len_of(addr),
            Some(l) => {
                // Digits only: u8::from_str would also take "+8".
                if l.is_empty() || l.len() > 3 || !l.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(format!("bad CIDR \"{s}\": bad prefix length \"{l}\""));
                }
                let n: u16 = l.parse().map_err(|_| format!("bad CIDR \"{s}\": bad prefix length \"{l}\""))?;
                if n > u16::from(Self::max_len_of(addr)) {
                    return Err(format!("bad CIDR \"{s}\": {}", too_long(addr, n)));
                }
                n as u8
            }
        };
        Cidr::new(addr, len).map_err(|m| format!("bad CIDR \"{s}\": {m}"))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

// The state file holds sets of a million prefixes: their string form is the compact one.
impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Cidr;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a CIDR string")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Cidr, E> {
                s.parse().map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        self.lo <= port && port <= self.hi
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi { write!(f, "{}", self.lo) } else { write!(f, "{}-{}", self.lo, self.hi) }
    }
}

/// Set names are what TOML takes as a bare key, so `@name` needs no quoting anywhere.
pub fn check_set_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty set name".to_string());
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        return Err(format!("bad set name \"{name}\" (letters, digits, '_' and '-' only)"));
    }
    Ok(())
}

impl AddrItem {
    /// `@name` or a CIDR / bare address.
    pub fn parse(s: &str) -> Result<AddrItem, String> {
        match s.strip_prefix('@') {
            Some(name) => {
                check_set_name(name)?;
                Ok(AddrItem::Set(name.to_string()))
            }
            None => s.parse().map(AddrItem::Cidr),
        }
    }
}

impl FromStr for AddrItem {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        AddrItem::parse(s)
    }
}

impl fmt::Display for AddrItem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddrItem::Cidr(c) => c.fmt(f),
            AddrItem::Set(n) => write!(f, "@{n}"),
        }
    }
}

impl AddrMatch {
    /// The canonical condition for a non-empty list of items (see the variants).
    /// An empty list gives `Cidrs(vec![])`, which [`RuleSet::validate`] refuses.
    pub fn from_items(items: Vec<AddrItem>) -> AddrMatch {
        if items.iter().all(|i| matches!(i, AddrItem::Cidr(_))) {
            let cidrs = items
                .into_iter()
                .filter_map(|i| match i {
                    AddrItem::Cidr(c) => Some(c),
                    AddrItem::Set(_) => None,
                })
                .collect();
            return AddrMatch::Cidrs(cidrs);
        }
        if let [AddrItem::Set(name)] = items.as_slice() {
            return AddrMatch::Set(name.clone());
        }
        AddrMatch::List(items)
    }

    /// The items in written order.
    pub fn to_items(&self) -> Vec<AddrItem> {
        match self {
            AddrMatch::Cidrs(v) => v.iter().copied().map(AddrItem::Cidr).collect(),
            AddrMatch::Set(n) => vec![AddrItem::Set(n.clone())],
            AddrMatch::List(v) => v.clone(),
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            AddrMatch::Cidrs(v) => v.is_empty(),
            AddrMatch::Set(_) => false,
            AddrMatch::List(v) => v.is_empty(),
        }
    }

    /// Prefixes written in the condition itself (not those of its sets).
    pub fn inline_cidrs(&self) -> Box<dyn Iterator<Item = &Cidr> + '_> {
        match self {
            AddrMatch::Cidrs(v) => Box::new(v.iter()),
            AddrMatch::Set(_) => Box::new(std::iter::empty()),
            AddrMatch::List(v) => Box::new(v.iter().filter_map(|i| match i {
                AddrItem::Cidr(c) => Some(c),
                AddrItem::Set(_) => None,
            })),
        }
    }

    /// Names of the sets the condition uses, in written order (duplicates kept).
    pub fn set_names(&self) -> Box<dyn Iterator<Item = &str> + '_> {
        match self {
            AddrMatch::Cidrs(_) => Box::new(std::iter::empty()),
            AddrMatch::Set(n) => Box::new(std::iter::once(n.as_str())),
            AddrMatch::List(v) => Box::new(v.iter().filter_map(|i| match i {
                AddrItem::Cidr(_) => None,
                AddrItem::Set(n) => Some(n.as_str()),
            })),
        }
    }

    /// Every prefix the condition stands for: its own, then those of its sets (a set missing
    /// from `sets` contributes nothing).
    pub fn expand<'a>(&'a self, sets: &'a BTreeMap<String, Vec<Cidr>>) -> impl Iterator<Item = &'a Cidr> + 'a {
        self.inline_cidrs()
            .chain(self.set_names().flat_map(move |n| sets.get(n).map(|v| v.iter()).into_iter().flatten()))
    }
}

impl fmt::Display for AddrMatch {
    /// Comma-separated items, as `parse_addr_match` reads them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, item) in self.to_items().iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            item.fmt(f)?;
        }
        Ok(())
    }
}

// In the state file a condition is the list of its items as strings: `["10.0.0.0/8", "@x"]`.
impl Serialize for AddrMatch {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.to_items().iter().map(|i| i.to_string()))
    }
}

impl<'de> Deserialize<'de> for AddrMatch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let items: Vec<String> = Vec::deserialize(d)?;
        if items.is_empty() {
            return Err(de::Error::custom("empty address list"));
        }
        let items = items.iter().map(|s| AddrItem::parse(s)).collect::<Result<Vec<_>, _>>();
        items.map(AddrMatch::from_items).map_err(de::Error::custom)
    }
}

/// The name rule files use for a protocol number, if it has one.
pub fn proto_name(p: u8) -> Option<&'static str> {
    match p {
        PROTO_TCP => Some("tcp"),
        PROTO_UDP => Some("udp"),
        PROTO_ICMP => Some("icmp"),
        PROTO_ICMPV6 => Some("icmpv6"),
        _ => None,
    }
}

fn proto_display(p: u8) -> String {
    proto_name(p).map_or_else(|| p.to_string(), str::to_string)
}

/// `src`/`dst` of `fw add`: comma-separated CIDRs, bare addresses and `@set`s.
pub fn parse_addr_match(s: &str) -> Result<AddrMatch, String> {
    let mut items = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        if part.is_empty() {
            return Err(format!("empty item in address list \"{s}\""));
        }
        items.push(AddrItem::parse(part)?);
    }
    Ok(AddrMatch::from_items(items))
}

/// `proto`: `tcp`, `udp`, `icmp`, `icmpv6`, `any` (→ `None`) or a number 0..=255.
pub fn parse_proto(s: &str) -> Result<Option<u8>, String> {
    let t = s.trim();
    match t.to_ascii_lowercase().as_str() {
        "any" => return Ok(None),
        "tcp" => return Ok(Some(PROTO_TCP)),
        "udp" => return Ok(Some(PROTO_UDP)),
        "icmp" => return Ok(Some(PROTO_ICMP)),
        "icmpv6" => return Ok(Some(PROTO_ICMPV6)),
        _ => {}
    }
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        return match t.parse::<u64>() {
            Ok(n) => proto_number(i128::from(n)),
            Err(_) => proto_number(i128::MAX),
        };
    }
    Err(format!("unknown protocol \"{s}\" (expected tcp, udp, icmp, icmpv6, any or a number 0-255)"))
}

fn proto_number(n: i128) -> Result<Option<u8>, String> {
    u8::try_from(n).map(Some).map_err(|_| format!("protocol number {n} is out of range (0-255)"))
}

fn port_number(n: i128) -> Result<u16, String> {
    u16::try_from(n).map_err(|_| format!("port {n} is out of range (0-65535)"))
}

fn parse_port_number(s: &str) -> Result<u16, String> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("bad port \"{s}\""));
    }
    // Digit strings too long for u64 are still "out of range", not "bad".
    port_number(s.parse::<u64>().map_or(i128::MAX, i128::from))
}

/// One port item: `N` or `LO-HI`.
pub fn parse_port_range(s: &str) -> Result<PortRange, String> {
    let t = s.trim();
    let range = match t.split_once('-') {
        Some((lo, hi)) => PortRange { lo: parse_port_number(lo.trim())?, hi: parse_port_number(hi.trim())? },
        None => {
            let p = parse_port_number(t)?;
            PortRange { lo: p, hi: p }
        }
    };
    check_range(range)?;
    Ok(range)
}

fn check_range(r: PortRange) -> Result<(), String> {
    if r.lo > r.hi {
        return Err(format!("port range {}-{}: the low end is above the high end", r.lo, r.hi));
    }
    Ok(())
}

/// `sport`/`dport` of `fw add`: comma-separated ports and `lo-hi` ranges.
pub fn parse_ports(s: &str) -> Result<Vec<PortRange>, String> {
    let mut out = Vec::new();
    for part in s.split(',') {
        if part.trim().is_empty() {
            return Err(format!("empty item in port list \"{s}\""));
        }
        out.push(parse_port_range(part)?);
    }
    Ok(out)
}

/// Ports only exist for TCP and UDP; `proto = any` rules then match TCP and UDP packets only.
fn check_ports_proto(proto: Option<u8>, field: &str) -> Result<(), String> {
    match proto {
        None | Some(PROTO_TCP) | Some(PROTO_UDP) => Ok(()),
        Some(p) => Err(format!("{field} needs proto tcp, udp or any, but the rule has proto {}", proto_display(p))),
    }
}

fn join_ports(ports: &[PortRange]) -> String {
    ports.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(",")
}

impl fmt::Display for Rule {
    /// One line, fields in `fw add` flag form: `allow proto tcp dport 80,443 src 10.0.0.0/8`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.action.as_str())?;
        if let Some(p) = self.proto {
            write!(f, " proto {}", proto_display(p))?;
        }
        if let Some(p) = &self.sport {
            write!(f, " sport {}", join_ports(p))?;
        }
        if let Some(p) = &self.dport {
            write!(f, " dport {}", join_ports(p))?;
        }
        if let Some(a) = &self.src {
            write!(f, " src {a}")?;
        }
        if let Some(a) = &self.dst {
            write!(f, " dst {a}")?;
        }
        if let Some(c) = &self.comment {
            write!(f, " comment {}", toml_string(c))?;
        }
        Ok(())
    }
}

/// A TOML basic string (also a readable quoted form for `Display`).
fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

// ---------------------------------------------------------------------------------------------
// RuleSet: validation and writing back.

impl RuleSet {
    /// The checks parsing makes, for a rule set edited in memory (`fw add`, `fw set …`):
    /// rule count, set names, every `@set` defined, no empty list, prefixes normalized, port
    /// ranges ordered, ports only with tcp/udp/any, unique rule ids.
    pub fn validate(&self) -> Result<(), String> {
        if self.rules.len() > MAX_RULES as usize {
            return Err(format!("too many rules: {} (at most {MAX_RULES})", self.rules.len()));
        }
        for (name, cidrs) in &self.sets {
            check_set_name(name)?;
            if let Some(c) = cidrs.iter().find(|c| !c.is_normalized()) {
                return Err(format!("set \"{name}\": prefix {}/{} is not normalized", c.addr, c.len));
            }
        }
        let mut ids = std::collections::HashSet::new();
        for rule in &self.rules {
            let who = format!("rule {}", rule.id);
            if !ids.insert(rule.id) {
                return Err(format!("{who}: duplicate rule id"));
            }
            for (field, m) in [("src", &rule.src), ("dst", &rule.dst)] {
                let Some(m) = m else { continue };
                if m.is_empty() {
                    return Err(format!("{who}: {field} is an empty list"));
                }
                if let Some(c) = m.inline_cidrs().find(|c| !c.is_normalized()) {
                    return Err(format!("{who}: {field}: prefix {}/{} is not normalized", c.addr, c.len));
                }
                for name in m.set_names() {
                    check_set_name(name).map_err(|e| format!("{who}: {field}: {e}"))?;
                    if !self.sets.contains_key(name) {
                        return Err(format!("{who}: {field}: unknown set \"@{name}\""));
                    }
                }
            }
            for (field, p) in [("sport", &rule.sport), ("dport", &rule.dport)] {
                let Some(p) = p else { continue };
                if p.is_empty() {
                    return Err(format!("{who}: {field} is an empty list"));
                }
                for r in p {
                    check_range(*r).map_err(|e| format!("{who}: {field}: {e}"))?;
                }
                check_ports_proto(rule.proto, field).map_err(|e| format!("{who}: {e}"))?;
            }
        }
        Ok(())
    }

    /// The rule file for this set (sets written inline). Parsing it gives back an equal rule
    /// set, except rule ids: the file has none, so they come back as 1..=n in order.
    pub fn to_toml(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!("default = \"{}\"\n", self.default));
        if !self.sets.is_empty() {
            s.push_str("\n[sets]\n");
            for (name, cidrs) in &self.sets {
                let key = if check_set_name(name).is_ok() { name.clone() } else { toml_string(name) };
                if cidrs.is_empty() {
                    s.push_str(&format!("{key} = []\n"));
                    continue;
                }
                s.push_str(&format!("{key} = [\n"));
                for c in cidrs {
                    s.push_str(&format!("    \"{c}\",\n"));
                }
                s.push_str("]\n");
            }
        }
        for rule in &self.rules {
            s.push_str("\n[[rule]]\n");
            s.push_str(&format!("action = \"{}\"\n", rule.action));
            if let Some(p) = rule.proto {
                match proto_name(p) {
                    Some(n) => s.push_str(&format!("proto = \"{n}\"\n")),
                    None => s.push_str(&format!("proto = {p}\n")),
                }
            }
            for (field, ports) in [("sport", &rule.sport), ("dport", &rule.dport)] {
                if let Some(ports) = ports {
                    let item = |p: &PortRange| if p.lo == p.hi { p.lo.to_string() } else { format!("\"{p}\"") };
                    let items: Vec<String> = ports.iter().map(item).collect();
                    s.push_str(&format!("{field} = [{}]\n", items.join(", ")));
                }
            }
            for (field, m) in [("src", &rule.src), ("dst", &rule.dst)] {
                if let Some(m) = m {
                    let items: Vec<String> = m.to_items().iter().map(|i| format!("\"{i}\"")).collect();
                    s.push_str(&format!("{field} = [{}]\n", items.join(", ")));
                }
            }
            if let Some(c) = &rule.comment {
                s.push_str(&format!("comment = {}\n", toml_string(c)));
            }
        }
        s
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing the file. TOML first deserializes into the Raw* types, which keep every value's span;
// the semantic checks that follow use those spans to name the line of what is wrong.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    default: Spanned<String>,
    #[serde(default)]
    sets: BTreeMap<Spanned<String>, Spanned<RawSet>>,
    #[serde(default, rename = "rule")]
    rules: Vec<Spanned<RawRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    action: Spanned<String>,
    src: Option<Spanned<RawAddr>>,
    dst: Option<Spanned<RawAddr>>,
    proto: Option<Spanned<RawProto>>,
    sport: Option<Spanned<RawPorts>>,
    dport: Option<Spanned<RawPorts>>,
    comment: Option<String>,
}

enum RawSet {
    Inline(Vec<Spanned<String>>),
    File(Spanned<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSetFile {
    file: Spanned<String>,
}

enum RawAddr {
    One(String),
    List(Vec<Spanned<String>>),
}

enum RawProto {
    Name(String),
    Number(i128),
}

enum RawPort {
    Number(i128),
    Text(String),
}

enum RawPorts {
    One(RawPort),
    List(Vec<Spanned<RawPort>>),
}

impl<'de> Deserialize<'de> for RawSet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = RawSet;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of prefixes or { file = \"PATH\" }")
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<RawSet, A::Error> {
                let mut v = Vec::new();
                while let Some(x) = seq.next_element()? {
                    v.push(x);
                }
                Ok(RawSet::Inline(v))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<RawSet, A::Error> {
                let f = RawSetFile::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(RawSet::File(f.file))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for RawAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = RawAddr;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a CIDR, an address, \"@set\", or a list of them")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<RawAddr, E> {
                Ok(RawAddr::One(s.to_string()))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<RawAddr, A::Error> {
                let mut v = Vec::new();
                while let Some(x) = seq.next_element()? {
                    v.push(x);
                }
                Ok(RawAddr::List(v))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for RawProto {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = RawProto;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a protocol name or number")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<RawProto, E> {
                Ok(RawProto::Name(s.to_string()))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<RawProto, E> {
                Ok(RawProto::Number(n.into()))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<RawProto, E> {
                Ok(RawProto::Number(n.into()))
            }
        }
        d.deserialize_any(V)
    }
}

struct PortVisitor;

impl de::Visitor<'_> for PortVisitor {
    type Value = RawPort;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a port number or a \"lo-hi\" range")
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<RawPort, E> {
        Ok(RawPort::Text(s.to_string()))
    }
    fn visit_i64<E: de::Error>(self, n: i64) -> Result<RawPort, E> {
        Ok(RawPort::Number(n.into()))
    }
    fn visit_u64<E: de::Error>(self, n: u64) -> Result<RawPort, E> {
        Ok(RawPort::Number(n.into()))
    }
}

impl<'de> Deserialize<'de> for RawPort {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(PortVisitor)
    }
}

impl<'de> Deserialize<'de> for RawPorts {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = RawPorts;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port, a \"lo-hi\" range, or a list of them")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<RawPorts, E> {
                PortVisitor.visit_str(s).map(RawPorts::One)
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<RawPorts, E> {
                PortVisitor.visit_i64(n).map(RawPorts::One)
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<RawPorts, E> {
                PortVisitor.visit_u64(n).map(RawPorts::One)
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<RawPorts, A::Error> {
                let mut v = Vec::new();
                while let Some(x) = seq.next_element()? {
                    v.push(x);
                }
                Ok(RawPorts::List(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// The file being parsed: turns byte spans into `file:line:col` errors.
struct Ctx<'a> {
    text: &'a str,
    file: &'a Path,
}

/// 1-based line and character column of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

impl Ctx<'_> {
    fn at(&self, span: Range<usize>, message: impl Into<String>) -> RuleError {
        let (line, col) = line_col(self.text, span.start);
        RuleError::At { file: self.file.to_path_buf(), line, col, message: message.into() }
    }

    fn toml_error(&self, e: &toml::de::Error) -> RuleError {
        let mut message = e.message().trim().to_string();
        if message == "missing field `default`" {
            message.push_str(" (the policy for packets no rule matches: \"allow\" or \"deny\")");
        }
        match e.span() {
            Some(span) => self.at(span, message),
            None => RuleError::File { file: self.file.to_path_buf(), message },
        }
    }
}

/// Reads and validates a rule file (and the set files it names).
pub fn parse_file(path: &Path) -> Result<RuleSet, RuleError> {
    let text = std::fs::read_to_string(path).map_err(|source| RuleError::Read { file: path.to_path_buf(), source })?;
    parse_str(&text, path)
}

/// Parses rule-file text. `origin` names the file in errors, and set files are read relative
/// to its directory.
pub fn parse_str(text: &str, origin: &Path) -> Result<RuleSet, RuleError> {
    let ctx = Ctx { text, file: origin };
    let raw: RawFile = toml::from_str(text).map_err(|e| ctx.toml_error(&e))?;
    let default = raw.default.get_ref().parse::<Action>().map_err(|_| {
        ctx.at(
            raw.default.span(),
            format!("bad default \"{}\" (expected \"allow\" or \"deny\")", raw.default.get_ref()),
        )
    })?;

    let mut sets = BTreeMap::new();
    for (name, value) in &raw.sets {
        check_set_name(name.get_ref()).map_err(|m| ctx.at(name.span(), m))?;
        let cidrs = match value.get_ref() {
            RawSet::Inline(items) => items
                .iter()
                .map(|i| {
                    i.get_ref()
                        .trim()
                        .parse::<Cidr>()
                        .map_err(|m| ctx.at(i.span(), format!("set \"{}\": {m}", name.get_ref())))
                })
                .collect::<Result<Vec<_>, _>>()?,
            RawSet::File(file) => read_set_file(&ctx, name.get_ref(), file)?,
        };
        sets.insert(name.get_ref().clone(), cidrs);
    }

    if raw.rules.len() > MAX_RULES as usize {
        let extra = &raw.rules[MAX_RULES as usize];
        return Err(ctx.at(extra.span(), format!("too many rules: {} (at most {MAX_RULES})", raw.rules.len())));
    }
    let mut rules = Vec::with_capacity(raw.rules.len());
    for (i, raw_rule) in raw.rules.iter().enumerate() {
        rules.push(build_rule(&ctx, (i + 1) as u32, raw_rule.get_ref(), &sets)?);
    }
    let rs = RuleSet { default, sets, rules };
    // Every check above has a position; this one is a backstop that keeps parse and validate
    // from drifting apart.
    rs.validate().map_err(|message| RuleError::File { file: origin.to_path_buf(), message })?;
    Ok(rs)
}

fn read_set_file(ctx: &Ctx<'_>, name: &str, file: &Spanned<String>) -> Result<Vec<Cidr>, RuleError> {
    let dir = ctx.file.parent().unwrap_or(Path::new(""));
    let path = dir.join(file.get_ref());
    let text = std::fs::read_to_string(&path)
        .map_err(|e| ctx.at(file.span(), format!("set \"{name}\": cannot read {}: {e}", path.display())))?;
    parse_set_text(&text, &path).map_err(|e| match e {
        RuleError::At { file: set_file, line, col, message } => {
            let (rl, rc) = line_col(ctx.text, file.span().start);
            let message = format!("{message} (set \"{name}\", named at {}:{rl}:{rc})", ctx.file.display());
            RuleError::At { file: set_file, line, col, message }
        }
        other => other,
    })
}

/// Reads a set file on its own (as `fw set NAME load` does): one prefix per line, `#` starts a
/// comment, blank lines are skipped, host bits are cleared — the format of `{ file = … }` sets.
/// Errors: [`RuleError::Read`], or [`RuleError::At`] naming `path`, the line and the column.
pub fn parse_set_file(path: &Path) -> Result<Vec<Cidr>, RuleError> {
    let text = std::fs::read_to_string(path).map_err(|source| RuleError::Read { file: path.to_path_buf(), source })?;
    parse_set_text(&text, path)
}

/// The lines of set file `path` (already read as `text`).
fn parse_set_text(text: &str, path: &Path) -> Result<Vec<Cidr>, RuleError> {
    let mut out = Vec::with_capacity(text.len() / 16);
    for (i, line) in text.lines().enumerate() {
        let body = line.split_once('#').map_or(line, |(b, _)| b);
        let item = body.trim();
        if item.is_empty() {
            continue;
        }
        match item.parse::<Cidr>() {
            Ok(c) => out.push(c),
            Err(message) => {
                let lead = body.len() - body.trim_start().len();
                let col = body[..lead].chars().count() + 1;
                return Err(RuleError::At { file: path.to_path_buf(), line: i + 1, col, message });
            }
        }
    }
    Ok(out)
}

fn build_addr(
    ctx: &Ctx<'_>,
    field: &str,
    raw: &Option<Spanned<RawAddr>>,
    sets: &BTreeMap<String, Vec<Cidr>>,
) -> Result<Option<AddrMatch>, RuleError> {
    let Some(raw) = raw else { return Ok(None) };
    let one = |s: &str, span: Range<usize>| -> Result<AddrItem, RuleError> {
        let item = AddrItem::parse(s.trim()).map_err(|m| ctx.at(span.clone(), format!("{field}: {m}")))?;
        if let AddrItem::Set(name) = &item
            && !sets.contains_key(name)
        {
            let known = if sets.is_empty() {
                "no sets are defined".to_string()
            } else {
                let names: Vec<String> = sets.keys().take(10).map(|n| format!("@{n}")).collect();
                format!("defined: {}{}", names.join(", "), if sets.len() > 10 { ", …" } else { "" })
            };
            return Err(ctx.at(span, format!("{field}: unknown set \"@{name}\" ({known})")));
        }
        Ok(item)
    };
    let items = match raw.get_ref() {
        RawAddr::One(s) => vec![one(s, raw.span())?],
        RawAddr::List(v) => {
            if v.is_empty() {
                return Err(ctx.at(raw.span(), format!("{field} is an empty list (leave it out to match any address)")));
            }
            v.iter().map(|i| one(i.get_ref(), i.span())).collect::<Result<Vec<_>, _>>()?
        }
    };
    Ok(Some(AddrMatch::from_items(items)))
}

fn raw_port(p: &RawPort) -> Result<PortRange, String> {
    match p {
        RawPort::Number(n) => port_number(*n).map(|p| PortRange { lo: p, hi: p }),
        RawPort::Text(s) => parse_port_range(s),
    }
}

fn build_ports(
    ctx: &Ctx<'_>,
    field: &str,
    raw: &Option<Spanned<RawPorts>>,
) -> Result<Option<Vec<PortRange>>, RuleError> {
    let Some(raw) = raw else { return Ok(None) };
    let ports = match raw.get_ref() {
        RawPorts::One(p) => vec![raw_port(p).map_err(|m| ctx.at(raw.span(), format!("{field}: {m}")))?],
        RawPorts::List(v) => {
            if v.is_empty() {
                return Err(ctx.at(raw.span(), format!("{field} is an empty list (leave it out to match any port)")));
            }
            v.iter()
                .map(|p| raw_port(p.get_ref()).map_err(|m| ctx.at(p.span(), format!("{field}: {m}"))))
                .collect::<Result<Vec<_>, _>>()?
        }
    };
    Ok(Some(ports))
}

fn build_rule(ctx: &Ctx<'_>, id: u32, raw: &RawRule, sets: &BTreeMap<String, Vec<Cidr>>) -> Result<Rule, RuleError> {
    let action = raw.action.get_ref().parse::<Action>().map_err(|m| ctx.at(raw.action.span(), m))?;
    let proto = match &raw.proto {
        None => None,
        Some(p) => match p.get_ref() {
            RawProto::Name(s) => parse_proto(s),
            RawProto::Number(n) => proto_number(*n),
        }
        .map_err(|m| ctx.at(p.span(), format!("proto: {m}")))?,
    };
    let src = build_addr(ctx, "src", &raw.src, sets)?;
    let dst = build_addr(ctx, "dst", &raw.dst, sets)?;
    let sport = build_ports(ctx, "sport", &raw.sport)?;
    let dport = build_ports(ctx, "dport", &raw.dport)?;
    for (field, raw_ports) in [("sport", &raw.sport), ("dport", &raw.dport)] {
        if let Some(r) = raw_ports {
            check_ports_proto(proto, field).map_err(|m| ctx.at(r.span(), m))?;
        }
    }
    Ok(Rule { id, action, src, dst, proto, sport, dport, comment: raw.comment.clone() })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    /// A scratch directory, removed on drop (also when a test fails).
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            static N: AtomicU32 = AtomicU32::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let p = std::env::temp_dir().join(format!("rampart-rules-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&p).expect("create temp dir");
            TempDir(p)
        }
        fn write(&self, name: &str, text: &str) -> PathBuf {
            let p = self.0.join(name);
            std::fs::write(&p, text).expect("write temp file");
            p
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn cidr(s: &str) -> Cidr {
        s.parse().expect(s)
    }

    fn parse(text: &str) -> Result<RuleSet, RuleError> {
        parse_str(text, Path::new("/etc/rampart/test.toml"))
    }

    /// Parses `text`, expects an error at `line` whose message contains `needle`.
    fn err_at(text: &str, line: usize, needle: &str) -> String {
        let e = parse(text).expect_err("should be refused").to_string();
        let prefix = format!("/etc/rampart/test.toml:{line}:");
        assert!(e.starts_with(&prefix), "error {e:?} should start with {prefix:?}");
        assert!(e.contains(needle), "error {e:?} should mention {needle:?}");
        e
    }

    const ISSUE_EXAMPLE: &str = r#"default = "deny"

[sets]
blocklist = ["203.0.113.0/24", "2001:db8:bad::/48"]
crawlers = { file = "crawlers.txt" }

[[rule]]
action = "deny"
src = "@blocklist"

[[rule]]
action = "allow"
proto = "tcp"
dport = [80, 443]

[[rule]]
action = "allow"
proto = "tcp"
src = "198.51.100.0/24"
dport = 22

[[rule]]
action = "allow"
proto = "icmp"
"#;

    #[test]
    fn issue_example_parses() {
        let dir = TempDir::new();
        dir.write("crawlers.txt", "# crawlers\n66.249.64.0/19\n\n  157.55.39.0/24   # bing\r\n2001:4860::/32\n");
        let path = dir.write("rules.toml", ISSUE_EXAMPLE);
        let rs = parse_file(&path).expect("parses");
        assert_eq!(rs.default, Action::Deny);
        assert_eq!(rs.sets["blocklist"], vec![cidr("203.0.113.0/24"), cidr("2001:db8:bad::/48")]);
        assert_eq!(rs.sets["crawlers"], vec![cidr("66.249.64.0/19"), cidr("157.55.39.0/24"), cidr("2001:4860::/32")]);
        assert_eq!(rs.rules.len(), 4);
        assert_eq!(rs.rules.iter().map(|r| r.id).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
        assert_eq!(
            rs.rules[0],
            Rule {
                id: 1,
                action: Action::Deny,
                src: Some(AddrMatch::Set("blocklist".into())),
                dst: None,
                proto: None,
                sport: None,
                dport: None,
                comment: None
            }
        );
        assert_eq!(rs.rules[1].proto, Some(PROTO_TCP));
        assert_eq!(rs.rules[1].dport, Some(vec![PortRange { lo: 80, hi: 80 }, PortRange { lo: 443, hi: 443 }]));
        assert_eq!(rs.rules[2].src, Some(AddrMatch::Cidrs(vec![cidr("198.51.100.0/24")])));
        assert_eq!(rs.rules[2].dport, Some(vec![PortRange { lo: 22, hi: 22 }]));
        assert_eq!(rs.rules[3].proto, Some(PROTO_ICMP));
        assert_eq!(rs.rules[3].to_string(), "allow proto icmp");
        assert_eq!(rs.rules[1].to_string(), "allow proto tcp dport 80,443");
    }

    #[test]
    fn field_forms() {
        let rs = parse(
            r#"default = "allow"
[sets]
a = ["10.0.0.0/8"]
b = []
[[rule]]
action = "deny"
src = ["10.1.2.3", "@a", "2001:db8::1", "192.168.7.255/16"]
dst = ["@a", "@b"]
proto = 47
[[rule]]
action = "allow"
proto = "any"
sport = "1000-2000"
dport = [53, "60000-65535", "7"]
comment = "dns \"and\" more"
[[rule]]
action = "deny"
proto = "UDP"
dst = ["0.0.0.0/0"]
[[rule]]
action = "deny"
proto = "icmpv6"
src = ["@a"]
"#,
        )
        .expect("parses");
        let r = &rs.rules;
        assert_eq!(
            r[0].src,
            Some(AddrMatch::List(vec![
                AddrItem::Cidr(cidr("10.1.2.3/32")),
                AddrItem::Set("a".into()),
                AddrItem::Cidr(cidr("2001:db8::1/128")),
                AddrItem::Cidr(cidr("192.168.0.0/16")),
            ]))
        );
        assert_eq!(r[0].dst, Some(AddrMatch::List(vec![AddrItem::Set("a".into()), AddrItem::Set("b".into())])));
        assert_eq!(r[0].proto, Some(47));
        assert_eq!(r[1].proto, None);
        assert_eq!(r[1].sport, Some(vec![PortRange { lo: 1000, hi: 2000 }]));
        assert_eq!(
            r[1].dport,
            Some(vec![PortRange { lo: 53, hi: 53 }, PortRange { lo: 60000, hi: 65535 }, PortRange { lo: 7, hi: 7 }])
        );
        assert_eq!(r[1].comment.as_deref(), Some("dns \"and\" more"));
        assert_eq!(r[2].proto, Some(PROTO_UDP));
        assert_eq!(r[2].dst, Some(AddrMatch::Cidrs(vec![cidr("0.0.0.0/0")])));
        // A one-item list naming a set is the set itself.
        assert_eq!(r[3].src, Some(AddrMatch::Set("a".into())));
        assert_eq!(r[0].to_string(), "deny proto 47 src 10.1.2.3/32,@a,2001:db8::1/128,192.168.0.0/16 dst @a,@b");
        assert_eq!(r[1].to_string(), "allow sport 1000-2000 dport 53,60000-65535,7 comment \"dns \\\"and\\\" more\"");
    }

    #[test]
    fn host_bits_cleared() {
        assert_eq!(cidr("10.1.2.3/8"), Cidr { addr: "10.0.0.0".parse().unwrap(), len: 8 });
        assert_eq!(cidr("2001:db8:ffff::1/33"), Cidr { addr: "2001:db8:8000::".parse().unwrap(), len: 33 });
        assert_eq!(cidr("1.2.3.4/0"), Cidr { addr: "0.0.0.0".parse().unwrap(), len: 0 });
        assert_eq!(cidr("1.2.3.4"), Cidr { addr: "1.2.3.4".parse().unwrap(), len: 32 });
        assert_eq!(cidr("::1"), Cidr { addr: "::1".parse().unwrap(), len: 128 });
        assert_eq!(cidr("::1/128").to_string(), "::1/128");
        assert_eq!(cidr("10.9.8.7/31").to_string(), "10.9.8.6/31");
        let rs = parse("default = \"deny\"\n[sets]\ns = [\"10.255.255.255/8\"]\n").unwrap();
        assert_eq!(rs.sets["s"], vec![cidr("10.0.0.0/8")]);
    }

    #[test]
    fn cidr_errors() {
        for (s, needle) in [
            ("10.0.0.0/33", "prefix length 33 is too long for IPv4 (at most 32)"),
            ("::/129", "prefix length 129 is too long for IPv6 (at most 128)"),
            ("10.0.0.0/999", "too long"),
            ("10.0.0.0/", "bad prefix length"),
            ("10.0.0.0/+8", "bad prefix length"),
            ("10.0.0.0/8/8", "bad prefix length"),
            ("10.0.0.256/8", "not an IPv4 or IPv6 address"),
            ("example.com", "not an IPv4 or IPv6 address"),
            ("", "not an IPv4 or IPv6 address"),
            ("@set", "a set cannot be used here"),
        ] {
            let e = s.parse::<Cidr>().expect_err(s);
            assert!(e.contains(needle), "{s}: {e}");
        }
    }

    #[test]
    fn contains_respects_family() {
        let v4 = cidr("0.0.0.0/0");
        assert!(v4.contains("1.2.3.4".parse().unwrap()));
        assert!(!v4.contains("::ffff:1.2.3.4".parse().unwrap()));
        let v6 = cidr("::/0");
        assert!(!v6.contains("1.2.3.4".parse().unwrap()));
        let p = cidr("10.1.0.0/16");
        assert!(p.contains("10.1.255.255".parse().unwrap()));
        assert!(!p.contains("10.2.0.0".parse().unwrap()));
    }

    #[test]
    fn error_unknown_field() {
        err_at("default = \"deny\"\n[[rule]]\naction = \"allow\"\ndprot = 80\n", 4, "unknown field `dprot`");
        err_at("default = \"deny\"\npolicy = \"x\"\n", 2, "unknown field `policy`");
        err_at("default = \"deny\"\n[sets]\nx = { file = \"a\", fmt = 1 }\n", 3, "unknown field `fmt`");
    }

    #[test]
    fn error_bad_cidr() {
        let e = err_at("default = \"deny\"\n[[rule]]\naction = \"deny\"\nsrc = \"10.0.0.300/8\"\n", 4, "bad CIDR");
        assert!(e.starts_with("/etc/rampart/test.toml:4:7: src: bad CIDR \"10.0.0.300/8\""), "{e}");
        // In a list, the item's own column.
        let e = err_at(
            "default = \"deny\"\n[[rule]]\naction = \"deny\"\ndst = [\"10.0.0.0/8\", \"nope\"]\n",
            4,
            "dst: bad CIDR \"nope\"",
        );
        assert!(e.starts_with("/etc/rampart/test.toml:4:22:"), "{e}");
        err_at(
            "default = \"deny\"\n[sets]\ns = [\n  \"1.2.3.0/24\",\n  \"1.2.3.0/xx\",\n]\n",
            5,
            "set \"s\": bad CIDR",
        );
        err_at("default = \"deny\"\n[[rule]]\naction = \"deny\"\nsrc = \"@bad name\"\n", 4, "bad set name");
    }

    #[test]
    fn error_prefix_too_long() {
        err_at("default = \"deny\"\n[[rule]]\naction = \"deny\"\nsrc = \"10.0.0.0/33\"\n", 4, "too long for IPv4");
        err_at("default = \"deny\"\n[[rule]]\naction = \"deny\"\n\nsrc = [\"::/130\"]\n", 5, "too long for IPv6");
    }

    #[test]
    fn error_ports() {
        err_at(
            "default = \"deny\"\n[[rule]]\naction = \"deny\"\ndport = 70000\n",
            4,
            "port 70000 is out of range (0-65535)",
        );
        err_at("default = \"deny\"\n[[rule]]\naction = \"deny\"\ndport = -1\n", 4, "port -1 is out of range");
        err_at(
            "default = \"deny\"\n[[rule]]\naction = \"deny\"\nsport = [1, \"80-70000\"]\n",
            4,
            "port 70000 is out of range",
        );
        err_at(
            "default = \"deny\"\n[[rule]]\naction = \"deny\"\nsport = \"90-80\"\n",
            4,
            "low end is above the high end",
        );
        err_at("default = \"deny\"\n[[rule]]\naction = \"deny\"\nsport = \"http\"\n", 4, "bad port \"http\"");
        err_at("default = \"deny\"\n[[rule]]\naction = \"deny\"\nsport = [1.5]\n", 4, "invalid type");
    }

    #[test]
    fn error_ports_need_tcp_udp_or_any() {
        for proto in ["\"icmp\"", "\"icmpv6\"", "47", "1"] {
            let text = format!("default = \"deny\"\n[[rule]]\naction = \"deny\"\nproto = {proto}\ndport = 80\n");
            err_at(&text, 5, "dport needs proto tcp, udp or any");
        }
        err_at(
            "default = \"deny\"\n[[rule]]\naction = \"deny\"\nsport = 80\nproto = \"icmp\"\n",
            4,
            "sport needs proto tcp, udp or any, but the rule has proto icmp",
        );
        for proto in ["\"tcp\"", "\"udp\"", "\"any\"", "6", "17"] {
            let text = format!("default = \"deny\"\n[[rule]]\naction = \"deny\"\nproto = {proto}\ndport = 80\n");
            parse(&text).expect(proto);
        }
    }

    #[test]
    fn error_unknown_set() {
        let e = err_at(
            "default = \"deny\"\n[sets]\nknown = []\n[[rule]]\naction = \"deny\"\nsrc = \"@x\"\n",
            6,
            "unknown set \"@x\"",
        );
        assert!(e.contains("defined: @known"), "{e}");
        let e = err_at(
            "default = \"deny\"\n[[rule]]\naction = \"deny\"\ndst = [\"1.2.3.4\", \"@nope\"]\n",
            4,
            "dst: unknown set \"@nope\" (no sets are defined)",
        );
        assert!(e.starts_with("/etc/rampart/test.toml:4:19:"), "{e}");
    }

    #[test]
    fn error_empty_list() {
        err_at("default = \"deny\"\n[[rule]]\naction = \"deny\"\nsrc = []\n", 4, "src is an empty list");
        err_at("default = \"deny\"\n[[rule]]\naction = \"deny\"\ndst = []\n", 4, "dst is an empty list");
        err_at("default = \"deny\"\n[[rule]]\naction = \"deny\"\ndport = []\n", 4, "dport is an empty list");
        err_at("default = \"deny\"\n[[rule]]\naction = \"deny\"\nsport = []\n", 4, "sport is an empty list");
    }

    #[test]
    fn error_proto() {
        err_at("default = \"deny\"\n[[rule]]\naction = \"deny\"\nproto = \"sctp\"\n", 4, "unknown protocol \"sctp\"");
        err_at(
            "default = \"deny\"\n[[rule]]\naction = \"deny\"\nproto = 256\n",
            4,
            "protocol number 256 is out of range (0-255)",
        );
        err_at(
            "default = \"deny\"\n[[rule]]\naction = \"deny\"\nproto = -3\n",
            4,
            "protocol number -3 is out of range",
        );
        err_at(
            "default = \"deny\"\n[[rule]]\naction = \"deny\"\nproto = \"300\"\n",
            4,
            "protocol number 300 is out of range",
        );
    }

    #[test]
    fn error_action_and_default() {
        err_at("default = \"deny\"\n[[rule]]\nproto = \"tcp\"\n", 2, "missing field `action`");
        err_at("default = \"deny\"\n[[rule]]\naction = \"drop\"\n", 3, "bad action \"drop\"");
        err_at("default = \"reject\"\n", 1, "bad default \"reject\"");
        err_at("[[rule]]\naction = \"deny\"\n", 1, "missing field `default`");
        err_at("default = \"deny\"\n[[rule]]\naction = 1\n", 3, "invalid type: integer `1`, expected a string");
        err_at("default = \"deny\"\n\n[[rule]\n", 3, "");
        err_at("default = \"deny\"\n[[rule]]\naction = \"deny\"\ncomment = 5\n", 4, "invalid type");
    }

    #[test]
    fn error_too_many_rules() {
        let mut text = String::from("default = \"deny\"\n");
        for _ in 0..=MAX_RULES {
            text.push_str("[[rule]]\naction = \"deny\"\n");
        }
        // The first rule beyond the limit is on line 2 + 2 * MAX_RULES.
        err_at(&text, 2 + 2 * MAX_RULES as usize, &format!("too many rules: {} (at most {MAX_RULES})", MAX_RULES + 1));
        let mut text = String::from("default = \"deny\"\n");
        for _ in 0..MAX_RULES {
            text.push_str("[[rule]]\naction = \"deny\"\n");
        }
        assert_eq!(parse(&text).expect("MAX_RULES rules fit").rules.len(), MAX_RULES as usize);
    }

    #[test]
    fn set_file_errors_name_the_set_file_and_its_line() {
        let dir = TempDir::new();
        dir.write("bad.txt", "10.0.0.0/8\n# comment\n\n   10.0.0.0/40 # too long\n");
        let rules = dir.write("r.toml", "default = \"deny\"\n[sets]\nbad = { file = \"bad.txt\" }\n");
        let e = parse_file(&rules).expect_err("bad set file").to_string();
        let set_file = dir.0.join("bad.txt");
        let want = format!("{}:4:4: bad CIDR \"10.0.0.0/40\": prefix length 40 is too long", set_file.display());
        assert!(e.starts_with(&want), "{e}\nwant {want}");
        assert!(e.contains(&format!("set \"bad\", named at {}:3:", rules.display())), "{e}");

        let rules = dir.write("m.toml", "default = \"deny\"\n[sets]\nmissing = { file = \"nope.txt\" }\n");
        let e = parse_file(&rules).expect_err("missing set file").to_string();
        assert!(e.starts_with(&format!("{}:3:", rules.display())), "{e}");
        assert!(e.contains("set \"missing\": cannot read") && e.contains("nope.txt"), "{e}");

        let rules = dir.write("t.toml", "default = \"deny\"\n[sets]\nt = { path = \"x\" }\n");
        let e = parse_file(&rules).expect_err("wrong key").to_string();
        assert!(e.starts_with(&format!("{}:3:", rules.display())) && e.contains("unknown field `path`"), "{e}");

        let rules = dir.write("u.toml", "default = \"deny\"\n[sets]\nu = \"10.0.0.0/8\"\n");
        let e = parse_file(&rules).expect_err("wrong type").to_string();
        assert!(e.starts_with(&format!("{}:3:", rules.display())) && e.contains("a list of prefixes"), "{e}");

        let e = parse_file(&dir.0.join("absent.toml")).expect_err("absent").to_string();
        assert!(e.contains("absent.toml: cannot read"), "{e}");
    }

    #[test]
    fn parse_set_file_alone() {
        let dir = TempDir::new();
        let good = dir.write("good.txt", "# list\n10.1.2.3/8\n\n  2001:db8::1   # host\r\n192.0.2.1\n");
        assert_eq!(
            parse_set_file(&good).expect("parses"),
            vec![cidr("10.0.0.0/8"), cidr("2001:db8::1/128"), cidr("192.0.2.1/32")]
        );
        assert_eq!(parse_set_file(&dir.write("empty.txt", "# nothing\n\n")).expect("parses"), vec![]);

        let bad = dir.write("bad.txt", "10.0.0.0/8\n\t 10.0.0.0/40 # too long\n");
        let e = parse_set_file(&bad).expect_err("bad line");
        assert!(matches!(&e, RuleError::At { line: 2, col: 3, .. }), "{e:?}");
        let want = format!("{}:2:3: bad CIDR \"10.0.0.0/40\": prefix length 40 is too long", bad.display());
        assert!(e.to_string().starts_with(&want) && !e.to_string().contains("named at"), "{e}\nwant {want}");

        let absent = dir.0.join("absent.txt");
        let e = parse_set_file(&absent).expect_err("absent");
        assert!(matches!(&e, RuleError::Read { file, .. } if *file == absent), "{e:?}");
        assert!(e.to_string().starts_with(&format!("{}: cannot read", absent.display())), "{e}");
    }

    #[test]
    fn set_file_relative_to_rule_file_and_absolute() {
        let dir = TempDir::new();
        std::fs::create_dir_all(dir.0.join("sub")).unwrap();
        dir.write("sub/list.txt", "192.0.2.0/24\n");
        let abs = dir.write("abs.txt", "198.51.100.7\n");
        let text = format!(
            "default = \"allow\"\n[sets]\nrel = {{ file = \"list.txt\" }}\nabs = {{ file = {} }}\n",
            toml_string(&abs.display().to_string())
        );
        let rules = dir.write("sub/r.toml", &text);
        let rs = parse_file(&rules).expect("parses");
        assert_eq!(rs.sets["rel"], vec![cidr("192.0.2.0/24")]);
        assert_eq!(rs.sets["abs"], vec![cidr("198.51.100.7/32")]);
    }

    #[test]
    fn line_col_counts_characters() {
        assert_eq!(line_col("abc", 0), (1, 1));
        assert_eq!(line_col("a\nbc", 3), (2, 2));
        assert_eq!(line_col("é = 1\nx", 3), (1, 3));
        assert_eq!(line_col("ab", 99), (1, 3));
    }

    #[test]
    fn single_field_parsers() {
        assert_eq!(
            parse_addr_match("10.0.0.0/8, @x ,::1").unwrap(),
            AddrMatch::List(vec![
                AddrItem::Cidr(cidr("10.0.0.0/8")),
                AddrItem::Set("x".into()),
                AddrItem::Cidr(cidr("::1/128")),
            ])
        );
        assert_eq!(parse_addr_match("@x").unwrap(), AddrMatch::Set("x".into()));
        assert_eq!(
            parse_addr_match("1.2.3.4,5.6.0.0/16").unwrap(),
            AddrMatch::Cidrs(vec![cidr("1.2.3.4"), cidr("5.6.0.0/16")])
        );
        assert!(parse_addr_match("").unwrap_err().contains("empty item"));
        assert!(parse_addr_match("1.2.3.4,").unwrap_err().contains("empty item"));
        assert!(parse_addr_match("1.2.3.4/33").unwrap_err().contains("too long"));
        assert!(parse_addr_match("@").unwrap_err().contains("empty set name"));
        assert!(parse_addr_match("@a.b").unwrap_err().contains("bad set name"));

        assert_eq!(parse_proto("tcp"), Ok(Some(6)));
        assert_eq!(parse_proto("UDP"), Ok(Some(17)));
        assert_eq!(parse_proto("icmp"), Ok(Some(1)));
        assert_eq!(parse_proto("icmpv6"), Ok(Some(58)));
        assert_eq!(parse_proto("any"), Ok(None));
        assert_eq!(parse_proto("0"), Ok(Some(0)));
        assert_eq!(parse_proto("255"), Ok(Some(255)));
        assert!(parse_proto("256").unwrap_err().contains("out of range"));
        assert!(parse_proto("99999999999999999999999").unwrap_err().contains("out of range"));
        assert!(parse_proto("gre").unwrap_err().contains("unknown protocol"));
        assert!(parse_proto("").unwrap_err().contains("unknown protocol"));

        assert_eq!(
            parse_ports("80, 443,1000-2000").unwrap(),
            vec![PortRange { lo: 80, hi: 80 }, PortRange { lo: 443, hi: 443 }, PortRange { lo: 1000, hi: 2000 }]
        );
        assert_eq!(parse_ports("0-65535").unwrap(), vec![PortRange { lo: 0, hi: 65535 }]);
        assert!(parse_ports("70000").unwrap_err().contains("port 70000 is out of range"));
        assert!(parse_ports("99999999999999999999999").unwrap_err().contains("out of range"));
        assert!(parse_ports("9-1").unwrap_err().contains("low end is above"));
        assert!(parse_ports("80,").unwrap_err().contains("empty item"));
        assert!(parse_ports("").unwrap_err().contains("empty item"));
        assert!(parse_ports("-5").unwrap_err().contains("bad port"));
        assert!(parse_ports("a-b").unwrap_err().contains("bad port"));

        assert_eq!("allow".parse::<Action>(), Ok(Action::Allow));
        assert!("Allow".parse::<Action>().is_err());
        assert_eq!(PortRange { lo: 5, hi: 5 }.to_string(), "5");
        assert_eq!(PortRange { lo: 5, hi: 6 }.to_string(), "5-6");
        assert_eq!(Action::Deny.to_string(), "deny");
    }

    fn sample() -> RuleSet {
        parse(
            r#"default = "allow"
[sets]
a = ["10.0.0.0/8", "2001:db8::/32"]
"empty-set" = []
[[rule]]
action = "deny"
src = ["@a", "192.0.2.1"]
dst = "@empty-set"
comment = "tab\there \\ \"quoted\" é"
[[rule]]
action = "allow"
proto = "tcp"
sport = [1, "2-3"]
dport = "100-200"
[[rule]]
action = "deny"
proto = 200
dst = "::/0"
"#,
        )
        .expect("parses")
    }

    #[test]
    fn toml_round_trip() {
        let rs = sample();
        let text = rs.to_toml();
        let back = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(back, rs);
        // Ids are not in the file: they come back 1..=n.
        let mut renumbered = rs.clone();
        renumbered.rules[0].id = 10;
        renumbered.rules.swap(1, 2);
        let back = parse(&renumbered.to_toml()).unwrap();
        assert_eq!(back.rules.iter().map(|r| r.id).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(back.rules[1], Rule { id: 2, ..renumbered.rules[1].clone() });
    }

    #[test]
    fn json_round_trip() {
        let rs = sample();
        let json = serde_json::to_string(&rs).unwrap();
        assert!(json.contains("\"a\":[\"10.0.0.0/8\",\"2001:db8::/32\"]"), "{json}");
        assert!(json.contains("\"src\":[\"@a\",\"192.0.2.1/32\"]"), "{json}");
        let back: RuleSet = serde_json::from_str(&json).unwrap();
        assert_eq!(back, rs);
        // The state file normalizes like the rule file, and refuses what it would refuse.
        let c: Cidr = serde_json::from_str("\"10.1.2.3/8\"").unwrap();
        assert_eq!(c, cidr("10.0.0.0/8"));
        assert!(serde_json::from_str::<Cidr>("\"10.0.0.0/33\"").is_err());
        assert!(serde_json::from_str::<AddrMatch>("[]").is_err());
    }

    #[test]
    fn validate_catches_bad_edits() {
        let good = sample();
        assert_eq!(good.validate(), Ok(()));
        let check = |f: &dyn Fn(&mut RuleSet), needle: &str| {
            let mut rs = good.clone();
            f(&mut rs);
            let e = rs.validate().expect_err(needle);
            assert!(e.contains(needle), "{e} should contain {needle}");
        };
        check(&|rs| rs.rules[1].src = Some(AddrMatch::Set("zz".into())), "rule 2: src: unknown set \"@zz\"");
        check(&|rs| rs.rules[1].proto = Some(PROTO_ICMP), "rule 2: sport needs proto tcp, udp or any");
        check(&|rs| rs.rules[1].dport = Some(vec![]), "rule 2: dport is an empty list");
        check(&|rs| rs.rules[1].dport = Some(vec![PortRange { lo: 9, hi: 1 }]), "low end is above");
        check(&|rs| rs.rules[0].dst = Some(AddrMatch::Cidrs(vec![])), "rule 1: dst is an empty list");
        check(&|rs| rs.rules[2].id = 1, "rule 1: duplicate rule id");
        check(
            &|rs| rs.rules[0].src = Some(AddrMatch::Cidrs(vec![Cidr { addr: "10.0.0.1".parse().unwrap(), len: 8 }])),
            "not normalized",
        );
        check(
            &|rs| {
                rs.sets.insert("bad name".into(), vec![]);
            },
            "bad set name",
        );
        check(
            &|rs| {
                rs.sets.remove("a");
            },
            "unknown set \"@a\"",
        );
        check(
            &|rs| {
                let r = rs.rules[1].clone();
                rs.rules = (0..=MAX_RULES).map(|i| Rule { id: i + 1, ..r.clone() }).collect();
            },
            "too many rules",
        );
    }

    /// A million-line set file: parsed, compared, and through the JSON state and back. Timings
    /// are printed (run with `--release --nocapture` to see them), never asserted.
    #[test]
    fn million_prefix_set() {
        let dir = TempDir::new();
        let mut text = String::with_capacity(20 << 20);
        for i in 0..1_000_000u32 {
            let a = Ipv4Addr::from(0x0a00_0000 + (i << 4));
            text.push_str(&format!("{a}/28\n"));
        }
        dir.write("big.txt", &text);
        let rules = dir.write(
            "r.toml",
            "default = \"allow\"\n[sets]\nbig = { file = \"big.txt\" }\n[[rule]]\naction = \"deny\"\nsrc = \"@big\"\n",
        );
        let t = std::time::Instant::now();
        let rs = parse_file(&rules).expect("parses");
        eprintln!("parse 1M-line set file: {:?}", t.elapsed());
        assert_eq!(rs.sets["big"].len(), 1_000_000);
        assert_eq!(rs.sets["big"][999_999], cidr("10.244.35.240/28"));
        let t = std::time::Instant::now();
        let json = serde_json::to_vec(&rs).unwrap();
        let back: RuleSet = serde_json::from_slice(&json).unwrap();
        eprintln!("JSON round trip of 1M prefixes ({} bytes): {:?}", json.len(), t.elapsed());
        assert_eq!(back, rs);
    }
}
