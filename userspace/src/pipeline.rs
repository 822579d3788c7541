//! The main XDP program on one interface: the pipeline of `firewall-ebpf/src/bin/rampart.rs`
//! (parse → firewall → balancer). Attaching loads it, fills both stages' tables (the firewall's
//! rules, the balancer's settings with no services), pins link and maps, and writes the state
//! file; detaching removes exactly that.
//!
//! An attached interface is these things, and nothing else:
//! - `/sys/fs/bpf/rampart/<scope>/<iface>/link`: the pinned BPF link (the program stays attached
//!   while it exists), and one pin per map (`rampart_common::fw::map_names::ALL` and
//!   `rampart_common::lb::map_names::ALL`);
//! - `/run/rampart/<scope>/<iface>/state.json` and `lock` (see [`crate::fw::state`]), and
//!   `lb.json` once services are configured (see [`crate::lb::state`]).
//!
//! The stages own their tables and state (`fw/`, `lb/`); the generic XDP plumbing is
//! [`crate::xdp`]. This module sits above all three, so none of them imports it.
use std::{
    fs, io,
    path::{Path, PathBuf},
};

use aya::{EbpfLoader, programs::Xdp};
use rampart_common::{
    fw::{PROGRAM_NAME, map_names},
    lb::{DEFAULT_CONNTRACK_ENTRIES, map_names as lb_map_names},
};

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
    xdp::{
        AttachMode, LINK_PIN, UsedMode, XdpError, attach_link, check_iface, ensure_bpffs, fs_err, ifindex, in_scope,
        pin_link, remove_dir_with, remove_empty_parents,
    },
};

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Xdp(#[from] XdpError),
    #[error("{iface}: already attached{} (pins in {}); detach it first", in_scope(.scope), pin_dir.display())]
    AlreadyAttached { iface: String, scope: Scope, pin_dir: PathBuf },
    #[error("{iface}: not attached{}", in_scope(.scope))]
    NotAttached { iface: String, scope: Scope },
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
    #[error("{iface}: {why}")]
    Setting { iface: String, why: String },
    #[error("{iface}: connection table {}", path.display())]
    Conntrack {
        iface: String,
        path: PathBuf,
        #[source]
        source: aya::maps::MapError,
    },
}

type Result<T, E = PipelineError> = std::result::Result<T, E>;

/// What `attach` did.
#[derive(Clone, Debug)]
pub struct AttachReport {
    pub iface: String,
    pub ifindex: u32,
    pub mode: UsedMode,
    pub program_id: u32,
    pub pin_dir: PathBuf,
}

/// How to attach: the mode, the rules to start with and the connection table's size.
/// `Default`: auto mode, no rules (`default = "allow"`: nothing is dropped until rules are
/// loaded), [`DEFAULT_CONNTRACK_ENTRIES`].
#[derive(Clone, Debug, Default)]
pub struct AttachOptions {
    pub mode: AttachMode,
    pub rules: Option<RuleSet>,
    /// Entries of the balancer's connection table (all CPUs together). It is sized when the
    /// program is loaded: changing it takes a detach and a new attach.
    pub conntrack_entries: Option<u32>,
}

/// Loads the pipeline program, installs `opts.rules` and the balancer's settings, and attaches
/// it to `iface` with its link and maps pinned. On failure everything made so far is removed.
pub fn attach(scope: &Scope, iface: &str, opts: AttachOptions) -> Result<AttachReport> {
    if let Some(n) = opts.conntrack_entries {
        lb::check_conntrack_entries(n).map_err(|why| PipelineError::Setting { iface: iface.to_string(), why })?;
    }
    let ifindex = ifindex(iface, scope)?;
    ensure_bpffs()?;
    let pin_dir = scope.pin_dir(iface);
    let state_dir = scope.state_dir(iface);
    let already =
        || PipelineError::AlreadyAttached { iface: iface.to_string(), scope: scope.clone(), pin_dir: pin_dir.clone() };
    if state_dir.exists() {
        return Err(already());
    }
    let parent = pin_dir.parent().unwrap_or(Path::new(paths::BPFFS_ROOT));
    fs::create_dir_all(parent).map_err(fs_err("create directory", parent))?;
    // Creating the pin directory claims the interface: a second attach fails here.
    match fs::create_dir(&pin_dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(already()),
        Err(e) => return Err(fs_err("create directory", &pin_dir)(e).into()),
    }
    match attach_claimed(scope, iface, ifindex, opts, &pin_dir) {
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
    opts: AttachOptions,
    pin_dir: &Path,
) -> Result<AttachReport> {
    let tables_err = |source| PipelineError::Tables { iface: iface.to_string(), source: Box::new(source) };
    let prog_err = |op| move |source| PipelineError::Program { iface: iface.to_string(), op, source: Box::new(source) };
    let entries = opts.conntrack_entries.unwrap_or(DEFAULT_CONNTRACK_ENTRIES);
    let mut ebpf = EbpfLoader::new()
        .map_max_entries(lb_map_names::CONNTRACK, entries)
        .map_max_entries(lb_map_names::CONNTRACK6, entries)
        .load(FIREWALL_OBJ)
        .map_err(|source| PipelineError::Load { iface: iface.to_string(), source: Box::new(source) })?;
    let mut tables = FwTables::from_ebpf(&mut ebpf).map_err(tables_err)?;
    let lb_err = |source| PipelineError::Lb { iface: iface.to_string(), source: Box::new(source) };
    let mut lb = LbTables::from_ebpf(&mut ebpf).map_err(lb_err)?;
    let prog: &mut Xdp = ebpf
        .program_mut(PROGRAM_NAME)
        .ok_or_else(|| PipelineError::Program {
            iface: iface.to_string(),
            op: "find in object",
            source: Box::new(aya::programs::ProgramError::NotLoaded),
        })?
        .try_into()
        .map_err(prog_err("check type"))?;
    prog.load().map_err(prog_err("load (verifier)"))?;

    // Tables first: the first packet the program sees finds a complete rule set.
    let rules =
        opts.rules.unwrap_or_else(|| RuleSet { default: Action::Allow, sets: Default::default(), rules: Vec::new() });
    let report = tables.install(&rules).map_err(tables_err)?;
    tables.pin_all(pin_dir).map_err(tables_err)?;
    // The balancer stage: its settings, no services yet (`rampart lb`, `attach --config`).
    lb.set_config(&lb::state::default_config()).map_err(lb_err)?;
    lb.pin_all(pin_dir).map_err(lb_err)?;

    let (used, link) = attach_link(prog, iface, ifindex, opts.mode)?;
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

/// Entries of the connection table the program attached to `iface` was loaded with.
pub fn conntrack_entries(scope: &Scope, iface: &str) -> Result<u32> {
    let path = scope.pin_dir(iface).join(lb_map_names::CONNTRACK);
    let err = |source| PipelineError::Conntrack { iface: iface.to_string(), path: path.clone(), source };
    let info = aya::maps::MapInfo::from_pin(&path).map_err(err)?;
    Ok(info.max_entries())
}

/// Detaches the program from `iface` and removes every pin and state file attach made.
pub fn detach(scope: &Scope, iface: &str) -> Result<()> {
    check_iface(iface)?;
    let pin_dir = scope.pin_dir(iface);
    let state_dir = scope.state_dir(iface);
    if !pin_dir.exists() && !state_dir.exists() {
        return Err(PipelineError::NotAttached { iface: iface.to_string(), scope: scope.clone() });
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use rampart_netlab::{Ns, veth};

    use super::*;
    use crate::{
        fw::{
            rules::{AddrMatch, Rule},
            state::Firewall,
        },
        netns::NetnsGuard,
        xdp::{attached_ifaces, program_id},
    };

    fn require_root() {
        // SAFETY: plain syscall.
        assert!(unsafe { libc::geteuid() } == 0, "attach tests create namespaces: run them as root");
    }

    /// A namespace holding a veth pair `rpa`/`rpb`; on drop: pins and state of the scope
    /// removed, then the namespace deleted.
    struct Lab {
        ns: String,
        _net: rampart_netlab::Lab,
    }

    impl Lab {
        fn new() -> Lab {
            let mut net = rampart_netlab::Lab::new("rpx").unwrap_or_else(|e| panic!("{e}"));
            let ns = net.ns("x").unwrap_or_else(|e| panic!("{e}"));
            veth(ns.end("rpa"), ns.end("rpb")).unwrap_or_else(|e| panic!("{e}"));
            Lab { ns: ns.name().to_string(), _net: net }
        }
        fn scope(&self) -> Scope {
            Scope::Netns(self.ns.clone())
        }
    }

    impl Drop for Lab {
        fn drop(&mut self) {
            let _ = remove_all(&self.scope(), "rpa");
        }
    }

    fn xdp_on(lab: &Lab) -> bool {
        Ns::named(&lab.ns).ip(&["-d", "link", "show", "rpa"]).expect("ip").contains("prog/xdp")
    }

    fn rule(action: Action, src: Option<AddrMatch>) -> Rule {
        Rule { id: 0, action, src, dst: None, proto: None, sport: None, dport: None, comment: None }
    }

    fn lifecycle(mode: AttachMode, want: UsedMode, conntrack: Option<u32>) {
        require_root();
        let lab = Lab::new();
        let scope = lab.scope();
        let guard = NetnsGuard::enter(&lab.ns).expect("enter namespace");

        let opts = AttachOptions { mode, rules: None, conntrack_entries: conntrack };
        let r = attach(&scope, "rpa", opts.clone()).expect("attach");
        assert_eq!(r.mode, want);
        assert_eq!(conntrack_entries(&scope, "rpa").unwrap(), conntrack.unwrap_or(DEFAULT_CONNTRACK_ENTRIES));
        assert!(xdp_on(&lab));
        for name in std::iter::once(LINK_PIN).chain(map_names::ALL).chain(lb_map_names::ALL) {
            assert!(scope.pin_dir("rpa").join(name).exists(), "{name}");
        }
        assert_eq!(attached_ifaces(&scope).unwrap(), vec!["rpa".to_string()]);
        assert_eq!(program_id(&scope, "rpa").unwrap(), r.program_id);
        let again = attach(&scope, "rpa", opts).unwrap_err();
        assert!(matches!(again, PipelineError::AlreadyAttached { .. }), "{again}");
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
        assert!(matches!(detach(&scope, "rpa"), Err(PipelineError::NotAttached { .. })));
        guard.restore().unwrap();
    }

    #[test]
    fn skb_attach_update_detach_leaves_nothing() {
        lifecycle(AttachMode::Skb, UsedMode::Skb, Some(4096));
    }

    #[test]
    fn native_attach_update_detach_leaves_nothing() {
        lifecycle(AttachMode::Native, UsedMode::Native, None);
    }

    #[test]
    fn attach_to_a_missing_interface_makes_nothing() {
        require_root();
        let lab = Lab::new();
        let scope = lab.scope();
        let _guard = NetnsGuard::enter(&lab.ns).expect("enter namespace");
        let err = attach(&scope, "nosuch0", AttachOptions::default()).unwrap_err();
        assert!(matches!(err, PipelineError::Xdp(XdpError::NoIface { .. })), "{err}");
        assert!(!Path::new(paths::BPFFS_ROOT).join(scope.dir_name()).exists());
        assert!(!Path::new(paths::RUN_ROOT).join(scope.dir_name()).exists());
    }

    /// A connection-table size out of range is refused before anything is made.
    #[test]
    fn conntrack_size_out_of_range_makes_nothing() {
        require_root();
        let lab = Lab::new();
        let scope = lab.scope();
        let _guard = NetnsGuard::enter(&lab.ns).expect("enter namespace");
        use rampart_common::lb::{MAX_CONNTRACK_ENTRIES, MIN_CONNTRACK_ENTRIES};
        for n in [0, MIN_CONNTRACK_ENTRIES - 1, MAX_CONNTRACK_ENTRIES + 1] {
            let opts = AttachOptions { conntrack_entries: Some(n), ..Default::default() };
            let err = attach(&scope, "rpa", opts).unwrap_err();
            assert!(matches!(err, PipelineError::Setting { .. }), "{err}");
            assert!(err.to_string().contains("conntrack_entries"), "{err}");
            assert!(!xdp_on(&lab));
            assert!(!Path::new(paths::BPFFS_ROOT).join(scope.dir_name()).exists());
        }
    }
}
