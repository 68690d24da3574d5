//! Revocation: the revoke operation, the signed list, and the live event feed behind the
//! Server-Sent Events stream.
//!
//! One feed task per process reads new revocations from the store and broadcasts them in
//! `seq` order. It is woken by the store's change announcements ([`Change::Revoked`]): from
//! this process's writer at once, and from every other replica through PostgreSQL
//! LISTEN/NOTIFY, so no replica waits for a poll. It also looks every 30 s, a safety net
//! for an announcement that was lost. `seq` is assigned in commit order on both databases, so reading
//! "everything after the last seq seen" never skips one. A subscriber subscribes first and
//! reads its backlog from the store second, so nothing committed can fall between the two;
//! duplicates are dropped by `seq`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::Stream;
use serde::Serialize;
use tokio::sync::{broadcast, watch};

use super::{Authority, AuthorityError, Principal, now};
use crate::audit::AuditRecord;
use crate::store::{Change, Store, WriteOp};

/// One revocation as the stream sends it (`data:` of an `event: revoked`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RevocationEvent {
    pub jti: String,
    pub exp: i64,
    pub seq: i64,
    pub revoked_at: i64,
    /// The reason given, or `machine revoked`; absent when none was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl From<crate::store::RevocationRow> for RevocationEvent {
    fn from(r: crate::store::RevocationRow) -> Self {
        RevocationEvent {
            jti: r.jti,
            exp: r.exp,
            seq: r.seq,
            revoked_at: r.revoked_at,
            reason: r.reason,
        }
    }
}

/// A revocation reason: at most 256 printable bytes.
pub(super) fn check_reason(reason: Option<&str>) -> Result<(), AuthorityError> {
    if let Some(r) = reason
        && (r.len() > 256 || r.chars().any(char::is_control))
    {
        return Err(AuthorityError::BadRequest(
            "reason must be at most 256 printable bytes".into(),
        ));
    }
    Ok(())
}

/// How often the feed looks for revocations even when none was announced (a safety net:
/// every commit is announced, and a listener that reconnects sends a resync).
const POLL: Duration = Duration::from_secs(30);
/// Events a slow subscriber may fall behind before it re-reads from the store.
const CAPACITY: usize = 1024;

pub(crate) struct Feed {
    store: Store,
    tx: broadcast::Sender<RevocationEvent>,
    /// Newest seq broadcast.
    last: AtomicI64,
    /// Set at shutdown: open streams end.
    closed: watch::Sender<bool>,
}

impl Feed {
    /// Starts the feed task; it stops when the feed is dropped.
    pub(crate) async fn start(store: Store) -> Result<Arc<Feed>, AuthorityError> {
        // Subscribe before reading where to start, so nothing falls in between.
        let changes = store.changes();
        let last = store.revocation_seq().await?;
        let feed = Arc::new(Feed {
            store,
            tx: broadcast::channel(CAPACITY).0,
            last: AtomicI64::new(last),
            closed: watch::channel(false).0,
        });
        tokio::spawn(run(Arc::downgrade(&feed), changes));
        Ok(feed)
    }
}

async fn run(feed: Weak<Feed>, mut changes: broadcast::Receiver<Change>) {
    // A fixed beat, not restarted by other announcements, so the safety poll happens.
    let mut poll = tokio::time::interval(POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Waits without holding the feed, so dropping the authority ends this task.
        tokio::select! {
            c = changes.recv() => match c {
                // Changes that are not about revocations.
                Ok(Change::Keys | Change::ApiTokenDeleted(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return,
                // A revocation, a resync, or missed announcements: look.
                _ => {}
            },
            _ = poll.tick() => {}
        }
        let Some(f) = feed.upgrade() else { return };
        let after = f.last.load(Ordering::Acquire);
        match f.store.revocations(after, now()).await {
            Ok(rows) => {
                for row in rows {
                    f.last.store(row.seq, Ordering::Release);
                    // No subscriber is not an error.
                    let _ = f.tx.send(RevocationEvent::from(row));
                }
            }
            Err(e) => tracing::warn!(error = %e, "revocation feed cannot read the store"),
        }
    }
}

/// State of one subscriber's stream.
struct Sub {
    store: Store,
    rx: broadcast::Receiver<RevocationEvent>,
    closed: watch::Receiver<bool>,
    buf: VecDeque<RevocationEvent>,
    last: i64,
}

impl Sub {
    async fn refill_from_store(&mut self) -> bool {
        match self.store.revocations(self.last, now()).await {
            Ok(rows) => {
                self.buf.extend(rows.into_iter().map(RevocationEvent::from));
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "revocation stream cannot read the store");
                false
            }
        }
    }

    async fn next(&mut self) -> Option<RevocationEvent> {
        loop {
            if let Some(ev) = self.buf.pop_front() {
                if ev.seq > self.last {
                    self.last = ev.seq;
                    return Some(ev);
                }
                continue;
            }
            if *self.closed.borrow() {
                return None;
            }
            tokio::select! {
                r = self.rx.recv() => match r {
                    Ok(ev) => self.buf.push_back(ev),
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        if !self.refill_from_store().await {
                            return None;
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
                _ = self.closed.changed() => return None,
            }
        }
    }
}

impl Authority {
    /// Revokes an issued token (idempotent: a second call answers the first revocation's
    /// time). Unknown tokens are [`AuthorityError::NotFound`] and leave no audit entry.
    pub async fn revoke(
        &self,
        who: &Principal,
        jti: &str,
        reason: Option<String>,
        remote: &str,
    ) -> Result<i64, AuthorityError> {
        check_reason(reason.as_deref())?;
        if jti.is_empty() || jti.len() > 64 {
            return Err(AuthorityError::NotFound(format!("token {jti}")));
        }
        let at = now();
        let op = WriteOp::Revoke {
            jti: jti.to_owned(),
            at,
            reason,
        };
        let affected = self
            .store
            .write(
                vec![op],
                AuditRecord::new(&who.id, "token.revoke", jti, "success", remote),
            )
            .await?;
        if affected.first().copied().unwrap_or(0) == 0 {
            let earlier = self
                .store
                .issued_token(jti)
                .await?
                .and_then(|(_, s)| s.revoked_at);
            return earlier.ok_or_else(|| AuthorityError::NotFound(format!("token {jti}")));
        }
        metrics::counter!("keygate_tokens_revoked_total").increment(1);
        self.crl_cache.clear();
        Ok(at)
    }

    /// The signed revocation list: unexpired revocations with `seq > after`.
    pub async fn revocation_list(&self, after: i64) -> Result<String, AuthorityError> {
        if after < 0 {
            return Err(AuthorityError::BadRequest("after must not be negative".into()));
        }
        let now = now();
        let seq = self.store.revocation_seq().await?;
        let revoked = self
            .store
            .revocations(after, now)
            .await?
            .into_iter()
            .map(|r| crate::token::Revoked {
                jti: r.jti,
                exp: r.exp,
                revoked_at: r.revoked_at,
                reason: r.reason,
            })
            .collect();
        let next_update = now + self.settings.revocation_list_ttl;
        let list = crate::token::RevocationList {
            iss: self.settings.issuer.clone(),
            iat: now,
            next_update,
            exp: next_update,
            seq,
            revoked,
        };
        let payload = serde_json::to_vec(&list).map_err(|e| AuthorityError::Internal(e.to_string()))?;
        self.sign_compact(&self.key_ring().active, crate::token::TYP_REVOCATIONS, &payload)
            .await
    }

    /// Every unexpired revocation with `seq > after`, then each new one as it is committed,
    /// in `seq` order and without a gap. Ends at shutdown ([`Authority::close_streams`]).
    pub async fn revocation_events(
        &self,
        after: i64,
    ) -> Result<impl Stream<Item = RevocationEvent> + Send + 'static, AuthorityError> {
        if after < 0 {
            return Err(AuthorityError::BadRequest(
                "Last-Event-ID must not be negative".into(),
            ));
        }
        let mut sub = Sub {
            store: self.store.clone(),
            rx: self.feed.tx.subscribe(),
            closed: self.feed.closed.subscribe(),
            buf: VecDeque::new(),
            last: after,
        };
        if !sub.refill_from_store().await {
            return Err(AuthorityError::Store(crate::store::StoreError::Unavailable(
                "cannot read revocations".into(),
            )));
        }
        Ok(futures_util::stream::unfold(sub, |mut s| async move {
            s.next().await.map(|ev| (ev, s))
        }))
    }

    /// Ends every open revocation stream (graceful shutdown would wait for them forever).
    pub fn close_streams(&self) {
        self.feed.closed.send_replace(true);
    }
}
