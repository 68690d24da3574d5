//! `keygate bench`: in one run on one token, the raw backend sign rate (1 and N sessions),
//! end-to-end issuance over HTTP on loopback with concurrent clients (same session counts),
//! and offline verification per core against the fastest raw ECDSA P-256 verify measured in
//! the same run. Prints the ratios the project tracks (docs/benchmarks.md).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;

use crate::authority::Principal;
use crate::config::Config;
use crate::keys::KeyBackend;
use crate::keys::pkcs11::Pkcs11Backend;
use crate::token::{Claims, Verifier, VerifierConfig, jws};

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// N for the multi-session runs (default: the number of cores).
    #[arg(long)]
    pub sessions: Option<usize>,
    /// Concurrent HTTP clients in the issuance runs.
    #[arg(long, default_value_t = 32)]
    pub clients: usize,
    /// Print the results as a Markdown table as well.
    #[arg(long)]
    pub markdown: bool,
}

struct Issuance {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
}

fn digest(msg: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, msg).as_ref());
    out
}

/// Signatures per second with `sessions` sessions and as many signing threads.
fn raw_sign_rate(config: &Config, uri: &str, sessions: usize, secs: u64) -> anyhow::Result<f64> {
    let mut pk = config.pkcs11();
    pk.sessions = sessions;
    let backend = Arc::new(Pkcs11Backend::open(&pk)?);
    let d = digest(b"keygate bench");
    backend.sign_digest(uri, &d)?;
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..sessions)
        .map(|_| {
            let (b, stop, count, uri) = (backend.clone(), stop.clone(), count.clone(), uri.to_owned());
            std::thread::spawn(move || -> anyhow::Result<()> {
                while !stop.load(Ordering::Relaxed) {
                    b.sign_digest(&uri, &d)?;
                    count.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("a signing thread panicked"))??;
    }
    Ok(count.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

/// Tokens per second through `POST /v1/tokens` on loopback, `clients` at once.
async fn issuance(config: &Config, sessions: usize, clients: usize, secs: u64) -> anyhow::Result<Issuance> {
    let mut cfg = config.clone();
    let mut pk = cfg.pkcs11();
    pk.sessions = sessions;
    cfg.pkcs11 = Some(pk);
    let service = super::build_service(&cfg).await?;
    let who = Principal {
        id: "bench".into(),
        scopes: vec![crate::authority::Scope::Admin],
    };
    let api = service
        .authority
        .create_api_token(
            &who.id,
            "bench",
            &["tokens:issue".to_owned()],
            Some(3600),
            false,
            "local",
        )
        .await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/v1/tokens", listener.local_addr()?);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let router = service.router.clone();
    let server = tokio::spawn(async move {
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .with_graceful_shutdown(async {
            let _ = stop_rx.await;
        })
        .await
    });
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .build()?;
    let body = br#"{"subject":"bench-node","audience":"bench","ttl_seconds":300}"#;
    let secret = Arc::new(api.secret.to_string());
    // warm-up
    for _ in 0..50 {
        client
            .post(&url)
            .bearer_auth(secret.as_str())
            .header("content-type", "application/json")
            .body(&body[..])
            .send()
            .await?;
    }
    let deadline = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (client, url, secret) = (client.clone(), url.clone(), secret.clone());
        tasks.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new(3).map_err(|e| anyhow::anyhow!("{e}"))?;
            let mut errors = 0u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                let r = client
                    .post(&url)
                    .bearer_auth(secret.as_str())
                    .header("content-type", "application/json")
                    .body(&body[..])
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == 201 => {
                        r.bytes().await?;
                        h.record(t.elapsed().as_micros() as u64)?;
                    }
                    _ => errors += 1,
                }
            }
            anyhow::Ok((h, errors))
        }));
    }
    let mut all = Histogram::<u64>::new(3).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut errors = 0;
    for t in tasks {
        let (h, e) = t.await??;
        all.add(&h)?;
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let _ = stop_tx.send(());
    let _ = server.await;
    let _ = service
        .authority
        .delete_api_token("bench", &api.id, "local")
        .await;
    Ok(Issuance {
        rate: all.len() as f64 / elapsed,
        p50_ms: all.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: all.value_at_quantile(0.99) as f64 / 1000.0,
        errors,
    })
}

/// Operations per second of `op` on this thread, for about `secs` seconds.
fn per_core(secs: f64, mut op: impl FnMut() -> bool) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed().as_secs_f64() < secs {
        for _ in 0..100 {
            anyhow::ensure!(op(), "a verification failed during the benchmark");
        }
        n += 100;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

pub async fn run(a: BenchArgs, config: Config) -> anyhow::Result<()> {
    if config.is_embedded() && !config.data_dir.join("keygate.db").exists() {
        super::init(&config, false).await?;
    }
    let n = a
        .sessions
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2));
    let secs = a.seconds.max(1);
    // The active key, and a token it signed, for the verification runs.
    let service = super::build_service(&config).await?;
    let ring_ = service.authority.key_ring();
    let uri = ring_.active.uri.clone();
    let jwks = ring_.jwks.clone();
    let who = Principal {
        id: "bench".into(),
        scopes: vec![crate::authority::Scope::Admin],
    };
    let req = crate::authority::IssueRequest {
        subject: "bench-node".into(),
        audience: "bench".into(),
        ttl_seconds: Some(3600),
        ..Default::default()
    };
    let token = service
        .authority
        .issue(&who, &req, "local")
        .await?
        .token
        .to_string();
    drop(ring_);
    drop(service);

    eprintln!(
        "keygate bench: {secs} s per run, N = {n} sessions, {} HTTP clients",
        a.clients
    );
    let cfg = config.clone();
    let u = uri.clone();
    let raw1 = tokio::task::spawn_blocking(move || raw_sign_rate(&cfg, &u, 1, secs)).await??;
    eprintln!("  raw sign, 1 session: {raw1:.0}/s");
    let cfg = config.clone();
    let u = uri.clone();
    let raw_n = tokio::task::spawn_blocking(move || raw_sign_rate(&cfg, &u, n, secs)).await??;
    eprintln!("  raw sign, {n} sessions: {raw_n:.0}/s");
    let e2e1 = issuance(&config, 1, a.clients, secs).await?;
    eprintln!("  issuance, 1 session: {:.0}/s", e2e1.rate);
    let e2e_n = issuance(&config, n, a.clients, secs).await?;
    eprintln!("  issuance, {n} sessions: {:.0}/s", e2e_n.rate);

    // Offline verification, one core.
    let verifier = Verifier::new(&jwks, VerifierConfig::new(config.issuer(), "bench"))?;
    let parts = jws::parse(&token).map_err(|e| anyhow::anyhow!("{e}"))?;
    let input = parts.signing_input.as_bytes().to_vec();
    let sig = parts.signature.clone();
    let (point, _) = jwks.keys[0].es256_point()?;
    let vsecs = secs as f64 / 2.0;
    let keygate_rate = per_core(vsecs, || {
        verifier
            .verify(&token)
            .map(|c: Claims| c.sub.len() == 10)
            .unwrap_or(false)
    })?;
    let aws =
        aws_lc_rs::signature::ParsedPublicKey::new(&aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED, &point)
            .map_err(|_| anyhow::anyhow!("aws-lc-rs refused the key"))?;
    let aws_rate = per_core(vsecs, || aws.verify_sig(&input, &sig).is_ok())?;
    let ring_key = ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, &point);
    let ring_rate = per_core(vsecs, || ring_key.verify(&input, &sig).is_ok())?;
    use p256::ecdsa::signature::Verifier as _;
    let p256_key = p256::ecdsa::VerifyingKey::from_sec1_bytes(&point)?;
    let p256_sig = p256::ecdsa::Signature::from_slice(&sig)?;
    let p256_rate = per_core(vsecs, || p256_key.verify(&input, &p256_sig).is_ok())?;
    let fastest = [("aws-lc-rs", aws_rate), ("ring", ring_rate), ("p256", p256_rate)]
        .into_iter()
        .fold(("", 0.0), |best, x| if x.1 > best.1 { x } else { best });

    let r_issue1 = e2e1.rate / raw1;
    let r_issue_n = e2e_n.rate / raw_n;
    let r_verify = keygate_rate / fastest.1;
    println!("backend                     pkcs11 (SoftHSM2 if simulator), one token");
    println!("raw sign, 1 session         {raw1:>10.0} /s");
    println!("raw sign, {n} sessions        {raw_n:>10.0} /s");
    for (label, s, e) in [("1 session", 1, &e2e1), ("N sessions", n, &e2e_n)] {
        println!(
            "issuance, {label:<10} {:>10.0} /s   p50 {:.2} ms   p99 {:.2} ms   errors {}   ({s} sessions, {} clients)",
            e.rate, e.p50_ms, e.p99_ms, e.errors, a.clients
        );
    }
    println!("verify, keygate verifier   {keygate_rate:>10.0} /s per core");
    println!("verify, raw aws-lc-rs      {aws_rate:>10.0} /s per core");
    println!("verify, raw ring           {ring_rate:>10.0} /s per core");
    println!("verify, raw p256           {p256_rate:>10.0} /s per core");
    println!("ratio issuance/raw sign, 1 session:  {r_issue1:.2}  (target >= 0.5)");
    println!("ratio issuance/raw sign, {n} sessions: {r_issue_n:.2}  (target >= 0.5)");
    println!(
        "ratio verify/fastest raw ({}):  {r_verify:.2}  (target >= 0.9)",
        fastest.0
    );
    if a.markdown {
        println!();
        println!("| measurement | rate | ratio |");
        println!("|---|---|---|");
        println!("| raw sign, 1 session | {raw1:.0}/s | |");
        println!("| raw sign, {n} sessions | {raw_n:.0}/s | |");
        println!(
            "| issuance over HTTP, 1 session ({} clients) | {:.0}/s (p50 {:.2} ms, p99 {:.2} ms) | {r_issue1:.2} of raw |",
            a.clients, e2e1.rate, e2e1.p50_ms, e2e1.p99_ms
        );
        println!(
            "| issuance over HTTP, {n} sessions ({} clients) | {:.0}/s (p50 {:.2} ms, p99 {:.2} ms) | {r_issue_n:.2} of raw |",
            a.clients, e2e_n.rate, e2e_n.p50_ms, e2e_n.p99_ms
        );
        println!(
            "| verify, keygate verifier, 1 core | {keygate_rate:.0}/s | {r_verify:.2} of {} |",
            fastest.0
        );
        println!("| verify, raw aws-lc-rs, 1 core | {aws_rate:.0}/s | |");
        println!("| verify, raw ring, 1 core | {ring_rate:.0}/s | |");
        println!("| verify, raw p256, 1 core | {p256_rate:.0}/s | |");
    }
    Ok(())
}
