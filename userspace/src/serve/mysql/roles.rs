//! Who is primary, from what the monitor saw: pure decisions, no IO. rampart never promotes:
//! the primary is the one writable server the operator (or an orchestrator) made writable, and
//! anything else (none writable, or several) is reported as such, never guessed around.

use std::{fmt, net::SocketAddr, time::Duration};

use crate::probe::MysqlState;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// The one writable server.
    Primary,
    /// Read-only and configured as a replica.
    Replica,
    /// Writable, but so is another server (split brain): neither is used for writes.
    Writable,
    /// Read-only and not a replica (a stopped-and-reset old primary, a spare).
    ReadOnly,
    /// The monitor could not reach or read it.
    Unreachable,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
            Role::Writable => "writable",
            Role::ReadOnly => "read_only",
            Role::Unreachable => "unreachable",
        }
    }

    pub const ALL: [Role; 5] = [Role::Primary, Role::Replica, Role::Writable, Role::ReadOnly, Role::Unreachable];
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The read-write port's target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Primary {
    /// No discovery round has finished yet.
    Unknown,
    One(SocketAddr),
    None,
    /// Split brain: these servers are all writable.
    Several(Vec<SocketAddr>),
}

impl Primary {
    pub fn addr(&self) -> Option<SocketAddr> {
        match self {
            Primary::One(a) => Some(*a),
            _ => None,
        }
    }

    /// Why the read-write port refuses a connection, for the client's ERR packet.
    pub fn refusal(&self, cluster: &str) -> Option<String> {
        match self {
            Primary::One(_) => None,
            Primary::Unknown => Some(format!("cluster {cluster}: servers not checked yet")),
            Primary::None => Some(format!("no writable primary in cluster {cluster}")),
            Primary::Several(v) => Some(format!(
                "split brain in cluster {cluster}: {} are all writable; refusing writes until one remains",
                v.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
            )),
        }
    }
}

/// One server as the last round saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerView {
    pub addr: SocketAddr,
    pub role: Role,
    /// Replication lag, for replicas that report one.
    pub lag: Option<Duration>,
    /// May take read-only connections: a replica whose replication runs (IO and SQL threads)
    /// and is at most `max_lag` behind.
    pub ro_eligible: bool,
    /// Why the server is unreachable or not eligible, for status and logs.
    pub note: Option<String>,
}

/// The outcome of one discovery round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub servers: Vec<ServerView>,
    pub primary: Primary,
    /// Rounds finished (0: none yet).
    pub round: u64,
}

impl Decision {
    pub fn unknown(servers: &[SocketAddr]) -> Decision {
        Decision {
            servers: servers
                .iter()
                .map(|&addr| ServerView { addr, role: Role::Unreachable, lag: None, ro_eligible: false, note: None })
                .collect(),
            primary: Primary::Unknown,
            round: 0,
        }
    }

    pub fn has_server(&self, addr: SocketAddr) -> bool {
        self.servers.iter().any(|s| s.addr == addr)
    }
}

/// Decides roles from one round of probe results (in the config's server order).
pub fn decide(seen: &[(SocketAddr, Result<MysqlState, String>)], max_lag: Duration, round: u64) -> Decision {
    let writable: Vec<SocketAddr> =
        seen.iter().filter(|(_, s)| s.as_ref().is_ok_and(|s| !s.read_only)).map(|(a, _)| *a).collect();
    let primary = match writable.len() {
        0 => Primary::None,
        1 => Primary::One(writable[0]),
        _ => Primary::Several(writable.clone()),
    };
    let servers = seen
        .iter()
        .map(|(addr, s)| match s {
            Err(e) => ServerView {
                addr: *addr,
                role: Role::Unreachable,
                lag: None,
                ro_eligible: false,
                note: Some(e.clone()),
            },
            Ok(s) if !s.read_only => ServerView {
                addr: *addr,
                role: if primary == Primary::One(*addr) { Role::Primary } else { Role::Writable },
                lag: None,
                ro_eligible: false,
                note: None,
            },
            Ok(MysqlState { replication: None, .. }) => ServerView {
                addr: *addr,
                role: Role::ReadOnly,
                lag: None,
                ro_eligible: false,
                note: Some("read-only but not a replica".into()),
            },
            Ok(MysqlState { replication: Some(r), .. }) => {
                let note = if !r.io_running || !r.sql_running {
                    Some(format!(
                        "replication stopped (IO thread {}, SQL thread {})",
                        if r.io_running { "running" } else { "stopped" },
                        if r.sql_running { "running" } else { "stopped" }
                    ))
                } else {
                    match r.lag {
                        None => Some("replication lag unknown".into()),
                        Some(l) if l > max_lag => {
                            Some(format!("lag {}s over max_lag {}s", l.as_secs(), max_lag.as_secs_f64()))
                        }
                        Some(_) => None,
                    }
                };
                ServerView { addr: *addr, role: Role::Replica, lag: r.lag, ro_eligible: note.is_none(), note }
            }
        })
        .collect();
    Decision { servers, primary, round }
}

/// Rounds in a row the primary's probe may fail before the read-write port gives it up. One
/// probe lost or slower than its timeout (a busy machine, a long fsync) must not refuse every
/// write for a round: the stack test saw single-round "no writable primary" refusals with the
/// primary healthy. A primary that answers read-only, or another writable server, counts at once.
pub const PRIMARY_FALL: u32 = 2;

/// `d` with the previous round's primary kept while only its probe failed, for fewer than
/// [`PRIMARY_FALL`] rounds in a row and with no other server writable. `missed` counts the
/// failed rounds across calls.
pub fn hold_primary(prev: &Primary, mut d: Decision, missed: &mut u32) -> Decision {
    let Primary::One(p) = *prev else {
        *missed = 0;
        return d;
    };
    let unreachable = d.servers.iter().any(|s| s.addr == p && s.role == Role::Unreachable);
    if d.primary != Primary::None || !unreachable {
        *missed = 0;
        return d;
    }
    *missed += 1;
    if *missed < PRIMARY_FALL {
        d.primary = Primary::One(p);
        if let Some(s) = d.servers.iter_mut().find(|s| s.addr == p) {
            s.role = Role::Primary;
            let why = s.note.take().unwrap_or_default();
            s.note = Some(format!("check failed ({why}), {} of {PRIMARY_FALL} in a row; still the primary", *missed));
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::Replication;

    fn a(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }
    fn primary() -> Result<MysqlState, String> {
        Ok(MysqlState { read_only: false, replication: None })
    }
    fn replica(io: bool, sql: bool, lag: Option<u64>) -> Result<MysqlState, String> {
        Ok(MysqlState {
            read_only: true,
            replication: Some(Replication { io_running: io, sql_running: sql, lag: lag.map(Duration::from_secs) }),
        })
    }
    const MAX: Duration = Duration::from_secs(5);

    #[test]
    fn one_writable_is_primary_and_healthy_replicas_serve_reads() {
        let d = decide(
            &[(a(1), primary()), (a(2), replica(true, true, Some(0))), (a(3), replica(true, true, Some(5)))],
            MAX,
            1,
        );
        assert_eq!(d.primary, Primary::One(a(1)));
        assert_eq!(d.primary.refusal("main"), None);
        let roles: Vec<_> = d.servers.iter().map(|s| (s.role, s.ro_eligible)).collect();
        assert_eq!(roles, [(Role::Primary, false), (Role::Replica, true), (Role::Replica, true)]);
        assert_eq!(d.servers[2].lag, Some(Duration::from_secs(5)));
    }

    #[test]
    fn a_writable_replica_after_failover_is_the_primary() {
        // Old primary set read-only, replica stopped and made writable: rampart follows.
        let old = Ok(MysqlState { read_only: true, replication: None });
        let new = Ok(MysqlState {
            read_only: false,
            replication: Some(Replication { io_running: false, sql_running: false, lag: None }),
        });
        let d = decide(&[(a(1), old), (a(2), new)], MAX, 7);
        assert_eq!(d.primary, Primary::One(a(2)));
        assert_eq!(d.servers[0].role, Role::ReadOnly);
        assert_eq!(d.servers[1].role, Role::Primary);
        assert!(!d.servers[0].ro_eligible);
    }

    #[test]
    fn none_writable_or_primary_unreachable_refuses() {
        let d = decide(&[(a(1), Err("connection refused".into())), (a(2), replica(false, true, None))], MAX, 1);
        assert_eq!(d.primary, Primary::None);
        assert_eq!(d.primary.refusal("main").unwrap(), "no writable primary in cluster main");
        assert_eq!(d.servers[0].role, Role::Unreachable);
        assert_eq!(d.servers[0].note.as_deref(), Some("connection refused"));
    }

    #[test]
    fn one_failed_check_of_the_primary_is_held_two_are_not() {
        let ok = decide(&[(a(1), primary()), (a(2), replica(true, true, Some(0)))], MAX, 1);
        let mut missed = 0;
        let ok = hold_primary(&Primary::Unknown, ok, &mut missed);
        assert_eq!(ok.primary, Primary::One(a(1)));
        let lost = || decide(&[(a(1), Err("timed out".into())), (a(2), replica(true, true, Some(0)))], MAX, 2);
        let held = hold_primary(&ok.primary, lost(), &mut missed);
        assert_eq!(held.primary, Primary::One(a(1)));
        assert_eq!(held.servers[0].role, Role::Primary);
        assert!(held.servers[0].note.as_deref().unwrap().contains("timed out"), "{:?}", held.servers[0]);
        let gone = hold_primary(&held.primary, lost(), &mut missed);
        assert_eq!(gone.primary, Primary::None);
        assert_eq!(gone.servers[0].role, Role::Unreachable);
        // Back after a single miss: the count starts again.
        let mut missed = 1;
        let back = decide(&[(a(1), primary()), (a(2), replica(true, true, Some(0)))], MAX, 3);
        let back = hold_primary(&Primary::One(a(1)), back, &mut missed);
        assert_eq!((back.primary, missed), (Primary::One(a(1)), 0));
    }

    #[test]
    fn a_primary_that_answers_read_only_or_another_writable_counts_at_once() {
        let mut missed = 0;
        let demoted = decide(&[(a(1), Ok(MysqlState { read_only: true, replication: None }))], MAX, 2);
        assert_eq!(hold_primary(&Primary::One(a(1)), demoted, &mut missed).primary, Primary::None);
        // The old primary's check failed, and the operator promoted the other: follow it now.
        let promoted = decide(&[(a(1), Err("timed out".into())), (a(2), primary())], MAX, 2);
        assert_eq!(hold_primary(&Primary::One(a(1)), promoted, &mut missed).primary, Primary::One(a(2)));
    }

    #[test]
    fn split_brain_refuses_and_names_both() {
        let d = decide(&[(a(1), primary()), (a(2), Ok(MysqlState { read_only: false, replication: None }))], MAX, 1);
        assert_eq!(d.primary, Primary::Several(vec![a(1), a(2)]));
        assert!(d.servers.iter().all(|s| s.role == Role::Writable));
        let msg = d.primary.refusal("main").unwrap();
        assert!(
            msg.contains("split brain in cluster main") && msg.contains("127.0.0.1:1") && msg.contains("127.0.0.1:2"),
            "{msg}"
        );
    }

    #[test]
    fn lagging_stopped_or_unknown_lag_replicas_leave_the_read_pool() {
        let d = decide(
            &[
                (a(1), primary()),
                (a(2), replica(true, true, Some(6))),
                (a(3), replica(true, false, Some(0))),
                (a(4), replica(false, true, None)),
                (a(5), replica(true, true, None)),
                (a(6), replica(true, true, Some(2))),
            ],
            MAX,
            1,
        );
        let eligible: Vec<_> = d.servers.iter().map(|s| s.ro_eligible).collect();
        assert_eq!(eligible, [false, false, false, false, false, true]);
        assert!(d.servers[1].note.as_deref().unwrap().contains("over max_lag"));
        assert!(d.servers[2].note.as_deref().unwrap().contains("SQL thread stopped"));
        assert!(d.servers[3].note.as_deref().unwrap().contains("IO thread stopped"));
    }

    #[test]
    fn before_the_first_round_nothing_is_known() {
        let d = Decision::unknown(&[a(1)]);
        assert_eq!(d.round, 0);
        assert!(d.primary.refusal("main").is_some());
        assert!(d.has_server(a(1)) && !d.has_server(a(2)));
    }
}
