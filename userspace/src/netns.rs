//! Entering network namespaces.
//!
//! Only the network namespace is switched (`setns(CLONE_NEWNET)`), never the mount namespace:
//! `ip netns exec` also unshares mounts, and pins made there vanish with it, while rampart's pins
//! must live under the root namespace's `/sys/fs/bpf/rampart`.
use std::{
    fs::File,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::{Path, PathBuf},
};

/// Where `ip netns add` leaves named namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("network namespace `{name}` does not exist ({} not found)", path.display())]
    NotFound { name: String, path: PathBuf },
    #[error("invalid network namespace name `{0}`")]
    BadName(String),
    #[error("network namespace `{name}`: open {}", path.display())]
    Open {
        name: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("network namespace `{name}`: setns")]
    Setns {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("network namespace: open the current one ({})", path.display())]
    Current {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("network namespace: restore the original one")]
    Restore(#[source] io::Error),
    #[error("a private network namespace needs root (CAP_SYS_ADMIN); run as root, as CI does")]
    NotRoot(#[source] io::Error),
    #[error("a private network namespace: unshare")]
    Unshare(#[source] io::Error),
    #[error("a private network namespace: bringing loopback up: {0}")]
    Loopback(String),
}

/// The file of a named namespace: `/run/netns/NAME`.
pub fn netns_path(name: &str) -> Result<PathBuf, NetnsError> {
    // A name is one path component, as `ip netns` requires.
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(NetnsError::BadName(name.to_string()));
    }
    Ok(Path::new(NETNS_RUN_DIR).join(name))
}

/// True when `/run/netns/NAME` exists.
pub fn exists(name: &str) -> bool {
    netns_path(name).map(|p| p.exists()).unwrap_or(false)
}

fn open_named(name: &str) -> Result<File, NetnsError> {
    let path = netns_path(name)?;
    File::open(&path).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            NetnsError::NotFound { name: name.to_string(), path: path.clone() }
        } else {
            NetnsError::Open { name: name.to_string(), path: path.clone(), source }
        }
    })
}

fn setns(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain syscall on a valid descriptor.
    let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Moves the calling thread into network namespace `name` for good.
///
/// `setns` acts on the calling thread only; the CLI is single-threaded, so this is the whole
/// process. Call it before starting any thread.
pub fn enter(name: &str) -> Result<(), NetnsError> {
    let file = open_named(name)?;
    setns(file.as_fd()).map_err(|source| NetnsError::Setns { name: name.to_string(), source })
}

/// The current thread inside a network namespace until dropped; then back where it was.
/// For tests and tools that visit a namespace from one thread.
#[derive(Debug)]
pub struct NetnsGuard {
    /// `None` once restored.
    original: Option<File>,
}

impl NetnsGuard {
    pub fn enter(name: &str) -> Result<Self, NetnsError> {
        let current = PathBuf::from("/proc/thread-self/ns/net");
        let original = File::open(&current).map_err(|source| NetnsError::Current { path: current.clone(), source })?;
        enter(name)?;
        Ok(NetnsGuard { original: Some(original) })
    }

    /// Returns to the original namespace now, reporting failure (Drop can only panic).
    pub fn restore(mut self) -> Result<(), NetnsError> {
        match self.original.take() {
            Some(f) => setns(f.as_fd()).map_err(NetnsError::Restore),
            None => Ok(()),
        }
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        if let Some(f) = self.original.take()
            && let Err(e) = setns(f.as_fd())
        {
            // Staying in the wrong namespace would make every later network call lie.
            panic!("network namespace: cannot restore the original one: {e}");
        }
    }
}

/// Moves the calling thread into a new network namespace of its own, with only loopback (up).
/// Threads and processes it starts afterwards are inside too; called first thing in `main`, the
/// whole process is. The namespace has no name: it ends with its last thread or process, so
/// nothing is left behind. For tests and benchmarks, which must never use the host's interfaces
/// (its loopback included).
pub fn enter_private_netns() -> Result<(), NetnsError> {
    // SAFETY: plain syscall; it moves this thread only.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        let e = io::Error::last_os_error();
        return Err(if e.kind() == io::ErrorKind::PermissionDenied {
            NetnsError::NotRoot(e)
        } else {
            NetnsError::Unshare(e)
        });
    }
    let out = std::process::Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .output()
        .map_err(|e| NetnsError::Loopback(format!("ip: {e}")))?;
    if !out.status.success() {
        return Err(NetnsError::Loopback(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    Ok(())
}

/// Runs `f` on a new thread in a private network namespace ([`enter_private_netns`]) and returns
/// what `f` returns; a panic in `f` is passed on. The caller's thread stays where it was.
pub fn in_private_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, NetnsError> {
    let thread = std::thread::spawn(move || enter_private_netns().map(|()| f()));
    thread.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_names() {
        for bad in ["", ".", "..", "a/b"] {
            assert!(matches!(netns_path(bad), Err(NetnsError::BadName(_))), "{bad}");
        }
        assert_eq!(netns_path("x").unwrap(), PathBuf::from("/run/netns/x"));
    }

    #[test]
    fn a_private_namespace_has_only_its_own_loopback() {
        let host = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
        let (inside, links) = in_private_netns(|| {
            let out = std::process::Command::new("ip").args(["-o", "link", "show"]).output().unwrap();
            (std::fs::read_link("/proc/thread-self/ns/net").unwrap(), String::from_utf8_lossy(&out.stdout).into_owned())
        })
        .unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(inside, host);
        let links: Vec<&str> = links.lines().collect();
        assert!(links.len() == 1 && links[0].contains(" lo: ") && links[0].contains(",UP"), "{links:?}");
        assert_eq!(std::fs::read_link("/proc/thread-self/ns/net").unwrap(), host, "the caller stays where it was");
    }

    #[test]
    fn missing_namespace_is_a_clear_error() {
        let name = format!("rampart-missing-{}", std::process::id());
        let err = NetnsGuard::enter(&name).unwrap_err();
        assert!(matches!(err, NetnsError::NotFound { .. }), "{err:?}");
        assert!(err.to_string().contains(&name));
    }
}
