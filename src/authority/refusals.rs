//! Audited refusals of requests that carried no valid credential, aggregated.
//!
//! Anyone can send a junk bearer token, a forged provisioning token or a made-up
//! enrollment, and each refusal is worth an audit entry. One entry per request would let
//! anyone grow the log at the rate they can send. So within a window (`[audit]
//! refusal_window_seconds`, 10 s) the first refusal of each kind (same actor, action,
//! target, outcome and source) is written at once, as before; repeats are counted, and
//! when the window ends one summary entry per kind says how many more there were. Past
//! [`MAX_KINDS`] kinds in a window, further kinds are counted together in one entry.
//! Writes are thus at most `2 × MAX_KINDS + 1` per window and replica, whatever the rate.
//!
//! Refusals of a verified identity (a redemption by a token that keygate signed, a
//! principal without the scope) are not aggregated: every one of those stays an entry.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::audit::AuditRecord;

/// Distinct kinds of refusal written at once per window.
pub const MAX_KINDS: usize = 64;

type Kind = (String, String, String, String, String);

struct Window {
    started: Instant,
    /// Kind → refusals after the first (written at once) in this window.
    seen: HashMap<Kind, u64>,
    /// Refusals of kinds past `MAX_KINDS`.
    overflow: u64,
}

/// The aggregation state of one process.
pub struct Refusals {
    window: Duration,
    inner: Mutex<Window>,
}

/// True when `actor` is not a verified identity: nobody (`anonymous`), or only what an
/// enrolling machine claims (`tpm:ek:<hash>`: a refused enrollment proved nothing).
pub fn unverified(actor: &str) -> bool {
    actor == "anonymous" || actor.starts_with("tpm:ek:")
}

impl Refusals {
    pub fn new(window: Duration) -> Refusals {
        Refusals {
            window: window.max(Duration::from_secs(1)),
            inner: Mutex::new(Window {
                started: Instant::now(),
                seen: HashMap::new(),
                overflow: 0,
            }),
        }
    }

    /// Whether `rec` is to be written now (the first of its kind in the window); repeats
    /// and kinds past the cap are counted for [`Refusals::take_summaries`].
    pub fn admit(&self, rec: &AuditRecord) -> bool {
        let Ok(mut w) = self.inner.lock() else {
            return true;
        };
        let kind = (
            rec.actor.clone(),
            rec.action.clone(),
            rec.target.clone(),
            rec.outcome.clone(),
            rec.remote_addr.clone(),
        );
        if let Some(n) = w.seen.get_mut(&kind) {
            *n += 1;
            return false;
        }
        if w.seen.len() >= MAX_KINDS {
            w.overflow += 1;
            return false;
        }
        w.seen.insert(kind, 0);
        true
    }

    /// When the window has ended (or `force`): the summary entries of its repeats, and a
    /// new window. Empty otherwise.
    pub fn take_summaries(&self, force: bool) -> Vec<AuditRecord> {
        let Ok(mut w) = self.inner.lock() else {
            return Vec::new();
        };
        if !force && w.started.elapsed() < self.window {
            return Vec::new();
        }
        let secs = w.started.elapsed().as_secs().max(1);
        let seen = std::mem::take(&mut w.seen);
        let overflow = std::mem::take(&mut w.overflow);
        w.started = Instant::now();
        drop(w);
        let mut out: Vec<AuditRecord> = seen
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|((actor, action, target, outcome, remote), n)| {
                AuditRecord::new(
                    &actor,
                    &action,
                    &target,
                    &format!("{outcome} (and {n} more times in the last {secs} s)"),
                    &remote,
                )
            })
            .collect();
        if overflow > 0 {
            out.push(AuditRecord::new(
                "anonymous",
                "refusals",
                "*",
                &format!("denied: {overflow} more refusals of other kinds in the last {secs} s"),
                "*",
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(outcome: &str) -> AuditRecord {
        AuditRecord::new("anonymous", "auth", "api_token", outcome, "192.0.2.1")
    }

    #[test]
    fn the_first_of_a_kind_is_written_and_repeats_are_summed() {
        let r = Refusals::new(Duration::from_secs(3600));
        assert!(r.admit(&rec("denied: invalid token")));
        for _ in 0..999 {
            assert!(!r.admit(&rec("denied: invalid token")));
        }
        assert!(r.admit(&rec("denied: token expired")));
        assert!(r.take_summaries(false).is_empty(), "the window has not ended");
        let s = r.take_summaries(true);
        assert_eq!(s.len(), 1);
        assert!(
            s[0].outcome
                .starts_with("denied: invalid token (and 999 more times in the last")
        );
        // a new window: the first of a kind is written again
        assert!(r.admit(&rec("denied: invalid token")));
    }

    #[test]
    fn kinds_past_the_cap_are_counted_together() {
        let r = Refusals::new(Duration::from_secs(3600));
        let written = (0..1000)
            .filter(|i| r.admit(&rec(&format!("denied: {i}"))))
            .count();
        assert_eq!(written, MAX_KINDS);
        let s = r.take_summaries(true);
        assert_eq!(s.len(), 1);
        assert_eq!(
            s[0].outcome,
            format!(
                "denied: {} more refusals of other kinds in the last 1 s",
                1000 - MAX_KINDS
            )
        );
        assert!(unverified("anonymous") && unverified("tpm:ek:abc") && !unverified("sub:node-1"));
    }
}
