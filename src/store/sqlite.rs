//! The SQLite store (WAL): one file, one serving process. The embedded default.
//!
//! sqlx runs a SQLite connection on a worker thread of its own, and under load every
//! statement sent to it waits for a CPU; so the writer's fast path sends the whole batch as
//! ONE multi-statement query, `BEGIN IMMEDIATE; INSERT tokens…; INSERT audit…; COMMIT`
//! (docs/benchmarks.md). It keeps the chain head in memory; the database checks it: `seq` is
//! the primary key, so if another process appended meanwhile (`keygate init` while `serve`
//! runs), the batch collides on `seq`, rolls back, and is redone on the careful path, which
//! reads the head inside its own `BEGIN IMMEDIATE` transaction.

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};

use super::StoreError;
use super::db::Exec;
use super::url::StoreUrl;
use super::writer::{self, Batch, Job};

/// Opens (creating if needed) the database file, with its folder readable by the owner
/// only, and applies the migrations. Returns the read pool and the writer's connection.
pub(super) async fn open(
    url: &StoreUrl,
    synchronous_full: bool,
    max_connections: u32,
) -> Result<(SqlitePool, SqliteWriter), StoreError> {
    let open_err = |e: &dyn std::fmt::Display| StoreError::Open {
        url: url.redacted(),
        reason: e.to_string(),
    };
    let opts = SqliteConnectOptions::from_str(url.expose())
        .map_err(|e| open_err(&e))?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(if synchronous_full {
            SqliteSynchronous::Full
        } else {
            SqliteSynchronous::Normal
        })
        .busy_timeout(Duration::from_secs(5))
        .foreign_keys(true)
        // sorts and statement journals in memory, not in a temp file created and deleted
        // per statement (seen in strace under issuance load)
        .pragma("temp_store", "memory");
    let pool = SqlitePoolOptions::new()
        .max_connections(max_connections.max(1))
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(opts.clone())
        .await
        .map_err(|e| open_err(&e))?;
    sqlx::migrate!("./migrations/sqlite")
        .run(&pool)
        .await
        .map_err(|e| open_err(&e))?;
    // The writer owns a connection of its own, outside the pool, with a larger page cache
    // (64 MiB): it touches the index pages of every table a write changes, and re-reading
    // them from the file cost a pread per page under load.
    let conn = sqlx::ConnectOptions::connect(&opts.clone().pragma("cache_size", "-65536"))
        .await
        .map_err(|e| open_err(&e))?;
    Ok((pool, SqliteWriter { conn, head: None }))
}

/// The writer's connection and the chain head as it last committed it.
pub(super) struct SqliteWriter {
    conn: SqliteConnection,
    head: Option<(i64, String)>,
}

impl SqliteWriter {
    pub(super) async fn commit(&mut self, jobs: &[Job]) -> Result<Batch, StoreError> {
        if let Some(head) = self.head.clone().filter(|_| jobs.iter().all(Job::bulk_ok)) {
            let links = writer::chain(jobs.iter().map(|j| &j.audit), &head);
            let (sql, args) = writer::bulk_statement(jobs, &links, false);
            // Prepared statements are cached per batch size (sqlx keeps the last 100); under
            // load the sizes repeat, so most batches skip parsing the SQL.
            let sql = format!("BEGIN IMMEDIATE; {sql}; COMMIT");
            match Exec::Sqlite(&mut self.conn).execute(&sql, &args).await {
                Ok(_) => {
                    let b = writer::bulk_outcome(jobs, &head, &links);
                    self.head = Some(b.head.clone());
                    return Ok(b);
                }
                Err(e) => {
                    tracing::debug!(error = %e, writes = jobs.len(), "batch failed; writing one by one");
                    // Leave no transaction open behind a failed multi-statement query.
                    let _ = Exec::Sqlite(&mut self.conn).raw("ROLLBACK").await;
                }
            }
        }
        let r = writer::commit_each(&mut Exec::Sqlite(&mut self.conn), jobs, "BEGIN IMMEDIATE").await;
        self.head = r.as_ref().ok().map(|b| b.head.clone());
        r
    }
}
