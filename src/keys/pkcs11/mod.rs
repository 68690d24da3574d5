//! PKCS#11 backend (`cryptoki`): one process-wide context per module, the token chosen by
//! label or serial (never slot number), a bounded session pool, cached key handles.
//!
//! Files: `uri.rs` names keys (RFC 7512), `session.rs` pools sessions and recovers them,
//! `keygen.rs` creates and finds keys, `sign.rs` signs, `token.rs` initialises a token.

mod keygen;
mod session;
mod sign;
mod token;
pub mod uri;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::ObjectHandle;
use cryptoki::slot::Slot;
use serde::{Deserialize, Serialize};

use super::{KeyBackend, KeyError, KeyEvidence, KeyInfo, Pkcs11Evidence, SecretSource};
pub use session::rv_name;
pub use token::init_token;
pub use uri::Pkcs11Uri;

/// The device id of PKCS#11 keys ([`KeyBackend::device_id`]).
pub const PKCS11_DEVICE: &str = "pkcs11";

/// `[pkcs11]` configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Config {
    /// Path of the PKCS#11 module (`.so`).
    pub module: PathBuf,
    /// Token label (`CKA_LABEL` of the token). One of `token_label` / `token_serial`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_label: Option<String>,
    /// Token serial number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_serial: Option<String>,
    /// Where the user PIN is read from.
    pub pin: SecretSource,
    /// Size of the session pool (default 4).
    #[serde(default = "default_sessions")]
    pub sessions: usize,
    /// How long a request waits for a free session before failing with 503 (ms).
    #[serde(default = "default_acquire_ms")]
    pub acquire_timeout_ms: u64,
}

pub(crate) fn default_sessions() -> usize {
    4
}
pub(crate) fn default_acquire_ms() -> u64 {
    2000
}

impl Pkcs11Config {
    /// `label "x"` or `serial "y"`, for messages.
    pub fn token_description(&self) -> String {
        match (&self.token_label, &self.token_serial) {
            (Some(l), Some(s)) => format!("label {l:?} and serial {s:?}"),
            (Some(l), None) => format!("label {l:?}"),
            (None, Some(s)) => format!("serial {s:?}"),
            (None, None) => "no label or serial configured".into(),
        }
    }
}

/// Maps a cryptoki error to a one-line [`KeyError`] naming the PKCS#11 function.
pub(crate) fn ck_error(e: CkError) -> KeyError {
    match e {
        CkError::Pkcs11(rv, f) => KeyError::Pkcs11 {
            function: format!("C_{f:?}"),
            rv: rv_name(rv),
        },
        other => KeyError::Pkcs11 {
            function: "call".into(),
            rv: other.to_string(),
        },
    }
}

/// One initialised context per module path for the whole process: PKCS#11 state is global
/// to the process, and a second `C_Initialize` would fail.
fn context(module: &Path) -> Result<Pkcs11, KeyError> {
    static CONTEXTS: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    let map = CONTEXTS.get_or_init(|| Mutex::new(HashMap::new()));
    let mut map = map
        .lock()
        .map_err(|_| KeyError::Config("context lock poisoned".into()))?;
    if let Some(ctx) = map.get(module) {
        return Ok(ctx.clone());
    }
    let module_err = |reason: String| KeyError::Module {
        path: module.display().to_string(),
        reason,
    };
    if !module.exists() {
        return Err(module_err("file not found".into()));
    }
    let ctx = Pkcs11::new(module).map_err(|e| module_err(e.to_string()))?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(module_err(ck_error(e).to_string())),
    }
    map.insert(module.to_path_buf(), ctx.clone());
    Ok(ctx)
}

/// Held while slots are enumerated or a token is initialised in this process.
static SLOTS: Mutex<()> = Mutex::new(());

/// Finds the slot holding the configured token, by label and/or serial.
fn find_slot(ctx: &Pkcs11, cfg: &Pkcs11Config) -> Result<Slot, KeyError> {
    // SoftHSM2 answers CKR_GENERAL_ERROR for a slot whose token another thread is
    // initialising: enumerate under the same lock as token initialisation.
    let _guard = SLOTS
        .lock()
        .map_err(|_| KeyError::Config("slot lock poisoned".into()))?;
    find_slot_locked(ctx, cfg)
}

/// [`find_slot`] for a caller that holds [`SLOTS`]. A slot whose token cannot be read is
/// passed over.
fn find_slot_locked(ctx: &Pkcs11, cfg: &Pkcs11Config) -> Result<Slot, KeyError> {
    if cfg.token_label.is_none() && cfg.token_serial.is_none() {
        return Err(KeyError::Config(
            "[pkcs11] needs token_label or token_serial".into(),
        ));
    }
    let mut found = Vec::new();
    for slot in ctx.get_slots_with_token().map_err(ck_error)? {
        let Ok(info) = ctx.get_token_info(slot) else {
            continue;
        };
        let label_ok = cfg
            .token_label
            .as_deref()
            .is_none_or(|l| info.label().trim_end() == l);
        let serial_ok = cfg
            .token_serial
            .as_deref()
            .is_none_or(|s| info.serial_number().trim_end() == s);
        if label_ok && serial_ok && info.token_initialized() {
            found.push(slot);
        }
    }
    match found.as_slice() {
        [slot] => Ok(*slot),
        [] => Err(KeyError::TokenNotFound(cfg.token_description())),
        _ => Err(KeyError::Config(format!(
            "{} tokens match {}; use token_serial to pick one",
            found.len(),
            cfg.token_description()
        ))),
    }
}

/// The PKCS#11 key backend.
pub struct Pkcs11Backend {
    token_label: String,
    /// `C_GetTokenInfo`'s manufacturerID and model, trimmed.
    token_maker: (String, String),
    simulator: bool,
    pool: session::SessionPool,
    /// Private-key handles by key URI, looked up once.
    handles: Mutex<HashMap<String, ObjectHandle>>,
}

impl std::fmt::Debug for Pkcs11Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Backend")
            .field("token", &self.token_label)
            .finish_non_exhaustive()
    }
}

impl Pkcs11Backend {
    /// Loads the module, finds the token, reads the PIN and logs in once, so that a missing
    /// module, an unknown token or a wrong PIN fail here with a one-line error.
    pub fn open(cfg: &Pkcs11Config) -> Result<Pkcs11Backend, KeyError> {
        let ctx = context(&cfg.module)?;
        let slot = find_slot(&ctx, cfg)?;
        let info = ctx.get_token_info(slot).map_err(ck_error)?;
        let pin = cfg.pin.read()?;
        let simulator = info.manufacturer_id().contains("SoftHSM") || info.model().contains("SoftHSM");
        let pool = session::SessionPool::new(
            ctx,
            slot,
            pin,
            cfg.sessions,
            Duration::from_millis(cfg.acquire_timeout_ms),
        );
        pool.warm_up()?;
        Ok(Pkcs11Backend {
            token_label: info.label().trim_end().to_owned(),
            token_maker: (
                info.manufacturer_id().trim_end().to_owned(),
                info.model().trim_end().to_owned(),
            ),
            simulator,
            pool,
            handles: Mutex::new(HashMap::new()),
        })
    }

    /// The PKCS#11 slot id the token was found in (it may differ between runs).
    pub fn slot_id(&self) -> u64 {
        self.pool.slot().id()
    }

    /// Forgets cached key handles (they are looked up again on next use).
    pub fn forget_handles(&self) {
        if let Ok(mut h) = self.handles.lock() {
            h.clear();
        }
    }

    /// Runs `op` on a pooled session (with the pool's recovery). Exposed for tests that
    /// inspect key attributes on the device.
    pub fn with_session<T>(
        &self,
        op: impl FnMut(&cryptoki::session::Session) -> Result<T, CkError>,
    ) -> Result<T, KeyError> {
        self.pool.run(op)
    }

    /// The private-key handle of the key at `uri`.
    pub fn private_handle(&self, uri: &str) -> Result<ObjectHandle, KeyError> {
        self.handle_for(uri)
    }
}

impl KeyBackend for Pkcs11Backend {
    fn kind(&self) -> &'static str {
        "pkcs11"
    }

    fn is_simulator(&self) -> bool {
        self.simulator
    }

    fn concurrency(&self) -> (usize, Duration) {
        self.pool.limits()
    }

    /// One PKCS#11 token per deployment: every replica that reaches it (a network HSM, or
    /// the shared SoftHSM2 token of the tests) uses the same keys.
    fn device_id(&self) -> Result<String, KeyError> {
        Ok(PKCS11_DEVICE.into())
    }

    fn create_key(&self, label: &str) -> Result<KeyInfo, KeyError> {
        self.generate(label)
    }

    fn list_keys(&self) -> Result<Vec<KeyInfo>, KeyError> {
        self.list()
    }

    fn find_key(&self, uri: &str) -> Result<KeyInfo, KeyError> {
        self.find(uri)
    }

    fn sign_digest(&self, uri: &str, digest: &[u8; 32]) -> Result<[u8; 64], KeyError> {
        self.sign(uri, digest)
    }

    fn destroy_key(&self, uri: &str) -> Result<(), KeyError> {
        self.destroy(uri)
    }

    fn key_evidence(&self, uri: &str) -> Result<KeyEvidence, KeyError> {
        Ok(KeyEvidence::Pkcs11(Pkcs11Evidence {
            attributes: self.protection_attributes(uri)?,
            token_manufacturer: self.token_maker.0.clone(),
            token_model: self.token_maker.1.clone(),
        }))
    }
}
