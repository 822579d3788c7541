//! Real MariaDB servers (Debian's `mariadbd`) for the MySQL router's tests, `cargo xtask bench
//! mysql` and the demo.
//!
//! [`install`] makes a data directory with `mariadb-install-db` (seconds); [`Server::start`]
//! copies one for each server (milliseconds), starts `mariadbd` on an address of its own (in a
//! network namespace when asked) and waits until it answers. Root's SQL goes over the server's
//! Unix socket, a file path, so it works from any network namespace. [`Server::replicate_from`]
//! and [`Server::wait_caught_up`] set up and follow GTID replication. A server is killed when
//! dropped.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot run {program}: {source} (Debian's mariadb-server and mariadb-client provide it)")]
    Spawn { program: &'static str, source: std::io::Error },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("mariadb-install-db into {dir}: {stderr}")]
    Install { dir: PathBuf, stderr: String },
    #[error("mariadbd {name} did not answer within {limit:?}:\n{log}")]
    NotReady { name: String, limit: Duration, log: String },
    #[error("{name}: `{query}`: {stderr}")]
    Sql { name: String, query: String, stderr: String },
    #[error("replica {name} did not reach {gtid} within {limit:?}: {status}")]
    Behind { name: String, gtid: String, limit: Duration, status: String },
}

/// Makes a fresh data directory at `datadir` (which must not exist) with `mariadb-install-db`:
/// root authenticates with a password (none yet) over the socket as well, no test database.
pub fn install(datadir: &Path) -> Result<(), Error> {
    let out = Command::new("mariadb-install-db")
        .args(["--no-defaults", "--user=root", "--auth-root-authentication-method=normal", "--skip-test-db"])
        .arg(format!("--datadir={}", datadir.display()))
        .output()
        .map_err(|source| Error::Spawn { program: "mariadb-install-db", source })?;
    if !out.status.success() {
        return Err(Error::Install {
            dir: datadir.to_path_buf(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(())
}

/// How to run one server.
#[derive(Clone, Debug)]
pub struct Options {
    /// Shown in errors.
    pub name: String,
    /// The server's own directory (created): data, socket, pid file, `stderr.log`.
    pub dir: PathBuf,
    pub bind: IpAddr,
    pub port: u16,
    /// Unique per server of a replication topology.
    pub server_id: u32,
    /// Runs `mariadbd` in this network namespace (`ip netns exec`).
    pub netns: Option<String>,
    /// Certificate and key files: the server offers TLS with them.
    pub tls: Option<(PathBuf, PathBuf)>,
    pub buffer_pool: String,
    pub max_connections: u32,
    /// More `mariadbd` arguments.
    pub extra: Vec<String>,
    /// An option file read first (`--defaults-file`, e.g. examples/stack/mariadb.cnf); the
    /// arguments above override it. `None`: `--no-defaults`, no option file at all.
    pub defaults_file: Option<PathBuf>,
}

impl Options {
    /// A server with the binary log and GTID strict mode on (either a primary or a replica
    /// that can be promoted), a small buffer pool, no name resolution.
    pub fn new(name: &str, dir: &Path, bind: IpAddr, port: u16, server_id: u32) -> Self {
        Options {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            bind,
            port,
            server_id,
            netns: None,
            tls: None,
            buffer_pool: "32M".to_string(),
            max_connections: 500,
            extra: Vec::new(),
            defaults_file: None,
        }
    }

    /// `mariadbd`'s arguments.
    pub fn args(&self) -> Vec<String> {
        let d = &self.dir;
        // mariadbd takes the option-file choice only as its first argument.
        let defaults = match &self.defaults_file {
            Some(f) => format!("--defaults-file={}", f.display()),
            None => "--no-defaults".into(),
        };
        let mut a: Vec<String> = vec![
            defaults,
            "--user=root".into(),
            format!("--datadir={}", d.display()),
            format!("--socket={}", d.join("sock").display()),
            format!("--pid-file={}", d.join("pid").display()),
            format!("--port={}", self.port),
            format!("--bind-address={}", self.bind),
            format!("--server-id={}", self.server_id),
            format!("--log-bin={}", d.join("bin").display()),
            "--gtid-strict-mode=1".into(),
            "--log-slave-updates=1".into(),
            "--skip-name-resolve".into(),
            format!("--innodb-buffer-pool-size={}", self.buffer_pool),
            format!("--max-connections={}", self.max_connections),
        ];
        if let Some((cert, key)) = &self.tls {
            a.push(format!("--ssl-cert={}", cert.display()));
            a.push(format!("--ssl-key={}", key.display()));
        }
        a.extend(self.extra.iter().cloned());
        a
    }
}

/// A running `mariadbd`; killed on drop.
pub struct Server {
    pub name: String,
    addr: SocketAddr,
    dir: PathBuf,
    child: Option<Child>,
}

/// How long a server may take to answer after it starts.
const START_LIMIT: Duration = Duration::from_secs(30);

impl Server {
    /// Copies the data directory `template` (made by [`install`]) to `opts.dir`, starts the
    /// server and waits (bounded: 30 s) until it answers on its socket.
    pub fn start(template: &Path, opts: &Options) -> Result<Server, Error> {
        let cp = Command::new("cp")
            .arg("-a")
            .arg(template)
            .arg(&opts.dir)
            .status()
            .map_err(|source| Error::Spawn { program: "cp", source })?;
        if !cp.success() {
            return Err(Error::Io {
                what: format!("copying {} to {}", template.display(), opts.dir.display()),
                source: std::io::Error::other(cp.to_string()),
            });
        }
        let log_path = opts.dir.join("stderr.log");
        let log = std::fs::File::create(&log_path)
            .map_err(|source| Error::Io { what: format!("creating {}", log_path.display()), source })?;
        let log2 = log.try_clone().map_err(|source| Error::Io { what: log_path.display().to_string(), source })?;
        let mut cmd = match &opts.netns {
            // `ip netns exec` execs the program: the child's pid is mariadbd's.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "mariadbd"]);
                c
            }
            None => Command::new("mariadbd"),
        };
        let child = cmd
            .args(opts.args())
            .stdin(Stdio::null())
            .stdout(log2)
            .stderr(log)
            .spawn()
            .map_err(|source| Error::Spawn { program: "mariadbd", source })?;
        let mut server = Server {
            name: opts.name.clone(),
            addr: SocketAddr::new(opts.bind, opts.port),
            dir: opts.dir.clone(),
            child: Some(child),
        };
        let t = Instant::now();
        while t.elapsed() < START_LIMIT {
            if server.try_sql("SELECT 1").is_ok() {
                return Ok(server);
            }
            if server.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_some()) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        server.kill();
        Err(Error::NotReady { name: opts.name.clone(), limit: START_LIMIT, log: server.log() })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("sock")
    }

    /// What the server wrote to stderr.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }

    /// The `mariadb` client as root over the server's own socket (not through any proxy), in
    /// batch mode without column names.
    pub fn client(&self) -> Command {
        let mut c = Command::new("mariadb");
        c.arg("--no-defaults").arg(format!("--socket={}", self.socket().display())).args(["-uroot", "-N", "-B"]);
        c
    }

    /// Runs `query` as root; its output, trimmed.
    pub fn try_sql(&self, query: &str) -> Result<String, Error> {
        let out =
            self.client().args(["-e", query]).output().map_err(|source| Error::Spawn { program: "mariadb", source })?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(Error::Sql {
                name: self.name.clone(),
                query: query.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            })
        }
    }

    /// Makes this server a read-only GTID replica of `primary` (the address it reaches it at),
    /// with the replication user `user`/`password`, which must exist on the primary.
    pub fn replicate_from(&self, primary: SocketAddr, user: &str, password: &str) -> Result<(), Error> {
        self.try_sql(&format!(
            "SET GLOBAL read_only=1; CHANGE MASTER TO MASTER_HOST='{}', MASTER_PORT={}, \
             MASTER_USER='{user}', MASTER_PASSWORD='{password}', MASTER_USE_GTID=slave_pos; START SLAVE;",
            primary.ip(),
            primary.port()
        ))
        .map(drop)
    }

    /// Waits (bounded by `limit`) until this replica has applied everything `primary` has
    /// logged so far.
    pub fn wait_caught_up(&self, primary: &Server, limit: Duration) -> Result<(), Error> {
        let gtid = primary.try_sql("SELECT @@global.gtid_binlog_pos")?;
        let r = self.try_sql(&format!("SELECT MASTER_GTID_WAIT('{gtid}', {})", limit.as_secs_f64()))?;
        if r == "0" {
            return Ok(());
        }
        let status = self.try_sql("SHOW SLAVE STATUS\\G").unwrap_or_else(|e| e.to_string());
        Err(Error::Behind { name: self.name.clone(), gtid, limit, status })
    }

    /// The process id of `mariadbd` while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server (SIGKILL, as a crash would) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_name_every_file_inside_the_servers_directory() {
        let mut o = Options::new("db-1", Path::new("/tmp/x/db-1"), [10, 0, 3, 41].into(), 3306, 7);
        o.tls = Some(("/c.pem".into(), "/k.pem".into()));
        let a = o.args();
        for want in [
            "--datadir=/tmp/x/db-1",
            "--socket=/tmp/x/db-1/sock",
            "--port=3306",
            "--bind-address=10.0.3.41",
            "--server-id=7",
            "--log-bin=/tmp/x/db-1/bin",
            "--ssl-cert=/c.pem",
        ] {
            assert!(a.iter().any(|x| x == want), "{want} not in {a:?}");
        }
        assert_eq!(a[0], "--no-defaults", "no option file of the machine may apply");
    }
}
