//! The PostgreSQL side of `keygate bench`: a database of its own on the server named by
//! `--pg-url` (an admin URL), initialised on the bench's key device and dropped afterwards.

use std::str::FromStr;

use sqlx::Connection;

use crate::config::Config;
use crate::store::StoreUrl;

/// A throwaway database for one bench run.
pub(super) struct BenchDb {
    admin: StoreUrl,
    name: String,
    /// The bench's configuration with this database as its store, initialised.
    pub(super) config: Config,
}

fn admin_options(admin: &StoreUrl) -> anyhow::Result<sqlx::postgres::PgConnectOptions> {
    sqlx::postgres::PgConnectOptions::from_str(&admin.with_database("postgres").expose_for_tools())
        .map_err(|e| anyhow::anyhow!("--pg-url {admin}: {}", crate::store::redact(&e.to_string())))
}

impl BenchDb {
    /// Creates `keygate_bench_<random>` on the server of `admin_url` and runs `keygate init`
    /// on it (a new key on the bench's device, recorded there).
    pub(super) async fn create(config: &Config, admin_url: &str) -> anyhow::Result<BenchDb> {
        let admin = StoreUrl::parse(admin_url)?;
        anyhow::ensure!(
            admin.kind() == crate::store::StoreKind::Postgres,
            "--pg-url must be a postgres:// URL"
        );
        let mut r = [0u8; 6];
        getrandom::fill(&mut r).map_err(|e| anyhow::anyhow!("OS random source: {e}"))?;
        let name = format!("keygate_bench_{}", hex::encode(r));
        let mut c = sqlx::PgConnection::connect_with(&admin_options(&admin)?).await?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut c)
            .await?;
        c.close().await?;
        let mut config = config.clone();
        config.store.url = Some(admin.with_database(&name).expose_for_tools());
        let db = BenchDb { admin, name, config };
        crate::cli::init(&db.config, false).await?;
        Ok(db)
    }

    /// Drops the database (ending any session still on it).
    pub(super) async fn drop_database(self) -> anyhow::Result<()> {
        let mut c = sqlx::PgConnection::connect_with(&admin_options(&self.admin)?).await?;
        sqlx::query(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name))
            .execute(&mut c)
            .await?;
        c.close().await?;
        Ok(())
    }
}
