//! Operator API tokens: `kg_` + 256 random bits, stored as SHA-256 only, compared in
//! constant time, scoped, expiring, deleted at once.

use std::collections::HashMap;
use std::collections::HashSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

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
/// Every request used to read its API token from the store, a round trip that cost more than
/// the HSM signature on SQLite, and on PostgreSQL, with sqlx's test of the connection as it
/// went back to the pool, a quarter of an issuance's CPU (docs/benchmarks-server-cpu.md).
/// Rows are cached after a successful lookup; expiry is checked on every use; a deletion
/// removes the row from this process's cache before the deletion is even written. How long
/// a row may be used depends on who else writes the store:
/// - one process serves a SQLite store (`serve` locks the file), so a row is good until this
///   process deletes it ([`CacheMode::Exclusive`]);
/// - on PostgreSQL another replica may delete the token at any moment, and its `NOTIFY` may
///   reach this replica after a client that saw the DELETE answered has sent its next
///   request here. So a row is good for a lease counted from before it was read
///   ([`CacheMode::Leased`]), and a DELETE is answered only once a lease has passed since
///   its commit ([`Cache::settle`]): every row any replica read before the deletion has
///   expired by then. The `NOTIFY` drops the row sooner; the promise does not rest on it
///   (ADR 0011).
pub(crate) struct Cache {
    mode: CacheMode,
    inner: Mutex<CacheInner>,
}

/// How long a cached API-token row may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CacheMode {
    /// Until this process deletes the token: no other process writes the store.
    Exclusive,
    /// For this long after its read began: other replicas may delete it.
    Leased(Duration),
    /// Not at all: every request reads its token.
    Off,
}

#[derive(Default)]
struct CacheInner {
    rows: HashMap<[u8; 32], (ApiTokenRow, Option<Instant>)>,
    /// Ids deleted while this process runs: a lookup that raced with the deletion must not
    /// put the row back.
    deleted: HashSet<String>,
}

impl Cache {
    pub(crate) fn new(mode: CacheMode) -> Cache {
        Cache {
            mode,
            inner: Mutex::new(CacheInner::default()),
        }
    }

    /// The row cached for `hash`, if its lease (if any) is still running at `now`.
    fn get(&self, hash: &[u8; 32], now: Instant) -> Option<ApiTokenRow> {
        if self.mode == CacheMode::Off {
            return None;
        }
        let c = self.inner.lock().ok()?;
        let (row, until) = c.rows.get(hash)?;
        until.is_none_or(|u| now < u).then(|| row.clone())
    }

    /// Caches `row`, read by a lookup that began at `asked`.
    fn put(&self, hash: [u8; 32], row: ApiTokenRow, asked: Instant) {
        let until = match self.mode {
            CacheMode::Off => return,
            CacheMode::Exclusive => None,
            CacheMode::Leased(lease) => Some(asked + lease),
        };
        if let Ok(mut c) = self.inner.lock() {
            if c.deleted.contains(&row.id) {
                return;
            }
            if c.rows.len() >= CACHE_MAX {
                c.rows.clear();
            }
            c.rows.insert(hash, (row, until));
        }
    }

    /// Forgets the token `id` (deleted here or, as announced, on another replica).
    pub(crate) fn delete(&self, id: &str) {
        if let Ok(mut c) = self.inner.lock() {
            c.rows.retain(|_, (r, _)| r.id != id);
            c.deleted.insert(id.to_owned());
        }
    }

    /// Forgets every row (announcements may have been missed).
    pub(crate) fn clear(&self) {
        if let Ok(mut c) = self.inner.lock() {
            c.rows.clear();
        }
    }

    /// True when `id` was deleted while this process runs (a cached or freshly read row is
    /// stale).
    fn is_deleted(&self, id: &str) -> bool {
        self.inner.lock().map(|c| c.deleted.contains(id)).unwrap_or(true)
    }

    /// How long a committed deletion waits before it is answered, so that every replica's
    /// lease on the row has run out: the lease, plus a margin for clocks that tick at
    /// slightly different rates on different machines (NTP keeps them within 0.05%).
    pub(crate) fn settle(&self) -> Duration {
        match self.mode {
            CacheMode::Leased(lease) => lease + lease / 500 + Duration::from_millis(1),
            CacheMode::Exclusive | CacheMode::Off => Duration::ZERO,
        }
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
    /// the refusal is audited. Runs in constant time with respect to the stored hash. No span
    /// of its own: the request's span names the request, and one more span per request cost
    /// more than it told.
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
        let asked = Instant::now();
        let row = match self.api_token_cache.get(&hash, asked) {
            Some(row) => row,
            None => {
                let Some(row) = self.store.api_token_by_hash(&hash).await? else {
                    return Err(refuse("invalid token").await);
                };
                self.api_token_cache.put(hash, row.clone(), asked);
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

    /// Deletes an API token; once this returns, every replica refuses it.
    pub async fn delete_api_token(&self, actor: &str, id: &str, remote: &str) -> Result<(), AuthorityError> {
        // Refuse the token in this process before the store even hears of the deletion.
        self.api_token_cache.delete(id);
        self.store
            .write(
                vec![WriteOp::DeleteApiToken(id.to_owned())],
                AuditRecord::new(actor, "api_token.delete", id, "success", remote),
            )
            .await?;
        // Other replicas may still hold the row on a lease taken before the commit.
        let settle = self.api_token_cache.settle();
        if !settle.is_zero() {
            tokio::time::sleep(settle).await;
        }
        Ok(())
    }

    /// Drops the cached row of the API token `id`, announced deleted by another replica, or
    /// (`None`) every cached row, when announcements may have been missed.
    pub fn forget_api_tokens(&self, id: Option<&str>) {
        match id {
            Some(id) => self.api_token_cache.delete(id),
            None => self.api_token_cache.clear(),
        }
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

    fn row(id: &str) -> ApiTokenRow {
        ApiTokenRow {
            id: id.into(),
            name: "n".into(),
            token_hash: vec![1; 32],
            scopes: "admin".into(),
            created_at: 0,
            expires_at: None,
            created_by: "test".into(),
        }
    }

    #[test]
    fn a_leased_row_is_used_for_its_lease_from_before_its_read_and_no_longer() {
        let lease = Duration::from_millis(250);
        let cache = Cache::new(CacheMode::Leased(lease));
        let asked = Instant::now();
        cache.put([1; 32], row("at_1"), asked);
        assert!(
            cache
                .get(&[1; 32], asked + lease - Duration::from_millis(1))
                .is_some()
        );
        assert!(cache.get(&[1; 32], asked + lease).is_none());
        // a deletion answers only after every lease taken before its commit ran out
        assert!(cache.settle() > lease);
        // announced from elsewhere: gone at once, and a lookup that raced it is not kept
        cache.delete("at_1");
        assert!(cache.get(&[1; 32], asked).is_none());
        cache.put([1; 32], row("at_1"), asked);
        assert!(cache.get(&[1; 32], asked).is_none());
        cache.put([2; 32], row("at_2"), asked);
        cache.clear();
        assert!(cache.get(&[2; 32], asked).is_none());
    }

    #[test]
    fn one_process_caches_without_a_lease_and_off_caches_nothing() {
        let asked = Instant::now();
        let exclusive = Cache::new(CacheMode::Exclusive);
        exclusive.put([1; 32], row("at_1"), asked);
        assert!(
            exclusive
                .get(&[1; 32], asked + Duration::from_secs(86_400))
                .is_some()
        );
        assert_eq!(exclusive.settle(), Duration::ZERO);
        let off = Cache::new(CacheMode::Off);
        off.put([1; 32], row("at_1"), asked);
        assert!(off.get(&[1; 32], asked).is_none());
        assert_eq!(off.settle(), Duration::ZERO);
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
