//! The commands behind `rampart`'s arguments.
mod daemon;
mod decap;
mod lb;
mod output;
mod views;

use std::{path::Path, process::ExitCode};

use anyhow::{Context, Result, anyhow, bail};
use rampart::{
    config::{Config, XdpMode},
    fw::{
        rules::{self, Action, Cidr, Rule, RuleSet},
        state::Firewall,
    },
    lb::state::{self as lb_state, Balancer, Desired, Proto, ServiceId},
    netns::{self, NetnsError},
    paths::Scope,
    pipeline::{self, AttachOptions},
    xdp::{self, AttachMode},
};

use crate::{ActionArg, Cli, Cmd, DecapCmd, FwCmd, Mode, SetOp};

pub fn run(cli: Cli) -> Result<ExitCode> {
    let scope = Scope::from_netns(cli.netns.as_deref());
    if let Some(name) = &cli.netns {
        match (&cli.cmd, netns::enter(name)) {
            (_, Ok(())) => {}
            // Checking a file needs no namespace.
            (Cmd::Fw { cmd: FwCmd::Check { .. } } | Cmd::CheckConfig { .. }, Err(_)) => {}
            // Pins outlive a deleted namespace; detach must still be able to remove them.
            (Cmd::Detach { .. } | Cmd::Decap { cmd: DecapCmd::Detach { .. } }, Err(NetnsError::NotFound { .. })) => {
                log::warn!("network namespace {name} is gone; removing rampart's pins and state only");
            }
            (_, Err(e)) => return Err(e.into()),
        }
    }
    match cli.cmd {
        Cmd::Attach { config: Some(config), .. } => attach_config(&scope, &config),
        Cmd::Attach { iface, mode, rules, conntrack_entries, config: None } => {
            let iface = iface.ok_or_else(|| anyhow!("attach needs --iface IF or --config FILE"))?;
            attach(&scope, &iface, mode, rules.as_deref(), conntrack_entries)
        }
        Cmd::Detach { iface } => {
            pipeline::detach(&scope, &iface)?;
            println!("detached {iface}");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status { json, control_socket } => output::status(&scope, json, &control_socket),
        Cmd::Stats { json, control_socket } => {
            views::stats(cli.netns.is_some().then_some(&scope), json, &control_socket)
        }
        Cmd::Top { control_socket, interval, iterations } => views::top(
            cli.netns.is_some().then_some(&scope),
            &control_socket,
            std::time::Duration::from_secs_f64(interval),
            iterations,
        ),
        Cmd::Fw { cmd } => fw(&scope, cmd),
        Cmd::Lb { iface, cmd } => lb::run(&scope, pick_iface(&scope, iface)?, cmd),
        Cmd::Decap { cmd } => decap::run(&scope, cli.netns.as_deref(), cmd),
        Cmd::Serve { config } => daemon::serve(&config, scope),
        Cmd::CheckConfig { file } => daemon::check_config(&file),
        Cmd::Reload { control_socket } => daemon::reload(&control_socket),
        Cmd::Backend { pool, backend, state, control_socket } => {
            daemon::command(&control_socket, &format!("backend {pool} {backend} {state}"))
        }
    }
}

fn attach_mode(mode: Mode) -> AttachMode {
    match mode {
        Mode::Auto => AttachMode::Auto,
        Mode::Native => AttachMode::Native,
        Mode::Skb => AttachMode::Skb,
    }
}

fn attach(
    scope: &Scope,
    iface: &str,
    mode: Mode,
    rules: Option<&Path>,
    conntrack_entries: Option<u32>,
) -> Result<ExitCode> {
    let rs = rules.map(rules::parse_file).transpose()?;
    let opts = AttachOptions { mode: attach_mode(mode), rules: rs, conntrack_entries };
    let r = pipeline::attach(scope, iface, opts)?;
    println!("attached to {} (ifindex {}) in {} mode, program id {}", r.iface, r.ifindex, r.mode, r.program_id);
    Ok(ExitCode::SUCCESS)
}

/// `attach --config`: every `[[interface]]` of the file. The config and every rule file are
/// checked before anything changes, and interfaces attached by this command are detached again
/// if a later attach fails. Interfaces attached already then get their rule file loaded, each
/// atomically as `fw load` does (a refused rule set leaves that interface's rules as they were);
/// their mode stays.
fn attach_config(scope: &Scope, path: &Path) -> Result<ExitCode> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let cfg = Config::parse(&text, path)?;
    if cfg.interfaces.is_empty() {
        bail!("{}: no [[interface]] section: nothing to attach", path.display());
    }
    let base = path.parent().unwrap_or(Path::new("."));
    let mut plan = Vec::new();
    for i in &cfg.interfaces {
        let name = i.name.get_ref().clone();
        let rules = match &i.rules {
            Some(r) => {
                let file = cfg.resolve(base, r.get_ref());
                Some(rules::parse_file(&file).with_context(|| format!("[[interface]] {name} in {}", path.display()))?)
            }
            None => None,
        };
        let mode = match i.mode {
            XdpMode::Auto => AttachMode::Auto,
            XdpMode::Native => AttachMode::Native,
            XdpMode::Skb => AttachMode::Skb,
        };
        let conntrack_entries = i.conntrack_entries.as_ref().map(|n| *n.get_ref());
        plan.push((name, AttachOptions { mode, rules, conntrack_entries }));
    }
    // Each interface's [[service]] sections, checked against what it balances now before
    // anything changes: a bad edit (duplicate, family, table) stops the command here.
    let mut services: Vec<(String, Vec<Desired>)> = Vec::new();
    for (name, _) in &plan {
        let desired = desired_services(&cfg, name);
        let mut next = lb_state::load(scope, name)?;
        next.apply(&desired).with_context(|| format!("[[service]] sections for {name} in {}", path.display()))?;
        for s in &next.services {
            s.table().with_context(|| format!("[[service]] {} in {}", s.id, path.display()))?;
        }
        services.push((name.clone(), desired));
    }
    let attached = xdp::attached_ifaces(scope)?;
    let (reload, new): (Vec<_>, Vec<_>) = plan.into_iter().partition(|(name, _)| attached.contains(name));
    // Interfaces attached already are opened (and locked) before anything is attached, so that
    // one that cannot be opened stops the command while nothing has changed yet.
    let mut reloads = Vec::new();
    for (name, opts) in reload {
        // The connection table is sized at load time: a different size needs a fresh attach,
        // which would lose every flow's entry, so it is refused rather than done or ignored.
        if let Some(want) = opts.conntrack_entries {
            let have = pipeline::conntrack_entries(scope, &name)?;
            if have != want {
                bail!(
                    "[[interface]] {name} in {}: conntrack_entries = {want}, but {name} is attached with {have}; \
                     the table is sized when the program is loaded: detach and attach again to change it \
                     (established flows then lose their entries). Nothing was changed",
                    path.display()
                );
            }
        }
        match opts.rules {
            Some(rs) => reloads.push((Firewall::open(scope, &name)?, rs)),
            None => println!("{name}: attached already; the config names no rule file, so its rules stay"),
        }
    }
    let mut done: Vec<String> = Vec::new();
    for (name, opts) in new {
        match pipeline::attach(scope, &name, opts) {
            Ok(r) => {
                println!(
                    "attached to {} (ifindex {}) in {} mode, program id {}",
                    r.iface, r.ifindex, r.mode, r.program_id
                );
                done.push(name);
            }
            Err(e) => {
                for n in done.iter().rev() {
                    match pipeline::detach(scope, n) {
                        Ok(()) => println!("detached {n} again"),
                        Err(undo) => log::error!("{n}: detaching again after a failed attach: {undo}"),
                    }
                }
                return Err(anyhow::Error::new(e).context(format!("[[interface]] {name} in {}", path.display())));
            }
        }
    }
    for (mut fw, rs) in reloads {
        let name = fw.iface().to_string();
        fw.load(rs).with_context(|| format!("[[interface]] {name} in {}: loading its rules", path.display()))?;
        println!("{name}: attached already (mode unchanged); loaded its rules: {}", summary(fw.rules()));
    }
    for (name, desired) in services {
        let mut lb = Balancer::open(scope, &name)?;
        if desired.is_empty() && lb.state().services.is_empty() {
            continue;
        }
        lb.change(|st| st.apply(&desired))
            .with_context(|| format!("[[service]] sections for {name} in {}", path.display()))?;
        let backends: usize = lb.state().services.iter().map(|s| s.backends.len()).sum();
        println!("{name}: balancing {} service(s) over {backends} backend(s)", lb.state().services.len());
    }
    Ok(ExitCode::SUCCESS)
}

/// The `[[service]]` sections of `cfg` that `iface` balances (those naming it, or all when the
/// file has only this one interface).
fn desired_services(cfg: &Config, iface: &str) -> Vec<Desired> {
    cfg.services
        .iter()
        .filter(|s| s.interface.as_ref().map_or(cfg.interfaces.len() == 1, |i| i.get_ref() == iface))
        .map(|s| Desired {
            id: ServiceId {
                vip: *s.vip.get_ref(),
                proto: match s.proto {
                    rampart::config::L4Proto::Tcp => Proto::Tcp,
                    rampart::config::L4Proto::Udp => Proto::Udp,
                },
            },
            table_size: *s.table_size.get_ref(),
            backends: s.backends.iter().map(|b| (b.addr, b.weight)).collect(),
        })
        .collect()
}

/// `--iface`, or the only interface attached in `scope`.
fn pick_iface(scope: &Scope, iface: Option<String>) -> Result<String> {
    if let Some(i) = iface {
        return Ok(i);
    }
    let all = xdp::attached_ifaces(scope)?;
    let where_ = match scope {
        Scope::Host => String::new(),
        Scope::Netns(n) => format!(" in network namespace {n}"),
    };
    match all.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!("nothing is attached{where_}"),
        many => bail!("several interfaces are attached{where_} ({}): give --iface", many.join(", ")),
    }
}

fn open(scope: &Scope, iface: Option<String>) -> Result<Firewall> {
    let iface = pick_iface(scope, iface)?;
    Ok(Firewall::open(scope, &iface)?)
}

fn fw(scope: &Scope, cmd: FwCmd) -> Result<ExitCode> {
    match cmd {
        FwCmd::Check { file } => {
            let rs = rules::parse_file(&file)?;
            println!("{}: ok, {}", file.display(), summary(&rs));
        }
        FwCmd::Load { file, iface } => {
            // Parse before taking the lock: a big file must not hold up other commands.
            let rs = rules::parse_file(&file)?;
            let mut fw = open(scope, iface)?;
            fw.load(rs)?;
            println!("loaded {} into {}: {}", file.display(), fw.iface(), summary(fw.rules()));
        }
        FwCmd::List { iface, json } => {
            let fw = open(scope, iface)?;
            output::list(&fw, json)?;
        }
        FwCmd::Add { action, src, dst, proto, sport, dport, comment, position, iface } => {
            let rule = Rule {
                id: 0,
                action: match action {
                    ActionArg::Allow => Action::Allow,
                    ActionArg::Deny => Action::Deny,
                },
                src: flag("src", src, rules::parse_addr_match)?,
                dst: flag("dst", dst, rules::parse_addr_match)?,
                proto: flag("proto", proto, rules::parse_proto)?.flatten(),
                sport: flag("sport", sport, rules::parse_ports)?,
                dport: flag("dport", dport, rules::parse_ports)?,
                comment,
            };
            let mut fw = open(scope, iface)?;
            let id = fw.add_rule(rule, position)?;
            let pos = fw.rules().rules.iter().position(|r| r.id == id).map_or(0, |p| p + 1);
            println!("added rule {id} at position {pos} on {}", fw.iface());
        }
        FwCmd::Delete { id, iface } => {
            let mut fw = open(scope, iface)?;
            fw.delete_rule(id)?;
            println!("deleted rule {id} on {}", fw.iface());
        }
        FwCmd::Set { name, op } => set(scope, &name, op)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// Parses an optional `fw add` flag; errors name the flag.
fn flag<T>(name: &str, value: Option<String>, parse: fn(&str) -> Result<T, String>) -> Result<Option<T>> {
    value.map(|v| parse(&v).map_err(|m| anyhow!("--{name}: {m}"))).transpose()
}

fn set(scope: &Scope, name: &str, op: SetOp) -> Result<()> {
    rules::check_set_name(name).map_err(|m| anyhow!("{m}"))?;
    let parse_all = |prefixes: &[String]| -> Result<Vec<Cidr>> {
        prefixes.iter().map(|p| p.trim().parse::<Cidr>().map_err(|m| anyhow!("{m}"))).collect()
    };
    let size = |fw: &Firewall| fw.rules().sets.get(name).map_or(0, Vec::len);
    match op {
        SetOp::Add { prefixes, iface } => {
            let cidrs = parse_all(&prefixes)?;
            let mut fw = open(scope, iface)?;
            let added = fw.set_add(name, &cidrs)?;
            println!("set {name} on {}: added {added} of {}, {} now", fw.iface(), prefixes_n(cidrs.len()), size(&fw));
        }
        SetOp::Delete { prefixes, iface } => {
            let cidrs = parse_all(&prefixes)?;
            let mut fw = open(scope, iface)?;
            fw.set_delete(name, &cidrs)?;
            println!("set {name} on {}: deleted {}, {} now", fw.iface(), prefixes_n(cidrs.len()), size(&fw));
        }
        SetOp::Load { file, iface } => {
            let cidrs = rules::parse_set_file(&file)?;
            let mut fw = open(scope, iface)?;
            fw.set_replace(name, cidrs)?;
            println!("set {name} on {}: loaded {} from {}", fw.iface(), prefixes_n(size(&fw)), file.display());
        }
    }
    Ok(())
}

fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn prefixes_n(n: usize) -> String {
    count(n, "prefix", "prefixes")
}

/// `3 rules, 1 set (2 prefixes), default deny`.
fn summary(rs: &RuleSet) -> String {
    let prefixes: usize = rs.sets.values().map(Vec::len).sum();
    format!(
        "{}, {} ({}), default {}",
        count(rs.rules.len(), "rule", "rules"),
        count(rs.sets.len(), "set", "sets"),
        count(prefixes, "prefix", "prefixes"),
        rs.default
    )
}
