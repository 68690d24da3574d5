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

    pub async fn close(self) {
        run!(self, |p| p.close().await)
    }
}
