//! `keygate serve`: open the backend, store and authority, and serve HTTP.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;

use crate::api::{self, AppState};
use crate::authority::{Authority, Settings};
use crate::config::Config;
use crate::keys::KeyBackend;
use crate::keys::pkcs11::Pkcs11Backend;
use crate::store::Store;

/// Everything `serve` runs, built but not yet listening (tests drive the router directly).
pub struct Service {
    pub router: axum::Router,
    pub authority: Arc<Authority>,
    pub backend: Arc<Pkcs11Backend>,
}

/// Opens the key backend (a wrong PIN, a missing module or an unknown token fail here with
/// one line), the store and the key ring.
pub async fn build_service(config: &Config) -> anyhow::Result<Service> {
    let pk = config.pkcs11();
    let backend = Arc::new(tokio::task::spawn_blocking(move || Pkcs11Backend::open(&pk)).await??);
    if backend.is_simulator() {
        tracing::warn!(
            backend = "pkcs11",
            "the key backend is SoftHSM2, a software simulator: keys are NOT protected by hardware; use it for development and tests only"
        );
    }
    let store = Store::open(
        &config.store_url(),
        config.store.synchronous == crate::config::Synchronous::Full,
    )
    .await?;
    let dyn_backend: Arc<dyn KeyBackend> = backend.clone();
    let authority = Arc::new(
        Authority::open(store, dyn_backend, Settings::from_config(config))
            .await
            .context("cannot load signing keys")?,
    );
    let ring = authority.key_ring();
    tracing::info!(backend = backend.kind(), kid = %ring.active.kid, uri = %ring.active.uri, "signing key ready");
    let state = AppState {
        authority: authority.clone(),
        base_url: config.public_base_url(),
        metrics: api::metrics_handle(),
    };
    Ok(Service {
        router: api::router(state),
        authority,
        backend,
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
    if config.is_embedded() && !config.data_dir.join("keygate.db").exists() {
        super::init(&config, false).await?.report();
    }
    let service = build_service(&config).await?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    tracing::info!(listen = %config.listen, issuer = %config.issuer(), "keygate listening");
    axum::serve(
        listener,
        service.router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown_signal())
    .await
    .context("server failed")?;
    Ok(())
}
