//! TPM 2.0 backend (`tss-esapi`): P-256 signing keys created inside the TPM under an
//! owner-hierarchy ECC storage primary, persisted with EvictControl at handles from a
//! configured base, named `tpm:handle=0x81......` (docs/adr/0006-tpm-key-hierarchy.md).
//!
//! The ESAPI `Context` wants `&mut` for every call: it has one owner, a `Mutex`, and the
//! signing threads (`keys/queue.rs`) are one for this backend. When a call fails because the
//! TPM went away, the context is dropped and the next call connects again.

pub mod ek;
mod keys;
mod proof;

pub use ek::EkKind;

use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tss_esapi::Context;
use tss_esapi::tcti_ldr::TctiNameConf;

use super::{Certified, KeyBackend, KeyError, KeyEvidence, KeyInfo, SecretSource};

/// `[tpm]` configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TpmConfig {
    /// TCTI: `swtpm:host=127.0.0.1,port=2321`, `device:/dev/tpmrm0` or `tabrmd`.
    pub tcti: String,
    /// First persistent handle keygate may use; keys take the next free one from here.
    #[serde(default = "default_handle_base")]
    pub handle_base: u32,
    /// How many handles from `handle_base` belong to keygate.
    #[serde(default = "default_handle_count")]
    pub handle_count: u32,
    /// Auth value of keygate's keys, from a file or an environment variable (none: empty).
    #[serde(default)]
    pub auth: Option<SecretSource>,
    /// How long a request waits for the TPM before failing with 503 (ms).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// The EK that key proofs use (`rsa2048`, `p256`, `p384`). Absent: the first of these
    /// whose certificate is in the TPM's NV.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ek: Option<EkKind>,
    /// The EK certificate (DER or PEM) for a TPM that holds none in NV.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ek_certificate: Option<std::path::PathBuf>,
    /// The endorsement hierarchy's auth value, when it has one (key proofs create the EK
    /// and the AK there), from a file or an environment variable. None: empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endorsement_auth: Option<SecretSource>,
}

impl TpmConfig {
    /// Defaults with this TCTI (what `KEYGATE_TPM_TCTI` alone gives).
    pub fn with_tcti(tcti: String) -> TpmConfig {
        TpmConfig {
            tcti,
            handle_base: default_handle_base(),
            handle_count: default_handle_count(),
            auth: None,
            timeout_ms: default_timeout_ms(),
            ek: None,
            ek_certificate: None,
            endorsement_auth: None,
        }
    }
}

fn default_handle_base() -> u32 {
    0x8101_0100
}
fn default_handle_count() -> u32 {
    64
}
fn default_timeout_ms() -> u64 {
    2000
}

/// Formats a TPM key URI.
pub fn uri_for(handle: u32) -> String {
    format!("tpm:handle=0x{handle:08x}")
}

/// Parses `tpm:handle=0x81......`.
pub fn parse_uri(uri: &str) -> Result<u32, KeyError> {
    let hex = uri
        .strip_prefix("tpm:handle=0x")
        .ok_or_else(|| KeyError::Config(format!("{uri:?} is not a tpm:handle=0x... URI")))?;
    let h =
        u32::from_str_radix(hex, 16).map_err(|_| KeyError::Config(format!("bad TPM handle in {uri:?}")))?;
    if h >> 24 != 0x81 {
        return Err(KeyError::Config(format!(
            "{uri:?} is not a persistent handle (0x81......)"
        )));
    }
    Ok(h)
}

/// The TPM 2.0 key backend.
pub struct TpmBackend {
    config: TpmConfig,
    tcti: TctiNameConf,
    simulator: bool,
    auth: Option<secrecy::SecretString>,
    endorsement_auth: Option<secrecy::SecretString>,
    ctx: Mutex<Option<Context>>,
    /// The device id, once asked (a CreatePrimary each time otherwise).
    device_id: std::sync::OnceLock<String>,
    /// The endorsement half of key proofs, once made (two CreatePrimary and an NV read).
    endorsement: std::sync::OnceLock<proof::Endorsement>,
}

impl std::fmt::Debug for TpmBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TpmBackend")
            .field("tcti", &self.config.tcti)
            .finish_non_exhaustive()
    }
}

/// A TPM error as one line naming the command.
pub(crate) fn tss_error(what: &str, e: tss_esapi::Error) -> KeyError {
    KeyError::Tpm {
        what: what.to_owned(),
        reason: e.to_string().replace('\n', " "),
    }
}

impl TpmBackend {
    /// Connects to the TPM (a missing TPM fails here with one line) and reads the auth value.
    pub fn open(config: &TpmConfig) -> Result<TpmBackend, KeyError> {
        if config.handle_base >> 24 != 0x81 || config.handle_count == 0 {
            return Err(KeyError::Config(
                "[tpm] handle_base must be a persistent handle 0x81......".into(),
            ));
        }
        let tcti = TctiNameConf::from_str(&config.tcti)
            .map_err(|e| KeyError::Config(format!("[tpm] tcti {:?}: {e}", config.tcti)))?;
        let auth = config.auth.as_ref().map(SecretSource::read).transpose()?;
        let endorsement_auth = config
            .endorsement_auth
            .as_ref()
            .map(SecretSource::read)
            .transpose()?;
        let backend = TpmBackend {
            simulator: config.tcti.starts_with("swtpm") || config.tcti.starts_with("mssim"),
            config: config.clone(),
            tcti,
            auth,
            endorsement_auth,
            ctx: Mutex::new(None),
            device_id: std::sync::OnceLock::new(),
            endorsement: std::sync::OnceLock::new(),
        };
        backend.with_context(|_| Ok(()))?;
        Ok(backend)
    }

    /// Runs `f` with the context, connecting first if needed. A failure that looks like a
    /// lost TPM drops the context, so the next call connects again.
    pub(crate) fn with_context<T>(
        &self,
        f: impl FnOnce(&mut Context) -> Result<T, KeyError>,
    ) -> Result<T, KeyError> {
        let mut guard = self
            .ctx
            .lock()
            .map_err(|_| KeyError::Config("TPM context lock poisoned".into()))?;
        if guard.is_none() {
            let ctx = Context::new(self.tcti.clone()).map_err(|e| KeyError::Tpm {
                what: format!("connect to {}", self.config.tcti),
                reason: e.to_string().replace('\n', " "),
            })?;
            *guard = Some(ctx);
        }
        let ctx = guard
            .as_mut()
            .ok_or_else(|| KeyError::Config("no TPM context".into()))?;
        let r = f(ctx);
        // tss-esapi 7.7 does not say which layer an error came from, so after any failure
        // one cheap command decides: if the TPM does not answer it either, the connection is
        // gone; drop it so the next call connects again.
        if r.is_err() && ctx.get_random(1).is_err() {
            tracing::warn!(tcti = %self.config.tcti, "TPM unreachable; reconnecting on the next call");
            *guard = None;
        }
        r
    }

    pub(crate) fn endorsement_auth(&self) -> Option<&secrecy::SecretString> {
        self.endorsement_auth.as_ref()
    }

    pub(crate) fn auth(&self) -> Option<&secrecy::SecretString> {
        self.auth.as_ref()
    }

    pub(crate) fn config(&self) -> &TpmConfig {
        &self.config
    }
}

impl KeyBackend for TpmBackend {
    fn kind(&self) -> &'static str {
        "tpm"
    }

    fn is_simulator(&self) -> bool {
        self.simulator
    }

    fn concurrency(&self) -> (usize, Duration) {
        // One command at a time: the TPM serialises them anyway.
        (1, Duration::from_millis(self.config.timeout_ms))
    }

    fn device_id(&self) -> Result<String, KeyError> {
        if let Some(id) = self.device_id.get() {
            return Ok(id.clone());
        }
        let id = self.identity()?;
        Ok(self.device_id.get_or_init(|| id).clone())
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
        self.evidence(uri).map(KeyEvidence::Tpm)
    }

    fn certify_key(
        &self,
        uri: &str,
        id_object: &[u8],
        encrypted_secret: &[u8],
        nonce: &[u8],
    ) -> Result<Certified, KeyError> {
        self.certify(uri, id_object, encrypted_secret, nonce)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        assert_eq!(uri_for(0x8101_0100), "tpm:handle=0x81010100");
        assert_eq!(parse_uri("tpm:handle=0x81010100").unwrap(), 0x8101_0100);
        assert!(parse_uri("tpm:handle=0x01010100").is_err());
        assert!(parse_uri("pkcs11:token=a").is_err());
        assert!(parse_uri("tpm:handle=0xzz").is_err());
    }
}
