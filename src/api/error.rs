//! RFC 9457 problem documents: one `ApiError`, one `IntoResponse`.
//!
//! A 5xx body says little (which component, not why); the real error is logged inside the
//! request span: every 500's, and that of a 503 for an unavailable store or device once per
//! kind of failure and 10 s (`throttle.rs`; a 503 of load shedding only at debug).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::authority::{AuthorityError, Scope};
use crate::store::StoreError;

/// RFC 9457 problem details.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema, PartialEq, Eq)]
pub struct Problem {
    /// A URN naming the problem type, e.g. `urn:keygate:problem:invalid-request`.
    #[serde(rename = "type")]
    pub type_: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
}

/// Every error an endpoint can answer with.
#[derive(Debug)]
pub enum ApiError {
    BadRequest(String),
    Unauthorized(String),
    /// A DPoP-bound token without a valid RFC 9449 proof (401 with a `DPoP` challenge):
    /// `key_binding` when the proof's key is not the token's `cnf.jkt`.
    Dpop {
        key_binding: bool,
        detail: String,
    },
    Forbidden(Scope),
    /// Attestation proof failed (401, no Bearer challenge: the proof is the credential).
    AttestationFailed(String),
    /// Refused by policy (403).
    Denied(String),
    NotFound(String),
    MethodNotAllowed,
    Conflict(String),
    /// Another replica answers for this resource (421).
    Misdirected(String),
    PayloadTooLarge,
    UnsupportedMediaType(String),
    /// The source sent more than its rate to an endpoint without credential; retry after
    /// this many seconds.
    TooManyRequests(u64),
    /// The request was not read and answered within `http.request_timeout_seconds`.
    RequestTimeout,
    /// A component (key backend, store) cannot serve now; the string names it.
    Unavailable(&'static str),
    Internal,
}

impl ApiError {
    fn parts(&self) -> (StatusCode, &'static str, &'static str, String) {
        use ApiError::*;
        match self {
            BadRequest(d) => (
                StatusCode::BAD_REQUEST,
                "invalid-request",
                "Invalid request",
                d.clone(),
            ),
            Unauthorized(d) => (
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "Unauthorized",
                d.clone(),
            ),
            Dpop { detail, .. } => (
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "Unauthorized",
                detail.clone(),
            ),
            Forbidden(s) => (
                StatusCode::FORBIDDEN,
                "insufficient-scope",
                "Insufficient scope",
                format!("this API token lacks the scope {s}"),
            ),
            AttestationFailed(d) => (
                StatusCode::UNAUTHORIZED,
                "attestation-failed",
                "Attestation failed",
                d.clone(),
            ),
            Denied(d) => (StatusCode::FORBIDDEN, "denied", "Denied by policy", d.clone()),
            NotFound(d) => (StatusCode::NOT_FOUND, "not-found", "Not found", d.clone()),
            MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "Method not allowed",
                "this endpoint does not accept that method".into(),
            ),
            Conflict(d) => (StatusCode::CONFLICT, "conflict", "Conflict", d.clone()),
            Misdirected(d) => (
                StatusCode::MISDIRECTED_REQUEST,
                "misdirected",
                "Misdirected request",
                d.clone(),
            ),
            PayloadTooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload-too-large",
                "Payload too large",
                "the request body exceeds 64 KiB".into(),
            ),
            UnsupportedMediaType(d) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "Unsupported media type",
                d.clone(),
            ),
            TooManyRequests(secs) => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate-limited",
                "Too many requests",
                format!("too many requests from this address; retry in {secs} s"),
            ),
            RequestTimeout => (
                StatusCode::REQUEST_TIMEOUT,
                "request-timeout",
                "Request timeout",
                "the request was not completed in time; the connection is closed".into(),
            ),
            Unavailable(what) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "Service unavailable",
                format!("the {what} is unavailable; retry later"),
            ),
            Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal error",
                "an internal error occurred; it has been logged".into(),
            ),
        }
    }

    /// The problem document this error renders as.
    pub fn problem(&self) -> Problem {
        let (status, slug, title, detail) = self.parts();
        Problem {
            type_: format!("urn:keygate:problem:{slug}"),
            title: title.into(),
            status: status.as_u16(),
            detail,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, slug, ..) = self.parts();
        metrics::counter!("keygate_requests_failed_total", "reason" => slug).increment(1);
        let body = serde_json::to_vec(&self.problem()).unwrap_or_default();
        let mut res = (status, body).into_response();
        let h = res.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        match &self {
            // RFC 9110 §15.5.9: the server closes the connection after a 408.
            ApiError::RequestTimeout => {
                h.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            ApiError::Unauthorized(d) => {
                let v = if d.starts_with("missing") {
                    "Bearer realm=\"keygate\"".to_owned()
                } else {
                    format!(
                        "Bearer realm=\"keygate\", error=\"invalid_token\", error_description={}",
                        quoted(d)
                    )
                };
                insert_challenge(h, v);
            }
            // RFC 9449 §7.1: the DPoP scheme, the error, and the algorithms keygate accepts.
            ApiError::Dpop { key_binding, detail } => {
                let error = if *key_binding {
                    "invalid_token"
                } else {
                    "invalid_dpop_proof"
                };
                insert_challenge(
                    h,
                    format!(
                        "DPoP algs=\"ES256\", error=\"{error}\", error_description={}",
                        quoted(detail)
                    ),
                );
            }
            ApiError::Forbidden(s) => {
                let v = format!("Bearer realm=\"keygate\", error=\"insufficient_scope\", scope=\"{s}\"");
                insert_challenge(h, v);
            }
            ApiError::TooManyRequests(secs) => {
                h.insert(header::RETRY_AFTER, HeaderValue::from(*secs));
            }
            ApiError::Unavailable(_) => {
                h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        res
    }
}

/// An RFC 9110 §5.6.4 quoted-string holding `text` as an RFC 6750 §3 `error_description`:
/// only %x20-21 / %x23-5B / %x5D-7E may appear, so `"` and `\` become `'` and anything else
/// outside printable ASCII becomes `?`. A reflected value (a kid, say) can then neither end
/// the string early nor break the header.
fn quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    out.extend(text.chars().map(|c| match c {
        '"' | '\\' => '\'',
        ' '..='~' => c,
        _ => '?',
    }));
    out.push('"');
    out
}

fn insert_challenge(h: &mut axum::http::HeaderMap, v: String) {
    if let Ok(v) = HeaderValue::from_str(&v) {
        h.insert(header::WWW_AUTHENTICATE, v);
    }
}

impl From<AuthorityError> for ApiError {
    fn from(e: AuthorityError) -> Self {
        match e {
            AuthorityError::BadRequest(d) => ApiError::BadRequest(d),
            AuthorityError::Unauthorized(d) => ApiError::Unauthorized(d),
            AuthorityError::Dpop { key_binding, detail } => ApiError::Dpop { key_binding, detail },
            AuthorityError::Forbidden(s) => ApiError::Forbidden(s),
            AuthorityError::NotFound(d) => ApiError::NotFound(d),
            AuthorityError::Attestation(d) => ApiError::AttestationFailed(d),
            AuthorityError::Denied(d) => ApiError::Denied(d),
            AuthorityError::Conflict(d) => ApiError::Conflict(d),
            AuthorityError::Misdirected(d) => ApiError::Misdirected(d),
            // The device refused the client's input (a key-proof credential not made for it).
            AuthorityError::Backend(crate::keys::KeyError::BadInput(d)) => ApiError::BadRequest(d),
            // Busy is load shedding at work (counted in keygate_requests_failed_total and
            // keygate_backend_shed_total), not a fault: an ERROR line per refused request
            // would flood the log exactly when the service is busiest.
            AuthorityError::Backend(e @ crate::keys::KeyError::Busy(_)) => {
                tracing::debug!(error = %e, "key backend busy");
                ApiError::Unavailable("key backend")
            }
            // Unavailable: every request fails alike until the device is back, so one line
            // per kind and window (`throttle.rs`); anything else is logged with its request.
            AuthorityError::Backend(e) if e.is_unavailable() => {
                super::throttle::failure("key backend failed", &e);
                ApiError::Unavailable("key backend")
            }
            AuthorityError::Backend(e) => {
                tracing::error!(error = %e, "key backend failed");
                ApiError::Internal
            }
            // A conflict or an unknown id is the client's doing, not a fault of the store.
            AuthorityError::Store(StoreError::Conflict(d)) => ApiError::Conflict(d),
            AuthorityError::Store(StoreError::NotFound(d)) => ApiError::NotFound(format!("{d} not found")),
            // A precondition the store refused (the record changed meanwhile, perhaps on
            // another replica) that the authority did not turn into an error of its own.
            AuthorityError::Store(StoreError::Refused(r)) => {
                ApiError::Conflict(format!("{r}; read the record again and retry"))
            }
            // An open failure is not an outage: logged every time.
            AuthorityError::Store(e @ StoreError::Open { .. }) => {
                tracing::error!(error = %e, "store failed");
                ApiError::Unavailable("store")
            }
            AuthorityError::Store(e) => {
                super::throttle::failure("store failed", &e);
                ApiError::Unavailable("store")
            }
            AuthorityError::Internal(d) => {
                tracing::error!(error = %d, "internal error");
                ApiError::Internal
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KeyError;

    fn status_of(e: AuthorityError) -> u16 {
        ApiError::from(e).problem().status
    }

    #[test]
    fn domain_errors_map_to_problems() {
        assert_eq!(status_of(AuthorityError::BadRequest("x".into())), 400);
        assert_eq!(status_of(AuthorityError::Unauthorized("x".into())), 401);
        assert_eq!(status_of(AuthorityError::Forbidden(Scope::KeysRead)), 403);
        assert_eq!(status_of(AuthorityError::NotFound("x".into())), 404);
        assert_eq!(status_of(AuthorityError::Attestation("x".into())), 401);
        assert_eq!(status_of(AuthorityError::Denied("x".into())), 403);
        assert_eq!(status_of(AuthorityError::Conflict("x".into())), 409);
        assert_eq!(status_of(AuthorityError::Backend(KeyError::Busy(10))), 503);
        assert_eq!(
            status_of(AuthorityError::Store(StoreError::Unavailable("db".into()))),
            503
        );
        assert_eq!(
            status_of(AuthorityError::Store(StoreError::Conflict("dup".into()))),
            409
        );
        assert_eq!(status_of(AuthorityError::Internal("boom".into())), 500);
    }

    #[test]
    fn five_hundreds_say_little() {
        let p = ApiError::from(AuthorityError::Internal("pin=1234 in /secret/path".into())).problem();
        assert!(!p.detail.contains("1234") && !p.detail.contains("secret"));
        let p = ApiError::from(AuthorityError::Backend(KeyError::Pkcs11 {
            function: "C_Sign".into(),
            rv: "CKR_DEVICE_ERROR".into(),
        }))
        .problem();
        assert_eq!(p.detail, "the key backend is unavailable; retry later");
        assert_eq!(p.type_, "urn:keygate:problem:unavailable");
    }

    #[test]
    fn unauthorized_carries_www_authenticate() {
        let r = ApiError::Unauthorized("invalid token".into()).into_response();
        assert_eq!(r.status(), 401);
        let v = r
            .headers()
            .get(header::WWW_AUTHENTICATE)
            .unwrap()
            .to_str()
            .unwrap();
        assert!(v.starts_with("Bearer ") && v.contains("invalid_token"));
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/problem+json");
        let r = ApiError::Forbidden(Scope::TokensIssue).into_response();
        assert!(
            r.headers()[header::WWW_AUTHENTICATE]
                .to_str()
                .unwrap()
                .contains("scope=\"tokens:issue\"")
        );
    }

    /// While the store or the device is unavailable every request fails the same way: the
    /// first failure of each kind is logged at once and its repeats are counted for one
    /// summary line (`throttle.rs`); a 500 is never held back. (The windows are the
    /// process's: this test uses error texts of its own.)
    #[test]
    fn an_outage_logs_each_kind_once_and_then_a_count() {
        use super::super::throttle::repeats_of;
        let (db, rv, bad) = (
            "outage-test: refused",
            "outage-test: CKR_DEVICE_REMOVED",
            "outage-test: r is 0",
        );
        for _ in 0..100 {
            let store = AuthorityError::Store(StoreError::Unavailable(db.into()));
            assert_eq!(status_of(store), 503);
            let gone = AuthorityError::Backend(KeyError::Pkcs11 {
                function: "C_Sign".into(),
                rv: rv.into(),
            });
            assert_eq!(status_of(gone), 503);
        }
        for _ in 0..3 {
            assert_eq!(
                status_of(AuthorityError::Backend(KeyError::BadSignature(bad.into()))),
                500
            );
        }
        let store = StoreError::Unavailable(db.into()).to_string();
        assert_eq!(
            repeats_of("store failed", &store),
            Some(99),
            "one line, 99 counted"
        );
        let device = KeyError::Pkcs11 {
            function: "C_Sign".into(),
            rv: rv.into(),
        }
        .to_string();
        assert_eq!(repeats_of("key backend failed", &device), Some(99));
        let internal = KeyError::BadSignature(bad.into()).to_string();
        assert_eq!(
            repeats_of("key backend failed", &internal),
            None,
            "500s are logged every time"
        );
        // a refused precondition (the record changed meanwhile, say on another replica) is
        // a conflict, not an outage: 409, and no "store failed" line
        let refused = || StoreError::Refused(crate::store::Refusal::KeyState);
        for _ in 0..2 {
            assert_eq!(status_of(AuthorityError::Store(refused())), 409);
        }
        assert_eq!(repeats_of("store failed", &refused()), None);
        // texts that differ only past 256 bytes are one kind
        let long = |tail: &str| StoreError::Unavailable(format!("outage-test: {}{tail}", "x".repeat(300)));
        for tail in ["a", "b", "c"] {
            assert_eq!(status_of(AuthorityError::Store(long(tail))), 503);
        }
        assert_eq!(repeats_of("store failed", &long("")), Some(2));
    }
}
