//! Builds the kernel programs (`firewall-ebpf`) with nightly + bpf-linker through aya-build and
//! leaves the objects in OUT_DIR, where `src/bpf.rs` embeds them. Also names the build for
//! `rampart --version` (RAMPART_VERSION): the commit it was built from and the profile, so that a
//! benchmark or a bug report can say which code ran.
use std::{path::PathBuf, process::Command};

fn main() -> anyhow::Result<()> {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    println!("cargo:rustc-env=RAMPART_VERSION={}", version(&manifest));
    let root_dir = manifest.parent().expect("workspace root").join("firewall-ebpf");
    let package = aya_build::Package {
        name: "firewall-ebpf",
        root_dir: root_dir.to_str().expect("utf-8 path"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
}

/// `0.1.0 (git 9d05b3f, release build)`, `9d05b3f-dirty` with uncommitted edits; without git
/// or outside a checkout, `0.1.0 (release build)`.
fn version(manifest: &std::path::Path) -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(manifest)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    // Named again when HEAD moves (HEAD or the index changes) or a source that goes into the
    // binary is edited (the `-dirty` mark); aya-build watches firewall-ebpf.
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        println!("cargo:rerun-if-changed={dir}/HEAD");
        println!("cargo:rerun-if-changed={dir}/index");
    }
    let root = manifest.parent().expect("workspace root");
    for watched in ["userspace/src", "common", "loadbalancer", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    let profile = std::env::var("PROFILE").unwrap_or_else(|_| "unknown".into());
    let pkg = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
    match git(&["describe", "--always", "--dirty"]) {
        Some(commit) => format!("{pkg} (git {commit}, {profile} build)"),
        None => format!("{pkg} ({profile} build)"),
    }
}
