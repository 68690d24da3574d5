//! Native TLS of the listener: rustls with aws-lc-rs, TLS 1.3 and 1.2 only, HTTP/1.1 by
//! ALPN, optional client certificates (mutual TLS), and certificate files picked up
//! without a restart: on SIGHUP, and when their modification time or size changes (checked
//! every few seconds). A reload that fails (a half-written file, a key that does not match)
//! keeps the configuration in force and logs why; connections already open keep theirs.

use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

/// How often the files are checked for changes.
const POLL: Duration = Duration::from_secs(5);

/// The TLS settings in force and where they come from.
pub struct Tls {
    files: TlsConfig,
    current: RwLock<Arc<ServerConfig>>,
    /// (modification time, length) of each file at the last load.
    stamp: Mutex<Vec<Option<(SystemTime, u64)>>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("files", &self.files).finish()
    }
}

impl Tls {
    /// Loads the files; the error is one line naming the file and what is wrong.
    pub fn load(files: &TlsConfig) -> Result<Arc<Tls>, String> {
        let stamp = stamps(files);
        let config = build(files)?;
        Ok(Arc::new(Tls {
            files: files.clone(),
            current: RwLock::new(Arc::new(config)),
            stamp: Mutex::new(stamp),
        }))
    }

    /// True when client certificates are required.
    pub fn mutual(&self) -> bool {
        self.files.client_ca_file.is_some()
    }

    /// An acceptor with the configuration in force now.
    pub fn acceptor(&self) -> TlsAcceptor {
        let cfg = match self.current.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        TlsAcceptor::from(cfg)
    }

    /// Reads the files again and puts them in force; on error the old ones stay.
    pub fn reload(&self) -> Result<(), String> {
        let stamp = stamps(&self.files);
        let config = build(&self.files)?;
        if let Ok(mut c) = self.current.write() {
            *c = Arc::new(config);
        }
        if let Ok(mut s) = self.stamp.lock() {
            *s = stamp;
        }
        Ok(())
    }

    fn changed(&self) -> bool {
        let now = stamps(&self.files);
        self.stamp.lock().map(|s| *s != now).unwrap_or(true)
    }

    fn reload_logged(&self, why: &str) {
        match self.reload() {
            Ok(()) => tracing::info!(why, cert = %self.files.cert_file.display(), "TLS certificate reloaded"),
            Err(e) => {
                tracing::error!(why, error = %e, "TLS reload failed; the previous certificate stays in force")
            }
        }
    }

    /// Reloads on SIGHUP and when a file changes, until the task is aborted.
    pub fn watch(self: Arc<Self>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            #[cfg(unix)]
            let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            let mut tick = tokio::time::interval(POLL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                #[cfg(unix)]
                let hangup = async {
                    match hup.as_mut() {
                        Some(h) => {
                            h.recv().await;
                        }
                        None => std::future::pending().await,
                    }
                };
                #[cfg(not(unix))]
                let hangup = std::future::pending::<()>();
                tokio::select! {
                    () = hangup => self.reload_logged("SIGHUP"),
                    _ = tick.tick() => {
                        if self.changed() {
                            self.reload_logged("files changed");
                        }
                    }
                }
            }
        })
    }
}

fn stamps(files: &TlsConfig) -> Vec<Option<(SystemTime, u64)>> {
    let paths = [
        Some(&files.cert_file),
        Some(&files.key_file),
        files.client_ca_file.as_ref(),
    ];
    paths
        .iter()
        .map(|p| {
            let m = std::fs::metadata((*p)?).ok()?;
            Some((m.modified().ok()?, m.len()))
        })
        .collect()
}

fn certificates(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let err = |e: &dyn std::fmt::Display| format!("{what} {}: {e}", path.display());
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(&e))?;
    if certs.is_empty() {
        return Err(err(&"no PEM certificate in it"));
    }
    Ok(certs)
}

/// The rustls configuration for `files`.
fn build(files: &TlsConfig) -> Result<ServerConfig, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let chain = certificates(&files.cert_file, "[tls] cert_file")?;
    // The key's own error text never quotes the key.
    let key = PrivateKeyDer::from_pem_file(&files.key_file)
        .map_err(|e| format!("[tls] key_file {}: {e}", files.key_file.display()))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS: {e}"))?;
    let builder = match &files.client_ca_file {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for c in certificates(path, "[tls] client_ca_file")? {
                roots
                    .add(c)
                    .map_err(|e| format!("[tls] client_ca_file {}: {e}", path.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("[tls] client_ca_file {}: {e}", path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        format!(
            "[tls] cert_file {} and key_file {}: {e}",
            files.cert_file.display(),
            files.key_file.display()
        )
    })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}
