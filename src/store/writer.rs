//! The single writer: group commit, the audit hash chain, and bulk statements.
//!
//! The writer owns one connection. Each batch of queued writes is one `BEGIN IMMEDIATE`
//! transaction. Under load every statement sent to sqlx's SQLite worker thread costs a
//! thread hand-off that waits for a CPU, so the fast path sends the whole batch as ONE
//! multi-statement query: `BEGIN IMMEDIATE; INSERT tokens...; INSERT audit...; COMMIT`
//! (docs/benchmarks.md). It applies to batches of issued tokens and bare audit entries.
//!
//! The audit chain head is kept in memory and checked by the database: `seq` is the primary
//! key, so if another process appended to the log meanwhile, the batch collides on `seq`,
//! rolls back, and is redone on the careful path. The careful path reads the head inside its
//! transaction and applies each write under its own savepoint, so one bad write fails alone
//! and leaves no trace, not even its audit entry.

use sqlx::sqlite::SqliteConnection;
use sqlx::{Connection, Executor, QueryBuilder, Row, Sqlite, Transaction};
use tokio::sync::mpsc;

use super::rows::{ApiTokenRow, IssuedToken, SigningKeyRow};
use super::{Job, Refusal, StoreError};
use crate::audit::{self, AuditRecord};

/// Most writes committed in one transaction (also bounds bulk statement parameters:
/// 512 x 11 < SQLite's 32766).
const MAX_BATCH: usize = 512;

/// One change to apply with an audit entry.
#[derive(Debug, Clone)]
pub enum WriteOp {
    InsertIssued(IssuedToken),
    InsertApiToken(ApiTokenRow),
    /// Deletes an API token by id; fails with [`StoreError::NotFound`] when there is none,
    /// so a refused delete leaves no audit entry.
    DeleteApiToken(String),
    InsertSigningKey(SigningKeyRow),
    /// Marks an issued token revoked and appends it to the revocation list; affected = 0
    /// when it was revoked already (idempotent), NotFound when there is no such token.
    Revoke {
        jti: String,
        at: i64,
        reason: Option<String>,
    },
    /// Redeems an issued token: records the DPoP proof id first (a replay is refused), then
    /// sets `redeemed_at` unless the token is revoked or is one-time and redeemed already.
    /// Refusals are [`StoreError::Refused`]; nothing of a refused redemption stays.
    Redeem {
        jti: String,
        at: i64,
        /// (`<jkt>.<jti>` of the proof, until when to remember it)
        proof: Option<(String, i64)>,
    },
    /// Moves a signing key from state `from` to `to`, setting the named time columns;
    /// refused ([`Refusal::KeyState`]) when the key is not in `from`.
    SetKeyState {
        kid: String,
        from: &'static str,
        to: &'static str,
        activated_at: Option<i64>,
        retire_at: Option<i64>,
        retired_at: Option<i64>,
    },
    /// Records that a retired key was removed from the device.
    KeyDestroyed {
        kid: String,
        at: i64,
    },
    /// Challenges and machines (`enroll.rs`).
    Enroll(super::EnrollOp),
}

/// (seq, hash) of the last audit entry, read through `exec`.
async fn chain_head<'e, E: sqlx::SqliteExecutor<'e>>(exec: E) -> Result<(i64, String), StoreError> {
    let row = sqlx::query("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
        .fetch_optional(exec)
        .await?;
    Ok(match row {
        Some(r) => (r.try_get(0)?, r.try_get(1)?),
        None => (0, audit::GENESIS.to_owned()),
    })
}

pub(super) async fn run(mut conn: SqliteConnection, mut rx: mpsc::Receiver<Job>) {
    let mut head = match chain_head(&mut conn).await {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::error!(error = %e, "cannot read the audit chain head");
            None
        }
    };
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let jobs = std::mem::take(&mut batch);
        let fast = match &head {
            Some(h) if jobs.iter().all(Job::bulk_ok) => Some(commit_bulk(&mut conn, &jobs, h).await),
            _ => None,
        };
        let results = match fast {
            Some(Ok((results, new_head))) => {
                head = Some(new_head);
                results
            }
            failed_or_not_tried => {
                if let Some(Err(e)) = failed_or_not_tried {
                    tracing::debug!(error = %e, writes = jobs.len(), "batch failed; writing one by one");
                    // Leave no transaction open behind a failed multi-statement query.
                    let _ = conn.execute("ROLLBACK").await;
                }
                match commit_each(&mut conn, &jobs).await {
                    Ok((results, new_head)) => {
                        head = Some(new_head);
                        results
                    }
                    Err(e) => {
                        tracing::error!(error = %e, writes = jobs.len(), "store commit failed");
                        head = None;
                        jobs.iter()
                            .map(|_| Err(StoreError::Unavailable(e.to_string())))
                            .collect()
                    }
                }
            }
        };
        for (job, res) in jobs.into_iter().zip(results) {
            let _ = job.reply.send(res);
        }
    }
}

impl Job {
    /// True for writes the fast path handles: issued tokens and bare audit entries.
    fn bulk_ok(&self) -> bool {
        self.ops.iter().all(|op| matches!(op, WriteOp::InsertIssued(_)))
    }
}

type Results = Vec<Result<Vec<u64>, StoreError>>;

/// Chain positions for `jobs` after `head`: (seq, at, prev_hash, hash) each.
fn chain(jobs: &[&Job], head: &(i64, String)) -> Vec<(i64, i64, String, String)> {
    let at = crate::token::verify::now();
    let (mut seq, mut prev) = head.clone();
    jobs.iter()
        .map(|j| {
            seq += 1;
            let hash = audit::chain_hash(&prev, seq, at, &j.audit);
            (seq, at, std::mem::replace(&mut prev, hash.clone()), hash)
        })
        .collect()
}

/// The fast path: the whole batch as one multi-statement query (one worker round trip).
async fn commit_bulk(
    conn: &mut SqliteConnection,
    jobs: &[Job],
    head: &(i64, String),
) -> Result<(Results, (i64, String)), StoreError> {
    let issued: Vec<&IssuedToken> = jobs
        .iter()
        .flat_map(|j| &j.ops)
        .filter_map(|op| match op {
            WriteOp::InsertIssued(t) => Some(t),
            _ => None,
        })
        .collect();
    let all: Vec<&Job> = jobs.iter().collect();
    let links = chain(&all, head);
    let mut qb = QueryBuilder::<Sqlite>::new("BEGIN IMMEDIATE; ");
    if !issued.is_empty() {
        push_issued(&mut qb, &issued);
        qb.push("; ");
    }
    push_audit(&mut qb, &all, &links);
    qb.push("; COMMIT");
    // Prepared statements are cached per batch size (sqlx keeps the last 100); under load
    // the sizes repeat, so most batches skip parsing the SQL.
    qb.build().execute(&mut *conn).await?;
    let results = jobs.iter().map(|j| Ok(vec![1; j.ops.len()])).collect();
    let new_head = links
        .last()
        .map(|(seq, _, _, hash)| (*seq, hash.clone()))
        .unwrap_or_else(|| head.clone());
    Ok((results, new_head))
}

/// The careful path: one savepoint per write; a failing write is rolled back alone.
async fn commit_each(
    conn: &mut SqliteConnection,
    jobs: &[Job],
) -> Result<(Results, (i64, String)), StoreError> {
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
    let mut head = chain_head(&mut *tx).await?;
    let mut results = Vec::with_capacity(jobs.len());
    for job in jobs {
        let mut sp = sqlx::Acquire::begin(&mut tx).await?;
        let applied: Result<Vec<u64>, StoreError> = async {
            let mut affected = Vec::with_capacity(job.ops.len());
            for op in &job.ops {
                affected.push(apply_op(&mut sp, op).await?);
            }
            let link = chain(&[job], &head);
            insert_audit(&mut sp, &[job], &link).await?;
            if let Some((seq, _, _, hash)) = link.into_iter().next() {
                head = (seq, hash);
            }
            Ok(affected)
        }
        .await;
        match applied {
            Ok(a) => {
                sp.commit().await?;
                results.push(Ok(a));
            }
            Err(e) => {
                sp.rollback().await?;
                // The chain head in memory may have moved past what was rolled back.
                head = chain_head(&mut *tx).await?;
                results.push(Err(e));
            }
        }
    }
    tx.commit().await?;
    Ok((results, head))
}

async fn insert_issued(tx: &mut Transaction<'_, Sqlite>, rows: &[&IssuedToken]) -> Result<(), StoreError> {
    let mut qb = QueryBuilder::<Sqlite>::new("");
    push_issued(&mut qb, rows);
    qb.build().persistent(false).execute(&mut **tx).await?;
    Ok(())
}

fn push_issued<'a>(qb: &mut QueryBuilder<'a, Sqlite>, rows: &[&'a IssuedToken]) {
    qb.push("INSERT INTO issued_tokens (jti, kid, sub, aud, scopes, iat, nbf, exp, one_time, cnf_jkt, issued_by) ");
    qb.push_values(rows, |mut b, t| {
        b.push_bind(&t.jti)
            .push_bind(&t.kid)
            .push_bind(&t.sub)
            .push_bind(&t.aud)
            .push_bind(&t.scopes)
            .push_bind(t.iat)
            .push_bind(t.nbf)
            .push_bind(t.exp)
            .push_bind(t.one_time as i64)
            .push_bind(&t.cnf_jkt)
            .push_bind(&t.issued_by);
    });
}

async fn insert_audit(
    tx: &mut Transaction<'_, Sqlite>,
    jobs: &[&Job],
    links: &[(i64, i64, String, String)],
) -> Result<(), StoreError> {
    let mut qb = QueryBuilder::<Sqlite>::new("");
    push_audit(&mut qb, jobs, links);
    qb.build().persistent(false).execute(&mut **tx).await?;
    Ok(())
}

fn push_audit<'a>(
    qb: &mut QueryBuilder<'a, Sqlite>,
    jobs: &[&'a Job],
    links: &'a [(i64, i64, String, String)],
) {
    qb.push("INSERT INTO audit_log (seq, at, actor, action, target, outcome, remote_addr, prev_hash, hash) ");
    qb.push_values(jobs.iter().zip(links), |mut b, (job, (seq, at, prev, hash))| {
        let r: &'a AuditRecord = &job.audit;
        b.push_bind(*seq)
            .push_bind(*at)
            .push_bind(&r.actor)
            .push_bind(&r.action)
            .push_bind(&r.target)
            .push_bind(&r.outcome)
            .push_bind(&r.remote_addr)
            .push_bind(prev)
            .push_bind(hash);
    });
}

async fn apply_op(tx: &mut Transaction<'_, Sqlite>, op: &WriteOp) -> Result<u64, StoreError> {
    let done = match op {
        WriteOp::InsertIssued(t) => {
            insert_issued(tx, &[t]).await?;
            return Ok(1);
        }
        WriteOp::InsertApiToken(t) => {
            sqlx::query(
                "INSERT INTO api_tokens (id, name, token_hash, scopes, created_at, expires_at, created_by)
                 VALUES (?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(&t.id)
            .bind(&t.name)
            .bind(&t.token_hash)
            .bind(&t.scopes)
            .bind(t.created_at)
            .bind(t.expires_at)
            .bind(&t.created_by)
            .execute(&mut **tx)
            .await?
        }
        WriteOp::DeleteApiToken(id) => {
            let r = sqlx::query("DELETE FROM api_tokens WHERE id = ?").bind(id).execute(&mut **tx).await?;
            if r.rows_affected() == 0 {
                return Err(StoreError::NotFound(format!("API token {id}")));
            }
            r
        }
        WriteOp::Revoke { jti, at, reason } => {
            let r = sqlx::query(
                "UPDATE issued_tokens SET revoked_at = ?, revoke_reason = ? WHERE jti = ? AND revoked_at IS NULL",
            )
            .bind(at)
            .bind(reason)
            .bind(jti)
            .execute(&mut **tx)
            .await?;
            if r.rows_affected() == 0 {
                let known: Option<(i64,)> = sqlx::query_as("SELECT 1 FROM issued_tokens WHERE jti = ?")
                    .bind(jti)
                    .fetch_optional(&mut **tx)
                    .await?;
                if known.is_none() {
                    return Err(StoreError::NotFound(format!("token {jti}")));
                }
                return Ok(0);
            }
            sqlx::query(
                "INSERT INTO revocations (jti, exp, revoked_at, reason) SELECT jti, exp, revoked_at, revoke_reason FROM issued_tokens WHERE jti = ?",
            )
            .bind(jti)
            .execute(&mut **tx)
            .await?
        }
        WriteOp::Redeem { jti, at, proof } => return redeem(tx, jti, *at, proof.as_ref()).await,
        WriteOp::Enroll(op) => return super::enroll::apply(tx, op).await,
        WriteOp::SetKeyState {
            kid,
            from,
            to,
            activated_at,
            retire_at,
            retired_at,
        } => {
            let r = sqlx::query(
                "UPDATE signing_keys SET state = ?,
                    activated_at = coalesce(?, activated_at),
                    retire_at = coalesce(?, retire_at),
                    retired_at = coalesce(?, retired_at),
                    activate_at = CASE WHEN ? = 'next' THEN activate_at ELSE NULL END
                 WHERE kid = ? AND state = ?",
            )
            .bind(to)
            .bind(activated_at)
            .bind(retire_at)
            .bind(retired_at)
            .bind(to)
            .bind(kid)
            .bind(from)
            .execute(&mut **tx)
            .await?;
            if r.rows_affected() == 0 {
                return Err(StoreError::Refused(Refusal::KeyState));
            }
            r
        }
        WriteOp::KeyDestroyed { kid, at } => {
            let r = sqlx::query(
                "UPDATE signing_keys SET destroyed_at = ? WHERE kid = ? AND state = 'retired' AND destroyed_at IS NULL",
            )
            .bind(at)
            .bind(kid)
            .execute(&mut **tx)
            .await?;
            if r.rows_affected() == 0 {
                return Err(StoreError::Refused(Refusal::KeyState));
            }
            r
        }
        WriteOp::InsertSigningKey(k) => {
            sqlx::query(
                "INSERT INTO signing_keys (kid, uri, backend, state, jwk, certificate, created_at, activated_at, retire_at, activate_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(&k.kid)
            .bind(&k.uri)
            .bind(&k.backend)
            .bind(&k.state)
            .bind(&k.jwk)
            .bind(&k.certificate)
            .bind(k.created_at)
            .bind(k.activated_at)
            .bind(k.retire_at)
            .bind(k.activate_at)
            .execute(&mut **tx)
            .await?
        }
    };
    Ok(done.rows_affected())
}

/// The conditional redemption of [`WriteOp::Redeem`]; 1 when redeemed.
async fn redeem(
    tx: &mut Transaction<'_, Sqlite>,
    jti: &str,
    at: i64,
    proof: Option<&(String, i64)>,
) -> Result<u64, StoreError> {
    if let Some((id, exp)) = proof {
        let r = sqlx::query("INSERT OR IGNORE INTO dpop_proofs (id, exp) VALUES (?, ?)")
            .bind(id)
            .bind(exp)
            .execute(&mut **tx)
            .await?;
        if r.rows_affected() == 0 {
            return Err(StoreError::Refused(Refusal::DpopReplay));
        }
    }
    // One statement decides: concurrent redemptions serialize on the write lock, and only the
    // first finds `redeemed_at IS NULL`.
    let r = sqlx::query(
        "UPDATE issued_tokens SET redeemed_at = coalesce(redeemed_at, ?)
         WHERE jti = ? AND revoked_at IS NULL AND (one_time = 0 OR redeemed_at IS NULL)",
    )
    .bind(at)
    .bind(jti)
    .execute(&mut **tx)
    .await?;
    if r.rows_affected() == 1 {
        return Ok(1);
    }
    let state: Option<(Option<i64>, Option<i64>)> =
        sqlx::query_as("SELECT revoked_at, redeemed_at FROM issued_tokens WHERE jti = ?")
            .bind(jti)
            .fetch_optional(&mut **tx)
            .await?;
    Err(match state {
        None => StoreError::NotFound(format!("token {jti}")),
        Some((Some(_), _)) => StoreError::Refused(Refusal::Revoked),
        Some(_) => StoreError::Refused(Refusal::Redeemed),
    })
}
