//! `tls-bench`: rampart vs HAProxy vs nginx terminating TLS in front of one nginx backend, on
//! one machine, in one run (the binary is `src/bin/tls-bench.rs`; `cargo xtask bench tls`).
//!
//! [`procs`] runs and reaps child processes and reads CPU time; [`cgroup`] gives each contender
//! its CPU budget; [`contenders`] writes each server's config and starts it; [`clients`] drives load (wrk for keep-alive requests, a
//! rustls client for full handshakes) and parses the results; [`report`] prints markdown.

pub mod cgroup;
pub mod clients;
pub mod contenders;
pub mod instructions;
pub mod procs;
pub mod report;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{0} is not a loopback address; the bench only talks to 127.0.0.1")]
    NotLoopback(SocketAddr),
    #[error("{name} exited early ({status}); its log:\n{log}")]
    Died { name: String, status: String, log: String },
    #[error("{name} does not accept connections on {addr}; its log:\n{log}")]
    NotListening { name: String, addr: SocketAddr, log: String },
    #[error("required tool `{0}` not found (Debian: apt-get install wrk haproxy nginx-light util-linux)")]
    MissingTool(String),
    #[error("certificate generation: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("TLS client setup: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("cannot parse {tool} output ({what}):\n{output}")]
    Parse { tool: &'static str, what: &'static str, output: String },
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    #[error("{0}")]
    Msg(String),
}

impl BenchError {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        BenchError::Io { what: what.into(), source }
    }
}

/// The body the backend serves: 100 bytes, so every contender moves the same small response.
pub const BODY: &[u8] =
    b"rampart tls-bench backend body: one hundred bytes, served by nginx from a static file. 0123456789ab\n";
/// The path clients request.
pub const PATH: &str = "/bench.txt";

/// A scratch directory for configs, certificates and logs; removed on drop unless kept.
pub struct WorkDir {
    pub path: PathBuf,
    pub keep: bool,
}

impl WorkDir {
    pub fn new(keep: bool) -> Result<WorkDir, BenchError> {
        let path = std::env::temp_dir().join(format!("rampart-tls-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).map_err(|e| BenchError::io(format!("create {}", path.display()), e))?;
        Ok(WorkDir { path, keep })
    }

    pub fn sub(&self, name: &str) -> Result<PathBuf, BenchError> {
        let p = self.path.join(name);
        std::fs::create_dir_all(&p).map_err(|e| BenchError::io(format!("create {}", p.display()), e))?;
        Ok(p)
    }

    pub fn write(&self, rel: &str, content: impl AsRef<[u8]>) -> Result<PathBuf, BenchError> {
        write_file(&self.path.join(rel), content)
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

pub fn write_file(path: &Path, content: impl AsRef<[u8]>) -> Result<PathBuf, BenchError> {
    std::fs::write(path, content).map_err(|e| BenchError::io(format!("write {}", path.display()), e))?;
    Ok(path.to_path_buf())
}

/// The one certificate every contender serves: self-signed ECDSA P-256, made for this run.
pub struct BenchCert {
    pub cert_pem: PathBuf,
    pub key_pem: PathBuf,
    /// Certificate then key in one file, as HAProxy's `crt` wants it.
    pub combined_pem: PathBuf,
    /// What the handshake client pins.
    pub der: Vec<u8>,
}

impl BenchCert {
    pub fn generate(dir: &WorkDir) -> Result<BenchCert, BenchError> {
        let mut params =
            rcgen::CertificateParams::new(vec!["bench.rampart.test".to_string(), "127.0.0.1".to_string()])?;
        params.distinguished_name.push(rcgen::DnType::CommonName, "bench.rampart.test");
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let cert = params.self_signed(&key)?;
        let (c, k) = (cert.pem(), key.serialize_pem());
        Ok(BenchCert {
            cert_pem: dir.write("cert.pem", &c)?,
            key_pem: dir.write("key.pem", &k)?,
            combined_pem: dir.write("combined.pem", format!("{c}{k}"))?,
            der: cert.der().to_vec(),
        })
    }
}

/// Fails with a clear message when a program the bench needs is not installed.
pub fn require_tool(name: &str) -> Result<PathBuf, BenchError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path).chain(["/usr/sbin".into(), "/sbin".into()]) {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(BenchError::MissingTool(name.to_string()))
}
