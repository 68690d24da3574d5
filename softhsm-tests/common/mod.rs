//! Test harness: a process-wide SoftHSM2 configuration, a fresh token per test, keygate
//! initialised on it, and helpers to serve it in-process or run the real binary.

pub mod certs;
pub mod cut;
pub mod db;
mod http;
pub mod pg;
pub mod replicas;
pub mod swtpm;
pub mod tpm2tools;

pub use http::*;

/// Turns `async fn name(env: Env)` into three tests: `name::pkcs11` on a fresh SoftHSM2 token
/// and SQLite, `name::tpm` on a fresh swtpm and SQLite, `name::pkcs11_postgres` on a fresh
/// token and a fresh PostgreSQL database; with optional extra top-level TOML for all.
macro_rules! on_both_backends {
    ($test:ident) => {
        on_both_backends!($test, "");
    };
    ($test:ident, $extra:expr) => {
        mod $test {
            #[tokio::test(flavor = "multi_thread")]
            async fn pkcs11() {
                super::$test(crate::common::Env::with_toml($extra).await).await;
            }

            #[tokio::test(flavor = "multi_thread")]
            async fn tpm() {
                let tpm = crate::common::swtpm::Swtpm::start();
                super::$test(crate::common::Env::on_tpm_with(&tpm.tcti(), $extra).await).await;
                drop(tpm);
            }

            #[tokio::test(flavor = "multi_thread")]
            async fn pkcs11_postgres() {
                super::$test(crate::common::Env::on_postgres($extra).await).await;
            }
        }
    };
}

/// Turns `async fn name(store: TestStore)` into `name::sqlite` and `name::postgres`, for
/// tests that build their env themselves (`Env::with_store`).
macro_rules! for_both_stores {
    ($test:ident) => {
        mod $test {
            #[tokio::test(flavor = "multi_thread")]
            async fn sqlite() {
                super::$test(crate::common::TestStore::Sqlite).await;
            }

            #[tokio::test(flavor = "multi_thread")]
            async fn postgres() {
                super::$test(crate::common::TestStore::Postgres).await;
            }
        }
    };
}

/// Turns `async fn name(env: Env)` into `name::sqlite` and `name::postgres`, both on a fresh
/// SoftHSM2 token, with optional extra top-level TOML.
macro_rules! on_both_stores {
    ($test:ident) => {
        on_both_stores!($test, "");
    };
    ($test:ident, $extra:expr) => {
        mod $test {
            #[tokio::test(flavor = "multi_thread")]
            async fn sqlite() {
                super::$test(crate::common::Env::with_toml($extra).await).await;
            }

            #[tokio::test(flavor = "multi_thread")]
            async fn postgres() {
                super::$test(crate::common::Env::on_postgres($extra).await).await;
            }
        }
    };
}

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use cryptoki::types::AuthPin;
use keygate::cli::{Service, build_service, init};
use keygate::config::{Config, SOFTHSM2_MODULE};
use keygate::keys::SecretSource;
use keygate::keys::pkcs11::{Pkcs11Config, init_token};
use tempfile::TempDir;

pub const SO_PIN: &str = "so-pin-7f3a9c21e5";

/// The SoftHSM2 configuration of this test process: `SOFTHSM2_CONF` if the runner set one,
/// else a token folder under the target's tmp dir. Set before the module first loads.
pub fn softhsm_conf() -> PathBuf {
    static CONF: OnceLock<PathBuf> = OnceLock::new();
    CONF.get_or_init(|| {
        if let Ok(p) = std::env::var("SOFTHSM2_CONF")
            && Path::new(&p).exists()
        {
            return PathBuf::from(p);
        }
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("softhsm-{}", std::process::id()));
        let tokens = dir.join("tokens");
        std::fs::create_dir_all(&tokens).unwrap();
        let conf = dir.join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .unwrap();
        // SAFETY: done once, before SoftHSM2 is loaded; tests read no environment concurrently
        // that this could disturb.
        unsafe { std::env::set_var("SOFTHSM2_CONF", &conf) };
        conf
    })
    .clone()
}

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    getrandom::fill(&mut b).unwrap();
    hex::encode(b)
}

/// Which store a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestStore {
    Sqlite,
    Postgres,
}

/// A fresh SoftHSM2 token and a keygate data folder initialised on it.
pub struct Env {
    pub dir: TempDir,
    pub config: Config,
    pub config_path: PathBuf,
    pub admin: String,
    pub user_pin: String,
    pub kid: String,
    /// The PostgreSQL database of this test (dropped with the env), if it uses one.
    pub pg_url: Option<String>,
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(u) = &self.pg_url {
            pg::drop_database(u);
        }
    }
}

impl Env {
    /// A new token (unique label, random user PIN in a 0600 file), a config file pointing at
    /// it, and `keygate init` run in-process. The listen port is free but not bound.
    pub async fn new() -> Env {
        Env::with_toml("").await
    }

    /// Like [`Env::new`], with extra TOML appended to the config.
    pub async fn with_toml(extra: &str) -> Env {
        Env::build(extra, None).await
    }

    /// Like [`Env::with_toml`], on a fresh PostgreSQL database.
    pub async fn on_postgres(extra: &str) -> Env {
        Env::build(extra, Some(pg::create_database().await)).await
    }

    /// Like [`Env::with_toml`], on the given store.
    pub async fn with_store(extra: &str, store: TestStore) -> Env {
        match store {
            TestStore::Sqlite => Env::with_toml(extra).await,
            TestStore::Postgres => Env::on_postgres(extra).await,
        }
    }

    /// A fresh token; the store is `pg_url`, or SQLite in the data folder.
    pub async fn build(extra: &str, pg_url: Option<String>) -> Env {
        softhsm_conf();
        let dir = tempfile::tempdir().unwrap();
        let label = format!("kg-{}", random_hex(6));
        let user_pin = format!("pin-{}", random_hex(8));
        let pin_path = dir.path().join("user.pin");
        std::fs::write(&pin_path, &user_pin).unwrap();
        let pk = Pkcs11Config {
            module: SOFTHSM2_MODULE.into(),
            token_label: Some(label.clone()),
            token_serial: None,
            pin: SecretSource::File(pin_path.clone()),
            sessions: 4,
            acquire_timeout_ms: 2000,
        };
        let (so, user) = (AuthPin::from(SO_PIN.to_owned()), AuthPin::from(user_pin.clone()));
        let pk2 = pk.clone();
        assert!(
            tokio::task::spawn_blocking(move || init_token(&pk2, &so, &user))
                .await
                .unwrap()
                .unwrap()
        );
        let port = free_port();
        let store = match &pg_url {
            Some(u) => format!("[store]\nurl = \"{u}\"\n"),
            None => String::new(),
        };
        let extra = unlimited(extra);
        let text = format!(
            "data_dir = \"{data}\"\nlisten = \"127.0.0.1:{port}\"\n{extra}\n{store}[pkcs11]\nmodule = \"{SOFTHSM2_MODULE}\"\ntoken_label = \"{label}\"\npin = {{ file = \"{pin}\" }}\nsessions = 4\n",
            data = dir.path().display(),
            pin = pin_path.display(),
        );
        let config_path = dir.path().join("keygate.toml");
        std::fs::write(&config_path, &text).unwrap();
        let config = Config::parse(&text).unwrap();
        config.validate().unwrap();
        let out = init(&config, false).await.unwrap();
        let admin = out.admin_token.as_ref().unwrap().to_string();
        Env {
            kid: out.kid.clone(),
            dir,
            config,
            config_path,
            admin,
            user_pin,
            pg_url,
        }
    }

    /// keygate initialised on a TPM (`backend = "tpm"`) reached through `tcti`.
    pub async fn on_tpm(tcti: &str) -> Env {
        Env::on_tpm_with(tcti, "").await
    }

    /// Like [`Env::on_tpm`], with extra top-level TOML.
    pub async fn on_tpm_with(tcti: &str, extra: &str) -> Env {
        Env::on_tpm_store(tcti, extra, None).await
    }

    /// Like [`Env::on_tpm_with`], on the PostgreSQL database `pg_url` when given.
    pub async fn on_tpm_store(tcti: &str, extra: &str, pg_url: Option<String>) -> Env {
        Env::on_tpm_full(tcti, extra, pg_url, "").await
    }

    /// keygate on a TPM with extra lines in its `[tpm]` section (`ek = "p384"`, say).
    pub async fn on_tpm_section(tcti: &str, tpm_lines: &str) -> Env {
        Env::on_tpm_full(tcti, "", None, tpm_lines).await
    }

    async fn on_tpm_full(tcti: &str, extra: &str, pg_url: Option<String>, tpm_lines: &str) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let store = match &pg_url {
            Some(u) => format!("[store]\nurl = \"{u}\"\n"),
            None => String::new(),
        };
        let extra = unlimited(extra);
        // the device wait: 2 s unless the test sets its own
        let wait = if tpm_lines.contains("timeout_ms") {
            ""
        } else {
            "timeout_ms = 2000\n"
        };
        let text = format!(
            "data_dir = \"{data}\"\nlisten = \"127.0.0.1:{port}\"\nbackend = \"tpm\"\n{extra}\n{store}[tpm]\ntcti = \"{tcti}\"\n{wait}{tpm_lines}\n",
            data = dir.path().display(),
        );
        let config_path = dir.path().join("keygate.toml");
        std::fs::write(&config_path, &text).unwrap();
        let config = Config::parse(&text).unwrap();
        config.validate().unwrap();
        let out = init(&config, false).await.unwrap();
        let admin = out.admin_token.as_ref().unwrap().to_string();
        Env {
            kid: out.kid.clone(),
            dir,
            config,
            config_path,
            admin,
            user_pin: String::new(),
            pg_url,
        }
    }

    /// Builds the service in-process (router for `oneshot`, authority, backend).
    pub async fn service(&self) -> Service {
        build_service(&self.config).await.unwrap()
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.config.listen)
    }

    /// Serves the service on a real loopback socket in this process; returns the base URL.
    pub async fn serve(&self) -> (String, Service) {
        let (base, svc, _) = self.serve_until(std::future::pending()).await;
        (base, svc)
    }

    /// [`Env::serve`], until [`Served::stop`].
    pub async fn serve_stoppable(&self) -> (String, Served) {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (base, svc, server) = self
            .serve_until(async {
                let _ = stopped.await;
            })
            .await;
        (base, Served { svc, stop, server })
    }

    async fn serve_until(
        &self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> (String, Service, tokio::task::JoinHandle<()>) {
        let svc = self.service().await;
        let listener = tokio::net::TcpListener::bind(self.config.listen).await.unwrap();
        let router = svc.router.clone();
        let limits = keygate::api::server::Limits::from_config(&self.config.http);
        let server = tokio::spawn(keygate::api::server::serve(
            listener, router, limits, None, shutdown,
        ));
        (self.base_url(), svc, server)
    }

    /// The store of this env, opened afresh (SQLite file or PostgreSQL database).
    pub async fn store(&self) -> keygate::store::Store {
        keygate::store::Store::open(&self.config.store_options().unwrap())
            .await
            .unwrap()
    }

    /// Direct SQL on this env's store.
    pub async fn db(&self) -> db::TestDb {
        db::TestDb::connect(&self.config.store_url()).await
    }

    /// Everything the store holds, as bytes to search: the SQLite file and its WAL, or every
    /// row of every table of the PostgreSQL database as text (BYTEA as hex).
    pub async fn dump(&self) -> Vec<u8> {
        if self.pg_url.is_none() {
            let mut out = std::fs::read(self.dir.path().join("keygate.db")).unwrap();
            out.extend(std::fs::read(self.dir.path().join("keygate.db-wal")).unwrap_or_default());
            return out;
        }
        let db = self.db().await;
        let tables = db
            .strings(
                "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public'",
                &[],
            )
            .await;
        let mut out = Vec::new();
        for t in tables {
            for row in db.strings(&format!("SELECT t::text FROM {t} t"), &[]).await {
                out.extend(row.into_bytes());
                out.push(b'\n');
            }
        }
        db.close().await;
        out
    }

    /// Row counts (issued_tokens, api_tokens, audit_log) read from the store.
    pub async fn counts(&self) -> (i64, i64, i64) {
        let store = self.store().await;
        let r = store.counts().await.unwrap();
        store.close().await;
        r
    }

    /// A command running the real `keygate` binary on this env's config.
    pub fn keygate(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_keygate"));
        c.env("KEYGATE_CONFIG", &self.config_path)
            .env("SOFTHSM2_CONF", softhsm_conf())
            .env_remove("KEYGATE_DATA_DIR")
            .env_remove("KEYGATE_LISTEN")
            .env_remove("KEYGATE_TOKEN")
            .env_remove("KEYGATE_STORE_URL")
            .env_remove("KEYGATE_ISSUER")
            .env_remove("KEYGATE_PUBLIC_URL");
        c
    }
}

/// `extra` with the per-source rate limit off, unless it sets one: tests send hundreds of
/// requests from 127.0.0.1 as a proxy would (`hostile::rate_limits…` tests the limit).
fn unlimited(extra: &str) -> String {
    if extra.contains("per_source_per_second") {
        extra.to_owned()
    } else if extra.contains("[http]\n") {
        extra.replacen("[http]\n", "[http]\nper_source_per_second = 0\n", 1)
    } else {
        format!("{extra}\n[http]\nper_source_per_second = 0\n")
    }
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    free_ports(1)
}

/// The first of `n` consecutive free loopback ports, chosen below the kernel's ephemeral
/// range (32768 and up on Linux): a server restarted on the same port must not find it
/// taken by some client connection's local port in the meantime.
pub fn free_ports(n: u16) -> u16 {
    loop {
        let mut r = [0u8; 2];
        getrandom::fill(&mut r).unwrap();
        let p = 20_000 + u16::from_le_bytes(r) % 12_000;
        if (0..n).all(|i| std::net::TcpListener::bind(("127.0.0.1", p + i)).is_ok()) {
            return p;
        }
    }
}

/// A service served in this process by [`Env::serve_stoppable`].
pub struct Served {
    svc: Service,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<()>,
}

impl Served {
    /// Stops serving and drops the service, so that it lets go of its device.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.server.await.unwrap();
        drop(self.svc);
    }
}

/// A `keygate serve` child process; killed on drop.
pub struct Server {
    pub child: Child,
}

impl Server {
    /// Starts `keygate serve` with stderr to `log` and waits until /readyz answers 200.
    pub async fn start(env: &Env, log: &Path, extra_env: &[(&str, &str)]) -> Server {
        Server::start_at(env, log, extra_env, &env.base_url()).await
    }

    /// Like [`Server::start`], for a server that listens at `base` (`KEYGATE_LISTEN` in
    /// `extra_env`).
    pub async fn start_at(env: &Env, log: &Path, extra_env: &[(&str, &str)], base: &str) -> Server {
        Server::spawn(env.keygate(), log, extra_env, base).await
    }

    /// Runs `cmd serve` (a `keygate` command, or a wrapper ending in the binary) with stderr
    /// to `log`, and waits until `base`/readyz answers 200.
    pub async fn spawn(cmd: Command, log: &Path, extra_env: &[(&str, &str)], base: &str) -> Server {
        Server::spawn_with(cmd, log, extra_env, base, &reqwest::Client::new()).await
    }

    /// Like [`Server::spawn`], asking for readiness with `client` (one that trusts the
    /// server's TLS certificate, say).
    pub async fn spawn_with(
        mut cmd: Command,
        log: &Path,
        extra_env: &[(&str, &str)],
        base: &str,
        client: &reqwest::Client,
    ) -> Server {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        cmd.arg("serve").stdout(Stdio::null()).stderr(file);
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        let mut server = Server { child };
        let url = format!("{base}/readyz");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = client.get(&url).send().await
                && r.status() == 200
            {
                return server;
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!(
                    "keygate serve exited with {status}: {}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "keygate serve did not become ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the server with SIGTERM (graceful) and waits for it, 30 s at most.
    pub fn stop(mut self) {
        signal(&self.child, libc::SIGTERM);
        wait_deadline(&mut self.child, 30);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `sig` to `child` from this process (no `kill` program: a minimal system may lack
/// procps). A child that has exited already is not an error.
pub fn signal(child: &std::process::Child, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).expect("a pid fits pid_t");
    // SAFETY: kill(2) takes plain integers; `pid` is our own child, not yet reaped (we hold
    // its `Child`), so the number cannot name another process.
    unsafe { libc::kill(pid, sig) };
}

/// Waits for `child` at most `secs` seconds; past that it is killed and the test fails
/// (a hung child must not hang the suite).
pub fn wait_deadline(child: &mut std::process::Child, secs: u64) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("process {} did not exit within {secs} s", child.id());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
