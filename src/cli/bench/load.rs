//! The load side of `keygate bench`: the raw device rate, a bare keep-alive HTTP client, and
//! issuance over HTTP on loopback.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::authority::Principal;
use crate::config::Config;

#[derive(Clone, Copy)]
pub(super) struct Issuance {
    pub(super) rate: f64,
    pub(super) p50_ms: f64,
    pub(super) p99_ms: f64,
    pub(super) errors: u64,
    /// Answers counted.
    pub(super) count: u64,
}

fn digest(msg: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, msg).as_ref());
    out
}

/// CPU time this thread has used, from the scheduler's own account (ns resolution).
pub(super) fn thread_cpu() -> Duration {
    schedstat("/proc/thread-self/schedstat")
}

/// The CPU time in a `schedstat` file of /proc (a thread's; zero when it cannot be read,
/// as for a thread that has ended).
pub(super) fn schedstat(path: impl AsRef<std::path::Path>) -> Duration {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .map(Duration::from_nanos)
        .unwrap_or_default()
}

/// A raw signing run: signatures per second, and CPU per signature on the signing threads.
#[derive(Clone, Copy)]
pub(super) struct RawSign {
    pub(super) rate: f64,
    pub(super) cpu_us: f64,
}

/// Signatures per second with `sessions` sessions and as many signing threads.
pub(super) fn raw_sign_rate(
    config: &Config,
    uri: &str,
    sessions: usize,
    secs: u64,
) -> anyhow::Result<RawSign> {
    let (backend, _) = crate::cli::serve::open_backend_blocking(config, Some(sessions))?;
    let d = digest(b"keygate bench");
    backend.sign_digest(uri, &d)?;
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..sessions)
        .map(|_| {
            let (b, stop, count, uri) = (backend.clone(), stop.clone(), count.clone(), uri.to_owned());
            std::thread::spawn(move || -> anyhow::Result<Duration> {
                let cpu = thread_cpu();
                while !stop.load(Ordering::Relaxed) {
                    b.sign_digest(&uri, &d)?;
                    count.fetch_add(1, Ordering::Relaxed);
                }
                Ok(thread_cpu() - cpu)
            })
        })
        .collect();
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    let mut cpu = Duration::ZERO;
    for t in threads {
        cpu += t
            .join()
            .map_err(|_| anyhow::anyhow!("a signing thread panicked"))??;
    }
    let n = count.load(Ordering::Relaxed);
    Ok(RawSign {
        rate: n as f64 / started.elapsed().as_secs_f64(),
        cpu_us: cpu.as_secs_f64() * 1e6 / n.max(1) as f64,
    })
}

/// The prebuilt issuance request for the load generator.
pub(super) fn issue_request(addr: std::net::SocketAddr, api_secret: &str) -> Arc<[u8]> {
    let body = r#"{"subject":"bench-node","audience":"bench","ttl_seconds":300}"#;
    format!(
        "POST /v1/tokens HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {api_secret}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
    .into()
}

/// Sends `request` 50 times, checking that the answer is `expect`.
pub(super) async fn warm_up(addr: std::net::SocketAddr, request: &[u8], expect: u16) -> anyhow::Result<()> {
    let mut conn = LoadConn::connect(addr).await?;
    for _ in 0..50 {
        let got = conn.round_trip(request).await?;
        anyhow::ensure!(got == expect, "the benchmark request was answered {got}");
    }
    Ok(())
}

/// What the load generator sends: one request again and again, or each of a set once.
pub(super) enum Requests {
    Same(Arc<[u8]>),
    Each(std::sync::Mutex<Vec<Arc<[u8]>>>),
}

impl Requests {
    fn next(&self) -> Option<Arc<[u8]>> {
        match self {
            Requests::Same(r) => Some(r.clone()),
            Requests::Each(q) => q.lock().ok()?.pop(),
        }
    }
}

/// Sends `requests` from `clients` keep-alive connections for at most `secs` seconds (or
/// until a set of requests runs out); the latencies of answers with status `expect`, and
/// the rate over the time until the last client finished.
pub(super) async fn drive(
    addr: std::net::SocketAddr,
    requests: Requests,
    expect: u16,
    clients: usize,
    secs: u64,
) -> anyhow::Result<Issuance> {
    let requests = Arc::new(requests);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let requests = requests.clone();
        tasks.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new(3).map_err(|e| anyhow::anyhow!("{e}"))?;
            let mut errors = 0u64;
            let mut conn = LoadConn::connect(addr).await?;
            while Instant::now() < deadline {
                let Some(request) = requests.next() else { break };
                let t = Instant::now();
                match conn.round_trip(&request).await {
                    Ok(s) if s == expect => h.record(t.elapsed().as_micros() as u64)?,
                    Ok(_) => errors += 1,
                    Err(_) => {
                        errors += 1;
                        conn = LoadConn::connect(addr).await?;
                    }
                }
            }
            anyhow::Ok((h, errors, Instant::now()))
        }));
    }
    let mut all = Histogram::<u64>::new(3).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (mut errors, mut last) = (0, started);
    for t in tasks {
        let (h, e, done) = t.await??;
        all.add(&h)?;
        errors += e;
        last = last.max(done);
    }
    Ok(Issuance {
        rate: all.len() as f64 / (last - started).as_secs_f64(),
        p50_ms: all.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: all.value_at_quantile(0.99) as f64 / 1000.0,
        errors,
        count: all.len(),
    })
}

/// A service in this process serving on loopback, with an API token that may issue and the
/// prebuilt issuance request; [`Issuing::stop`] stops serving and deletes the token.
pub(super) struct Issuing {
    service: crate::cli::Service,
    api_id: String,
    stop_tx: tokio::sync::oneshot::Sender<()>,
    pub(super) addr: std::net::SocketAddr,
    pub(super) request: Arc<[u8]>,
}

impl Issuing {
    /// Serves `service`, mints the token and checks with a warm-up that issuance answers 201.
    pub(super) async fn start(service: crate::cli::Service) -> anyhow::Result<Issuing> {
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
        let (addr, stop_tx) = super::lifecycle::serve(&service).await?;
        let request = issue_request(addr, api.secret.as_str());
        let issuing = Issuing {
            service,
            api_id: api.id,
            stop_tx,
            addr,
            request,
        };
        match warm_up(addr, &issuing.request, 201).await {
            Ok(()) => Ok(issuing),
            Err(e) => {
                issuing.stop().await;
                Err(e)
            }
        }
    }

    pub(super) async fn stop(self) {
        let _ = self.stop_tx.send(());
        let _ = self
            .service
            .authority
            .delete_api_token("bench", &self.api_id, "local")
            .await;
    }
}

/// Tokens per second through `POST /v1/tokens` on loopback, `clients` at once, served in
/// this process.
pub(super) async fn issuance(
    config: &Config,
    sessions: usize,
    clients: usize,
    secs: u64,
) -> anyhow::Result<Issuance> {
    let service = crate::cli::serve::build_service_with(config, Some(sessions)).await?;
    let s = Issuing::start(service).await?;
    let result = drive(s.addr, Requests::Same(s.request.clone()), 201, clients, secs).await;
    s.stop().await;
    result
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
pub(super) fn per_core_interleaved(
    secs: f64,
    ops: &mut [&mut dyn FnMut() -> bool],
) -> anyhow::Result<Vec<f64>> {
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
