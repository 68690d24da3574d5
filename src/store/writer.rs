//! The single writer of each process: group commit, the audit hash chain, bulk statements.
//!
//! The writer owns one connection. Each batch of queued writes is one transaction that holds
//! the database's write lock (SQLite `BEGIN IMMEDIATE`; PostgreSQL an advisory lock shared by
//! every replica, `postgres.rs`) and commits concurrent writes together: a write is durable,
//! and audited, before its caller hears "done", without one sync per request.
//!
//! - The **fast path** (batches of issued tokens and bare audit entries: all the hot
//!   traffic) writes every row of the batch with one statement (`sqlite.rs`, `postgres.rs`).
//! - The **careful path** (everything else, and any batch whose fast path failed) applies
//!   each write under its own savepoint, so one bad write fails alone and leaves no trace,
//!   not even its audit entry ([`commit_each`], shared by both databases).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot};

use super::db::{Arg, Exec};
use super::failures::CommitFailures;
use super::rows::{ApiTokenRow, IssuedToken, SigningKeyRow};
use super::{Change, Refusal, StoreError, StoreKind};
use crate::audit::{self, AuditRecord};

/// Most writes committed in one transaction (also bounds statement parameters:
/// 512 x 20 < SQLite's 32766 and PostgreSQL's 65535).
pub(super) const MAX_BATCH: usize = 512;
/// Most writes in one careful-path transaction: each costs a few statements (on PostgreSQL
/// round trips) under the write lock, so a burst is committed in several short
/// transactions rather than one that outlives its timeout.
const MAX_CAREFUL: usize = 64;

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
    /// Gives keys recorded without a device (before several devices existed) to `device`.
    AdoptKeys {
        kids: Vec<String>,
        device: String,
    },
    /// Challenges and machines (`enroll.rs`).
    Enroll(super::EnrollOp),
    /// Certificates (`certs.rs`).
    Cert(super::CertOp),
}

/// A queued write and where its result goes.
pub(super) struct Job {
    pub(super) ops: Vec<WriteOp>,
    pub(super) audit: AuditRecord,
    pub(super) reply: oneshot::Sender<Result<Vec<u64>, StoreError>>,
}

impl Job {
    /// True for writes the fast path handles: issued tokens and bare audit entries.
    pub(super) fn bulk_ok(&self) -> bool {
        self.ops.iter().all(|op| matches!(op, WriteOp::InsertIssued(_)))
    }
}

/// What one job did: rows affected per op, and the changes other readers must hear of.
pub(super) type Applied = (Vec<u64>, Vec<Change>);

/// The outcome of a committed batch: per job, and the chain head after it.
pub(super) struct Batch {
    pub(super) results: Vec<Result<Applied, StoreError>>,
    pub(super) head: (i64, String),
}

/// The writer's connection.
pub(super) enum Conn {
    Sqlite(super::sqlite::SqliteWriter),
    Postgres(Box<super::postgres::PgWriter>),
}

/// Runs until every [`super::Store`] handle is gone, then closes `pool` (which ends the
/// change listener too). A batch is held open up to `hold` while writes are announced
/// (`queue.rs`); `commits` counts the batches written.
pub(super) async fn run(
    mut conn: Conn,
    mut rx: mpsc::Receiver<Job>,
    changes: broadcast::Sender<Change>,
    pool: super::db::Pool,
    shared: Arc<super::queue::Hold>,
    hold: Duration,
    commits: Arc<AtomicU64>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut failures = CommitFailures::default();
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        super::queue::gather(&mut rx, &mut batch, &shared, hold).await;
        // A caller that stopped waiting (PostgreSQL: `Store::write` answers within a bound)
        // was told the write failed: it must not happen behind its back now.
        batch.retain(|j| !j.reply.is_closed());
        let jobs = std::mem::take(&mut batch);
        if jobs.iter().all(Job::bulk_ok) {
            commit(&mut conn, jobs, &changes, &commits, &mut failures).await;
        } else {
            let mut jobs = jobs;
            while !jobs.is_empty() {
                let rest = jobs.split_off(jobs.len().min(MAX_CAREFUL));
                commit(&mut conn, jobs, &changes, &commits, &mut failures).await;
                jobs = rest;
            }
        }
    }
    pool.close().await;
}

/// Commits `jobs` as one batch and answers each caller.
async fn commit(
    conn: &mut Conn,
    jobs: Vec<Job>,
    changes: &broadcast::Sender<Change>,
    commits: &AtomicU64,
    failures: &mut CommitFailures,
) {
    if jobs.is_empty() {
        return;
    }
    commits.fetch_add(1, Ordering::Relaxed);
    metrics::histogram!("keygate_store_batch_writes").record(jobs.len() as f64);
    let outcome = match conn {
        Conn::Sqlite(w) => w.commit(&jobs).await,
        Conn::Postgres(w) => w.commit(&jobs).await,
    };
    let results: Vec<Result<Applied, StoreError>> = match outcome {
        Ok(b) => {
            failures.committed();
            b.results
        }
        Err(e) => {
            failures.failed(&e, jobs.len());
            jobs.iter().map(|_| Err(failed_batch(&e))).collect()
        }
    };
    for (job, res) in jobs.into_iter().zip(results) {
        let reply = res.map(|(affected, made)| {
            for c in made {
                // Nobody listening is not an error.
                let _ = changes.send(c);
            }
            affected
        });
        let _ = job.reply.send(reply);
    }
}

/// What each write of a batch whose commit failed with `e` is answered: the store is
/// unavailable, for the reason `e` gives (once: an `Unavailable` is not wrapped again).
fn failed_batch(e: &StoreError) -> StoreError {
    StoreError::Unavailable(match e {
        StoreError::Unavailable(why) => why.clone(),
        other => other.to_string(),
    })
}

/// Chain positions for `jobs` after `head`: (seq, at, prev_hash, hash) each.
pub(super) fn chain<'a>(
    audits: impl Iterator<Item = &'a AuditRecord>,
    head: &(i64, String),
) -> Vec<(i64, i64, String, String)> {
    let at = crate::token::verify::now();
    let (mut seq, mut prev) = head.clone();
    audits
        .map(|r| {
            seq += 1;
            let hash = audit::chain_hash(&prev, seq, at, r);
            (seq, at, std::mem::replace(&mut prev, hash.clone()), hash)
        })
        .collect()
}

const ISSUED_COLS: &str = "jti, kid, sub, aud, scopes, iat, nbf, exp, one_time, cnf_jkt, issued_by";
const AUDIT_COLS: &str = "seq, at, actor, action, target, outcome, remote_addr, prev_hash, hash";

/// `VALUES ($k, …), (…)` for `rows` rows of `cols` values each, numbered after `first`;
/// with `first` None, anonymous `?` placeholders (SQLite: it looks a named parameter up
/// by a linear scan, so `$N` costs O(n²) over a statement of thousands).
fn values(rows: usize, cols: usize, first: Option<usize>) -> String {
    let mut s = String::with_capacity(rows * cols * 5 + 8);
    s.push_str("VALUES ");
    for r in 0..rows {
        if r > 0 {
            s.push(',');
        }
        s.push('(');
        for c in 0..cols {
            if c > 0 {
                s.push(',');
            }
            match first {
                Some(first) => {
                    s.push('$');
                    s.push_str(&(first + r * cols + c + 1).to_string());
                }
                None => s.push('?'),
            }
        }
        s.push(')');
    }
    s
}

fn issued_args<'a>(t: &'a IssuedToken, args: &mut Vec<Arg<'a>>) {
    args.extend([
        Arg::Text(&t.jti),
        Arg::Text(&t.kid),
        Arg::Text(&t.sub),
        Arg::Text(&t.aud),
        Arg::Text(&t.scopes),
        Arg::Int(t.iat),
        Arg::Int(t.nbf),
        Arg::Int(t.exp),
        Arg::Bool(t.one_time),
        Arg::OptText(t.cnf_jkt.as_deref()),
        Arg::Text(&t.issued_by),
    ]);
}

fn audit_args<'a>(r: &'a AuditRecord, link: &'a (i64, i64, String, String), args: &mut Vec<Arg<'a>>) {
    let (seq, at, prev, hash) = link;
    args.extend([
        Arg::Int(*seq),
        Arg::Int(*at),
        Arg::Text(&r.actor),
        Arg::Text(&r.action),
        Arg::Text(&r.target),
        Arg::Text(&r.outcome),
        Arg::Text(&r.remote_addr),
        Arg::Text(prev),
        Arg::Text(hash),
    ]);
}

/// One statement that inserts every issued token of `jobs` and their audit entries at
/// `links` (from [`chain`]): on PostgreSQL (`cte`) a data-modifying CTE with `$N`
/// placeholders, on SQLite two `INSERT OR ROLLBACK` statements with `?`, which must be the
/// whole of the caller's transaction (never inside a savepoint: a conflict undoes it all).
/// Returns the SQL and its arguments.
pub(super) fn bulk_statement<'a>(
    jobs: &'a [Job],
    links: &'a [(i64, i64, String, String)],
    cte: bool,
) -> (String, Vec<Arg<'a>>) {
    let issued: Vec<&IssuedToken> = jobs
        .iter()
        .flat_map(|j| &j.ops)
        .filter_map(|op| match op {
            WriteOp::InsertIssued(t) => Some(t),
            _ => None,
        })
        .collect();
    let mut args = Vec::with_capacity(issued.len() * 11 + jobs.len() * 9);
    for t in &issued {
        issued_args(t, &mut args);
    }
    let numbered = cte.then_some(args.len());
    let audit_values = values(jobs.len(), 9, numbered);
    for (job, link) in jobs.iter().zip(links) {
        audit_args(&job.audit, link, &mut args);
    }
    let mut sql = String::new();
    let or = if cte { "" } else { " OR ROLLBACK" };
    if !issued.is_empty() {
        let v = values(issued.len(), 11, cte.then_some(0));
        let insert = format!("INSERT{or} INTO issued_tokens ({ISSUED_COLS}) {v}");
        sql.push_str(&if cte {
            format!("WITH t AS ({insert}) ")
        } else {
            format!("{insert}; ")
        });
    }
    sql.push_str(&format!(
        "INSERT{or} INTO audit_log ({AUDIT_COLS}) {audit_values}"
    ));
    (sql, args)
}

/// The per-job outcome of a committed bulk batch.
pub(super) fn bulk_outcome(
    jobs: &[Job],
    head: &(i64, String),
    links: &[(i64, i64, String, String)],
) -> Batch {
    Batch {
        results: jobs
            .iter()
            .map(|j| Ok((vec![1; j.ops.len()], Vec::new())))
            .collect(),
        head: links
            .last()
            .map(|(seq, _, _, hash)| (*seq, hash.clone()))
            .unwrap_or_else(|| head.clone()),
    }
}

/// (seq, hash) of the last audit entry.
pub(super) async fn chain_head(ex: &mut Exec<'_>) -> Result<(i64, String), StoreError> {
    Ok(ex
        .fetch_optional::<(i64, String)>("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1", &[])
        .await?
        .unwrap_or_else(|| (0, audit::GENESIS.to_owned())))
}

/// The careful path: `begin` (which takes the write lock), the head read inside the
/// transaction, then one savepoint per job; a failing job is rolled back alone.
pub(super) async fn commit_each(ex: &mut Exec<'_>, jobs: &[Job], begin: &str) -> Result<Batch, StoreError> {
    ex.raw(begin).await?;
    let r = async {
        let mut head = chain_head(ex).await?;
        let mut results = Vec::with_capacity(jobs.len());
        for job in jobs {
            ex.execute("SAVEPOINT job", &[]).await?;
            match apply_job(ex, job, &head).await {
                Ok((applied, new_head)) => {
                    ex.execute("RELEASE SAVEPOINT job", &[]).await?;
                    head = new_head;
                    results.push(Ok(applied));
                }
                Err(e) => {
                    ex.execute("ROLLBACK TO SAVEPOINT job", &[]).await?;
                    ex.execute("RELEASE SAVEPOINT job", &[]).await?;
                    results.push(Err(e));
                }
            }
        }
        ex.execute("COMMIT", &[]).await?;
        Ok(Batch { results, head })
    }
    .await;
    if r.is_err() {
        let _ = ex.raw("ROLLBACK").await;
    }
    r
}

/// One job's ops and its audit entry after `head`.
async fn apply_job(
    ex: &mut Exec<'_>,
    job: &Job,
    head: &(i64, String),
) -> Result<(Applied, (i64, String)), StoreError> {
    let mut affected = Vec::with_capacity(job.ops.len());
    let mut changes = Vec::new();
    for op in &job.ops {
        let (n, change) = apply_op(ex, op).await?;
        affected.push(n);
        if let Some(c) = change {
            if ex.kind() == StoreKind::Postgres {
                super::postgres::notify(ex, &c).await?;
            }
            changes.push(c);
        }
    }
    let links = chain(std::iter::once(&job.audit), head);
    let mut args = Vec::with_capacity(9);
    let link = links
        .first()
        .ok_or_else(|| StoreError::Unavailable("no chain link".into()))?;
    audit_args(&job.audit, link, &mut args);
    ex.execute(
        &format!("INSERT INTO audit_log ({AUDIT_COLS}) {}", values(1, 9, Some(0))),
        &args,
    )
    .await?;
    Ok(((affected, changes), (link.0, link.3.clone())))
}

/// Applies one op; returns rows affected and the change it makes, if others must hear.
async fn apply_op(ex: &mut Exec<'_>, op: &WriteOp) -> Result<(u64, Option<Change>), StoreError> {
    let n = match op {
        WriteOp::InsertIssued(t) => {
            let mut args = Vec::with_capacity(11);
            issued_args(t, &mut args);
            ex.execute(
                &format!(
                    "INSERT INTO issued_tokens ({ISSUED_COLS}) {}",
                    values(1, 11, Some(0))
                ),
                &args,
            )
            .await?
        }
        WriteOp::InsertApiToken(t) => {
            ex.execute(
                "INSERT INTO api_tokens (id, name, token_hash, scopes, created_at, expires_at, created_by)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[
                    Arg::Text(&t.id),
                    Arg::Text(&t.name),
                    Arg::Bytes(&t.token_hash),
                    Arg::Text(&t.scopes),
                    Arg::Int(t.created_at),
                    Arg::OptInt(t.expires_at),
                    Arg::Text(&t.created_by),
                ],
            )
            .await?
        }
        WriteOp::DeleteApiToken(id) => {
            let n = ex
                .execute("DELETE FROM api_tokens WHERE id = $1", &[Arg::Text(id)])
                .await?;
            if n == 0 {
                return Err(StoreError::NotFound(format!("API token {id}")));
            }
            return Ok((n, Some(Change::ApiTokenDeleted(id.clone()))));
        }
        WriteOp::Revoke { jti, at, reason } => {
            return super::issued::revoke(ex, jti, *at, reason.as_deref()).await;
        }
        WriteOp::Redeem { jti, at, proof } => {
            return Ok((super::issued::redeem(ex, jti, *at, proof.as_ref()).await?, None));
        }
        WriteOp::Enroll(op) => return super::enroll::apply(ex, op).await,
        WriteOp::Cert(op) => return super::certs::apply(ex, op).await,
        WriteOp::SetKeyState {
            kid,
            from,
            to,
            activated_at,
            retire_at,
            retired_at,
        } => {
            let n = ex
                .execute(
                    "UPDATE signing_keys SET state = $1,
                        activated_at = coalesce($2, activated_at),
                        retire_at = coalesce($3, retire_at),
                        retired_at = coalesce($4, retired_at),
                        activate_at = CASE WHEN $1 = 'next' THEN activate_at ELSE NULL END
                     WHERE kid = $5 AND state = $6",
                    &[
                        Arg::Text(to),
                        Arg::OptInt(*activated_at),
                        Arg::OptInt(*retire_at),
                        Arg::OptInt(*retired_at),
                        Arg::Text(kid),
                        Arg::Text(from),
                    ],
                )
                .await?;
            if n == 0 {
                return Err(StoreError::Refused(Refusal::KeyState));
            }
            return Ok((n, Some(Change::Keys)));
        }
        WriteOp::KeyDestroyed { kid, at } => {
            let n = ex
                .execute(
                    "UPDATE signing_keys SET destroyed_at = $1 WHERE kid = $2 AND state = 'retired' AND destroyed_at IS NULL",
                    &[Arg::Int(*at), Arg::Text(kid)],
                )
                .await?;
            if n == 0 {
                return Err(StoreError::Refused(Refusal::KeyState));
            }
            return Ok((n, Some(Change::Keys)));
        }
        WriteOp::AdoptKeys { kids, device } => {
            let mut n = 0;
            for kid in kids {
                n += ex
                    .execute(
                        "UPDATE signing_keys SET device = $1 WHERE kid = $2 AND device = ''",
                        &[Arg::Text(device), Arg::Text(kid)],
                    )
                    .await?;
            }
            return Ok((n, Some(Change::Keys)));
        }
        WriteOp::InsertSigningKey(k) => {
            let n = ex
                .execute(
                    "INSERT INTO signing_keys (kid, uri, backend, device, state, jwk, certificate, created_at,
                        activated_at, retire_at, activate_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                    &[
                        Arg::Text(&k.kid),
                        Arg::Text(&k.uri),
                        Arg::Text(&k.backend),
                        Arg::Text(&k.device),
                        Arg::Text(&k.state),
                        Arg::Text(&k.jwk),
                        Arg::Text(&k.certificate),
                        Arg::Int(k.created_at),
                        Arg::OptInt(k.activated_at),
                        Arg::OptInt(k.retire_at),
                        Arg::OptInt(k.activate_at),
                    ],
                )
                .await?;
            return Ok((n, Some(Change::Keys)));
        }
    };
    Ok((n, None))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failed commit's reason is named once ("store unavailable: disk full"), not
    /// "store unavailable: store unavailable: disk full".
    #[test]
    fn a_failed_batch_names_its_reason_once() {
        let e = failed_batch(&StoreError::Unavailable("disk full".into()));
        assert_eq!(e.to_string(), "store unavailable: disk full");
        let e = failed_batch(&StoreError::Conflict("seq".into()));
        assert_eq!(e.to_string(), "store unavailable: conflict: seq");
    }

    #[test]
    fn values_are_numbered_from_first() {
        assert_eq!(values(2, 3, Some(0)), "VALUES ($1,$2,$3),($4,$5,$6)");
        assert_eq!(values(1, 2, Some(6)), "VALUES ($7,$8)");
        assert_eq!(values(2, 2, None), "VALUES (?,?),(?,?)");
        // PostgreSQL has no OR ROLLBACK; its CTE is one statement, undone whole anyway
        let (sql, _) = bulk_statement(&[], &[], true);
        assert!(!sql.contains("OR ROLLBACK"), "{sql}");
        assert!(
            bulk_statement(&[], &[], false)
                .0
                .starts_with("INSERT OR ROLLBACK")
        );
    }
}
