//! Loading, attaching, pinning and detaching the XDP program.
//!
//! An attached interface is these things, and nothing else (detach removes exactly them):
//! - `/sys/fs/bpf/rampart/<scope>/<iface>/link`: the pinned BPF link (the program stays attached
//!   while it exists), and one pin per map (`rampart_common::fw::map_names::ALL` and
//!   `rampart_common::lb::map_names::ALL`);
//! - `/run/rampart/<scope>/<iface>/state.json` and `lock` (see [`crate::fw::state`]), and
//!   `lb.json` once services are configured (see [`crate::lb::state`]).
//!
//! The pieces that do not depend on the firewall ([`ifindex`], [`ensure_bpffs`], [`attach_link`]
//! with its native → skb fallback, [`pin_link`], [`remove_dir_with`], [`remove_empty_parents`])
//! also serve the backends' decapsulation program (`crate::lb::decap`).
use std::{
    ffi::CString,
    fs, io,
    path::{Path, PathBuf},
};

use aya::{
    EbpfLoader,
    programs::{
        Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
    },
};
use rampart_common::{
    fw::{PROGRAM_NAME, map_names},
    lb::map_names as lb_map_names,
};
use serde::{Deserialize, Serialize};

use crate::{
    bpf::FIREWALL_OBJ,
    fw::{
        rules::{Action, RuleSet},
        state::{self, FwState, StateError},
        tables::{FwTables, TablesError},
    },
    lb::{
        self,
        tables::{LbTables, LbTablesError},
    },
    paths::{self, Scope},
};

/// File name of the pinned link inside the pin directory.
pub const LINK_PIN: &str = "link";
/// `statfs` magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const BPFFS_MOUNT: &str = "/sys/fs/bpf";

/// The mode asked for on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// Native (driver) mode, else generic (skb) mode.
    Auto,
    Native,
    Skb,
}

/// The mode the program runs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UsedMode {
    Native,
    Skb,
}

impl std::fmt::Display for UsedMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            UsedMode::Native => "native",
            UsedMode::Skb => "skb",
        })
    }
}

impl UsedMode {
    fn xdp_mode(self) -> XdpMode {
        match self {
            UsedMode::Native => XdpMode::Driver,
            UsedMode::Skb => XdpMode::Skb,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    #[error("invalid interface name `{0}`")]
    BadIface(String),
    #[error("interface {iface} not found{}", in_scope(.scope))]
    NoIface { iface: String, scope: Scope },
    #[error("{iface}: already attached{} (pins in {}); detach it first", in_scope(.scope), pin_dir.display())]
    AlreadyAttached { iface: String, scope: Scope, pin_dir: PathBuf },
    #[error("{iface}: not attached{}", in_scope(.scope))]
    NotAttached { iface: String, scope: Scope },
    #[error("mount bpffs at {BPFFS_MOUNT}")]
    Mount(#[source] io::Error),
    #[error("{}: {op}", path.display())]
    Fs {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{iface}: load the firewall object")]
    Load {
        iface: String,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("{iface}: program {PROGRAM_NAME}: {op}")]
    Program {
        iface: String,
        op: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("{iface}: attach in {mode} mode{}", busy_hint(source))]
    Attach {
        iface: String,
        mode: UsedMode,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("{iface}: attach in native mode failed ({native}), and in skb mode{}", busy_hint(source))]
    AttachAuto {
        iface: String,
        native: String,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("{iface}: take the attached link")]
    TakeLink {
        iface: String,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("{iface}: link: {op}")]
    Link {
        iface: String,
        op: &'static str,
        #[source]
        source: LinkError,
    },
    #[error("{iface}: pin link at {}", path.display())]
    PinLink {
        iface: String,
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("{}: unexpected entries left: {}", dir.display(), entries.join(", "))]
    Leftovers { dir: PathBuf, entries: Vec<String> },
    #[error("{iface}")]
    Tables {
        iface: String,
        #[source]
        source: Box<TablesError>,
    },
    #[error("{iface}: the balancer's maps")]
    Lb {
        iface: String,
        #[source]
        source: Box<LbTablesError>,
    },
    #[error(transparent)]
    State(#[from] StateError),
}

/// EBUSY/EEXIST from attaching mean another XDP program holds the interface.
fn busy_hint(e: &aya::programs::ProgramError) -> &'static str {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>()
            && matches!(io.raw_os_error(), Some(libc::EBUSY) | Some(libc::EEXIST))
        {
            return " (another XDP program is attached to it)";
        }
        cur = err.source();
    }
    ""
}

/// `e` and its sources, `: `-separated.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(err) = cur {
        s.push_str(": ");
        s.push_str(&err.to_string());
        cur = err.source();
    }
    s
}

fn in_scope(scope: &Scope) -> String {
    match scope {
        Scope::Host => String::new(),
        Scope::Netns(n) => format!(" in network namespace {n}"),
    }
}

type Result<T, E = XdpError> = std::result::Result<T, E>;

fn fs_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> XdpError + use<> {
    let path = path.to_path_buf();
    move |source| XdpError::Fs { op, path, source }
}

/// An interface name is one path component of at most 15 bytes (IFNAMSIZ - 1).
pub fn check_iface(iface: &str) -> Result<()> {
    if iface.is_empty()
        || iface.len() > 15
        || iface == "."
        || iface == ".."
        || iface.contains(['/', '\0'])
        || iface.chars().any(char::is_whitespace)
    {
        return Err(XdpError::BadIface(iface.to_string()));
    }
    Ok(())
}

/// Index of `iface` in the current network namespace.
pub fn ifindex(iface: &str, scope: &Scope) -> Result<u32> {
    check_iface(iface)?;
    let c = CString::new(iface).map_err(|_| XdpError::BadIface(iface.to_string()))?;
    // SAFETY: a valid C string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        return Err(XdpError::NoIface { iface: iface.to_string(), scope: scope.clone() });
    }
    Ok(idx)
}

/// Mounts bpffs at /sys/fs/bpf unless it is there.
pub fn ensure_bpffs() -> Result<()> {
    let path = CString::new(BPFFS_MOUNT).map_err(|e| XdpError::Mount(io::Error::other(e)))?;
    // SAFETY: statfs into a zeroed struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(path.as_ptr(), &mut st) };
    if rc == 0 && st.f_type as i64 == BPF_FS_MAGIC {
        return Ok(());
    }
    let fstype = CString::new("bpf").map_err(|e| XdpError::Mount(io::Error::other(e)))?;
    // SAFETY: valid C strings; no mount data.
    let rc = unsafe { libc::mount(fstype.as_ptr(), path.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(XdpError::Mount(io::Error::last_os_error()));
    }
    Ok(())
}

/// What `attach` did.
#[derive(Clone, Debug)]
pub struct AttachReport {
    pub iface: String,
    pub ifindex: u32,
    pub mode: UsedMode,
    pub program_id: u32,
    pub pin_dir: PathBuf,
}

/// Loads `rampart_fw`, installs `rules` (default: no rules, `default = "allow"`, so nothing is
/// dropped until rules are loaded) and attaches it to `iface` with its link and maps pinned.
/// On failure everything made so far is removed.
pub fn attach(scope: &Scope, iface: &str, mode: AttachMode, rules: Option<RuleSet>) -> Result<AttachReport> {
    let ifindex = ifindex(iface, scope)?;
    ensure_bpffs()?;
    let pin_dir = scope.pin_dir(iface);
    let state_dir = scope.state_dir(iface);
    let already =
        || XdpError::AlreadyAttached { iface: iface.to_string(), scope: scope.clone(), pin_dir: pin_dir.clone() };
    if state_dir.exists() {
        return Err(already());
    }
    let parent = pin_dir.parent().unwrap_or(Path::new(paths::BPFFS_ROOT));
    fs::create_dir_all(parent).map_err(fs_err("create directory", parent))?;
    // Creating the pin directory claims the interface: a second attach fails here.
    match fs::create_dir(&pin_dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(already()),
        Err(e) => return Err(fs_err("create directory", &pin_dir)(e)),
    }
    match attach_claimed(scope, iface, ifindex, mode, rules, &pin_dir) {
        Ok(r) => Ok(r),
        Err(e) => {
            if let Err(undo) = remove_all(scope, iface) {
                log::error!("{iface}: undoing a failed attach: {undo}");
            }
            Err(e)
        }
    }
}

fn attach_claimed(
    scope: &Scope,
    iface: &str,
    ifindex: u32,
    mode: AttachMode,
    rules: Option<RuleSet>,
    pin_dir: &Path,
) -> Result<AttachReport> {
    let tables_err = |source| XdpError::Tables { iface: iface.to_string(), source: Box::new(source) };
    let prog_err = |op| move |source| XdpError::Program { iface: iface.to_string(), op, source: Box::new(source) };
    let mut ebpf = EbpfLoader::new()
        .load(FIREWALL_OBJ)
        .map_err(|source| XdpError::Load { iface: iface.to_string(), source: Box::new(source) })?;
    let mut tables = FwTables::from_ebpf(&mut ebpf).map_err(tables_err)?;
    let lb_err = |source| XdpError::Lb { iface: iface.to_string(), source: Box::new(source) };
    let mut lb = LbTables::from_ebpf(&mut ebpf).map_err(lb_err)?;
    let prog: &mut Xdp = ebpf
        .program_mut(PROGRAM_NAME)
        .ok_or_else(|| XdpError::Program {
            iface: iface.to_string(),
            op: "find in object",
            source: Box::new(aya::programs::ProgramError::NotLoaded),
        })?
        .try_into()
        .map_err(prog_err("check type"))?;
    prog.load().map_err(prog_err("load (verifier)"))?;

    // Tables first: the first packet the program sees finds a complete rule set.
    let rules =
        rules.unwrap_or_else(|| RuleSet { default: Action::Allow, sets: Default::default(), rules: Vec::new() });
    let report = tables.install(&rules).map_err(tables_err)?;
    tables.pin_all(pin_dir).map_err(tables_err)?;
    // The balancer stage: its settings, no services yet (`rampart lb`, `attach --config`).
    lb.set_config(&lb::state::default_config()).map_err(lb_err)?;
    lb.pin_all(pin_dir).map_err(lb_err)?;

    let (used, link) = attach_link(prog, iface, ifindex, mode)?;
    let program_id = pin_link(link, iface, pin_dir)?;

    let next_id = rules.rules.iter().map(|r| r.id).max().unwrap_or(0) + 1;
    let st = FwState {
        version: state::STATE_VERSION,
        iface: iface.to_string(),
        ifindex,
        mode: used,
        rules,
        next_id,
        active_slot: report.slot,
        counter_bases: Default::default(),
    };
    state::create(scope, iface, &st)?;
    Ok(AttachReport { iface: iface.to_string(), ifindex, mode: used, program_id, pin_dir: pin_dir.to_path_buf() })
}

/// Attaches the loaded `prog` to `iface` through a BPF link in `mode` (auto: native, else skb)
/// and returns the mode it runs in and the link, not pinned yet (it detaches when dropped).
pub fn attach_link(prog: &mut Xdp, iface: &str, ifindex: u32, mode: AttachMode) -> Result<(UsedMode, FdLink)> {
    let (used, link_id) = match mode {
        AttachMode::Native | AttachMode::Skb => {
            let used = if mode == AttachMode::Native { UsedMode::Native } else { UsedMode::Skb };
            let id = prog.attach_to_if_index(ifindex, used.xdp_mode()).map_err(|source| XdpError::Attach {
                iface: iface.to_string(),
                mode: used,
                source: Box::new(source),
            })?;
            (used, id)
        }
        AttachMode::Auto => match prog.attach_to_if_index(ifindex, XdpMode::Driver) {
            Ok(id) => (UsedMode::Native, id),
            Err(native) => {
                log::info!("{iface}: native mode failed ({}); trying skb mode", chain(&native));
                let id = prog.attach_to_if_index(ifindex, XdpMode::Skb).map_err(|source| XdpError::AttachAuto {
                    iface: iface.to_string(),
                    native: chain(&native),
                    source: Box::new(source),
                })?;
                (UsedMode::Skb, id)
            }
        },
    };
    let link = prog
        .take_link(link_id)
        .map_err(|source| XdpError::TakeLink { iface: iface.to_string(), source: Box::new(source) })?;
    let link = FdLink::try_from(link).map_err(|source| XdpError::Link {
        iface: iface.to_string(),
        op: "convert to an fd link",
        source,
    })?;
    Ok((used, link))
}

/// Pins `link` as `pin_dir/link` (the program then stays attached without this process) and
/// returns the id of the program behind it.
pub fn pin_link(link: FdLink, iface: &str, pin_dir: &Path) -> Result<u32> {
    let program_id =
        link.info().map_err(|source| XdpError::Link { iface: iface.to_string(), op: "info", source })?.program_id();
    let link_path = pin_dir.join(LINK_PIN);
    link.pin(&link_path).map_err(|source| XdpError::PinLink {
        iface: iface.to_string(),
        path: link_path.clone(),
        source,
    })?;
    Ok(program_id)
}

/// Detaches the program from `iface` and removes every pin and state file attach made.
pub fn detach(scope: &Scope, iface: &str) -> Result<()> {
    check_iface(iface)?;
    let pin_dir = scope.pin_dir(iface);
    let state_dir = scope.state_dir(iface);
    if !pin_dir.exists() && !state_dir.exists() {
        return Err(XdpError::NotAttached { iface: iface.to_string(), scope: scope.clone() });
    }
    // Wait for a running update to finish; the lock dies with the state directory.
    let _lock = match state::lock(scope, iface) {
        Ok(l) => Some(l),
        Err(StateError::NotAttached { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    remove_all(scope, iface)
}

/// Removes the link pin (the program detaches when its last reference goes), the map pins, the
/// pin and state directories and their parents when empty. Missing pieces are fine.
fn remove_all(scope: &Scope, iface: &str) -> Result<()> {
    let pin_dir = scope.pin_dir(iface);
    let state_dir = scope.state_dir(iface);
    let names = std::iter::once(LINK_PIN).chain(map_names::ALL).chain(lb_map_names::ALL);
    remove_dir_with(&pin_dir, names)?;
    remove_empty_parents(&pin_dir, Path::new(paths::BPFFS_ROOT))?;
    remove_dir_with(&state_dir, state::FILES.iter().chain(&lb::state::FILES).copied())?;
    remove_empty_parents(&state_dir, Path::new(paths::RUN_ROOT))?;
    Ok(())
}

/// Removes `files` from `dir`, then `dir`; anything else inside is an error (never ours to
/// delete).
pub fn remove_dir_with<'a>(dir: &Path, files: impl Iterator<Item = &'a str>) -> Result<()> {
    for name in files {
        let p = dir.join(name);
        match fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(fs_err("remove", &p)(e)),
        }
    }
    match fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::DirectoryNotEmpty => {
            let entries = fs::read_dir(dir)
                .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
                .unwrap_or_default();
            Err(XdpError::Leftovers { dir: dir.to_path_buf(), entries })
        }
        Err(e) => Err(fs_err("remove directory", dir)(e)),
    }
}

/// Removes the parents of `path` up to and including `root` while they are empty.
pub fn remove_empty_parents(path: &Path, root: &Path) -> Result<()> {
    let mut p = path.parent();
    while let Some(dir) = p {
        if !dir.starts_with(root) {
            break;
        }
        match fs::remove_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) if e.kind() == io::ErrorKind::DirectoryNotEmpty => break,
            Err(e) => return Err(fs_err("remove directory", dir)(e)),
        }
        if dir == root {
            break;
        }
        p = dir.parent();
    }
    Ok(())
}

/// Interfaces attached in `scope` (a pin or state directory exists), sorted.
pub fn attached_ifaces(scope: &Scope) -> Result<Vec<String>> {
    let mut out = std::collections::BTreeSet::new();
    for root in [paths::BPFFS_ROOT, paths::RUN_ROOT] {
        let dir = Path::new(root).join(scope.dir_name());
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

/// Id of the program behind the pinned link of `iface`.
pub fn program_id(scope: &Scope, iface: &str) -> Result<u32> {
    let path = scope.pin_dir(iface).join(LINK_PIN);
    let link: FdLink = PinnedLink::from_pin(&path)
        .map_err(|source| XdpError::Link { iface: iface.to_string(), op: "open pin", source })?
        .into();
    Ok(link.info().map_err(|source| XdpError::Link { iface: iface.to_string(), op: "info", source })?.program_id())
}

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeMap,
        process::Command,
        sync::atomic::{AtomicU32, Ordering},
    };

    use super::*;
    use crate::{
        fw::{
            rules::{AddrMatch, Rule},
            state::Firewall,
        },
        netns::NetnsGuard,
    };

    fn require_root() {
        // SAFETY: plain syscall.
        assert!(unsafe { libc::geteuid() } == 0, "attach tests create namespaces: run them as root");
    }

    fn ip(args: &[&str]) {
        let out = Command::new("ip").args(args).output().expect("run ip");
        assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }

    /// A namespace holding a veth pair `rpa`/`rpb`; on drop: pins and state of the scope
    /// removed, namespace deleted.
    struct Lab {
        ns: String,
    }

    impl Lab {
        fn new() -> Lab {
            static N: AtomicU32 = AtomicU32::new(0);
            let ns = format!("rpx{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
            ip(&["netns", "add", &ns]);
            let lab = Lab { ns };
            ip(&["-n", &lab.ns, "link", "add", "rpa", "type", "veth", "peer", "name", "rpb"]);
            ip(&["-n", &lab.ns, "link", "set", "rpa", "up"]);
            ip(&["-n", &lab.ns, "link", "set", "rpb", "up"]);
            lab
        }
        fn scope(&self) -> Scope {
            Scope::Netns(self.ns.clone())
        }
    }

    impl Drop for Lab {
        fn drop(&mut self) {
            let _ = remove_all(&self.scope(), "rpa");
            let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        }
    }

    fn xdp_on(lab: &Lab) -> bool {
        let out = Command::new("ip").args(["-n", &lab.ns, "-d", "link", "show", "rpa"]).output().expect("ip");
        String::from_utf8_lossy(&out.stdout).contains("prog/xdp")
    }

    fn rule(action: Action, src: Option<AddrMatch>) -> Rule {
        Rule { id: 0, action, src, dst: None, proto: None, sport: None, dport: None, comment: None }
    }

    fn lifecycle(mode: AttachMode, want: UsedMode) {
        require_root();
        let lab = Lab::new();
        let scope = lab.scope();
        let guard = NetnsGuard::enter(&lab.ns).expect("enter namespace");

        let r = attach(&scope, "rpa", mode, None).expect("attach");
        assert_eq!(r.mode, want);
        assert!(xdp_on(&lab));
        for name in std::iter::once(LINK_PIN).chain(map_names::ALL).chain(lb_map_names::ALL) {
            assert!(scope.pin_dir("rpa").join(name).exists(), "{name}");
        }
        assert_eq!(attached_ifaces(&scope).unwrap(), vec!["rpa".to_string()]);
        assert_eq!(program_id(&scope, "rpa").unwrap(), r.program_id);
        let again = attach(&scope, "rpa", mode, None).unwrap_err();
        assert!(matches!(again, XdpError::AlreadyAttached { .. }), "{again}");
        assert!(scope.pin_dir("rpa").join(LINK_PIN).exists(), "a refused attach removed pins");

        {
            let mut fw = Firewall::open(&scope, "rpa").unwrap();
            assert_eq!(fw.rules().default, Action::Allow);
            assert!(fw.rules().rules.is_empty());
            let rs = RuleSet {
                default: Action::Deny,
                sets: BTreeMap::from([("bl".to_string(), vec!["192.0.2.0/24".parse().unwrap()])]),
                rules: vec![rule(Action::Deny, Some(AddrMatch::Set("bl".into()))), rule(Action::Allow, None)],
            };
            fw.load(rs).unwrap();
            let id = fw.add_rule(rule(Action::Deny, None), Some(1)).unwrap();
            assert_eq!(id, 3);
            fw.delete_rule(1).unwrap();
            let ids: Vec<(u32, usize)> = fw.rule_counts().unwrap().iter().map(|c| (c.id, c.position)).collect();
            assert_eq!(ids, vec![(3, 1), (2, 2)]);

            // A refused update leaves state and maps as they were.
            let state_file = scope.state_dir("rpa").join(state::STATE_FILE);
            let before = (fs::read(&state_file).unwrap(), fw.tables().active_slot().unwrap());
            let bad = fw.add_rule(rule(Action::Deny, Some(AddrMatch::Set("nope".into()))), None).unwrap_err();
            assert!(matches!(bad, StateError::Invalid { .. }), "{bad}");
            assert!(matches!(fw.delete_rule(99), Err(StateError::NoRule { .. })));
            assert!(matches!(fw.add_rule(rule(Action::Deny, None), Some(9)), Err(StateError::Position { .. })));
            let after = (fs::read(&state_file).unwrap(), fw.tables().active_slot().unwrap());
            assert_eq!(before, after);
        }
        let reopened = Firewall::open(&scope, "rpa").unwrap();
        assert_eq!(reopened.state().next_id, 4);
        drop(reopened);

        detach(&scope, "rpa").unwrap();
        assert!(!xdp_on(&lab), "program still attached after detach");
        for root in [paths::BPFFS_ROOT, paths::RUN_ROOT] {
            let d = Path::new(root).join(scope.dir_name());
            assert!(!d.exists(), "{} left behind", d.display());
        }
        assert!(matches!(detach(&scope, "rpa"), Err(XdpError::NotAttached { .. })));
        guard.restore().unwrap();
    }

    #[test]
    fn skb_attach_update_detach_leaves_nothing() {
        lifecycle(AttachMode::Skb, UsedMode::Skb);
    }

    #[test]
    fn native_attach_update_detach_leaves_nothing() {
        lifecycle(AttachMode::Native, UsedMode::Native);
    }

    #[test]
    fn attach_to_a_missing_interface_makes_nothing() {
        require_root();
        let lab = Lab::new();
        let scope = lab.scope();
        let _guard = NetnsGuard::enter(&lab.ns).expect("enter namespace");
        let err = attach(&scope, "nosuch0", AttachMode::Auto, None).unwrap_err();
        assert!(matches!(err, XdpError::NoIface { .. }), "{err}");
        assert!(!Path::new(paths::BPFFS_ROOT).join(scope.dir_name()).exists());
        assert!(!Path::new(paths::RUN_ROOT).join(scope.dir_name()).exists());
    }
}
