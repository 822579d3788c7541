//! Network namespaces for packet tests: [`TestNet`] builds a client and a server namespace joined
//! by a veth pair, runs the `rampart` binary against the server side, and removes everything in
//! `Drop` (also when a test fails), then checks nothing is left.
//!
//! Names are unique per process and per instance (`rt-<pid>-<n>-client`), so tests can run in
//! parallel. Addresses live only inside the namespaces (10.x and fd00::/8 ULA); the root
//! namespace's interfaces are never touched. Neighbour entries are static, so no ARP or NDP
//! traffic crosses the veth and rule counters see only what a test sends.

use std::{
    fs,
    io,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use rampart::{netns::NetnsGuard, paths::Scope};

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("network namespace tests need root (they create namespaces and attach XDP programs)")]
    NotRoot,
    #[error("run `{cmd}`")]
    Spawn { cmd: String, #[source] source: io::Error },
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Failed { cmd: String, status: String, stderr: String },
    #[error(
        "rampart binary not found at {}: build it first (`cargo build -p rampart`, which \
         `cargo xtask test` does) or set RAMPART_BIN",
        .0.display()
    )]
    NoBinary(PathBuf),
    #[error("{what} {}", path.display())]
    Fs { what: &'static str, path: PathBuf, #[source] source: io::Error },
    #[error("network namespace {ns}: enter")]
    Enter { ns: String, #[source] source: rampart::netns::NetnsError },
    #[error("`{cmd}` printed no valid JSON: {stdout}")]
    Json { cmd: String, stdout: String },
}

type Result<T, E = NetError> = std::result::Result<T, E>;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Interface names inside the namespaces (each namespace has its own name space for links).
pub const CLIENT_IF: &str = "rt-c";
pub const SERVER_IF: &str = "rt-s";
pub const CLIENT_MAC: &str = "02:72:74:00:00:01";
pub const SERVER_MAC: &str = "02:72:74:00:00:02";

/// The `rampart` binary: `RAMPART_BIN`, else `target/<profile>/rampart` beside the test
/// executable's `deps/` directory.
pub fn rampart_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("RAMPART_BIN") {
        let p = PathBuf::from(p);
        return if p.is_file() { Ok(p) } else { Err(NetError::NoBinary(p)) };
    }
    let exe = std::env::current_exe().map_err(|source| NetError::Fs {
        what: "locate the test executable",
        path: PathBuf::from("/proc/self/exe"),
        source,
    })?;
    // target/<profile>/deps/<test> → target/<profile>/rampart
    let guess = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("rampart"))
        .unwrap_or_else(|| PathBuf::from("rampart"));
    if guess.is_file() { Ok(guess) } else { Err(NetError::NoBinary(guess)) }
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion; its output whatever the exit status.
pub fn output(cmd: &mut Command) -> Result<Output> {
    cmd.stdin(Stdio::null()).output().map_err(|source| NetError::Spawn { cmd: describe(cmd), source })
}

/// Runs `cmd`; an error (with its stderr) unless it exits 0.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = output(cmd)?;
    if !out.status.success() {
        return Err(NetError::Failed {
            cmd: describe(cmd),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out)
}

fn ip(args: &[&str]) -> Result<Output> {
    run(Command::new("ip").args(args))
}

/// Runs `f` on a new thread inside network namespace `ns`. Sockets `f` creates stay in `ns`
/// and may be used from any thread afterwards.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let name = ns.to_string();
    thread::spawn(move || -> Result<T> {
        let _guard = NetnsGuard::enter(&name).map_err(|source| NetError::Enter { ns: name.clone(), source })?;
        Ok(f())
    })
    .join()
    .unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// Two namespaces (client, server) and a veth pair between them, up and addressed.
pub struct TestNet {
    /// `rt-<pid>-<n>`: prefix of every name this instance made.
    pub id: String,
    pub client: String,
    pub server: String,
    pub client_v4: Ipv4Addr,
    pub server_v4: Ipv4Addr,
    /// A second server address, for rules that deny one address and allow the other.
    pub server2_v4: Ipv4Addr,
    pub client_v6: Ipv6Addr,
    pub server_v6: Ipv6Addr,
    /// A scratch directory for rule files, removed in `Drop`.
    pub dir: PathBuf,
    rampart: PathBuf,
    /// Interfaces (namespace, iface) rampart is attached to.
    attached: Vec<(String, String)>,
    children: Vec<Child>,
}

impl TestNet {
    pub fn new() -> Result<Self> {
        if !crate::testrun::is_root() {
            return Err(NetError::NotRoot);
        }
        let rampart = rampart_bin()?;
        let pid = std::process::id();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = format!("rt-{pid}-{n}");
        // Distinct subnets per instance are not needed (namespaces are isolated), only tidy.
        let (a, b) = ((pid % 250 + 1) as u8, (n % 256) as u8);
        let dir = std::env::temp_dir().join(&id);
        let net = TestNet {
            client: format!("{id}-client"),
            server: format!("{id}-server"),
            client_v4: Ipv4Addr::new(10, a, b, 1),
            server_v4: Ipv4Addr::new(10, a, b, 2),
            server2_v4: Ipv4Addr::new(10, a, b, 3),
            client_v6: Ipv6Addr::new(0xfd00, 0x7274, pid as u16, n as u16, 0, 0, 0, 1),
            server_v6: Ipv6Addr::new(0xfd00, 0x7274, pid as u16, n as u16, 0, 0, 0, 2),
            id,
            dir,
            rampart,
            attached: Vec::new(),
            children: Vec::new(),
        };
        // From here on `Drop` cleans up whatever part got made.
        net.setup()?;
        Ok(net)
    }

    fn setup(&self) -> Result<()> {
        fs::create_dir_all(&self.dir)
            .map_err(|source| NetError::Fs { what: "create", path: self.dir.clone(), source })?;
        ip(&["netns", "add", &self.client])?;
        ip(&["netns", "add", &self.server])?;
        // Both ends are created directly inside their namespaces: nothing appears in the root one.
        ip(&[
            "link", "add", CLIENT_IF, "address", CLIENT_MAC, "netns", &self.client, "type", "veth", "peer", "name",
            SERVER_IF, "address", SERVER_MAC, "netns", &self.server,
        ])?;
        let c4 = format!("{}/24", self.client_v4);
        let s4 = format!("{}/24", self.server_v4);
        let s24 = format!("{}/24", self.server2_v4);
        let c6 = format!("{}/64", self.client_v6);
        let s6 = format!("{}/64", self.server_v6);
        for (ns, iface, addrs) in [
            (&self.client, CLIENT_IF, vec![c4.as_str()]),
            (&self.server, SERVER_IF, vec![s4.as_str(), s24.as_str()]),
        ] {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            for a in addrs {
                ip(&["-n", ns, "addr", "add", a, "dev", iface])?;
            }
        }
        ip(&["-n", &self.client, "addr", "add", &c6, "dev", CLIENT_IF, "nodad"])?;
        ip(&["-n", &self.server, "addr", "add", &s6, "dev", SERVER_IF, "nodad"])?;
        // One wire packet per TCP segment, so rule counters can be compared with the sender's
        // segment count (generic XDP would otherwise see 64 KiB GSO packets).
        ip(&["-n", &self.client, "link", "set", CLIENT_IF, "gso_max_segs", "1"])?;
        // Static neighbours: no ARP or NDP on the wire.
        for (ns, iface, peer, mac) in [
            (&self.client, CLIENT_IF, self.server_v4.to_string(), SERVER_MAC),
            (&self.client, CLIENT_IF, self.server2_v4.to_string(), SERVER_MAC),
            (&self.client, CLIENT_IF, self.server_v6.to_string(), SERVER_MAC),
            (&self.server, SERVER_IF, self.client_v4.to_string(), CLIENT_MAC),
            (&self.server, SERVER_IF, self.client_v6.to_string(), CLIENT_MAC),
        ] {
            ip(&["-n", ns, "neigh", "replace", &peer, "lladdr", mac, "dev", iface, "nud", "permanent"])?;
        }
        ip(&["-n", &self.client, "link", "set", CLIENT_IF, "up"])?;
        ip(&["-n", &self.server, "link", "set", SERVER_IF, "up"])?;
        self.wait_carrier()
    }

    /// Waits (bounded) until both ends report carrier.
    fn wait_carrier(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let c = ip(&["-n", &self.client, "-o", "link", "show", CLIENT_IF])?;
            let s = ip(&["-n", &self.server, "-o", "link", "show", SERVER_IF])?;
            let up = |o: &Output| String::from_utf8_lossy(&o.stdout).contains("LOWER_UP");
            if up(&c) && up(&s) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(NetError::Failed {
                    cmd: "wait for veth carrier".into(),
                    status: "timeout (5 s)".into(),
                    stderr: String::from_utf8_lossy(&s.stdout).into_owned(),
                });
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// `rampart -n NS ARGS…`, whatever its exit status.
    pub fn rampart(&self, ns: &str, args: &[&str]) -> Result<Output> {
        output(Command::new(&self.rampart).arg("-n").arg(ns).args(args))
    }

    /// `rampart -n NS ARGS…`; an error unless it exits 0.
    pub fn rampart_ok(&self, ns: &str, args: &[&str]) -> Result<Output> {
        run(Command::new(&self.rampart).arg("-n").arg(ns).args(args))
    }

    /// Attaches rampart to the server's veth in `mode` (`native`, `skb` or `auto`).
    pub fn attach(&mut self, mode: &str) -> Result<Output> {
        let out = self.rampart_ok(&self.server, &["attach", "--iface", SERVER_IF, "--mode", mode])?;
        self.attached.push((self.server.clone(), SERVER_IF.to_string()));
        Ok(out)
    }

    /// Has `Drop` detach rampart from `iface` in `ns`, for attaches made other than by
    /// [`TestNet::attach`] (e.g. `attach --config`); [`TestNet::detach_iface`] undoes it.
    pub fn track_attached(&mut self, ns: &str, iface: &str) {
        let entry = (ns.to_string(), iface.to_string());
        if !self.attached.contains(&entry) {
            self.attached.push(entry);
        }
    }

    /// Detaches rampart from `iface` in `ns`, which `Drop` then no longer does.
    pub fn detach_iface(&mut self, ns: &str, iface: &str) -> Result<Output> {
        let out = self.rampart_ok(ns, &["detach", "--iface", iface])?;
        self.attached.retain(|(n, i)| !(n == ns && i == iface));
        Ok(out)
    }

    /// Detaches rampart from the server's veth.
    pub fn detach(&mut self) -> Result<Output> {
        let server = self.server.clone();
        self.detach_iface(&server, SERVER_IF)
    }

    /// Writes `text` to `<dir>/<name>` and returns the path.
    pub fn write_file(&self, name: &str, text: &str) -> Result<PathBuf> {
        let path = self.dir.join(name);
        fs::write(&path, text).map_err(|source| NetError::Fs { what: "write", path: path.clone(), source })?;
        Ok(path)
    }

    /// `rampart -n SERVER fw load FILE --iface SERVER_IF`, whatever its exit status.
    pub fn fw_load(&self, file: &Path) -> Result<Output> {
        let f = file.to_string_lossy();
        self.rampart(&self.server, &["fw", "load", &f, "--iface", SERVER_IF])
    }

    /// `rampart -n NS ARGS… --json`, parsed.
    pub fn rampart_json(&self, ns: &str, args: &[&str]) -> Result<serde_json::Value> {
        let out = self.rampart_ok(ns, args)?;
        serde_json::from_slice(&out.stdout).map_err(|_| NetError::Json {
            cmd: format!("rampart -n {ns} {}", args.join(" ")),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        })
    }

    /// `rampart -n SERVER fw list --iface SERVER_IF --json`.
    pub fn fw_list(&self) -> Result<serde_json::Value> {
        self.rampart_json(&self.server, &["fw", "list", "--iface", SERVER_IF, "--json"])
    }

    /// Starts `cmd` (typically `ip netns exec …`) and keeps it to be killed in `Drop`.
    pub fn spawn(&mut self, cmd: &mut Command) -> Result<usize> {
        let child = cmd.spawn().map_err(|source| NetError::Spawn { cmd: describe(cmd), source })?;
        self.children.push(child);
        Ok(self.children.len() - 1)
    }

    /// A command run inside network namespace `ns` (`ip netns exec NS PROGRAM`).
    pub fn exec(ns: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, program]);
        c
    }

    /// Pins of rampart on the server iface.
    pub fn server_pin_dir(&self) -> PathBuf {
        Scope::Netns(self.server.clone()).pin_dir(SERVER_IF)
    }

    /// `/sys/fs/bpf/rampart/<scope>` and `/run/rampart/<scope>` of a namespace.
    pub fn scope_dirs(ns: &str) -> [PathBuf; 2] {
        let scope = Scope::Netns(ns.to_string()).dir_name();
        [
            PathBuf::from(rampart::paths::BPFFS_ROOT).join(&scope),
            PathBuf::from(rampart::paths::RUN_ROOT).join(&scope),
        ]
    }

    /// What `ip -d link show` says about the server iface (has `xdp` / `prog/xdp` when attached).
    /// Deletes the server's veth (and with it the client's end), as an operator might while
    /// rampart is attached.
    pub fn delete_server_link(&self) -> Result<()> {
        ip(&["-n", &self.server, "link", "del", SERVER_IF]).map(drop)
    }

    pub fn server_link(&self) -> Result<String> {
        let out = ip(&["-n", &self.server, "-d", "link", "show", SERVER_IF])?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Everything this instance left behind, after cleanup ran.
    fn leftovers(&self) -> Vec<String> {
        let mut left = Vec::new();
        for ns in [&self.client, &self.server] {
            let p = Path::new("/run/netns").join(ns);
            if p.exists() {
                left.push(format!("namespace {}", p.display()));
            }
            for d in Self::scope_dirs(ns) {
                if d.exists() {
                    left.push(format!("directory {}", d.display()));
                }
            }
        }
        if self.dir.exists() {
            left.push(format!("directory {}", self.dir.display()));
        }
        left
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        let mut problems = Vec::new();
        for c in &mut self.children {
            // Already exited is fine; kill() then reports an error we ignore.
            let _ = c.kill();
            let _ = c.wait();
        }
        for (ns, iface) in std::mem::take(&mut self.attached) {
            match self.rampart(&ns, &["detach", "--iface", &iface]) {
                Ok(o) if o.status.success() => {}
                Ok(o) => problems.push(format!(
                    "rampart -n {ns} detach --iface {iface}: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                )),
                Err(e) => problems.push(format!("rampart detach: {e}")),
            }
        }
        for ns in [&self.client, &self.server] {
            if Path::new("/run/netns").join(ns).exists()
                && let Err(e) = ip(&["netns", "del", ns])
            {
                problems.push(e.to_string());
            }
            // Fallback after a failed detach: pins would keep the program and maps alive.
            for d in Self::scope_dirs(ns) {
                if d.exists() {
                    problems.push(format!("{} left behind (removed now)", d.display()));
                    let _ = fs::remove_dir_all(&d);
                }
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
        let left = self.leftovers();
        if !left.is_empty() {
            problems.push(format!("still there after cleanup: {}", left.join(", ")));
        }
        if !problems.is_empty() {
            let msg = format!("TestNet {}: cleanup problems: {}", self.id, problems.join("; "));
            if thread::panicking() {
                eprintln!("{msg}");
            } else {
                panic!("{msg}");
            }
        }
    }
}
