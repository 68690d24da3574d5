//! One small query interface over both databases.
//!
//! Every query of the store is written once, as SQL text with `$1, $2, …` placeholders (both
//! SQLite and PostgreSQL read them) and a slice of [`Arg`]s, and runs through [`Exec`] on a
//! pool or on the writer's connection. Where the two dialects differ, the caller picks the
//! text by [`Exec::kind`]; nothing is hidden behind a macro that rewrites SQL.

use std::time::Duration;

use futures_util::future::BoxFuture;
use sqlx::postgres::{PgConnection, PgPool, PgRow};
use sqlx::sqlite::{SqliteConnection, SqlitePool, SqliteRow};
use sqlx::{FromRow, Postgres, Sqlite};

use super::StoreKind;

/// How long a query on the PostgreSQL read pool may take, getting a connection and the
/// answer included. A server that stopped answering (a network cut, not a refused
/// connection) must not hold a request for the operating system's TCP timeout; the writer
/// has its own bound (`postgres.rs`).
pub(crate) const PG_READ_TIMEOUT: Duration = Duration::from_secs(3);

fn pg_timed_out() -> sqlx::Error {
    sqlx::Error::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "PostgreSQL did not answer within 3 s",
    ))
}

/// A connection of `pool` by `deadline`.
async fn pg_acquire(
    pool: &PgPool,
    deadline: tokio::time::Instant,
) -> Result<sqlx::pool::PoolConnection<Postgres>, sqlx::Error> {
    tokio::time::timeout_at(deadline, pool.acquire())
        .await
        .map_err(|_| pg_timed_out())?
}

/// The outcome of a query bounded by [`PG_READ_TIMEOUT`]. A connection whose query timed
/// out is taken out of the pool and closed: its state is unknown, and handing it back
/// would make sqlx test it with a round trip that, on a cut network, hangs until the TCP
/// timeout while it holds a pool slot.
fn pg_settle<T>(
    conn: sqlx::pool::PoolConnection<Postgres>,
    r: Result<Result<T, sqlx::Error>, tokio::time::error::Elapsed>,
) -> Result<T, sqlx::Error> {
    match r {
        Ok(r) => r,
        Err(_) => {
            drop(conn.detach());
            Err(pg_timed_out())
        }
    }
}

/// Runs `$call` (a method of `Exec` on `$c`, a connection) for a PostgreSQL read-pool
/// executor, bounded by [`PG_READ_TIMEOUT`]; returns from the enclosing function.
macro_rules! on_pg_pool {
    ($exec:expr, |$c:ident| $call:expr) => {
        if let Exec::PgPool(p) = $exec {
            let deadline = tokio::time::Instant::now() + PG_READ_TIMEOUT;
            let mut conn = pg_acquire(p, deadline).await?;
            let r = {
                let $c = &mut *conn;
                tokio::time::timeout_at(deadline, $call).await
            };
            return pg_settle(conn, r);
        }
    };
}

/// A bind value: the few types keygate stores.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Arg<'a> {
    Int(i64),
    OptInt(Option<i64>),
    Text(&'a str),
    OptText(Option<&'a str>),
    Bytes(&'a [u8]),
    Bool(bool),
}

/// Rows that decode from either database.
pub(crate) trait AnyRow:
    for<'r> FromRow<'r, SqliteRow> + for<'r> FromRow<'r, PgRow> + Send + Unpin
{
}
impl<T> AnyRow for T where T: for<'r> FromRow<'r, SqliteRow> + for<'r> FromRow<'r, PgRow> + Send + Unpin {}

/// The read pool.
#[derive(Clone, Debug)]
pub(crate) enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

impl Pool {
    pub(crate) fn exec(&self) -> Exec<'_> {
        match self {
            Pool::Sqlite(p) => Exec::SqlitePool(p),
            Pool::Postgres(p) => Exec::PgPool(p),
        }
    }

    pub(crate) async fn close(&self) {
        match self {
            Pool::Sqlite(p) => p.close().await,
            Pool::Postgres(p) => p.close().await,
        }
    }
}

/// Somewhere to run a query: a pool, or one connection (the writer's, inside its
/// transaction).
pub(crate) enum Exec<'c> {
    SqlitePool(&'c SqlitePool),
    PgPool(&'c PgPool),
    Sqlite(&'c mut SqliteConnection),
    Pg(&'c mut PgConnection),
}

/// Binds `$args` to `$q` (a `sqlx::query` or `sqlx::query_as` of a known database).
macro_rules! bind_args {
    ($q:expr, $args:expr) => {{
        let mut q = $q;
        for a in $args {
            q = match *a {
                Arg::Int(v) => q.bind(v),
                Arg::OptInt(v) => q.bind(v),
                Arg::Text(v) => q.bind(v),
                Arg::OptText(v) => q.bind(v),
                Arg::Bytes(v) => q.bind(v),
                Arg::Bool(v) => q.bind(v),
            };
        }
        q
    }};
}

/// Runs `$body` with `$e` bound to the executor and `$db` to the database type.
macro_rules! on_exec {
    ($exec:expr, |$e:ident, $db:ident| $body:expr) => {
        match $exec {
            Exec::SqlitePool(p) => {
                type $db = Sqlite;
                let $e = *p;
                $body
            }
            Exec::PgPool(p) => {
                type $db = Postgres;
                let $e = *p;
                $body
            }
            Exec::Sqlite(c) => {
                type $db = Sqlite;
                let $e = &mut **c;
                $body
            }
            Exec::Pg(c) => {
                type $db = Postgres;
                let $e = &mut **c;
                $body
            }
        }
    };
}

impl Exec<'_> {
    pub(crate) fn kind(&self) -> StoreKind {
        match self {
            Exec::SqlitePool(_) | Exec::Sqlite(_) => StoreKind::Sqlite,
            Exec::PgPool(_) | Exec::Pg(_) => StoreKind::Postgres,
        }
    }

    /// Runs a statement; returns the rows it affected.
    pub(crate) fn execute<'s>(
        &'s mut self,
        sql: &'s str,
        args: &'s [Arg<'s>],
    ) -> BoxFuture<'s, Result<u64, sqlx::Error>> {
        Box::pin(async move {
            on_pg_pool!(self, |c| Exec::Pg(c).execute(sql, args));
            on_exec!(self, |e, Db| Ok(bind_args!(sqlx::query::<Db>(sql), args)
                .execute(e)
                .await?
                .rows_affected()))
        })
    }

    /// Runs a statement without parameters through the simple-query protocol: several
    /// statements in one round trip (`BEGIN; …`). Returns the rows of every statement.
    pub(crate) fn raw<'s>(&'s mut self, sql: &'s str) -> BoxFuture<'s, Result<Vec<RawRow>, sqlx::Error>> {
        Box::pin(async move {
            use sqlx::Executor as _;
            Ok(match self {
                Exec::SqlitePool(p) => p
                    .fetch_all(sqlx::raw_sql(sql))
                    .await?
                    .into_iter()
                    .map(RawRow::Sqlite)
                    .collect(),
                Exec::PgPool(p) => p
                    .fetch_all(sqlx::raw_sql(sql))
                    .await?
                    .into_iter()
                    .map(RawRow::Pg)
                    .collect(),
                Exec::Sqlite(c) => c
                    .fetch_all(sqlx::raw_sql(sql))
                    .await?
                    .into_iter()
                    .map(RawRow::Sqlite)
                    .collect(),
                Exec::Pg(c) => c
                    .fetch_all(sqlx::raw_sql(sql))
                    .await?
                    .into_iter()
                    .map(RawRow::Pg)
                    .collect(),
            })
        })
    }

    pub(crate) fn fetch_all<'s, T: AnyRow + 's>(
        &'s mut self,
        sql: &'s str,
        args: &'s [Arg<'s>],
    ) -> BoxFuture<'s, Result<Vec<T>, sqlx::Error>> {
        Box::pin(async move {
            on_pg_pool!(self, |c| Exec::Pg(c).fetch_all(sql, args));
            on_exec!(self, |e, Db| bind_args!(sqlx::query_as::<Db, T>(sql), args)
                .fetch_all(e)
                .await)
        })
    }

    pub(crate) fn fetch_optional<'s, T: AnyRow + 's>(
        &'s mut self,
        sql: &'s str,
        args: &'s [Arg<'s>],
    ) -> BoxFuture<'s, Result<Option<T>, sqlx::Error>> {
        Box::pin(async move {
            on_pg_pool!(self, |c| Exec::Pg(c).fetch_optional(sql, args));
            on_exec!(self, |e, Db| bind_args!(sqlx::query_as::<Db, T>(sql), args)
                .fetch_optional(e)
                .await)
        })
    }

    pub(crate) fn fetch_one<'s, T: AnyRow + 's>(
        &'s mut self,
        sql: &'s str,
        args: &'s [Arg<'s>],
    ) -> BoxFuture<'s, Result<T, sqlx::Error>> {
        Box::pin(async move {
            on_pg_pool!(self, |c| Exec::Pg(c).fetch_one(sql, args));
            on_exec!(self, |e, Db| bind_args!(sqlx::query_as::<Db, T>(sql), args)
                .fetch_one(e)
                .await)
        })
    }
}

/// A row of a [`Exec::raw`] query.
pub(crate) enum RawRow {
    Sqlite(SqliteRow),
    Pg(PgRow),
}

impl RawRow {
    /// Decodes the row as `T` (the caller knows which statement it came from).
    pub(crate) fn decode<T: AnyRow>(&self) -> Result<T, sqlx::Error> {
        match self {
            RawRow::Sqlite(r) => T::from_row(r),
            RawRow::Pg(r) => T::from_row(r),
        }
    }

    pub(crate) fn len(&self) -> usize {
        use sqlx::Row;
        match self {
            RawRow::Sqlite(r) => r.len(),
            RawRow::Pg(r) => r.len(),
        }
    }
}
