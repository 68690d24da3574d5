//! Request and response bodies of the HTTP API (the HTTP contract), with their OpenAPI schemas.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// POST /v1/tokens
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IssueTokenRequest {
    /// `sub` of the token: printable, no surrounding whitespace, at most 256 bytes.
    #[schema(min_length = 1, max_length = 256)]
    pub subject: String,
    /// `aud` of the token: printable, no surrounding whitespace, at most 256 bytes.
    #[schema(min_length = 1, max_length = 256)]
    pub audience: String,
    /// Lifetime; at most the configured maximum (a larger value is a 400, never clamped).
    #[serde(default)]
    #[schema(minimum = 1)]
    pub ttl_seconds: Option<u64>,
    /// Scopes (RFC 6749 scope tokens: printable ASCII without space, `"` or `\`, at most
    /// 128 bytes each), joined with spaces into `scope`.
    #[serde(default)]
    #[schema(max_items = 32)]
    pub scopes: Option<Vec<String>>,
    /// When true the token may be redeemed once only.
    #[serde(default)]
    pub one_time: Option<bool>,
    /// RFC 7638 thumbprint of the key the token is bound to (RFC 9449 `cnf.jkt`).
    #[serde(default)]
    #[schema(pattern = "^[A-Za-z0-9_-]{43}$")]
    pub cnf_jkt: Option<String>,
    /// Names a certificate made at redemption may carry as subjectAltName: DNS names
    /// (`web-1.example.com`, `*.example.com`) and IP addresses (`10.0.0.5`), also written
    /// `DNS:...` / `IP:...`. Redemption refuses a CSR that asks for any other name.
    #[serde(default)]
    #[schema(max_items = 32)]
    pub sans: Option<Vec<String>>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct IssueTokenResponse {
    /// The provisioning token (JWS compact serialization).
    pub token: String,
    pub jti: String,
    pub kid: String,
    /// RFC 3339 UTC.
    pub expires_at: String,
}

/// POST /v1/tokens/introspect (also as a form, RFC 7662 §2.1).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IntrospectRequest {
    pub token: String,
    /// RFC 7662 allows a hint; keygate knows one token type and ignores it.
    #[serde(default)]
    pub token_type_hint: Option<String>,
}

/// RFC 7662 §2.2 answer. Only `active` is present for tokens keygate did not issue.
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct IntrospectResponse {
    pub active: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aud: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exp: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revoked: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redeemed: Option<bool>,
    /// The token's key binding (RFC 9449 §6.2): present for DPoP-bound tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cnf: Option<ConfirmationView>,
}

/// RFC 7800 confirmation: the base64url SHA-256 JWK thumbprint (RFC 7638) of the key a
/// DPoP proof must be signed with.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ConfirmationView {
    pub jkt: String,
}

/// One signing key (GET /v1/keys).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct KeyView {
    pub kid: String,
    /// `next`, `active`, `retiring` or `retired`.
    pub state: String,
    /// RFC 7512 PKCS#11 URI (or `tpm:` URI); never carries a PIN.
    pub uri: String,
    pub backend: String,
    /// The device that holds the key: `pkcs11` (the token all replicas share) or
    /// `tpm:<id>` (one replica's TPM; that replica signs with it).
    pub device: String,
    pub created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub activated_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retire_at: Option<String>,
    /// A `next` key: when it becomes active.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub activate_at: Option<String>,
    /// When the key was removed from the device (it stays listed: tokens name it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destroyed_at: Option<String>,
    /// Public JWK.
    #[schema(value_type = Object)]
    pub jwk: serde_json::Value,
    /// Self-signed X.509 CA certificate (PEM), signed inside the hardware.
    pub certificate: String,
}

impl From<crate::store::SigningKeyRow> for KeyView {
    fn from(r: crate::store::SigningKeyRow) -> Self {
        use crate::authority::rfc3339;
        KeyView {
            jwk: serde_json::from_str(&r.jwk).unwrap_or(serde_json::Value::Null),
            kid: r.kid,
            state: r.state,
            uri: r.uri,
            backend: r.backend,
            device: r.device,
            created_at: rfc3339(r.created_at),
            activated_at: r.activated_at.map(rfc3339),
            retire_at: r.retire_at.map(rfc3339),
            activate_at: r.activate_at.map(rfc3339),
            destroyed_at: r.destroyed_at.map(rfc3339),
            certificate: r.certificate,
        }
    }
}

/// POST /v1/keys/rotate
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateRequest {
    /// Emergency: the new key signs at once, without the publish lead (verifiers with a
    /// cached JWKS refuse its tokens until they refresh).
    #[serde(default)]
    pub activate_now: Option<bool>,
}

/// POST /v1/tokens/redeem
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RedeemRequestBody {
    /// The provisioning token (it is the credential).
    pub token: String,
    /// PEM PKCS#10 request; its key gets a certificate signed by the hardware-held CA key.
    #[serde(default)]
    pub csr: Option<String>,
}

/// What a redeemed token grants.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RedeemResponse {
    pub subject: String,
    pub audience: Vec<String>,
    pub scopes: Vec<String>,
    pub expires_at: String,
    /// PEM chain: the new certificate, then the issuing CA certificate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
}

/// POST /v1/api-tokens
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApiTokenRequest {
    /// Printable, no surrounding whitespace, at most 128 bytes.
    #[schema(min_length = 1, max_length = 128)]
    pub name: String,
    /// Any of `admin`, `tokens:issue`, `tokens:read`, `tokens:revoke`, `keys:read`,
    /// `keys:rotate`, `audit:read`, `enroll:admin`.
    #[schema(min_items = 1)]
    pub scopes: Vec<String>,
    #[serde(default)]
    #[schema(minimum = 1)]
    pub ttl_seconds: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CreateApiTokenResponse {
    pub id: String,
    /// The secret, shown this once.
    pub token: String,
    /// RFC 3339 UTC, or null when the token does not expire.
    pub expires_at: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ApiTokenView {
    pub id: String,
    pub name: String,
    pub scopes: Vec<String>,
    pub created_at: String,
    pub expires_at: Option<String>,
    pub created_by: String,
}

/// GET /.well-known/keygate-configuration
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Configuration {
    pub issuer: String,
    pub jwks_uri: String,
    pub revocations_uri: String,
    pub revocations_stream_uri: String,
    pub token_endpoint: String,
    pub redeem_endpoint: String,
    pub enroll_endpoint: String,
    pub introspection_endpoint: String,
}

/// GET /.well-known/openid-configuration: OpenID Connect Discovery 1.0 metadata, so JWT
/// middleware that starts from an issuer URL (Kubernetes, Envoy `jwt_authn`, oauth2-proxy,
/// `jose.createRemoteJWKSet` after discovery) finds the keys. keygate signs JWTs but runs no
/// login: there is no `authorization_endpoint`, and `response_types_supported` is
/// `["id_token"]` as for a Kubernetes service-account issuer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct OidcConfiguration {
    pub issuer: String,
    pub jwks_uri: String,
    pub response_types_supported: Vec<String>,
    pub subject_types_supported: Vec<String>,
    pub id_token_signing_alg_values_supported: Vec<String>,
    pub claims_supported: Vec<String>,
    /// RFC 7662 introspection (needs an API token with `tokens:read`).
    pub introspection_endpoint: String,
    /// RFC 9449 §5.1: the algorithms keygate accepts in DPoP proofs.
    pub dpop_signing_alg_values_supported: Vec<String>,
    /// keygate's own discovery document, with every endpoint.
    pub keygate_configuration_uri: String,
}

/// GET /readyz, /healthz
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Status {
    pub status: String,
}

/// GET /v1/audit query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// Entries with a greater `seq` (default 0: from the start).
    #[param(minimum = 0)]
    pub after: Option<i64>,
    /// At most this many (default 100, at most 1000).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<i64>,
}

/// One audit entry. `hash` = hex SHA-256(prev_hash || "\n" || canonical JSON), docs/adr/0004.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AuditEntryView {
    pub seq: i64,
    /// RFC 3339 UTC (the chain hashes the same instant as Unix seconds).
    pub at: String,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub outcome: String,
    pub remote_addr: String,
    pub prev_hash: String,
    pub hash: String,
}

/// A signed checkpoint: entry `seq` has `hash`. `signature` is base64url raw r||s (ES256),
/// made inside the hardware by `kid`, over "keygate-audit-checkpoint\n<seq>\n<hash>".
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CheckpointView {
    pub seq: i64,
    pub hash: String,
    pub kid: String,
    pub signature: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AuditPage {
    pub entries: Vec<AuditEntryView>,
    pub checkpoints: Vec<CheckpointView>,
}

/// POST /v1/tokens/{jti}/revoke (the body may be empty).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RevokeResponse {
    pub jti: String,
    /// RFC 3339 UTC; the first revocation's time when revoked again.
    pub revoked_at: String,
}

/// GET /v1/revocations query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct RevocationsQuery {
    /// Only revocations with a greater sequence number.
    pub after: Option<i64>,
}
