//! `keygate bench --enroll-tcti TCTI`: attestation-gated enrollments per second, and the
//! server's CPU time per enrollment.
//!
//! The server runs as a child process (`keygate serve` on this configuration, in allowlist
//! mode), so its CPU time is read exactly from `/proc/<pid>/stat`; this process plays the
//! client with `keygate enroll`'s own TPM code against the TPM at TCTI (swtpm, say), one
//! enrollment after another on one EK and AK. Per enrollment the server makes one
//! credential (an RSA-OAEP encryption or an ECDH), verifies one quote, and has the HSM sign
//! twice (the token and the AK certificate): the raw sign rate in the same run puts the
//! server's capacity in proportion.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};

use crate::authority::Principal;
use crate::cli::enroll_tpm::{EkKind, Tpm};
use crate::config::{Config, EnrollMode};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `keygate serve` on `config` (allowlist mode, a free loopback port); its base URL.
fn start_server(config: &Config, dir: &std::path::Path) -> anyhow::Result<(Server, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut cfg = config.clone();
    cfg.listen = format!("127.0.0.1:{port}").parse()?;
    cfg.public_base_url = None;
    cfg.issuer = Some(config.issuer());
    cfg.enroll.mode = EnrollMode::Allowlist;
    let path = dir.join("bench-server.toml");
    std::fs::write(
        &path,
        toml::to_string(&cfg).context("writing the server configuration")?,
    )?;
    let log = std::fs::File::create(dir.join("bench-server.log"))?;
    let child = Command::new(std::env::current_exe()?)
        .args(["--config"])
        .arg(&path)
        .arg("serve")
        .env_remove("KEYGATE_LISTEN")
        .env_remove("KEYGATE_ENROLL_MODE")
        .env("KEYGATE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting keygate serve")?;
    let server = Server(child);
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!(
                "the benchmark server did not start (see {})",
                dir.join("bench-server.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((server, base))
}

/// One measured run.
struct EnrollRun {
    pub rate: f64,
    pub server_cpu_ms: f64,
    pub tpm_ms: f64,
    pub p50_ms: f64,
}

/// `runs` runs of `secs` seconds each against a child server on `config`. `service` (on
/// the same configuration) registers the client's EK, and is closed before the child starts.
async fn enrollment(
    service: crate::cli::Service,
    config: &Config,
    tcti: &str,
    secs: u64,
    runs: usize,
) -> anyhow::Result<Vec<EnrollRun>> {
    let dir = tempfile_dir()?;
    let rt = tokio::runtime::Handle::current();
    let tcti = tcti.to_owned();
    let config = config.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<EnrollRun>> {
        let mut tpm = Tpm::open(&tcti, EkKind::Rsa2048)?;
        let ek_hash = crate::attest::TpmPublic::from_tpm2b(&tpm.ek_pub, "ek_pub")
            .map_err(|e| anyhow!("{e}"))?
            .ek_hash();
        let who = Principal {
            id: "bench".into(),
            scopes: vec![crate::authority::Scope::Admin],
        };
        let authority = &service.authority;
        if rt.block_on(authority.store().machine(&ek_hash))?.is_none() {
            rt.block_on(authority.register_machine(
                &who,
                &ek_hash,
                &format!("bench-{}", &ek_hash[..12]),
                "local",
            ))?;
        }
        // The server is the child from here on.
        drop(service);
        let (server, base) = start_server(&config, &dir)?;
        let http = reqwest::Client::new();
        for _ in 0..3 {
            crate::cli::enroll::exchange(&rt, &http, &base, &mut tpm)?;
        }
        let mut out = Vec::new();
        for _ in 0..runs {
            let cpu0 = super::cpu::process_cpu(server.0.id())?;
            let started = Instant::now();
            let (mut n, mut in_tpm) = (0u32, Duration::ZERO);
            let mut lat = Vec::new();
            while started.elapsed() < Duration::from_secs(secs) {
                let t = Instant::now();
                in_tpm += crate::cli::enroll::exchange(&rt, &http, &base, &mut tpm)?.1;
                lat.push(t.elapsed().as_secs_f64() * 1e3);
                n += 1;
            }
            let wall = started.elapsed().as_secs_f64();
            let cpu = super::cpu::process_cpu(server.0.id())?
                .saturating_sub(cpu0)
                .as_secs_f64();
            lat.sort_by(f64::total_cmp);
            out.push(EnrollRun {
                rate: n as f64 / wall,
                server_cpu_ms: cpu * 1e3 / n as f64,
                tpm_ms: in_tpm.as_secs_f64() * 1e3 / n as f64,
                p50_ms: lat[lat.len() / 2],
            });
        }
        drop(server);
        let _ = std::fs::remove_dir_all(&dir);
        Ok(out)
    })
    .await?
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let mut name = [0u8; 6];
    getrandom::fill(&mut name).map_err(|e| anyhow!("{e}"))?;
    let dir = std::env::temp_dir().join(format!("keygate-bench-enroll-{}", hex::encode(name)));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Runs the raw sign rate and the enrollment runs, and prints medians.
pub(super) async fn report(
    config: &Config,
    tcti: &str,
    secs: u64,
    runs: usize,
    markdown: bool,
) -> anyhow::Result<()> {
    let service = crate::cli::build_service(config).await?;
    let uri = service.authority.key_ring().active.uri.clone();
    let backend_kind = service.backend.kind();
    eprintln!("keygate bench (enrollment): {runs} runs of {secs} s, client TPM at {tcti}");
    let mut raws = Vec::new();
    for _ in 0..runs {
        let (cfg, u) = (config.clone(), uri.clone());
        raws.push(
            tokio::task::spawn_blocking(move || super::load::raw_sign_rate(&cfg, &u, 1, secs))
                .await??
                .rate,
        );
    }
    let all = enrollment(service, config, tcti, secs, runs).await?;
    for (i, r) in all.iter().enumerate() {
        eprintln!(
            "  run {}: {:.1} enrollments/s, server CPU {:.2} ms, client TPM {:.2} ms per enrollment",
            i + 1,
            r.rate,
            r.server_cpu_ms,
            r.tpm_ms
        );
    }
    let med = |f: &dyn Fn(&EnrollRun) -> f64| super::load::median(all.iter().map(f).collect());
    let raw = super::load::median(raws);
    let (rate, cpu, tpm, p50) = (
        med(&|r| r.rate),
        med(&|r| r.server_cpu_ms),
        med(&|r| r.tpm_ms),
        med(&|r| r.p50_ms),
    );
    // What one server core could sustain, against what the HSM allows (two signatures each).
    let capacity = 1000.0 / cpu;
    let hsm_bound = raw / 2.0;
    println!("medians of {runs} runs; backend {backend_kind}; one client, one TPM");
    println!("raw sign, 1 session              {raw:>8.0} /s");
    println!("enrollments (challenge+complete) {rate:>8.1} /s   p50 {p50:.2} ms");
    println!("  of which in the client's TPM   {tpm:>8.2} ms per enrollment");
    println!("server CPU per enrollment        {cpu:>8.2} ms   (one core: {capacity:.0} enrollments/s)");
    println!(
        "ratio server capacity / HSM bound (raw sign / 2): {:.2}",
        capacity / hsm_bound
    );
    if markdown {
        println!();
        println!("| measurement (median of {runs} runs) | value |");
        println!("|---|---|");
        println!("| raw sign, 1 session | {raw:.0}/s |");
        println!("| enrollments end to end, one client on swtpm | {rate:.1}/s (p50 {p50:.2} ms) |");
        println!("| client TPM time (ActivateCredential + PCR read + quote) | {tpm:.2} ms per enrollment |");
        println!("| server CPU time | {cpu:.2} ms per enrollment ({capacity:.0}/s per core) |");
        println!(
            "| server capacity / HSM bound (raw sign ÷ 2 signatures) | {:.2} |",
            capacity / hsm_bound
        );
    }
    Ok(())
}
