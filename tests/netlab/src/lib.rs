//! Throwaway network topologies for rampart's tests, benchmarks and demo: network namespaces,
//! veth pairs, bridges, addresses, routes, sysctls and processes inside them. A [`Lab`] owns
//! what it made and removes all of it when dropped, also when a test fails or panics.
//!
//! ```no_run
//! use rampart_netlab::{Lab, veth};
//! # fn main() -> Result<(), rampart_netlab::NetlabError> {
//! let mut lab = Lab::new("ex")?; // every name starts ex-<pid>-<n>-
//! let (client, server) = (lab.ns("client")?, lab.ns("server")?);
//! veth(client.end("eth0").addr("10.0.0.1/24"), server.end("eth0").addr("10.0.0.2/24"))?;
//! server.sysctl("net.ipv4.ip_forward", "1")?;
//! lab.spawn(server.command("python3").args(["-m", "http.server", "80"]))?;
//! // … traffic from `client` …
//! # Ok(())
//! # }
//! // Dropping `lab` kills the server and deletes both namespaces (and the veth with them).
//! ```
//!
//! Links are made directly inside their namespaces, so nothing ever appears in the host's.
//! Everything goes through iproute2 (`ip`) and procps (`sysctl`); every command is bounded by
//! [`COMMAND_LIMIT`], and a failure names the command and what it printed on stderr.
//!
//! Only std and thiserror: xtask depends on this crate and must build before `cargo xtask setup`
//! has installed bpf-linker, so it cannot depend on `rampart` (whose build needs it).

use std::{
    ffi::OsStr,
    fmt, io,
    io::Read,
    path::Path,
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

/// How long any one command may take before it is killed and reported.
pub const COMMAND_LIMIT: Duration = Duration::from_secs(60);

/// Where `ip netns add` leaves named namespaces.
const NETNS_DIR: &str = "/run/netns";

#[derive(Debug, thiserror::Error)]
pub enum NetlabError {
    #[error("network namespaces can only be made as root: run this as root")]
    NotRoot,
    #[error("network namespace {0} already exists (left by an earlier run?): remove it with `ip netns del {0}`")]
    Exists(String),
    #[error("cannot start `{cmd}`")]
    Spawn {
        cmd: String,
        #[source]
        source: io::Error,
    },
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Failed { cmd: String, status: ExitStatus, stderr: String },
    #[error("`{cmd}` did not finish within {} s; killed it", limit.as_secs())]
    Timeout { cmd: String, limit: Duration },
    #[error("{iface} in {ns}: no carrier within {} s: {state}", limit.as_secs())]
    NoCarrier { ns: String, iface: String, limit: Duration, state: String },
    #[error("network namespace {0} is not one this lab made")]
    NotOurs(String),
    #[error("network namespace {0} still exists after `ip netns del`")]
    Left(String),
    #[error("lab {lab}: cleanup: {}", join(problems))]
    Teardown { lab: String, problems: Vec<NetlabError> },
}

fn join(problems: &[NetlabError]) -> String {
    problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

pub type Result<T, E = NetlabError> = std::result::Result<T, E>;

/// A network namespace: a named one (`/run/netns/NAME`), or the calling thread's own (for a
/// test or benchmark that already entered a private namespace). Cheap to clone; owns nothing,
/// so a handle stays valid for as long as the [`Lab`] that made the namespace.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Ns {
    name: Option<String>,
}

impl Ns {
    /// The namespace called `name`, whoever made it.
    pub fn named(name: impl Into<String>) -> Ns {
        Ns { name: Some(name.into()) }
    }

    /// The calling thread's namespace: commands run without `-n` or `ip netns exec`, and inherit
    /// the thread's namespace.
    pub fn current() -> Ns {
        Ns { name: None }
    }

    /// The namespace's name, as `ip -n` and `rampart -n` take it.
    ///
    /// # Panics
    /// For [`Ns::current`], which has no name.
    pub fn name(&self) -> &str {
        self.name.as_deref().expect("Ns::current() has no name")
    }

    /// `program` inside this namespace (`ip netns exec NAME program`), to add arguments to and
    /// run, or to hand to [`Lab::spawn`].
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        match &self.name {
            Some(n) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", n]).arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    /// `program` inside this namespace's network only (`nsenter --net=/run/netns/NAME`):
    /// unlike `ip netns exec`, which gives it a mount namespace of its own, it sees the host's
    /// mounts, so BPF pins it makes under /sys/fs/bpf outlive it.
    pub fn nsenter(&self, program: impl AsRef<OsStr>) -> Command {
        match &self.name {
            Some(n) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={NETNS_DIR}/{n}")).arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    /// Runs `program ARGS…` inside this namespace; its stdout, or an error unless it exits 0.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<String> {
        let out = run(self.command(program).args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `ip [-n NAME] ARGS…`; its stdout, or an error unless it exits 0.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut c = Command::new("ip");
        if let Some(n) = &self.name {
            c.args(["-n", n]);
        }
        let out = run(c.args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// One end of a veth pair in this namespace, named `iface`, for [`veth`].
    pub fn end(&self, iface: &str) -> End {
        End {
            ns: self.clone(),
            name: iface.to_string(),
            mac: None,
            mtu: None,
            txqueuelen: None,
            queues: None,
            master: None,
            addrs: Vec::new(),
        }
    }

    /// A bridge `name`, up.
    pub fn bridge(&self, name: &str) -> Result<()> {
        self.ip(&["link", "add", name, "type", "bridge"])?;
        self.up(name)
    }

    /// Brings `iface` up.
    pub fn up(&self, iface: &str) -> Result<()> {
        self.ip(&["link", "set", iface, "up"]).map(drop)
    }

    /// `ip link set IFACE ARGS…`, for settings [`End`] has no word for (`gso_max_segs 1`, …).
    pub fn link_set(&self, iface: &str, args: &[&str]) -> Result<()> {
        let mut all = vec!["link", "set", iface];
        all.extend_from_slice(args);
        self.ip(&all).map(drop)
    }

    /// Adds `cidr` (`10.0.0.1/24`, `fd00::1/64`) to `iface`. IPv6 addresses skip duplicate
    /// address detection (`nodad`): usable at once, and no DAD traffic on the link.
    pub fn addr(&self, iface: &str, cidr: &str) -> Result<()> {
        let mut args = vec!["addr", "add", cidr, "dev", iface];
        if cidr.contains(':') {
            args.push("nodad");
        }
        self.ip(&args).map(drop)
    }

    /// A route to `dest` (`10.0.0.0/24`, `default`) via the gateway `via`.
    pub fn route(&self, dest: &str, via: &str) -> Result<()> {
        self.ip(&["route", "add", dest, "via", via]).map(drop)
    }

    /// One route to `dest` over several next hops (ECMP): `route add DEST nexthop via A nexthop
    /// via B …`. Which flow takes which hop is the `fib_multipath_hash_policy` sysctl's choice.
    pub fn multipath_route(&self, dest: &str, vias: &[&str]) -> Result<()> {
        let mut args = vec!["route", "add", dest];
        for v in vias {
            args.extend(["nexthop", "via", v]);
        }
        self.ip(&args).map(drop)
    }

    /// A permanent neighbour entry: `ip` is at `mac` on `iface`, so no ARP or NDP is needed.
    pub fn neigh(&self, iface: &str, ip: &str, mac: &str) -> Result<()> {
        self.ip(&["neigh", "replace", ip, "lladdr", mac, "dev", iface, "nud", "permanent"]).map(drop)
    }

    /// Sets sysctl `key` (`net.ipv4.ip_forward`) to `value` in this namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.run("sysctl", &["-qw", &format!("{key}={value}")]).map(drop)
    }

    /// Waits (at most `limit`) until `iface` reports carrier (`LOWER_UP`).
    pub fn wait_carrier(&self, iface: &str, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let state = self.ip(&["-o", "link", "show", iface])?;
            if state.contains("LOWER_UP") {
                return Ok(());
            }
            if Instant::now() > deadline {
                let ns = self.name.clone().unwrap_or_else(|| "this thread's namespace".into());
                return Err(NetlabError::NoCarrier { ns, iface: iface.into(), limit, state: state.trim().into() });
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl fmt::Display for Ns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name.as_deref().unwrap_or("(this thread's network namespace)"))
    }
}

/// One end of a veth pair: made by [`Ns::end`], given options with the methods below, and
/// made real by [`veth`].
#[derive(Clone, Debug)]
pub struct End {
    ns: Ns,
    name: String,
    mac: Option<String>,
    mtu: Option<u32>,
    txqueuelen: Option<u32>,
    queues: Option<String>,
    master: Option<String>,
    addrs: Vec<String>,
}

impl End {
    /// Its MAC address (`02:00:00:00:00:01`); else the kernel picks a random one.
    pub fn mac(mut self, mac: &str) -> Self {
        self.mac = Some(mac.to_string());
        self
    }
    pub fn mtu(mut self, mtu: u32) -> Self {
        self.mtu = Some(mtu);
        self
    }
    /// Its transmit queue length (packets a qdisc on it may hold).
    pub fn txqueuelen(mut self, len: u32) -> Self {
        self.txqueuelen = Some(len);
        self
    }
    /// Its number of receive and transmit queues (set when the pair is made; 1 by default), so
    /// that native XDP on it runs one NAPI instance per queue.
    pub fn queues(mut self, n: u32) -> Self {
        self.queues = Some(n.to_string());
        self
    }
    /// Makes it a port of `bridge` (in the same namespace).
    pub fn master(mut self, bridge: &str) -> Self {
        self.master = Some(bridge.to_string());
        self
    }
    /// Adds an address, as [`Ns::addr`] does; may be given more than once.
    pub fn addr(mut self, cidr: &str) -> Self {
        self.addrs.push(cidr.to_string());
        self
    }

    /// What `ip link add` must be told for this end (it cannot be changed later).
    fn creation_args<'a>(&'a self, args: &mut Vec<&'a str>) {
        if let Some(m) = &self.mac {
            args.extend(["address", m]);
        }
        if let Some(q) = &self.queues {
            args.extend(["numtxqueues", q, "numrxqueues", q]);
        }
    }

    fn finish(&self) -> Result<()> {
        let (mtu, qlen) = (self.mtu.map(|m| m.to_string()), self.txqueuelen.map(|q| q.to_string()));
        let mut set = Vec::new();
        for (word, value) in [("mtu", &mtu), ("txqueuelen", &qlen), ("master", &self.master)] {
            if let Some(v) = value {
                set.extend([word, v.as_str()]);
            }
        }
        if !set.is_empty() {
            self.ns.link_set(&self.name, &set)?;
        }
        for a in &self.addrs {
            self.ns.addr(&self.name, a)?;
        }
        self.ns.up(&self.name)
    }
}

/// Makes a veth pair from `a` to `b`, each end created directly inside its namespace (nothing
/// appears in the host's, and the same name may be used on both sides), sets each end's
/// options and addresses, and brings both up. Deleting either namespace deletes the pair.
pub fn veth(a: End, b: End) -> Result<()> {
    // `ip` runs in the first end's namespace and names the peer's: the calling thread's
    // namespace has no name, so an end there goes first.
    let (first, peer) = if b.ns.name.is_none() { (&b, &a) } else { (&a, &b) };
    let mut args = vec!["link", "add", first.name.as_str()];
    first.creation_args(&mut args);
    args.extend(["type", "veth", "peer", "name", &peer.name]);
    peer.creation_args(&mut args);
    if let Some(n) = &peer.ns.name {
        args.extend(["netns", n]);
    }
    first.ns.ip(&args)?;
    a.finish()?;
    b.finish()
}

/// A process [`Lab::spawn`] started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Proc(usize);

/// A command [`Lab::on_teardown`] will run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Undo(usize);

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The namespaces, processes and undo commands of one topology, all removed by
/// [`Lab::teardown`] or on drop: processes killed, undo commands run (newest first), then every
/// process left in each namespace killed and the namespaces deleted (newest first).
pub struct Lab {
    prefix: String,
    serial: u32,
    /// Full names, in the order made.
    made: Vec<String>,
    /// `None` once killed.
    procs: Vec<Option<Child>>,
    /// `None` once cancelled.
    undo: Vec<Option<Command>>,
}

impl Lab {
    /// An empty lab whose names all start `TAG-PID-N-` (`N` counts labs in this process), so
    /// that parallel tests and leftovers of a killed run never clash. Needs root.
    pub fn new(tag: &str) -> Result<Lab> {
        if !is_root() {
            return Err(NetlabError::NotRoot);
        }
        let serial = NEXT.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("{tag}-{}-{serial}", std::process::id());
        Ok(Lab { prefix, serial, made: Vec::new(), procs: Vec::new(), undo: Vec::new() })
    }

    /// `TAG-PID-N`: what every name this lab makes starts with.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `N`: this lab's number within the process (for per-lab addresses, say).
    pub fn serial(&self) -> u32 {
        self.serial
    }

    /// The full name of namespace `short` (`TAG-PID-N-short`), made yet or not.
    pub fn name(&self, short: &str) -> String {
        format!("{}-{short}", self.prefix)
    }

    /// Makes namespace `TAG-PID-N-short`, with loopback up; deleted at teardown.
    pub fn ns(&mut self, short: &str) -> Result<Ns> {
        let name = self.name(short);
        if Path::new(NETNS_DIR).join(&name).exists() {
            return Err(NetlabError::Exists(name));
        }
        run(Command::new("ip").args(["netns", "add", &name]))?;
        self.made.push(name.clone());
        let ns = Ns::named(name);
        ns.up("lo")?;
        Ok(ns)
    }

    /// The namespaces made so far, oldest first.
    pub fn namespaces(&self) -> &[String] {
        &self.made
    }

    /// Starts `cmd` (typically from [`Ns::command`]) and keeps it, to be killed at teardown.
    pub fn spawn(&mut self, cmd: &mut Command) -> Result<Proc> {
        let child = cmd.spawn().map_err(|source| NetlabError::Spawn { cmd: show(cmd), source })?;
        self.procs.push(Some(child));
        Ok(Proc(self.procs.len() - 1))
    }

    /// The running process `p` (to take its stdout, say).
    ///
    /// # Panics
    /// If `p` was killed already.
    pub fn child(&mut self, p: Proc) -> &mut Child {
        self.procs[p.0].as_mut().expect("Lab::child: the process was killed already")
    }

    /// Kills process `p` (SIGKILL) and reaps it; nothing if it was killed already. Processes it
    /// started itself are not touched (see [`Lab::kill_all`]).
    pub fn kill(&mut self, p: Proc) {
        if let Some(mut c) = self.procs[p.0].take() {
            // An error here means it had exited already.
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills (SIGKILL) every process inside `ns`, one of this lab's namespaces, whoever started
    /// it: a process's own children too.
    pub fn kill_all(&mut self, ns: &Ns) -> Result<()> {
        let name = ns.name.as_deref().unwrap_or("(this thread's network namespace)");
        if !self.made.iter().any(|m| m == name) {
            return Err(NetlabError::NotOurs(name.to_string()));
        }
        kill_all_in(name)?;
        // Reap ours among them, so that none stays a zombie.
        for p in &mut self.procs {
            if let Some(c) = p
                && let Ok(Some(_)) = c.try_wait()
            {
                *p = None;
            }
        }
        Ok(())
    }

    /// Runs `cmd` at teardown, after the processes are killed and before the namespaces go
    /// (what was attached or pinned for a namespace, say, must be undone while it exists).
    /// A failure is reported as a cleanup problem.
    pub fn on_teardown(&mut self, cmd: Command) -> Undo {
        self.undo.push(Some(cmd));
        Undo(self.undo.len() - 1)
    }

    /// Forgets `undo`: teardown will not run it (the test did it already).
    pub fn cancel(&mut self, undo: Undo) {
        self.undo[undo.0] = None;
    }

    /// Removes everything: kills the processes, runs the undo commands (newest first), kills
    /// what else runs in each namespace and deletes them (newest first). Goes on past every
    /// failure and reports all of them; a second call has nothing left to do.
    pub fn teardown(&mut self) -> Result<()> {
        let mut problems = Vec::new();
        for mut c in self.procs.drain(..).rev().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for mut cmd in self.undo.drain(..).rev().flatten() {
            if let Err(e) = run(&mut cmd) {
                problems.push(e);
            }
        }
        for name in self.made.drain(..).rev() {
            // A test may have deleted it itself.
            if !Path::new(NETNS_DIR).join(&name).exists() {
                continue;
            }
            if let Err(e) = kill_all_in(&name) {
                problems.push(e);
            }
            if let Err(e) = run(Command::new("ip").args(["netns", "del", &name])) {
                problems.push(e);
            } else if Path::new(NETNS_DIR).join(&name).exists() {
                problems.push(NetlabError::Left(name));
            }
        }
        if problems.is_empty() { Ok(()) } else { Err(NetlabError::Teardown { lab: self.prefix.clone(), problems }) }
    }
}

impl Drop for Lab {
    /// [`Lab::teardown`]; problems go to stderr (call `teardown` to act on them).
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("{e}");
        }
    }
}

/// SIGKILL to every process in namespace `name`.
fn kill_all_in(name: &str) -> Result<()> {
    let pids = run(Command::new("ip").args(["netns", "pids", name]))?;
    let pids = String::from_utf8_lossy(&pids.stdout).split_whitespace().map(str::to_string).collect::<Vec<_>>();
    if pids.is_empty() {
        return Ok(());
    }
    // One may have exited meanwhile: kill then fails for it alone, and that is fine.
    let _ = output(Command::new("kill").arg("-9").args(&pids))?;
    Ok(())
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    // /proc/self belongs to the process's effective user.
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// `cmd` as one line, for error messages.
pub fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` (stdin from /dev/null, output captured) for at most [`COMMAND_LIMIT`]; its output,
/// whatever the exit status.
pub fn output(cmd: &mut Command) -> Result<Output> {
    let shown = show(cmd);
    let spawn_err = |source| NetlabError::Spawn { cmd: shown.clone(), source };
    let mut child =
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().map_err(spawn_err)?;
    let (stdout, stderr) = (read_all(child.stdout.take()), read_all(child.stderr.take()));
    let deadline = Instant::now() + COMMAND_LIMIT;
    let timeout = || NetlabError::Timeout { cmd: shown.clone(), limit: COMMAND_LIMIT };
    // Most commands here take a few ms: poll often at first.
    let mut pause = Duration::from_millis(1);
    let status = loop {
        if let Some(status) = child.try_wait().map_err(spawn_err)? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(timeout());
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    };
    // A grandchild that kept the pipes open must not hold us past the limit either.
    let left = || deadline.saturating_duration_since(Instant::now());
    let stdout = stdout.recv_timeout(left()).map_err(|_| timeout())?;
    let stderr = stderr.recv_timeout(left()).map_err(|_| timeout())?;
    Ok(Output { status, stdout, stderr })
}

/// [`output`], and an error naming the command and its stderr unless it exits 0.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = output(cmd)?;
    if !out.status.success() {
        return Err(NetlabError::Failed {
            cmd: show(cmd),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out)
}

fn read_all(pipe: Option<impl Read + Send + 'static>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            // A read error only shortens what is shown; the exit status still decides.
            let _ = p.read_to_end(&mut buf);
        }
        let _ = tx.send(buf);
    });
    rx
}
