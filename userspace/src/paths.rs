//! Where rampart keeps things. One place, so detach and tests agree on what to remove.
use std::path::PathBuf;

/// Root of rampart's pins (bpffs).
pub const BPFFS_ROOT: &str = "/sys/fs/bpf/rampart";
/// Root of rampart's runtime state (tmpfs).
pub const RUN_ROOT: &str = "/run/rampart";

/// Directory of `rampart decap` under both roots.
pub const DECAP_DIR: &str = "decap";

/// The network namespace a command acts in: the host's, or one named under /run/netns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    Host,
    Netns(String),
}

impl Scope {
    pub fn from_netns(netns: Option<&str>) -> Self {
        match netns {
            Some(n) => Scope::Netns(n.to_string()),
            None => Scope::Host,
        }
    }
    /// Directory name under the roots: `host` or `netns-NAME`.
    pub fn dir_name(&self) -> String {
        match self {
            Scope::Host => "host".to_string(),
            Scope::Netns(n) => format!("netns-{n}"),
        }
    }
    /// Pins of the program attached to `iface`: `/sys/fs/bpf/rampart/<scope>/<iface>/`.
    pub fn pin_dir(&self, iface: &str) -> PathBuf {
        PathBuf::from(BPFFS_ROOT).join(self.dir_name()).join(iface)
    }
    /// State of `iface`: `/run/rampart/<scope>/<iface>/`.
    pub fn state_dir(&self, iface: &str) -> PathBuf {
        PathBuf::from(RUN_ROOT).join(self.dir_name()).join(iface)
    }
    /// Pins of the decapsulation program on `iface` (a backend, `rampart decap`):
    /// `/sys/fs/bpf/rampart/decap/<scope>/<iface>/`. Beside the scopes, not inside one, so that
    /// the firewall's interface listings never see them (`decap` is no scope's directory name).
    pub fn decap_pin_dir(&self, iface: &str) -> PathBuf {
        self.decap_pin_root().join(iface)
    }
    /// `/sys/fs/bpf/rampart/decap/<scope>/`.
    pub fn decap_pin_root(&self) -> PathBuf {
        PathBuf::from(BPFFS_ROOT).join(DECAP_DIR).join(self.dir_name())
    }
    /// State of the decapsulation program on `iface`: `/run/rampart/decap/<scope>/<iface>/`.
    pub fn decap_state_dir(&self, iface: &str) -> PathBuf {
        self.decap_state_root().join(iface)
    }
    /// `/run/rampart/decap/<scope>/`: the interfaces' state directories and what they share.
    pub fn decap_state_root(&self) -> PathBuf {
        PathBuf::from(RUN_ROOT).join(DECAP_DIR).join(self.dir_name())
    }
}
