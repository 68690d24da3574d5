//! Operator endpoints: provisioning tokens, keys, API tokens. Each checks the bearer token
//! and its scope, converts the body, and calls the authority; no business rule lives here.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};

use super::AppState;
use super::dto::*;
use super::error::{ApiError, Problem};
use super::extract::{FormOrJson, Remote, StrictJson, bearer};
use crate::authority::{IssueRequest, Principal, Scope, rfc3339};

/// Authenticates the bearer token and checks `scope` (401 / 403, both audited).
pub(super) async fn authorize(
    st: &AppState,
    headers: &HeaderMap,
    remote: &str,
    scope: Scope,
) -> Result<Principal, ApiError> {
    let a = &st.authority;
    let p = a.authenticate(bearer(headers), remote).await?;
    a.require(&p, scope, remote).await?;
    Ok(p)
}

/// Issues a provisioning token signed inside the hardware.
#[utoipa::path(post, path = "/v1/tokens", tag = "tokens", request_body = IssueTokenRequest,
    security(("bearer" = ["tokens:issue"])),
    responses((status = 201, body = IssueTokenResponse), (status = 400, body = Problem),
        (status = 401, body = Problem), (status = 403, body = Problem), (status = 413, body = Problem),
        (status = 415, body = Problem), (status = 503, body = Problem)))]
pub async fn issue_token(
    State(st): State<AppState>,
    Remote(remote): Remote,
    headers: HeaderMap,
    body: Result<StrictJson<IssueTokenRequest>, ApiError>,
) -> Result<(StatusCode, Json<IssueTokenResponse>), ApiError> {
    let who = authorize(&st, &headers, &remote, Scope::TokensIssue).await?;
    let StrictJson(body) = body?;
    let req = IssueRequest {
        subject: body.subject,
        audience: body.audience,
        ttl_seconds: body.ttl_seconds,
        scopes: body.scopes.unwrap_or_default(),
        one_time: body.one_time.unwrap_or(false),
        cnf_jkt: body.cnf_jkt,
        sans: body.sans.unwrap_or_default(),
    };
    let issued = st.authority.issue(&who, &req, &remote).await?;
    Ok((
        StatusCode::CREATED,
        Json(IssueTokenResponse {
            token: issued.token.to_string(),
            jti: issued.jti.clone(),
            kid: issued.kid.clone(),
            expires_at: rfc3339(issued.expires_at),
        }),
    ))
}

/// RFC 7662 token introspection.
#[utoipa::path(post, path = "/v1/tokens/introspect", tag = "tokens",
    request_body(content = IntrospectRequest, content_type = "application/x-www-form-urlencoded"),
    security(("bearer" = ["tokens:read"])),
    responses((status = 200, body = IntrospectResponse), (status = 400, body = Problem),
        (status = 401, body = Problem), (status = 403, body = Problem)))]
pub async fn introspect(
    State(st): State<AppState>,
    Remote(remote): Remote,
    headers: HeaderMap,
    body: Result<FormOrJson<IntrospectRequest>, ApiError>,
) -> Result<Json<IntrospectResponse>, ApiError> {
    authorize(&st, &headers, &remote, Scope::TokensRead).await?;
    let FormOrJson(body) = body?;
    let i = st.authority.introspect(&body.token).await?;
    let mut out = IntrospectResponse {
        active: i.active,
        ..Default::default()
    };
    if let Some((c, kid, revoked, redeemed)) = i.details {
        out.sub = Some(c.sub.clone());
        out.aud = Some(c.aud.to_vec());
        out.scope = c.scope.clone();
        out.exp = Some(c.exp);
        out.iat = Some(c.iat);
        out.nbf = Some(c.nbf);
        out.iss = Some(c.iss.clone());
        out.jti = Some(c.jti.clone());
        out.kid = Some(kid);
        out.token_type = Some("provisioning+jwt".into());
        out.revoked = Some(revoked);
        out.redeemed = Some(redeemed);
        out.cnf = c.cnf.as_ref().map(|c| ConfirmationView { jkt: c.jkt.clone() });
    }
    Ok(Json(out))
}

/// Every signing key with its state, URI and CA certificate.
#[utoipa::path(get, path = "/v1/keys", tag = "keys", security(("bearer" = ["keys:read"])),
    responses((status = 200, body = [KeyView]), (status = 401, body = Problem), (status = 403, body = Problem)))]
pub async fn list_keys(
    State(st): State<AppState>,
    Remote(remote): Remote,
    headers: HeaderMap,
) -> Result<Json<Vec<KeyView>>, ApiError> {
    authorize(&st, &headers, &remote, Scope::KeysRead).await?;
    let rows = st.authority.signing_keys().await?;
    Ok(Json(rows.into_iter().map(KeyView::from).collect()))
}

/// Mints an operator API token; the secret is in this answer only.
#[utoipa::path(post, path = "/v1/api-tokens", tag = "api-tokens", request_body = CreateApiTokenRequest,
    security(("bearer" = ["admin"])),
    responses((status = 201, body = CreateApiTokenResponse), (status = 400, body = Problem),
        (status = 401, body = Problem), (status = 403, body = Problem)))]
pub async fn create_api_token(
    State(st): State<AppState>,
    Remote(remote): Remote,
    headers: HeaderMap,
    body: Result<StrictJson<CreateApiTokenRequest>, ApiError>,
) -> Result<(StatusCode, Json<CreateApiTokenResponse>), ApiError> {
    let who = authorize(&st, &headers, &remote, Scope::Admin).await?;
    let StrictJson(body) = body?;
    let t = st
        .authority
        .create_api_token(
            &who.id,
            &body.name,
            &body.scopes,
            body.ttl_seconds,
            false,
            &remote,
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(CreateApiTokenResponse {
            id: t.id.clone(),
            token: t.secret.to_string(),
            expires_at: t.expires_at.map(rfc3339),
        }),
    ))
}

/// Lists API tokens without their secrets.
#[utoipa::path(get, path = "/v1/api-tokens", tag = "api-tokens", security(("bearer" = ["admin"])),
    responses((status = 200, body = [ApiTokenView]), (status = 401, body = Problem), (status = 403, body = Problem)))]
pub async fn list_api_tokens(
    State(st): State<AppState>,
    Remote(remote): Remote,
    headers: HeaderMap,
) -> Result<Json<Vec<ApiTokenView>>, ApiError> {
    authorize(&st, &headers, &remote, Scope::Admin).await?;
    let rows = st.authority.list_api_tokens().await?;
    Ok(Json(
        rows.into_iter()
            .map(|r| ApiTokenView {
                id: r.id,
                name: r.name,
                scopes: r
                    .scopes
                    .split(' ')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect(),
                created_at: rfc3339(r.created_at),
                expires_at: r.expires_at.map(rfc3339),
                created_by: r.created_by,
            })
            .collect(),
    ))
}

/// Deletes an API token; it is refused from the next request on.
#[utoipa::path(delete, path = "/v1/api-tokens/{id}", tag = "api-tokens", security(("bearer" = ["admin"])),
    params(("id" = String, Path, description = "API token id")),
    responses((status = 204), (status = 401, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn delete_api_token(
    State(st): State<AppState>,
    Remote(remote): Remote,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let who = authorize(&st, &headers, &remote, Scope::Admin).await?;
    st.authority.delete_api_token(&who.id, &id, &remote).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Audit entries, oldest first, paged with `after` and `limit`.
#[utoipa::path(get, path = "/v1/audit", tag = "audit", params(AuditQuery), security(("bearer" = ["audit:read"])),
    responses((status = 200, body = AuditPage), (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem)))]
pub async fn audit(
    State(st): State<AppState>,
    Remote(remote): Remote,
    headers: HeaderMap,
    query: Result<axum::extract::Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<AuditPage>, ApiError> {
    authorize(&st, &headers, &remote, Scope::AuditRead).await?;
    let axum::extract::Query(q) =
        query.map_err(|e| ApiError::BadRequest(format!("query: {}", e.body_text())))?;
    let after = q.after.unwrap_or(0);
    let entries = st.authority.audit_page(after, q.limit.unwrap_or(100)).await?;
    // the checkpoints that cover this page
    let upto = entries.last().map(|e| e.seq).unwrap_or(after);
    let checkpoints = st.authority.audit_checkpoints(after, upto).await?;
    Ok(Json(AuditPage {
        entries: entries
            .into_iter()
            .map(|e| AuditEntryView {
                seq: e.seq,
                at: rfc3339(e.at),
                actor: e.record.actor,
                action: e.record.action,
                target: e.record.target,
                outcome: e.record.outcome,
                remote_addr: e.record.remote_addr,
                prev_hash: e.prev_hash,
                hash: e.hash,
            })
            .collect(),
        checkpoints: checkpoints
            .into_iter()
            .map(|c| CheckpointView {
                seq: c.seq,
                hash: c.hash,
                kid: c.kid,
                signature: c.signature,
            })
            .collect(),
    }))
}

/// Revokes a token at once (idempotent).
#[utoipa::path(post, path = "/v1/tokens/{jti}/revoke", tag = "tokens", request_body = RevokeRequest,
    params(("jti" = String, Path, description = "the token's jti")), security(("bearer" = ["tokens:revoke"])),
    responses((status = 200, body = RevokeResponse), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn revoke(
    State(st): State<AppState>,
    Remote(remote): Remote,
    headers: HeaderMap,
    Path(jti): Path<String>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<RevokeResponse>, ApiError> {
    let who = authorize(&st, &headers, &remote, Scope::TokensRevoke).await?;
    let reason = optional_reason(&headers, body)?;
    let at = st.authority.revoke(&who, &jti, reason, &remote).await?;
    Ok(Json(RevokeResponse {
        jti,
        revoked_at: rfc3339(at),
    }))
}

/// The `{"reason": ...}` body of a revocation, which may also be empty.
pub(super) fn optional_reason(
    headers: &HeaderMap,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Option<String>, ApiError> {
    let body = body.map_err(|r| {
        if r.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge
        } else {
            ApiError::BadRequest("the request body could not be read".into())
        }
    })?;
    Ok(if body.is_empty() {
        None
    } else {
        let json = headers
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .eq_ignore_ascii_case("application/json")
            });
        if !json {
            return Err(ApiError::UnsupportedMediaType(
                "send Content-Type: application/json".into(),
            ));
        }
        super::extract::parse_json::<RevokeRequest>(&body)?.reason
    })
}

/// The signed list of revoked, unexpired tokens (`application/jwt`).
#[utoipa::path(get, path = "/v1/revocations", tag = "public", params(RevocationsQuery),
    responses((status = 200, description = "JWS, typ revocations+jwt", content_type = "application/jwt"), (status = 400, body = Problem)))]
pub async fn revocations(
    State(st): State<AppState>,
    query: Result<axum::extract::Query<RevocationsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let axum::extract::Query(q) =
        query.map_err(|e| ApiError::BadRequest(format!("query: {}", e.body_text())))?;
    let jws = st.authority.revocation_list(q.after.unwrap_or(0)).await?;
    Ok((
        [
            (axum::http::header::CONTENT_TYPE, "application/jwt"),
            (axum::http::header::CACHE_CONTROL, "no-cache"),
        ],
        jws,
    )
        .into_response())
}
