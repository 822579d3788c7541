//! `rampart decap …`: a backend's side of the balancer (see `rampart::lb::decap`).
use std::process::ExitCode;

use anyhow::Result;
use rampart::{lb::decap, netns, paths::Scope};

use super::attach_mode;
use crate::DecapCmd;

pub fn run(scope: &Scope, netns_name: Option<&str>, cmd: DecapCmd) -> Result<ExitCode> {
    match cmd {
        DecapCmd::Attach { iface, vip, mode } => {
            let vips = decap::parse_vips(&vip.join(","))?;
            let r = decap::attach(scope, &iface, &vips, attach_mode(mode))?;
            println!(
                "decap attached to {} (ifindex {}) in {} mode, program id {}, VIPs {}",
                r.iface,
                r.ifindex,
                r.mode,
                r.program_id,
                list(&vips)
            );
            if !r.lo_added.is_empty() {
                println!("  on lo: {}", list(&r.lo_added));
            }
            for c in &r.sysctls {
                println!("  {}: {} -> {}", c.path.display(), c.previous, c.value);
            }
        }
        DecapCmd::Detach { iface } => {
            // The namespace may be gone (cli::run let that through): its addresses and sysctls
            // went with it, and /proc/sys/net would be this process's own namespace's.
            let in_netns = netns_name.is_none_or(netns::exists);
            let r = decap::detach(scope, &iface, in_netns)?;
            println!("decap detached from {iface}");
            if !r.lo_removed.is_empty() {
                println!("  removed from lo: {}", list(&r.lo_removed));
            }
            for c in &r.sysctls_restored {
                println!("  {}: {} -> {}", c.path.display(), c.value, c.previous);
            }
        }
        DecapCmd::Status { json } => {
            let all: Vec<decap::DecapStatus> =
                decap::attached(scope)?.iter().map(|i| decap::status(scope, i)).collect::<Result<_, _>>()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else if all.is_empty() {
                println!("decap: nothing attached");
            } else {
                for s in &all {
                    println!(
                        "{} (ifindex {}): {} mode, program id {}, VIPs {}",
                        s.iface,
                        s.ifindex,
                        s.mode,
                        s.program_id,
                        list(&s.vips)
                    );
                    for (name, c) in &s.counters {
                        println!("  {name:<14} {:>12} packets {:>14} bytes", c.packets, c.bytes);
                    }
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn list(ips: &[std::net::IpAddr]) -> String {
    ips.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}
