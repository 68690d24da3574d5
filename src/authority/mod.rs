//! Business rules between the HTTP front end and the hardware, token and store layers:
//! which key signs, what a valid request is, who may do what, what gets recorded.

mod apitokens;
mod certs;
mod enroll;
mod issue;
mod keyproof;
mod keyring;
mod machines;
mod redeem;
mod refusals;
mod revocations;
mod rotation;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};

pub use apitokens::{NewApiToken, PREFIX as API_TOKEN_PREFIX, Principal, Scope};
pub use enroll::{Challenge, ChallengeRequest, CompleteRequest, EK_URN_PREFIX, EnrollSettings, Enrolled};
pub use issue::{Introspection, IssueRequest, Issued};
pub use keyproof::{ProofAnswer, ProofChallenge};
pub use keyring::{ActiveKey, KeyRing, PublishedKey, ensure_active_key};
pub use redeem::{RedeemRequest, Redeemed};
pub use refusals::{Ended, Repeats};
pub use revocations::RevocationEvent;
pub use rotation::RotateOutcome;

use crate::config::Config;
use crate::keys::{KeyBackend, KeyError, SignQueue};
use crate::store::{Store, StoreError};
use crate::x509::CaSubject;

/// Domain errors; the API maps each to one problem type.
#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    /// The request is invalid; the message says why (safe to show).
    #[error("{0}")]
    BadRequest(String),
    /// No, unknown, expired or deleted credential.
    #[error("{0}")]
    Unauthorized(String),
    /// A DPoP-bound token presented without a valid RFC 9449 proof: the proof is missing,
    /// malformed, replayed or not for this request (`key_binding` false), or signed by a key
    /// other than the token's `cnf.jkt` (`key_binding` true). A 401 with a `DPoP` challenge.
    #[error("{detail}")]
    Dpop { key_binding: bool, detail: String },
    /// Valid credential without the scope.
    #[error("this API token lacks the scope {0}")]
    Forbidden(Scope),
    #[error("{0} not found")]
    NotFound(String),
    /// An attestation proof failed (enrollment: secret, quote, challenge); a 401.
    #[error("{0}")]
    Attestation(String),
    /// A well-formed request the policy refuses (enrollment: EK trust, AK, PCRs); a 403.
    #[error("{0}")]
    Denied(String),
    #[error("{0}")]
    Conflict(String),
    /// This replica cannot answer for that resource (a TPM key of another replica); a 421.
    #[error("{0}")]
    Misdirected(String),
    /// The key backend cannot sign now.
    #[error("key backend unavailable: {0}")]
    Backend(#[from] KeyError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("internal error: {0}")]
    Internal(String),
}

/// Settings the authority needs from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub issuer: String,
    pub default_ttl: u64,
    pub max_ttl: u64,
    pub api_default_ttl: u64,
    pub api_max_ttl: u64,
    pub ca_subject: CaSubject,
    pub ca_lifetime_days: u64,
    /// Longest life of a certificate issued at redemption.
    pub certificate_ttl: u64,
    /// RFC 9449 proof age window, seconds.
    pub dpop_max_age: i64,
    /// Verifier leeway (a retiring key stays published this long past its last token).
    pub leeway: i64,
    pub rotate_every: i64,
    pub publish_lead: i64,
    pub jwks_max_age: u64,
    /// How long after it is made a revocation list (signed list, CRL) is due for update.
    pub revocation_list_ttl: i64,
    /// Attestation-gated enrollment (`enroll.rs`).
    pub enroll: Arc<EnrollSettings>,
    /// Repeated refusals without a verified identity are summed over this window
    /// (`refusals.rs`).
    pub refusal_window: std::time::Duration,
    /// How long a replica on PostgreSQL may use an API token it read (`apitokens.rs`).
    pub api_token_lease: std::time::Duration,
}

impl Settings {
    /// Fails when the enrollment settings cannot be loaded (a TPM manufacturer CA file that
    /// does not parse, say).
    pub fn from_config(cfg: &Config) -> Result<Settings, AuthorityError> {
        Ok(Settings {
            issuer: cfg.issuer(),
            default_ttl: cfg.tokens.default_ttl_seconds,
            max_ttl: cfg.tokens.max_ttl_seconds,
            api_default_ttl: cfg.api_tokens.default_ttl_seconds,
            api_max_ttl: cfg.api_tokens.max_ttl_seconds,
            ca_subject: CaSubject {
                country: cfg.ca.country.clone(),
                organization: cfg.ca.organization.clone(),
                common_name: cfg.ca.common_name.clone(),
            },
            ca_lifetime_days: cfg.ca.lifetime_days,
            certificate_ttl: cfg.ca.certificate_ttl_seconds,
            dpop_max_age: cfg.tokens.dpop_max_age_seconds as i64,
            leeway: cfg.tokens.leeway_seconds as i64,
            rotate_every: cfg.rotation.rotate_every_seconds as i64,
            publish_lead: cfg.rotation.publish_lead_seconds as i64,
            jwks_max_age: cfg.rotation.jwks_max_age_seconds,
            revocation_list_ttl: cfg.tokens.revocation_list_ttl_seconds as i64,
            enroll: EnrollSettings::from_config(cfg)?,
            refusal_window: std::time::Duration::from_secs(cfg.audit.refusal_window_seconds),
            api_token_lease: std::time::Duration::from_millis(cfg.api_tokens.cache_lease_ms),
        })
    }
}

/// The signing authority. Cheap to share behind an `Arc`.
pub struct Authority {
    pub(crate) store: Store,
    pub(crate) backend: Arc<dyn KeyBackend>,
    /// The device this replica signs with (`KeyBackend::device_id`).
    pub(crate) device: String,
    pub(crate) keys: RwLock<Arc<KeyRing>>,
    pub(crate) settings: Settings,
    /// API-token rows by secret hash, filled on successful lookups, on PostgreSQL for a
    /// lease only, and emptied of a token the moment it is deleted (see `apitokens.rs`).
    pub(crate) api_token_cache: apitokens::Cache,
    /// Unix ms of the last successful backend probe (0: none or failed).
    last_probe_ok_ms: AtomicI64,
    /// Signed CRLs by kid, reused for a few seconds (`certs.rs`).
    pub(crate) crl_cache: certs::CrlCache,
    /// Open key-proof challenges (`keyproof.rs`).
    pub(crate) proof_challenges: keyproof::Challenges,
    /// One signing thread per backend session (`keys/queue.rs`).
    sign_queue: SignQueue,
    /// Refusals without a verified identity, aggregated per window (`refusals.rs`).
    refusals: refusals::Refusals,
    /// Live revocations for the event stream (`revocations.rs`).
    pub(crate) feed: Arc<revocations::Feed>,
    /// One rotation step at a time in this process (`rotation.rs`).
    rotation_lock: tokio::sync::Mutex<()>,
    /// One key-ring reload at a time, so a ring and the states it was read after stay
    /// together.
    reload_lock: tokio::sync::Mutex<()>,
    /// The store's key states when the ring was last loaded.
    key_states: std::sync::Mutex<String>,
}

/// How long a successful readiness probe of the backend is reused.
pub const PROBE_REUSE_MS: i64 = 1000;

impl Authority {
    /// Loads the key ring from the store and checks every key of this device against the
    /// device. Fails when the device has no active key (run `keygate init`) or a key does
    /// not match the device.
    pub async fn open(
        store: Store,
        backend: Arc<dyn KeyBackend>,
        settings: Settings,
    ) -> Result<Authority, AuthorityError> {
        let device = keyring::device_of(&backend).await?;
        keyring::adopt_legacy_keys(&store, &backend, &device).await?;
        // The states before the ring: a change in between makes the next refresh reload.
        let key_states = std::sync::Mutex::new(store.key_states().await?);
        let ring = KeyRing::load(&store, &backend, &device).await?;
        let (slots, sign_wait) = backend.concurrency();
        let sign_queue = SignQueue::start(slots, sign_wait)?;
        let feed = revocations::Feed::start(store.clone()).await?;
        Ok(Authority {
            refusals: refusals::Refusals::new(settings.refusal_window),
            feed,
            rotation_lock: tokio::sync::Mutex::new(()),
            reload_lock: tokio::sync::Mutex::new(()),
            key_states,
            api_token_cache: apitokens::Cache::new(match store.kind() {
                crate::store::StoreKind::Sqlite => apitokens::CacheMode::Exclusive,
                _ if settings.api_token_lease.is_zero() => apitokens::CacheMode::Off,
                _ => apitokens::CacheMode::Leased(settings.api_token_lease),
            }),
            device,
            last_probe_ok_ms: AtomicI64::new(0),
            crl_cache: certs::CrlCache::default(),
            proof_challenges: keyproof::Challenges::default(),
            sign_queue,
            store,
            backend,
            keys: RwLock::new(Arc::new(ring)),
            settings,
        })
    }

    /// Audits a refusal: at once, or, for a request without a verified identity, once per
    /// kind and window with the repeats summed (`refusals.rs`).
    pub(crate) async fn audit_refusal(&self, rec: crate::audit::AuditRecord) {
        if refusals::unverified(&rec.actor) && !self.refusals.admit(&rec) {
            return;
        }
        let action = rec.action.clone();
        if let Err(e) = self.store.audit(rec).await {
            tracing::error!(error = %e, action, "audit write failed for a refusal");
        }
    }

    /// Writes the summaries of a refusal window that has ended (or of the current one, with
    /// `force`: at shutdown). Every replica runs this for its own refusals.
    pub async fn flush_refusals(&self, force: bool) {
        for rec in self.refusals.take_summaries(force) {
            if let Err(e) = self.store.audit(rec).await {
                tracing::warn!(error = %e, "cannot write a summary of refusals");
            }
        }
    }

    /// The key ring in force now.
    pub fn key_ring(&self) -> Arc<KeyRing> {
        match self.keys.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Runs a signing call on one of the signing threads; waits at most the backend's
    /// acquire timeout ([`KeyError::Busy`], a 503).
    pub(crate) async fn sign_blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, AuthorityError> {
        Ok(self.sign_queue.run(f).await?)
    }

    /// Like [`Authority::sign_blocking`], for a device operation that may take up to `wait`
    /// (a key proof) instead of a signature's wait.
    pub(crate) async fn device_blocking<T: Send + 'static>(
        &self,
        wait: std::time::Duration,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, AuthorityError> {
        Ok(self.sign_queue.run_long(wait, f).await?)
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn backend_kind(&self) -> &'static str {
        self.backend.kind()
    }

    /// Every signing key as recorded, in creation order.
    pub async fn signing_keys(&self) -> Result<Vec<crate::store::SigningKeyRow>, AuthorityError> {
        Ok(self.store.signing_keys().await?)
    }

    /// Audit entries after `after`, oldest first, at most `limit` (1 to 1000).
    pub async fn audit_page(
        &self,
        after: i64,
        limit: i64,
    ) -> Result<Vec<crate::audit::AuditEntry>, AuthorityError> {
        if !(1..=1000).contains(&limit) || after < 0 {
            return Err(AuthorityError::BadRequest(
                "limit must be 1 to 1000 and after not negative".into(),
            ));
        }
        Ok(self.store.audit_entries(after, limit).await?)
    }

    /// Signs the current chain head inside the hardware and records it, unless the newest
    /// checkpoint already covers it. Returns the checkpoint made, if any.
    pub async fn checkpoint_audit(&self) -> Result<Option<crate::audit::Checkpoint>, AuthorityError> {
        let Some((seq, hash)) = self.store.audit_head().await? else {
            return Ok(None);
        };
        if !self.store.checkpoints(seq - 1, seq).await?.is_empty() {
            return Ok(None);
        }
        let ring = self.key_ring();
        let signer = ring.active.signer.clone();
        let msg = crate::audit::checkpoint_message(seq, &hash);
        let sig = self.sign_blocking(move || signer.sign_raw(&msg)).await??;
        let c = crate::audit::Checkpoint {
            seq,
            hash,
            kid: ring.active.kid.clone(),
            signature: crate::token::b64::encode(sig),
        };
        self.store.add_checkpoint(&c).await?;
        tracing::info!(seq, kid = %c.kid, "signed audit checkpoint");
        Ok(Some(c))
    }

    /// Checkpoints with `seq` in `(after, upto]`.
    pub async fn audit_checkpoints(
        &self,
        after: i64,
        upto: i64,
    ) -> Result<Vec<crate::audit::Checkpoint>, AuthorityError> {
        Ok(self.store.checkpoints(after, upto).await?)
    }

    /// A JWS compact serialization of `payload` with header `{alg: ES256, typ, kid}`, signed
    /// inside the hardware by `key` on a signing thread.
    pub(crate) async fn sign_compact(
        &self,
        key: &ActiveKey,
        typ: &str,
        payload: &[u8],
    ) -> Result<String, AuthorityError> {
        let input = crate::token::jws::signing_input(&crate::token::Header::es256(typ, &key.kid), payload)
            .map_err(|e| AuthorityError::Internal(e.to_string()))?;
        let signer = key.signer.clone();
        let (input, sig) = self
            .sign_blocking(move || {
                let sig = timed_sign(&signer, &input);
                (input, sig)
            })
            .await?;
        Ok(crate::token::jws::assemble(&input, &sig?))
    }

    /// The readiness probe of the store.
    pub async fn probe_store(&self) -> Result<(), AuthorityError> {
        Ok(self.store.ping().await?)
    }

    /// What a failed certificate or CRL build means. The x509 builder does not say whether
    /// the device failed; a probe does (then 503, else 500).
    pub(super) async fn x509_failure(&self, e: crate::x509::X509Error) -> AuthorityError {
        match self.probe_backend().await {
            Err(unavailable) => unavailable,
            Ok(()) => AuthorityError::Internal(e.to_string()),
        }
    }

    /// Signs a fixed digest with the active key: the readiness probe of the backend. A
    /// success is reused for [`PROBE_REUSE_MS`], so polling the public `/readyz` cannot turn
    /// into load on the HSM; a failure is never reused.
    pub async fn probe_backend(&self) -> Result<(), AuthorityError> {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let last = self.last_probe_ok_ms.load(Ordering::Relaxed);
        if last > 0 && (0..PROBE_REUSE_MS).contains(&(now_ms - last)) {
            return Ok(());
        }
        let signer = self.key_ring().active.signer.clone();
        let r = self
            .sign_blocking(move || signer.sign_raw(b"keygate readiness probe"))
            .await?;
        match r {
            Ok(_) => {
                self.last_probe_ok_ms.store(now_ms, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.last_probe_ok_ms.store(0, Ordering::Relaxed);
                Err(e.into())
            }
        }
    }
}

/// Current Unix time in seconds.
pub fn now() -> i64 {
    crate::token::verify::now()
}

/// Signs a JWS signing input with `signer`; the device call alone is timed into
/// `keygate_backend_sign_duration_seconds`. Runs on a signing thread.
pub(crate) fn timed_sign(signer: &crate::keys::HardwareSigner, input: &str) -> Result<[u8; 64], KeyError> {
    let started = std::time::Instant::now();
    let sig = signer.sign_raw(input.as_bytes());
    metrics::histogram!("keygate_backend_sign_duration_seconds").record(started.elapsed().as_secs_f64());
    sig
}

/// The JWS signing input of a provisioning token with `claims`, signed by key `kid`.
pub(crate) fn signing_input(kid: &str, claims: &crate::token::Claims) -> Result<String, AuthorityError> {
    let payload = serde_json::to_vec(claims).map_err(|e| AuthorityError::Internal(e.to_string()))?;
    crate::token::jws::signing_input(
        &crate::token::Header::es256(crate::token::TYP_PROVISIONING, kid),
        &payload,
    )
    .map_err(|e| AuthorityError::Internal(e.to_string()))
}

/// `n` random bytes from the OS CSPRNG.
pub(crate) fn random_bytes<const N: usize>() -> Result<[u8; N], AuthorityError> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| AuthorityError::Internal(format!("OS random source: {e}")))?;
    Ok(b)
}

/// RFC 3339 UTC of a Unix time.
pub fn rfc3339(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|d| d.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default()
}
