//! Sections 7 to 10 of the demo: faults while the client keeps writing notes and fetching
//! pages. web1's `rampart serve` is killed (the edge's health checks take web1 out), MariaDB on
//! db1 is killed and the operator promotes db2 (rampart follows the writable server), then web1
//! comes back. Prometheus fires `RampartL4BackendDown` and `RampartMysqlNoPrimary` and resolves
//! them. Afterwards: no acknowledged write is lost, requests failed only while a fault was being
//! noticed, and traffic recovered.
use std::{
    collections::BTreeMap,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use rampart_stack::{Conn, Req, Stack, wait_for};

use super::{Tally, field, heading, show_rampart};
use crate::proc::interrupted;

/// How long the edge's checks take to notice a dead web node (interval 1 s, fall 2), and the
/// MySQL routers a promoted primary (check interval 500 ms): the shipped configs' figures,
/// rounded up.
const WEB_NOTICED: f64 = 3.0;
const PRIMARY_NOTICED: f64 = 2.0;
/// How long an alert may take to fire or resolve: a scrape and an evaluation every 5 s, the
/// rules' `for:` divided by 10.
const ALERT_LIMIT: Duration = Duration::from_secs(60);

/// One request of the steady traffic: when its batch started and ended (s) and how it went.
struct Sent {
    from: f64,
    at: f64,
    ok: bool,
    what: String,
}

/// The alerts firing now: (name, a short description of their labels).
fn firing(s: &Stack) -> Vec<(String, String)> {
    let Ok(text) = s.prometheus("/api/v1/alerts") else { return vec![] };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else { return vec![] };
    let mut out = Vec::new();
    for a in v["data"]["alerts"].as_array().into_iter().flatten() {
        if a["state"] != "firing" {
            continue;
        }
        let l = &a["labels"];
        let name = l["alertname"].as_str().unwrap_or("").to_string();
        let what: Vec<String> = ["instance", "service", "backend", "cluster", "pool"]
            .iter()
            .filter_map(|k| l[*k].as_str().map(|v| format!("{k}={v}")))
            .collect();
        out.push((name, what.join(" ")));
    }
    out.sort();
    out
}

/// Waits until Prometheus has `name` firing (`want`) or not, and says so.
fn wait_alert(s: &Stack, tally: &mut Tally, name: &str, want: bool, mark: &mut dyn FnMut(&str)) -> Result<()> {
    let found = wait_for(&format!("{name} {}", if want { "firing" } else { "resolved" }), ALERT_LIMIT, || {
        let now = firing(s);
        match (want, now.iter().find(|(n, _)| n == name)) {
            (true, Some((_, labels))) => Ok(Some(labels.clone())),
            (false, None) => Ok(Some(String::new())),
            _ => Ok(None),
        }
    });
    match found {
        Ok(labels) if want => {
            mark(&format!("Prometheus: {name} firing ({labels})"));
            tally.expect(true, &format!("Prometheus fired {name}"));
        }
        Ok(_) => {
            mark(&format!("Prometheus: {name} resolved"));
            tally.expect(true, &format!("Prometheus resolved {name}"));
        }
        Err(e) => {
            tally.expect(false, &format!("{e}; firing now: {:?}", firing(s)));
            bail!("{name} did not change");
        }
    }
    Ok(())
}

struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

pub fn run(s: &Stack, tally: &mut Tally) -> Result<()> {
    heading(7, "Faults under traffic: the client keeps writing notes and fetching pages");
    let start = Instant::now();
    let stop = AtomicBool::new(false);
    let sent: Mutex<Vec<Sent>> = Mutex::default();
    let acked: Mutex<Vec<u64>> = Mutex::default();
    let mut events: Vec<(f64, String)> = Vec::new();
    let mut mark = |what: &str| {
        let t = start.elapsed().as_secs_f64();
        println!("  {t:5.1} s  {what}");
        events.push((t, what.to_string()));
    };
    let result = thread::scope(|sc| -> Result<()> {
        sc.spawn(|| {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) && !interrupted() {
                let reqs: Vec<Req> = (0..5).map(|i| Req::Post("/api/notes".into(), format!("demo {n} {i}"))).collect();
                n += 1;
                let from = start.elapsed().as_secs_f64();
                let Ok(answers) = s.batch("client", &reqs, Conn::NewEach) else { continue };
                let at = start.elapsed().as_secs_f64();
                for a in answers {
                    // Acknowledged: a 201 whose whole answer arrived.
                    let id = field(&a.body, "id").and_then(|i| i.parse::<u64>().ok());
                    let ok = a.status == 201 && a.error.is_empty() && id.is_some();
                    if let (true, Some(id)) = (ok, id) {
                        acked.lock().unwrap().push(id);
                    }
                    let what =
                        format!("write: {} {}", a.status, if a.error.is_empty() { a.body.trim() } else { &a.error });
                    sent.lock().unwrap().push(Sent { from, at, ok, what });
                }
            }
        });
        sc.spawn(|| {
            let reqs: Vec<Req> = (0..5).map(|_| Req::Get("/".into())).collect();
            while !stop.load(Ordering::Relaxed) && !interrupted() {
                let from = start.elapsed().as_secs_f64();
                let Ok(answers) = s.batch("client", &reqs, Conn::NewEach) else { continue };
                let at = start.elapsed().as_secs_f64();
                for a in answers {
                    let ok = a.status == 200 && a.error.is_empty();
                    sent.lock().unwrap().push(Sent { from, at, ok, what: format!("page: {} {}", a.status, a.error) });
                }
            }
        });
        let _stop = StopOnDrop(&stop);
        thread::sleep(Duration::from_secs(3));

        heading(8, "A web node dies: kill web1's rampart serve (SIGKILL)");
        mark("kill web1's rampart serve");
        s.kill_serve("web1");
        wait_alert(s, tally, "RampartL4BackendDown", true, &mut mark)?;
        let out = show_rampart(s, "edge", &["lb", "list"])?;
        let down = out.lines().any(|l| l.contains("10.0.1.11") && l.to_lowercase().contains("down"));
        tally.expect(down, "the edge's health checks took 10.0.1.11 (web1) out; new connections go to web2");

        heading(9, "The MySQL primary dies: kill db1, the operator promotes db2");
        mark("kill MariaDB on db1 (the primary)");
        s.kill_db("db1");
        wait_alert(s, tally, "RampartMysqlNoPrimary", true, &mut mark)?;
        println!("  rampart never promotes by itself; the operator (or an orchestrator) does:");
        println!("    db2> STOP SLAVE; RESET SLAVE ALL; SET GLOBAL read_only = 0;");
        mark("promote db2");
        s.promote("db2")?;
        let (code, body) = wait_for("a write on db2", Duration::from_secs(10), || {
            match s.curl("client", "/api/notes", &["-X", "POST", "--data-binary", "after the failover"]) {
                Ok((201, body)) if field(&body, "server_id").as_deref() == Some("2") => Ok(Some((201, body))),
                Ok((code, body)) => Err(format!("{code} {body}")),
                Err(e) => Err(e.to_string()),
            }
        })?;
        tally.expect(code == 201, &format!("writes land on db2 now: {}", body.trim()));
        wait_alert(s, tally, "RampartMysqlNoPrimary", false, &mut mark)?;

        heading(10, "Recovery: web1's rampart serve starts again");
        mark("start web1's rampart serve");
        s.start_serve("web1")?;
        wait_alert(s, tally, "RampartL4BackendDown", false, &mut mark)?;
        thread::sleep(Duration::from_secs(3));
        mark("end of the traffic");
        Ok(())
    });
    // The traffic threads have stopped (the scope waited for them).
    result?;
    let sent = sent.into_inner().unwrap();
    let acked = acked.into_inner().unwrap();
    let at = |prefix: &str| events.iter().find(|(_, e)| e.starts_with(prefix)).map(|(t, _)| *t);
    let (Some(kill_web), Some(kill_db), Some(promote), Some(restart)) =
        (at("kill web1"), at("kill MariaDB"), at("promote db2"), at("start web1"))
    else {
        bail!("a fault was not injected");
    };
    let windows = [(kill_web, kill_web + WEB_NOTICED), (kill_db, promote + PRIMARY_NOTICED)];
    let failed: Vec<&Sent> = sent.iter().filter(|x| !x.ok).collect();
    let mut groups: BTreeMap<&str, usize> = BTreeMap::new();
    for f in &failed {
        *groups.entry(f.what.as_str()).or_default() += 1;
    }
    println!("\n  {} requests during the faults, {} failed:", sent.len(), failed.len());
    for (what, n) in &groups {
        let what: String = what.chars().take(110).collect();
        println!("    {n:4} × {what}");
    }
    if groups.keys().any(|w| w.contains("(1105, 'table primary")) {
        // pymysql 1.0 skips 9 bytes of every ERR packet, as if it carried a #SQLSTATE; one
        // sent before the handshake does not (MariaDB's own do not either).
        println!("    (1105 is rampart's \"no writable primary in cluster shop\"; Debian's pymysql 1.0 cuts");
        println!("     the first 6 characters of an error sent before the handshake)");
    }
    let outside: Vec<&&Sent> =
        failed.iter().filter(|f| !windows.iter().any(|(a, b)| f.from <= *b && f.at >= *a)).collect();
    tally.expect(
        outside.is_empty(),
        &format!(
            "requests failed only while a fault was being noticed (web1: {WEB_NOTICED} s; no primary: until {PRIMARY_NOTICED} s \
             after the promotion){}",
            outside.first().map(|f| format!("; not so: {:.1}–{:.1} s {}", f.from, f.at, f.what)).unwrap_or_default()
        ),
    );
    let late = sent.iter().filter(|x| x.from > restart && !x.ok).count();
    let after = sent.iter().filter(|x| x.from > restart).count();
    tally.expect(late == 0 && after > 0, &format!("after recovery, {after} requests, {late} failed"));
    let ids = acked.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    let found = if acked.is_empty() {
        0
    } else {
        s.sql("db2", &format!("SELECT COUNT(*) FROM shop.notes WHERE id IN ({ids})"))?.trim().parse().unwrap_or(0)
    };
    tally.expect(
        !acked.is_empty() && found == acked.len(),
        &format!(
            "no acknowledged write lost: {} notes acknowledged, {found} of them on db2 (semi-synchronous replication)",
            acked.len()
        ),
    );
    Ok(())
}
