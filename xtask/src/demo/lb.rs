//! Part three of the demo: the XDP L4 balancer. A "balancer" namespace runs `rampart attach` +
//! `rampart lb` for a VIP; three "web" namespaces each run `rampart decap` for the VIP and a
//! web backend (`xtask __web`) on port 80; all of them and the "internet" namespace share a
//! bridge (in a "switch" namespace). Requests from the customer to the VIP spread over the
//! three backends, which answer it directly (direct server return); `rampart lb list` shows the
//! counters.
use std::{net::Ipv4Addr, time::Duration};

use anyhow::{Context, Result};
use rampart_netlab::{Ns, veth};

use super::{Lab, Tally, heading, start_helper};
use crate::proc::{capture, capture_ok};

const VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 80);
const NET: &str = "10.88.0";
const WEB: [&str; 3] = ["web-1", "web-2", "web-3"];

/// Runs and prints a rampart command in `netns`; an error if it fails.
fn show(lab: &Lab, netns: &Ns, args: &[&str]) -> Result<String> {
    let mut cmd = lab.rampart_in(netns, args);
    println!("  $ rampart -n {netns} {}", args.join(" "));
    let out = capture_ok(&mut cmd, Duration::from_secs(30))?;
    print!("{}", super::indent(&out.text(), 4));
    println!();
    Ok(out.stdout)
}

pub fn run(lab: &mut Lab, tally: &mut Tally, first_section: usize) -> Result<()> {
    heading(first_section, "The XDP L4 balancer: a VIP in front of three web backends");
    let sw = lab.net.ns("switch")?;
    sw.bridge("br0")?;
    let balancer = lab.net.ns("balancer")?;
    // The customer joins the bridge from the "internet" namespace with a second interface.
    let mut hosts =
        vec![(lab.internet.clone(), format!("{NET}.2"), "lb-c"), (balancer.clone(), format!("{NET}.3"), "lb-b")];
    for (i, w) in WEB.iter().enumerate() {
        hosts.push((lab.net.ns(w)?, format!("{NET}.1{}", i + 1), ["lb-w1", "lb-w2", "lb-w3"][i]));
    }
    for (netns, addr, port) in &hosts {
        veth(sw.end(port).master("br0"), netns.end("eth1").addr(&format!("{addr}/24")))?;
    }
    lab.internet.route(&format!("{VIP}/32"), &format!("{NET}.3"))?;
    // The kernel's FIB lookup for XDP needs forwarding on the balancer (README).
    balancer.sysctl("net.ipv4.ip_forward", "1")?;
    println!("  \"internet\" {NET}.2 ──┐");
    println!("  balancer   {NET}.3 ──┼── bridge ── web-1 {NET}.11, web-2 {NET}.12, web-3 {NET}.13");
    println!("  The customer reaches VIP {VIP}:80 through the balancer; the web backends answer it directly.\n");

    // The backends: decapsulation for the VIP, and a web server.
    for w in WEB {
        let netns = Ns::named(lab.net.name(w));
        lab.undo(&netns, &["decap", "detach", "--iface", "eth1"]);
        show(lab, &netns, &["decap", "attach", "--iface", "eth1", "--vip", &VIP.to_string(), "--mode", "skb"])?;
        let web = start_helper(lab, &netns, &["__web", "--name", w, "--listen", "0.0.0.0:80"], w)?;
        lab.backends.push((w.to_string(), web));
    }
    // The balancer.
    lab.undo(&balancer, &["detach", "--iface", "eth1"]);
    show(lab, &balancer, &["attach", "--iface", "eth1", "--mode", "skb"])?;
    let service = format!("{VIP}:80/tcp");
    show(lab, &balancer, &["lb", "service", "add", &service])?;
    for i in 1..=3 {
        show(lab, &balancer, &["lb", "backend", "add", &service, &format!("{NET}.1{i}")])?;
    }

    // 30 requests, each on a new connection (a new flow), from the customer.
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    let mut failed = 0;
    for _ in 0..30 {
        let mut cmd = lab.internet.command("curl");
        cmd.args(["-s", "--max-time", "5", &format!("http://{VIP}/")]);
        let out = capture(&mut cmd, Duration::from_secs(10))?;
        match WEB.iter().find(|w| out.stdout.contains(*w)) {
            Some(w) if out.success() => *seen.entry(w.to_string()).or_default() += 1,
            _ => failed += 1,
        }
    }
    let spread: Vec<String> = seen.iter().map(|(w, n)| format!("{w} {n}")).collect();
    tally.expect(
        failed == 0 && seen.len() == 3,
        &format!("30 new connections to {VIP}:80 answered by {} ({failed} failed)", spread.join(", ")),
    );
    let list = show(lab, &balancer, &["lb", "list"])?;
    let _ = list;
    let mut cmd = lab.rampart_in(&balancer, &["lb", "list", "--json"]);
    let out = capture_ok(&mut cmd, Duration::from_secs(10))?;
    let v: serde_json::Value = serde_json::from_str(&out.stdout).context("lb list --json")?;
    let flows: u64 = v["services"][0]["backends"]
        .as_array()
        .map(|b| b.iter().filter_map(|b| b["new_flows"].as_u64()).sum())
        .unwrap_or(0);
    tally.expect(
        flows >= 30,
        &format!("the balancer counted {flows} new flows for the 30 connections (the SYNs' retries may add some)"),
    );
    Ok(())
}
