//! `keygate serve`: open the backend, store and authority, and serve HTTP.

use std::sync::Arc;

use anyhow::Context;

use crate::api::{self, AppState};
use crate::authority::{Authority, Settings};
use crate::config::{BackendKind, Config};
use crate::keys::KeyBackend;
use crate::keys::KeyError;
use crate::keys::pkcs11::Pkcs11Backend;
use crate::keys::tpm::TpmBackend;
use crate::store::Store;

/// Everything `serve` runs, built but not yet listening (tests drive the router directly).
pub struct Service {
    pub router: axum::Router,
    pub authority: Arc<Authority>,
    pub backend: Arc<dyn KeyBackend>,
    /// The same backend when it is PKCS#11 (tests inspect the token through it).
    pub pkcs11: Option<Arc<Pkcs11Backend>>,
}

/// An opened backend, and the same one as PKCS#11 when it is that (for tests).
pub type OpenedBackend = (Arc<dyn KeyBackend>, Option<Arc<Pkcs11Backend>>);

/// The configured key backend, opened (this blocks on the device). `sessions` overrides the
/// PKCS#11 pool size (`keygate bench`); a TPM runs one command at a time anyway.
pub fn open_backend_blocking(config: &Config, sessions: Option<usize>) -> Result<OpenedBackend, KeyError> {
    match config.backend {
        BackendKind::Pkcs11 => {
            let mut pk = config.pkcs11();
            if let Some(n) = sessions {
                pk.sessions = n;
            }
            let b = Arc::new(Pkcs11Backend::open(&pk)?);
            Ok((b.clone(), Some(b)))
        }
        BackendKind::Tpm => {
            let t = config
                .tpm
                .as_ref()
                .ok_or_else(|| KeyError::Config("backend = \"tpm\" needs a [tpm] table".into()))?;
            Ok((Arc::new(TpmBackend::open(t)?), None))
        }
    }
}

/// [`open_backend_blocking`] on a blocking thread.
pub async fn open_backend(config: &Config, sessions: Option<usize>) -> anyhow::Result<OpenedBackend> {
    let config = config.clone();
    Ok(tokio::task::spawn_blocking(move || open_backend_blocking(&config, sessions)).await??)
}

/// Opens the key backend (a wrong PIN, a missing module or TPM, an unknown token fail here
/// with one line), the store and the key ring.
pub async fn build_service(config: &Config) -> anyhow::Result<Service> {
    build_service_with(config, None).await
}

/// [`build_service`] with the PKCS#11 pool size overridden.
pub async fn build_service_with(config: &Config, sessions: Option<usize>) -> anyhow::Result<Service> {
    let (backend, pkcs11) = open_backend(config, sessions).await?;
    if backend.is_simulator() {
        let name = if backend.kind() == "tpm" {
            "swtpm"
        } else {
            "SoftHSM2"
        };
        tracing::warn!(
            backend = backend.kind(),
            "the key backend is {name}, a software simulator: keys are NOT protected by hardware; use it for development and tests only"
        );
    }
    let store = Store::open(&config.store_options()?).await?;
    let settings = Settings::from_config(config).context("cannot load the enrollment settings")?;
    // A replica joining an initialised deployment with a device of its own (its TPM) makes
    // that device's first key; on a shared PKCS#11 token the key is there already.
    if !store.signing_keys().await?.is_empty() {
        let (kid, created) = crate::authority::ensure_active_key(&store, &backend, &settings, "serve")
            .await
            .context("cannot make this device's signing key")?;
        if created {
            tracing::warn!(kid = %kid, "created the first signing key of this replica's device; verifiers that cached the JWKS learn it at their next fetch");
        }
    }
    let authority = Arc::new(
        Authority::open(store, backend.clone(), settings)
            .await
            .context("cannot load signing keys")?,
    );
    let ring = authority.key_ring();
    tracing::info!(backend = backend.kind(), kid = %ring.active.kid, uri = %ring.active.uri, "signing key ready");
    let state = AppState {
        authority: authority.clone(),
        base_url: config.public_base_url(),
        metrics: api::metrics_handle(),
        source_limit: api::limit::SourceLimit::new(
            config.http.per_source_per_second,
            config.http.per_source_burst,
        ),
    };
    Ok(Service {
        router: api::router(state),
        authority,
        backend,
        pkcs11,
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutting down");
}

/// Runs the service until SIGINT or SIGTERM. On the embedded defaults, a data folder that
/// was never initialised is initialised first (and the admin token printed once).
pub async fn serve(config: Config) -> anyhow::Result<()> {
    // The embedded defaults initialise themselves on first start. A shared database is
    // initialised once, by `keygate init` on any replica.
    if config.is_embedded() && config.store.url.is_none() && !config.data_dir.join("keygate.db").exists() {
        super::init(&config, false).await?.report();
    }
    let store_url = crate::store::StoreUrl::parse(&config.store_url())?;
    if let Some(path) = store_url.sqlite_path()
        && !std::path::Path::new(path).exists()
    {
        anyhow::bail!(
            "no keygate database at {path}: this data folder was never initialised; run `keygate init` first (with the same configuration)"
        );
    }
    super::init::private_files(&config.data_dir);
    let _single = store_url.lock_single_server()?;
    // TLS files first: a bad certificate stops the start before the device is opened.
    let tls = match &config.tls {
        Some(files) => Some(crate::api::tls::Tls::load(files).map_err(|e| anyhow::anyhow!(e))?),
        None => {
            if !config.listen.ip().is_loopback() {
                tracing::warn!(
                    listen = %config.listen,
                    "LISTENING WITHOUT TLS on a non-loopback address: API tokens and provisioning tokens cross the network in clear; set [tls] (KEYGATE_TLS_CERT, KEYGATE_TLS_KEY) or keep keygate behind a TLS proxy"
                );
            }
            None
        }
    };
    let service = build_service(&config).await?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    tracing::info!(
        listen = %config.listen,
        issuer = %config.issuer(),
        store = %service.authority.store().url(),
        device = %service.authority.device(),
        tls = tls.as_ref().map(|t| if t.mutual() { "mutual" } else { "on" }).unwrap_or("off"),
        "keygate listening"
    );
    let periodic = super::periodic::start(service.authority.clone(), &config);
    let authority = service.authority.clone();
    let limits = crate::api::server::Limits::from_config(&config.http);
    let reload = tls.clone().map(|t| t.watch());
    tracing::info!(
        max_connections = limits.max_connections,
        header_read_timeout_s = limits.header_read_timeout.as_secs(),
        request_timeout_s = limits.request_timeout.as_secs(),
        "connection limits"
    );
    crate::api::server::serve(listener, service.router, limits, tls, async move {
        shutdown_signal().await;
        // Open event streams would hold the graceful shutdown forever.
        authority.close_streams();
    })
    .await;
    periodic.abort();
    if let Some(r) = reload {
        r.abort();
    }
    crate::api::flush_failure_lines(true);
    service.authority.flush_refusals(true).await;
    if let Err(e) = service.authority.checkpoint_audit().await {
        tracing::error!(error = %e, "cannot sign the audit checkpoint at shutdown");
    }
    Ok(())
}
