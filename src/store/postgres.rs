//! The PostgreSQL store: one database shared by every replica.
//!
//! - **Writes** keep the single-writer shape of SQLite inside each replica (group commit),
//!   and every write transaction takes one advisory lock ([`WRITE_LOCK`]) before it reads
//!   the audit chain head. So appends from all replicas are serialised: the chain stays one
//!   chain, and revocation `seq` values are taken in commit order, so a reader that has seen
//!   seq N never later meets a smaller one.
//! - **Changes** other replicas must hear of (a revocation, a deleted API token, a key state)
//!   are sent with `pg_notify` inside the same transaction, so they are delivered after, and
//!   only after, the commit. Each replica LISTENs ([`listen`]).
//! - **Leases** for periodic work are session advisory locks held on a connection of their
//!   own: when the replica dies, PostgreSQL drops the connection and the lock with it.
//! - **Faults**: every connection has `lock_timeout`, `statement_timeout` and
//!   `idle_in_transaction_session_timeout`, so nothing waits on the database for long; the
//!   writer and the listener reconnect by themselves.

use std::str::FromStr;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use sqlx::ConnectOptions;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions};
use tokio::sync::broadcast;

use super::db::{Arg, Exec};
use super::url::{StoreUrl, scrub};
use super::writer::{self, Batch, Job};
use super::{Change, StoreError};

/// Advisory lock key every write transaction holds (`pg_advisory_xact_lock`).
pub(super) const WRITE_LOCK: i64 = 0x6b67_5f77_7269_7465; // "kg_write"
/// Every write transaction: READ COMMITTED whatever the server's default, so each statement
/// after the lock sees what the previous holder committed.
const BEGIN: &str = "BEGIN ISOLATION LEVEL READ COMMITTED";
/// The NOTIFY channel.
pub(super) const CHANNEL: &str = "keygate_changes";
/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one batch of writes may take before the writer gives up on its connection.
const BATCH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a caller waits for its write to be answered (queueing behind a batch that
/// times out included) before it is told the store is unavailable.
pub(super) const WRITE_WAIT: Duration = Duration::from_secs(6);

/// What a wait for the database that ran out of time is answered.
pub(super) fn no_answer() -> StoreError {
    StoreError::Unavailable("the database did not answer in time".into())
}

/// Session settings of every connection: nothing waits on the database for long.
const SESSION: [(&str, &str); 3] = [
    ("lock_timeout", "5s"),
    ("statement_timeout", "10s"),
    ("idle_in_transaction_session_timeout", "15s"),
];

/// Connection options from the URL and an optional password held apart from it.
pub(super) fn connect_options(
    url: &StoreUrl,
    password: Option<&SecretString>,
) -> Result<PgConnectOptions, StoreError> {
    let mut opts = PgConnectOptions::from_str(url.expose()).map_err(|e| StoreError::Open {
        url: url.redacted(),
        reason: scrub(&e.to_string(), url),
    })?;
    if let Some(p) = password {
        opts = opts.password(p.expose_secret());
    }
    Ok(opts
        .application_name("keygate")
        .options(SESSION)
        .disable_statement_logging())
}

/// Opens the pool and applies the migrations (under sqlx's migration lock, so replicas that
/// start together apply each migration once).
pub(super) async fn open(
    url: &StoreUrl,
    opts: &PgConnectOptions,
    max_connections: u32,
) -> Result<PgPool, StoreError> {
    let open_err = |e: &dyn std::fmt::Display| StoreError::Open {
        url: url.redacted(),
        reason: scrub(&e.to_string(), url),
    };
    let pool = PgPoolOptions::new()
        .max_connections(max_connections.max(1))
        .min_connections(0)
        .acquire_timeout(CONNECT_TIMEOUT)
        // A broken connection fails one request (503) and is then dropped by sqlx's test on
        // release; testing before every acquire too would cost a round trip per query.
        .test_before_acquire(false)
        .idle_timeout(Duration::from_secs(60))
        .connect_with(opts.clone())
        .await
        .map_err(|e| open_err(&e))?;
    sqlx::migrate!("./migrations/postgres")
        .run(&pool)
        .await
        .map_err(|e| open_err(&e))?;
    Ok(pool)
}

/// The writer's end of the store: one connection, reconnected after any failure.
pub(super) struct PgWriter {
    opts: PgConnectOptions,
    conn: Option<PgConnection>,
}

impl PgWriter {
    pub(super) fn new(opts: PgConnectOptions) -> PgWriter {
        // The writer holds the write lock of every replica while its transaction is open:
        // if it is cut off mid-transaction, the server must end that transaction quickly
        // (a batch never idles between statements) and notice a vanished client.
        let opts = opts.options([
            ("idle_in_transaction_session_timeout", "3s"),
            ("client_connection_check_interval", "1s"),
            ("tcp_keepalives_idle", "5"),
            ("tcp_keepalives_interval", "1"),
            ("tcp_keepalives_count", "3"),
        ]);
        PgWriter { opts, conn: None }
    }

    async fn connection(&mut self) -> Result<&mut PgConnection, StoreError> {
        if self.conn.is_none() {
            let c = tokio::time::timeout(CONNECT_TIMEOUT, self.opts.connect())
                .await
                .map_err(|_| StoreError::Unavailable("cannot connect to PostgreSQL in time".into()))??;
            self.conn = Some(c);
        }
        self.conn
            .as_mut()
            .ok_or_else(|| StoreError::Unavailable("no connection".into()))
    }

    /// Commits one batch: the fast path for issued tokens and bare audit entries, else (or
    /// when that fails) the careful path. A batch that fails as a whole drops the
    /// connection, so the next one starts on a fresh one.
    pub(super) async fn commit(&mut self, jobs: &[Job]) -> Result<Batch, StoreError> {
        let r = tokio::time::timeout(BATCH_TIMEOUT, self.commit_inner(jobs)).await;
        let r = r.unwrap_or_else(|_| Err(no_answer()));
        if r.is_err() {
            self.conn = None;
        }
        r
    }

    async fn commit_inner(&mut self, jobs: &[Job]) -> Result<Batch, StoreError> {
        let conn = self.connection().await?;
        if jobs.iter().all(Job::bulk_ok) {
            match bulk(conn, jobs).await {
                Ok(b) => return Ok(b),
                Err(e) => {
                    tracing::debug!(error = %e, writes = jobs.len(), "batch failed; writing one by one");
                    Exec::Pg(conn).raw("ROLLBACK").await?;
                }
            }
        }
        let begin = format!("{BEGIN}; SELECT pg_advisory_xact_lock({WRITE_LOCK})");
        writer::commit_each(&mut Exec::Pg(conn), jobs, &begin).await
    }
}

/// The fast path: lock and head in one round trip, every row in one statement, commit.
async fn bulk(conn: &mut PgConnection, jobs: &[Job]) -> Result<Batch, StoreError> {
    let mut ex = Exec::Pg(conn);
    let rows = ex
        .raw(&format!(
            "{BEGIN}; SELECT pg_advisory_xact_lock({WRITE_LOCK}); SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1"
        ))
        .await?;
    // The lock's own row has one column; the head, if there is one, two.
    let head = match rows.iter().rev().find(|r| r.len() == 2) {
        Some(r) => r.decode::<(i64, String)>()?,
        None => (0, crate::audit::GENESIS.to_owned()),
    };
    let links = writer::chain(jobs.iter().map(|j| &j.audit), &head);
    let (sql, args) = writer::bulk_statement(jobs, &links, true);
    ex.execute(&sql, &args).await?;
    ex.execute("COMMIT", &[]).await?;
    Ok(writer::bulk_outcome(jobs, &head, &links))
}

/// Sends a change to every replica when the surrounding transaction commits.
pub(super) async fn notify(ex: &mut Exec<'_>, change: &Change) -> Result<(), sqlx::Error> {
    ex.execute(
        "SELECT pg_notify($1, $2)",
        &[Arg::Text(CHANNEL), Arg::Text(&change.to_payload())],
    )
    .await?;
    Ok(())
}

/// How long the change listener waits for a notification before it checks that its
/// connection still answers (a network cut would otherwise go unnoticed forever).
const LISTEN_CHECK: Duration = Duration::from_secs(10);

/// Listens for changes made by any replica and repeats them on `tx`, on a connection of its
/// own (`opts`). After every (re)connection it sends [`Change::Resync`]: notifications sent
/// while it was away are lost, so listeners re-read what they keep. Ends when `tx`'s last
/// sender (the store) is gone.
pub(super) async fn listen(opts: PgConnectOptions, tx: broadcast::WeakSender<Change>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        if tx.upgrade().is_none() {
            return;
        }
        // A pool of one per connection: a connection given up on (cut off) may take the
        // operating system's TCP timeout to be released, and must not block the next one.
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(CONNECT_TIMEOUT)
            .test_before_acquire(false)
            .connect_lazy_with(opts.clone());
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for changes; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        listener.ignore_pool_close_event(true);
        if let Err(e) = listener.listen(CHANNEL).await {
            tracing::warn!(error = %e, "LISTEN failed; retrying");
            tokio::time::sleep(backoff).await;
            continue;
        }
        backoff = Duration::from_millis(100);
        let Some(sender) = tx.upgrade() else { return };
        let _ = sender.send(Change::Resync);
        drop(sender);
        loop {
            match tokio::time::timeout(LISTEN_CHECK, listener.try_recv()).await {
                Ok(Ok(Some(n))) => {
                    let Some(sender) = tx.upgrade() else { return };
                    if let Some(c) = Change::from_payload(n.payload()) {
                        let _ = sender.send(c);
                    }
                }
                Ok(Ok(None)) => {
                    tracing::warn!("lost the change listener's connection; reconnecting");
                    break;
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "change listener failed; reconnecting");
                    tokio::time::sleep(backoff).await;
                    break;
                }
                // Quiet for a while: is the connection still there?
                Err(_) => {
                    if tx.upgrade().is_none() {
                        return;
                    }
                    let alive = tokio::time::timeout(
                        Duration::from_secs(3),
                        sqlx::Executor::execute(&mut listener, "SELECT 1"),
                    )
                    .await;
                    if !matches!(alive, Ok(Ok(_))) {
                        tracing::warn!("the change listener's connection does not answer; reconnecting");
                        break;
                    }
                }
            }
        }
    }
}

/// The advisory-lock key of a lease on `task`.
fn lease_key(task: &str) -> i64 {
    let d = aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        format!("keygate lease {task}").as_bytes(),
    );
    let mut b = [0u8; 8];
    b.copy_from_slice(&d.as_ref()[..8]);
    i64::from_be_bytes(b)
}

/// A session advisory lock on a connection of its own, taken when free and kept until the
/// connection dies.
pub(super) struct PgLease {
    opts: PgConnectOptions,
    key: i64,
    conn: Option<PgConnection>,
    held: bool,
}

impl PgLease {
    pub(super) fn new(opts: &PgConnectOptions, task: &str) -> PgLease {
        // The database notices a replica that vanished without closing its connection
        // (power loss, a network cut) within about 10 s and frees its lease.
        let opts = opts.clone().options([
            ("tcp_keepalives_idle", "5"),
            ("tcp_keepalives_interval", "1"),
            ("tcp_keepalives_count", "5"),
        ]);
        PgLease {
            opts,
            key: lease_key(task),
            conn: None,
            held: false,
        }
    }

    /// True when this process holds the lease now: checks that a held lease's connection
    /// still answers, or tries to take a free one. One round trip, at most 2 s.
    pub(super) async fn hold(&mut self) -> bool {
        let r = tokio::time::timeout(Duration::from_secs(2), self.hold_inner()).await;
        match r {
            Ok(Ok(held)) => {
                self.held = held;
                held
            }
            _ => {
                self.conn = None;
                self.held = false;
                false
            }
        }
    }

    async fn hold_inner(&mut self) -> Result<bool, StoreError> {
        if self.conn.is_none() {
            self.held = false;
            self.conn = Some(self.opts.connect().await?);
        }
        let conn = self
            .conn
            .as_mut()
            .ok_or_else(|| StoreError::Unavailable("no connection".into()))?;
        let mut ex = Exec::Pg(conn);
        if self.held {
            ex.execute("SELECT 1", &[]).await?;
            return Ok(true);
        }
        let (held,): (bool,) = ex
            .fetch_one("SELECT pg_try_advisory_lock($1)", &[Arg::Int(self.key)])
            .await?;
        Ok(held)
    }
}
