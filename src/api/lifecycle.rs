//! Token lifecycle endpoints: redemption, the revocation event stream, key rotation and
//! destruction. Each converts the request and calls the authority.

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::{Stream, StreamExt};

use super::dto::*;
use super::error::{ApiError, Problem};
use super::extract::{Remote, StrictJson};
use super::operator::authorize;
use super::{AppState, no_store};
use crate::authority::{RedeemRequest, Scope, rfc3339};

/// Redeems a provisioning token (the token is the credential; a `cnf`-bound token needs an
/// RFC 9449 `DPoP` proof). With a CSR, answers a certificate chain signed in the hardware.
#[utoipa::path(post, path = "/v1/tokens/redeem", tag = "tokens", request_body = RedeemRequestBody,
    params(("DPoP" = Option<String>, Header, description = "RFC 9449 proof, for tokens with cnf.jkt")),
    responses((status = 200, body = RedeemResponse), (status = 400, body = Problem),
        (status = 401, body = Problem), (status = 403, body = Problem), (status = 409, body = Problem), (status = 503, body = Problem)))]
pub async fn redeem(
    State(st): State<AppState>,
    Remote(remote): Remote,
    headers: HeaderMap,
    body: Result<StrictJson<RedeemRequestBody>, ApiError>,
) -> Result<Response, ApiError> {
    let StrictJson(body) = body?;
    let mut proofs = headers.get_all("dpop").iter();
    let dpop = match (proofs.next(), proofs.next()) {
        (None, _) => None,
        (Some(v), None) => Some(v.to_str().map_err(|_| ApiError::Dpop {
            key_binding: false,
            detail: "DPoP proof is malformed: not ASCII".into(),
        })?),
        (Some(_), Some(_)) => {
            return Err(ApiError::Dpop {
                key_binding: false,
                detail: "DPoP proof is malformed: more than one DPoP header".into(),
            });
        }
    };
    let url = format!("{}/v1/tokens/redeem", st.base_url);
    let req = RedeemRequest {
        token: &body.token,
        csr: body.csr.as_deref(),
        dpop,
        url: &url,
    };
    let r = st.authority.redeem(req, &remote).await?;
    Ok(no_store(
        Json(RedeemResponse {
            subject: r.subject,
            audience: r.audience,
            scopes: r.scopes,
            expires_at: rfc3339(r.expires_at),
            certificate: r.certificate,
        })
        .into_response(),
    ))
}

/// Where a stream starts when the client sends no `Last-Event-ID`.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct StreamQuery {
    /// Send revocations with a seq above this one first (default 0: every unexpired one).
    pub after: Option<i64>,
}

/// Server-Sent Events: one `event: revoked` per revocation (`id` = its seq), as it happens;
/// `Last-Event-ID` (or `?after=`) resumes without a gap.
#[utoipa::path(get, path = "/v1/revocations/stream", tag = "public", params(StreamQuery,
        ("Last-Event-ID" = Option<i64>, Header, description = "seq of the last event received")),
    responses((status = 200, description = "text/event-stream", content_type = "text/event-stream"),
        (status = 400, body = Problem)))]
pub async fn revocation_stream(
    State(st): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<StreamQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(format!("query: {}", e.body_text())))?;
    let after = match headers.get("last-event-id") {
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .ok_or_else(|| ApiError::BadRequest("Last-Event-ID must be the seq of a revocation".into()))?,
        None => q.after.unwrap_or(0),
    };
    let events = st.authority.revocation_events(after).await?;
    let stream: std::pin::Pin<Box<dyn Stream<Item = Result<Event, Infallible>> + Send>> =
        Box::pin(events.map(|ev| {
            Ok(Event::default()
                .event("revoked")
                .id(ev.seq.to_string())
                .data(serde_json::to_string(&ev).unwrap_or_default()))
        }));
    let mut res = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response();
    let h = res.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Reverse proxies (nginx) must not buffer the stream.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(res)
}

/// Creates a new signing key in the hardware: `next` (published now, signing after the
/// publish lead) or, with `activate_now`, active at once.
#[utoipa::path(post, path = "/v1/keys/rotate", tag = "keys", request_body = RotateRequest,
    security(("bearer" = ["keys:rotate"])),
    responses((status = 201, body = KeyView), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 409, body = Problem), (status = 503, body = Problem)))]
pub async fn rotate_key(
    State(st): State<AppState>,
    Remote(remote): Remote,
    headers: HeaderMap,
    body: Result<StrictJson<RotateRequest>, ApiError>,
) -> Result<(StatusCode, Json<KeyView>), ApiError> {
    let who = authorize(&st, &headers, &remote, Scope::KeysRotate).await?;
    let StrictJson(body) = body?;
    let out = st
        .authority
        .rotate(&who, body.activate_now.unwrap_or(false), &remote)
        .await?;
    Ok((StatusCode::CREATED, Json(KeyView::from(out.key))))
}

/// Removes a retired key from the hardware (keygate's extension; docs/api-notes.md).
#[utoipa::path(delete, path = "/v1/keys/{kid}", tag = "keys", security(("bearer" = ["keys:rotate"])),
    params(("kid" = String, Path, description = "RFC 7638 thumbprint")),
    responses((status = 204, description = "destroyed"), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn destroy_key(
    State(st): State<AppState>,
    Remote(remote): Remote,
    headers: HeaderMap,
    Path(kid): Path<String>,
) -> Result<StatusCode, ApiError> {
    let who = authorize(&st, &headers, &remote, Scope::KeysRotate).await?;
    st.authority.destroy_key(&who, &kid, &remote).await?;
    Ok(StatusCode::NO_CONTENT)
}
