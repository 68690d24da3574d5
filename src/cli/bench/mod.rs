//! `keygate bench`: in one run on one token, the raw backend sign rate (1 and N sessions),
//! end-to-end issuance over HTTP on loopback with concurrent clients (same session counts),
//! and offline verification per core against the fastest raw ECDSA P-256 verify measured in
//! the same run. Prints the ratios the project tracks (docs/benchmarks.md).

mod burst;
mod cpu;
mod enroll;
mod lifecycle;
mod load;
mod report;
mod stores;

use clap::Args;
use load::{Issuance, RawSign, issuance, median, per_core_interleaved, raw_sign_rate};
use report::Table;

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
    /// A PostgreSQL server (an admin URL, like postgres://postgres@127.0.0.1:5432/postgres)
    /// to measure the PostgreSQL store on as well: issuance, redemption and revocation events
    /// across two replicas. A database is made for the run and dropped after it.
    #[arg(long, env = "KEYGATE_BENCH_PG_URL")]
    pub pg_url: Option<String>,
    /// Skip the server-CPU measurement (a `keygate serve` child process).
    #[arg(long)]
    pub no_server_cpu: bool,
    /// Measure a burst instead: this many clients issuing at once, one connection each,
    /// for --seconds; every answer counted by status with its latency (2000, say).
    #[arg(long)]
    pub burst: Option<usize>,
    /// Measure attestation-gated enrollment instead, with the TPM at this TCTI playing the
    /// client (swtpm:host=127.0.0.1,port=2321, say).
    #[arg(long)]
    pub enroll_tcti: Option<String>,
}

/// One run's figures; ratios are computed within a run, then the median is reported.
struct Run {
    raw1: RawSign,
    raw_n: RawSign,
    e2e1: Issuance,
    e2e_n: Issuance,
    redeem: lifecycle::Redemption,
    /// On PostgreSQL (with --pg-url): issuance with N sessions, redemption.
    pg: Option<(Issuance, lifecycle::Redemption)>,
    /// Server CPU per issued token, SQLite, N sessions (`keygate serve` as a child).
    cpu: Option<cpu::ServerCpu>,
    /// CPU of one raw signature (1 session), measured right before and right after the
    /// server-CPU run: what its ratio is taken against.
    raw_around: Option<(RawSign, RawSign)>,
}

impl Run {
    /// The raw signature's CPU the server's is compared with: the mean of the raw runs right
    /// before and after it.
    fn raw_cpu_around(&self) -> f64 {
        self.raw_around
            .map(|(b, a)| (b.cpu_us + a.cpu_us) / 2.0)
            .unwrap_or(self.raw1.cpu_us)
    }
}

/// What the bench needs from a first look at the service: the active key and a token.
struct Sample {
    uri: String,
    backend: &'static str,
    jwks: crate::token::JwkSet,
    token: String,
    /// A long-lived issuing API token for the server-CPU run.
    api_secret: String,
}

async fn sample(config: &Config) -> anyhow::Result<Sample> {
    let service = crate::cli::build_service(config).await?;
    let ring = service.authority.key_ring();
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
    let api = service
        .authority
        .create_api_token(
            "bench",
            "bench",
            &["tokens:issue".to_owned()],
            Some(86_400),
            false,
            "local",
        )
        .await?;
    Ok(Sample {
        uri: ring.active.uri.clone(),
        backend: service.backend.kind(),
        jwks: ring.jwks.clone(),
        token,
        api_secret: api.secret.to_string(),
    })
}

pub async fn run(a: BenchArgs, mut config: Config) -> anyhow::Result<()> {
    // The load comes from one address, like a fleet behind one proxy: the per-source limit
    // of the open endpoints would measure itself, not the service.
    config.http.per_source_per_second = 0;
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
    if let Some(clients) = a.burst {
        return burst::report(&config, clients, secs, a.markdown).await;
    }
    if let Some(tcti) = &a.enroll_tcti {
        return enroll::report(&config, tcti, secs, runs, a.markdown).await;
    }
    let s = sample(&config).await?;
    let pg = match &a.pg_url {
        Some(url) => Some(stores::BenchDb::create(&config, url).await?),
        None => None,
    };
    eprintln!(
        "keygate bench: {runs} runs of {secs} s per measurement, N = {n} sessions, {} HTTP clients{}",
        a.clients,
        if pg.is_some() {
            ", SQLite and PostgreSQL"
        } else {
            ", SQLite (no --pg-url)"
        }
    );
    let result = measure(&a, &config, &s, pg.as_ref(), n, secs, runs).await;
    if let Some(db) = pg
        && let Err(e) = db.drop_database().await
    {
        eprintln!("keygate bench: could not drop the bench database: {e:#}");
    }
    result
}

/// [`raw_sign_rate`] on a blocking thread.
async fn raw_sign(config: &Config, uri: &str, sessions: usize, secs: u64) -> anyhow::Result<RawSign> {
    let (config, uri) = (config.clone(), uri.to_owned());
    tokio::task::spawn_blocking(move || raw_sign_rate(&config, &uri, sessions, secs)).await?
}

async fn measure(
    a: &BenchArgs,
    config: &Config,
    s: &Sample,
    pg: Option<&stores::BenchDb>,
    n: usize,
    secs: u64,
    runs: usize,
) -> anyhow::Result<()> {
    let mut all = Vec::new();
    for r in 1..=runs {
        // Raw and end-to-end side by side, so each ratio compares like with like.
        let raw1 = raw_sign(config, &s.uri, 1, secs).await?;
        let e2e1 = issuance(config, 1, a.clients, secs).await?;
        // With one session only (a TPM), the N-session pair is the same measurement.
        let (raw_n, e2e_n) = if n > 1 {
            let raw_n = raw_sign(config, &s.uri, n, secs).await?;
            (raw_n, issuance(config, n, a.clients, secs).await?)
        } else {
            (raw1, e2e1)
        };
        let tokens = (secs as usize * 6000).min(40_000);
        let redeem = lifecycle::redemption(config, tokens, a.clients, secs).await?;
        let pg_run = match pg {
            Some(db) => Some((
                issuance(&db.config, n, a.clients, secs).await?,
                lifecycle::redemption(&db.config, tokens, a.clients, secs).await?,
            )),
            None => None,
        };
        // The raw signature is measured again right before and right after the server, so
        // that the machine's drift between the start of the run and this point (more than
        // 10% within a minute on the shared VMs here) does not fall between the two figures
        // compared.
        let (cpu, raw_around) = if a.no_server_cpu {
            (None, None)
        } else {
            let before = raw_sign(config, &s.uri, 1, secs).await?;
            let server = cpu::server_cpu(config, &s.api_secret, a.clients, secs).await?;
            let after = raw_sign(config, &s.uri, 1, secs).await?;
            (Some(server), Some((before, after)))
        };
        eprintln!(
            "  run {r}: raw 1 {:.0}/s ({:.1} us CPU), issue 1 {:.0}/s, issue {n} {:.0}/s, redeem {:.0}/s{}{}",
            raw1.rate,
            raw1.cpu_us,
            e2e1.rate,
            e2e_n.rate,
            redeem.rate,
            pg_run
                .map(|(i, r)| format!(", PostgreSQL issue {:.0}/s redeem {:.0}/s", i.rate, r.rate))
                .unwrap_or_default(),
            cpu.zip(raw_around)
                .map(|(c, (before, after))| format!(
                    ", server CPU {:.1} us/token ({:.1} signing; raw {:.1} us before it, {:.1} after)",
                    c.cpu_us, c.sign_us, before.cpu_us, after.cpu_us
                ))
                .unwrap_or_default(),
        );
        all.push(Run {
            raw1,
            raw_n,
            e2e1,
            e2e_n,
            redeem,
            pg: pg_run,
            cpu,
            raw_around,
        });
    }
    let sse = lifecycle::revocation_to_event(config, 200, false).await?;
    let sse_across = match pg {
        Some(db) => Some(lifecycle::revocation_to_event(&db.config, 200, true).await?),
        None => None,
    };
    let verify = verification(config, s, secs as f64 * runs as f64 / 2.0)?;

    let med = |f: &dyn Fn(&Run) -> f64| median(all.iter().map(f).collect());
    let c = a.clients;
    let mut t = Table::new(format!(
        "medians of {runs} runs; backend {}, one key per store",
        s.backend
    ));
    t.row(
        "raw sign, 1 session",
        format!(
            "{:.0}/s, {:.1} us CPU each",
            med(&|r| r.raw1.rate),
            med(&|r| r.raw1.cpu_us)
        ),
        "",
    );
    if n > 1 {
        t.row(
            format!("raw sign, {n} sessions"),
            format!("{:.0}/s", med(&|r| r.raw_n.rate)),
            "",
        );
    }
    let lat = |rate: f64, p50: f64, p99: f64| format!("{rate:.0}/s (p50 {p50:.2} ms, p99 {p99:.2} ms)");
    t.row(
        format!("issuance over HTTP, SQLite, 1 session, {c} clients"),
        lat(
            med(&|r| r.e2e1.rate),
            med(&|r| r.e2e1.p50_ms),
            med(&|r| r.e2e1.p99_ms),
        ),
        format!(
            "{:.2} of raw (target >= 0.5)",
            med(&|r| r.e2e1.rate / r.raw1.rate)
        ),
    );
    if n > 1 {
        t.row(
            format!("issuance over HTTP, SQLite, {n} sessions, {c} clients"),
            lat(
                med(&|r| r.e2e_n.rate),
                med(&|r| r.e2e_n.p50_ms),
                med(&|r| r.e2e_n.p99_ms),
            ),
            format!(
                "{:.2} of raw (target >= 0.5)",
                med(&|r| r.e2e_n.rate / r.raw_n.rate)
            ),
        );
    }
    if pg.is_some() {
        let pgi = |f: &dyn Fn(&Issuance) -> f64| med(&|r| r.pg.map(|p| f(&p.0)).unwrap_or(0.0));
        t.row(
            format!("issuance over HTTP, PostgreSQL, {n} sessions, {c} clients"),
            lat(pgi(&|i| i.rate), pgi(&|i| i.p50_ms), pgi(&|i| i.p99_ms)),
            format!(
                "{:.2} of SQLite (target >= 0.5)",
                med(&|r| r.pg.map(|p| p.0.rate).unwrap_or(0.0) / r.e2e_n.rate)
            ),
        );
    }
    t.row(
        format!("one-time redemption over HTTP, SQLite, {c} clients"),
        lat(
            med(&|r| r.redeem.rate),
            med(&|r| r.redeem.p50_ms),
            med(&|r| r.redeem.p99_ms),
        ),
        format!(
            "{:.2} of raw sign, 1 session",
            med(&|r| r.redeem.rate / r.raw1.rate)
        ),
    );
    if pg.is_some() {
        let pgr = |f: &dyn Fn(&lifecycle::Redemption) -> f64| {
            med(&|r| r.pg.as_ref().map(|p| f(&p.1)).unwrap_or(0.0))
        };
        t.row(
            format!("one-time redemption over HTTP, PostgreSQL, {c} clients"),
            lat(pgr(&|x| x.rate), pgr(&|x| x.p50_ms), pgr(&|x| x.p99_ms)),
            format!(
                "{:.2} of SQLite",
                med(&|r| r.pg.as_ref().map(|p| p.1.rate).unwrap_or(0.0) / r.redeem.rate)
            ),
        );
    }
    let ev = |l: &lifecycle::SseLatency| {
        format!(
            "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} revocations)",
            l.p50_ms, l.p99_ms, l.max_ms, l.samples
        )
    };
    t.row(
        "revocation -> SSE event, one replica, SQLite",
        ev(&sse),
        "target <= 100 ms",
    );
    if let Some(x) = &sse_across {
        t.row(
            "revocation -> SSE event across replicas, PostgreSQL",
            ev(x),
            "target p99 < 50 ms",
        );
    }
    if all.iter().all(|r| r.cpu.is_some()) {
        let cpu = |f: &dyn Fn(&cpu::ServerCpu) -> f64| med(&|r| r.cpu.map(|x| f(&x)).unwrap_or(0.0));
        t.row(
            format!("server CPU per issued token, SQLite, keygate serve, {c} clients"),
            format!("{:.1} us ({:.0}/s)", cpu(&|x| x.cpu_us), cpu(&|x| x.issued.rate)),
            format!(
                "{:.2} x raw signature CPU (target <= 2)",
                med(&|r| r.cpu.map(|x| x.cpu_us).unwrap_or(0.0) / r.raw_cpu_around())
            ),
        );
        t.row(
            "  raw signature CPU, 1 session, right before and after it",
            format!("{:.1} us", med(&|r| r.raw_cpu_around())),
            format!(
                "(the raw run at the start of each run: {:.1} us, server CPU = {:.2} x it)",
                med(&|r| r.raw1.cpu_us),
                med(&|r| r.cpu.map(|x| x.cpu_us).unwrap_or(0.0) / r.raw1.cpu_us)
            ),
        );
        // The same ratio against the signature as the server's own signing thread paid for
        // it in the same seconds: the raw runs are alone, without the other threads'
        // interrupts and cache traffic on their core (docs/benchmarks-server-cpu.md).
        t.row(
            "  of which the signing thread (the signature inside the server)",
            format!("{:.1} us", cpu(&|x| x.sign_us)),
            format!(
                "server CPU = {:.2} x it",
                med(&|r| r.cpu.map(|x| x.cpu_us / x.sign_us.max(1e-9)).unwrap_or(0.0))
            ),
        );
    }
    verify.rows(&mut t);
    let errors: u64 = all
        .iter()
        .map(|r| {
            r.e2e1.errors
                + r.e2e_n.errors
                + r.redeem.errors
                + r.pg.map(|p| p.0.errors + p.1.errors).unwrap_or(0)
        })
        .sum();
    t.row("failed requests, all runs", errors.to_string(), "");
    t.print(a.markdown);
    Ok(())
}

/// Offline verification rates, one core, all contenders interleaved.
struct Verification {
    keygate: f64,
    contenders: [(&'static str, f64); 3],
}

impl Verification {
    fn rows(&self, t: &mut Table) {
        let fastest = self
            .contenders
            .iter()
            .fold(("", 0.0), |best, x| if x.1 > best.1 { *x } else { best });
        t.row(
            "verify, keygate verifier, 1 core",
            format!("{:.0}/s", self.keygate),
            format!("{:.2} of {} (target >= 0.9)", self.keygate / fastest.1, fastest.0),
        );
        for (name, rate) in self.contenders {
            t.row(format!("verify, raw {name}, 1 core"), format!("{rate:.0}/s"), "");
        }
    }
}

fn verification(config: &Config, s: &Sample, secs: f64) -> anyhow::Result<Verification> {
    let verifier = Verifier::new(&s.jwks, VerifierConfig::new(config.issuer(), "bench"))?;
    let parts = jws::parse(&s.token).map_err(|e| anyhow::anyhow!("{e}"))?;
    let input = parts.signing_input.as_bytes().to_vec();
    let sig = parts.signature.clone();
    let (point, _) = s.jwks.keys[0].es256_point()?;
    let aws =
        aws_lc_rs::signature::ParsedPublicKey::new(&aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED, &point)
            .map_err(|_| anyhow::anyhow!("aws-lc-rs refused the key"))?;
    let ring_key = ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, &point);
    use p256::ecdsa::signature::Verifier as _;
    let p256_key = p256::ecdsa::VerifyingKey::from_sec1_bytes(&point)?;
    let p256_sig = p256::ecdsa::Signature::from_slice(&sig)?;
    let mut kg = || {
        verifier
            .verify(&s.token)
            .map(|c: Claims| c.sub == "bench-node")
            .unwrap_or(false)
    };
    let mut aw = || aws.verify_sig(&input, &sig).is_ok();
    let mut ri = || ring_key.verify(&input, &sig).is_ok();
    let mut p2 = || p256_key.verify(&input, &p256_sig).is_ok();
    let rates = per_core_interleaved(secs, &mut [&mut kg, &mut aw, &mut ri, &mut p2])?;
    Ok(Verification {
        keygate: rates[0],
        contenders: [("aws-lc-rs", rates[1]), ("ring", rates[2]), ("p256", rates[3])],
    })
}
