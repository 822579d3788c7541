//! `rampart`: attach the XDP firewall to interfaces and manage its rules; run the daemon
//! (`serve`: TLS termination and the HTTP reverse proxy).
//!
//! Every command that touches an interface acts in one scope: the host's network namespace, or
//! with `-n NAME` the namespace `/run/netns/NAME` (entered with setns for the network only, so
//! pins stay under the root mount namespace's `/sys/fs/bpf/rampart/<scope>/<iface>/`).
mod cli;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(name = "rampart", version = env!("RAMPART_VERSION"), about = "XDP firewall and TLS-terminating reverse proxy")]
struct Cli {
    /// Act inside network namespace NAME (/run/netns/NAME), like `ip -n`.
    #[arg(short = 'n', long = "netns", value_name = "NAME", global = true)]
    netns: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Load the firewall and attach it to an interface (no rules: everything passes), or to every
    /// [[interface]] of a config file.
    #[command(group = clap::ArgGroup::new("target").args(["iface", "config"]).required(true))]
    Attach {
        #[arg(long, value_name = "IF")]
        iface: Option<String>,
        /// auto: native (driver) mode, else generic (skb) mode.
        #[arg(long, value_enum, default_value_t = Mode::Auto)]
        mode: Mode,
        /// Start with these rules instead of an empty rule set.
        #[arg(long, value_name = "FILE")]
        rules: Option<PathBuf>,
        /// Entries of the L4 balancer's connection table, all CPUs together (preallocated,
        /// about 100 bytes each; fixed until detach) [default: 65536].
        #[arg(long, value_name = "N")]
        conntrack_entries: Option<u32>,
        /// Apply every [[interface]] of this config file (rampart.toml), with its mode and rule
        /// file: attach where not attached yet, load the rules where attached already. All rule
        /// files are checked first; if one is bad, or an attach fails, nothing changes.
        #[arg(long, value_name = "FILE", conflicts_with_all = ["iface", "rules", "mode", "conntrack_entries"])]
        config: Option<PathBuf>,
    },
    /// Detach the firewall from an interface and remove every pin and state file it made.
    Detach {
        #[arg(long, value_name = "IF")]
        iface: String,
    },
    /// Firewall rules.
    Fw {
        #[command(subcommand)]
        cmd: FwCmd,
    },
    /// The XDP L4 balancer on an attached interface: services (VIP:PORT/PROTO) and backends.
    Lb {
        /// The interface (may be left out when exactly one is attached in this scope).
        #[arg(long, value_name = "IF", global = true)]
        iface: Option<String>,
        #[command(subcommand)]
        cmd: LbCmd,
    },
    /// What is attached in this scope: mode, program, rules, counters per verdict; then the
    /// running daemon's pools and MySQL clusters, if one answers on its control socket.
    Status {
        #[arg(long)]
        json: bool,
        /// The daemon's control socket ([admin] control_socket).
        #[arg(long, default_value = rampart::config::DEFAULT_CONTROL_SOCKET)]
        control_socket: PathBuf,
    },
    /// A backend of the L4 balancer: decapsulate what the balancer sends to its VIPs.
    Decap {
        #[command(subcommand)]
        cmd: DecapCmd,
    },
    /// Every figure once: the firewall's counters from the pinned maps (no daemon needed; every
    /// namespace, or the one of -n), then the running daemon's pools, routes, certificates and
    /// MySQL clusters if one answers on its control socket. Counters are cumulative.
    Stats {
        #[arg(long)]
        json: bool,
        /// The daemon's control socket ([admin] control_socket).
        #[arg(long, default_value = rampart::config::DEFAULT_CONTROL_SOCKET)]
        control_socket: PathBuf,
    },
    /// A live view, refreshed every second: per backend requests/s, new flows/s, packets/s,
    /// errors and health; per firewall rule packets/s and drops/s; totals. Read-only; `q` quits.
    Top {
        /// The daemon's control socket ([admin] control_socket).
        #[arg(long, default_value = rampart::config::DEFAULT_CONTROL_SOCKET)]
        control_socket: PathBuf,
        /// Seconds between screens.
        #[arg(long, default_value_t = 1.0, value_parser = parse_interval)]
        interval: f64,
        /// Print this many screens one after another, without terminal control, then exit
        /// (for scripts and logs).
        #[arg(long, value_name = "N")]
        iterations: Option<u32>,
    },
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
        #[arg(long, default_value = rampart::config::DEFAULT_CONTROL_SOCKET)]
        control_socket: PathBuf,
    },
    /// Set a backend's state in the running daemon: `ready`, `drain` (no new requests; those in
    /// flight finish) or `maint` (out; health checks paused). Lasts until the next reload,
    /// which applies the file's `state` again.
    Backend {
        /// The pool's name.
        pool: String,
        /// The backend as written in the pool's `backends` (e.g. `10.0.1.21:80`, `https://10.0.1.23:443`).
        backend: String,
        /// ready | drain | maint
        state: String,
        /// The daemon's control socket ([admin] control_socket).
        #[arg(long, default_value = rampart::config::DEFAULT_CONTROL_SOCKET)]
        control_socket: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum DecapCmd {
    /// Attach the decapsulation program to an interface, put the VIPs on lo and set the ARP
    /// sysctls that keep this host from answering ARP for them.
    Attach {
        #[arg(long, value_name = "IF")]
        iface: String,
        /// The VIPs this backend serves, comma-separated (IPv4 and IPv6).
        #[arg(long, value_name = "VIP[,VIP…]", required = true)]
        vip: Vec<String>,
        /// auto: native (driver) mode, else generic (skb) mode.
        #[arg(long, value_enum, default_value_t = Mode::Auto)]
        mode: Mode,
    },
    /// Detach it and undo everything attach made (pins, state, VIPs on lo, sysctls).
    Detach {
        #[arg(long, value_name = "IF")]
        iface: String,
    },
    /// Attached interfaces with their VIPs and counters.
    Status {
        #[arg(long)]
        json: bool,
    },
}

fn parse_interval(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if (0.1..=3600.0).contains(&x) => Ok(x),
        _ => Err(format!("{s:?}: expected seconds between 0.1 and 3600")),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    Auto,
    Native,
    Skb,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ActionArg {
    Allow,
    Deny,
}

#[derive(Subcommand, Debug)]
enum FwCmd {
    /// Replace the rule set with a rule file (atomically; a bad file changes nothing).
    Load {
        file: PathBuf,
        #[arg(long, value_name = "IF")]
        iface: Option<String>,
    },
    /// Validate a rule file without loading it.
    Check { file: PathBuf },
    /// Rules in order with their packet and byte counters, then the default policy.
    List {
        #[arg(long, value_name = "IF")]
        iface: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Add one rule (flags mirror the rule file's fields).
    Add {
        #[arg(long, value_enum)]
        action: ActionArg,
        /// CIDRs, addresses and @sets, comma-separated.
        #[arg(long)]
        src: Option<String>,
        #[arg(long)]
        dst: Option<String>,
        /// tcp, udp, icmp, icmpv6, any or a number.
        #[arg(long)]
        proto: Option<String>,
        /// Ports and lo-hi ranges, comma-separated.
        #[arg(long)]
        sport: Option<String>,
        #[arg(long)]
        dport: Option<String>,
        #[arg(long)]
        comment: Option<String>,
        /// 1-based position (default: last).
        #[arg(long, value_name = "N")]
        position: Option<usize>,
        #[arg(long, value_name = "IF")]
        iface: Option<String>,
    },
    /// Delete the rule with this id.
    Delete {
        id: u32,
        #[arg(long, value_name = "IF")]
        iface: Option<String>,
    },
    /// Change a named set: add|delete PREFIX…, or load FILE (one prefix per line).
    Set {
        name: String,
        #[command(subcommand)]
        op: SetOp,
    },
}

#[derive(Subcommand, Debug)]
pub enum LbCmd {
    /// Add or delete a service.
    Service {
        #[command(subcommand)]
        op: LbServiceOp,
    },
    /// Add, delete, drain or re-admit a service's backend.
    Backend {
        #[command(subcommand)]
        op: LbBackendOp,
    },
    /// Every service and backend: state, weight, packets, bytes, new flows, and their rates
    /// since the last `lb list`.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum LbServiceOp {
    /// A new service with no backends (its packets are dropped until one is added).
    Add {
        /// VIP:PORT/PROTO, e.g. 203.0.113.10:443/tcp or [2001:db8::10]:53/udp.
        service: String,
        /// Maglev table size: a prime well above the backend count.
        #[arg(long, value_name = "N", default_value_t = loadbalancer::DEFAULT_TABLE_SIZE)]
        table_size: u32,
    },
    /// Delete a service: its packets go on to the stack as any other.
    Delete { service: String },
}

#[derive(Subcommand, Debug)]
pub enum LbBackendOp {
    /// Add a backend (same address family as the service).
    Add {
        service: String,
        addr: String,
        /// Relative share of new flows.
        #[arg(long, value_name = "W", default_value_t = 100)]
        weight: u32,
    },
    /// Delete a backend: its flows are hashed again onto the others.
    Delete { service: String, addr: String },
    /// No new flows; flows already in the connection table stay until they end.
    Drain { service: String, addr: String },
    /// Take new flows again after a drain.
    Ready { service: String, addr: String },
}

#[derive(Subcommand, Debug)]
enum SetOp {
    /// Add prefixes (creates the set if missing).
    Add {
        #[arg(required = true, value_name = "PREFIX")]
        prefixes: Vec<String>,
        #[arg(long, value_name = "IF")]
        iface: Option<String>,
    },
    /// Delete prefixes (each must be in the set).
    Delete {
        #[arg(required = true, value_name = "PREFIX")]
        prefixes: Vec<String>,
        #[arg(long, value_name = "IF")]
        iface: Option<String>,
    },
    /// Replace the set's contents with a file of one prefix per line (`#` comments).
    Load {
        file: PathBuf,
        #[arg(long, value_name = "IF")]
        iface: Option<String>,
    },
}

fn main() -> ExitCode {
    let args = Cli::parse();
    // One-shot commands die quietly on a closed pipe (`rampart fw list | head`), as other
    // command-line tools do, instead of panicking in println!. Never the daemon: one client
    // resetting its connection must not kill it (serve::run also ignores SIGPIPE itself).
    if !matches!(args.cmd, Cmd::Serve { .. }) {
        // SAFETY: setting a signal disposition before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    // The daemon logs what it does; one-shot commands only what went wrong.
    let level = if matches!(args.cmd, Cmd::Serve { .. }) { "info" } else { "warn" };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level)).init();
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
