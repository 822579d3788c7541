//! `cargo xtask setup`: installs what a fresh Debian 12 machine lacks, idempotently. Each step
//! first checks, and does nothing when the thing is already there, so a second run is instant.
use std::{
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::proc::{capture, capture_ok, is_root, run, show};

/// Debian packages the tests, the demo and the benchmarks run.
const APT_PACKAGES: &[&str] = &[
    // Network namespaces, veth pairs, addresses and routes (`ip`): netns tests and the demo.
    "iproute2",
    // ICMP echo through the firewall: netns tests and the demo.
    "iputils-ping",
    // Inspecting and test-running any loaded BPF program (`bpftool prog run`): the benchmark
    // measures ours and the peers' per-packet cost with it.
    "bpftool",
    // The peers the benchmark compares against: xdp-filter (xdp-tools), nftables netdev ingress
    // and iptables raw PREROUTING, the latter also with an ipset `hash:net` as its experts use.
    "xdp-tools",
    "nftables",
    "iptables",
    "ipset",
    // trafgen floods a veth for the benchmark (netsniff-ng).
    "netsniff-ng",
    // `kill`, `sysctl`, `pgrep`: stopping floods and tuning namespaces in tests and benchmarks.
    "procps",
    // HTTP(S) clients and certificates for the demo and the proxy tests.
    "curl",
    "openssl",
    // The daemon's tests and TLS benchmark: nginx as backend (and peer), h2load (HTTP/2 client,
    // nghttp2-client), HAProxy and wrk as the benchmark's peer and client.
    "nginx-light",
    "nghttp2-client",
    "haproxy",
    "wrk",
    // A real WebSocket client and server for the daemon's Upgrade test.
    "python3-websockets",
    // The MySQL router's tests and benchmark: a MariaDB primary and replica (the packages do
    // not start a server here; the tests start their own), the `mariadb` client, sysbench.
    "mariadb-server",
    "mariadb-client",
    "sysbench",
    // `promtool` (check metrics on a live scrape, check and test the example alert rules) and
    // a strict OpenMetrics parser for the negotiated exposition: the metrics tests.
    "prometheus",
    "python3-prometheus-client",
    // The views' tests: `rampart top` in a real terminal (tmux: send-keys, capture-pane), and
    // the status page in headless Chromium (DOM dumps and a screenshot).
    "tmux",
    "chromium",
    // The seeds' stack (examples/stack/): the application server is Python over MariaDB, and
    // nmap checks the firewall zones from the attacker's side.
    "python3-pymysql",
    "nmap",
    // The stack's lab: veth offloads set as a NIC's would be (checksums, GRO).
    "ethtool",
    // `cargo xtask demo --keep` forwards the status pages and Prometheus out of the lab with socat.
    "socat",
    // tls-bench counts the daemon's instructions per request under callgrind (the latency
    // histograms' cost, free of the machine's noise).
    "valgrind",
];

/// The bpf-linker release the kernel crate is linked with (its LLVM 22 matches nightly's).
const BPF_LINKER_VERSION: &str = "0.13.0";

/// What later commands need from setup.
pub struct Tools {
    /// `$RAMPART_TOOLS`, else `$HOME/.cache/rampart`.
    pub cache: PathBuf,
}

impl Tools {
    pub fn locate() -> Result<Self> {
        let cache = match std::env::var_os("RAMPART_TOOLS").filter(|v| !v.is_empty()) {
            Some(dir) => std::path::absolute(PathBuf::from(dir)).context("RAMPART_TOOLS")?,
            None => {
                let home = std::env::var_os("HOME")
                    .filter(|v| !v.is_empty())
                    .context("neither RAMPART_TOOLS nor HOME is set: no place for the tool cache")?;
                PathBuf::from(home).join(".cache").join("rampart")
            }
        };
        Ok(Tools { cache })
    }

    pub fn bin_dir(&self) -> PathBuf {
        self.cache.join("bin")
    }

    fn bpf_linker(&self) -> PathBuf {
        self.bin_dir().join("bpf-linker")
    }

    /// Where the LLVM symlinks live; the bpf-linker binary finds libLLVM through an rpath here.
    fn llvm_prefix(&self) -> PathBuf {
        self.cache.join("llvm22")
    }

    /// `PATH` for every child: the cache's `bin` first, so cargo (aya-build) finds bpf-linker.
    pub fn path_env(&self) -> Result<OsString> {
        let mut dirs = vec![self.bin_dir()];
        if let Some(path) = std::env::var_os("PATH") {
            dirs.extend(std::env::split_paths(&path).filter(|d| *d != self.bin_dir()));
        }
        std::env::join_paths(dirs).context("PATH holds a directory with ':' in its name")
    }

    /// A command whose `PATH` starts with the tool cache.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        let mut cmd = Command::new(program);
        cmd.env("PATH", self.path_env()?);
        Ok(cmd)
    }
}

fn say(step: &str, what: impl AsRef<str>) {
    println!("setup: {step:<22} {}", what.as_ref());
}

/// Runs every setup step and returns where the tools are.
pub fn setup() -> Result<Tools> {
    let tools = Tools::locate()?;
    apt_packages()?;
    rust_src()?;
    bpf_linker(&tools)?;
    bpffs()?;
    Ok(tools)
}

/// The packages of `APT_PACKAGES` dpkg does not list as installed.
fn missing_packages() -> Result<Vec<&'static str>> {
    // One dpkg-query for all: it prints the known ones and exits 1 if any is unknown to dpkg.
    let out = capture(
        Command::new("dpkg-query").arg("-W").arg("-f=${Package} ${Status}\n").args(APT_PACKAGES),
        Duration::from_secs(60),
    )?;
    let installed: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.ends_with(" install ok installed"))
        .filter_map(|l| l.split_whitespace().next())
        // Multi-arch packages print as `name:arch`.
        .map(|p| p.split(':').next().unwrap_or(p))
        .collect();
    Ok(APT_PACKAGES.iter().copied().filter(|p| !installed.contains(p)).collect())
}

fn apt_packages() -> Result<()> {
    let missing = missing_packages()?;
    if missing.is_empty() {
        say("apt packages", format!("all {} present", APT_PACKAGES.len()));
        return Ok(());
    }
    say("apt packages", format!("installing {}", missing.join(" ")));
    if !is_root() {
        bail!(
            "Debian packages missing: {}; run `cargo xtask setup` as root (it uses apt-get), or \
             install them with `apt-get install {}`",
            missing.join(", "),
            missing.join(" ")
        );
    }
    // A fresh machine may still be running unattended-upgrades: wait for its lock, not fail.
    let lock = ["-o", "DPkg::Lock::Timeout=600"];
    run(Command::new("apt-get").args(lock).args(["update", "-q"]).env("DEBIAN_FRONTEND", "noninteractive"))?;
    run(Command::new("apt-get")
        .args(lock)
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    let still = missing_packages()?;
    if !still.is_empty() {
        bail!("apt-get finished but these packages are still not installed: {}", still.join(", "));
    }
    say("apt packages", format!("installed {}", missing.join(" ")));
    Ok(())
}

fn rust_src() -> Result<()> {
    let list = capture_ok(
        Command::new("rustup").args(["component", "list", "--toolchain", "nightly", "--installed"]),
        Duration::from_secs(60),
    )
    .context("the nightly toolchain is needed to build the kernel programs")?;
    if list.stdout.lines().any(|l| l.trim() == "rust-src" || l.trim().starts_with("rust-src-")) {
        say("rust-src (nightly)", "present");
        return Ok(());
    }
    say("rust-src (nightly)", "installing");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    say("rust-src (nightly)", "installed");
    Ok(())
}

/// `Some(reason)` when `<cache>/bin/bpf-linker` is missing, broken or another version.
fn bpf_linker_problem(tools: &Tools) -> Result<Option<String>> {
    let bin = tools.bpf_linker();
    if !bin.exists() {
        return Ok(Some(format!("{} does not exist", bin.display())));
    }
    let out = capture(Command::new(&bin).arg("--version"), Duration::from_secs(30))?;
    let want = format!("bpf-linker {BPF_LINKER_VERSION}");
    if out.success() && out.stdout.trim() == want {
        return Ok(None);
    }
    Ok(Some(format!("`{} --version` says {:?}, not {want:?}", bin.display(), out.text())))
}

/// nightly's shared LLVM, e.g. `<sysroot>/lib/libLLVM.so.22.1-rust-1.97.0-nightly` (the
/// `libLLVM-22-rust-*.so` beside it is only a linker script).
fn nightly_llvm() -> Result<PathBuf> {
    let out = capture_ok(Command::new("rustc").args(["+nightly", "--print", "sysroot"]), Duration::from_secs(60))?;
    let lib = PathBuf::from(out.stdout.trim()).join("lib");
    let mut found = Vec::new();
    for entry in fs::read_dir(&lib).with_context(|| format!("reading {}", lib.display()))? {
        let entry = entry.with_context(|| format!("reading {}", lib.display()))?;
        if entry.file_name().to_string_lossy().starts_with("libLLVM.so.") {
            found.push(entry.path());
        }
    }
    match found.as_slice() {
        [one] if one.file_name().is_some_and(|n| n.to_string_lossy().starts_with("libLLVM.so.22")) => Ok(one.clone()),
        [one] => bail!(
            "nightly's LLVM is {}, but bpf-linker {BPF_LINKER_VERSION} is built here with the \
             llvm-22 feature",
            one.display()
        ),
        [] => bail!("no libLLVM.so.* in {} (nightly's LLVM)", lib.display()),
        _ => bail!("several libLLVM.so.* in {}: {found:?}", lib.display()),
    }
}

/// `<prefix>/lib/libLLVM.so` and `<prefix>/lib/<real name>`, both pointing at nightly's LLVM.
fn link_llvm(tools: &Tools) -> Result<()> {
    let llvm = nightly_llvm()?;
    let lib = tools.llvm_prefix().join("lib");
    fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    let name = llvm.file_name().context("libLLVM path without a file name")?;
    for link in [lib.join("libLLVM.so"), lib.join(name)] {
        if fs::symlink_metadata(&link).is_ok() {
            fs::remove_file(&link).with_context(|| format!("removing {}", link.display()))?;
        }
        std::os::unix::fs::symlink(&llvm, &link)
            .with_context(|| format!("linking {} to {}", link.display(), llvm.display()))?;
    }
    Ok(())
}

fn bpf_linker(tools: &Tools) -> Result<()> {
    let Some(problem) = bpf_linker_problem(tools)? else {
        say("bpf-linker", format!("{BPF_LINKER_VERSION} present in {}", tools.bin_dir().display()));
        return Ok(());
    };
    say("bpf-linker", &problem);
    link_llvm(tools)?;
    // The binary may only have lost its LLVM symlinks (or nightly's LLVM moved).
    if bpf_linker_problem(tools)?.is_none() {
        say("bpf-linker", format!("relinked {} to nightly's LLVM", tools.llvm_prefix().display()));
        return Ok(());
    }
    say(
        "bpf-linker",
        format!(
            "building {BPF_LINKER_VERSION} against nightly's LLVM 22 into {} (about 4 minutes)",
            tools.cache.display()
        ),
    );
    let mut install = Command::new("cargo");
    install
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION, "--force"])
        .args(["--no-default-features", "--features", "llvm-22", "--root"])
        .arg(&tools.cache)
        .env("LLVM_PREFIX", tools.llvm_prefix())
        // Away from the repository, so its .cargo/config.toml plays no part.
        .current_dir(&tools.cache);
    println!("$ LLVM_PREFIX={} {}", tools.llvm_prefix().display(), show(&install));
    run(&mut install)?;
    if let Some(problem) = bpf_linker_problem(tools)? {
        bail!("bpf-linker was built but does not work: {problem}");
    }
    say("bpf-linker", format!("installed {BPF_LINKER_VERSION} in {}", tools.bin_dir().display()));
    Ok(())
}

fn bpffs_mounted(at: &Path) -> Result<bool> {
    let mounts = fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    Ok(mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 2 && Path::new(f[1]) == at && f[2] == "bpf"
    }))
}

fn bpffs() -> Result<()> {
    let at = Path::new("/sys/fs/bpf");
    if bpffs_mounted(at)? {
        say("bpffs", format!("mounted at {}", at.display()));
        return Ok(());
    }
    if !is_root() {
        bail!("bpffs is not mounted at {}; run `cargo xtask setup` as root to mount it", at.display());
    }
    fs::create_dir_all(at).with_context(|| format!("creating {}", at.display()))?;
    run(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(at))?;
    say("bpffs", format!("mounted at {}", at.display()));
    Ok(())
}
