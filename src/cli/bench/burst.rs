//! `keygate bench --burst N`: N clients issuing at once for the run's seconds, each on its
//! own connection, one request after the other. Every answer is counted by status with its
//! latency, so the report says what a burst gets: how many tokens (201), how many fast
//! refusals (503 with Retry-After, from the load shedding in front of the device), and how
//! long anyone waited, against the bound the device wait sets.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use super::load::{Issuing, LoadConn};
use super::report::Table;
use crate::config::Config;

/// Answers of one status: how many, and their latencies in microseconds.
struct Answers {
    latency: Histogram<u64>,
}

/// Runs the burst with the device wait of `config` and with a short one (so that shedding
/// shows even where the device keeps up), and prints both.
pub(super) async fn report(config: &Config, clients: usize, secs: u64, markdown: bool) -> anyhow::Result<()> {
    let wait = config.pkcs11().acquire_timeout_ms;
    let mut short = config.clone();
    let mut p = config.pkcs11();
    p.acquire_timeout_ms = 50;
    short.pkcs11 = Some(p);
    eprintln!("keygate bench --burst: {clients} clients issuing for {secs} s, one connection each");
    let mut t = Table::new(format!("burst of {clients} clients for {secs} s, SQLite"));
    for (cfg, wait_ms) in [(config, wait), (&short, 50)] {
        let (by_status, elapsed) = burst(cfg, clients, secs).await?;
        let total: u64 = by_status.values().map(|a| a.latency.len()).sum();
        for (status, a) in &by_status {
            let h = &a.latency;
            t.row(
                format!("burst, device wait {wait_ms} ms: {status}"),
                format!(
                    "{:.1}% ({}, {:.0}/s)",
                    100.0 * h.len() as f64 / total.max(1) as f64,
                    h.len(),
                    h.len() as f64 / elapsed
                ),
                format!(
                    "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                    h.value_at_quantile(0.5) as f64 / 1000.0,
                    h.value_at_quantile(0.99) as f64 / 1000.0,
                    h.max() as f64 / 1000.0
                ),
            );
        }
    }
    t.print(markdown);
    Ok(())
}

/// One burst against a service built from `config` in this process.
async fn burst(config: &Config, clients: usize, secs: u64) -> anyhow::Result<(BTreeMap<u16, Answers>, f64)> {
    let s = Issuing::start(crate::cli::serve::build_service(config).await?).await?;
    let result = load(s.addr, s.request.clone(), clients, secs).await;
    s.stop().await;
    result
}

/// `clients` connections to `addr` sending `request` one after the other for `secs`.
async fn load(
    addr: std::net::SocketAddr,
    request: Arc<[u8]>,
    clients: usize,
    secs: u64,
) -> anyhow::Result<(BTreeMap<u16, Answers>, f64)> {
    // Connect everyone first, then start together.
    let mut conns = Vec::with_capacity(clients);
    for _ in 0..clients {
        conns.push(LoadConn::connect(addr).await?);
    }
    let start = Arc::new(tokio::sync::Barrier::new(clients));
    let deadline = Instant::now() + Duration::from_secs(secs) + Duration::from_millis(200);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(clients);
    for mut conn in conns {
        let (request, start) = (request.clone(), start.clone());
        tasks.push(tokio::spawn(async move {
            let mut seen: BTreeMap<u16, Histogram<u64>> = BTreeMap::new();
            start.wait().await;
            while Instant::now() < deadline {
                let t = Instant::now();
                let status = match conn.round_trip(&request).await {
                    Ok(s) => s,
                    Err(_) => {
                        // closed by the server: counted as 0, reconnect
                        conn = LoadConn::connect(addr).await?;
                        0
                    }
                };
                let h = match seen.entry(status) {
                    std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::btree_map::Entry::Vacant(v) => {
                        v.insert(Histogram::new(3).map_err(|e| anyhow::anyhow!("{e}"))?)
                    }
                };
                h.record(t.elapsed().as_micros() as u64)?;
                if status == 503 {
                    // a client honouring Retry-After: 1 would wait a second; this one comes
                    // back sooner, to keep the pressure on
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            anyhow::Ok(seen)
        }));
    }
    let mut all: BTreeMap<u16, Answers> = BTreeMap::new();
    for t in tasks {
        for (status, h) in t.await?? {
            match all.get_mut(&status) {
                Some(a) => a.latency.add(&h)?,
                None => {
                    all.insert(status, Answers { latency: h });
                }
            }
        }
    }
    Ok((all, started.elapsed().as_secs_f64()))
}
