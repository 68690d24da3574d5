//! `keygate init`: data folder, embedded SoftHSM2 token, signing key, database, admin token.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

use crate::authority::{Authority, Settings, ensure_active_key};
use crate::config::Config;
use crate::keys::pkcs11::init_token;
use crate::store::Store;
use crate::token::b64;

/// What `init` did.
pub struct InitOutcome {
    pub kid: String,
    pub key_created: bool,
    pub token_created: bool,
    /// The new admin token, when one was minted (shown once).
    pub admin_token: Option<Zeroizing<String>>,
    pub data_dir: std::path::PathBuf,
}

impl InitOutcome {
    /// Prints the outcome: the admin token on stdout as `KEYGATE_ADMIN_TOKEN=kg_...`, the rest
    /// on stderr.
    pub fn report(&self) {
        let mut err = std::io::stderr().lock();
        if self.token_created {
            let _ = writeln!(
                err,
                "keygate: initialised SoftHSM2 token under {}",
                self.data_dir.display()
            );
        }
        let verb = if self.key_created { "created" } else { "kept" };
        let _ = writeln!(err, "keygate: {verb} signing key {}", self.kid);
        match &self.admin_token {
            Some(t) => {
                let _ = writeln!(err, "keygate: admin API token (shown once; store it now):");
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "KEYGATE_ADMIN_TOKEN={}", t.as_str());
            }
            None => {
                let _ = writeln!(
                    err,
                    "keygate: an admin API token exists already; not minting another (use --new-admin-token)"
                );
            }
        }
    }
}

/// Makes everything keygate creates from now on private to its user (umask 077: files 0600,
/// folders 0700, the database's WAL and the SoftHSM2 token files included), and brings
/// what is already in the data folder to those modes. Run by `init` and `serve`.
pub fn private_files(data_dir: &Path) {
    #[cfg(unix)]
    {
        // SAFETY: umask only sets the process's file mode creation mask; it cannot fail.
        unsafe { libc::umask(0o077) };
        let mut todo = vec![data_dir.to_path_buf()];
        while let Some(p) = todo.pop() {
            let Ok(meta) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            let mode = if meta.is_dir() {
                if let Ok(rd) = std::fs::read_dir(&p) {
                    todo.extend(rd.filter_map(|e| e.ok().map(|e| e.path())));
                }
                0o700
            } else if meta.is_file() {
                0o600
            } else {
                continue;
            };
            use std::os::unix::fs::PermissionsExt;
            if meta.permissions().mode() & 0o777 != mode
                && let Err(e) = restrict(&p, mode)
            {
                tracing::warn!(path = %p.display(), error = %e, "cannot make this file private");
            }
        }
    }
}

#[cfg(unix)]
fn restrict(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// Writes `value` to a new file readable by the owner only.
fn write_secret_file(path: &Path, value: &str) -> anyhow::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(value.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

fn random_pin() -> anyhow::Result<Zeroizing<String>> {
    let mut b = Zeroizing::new([0u8; 18]);
    getrandom::fill(b.as_mut()).map_err(|e| anyhow::anyhow!("OS random source: {e}"))?;
    Ok(Zeroizing::new(b64::encode(b.as_ref())))
}

/// Reads a PIN file, or creates it with a fresh random PIN.
fn pin_file(path: &Path) -> anyhow::Result<Zeroizing<String>> {
    if path.exists() {
        let s = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        return Ok(Zeroizing::new(s.trim_end().to_owned()));
    }
    let pin = random_pin()?;
    write_secret_file(path, &pin)?;
    Ok(pin)
}

/// Writes the embedded SoftHSM2 configuration (token folder under the data folder).
pub fn write_softhsm_conf(config: &Config) -> anyhow::Result<()> {
    let tokens = config.data_dir.join("softhsm-tokens");
    std::fs::create_dir_all(&tokens).with_context(|| format!("cannot create {}", tokens.display()))?;
    #[cfg(unix)]
    restrict(&tokens, 0o700)?;
    let conf = config.embedded_softhsm_conf();
    if !conf.exists() {
        let abs = std::fs::canonicalize(&tokens)?;
        let text = format!(
            "# written by keygate init: the embedded development token\ndirectories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
            abs.display()
        );
        std::fs::write(&conf, text).with_context(|| format!("cannot write {}", conf.display()))?;
    }
    Ok(())
}

/// Creates whatever is missing; keeps what exists. A second run keeps the key and refuses to
/// mint a new admin token unless `new_admin_token`.
pub async fn init(config: &Config, new_admin_token: bool) -> anyhow::Result<InitOutcome> {
    init_with(config, new_admin_token, false).await
}

/// [`init`]; with `keep_so_pin`, the embedded token's SO PIN is kept in `so.pin` (0600).
/// Otherwise it exists only in memory while the token is initialised: nothing of keygate
/// needs it afterwards, and a PIN on disk next to the token would let whoever reads the
/// folder re-initialise the token or reset the user PIN.
pub async fn init_with(
    config: &Config,
    new_admin_token: bool,
    keep_so_pin: bool,
) -> anyhow::Result<InitOutcome> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data folder {}", config.data_dir.display()))?;
    private_files(&config.data_dir);
    // One init at a time on a shared database (replicas whose start scripts all run init):
    // the first creates the key and the admin token, the others find them. A SQLite file
    // is opened only after the token is ready, so a failed first init leaves no database
    // behind and the next `serve` on the embedded defaults initialises again.
    let shared = if config.store_is_sqlite() {
        None
    } else {
        let store = Store::open(&config.store_options()?).await?;
        let mut lease = store.lease("init");
        let waited = std::time::Instant::now();
        while !lease.hold().await {
            if waited.elapsed() > std::time::Duration::from_secs(120) {
                anyhow::bail!("another keygate init has held the store's init lock for two minutes");
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        Some((store, lease))
    };
    let pk = config.pkcs11();
    let mut token_created = false;
    if config.is_embedded() {
        write_softhsm_conf(config)?;
        let so_file = config.data_dir.join("so.pin");
        let so = if keep_so_pin || so_file.exists() {
            pin_file(&so_file)?
        } else {
            random_pin()?
        };
        let user = pin_file(&config.data_dir.join("user.pin"))?;
        let (so, user) = (AuthPin::from(so.to_string()), AuthPin::from(user.to_string()));
        let pk2 = pk.clone();
        token_created = tokio::task::spawn_blocking(move || init_token(&pk2, &so, &user)).await??;
        if !keep_so_pin && so_file.exists() {
            // Left by an earlier keygate: the token is initialised, the PIN goes.
            std::fs::remove_file(&so_file).with_context(|| format!("cannot remove {}", so_file.display()))?;
        }
    }
    let (backend, _) = super::serve::open_backend(config, None).await?;
    let (store, lease) = match shared {
        Some(s) => (s.0, Some(s.1)),
        None => (Store::open(&config.store_options()?).await?, None),
    };
    let settings = Settings::from_config(config)?;
    let (kid, key_created) = ensure_active_key(&store, &backend, &settings, "cli").await?;
    let authority = Authority::open(store.clone(), backend, settings).await?;
    let admin_token = if new_admin_token || !authority.has_admin_token().await? {
        let t = authority
            .create_api_token("cli", "initial admin", &["admin".to_owned()], None, true, "local")
            .await?;
        Some(t.secret)
    } else {
        None
    };
    drop(authority);
    drop(lease);
    store.close().await;
    Ok(InitOutcome {
        kid,
        key_created,
        token_created,
        admin_token,
        data_dir: config.data_dir.clone(),
    })
}
