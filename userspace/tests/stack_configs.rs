//! The seeds' stack as shipped in `examples/stack/`: every file is one its program accepts, with
//! the certificates and password files an installation adds (made here, per run).
//! - each node's rampart.toml passes `Config::load` (which also checks the rule files, the
//!   certificates and the MySQL monitor's password file it names);
//! - the database zone's rule file parses (it is loaded by `rampart attach --iface`);
//! - Prometheus's scrape config, with the example alert rules it names, passes promtool and
//!   scrapes every admin listener of the stack;
//! - the application server compiles and imports its one dependency (Debian's pymysql).

mod serve_support;

use std::{path::PathBuf, process::Command};

use rampart::config::Config;
use serve_support::{Ca, TestDir};

fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// `examples/stack` and `examples/monitoring` copied side by side (prometheus.yml names
/// `../monitoring/…`), with what an installation adds: certificates and a password file.
fn installed() -> (TestDir, PathBuf) {
    let dir = TestDir::new("stack-configs");
    for sub in ["stack", "monitoring"] {
        let out = Command::new("cp").arg("-r").arg(examples().join(sub)).arg(&dir.0).output().expect("cp");
        assert!(out.status.success(), "cp {sub}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let stack = dir.0.join("stack");
    let tls = stack.join("tls");
    std::fs::create_dir_all(&tls).unwrap();
    let public = Ca::new("stack public CA");
    let internal = Ca::new("stack internal CA");
    for (ca, name, cn) in [(&public, "www", "www.stack.test"), (&internal, "app", "app.internal")] {
        let (cert, key) = ca.leaf(cn, &[cn]);
        std::fs::write(tls.join(format!("{name}.pem")), cert).unwrap();
        std::fs::write(tls.join(format!("{name}.key")), key).unwrap();
    }
    std::fs::write(tls.join("internal-ca.pem"), &internal.pem).unwrap();
    std::fs::write(stack.join("mysql-monitor.pass"), "not-a-real-password\n").unwrap();
    (dir, stack)
}

#[test]
fn every_node_config_loads() {
    let (_dir, stack) = installed();
    for node in ["edge.toml", "web.toml", "app.toml"] {
        let cfg = Config::load(&stack.join(node)).unwrap_or_else(|e| panic!("{node}: {e}"));
        assert_eq!(cfg.interfaces.len(), 1, "{node}: one firewalled interface");
        assert!(cfg.admin.listen.is_some(), "{node}: Prometheus scrapes every node");
    }
    let edge = Config::load(&stack.join("edge.toml")).unwrap();
    let ports: Vec<u16> = edge.services.iter().map(|s| s.vip.get_ref().port()).collect();
    assert_eq!(ports, [443, 80], "the edge balances the VIP's HTTPS and HTTP");
    let app = Config::load(&stack.join("app.toml")).unwrap();
    assert_eq!(app.mysql.len(), 1, "the application servers route MySQL");
    let db = rampart::fw::rules::parse_file(&stack.join("db.rules.toml")).expect("db.rules.toml");
    assert_eq!(db.default, rampart::fw::rules::Action::Deny);
}

/// A broken copy is refused with its place: the check above is not vacuous.
#[test]
fn a_broken_node_config_is_refused_where_it_is_broken() {
    let (_dir, stack) = installed();
    let web = std::fs::read_to_string(stack.join("web.toml")).unwrap();
    std::fs::write(stack.join("web.toml"), web.replace("tls/internal-ca.pem", "tls/missing-ca.pem")).unwrap();
    let err = Config::load(&stack.join("web.toml")).expect_err("a missing CA file passed").to_string();
    assert!(err.contains("web.toml:") && err.contains("missing-ca.pem"), "{err}");
}

#[test]
fn prometheus_config_and_rules_pass_promtool() {
    let (_dir, stack) = installed();
    let out = Command::new("promtool").args(["check", "config", "prometheus.yml"]).current_dir(&stack).output();
    let out = out.expect("promtool not found on PATH: run `cargo xtask setup` (Debian's prometheus package)");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool check config: {said}");
    assert!(said.contains("rampart.rules.yml"), "the alert rules were not checked: {said}");
    // Every admin listener of the stack is scraped.
    let prom = std::fs::read_to_string(stack.join("prometheus.yml")).unwrap();
    for node in ["edge.toml", "web.toml", "app.toml"] {
        let cfg = Config::load(&stack.join(node)).unwrap();
        let port = cfg.admin.listen.as_ref().unwrap().get_ref().port();
        assert!(prom.contains(&format!(":{port}\"")), "{node}'s admin port {port} is not scraped");
    }
}

#[test]
fn application_server_compiles_with_its_dependency() {
    let app = examples().join("stack/app.py");
    // Debian's interpreter, which has Debian's python3-pymysql (not whatever python3 is first on PATH).
    let out = Command::new("/usr/bin/python3").arg(&app).arg("--help").output().expect("/usr/bin/python3");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success() && said.contains("--password-file"),
        "app.py --help (needs Debian's python3-pymysql, installed by `cargo xtask setup`): {said}"
    );
}
