//! The tables of the configuration file below the top level, with their defaults.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::keys::SecretSource;

/// How the EK of an enrolling machine is trusted (`KEYGATE_ENROLL_MODE`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum EnrollMode {
    /// The EK certificate chains to a TPM manufacturer CA in `ca_dir`.
    #[default]
    #[serde(rename = "ek-ca")]
    EkCa,
    /// The EK hash is registered by an operator (`POST /v1/enroll/machines`).
    #[serde(rename = "allowlist")]
    Allowlist,
}

/// The HTTP listener: how long a connection may take and how many may be open.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// A connection must deliver a request's complete headers within this many seconds of
    /// being ready for it (a new connection, or a kept-alive one after its last answer);
    /// else it is closed. Ends idle, slowloris and forgotten keep-alive connections.
    #[serde(default = "default_header_read_timeout")]
    pub header_read_timeout_seconds: u64,
    /// A request (its body included) must be answered within this many seconds, else 408.
    /// Event streams are not cut: the limit ends when their headers are sent.
    #[serde(default = "default_request_timeout")]
    pub request_timeout_seconds: u64,
    /// Connections open at once at most; past it, new connections are closed at once. 0:
    /// from the open-file limit (raised to its hard limit at start) less a reserve for the
    /// store, the device and the log.
    #[serde(default)]
    pub max_connections: usize,
    /// Requests a second each source address may send to the endpoints that need no
    /// credential (redemption, enrollment); past it, 429 with `Retry-After`. 0: no limit
    /// (behind a proxy every request comes from the proxy: limit there instead).
    #[serde(default = "default_per_source")]
    pub per_source_per_second: u32,
    /// Requests a source may send at once before its rate applies.
    #[serde(default = "default_per_source_burst")]
    pub per_source_burst: u32,
    /// Threads that run HTTP and the request tasks (and, on PostgreSQL, the store's writer).
    /// 0: half the cores (at least one), since signing has threads of their own, and so has
    /// SQLite's writer: with a device on this machine (SoftHSM2, a TPM) and SQLite they keep
    /// the other cores busy, and one thread per core only adds switching between them
    /// (docs/benchmarks-server-cpu.md). Raise it for TLS handshake bursts, a network HSM or
    /// PostgreSQL. `TOKIO_WORKER_THREADS` overrides it.
    #[serde(default)]
    pub workers: usize,
}

impl HttpConfig {
    /// The HTTP worker threads to start (`workers`, or half of `cores` when 0).
    pub fn worker_threads(&self, cores: usize) -> usize {
        if self.workers > 0 {
            self.workers
        } else {
            (cores / 2).max(1)
        }
    }
}

fn default_per_source() -> u32 {
    20
}

fn default_per_source_burst() -> u32 {
    100
}

fn default_header_read_timeout() -> u64 {
    10
}

fn default_request_timeout() -> u64 {
    30
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            header_read_timeout_seconds: default_header_read_timeout(),
            request_timeout_seconds: default_request_timeout(),
            max_connections: 0,
            per_source_per_second: default_per_source(),
            per_source_burst: default_per_source_burst(),
            workers: 0,
        }
    }
}

/// Native TLS of the listener (`KEYGATE_TLS_CERT`, `KEYGATE_TLS_KEY`,
/// `KEYGATE_TLS_CLIENT_CA`). Absent: plain HTTP.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, the serving certificate first.
    pub cert_file: PathBuf,
    /// PEM private key of that certificate (PKCS#8, SEC1 or PKCS#1).
    pub key_file: PathBuf,
    /// PEM CA certificates: when set, every connection must present a client certificate
    /// that chains to one of them (mutual TLS).
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
}

/// Attestation-gated enrollment (the HTTP contract; docs/api-notes.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollConfig {
    #[serde(default)]
    pub mode: EnrollMode,
    /// Folder of TPM manufacturer CA certificates (`KEYGATE_ENROLL_CA_DIR`).
    #[serde(default = "default_enroll_ca_dir")]
    pub ca_dir: PathBuf,
    /// How long a challenge can be completed, once.
    #[serde(default = "default_challenge_ttl")]
    pub challenge_ttl_seconds: u64,
    /// PCRs the quote must cover, like `sha256:0,1,2,3,4,5,6,7`.
    #[serde(default = "default_pcr_selection")]
    pub pcr_selection: String,
    /// Golden values: PCR index → accepted hex digests (any of them). Empty: any boot state.
    #[serde(default)]
    pub pcr_policy: std::collections::BTreeMap<String, Vec<String>>,
    /// `aud` of the provisioning tokens enrollment issues.
    #[serde(default = "default_enroll_audience")]
    pub audience: String,
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Token lifetime (default `tokens.default_ttl_seconds`; at most `tokens.max_ttl_seconds`).
    #[serde(default)]
    pub token_ttl_seconds: Option<u64>,
    /// Whether the token can be redeemed once only.
    #[serde(default = "default_true")]
    pub one_time: bool,
}

impl Default for EnrollConfig {
    fn default() -> Self {
        toml::from_str("").unwrap_or_else(|_| unreachable!())
    }
}

fn default_enroll_ca_dir() -> PathBuf {
    PathBuf::from("hsm-config/tpm-ca")
}
fn default_challenge_ttl() -> u64 {
    60
}
fn default_pcr_selection() -> String {
    "sha256:0,1,2,3,4,5,6,7".into()
}
fn default_enroll_audience() -> String {
    "keygate-enroll".into()
}
fn default_true() -> bool {
    true
}

/// Signing-key rotation (docs/adr/0007-key-rotation.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotationConfig {
    /// Rotate the active key this long after it became active (0: only by hand).
    #[serde(default = "default_rotate_every")]
    pub rotate_every_seconds: u64,
    /// A new key is published this long before it signs (the HTTP contract: default 10 min). Must be
    /// at least `jwks_max_age_seconds`, so every verifier has fetched it in time.
    #[serde(default = "default_publish_lead")]
    pub publish_lead_seconds: u64,
    /// `Cache-Control: max-age` of the JWKS (at most 300).
    #[serde(default = "default_jwks_max_age")]
    pub jwks_max_age_seconds: u64,
    /// How often the schedule is checked.
    #[serde(default = "default_rotation_check_ms")]
    pub check_every_ms: u64,
}

fn default_rotate_every() -> u64 {
    30 * 86_400
}
fn default_publish_lead() -> u64 {
    600
}
fn default_jwks_max_age() -> u64 {
    60
}
fn default_rotation_check_ms() -> u64 {
    1000
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Sign a checkpoint of the audit chain this often when it has grown (and at start and
    /// shutdown): removing entries older than this is found by `keygate audit verify`, even
    /// after a crash.
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every_seconds: u64,
    /// Refusals of requests without a verified identity (junk API tokens, forged tokens,
    /// made-up enrollments): the first of each kind is recorded at once, its repeats in
    /// this many seconds as one summary entry with their count.
    #[serde(default = "default_refusal_window")]
    pub refusal_window_seconds: u64,
}

fn default_refusal_window() -> u64 {
    10
}

fn default_checkpoint_every() -> u64 {
    1
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `sqlite:///path/to/keygate.db` (default `<data_dir>/keygate.db`) or
    /// `postgres://user@host:port/db` (`KEYGATE_STORE_URL`). Every replica gets the same.
    #[serde(default)]
    pub url: Option<String>,
    /// PostgreSQL password, from a file or an environment variable, so that the URL need not
    /// carry it (a password in the URL works too and is never shown).
    #[serde(default)]
    pub password: Option<SecretSource>,
    /// Read connections per process.
    #[serde(default = "default_store_connections")]
    pub max_connections: u32,
    /// SQLite `synchronous`: `full` (default; every commit survives power loss) or `normal`.
    /// PostgreSQL always waits for its own WAL flush (`synchronous_commit` of the server).
    #[serde(default)]
    pub synchronous: Synchronous,
    /// Milliseconds a commit waits, at most, for writes already being signed, so that they
    /// share it (and its `fsync`); 0 commits at once. Only while signatures are under way.
    #[serde(default = "default_batch_hold_ms")]
    pub batch_hold_ms: u64,
}

fn default_store_connections() -> u32 {
    8
}

fn default_batch_hold_ms() -> u64 {
    crate::store::HOLD.as_millis() as u64
}

/// Longest `[store] batch_hold_ms` accepted.
pub const MAX_BATCH_HOLD_MS: u64 = 50;

/// SQLite durability: `full` syncs every commit (group commit keeps that cheap); `normal`
/// may lose the last commits on power loss, never on a crash of keygate alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    #[default]
    Full,
    Normal,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenPolicy {
    #[serde(default = "default_token_ttl")]
    pub default_ttl_seconds: u64,
    /// A request above this is refused with 400, never clamped.
    #[serde(default = "default_token_max_ttl")]
    pub max_ttl_seconds: u64,
    /// Leeway of `keygate verify` and the verifier library default.
    #[serde(default = "default_leeway")]
    pub leeway_seconds: u64,
    /// RFC 9449: a DPoP proof's `iat` may be at most this old; its `jti` is remembered as
    /// long (replay protection).
    #[serde(default = "default_dpop_max_age")]
    pub dpop_max_age_seconds: u64,
    /// The signed revocation list and the CRL say their next update is due this long after
    /// they were made; verifiers refuse a list past it (`keygate verify --revocations`).
    #[serde(default = "default_revocation_list_ttl")]
    pub revocation_list_ttl_seconds: u64,
}

fn default_revocation_list_ttl() -> u64 {
    300
}

fn default_dpop_max_age() -> u64 {
    60
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiTokenPolicy {
    #[serde(default = "default_api_ttl")]
    pub default_ttl_seconds: u64,
    #[serde(default = "default_api_max_ttl")]
    pub max_ttl_seconds: u64,
    /// On PostgreSQL, milliseconds a replica may go on accepting an API token it has read
    /// without reading it again; a DELETE is answered only once this long has passed since
    /// it committed, so no replica still accepts the token. 0: every request reads its
    /// token. SQLite, served by one process, caches without a lease.
    #[serde(default = "default_api_cache_lease_ms")]
    pub cache_lease_ms: u64,
}

fn default_api_cache_lease_ms() -> u64 {
    250
}

/// Longest `[api_tokens] cache_lease_ms` accepted (a DELETE waits this long).
pub const MAX_API_CACHE_LEASE_MS: u64 = 10_000;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaConfig {
    #[serde(default = "default_country")]
    pub country: String,
    #[serde(default = "default_org")]
    pub organization: String,
    /// Prefix of the CN; the key's kid is appended.
    #[serde(default = "default_cn")]
    pub common_name: String,
    #[serde(default = "default_ca_days")]
    pub lifetime_days: u64,
    /// Longest life of a certificate issued at redemption (never past the CA's own).
    #[serde(default = "default_cert_ttl")]
    pub certificate_ttl_seconds: u64,
}

fn default_cert_ttl() -> u64 {
    86_400
}

pub(super) fn default_data_dir() -> PathBuf {
    PathBuf::from("keygate-data")
}
pub(super) fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_token_ttl() -> u64 {
    900
}
fn default_token_max_ttl() -> u64 {
    86_400
}
fn default_leeway() -> u64 {
    5
}
fn default_api_ttl() -> u64 {
    30 * 86_400
}
fn default_api_max_ttl() -> u64 {
    365 * 86_400
}
fn default_country() -> String {
    "ZZ".into()
}
fn default_org() -> String {
    "keygate".into()
}
fn default_cn() -> String {
    "keygate root".into()
}
fn default_ca_days() -> u64 {
    3650
}

macro_rules! default_from_serde {
    ($($t:ty),*) => {$(
        impl Default for $t {
            fn default() -> Self {
                // An empty table gets every field's serde default.
                toml::from_str("").unwrap_or_else(|_| unreachable!())
            }
        }
    )*};
}
default_from_serde!(
    StoreConfig,
    TokenPolicy,
    ApiTokenPolicy,
    CaConfig,
    AuditConfig,
    RotationConfig
);
