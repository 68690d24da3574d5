//! The HTTP/1.1 server loop: accept, bound, serve, drain.
//!
//! `axum::serve` builds hyper without a timer, so hyper's header-read timeout never applies
//! and a connection that sends nothing stays open until the client leaves; it also has no
//! connection limit, so idle connections could use up the open-file limit and stop
//! `accept` (the process then logs `Too many open files` every second and answers nobody).
//! This loop serves the same router with:
//! - a header-read timeout (hyper's, with tokio's timer) that runs whenever a connection is
//!   waiting for a request: new, trickling (slowloris) or kept alive after an answer;
//! - a request timeout (408, problem+json) around each request, body read included;
//! - a connection limit: past it, new connections are closed at once, before any read;
//! - accept errors (out of descriptors) that pause the loop briefly instead of spinning;
//! - a graceful drain at shutdown, bounded by the request timeout.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;

use super::ApiError;
use super::tls::Tls;
use crate::config::HttpConfig;

/// Descriptors kept out of the connection limit when it is derived from the open-file
/// limit: the store's connections, the device, the log, the listener, files opened later.
const FD_RESERVE: u64 = 256;

/// The limits one server runs with.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub request_timeout: Duration,
    pub max_connections: usize,
}

impl Limits {
    /// From the configuration. A `max_connections` of 0 is derived from the open-file limit,
    /// which is first raised to its hard limit (what a unit's `LimitNOFILE` sets).
    pub fn from_config(http: &HttpConfig) -> Limits {
        let max_connections = if http.max_connections > 0 {
            http.max_connections
        } else {
            connections_for(raise_nofile())
        };
        Limits {
            header_read_timeout: Duration::from_secs(http.header_read_timeout_seconds),
            request_timeout: Duration::from_secs(http.request_timeout_seconds),
            max_connections,
        }
    }
}

/// Raises the soft open-file limit to the hard one, if it is lower and the system allows
/// it (a seccomp filter may refuse `setrlimit`); returns the soft limit in force.
fn raise_nofile() -> u64 {
    use rlimit::Resource;
    let Ok((soft, hard)) = Resource::NOFILE.get() else {
        return 1024;
    };
    if soft < hard && Resource::NOFILE.set(hard, hard).is_ok() {
        return hard;
    }
    soft
}

/// Connections allowed with `nofile` descriptors: all but a reserve, and never more than
/// half of a small limit.
fn connections_for(nofile: u64) -> usize {
    let n = if nofile > 2 * FD_RESERVE {
        nofile - FD_RESERVE
    } else {
        nofile / 2
    };
    usize::try_from(n).unwrap_or(usize::MAX).max(1)
}

/// Serves `router` on `listener` (over TLS when `tls` is given; the handshake must finish
/// within the header-read timeout) until `shutdown` completes, then drains open
/// connections for at most the request timeout.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    tls: Option<Arc<Tls>>,
    shutdown: impl Future<Output = ()> + Send,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut last_warning: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = &mut shutdown => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors (EMFILE, ENFILE) or memory: retrying at once would spin.
                if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    tracing::warn!(error = %e, "cannot accept connections; retrying");
                    last_warning = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            metrics::counter!("keygate_http_connections_refused_total").increment(1);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let timeout = limits.request_timeout;
        let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            let router = router.clone();
            async move {
                let res = tokio::time::timeout(timeout, router.oneshot(req.map(axum::body::Body::new))).await;
                Ok::<_, std::convert::Infallible>(match res {
                    Ok(Ok(res)) => res,
                    Ok(Err(never)) => match never {},
                    Err(_) => axum::response::IntoResponse::into_response(ApiError::RequestTimeout),
                })
            }
        });
        let (http, watcher) = (http.clone(), graceful.watcher());
        let acceptor = tls.as_ref().map(|t| t.acceptor());
        let handshake = limits.header_read_timeout;
        tokio::spawn(async move {
            metrics::gauge!("keygate_http_connections").increment(1.0);
            // Errors here are the client's: a timeout, a reset, a malformed request, a
            // failed handshake.
            match acceptor {
                None => {
                    let _ = watcher
                        .watch(http.serve_connection(TokioIo::new(stream), service))
                        .await;
                }
                Some(acceptor) => match tokio::time::timeout(handshake, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let _ = watcher
                            .watch(http.serve_connection(TokioIo::new(tls), service))
                            .await;
                    }
                    _ => metrics::counter!("keygate_tls_handshakes_failed_total").increment(1),
                },
            }
            metrics::gauge!("keygate_http_connections").decrement(1.0);
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.request_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the drain; closing them");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_keeps_a_reserve() {
        assert_eq!(connections_for(1024), 768);
        assert_eq!(connections_for(65536), 65280);
        assert_eq!(connections_for(256), 128);
        assert_eq!(connections_for(1), 1);
    }
}
