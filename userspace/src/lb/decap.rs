//! `rampart decap`: a backend of the balancer. The balancer sends a service's packets to a
//! backend encapsulated (IPv4 in IPv4, IPv6 in IPv6) and the backend answers the client
//! directly (direct server return); this kernel has no ipip driver, so `rampart_decap`
//! (`firewall-ebpf/src/bin/decap.rs`) strips the outer header of packets to the backend's VIPs.
//!
//! `attach` makes, in this order (detach undoes it in reverse, and a failed attach undoes what
//! it made so far):
//! 1. the ARP sysctls that keep the backend from answering ARP for a VIP (it must not steal the
//!    balancer's traffic): `arp_ignore=1` (answer only for addresses on the interface asked on)
//!    and `arp_announce=2` (never use a VIP as the source of an ARP request), for `all` and for
//!    the interface; a value that is already stricter stays. IPv6 needs nothing: neighbour
//!    discovery answers only for addresses on the interface asked on, and the VIPs are on `lo`;
//! 2. each VIP on `lo` (`ip addr add VIP/32` or `/128`), so the stack accepts the inner packets
//!    and answers from the VIP; a VIP that is on `lo` already, put there by someone else, is
//!    used and left alone;
//! 3. the program, VIPs in `DECAP_VIPS`, attached through a pinned link.
//!
//! What an attachment is, and nothing else:
//! - `/sys/fs/bpf/rampart/decap/<scope>/<iface>/`: `link`, `DECAP_VIPS`, `DECAP_STATS`;
//! - `/run/rampart/decap/<scope>/<iface>/state.json`: VIPs, mode, the interface's sysctls with
//!   the values they had before;
//! - `/run/rampart/decap/<scope>/shared.json`, shared by the scope's attachments: the `all`
//!   sysctls as they were before the first attachment (restored when the last one goes) and
//!   the addresses rampart put on `lo` with the interfaces whose VIPs they are (an address goes
//!   when no attachment names it any more).
//!
//! A sysctl is restored only if it still holds the value rampart wrote (someone who changed it
//! since meant it). Attach and detach of one scope are not meant to run at the same time
//! (`shared.json` is read, changed and written back without a lock).
use std::{
    collections::BTreeMap,
    ffi::CStr,
    fs, io,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::Command,
};

use aya::{
    EbpfLoader,
    maps::{HashMap, IterableMap, Map, MapData, MapError, PerCpuArray},
    programs::{ProgramError, Xdp},
};
use rampart_common::{
    Counter,
    lb::{DECAP_PROGRAM_NAME, DECAP_STATS, DECAP_VIPS, DecapKey, MAX_DECAP_VIPS, decap_stat},
};
use serde::{Deserialize, Serialize};

use crate::{
    bpf::DECAP_OBJ,
    paths::{self, Scope},
    xdp::{self, AttachMode, LINK_PIN, UsedMode, XdpError},
};

pub const STATE_FILE: &str = "state.json";
pub const SHARED_FILE: &str = "shared.json";
const STATE_VERSION: u32 = 1;
/// Pins in an attachment's directory.
pub const PINS: [&str; 3] = [LINK_PIN, DECAP_VIPS, DECAP_STATS];
const PROC_CONF: &str = "/proc/sys/net/ipv4/conf";
/// The ARP sysctls and the values a backend needs (a larger value is as strict or stricter).
const ARP_SYSCTLS: [(&str, u32); 2] = [("arp_ignore", 1), ("arp_announce", 2)];

#[derive(Debug, thiserror::Error)]
pub enum DecapError {
    #[error("--vip: no VIP given")]
    NoVips,
    #[error("--vip: `{0}` is not an IP address")]
    BadVip(String),
    #[error("--vip: {0} cannot be a VIP (unspecified, loopback, multicast or broadcast)")]
    UnusableVip(IpAddr),
    #[error("--vip: {0} is given twice")]
    DuplicateVip(IpAddr),
    #[error("--vip: {0} VIPs; at most {MAX_DECAP_VIPS}")]
    TooManyVips(usize),
    #[error("{iface}: decap is already attached{} (pins in {}); detach it first", in_scope(.scope), pin_dir.display())]
    AlreadyAttached { iface: String, scope: Scope, pin_dir: PathBuf },
    #[error("{iface}: decap is not attached{}", in_scope(.scope))]
    NotAttached { iface: String, scope: Scope },
    #[error("{iface}: load the decap object")]
    Load {
        iface: String,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("{iface}: program {DECAP_PROGRAM_NAME}: {op}")]
    Program {
        iface: String,
        op: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("{iface}: map {map}: {op}")]
    Map {
        iface: String,
        map: &'static str,
        op: &'static str,
        #[source]
        source: Box<MapError>,
    },
    #[error("{}: {op}", path.display())]
    Fs {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{iface}: pin map at {}", path.display())]
    Pin {
        iface: String,
        path: PathBuf,
        #[source]
        source: Box<aya::pin::PinError>,
    },
    #[error("{}: not a decap state file of this version: {msg}", path.display())]
    BadState { path: PathBuf, msg: String },
    #[error("{}: `{value}` is not a number", path.display())]
    BadSysctl { path: PathBuf, value: String },
    #[error("`{cmd}` failed: {stderr}")]
    Command { cmd: String, stderr: String },
    #[error(transparent)]
    Xdp(#[from] XdpError),
}

type Result<T, E = DecapError> = std::result::Result<T, E>;

fn in_scope(scope: &Scope) -> String {
    match scope {
        Scope::Host => String::new(),
        Scope::Netns(n) => format!(" in network namespace {n}"),
    }
}

fn fs_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> DecapError + use<> {
    let path = path.to_path_buf();
    move |source| DecapError::Fs { op, path, source }
}

/// A sysctl rampart changed: its file, the value before and the value written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SysctlChange {
    pub path: PathBuf,
    pub previous: String,
    pub value: String,
}

/// `/run/rampart/decap/<scope>/<iface>/state.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecapState {
    pub version: u32,
    pub iface: String,
    pub ifindex: u32,
    pub mode: UsedMode,
    pub vips: Vec<IpAddr>,
    /// The interface's own sysctls this attachment changed.
    pub sysctls: Vec<SysctlChange>,
}

/// `/run/rampart/decap/<scope>/shared.json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedState {
    pub version: u32,
    /// The `all` sysctls the scope's first attachment changed.
    pub sysctls: Vec<SysctlChange>,
    /// Addresses rampart put on `lo` → the interfaces whose VIPs they are.
    pub lo: BTreeMap<IpAddr, Vec<String>>,
}

/// Parses `--vip VIP[,VIP…]`: addresses a backend can own, each once.
pub fn parse_vips(list: &str) -> Result<Vec<IpAddr>> {
    let mut out: Vec<IpAddr> = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let ip: IpAddr = item.parse().map_err(|_| DecapError::BadVip(item.to_string()))?;
        check_vip(ip)?;
        if out.contains(&ip) {
            return Err(DecapError::DuplicateVip(ip));
        }
        out.push(ip);
    }
    if out.is_empty() {
        return Err(DecapError::NoVips);
    }
    if out.len() > MAX_DECAP_VIPS as usize {
        return Err(DecapError::TooManyVips(out.len()));
    }
    Ok(out)
}

fn check_vip(ip: IpAddr) -> Result<()> {
    let unusable = ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || ip == IpAddr::V4(Ipv4Addr::BROADCAST)
        || matches!(ip, IpAddr::V6(a) if a.to_ipv4_mapped().is_some());
    if unusable { Err(DecapError::UnusableVip(ip)) } else { Ok(()) }
}

/// What `attach` did.
#[derive(Clone, Debug)]
pub struct AttachReport {
    pub iface: String,
    pub ifindex: u32,
    pub mode: UsedMode,
    pub program_id: u32,
    pub pin_dir: PathBuf,
    /// VIPs this attach put on `lo` (the others were there already).
    pub lo_added: Vec<IpAddr>,
    pub sysctls: Vec<SysctlChange>,
}

/// What an attachment made so far: what `undo` takes apart.
#[derive(Default)]
struct Made {
    /// The interface's sysctls changed.
    sysctls: Vec<SysctlChange>,
    /// VIPs registered in `shared.json`'s `lo` for this interface.
    lo: Vec<IpAddr>,
}

/// Attaches `rampart_decap` to `iface` for `vips` (see the module documentation for what it
/// makes). The calling thread must be in the scope's network namespace.
pub fn attach(scope: &Scope, iface: &str, vips: &[IpAddr], mode: AttachMode) -> Result<AttachReport> {
    if vips.is_empty() {
        return Err(DecapError::NoVips);
    }
    for (i, v) in vips.iter().enumerate() {
        check_vip(*v)?;
        if vips[..i].contains(v) {
            return Err(DecapError::DuplicateVip(*v));
        }
    }
    if vips.len() > MAX_DECAP_VIPS as usize {
        return Err(DecapError::TooManyVips(vips.len()));
    }
    let ifindex = xdp::ifindex(iface, scope)?;
    xdp::ensure_bpffs()?;
    let pin_dir = scope.decap_pin_dir(iface);
    let state_dir = scope.decap_state_dir(iface);
    let already =
        || DecapError::AlreadyAttached { iface: iface.to_string(), scope: scope.clone(), pin_dir: pin_dir.clone() };
    if state_dir.exists() {
        return Err(already());
    }
    let pin_root = scope.decap_pin_root();
    fs::create_dir_all(&pin_root).map_err(fs_err("create directory", &pin_root))?;
    // Creating the pin directory claims the interface: a second attach fails here.
    match fs::create_dir(&pin_dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(already()),
        Err(e) => return Err(fs_err("create directory", &pin_dir)(e)),
    }
    let mut made = Made::default();
    let result = fs::create_dir_all(&state_dir)
        .map_err(fs_err("create directory", &state_dir))
        .and_then(|()| attach_claimed(scope, iface, ifindex, vips, mode, &pin_dir, &mut made));
    match result {
        Ok(r) => Ok(r),
        Err(e) => {
            if let Err(undo) = undo(scope, iface, &made, true) {
                log::error!("{iface}: undoing a failed decap attach: {undo}");
            }
            Err(e)
        }
    }
}

fn attach_claimed(
    scope: &Scope,
    iface: &str,
    ifindex: u32,
    vips: &[IpAddr],
    mode: AttachMode,
    pin_dir: &Path,
    made: &mut Made,
) -> Result<AttachReport> {
    // 1. ARP first: from the moment a VIP is on lo, the backend must not answer ARP for it.
    let shared_path = scope.decap_state_root().join(SHARED_FILE);
    let mut shared = match read_json::<SharedState>(&shared_path)? {
        Some(s) => s,
        None => {
            let mut s = SharedState { version: STATE_VERSION, ..Default::default() };
            // The first attachment in the scope: the `all` values are the scope's own. The
            // file is written before the change so that an interrupted attach can be undone.
            write_json(&shared_path, &s)?;
            for (name, want) in ARP_SYSCTLS {
                if let Some(c) = raise_sysctl(&Path::new(PROC_CONF).join("all").join(name), want)? {
                    s.sysctls.push(c);
                    write_json(&shared_path, &s)?;
                }
            }
            s
        }
    };
    for (name, want) in ARP_SYSCTLS {
        if let Some(c) = raise_sysctl(&Path::new(PROC_CONF).join(iface).join(name), want)? {
            made.sysctls.push(c);
        }
    }

    // 2. VIPs on lo.
    let mut lo_added = Vec::new();
    for vip in vips {
        if let Some(users) = shared.lo.get_mut(vip) {
            users.push(iface.to_string());
        } else if on_lo(*vip)? {
            log::info!("{vip} is on lo already and not rampart's: it stays there after detach");
            continue;
        } else {
            ip_addr("add", *vip)?;
            shared.lo.insert(*vip, vec![iface.to_string()]);
            lo_added.push(*vip);
        }
        made.lo.push(*vip);
        write_json(&shared_path, &shared)?;
    }

    // 3. The program.
    let prog_err = |op| move |source| DecapError::Program { iface: iface.to_string(), op, source: Box::new(source) };
    let map_err =
        |map, op| move |source| DecapError::Map { iface: iface.to_string(), map, op, source: Box::new(source) };
    let mut ebpf = EbpfLoader::new()
        .load(DECAP_OBJ)
        .map_err(|source| DecapError::Load { iface: iface.to_string(), source: Box::new(source) })?;
    let mut vip_map: HashMap<MapData, DecapKey, u32> = ebpf
        .take_map(DECAP_VIPS)
        .ok_or(MapError::InvalidName { name: DECAP_VIPS.to_string() })
        .and_then(HashMap::try_from)
        .map_err(map_err(DECAP_VIPS, "open"))?;
    for vip in vips {
        vip_map.insert(DecapKey::new(*vip), 0, 0).map_err(map_err(DECAP_VIPS, "insert"))?;
    }
    let stats: PerCpuArray<MapData, Counter> = ebpf
        .take_map(DECAP_STATS)
        .ok_or(MapError::InvalidName { name: DECAP_STATS.to_string() })
        .and_then(PerCpuArray::try_from)
        .map_err(map_err(DECAP_STATS, "open"))?;
    for (name, data) in [(DECAP_VIPS, vip_map.map()), (DECAP_STATS, stats.map())] {
        let path = pin_dir.join(name);
        data.pin(&path).map_err(|source| DecapError::Pin {
            iface: iface.to_string(),
            path: path.clone(),
            source: Box::new(source),
        })?;
    }
    let prog: &mut Xdp = ebpf
        .program_mut(DECAP_PROGRAM_NAME)
        .ok_or_else(|| prog_err("find in object")(ProgramError::NotLoaded))?
        .try_into()
        .map_err(prog_err("check type"))?;
    prog.load().map_err(prog_err("load (verifier)"))?;
    let (used, link) = xdp::attach_link(prog, iface, ifindex, mode)?;
    let program_id = xdp::pin_link(link, iface, pin_dir)?;

    let st = DecapState {
        version: STATE_VERSION,
        iface: iface.to_string(),
        ifindex,
        mode: used,
        vips: vips.to_vec(),
        sysctls: made.sysctls.clone(),
    };
    write_json(&scope.decap_state_dir(iface).join(STATE_FILE), &st)?;
    Ok(AttachReport {
        iface: iface.to_string(),
        ifindex,
        mode: used,
        program_id,
        pin_dir: pin_dir.to_path_buf(),
        lo_added,
        sysctls: shared.sysctls.iter().chain(&made.sysctls).cloned().collect(),
    })
}

/// What `detach` undid.
#[derive(Clone, Debug, Default)]
pub struct DetachReport {
    /// VIPs taken off `lo`.
    pub lo_removed: Vec<IpAddr>,
    pub sysctls_restored: Vec<SysctlChange>,
}

/// Detaches `rampart_decap` from `iface` and removes everything its attach made. `in_netns`:
/// the calling thread is in the scope's network namespace; false when that namespace is gone,
/// then only pins and state files are removed (the addresses and sysctls went with it).
pub fn detach(scope: &Scope, iface: &str, in_netns: bool) -> Result<DetachReport> {
    xdp::check_iface(iface)?;
    let pin_dir = scope.decap_pin_dir(iface);
    let state_dir = scope.decap_state_dir(iface);
    if !pin_dir.exists() && !state_dir.exists() {
        return Err(DecapError::NotAttached { iface: iface.to_string(), scope: scope.clone() });
    }
    let made = match read_json::<DecapState>(&state_dir.join(STATE_FILE))? {
        Some(st) => {
            let shared = read_json::<SharedState>(&scope.decap_state_root().join(SHARED_FILE))?.unwrap_or_default();
            let lo = st.vips.iter().copied().filter(|v| shared.lo.get(v).is_some_and(|u| u.iter().any(|i| i == iface)));
            Made { sysctls: st.sysctls, lo: lo.collect() }
        }
        // An attach that died half way: what it registered in shared.json is still found.
        None => {
            let shared = read_json::<SharedState>(&scope.decap_state_root().join(SHARED_FILE))?.unwrap_or_default();
            let lo = shared.lo.iter().filter(|(_, u)| u.iter().any(|i| i == iface)).map(|(v, _)| *v);
            Made { sysctls: Vec::new(), lo: lo.collect() }
        }
    };
    undo(scope, iface, &made, in_netns)
}

/// Takes an attachment apart in the reverse order of `attach`: the program (pins), the VIPs on
/// lo no other attachment names, the sysctls; then the state files and empty directories.
fn undo(scope: &Scope, iface: &str, made: &Made, in_netns: bool) -> Result<DetachReport> {
    let mut report = DetachReport::default();
    let pin_dir = scope.decap_pin_dir(iface);
    xdp::remove_dir_with(&pin_dir, PINS.iter().copied())?;
    xdp::remove_empty_parents(&pin_dir, Path::new(paths::BPFFS_ROOT))?;

    let shared_path = scope.decap_state_root().join(SHARED_FILE);
    let mut shared = read_json::<SharedState>(&shared_path)?;
    if let Some(shared) = &mut shared {
        for vip in &made.lo {
            let Some(users) = shared.lo.get_mut(vip) else { continue };
            users.retain(|u| u != iface);
            if users.is_empty() {
                if in_netns && on_lo(*vip)? {
                    ip_addr("del", *vip)?;
                    report.lo_removed.push(*vip);
                }
                shared.lo.remove(vip);
            }
            write_json(&shared_path, shared)?;
        }
    }
    if in_netns {
        for c in made.sysctls.iter().rev() {
            if restore_sysctl(c)? {
                report.sysctls_restored.push(c.clone());
            }
        }
    }
    // The last attachment of the scope puts the `all` sysctls back.
    if let Some(shared) = &shared
        && other_attachments(scope, iface)?.is_empty()
    {
        if in_netns {
            for c in shared.sysctls.iter().rev() {
                if restore_sysctl(c)? {
                    report.sysctls_restored.push(c.clone());
                }
            }
        }
        remove_file(&shared_path)?;
    }
    let state_dir = scope.decap_state_dir(iface);
    xdp::remove_dir_with(&state_dir, [STATE_FILE].into_iter())?;
    // The scope's directory goes when shared.json went with the last attachment.
    xdp::remove_empty_parents(&state_dir, Path::new(paths::RUN_ROOT))?;
    Ok(report)
}

/// Interfaces with a decap state directory in `scope`, sorted.
pub fn attached(scope: &Scope) -> Result<Vec<String>> {
    let mut out = std::collections::BTreeSet::new();
    for dir in [scope.decap_state_root(), scope.decap_pin_root()] {
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(fs_err("list", &dir)(e)),
        };
        for e in rd {
            let e = e.map_err(fs_err("list", &dir))?;
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                out.insert(e.file_name().to_string_lossy().into_owned());
            }
        }
    }
    Ok(out.into_iter().collect())
}

fn other_attachments(scope: &Scope, iface: &str) -> Result<Vec<String>> {
    Ok(attached(scope)?.into_iter().filter(|i| i != iface).collect())
}

/// One attachment as `decap status` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct DecapStatus {
    pub iface: String,
    pub ifindex: u32,
    pub mode: UsedMode,
    pub program_id: u32,
    pub vips: Vec<IpAddr>,
    /// `decap_stat::NAMES` → summed over CPUs.
    pub counters: BTreeMap<&'static str, Count>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Count {
    pub packets: u64,
    pub bytes: u64,
}

/// The state and counters of the attachment on `iface`.
pub fn status(scope: &Scope, iface: &str) -> Result<DecapStatus> {
    let path = scope.decap_state_dir(iface).join(STATE_FILE);
    let st = read_json::<DecapState>(&path)?
        .ok_or_else(|| DecapError::NotAttached { iface: iface.to_string(), scope: scope.clone() })?;
    let pin_dir = scope.decap_pin_dir(iface);
    let program_id = {
        let link: aya::programs::links::FdLink = aya::programs::links::PinnedLink::from_pin(pin_dir.join(LINK_PIN))
            .map_err(|source| XdpError::Link { iface: iface.to_string(), op: "open pin", source })?
            .into();
        link.info().map_err(|source| XdpError::Link { iface: iface.to_string(), op: "info", source })?.program_id()
    };
    let map_err =
        |op| move |source| DecapError::Map { iface: iface.to_string(), map: DECAP_STATS, op, source: Box::new(source) };
    let data = MapData::from_pin(pin_dir.join(DECAP_STATS)).map_err(map_err("open pin"))?;
    let stats: PerCpuArray<MapData, Counter> =
        PerCpuArray::try_from(Map::PerCpuArray(data)).map_err(map_err("check type"))?;
    let mut counters = BTreeMap::new();
    for (i, name) in decap_stat::NAMES.iter().enumerate() {
        let v = stats.get(&(i as u32), 0).map_err(map_err("read"))?;
        let sum = v.iter().fold(Count::default(), |a, c| Count {
            packets: a.packets.wrapping_add(c.packets),
            bytes: a.bytes.wrapping_add(c.bytes),
        });
        counters.insert(*name, sum);
    }
    Ok(DecapStatus { iface: st.iface, ifindex: st.ifindex, mode: st.mode, program_id, vips: st.vips, counters })
}

fn read_json<T: for<'de> Deserialize<'de> + Versioned>(path: &Path) -> Result<Option<T>> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(fs_err("read", path)(e)),
    };
    let value: T = serde_json::from_str(&text)
        .map_err(|e| DecapError::BadState { path: path.to_path_buf(), msg: e.to_string() })?;
    if value.version() != STATE_VERSION {
        let msg = format!("version {}, this rampart reads {STATE_VERSION}", value.version());
        return Err(DecapError::BadState { path: path.to_path_buf(), msg });
    }
    Ok(Some(value))
}

/// The state files carry a version: another rampart's layout is refused, not guessed at.
trait Versioned {
    fn version(&self) -> u32;
}

impl Versioned for DecapState {
    fn version(&self) -> u32 {
        self.version
    }
}

impl Versioned for SharedState {
    fn version(&self) -> u32 {
        self.version
    }
}

/// Writes `path` whole or not at all (a temporary file, then rename).
fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(fs_err("create directory", dir))?;
    }
    let text = serde_json::to_string_pretty(value).map_err(|e| DecapError::Fs {
        op: "serialize",
        path: path.to_path_buf(),
        source: io::Error::other(e),
    })?;
    let tmp = path.with_extension("json.tmp");
    fs::write(&tmp, text).map_err(fs_err("write", &tmp))?;
    fs::rename(&tmp, path).map_err(fs_err("rename into place", path))
}

fn remove_file(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(fs_err("remove", path)(e)),
    }
}

fn read_sysctl(path: &Path) -> Result<String> {
    Ok(fs::read_to_string(path).map_err(fs_err("read", path))?.trim().to_string())
}

/// Sets the sysctl at `path` to `want` if it is lower; returns the change made.
fn raise_sysctl(path: &Path, want: u32) -> Result<Option<SysctlChange>> {
    let previous = read_sysctl(path)?;
    let now: u32 =
        previous.parse().map_err(|_| DecapError::BadSysctl { path: path.to_path_buf(), value: previous.clone() })?;
    if now >= want {
        return Ok(None);
    }
    fs::write(path, want.to_string()).map_err(fs_err("write", path))?;
    Ok(Some(SysctlChange { path: path.to_path_buf(), previous, value: want.to_string() }))
}

/// Puts back the value `c` found, if the sysctl still holds the one rampart wrote. A sysctl of
/// an interface that is gone went with it.
fn restore_sysctl(c: &SysctlChange) -> Result<bool> {
    let now = match fs::read_to_string(&c.path) {
        Ok(t) => t.trim().to_string(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(fs_err("read", &c.path)(e)),
    };
    if now != c.value {
        log::warn!("{}: is {now}, not the {} rampart set: left as it is", c.path.display(), c.value);
        return Ok(false);
    }
    fs::write(&c.path, &c.previous).map_err(fs_err("write", &c.path))?;
    Ok(true)
}

/// `ip addr add|del VIP/32|128 dev lo` in the current network namespace.
fn ip_addr(op: &str, vip: IpAddr) -> Result<()> {
    let prefix = format!("{vip}/{}", if vip.is_ipv4() { 32 } else { 128 });
    let args = ["addr", op, prefix.as_str(), "dev", "lo"];
    let cmd = format!("ip {}", args.join(" "));
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| DecapError::Command { cmd: cmd.clone(), stderr: e.to_string() })?;
    if !out.status.success() {
        return Err(DecapError::Command { cmd, stderr: String::from_utf8_lossy(&out.stderr).trim().to_string() });
    }
    Ok(())
}

/// Whether `ip` is an address of `lo` in the current network namespace.
pub fn on_lo(ip: IpAddr) -> Result<bool> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(fs_err("getifaddrs", Path::new("lo"))(io::Error::last_os_error()));
    }
    let mut found = false;
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: a node of the list getifaddrs returned; its name is a C string and its
        // address, when set, a sockaddr of the family it names.
        unsafe {
            let ifa = &*cur;
            let is_lo = CStr::from_ptr(ifa.ifa_name).to_bytes() == b"lo";
            if is_lo && !ifa.ifa_addr.is_null() {
                let addr = match i32::from((*ifa.ifa_addr).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                        Some(IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes()))
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                        Some(IpAddr::from(sin6.sin6_addr.s6_addr))
                    }
                    _ => None,
                };
                if addr == Some(ip) {
                    found = true;
                    break;
                }
            }
            cur = ifa.ifa_next;
        }
    }
    // SAFETY: the list from getifaddrs, freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vips_are_checked() {
        let v = parse_vips("10.99.0.1, 2001:db8::1").unwrap();
        assert_eq!(v, vec!["10.99.0.1".parse::<IpAddr>().unwrap(), "2001:db8::1".parse().unwrap()]);
        assert!(matches!(parse_vips(""), Err(DecapError::NoVips)));
        assert!(matches!(parse_vips(" , "), Err(DecapError::NoVips)));
        assert!(matches!(parse_vips("10.99.0.256"), Err(DecapError::BadVip(s)) if s == "10.99.0.256"));
        assert!(matches!(parse_vips("10.99.0.0/24"), Err(DecapError::BadVip(_))));
        for bad in ["0.0.0.0", "127.0.0.1", "224.0.0.1", "255.255.255.255", "::", "::1", "ff02::1", "::ffff:10.0.0.1"] {
            assert!(matches!(parse_vips(bad), Err(DecapError::UnusableVip(_))), "{bad}");
        }
        let e = parse_vips("10.99.0.1,10.99.0.2,10.99.0.1").unwrap_err();
        assert!(matches!(e, DecapError::DuplicateVip(_)), "{e}");
        assert_eq!(e.to_string(), "--vip: 10.99.0.1 is given twice");
        let many: Vec<String> = (0..=MAX_DECAP_VIPS).map(|i| format!("10.{}.{}.1", i / 256, i % 256)).collect();
        assert!(matches!(parse_vips(&many.join(",")), Err(DecapError::TooManyVips(n)) if n == 1025));
    }

    #[test]
    fn keys_hold_the_address_bytes_in_memory_order() {
        let k = DecapKey::new("10.99.0.1".parse().unwrap());
        assert_eq!(k.addr[0].to_ne_bytes(), [10, 99, 0, 1, 0, 0, 0, 0]);
        assert_eq!((k.addr[1], k.family), (0, 4));
        let k = DecapKey::new("2001:db8::1".parse().unwrap());
        assert_eq!(k.addr[0].to_ne_bytes(), [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0]);
        assert_eq!(k.addr[1].to_ne_bytes(), [0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(k.family, 6);
    }
}
