//! Generic XDP plumbing: interface checks, bpffs, attaching a loaded program through a BPF link
//! (native, else skb), pinning that link, removing pin and state directories, and listing what
//! is attached in a scope. It knows no program: the main pipeline's attach and detach are in
//! [`crate::pipeline`], the backends' decapsulation program's in `crate::lb::decap`.
use std::{
    ffi::CString,
    fs, io,
    path::{Path, PathBuf},
};

use aya::programs::{
    Xdp, XdpMode,
    links::{FdLink, LinkError, PinnedLink},
};
use serde::{Deserialize, Serialize};

use crate::paths::{self, Scope};

/// File name of the pinned link inside the pin directory.
pub const LINK_PIN: &str = "link";
/// `statfs` magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const BPFFS_MOUNT: &str = "/sys/fs/bpf";

/// The mode asked for on the command line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttachMode {
    /// Native (driver) mode, else generic (skb) mode.
    #[default]
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
    #[error("mount bpffs at {BPFFS_MOUNT}")]
    Mount(#[source] io::Error),
    #[error("{}: {op}", path.display())]
    Fs {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
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

pub(crate) fn in_scope(scope: &Scope) -> String {
    match scope {
        Scope::Host => String::new(),
        Scope::Netns(n) => format!(" in network namespace {n}"),
    }
}

pub(crate) type Result<T, E = XdpError> = std::result::Result<T, E>;

pub(crate) fn fs_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> XdpError + use<> {
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
