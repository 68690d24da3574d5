//! `keygate bench`, lifecycle part: one-time redemptions per second over HTTP (exactly-once
//! is a conditional UPDATE plus an audit entry, committed durably), and the latency from a
//! revocation request to its event on a connected Server-Sent Events client.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use super::load::{Requests, drive};
use crate::authority::{IssueRequest, Principal, Scope};
use crate::config::Config;

/// Redemption figures of one run (the same shape as issuance's).
pub type Redemption = super::load::Issuance;

/// Revocation-to-event latency figures.
#[derive(Clone, Debug)]
pub struct SseLatency {
    pub samples: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

fn admin() -> Principal {
    Principal {
        id: "bench".into(),
        scopes: vec![Scope::Admin],
    }
}

/// Serves `service` on a loopback port until the returned sender is dropped or fired.
pub(super) async fn serve(
    service: &crate::cli::Service,
) -> anyhow::Result<(std::net::SocketAddr, tokio::sync::oneshot::Sender<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let router = service.router.clone();
    let authority = service.authority.clone();
    let limits = crate::api::server::Limits::from_config(&crate::config::HttpConfig::default());
    tokio::spawn(crate::api::server::serve(
        listener,
        router,
        limits,
        None,
        async move {
            let _ = stop_rx.await;
            authority.close_streams();
        },
    ));
    Ok((addr, stop_tx))
}

/// Issues `n` one-time tokens, `parallel` at a time.
async fn one_time_tokens(
    service: &crate::cli::Service,
    n: usize,
    parallel: usize,
) -> anyhow::Result<Vec<String>> {
    let req = IssueRequest {
        subject: "bench-node".into(),
        audience: "bench".into(),
        ttl_seconds: Some(3600),
        one_time: true,
        ..Default::default()
    };
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let batch = parallel.min(n - out.len());
        let mut tasks = Vec::with_capacity(batch);
        for _ in 0..batch {
            let (a, r) = (service.authority.clone(), req.clone());
            tasks.push(tokio::spawn(async move { a.issue(&admin(), &r, "local").await }));
        }
        for t in tasks {
            out.push(t.await??.token.to_string());
        }
    }
    Ok(out)
}

/// One-time redemptions per second through `POST /v1/tokens/redeem`, `clients` at once,
/// each token redeemed once, for at most `secs` seconds (or until `tokens` run out).
pub async fn redemption(
    config: &Config,
    tokens: usize,
    clients: usize,
    secs: u64,
) -> anyhow::Result<Redemption> {
    let service = crate::cli::build_service(config).await?;
    let pool = one_time_tokens(&service, tokens, 64).await?;
    let (addr, stop) = serve(&service).await?;
    let requests: Vec<Arc<[u8]>> = pool
        .iter()
        .map(|t| {
            let body = format!(r#"{{"token":"{t}"}}"#);
            format!(
                "POST /v1/tokens/redeem HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes()
            .into()
        })
        .collect();
    let result = drive(addr, Requests::Each(Mutex::new(requests)), 200, clients, secs).await;
    let _ = stop.send(());
    result
}

/// Revokes `n` tokens one after another over HTTP while one SSE client listens; each sample
/// is the time from sending the revoke request to reading its event on the stream. With
/// `across`, the stream is served by a second replica of the same store (two services in
/// this process, each with its own pool, writer and change listener), so each event crosses
/// the database (PostgreSQL LISTEN/NOTIFY).
pub async fn revocation_to_event(config: &Config, n: usize, across: bool) -> anyhow::Result<SseLatency> {
    let service = crate::cli::build_service(config).await?;
    let other = if across {
        Some(crate::cli::build_service(config).await?)
    } else {
        None
    };
    let who = admin();
    let api = service
        .authority
        .create_api_token(
            &who.id,
            "bench",
            &["tokens:revoke".to_owned()],
            Some(3600),
            false,
            "local",
        )
        .await?;
    let mut jtis = Vec::with_capacity(n);
    let req = IssueRequest {
        subject: "bench-node".into(),
        audience: "bench".into(),
        ttl_seconds: Some(3600),
        ..Default::default()
    };
    for _ in 0..n {
        jtis.push(service.authority.issue(&who, &req, "local").await?.jti);
    }
    let (addr, stop) = serve(&service).await?;
    let (stream_addr, stop_other) = match &other {
        Some(o) => {
            let (a, s) = serve(o).await?;
            (a, Some(s))
        }
        None => (addr, None),
    };
    let http = reqwest::Client::new();
    let after = service.authority.store().revocation_seq().await?;
    let mut stream = http
        .get(format!(
            "http://{stream_addr}/v1/revocations/stream?after={after}"
        ))
        .send()
        .await?;
    anyhow::ensure!(
        stream.status() == 200,
        "the event stream answered {}",
        stream.status()
    );
    let mut h = Histogram::<u64>::new(3).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut buf = String::new();
    for jti in &jtis {
        let sent = Instant::now();
        let res = http
            .post(format!("http://{addr}/v1/tokens/{jti}/revoke"))
            .bearer_auth(api.secret.as_str())
            .send()
            .await?;
        anyhow::ensure!(res.status() == 200, "revoke answered {}", res.status());
        // Read until this revocation's event has arrived (it may come before the answer).
        let needle = format!("\"jti\":\"{jti}\"");
        while !buf.contains(&needle) {
            let chunk = tokio::time::timeout(Duration::from_secs(5), stream.chunk())
                .await
                .map_err(|_| anyhow::anyhow!("no event within 5 s of a revocation"))??
                .ok_or_else(|| anyhow::anyhow!("the event stream ended"))?;
            buf.push_str(&String::from_utf8_lossy(&chunk));
        }
        h.record(sent.elapsed().as_micros() as u64)?;
        buf.clear();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _ = stop.send(());
    if let Some(s) = stop_other {
        let _ = s.send(());
    }
    let _ = service
        .authority
        .delete_api_token("bench", &api.id, "local")
        .await;
    Ok(SseLatency {
        samples: h.len(),
        p50_ms: h.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: h.value_at_quantile(0.99) as f64 / 1000.0,
        max_ms: h.max() as f64 / 1000.0,
    })
}
