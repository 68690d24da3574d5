//! The signing keys in force: the active key that signs, and every key a verifier may meet.

use std::sync::Arc;
use std::time::Duration;

use super::{AuthorityError, Settings, now};
use crate::audit::AuditRecord;
use crate::keys::{HardwareSigner, KeyBackend};
use crate::store::{SigningKeyRow, Store, WriteOp};
use crate::token::{Jwk, JwkSet, Verifier, VerifierConfig};

/// A key as published in the JWKS and `/v1/keys`.
#[derive(Debug, Clone)]
pub struct PublishedKey {
    pub row: SigningKeyRow,
    pub jwk: Jwk,
}

/// The active signing key.
#[derive(Debug, Clone)]
pub struct ActiveKey {
    pub kid: String,
    pub uri: String,
    pub signer: HardwareSigner,
}

/// Published keys plus the active one, and a verifier over them.
pub struct KeyRing {
    pub active: ActiveKey,
    pub published: Vec<PublishedKey>,
    pub jwks: JwkSet,
    /// Verifier over the published keys; `iss` and `aud` are checked by the caller.
    pub verifier: Verifier,
}

impl KeyRing {
    /// Reads the keys from the store and checks each published one against the device: the
    /// device must hold the key and its public key must be the recorded one.
    pub async fn load(store: &Store, backend: &Arc<dyn KeyBackend>) -> Result<KeyRing, AuthorityError> {
        let rows = store.signing_keys().await?;
        let mut published = Vec::new();
        let mut active = None;
        for row in rows
            .into_iter()
            .filter(|r| matches!(r.state.as_str(), "next" | "active" | "retiring"))
        {
            let jwk: Jwk = serde_json::from_str(&row.jwk)
                .map_err(|e| AuthorityError::Internal(format!("stored JWK of {}: {e}", row.kid)))?;
            let (b, uri) = (backend.clone(), row.uri.clone());
            let info = tokio::task::spawn_blocking(move || b.find_key(&uri))
                .await
                .map_err(|e| AuthorityError::Internal(e.to_string()))??;
            if Jwk::from_public_key(&info.public_key) != jwk {
                return Err(AuthorityError::Internal(format!(
                    "key {} on the device does not match the recorded public key {}",
                    row.uri, row.kid
                )));
            }
            if row.state == "active" {
                active = Some(ActiveKey {
                    kid: row.kid.clone(),
                    uri: row.uri.clone(),
                    signer: HardwareSigner::new(backend.clone(), row.uri.clone(), &info.public_key),
                });
            }
            published.push(PublishedKey { row, jwk });
        }
        let active = active.ok_or_else(|| {
            AuthorityError::Internal("no active signing key in the store; run `keygate init`".into())
        })?;
        let jwks = JwkSet {
            keys: published.iter().map(|k| k.jwk.clone()).collect(),
        };
        let verifier = Verifier::new(&jwks, VerifierConfig::new("", ""))
            .map_err(|e| AuthorityError::Internal(e.to_string()))?;
        Ok(KeyRing {
            active,
            published,
            jwks,
            verifier,
        })
    }
}

/// Makes sure there is an active signing key: when the store has none, generates one in the
/// device, has the device sign its CA certificate, and records it. Returns the kid and
/// whether it was created now.
pub async fn ensure_active_key(
    store: &Store,
    backend: &Arc<dyn KeyBackend>,
    settings: &Settings,
    actor: &str,
) -> Result<(String, bool), AuthorityError> {
    if let Some(k) = store
        .signing_keys()
        .await?
        .into_iter()
        .find(|k| k.state == "active")
    {
        return Ok((k.kid, false));
    }
    let mut row = generate_key(backend, settings).await?;
    row.state = "active".into();
    row.activated_at = Some(row.created_at);
    let kid = row.kid.clone();
    record_new_key(
        store,
        backend,
        row,
        Vec::new(),
        AuditRecord::new(actor, "key.create", &kid, "success", "local"),
    )
    .await?;
    Ok((kid, true))
}

/// Generates a P-256 key inside the device and has the device sign its self-signed CA
/// certificate. Returns its row, state `next`, not yet recorded.
pub(super) async fn generate_key(
    backend: &Arc<dyn KeyBackend>,
    settings: &Settings,
) -> Result<SigningKeyRow, AuthorityError> {
    let label = format!("root-{}", time_label());
    let b = backend.clone();
    let info = tokio::task::spawn_blocking(move || b.create_key(&label))
        .await
        .map_err(|e| AuthorityError::Internal(e.to_string()))??;
    let jwk = Jwk::from_public_key(&info.public_key);
    let kid = jwk.kid.clone().unwrap_or_default();
    let signer = HardwareSigner::new(backend.clone(), info.uri.clone(), &info.public_key);
    let mut subject = settings.ca_subject.clone();
    subject.common_name = format!("{} {}", subject.common_name, &kid[..16.min(kid.len())]);
    let lifetime = Duration::from_secs(settings.ca_lifetime_days.saturating_mul(86_400));
    let certificate =
        tokio::task::spawn_blocking(move || crate::x509::self_signed_ca(&signer, &subject, lifetime))
            .await
            .map_err(|e| AuthorityError::Internal(e.to_string()))?
            .map_err(|e| AuthorityError::Internal(e.to_string()));
    let certificate = match certificate {
        Ok(c) => c,
        Err(e) => {
            forget_device_key(backend, &info.uri).await;
            return Err(e);
        }
    };
    Ok(SigningKeyRow {
        kid,
        uri: info.uri.clone(),
        backend: backend.kind().into(),
        state: "next".into(),
        jwk: serde_json::to_string(&jwk).map_err(|e| AuthorityError::Internal(e.to_string()))?,
        certificate,
        created_at: now(),
        activated_at: None,
        retire_at: None,
        activate_at: None,
        destroyed_at: None,
    })
}

/// Records a freshly generated key (plus `more` ops, in the same transaction). When that
/// fails, the key is removed from the device again, so no unrecorded key is left behind.
pub(super) async fn record_new_key(
    store: &Store,
    backend: &Arc<dyn KeyBackend>,
    row: SigningKeyRow,
    more: Vec<WriteOp>,
    audit: AuditRecord,
) -> Result<(), AuthorityError> {
    let uri = row.uri.clone();
    let mut ops = vec![WriteOp::InsertSigningKey(row)];
    ops.extend(more);
    if let Err(e) = store.write(ops, audit).await {
        forget_device_key(backend, &uri).await;
        return Err(e.into());
    }
    Ok(())
}

async fn forget_device_key(backend: &Arc<dyn KeyBackend>, uri: &str) {
    let (b, u) = (backend.clone(), uri.to_owned());
    match tokio::task::spawn_blocking(move || b.destroy_key(&u)).await {
        Ok(Ok(())) => tracing::warn!(uri, "removed a key that could not be recorded"),
        _ => tracing::error!(uri, "a key that could not be recorded is still on the device"),
    }
}

fn time_label() -> String {
    let f = time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");
    time::OffsetDateTime::now_utc()
        .format(&f)
        .unwrap_or_else(|_| now().to_string())
}
