//! TLS on the client port: rustls, ALPN offering `h2` and `http/1.1`, certificates re-read
//! without a restart.
//!
//! Invariants: the certificate and key are read from PEM files at start-up (a bad file stops
//! start-up, naming the setting); afterwards they are re-read on SIGHUP and whenever either
//! file's modification time changes (checked every 2 s), so a cert-manager rotation needs no
//! restart. A reload that fails keeps the previous certificate, logs why, and is retried at
//! every check until it succeeds (a rotation caught half-written heals by itself).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{crypto, ServerConfig};

/// The current TLS configuration, swapped atomically on reload.
#[derive(Clone)]
pub struct Tls {
    current: Arc<RwLock<Arc<ServerConfig>>>,
    cert: PathBuf,
    key: PathBuf,
}

/// Builds a server configuration from PEM files.
pub fn load(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, String> {
    let cert_pem =
        std::fs::read(cert).map_err(|e| format!("cannot read {}: {e}", cert.display()))?;
    let key_pem = std::fs::read(key).map_err(|e| format!("cannot read {}: {e}", key.display()))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: not a PEM certificate chain: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate in the file", cert.display()));
    }
    let private = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| format!("{}: not a PEM private key: {e}", key.display()))?;
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(chain, private)
            .map_err(|e| format!("the certificate and key do not fit together: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn mtimes(cert: &Path, key: &Path) -> (Option<SystemTime>, Option<SystemTime>) {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    (m(cert), m(key))
}

impl Tls {
    /// Loads the files now; the error names what is wrong with them.
    pub fn new(cert: PathBuf, key: PathBuf) -> Result<Self, String> {
        let config = load(&cert, &key)?;
        Ok(Self {
            current: Arc::new(RwLock::new(config)),
            cert,
            key,
        })
    }

    /// The acceptor for a new connection.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let config = self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        tokio_rustls::TlsAcceptor::from(config)
    }

    /// Whether the files loaded.
    fn reload(&self, why: &str) -> bool {
        match load(&self.cert, &self.key) {
            Ok(config) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = config;
                tracing::info!(why, cert = %self.cert.display(), "TLS certificate reloaded");
                true
            }
            Err(e) => {
                tracing::warn!(
                    why,
                    "TLS certificate reload failed, keeping the previous one and retrying every 2 s: {e} (check SSE_GATEWAY_TLS_CERT_FILE / SSE_GATEWAY_TLS_KEY_FILE)"
                );
                false
            }
        }
    }

    /// Re-reads the files on SIGHUP and when they change.
    pub fn spawn_reloader(&self) {
        let tls = self.clone();
        tokio::spawn(async move {
            let mut hup =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            let mut seen = mtimes(&tls.cert, &tls.key);
            let mut failing = false;
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            loop {
                tokio::select! {
                    _ = async {
                        match hup.as_mut() {
                            Some(h) => { h.recv().await; }
                            None => std::future::pending::<()>().await,
                        }
                    } => {
                        seen = mtimes(&tls.cert, &tls.key);
                        failing = !tls.reload("SIGHUP");
                    }
                    _ = tick.tick() => {
                        let now = mtimes(&tls.cert, &tls.key);
                        if now != seen || failing {
                            seen = now;
                            failing = !tls.reload(if failing { "retry" } else { "files changed" });
                        }
                    }
                }
            }
        });
    }
}
