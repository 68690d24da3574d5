//! The axum front end: routes, conventions of the HTTP contract (problem+json, 64 KiB, 415, strict
//! JSON), a tracing span per request with its request id and matched route.

mod certs;
mod dto;
mod enroll;
pub mod error;
mod extract;
pub mod keyproof;
mod lifecycle;
pub mod limit;
mod openapi;
mod operator;
mod public;
pub mod server;
mod throttle;
pub mod tls;

pub use throttle::flush_failure_lines;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::HeaderName;
use axum::response::Response;
use axum::routing::{delete, get, post};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, RequestId, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use tracing::Span;

pub use dto::*;
pub use enroll::MachineView;
pub use error::{ApiError, Problem};
pub use public::JWKS_MAX_AGE;

use crate::authority::Authority;

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    pub authority: Arc<Authority>,
    /// Public base URL (no trailing slash).
    pub base_url: String,
    pub metrics: PrometheusHandle,
    /// Per-source rate limit of the endpoints without credential (`None`: off).
    pub source_limit: Option<Arc<limit::SourceLimit>>,
}

/// The process-wide Prometheus recorder (installed once).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let buckets = [
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ];
            let batch_buckets = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_duration_seconds".into()), &buckets)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full("keygate_store_batch_writes".into()), &batch_buckets))
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed");
            }
            for name in [
                "keygate_tokens_issued_total",
                "keygate_tokens_redeemed_total",
                "keygate_tokens_revoked_total",
            ] {
                metrics::counter!(name).absolute(0);
            }
            for outcome in ["success", "refused"] {
                metrics::counter!("keygate_enrollments_total", "outcome" => outcome).absolute(0);
            }
            metrics::describe_counter!("keygate_tokens_issued_total", "Provisioning tokens issued");
            metrics::describe_counter!(
                "keygate_tokens_redeemed_total",
                "Provisioning tokens redeemed (each successful redemption)"
            );
            metrics::describe_counter!("keygate_tokens_revoked_total", "Provisioning tokens revoked");
            metrics::describe_histogram!(
                "keygate_issue_duration_seconds",
                metrics::Unit::Seconds,
                "Issuance latency, request to answer"
            );
            metrics::describe_histogram!(
                "keygate_backend_sign_duration_seconds",
                metrics::Unit::Seconds,
                "One signature in the key backend"
            );
            metrics::describe_counter!(
                "keygate_requests_failed_total",
                "Requests answered with a problem, by reason"
            );
            metrics::describe_counter!("keygate_enrollments_total", "Enrollments, by outcome");
            metrics::describe_histogram!(
                "keygate_store_batch_writes",
                "Writes committed together in one store transaction (group commit)"
            );
            metrics::describe_gauge!("keygate_http_connections", "HTTP connections open now");
            metrics::describe_gauge!(
                "keygate_backend_ready",
                "1 while the key backend signs the readiness digest within 2 s (checked every 15 s)"
            );
            metrics::describe_gauge!(
                "keygate_store_ready",
                "1 while the store answers within 2 s (checked every 15 s)"
            );
            metrics::describe_gauge!(
                "keygate_audit_last_entry_timestamp_seconds",
                "Unix time of the newest audit entry (0: none)"
            );
            metrics::describe_gauge!(
                "keygate_audit_last_checkpoint_timestamp_seconds",
                "Unix time of the newest hardware-signed audit checkpoint (0: none)"
            );
            metrics::describe_gauge!(
                "keygate_key_retire_timestamp_seconds",
                "Unix time the rotation schedule replaces this device's active key (absent without a schedule)"
            );
            metrics::describe_counter!(
                "keygate_rate_limited_total",
                "Requests to redemption or enrollment answered 429: their source was past http.per_source_per_second"
            );
            metrics::describe_counter!(
                "keygate_tls_handshakes_failed_total",
                "TLS handshakes that failed or did not finish within the header-read timeout"
            );
            metrics::describe_counter!(
                "keygate_backend_shed_total",
                "Signatures refused at once (503) because the device queue could not serve them within the wait"
            );
            metrics::describe_counter!(
                "keygate_http_connections_refused_total",
                "Connections closed at once because http.max_connections were open"
            );
            metrics::describe_gauge!(
                "keygate_leader",
                "1 while this replica runs the periodic task (rotation of its device's keys, audit checkpoints)"
            );
            handle
        })
        .clone()
}

/// Marks an answer that carries a credential (a token, a certificate for a new key) as not
/// to be stored by caches.
fn no_store(mut res: Response) -> Response {
    res.headers_mut().insert(
        axum::http::header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("no-store"),
    );
    res
}

/// Builds the router over `state`.
pub fn router(state: AppState) -> Router {
    let x_request_id = HeaderName::from_static("x-request-id");
    // The endpoints anyone may call, rate-limited per source.
    let open = Router::new()
        .route("/v1/tokens/redeem", post(lifecycle::redeem))
        .route("/v1/enroll/challenge", post(enroll::challenge))
        .route("/v1/enroll/complete", post(enroll::complete))
        .route(
            "/v1/keys/{kid}/proof/challenge",
            post(keyproof::key_proof_challenge),
        )
        .route("/v1/keys/{kid}/proof", post(keyproof::key_proof));
    let open = match &state.source_limit {
        Some(l) => open.route_layer(axum::middleware::from_fn_with_state(l.clone(), limit::limit)),
        None => open,
    };
    Router::new()
        .merge(open)
        .route("/.well-known/jwks.json", get(public::jwks))
        .route("/.well-known/keygate-configuration", get(public::configuration))
        .route("/.well-known/openid-configuration", get(public::openid_configuration))
        .route("/healthz", get(public::healthz))
        .route("/readyz", get(public::readyz))
        .route("/metrics", get(public::metrics))
        .route("/openapi.json", get(public::openapi))
        .route("/v1/tokens", post(operator::issue_token))
        .route("/v1/tokens/introspect", post(operator::introspect))
        .route("/v1/revocations/stream", get(lifecycle::revocation_stream))
        .route("/v1/keys", get(operator::list_keys))
        .route("/v1/keys/rotate", post(lifecycle::rotate_key))
        .route("/v1/keys/{kid}", delete(lifecycle::destroy_key))
        .route("/v1/audit", get(operator::audit))
        .route("/v1/tokens/{jti}/revoke", post(operator::revoke))
        .route("/v1/revocations", get(operator::revocations))
        .route("/v1/crl", get(certs::crl))
        .route("/v1/certificates/{serial}/revoke", post(certs::revoke_certificate))
        .route("/v1/api-tokens", post(operator::create_api_token).get(operator::list_api_tokens))
        .route("/v1/api-tokens/{id}", delete(operator::delete_api_token))
        .route("/v1/enroll/machines", post(enroll::register_machine).get(enroll::list_machines))
        .route("/v1/enroll/machines/{ek_hash}", delete(enroll::revoke_machine))
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(extract::BODY_LIMIT))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|req: &Request| {
                    let route = req.extensions().get::<MatchedPath>().map(MatchedPath::as_str);
                    let id = req
                        .extensions()
                        .get::<RequestId>()
                        .and_then(|r| r.header_value().to_str().ok())
                        .unwrap_or("-");
                    // The path is logged as sent (percent-encoded, so one line); the log writer
                    // cuts any API-token secret pasted into it (cli::logging).
                    tracing::info_span!("request", method = %req.method(), path = %req.uri().path(), route = route.unwrap_or("unmatched"), request_id = %id)
                })
                .on_request(())
                .on_response(|res: &Response, latency: Duration, _: &Span| {
                    tracing::info!(status = res.status().as_u16(), latency_ms = latency.as_secs_f64() * 1e3, "answered");
                })
                .on_failure(()),
        )
        .layer(PropagateRequestIdLayer::new(x_request_id.clone()))
        .layer(SetRequestIdLayer::new(x_request_id, MakeRequestUuid))
        .with_state(state)
}
