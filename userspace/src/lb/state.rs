//! What rampart remembers about the services balanced on an attached interface, and the
//! operations that change them ([`Balancer`]).
//!
//! `/run/rampart/<scope>/<iface>/lb.json` holds the services and their backends as written
//! (address, weight, admin state, health, the ids and table regions given to them). The kernel's
//! Maglev tables are not stored: they follow from the backend lists (`loadbalancer::Maglev`), so
//! every change is "edit a copy of the state, validate it, write the difference" ([`sync`]),
//! under the interface's lock (the firewall's `lock` file: one writer per interface).
//!
//! Who changes what: the operator (CLI, `attach --config`) owns services, backends, weights and
//! the admin state (`ready`/`drain`); a running daemon's health checks own only `health`. A
//! backend gets ring positions when it is `ready` and `up`, so neither side can undo the other's
//! decision, and `rampart lb list` shows both.
use std::{
    collections::BTreeMap,
    fmt, fs, io,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    str::FromStr,
};

use loadbalancer::{Maglev, MaglevBackend, MaglevError};
use rampart_common::lb::{
    BACKEND_LIVE, BackendInfo, FAMILY_V4, FAMILY_V6, LbConfig, LbCounter, MAX_BACKENDS, MAX_SERVICES, RING_ENTRIES,
    VipInfo, VipKey,
};
use serde::{Deserialize, Serialize};

use super::tables::{LbTables, LbTablesError};
use crate::{
    fw::state::{self as fw_state, Lock, StateError},
    paths::Scope,
};

pub const LB_STATE_VERSION: u32 = 1;
pub const LB_STATE_FILE: &str = "lb.json";
const LB_STATE_TMP: &str = "lb.json.tmp";
/// Counters as `rampart lb list` last saw them, for its rates.
pub const LB_LAST_FILE: &str = "lb-last.json";
/// Every file the balancer makes in an interface's state directory (detach removes them).
pub const FILES: [&str; 3] = [LB_STATE_FILE, LB_STATE_TMP, LB_LAST_FILE];

#[derive(Debug, thiserror::Error)]
pub enum LbError {
    #[error("`{0}`: a service is VIP:PORT/PROTO, e.g. 203.0.113.10:443/tcp or [2001:db8::1]:443/udp")]
    BadService(String),
    #[error("service {0} exists already")]
    DuplicateService(ServiceId),
    #[error("no service {id}{}", list(.known))]
    NoService { id: ServiceId, known: Vec<String> },
    #[error("service {service}: backend {addr} exists already")]
    DuplicateBackend { service: ServiceId, addr: IpAddr },
    #[error("service {service}: no backend {addr}{}", list(.known))]
    NoBackend { service: ServiceId, addr: IpAddr, known: Vec<String> },
    #[error("service {service}: backend {addr} is IPv{}, the service IPv{} (IP-in-IP keeps the family)", fam(.addr), fam(&.service.vip.ip()))]
    FamilyMismatch { service: ServiceId, addr: IpAddr },
    #[error("service {service}: backend address {addr} cannot receive traffic (unspecified, multicast or loopback)")]
    BadBackend { service: ServiceId, addr: IpAddr },
    #[error("service {service}: table size {size}: {source}")]
    TableSize {
        service: ServiceId,
        size: u32,
        #[source]
        source: MaglevError,
    },
    #[error("service {0}: no room left in the Maglev ring map ({RING_ENTRIES} positions shared by all services)")]
    RingFull(ServiceId),
    #[error("at most {MAX_SERVICES} services per interface")]
    TooManyServices,
    #[error("at most {MAX_BACKENDS} backends per interface")]
    TooManyBackends,
    #[error("{}: {op}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: bad balancer state file", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}: balancer state version {found}, this rampart reads {LB_STATE_VERSION}", path.display())]
    Version { path: PathBuf, found: u32 },
    #[error("{iface}: writing the balancer's maps{}", undo_note(.undone))]
    Tables {
        iface: String,
        /// Whether the maps were put back as they were.
        undone: bool,
        #[source]
        source: LbTablesError,
    },
    #[error(transparent)]
    State(#[from] StateError),
}

fn list(list: &[String]) -> String {
    if list.is_empty() { " (there are none)".to_string() } else { format!(" (there are: {})", list.join(", ")) }
}
fn fam(a: &IpAddr) -> u8 {
    if a.is_ipv4() { 4 } else { 6 }
}
fn undo_note(u: &bool) -> &'static str {
    if *u { "; the earlier services stay in force" } else { "; undoing failed too: check `rampart lb list`" }
}

type Result<T, E = LbError> = std::result::Result<T, E>;

/// TCP or UDP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => rampart_common::net::IPPROTO_TCP,
            Proto::Udp => rampart_common::net::IPPROTO_UDP,
        }
    }
}

/// A service's identity: `VIP:PORT/PROTO`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServiceId {
    pub vip: SocketAddr,
    pub proto: Proto,
}

impl fmt::Display for ServiceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = match self.proto {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        };
        write!(f, "{}/{p}", self.vip)
    }
}

impl FromStr for ServiceId {
    type Err = LbError;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || LbError::BadService(s.to_string());
        let (addr, proto) = s.rsplit_once('/').ok_or_else(bad)?;
        let proto = match proto {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            _ => return Err(bad()),
        };
        let vip: SocketAddr = addr.parse().map_err(|_| bad())?;
        if vip.port() == 0 || vip.ip().is_unspecified() || vip.ip().is_multicast() {
            return Err(bad());
        }
        Ok(ServiceId { vip, proto })
    }
}

/// Operator's decision about a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Admin {
    Ready,
    /// No new flows; flows in the connection table stay until they end.
    Drain,
}

/// Health as a daemon's checks last saw it (`up` without checks).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Up,
    Down,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backend {
    pub addr: IpAddr,
    pub weight: u32,
    /// Index in `LB_BACKENDS` / `LB_BE_STATS`.
    pub id: u32,
    pub admin: Admin,
    pub health: Health,
}

impl Backend {
    /// The weight its ring positions follow: 0 unless ready and up.
    pub fn effective_weight(&self) -> u32 {
        if self.admin == Admin::Ready && self.health == Health::Up { self.weight } else { 0 }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub id: ServiceId,
    /// Maglev table size (a prime).
    pub table_size: u32,
    /// Index in `LB_SVC_STATS`.
    pub index: u32,
    /// First position of its table in `LB_RING`.
    pub ring_base: u32,
    pub backends: Vec<Backend>,
}

impl Service {
    fn vip_key(&self) -> VipKey {
        VipKey {
            addr: addr_words(self.id.vip.ip()),
            port: self.id.vip.port(),
            proto: self.id.proto.number(),
            family: if self.id.vip.is_ipv4() { FAMILY_V4 } else { FAMILY_V6 },
            _pad: 0,
        }
    }

    /// The Maglev table its backends give (the same on every node with the same list).
    pub fn table(&self) -> Result<Maglev> {
        let members: Vec<MaglevBackend> = self
            .backends
            .iter()
            .map(|b| MaglevBackend { id: b.id, name: b.addr.to_string(), weight: b.effective_weight() })
            .collect();
        Maglev::with_backends(self.table_size, &members).map_err(|source| LbError::TableSize {
            service: self.id,
            size: self.table_size,
            source,
        })
    }

    pub fn backend(&self, addr: IpAddr) -> Result<&Backend> {
        self.backends.iter().find(|b| b.addr == addr).ok_or_else(|| self.no_backend(addr))
    }

    fn backend_mut(&mut self, addr: IpAddr) -> Result<&mut Backend> {
        let err = self.no_backend(addr);
        self.backends.iter_mut().find(|b| b.addr == addr).ok_or(err)
    }

    fn no_backend(&self, addr: IpAddr) -> LbError {
        LbError::NoBackend { service: self.id, addr, known: self.backends.iter().map(|b| b.addr.to_string()).collect() }
    }
}

/// An address as the kernel's keys hold it (`rampart_common::lb::VipKey::addr`).
pub fn addr_words(ip: IpAddr) -> [u64; 2] {
    match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            [u64::from_ne_bytes([o[0], o[1], o[2], o[3], 0, 0, 0, 0]), 0]
        }
        IpAddr::V6(a) => {
            let o = a.octets();
            [
                u64::from_ne_bytes(o[..8].try_into().expect("8 bytes")),
                u64::from_ne_bytes(o[8..].try_into().expect("8 bytes")),
            ]
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LbState {
    pub version: u32,
    pub services: Vec<Service>,
    /// Where the next backend id search starts: ids go round before one is reused, so a flow
    /// still in the connection table under an old id is not sent to a new backend.
    pub next_backend_id: u32,
    pub next_service_index: u32,
}

impl LbState {
    fn empty() -> Self {
        LbState { version: LB_STATE_VERSION, ..Default::default() }
    }

    pub fn service(&self, id: &ServiceId) -> Result<&Service> {
        self.services.iter().find(|s| s.id == *id).ok_or_else(|| self.no_service(id))
    }

    fn service_mut(&mut self, id: &ServiceId) -> Result<&mut Service> {
        let err = self.no_service(id);
        self.services.iter_mut().find(|s| s.id == *id).ok_or(err)
    }

    fn no_service(&self, id: &ServiceId) -> LbError {
        LbError::NoService { id: *id, known: self.services.iter().map(|s| s.id.to_string()).collect() }
    }

    fn alloc_backend_id(&mut self) -> Result<u32> {
        let used: Vec<u32> = self.services.iter().flat_map(|s| s.backends.iter().map(|b| b.id)).collect();
        for k in 0..MAX_BACKENDS {
            let id = (self.next_backend_id + k) % MAX_BACKENDS;
            if !used.contains(&id) {
                self.next_backend_id = (id + 1) % MAX_BACKENDS;
                return Ok(id);
            }
        }
        Err(LbError::TooManyBackends)
    }

    fn alloc_service_index(&mut self) -> Result<u32> {
        let used: Vec<u32> = self.services.iter().map(|s| s.index).collect();
        for k in 0..MAX_SERVICES {
            let i = (self.next_service_index + k) % MAX_SERVICES;
            if !used.contains(&i) {
                self.next_service_index = (i + 1) % MAX_SERVICES;
                return Ok(i);
            }
        }
        Err(LbError::TooManyServices)
    }

    /// The first run of `size` free ring positions.
    fn alloc_ring(&self, id: ServiceId, size: u32) -> Result<u32> {
        let mut taken: Vec<(u32, u32)> = self.services.iter().map(|s| (s.ring_base, s.table_size)).collect();
        taken.sort_unstable();
        let mut start = 0u32;
        for (base, len) in taken {
            if base >= start && base - start >= size {
                return Ok(start);
            }
            start = start.max(base + len);
        }
        if RING_ENTRIES - start >= size { Ok(start) } else { Err(LbError::RingFull(id)) }
    }

    /// Adds a service with no backends.
    pub fn add_service(&mut self, id: ServiceId, table_size: u32) -> Result<()> {
        if self.services.iter().any(|s| s.id == id) {
            return Err(LbError::DuplicateService(id));
        }
        if let Err(source) = Maglev::new(table_size) {
            return Err(LbError::TableSize { service: id, size: table_size, source });
        }
        let ring_base = self.alloc_ring(id, table_size)?;
        let index = self.alloc_service_index()?;
        self.services.push(Service { id, table_size, index, ring_base, backends: Vec::new() });
        Ok(())
    }

    pub fn delete_service(&mut self, id: &ServiceId) -> Result<()> {
        self.service(id)?;
        self.services.retain(|s| s.id != *id);
        Ok(())
    }

    pub fn add_backend(&mut self, service: &ServiceId, addr: IpAddr, weight: u32) -> Result<()> {
        let s = self.service(service)?;
        if s.backends.iter().any(|b| b.addr == addr) {
            return Err(LbError::DuplicateBackend { service: *service, addr });
        }
        if addr.is_ipv4() != s.id.vip.is_ipv4() {
            return Err(LbError::FamilyMismatch { service: *service, addr });
        }
        if addr.is_unspecified() || addr.is_multicast() || addr.is_loopback() {
            return Err(LbError::BadBackend { service: *service, addr });
        }
        let id = self.alloc_backend_id()?;
        let s = self.service_mut(service)?;
        s.backends.push(Backend { addr, weight, id, admin: Admin::Ready, health: Health::Up });
        s.table()?;
        Ok(())
    }

    pub fn delete_backend(&mut self, service: &ServiceId, addr: IpAddr) -> Result<()> {
        let s = self.service_mut(service)?;
        s.backend(addr)?;
        s.backends.retain(|b| b.addr != addr);
        Ok(())
    }

    pub fn set_admin(&mut self, service: &ServiceId, addr: IpAddr, admin: Admin) -> Result<()> {
        self.service_mut(service)?.backend_mut(addr)?.admin = admin;
        Ok(())
    }

    pub fn set_weight(&mut self, service: &ServiceId, addr: IpAddr, weight: u32) -> Result<()> {
        let s = self.service_mut(service)?;
        s.backend_mut(addr)?.weight = weight;
        s.table()?;
        Ok(())
    }

    pub fn set_health(&mut self, service: &ServiceId, addr: IpAddr, health: Health) -> Result<()> {
        self.service_mut(service)?.backend_mut(addr)?.health = health;
        Ok(())
    }

    /// Makes the services exactly `desired` (a config file's `[[service]]` sections, as a rule
    /// file replaces a rule set). Services and backends that stay keep their ids, table regions
    /// and health, so their flows stay where they are; weights and the admin state follow the
    /// file (every listed backend is `ready`); a service whose table size changed is made anew.
    pub fn apply(&mut self, desired: &[Desired]) -> Result<()> {
        self.services.retain(|s| desired.iter().any(|d| d.id == s.id && d.table_size == s.table_size));
        for d in desired {
            if self.service(&d.id).is_err() {
                self.add_service(d.id, d.table_size)?;
            }
            let current: Vec<IpAddr> = self.service(&d.id)?.backends.iter().map(|b| b.addr).collect();
            for addr in current {
                if !d.backends.iter().any(|(a, _)| *a == addr) {
                    self.delete_backend(&d.id, addr)?;
                }
            }
            for &(addr, weight) in &d.backends {
                if self.service(&d.id)?.backend(addr).is_ok() {
                    self.set_weight(&d.id, addr, weight)?;
                    self.set_admin(&d.id, addr, Admin::Ready)?;
                } else {
                    self.add_backend(&d.id, addr, weight)?;
                }
            }
        }
        Ok(())
    }
}

/// One service as a config file wants it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    pub id: ServiceId,
    pub table_size: u32,
    /// Address and weight.
    pub backends: Vec<(IpAddr, u32)>,
}

/// Writes into the maps what it takes to go from `old` to `new`, in an order that leaves every
/// packet a consistent view: new backends live before any position names them; a new service's
/// table before its VIP; positions (Maglev deltas) before a removed backend is retired; a
/// removed service's VIP first.
pub fn sync(t: &mut LbTables, old: &LbState, new: &LbState) -> Result<(), LbTablesError> {
    // The ports of both (every VIP the packets may meet meanwhile) first; the new ones last.
    t.write_ports(&port_bitmap([old, new]))?;
    sync_services(t, old, new)?;
    t.write_ports(&port_bitmap([new]))
}

/// One bit per destination port any service of `states` uses.
fn port_bitmap<const N: usize>(states: [&LbState; N]) -> Vec<u64> {
    let mut words = vec![0u64; rampart_common::lb::PORT_WORDS as usize];
    for s in states.iter().flat_map(|st| &st.services) {
        let p = s.id.vip.port() as usize;
        words[p / 64] |= 1 << (p % 64);
    }
    words
}

fn sync_services(t: &mut LbTables, old: &LbState, new: &LbState) -> Result<(), LbTablesError> {
    let old_by_id: BTreeMap<ServiceId, &Service> = old.services.iter().map(|s| (s.id, s)).collect();
    let new_by_id: BTreeMap<ServiceId, &Service> = new.services.iter().map(|s| (s.id, s)).collect();
    // Removed services stop matching at once.
    for (id, s) in &old_by_id {
        if !new_by_id.contains_key(id) {
            t.delete_vip(&s.vip_key())?;
        }
    }
    for s in &new.services {
        let family_words =
            |b: &Backend| BackendInfo { addr: addr_words(b.addr), service: s.index, flags: BACKEND_LIVE };
        let before = old_by_id.get(&s.id).filter(|o| o.index == s.index && o.ring_base == s.ring_base);
        for b in &s.backends {
            let was = before.and_then(|o| o.backends.iter().find(|x| x.id == b.id));
            if was.is_none_or(|w| w.addr != b.addr) {
                t.zero_backend_counters(b.id)?;
                t.set_backend(b.id, &family_words(b))?;
            }
        }
        let table = s.table().map_err(|e| {
            LbTablesError::Batch(crate::bpf::batch::BatchError::Sys {
                map: rampart_common::lb::map_names::RING,
                op: "build the Maglev table",
                source: io::Error::other(e.to_string()),
            })
        })?;
        match before {
            Some(o) => {
                let old_table = o.table().map(|m| m.table().to_vec()).unwrap_or_default();
                let deltas: Vec<(u32, u32)> = table
                    .table()
                    .iter()
                    .enumerate()
                    .filter(|(i, id)| old_table.get(*i) != Some(id))
                    .map(|(i, &id)| (i as u32, id))
                    .collect();
                t.write_ring_deltas(s.ring_base, &deltas)?;
            }
            None => {
                t.zero_service_counters(s.index)?;
                t.write_ring(s.ring_base, table.table())?;
                t.set_vip(
                    &s.vip_key(),
                    &VipInfo { service: s.index, ring_base: s.ring_base, ring_size: s.table_size, _pad: 0 },
                )?;
            }
        }
    }
    // Retire backends no position names any more (their flows are hashed again).
    let live: Vec<u32> = new.services.iter().flat_map(|s| s.backends.iter().map(|b| b.id)).collect();
    for s in &old.services {
        for b in &s.backends {
            if !live.contains(&b.id) {
                t.set_backend(b.id, &BackendInfo { addr: addr_words(b.addr), service: s.index, flags: 0 })?;
            }
        }
    }
    Ok(())
}

/// The default stage settings written at attach: Katran's 172.16.0.0/16 outer sources for IPv4,
/// `fd00:7261:6d70::/96` ("ramp") for IPv6, UDP flows re-hashed after 30 s idle.
pub fn default_config() -> LbConfig {
    LbConfig {
        src4: [172, 16, 0, 0],
        udp_timeout: rampart_common::lb::DEFAULT_UDP_TIMEOUT_SECS,
        src6: [0xfd, 0, 0x72, 0x61, 0x6d, 0x70, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    }
}

/// The balancer of one attached interface, locked for the life of the value.
pub struct Balancer {
    scope: Scope,
    iface: String,
    _lock: Lock,
    state: LbState,
    tables: LbTables,
}

fn io_err(op: &'static str, path: &std::path::Path) -> impl FnOnce(io::Error) -> LbError + use<> {
    let path = path.to_path_buf();
    move |source| LbError::Io { op, path, source }
}

impl Balancer {
    /// Opens the balancer of `iface` (attached with `rampart attach`), taking its lock.
    pub fn open(scope: &Scope, iface: &str) -> Result<Self> {
        let lock = fw_state::lock(scope, iface)?;
        let state = load(scope, iface)?;
        let tables = LbTables::from_pins(&scope.pin_dir(iface)).map_err(|source| LbError::Tables {
            iface: iface.to_string(),
            undone: true,
            source,
        })?;
        Ok(Balancer { scope: scope.clone(), iface: iface.to_string(), _lock: lock, state, tables })
    }

    pub fn state(&self) -> &LbState {
        &self.state
    }

    pub fn tables(&self) -> &LbTables {
        &self.tables
    }

    pub fn iface(&self) -> &str {
        &self.iface
    }

    /// Applies `edit` to a copy of the state; if it is valid, writes the difference and saves
    /// it. On any error nothing changes (maps put back when a write failed half way).
    pub fn change(&mut self, edit: impl FnOnce(&mut LbState) -> Result<()>) -> Result<()> {
        let mut next = self.state.clone();
        edit(&mut next)?;
        for s in &next.services {
            s.table()?;
        }
        if let Err(source) = sync(&mut self.tables, &self.state, &next) {
            let undone = sync(&mut self.tables, &next, &self.state).is_ok();
            return Err(LbError::Tables { iface: self.iface.clone(), undone, source });
        }
        save(&self.scope, &self.iface, &next)?;
        self.state = next;
        Ok(())
    }

    /// Counters of every service and backend, by service index and backend id.
    pub fn counters(&self) -> Result<(BTreeMap<u32, LbCounter>, BTreeMap<u32, LbCounter>)> {
        let err = |source| LbError::Tables { iface: self.iface.clone(), undone: true, source };
        let mut services = BTreeMap::new();
        let mut backends = BTreeMap::new();
        for s in &self.state.services {
            services.insert(s.index, self.tables.service_counters(s.index).map_err(err)?);
            for b in &s.backends {
                backends.insert(b.id, self.tables.backend_counters(b.id).map_err(err)?);
            }
        }
        Ok((services, backends))
    }
}

/// Reads `lb.json` (an interface attached before the balancer existed has none: no services).
pub fn load(scope: &Scope, iface: &str) -> Result<LbState> {
    let path = scope.state_dir(iface).join(LB_STATE_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(LbState::empty()),
        Err(e) => return Err(io_err("read", &path)(e)),
    };
    let st: LbState = serde_json::from_str(&text).map_err(|source| LbError::Parse { path: path.clone(), source })?;
    if st.version != LB_STATE_VERSION {
        return Err(LbError::Version { path, found: st.version });
    }
    Ok(st)
}

/// Writes `lb.json` whole or not at all.
pub fn save(scope: &Scope, iface: &str, st: &LbState) -> Result<()> {
    let dir = scope.state_dir(iface);
    let tmp = dir.join(LB_STATE_TMP);
    let path = dir.join(LB_STATE_FILE);
    let text = serde_json::to_string_pretty(st).map_err(|source| LbError::Parse { path: path.clone(), source })?;
    fs::write(&tmp, text).map_err(io_err("write", &tmp))?;
    fs::rename(&tmp, &path).map_err(io_err("rename into place", &path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sid(s: &str) -> ServiceId {
        s.parse().unwrap()
    }

    #[test]
    fn service_ids_parse_and_print() {
        assert_eq!(sid("203.0.113.10:443/tcp").to_string(), "203.0.113.10:443/tcp");
        assert_eq!(sid("[2001:db8::1]:53/udp").to_string(), "[2001:db8::1]:53/udp");
        for bad in [
            "203.0.113.10:443",
            "203.0.113.10/tcp",
            "203.0.113.10:0/tcp",
            "0.0.0.0:80/tcp",
            "x:80/tcp",
            "1.2.3.4:80/sctp",
        ] {
            assert!(matches!(bad.parse::<ServiceId>(), Err(LbError::BadService(_))), "{bad}");
        }
    }

    #[test]
    fn edits_are_validated_and_name_what_is_wrong() {
        let mut st = LbState::empty();
        let web = sid("10.0.0.1:80/tcp");
        st.add_service(web, 251).unwrap();
        assert!(matches!(st.add_service(web, 251), Err(LbError::DuplicateService(_))));
        assert!(matches!(st.add_service(sid("10.0.0.1:81/tcp"), 250), Err(LbError::TableSize { .. })));
        st.add_backend(&web, "10.0.1.1".parse().unwrap(), 100).unwrap();
        let e = st.add_backend(&web, "10.0.1.1".parse().unwrap(), 100).unwrap_err();
        assert!(matches!(e, LbError::DuplicateBackend { .. }), "{e}");
        let e = st.add_backend(&web, "2001:db8::1".parse().unwrap(), 100).unwrap_err();
        assert!(e.to_string().contains("IPv6, the service IPv4"), "{e}");
        let e = st.add_backend(&sid("10.0.0.9:80/tcp"), "10.0.1.2".parse().unwrap(), 1).unwrap_err();
        assert_eq!(e.to_string(), "no service 10.0.0.9:80/tcp (there are: 10.0.0.1:80/tcp)");
        let e = st.delete_backend(&web, "10.0.1.9".parse().unwrap()).unwrap_err();
        assert_eq!(e.to_string(), "service 10.0.0.1:80/tcp: no backend 10.0.1.9 (there are: 10.0.1.1)");
    }

    #[test]
    fn ids_go_round_before_reuse_and_rings_do_not_overlap() {
        let mut st = LbState::empty();
        let a = sid("10.0.0.1:80/tcp");
        let b = sid("10.0.0.2:80/tcp");
        st.add_service(a, 65_537).unwrap();
        st.add_service(b, 251).unwrap();
        let (ra, rb) = (st.service(&a).unwrap().ring_base, st.service(&b).unwrap().ring_base);
        assert!(rb >= ra + 65_537 || ra >= rb + 251);
        st.add_backend(&a, "10.0.1.1".parse().unwrap(), 1).unwrap();
        st.delete_backend(&a, "10.0.1.1".parse().unwrap()).unwrap();
        st.add_backend(&a, "10.0.1.1".parse().unwrap(), 1).unwrap();
        assert_eq!(st.service(&a).unwrap().backends[0].id, 1, "a freed id is not reused at once");
        // A freed region is reused.
        st.delete_service(&a).unwrap();
        st.add_service(sid("10.0.0.3:80/tcp"), 65_537).unwrap();
        assert_eq!(st.service(&sid("10.0.0.3:80/tcp")).unwrap().ring_base, ra);
    }

    #[test]
    fn apply_keeps_what_stays_and_replaces_the_rest() {
        let mut st = LbState::empty();
        let (a, b, c) = (sid("10.0.0.1:80/tcp"), sid("10.0.0.2:80/tcp"), sid("10.0.0.3:53/udp"));
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        st.add_service(a, 251).unwrap();
        st.add_service(b, 251).unwrap();
        st.add_backend(&a, ip("10.0.1.1"), 100).unwrap();
        st.add_backend(&a, ip("10.0.1.2"), 100).unwrap();
        st.set_health(&a, ip("10.0.1.1"), Health::Down).unwrap();
        st.set_admin(&a, ip("10.0.1.2"), Admin::Drain).unwrap();
        let kept = st.service(&a).unwrap().clone();
        st.apply(&[
            Desired {
                id: a,
                table_size: 251,
                backends: vec![(ip("10.0.1.1"), 100), (ip("10.0.1.2"), 7), (ip("10.0.1.3"), 1)],
            },
            Desired { id: c, table_size: 13, backends: vec![(ip("10.0.2.1"), 1)] },
        ])
        .unwrap();
        assert!(st.service(&b).is_err(), "a service the file does not name is removed");
        let s = st.service(&a).unwrap();
        assert_eq!((s.index, s.ring_base), (kept.index, kept.ring_base));
        let b1 = s.backend(ip("10.0.1.1")).unwrap();
        assert_eq!((b1.id, b1.health), (kept.backends[0].id, Health::Down), "health is the daemon's");
        let b2 = s.backend(ip("10.0.1.2")).unwrap();
        assert_eq!(
            (b2.id, b2.weight, b2.admin),
            (kept.backends[1].id, 7, Admin::Ready),
            "the file sets weight and admin"
        );
        assert_eq!(s.backends.len(), 3);
        assert_eq!(st.service(&c).unwrap().backends.len(), 1);
        // A new table size makes the service anew.
        st.apply(&[Desired { id: c, table_size: 17, backends: vec![] }]).unwrap();
        assert_eq!(st.services.len(), 1);
        assert_eq!(st.service(&c).unwrap().table_size, 17);
    }

    #[test]
    fn drained_and_down_backends_get_no_positions() {
        let mut st = LbState::empty();
        let a = sid("10.0.0.1:80/tcp");
        st.add_service(a, 251).unwrap();
        for i in 1..=3 {
            st.add_backend(&a, format!("10.0.1.{i}").parse().unwrap(), 1).unwrap();
        }
        let owners = |st: &LbState| {
            let t = st.service(&a).unwrap().table().unwrap();
            let mut ids: Vec<u32> = t.table().to_vec();
            ids.sort_unstable();
            ids.dedup();
            ids
        };
        assert_eq!(owners(&st), vec![0, 1, 2]);
        st.set_admin(&a, "10.0.1.2".parse().unwrap(), Admin::Drain).unwrap();
        assert_eq!(owners(&st), vec![0, 2]);
        st.set_health(&a, "10.0.1.3".parse().unwrap(), Health::Down).unwrap();
        assert_eq!(owners(&st), vec![0]);
    }
}
