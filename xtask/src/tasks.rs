//! `cargo xtask build|test|bench`: cargo runs, after setup, with the tool cache on PATH.
use std::{
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

use crate::{
    proc::{is_root, run, show},
    setup::Tools,
};

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// The kernel crate builds only for the BPF target, through `userspace/build.rs`; a host build
/// of the whole workspace must leave it out (as `default-members` does).
const KERNEL_CRATE: &str = "firewall-ebpf";

fn cargo(tools: &Tools) -> Result<Command> {
    let mut cmd = tools.command("cargo")?;
    cmd.current_dir(root());
    Ok(cmd)
}

pub fn require_root(task: &str, why: &str) -> Result<()> {
    if !is_root() {
        bail!("`cargo xtask {task}` must run as root: {why}. Run it again as root.");
    }
    Ok(())
}

/// Builds the release `rampart` binary and returns its path.
pub fn build_rampart_release(tools: &Tools) -> Result<PathBuf> {
    let mut cmd = cargo(tools)?;
    cmd.args(["build", "--release", "--package", "rampart", "--bin", "rampart"])
        .arg("--message-format=json-render-diagnostics")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    println!("$ {}", show(&cmd));
    let out = cmd.output().with_context(|| format!("cannot start `{}`", show(&cmd)))?;
    if !out.status.success() {
        bail!("`{}` failed ({})", show(&cmd), out.status);
    }
    // The artifact messages name the binary wherever the target directory is.
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let is_bin = msg["target"]["kind"].as_array().is_some_and(|k| k.iter().any(|k| k == "bin"));
        if msg["reason"] == "compiler-artifact"
            && msg["target"]["name"] == "rampart"
            && is_bin
            && let Some(exe) = msg["executable"].as_str()
        {
            return Ok(PathBuf::from(exe));
        }
    }
    bail!("`{}` succeeded but reported no `rampart` executable", show(&cmd))
}

/// `cargo xtask build`: every host crate and target (tests, benches, examples) in the dev
/// profile, and the release `rampart` the demo, the tests and the benchmarks run.
pub fn build(tools: &Tools) -> Result<PathBuf> {
    let mut cmd = cargo(tools)?;
    cmd.args(["build", "--workspace", "--exclude", KERNEL_CRATE, "--all-targets"]);
    println!("$ {}", show(&cmd));
    run(&mut cmd)?;
    build_rampart_release(tools)
}

/// Whether `args` (what the user passed to `cargo xtask test`) choose packages themselves.
fn selects_packages(args: &[String]) -> bool {
    args.iter()
        .take_while(|a| *a != "--")
        .any(|a| a == "-p" || a.starts_with("--package") || (a.starts_with("-p") && a.len() > 2))
}

/// `cargo xtask test [ARGS]`: `cargo test --workspace [ARGS]` with `RAMPART_BIN` set to the
/// release binary.
pub fn test(tools: &Tools, rampart: &PathBuf, args: &[String]) -> Result<()> {
    let mut cmd = cargo(tools)?;
    cmd.arg("test");
    if !selects_packages(args) {
        cmd.args(["--workspace", "--exclude", KERNEL_CRATE]);
    }
    cmd.args(args).env("RAMPART_BIN", rampart);
    println!("$ RAMPART_BIN={} {}", rampart.display(), show(&cmd));
    run(&mut cmd).context("tests failed")
}

/// Benchmarks `cargo xtask bench` knows: each is a binary of the tests crate.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Bench {
    /// The XDP firewall: per-packet cost against rule count, and flood throughput against
    /// xdp-filter, nftables and iptables (writes its table for BENCHMARKS.md).
    Fw,
    /// `rampart serve`: keep-alive requests/s, full handshakes/s and latency against HAProxy and
    /// nginx terminating TLS in front of the same backend.
    Tls,
    /// `rampart serve`'s MySQL routing: sysbench point selects and read-write transactions
    /// against MariaDB directly, through rampart and through HAProxy in `mode tcp`.
    Mysql,
    /// The XDP layer-4 balancer: ns per packet (hit, miss, non-service) against its floor,
    /// forwarded packets/s against the floor and nftables DNAT, connections/s against HAProxy.
    Lb,
    /// What monitoring costs: the XDP program's ns per packet with a `/metrics` scrape every
    /// second against none, and scrape time with 10,000 rules, 1,000 L4 and 1,000 HTTP backends.
    /// (The latency histograms' cost in req/s: `bench tls -- --only rampart,rampart-nohist,rampart-twin`.)
    Metrics,
}

impl Bench {
    fn binary(self) -> &'static str {
        match self {
            Bench::Fw => "fw-bench",
            Bench::Tls => "tls-bench",
            Bench::Mysql => "mysql-bench",
            Bench::Lb => "lb-bench",
            Bench::Metrics => "metrics-bench",
        }
    }
}

const TESTS_PACKAGE: &str = "rampart-tests";

/// Whether the tests crate declares a binary `name` (explicitly or under `src/bin/`).
fn has_binary(tools: &Tools, name: &str) -> Result<bool> {
    let mut cmd = cargo(tools)?;
    cmd.args(["metadata", "--no-deps", "--format-version", "1"]).stderr(Stdio::inherit());
    let out = cmd.output().with_context(|| format!("cannot start `{}`", show(&cmd)))?;
    if !out.status.success() {
        bail!("`{}` failed ({})", show(&cmd), out.status);
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("cargo metadata printed something not JSON")?;
    let packages = meta["packages"].as_array().context("cargo metadata without packages")?;
    Ok(packages.iter().filter(|p| p["name"] == TESTS_PACKAGE).any(|p| {
        p["targets"].as_array().is_some_and(|ts| {
            ts.iter().any(|t| t["name"] == name && t["kind"].as_array().is_some_and(|k| k.iter().any(|k| k == "bin")))
        })
    }))
}

/// `cargo xtask bench WHAT [ARGS]`: `cargo run --release -p rampart-tests --bin WHAT-bench -- ARGS`.
/// The benchmarks get the release `rampart` in `RAMPART_BIN`, as the tests do.
pub fn bench(tools: &Tools, what: Bench, args: &[String]) -> Result<()> {
    let bin = what.binary();
    if !has_binary(tools, bin)? {
        bail!(
            "the {what:?} benchmark is the binary `{bin}` of the package `{TESTS_PACKAGE}` \
             (tests/src/bin/{bin}.rs), which does not exist yet"
        );
    }
    let rampart = build_rampart_release(tools)?;
    let mut cmd = cargo(tools)?;
    cmd.args(["run", "--release", "--package", TESTS_PACKAGE, "--bin", bin, "--"])
        .args(args)
        .env("RAMPART_BIN", &rampart);
    println!("$ RAMPART_BIN={} {}", rampart.display(), show(&cmd));
    run(&mut cmd)
}

#[cfg(test)]
mod tests {
    use super::selects_packages;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn package_selection_is_left_to_the_user() {
        assert!(selects_packages(&args(&["-p", "rampart", "fw::"])));
        assert!(selects_packages(&args(&["--package=rampart"])));
        assert!(selects_packages(&args(&["-prampart"])));
        assert!(!selects_packages(&args(&["fw::", "--", "-p"])));
        assert!(!selects_packages(&args(&["--", "--nocapture"])));
        assert!(!selects_packages(&args(&["--profile", "release"])));
    }
}
