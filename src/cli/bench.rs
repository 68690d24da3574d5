//! `keygate bench` (filled in below).

use clap::Args;

use crate::config::Config;

#[derive(Debug, Args)]
pub struct BenchArgs {}

pub async fn run(_a: BenchArgs, _config: Config) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
