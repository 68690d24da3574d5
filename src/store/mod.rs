//! Persistent state: API tokens, signing keys, issued tokens, revocations, enrollment, the
//! audit log. On SQLite (one file, one serving process; the embedded default) or PostgreSQL
//! (one database, any number of replicas), chosen by the store URL; the layers above do not
//! know which (docs/adr/0011-replicas-on-postgresql.md).
//!
//! Reads go to a connection pool. Every write goes through one writer task per process
//! ([`writer`]) that appends the write's audit entry to the hash chain in the same
//! transaction and commits concurrent writes together (group commit): a write is durable,
//! and audited, before the caller hears "done". Changes that other parts of this process,
//! and other replicas, must learn of at once are announced on [`Store::changes`].

mod certs;
mod db;
mod enroll;
mod failures;
mod issued;
mod postgres;
mod queue;
mod rows;
mod sqlite;
mod url;
mod writer;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use secrecy::SecretString;
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::audit::{AuditEntry, AuditRecord};
pub use certs::{CertOp, CertificateRow, RevokedCertificate};
use db::{Arg, Exec, Pool};
pub use enroll::EnrollOp;
pub use queue::{Announced, HOLD, WriteQueue};
pub use rows::{
    ApiTokenRow, EnrollmentRow, IssuedToken, MachineRow, RevocationRow, SigningKeyRow, TokenStatus,
};
pub use url::{StoreKind, StoreUrl, redact};
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
    /// The URL is shown redacted (no password).
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
            let on_audit = db.constraint().is_some_and(|c| c.starts_with("audit_log"))
                || db.message().contains("audit_log");
            if db.is_unique_violation() && !on_audit {
                return StoreError::Conflict("the record exists already".into());
            }
        }
        StoreError::Unavailable(e.to_string())
    }
}

/// Something other readers must learn of at once: within this process from the writer,
/// across replicas through PostgreSQL `NOTIFY` (sent inside the write's transaction, so only
/// committed changes are announced).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A token (or a machine's tokens) joined the revocation list.
    Revoked,
    /// An API token was deleted: it must be refused from now on.
    ApiTokenDeleted(String),
    /// A signing key was created or changed state.
    Keys,
    /// Announcements may have been missed (the listener reconnected): re-read everything.
    Resync,
}

impl Change {
    fn to_payload(&self) -> String {
        match self {
            Change::Revoked => "revoked".into(),
            Change::ApiTokenDeleted(id) => format!("api_token_deleted:{id}"),
            Change::Keys => "keys".into(),
            Change::Resync => "resync".into(),
        }
    }

    fn from_payload(p: &str) -> Option<Change> {
        Some(match p {
            "revoked" => Change::Revoked,
            "keys" => Change::Keys,
            "resync" => Change::Resync,
            _ => Change::ApiTokenDeleted(p.strip_prefix("api_token_deleted:")?.to_owned()),
        })
    }
}

/// How to open a store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub url: StoreUrl,
    /// SQLite `synchronous=FULL` (else NORMAL). PostgreSQL always waits for its WAL flush.
    pub sqlite_synchronous_full: bool,
    /// PostgreSQL password kept out of the URL (from a file or a variable).
    pub password: Option<SecretString>,
    /// Read pool size.
    pub max_connections: u32,
    /// How long the writer holds a batch open for writes announced and not yet queued
    /// ([`WriteQueue::announce`]); zero commits every batch at once.
    pub batch_hold: Duration,
}

impl StoreOptions {
    /// Defaults for `url`.
    pub fn new(url: &str) -> Result<StoreOptions, StoreError> {
        Ok(StoreOptions {
            url: StoreUrl::parse(url)?,
            sqlite_synchronous_full: true,
            password: None,
            max_connections: 8,
            batch_hold: HOLD,
        })
    }
}

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    jobs: mpsc::Sender<Job>,
    changes: broadcast::Sender<Change>,
    url: Arc<StoreUrl>,
    /// PostgreSQL connection settings (for leases), when on PostgreSQL.
    pg: Option<Arc<sqlx::postgres::PgConnectOptions>>,
    /// Writes announced to the writer and not yet queued ([`WriteQueue::announce`]).
    hold: Arc<queue::Hold>,
    /// Batches the writer has committed (or tried to).
    commits: Arc<AtomicU64>,
}

use writer::Job;

/// What a write answers: rows affected per op.
pub type WriteResult = Result<Vec<u64>, StoreError>;

impl Store {
    /// Opens the store (creating a SQLite file if needed; never creating a PostgreSQL
    /// database), applies the migrations, starts the writer and, on PostgreSQL, the change
    /// listener.
    pub async fn open(opts: &StoreOptions) -> Result<Store, StoreError> {
        let (jobs, rx) = mpsc::channel(4096);
        let changes = broadcast::channel(1024).0;
        let (pool, conn, pg) = match opts.url.kind() {
            StoreKind::Sqlite => {
                let (pool, w) =
                    sqlite::open(&opts.url, opts.sqlite_synchronous_full, opts.max_connections).await?;
                (Pool::Sqlite(pool), writer::Conn::Sqlite(w), None)
            }
            StoreKind::Postgres => {
                let pg = postgres::connect_options(&opts.url, opts.password.as_ref())?;
                let pool = postgres::open(&opts.url, &pg, opts.max_connections).await?;
                tokio::spawn(postgres::listen(pg.clone(), changes.downgrade()));
                let w = Box::new(postgres::PgWriter::new(pg.clone()));
                (
                    Pool::Postgres(pool),
                    writer::Conn::Postgres(w),
                    Some(Arc::new(pg)),
                )
            }
        };
        let (hold, commits) = (Arc::new(queue::Hold::default()), Arc::new(AtomicU64::new(0)));
        tokio::spawn(writer::run(
            conn,
            rx,
            changes.clone(),
            pool.clone(),
            hold.clone(),
            opts.batch_hold,
            commits.clone(),
        ));
        Ok(Store {
            pool,
            jobs,
            changes,
            url: Arc::new(opts.url.clone()),
            pg,
            hold,
            commits,
        })
    }

    /// Opens `url` with default options.
    pub async fn open_url(url: &str) -> Result<Store, StoreError> {
        Store::open(&StoreOptions::new(url)?).await
    }

    pub fn kind(&self) -> StoreKind {
        self.url.kind()
    }

    /// The store URL with any password hidden.
    pub fn url(&self) -> String {
        self.url.redacted()
    }

    /// Changes as they are committed, by this process or (PostgreSQL) any replica.
    pub fn changes(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    fn read(&self) -> Exec<'_> {
        self.pool.exec()
    }

    /// Applies `ops` and appends `audit` to the log, atomically: either all of it is
    /// committed or none. Returns rows affected per op.
    pub async fn write(&self, ops: Vec<WriteOp>, audit: AuditRecord) -> Result<Vec<u64>, StoreError> {
        self.bounded(async {
            let (reply, rx) = oneshot::channel();
            self.jobs
                .send(Job { ops, audit, reply })
                .await
                .map_err(|_| StoreError::Unavailable("writer stopped".into()))?;
            rx.await
                .map_err(|_| StoreError::Unavailable("writer stopped".into()))?
        })
        .await
    }

    /// A handle that queues writes from any thread without waiting (a signing thread
    /// hands its token straight to the writer).
    pub fn write_queue(&self) -> WriteQueue {
        WriteQueue {
            tx: self.jobs.clone(),
            hold: self.hold.clone(),
        }
    }

    /// Batches the writer has committed (or tried to) since the store was opened.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// The answer to a write queued with [`WriteQueue::submit`] by another thread, within
    /// the bound of [`Store::write`] counted from when it was queued: `queued_at` says when
    /// (None: not yet; the caller bounds that part of its wait itself). A reply dropped
    /// unanswered is [`StoreError::Unavailable`].
    pub async fn answer(
        &self,
        rx: oneshot::Receiver<WriteResult>,
        queued_at: impl Fn() -> Option<Instant>,
    ) -> WriteResult {
        let answer = async {
            rx.await
                .map_err(|_| StoreError::Unavailable("the write was not queued".into()))?
        };
        if self.pg.is_none() {
            return answer.await;
        }
        let mut answer = std::pin::pin!(answer);
        loop {
            let from = queued_at().unwrap_or_else(Instant::now);
            if let Ok(r) = tokio::time::timeout_at((from + postgres::WRITE_WAIT).into(), &mut answer).await {
                return r;
            }
            // Not queued when this wait began (the signature was still being made), or
            // queued since: the bound runs from then.
            if queued_at().is_some_and(|t| t.elapsed() >= postgres::WRITE_WAIT) {
                return Err(postgres::no_answer());
            }
        }
    }

    /// PostgreSQL: a caller is answered within a bound even when the database stopped
    /// answering; the write may still commit later (ADR 0011, "Faults").
    async fn bounded(&self, answer: impl std::future::Future<Output = WriteResult>) -> WriteResult {
        if self.pg.is_none() {
            return answer.await;
        }
        tokio::time::timeout(postgres::WRITE_WAIT, answer)
            .await
            .unwrap_or_else(|_| Err(postgres::no_answer()))
    }

    /// Appends an audit entry alone (a refusal, say).
    pub async fn audit(&self, audit: AuditRecord) -> Result<(), StoreError> {
        self.write(Vec::new(), audit).await.map(|_| ())
    }

    /// A trivial query: is the database answering?
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.read().execute("SELECT 1", &[]).await?;
        Ok(())
    }

    /// The lease on the periodic `task`: whoever holds it is the one process that runs it.
    /// On SQLite the single serving process always holds it.
    pub fn lease(&self, task: &str) -> Lease {
        Lease(match &self.pg {
            None => LeaseInner::Local,
            Some(opts) => LeaseInner::Pg(Box::new(postgres::PgLease::new(opts, task))),
        })
    }

    pub async fn api_token_by_hash(&self, hash: &[u8]) -> Result<Option<ApiTokenRow>, StoreError> {
        Ok(self
            .read()
            .fetch_optional(
                "SELECT id, name, token_hash, scopes, created_at, expires_at, created_by
                 FROM api_tokens WHERE token_hash = $1",
                &[Arg::Bytes(hash)],
            )
            .await?)
    }

    pub async fn api_tokens(&self) -> Result<Vec<ApiTokenRow>, StoreError> {
        Ok(self
            .read()
            .fetch_all(
                "SELECT id, name, token_hash, scopes, created_at, expires_at, created_by
                 FROM api_tokens ORDER BY created_at, id",
                &[],
            )
            .await?)
    }

    pub async fn signing_keys(&self) -> Result<Vec<SigningKeyRow>, StoreError> {
        Ok(self
            .read()
            .fetch_all(
                "SELECT kid, uri, backend, device, state, jwk, certificate, created_at, activated_at,
                        retire_at, activate_at, destroyed_at
                 FROM signing_keys ORDER BY created_at, kid",
                &[],
            )
            .await?)
    }

    /// The issued token with this `jti` and its status.
    pub async fn issued_token(&self, jti: &str) -> Result<Option<(IssuedToken, TokenStatus)>, StoreError> {
        let row: Option<rows::IssuedWithStatus> = self
            .read()
            .fetch_optional(
                "SELECT jti, kid, sub, aud, scopes, iat, nbf, exp, one_time, cnf_jkt, issued_by,
                        redeemed_at, revoked_at
                 FROM issued_tokens WHERE jti = $1",
                &[Arg::Text(jti)],
            )
            .await?;
        Ok(row.map(|r| (r.token, r.status)))
    }

    /// Audit entries with `seq > after`, oldest first.
    pub async fn audit_entries(&self, after: i64, limit: i64) -> Result<Vec<AuditEntry>, StoreError> {
        let rows: Vec<rows::AuditRow> = self
            .read()
            .fetch_all(
                "SELECT seq, at, actor, action, target, outcome, remote_addr, prev_hash, hash
                 FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2",
                &[Arg::Int(after), Arg::Int(limit)],
            )
            .await?;
        Ok(rows.into_iter().map(AuditEntry::from).collect())
    }

    /// Unexpired revocations with `seq > after` at time `now`, in `seq` order.
    pub async fn revocations(&self, after: i64, now: i64) -> Result<Vec<RevocationRow>, StoreError> {
        let rows: Vec<(i64, String, i64, i64, Option<String>)> = self
            .read()
            .fetch_all(
                "SELECT seq, jti, exp, revoked_at, reason FROM revocations WHERE seq > $1 AND exp > $2 ORDER BY seq",
                &[Arg::Int(after), Arg::Int(now)],
            )
            .await?;
        Ok(rows
            .into_iter()
            .map(|(seq, jti, exp, revoked_at, reason)| RevocationRow {
                seq,
                jti,
                exp,
                revoked_at,
                reason,
            })
            .collect())
    }

    /// The newest revocation's seq (0 when there is none).
    pub async fn revocation_seq(&self) -> Result<i64, StoreError> {
        let r: (Option<i64>,) = self
            .read()
            .fetch_one("SELECT max(seq) FROM revocations", &[])
            .await?;
        Ok(r.0.unwrap_or(0))
    }

    /// How many tokens and certificates signed by `kid` are valid at `now` or later, and the
    /// latest end (`exp`, certificate `notAfter`) of any of them (None: it signed none). A key
    /// stays published, and its CA signs CRLs, until both have passed.
    pub async fn tokens_signed_by(&self, kid: &str, now: i64) -> Result<(i64, Option<i64>), StoreError> {
        Ok(self
            .read()
            .fetch_one(
                "SELECT (SELECT count(*) FROM issued_tokens WHERE kid = $1 AND exp > $2)
                      + (SELECT count(*) FROM certificates WHERE kid = $1 AND not_after > $2),
                        (SELECT max(t) FROM (SELECT exp AS t FROM issued_tokens WHERE kid = $1
                                             UNION ALL
                                             SELECT not_after FROM certificates WHERE kid = $1) AS ends)",
                &[Arg::Text(kid), Arg::Int(now)],
            )
            .await?)
    }

    /// A cheap summary of every key's state: it changes whenever any key changes state
    /// (another replica rotated, say).
    pub async fn key_states(&self) -> Result<String, StoreError> {
        let rows: Vec<(String, String, String, Option<i64>)> = self
            .read()
            .fetch_all(
                "SELECT kid, device, state, activate_at FROM signing_keys ORDER BY kid",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|(kid, dev, state, at)| format!("{kid}:{dev}:{state}:{}", at.unwrap_or(0)))
            .collect::<Vec<_>>()
            .join(","))
    }

    /// True when a DPoP proof with this id (`<jkt>.<jti>`) was accepted before.
    pub async fn dpop_proof_seen(&self, id: &str) -> Result<bool, StoreError> {
        let r: Option<(i32,)> = self
            .read()
            .fetch_optional("SELECT 1 FROM dpop_proofs WHERE id = $1", &[Arg::Text(id)])
            .await?;
        Ok(r.is_some())
    }

    /// Forgets DPoP proof ids whose window has passed.
    pub async fn prune_dpop_proofs(&self, now: i64) -> Result<u64, StoreError> {
        Ok(self
            .read()
            .execute("DELETE FROM dpop_proofs WHERE exp < $1", &[Arg::Int(now)])
            .await?)
    }

    /// Deletes the checkpoints signed before `before` (Unix seconds) but the newest of each
    /// hour. The newest checkpoint alone covers the whole chain (each entry hashes the one
    /// before it); the hourly ones keep a trail that does not depend on one signature.
    pub async fn thin_checkpoints(&self, before: i64) -> Result<u64, StoreError> {
        Ok(self
            .read()
            .execute(
                "DELETE FROM audit_checkpoints WHERE at < $1 AND seq NOT IN
                 (SELECT MAX(seq) FROM audit_checkpoints GROUP BY at / 3600)",
                &[Arg::Int(before)],
            )
            .await?)
    }

    /// Records a signed checkpoint (idempotent for the same seq).
    pub async fn add_checkpoint(&self, c: &crate::audit::Checkpoint) -> Result<(), StoreError> {
        self.read()
            .execute(
                "INSERT INTO audit_checkpoints (seq, hash, kid, signature, at) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT DO NOTHING",
                &[
                    Arg::Int(c.seq),
                    Arg::Text(&c.hash),
                    Arg::Text(&c.kid),
                    Arg::Text(&c.signature),
                    Arg::Int(crate::token::verify::now()),
                ],
            )
            .await?;
        Ok(())
    }

    /// Checkpoints with `seq` in `(after, upto]`, oldest first.
    pub async fn checkpoints(
        &self,
        after: i64,
        upto: i64,
    ) -> Result<Vec<crate::audit::Checkpoint>, StoreError> {
        let rows: Vec<(i64, String, String, String)> = self
            .read()
            .fetch_all(
                "SELECT seq, hash, kid, signature FROM audit_checkpoints WHERE seq > $1 AND seq <= $2 ORDER BY seq",
                &[Arg::Int(after), Arg::Int(upto)],
            )
            .await?;
        Ok(rows
            .into_iter()
            .map(|(seq, hash, kid, signature)| crate::audit::Checkpoint {
                seq,
                hash,
                kid,
                signature,
            })
            .collect())
    }

    /// Unix times of the newest audit entry and of the newest signed checkpoint.
    pub async fn audit_times(&self) -> Result<(Option<i64>, Option<i64>), StoreError> {
        Ok(self
            .read()
            .fetch_one(
                "SELECT (SELECT max(at) FROM audit_log), (SELECT max(at) FROM audit_checkpoints)",
                &[],
            )
            .await?)
    }

    /// (seq, hash) of the newest audit entry, if any.
    pub async fn audit_head(&self) -> Result<Option<(i64, String)>, StoreError> {
        Ok(self
            .read()
            .fetch_optional("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1", &[])
            .await?)
    }

    /// Row counts of (issued_tokens, api_tokens, audit_log).
    pub async fn counts(&self) -> Result<(i64, i64, i64), StoreError> {
        Ok(self
            .read()
            .fetch_one(
                "SELECT (SELECT count(*) FROM issued_tokens), (SELECT count(*) FROM api_tokens),
                        (SELECT count(*) FROM audit_log)",
                &[],
            )
            .await?)
    }

    /// Closes the pool after the writer drains.
    pub async fn close(self) {
        drop(self.jobs);
        self.pool.close().await;
    }
}

/// The right to run one periodic task, held by one process at a time: on PostgreSQL a
/// session advisory lock on a connection of its own, freed by the database when the
/// process or its connection dies.
pub struct Lease(LeaseInner);

enum LeaseInner {
    Local,
    Pg(Box<postgres::PgLease>),
}

impl Lease {
    /// True when this process holds the lease now: a held lease is checked (its connection
    /// must answer), a free one is taken. Never waits more than about 2 s.
    pub async fn hold(&mut self) -> bool {
        match &mut self.0 {
            LeaseInner::Local => true,
            LeaseInner::Pg(l) => l.hold().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_round_trip_as_payloads() {
        for c in [
            Change::Revoked,
            Change::Keys,
            Change::Resync,
            Change::ApiTokenDeleted("at_0011".into()),
        ] {
            assert_eq!(Change::from_payload(&c.to_payload()), Some(c));
        }
        assert_eq!(Change::from_payload("nonsense"), None);
    }
}
