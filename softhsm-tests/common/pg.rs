//! PostgreSQL for the tests: the server named by `KEYGATE_TEST_PG_URL` (an admin URL, such
//! as `postgres://postgres@127.0.0.1:5432/postgres`) when it is set, else one private
//! throwaway cluster per test process (initdb in a temp folder, a free port). Every test gets
//! a database of its own. Tests that stop or crash PostgreSQL start a [`PgCluster`] of their
//! own. `initdb` and `postgres` refuse to run as root: as root they run as `postgres`.
//!
//! Every cluster folder's name starts with `keygate-test-pg`, and a watchdog stops the
//! cluster when the test process is gone, failed tests included (softhsm-tests/run-all.sh
//! checks that none outlives the suite).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sqlx::Connection;
use tempfile::TempDir;

/// The admin URL of the server the tests use (started on first use).
pub fn admin_url() -> String {
    static URL: OnceLock<String> = OnceLock::new();
    static SHARED: OnceLock<PgCluster> = OnceLock::new();
    URL.get_or_init(|| match std::env::var("KEYGATE_TEST_PG_URL") {
        Ok(u) if !u.is_empty() => u,
        _ => SHARED.get_or_init(PgCluster::start).admin_url(),
    })
    .clone()
}

fn random_name() -> String {
    let mut b = [0u8; 6];
    getrandom::fill(&mut b).unwrap();
    format!("kg_test_{}", hex::encode(b))
}

/// `url` with its database replaced by `db`.
pub fn with_database(url: &str, db: &str) -> String {
    let (head, query) = url.split_once('?').map_or((url, None), |(h, q)| (h, Some(q)));
    let scheme_end = head.find("://").map_or(0, |i| i + 3);
    let base = match head[scheme_end..].find('/') {
        Some(i) => &head[..scheme_end + i],
        None => head,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

/// A new empty database on `admin` (an admin URL); returns its URL.
pub async fn create_database_on(admin: &str) -> String {
    let name = random_name();
    let mut c = sqlx::PgConnection::connect(admin).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut c)
        .await
        .unwrap();
    c.close().await.unwrap();
    with_database(admin, &name)
}

/// A new empty database on the tests' server; returns its URL.
pub async fn create_database() -> String {
    create_database_on(&admin_url()).await
}

/// Drops the database of `url` (and ends its sessions), from any thread, async or not.
pub fn drop_database(url: &str) {
    let Some(name) = url
        .rsplit('/')
        .next()
        .map(|n| n.split('?').next().unwrap_or(n).to_owned())
    else {
        return;
    };
    if !name.starts_with("kg_test_") {
        return;
    }
    let admin = with_database(url, "postgres");
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        rt.block_on(async {
            let mut c = sqlx::PgConnection::connect(&admin).await.ok()?;
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&mut c)
                .await;
            let _ = c.close().await;
            Some(())
        })
    })
    .join();
}

/// The folder of PostgreSQL's server programs (`initdb`, `pg_ctl`).
fn bindir() -> PathBuf {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if p.join("initdb").exists() {
            return p;
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.filter_map(|e| Some(e.ok()?.path().join("bin"))).collect())
        .unwrap_or_default();
    found.retain(|p| p.join("initdb").exists());
    found.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name()?.to_str()?.parse::<u32>().ok())
            .unwrap_or(0)
    });
    found
        .pop()
        .expect("PostgreSQL server programs (softhsm-tests/install-deps.sh installs them)")
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// `program args…`, as the `postgres` user when we are root.
fn pg_command(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// A private PostgreSQL cluster: its own folder and port; stopped (as a crash) on drop.
pub struct PgCluster {
    dir: TempDir,
    pub port: u16,
    bin: PathBuf,
    tls: bool,
}

impl PgCluster {
    /// initdb and start on a free port. A watchdog stops it when this process is gone.
    pub fn start() -> PgCluster {
        PgCluster::init(None)
    }

    /// Like [`PgCluster::start`], with TLS on: `server_cert` and `server_key` (PEM files)
    /// are copied into the data folder as the server's certificate and key.
    pub fn start_tls(server_cert: &Path, server_key: &Path) -> PgCluster {
        PgCluster::init(Some((server_cert, server_key)))
    }

    fn init(tls: Option<(&Path, &Path)>) -> PgCluster {
        let dir = tempfile::Builder::new()
            .prefix("keygate-test-pg")
            .tempdir()
            .unwrap();
        let bin = bindir();
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown of the cluster folder failed");
        }
        let data = dir.path().join("data");
        let out = pg_command(&bin.join("initdb"))
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8", "-D"])
            .arg(&data)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if let Some((cert, key)) = tls {
            for (from, to) in [(cert, "server.crt"), (key, "server.key")] {
                let dest = data.join(to);
                std::fs::copy(from, &dest).unwrap();
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o600)).unwrap();
                if is_root() {
                    let ok = Command::new("chown")
                        .arg("postgres:postgres")
                        .arg(&dest)
                        .status()
                        .unwrap()
                        .success();
                    assert!(ok, "chown of {to} failed");
                }
            }
        }
        let cluster = PgCluster {
            port: super::free_port(),
            dir,
            bin,
            tls: tls.is_some(),
        };
        cluster.run_server();
        cluster.watchdog();
        cluster
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn run_server(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off -c full_page_writes=off -c ssl={}",
            self.port,
            self.dir.path().display(),
            if self.tls { "on" } else { "off" }
        );
        let out = pg_command(&self.bin.join("pg_ctl"))
            .args(["-D"])
            .arg(self.data())
            .args(["-l"])
            .arg(self.dir.path().join("server.log"))
            .args(["-o", &opts, "-w", "-t", "60", "start"])
            .stdout(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start: {} {}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
        );
    }

    /// Stops the cluster when this test process exits, however it exits.
    fn watchdog(&self) {
        let stop = format!(
            "while [ -d /proc/{pid} ]; do sleep 1; done; {runas} {pg_ctl} -D {data} -m immediate stop; rm -rf {dir}",
            pid = std::process::id(),
            runas = if is_root() { "runuser -u postgres --" } else { "" },
            pg_ctl = self.bin.join("pg_ctl").display(),
            data = self.data().display(),
            dir = self.dir.path().display(),
        );
        let _ = Command::new("setsid")
            .args(["sh", "-c", &stop])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
    }

    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server: `immediate` is a crash (no checkpoint, clients cut off).
    pub fn stop(&self, immediate: bool) {
        let _ = pg_command(&self.bin.join("pg_ctl"))
            .args(["-D"])
            .arg(self.data())
            .args(["-m", if immediate { "immediate" } else { "fast" }, "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    /// Starts it again on the same folder and port.
    pub fn restart(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        // the port may linger a moment after a crash
        while std::net::TcpListener::bind(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "port {} stays taken", self.port);
            std::thread::sleep(Duration::from_millis(100));
        }
        self.run_server();
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop(true);
    }
}
