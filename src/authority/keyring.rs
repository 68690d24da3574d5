//! The signing keys in force: the active key that signs, and every key a verifier may meet.

use std::sync::Arc;
use std::time::Duration;

use super::{AuthorityError, Settings, now, random_bytes};
use crate::audit::AuditRecord;
use crate::keys::{HardwareSigner, KeyBackend};
use crate::store::{SigningKeyRow, Store, WriteOp};
use crate::token::{Jwk, JwkSet, Verifier, VerifierConfig};

/// A key as published in the JWKS and `/v1/keys`.
#[derive(Debug, Clone)]
pub struct PublishedKey {
    pub row: SigningKeyRow,
    pub jwk: Jwk,
    /// A signer for keys of this replica's device (its CA signs CRLs while it is
    /// published); none for other devices' keys.
    pub signer: Option<HardwareSigner>,
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
    /// Reads the keys from the store and checks each published key of `device` against the
    /// device: it must hold the key, and its public key must be the recorded one. Keys of
    /// other devices (other replicas' TPMs) are published and verified, never signed with.
    pub async fn load(
        store: &Store,
        backend: &Arc<dyn KeyBackend>,
        device: &str,
    ) -> Result<KeyRing, AuthorityError> {
        let rows = store.signing_keys().await?;
        let mut published = Vec::new();
        let mut active = None;
        for row in rows
            .into_iter()
            .filter(|r| matches!(r.state.as_str(), "next" | "active" | "retiring"))
        {
            let jwk: Jwk = serde_json::from_str(&row.jwk)
                .map_err(|e| AuthorityError::Internal(format!("stored JWK of {}: {e}", row.kid)))?;
            if row.device != device {
                published.push(PublishedKey {
                    row,
                    jwk,
                    signer: None,
                });
                continue;
            }
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
            let signer = HardwareSigner::new(backend.clone(), row.uri.clone(), &info.public_key);
            if row.state == "active" {
                active = Some(ActiveKey {
                    kid: row.kid.clone(),
                    uri: row.uri.clone(),
                    signer: signer.clone(),
                });
            }
            published.push(PublishedKey {
                row,
                jwk,
                signer: Some(signer),
            });
        }
        let active = active.ok_or_else(|| {
            AuthorityError::Internal(format!(
                "no active signing key of this device ({device}) in the store; run `keygate init`"
            ))
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

/// Makes sure this device has an active signing key: when the store has none of it,
/// generates one in the device, has the device sign its CA certificate, and records it.
/// Returns the kid and whether it was created now. Two processes racing here on one device
/// (replicas started together) end with one key: the loser's is removed from the device
/// again and the winner's returned.
pub async fn ensure_active_key(
    store: &Store,
    backend: &Arc<dyn KeyBackend>,
    settings: &Settings,
    actor: &str,
) -> Result<(String, bool), AuthorityError> {
    let device = device_of(backend).await?;
    adopt_legacy_keys(store, backend, &device).await?;
    let active = |keys: Vec<SigningKeyRow>| {
        keys.into_iter()
            .find(|k| k.state == "active" && k.device == device)
            .map(|k| k.kid)
    };
    if let Some(kid) = active(store.signing_keys().await?) {
        return Ok((kid, false));
    }
    let mut row = generate_key(backend, settings, &device).await?;
    row.state = "active".into();
    row.activated_at = Some(row.created_at);
    let kid = row.kid.clone();
    let audit = AuditRecord::new(actor, "key.create", &kid, "success", "local");
    match record_new_key(store, backend, row, Vec::new(), audit).await {
        Ok(()) => Ok((kid, true)),
        Err(AuthorityError::Store(crate::store::StoreError::Conflict(_))) => {
            active(store.signing_keys().await?)
                .map(|k| (k, false))
                .ok_or_else(|| {
                    AuthorityError::Conflict("another process is creating this device's key".into())
                })
        }
        Err(e) => Err(e),
    }
}

/// The backend's device id, asked on a blocking thread.
pub(super) async fn device_of(backend: &Arc<dyn KeyBackend>) -> Result<String, AuthorityError> {
    let b = backend.clone();
    Ok(tokio::task::spawn_blocking(move || b.device_id())
        .await
        .map_err(|e| AuthorityError::Internal(e.to_string()))??)
}

/// Keys recorded before keys had devices (TPM keys of a single replica) belong to the device
/// that holds them with the recorded public key: record that, once.
pub(super) async fn adopt_legacy_keys(
    store: &Store,
    backend: &Arc<dyn KeyBackend>,
    device: &str,
) -> Result<(), AuthorityError> {
    let keys = store.signing_keys().await?;
    // A state this device holds already (it made a key since): adopting another key into it
    // would break "one active, one next per device"; such a key is left for the operator.
    let taken = |state: &str| {
        matches!(state, "active" | "next") && keys.iter().any(|k| k.device == device && k.state == state)
    };
    let mut mine = Vec::new();
    for row in &keys {
        if !row.device.is_empty() || row.backend != backend.kind() || row.destroyed_at.is_some() {
            continue;
        }
        let (b, uri) = (backend.clone(), row.uri.clone());
        let found = tokio::task::spawn_blocking(move || b.find_key(&uri))
            .await
            .map_err(|e| AuthorityError::Internal(e.to_string()))?;
        let info = match found {
            Ok(info) => info,
            // Another device's key (another replica's TPM), or a key removed since.
            Err(crate::keys::KeyError::KeyNotFound(_)) => continue,
            // The device cannot say now: do not guess (adopting later is fine, making a
            // second active key now is not).
            Err(e) => return Err(e.into()),
        };
        if serde_json::from_str::<Jwk>(&row.jwk).ok() != Some(Jwk::from_public_key(&info.public_key)) {
            continue;
        }
        if taken(&row.state) {
            tracing::warn!(kid = %row.kid, state = %row.state, device, "not adopting a key: this device has a key in that state already");
            continue;
        }
        mine.push(row.kid.clone());
    }
    if !mine.is_empty() {
        let target = mine.join(",");
        let op = WriteOp::AdoptKeys {
            kids: mine,
            device: device.to_owned(),
        };
        store
            .write(
                vec![op],
                AuditRecord::new("local", "key.adopt", &target, "success", "local"),
            )
            .await?;
    }
    Ok(())
}

/// Generates a P-256 key inside the device and has the device sign its self-signed CA
/// certificate. Returns its row, state `next`, not yet recorded.
pub(super) async fn generate_key(
    backend: &Arc<dyn KeyBackend>,
    settings: &Settings,
    device: &str,
) -> Result<SigningKeyRow, AuthorityError> {
    let label = format!("root-{}", time_label());
    let b = backend.clone();
    let info = tokio::task::spawn_blocking(move || b.create_key(&label))
        .await
        .map_err(|e| AuthorityError::Internal(e.to_string()))??;
    if let Err(e) = prove_own_key(backend, &info).await {
        forget_device_key(backend, &info.uri).await;
        return Err(e);
    }
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
        device: device.to_owned(),
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

/// A new TPM key must be provable before it is published (ADR 0014): the TPM answers a
/// key proof of it here, checked by the verifiers' own code, all but the EK certificate
/// chain (the server need not hold the manufacturer CAs). Other devices have no proof.
async fn prove_own_key(
    backend: &Arc<dyn KeyBackend>,
    info: &crate::keys::KeyInfo,
) -> Result<(), AuthorityError> {
    use crate::attest::keyproof;
    use p256::elliptic_curve::sec1::ToSec1Point;
    // A TPM that cannot make proofs at all (an endorsement hierarchy with a password not
    // configured, say) keeps working: its keys are published unproven, with a warning.
    let unavailable = |e: &crate::keys::KeyError| {
        tracing::warn!(
            uri = %info.uri,
            error = %e,
            "key proofs are unavailable on this TPM; the new key is published without one \
             (an endorsement hierarchy with a password needs [tpm] endorsement_auth)"
        );
    };
    let (b, uri) = (backend.clone(), info.uri.clone());
    let evidence = tokio::task::spawn_blocking(move || b.key_evidence(&uri))
        .await
        .map_err(|e| AuthorityError::Internal(e.to_string()))?;
    let t = match evidence {
        Ok(crate::keys::KeyEvidence::Tpm(t)) => t,
        Ok(_) => return Ok(()),
        Err(e @ crate::keys::KeyError::Tpm { .. }) => {
            unavailable(&e);
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let unprovable = |e: keyproof::ProofError| {
        AuthorityError::Internal(format!(
            "the new key {} cannot be proven to live in the TPM: {e}",
            info.uri
        ))
    };
    let point = info.public_key.to_sec1_point(false);
    let (Some(x), Some(y)) = (point.x(), point.y()) else {
        return Err(AuthorityError::Internal("the new key has no affine point".into()));
    };
    let e = keyproof::Evidence {
        ek_certificate: t.ek_certificate.as_deref(),
        ek_public: &t.ek_public,
        ak_public: &t.ak_public,
        key_public: &t.key_public,
    };
    let checked = keyproof::check_own_key(&e, (x, y)).map_err(unprovable)?;
    let secret = random_bytes::<32>()?;
    let nonce = random_bytes::<32>()?;
    let cred = keyproof::credential_for(&checked, &secret).map_err(unprovable)?;
    let (b, uri) = (backend.clone(), info.uri.clone());
    let answer = tokio::task::spawn_blocking(move || {
        b.certify_key(&uri, &cred.id_object, &cred.encrypted_secret, &nonce)
    })
    .await
    .map_err(|e| AuthorityError::Internal(e.to_string()))?
    .map_err(|e| match e {
        // Its own credential refused: the key is not provable, whatever the reason.
        crate::keys::KeyError::BadInput(why) => unprovable(keyproof::ProofError {
            step: "credential",
            why,
        }),
        e => e.into(),
    })?;
    keyproof::check_answer(
        &checked,
        &secret,
        &nonce,
        &answer.secret,
        &answer.attest,
        &answer.signature,
    )
    .map_err(unprovable)
}

/// Records a freshly generated key (plus `more` ops, in the same transaction). When the
/// store refuses the write (another process recorded a key first, say), the key is removed
/// from the device again, so no unrecorded key is left behind. When the store did not
/// answer, the write may still commit: the key stays in the device, unrecorded and unused
/// at worst, rather than recorded and gone.
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
    match store.write(ops, audit).await {
        Ok(_) => Ok(()),
        Err(e @ crate::store::StoreError::Unavailable(_)) => {
            tracing::warn!(uri, error = %e, "the store did not confirm a new key; it stays on the device");
            Err(e.into())
        }
        Err(e) => {
            forget_device_key(backend, &uri).await;
            Err(e.into())
        }
    }
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
