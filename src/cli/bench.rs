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
use crate::token::{Claims, Verifier, VerifierConfig, jws};

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// N for the multi-session runs (default: the number of cores).
    #[arg(long)]
    pub sessions: Option<usize>,
    /// Runs of every measurement; medians are reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Concurrent HTTP clients in the issuance runs.
    #[arg(long, default_value_t = 32)]
    pub clients: usize,
    /// Print the results as a Markdown table as well.
    #[arg(long)]
    pub markdown: bool,
    /// Measure attestation-gated enrollment instead, with the TPM at this TCTI playing the
    /// client (swtpm:host=127.0.0.1,port=2321, say).
    #[arg(long)]
    pub enroll_tcti: Option<String>,
}

#[derive(Clone)]
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
pub(super) fn raw_sign_rate(config: &Config, uri: &str, sessions: usize, secs: u64) -> anyhow::Result<f64> {
    let (backend, _) = super::serve::open_backend_blocking(config, Some(sessions))?;
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
    let service = super::serve::build_service_with(config, Some(sessions)).await?;
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
    let (addr, stop_tx) = super::bench_lifecycle::serve(&service).await?;
    let body = r#"{"subject":"bench-node","audience":"bench","ttl_seconds":300}"#;
    let request: Arc<[u8]> = format!(
        "POST /v1/tokens HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        api.secret.as_str(),
        body.len()
    )
    .into_bytes()
    .into();
    // warm-up, and a check that the request is right
    let mut conn = LoadConn::connect(addr).await?;
    for _ in 0..50 {
        anyhow::ensure!(
            conn.round_trip(&request).await? == 201,
            "the benchmark request was refused"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let request = request.clone();
        tasks.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new(3).map_err(|e| anyhow::anyhow!("{e}"))?;
            let mut errors = 0u64;
            let mut conn = LoadConn::connect(addr).await?;
            while Instant::now() < deadline {
                let t = Instant::now();
                match conn.round_trip(&request).await {
                    Ok(201) => h.record(t.elapsed().as_micros() as u64)?,
                    Ok(_) => errors += 1,
                    Err(_) => {
                        errors += 1;
                        conn = LoadConn::connect(addr).await?;
                    }
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

/// A bare HTTP/1.1 keep-alive connection that sends one prebuilt request again and again:
/// the lightest load generator we can write, so the run measures the server rather than an
/// HTTP client library sharing its two cores.
pub(super) struct LoadConn {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
}

impl LoadConn {
    pub(super) async fn connect(addr: std::net::SocketAddr) -> anyhow::Result<LoadConn> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(LoadConn {
            stream,
            buf: Vec::with_capacity(4096),
        })
    }

    /// Sends `request` and reads one whole response; returns its status code.
    pub(super) async fn round_trip(&mut self, request: &[u8]) -> anyhow::Result<u16> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        self.stream.write_all(request).await?;
        self.buf.clear();
        let (head_len, status, body_len) = loop {
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                anyhow::bail!("the server closed the connection");
            }
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.buf[..end])?;
                let status: u16 = head.get(9..12).unwrap_or("0").parse()?;
                let len = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(0);
                break (end + 4, status, len);
            }
        };
        while self.buf.len() < head_len + body_len {
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                anyhow::bail!("the server closed the connection");
            }
        }
        Ok(status)
    }
}

/// Verifications per second on this thread for each of `ops`, measured in alternating
/// slices of 50 ms for about `secs` seconds each, so that drift on a shared machine hits
/// every contender alike.
fn per_core_interleaved(secs: f64, ops: &mut [&mut dyn FnMut() -> bool]) -> anyhow::Result<Vec<f64>> {
    let mut counts = vec![0u64; ops.len()];
    let mut spent = vec![0f64; ops.len()];
    while spent.iter().any(|t| *t < secs) {
        for (i, op) in ops.iter_mut().enumerate() {
            let started = Instant::now();
            while started.elapsed().as_secs_f64() < 0.05 {
                for _ in 0..20 {
                    anyhow::ensure!(op(), "a verification failed during the benchmark");
                }
                counts[i] += 20;
            }
            spent[i] += started.elapsed().as_secs_f64();
        }
    }
    Ok(counts.iter().zip(&spent).map(|(c, t)| *c as f64 / t).collect())
}

pub(super) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// One run's figures; ratios are computed within a run, then the median is reported.
struct Run {
    raw1: f64,
    raw_n: f64,
    e2e1: Issuance,
    e2e_n: Issuance,
    redeem: super::bench_lifecycle::Redemption,
}

pub async fn run(a: BenchArgs, config: Config) -> anyhow::Result<()> {
    // The bench works on its own data folder (docs: KEYGATE_DATA_DIR=$(mktemp -d)): a fresh
    // one is initialised first, on whichever backend is configured.
    if !config.data_dir.join("keygate.db").exists() {
        super::init(&config, false).await?;
    }
    // A TPM runs one command at a time: N is 1 there.
    let n = if config.backend == crate::config::BackendKind::Tpm {
        1
    } else {
        a.sessions
            .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2))
    };
    let secs = a.seconds.max(1);
    let runs = a.runs.max(1);
    if let Some(tcti) = &a.enroll_tcti {
        return super::bench_enroll::report(&config, tcti, secs, runs, a.markdown).await;
    }
    // The active key, and a token it signed, for the verification runs.
    let service = super::build_service(&config).await?;
    let ring_ = service.authority.key_ring();
    let uri = ring_.active.uri.clone();
    let backend_kind = service.backend.kind();
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
        "keygate bench: {runs} runs of {secs} s per measurement, N = {n} sessions, {} HTTP clients",
        a.clients
    );
    let mut all = Vec::new();
    for r in 1..=runs {
        // Raw and end-to-end side by side, so each ratio compares like with like.
        let (cfg, u) = (config.clone(), uri.clone());
        let raw1 = tokio::task::spawn_blocking(move || raw_sign_rate(&cfg, &u, 1, secs)).await??;
        let e2e1 = issuance(&config, 1, a.clients, secs).await?;
        // With one session only (a TPM), the N-session pair is the same measurement.
        let (raw_n, e2e_n) = if n > 1 {
            let (cfg, u) = (config.clone(), uri.clone());
            let raw_n = tokio::task::spawn_blocking(move || raw_sign_rate(&cfg, &u, n, secs)).await??;
            (raw_n, issuance(&config, n, a.clients, secs).await?)
        } else {
            (raw1, e2e1.clone())
        };
        if n > 1 {
            eprintln!(
                "  run {r}: raw 1 {raw1:.0}/s, issue 1 {:.0}/s ({:.2}); raw {n} {raw_n:.0}/s, issue {n} {:.0}/s ({:.2})",
                e2e1.rate,
                e2e1.rate / raw1,
                e2e_n.rate,
                e2e_n.rate / raw_n
            );
        } else {
            eprintln!(
                "  run {r}: raw {raw1:.0}/s, issue {:.0}/s ({:.2})",
                e2e1.rate,
                e2e1.rate / raw1
            );
        }
        // After the issuance pairs, so that they stay side by side as before.
        let tokens = (secs as usize * 6000).min(40_000);
        let redeem = super::bench_lifecycle::redemption(&config, tokens, a.clients, secs).await?;
        eprintln!("  run {r}: redeem {:.0}/s", redeem.rate);
        all.push(Run {
            raw1,
            raw_n,
            e2e1,
            e2e_n,
            redeem,
        });
    }
    let sse = super::bench_lifecycle::revocation_to_event(&config, 200).await?;

    // Offline verification, one core, all contenders interleaved.
    let verifier = Verifier::new(&jwks, VerifierConfig::new(config.issuer(), "bench"))?;
    let parts = jws::parse(&token).map_err(|e| anyhow::anyhow!("{e}"))?;
    let input = parts.signing_input.as_bytes().to_vec();
    let sig = parts.signature.clone();
    let (point, _) = jwks.keys[0].es256_point()?;
    let aws =
        aws_lc_rs::signature::ParsedPublicKey::new(&aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED, &point)
            .map_err(|_| anyhow::anyhow!("aws-lc-rs refused the key"))?;
    let ring_key = ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, &point);
    use p256::ecdsa::signature::Verifier as _;
    let p256_key = p256::ecdsa::VerifyingKey::from_sec1_bytes(&point)?;
    let p256_sig = p256::ecdsa::Signature::from_slice(&sig)?;
    let mut kg = || {
        verifier
            .verify(&token)
            .map(|c: Claims| c.sub == "bench-node")
            .unwrap_or(false)
    };
    let mut aw = || aws.verify_sig(&input, &sig).is_ok();
    let mut ri = || ring_key.verify(&input, &sig).is_ok();
    let mut p2 = || p256_key.verify(&input, &p256_sig).is_ok();
    let rates = per_core_interleaved(
        secs as f64 * runs as f64 / 2.0,
        &mut [&mut kg, &mut aw, &mut ri, &mut p2],
    )?;
    let (keygate_rate, aws_rate, ring_rate, p256_rate) = (rates[0], rates[1], rates[2], rates[3]);
    let fastest = [("aws-lc-rs", aws_rate), ("ring", ring_rate), ("p256", p256_rate)]
        .into_iter()
        .fold(("", 0.0), |best, x| if x.1 > best.1 { x } else { best });

    let med = |f: &dyn Fn(&Run) -> f64| median(all.iter().map(f).collect());
    let (raw1, raw_n) = (med(&|r| r.raw1), med(&|r| r.raw_n));
    let (e1, en) = (med(&|r| r.e2e1.rate), med(&|r| r.e2e_n.rate));
    let (p50_1, p99_1) = (med(&|r| r.e2e1.p50_ms), med(&|r| r.e2e1.p99_ms));
    let (p50_n, p99_n) = (med(&|r| r.e2e_n.p50_ms), med(&|r| r.e2e_n.p99_ms));
    let errors: u64 = all.iter().map(|r| r.e2e1.errors + r.e2e_n.errors).sum();
    let (red, red_p50, red_p99) = (
        med(&|r| r.redeem.rate),
        med(&|r| r.redeem.p50_ms),
        med(&|r| r.redeem.p99_ms),
    );
    let red_errors: u64 = all.iter().map(|r| r.redeem.errors).sum();
    let r_redeem = med(&|r| r.redeem.rate / r.raw1);
    let r_issue1 = med(&|r| r.e2e1.rate / r.raw1);
    let r_issue_n = med(&|r| r.e2e_n.rate / r.raw_n);
    let r_verify = keygate_rate / fastest.1;
    let c = a.clients;
    println!("medians of {runs} runs; backend {}, one key", backend_kind);
    println!("raw sign, 1 session          {raw1:>8.0} /s");
    if n > 1 {
        println!("raw sign, {n} sessions         {raw_n:>8.0} /s");
    }
    println!(
        "issuance, 1 session          {e1:>8.0} /s   p50 {p50_1:.2} ms   p99 {p99_1:.2} ms   ({c} clients)"
    );
    if n > 1 {
        println!(
            "issuance, {n} sessions         {en:>8.0} /s   p50 {p50_n:.2} ms   p99 {p99_n:.2} ms   ({c} clients)"
        );
    }
    println!("failed issuance requests     {errors:>8}");
    println!(
        "one-time redemption          {red:>8.0} /s   p50 {red_p50:.2} ms   p99 {red_p99:.2} ms   ({c} clients)"
    );
    println!("failed redemptions           {red_errors:>8}");
    println!(
        "revocation -> SSE event      p50 {:.2} ms   p99 {:.2} ms   max {:.2} ms   ({} revocations, target <= 100 ms)",
        sse.p50_ms, sse.p99_ms, sse.max_ms, sse.samples
    );
    println!("verify, keygate verifier     {keygate_rate:>8.0} /s per core");
    println!("verify, raw aws-lc-rs        {aws_rate:>8.0} /s per core");
    println!("verify, raw ring             {ring_rate:>8.0} /s per core");
    println!("verify, raw p256             {p256_rate:>8.0} /s per core");
    println!("ratio issuance/raw sign, 1 session:   {r_issue1:.2}  (target >= 0.5)");
    if n > 1 {
        println!("ratio issuance/raw sign, {n} sessions:  {r_issue_n:.2}  (target >= 0.5)");
    }
    println!(
        "ratio verify/fastest raw ({}): {r_verify:.2}  (target >= 0.9)",
        fastest.0
    );
    println!("ratio redemption/raw sign, 1 session: {r_redeem:.2}  (no signature: bound by the store)");
    if a.markdown {
        println!();
        println!("| measurement (median of {runs} runs) | rate | ratio |");
        println!("|---|---|---|");
        println!("| raw sign, 1 session | {raw1:.0}/s | |");
        if n > 1 {
            println!("| raw sign, {n} sessions | {raw_n:.0}/s | |");
        }
        println!(
            "| issuance over HTTP, 1 session, {c} clients | {e1:.0}/s (p50 {p50_1:.2} ms, p99 {p99_1:.2} ms) | {r_issue1:.2} of raw |"
        );
        if n > 1 {
            println!(
                "| issuance over HTTP, {n} sessions, {c} clients | {en:.0}/s (p50 {p50_n:.2} ms, p99 {p99_n:.2} ms) | {r_issue_n:.2} of raw |"
            );
        }
        println!(
            "| verify, keygate verifier, 1 core | {keygate_rate:.0}/s | {r_verify:.2} of {} |",
            fastest.0
        );
        println!(
            "| one-time redemption over HTTP, {c} clients | {red:.0}/s (p50 {red_p50:.2} ms, p99 {red_p99:.2} ms) | {r_redeem:.2} of raw sign, 1 session |"
        );
        println!(
            "| revocation → SSE event ({} samples) | p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms | target ≤ 100 ms |",
            sse.samples, sse.p50_ms, sse.p99_ms, sse.max_ms
        );
        println!("| verify, raw aws-lc-rs, 1 core | {aws_rate:.0}/s | |");
        println!("| verify, raw ring, 1 core | {ring_rate:.0}/s | |");
        println!("| verify, raw p256, 1 core | {p256_rate:.0}/s | |");
    }
    Ok(())
}
