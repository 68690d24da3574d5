//! Per-source rate limits of the endpoints that need no credential: redemption and the two
//! enrollment steps. Anyone can call them, and each refusal costs a signature check, a
//! store read and an audited write; a source past its rate is answered 429 with
//! `Retry-After` before any of that. GCRA (governor), keyed by the peer's address: an IPv4
//! address, or the /64 of an IPv6 one (a single host usually holds a whole /64).

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

use super::ApiError;

/// Sources are forgotten (their buckets full again) after this many checks.
const SWEEP_EVERY: u64 = 4096;

/// The limiter of one process.
pub struct SourceLimit {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    checks: AtomicU64,
}

impl std::fmt::Debug for SourceLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceLimit")
            .field("sources", &self.limiter.len())
            .finish()
    }
}

impl SourceLimit {
    /// `per_second` requests a second per source, bursts of `burst`; `None` when
    /// `per_second` is 0 (no limit).
    pub fn new(per_second: u32, burst: u32) -> Option<Arc<SourceLimit>> {
        let rate = NonZeroU32::new(per_second)?;
        let burst = NonZeroU32::new(burst).unwrap_or(rate);
        Some(Arc::new(SourceLimit {
            limiter: DefaultKeyedRateLimiter::dashmap(Quota::per_second(rate).allow_burst(burst)),
            checks: AtomicU64::new(0),
        }))
    }

    /// `Ok` if `ip` may make a request now, else how long until it may.
    pub fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        if self.checks.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            self.limiter.retain_recent();
            self.limiter.shrink_to_fit();
        }
        self.limiter
            .check_key(&source(ip))
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }
}

/// The key of a peer address: IPv4 as it is (also when mapped into IPv6), IPv6 by its /64.
fn source(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(v6.to_bits() & !((1u128 << 64) - 1))),
        },
    }
}

/// Middleware: 429 `rate-limited` with `Retry-After` for a source past its rate.
pub async fn limit(State(l): State<Arc<SourceLimit>>, req: Request, next: Next) -> Response {
    if let Some(ConnectInfo(peer)) = req.extensions().get::<ConnectInfo<SocketAddr>>()
        && let Err(wait) = l.check(peer.ip())
    {
        metrics::counter!("keygate_rate_limited_total").increment(1);
        return ApiError::TooManyRequests(wait.as_secs_f64().ceil().max(1.0) as u64).into_response();
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_gets_its_burst_then_waits_and_others_are_not_affected() {
        let l = SourceLimit::new(1, 3).unwrap();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..3 {
            assert!(l.check(a).is_ok());
        }
        let wait = l.check(a).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        assert!(l.check("192.0.2.2".parse().unwrap()).is_ok());
        assert!(SourceLimit::new(0, 10).is_none());
    }

    #[test]
    fn ipv6_sources_are_their_64_and_mapped_ipv4_is_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(source(a), source(b));
        assert_ne!(source(a), source(c));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(source(mapped), "192.0.2.7".parse::<IpAddr>().unwrap());
    }
}
