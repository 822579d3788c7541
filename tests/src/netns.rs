//! Network namespaces for packet tests: [`TestNet`] builds a client and a server namespace joined
//! by a veth pair (with [`rampart_netlab`], the builder every test, benchmark and the demo use),
//! runs the `rampart` binary against the server side, and removes everything in `Drop` (also
//! when a test fails), then checks nothing is left.
//!
//! Names are unique per process and per instance (`rt-<pid>-<n>-client`), so tests can run in
//! parallel. Addresses live only inside the namespaces (10.x and fd00::/8 ULA); the root
//! namespace's interfaces are never touched. Neighbour entries are static, so no ARP or NDP
//! traffic crosses the veth and rule counters see only what a test sends.

use std::{
    fs,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Command, Output},
    thread,
    time::Duration,
};

use rampart::{netns::NetnsGuard, paths::Scope};
use rampart_netlab::{Lab, NetlabError, Ns, Proc, Undo, output, run, veth};

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("network namespace tests need root (they create namespaces and attach XDP programs)")]
    NotRoot,
    #[error(transparent)]
    Lab(#[from] NetlabError),
    #[error(
        "rampart binary not found at {}: build it first (`cargo build -p rampart`, which \
         `cargo xtask test` does) or set RAMPART_BIN",
        .0.display()
    )]
    NoBinary(PathBuf),
    #[error("{what} {}", path.display())]
    Fs {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("network namespace {ns}: enter")]
    Enter {
        ns: String,
        #[source]
        source: rampart::netns::NetnsError,
    },
    #[error("`{cmd}` printed no valid JSON: {stdout}")]
    Json { cmd: String, stdout: String },
}

type Result<T, E = NetError> = std::result::Result<T, E>;

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
    let guess =
        exe.parent().and_then(Path::parent).map(|d| d.join("rampart")).unwrap_or_else(|| PathBuf::from("rampart"));
    if guess.is_file() { Ok(guess) } else { Err(NetError::NoBinary(guess)) }
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
    /// Interfaces (namespace, iface) rampart is attached to, and the teardown command that
    /// detaches each.
    attached: Vec<(String, String, Undo)>,
    lab: Lab,
}

impl TestNet {
    pub fn new() -> Result<Self> {
        if !crate::testrun::is_root() {
            return Err(NetError::NotRoot);
        }
        let rampart = rampart_bin()?;
        let mut lab = Lab::new("rt")?;
        let (pid, n) = (std::process::id(), lab.serial());
        // Distinct subnets per instance are not needed (namespaces are isolated), only tidy.
        let (a, b) = ((pid % 250 + 1) as u8, (n % 256) as u8);
        let id = lab.prefix().to_string();
        let dir = std::env::temp_dir().join(&id);
        // From here on the lab's `Drop` removes whatever part got made.
        let client = lab.ns("client")?;
        let server = lab.ns("server")?;
        let net = TestNet {
            client: client.name().to_string(),
            server: server.name().to_string(),
            client_v4: Ipv4Addr::new(10, a, b, 1),
            server_v4: Ipv4Addr::new(10, a, b, 2),
            server2_v4: Ipv4Addr::new(10, a, b, 3),
            client_v6: Ipv6Addr::new(0xfd00, 0x7274, pid as u16, n as u16, 0, 0, 0, 1),
            server_v6: Ipv6Addr::new(0xfd00, 0x7274, pid as u16, n as u16, 0, 0, 0, 2),
            id,
            dir,
            rampart,
            attached: Vec::new(),
            lab,
        };
        net.setup(&client, &server)?;
        Ok(net)
    }

    fn setup(&self, client: &Ns, server: &Ns) -> Result<()> {
        fs::create_dir_all(&self.dir).map_err(|source| NetError::Fs {
            what: "create",
            path: self.dir.clone(),
            source,
        })?;
        let cidr = |ip: &dyn std::fmt::Display, len: u8| format!("{ip}/{len}");
        veth(
            client.end(CLIENT_IF).mac(CLIENT_MAC).addr(&cidr(&self.client_v4, 24)).addr(&cidr(&self.client_v6, 64)),
            server
                .end(SERVER_IF)
                .mac(SERVER_MAC)
                .addr(&cidr(&self.server_v4, 24))
                .addr(&cidr(&self.server2_v4, 24))
                .addr(&cidr(&self.server_v6, 64)),
        )?;
        // One wire packet per TCP segment, so rule counters can be compared with the sender's
        // segment count (generic XDP would otherwise see 64 KiB GSO packets).
        client.link_set(CLIENT_IF, &["gso_max_segs", "1"])?;
        // Static neighbours: no ARP or NDP on the wire.
        for (ns, iface, peer, mac) in [
            (client, CLIENT_IF, self.server_v4.to_string(), SERVER_MAC),
            (client, CLIENT_IF, self.server2_v4.to_string(), SERVER_MAC),
            (client, CLIENT_IF, self.server_v6.to_string(), SERVER_MAC),
            (server, SERVER_IF, self.client_v4.to_string(), CLIENT_MAC),
            (server, SERVER_IF, self.client_v6.to_string(), CLIENT_MAC),
        ] {
            ns.neigh(iface, &peer, mac)?;
        }
        client.wait_carrier(CLIENT_IF, Duration::from_secs(5))?;
        server.wait_carrier(SERVER_IF, Duration::from_secs(5))?;
        Ok(())
    }

    /// `rampart -n NS ARGS…`, whatever its exit status.
    pub fn rampart(&self, ns: &str, args: &[&str]) -> Result<Output> {
        Ok(output(Command::new(&self.rampart).arg("-n").arg(ns).args(args))?)
    }

    /// `rampart -n NS ARGS…`; an error unless it exits 0.
    pub fn rampart_ok(&self, ns: &str, args: &[&str]) -> Result<Output> {
        Ok(run(Command::new(&self.rampart).arg("-n").arg(ns).args(args))?)
    }

    /// Attaches rampart to the server's veth in `mode` (`native`, `skb` or `auto`).
    pub fn attach(&mut self, mode: &str) -> Result<Output> {
        let out = self.rampart_ok(&self.server, &["attach", "--iface", SERVER_IF, "--mode", mode])?;
        let server = self.server.clone();
        self.track_attached(&server, SERVER_IF);
        Ok(out)
    }

    /// Has `Drop` detach rampart from `iface` in `ns`, for attaches made other than by
    /// [`TestNet::attach`] (e.g. `attach --config`); [`TestNet::detach_iface`] undoes it.
    pub fn track_attached(&mut self, ns: &str, iface: &str) {
        if !self.attached.iter().any(|(n, i, _)| n == ns && i == iface) {
            let mut detach = Command::new(&self.rampart);
            detach.args(["-n", ns, "detach", "--iface", iface]);
            let undo = self.lab.on_teardown(detach);
            self.attached.push((ns.to_string(), iface.to_string(), undo));
        }
    }

    /// Detaches rampart from `iface` in `ns`, which `Drop` then no longer does.
    pub fn detach_iface(&mut self, ns: &str, iface: &str) -> Result<Output> {
        let out = self.rampart_ok(ns, &["detach", "--iface", iface])?;
        if let Some(i) = self.attached.iter().position(|(n, f, _)| n == ns && f == iface) {
            let (_, _, undo) = self.attached.remove(i);
            self.lab.cancel(undo);
        }
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

    /// Starts `cmd` (typically [`TestNet::exec`]) and keeps it to be killed in `Drop`.
    pub fn spawn(&mut self, cmd: &mut Command) -> Result<Proc> {
        Ok(self.lab.spawn(cmd)?)
    }

    /// A command run inside network namespace `ns` (`ip netns exec NS PROGRAM`).
    pub fn exec(ns: &str, program: &str) -> Command {
        Ns::named(ns).command(program)
    }

    /// Pins of rampart on the server iface.
    pub fn server_pin_dir(&self) -> PathBuf {
        Scope::Netns(self.server.clone()).pin_dir(SERVER_IF)
    }

    /// `/sys/fs/bpf/rampart/<scope>` and `/run/rampart/<scope>` of a namespace.
    pub fn scope_dirs(ns: &str) -> [PathBuf; 2] {
        let scope = Scope::Netns(ns.to_string()).dir_name();
        [PathBuf::from(rampart::paths::BPFFS_ROOT).join(&scope), PathBuf::from(rampart::paths::RUN_ROOT).join(&scope)]
    }

    /// Deletes the server's veth (and with it the client's end), as an operator might while
    /// rampart is attached.
    pub fn delete_server_link(&self) -> Result<()> {
        Ns::named(&self.server).ip(&["link", "del", SERVER_IF])?;
        Ok(())
    }

    /// What `ip -d link show` says about the server iface (has `xdp` / `prog/xdp` when attached).
    pub fn server_link(&self) -> Result<String> {
        Ok(Ns::named(&self.server).ip(&["-d", "link", "show", SERVER_IF])?)
    }

    /// Everything this instance left behind, after cleanup ran.
    fn leftovers(&self) -> Vec<String> {
        let mut left = Vec::new();
        for ns in [&self.client, &self.server] {
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
        // Processes, then the detaches, then the namespaces (and a check that they are gone).
        if let Err(e) = self.lab.teardown() {
            problems.push(e.to_string());
        }
        for ns in [&self.client, &self.server] {
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
