//! Direct SQL on a test's store (SQLite file or PostgreSQL database), for checks the API
//! does not show and for tampering. Placeholders are `$1, $2, …` (both databases read them);
//! every argument is text.

use sqlx::postgres::PgPool;
use sqlx::sqlite::SqlitePool;

pub enum TestDb {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

macro_rules! run {
    ($db:expr, |$p:ident| $body:expr) => {
        match $db {
            TestDb::Sqlite($p) => $body,
            TestDb::Postgres($p) => $body,
        }
    };
}

impl TestDb {
    pub async fn connect(url: &str) -> TestDb {
        if url.starts_with("sqlite:") {
            TestDb::Sqlite(SqlitePool::connect(url).await.unwrap())
        } else {
            TestDb::Postgres(PgPool::connect(url).await.unwrap())
        }
    }

    /// One BIGINT (a count, a max) of the first row.
    pub async fn int(&self, sql: &str, args: &[&str]) -> i64 {
        run!(self, |p| {
            let mut q = sqlx::query_as::<_, (i64,)>(sql);
            for a in args {
                q = q.bind(*a);
            }
            q.fetch_one(p).await.unwrap().0
        })
    }

    /// Two nullable BIGINTs of the first row.
    pub async fn two_opt_ints(&self, sql: &str, args: &[&str]) -> (Option<i64>, Option<i64>) {
        run!(self, |p| {
            let mut q = sqlx::query_as::<_, (Option<i64>, Option<i64>)>(sql);
            for a in args {
                q = q.bind(*a);
            }
            q.fetch_one(p).await.unwrap()
        })
    }

    /// The first column of every row, as text.
    pub async fn strings(&self, sql: &str, args: &[&str]) -> Vec<String> {
        run!(self, |p| {
            let mut q = sqlx::query_as::<_, (String,)>(sql);
            for a in args {
                q = q.bind(*a);
            }
            q.fetch_all(p).await.unwrap().into_iter().map(|r| r.0).collect()
        })
    }

    /// Runs a statement; returns the rows it affected.
    pub async fn exec(&self, sql: &str, args: &[&str]) -> u64 {
        run!(self, |p| {
            let mut q = sqlx::query(sql);
            for a in args {
                q = q.bind(*a);
            }
            q.execute(p).await.unwrap().rows_affected()
        })
    }

    pub async fn close(self) {
        run!(self, |p| p.close().await)
    }
}
