//! Row types and their mapping from SQLite rows.

use sqlx::Row;
use sqlx::sqlite::SqliteRow;

use super::StoreError;
use crate::audit::{AuditEntry, AuditRecord};

/// An operator API token, without its secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiTokenRow {
    pub id: String,
    pub name: String,
    pub token_hash: Vec<u8>,
    pub scopes: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub created_by: String,
}

impl ApiTokenRow {
    pub(super) fn from_row(r: &SqliteRow) -> Result<Self, StoreError> {
        Ok(ApiTokenRow {
            id: r.try_get("id")?,
            name: r.try_get("name")?,
            token_hash: r.try_get("token_hash")?,
            scopes: r.try_get("scopes")?,
            created_at: r.try_get("created_at")?,
            expires_at: r.try_get("expires_at")?,
            created_by: r.try_get("created_by")?,
        })
    }
}

/// A signing key as recorded (the key itself lives in the device).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigningKeyRow {
    pub kid: String,
    pub uri: String,
    pub backend: String,
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

impl SigningKeyRow {
    pub(super) fn from_row(r: &SqliteRow) -> Result<Self, StoreError> {
        Ok(SigningKeyRow {
            kid: r.try_get("kid")?,
            uri: r.try_get("uri")?,
            backend: r.try_get("backend")?,
            state: r.try_get("state")?,
            jwk: r.try_get("jwk")?,
            certificate: r.try_get("certificate")?,
            created_at: r.try_get("created_at")?,
            activated_at: r.try_get("activated_at")?,
            retire_at: r.try_get("retire_at")?,
            activate_at: r.try_get("activate_at")?,
            destroyed_at: r.try_get("destroyed_at")?,
        })
    }
}

/// A provisioning token as recorded when it was issued (never the token text).
#[derive(Debug, Clone, PartialEq, Eq)]
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
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenStatus {
    pub redeemed_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

impl IssuedToken {
    pub(super) fn from_row(r: &SqliteRow) -> Result<(Self, TokenStatus), StoreError> {
        Ok((
            IssuedToken {
                jti: r.try_get("jti")?,
                kid: r.try_get("kid")?,
                sub: r.try_get("sub")?,
                aud: r.try_get("aud")?,
                scopes: r.try_get("scopes")?,
                iat: r.try_get("iat")?,
                nbf: r.try_get("nbf")?,
                exp: r.try_get("exp")?,
                one_time: r.try_get::<i64, _>("one_time")? != 0,
                cnf_jkt: r.try_get("cnf_jkt")?,
                issued_by: r.try_get("issued_by")?,
            },
            TokenStatus {
                redeemed_at: r.try_get("redeemed_at")?,
                revoked_at: r.try_get("revoked_at")?,
            },
        ))
    }
}

pub(super) fn audit_from_row(r: &SqliteRow) -> Result<AuditEntry, StoreError> {
    Ok(AuditEntry {
        seq: r.try_get("seq")?,
        at: r.try_get("at")?,
        record: AuditRecord {
            actor: r.try_get("actor")?,
            action: r.try_get("action")?,
            target: r.try_get("target")?,
            outcome: r.try_get("outcome")?,
            remote_addr: r.try_get("remote_addr")?,
        },
        prev_hash: r.try_get("prev_hash")?,
        hash: r.try_get("hash")?,
    })
}

/// An enrollment challenge as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
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

impl EnrollmentRow {
    pub(super) fn from_row(r: &SqliteRow) -> Result<Self, StoreError> {
        Ok(EnrollmentRow {
            id: r.try_get("id")?,
            ek_hash: r.try_get("ek_hash")?,
            ak_pub: r.try_get("ak_pub")?,
            secret_hash: r.try_get("secret_hash")?,
            nonce: r.try_get("nonce")?,
            pcr_selection: r.try_get("pcr_selection")?,
            created_at: r.try_get("created_at")?,
            expires_at: r.try_get("expires_at")?,
            used_at: r.try_get("used_at")?,
        })
    }
}

/// A machine (its EK), registered by an operator or enrolled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineRow {
    pub ek_hash: String,
    pub name: Option<String>,
    pub registered_at: Option<i64>,
    pub enrolled_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

impl MachineRow {
    pub(super) fn from_row(r: &SqliteRow) -> Result<Self, StoreError> {
        Ok(MachineRow {
            ek_hash: r.try_get("ek_hash")?,
            name: r.try_get("name")?,
            registered_at: r.try_get("registered_at")?,
            enrolled_at: r.try_get("enrolled_at")?,
            revoked_at: r.try_get("revoked_at")?,
        })
    }
}
