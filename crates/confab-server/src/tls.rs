//! TLS for both listeners (rustls, with the `ring` provider). The
//! certificate is resolved per handshake from a slot that [`Tls::reload`]
//! replaces, so a new certificate applies to new connections at once and
//! open connections keep theirs.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use tokio_rustls::rustls::crypto::ring::default_provider;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

/// Where the certificate chain and its key are, in PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
#[error("TLS: {0}")]
pub struct TlsError(String);

pub(crate) struct Tls {
    pub(crate) acceptor: TlsAcceptor,
    slot: Arc<CertSlot>,
}

#[derive(Debug)]
struct CertSlot(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for CertSlot {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().expect("cert slot poisoned").clone())
    }
}

impl Tls {
    pub(crate) fn new(files: &TlsFiles) -> Result<Tls, TlsError> {
        let slot = Arc::new(CertSlot(RwLock::new(Arc::new(load(files)?))));
        let mut config = ServerConfig::builder_with_provider(Arc::new(default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(slot.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Tls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            slot,
        })
    }

    /// Read the files (again) and use them for new connections. On an
    /// error the certificate in use stays.
    pub(crate) fn reload(&self, files: &TlsFiles) -> Result<(), TlsError> {
        let fresh = load(files)?;
        *self.slot.0.write().expect("cert slot poisoned") = Arc::new(fresh);
        Ok(())
    }
}

fn load(files: &TlsFiles) -> Result<CertifiedKey, TlsError> {
    let read_err = |path: &Path, e: &dyn std::fmt::Display| {
        TlsError(format!("reading {}: {e}", path.display()))
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| read_err(&files.cert, &e))?
        .collect::<Result<_, _>>()
        .map_err(|e| read_err(&files.cert, &e))?;
    if certs.is_empty() {
        return Err(TlsError(format!(
            "{} holds no certificate",
            files.cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| read_err(&files.key, &e))?;
    let signing_key = default_provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError(format!("{}: {e}", files.key.display())))?;
    let certified = CertifiedKey::new(certs, signing_key);
    certified
        .keys_match()
        .map_err(|e| TlsError(format!("the key does not match the certificate: {e}")))?;
    Ok(certified)
}
