//! `rampart serve`, `check-config` and `reload`: thin dispatchers into `rampart::serve` and
//! `rampart::config`.
use std::{path::Path, process::ExitCode};

use anyhow::{Context, Result};
use rampart::config::{Config, ConfigError};

pub fn serve(config: &Path, scope: rampart::paths::Scope) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("tokio runtime")?;
    rt.block_on(rampart::serve::run(config, scope))?;
    Ok(ExitCode::SUCCESS)
}

pub fn check_config(file: &Path) -> Result<ExitCode> {
    match Config::load(file) {
        Ok(cfg) => {
            println!("{}: OK: {}", file.display(), cfg.summary());
            for note in cfg.not_applied_by_serve() {
                println!("note: parsed and checked, but not applied by `rampart serve` in this version: {note}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(ConfigError::Invalid(diags)) => {
            for d in diags {
                eprintln!("{d}");
            }
            Ok(ExitCode::FAILURE)
        }
        Err(e) => {
            eprintln!("{e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Sends one control command to the running daemon and prints its answer.
pub fn command(control_socket: &Path, command: &str) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("tokio runtime")?;
    let msg = rt.block_on(rampart::serve::admin::send_command(control_socket, command))?;
    println!("{msg}");
    Ok(ExitCode::SUCCESS)
}

pub fn reload(control_socket: &Path) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("tokio runtime")?;
    let msg = rt.block_on(rampart::serve::admin::send_command(control_socket, "reload"))?;
    println!("{msg}");
    Ok(ExitCode::SUCCESS)
}
