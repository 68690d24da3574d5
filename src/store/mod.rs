//! Persistent state in SQLite (WAL): API tokens, signing keys, issued tokens, audit log.
//!
//! Reads go to a connection pool. Every write goes through one writer task
//! ([`writer`]) that appends the write's audit entry to the hash chain in the same
//! transaction and commits concurrent writes together (group commit): a write is durable,
//! and audited, before the caller hears "done", without one `fsync` per request.

mod enroll;
mod rows;
mod writer;

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};
use tokio::sync::{mpsc, oneshot};

use crate::audit::{AuditEntry, AuditRecord};
pub use enroll::EnrollOp;
pub use rows::{ApiTokenRow, EnrollmentRow, IssuedToken, MachineRow, SigningKeyRow, TokenStatus};
pub use writer::WriteOp;

/// Store failures. `Unavailable` maps to 503; `Conflict` to 409.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("cannot open store {url}: {reason}")]
    Open { url: String, reason: String },
    /// A write's precondition did not hold; nothing of it was applied.
    #[error("refused: {0}")]
    Refused(Refusal),
}

/// Why a conditional write was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the DPoP proof was used before")]
    DpopReplay,
    #[error("the token is revoked")]
    Revoked,
    #[error("the one-time token was redeemed already")]
    Redeemed,
    #[error("the key is not in the expected state")]
    KeyState,
    #[error("the enrollment was used already or has expired")]
    EnrollmentUsed,
    #[error("the machine is revoked")]
    MachineRevoked,
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &e {
            if db.is_unique_violation() && !db.message().contains("audit_log") {
                return StoreError::Conflict("the record exists already".into());
            }
        }
        StoreError::Unavailable(e.to_string())
    }
}

struct Job {
    ops: Vec<WriteOp>,
    audit: AuditRecord,
    reply: oneshot::Sender<Result<Vec<u64>, StoreError>>,
}

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
    jobs: mpsc::Sender<Job>,
}

impl Store {
    /// Opens (creating if needed) the database at `url`, runs migrations, starts the writer.
    pub async fn open(url: &str, synchronous_full: bool) -> Result<Store, StoreError> {
        let open_err = |reason: String| StoreError::Open {
            url: url.to_owned(),
            reason,
        };
        let opts = SqliteConnectOptions::from_str(url)
            .map_err(|e| open_err(e.to_string()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(if synchronous_full {
                SqliteSynchronous::Full
            } else {
                SqliteSynchronous::Normal
            })
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(opts.clone())
            .await
            .map_err(|e| open_err(e.to_string()))?;
        sqlx::migrate!("./migrations")
            .run(&pool)
            .await
            .map_err(|e| open_err(e.to_string()))?;
        // The writer owns a connection of its own, outside the pool.
        let conn = sqlx::ConnectOptions::connect(&opts)
            .await
            .map_err(|e| open_err(e.to_string()))?;
        let (tx, rx) = mpsc::channel(4096);
        tokio::spawn(writer::run(conn, rx));
        Ok(Store { pool, jobs: tx })
    }

    /// Applies `ops` and appends `audit` to the log, atomically: either all of it is
    /// committed or none. Returns rows affected per op.
    pub async fn write(&self, ops: Vec<WriteOp>, audit: AuditRecord) -> Result<Vec<u64>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(Job { ops, audit, reply })
            .await
            .map_err(|_| StoreError::Unavailable("writer stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Unavailable("writer stopped".into()))?
    }

    /// Appends an audit entry alone (a refusal, say).
    pub async fn audit(&self, audit: AuditRecord) -> Result<(), StoreError> {
        self.write(Vec::new(), audit).await.map(|_| ())
    }

    /// A trivial query: is the database answering?
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn api_token_by_hash(&self, hash: &[u8]) -> Result<Option<ApiTokenRow>, StoreError> {
        let row = sqlx::query(
            "SELECT id, name, token_hash, scopes, created_at, expires_at, created_by
             FROM api_tokens WHERE token_hash = ?",
        )
        .bind(hash)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| ApiTokenRow::from_row(&r)).transpose()
    }

    pub async fn api_tokens(&self) -> Result<Vec<ApiTokenRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, name, token_hash, scopes, created_at, expires_at, created_by
             FROM api_tokens ORDER BY created_at, id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(ApiTokenRow::from_row).collect()
    }

    pub async fn signing_keys(&self) -> Result<Vec<SigningKeyRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT kid, uri, backend, state, jwk, certificate, created_at, activated_at, retire_at,
                    activate_at, destroyed_at
             FROM signing_keys ORDER BY created_at, kid",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(SigningKeyRow::from_row).collect()
    }

    /// The issued token with this `jti` and its status.
    pub async fn issued_token(&self, jti: &str) -> Result<Option<(IssuedToken, TokenStatus)>, StoreError> {
        let row = sqlx::query(
            "SELECT jti, kid, sub, aud, scopes, iat, nbf, exp, one_time, cnf_jkt, issued_by,
                    redeemed_at, revoked_at
             FROM issued_tokens WHERE jti = ?",
        )
        .bind(jti)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| IssuedToken::from_row(&r)).transpose()
    }

    /// Audit entries with `seq > after`, oldest first.
    pub async fn audit_entries(&self, after: i64, limit: i64) -> Result<Vec<AuditEntry>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, at, actor, action, target, outcome, remote_addr, prev_hash, hash
             FROM audit_log WHERE seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(rows::audit_from_row).collect()
    }

    /// Unexpired revocations with `seq > after` at time `now`: (seq, jti, exp, revoked_at).
    pub async fn revocations(
        &self,
        after: i64,
        now: i64,
    ) -> Result<Vec<(i64, String, i64, i64)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT seq, jti, exp, revoked_at FROM revocations WHERE seq > ? AND exp > ? ORDER BY seq",
        )
        .bind(after)
        .bind(now)
        .fetch_all(&self.pool)
        .await?)
    }

    /// The newest revocation's seq (0 when there is none).
    pub async fn revocation_seq(&self) -> Result<i64, StoreError> {
        let r: (Option<i64>,) = sqlx::query_as("SELECT max(seq) FROM revocations")
            .fetch_one(&self.pool)
            .await?;
        Ok(r.0.unwrap_or(0))
    }

    /// How many tokens signed by `kid` are valid at `now` or later, and the latest `exp` of
    /// any token it signed (None: it signed none).
    pub async fn tokens_signed_by(&self, kid: &str, now: i64) -> Result<(i64, Option<i64>), StoreError> {
        Ok(sqlx::query_as(
            "SELECT (SELECT count(*) FROM issued_tokens WHERE kid = ?1 AND exp > ?2),
                    (SELECT max(exp) FROM issued_tokens WHERE kid = ?1)",
        )
        .bind(kid)
        .bind(now)
        .fetch_one(&self.pool)
        .await?)
    }

    /// A cheap summary of every key's state: it changes whenever any key changes state
    /// (another process rotated, say).
    pub async fn key_states(&self) -> Result<String, StoreError> {
        let r: (Option<String>,) = sqlx::query_as(
            "SELECT group_concat(kid || ':' || state || ':' || coalesce(activate_at, ''), ',')
             FROM (SELECT kid, state, activate_at FROM signing_keys ORDER BY kid)",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(r.0.unwrap_or_default())
    }

    /// True when a DPoP proof with this id (`<jkt>.<jti>`) was accepted before.
    pub async fn dpop_proof_seen(&self, id: &str) -> Result<bool, StoreError> {
        let r: Option<(i64,)> = sqlx::query_as("SELECT 1 FROM dpop_proofs WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(r.is_some())
    }

    /// Forgets DPoP proof ids whose window has passed.
    pub async fn prune_dpop_proofs(&self, now: i64) -> Result<u64, StoreError> {
        let r = sqlx::query("DELETE FROM dpop_proofs WHERE exp < ?")
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }

    /// Records a signed checkpoint (idempotent for the same seq).
    pub async fn add_checkpoint(&self, c: &crate::audit::Checkpoint) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT OR IGNORE INTO audit_checkpoints (seq, hash, kid, signature, at) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(c.seq)
        .bind(&c.hash)
        .bind(&c.kid)
        .bind(&c.signature)
        .bind(crate::token::verify::now())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Checkpoints with `seq` in `(after, upto]`, oldest first.
    pub async fn checkpoints(
        &self,
        after: i64,
        upto: i64,
    ) -> Result<Vec<crate::audit::Checkpoint>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, hash, kid, signature FROM audit_checkpoints WHERE seq > ? AND seq <= ? ORDER BY seq",
        )
        .bind(after)
        .bind(upto)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(crate::audit::Checkpoint {
                    seq: r.try_get("seq")?,
                    hash: r.try_get("hash")?,
                    kid: r.try_get("kid")?,
                    signature: r.try_get("signature")?,
                })
            })
            .collect()
    }

    /// (seq, hash) of the newest audit entry, if any.
    pub async fn audit_head(&self) -> Result<Option<(i64, String)>, StoreError> {
        let row = sqlx::query("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).transpose()
    }

    /// Row counts of (issued_tokens, api_tokens, audit_log).
    pub async fn counts(&self) -> Result<(i64, i64, i64), StoreError> {
        let r = sqlx::query(
            "SELECT (SELECT count(*) FROM issued_tokens), (SELECT count(*) FROM api_tokens),
                    (SELECT count(*) FROM audit_log)",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?))
    }

    /// Closes the pool after the writer drains.
    pub async fn close(self) {
        drop(self.jobs);
        self.pool.close().await;
    }
}
