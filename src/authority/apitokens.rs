//! Operator API tokens: `kg_` + 256 random bits, stored as SHA-256 only, compared in
//! constant time, scoped, expiring, deleted at once.

use std::collections::HashMap;
use std::collections::HashSet;
use std::sync::Mutex;

use aws_lc_rs::digest;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::{Authority, AuthorityError, now, random_bytes};
use crate::audit::AuditRecord;
use crate::store::{ApiTokenRow, WriteOp};
use crate::token::b64;

/// Most API-token rows kept in memory; beyond that, lookups go to the store.
const CACHE_MAX: usize = 10_000;

/// Verified API-token rows by SHA-256 of the secret.
///
/// Every request used to read its API token from SQLite, a cross-thread round trip that cost
/// more than the HSM signature (docs/benchmarks-server-cpu.md). Rows are cached after a successful
/// lookup; expiry is checked on every use; a deletion removes the row from the cache before
/// the deletion is answered, so a deleted token is refused from the next request on.
///
/// That holds because one process serves a SQLite store (`serve` locks the file). On
/// PostgreSQL another replica may delete a token at any moment, and an announcement of the
/// deletion could reach this replica after a client that saw the DELETE answered has sent
/// its next request here: so replicas do not cache, and every request reads its token (one
/// primary-key lookup; ADR 0011).
pub(crate) struct Cache {
    enabled: bool,
    inner: Mutex<CacheInner>,
}

#[derive(Default)]
struct CacheInner {
    rows: HashMap<[u8; 32], ApiTokenRow>,
    /// Ids deleted while this process runs: a lookup that raced with the deletion must not
    /// put the row back.
    deleted: HashSet<String>,
}

impl Cache {
    /// A cache that keeps rows only when `enabled` (a store no other process writes to).
    pub(crate) fn new(enabled: bool) -> Cache {
        Cache {
            enabled,
            inner: Mutex::new(CacheInner::default()),
        }
    }

    fn get(&self, hash: &[u8; 32]) -> Option<ApiTokenRow> {
        if !self.enabled {
            return None;
        }
        self.inner.lock().ok()?.rows.get(hash).cloned()
    }

    fn put(&self, hash: [u8; 32], row: ApiTokenRow) {
        if !self.enabled {
            return;
        }
        if let Ok(mut c) = self.inner.lock() {
            if c.deleted.contains(&row.id) {
                return;
            }
            if c.rows.len() >= CACHE_MAX {
                c.rows.clear();
            }
            c.rows.insert(hash, row);
        }
    }

    fn delete(&self, id: &str) {
        if let Ok(mut c) = self.inner.lock() {
            c.rows.retain(|_, r| r.id != id);
            c.deleted.insert(id.to_owned());
        }
    }

    /// True when `id` was deleted by this process (a cached or freshly read row is stale).
    fn is_deleted(&self, id: &str) -> bool {
        self.inner.lock().map(|c| c.deleted.contains(id)).unwrap_or(true)
    }
}

/// Prefix of every API token secret.
pub const PREFIX: &str = "kg_";
/// Length of a secret: `kg_` + 43 base64url characters (32 bytes).
const SECRET_LEN: usize = 3 + 43;

/// Operator scopes (the HTTP contract). `admin` includes all the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    Admin,
    TokensIssue,
    TokensRead,
    TokensRevoke,
    KeysRead,
    KeysRotate,
    AuditRead,
    EnrollAdmin,
}

impl Scope {
    pub const ALL: [Scope; 8] = [
        Scope::Admin,
        Scope::TokensIssue,
        Scope::TokensRead,
        Scope::TokensRevoke,
        Scope::KeysRead,
        Scope::KeysRotate,
        Scope::AuditRead,
        Scope::EnrollAdmin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Admin => "admin",
            Scope::TokensIssue => "tokens:issue",
            Scope::TokensRead => "tokens:read",
            Scope::TokensRevoke => "tokens:revoke",
            Scope::KeysRead => "keys:read",
            Scope::KeysRotate => "keys:rotate",
            Scope::AuditRead => "audit:read",
            Scope::EnrollAdmin => "enroll:admin",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An authenticated operator.
#[derive(Debug, Clone)]
pub struct Principal {
    /// API token id (never the secret): the `actor` of audit entries.
    pub id: String,
    pub scopes: Vec<Scope>,
}

impl Principal {
    /// True when this principal holds `scope` (directly or through `admin`).
    pub fn has(&self, scope: Scope) -> bool {
        self.scopes.iter().any(|s| *s == scope || *s == Scope::Admin)
    }
}

/// A freshly minted API token; `secret` is shown once and wiped on drop.
pub struct NewApiToken {
    pub id: String,
    pub secret: Zeroizing<String>,
    pub expires_at: Option<i64>,
}

impl std::fmt::Debug for NewApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewApiToken")
            .field("id", &self.id)
            .field("secret", &"[redacted]")
            .finish()
    }
}

fn hash_secret(secret: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, secret.as_bytes()).as_ref());
    out
}

fn parse_scopes(scopes: &[String]) -> Result<Vec<Scope>, AuthorityError> {
    if scopes.is_empty() {
        return Err(AuthorityError::BadRequest(
            "scopes must name at least one scope".into(),
        ));
    }
    let mut out = Vec::new();
    for s in scopes {
        let scope = Scope::parse(s).ok_or_else(|| {
            AuthorityError::BadRequest(format!(
                "unknown scope {s:?}; known: {}",
                Scope::ALL.map(Scope::as_str).join(", ")
            ))
        })?;
        if !out.contains(&scope) {
            out.push(scope);
        }
    }
    Ok(out)
}

fn scopes_text(scopes: &[Scope]) -> String {
    scopes.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" ")
}

impl Authority {
    /// Checks a bearer secret: unknown, malformed, expired or deleted tokens are refused, and
    /// the refusal is audited. Runs in constant time with respect to the stored hash.
    #[tracing::instrument(skip_all)]
    pub async fn authenticate(
        &self,
        secret: Option<&str>,
        remote: &str,
    ) -> Result<Principal, AuthorityError> {
        let refuse = |why: &'static str| async move {
            let rec = AuditRecord::new(
                "anonymous",
                "auth",
                "api_token",
                &format!("denied: {why}"),
                remote,
            );
            self.audit_refusal(rec).await;
            AuthorityError::Unauthorized(why.into())
        };
        let Some(secret) = secret else {
            return Err(AuthorityError::Unauthorized("missing bearer token".into()));
        };
        if secret.len() != SECRET_LEN || !secret.starts_with(PREFIX) {
            return Err(refuse("invalid token").await);
        }
        let hash = hash_secret(secret);
        let row = match self.api_token_cache.get(&hash) {
            Some(row) => row,
            None => {
                let Some(row) = self.store.api_token_by_hash(&hash).await? else {
                    return Err(refuse("invalid token").await);
                };
                self.api_token_cache.put(hash, row.clone());
                row
            }
        };
        if !bool::from(row.token_hash.as_slice().ct_eq(&hash)) || self.api_token_cache.is_deleted(&row.id) {
            return Err(refuse("invalid token").await);
        }
        if row.expires_at.is_some_and(|e| now() >= e) {
            return Err(refuse("token expired").await);
        }
        let scopes = row.scopes.split(' ').filter_map(Scope::parse).collect();
        Ok(Principal { id: row.id, scopes })
    }

    /// Refuses (and audits) a principal without `scope`.
    pub async fn require(&self, p: &Principal, scope: Scope, remote: &str) -> Result<(), AuthorityError> {
        if p.has(scope) {
            return Ok(());
        }
        let rec = AuditRecord::new(&p.id, "auth", scope.as_str(), "denied: missing scope", remote);
        if let Err(e) = self.store.audit(rec).await {
            tracing::error!(error = %e, "audit write failed for a refused scope");
        }
        Err(AuthorityError::Forbidden(scope))
    }

    /// Mints an API token. `ttl` of `None` takes the configured default; `Some(0)` is refused;
    /// `no_expiry` (bootstrap admin token from `keygate init`) ignores `ttl`.
    pub async fn create_api_token(
        &self,
        actor: &str,
        name: &str,
        scopes: &[String],
        ttl: Option<u64>,
        no_expiry: bool,
        remote: &str,
    ) -> Result<NewApiToken, AuthorityError> {
        super::issue::check_name("name", name, 128)?;
        let scopes = parse_scopes(scopes)?;
        let s = &self.settings;
        let expires_at = if no_expiry {
            None
        } else {
            let ttl = ttl.unwrap_or(s.api_default_ttl);
            if ttl == 0 || ttl > s.api_max_ttl {
                return Err(AuthorityError::BadRequest(format!(
                    "ttl_seconds must be between 1 and {}",
                    s.api_max_ttl
                )));
            }
            Some(now() + ttl as i64)
        };
        let secret = Zeroizing::new(format!("{PREFIX}{}", b64::encode(random_bytes::<32>()?)));
        let id = format!("at_{}", hex::encode(random_bytes::<8>()?));
        let row = ApiTokenRow {
            id: id.clone(),
            name: name.to_owned(),
            token_hash: hash_secret(&secret).to_vec(),
            scopes: scopes_text(&scopes),
            created_at: now(),
            expires_at,
            created_by: actor.to_owned(),
        };
        self.store
            .write(
                vec![WriteOp::InsertApiToken(row)],
                AuditRecord::new(actor, "api_token.create", &id, "success", remote),
            )
            .await?;
        Ok(NewApiToken {
            id,
            secret,
            expires_at,
        })
    }

    /// Every API token, without secrets.
    pub async fn list_api_tokens(&self) -> Result<Vec<crate::store::ApiTokenRow>, AuthorityError> {
        Ok(self.store.api_tokens().await?)
    }

    /// Deletes an API token; it is refused from the next request on.
    pub async fn delete_api_token(&self, actor: &str, id: &str, remote: &str) -> Result<(), AuthorityError> {
        // Refuse the token in this process before the store even hears of the deletion.
        self.api_token_cache.delete(id);
        self.store
            .write(
                vec![WriteOp::DeleteApiToken(id.to_owned())],
                AuditRecord::new(actor, "api_token.delete", id, "success", remote),
            )
            .await?;
        Ok(())
    }

    /// True when some API token with the `admin` scope exists (for `keygate init`).
    pub async fn has_admin_token(&self) -> Result<bool, AuthorityError> {
        Ok(self
            .store
            .api_tokens()
            .await?
            .iter()
            .any(|t| t.scopes.split(' ').any(|s| s == "admin") && t.expires_at.is_none_or(|e| e > now())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_implies_everything() {
        let p = Principal {
            id: "x".into(),
            scopes: vec![Scope::Admin],
        };
        assert!(Scope::ALL.iter().all(|s| p.has(*s)));
        let p = Principal {
            id: "x".into(),
            scopes: vec![Scope::TokensIssue],
        };
        assert!(p.has(Scope::TokensIssue) && !p.has(Scope::KeysRead) && !p.has(Scope::Admin));
    }

    #[test]
    fn scopes_parse_strictly() {
        assert!(
            parse_scopes(&["tokens:issue".into(), "tokens:issue".into()])
                .unwrap()
                .len()
                == 1
        );
        assert!(parse_scopes(&[]).is_err());
        assert!(parse_scopes(&["tokens:*".into()]).is_err());
    }

    #[test]
    fn debug_hides_the_secret() {
        let t = NewApiToken {
            id: "at_1".into(),
            secret: Zeroizing::new("kg_supersecret".into()),
            expires_at: None,
        };
        assert!(!format!("{t:?}").contains("supersecret"));
    }
}
