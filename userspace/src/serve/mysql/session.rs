//! The router's listeners and client sessions: pick the server (the primary for the read-write
//! port; for the read-only one the least-loaded healthy replica, else the primary, else any
//! reachable replica), connect, then copy bytes both
//! ways untouched until either side closes, the daemon stops, or the server stops being what the
//! session was routed to for longer than `demoted_grace`.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_util::sync::CancellationToken;

use super::{
    ClusterRt,
    metrics::PortLabels,
    packet::{ER_NO_SERVER, handshake_err},
    roles::{Decision, Primary, Role},
};
use crate::serve::Shared;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Port {
    ReadWrite,
    ReadOnly,
}

impl Port {
    fn label(self) -> &'static str {
        match self {
            Port::ReadWrite => "rw",
            Port::ReadOnly => "ro",
        }
    }
}

/// Each direction's copy buffer: HAProxy's `tune.bufsize`. tokio's default (8 KiB) splits every
/// result set between 8 and 16 KiB into two reads and two writes: under sysbench
/// `oltp_read_write` (three ranges of about 12.6 KiB per transaction) the session made 43.4 reads
/// and 43.4 writes per transaction where HAProxy made 40.4 of each (strace -c, one run of each).
/// Why not splice the sockets in the kernel instead (BPF sockmap, sk_skb verdict redirecting to
/// the peer's egress): measured on this kernel (6.18), no more transactions/s than this copy and
/// a worse p99, because each redirected message is sent by a kworker (one wake-up per message,
/// as here); and a stalled client made the kernel queue the server's whole result (no
/// backpressure), where this copy stops reading and the server's send buffer fills.
const COPY_BUF: usize = 16 * 1024;

/// Accepts MySQL clients on `listener` until `stop` is cancelled. The cluster is looked up by
/// this address in the generation current at each accept, so a reload that moves a port or
/// changes servers applies to the next connection.
pub async fn run_listener(shared: Arc<Shared>, listener: TcpListener, addr: SocketAddr, stop: CancellationToken) {
    loop {
        let (tcp, _peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    log::error!("mysql listener {addr}: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let Some((cluster, port)) = shared.current().mysql_for(addr) else { continue };
        // The session runs on a connection thread of its own (see serve/pinned.rs).
        let shared2 = shared.clone();
        shared.pinned.spawn(&shared.connections, tcp, move |tcp| session(shared2, cluster, port, tcp));
    }
}

/// Waits for the first discovery round of a cluster that has just started (bounded by two
/// intervals), so clients that connect at start-up are not refused for want of a check.
async fn first_decision(rx: &mut watch::Receiver<Arc<Decision>>, interval: Duration) -> Arc<Decision> {
    let _ = tokio::time::timeout(interval * 2, rx.wait_for(|d| d.round > 0)).await;
    rx.borrow_and_update().clone()
}

async fn refuse(shared: &Shared, cluster: &ClusterRt, port: Port, mut client: TcpStream, why: &str) {
    // The cluster's state (no primary, split brain) is logged once when it changes, and the
    // refusals are counted; one line per refused client would flood the log while it lasts.
    log::debug!("mysql {}: refused a {} connection: {why}", cluster.name, port.label());
    let l = PortLabels { cluster: cluster.name.clone(), port: port.label() };
    shared.metrics.mysql.refused.get_or_create(&l).inc();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = client.write_all(&handshake_err(ER_NO_SERVER, why)).await;
        let _ = client.shutdown().await;
    })
    .await;
}

async fn session(shared: Arc<Shared>, cluster: Arc<ClusterRt>, port: Port, client: TcpStream) {
    let mut rx = cluster.state.subscribe();
    let d = first_decision(&mut rx, cluster.cfg.check_interval.0).await;
    // The read pool's pick holds the replica's connection count (least connections) for as
    // long as the session lasts.
    let mut _pick = None;
    let target = match port {
        Port::ReadWrite => match &d.primary {
            Primary::One(a) => *a,
            p => {
                let why = p.refusal(&cluster.name).unwrap_or_default();
                return refuse(&shared, &cluster, port, client, &why).await;
            }
        },
        Port::ReadOnly => match cluster.read_pool.pick(None) {
            Some(g) => {
                let a = *g.data();
                _pick = Some(g);
                a
            }
            // No healthy replica: the primary; without one, a replica whose replication broke
            // (its source is gone) still answers reads, staler than max_lag allows.
            None => {
                match d.primary.addr().or_else(|| d.servers.iter().find(|s| s.role == Role::Replica).map(|s| s.addr)) {
                    Some(a) => a,
                    None => {
                        let why = format!("no reachable server in cluster {}", cluster.name);
                        return refuse(&shared, &cluster, port, client, &why).await;
                    }
                }
            }
        },
    };
    let connected = match tokio::time::timeout(cluster.probe_timeout(), TcpStream::connect(target)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("connect timed out".to_string()),
    };
    let server = match connected {
        Ok(s) => s,
        Err(e) => {
            let why = format!("cannot reach {target} in cluster {}: {e}", cluster.name);
            if cluster.state.first_connect_failure(target, d.round) {
                log::warn!("mysql {}: {why} (logged once per server until the next check)", cluster.name);
            } else {
                log::debug!("mysql {}: {why}", cluster.name);
            }
            return refuse(&shared, &cluster, port, client, &why).await;
        }
    };
    let _ = server.set_nodelay(true);
    let conns = cluster.state.conns(target);
    conns.fetch_add(1, Ordering::Relaxed);
    let grace = cluster.cfg.demoted_grace.0;
    let name = cluster.name.clone();
    // The session keeps no reference to its generation: a reload must not keep old ones alive.
    drop(cluster);
    let (mut client, mut server) = (client, server);
    tokio::select! {
        _ = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut server, COPY_BUF, COPY_BUF) => {}
        why = demoted(&mut rx, target, port, grace) => {
            log::warn!("mysql {name}: closing a {} session on {target}: {why}", port.label());
        }
    }
    conns.fetch_sub(1, Ordering::Relaxed);
}

/// Resolves when the session's server has stopped being what the session was routed to for
/// `grace` without a break: the primary (read-write port), or a server of the cluster at all
/// (both ports; a reload may remove it). Returns why.
async fn demoted(rx: &mut watch::Receiver<Arc<Decision>>, target: SocketAddr, port: Port, grace: Duration) -> String {
    let wrong = |d: &Decision| -> Option<String> {
        if !d.has_server(target) {
            return Some("the server was removed from the cluster".into());
        }
        if port == Port::ReadWrite && d.round > 0 && d.primary.addr() != Some(target) {
            return Some(match &d.primary {
                Primary::One(a) => format!("{a} is primary now"),
                _ => "it is no longer the primary".into(),
            });
        }
        None
    };
    loop {
        // Wait until the server is wrong for the session...
        let why = loop {
            if let Some(w) = wrong(&rx.borrow_and_update()) {
                break w;
            }
            if rx.changed().await.is_err() {
                // A reload removed the cluster: its servers are no longer the daemon's to route to.
                tokio::time::sleep(grace).await;
                return format!("the cluster was removed from the configuration (after demoted_grace {grace:?})");
            }
        };
        // ...and stays wrong for the grace period.
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return format!("{why} (after demoted_grace {grace:?})"),
                r = rx.changed() => {
                    if r.is_err() {
                        return format!("{why} (after demoted_grace {grace:?})");
                    }
                    if wrong(&rx.borrow_and_update()).is_none() {
                        break;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::time::timeout;

    use super::*;
    use crate::serve::mysql::roles::{Role, ServerView};

    fn a(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn decision(primary: Primary, servers: &[u16]) -> Arc<Decision> {
        let servers = servers
            .iter()
            .map(|&p| ServerView { addr: a(p), role: Role::Replica, lag: None, ro_eligible: true, note: None })
            .collect();
        Arc::new(Decision { servers, primary, round: 1 })
    }

    const GRACE: Duration = Duration::from_secs(2);

    #[tokio::test(start_paused = true)]
    async fn a_demoted_primary_session_closes_after_the_grace_unless_it_comes_back() {
        let (tx, mut rx) = watch::channel(decision(Primary::One(a(1)), &[1, 2]));
        let fut = demoted(&mut rx, a(1), Port::ReadWrite, GRACE);
        tokio::pin!(fut);
        assert!(timeout(Duration::from_secs(60), &mut fut).await.is_err(), "closed while primary");
        tx.send_replace(decision(Primary::One(a(2)), &[1, 2]));
        assert!(timeout(GRACE / 2, &mut fut).await.is_err(), "closed within the grace");
        // Primary again before the grace ran out: the session stays.
        tx.send_replace(decision(Primary::One(a(1)), &[1, 2]));
        assert!(timeout(GRACE * 5, &mut fut).await.is_err(), "closed after coming back");
        // No primary at all (killed, split brain) counts as demoted too.
        tx.send_replace(decision(Primary::None, &[1, 2]));
        let why = timeout(GRACE * 2, &mut fut).await.expect("still open after the grace");
        assert!(why.contains("no longer the primary") && why.contains("demoted_grace"), "{why}");
    }

    #[tokio::test(start_paused = true)]
    async fn read_only_sessions_close_only_when_their_server_or_cluster_goes() {
        let (tx, mut rx) = watch::channel(decision(Primary::One(a(1)), &[1, 2]));
        let fut = demoted(&mut rx, a(2), Port::ReadOnly, GRACE);
        tokio::pin!(fut);
        // A change of primary is nothing to a read-only session.
        tx.send_replace(decision(Primary::None, &[1, 2]));
        assert!(timeout(GRACE * 5, &mut fut).await.is_err());
        tx.send_replace(decision(Primary::One(a(1)), &[1]));
        let why = timeout(GRACE * 2, &mut fut).await.expect("open after its server left");
        assert!(why.contains("removed from the cluster"), "{why}");

        let (tx, mut rx) = watch::channel(decision(Primary::One(a(1)), &[1, 2]));
        let fut = demoted(&mut rx, a(2), Port::ReadOnly, GRACE);
        tokio::pin!(fut);
        assert!(timeout(GRACE, &mut fut).await.is_err());
        drop(tx);
        let why = timeout(GRACE * 2, &mut fut).await.expect("open after its cluster left");
        assert!(why.contains("cluster was removed"), "{why}");
    }
}
