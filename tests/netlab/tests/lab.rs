//! The builder itself: what it makes works, and everything it made is gone afterwards, also
//! after a panic. Needs root.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use rampart_netlab::{Lab, NetlabError, Ns, run, veth};

fn lab(tag: &str) -> Lab {
    Lab::new(tag).unwrap_or_else(|e| panic!("{e}"))
}

fn gone(ns: &str) -> bool {
    !Path::new("/run/netns").join(ns).exists()
}

fn alive(pid: u32) -> bool {
    // A killed process whose parent has not reaped it yet is a zombie: as good as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

#[test]
fn a_failed_command_is_named_with_its_stderr() {
    let err = Ns::current().ip(&["link", "show", "nosuch0"]).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, NetlabError::Failed { .. }), "{err:?}");
    assert!(text.contains("`ip link show nosuch0` failed") && text.contains("nosuch0"), "{text}");
}

/// Two hosts routed through a third (a router with a bridge), every builder step used once;
/// ping crosses it; then teardown kills the processes (a grandchild too), runs the undo
/// commands newest first (a cancelled one not at all) and deletes every namespace.
#[test]
fn a_routed_topology_works_and_teardown_removes_all_of_it() {
    let mut lab = lab("nlt");
    let (a, r, b) = (lab.ns("a").unwrap(), lab.ns("r").unwrap(), lab.ns("b").unwrap());
    r.bridge("br0").unwrap();
    veth(a.end("eth0").mac("02:6e:6c:00:00:01").mtu(1400).addr("10.61.1.2/24").addr("fd00:61:1::2/64"), r.end("ra"))
        .unwrap();
    veth(b.end("eth0").txqueuelen(5000).queues(2).addr("10.61.2.2/24"), r.end("rb").master("br0")).unwrap();
    r.addr("ra", "10.61.1.1/24").unwrap();
    r.addr("br0", "10.61.2.1/24").unwrap();
    r.sysctl("net.ipv4.ip_forward", "1").unwrap();
    a.route("default", "10.61.1.1").unwrap();
    b.multipath_route("10.61.1.0/24", &["10.61.2.1"]).unwrap();
    b.neigh("eth0", "10.61.2.1", &mac(&r, "br0")).unwrap();
    a.wait_carrier("eth0", Duration::from_secs(5)).unwrap();

    let link = a.ip(&["-o", "link", "show", "eth0"]).unwrap();
    assert!(link.contains("mtu 1400") && link.contains("02:6e:6c:00:00:01"), "{link}");
    let b_eth0 = b.ip(&["-o", "-d", "link", "show", "eth0"]).unwrap();
    assert!(b_eth0.contains("qlen 5000") && b_eth0.contains("numtxqueues 2 numrxqueues 2"), "{b_eth0}");
    assert!(r.ip(&["-o", "link", "show", "rb"]).unwrap().contains("master br0"));
    assert!(b.ip(&["neigh", "show", "10.61.2.1"]).unwrap().contains("PERMANENT"));
    assert!(a.ip(&["-o", "addr", "show", "eth0"]).unwrap().contains("fd00:61:1::2/64"));
    assert_eq!(r.run("sysctl", &["-n", "net.ipv4.ip_forward"]).unwrap().trim(), "1");
    let ping = a.run("ping", &["-n", "-q", "-c", "1", "-W", "5", "10.61.2.2"]).unwrap();
    assert!(ping.contains("1 received"), "{ping}");

    // A process, and one that leaves a grandchild behind (which only killing the namespace's
    // every process reaches).
    let sleeper = lab.spawn(a.command("sleep").arg("600").stdout(Stdio::null())).unwrap();
    let sleeper = lab.child(sleeper).id();
    lab.spawn(b.command("sh").args(["-c", "sleep 600 & wait"])).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let in_b: Vec<u32> = run(Command::new("ip").args(["netns", "pids", b.name()]))
        .map(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().map(|p| p.parse().unwrap()).collect())
        .unwrap();
    assert_eq!(in_b.len(), 2, "sh and its sleep: {in_b:?}");

    let log = std::env::temp_dir().join(format!("{}.log", lab.prefix()));
    for word in ["first", "cancelled", "second"] {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", &format!("echo {word} >> {}", log.display())]);
        let undo = lab.on_teardown(cmd);
        if word == "cancelled" {
            lab.cancel(undo);
        }
    }
    let names = lab.namespaces().to_vec();
    assert_eq!(names, [lab.name("a"), lab.name("r"), lab.name("b")]);
    assert!(names[0].starts_with(&format!("nlt-{}-", std::process::id())), "{names:?}");

    lab.teardown().unwrap();
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "second\nfirst\n");
    let _ = std::fs::remove_file(&log);
    for n in &names {
        assert!(gone(n), "{n} left behind");
    }
    for pid in in_b.iter().copied().chain([sleeper]) {
        assert!(!alive(pid), "process {pid} still runs");
    }
    lab.teardown().expect("a second teardown has nothing to do");
}

fn mac(ns: &Ns, iface: &str) -> String {
    let out = ns.ip(&["-br", "link", "show", iface]).unwrap();
    out.split_whitespace().nth(2).unwrap().to_string()
}

#[test]
fn drop_cleans_up_after_a_panic_and_names_never_clash() {
    let names = std::panic::catch_unwind(|| {
        let mut lab = lab("nlp");
        let x = lab.ns("x").unwrap();
        let mut again = Lab::new("nlp").unwrap();
        let y = again.ns("x").unwrap();
        assert_ne!(x, y, "two labs of one tag made the same name");
        std::panic::panic_any((x.name().to_string(), y.name().to_string()));
    })
    .unwrap_err();
    let (x, y) = names.downcast_ref::<(String, String)>().unwrap();
    assert!(gone(x) && gone(y), "{x} or {y} left behind");
}

#[test]
fn a_namespace_made_twice_is_refused_and_left_alone() {
    let mut lab = lab("nld");
    let first = lab.ns("dup").unwrap();
    let err = lab.ns("dup").unwrap_err();
    assert!(matches!(&err, NetlabError::Exists(n) if n == first.name()), "{err:?}");
    assert_eq!(lab.namespaces().len(), 1, "the refused one was recorded");
    let other = Ns::named("nosuch-netlab-ns");
    assert!(matches!(lab.kill_all(&other), Err(NetlabError::NotOurs(_))));
}

/// The calling thread's namespace is reached by inheritance, a named one through `ip netns exec`
/// (veths in the current namespace are exercised by lb_testrun, inside a private namespace).
#[test]
fn commands_of_the_current_namespace_take_no_netns_words() {
    assert_eq!(crate_show(&Ns::current().command("true")), "true");
    let lab_ns = Ns::named("n1");
    assert_eq!(crate_show(&lab_ns.command("true")), "ip netns exec n1 true");
    assert_eq!(crate_show(&lab_ns.nsenter("true")), "nsenter --net=/run/netns/n1 true");
    assert_eq!(crate_show(&Ns::current().nsenter("true")), "true");
}

fn crate_show(cmd: &Command) -> String {
    rampart_netlab::show(cmd)
}
