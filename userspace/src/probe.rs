//! Health probes, one abstraction for every protocol: a [`Probe`] looks at one server once and
//! says what it saw; [`run`] repeats it every interval with a timeout below the interval and
//! hands each result to the caller, who feeds `loadbalancer`'s health state machine
//! (`Backend::report_check`: rise/fall live there, not here). The HTTP probe lives with the
//! HTTP client code (`serve/http/backend.rs`); the MySQL probe is [`MysqlProbe`] (discovery:
//! read_only, replication state and lag); the XDP balancer's backends use [`TcpProbe`] and
//! [`HttpGetProbe`].
//!
//! A leaf module: it imports nothing of the daemon.

use std::{future::Future, net::SocketAddr, time::Duration};

use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{target}: timed out after {after:?}")]
    Timeout { target: String, after: Duration },
    #[error("{target}: {msg}")]
    Failed { target: String, msg: String },
    /// A MySQL server answered something the monitor cannot read (a column missing or of an
    /// unexpected kind).
    #[error("{target}: {msg}")]
    Unreadable { target: String, msg: String },
}

/// One look at one server.
pub trait Probe: Send + Sync {
    /// What a passed probe learned (nothing for HTTP; the server's state for MySQL).
    type Seen: Send;
    /// The server, for logs and errors.
    fn target(&self) -> String;
    fn probe(&self) -> impl Future<Output = Result<Self::Seen, ProbeError>> + Send;
}

/// When a probe runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedule {
    pub interval: Duration,
    /// Each probe's limit (below the interval, so one slow server never delays the next round).
    pub timeout: Duration,
    /// Wait before the first probe (spreads a pool's probes over an interval).
    pub offset: Duration,
}

/// One probe with its timeout applied.
pub async fn once<P: Probe>(probe: &P, timeout: Duration) -> Result<P::Seen, ProbeError> {
    match tokio::time::timeout(timeout, probe.probe()).await {
        Ok(r) => r,
        Err(_) => Err(ProbeError::Timeout { target: probe.target(), after: timeout }),
    }
}

/// Probes every `schedule.interval` until `stop`, skipping rounds where `active()` is false
/// (a backend in maintenance), and passes every result to `report`.
pub async fn run<P: Probe>(
    probe: &P,
    schedule: Schedule,
    stop: &CancellationToken,
    active: impl Fn() -> bool,
    mut report: impl FnMut(Result<P::Seen, ProbeError>),
) {
    tokio::select! {
        _ = stop.cancelled() => return,
        _ = tokio::time::sleep(schedule.offset) => {}
    }
    let mut tick = tokio::time::interval(schedule.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if !active() {
            continue;
        }
        let r = tokio::select! {
            _ = stop.cancelled() => return,
            r = once(probe, schedule.timeout) => r,
        };
        report(r);
    }
}

// ---------------------------------------------------------------------------------------------
// MySQL.

/// What the monitor saw on one MySQL/MariaDB server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MysqlState {
    /// `@@global.read_only`.
    pub read_only: bool,
    /// The replica side of replication, if the server is configured as a replica.
    pub replication: Option<Replication>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replication {
    pub io_running: bool,
    pub sql_running: bool,
    /// Seconds_Behind_Source / Seconds_Behind_Master; `None` when the server reports NULL
    /// (replication stopped or not connected).
    pub lag: Option<Duration>,
}

impl Replication {
    /// Reads a `SHOW REPLICA STATUS` / `SHOW SLAVE STATUS` row by column name, accepting both
    /// MySQL 8's spellings (Replica_*, *_Source) and MariaDB's and MySQL 5.7's (Slave_*, *_Master).
    pub fn from_columns<'a>(cols: impl IntoIterator<Item = (&'a str, Option<&'a str>)>) -> Result<Self, String> {
        let mut io = None;
        let mut sql = None;
        let mut lag = None;
        for (name, value) in cols {
            match name {
                "Replica_IO_Running" | "Slave_IO_Running" => io = Some(value),
                "Replica_SQL_Running" | "Slave_SQL_Running" => sql = Some(value),
                "Seconds_Behind_Source" | "Seconds_Behind_Master" => lag = Some(value),
                _ => {}
            }
        }
        let running = |v: Option<Option<&str>>, what: &str| -> Result<bool, String> {
            match v {
                // "Connecting" is not running: the replica has no working link to its source.
                Some(v) => Ok(v.is_some_and(|s| s.eq_ignore_ascii_case("yes"))),
                None => Err(format!("replication status has no {what} column")),
            }
        };
        let io_running = running(io, "Replica_IO_Running/Slave_IO_Running")?;
        let sql_running = running(sql, "Replica_SQL_Running/Slave_SQL_Running")?;
        let lag = match lag {
            None => return Err("replication status has no Seconds_Behind_Source/Seconds_Behind_Master column".into()),
            Some(None) => None,
            Some(Some(s)) if s.eq_ignore_ascii_case("null") => None,
            Some(Some(s)) => Some(Duration::from_secs(
                s.trim().parse::<u64>().map_err(|_| format!("replication lag {s:?} is not a number of seconds"))?,
            )),
        };
        Ok(Replication { io_running, sql_running, lag })
    }
}

/// The monitor's password, kept out of `Debug` and logs.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: String) -> Self {
        Secret(s)
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Discovery of one MySQL/MariaDB server with the `mysql` crate: `@@global.read_only`, then
/// `SHOW REPLICA STATUS` (MySQL 8.0.22+, MariaDB 10.5.1+), falling back to `SHOW SLAVE STATUS`.
/// The crate is blocking: each probe runs on tokio's blocking pool, bounded by the socket
/// timeouts set from the probe timeout. The monitor connects without TLS.
#[derive(Clone, Debug)]
pub struct MysqlProbe {
    pub addr: SocketAddr,
    pub user: String,
    pub password: Option<Secret>,
    pub timeout: Duration,
}

impl MysqlProbe {
    fn query(&self) -> Result<MysqlState, ProbeError> {
        use mysql::prelude::Queryable;
        let target = self.target();
        let failed = |e: mysql::Error| ProbeError::Failed { target: target.clone(), msg: e.to_string() };
        let opts = mysql::OptsBuilder::new()
            .ip_or_hostname(Some(self.addr.ip().to_string()))
            .tcp_port(self.addr.port())
            .user(Some(self.user.clone()))
            .pass(self.password.as_ref().map(|p| p.0.clone()))
            .prefer_socket(false)
            .tcp_connect_timeout(Some(self.timeout))
            .read_timeout(Some(self.timeout))
            .write_timeout(Some(self.timeout));
        let mut conn = mysql::Conn::new(opts).map_err(failed)?;
        let ro: Option<mysql::Value> = conn.query_first("SELECT @@global.read_only").map_err(failed)?;
        let read_only = match ro {
            Some(mysql::Value::Int(n)) => n != 0,
            Some(mysql::Value::UInt(n)) => n != 0,
            Some(mysql::Value::Bytes(b)) => b != b"0" && !b.eq_ignore_ascii_case(b"off"),
            other => {
                return Err(ProbeError::Unreadable { target, msg: format!("@@global.read_only is {other:?}") });
            }
        };
        let rows: Vec<mysql::Row> = match conn.query("SHOW REPLICA STATUS") {
            Ok(r) => r,
            Err(mysql::Error::MySqlError(_)) => conn.query("SHOW SLAVE STATUS").map_err(failed)?,
            Err(e) => return Err(failed(e)),
        };
        let replication = match rows.first() {
            None => None,
            Some(row) => {
                let cols: Vec<(String, Option<String>)> = row
                    .columns_ref()
                    .iter()
                    .enumerate()
                    .map(|(i, c)| {
                        let v = match row.as_ref(i) {
                            Some(mysql::Value::Bytes(b)) => Some(String::from_utf8_lossy(b).into_owned()),
                            Some(mysql::Value::Int(n)) => Some(n.to_string()),
                            Some(mysql::Value::UInt(n)) => Some(n.to_string()),
                            _ => None,
                        };
                        (c.name_str().into_owned(), v)
                    })
                    .collect();
                let r = Replication::from_columns(cols.iter().map(|(n, v)| (n.as_str(), v.as_deref())))
                    .map_err(|msg| ProbeError::Unreadable { target: target.clone(), msg })?;
                Some(r)
            }
        };
        Ok(MysqlState { read_only, replication })
    }
}

impl Probe for MysqlProbe {
    type Seen = MysqlState;

    fn target(&self) -> String {
        self.addr.to_string()
    }

    async fn probe(&self) -> Result<MysqlState, ProbeError> {
        let me = self.clone();
        let target = self.target();
        tokio::task::spawn_blocking(move || me.query())
            .await
            .map_err(|e| ProbeError::Failed { target, msg: format!("monitor task: {e}") })?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replication_columns_mariadb_and_mysql8() {
        let mariadb = [
            ("Slave_IO_State", Some("Waiting for master to send event")),
            ("Slave_IO_Running", Some("Yes")),
            ("Slave_SQL_Running", Some("Yes")),
            ("Seconds_Behind_Master", Some("3")),
        ];
        let r = Replication::from_columns(mariadb).unwrap();
        assert_eq!(r, Replication { io_running: true, sql_running: true, lag: Some(Duration::from_secs(3)) });
        let mysql8 = [
            ("Replica_IO_Running", Some("Connecting")),
            ("Replica_SQL_Running", Some("Yes")),
            ("Seconds_Behind_Source", None),
        ];
        let r = Replication::from_columns(mysql8).unwrap();
        assert_eq!(r, Replication { io_running: false, sql_running: true, lag: None });
    }

    #[test]
    fn replication_columns_missing_or_bad() {
        let e = Replication::from_columns([("Slave_IO_Running", Some("Yes")), ("Seconds_Behind_Master", None)])
            .unwrap_err();
        assert!(e.contains("Slave_SQL_Running"), "{e}");
        let e = Replication::from_columns([
            ("Slave_IO_Running", Some("Yes")),
            ("Slave_SQL_Running", Some("Yes")),
            ("Seconds_Behind_Master", Some("soon")),
        ])
        .unwrap_err();
        assert!(e.contains("soon"), "{e}");
    }

    #[test]
    fn secret_is_not_printed() {
        let p = MysqlProbe {
            addr: "127.0.0.1:3306".parse().unwrap(),
            user: "mon".into(),
            password: Some(Secret::new("hunter2".into())),
            timeout: Duration::from_millis(800),
        };
        assert!(!format!("{p:?}").contains("hunter2"));
    }

    struct Counting(std::sync::atomic::AtomicU32);
    impl Probe for Counting {
        type Seen = u32;
        fn target(&self) -> String {
            "counting".into()
        }
        async fn probe(&self) -> Result<u32, ProbeError> {
            let n = self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if n == 1 {
                // The second probe hangs past its timeout.
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            Ok(n)
        }
    }

    #[tokio::test]
    async fn run_reports_results_and_timeouts_until_stopped() {
        let p = Counting(Default::default());
        let stop = CancellationToken::new();
        let mut seen = Vec::new();
        let sched = Schedule {
            interval: Duration::from_millis(20),
            timeout: Duration::from_millis(10),
            offset: Duration::from_millis(1),
        };
        let stopper = stop.clone();
        let run = run(
            &p,
            sched,
            &stop,
            || true,
            |r| {
                seen.push(r.map_err(|e| e.to_string()));
                if seen.len() == 3 {
                    stopper.cancel();
                }
            },
        );
        tokio::time::timeout(Duration::from_secs(60), run).await.unwrap();
        assert_eq!(seen[0], Ok(0));
        assert_eq!(seen[1], Err("counting: timed out after 10ms".into()));
        assert_eq!(seen[2], Ok(2));
    }
}

/// A TCP connection that opens (then closes at once): the L4 balancer's `kind = "tcp"` check.
#[derive(Clone, Debug)]
pub struct TcpProbe {
    pub addr: SocketAddr,
}

impl Probe for TcpProbe {
    type Seen = ();
    fn target(&self) -> String {
        self.addr.to_string()
    }
    async fn probe(&self) -> Result<(), ProbeError> {
        tokio::net::TcpStream::connect(self.addr)
            .await
            .map(drop)
            .map_err(|e| ProbeError::Failed { target: self.target(), msg: e.to_string() })
    }
}

/// `GET path` over plain HTTP/1.1 answered with a 2xx or 3xx: the L4 balancer's
/// `kind = "http"` check (the HTTP proxy's pools use their own client, `HttpProbe`).
#[derive(Clone, Debug)]
pub struct HttpGetProbe {
    pub addr: SocketAddr,
    pub path: String,
}

impl Probe for HttpGetProbe {
    type Seen = ();
    fn target(&self) -> String {
        format!("http://{}{}", self.addr, self.path)
    }
    async fn probe(&self) -> Result<(), ProbeError> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let failed = |msg: String| ProbeError::Failed { target: self.target(), msg };
        let mut s = tokio::net::TcpStream::connect(self.addr).await.map_err(|e| failed(e.to_string()))?;
        let host = match self.addr {
            SocketAddr::V4(a) => a.ip().to_string(),
            SocketAddr::V6(a) => format!("[{}]", a.ip()),
        };
        let req = format!(
            "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: rampart-check\r\nConnection: close\r\n\r\n",
            self.path
        );
        s.write_all(req.as_bytes()).await.map_err(|e| failed(e.to_string()))?;
        // The status line is all that is read: "HTTP/1.1 200 ...".
        let mut buf = [0u8; 64];
        let mut n = 0;
        while n < 12 {
            match s.read(&mut buf[n..]).await.map_err(|e| failed(e.to_string()))? {
                0 => return Err(failed("closed before a status line".into())),
                k => n += k,
            }
        }
        let line = String::from_utf8_lossy(&buf[..n]);
        match line.strip_prefix("HTTP/1.").and_then(|r| r.get(2..5)).and_then(|c| c.parse::<u16>().ok()) {
            Some(code) if (200..400).contains(&code) => Ok(()),
            Some(code) => Err(failed(format!("status {code}"))),
            None => Err(failed(format!("not an HTTP answer: {:?}", line.lines().next().unwrap_or("")))),
        }
    }
}
