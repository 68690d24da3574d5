//! Configuration: TOML with `deny_unknown_fields`, then the environment overrides (one
//! table, [`ENV_OVERRIDES`]; `KEYGATE_CONFIG` names the file).
//!
//! With no file at all keygate runs on its embedded defaults: a SoftHSM2 token and an SQLite
//! database under the data folder (`./keygate-data`, or `KEYGATE_DATA_DIR`).

mod sections;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::keys::SecretSource;
use crate::keys::pkcs11::{Pkcs11Config, default_acquire_ms};
use crate::keys::tpm::TpmConfig;
pub use sections::*;

/// Every environment variable that overrides the file, and what it overrides.
pub const ENV_OVERRIDES: [(&str, &str); 13] = [
    ("KEYGATE_DATA_DIR", "data_dir"),
    ("KEYGATE_LISTEN", "listen"),
    ("KEYGATE_PUBLIC_URL", "public_base_url"),
    ("KEYGATE_ISSUER", "issuer"),
    ("KEYGATE_STORE_URL", "[store] url"),
    ("KEYGATE_BACKEND", "backend"),
    ("KEYGATE_TPM_TCTI", "[tpm] tcti"),
    ("KEYGATE_ENROLL_MODE", "[enroll] mode"),
    ("KEYGATE_ENROLL_CA_DIR", "[enroll] ca_dir"),
    ("KEYGATE_TLS_CERT", "[tls] cert_file"),
    ("KEYGATE_TLS_KEY", "[tls] key_file"),
    ("KEYGATE_TLS_CLIENT_CA", "[tls] client_ca_file"),
    ("KEYGATE_CONFIG", "(names the file itself)"),
];

/// Debian's SoftHSM2 module path.
pub const SOFTHSM2_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// Token label of the embedded SoftHSM2 token.
pub const EMBEDDED_TOKEN_LABEL: &str = "keygate";

/// Errors in the configuration: one line each, naming the option.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("config file {path}: {reason}")]
    Parse { path: String, reason: String },
    #[error("{var}: {reason}")]
    Env { var: &'static str, reason: String },
    #[error("config: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    #[default]
    Pkcs11,
    Tpm,
}

/// The whole configuration file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Folder for the embedded SoftHSM2 token, PIN files and SQLite database.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Listen address; plain HTTP. Default `127.0.0.1:8080`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Base URL clients use to reach this service (default `http://<listen>`).
    #[serde(default)]
    pub public_base_url: Option<String>,
    /// `iss` of every token (default: the public base URL).
    #[serde(default)]
    pub issuer: Option<String>,
    #[serde(default)]
    pub backend: BackendKind,
    /// PKCS#11 token. Absent (with `backend = "pkcs11"`): the embedded SoftHSM2 token.
    #[serde(default)]
    pub pkcs11: Option<Pkcs11Config>,
    /// TPM 2.0 (with `backend = "tpm"`).
    #[serde(default)]
    pub tpm: Option<TpmConfig>,
    #[serde(default)]
    pub http: HttpConfig,
    /// Native TLS; absent: plain HTTP (on loopback, or behind a TLS proxy).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub tokens: TokenPolicy,
    #[serde(default)]
    pub api_tokens: ApiTokenPolicy,
    #[serde(default)]
    pub ca: CaConfig,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default)]
    pub rotation: RotationConfig,
    #[serde(default)]
    pub enroll: EnrollConfig,
    /// Whether the operator set enrollment up (an `[enroll]` table, `KEYGATE_ENROLL_MODE` or
    /// `KEYGATE_ENROLL_CA_DIR`): only then is a missing CA folder worth a warning.
    #[serde(skip)]
    pub enroll_configured: bool,
}

/// A serde message with the offending value left out: `invalid type: string "1234",
/// expected ...` becomes `invalid type: string (value not shown), expected ...`; likewise
/// `invalid value: ...` and `unknown variant `...``.
fn hide_values(message: &str) -> String {
    let mut out = message.to_owned();
    for lead in ["invalid type: ", "invalid value: ", "unknown variant "] {
        let Some(start) = out.find(lead).map(|i| i + lead.len()) else {
            continue;
        };
        // the last one: a value may itself contain ", expected"
        let end = out[start..].rfind(", expected").map_or(out.len(), |i| start + i);
        // keep the kind of value (`string`, `integer`), drop the value itself
        let kind = out[start..end]
            .split_once(' ')
            .map(|(k, _)| k)
            .filter(|k| k.chars().all(|c| c.is_ascii_alphabetic()))
            .map(|k| format!("{k} "))
            .unwrap_or_default();
        out.replace_range(start..end, &format!("{kind}(value not shown)"));
    }
    out
}

impl Default for Config {
    fn default() -> Self {
        toml::from_str("").unwrap_or_else(|_| unreachable!())
    }
}

impl Config {
    /// Reads `path` (if any), then applies `KEYGATE_DATA_DIR` and `KEYGATE_LISTEN`, then
    /// validates.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let mut cfg = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| ConfigError::Read {
                    path: p.display().to_string(),
                    reason: e.kind().to_string(),
                })?;
                Config::parse(&text).map_err(|reason| ConfigError::Parse {
                    path: p.display().to_string(),
                    reason,
                })?
            }
            None => Config::default(),
        };
        if let Some(dir) = std::env::var_os("KEYGATE_DATA_DIR") {
            cfg.data_dir = PathBuf::from(dir);
        }
        if let Ok(b) = std::env::var("KEYGATE_BACKEND") {
            cfg.backend = match b.as_str() {
                "pkcs11" => BackendKind::Pkcs11,
                "tpm" => BackendKind::Tpm,
                _ => {
                    return Err(ConfigError::Env {
                        var: "KEYGATE_BACKEND",
                        reason: format!("{b:?} is not \"pkcs11\" or \"tpm\""),
                    });
                }
            };
        }
        if let Ok(tcti) = std::env::var("KEYGATE_TPM_TCTI") {
            match &mut cfg.tpm {
                Some(t) => t.tcti = tcti,
                None => cfg.tpm = Some(TpmConfig::with_tcti(tcti)),
            }
        }
        if let Ok(m) = std::env::var("KEYGATE_ENROLL_MODE") {
            cfg.enroll_configured = true;
            cfg.enroll.mode = match m.as_str() {
                "ek-ca" => EnrollMode::EkCa,
                "allowlist" => EnrollMode::Allowlist,
                _ => {
                    return Err(ConfigError::Env {
                        var: "KEYGATE_ENROLL_MODE",
                        reason: format!("{m:?} is not \"ek-ca\" or \"allowlist\""),
                    });
                }
            };
        }
        if let Some(dir) = std::env::var_os("KEYGATE_ENROLL_CA_DIR") {
            cfg.enroll_configured = true;
            cfg.enroll.ca_dir = PathBuf::from(dir);
        }
        for (var, field) in [
            ("KEYGATE_PUBLIC_URL", &mut cfg.public_base_url),
            ("KEYGATE_ISSUER", &mut cfg.issuer),
            ("KEYGATE_STORE_URL", &mut cfg.store.url),
        ] {
            match std::env::var(var) {
                Ok(v) if !v.is_empty() => *field = Some(v),
                Ok(_) => {}
                Err(std::env::VarError::NotPresent) => {}
                Err(std::env::VarError::NotUnicode(_)) => {
                    return Err(ConfigError::Env {
                        var,
                        reason: "not UTF-8".into(),
                    });
                }
            }
        }
        cfg.apply_tls_env()?;
        if let Ok(listen) = std::env::var("KEYGATE_LISTEN") {
            cfg.listen = listen.parse().map_err(|_| ConfigError::Env {
                var: "KEYGATE_LISTEN",
                reason: format!("{listen:?} is not an address like 127.0.0.1:8080"),
            })?;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// `KEYGATE_TLS_CERT` and `KEYGATE_TLS_KEY` (both, or neither; they replace the file's
    /// `[tls]` paths) and `KEYGATE_TLS_CLIENT_CA` (needs TLS).
    fn apply_tls_env(&mut self) -> Result<(), ConfigError> {
        let var = |name| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        match (var("KEYGATE_TLS_CERT"), var("KEYGATE_TLS_KEY")) {
            (Some(cert_file), Some(key_file)) => match &mut self.tls {
                Some(t) => (t.cert_file, t.key_file) = (cert_file, key_file),
                None => {
                    self.tls = Some(TlsConfig {
                        cert_file,
                        key_file,
                        client_ca_file: None,
                    })
                }
            },
            (None, None) => {}
            (Some(_), None) | (None, Some(_)) => {
                return Err(ConfigError::Env {
                    var: "KEYGATE_TLS_CERT",
                    reason: "KEYGATE_TLS_CERT and KEYGATE_TLS_KEY go together".into(),
                });
            }
        }
        if let Some(ca) = var("KEYGATE_TLS_CLIENT_CA") {
            let Some(t) = &mut self.tls else {
                return Err(ConfigError::Env {
                    var: "KEYGATE_TLS_CLIENT_CA",
                    reason: "client certificates need TLS: set KEYGATE_TLS_CERT and KEYGATE_TLS_KEY or [tls]"
                        .into(),
                });
            };
            t.client_ca_file = Some(ca);
        }
        Ok(())
    }

    /// Parses TOML text; the error is one line that names the line of the file and never
    /// shows a value from it (a PIN typed where a table was expected must not reach a log).
    pub fn parse(text: &str) -> Result<Config, String> {
        let parsed: Result<Config, _> = toml::from_str(text);
        parsed
            .map(|mut c| {
                c.enroll_configured = text
                    .parse::<toml::Table>()
                    .is_ok_and(|t| t.contains_key("enroll"));
                c
            })
            .map_err(|e| {
                let message = hide_values(&e.message().replace('\n', " "));
                match e.span() {
                    Some(span) => {
                        let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                        format!("line {line}: {message}")
                    }
                    None => message,
                }
            })
    }

    /// Refuses conflicting or nonsensical settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.http.header_read_timeout_seconds == 0 || self.http.request_timeout_seconds == 0 {
            return Err(ConfigError::Invalid(
                "http timeouts must be at least 1 second".into(),
            ));
        }
        let t = &self.tokens;
        if !(1..=604_800).contains(&t.revocation_list_ttl_seconds) {
            return Err(ConfigError::Invalid(
                "tokens.revocation_list_ttl_seconds must be 1 to 604800 (a week)".into(),
            ));
        }
        if t.max_ttl_seconds == 0 || t.default_ttl_seconds == 0 {
            return Err(ConfigError::Invalid("tokens TTLs must be positive".into()));
        }
        if t.default_ttl_seconds > t.max_ttl_seconds {
            return Err(ConfigError::Invalid(format!(
                "tokens.default_ttl_seconds ({}) exceeds tokens.max_ttl_seconds ({})",
                t.default_ttl_seconds, t.max_ttl_seconds
            )));
        }
        if !(1..=3600).contains(&t.dpop_max_age_seconds) {
            return Err(ConfigError::Invalid(
                "tokens.dpop_max_age_seconds must be 1 to 3600".into(),
            ));
        }
        if self.ca.certificate_ttl_seconds == 0 {
            return Err(ConfigError::Invalid(
                "ca.certificate_ttl_seconds must be positive".into(),
            ));
        }
        let r = &self.rotation;
        if !(1..=300).contains(&r.jwks_max_age_seconds) {
            return Err(ConfigError::Invalid(
                "rotation.jwks_max_age_seconds must be 1 to 300".into(),
            ));
        }
        if r.publish_lead_seconds < r.jwks_max_age_seconds {
            return Err(ConfigError::Invalid(format!(
                "rotation.publish_lead_seconds ({}) is shorter than rotation.jwks_max_age_seconds ({}): verifiers could meet a key before they can have fetched it",
                r.publish_lead_seconds, r.jwks_max_age_seconds
            )));
        }
        if r.rotate_every_seconds != 0 && r.rotate_every_seconds <= r.publish_lead_seconds {
            return Err(ConfigError::Invalid(
                "rotation.rotate_every_seconds must exceed rotation.publish_lead_seconds (or be 0: by hand only)".into(),
            ));
        }
        if r.check_every_ms == 0 {
            return Err(ConfigError::Invalid(
                "rotation.check_every_ms must be positive".into(),
            ));
        }
        let e = &self.enroll;
        if !(1..=3600).contains(&e.challenge_ttl_seconds) {
            return Err(ConfigError::Invalid(
                "enroll.challenge_ttl_seconds must be 1 to 3600".into(),
            ));
        }
        if e.token_ttl_seconds
            .is_some_and(|t| t == 0 || t > self.tokens.max_ttl_seconds)
        {
            return Err(ConfigError::Invalid(
                "enroll.token_ttl_seconds must be positive and at most tokens.max_ttl_seconds".into(),
            ));
        }
        crate::attest::PcrPolicy::parse(&e.pcr_selection, &e.pcr_policy)
            .map_err(|why| ConfigError::Invalid(format!("enroll: {why}")))?;
        let a = &self.api_tokens;
        if a.max_ttl_seconds == 0 || a.default_ttl_seconds == 0 {
            return Err(ConfigError::Invalid("api_tokens TTLs must be positive".into()));
        }
        if a.default_ttl_seconds > a.max_ttl_seconds {
            return Err(ConfigError::Invalid(
                "api_tokens.default_ttl_seconds exceeds api_tokens.max_ttl_seconds".into(),
            ));
        }
        if a.cache_lease_ms > sections::MAX_API_CACHE_LEASE_MS {
            return Err(ConfigError::Invalid(format!(
                "api_tokens.cache_lease_ms must be at most {}",
                sections::MAX_API_CACHE_LEASE_MS
            )));
        }
        match (self.backend, &self.pkcs11, &self.tpm) {
            (BackendKind::Tpm, None, None) => {
                return Err(ConfigError::Invalid(
                    "backend = \"tpm\" needs a [tpm] table (or KEYGATE_TPM_TCTI)".into(),
                ));
            }
            (BackendKind::Tpm, Some(_), _) => {
                return Err(ConfigError::Invalid(
                    "backend = \"tpm\" but a [pkcs11] table is given: remove one".into(),
                ));
            }
            (BackendKind::Pkcs11, _, Some(_)) => {
                return Err(ConfigError::Invalid(
                    "a [tpm] table is given but backend is \"pkcs11\": set backend = \"tpm\" or remove [tpm]"
                        .into(),
                ));
            }
            _ => {}
        }
        if let Some(t) = &self.tpm
            && (t.handle_base >> 24 != 0x81 || t.handle_count == 0 || t.timeout_ms == 0)
        {
            return Err(ConfigError::Invalid(
                    "[tpm] handle_base must be a persistent handle 0x81......, handle_count and timeout_ms positive"
                        .into(),
                ));
        }
        if let Some(p) = &self.pkcs11 {
            if p.token_label.is_none() && p.token_serial.is_none() {
                return Err(ConfigError::Invalid(
                    "[pkcs11] needs token_label or token_serial".into(),
                ));
            }
            if p.sessions == 0 {
                return Err(ConfigError::Invalid("pkcs11.sessions must be at least 1".into()));
            }
            if p.acquire_timeout_ms == 0 {
                return Err(ConfigError::Invalid(
                    "pkcs11.acquire_timeout_ms must be positive".into(),
                ));
            }
        }
        for (name, url) in [
            ("public_base_url", &self.public_base_url),
            ("issuer", &self.issuer),
        ] {
            if let Some(u) = url
                && (!(u.starts_with("http://") || u.starts_with("https://")) || u.ends_with('/'))
            {
                return Err(ConfigError::Invalid(format!(
                    "{name} must be an http(s) URL without a trailing slash, got {u:?}"
                )));
            }
        }
        if let Some(u) = &self.store.url {
            let url = crate::store::StoreUrl::parse(u)
                .map_err(|e| ConfigError::Invalid(format!("[store] url: {e}")))?;
            if url.kind() == crate::store::StoreKind::Sqlite && self.store.password.is_some() {
                return Err(ConfigError::Invalid(
                    "[store] password is for PostgreSQL; the store URL names a SQLite file".into(),
                ));
            }
        }
        if self.store.max_connections == 0 {
            return Err(ConfigError::Invalid(
                "store.max_connections must be at least 1".into(),
            ));
        }
        if self.store.batch_hold_ms > sections::MAX_BATCH_HOLD_MS {
            return Err(ConfigError::Invalid(format!(
                "store.batch_hold_ms must be at most {}",
                sections::MAX_BATCH_HOLD_MS
            )));
        }
        let country = &self.ca.country;
        if country.len() != 2 || !country.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(ConfigError::Invalid(format!(
                "ca.country must be a two-letter ISO 3166 code like \"DE\", got {country:?}"
            )));
        }
        if self.ca.lifetime_days == 0 {
            return Err(ConfigError::Invalid("ca.lifetime_days must be positive".into()));
        }
        Ok(())
    }

    /// True when keygate manages its own SoftHSM2 token under `data_dir`.
    pub fn is_embedded(&self) -> bool {
        self.backend == BackendKind::Pkcs11 && self.pkcs11.is_none()
    }

    /// The PKCS#11 settings in force (the embedded SoftHSM2 token when none are configured).
    pub fn pkcs11(&self) -> Pkcs11Config {
        self.pkcs11.clone().unwrap_or_else(|| Pkcs11Config {
            module: PathBuf::from(SOFTHSM2_MODULE),
            token_label: Some(EMBEDDED_TOKEN_LABEL.into()),
            token_serial: None,
            pin: SecretSource::File(self.data_dir.join("user.pin")),
            // One session: SoftHSM2 signs on keygate's own CPU, and a second session on the
            // same token gained no throughput here while each signature cost more CPU (its
            // sessions lock the token file and SoftHSM2's mutexes against each other;
            // docs/benchmarks-server-cpu.md). A real device sets its own `sessions`.
            sessions: 1,
            acquire_timeout_ms: default_acquire_ms(),
        })
    }

    /// `SOFTHSM2_CONF` of the embedded token.
    pub fn embedded_softhsm_conf(&self) -> PathBuf {
        self.data_dir.join("softhsm2.conf")
    }

    /// The base URL clients reach (no trailing slash).
    pub fn public_base_url(&self) -> String {
        self.public_base_url.clone().unwrap_or_else(|| {
            let scheme = if self.tls.is_some() { "https" } else { "http" };
            format!("{scheme}://{}", self.listen)
        })
    }

    /// The `iss` of every token.
    pub fn issuer(&self) -> String {
        self.issuer.clone().unwrap_or_else(|| self.public_base_url())
    }

    /// How to open the store: the URL, and the PostgreSQL password read from where the
    /// configuration says (never from the configuration text).
    pub fn store_options(&self) -> Result<crate::store::StoreOptions, ConfigError> {
        let url = crate::store::StoreUrl::parse(&self.store_url())
            .map_err(|e| ConfigError::Invalid(format!("[store] url: {e}")))?;
        let password = match &self.store.password {
            Some(src) => Some(src.read().map_err(|e| {
                ConfigError::Invalid(format!("[store] password: {}", e.to_string().replace("PIN ", "")))
            })?),
            None => None,
        };
        Ok(crate::store::StoreOptions {
            url,
            sqlite_synchronous_full: self.store.synchronous == Synchronous::Full,
            password,
            max_connections: self.store.max_connections,
            batch_hold: std::time::Duration::from_millis(self.store.batch_hold_ms),
        })
    }

    /// True when the store is a SQLite file (the default) rather than a shared database.
    pub fn store_is_sqlite(&self) -> bool {
        crate::store::StoreUrl::parse(&self.store_url())
            .is_ok_and(|u| u.kind() == crate::store::StoreKind::Sqlite)
    }

    /// The store URL (default: the SQLite file in the data folder). May carry a password:
    /// show it only through [`crate::store::redact`].
    pub fn store_url(&self) -> String {
        self.store
            .url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.data_dir.join("keygate.db").display()))
    }
}

#[cfg(test)]
mod tests;
