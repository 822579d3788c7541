//! CPU budgets for the contenders: one cgroup per contender with a CFS bandwidth quota, so the
//! contender, not the client CPU, limits throughput. Works with the cgroup v1 `cpu` controller
//! and with cgroup v2, whichever holds the cpu controller (read from /proc/self/mounts).
//!
//! Cgroups are removed on drop, by a SIGINT/SIGTERM/SIGHUP handler (Ctrl-C ends the bench
//! without unwinding), and, for a bench killed outright, by the next run (see [`sweep_stale`]).

use std::{
    ffi::{CString, c_char, c_int},
    io,
    os::unix::{ffi::OsStrExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::Command,
    ptr::null_mut,
    sync::{
        Once,
        atomic::{AtomicPtr, Ordering},
    },
    time::{Duration, Instant},
};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroup CPU budget: {what} {path}: {source}; run with --cpu-quota 0 to measure without one")]
    Io { what: &'static str, path: PathBuf, source: io::Error },
    #[error(
        "cgroup CPU budget: no cpu controller in /proc/self/mounts (neither a cgroup v1 hierarchy with `cpu` \
         nor a cgroup2 mount); run with --cpu-quota 0 to measure without one"
    )]
    NoController,
    #[error(
        "cgroup CPU budget: cannot make child cgroups with the cpu controller: {tried}; run with --cpu-quota 0 \
         to measure without one"
    )]
    NoCpuController { tried: String },
    #[error("cgroup CPU budget: {name}'s process {pid} is not in {path} (it lists {listed:?})")]
    Escaped { name: String, pid: u32, path: PathBuf, listed: Vec<u32> },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CgroupError {
    let path = path.to_path_buf();
    move |source| CgroupError::Io { what, path, source }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// The mount that holds the cpu controller. A cgroup v1 hierarchy with `cpu` wins: on hybrid
/// systems the cgroup2 mount then has no cpu controller (a controller lives in one hierarchy).
pub fn cpu_mount(mounts: &str) -> Option<(Version, PathBuf)> {
    let entries: Vec<(&str, &str, &str)> = mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((*f.get(1)?, *f.get(2)?, *f.get(3)?))
        })
        .collect();
    let v1 = entries.iter().find(|(_, fs, opts)| *fs == "cgroup" && opts.split(',').any(|o| o == "cpu"));
    let v2 = entries.iter().find(|(_, fs, _)| *fs == "cgroup2");
    match (v1, v2) {
        (Some((m, ..)), _) => Some((Version::V1, unescape(m))),
        (None, Some((m, ..))) => Some((Version::V2, unescape(m))),
        _ => None,
    }
}

/// /proc/self/mounts writes space, tab, newline and backslash as octal escapes.
fn unescape(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b.get(i + 1..i + 4).and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok());
        match (b[i], oct) {
            (b'\\', Some(c)) => {
                out.push(c);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsStr::from_bytes(&out))
}

/// This process's cgroup in the hierarchy of `version` (from /proc/self/cgroup).
pub fn own_cgroup(proc_self_cgroup: &str, version: Version) -> Option<String> {
    proc_self_cgroup.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (id, controllers, path) = (f.next()?, f.next()?, f.next()?);
        let hit = match version {
            Version::V1 => controllers.split(',').any(|c| c == "cpu"),
            Version::V2 => id == "0" && controllers.is_empty(),
        };
        hit.then(|| path.to_string())
    })
}

/// (quota, period) in µs for `percent` of one core. The kernel refuses quotas under 1 ms, so a
/// small percentage stretches the period instead.
pub fn quota_for(percent: u32, period_us: u64) -> (u64, u64) {
    let percent = u64::from(percent.max(1));
    let quota = period_us * percent / 100;
    if quota >= 1000 { (quota, period_us) } else { (1000, 100_000_u64.div_ceil(percent)) }
}

/// Throttling counters from a cgroup's cpu.stat.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuStat {
    /// Enforcement periods in which the cgroup ran.
    pub periods: u64,
    /// Periods in which it used up its quota and was stopped until the next one.
    pub throttled: u64,
    pub throttled_us: u64,
}

impl CpuStat {
    /// v1 names the throttled time `throttled_time` (ns), v2 `throttled_usec`.
    pub fn parse(text: &str) -> CpuStat {
        let mut s = CpuStat::default();
        for line in text.lines() {
            let Some((k, v)) = line.split_once(' ') else { continue };
            let Ok(v) = v.trim().parse::<u64>() else { continue };
            match k {
                "nr_periods" => s.periods = v,
                "nr_throttled" => s.throttled = v,
                "throttled_time" => s.throttled_us = v / 1000,
                "throttled_usec" => s.throttled_us = v,
                _ => {}
            }
        }
        s
    }
}

/// Throttling during one measurement.
#[derive(Clone, Copy, Debug, Default)]
pub struct Throttling {
    pub periods: u64,
    pub throttled: u64,
    /// Milliseconds per second of wall time the contender spent stopped.
    pub throttled_ms_per_s: f64,
}

impl Throttling {
    pub fn between(a: &CpuStat, b: &CpuStat, wall: Duration) -> Throttling {
        let us = b.throttled_us.saturating_sub(a.throttled_us);
        Throttling {
            periods: b.periods.saturating_sub(a.periods),
            throttled: b.throttled.saturating_sub(a.throttled),
            throttled_ms_per_s: us as f64 / 1000.0 / wall.as_secs_f64().max(1e-3),
        }
    }
}

/// The budget every contender gets, and where their cgroups go.
#[derive(Debug)]
pub struct CpuLimit {
    pub percent: u32,
    pub quota_us: u64,
    pub period_us: u64,
    pub version: Version,
    /// The cgroup the contenders' cgroups are made in.
    pub parent: PathBuf,
    /// A `cgroup.subtree_control` this run added `+cpu` to; taken back on drop.
    enabled_cpu: Option<PathBuf>,
}

impl CpuLimit {
    pub fn new(percent: u32, period_us: u64) -> Result<CpuLimit, CgroupError> {
        let read = |p: &str| std::fs::read_to_string(p).map_err(io_err("read", Path::new(p)));
        let (version, mount) = cpu_mount(&read("/proc/self/mounts")?).ok_or(CgroupError::NoController)?;
        let own = own_cgroup(&read("/proc/self/cgroup")?, version).unwrap_or_default();
        // In a container the mount may show only our own subtree: then the path is not below it.
        let rel = own.trim_start_matches('/');
        let base = if !rel.is_empty() && mount.join(rel).is_dir() { mount.join(rel) } else { mount.clone() };
        let (parent, enabled_cpu) = match version {
            Version::V1 => (base, None),
            Version::V2 => v2_parent(&base, &mount)?,
        };
        for f in match version {
            Version::V1 => ["cgroup.procs", "cpu.cfs_quota_us"],
            Version::V2 => ["cgroup.procs", "cgroup.subtree_control"],
        } {
            let p = parent.join(f);
            if !p.exists() {
                return Err(CgroupError::Io { what: "find", path: p, source: io::ErrorKind::NotFound.into() });
            }
        }
        // Fail now rather than after the backend has started.
        let dir = CString::new(parent.as_os_str().as_bytes()).unwrap_or_default();
        // SAFETY: access(2) on a NUL-terminated path.
        if unsafe { libc::access(dir.as_ptr(), libc::W_OK) } != 0 {
            return Err(CgroupError::Io { what: "make cgroups in", path: parent, source: io::Error::last_os_error() });
        }
        let (quota_us, period_us) = quota_for(percent, period_us);
        sweep_stale(&parent);
        install_signal_cleanup();
        Ok(CpuLimit { percent, quota_us, period_us, version, parent, enabled_cpu })
    }

    /// For the report: "cgroup v1 cfs_quota_us/cfs_period_us 5000/10000".
    pub fn describe(&self) -> String {
        match self.version {
            Version::V1 => format!("cgroup v1 cfs_quota_us/cfs_period_us {}/{}", self.quota_us, self.period_us),
            Version::V2 => format!("cgroup v2 cpu.max \"{} {}\"", self.quota_us, self.period_us),
        }
    }

    /// For the report: what a lifted budget reads ("cgroup v1 cfs_quota_us -1").
    pub fn describe_lifted(&self) -> String {
        match self.version {
            Version::V1 => "cgroup v1 cfs_quota_us -1".to_string(),
            Version::V2 => format!("cgroup v2 cpu.max \"max {}\"", self.period_us),
        }
    }

    /// A new cgroup `rampart-bench-<our pid>-<contender>` with the quota set.
    pub fn create(&self, contender: &str) -> Result<Cgroup, CgroupError> {
        let name = format!("{STALE_PREFIX}{}-{}", std::process::id(), contender.to_ascii_lowercase());
        let path = self.parent.join(name);
        std::fs::create_dir(&path).map_err(io_err("create", &path))?;
        let mut cg =
            Cgroup { path, slot: None, version: self.version, quota_us: self.quota_us, period_us: self.period_us };
        cg.slot = register(&cg.path);
        if self.version == Version::V1 {
            // The period first: a quota is checked against the current period.
            cg.write("cpu.cfs_period_us", self.period_us.to_string())?;
        }
        cg.restore()?;
        Ok(cg)
    }
}

impl Drop for CpuLimit {
    fn drop(&mut self) {
        if let Some(p) = &self.enabled_cpu {
            let _ = std::fs::write(p, "-cpu");
        }
    }
}

/// Where v2 child cgroups with the cpu controller can go. A non-root cgroup with processes (ours)
/// cannot enable controllers for children ("no internal processes"), so when ours cannot, the
/// contenders' cgroups become siblings of ours, under our parent.
fn v2_parent(base: &Path, mount: &Path) -> Result<(PathBuf, Option<PathBuf>), CgroupError> {
    let mut tried = Vec::new();
    let candidates = [Some(base), base.parent().filter(|_| base != mount)];
    for dir in candidates.into_iter().flatten() {
        let control = dir.join("cgroup.subtree_control");
        let has_cpu = |p: &Path| std::fs::read_to_string(p).is_ok_and(|t| t.split_whitespace().any(|c| c == "cpu"));
        if has_cpu(&control) {
            return Ok((dir.to_path_buf(), None));
        }
        if !has_cpu(&dir.join("cgroup.controllers")) {
            tried.push(format!("{} does not list cpu", dir.join("cgroup.controllers").display()));
            continue;
        }
        match std::fs::write(&control, "+cpu") {
            Ok(()) => return Ok((dir.to_path_buf(), Some(control))),
            Err(e) => tried.push(format!("writing +cpu to {}: {e}", control.display())),
        }
    }
    Err(CgroupError::NoCpuController { tried: tried.join("; ") })
}

const STALE_PREFIX: &str = "rampart-bench-";

/// Removes cgroups a killed earlier run left behind (its pid no longer exists). Their processes
/// died with it (parent-death signal); any left are killed.
pub fn sweep_stale(parent: &Path) {
    let Ok(rd) = std::fs::read_dir(parent) else { return };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(STALE_PREFIX).and_then(|r| r.split('-').next()) else { continue };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let (dir, procs) = (e.path(), e.path().join("cgroup.procs"));
            if let (Ok(d), Ok(p)) =
                (CString::new(dir.as_os_str().as_bytes()), CString::new(procs.as_os_str().as_bytes()))
            {
                // SAFETY: CStrings are NUL-terminated.
                let _ = unsafe { remove_cgroup(d.as_ptr(), p.as_ptr()) };
            }
        }
    }
}

/// A contender's cgroup; its processes are killed and it is removed on drop.
#[derive(Debug)]
pub struct Cgroup {
    pub path: PathBuf,
    /// Its entry in the signal handler's list.
    slot: Option<usize>,
    version: Version,
    quota_us: u64,
    period_us: u64,
}

impl Cgroup {
    fn write(&self, file: &str, value: String) -> Result<(), CgroupError> {
        let p = self.path.join(file);
        std::fs::write(&p, value).map_err(io_err("write", &p))
    }

    /// Lifts the quota: the contender may use whole CPUs (its pinning still holds) until
    /// [`Cgroup::restore`]. The period stays, so restoring needs only the quota.
    pub fn lift(&self) -> Result<(), CgroupError> {
        match self.version {
            Version::V1 => self.write("cpu.cfs_quota_us", "-1".into()),
            Version::V2 => self.write("cpu.max", format!("max {}", self.period_us)),
        }
    }

    /// Sets the budget's quota (again).
    pub fn restore(&self) -> Result<(), CgroupError> {
        match self.version {
            Version::V1 => self.write("cpu.cfs_quota_us", self.quota_us.to_string()),
            Version::V2 => self.write("cpu.max", format!("{} {}", self.quota_us, self.period_us)),
        }
    }

    /// Processes (thread group ids) in the cgroup.
    pub fn pids(&self) -> Result<Vec<u32>, CgroupError> {
        let p = self.path.join("cgroup.procs");
        let text = std::fs::read_to_string(&p).map_err(io_err("read", &p))?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// Makes `cmd`'s process join the cgroup before it execs, so everything it starts (taskset's
    /// exec, nginx's workers, rampart's threads) is inside from the start.
    pub fn enter_on_exec(&self, cmd: &mut Command) -> Result<(), CgroupError> {
        let p = self.path.join("cgroup.procs");
        let path = CString::new(p.as_os_str().as_bytes()).map_err(|_| CgroupError::Io {
            what: "use",
            path: p.clone(),
            source: io::ErrorKind::InvalidInput.into(),
        })?;
        // SAFETY: the hook only calls async-signal-safe functions (getpid, open, write, close)
        // and does not allocate.
        unsafe {
            cmd.pre_exec(move || {
                let mut digits = [0u8; 20];
                let mut n = libc::getpid() as u32;
                let mut i = digits.len();
                loop {
                    i -= 1;
                    digits[i] = b'0' + (n % 10) as u8;
                    n /= 10;
                    if n == 0 {
                        break;
                    }
                }
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                let len = digits.len() - i;
                let written = libc::write(fd, digits[i..].as_ptr().cast(), len);
                let err = io::Error::last_os_error();
                libc::close(fd);
                if written != len as isize {
                    return Err(err);
                }
                Ok(())
            });
        }
        Ok(())
    }

    /// Fails unless every one of `pids` (a contender's processes) is in the cgroup.
    pub fn check_holds(&self, name: &str, pids: &[u32]) -> Result<(), CgroupError> {
        let listed = self.pids()?;
        match pids.iter().find(|p| !listed.contains(p)) {
            Some(&pid) => Err(CgroupError::Escaped { name: name.to_string(), pid, path: self.path.clone(), listed }),
            None => Ok(()),
        }
    }

    pub fn stat(&self) -> CpuStat {
        CpuStat::parse(&std::fs::read_to_string(self.path.join("cpu.stat")).unwrap_or_default())
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let dir = CString::new(self.path.as_os_str().as_bytes());
        let procs = CString::new(self.path.join("cgroup.procs").as_os_str().as_bytes());
        if let (Ok(d), Ok(p)) = (dir, procs)
            // SAFETY: CStrings are NUL-terminated.
            && let Err(e) = unsafe { remove_cgroup(d.as_ptr(), p.as_ptr()) }
        {
            eprintln!("tls-bench: could not remove cgroup {}: {e}", self.path.display());
        }
        if let Some(i) = self.slot {
            DIRS[i].store(null_mut(), Ordering::SeqCst);
            PROCS[i].store(null_mut(), Ordering::SeqCst);
        }
    }
}

/// SIGKILLs what is left in the cgroup and removes it, retrying for up to 2 s while it empties.
/// Async-signal-safe (the signal handler uses it): no allocation, only syscalls.
///
/// # Safety
/// `dir` and `procs` must be NUL-terminated paths.
unsafe fn remove_cgroup(dir: *const c_char, procs: *const c_char) -> io::Result<()> {
    let start = Instant::now();
    loop {
        // SAFETY: as documented; plain syscalls.
        unsafe {
            kill_listed(procs);
            if libc::rmdir(dir) == 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::ENOENT) => return Ok(()),
                Some(libc::EBUSY) if start.elapsed() < Duration::from_secs(2) => {}
                _ => return Err(err),
            }
            let pause = libc::timespec { tv_sec: 0, tv_nsec: 10_000_000 };
            libc::nanosleep(&pause, null_mut());
        }
    }
}

/// SIGKILL to every pid listed in a cgroup.procs file.
///
/// # Safety
/// `procs` must be a NUL-terminated path.
unsafe fn kill_listed(procs: *const c_char) {
    // SAFETY: as documented; the buffer is ours and read() is bounded by its size.
    unsafe {
        let fd = libc::open(procs, libc::O_RDONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return;
        }
        let mut buf = [0u8; 4096];
        let mut pid: i32 = 0;
        loop {
            let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
            if n <= 0 {
                break;
            }
            for &c in &buf[..n as usize] {
                if c.is_ascii_digit() {
                    pid = pid.saturating_mul(10).saturating_add(i32::from(c - b'0'));
                } else {
                    if pid > 0 {
                        libc::kill(pid, libc::SIGKILL);
                    }
                    pid = 0;
                }
            }
        }
        if pid > 0 {
            libc::kill(pid, libc::SIGKILL);
        }
        libc::close(fd);
    }
}

/// The live cgroups, for the signal handler, which cannot lock or allocate. Entries point to
/// leaked C strings: the handler may be reading one while a drop clears its slot.
const SLOTS: usize = 16;
static DIRS: [AtomicPtr<c_char>; SLOTS] = [const { AtomicPtr::new(null_mut()) }; SLOTS];
static PROCS: [AtomicPtr<c_char>; SLOTS] = [const { AtomicPtr::new(null_mut()) }; SLOTS];

fn register(dir: &Path) -> Option<usize> {
    let d = CString::new(dir.as_os_str().as_bytes()).ok()?;
    let p = CString::new(dir.join("cgroup.procs").as_os_str().as_bytes()).ok()?;
    let (d, p) = (d.into_raw(), p.into_raw());
    for (i, (procs, dir)) in PROCS.iter().zip(&DIRS).enumerate() {
        if procs.compare_exchange(null_mut(), p, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
            dir.store(d, Ordering::SeqCst);
            return Some(i);
        }
    }
    None
}

extern "C" fn on_signal(sig: c_int) {
    for (dir, procs) in DIRS.iter().zip(&PROCS) {
        let (d, p) = (dir.load(Ordering::SeqCst), procs.load(Ordering::SeqCst));
        if !d.is_null() && !p.is_null() {
            // SAFETY: both are NUL-terminated strings that are never freed.
            let _ = unsafe { remove_cgroup(d, p) };
        }
    }
    // Die of the signal as if there were no handler (exit status, shell behaviour).
    // SAFETY: signal and raise are async-signal-safe.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

fn install_signal_cleanup() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            // SAFETY: a zeroed sigaction with a handler that is async-signal-safe; exec resets it
            // in children.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_signal as extern "C" fn(c_int) as usize;
                libc::sigemptyset(&mut sa.sa_mask);
                libc::sigaction(sig, &sa, null_mut());
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cpu_controller() {
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,relatime,cpu,cpuacct 0 0\n\
                      cgroup /sys/fs/cgroup/cpuset cgroup rw,cpuset 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(cpu_mount(hybrid), Some((Version::V1, PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"))));
        let v2 = "proc /proc proc rw 0 0\ncgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n";
        assert_eq!(cpu_mount(v2), Some((Version::V2, PathBuf::from("/sys/fs/cgroup"))));
        // cpuset and cpuacct are not cpu.
        assert_eq!(cpu_mount("cgroup /sys/fs/cgroup/cpuset cgroup rw,cpuset 0 0\n"), None);
        assert_eq!(unescape("/a\\040b"), PathBuf::from("/a b"));

        let own = "4:memory:/x\n1:cpu,cpuacct:/user.slice\n0::/user.slice/session-1.scope\n";
        assert_eq!(own_cgroup(own, Version::V1).as_deref(), Some("/user.slice"));
        assert_eq!(own_cgroup(own, Version::V2).as_deref(), Some("/user.slice/session-1.scope"));
    }

    #[test]
    fn quotas_and_stats() {
        assert_eq!(quota_for(50, 2000), (1000, 2000));
        assert_eq!(quota_for(50, 10_000), (5000, 10_000));
        // Under the kernel's 1 ms minimum: the period grows instead.
        assert_eq!(quota_for(25, 2000), (1000, 4000));
        assert_eq!(quota_for(150, 10_000), (15_000, 10_000));
        let v1 = CpuStat::parse("nr_periods 10\nnr_throttled 4\nthrottled_time 3000000\nnr_bursts 0\n");
        assert_eq!(v1, CpuStat { periods: 10, throttled: 4, throttled_us: 3000 });
        let v2 = CpuStat::parse("usage_usec 9\nnr_periods 10\nnr_throttled 4\nthrottled_usec 3000\n");
        assert_eq!(v2, v1);
        let t = Throttling::between(&CpuStat::default(), &v1, Duration::from_secs(2));
        assert_eq!((t.periods, t.throttled), (10, 4));
        assert!((t.throttled_ms_per_s - 1.5).abs() < 1e-9);
    }
}
