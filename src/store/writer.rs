//! The single writer: group commit with per-write savepoints and the audit hash chain.

use sqlx::{Row, Sqlite, SqlitePool, Transaction};
use tokio::sync::mpsc;

use super::rows::{ApiTokenRow, IssuedToken, SigningKeyRow};
use super::{Job, StoreError};
use crate::audit::{self, AuditRecord};

/// Most writes committed in one transaction.
const MAX_BATCH: usize = 512;

/// One change to apply with an audit entry.
#[derive(Debug, Clone)]
pub enum WriteOp {
    InsertIssued(IssuedToken),
    InsertApiToken(ApiTokenRow),
    /// Deletes an API token by id; affected = 0 when there was none.
    DeleteApiToken(String),
    InsertSigningKey(SigningKeyRow),
}

/// (seq, hash) of the last audit entry.
pub(super) async fn chain_head(pool: &SqlitePool) -> Result<(i64, String), StoreError> {
    let row = sqlx::query("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
        .fetch_optional(pool)
        .await?;
    Ok(match row {
        Some(r) => (r.try_get(0)?, r.try_get(1)?),
        None => (0, audit::GENESIS.to_owned()),
    })
}

pub(super) async fn run(pool: SqlitePool, mut rx: mpsc::Receiver<Job>, mut head: (i64, String)) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let jobs = std::mem::take(&mut batch);
        match commit_batch(&pool, &jobs, &head).await {
            Ok((results, new_head)) => {
                head = new_head;
                for (job, res) in jobs.into_iter().zip(results) {
                    let _ = job.reply.send(res);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, writes = jobs.len(), "store commit failed");
                for job in jobs {
                    let _ = job.reply.send(Err(StoreError::Unavailable(e.to_string())));
                }
                // The chain head in memory may be ahead of the database now.
                match chain_head(&pool).await {
                    Ok(h) => head = h,
                    Err(e) => tracing::error!(error = %e, "cannot reload audit chain head"),
                }
            }
        }
    }
}

type BatchResult = (Vec<Result<Vec<u64>, StoreError>>, (i64, String));

async fn commit_batch(
    pool: &SqlitePool,
    jobs: &[Job],
    head: &(i64, String),
) -> Result<BatchResult, StoreError> {
    let mut tx = pool.begin().await?;
    let mut head = head.clone();
    let mut results = Vec::with_capacity(jobs.len());
    for job in jobs {
        let mut sp = sqlx::Acquire::begin(&mut tx).await?;
        match apply(&mut sp, job, &head).await {
            Ok((affected, new_head)) => {
                sp.commit().await?;
                head = new_head;
                results.push(Ok(affected));
            }
            Err(e) => {
                sp.rollback().await?;
                results.push(Err(e));
            }
        }
    }
    tx.commit().await?;
    Ok((results, head))
}

async fn apply(
    tx: &mut Transaction<'_, Sqlite>,
    job: &Job,
    head: &(i64, String),
) -> Result<(Vec<u64>, (i64, String)), StoreError> {
    let mut affected = Vec::with_capacity(job.ops.len());
    for op in &job.ops {
        affected.push(apply_op(tx, op).await?);
    }
    let (seq, at) = (head.0 + 1, crate::token::verify::now());
    let hash = audit::chain_hash(&head.1, seq, at, &job.audit);
    append_audit(tx, seq, at, &job.audit, &head.1, &hash).await?;
    Ok((affected, (seq, hash)))
}

async fn append_audit(
    tx: &mut Transaction<'_, Sqlite>,
    seq: i64,
    at: i64,
    r: &AuditRecord,
    prev: &str,
    hash: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO audit_log (seq, at, actor, action, target, outcome, remote_addr, prev_hash, hash)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(seq)
    .bind(at)
    .bind(&r.actor)
    .bind(&r.action)
    .bind(&r.target)
    .bind(&r.outcome)
    .bind(&r.remote_addr)
    .bind(prev)
    .bind(hash)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn apply_op(tx: &mut Transaction<'_, Sqlite>, op: &WriteOp) -> Result<u64, StoreError> {
    let done = match op {
        WriteOp::InsertIssued(t) => {
            sqlx::query(
                "INSERT INTO issued_tokens (jti, kid, sub, aud, scopes, iat, nbf, exp, one_time, cnf_jkt, issued_by)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(&t.jti)
            .bind(&t.kid)
            .bind(&t.sub)
            .bind(&t.aud)
            .bind(&t.scopes)
            .bind(t.iat)
            .bind(t.nbf)
            .bind(t.exp)
            .bind(t.one_time as i64)
            .bind(&t.cnf_jkt)
            .bind(&t.issued_by)
            .execute(&mut **tx)
            .await?
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
            sqlx::query("DELETE FROM api_tokens WHERE id = ?").bind(id).execute(&mut **tx).await?
        }
        WriteOp::InsertSigningKey(k) => {
            sqlx::query(
                "INSERT INTO signing_keys (kid, uri, backend, state, jwk, certificate, created_at, activated_at, retire_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
            .execute(&mut **tx)
            .await?
        }
    };
    Ok(done.rows_affected())
}
