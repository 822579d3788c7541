//! PEM loading: certificate chains with their keys, and CA bundles. A leaf module: the config
//! checker (`check-config`) and the daemon's TLS both use it.

use std::{
    fmt,
    hash::{Hash, Hasher},
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{RootCertStore, crypto::CryptoProvider, sign::CertifiedKey};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{}: cannot read: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}: {msg}", path.display())]
    Cert { path: PathBuf, msg: String },
    #[error("{}: {msg}", path.display())]
    Key { path: PathBuf, msg: String },
    #[error("{}: {msg}", path.display())]
    Ca { path: PathBuf, msg: String },
}

/// The provider every TLS object of the daemon uses: aws-lc-rs with its default (modern) suites.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A certificate chain and its key, as loaded from disk.
pub struct LoadedCert {
    pub key: Arc<CertifiedKey>,
    /// Unix time of the end-entity certificate's notAfter.
    pub not_after: i64,
    pub subject: String,
    /// DNS names from subjectAltName (lower case; wildcards kept as `*.x`).
    pub dns_names: Vec<String>,
    /// Hash of the two files' contents: what a reload compares.
    pub content_hash: u64,
}

impl fmt::Debug for LoadedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedCert").field("subject", &self.subject).field("not_after", &self.not_after).finish()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, PkiError> {
    std::fs::read(path).map_err(|source| PkiError::Read { path: path.to_path_buf(), source })
}

pub(crate) fn content_hash(a: &[u8], b: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    a.hash(&mut h);
    b.hash(&mut h);
    h.finish()
}

/// Loads a PEM certificate chain (end-entity first) and its PEM private key.
pub fn load_certified_key(cert_path: &Path, key_path: &Path) -> Result<LoadedCert, PkiError> {
    let cert_pem = read(cert_path)?;
    let key_pem = read(key_path)?;
    parse_certified_key(cert_path, &cert_pem, key_path, &key_pem)
}

pub(crate) fn parse_certified_key(
    cert_path: &Path,
    cert_pem: &[u8],
    key_path: &Path,
    key_pem: &[u8],
) -> Result<LoadedCert, PkiError> {
    let cert_err = |msg: String| PkiError::Cert { path: cert_path.to_path_buf(), msg };
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_err(format!("bad PEM: {e}")))?;
    if chain.is_empty() {
        return Err(cert_err("no certificate found (expected PEM \"BEGIN CERTIFICATE\")".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| PkiError::Key { path: key_path.to_path_buf(), msg: format!("no usable private key: {e}") })?;
    let (_, x509) = x509_parser::parse_x509_certificate(&chain[0])
        .map_err(|e| cert_err(format!("cannot parse the certificate: {e}")))?;
    let not_after = x509.validity().not_after.timestamp();
    let subject = x509.subject().to_string();
    let mut dns_names = Vec::new();
    if let Ok(Some(san)) = x509.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                dns_names.push(d.to_ascii_lowercase());
            }
        }
    }
    let key = CertifiedKey::from_der(chain, key, &provider()).map_err(|e| PkiError::Key {
        path: key_path.to_path_buf(),
        msg: format!("does not fit {}: {e}", cert_path.display()),
    })?;
    Ok(LoadedCert { key: Arc::new(key), not_after, subject, dns_names, content_hash: content_hash(cert_pem, key_pem) })
}

/// Loads a PEM bundle of trust anchors.
pub fn load_ca(path: &Path) -> Result<RootCertStore, PkiError> {
    let pem = read(path)?;
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&pem) {
        let c = c.map_err(|e| PkiError::Ca { path: path.to_path_buf(), msg: format!("bad PEM: {e}") })?;
        roots.add(c).map_err(|e| PkiError::Ca { path: path.to_path_buf(), msg: format!("bad CA certificate: {e}") })?;
    }
    if roots.is_empty() {
        return Err(PkiError::Ca { path: path.to_path_buf(), msg: "no certificate found".into() });
    }
    Ok(roots)
}
