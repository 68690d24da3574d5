//! The SQLite store (WAL): one file, one serving process. The embedded default.
//!
//! sqlx runs a SQLite connection on a worker thread of its own, and under load every
//! statement sent to it waits for a CPU; so the writer's fast path sends the whole batch as
//! ONE multi-statement query, `BEGIN IMMEDIATE; INSERT tokens…; INSERT audit…; COMMIT`
//! (docs/benchmarks-server-cpu.md). It keeps the chain head in memory; the database checks it: `seq` is
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
            // The inserts are `OR ROLLBACK`: a conflict undoes the whole transaction (and the
            // careful path writes the batch again), so the audit insert needs no statement
            // journal (a copy of each page a statement changes, to undo that statement
            // alone). The token insert still keeps one for its foreign key on `kid`;
            // deferring that to COMMIT with `PRAGMA defer_foreign_keys` would expire every
            // prepared statement, so each batch would be parsed again.
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

#[cfg(test)]
mod tests {
    use super::super::rows::{IssuedToken, SigningKeyRow};
    use super::super::{Store, StoreError, WriteOp};
    use crate::audit::{AuditRecord, verify_chain};

    fn record(action: &str) -> AuditRecord {
        AuditRecord {
            actor: "test".into(),
            action: action.into(),
            target: "t".into(),
            outcome: "success".into(),
            remote_addr: "local".into(),
        }
    }

    fn token(jti: &str) -> WriteOp {
        token_of(jti, "k1")
    }

    fn token_of(jti: &str, kid: &str) -> WriteOp {
        WriteOp::InsertIssued(IssuedToken {
            jti: jti.into(),
            kid: kid.into(),
            sub: "s".into(),
            aud: "a".into(),
            scopes: String::new(),
            iat: 1,
            nbf: 1,
            exp: 2,
            one_time: false,
            cnf_jkt: None,
            issued_by: "test".into(),
        })
    }

    /// The fast path keeps the chain head in memory. When another process appends meanwhile,
    /// the batch collides on `seq` and must leave nothing behind (its tokens included) before
    /// the careful path writes it again; a write that fails on a token fails alone.
    #[tokio::test]
    async fn a_stale_head_or_a_bad_row_rolls_the_whole_batch_back() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("k.db").display());
        let a = Store::open_url(&url).await.unwrap();
        let b = Store::open_url(&url).await.unwrap();
        let key = SigningKeyRow {
            kid: "k1".into(),
            uri: "pkcs11:object=k1".into(),
            backend: "pkcs11".into(),
            device: "pkcs11".into(),
            state: "active".into(),
            jwk: "{}".into(),
            certificate: String::new(),
            created_at: 1,
            activated_at: Some(1),
            retire_at: None,
            activate_at: None,
            destroyed_at: None,
        };
        a.write(vec![WriteOp::InsertSigningKey(key)], record("key.create"))
            .await
            .unwrap();
        a.write(vec![token("j1")], record("token.issue")).await.unwrap();
        // "another process" appends behind a's back: a's head is stale now
        b.audit(record("other")).await.unwrap();
        a.write(vec![token("j2")], record("token.issue")).await.unwrap();
        // a duplicate jti, or a key that is not recorded (the foreign key), fails alone and
        // leaves no audit entry
        let dup = a.write(vec![token("j2")], record("token.issue")).await;
        assert!(matches!(dup, Err(StoreError::Conflict(_))), "{dup:?}");
        let orphan = a
            .write(vec![token_of("j4", "nokey")], record("token.issue"))
            .await;
        assert!(
            matches!(&orphan, Err(StoreError::Unavailable(m)) if m.contains("FOREIGN KEY")),
            "{orphan:?}"
        );
        a.write(vec![token("j3")], record("token.issue")).await.unwrap();

        assert_eq!(a.counts().await.unwrap(), (3, 0, 5));
        let entries = a.audit_entries(0, 100).await.unwrap();
        let actions: Vec<&str> = entries.iter().map(|e| e.record.action.as_str()).collect();
        assert_eq!(
            actions,
            ["key.create", "token.issue", "other", "token.issue", "token.issue"]
        );
        verify_chain(&entries, None).unwrap();
        a.close().await;
        b.close().await;
    }
}
