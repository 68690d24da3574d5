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
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::audit::AuditRecord;

/// Distinct kinds written at once per window (of refusals, and of the failure lines of
/// `api/throttle.rs`).
pub const MAX_KINDS: usize = 64;

/// The first of each kind in a window passes at once; repeats, and kinds past
/// [`MAX_KINDS`], are counted until the window ends. For refusals here and for the error
/// lines an outage would repeat on every request (`api/throttle.rs`).
pub struct Repeats<K> {
    window: Duration,
    inner: Mutex<Window<K>>,
}

struct Window<K> {
    started: Instant,
    /// Kind → how many after the first (which passed at once) in this window.
    seen: HashMap<K, u64>,
    /// Occurrences of kinds past `MAX_KINDS`.
    overflow: u64,
}

/// What a window that ended held: the kinds that repeated with their repeats, the
/// occurrences of kinds past the cap, and the window's length in whole seconds (at least 1).
pub struct Ended<K> {
    pub repeated: Vec<(K, u64)>,
    pub overflow: u64,
    pub secs: u64,
}

impl<K: Eq + Hash> Repeats<K> {
    /// Windows of `window` (at least 1 s).
    pub fn new(window: Duration) -> Repeats<K> {
        Repeats {
            window: window.max(Duration::from_secs(1)),
            inner: Mutex::new(Window {
                started: Instant::now(),
                seen: HashMap::new(),
                overflow: 0,
            }),
        }
    }

    /// True for the first of its kind in the window (to be written now); repeats and kinds
    /// past the cap are counted for [`Repeats::take`].
    pub fn admit(&self, kind: K) -> bool {
        let Ok(mut w) = self.inner.lock() else {
            return true;
        };
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

    /// How many repeats of `kind` this window has counted (None: not seen in it).
    #[cfg(test)]
    pub fn repeats_of(&self, kind: &K) -> Option<u64> {
        self.inner.lock().ok()?.seen.get(kind).copied()
    }

    /// When the window has ended (or `force`): what it held, and a new window.
    pub fn take(&self, force: bool) -> Option<Ended<K>> {
        let mut w = self.inner.lock().ok()?;
        if !force && w.started.elapsed() < self.window {
            return None;
        }
        let secs = w.started.elapsed().as_secs().max(1);
        let seen = std::mem::take(&mut w.seen);
        let overflow = std::mem::take(&mut w.overflow);
        w.started = Instant::now();
        drop(w);
        Some(Ended {
            repeated: seen.into_iter().filter(|(_, n)| *n > 0).collect(),
            overflow,
            secs,
        })
    }
}

type Kind = (String, String, String, String, String);

/// The aggregation state of one process.
pub struct Refusals(Repeats<Kind>);

/// True when `actor` is not a verified identity: nobody (`anonymous`), or only what an
/// enrolling machine claims (`tpm:ek:<hash>`: a refused enrollment proved nothing).
pub fn unverified(actor: &str) -> bool {
    actor == "anonymous" || actor.starts_with("tpm:ek:")
}

impl Refusals {
    pub fn new(window: Duration) -> Refusals {
        Refusals(Repeats::new(window))
    }

    /// Whether `rec` is to be written now (the first of its kind in the window); repeats
    /// and kinds past the cap are counted for [`Refusals::take_summaries`].
    pub fn admit(&self, rec: &AuditRecord) -> bool {
        self.0.admit((
            rec.actor.clone(),
            rec.action.clone(),
            rec.target.clone(),
            rec.outcome.clone(),
            rec.remote_addr.clone(),
        ))
    }

    /// When the window has ended (or `force`): the summary entries of its repeats, and a
    /// new window. Empty otherwise.
    pub fn take_summaries(&self, force: bool) -> Vec<AuditRecord> {
        let Some(Ended {
            repeated,
            overflow,
            secs,
        }) = self.0.take(force)
        else {
            return Vec::new();
        };
        let mut out: Vec<AuditRecord> = repeated
            .into_iter()
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
