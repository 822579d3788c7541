//! rampart's developer entry points: `cargo xtask setup|build|test|demo|bench`.
//!
//! Every command but `setup` runs setup first, so each works on a fresh Debian 12 machine.
mod demo;
mod proc;
mod setup;
mod tasks;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "rampart's developer commands",
    disable_help_subcommand = true
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what this machine lacks: apt packages, nightly's rust-src, bpf-linker (cached in
    /// $RAMPART_TOOLS or ~/.cache/rampart), bpffs at /sys/fs/bpf. Idempotent.
    Setup,
    /// Setup, then build every crate and target, and the release `rampart` binary.
    Build,
    /// Setup, build, then `cargo test --workspace [ARGS]` (as root: the tests attach XDP
    /// programs in network namespaces).
    Test {
        /// Passed to `cargo test`, e.g. `-p rampart fw::` or `-- --nocapture`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Setup, build, then the seeds' whole stack (examples/stack/) in network namespaces, as
    /// root: HTTPS through the edge's firewall and L4 balancer to two web nodes, /api/ to the
    /// application tier and MariaDB, `rampart top`, a web node and the MySQL primary lost under
    /// traffic, Prometheus's alerts; every claim checked. About 2 minutes.
    Demo {
        /// Keep the stack running at the end (the demo says where to look) until Ctrl-C.
        #[arg(long)]
        keep: bool,
    },
    /// Setup, build, then run a benchmark (as root).
    Bench {
        what: tasks::Bench,
        /// Passed to the benchmark binary.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse().command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cmd: Cmd) -> Result<ExitCode> {
    match cmd {
        Cmd::Setup => {
            setup::setup()?;
        }
        Cmd::Build => {
            let tools = setup::setup()?;
            tasks::build(&tools)?;
        }
        Cmd::Test { args } => {
            tasks::require_root("test", "the tests load XDP programs and create network namespaces")?;
            let tools = setup::setup()?;
            let rampart = tasks::build(&tools)?;
            tasks::test(&tools, &rampart, &args)?;
        }
        Cmd::Demo { keep } => {
            tasks::require_root("demo", "it creates network namespaces and attaches XDP programs")?;
            let tools = setup::setup()?;
            let rampart = tasks::build_rampart_release(&tools)?;
            demo::run(&rampart, keep)?;
        }
        Cmd::Bench { what, args } => {
            tasks::require_root("bench", "benchmarks load XDP programs and create network namespaces")?;
            let tools = setup::setup()?;
            tasks::bench(&tools, what, &args)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
