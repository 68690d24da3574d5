//! `keygate bench`: in one run on one token, the raw backend sign rate (1 and N sessions),
//! end-to-end issuance over HTTP on loopback with concurrent clients (same session counts),
//! and offline verification per core against the fastest raw ECDSA P-256 verify measured in
//! the same run. Prints the ratios the project tracks (docs/benchmarks.md).

mod enroll;
mod lifecycle;
mod load;

use clap::Args;
use load::{Issuance, issuance, median, per_core_interleaved, raw_sign_rate};

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

/// One run's figures; ratios are computed within a run, then the median is reported.
struct Run {
    raw1: f64,
    raw_n: f64,
    e2e1: Issuance,
    e2e_n: Issuance,
    redeem: lifecycle::Redemption,
}

pub async fn run(a: BenchArgs, config: Config) -> anyhow::Result<()> {
    // The bench works on its own data folder (docs: KEYGATE_DATA_DIR=$(mktemp -d)): a fresh
    // one is initialised first, on whichever backend is configured.
    if !config.data_dir.join("keygate.db").exists() {
        crate::cli::init(&config, false).await?;
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
        return enroll::report(&config, tcti, secs, runs, a.markdown).await;
    }
    // The active key, and a token it signed, for the verification runs.
    let service = crate::cli::build_service(&config).await?;
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
        let redeem = lifecycle::redemption(&config, tokens, a.clients, secs).await?;
        eprintln!("  run {r}: redeem {:.0}/s", redeem.rate);
        all.push(Run {
            raw1,
            raw_n,
            e2e1,
            e2e_n,
            redeem,
        });
    }
    let sse = lifecycle::revocation_to_event(&config, 200).await?;

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
