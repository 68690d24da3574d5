//! The periodic work of `keygate serve`, each task on exactly one replica at a time.
//!
//! - **Rotation** of a device's keys (`rotation:<device>`): the lease holder runs the
//!   schedule; every other replica of the device only reloads its key ring when keys
//!   changed. Replicas that share a PKCS#11 token share one lease; each TPM has its own.
//! - **Audit** (`audit`): the lease holder signs checkpoints of the chain and prunes
//!   forgotten DPoP proof ids and expired enrollment challenges.
//! - **Key changes** announced by the store (another replica rotated) reload the ring at once,
//!   on every replica.
//!
//! Leases are tried or checked every `check_every_ms` (at most every second), so when the
//! holder dies another replica takes over within about a second of the database freeing the
//! lock (at once after a crash or SIGKILL: the connection closes).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::authority::Authority;
use crate::config::Config;
use crate::store::{Change, Lease};

/// The longest a rotation step may take (key generation included) before its lease is
/// given up.
const SCHEDULE_LIMIT: Duration = Duration::from_secs(120);

/// The running tasks; aborted at shutdown.
pub struct Periodic(Vec<tokio::task::JoinHandle<()>>);

impl Periodic {
    pub fn abort(&self) {
        for h in &self.0 {
            h.abort();
        }
    }
}

/// Starts the periodic tasks of `authority`.
pub fn start(authority: Arc<Authority>, config: &Config) -> Periodic {
    let check = Duration::from_millis(config.rotation.check_every_ms);
    let lease_every = check.min(Duration::from_secs(1));
    let checkpoint_every = Duration::from_secs(config.audit.checkpoint_every_seconds.max(1));
    Periodic(vec![
        tokio::spawn(rotation(authority.clone(), check, lease_every)),
        tokio::spawn(audit(authority.clone(), checkpoint_every, lease_every)),
        tokio::spawn(refusal_summaries(authority.clone())),
        tokio::spawn(health(authority.clone())),
        tokio::spawn(store_changes(authority)),
    ])
}

/// Summaries of repeated refusals (`authority/refusals.rs`) and of repeated failure lines
/// (`api/throttle.rs`), on every replica for its own.
async fn refusal_summaries(authority: Arc<Authority>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // first: it writes nothing to the store, and the refusals' writes can wait for a
        // store that is down, which is when these lines matter
        crate::api::flush_failure_lines(false);
        authority.flush_refusals(false).await;
    }
}

/// How often the readiness and audit gauges are refreshed.
const HEALTH_EVERY: Duration = Duration::from_secs(15);

/// Gauges alerts read without anyone polling `/readyz`: whether the key backend signs and
/// the store answers (each within 2 s), when the newest audit entry and signed checkpoint
/// were made, and when the schedule replaces this device's active key. Every replica, for
/// itself.
async fn health(authority: Arc<Authority>) {
    let limit = Duration::from_secs(2);
    let mut tick = tokio::time::interval(HEALTH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let up = |r: Result<Result<(), _>, _>| if matches!(r, Ok(Ok(()))) { 1.0 } else { 0.0 };
        let backend = tokio::time::timeout(limit, authority.probe_backend()).await;
        metrics::gauge!("keygate_backend_ready").set(up(backend));
        let store = tokio::time::timeout(limit, authority.probe_store()).await;
        metrics::gauge!("keygate_store_ready").set(up(store));
        if let Ok(Ok((entry, checkpoint))) =
            tokio::time::timeout(limit, authority.store().audit_times()).await
        {
            metrics::gauge!("keygate_audit_last_entry_timestamp_seconds").set(entry.unwrap_or(0) as f64);
            metrics::gauge!("keygate_audit_last_checkpoint_timestamp_seconds")
                .set(checkpoint.unwrap_or(0) as f64);
        }
        // a replaced key keeps its old, earlier value: alerts take the max
        if let Ok(Ok(Some((kid, at)))) = tokio::time::timeout(limit, authority.scheduled_retirement()).await {
            metrics::gauge!("keygate_key_retire_timestamp_seconds", "kid" => kid).set(at as f64);
        }
    }
}

/// A lease and what this process last knew of it, for logs and the `keygate_leader` gauge.
struct Leader {
    task: &'static str,
    lease: Lease,
    held: bool,
}

impl Leader {
    fn new(authority: &Authority, task: &'static str, name: &str) -> Leader {
        metrics::gauge!("keygate_leader", "task" => task).set(0.0);
        Leader {
            task,
            lease: authority.store().lease(name),
            held: false,
        }
    }

    /// True when this process holds the lease now.
    async fn check(&mut self) -> bool {
        let held = self.lease.hold().await;
        if held != self.held {
            if held {
                tracing::info!(task = self.task, "this replica now runs the periodic task");
            } else {
                tracing::warn!(task = self.task, "this replica no longer runs the periodic task");
            }
            metrics::gauge!("keygate_leader", "task" => self.task).set(if held { 1.0 } else { 0.0 });
            self.held = held;
        }
        held
    }
}

/// The key-rotation schedule on the lease holder of this device; a key-ring refresh
/// everywhere else.
async fn rotation(authority: Arc<Authority>, every: Duration, lease_every: Duration) {
    let name = format!("rotation:{}", authority.device());
    let mut leader = Leader::new(&authority, "rotation", &name);
    let mut tick = tokio::time::interval(lease_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_run = Instant::now();
    // After a failure (a full TPM, an unreachable HSM), wait longer before the next try, up
    // to 5 minutes, rather than asking the device again every tick.
    let mut backoff = Duration::ZERO;
    loop {
        tick.tick().await;
        // Every replica, leader or not, in backoff or not: keys changed elsewhere (an
        // announcement may have been missed) are put in force within this interval.
        if let Err(e) = authority.refresh_keys().await {
            tracing::warn!(error = %e, "cannot refresh the signing keys");
        }
        if !leader.check().await || Instant::now() < next_run {
            continue;
        }
        // A device call that hangs (key generation has no timeout of its own) must not stop
        // rotation everywhere: give the lease up so another replica of the device can try.
        match tokio::time::timeout(SCHEDULE_LIMIT, authority.schedule_tick()).await {
            Ok(Ok(())) => {
                backoff = Duration::ZERO;
                next_run = Instant::now() + every;
            }
            Ok(Err(e)) => {
                backoff = (backoff * 2).clamp(Duration::from_secs(5), Duration::from_secs(300));
                tracing::warn!(error = %e, retry_in_s = backoff.as_secs(), "key rotation step failed");
                next_run = Instant::now() + backoff;
            }
            Err(_) => {
                tracing::error!(
                    limit_s = SCHEDULE_LIMIT.as_secs(),
                    "a key rotation step hung; giving its lease up"
                );
                leader = Leader::new(&authority, "rotation", &name);
                backoff = Duration::from_secs(300);
                next_run = Instant::now() + backoff;
            }
        }
    }
}

/// Signed checkpoints of the audit chain, and pruning, on the lease holder.
async fn audit(authority: Arc<Authority>, every: Duration, lease_every: Duration) {
    let mut leader = Leader::new(&authority, "audit", "audit");
    let mut tick = tokio::time::interval(lease_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first checkpoint as soon as the lease is held (at start, or on taking over from a
    // replica that died): whatever the chain gained since the last one, a crash included.
    let mut next_checkpoint: Option<Instant> = None;
    let mut next_prune = Instant::now() + Duration::from_secs(60);
    loop {
        tick.tick().await;
        if !leader.check().await {
            next_checkpoint = None;
            continue;
        }
        let now = Instant::now();
        if next_checkpoint.is_none_or(|at| now >= at) {
            next_checkpoint = Some(now + every);
            if let Err(e) = authority.checkpoint_audit().await {
                tracing::warn!(error = %e, "cannot sign an audit checkpoint");
            }
        }
        if now >= next_prune {
            next_prune = now + Duration::from_secs(60);
            let t = crate::authority::now();
            if let Err(e) = authority.store().prune_dpop_proofs(t).await {
                tracing::warn!(error = %e, "cannot prune DPoP proof ids");
            }
            // Expired challenges that issued nothing; kept an hour for the curious operator.
            if let Err(e) = authority.store().prune_enrollments(t - 3600).await {
                tracing::warn!(error = %e, "cannot prune expired enrollment challenges");
            }
            // A checkpoint a second under steady traffic; an hour on, one an hour is kept.
            if let Err(e) = authority.store().thin_checkpoints(t - 3600).await {
                tracing::warn!(error = %e, "cannot thin out old audit checkpoints");
            }
        }
    }
}

/// Acts on what the store announces, on every replica: reloads the key ring on a key change
/// and drops a deleted API token from the cache at once (sooner than its lease); after
/// announcements may have been missed, does both for everything.
async fn store_changes(authority: Arc<Authority>) {
    use tokio::sync::broadcast::error::RecvError;
    let mut changes = authority.store().changes();
    loop {
        match changes.recv().await {
            Ok(Change::ApiTokenDeleted(id)) => authority.forget_api_tokens(Some(&id)),
            Ok(Change::Keys) => reload_keys(&authority).await,
            Ok(Change::Resync) | Err(RecvError::Lagged(_)) => {
                authority.forget_api_tokens(None);
                reload_keys(&authority).await;
            }
            Ok(Change::Revoked) => {}
            Err(RecvError::Closed) => return,
        }
    }
}

async fn reload_keys(authority: &Authority) {
    if let Err(e) = authority.refresh_keys().await {
        tracing::warn!(error = %e, "cannot reload the signing keys after a change");
    }
}
