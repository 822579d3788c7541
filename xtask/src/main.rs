//! rampart's developer entry points: `cargo xtask setup|build|test|demo|bench`.
//!
//! Every command but `setup` runs setup first, so each works on a fresh Debian 12 machine.
mod demo;
mod probe;
mod proc;
mod setup;
mod tasks;
mod web;

use std::{
    net::{Ipv4Addr, SocketAddr},
    process::ExitCode,
};

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
    /// Setup, build, then show rampart at work between two network namespaces (as root): the
    /// XDP firewall, then HTTPS through `rampart serve` to a pool of two web backends.
    Demo,
    /// Setup, build, then run a benchmark (as root).
    Bench {
        what: tasks::Bench,
        /// Passed to the benchmark binary.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The demo's server end (run inside a namespace).
    #[command(name = "__serve", hide = true)]
    Serve {
        #[arg(long)]
        name: String,
        #[arg(long, value_delimiter = ',')]
        tcp: Vec<u16>,
        #[arg(long, value_delimiter = ',')]
        udp: Vec<u16>,
        #[arg(long, default_value_t = 600)]
        max_seconds: u64,
    },
    /// One of the demo's web backends (run inside a namespace).
    #[command(name = "__web", hide = true)]
    Web {
        #[arg(long)]
        name: String,
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, default_value_t = 600)]
        max_seconds: u64,
    },
    /// The demo's client end (run inside a namespace).
    #[command(name = "__probe", hide = true)]
    Probe {
        proto: probe::Proto,
        #[arg(long)]
        from: Ipv4Addr,
        #[arg(long)]
        to: Ipv4Addr,
        #[arg(long)]
        port: u16,
        #[arg(long, default_value_t = 1500)]
        timeout_ms: u64,
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
        Cmd::Demo => {
            tasks::require_root("demo", "it creates network namespaces and attaches an XDP program")?;
            let tools = setup::setup()?;
            let rampart = tasks::build_rampart_release(&tools)?;
            demo::run(&rampart)?;
        }
        Cmd::Bench { what, args } => {
            tasks::require_root("bench", "benchmarks load XDP programs and create network namespaces")?;
            let tools = setup::setup()?;
            tasks::bench(&tools, what, &args)?;
        }
        Cmd::Serve { name, tcp, udp, max_seconds } => probe::serve(&name, &tcp, &udp, max_seconds)?,
        Cmd::Web { name, listen, max_seconds } => web::serve(&name, listen, max_seconds)?,
        Cmd::Probe { proto, from, to, port, timeout_ms } => {
            let code = probe::probe(proto, from, to, port, timeout_ms)?;
            return Ok(ExitCode::from(code as u8));
        }
    }
    Ok(ExitCode::SUCCESS)
}
