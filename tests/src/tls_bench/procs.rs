//! Child processes that cannot outlive the bench, loopback ports, CPU pinning and CPU time.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use super::{BenchError, cgroup::Cgroup};

/// A loopback address whose port was free a moment ago.
pub fn free_loopback_addr() -> Result<SocketAddr, BenchError> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(|e| BenchError::io("bind 127.0.0.1:0", e))?;
    l.local_addr().map_err(|e| BenchError::io("local_addr", e))
}

/// Everything the bench connects to must be on loopback: it never sends to the network.
pub fn assert_loopback(addr: SocketAddr) -> Result<(), BenchError> {
    if addr.ip().is_loopback() { Ok(()) } else { Err(BenchError::NotLoopback(addr)) }
}

/// `taskset -c LIST` prefix, or nothing when no pinning is asked for.
#[derive(Clone, Debug, Default)]
pub struct Cpus(pub Option<String>);

impl Cpus {
    /// A command run through `taskset -c LIST` when pinned.
    pub fn command(&self, program: &str) -> Command {
        match &self.0 {
            Some(list) => {
                let mut c = Command::new("taskset");
                c.args(["-c", list, program]);
                c
            }
            None => Command::new(program),
        }
    }

    /// The same, as text for the report.
    pub fn prefix(&self) -> String {
        self.0.as_ref().map(|l| format!("taskset -c {l} ")).unwrap_or_default()
    }

    /// CPU numbers in the list ("0", "1-3", "0,2").
    pub fn ids(&self) -> Vec<usize> {
        let Some(list) = &self.0 else { return Vec::new() };
        let mut v = Vec::new();
        for part in list.split(',') {
            match part.split_once('-') {
                Some((a, b)) => {
                    if let (Ok(a), Ok(b)) = (a.parse::<usize>(), b.parse::<usize>()) {
                        v.extend(a..=b);
                    }
                }
                None => v.extend(part.parse::<usize>().ok()),
            }
        }
        v
    }
}

/// A child process stopped (SIGTERM, then SIGKILL to it and its descendants) on drop.
/// Children also get SIGTERM if the bench itself dies (PR_SET_PDEATHSIG).
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr to `log`. Must be called from the main thread:
    /// the parent-death signal follows the thread that forked.
    pub fn spawn(name: &str, cmd: Command, log: &Path) -> Result<Proc, BenchError> {
        Proc::spawn_in(name, cmd, log, None)
    }

    /// The same, the process joining `cgroup` before it execs.
    pub fn spawn_in(name: &str, mut cmd: Command, log: &Path, cgroup: Option<&Cgroup>) -> Result<Proc, BenchError> {
        let out = std::fs::File::create(log).map_err(|e| BenchError::io(format!("create {}", log.display()), e))?;
        let err = out.try_clone().map_err(|e| BenchError::io("dup log", e))?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        if let Some(cg) = cgroup {
            cg.enter_on_exec(&mut cmd)?;
        }
        let child = cmd.spawn().map_err(|e| {
            let within = cgroup.map(|c| format!(" in cgroup {}", c.path.display())).unwrap_or_default();
            BenchError::io(format!("start {name}{within} ({cmd:?})"), e)
        })?;
        Ok(Proc { name: name.to_string(), child: Some(child), log: log.to_path_buf() })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fails if the process has exited already (e.g. a config it refused).
    pub fn check_alive(&mut self) -> Result<(), BenchError> {
        let status = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
        match status {
            Some(s) => Err(BenchError::Died { name: self.name.clone(), status: s.to_string(), log: self.log_text() }),
            None => Ok(()),
        }
    }

    /// Waits (bounded) until `addr` accepts TCP connections.
    pub fn wait_port(&mut self, addr: SocketAddr, within: Duration) -> Result<(), BenchError> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            self.check_alive()?;
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(BenchError::NotListening { name: self.name.clone(), addr, log: self.log_text() })
    }

    /// Waits (bounded) for the process to exit on its own; kills it past `within`.
    pub fn wait_bounded(&mut self, within: Duration) -> Result<std::process::ExitStatus, BenchError> {
        let deadline = Instant::now() + within;
        let c = self.child.as_mut().ok_or_else(|| BenchError::Msg(format!("{}: already reaped", self.name)))?;
        loop {
            if let Some(s) = c.try_wait().map_err(|e| BenchError::io("wait", e))? {
                self.child = None;
                return Ok(s);
            }
            if Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop();
        Err(BenchError::Msg(format!("{} did not finish within {within:?}; killed", self.name)))
    }

    /// SIGTERM; after a bounded grace, SIGKILL to the process and every descendant still there.
    pub fn stop(&mut self) {
        let Some(mut c) = self.child.take() else { return };
        let pid = c.id() as i32;
        let descendants = descendants(pid as u32);
        // SAFETY: plain kill(2) on our own child's pid, which we have not reaped yet.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if c.try_wait().ok().flatten().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        // Workers of a master process (nginx) are reparented when the master dies.
        for d in descendants {
            if proc_stat(d).is_some() {
                // SAFETY: kill(2) on a pid that was a descendant of ours a moment ago.
                unsafe { libc::kill(d as i32, libc::SIGKILL) };
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// (ppid, utime + stime in clock ticks) of a live process.
fn proc_stat(pid: u32) -> Option<(u32, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state): ppid is field 4, utime 14, stime 15.
    let ppid = f.get(1)?.parse().ok()?;
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((ppid, utime + stime))
}

fn all_processes() -> HashMap<u32, (u32, u64)> {
    let mut m = HashMap::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            if let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok())
                && let Some(st) = proc_stat(pid)
            {
                m.insert(pid, st);
            }
        }
    }
    m
}

/// Live processes started by `root`, at any depth.
pub fn descendants(root: u32) -> Vec<u32> {
    let all = all_processes();
    let mut out = Vec::new();
    let mut frontier = vec![root];
    // Bounded: a process tree is finite, and each pid is visited once.
    while let Some(p) = frontier.pop() {
        for (&pid, &(ppid, _)) in &all {
            if ppid == p && !out.contains(&pid) {
                out.push(pid);
                frontier.push(pid);
            }
        }
    }
    out
}

/// CPU time (clock ticks) used so far by `root` and its live descendants.
pub fn tree_ticks(root: u32) -> u64 {
    let all = all_processes();
    let own = all.get(&root).map_or(0, |s| s.1);
    own + descendants(root).iter().filter_map(|p| all.get(p)).map(|s| s.1).sum::<u64>()
}

/// VmRSS of a process, KiB (None when it is gone).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.split_whitespace().next()?.parse().ok()
}

pub fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// Per-CPU (busy, total) jiffies from /proc/stat.
#[derive(Clone, Debug, Default)]
pub struct CpuSample {
    pub per_cpu: Vec<(u64, u64)>,
}

impl CpuSample {
    pub fn now() -> CpuSample {
        let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let mut s = CpuSample::default();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("cpu") else { continue };
            if !rest.starts_with(|c: char| c.is_ascii_digit()) {
                continue;
            }
            let n: Vec<u64> = rest.split_whitespace().skip(1).filter_map(|n| n.parse().ok()).collect();
            let f = |i: usize| n.get(i).copied().unwrap_or(0);
            // user nice system idle iowait irq softirq steal
            let total: u64 = (0..8).map(f).sum();
            s.per_cpu.push((total - f(3) - f(4), total));
        }
        s
    }

    /// Busy percentage of each CPU between `self` (earlier) and `later`.
    pub fn busy_since(&self, later: &CpuSample) -> Vec<f64> {
        self.per_cpu
            .iter()
            .zip(&later.per_cpu)
            .map(|(a, b)| {
                let total = b.1.saturating_sub(a.1);
                if total == 0 { 0.0 } else { 100.0 * b.0.saturating_sub(a.0) as f64 / total as f64 }
            })
            .collect()
    }
}

/// Time on CPU of every task (thread) of every process, ns, from `/proc/PID/task/TID/schedstat`:
/// the scheduler's exact runtime, not tick samples.
fn task_runtimes() -> HashMap<(u32, u32), u64> {
    let mut m = HashMap::new();
    let Ok(procs) = std::fs::read_dir("/proc") else { return m };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(tasks) = std::fs::read_dir(p.path().join("task")) else { continue };
        for t in tasks.flatten() {
            let Some(tid) = t.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            let ns = std::fs::read_to_string(t.path().join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok());
            if let Some(ns) = ns {
                m.insert((pid, tid), ns);
            }
        }
    }
    m
}

/// Measures how much CPU other programs took while something ran: the exact runtime of every
/// task outside this process's tree, kernel threads included. (Not /proc/stat's busy time
/// minus ours: that is sampled at the 4 ms tick, and a contender running 5 ms of every 10 ms
/// under its CPU quota beats against the tick, which showed 12-61% of a core of "other
/// programs" when the tasks' own runtimes added up to 8%.) Tasks that start and end within the
/// window are missed; the quiet wait before each measurement catches steady other work.
pub struct Interference {
    before: HashMap<(u32, u32), u64>,
    start: Instant,
}

impl Interference {
    pub fn start() -> Self {
        Interference { before: task_runtimes(), start: Instant::now() }
    }

    /// CPU used by processes other than ours since `start`, in % of one core.
    pub fn foreign_percent(&self) -> f64 {
        let me = std::process::id();
        let mut ours = descendants(me);
        ours.push(me);
        let foreign_ns: u64 = task_runtimes()
            .into_iter()
            .filter(|((pid, _), _)| !ours.contains(pid))
            .map(|(k, ns)| ns.saturating_sub(self.before.get(&k).copied().unwrap_or(0)))
            .sum();
        let wall = self.start.elapsed().as_secs_f64().max(1e-3);
        100.0 * foreign_ns as f64 / 1e9 / wall
    }
}

/// Keeps idle CPUs polling instead of halting while it lives: a PM QoS request of 0 µs wake-up
/// latency on `/dev/cpu_dma_latency`, which the kernel drops when the file is closed (so also
/// when the bench dies). On the VMs this bench runs on, idle is `haltpoll` with no poll window:
/// every idle moment halts the vCPU, and waking it again costs the next packet ~200 µs at p50
/// (measured: 250 µs p50 at 2,000 req/s halting, 70 µs polling, for every contender alike). A
/// contender that uses less CPU halts more often, so halting favours the busier one; cyclictest
/// holds the same request for the same reason.
pub struct PollingIdle {
    _file: std::fs::File,
}

pub const CPU_DMA_LATENCY: &str = "/dev/cpu_dma_latency";

impl PollingIdle {
    pub fn hold() -> Result<PollingIdle, BenchError> {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(CPU_DMA_LATENCY)
            .map_err(|e| BenchError::io(format!("open {CPU_DMA_LATENCY} (needs root; --halting-idle runs without it)"), e))?;
        // The kernel reads a binary s32 of microseconds.
        file.write_all(&0i32.to_ne_bytes()).map_err(|e| BenchError::io(format!("write 0 to {CPU_DMA_LATENCY}"), e))?;
        Ok(PollingIdle { _file: file })
    }
}
