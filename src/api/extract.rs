//! Request extractors: strict JSON bodies, form-or-JSON bodies, the caller's address.

use std::net::SocketAddr;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// Largest request body accepted (the HTTP contract: 64 KiB, else 413).
pub const BODY_LIMIT: usize = 64 * 1024;

fn media_type(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    Some(v.split(';').next().unwrap_or("").trim().to_ascii_lowercase())
}

async fn body_bytes<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    Bytes::from_request(req, state).await.map_err(|rej| {
        if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge
        } else {
            ApiError::BadRequest("the request body could not be read".into())
        }
    })
}

/// A JSON request body: an object (serde would also fill a struct from an array, field by
/// field, so `["x",["admin"]]` could pass for `{"name":"x","scopes":["admin"]}`), matching
/// `T`.
pub(super) fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Err(ApiError::BadRequest("the JSON body must be an object".into()));
    }
    serde_json::from_slice(bytes).map_err(|e| {
        // serde_json's message names the field and position, never echoes values.
        ApiError::BadRequest(format!("malformed JSON body: {e}"))
    })
}

/// A JSON body: `Content-Type: application/json` (else 415), at most 64 KiB (else 413),
/// valid UTF-8 JSON matching `T` exactly, unknown fields refused (else 400).
pub struct StrictJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for StrictJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        if media_type(req.headers()).as_deref() != Some("application/json") {
            return Err(ApiError::UnsupportedMediaType(
                "send Content-Type: application/json".into(),
            ));
        }
        let bytes = body_bytes(req, state).await?;
        parse_json(&bytes).map(StrictJson)
    }
}

/// A body that is either `application/x-www-form-urlencoded` (RFC 7662 §2.1) or JSON.
pub struct FormOrJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for FormOrJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let mt = media_type(req.headers());
        let bytes = body_bytes(req, state).await?;
        match mt.as_deref() {
            Some("application/json") => parse_json(&bytes).map(FormOrJson),
            Some("application/x-www-form-urlencoded") => serde_urlencoded::from_bytes(&bytes)
                .map(FormOrJson)
                .map_err(|e| ApiError::BadRequest(format!("malformed form body: {e}"))),
            _ => Err(ApiError::UnsupportedMediaType(
                "send application/x-www-form-urlencoded or application/json".into(),
            )),
        }
    }
}

/// The peer address as text (`unknown` when the server was not started with connect info).
pub struct Remote(pub String);

impl<S: Send + Sync> FromRequestParts<S> for Remote {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Remote(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0.ip().to_string())
                .unwrap_or_else(|| "unknown".into()),
        ))
    }
}

/// The bearer credential of a request, if any. Scheme matched case-insensitively (RFC 6750).
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
}
