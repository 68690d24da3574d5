//! Row types, decoded from either database (`sqlx::FromRow`; column names are field names).

use crate::audit::{AuditEntry, AuditRecord};

/// An operator API token, without its secret.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ApiTokenRow {
    pub id: String,
    pub name: String,
    pub token_hash: Vec<u8>,
    pub scopes: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub created_by: String,
}

/// A signing key as recorded (the key itself lives in the device).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct SigningKeyRow {
    pub kid: String,
    pub uri: String,
    pub backend: String,
    /// The device that holds the key: `pkcs11` (one token every replica shares) or
    /// `tpm:<id>` (one TPM, one replica). Each device has its own active key.
    pub device: String,
    pub state: String,
    /// Public JWK, JSON.
    pub jwk: String,
    /// Self-signed CA certificate, PEM.
    pub certificate: String,
    pub created_at: i64,
    pub activated_at: Option<i64>,
    /// `retiring`: when it is expected to retire (its tokens' latest expiry).
    pub retire_at: Option<i64>,
    /// `next`: when it becomes active.
    pub activate_at: Option<i64>,
    /// When the key was removed from the device.
    pub destroyed_at: Option<i64>,
}

/// A provisioning token as recorded when it was issued (never the token text).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct IssuedToken {
    pub jti: String,
    pub kid: String,
    pub sub: String,
    pub aud: String,
    pub scopes: String,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    pub one_time: bool,
    pub cnf_jkt: Option<String>,
    pub issued_by: String,
}

/// What has happened to an issued token since.
#[derive(Debug, Clone, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct TokenStatus {
    pub redeemed_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

/// An enrollment challenge as recorded.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct EnrollmentRow {
    pub id: String,
    pub ek_hash: String,
    /// Marshalled TPM2B_PUBLIC of the AK.
    pub ak_pub: Vec<u8>,
    /// SHA-256 of the credential secret.
    pub secret_hash: Vec<u8>,
    pub nonce: Vec<u8>,
    pub pcr_selection: String,
    pub created_at: i64,
    pub expires_at: i64,
    pub used_at: Option<i64>,
}

/// A machine (its EK), registered by an operator or enrolled.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct MachineRow {
    pub ek_hash: String,
    pub name: Option<String>,
    pub registered_at: Option<i64>,
    pub enrolled_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

/// An issued token and its status, as one row.
#[derive(sqlx::FromRow)]
pub(super) struct IssuedWithStatus {
    #[sqlx(flatten)]
    pub token: IssuedToken,
    #[sqlx(flatten)]
    pub status: TokenStatus,
}

/// An audit entry as stored.
#[derive(sqlx::FromRow)]
pub(super) struct AuditRow {
    seq: i64,
    at: i64,
    actor: String,
    action: String,
    target: String,
    outcome: String,
    remote_addr: String,
    prev_hash: String,
    hash: String,
}

impl From<AuditRow> for AuditEntry {
    fn from(r: AuditRow) -> Self {
        AuditEntry {
            seq: r.seq,
            at: r.at,
            record: AuditRecord {
                actor: r.actor,
                action: r.action,
                target: r.target,
                outcome: r.outcome,
                remote_addr: r.remote_addr,
            },
            prev_hash: r.prev_hash,
            hash: r.hash,
        }
    }
}

/// One unexpired revocation (the signed list, the event stream, the CRL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevocationRow {
    /// Position in the one revocation order every replica shares.
    pub seq: i64,
    pub jti: String,
    pub exp: i64,
    pub revoked_at: i64,
    /// The reason the operator gave, or `machine revoked` when that was the cause.
    pub reason: Option<String>,
}
