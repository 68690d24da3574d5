//! Server CPU per issued token: a real `keygate serve` process (this binary, this
//! configuration, its default logging) takes issuance load from this process over loopback;
//! its CPU time is read from `/proc/<pid>/stat` before and after, so the load generator's own
//! CPU is not counted.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::load::{Issuance, Requests, drive, issue_request, schedstat, warm_up};
use crate::config::Config;

/// What one measurement gave.
#[derive(Clone, Copy)]
pub(super) struct ServerCpu {
    pub(super) issued: Issuance,
    /// Server CPU (user + system, every thread) per issued token.
    pub(super) cpu_us: f64,
    /// CPU of the server's signing threads per issued token: the signature measured inside
    /// the server, under the same load as the rest of it.
    pub(super) sign_us: f64,
}

/// Kills the child on drop (an error on the way must not leave a server running).
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(pid) = libc::pid_t::try_from(self.0.id()) {
            // SAFETY: kill(2) on our own child, not yet reaped (we hold its `Child`).
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// utime + stime of process `pid`, all its threads (live and exited), from the kernel.
pub(super) fn process_cpu(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow::anyhow!("unreadable /proc/{pid}/stat"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5); f[0] is field 3.
    let ticks: u64 = f.get(11).unwrap_or(&"0").parse::<u64>()? + f.get(12).unwrap_or(&"0").parse::<u64>()?;
    // USER_HZ is 100 on Linux.
    Ok(Duration::from_millis(ticks * 10))
}

/// CPU time of the threads of `pid` named `keygate-sign-*`, from the scheduler's own
/// account (ns resolution).
fn signing_cpu(pid: u32) -> anyhow::Result<Duration> {
    let mut cpu = Duration::ZERO;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let dir = task?.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.starts_with("keygate-sign") {
            // A thread that ended since the listing counts as 0.
            cpu += schedstat(dir.join("schedstat"));
        }
    }
    Ok(cpu)
}

/// Runs `keygate serve` on `config` (written to a file in the data folder) and measures it
/// under `clients` issuing for `secs` seconds with `api_secret`.
pub(super) async fn server_cpu(
    config: &Config,
    api_secret: &str,
    clients: usize,
    secs: u64,
) -> anyhow::Result<ServerCpu> {
    let file = config.data_dir.join("bench-serve.toml");
    std::fs::write(&file, toml::to_string(config)?)?;
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?
    };
    let child = Command::new(std::env::current_exe()?)
        .args(["--config"])
        .arg(&file)
        .arg("serve")
        .env("KEYGATE_LISTEN", addr.to_string())
        .env_remove("KEYGATE_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let mut server = Server(child);
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = http.get(format!("http://{addr}/readyz")).send().await
            && r.status() == 200
        {
            break;
        }
        if let Ok(Some(status)) = server.0.try_wait() {
            anyhow::bail!("keygate serve exited with {status} before it was ready");
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "keygate serve was not ready within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = server.0.id();
    let request = issue_request(addr, api_secret);
    warm_up(addr, &request, 201).await?;
    // The load runs on one thread of its own (as `wrk -t1` would): spread over this
    // runtime's workers, the clients' threads woke each other on the cores the server was
    // measured on, and each wake-up could preempt a server thread.
    let (before, signing) = (process_cpu(pid)?, signing_cpu(pid)?);
    let issued = tokio::task::spawn_blocking(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(drive(addr, Requests::Same(request), 201, clients, secs))
    })
    .await??;
    let used = process_cpu(pid)?.saturating_sub(before);
    let signed = signing_cpu(pid)?.saturating_sub(signing);
    drop(server);
    let per_token = |d: Duration| d.as_secs_f64() * 1e6 / issued.count.max(1) as f64;
    Ok(ServerCpu {
        issued,
        cpu_us: per_token(used),
        sign_us: per_token(signed),
    })
}
