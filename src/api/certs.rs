//! Certificates: the CRL each CA key signs in the hardware, and revoking one certificate.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::AppState;
use super::error::{ApiError, Problem};
use super::extract::Remote;
use super::operator::{authorize, optional_reason};
use crate::authority::{Scope, rfc3339};

/// GET /v1/crl query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct CrlQuery {
    /// The CA key whose CRL to fetch (default: the active key, which issues certificates now).
    #[param(max_length = 64)]
    pub kid: Option<String>,
}

/// RFC 5280 CRL (DER) of a hardware-held CA key: the certificates it issued that are revoked
/// (on their own, with their token, or with their machine) and not yet expired.
#[utoipa::path(get, path = "/v1/crl", tag = "public", params(CrlQuery),
    responses((status = 200, description = "DER X.509 CRL", content_type = "application/pkix-crl"),
        (status = 400, body = Problem), (status = 404, body = Problem), (status = 503, body = Problem)))]
pub async fn crl(
    State(st): State<AppState>,
    query: Result<Query<CrlQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(format!("query: {}", e.body_text())))?;
    let der = st.authority.crl(q.kid.as_deref()).await?;
    let mut res = der.into_response();
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/pkix-crl"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(res)
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CertificateRevokeResponse {
    /// The serial number, lowercase hex.
    pub serial: String,
    /// RFC 3339 UTC; the first revocation's time when revoked again.
    pub revoked_at: String,
}

/// Revokes one certificate keygate issued (idempotent); its CA's CRL lists it from now on.
/// Revoking a token or a machine revokes its certificates without this.
#[utoipa::path(post, path = "/v1/certificates/{serial}/revoke", tag = "tokens", request_body = super::dto::RevokeRequest,
    params(("serial" = String, Path, description = "the certificate's serial number, hex")),
    security(("bearer" = ["tokens:revoke"])),
    responses((status = 200, body = CertificateRevokeResponse), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn revoke_certificate(
    State(st): State<AppState>,
    Remote(remote): Remote,
    headers: HeaderMap,
    Path(serial): Path<String>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<CertificateRevokeResponse>, ApiError> {
    let who = authorize(&st, &headers, &remote, Scope::TokensRevoke).await?;
    let reason = optional_reason(&headers, body)?;
    let (serial, at) = st
        .authority
        .revoke_certificate(&who, &serial, reason, &remote)
        .await?;
    Ok(Json(CertificateRevokeResponse {
        serial,
        revoked_at: rfc3339(at),
    }))
}
