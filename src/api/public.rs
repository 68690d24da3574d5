//! Endpoints without authentication: discovery, JWKS, health, readiness, metrics, OpenAPI.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::dto::{Configuration, OidcConfiguration, Status};
use super::error::{ApiError, Problem};

/// Default `Cache-Control: max-age` of the JWKS (the HTTP contract: at most 300); configurable as
/// `rotation.jwks_max_age_seconds`.
pub const JWKS_MAX_AGE: u64 = 60;

/// RFC 7517 JWK Set of every key a verifier may meet (`next`, `active`, `retiring`).
#[utoipa::path(get, path = "/.well-known/jwks.json", tag = "public",
    responses((status = 200, description = "RFC 7517 JWK Set", content_type = "application/jwk-set+json")))]
pub async fn jwks(State(st): State<AppState>) -> Response {
    let ring = st.authority.key_ring();
    let body = serde_json::to_vec(&ring.jwks).unwrap_or_default();
    let mut res = body.into_response();
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/jwk-set+json"),
    );
    if let Ok(v) = HeaderValue::from_str(&format!(
        "public, max-age={}",
        st.authority.settings().jwks_max_age
    )) {
        h.insert(header::CACHE_CONTROL, v);
    }
    res
}

/// Discovery document.
#[utoipa::path(get, path = "/.well-known/keygate-configuration", tag = "public",
    responses((status = 200, body = Configuration)))]
pub async fn configuration(State(st): State<AppState>) -> Json<Configuration> {
    let b = &st.base_url;
    Json(Configuration {
        issuer: st.authority.settings().issuer.clone(),
        jwks_uri: format!("{b}/.well-known/jwks.json"),
        revocations_uri: format!("{b}/v1/revocations"),
        revocations_stream_uri: format!("{b}/v1/revocations/stream"),
        token_endpoint: format!("{b}/v1/tokens"),
        redeem_endpoint: format!("{b}/v1/tokens/redeem"),
        enroll_endpoint: format!("{b}/v1/enroll/challenge"),
        introspection_endpoint: format!("{b}/v1/tokens/introspect"),
    })
}

/// OpenID Connect Discovery 1.0 metadata (issuer, JWKS, algorithms) for JWT middleware
/// that starts from the issuer URL. Its `issuer` is the `issuer` setting: discovery works
/// when that is the URL this document is served under (the default).
#[utoipa::path(get, path = "/.well-known/openid-configuration", tag = "public",
    responses((status = 200, body = OidcConfiguration)))]
pub async fn openid_configuration(State(st): State<AppState>) -> Response {
    let b = &st.base_url;
    let strings = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    let doc = OidcConfiguration {
        issuer: st.authority.settings().issuer.clone(),
        jwks_uri: format!("{b}/.well-known/jwks.json"),
        response_types_supported: strings(&["id_token"]),
        subject_types_supported: strings(&["public"]),
        id_token_signing_alg_values_supported: strings(&["ES256"]),
        claims_supported: strings(&[
            "iss", "sub", "aud", "exp", "nbf", "iat", "jti", "scope", "cnf", "one_time",
        ]),
        introspection_endpoint: format!("{b}/v1/tokens/introspect"),
        dpop_signing_alg_values_supported: strings(&["ES256"]),
        keygate_configuration_uri: format!("{b}/.well-known/keygate-configuration"),
    };
    let mut res = Json(doc).into_response();
    // like the JWKS: middleware caches it, and it changes only with the configuration
    if let Ok(v) = HeaderValue::from_str(&format!(
        "public, max-age={}",
        st.authority.settings().jwks_max_age
    )) {
        res.headers_mut().insert(header::CACHE_CONTROL, v);
    }
    res
}

/// 200 while the process is up.
#[utoipa::path(get, path = "/healthz", tag = "public", responses((status = 200, body = Status)))]
pub async fn healthz() -> Json<Status> {
    Json(Status { status: "ok".into() })
}

const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// 200 only while the key backend signs and the store answers; else 503 naming which.
#[utoipa::path(get, path = "/readyz", tag = "public",
    responses((status = 200, body = Status), (status = 503, body = Problem)))]
pub async fn readyz(State(st): State<AppState>) -> Result<Json<Status>, ApiError> {
    let a = &st.authority;
    match tokio::time::timeout(PROBE_TIMEOUT, a.probe_backend()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(not_ready("key backend", "readiness: key backend cannot sign", &e)),
        Err(_) => return Err(ApiError::Unavailable("key backend")),
    }
    match tokio::time::timeout(PROBE_TIMEOUT, a.probe_store()).await {
        Ok(Ok(())) => Ok(Json(Status {
            status: "ready".into(),
        })),
        Ok(Err(e)) => Err(not_ready("store", "readiness: store does not answer", &e)),
        Err(_) => Err(ApiError::Unavailable("store")),
    }
}

/// The 503 of a failed readiness probe. Its WARN line is written once per kind in a window
/// and then counted (`throttle.rs`): anyone may call `/readyz`, as often as they like.
fn not_ready(what: &'static str, message: &'static str, error: &dyn std::fmt::Display) -> ApiError {
    super::throttle::warning(message, error);
    ApiError::Unavailable(what)
}

/// Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "public",
    responses((status = 200, description = "Prometheus text exposition format", content_type = "text/plain")))]
pub async fn metrics(State(st): State<AppState>) -> Response {
    let mut res = st.metrics.render().into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    res
}

/// This API as an OpenAPI 3.1 document, generated from the code.
#[utoipa::path(get, path = "/openapi.json", tag = "public",
    responses((status = 200, description = "OpenAPI 3.1 document")))]
pub async fn openapi() -> Response {
    let doc = super::openapi::document();
    ([(header::CONTENT_TYPE, "application/json")], doc).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `/readyz` during an outage: every call answers 503, but its WARN line is written
    /// once and the rest counted, however often anyone calls it. (The window is the
    /// process's: this test uses an error text of its own.)
    #[test]
    fn a_failing_probe_warns_once_and_then_counts() {
        use super::super::throttle::warning_repeats_of;
        let message = "readiness: store does not answer";
        let cause = "readyz-test: connection refused";
        for _ in 0..50 {
            let e = not_ready("store", message, &cause);
            assert!(matches!(e, ApiError::Unavailable("store")));
        }
        assert_eq!(
            warning_repeats_of(message, &cause),
            Some(49),
            "one line, 49 counted"
        );
    }
}
