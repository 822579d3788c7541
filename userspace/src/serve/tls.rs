//! TLS for the listeners (rustls with aws-lc-rs): certificates chosen by SNI, reloaded when
//! their files change, session tickets with key rotation; and the client side for https://
//! backends.

use std::{
    collections::HashMap,
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use arc_swap::ArcSwap;
use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    server::{ClientHello, ProducesTickets, ResolvesServerCert, ServerSessionMemoryCache},
    sign::CertifiedKey,
};
use rustls_pki_types::CertificateDer;

use super::metrics::{CertLabels, Metrics};
use crate::{
    config,
    pki::{LoadedCert, PkiError, content_hash, load_ca, load_certified_key, parse_certified_key, provider},
};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
}

/// One configured certificate, hot-swappable.
struct Slot {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: ArcSwap<LoadedCert>,
    /// (cert, key) (mtime, len) seen at the last poll, and the hash of the last content that
    /// failed to load (so that a broken file is logged once, not every second).
    seen: Mutex<(Option<FileStamp>, Option<FileStamp>, Option<u64>)>,
}

type FileStamp = (SystemTime, u64);

fn stamp(p: &Path) -> Option<FileStamp> {
    let m = std::fs::metadata(p).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// The certificates of one listener, resolved by SNI.
pub struct CertStore {
    listener: String,
    slots: Vec<Slot>,
    default: usize,
    /// Configured names: exact (`a.example.com`) and wildcard suffixes (`example.com` for
    /// `*.example.com`).
    exact: HashMap<String, usize>,
    wildcard: HashMap<String, usize>,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore").field("listener", &self.listener).field("certs", &self.slots.len()).finish()
    }
}

impl CertStore {
    pub fn load(
        listener: &str,
        entries: &[config::CertEntry],
        base: &Path,
        cfg: &config::Config,
    ) -> Result<Self, TlsError> {
        let mut slots = Vec::new();
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        let mut default = None;
        for (i, e) in entries.iter().enumerate() {
            let cert_path = cfg.resolve(base, e.cert.get_ref());
            let key_path = cfg.resolve(base, e.key.get_ref());
            let loaded = load_certified_key(&cert_path, &key_path)?;
            if e.names.is_empty() && default.is_none() {
                default = Some(i);
            }
            for n in &e.names {
                let n = n.get_ref().to_ascii_lowercase();
                match n.strip_prefix("*.") {
                    Some(suffix) => wildcard.insert(suffix.to_string(), i),
                    None => exact.insert(n, i),
                };
            }
            let seen = (stamp(&cert_path), stamp(&key_path), None);
            slots.push(Slot { cert_path, key_path, current: ArcSwap::from_pointee(loaded), seen: Mutex::new(seen) });
        }
        Ok(CertStore { listener: listener.to_string(), slots, default: default.unwrap_or(0), exact, wildcard })
    }

    fn pick(&self, sni: Option<&str>) -> usize {
        let Some(name) = sni.map(str::to_ascii_lowercase) else { return self.default };
        if let Some(&i) = self.exact.get(&name) {
            return i;
        }
        let parent = name.split_once('.').map(|(_, p)| p);
        if let Some(&i) = parent.and_then(|p| self.wildcard.get(p)) {
            return i;
        }
        // Then the names the certificates carry themselves.
        for (i, s) in self.slots.iter().enumerate() {
            let cur = s.current.load();
            let hit = cur.dns_names.iter().any(|d| match d.strip_prefix("*.") {
                Some(suffix) => parent == Some(suffix),
                None => *d == name,
            });
            if hit {
                return i;
            }
        }
        self.default
    }

    /// Subject of the certificate a client asking for `sni` gets (for logs and tests).
    pub fn subject_for(&self, sni: Option<&str>) -> String {
        self.slots[self.pick(sni)].current.load().subject.clone()
    }

    /// Re-reads certificates whose files changed. A pair that fails to load leaves the last
    /// good one in place and is logged once per content.
    pub fn poll(&self) {
        for s in &self.slots {
            let (c, k) = (stamp(&s.cert_path), stamp(&s.key_path));
            let mut seen = s.seen.lock().unwrap_or_else(|p| p.into_inner());
            if seen.0 == c && seen.1 == k {
                continue;
            }
            seen.0 = c;
            seen.1 = k;
            let (Ok(cert_pem), Ok(key_pem)) = (std::fs::read(&s.cert_path), std::fs::read(&s.key_path)) else {
                log::error!(
                    "listener {}: cannot read {} or {}; keeping the loaded certificate",
                    self.listener,
                    s.cert_path.display(),
                    s.key_path.display()
                );
                continue;
            };
            let hash = content_hash(&cert_pem, &key_pem);
            if hash == s.current.load().content_hash || seen.2 == Some(hash) {
                continue;
            }
            match parse_certified_key(&s.cert_path, &cert_pem, &s.key_path, &key_pem) {
                Ok(new) => {
                    log::info!(
                        "listener {}: reloaded {} ({}, expires at unix time {})",
                        self.listener,
                        s.cert_path.display(),
                        new.subject,
                        new.not_after
                    );
                    s.current.store(Arc::new(new));
                    seen.2 = None;
                }
                Err(e) => {
                    log::error!("listener {}: {e}; keeping the last good certificate", self.listener);
                    seen.2 = Some(hash);
                }
            }
        }
    }

    /// Sets the expiry gauges (seconds until notAfter, negative once expired).
    pub fn update_expiry(&self, metrics: &Metrics) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
        for s in &self.slots {
            let labels = CertLabels { listener: self.listener.clone(), cert: s.cert_path.display().to_string() };
            metrics.cert_expiry.get_or_create(&labels).set(s.current.load().not_after as f64 - now);
        }
    }

    /// Each certificate in force: (file, subject, notAfter as Unix time).
    pub fn certificates(&self) -> Vec<(String, String, i64)> {
        self.slots
            .iter()
            .map(|s| {
                let c = s.current.load();
                (s.cert_path.display().to_string(), c.subject.clone(), c.not_after)
            })
            .collect()
    }

    pub fn cert_labels(&self) -> Vec<CertLabels> {
        self.slots
            .iter()
            .map(|s| CertLabels { listener: self.listener.clone(), cert: s.cert_path.display().to_string() })
            .collect()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let i = self.pick(hello.server_name());
        Some(self.slots[i].current.load().key.clone())
    }
}

/// Session tickets whose key changes every `rotation`; tickets made with the previous key are
/// still accepted, so a ticket lives at most twice `rotation`.
pub struct RotatingTicketer {
    rotation: Duration,
    state: RwLock<TicketKeys>,
}

struct TicketKeys {
    current: Arc<dyn ProducesTickets>,
    previous: Option<Arc<dyn ProducesTickets>>,
    since: std::time::Instant,
}

impl fmt::Debug for RotatingTicketer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RotatingTicketer").field("rotation", &self.rotation).finish()
    }
}

impl RotatingTicketer {
    pub fn new(rotation: Duration) -> Result<Self, TlsError> {
        // Each key is rustls's RFC 5077 ticketer (AES-256-CBC + HMAC-SHA256, random keys); ours
        // only decides when a fresh one takes over (rustls fixes its own period at 6 h, which
        // the config caps `session_ticket_rotation` to).
        let current = rustls::crypto::aws_lc_rs::Ticketer::new()?;
        Ok(RotatingTicketer {
            rotation,
            state: RwLock::new(TicketKeys { current, previous: None, since: std::time::Instant::now() }),
        })
    }

    fn keys(&self) -> std::sync::RwLockReadGuard<'_, TicketKeys> {
        {
            let r = self.state.read().unwrap_or_else(|p| p.into_inner());
            if r.since.elapsed() < self.rotation {
                return r;
            }
        }
        {
            let mut w = self.state.write().unwrap_or_else(|p| p.into_inner());
            if w.since.elapsed() >= self.rotation {
                match rustls::crypto::aws_lc_rs::Ticketer::new() {
                    Ok(fresh) => {
                        let old = std::mem::replace(&mut w.current, fresh);
                        w.previous = Some(old);
                        w.since = std::time::Instant::now();
                        log::debug!("session ticket key rotated");
                    }
                    Err(e) => log::error!("cannot make a new session ticket key: {e}"),
                }
            }
        }
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }
}

impl ProducesTickets for RotatingTicketer {
    fn enabled(&self) -> bool {
        true
    }
    fn lifetime(&self) -> u32 {
        u32::try_from(self.rotation.as_secs().saturating_mul(2)).unwrap_or(u32::MAX)
    }
    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.keys().current.encrypt(plain)
    }
    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        let k = self.keys();
        k.current.decrypt(cipher).or_else(|| k.previous.as_ref().and_then(|p| p.decrypt(cipher)))
    }
}

/// The rustls server config of one listener: TLS 1.3 and 1.2, ALPN h2 and http/1.1.
pub fn server_config(
    certs: Arc<CertStore>,
    ticketer: Arc<dyn ProducesTickets>,
    sessions: Arc<ServerSessionMemoryCache>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    cfg.ticketer = ticketer;
    cfg.session_storage = sessions;
    Ok(Arc::new(cfg))
}

/// The rustls client config for a pool's https:// backends.
pub fn client_config(ca: Option<&Path>, verify: bool) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let mut cfg = if verify {
        let roots = match ca {
            Some(p) => load_ca(p)?,
            None => {
                let mut roots = RootCertStore::empty();
                let found = rustls_native_certs::load_native_certs();
                for e in &found.errors {
                    log::warn!("system CA store: {e}");
                }
                roots.add_parsable_certificates(found.certs);
                roots
            }
        };
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        builder.dangerous().with_custom_certificate_verifier(Arc::new(NoVerify(provider()))).with_no_client_auth()
    };
    // Backends are spoken to in HTTP/1.1.
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Accepts any backend certificate (pool `tls_verify = false`); signatures are still checked so
/// the handshake itself stays sound.
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotating_ticketer_accepts_previous_key() {
        let t = RotatingTicketer::new(Duration::from_millis(1)).unwrap();
        let ticket = t.encrypt(b"session").unwrap();
        std::thread::sleep(Duration::from_millis(5));
        // First use after the period rotates: the old ticket still opens.
        let again = t.encrypt(b"other").unwrap();
        assert_eq!(t.decrypt(&ticket).as_deref(), Some(&b"session"[..]));
        assert_eq!(t.decrypt(&again).as_deref(), Some(&b"other"[..]));
        std::thread::sleep(Duration::from_millis(5));
        let _ = t.encrypt(b"x");
        // Two rotations later the first key is gone.
        assert_eq!(t.decrypt(&ticket), None);
    }
}
