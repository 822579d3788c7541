//! The `rampart` command. Each subcommand is a thin dispatcher into the library.
use std::{path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::{Parser, Subcommand};
use rampart::config::{Config, ConfigError, DEFAULT_CONTROL_SOCKET};

#[derive(Parser)]
#[command(name = "rampart", version, about = "XDP firewall and load balancer, TLS-terminating proxy")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: HTTPS termination and the HTTP reverse proxy.
    Serve {
        /// The configuration file (rampart.toml).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check a configuration file, including the certificate and CA files it names.
    CheckConfig {
        /// The configuration file (rampart.toml).
        file: PathBuf,
    },
    /// Ask the running daemon to load its configuration file again.
    Reload {
        /// The daemon's control socket ([admin] control_socket).
        #[arg(long, default_value = DEFAULT_CONTROL_SOCKET)]
        control_socket: PathBuf,
    },
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config } => serve(config),
        Command::CheckConfig { file } => return check_config(file),
        Command::Reload { control_socket } => reload(control_socket),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Our error messages already carry their cause; `{:#}` would repeat it.
            eprintln!("rampart: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(config: PathBuf) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("tokio runtime")?;
    rt.block_on(rampart::serve::run(&config))?;
    Ok(())
}

fn check_config(file: PathBuf) -> ExitCode {
    match Config::load(&file) {
        Ok(cfg) => {
            println!("{}: OK: {}", file.display(), cfg.summary());
            for note in cfg.not_applied_by_serve() {
                println!("note: parsed and checked, but not applied by `rampart serve` in this version: {note}");
            }
            ExitCode::SUCCESS
        }
        Err(ConfigError::Invalid(diags)) => {
            for d in diags {
                eprintln!("{d}");
            }
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn reload(control_socket: PathBuf) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("tokio runtime")?;
    let msg = rt.block_on(rampart::serve::admin::send_command(&control_socket, "reload"))?;
    println!("{msg}");
    Ok(())
}
