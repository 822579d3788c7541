//! `rampart --version` names the build: the commit it was built from (marked `-dirty` when the
//! sources had uncommitted edits) and the profile. Benchmarks report it as the code that ran.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").arg("-C").arg(env!("CARGO_MANIFEST_DIR")).args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[test]
fn version_names_the_commit_and_the_profile() {
    let out = Command::new(env!("CARGO_BIN_EXE_rampart")).arg("--version").output().unwrap();
    assert!(out.status.success());
    let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let profile = if cfg!(debug_assertions) { "debug" } else { "release" };
    let Some(head) = git(&["rev-parse", "HEAD"]) else {
        // A source tree without git (a crate tarball): the profile alone.
        assert_eq!(line, format!("rampart {} ({profile} build)", env!("CARGO_PKG_VERSION")));
        return;
    };
    let described = line
        .strip_prefix(&format!("rampart {} (git ", env!("CARGO_PKG_VERSION")))
        .and_then(|rest| rest.strip_suffix(&format!(", {profile} build)")))
        .unwrap_or_else(|| panic!("unexpected --version: {line:?}"));
    // `git describe --always`: the abbreviated commit, or tag-N-gCOMMIT; either ends in it.
    let commit = described.trim_end_matches("-dirty").rsplit("-g").next().unwrap();
    assert!(commit.len() >= 7 && head.starts_with(commit), "{line:?} does not name HEAD {head}");
    // The -dirty mark is not compared with `git status`: an edit to a file that does not go into
    // the binary (a test, a document) makes the tree dirty without rebuilding it.
}
