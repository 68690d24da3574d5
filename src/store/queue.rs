//! Writes queued from any thread, and writes announced before they exist.
//!
//! Issuance signs on a signing thread and hands the token straight to the writer
//! ([`WriteQueue::submit`]). Before the signature starts, the request announces the write
//! that will follow it ([`WriteQueue::announce`]). The writer uses the count of announced
//! writes to decide how long to keep a batch open: while signatures are under way, their
//! writes are a fraction of a millisecond away, and one commit for all of them costs one
//! `fsync` (and one round of statements) instead of several. With nothing announced (one
//! client, or any write that is not an issuance) a batch commits at once; otherwise a write
//! waits at most the hold (docs/benchmarks-server-cpu.md, "Holding a batch open").

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc, oneshot};

use super::writer::{Job, MAX_BATCH};
use super::{StoreError, WriteOp, WriteResult};
use crate::audit::AuditRecord;

/// How long a batch is held open, at most, for writes announced and not yet queued.
/// About a dozen signatures of SoftHSM2 on one core; a fraction of one on a TPM, whose
/// writes then wait for the next batch. Tokio's timer rounds it up to its 1 ms tick.
pub const HOLD: Duration = Duration::from_millis(1);

/// A held batch is committed once it has this many writes: the commit's fixed cost (its
/// `fsync`, its statements) is then shared thin, and holding longer would only keep more
/// requests waiting, which with a fixed number of clients idles the signing threads.
pub const HOLD_WRITES: usize = 16;

/// What the writer and the announcing threads share.
#[derive(Default)]
pub(super) struct Hold {
    /// Writes announced ([`WriteQueue::announce`]) and not yet queued or given up.
    coming: AtomicUsize,
    /// While the writer holds a batch open: how many queued writes it waits for (0: not
    /// holding). The thread whose write makes it enough wakes the writer, once; the writes
    /// before it queue without waking anybody.
    wanted: AtomicUsize,
    wake: Notify,
}

impl Hold {
    /// Wakes a holding writer when `queued` writes are enough, or when nothing more is
    /// announced.
    fn check(&self, queued: usize) {
        let wanted = self.wanted.load(Ordering::Acquire);
        if wanted > 0
            && (queued >= wanted || self.coming.load(Ordering::Acquire) == 0)
            && self.wanted.swap(0, Ordering::AcqRel) > 0
        {
            self.wake.notify_one();
        }
    }
}

/// Queues writes from any thread, without waiting ([`super::Store::write_queue`]).
#[derive(Clone)]
pub struct WriteQueue {
    pub(super) tx: mpsc::Sender<Job>,
    pub(super) hold: Arc<Hold>,
}

impl WriteQueue {
    /// Queues `ops` with `audit`; the outcome comes on `reply` (await it with
    /// [`super::Store::answer`]). A full queue (4096 writes waiting) answers
    /// [`StoreError::Unavailable`] at once rather than block the calling thread.
    pub fn submit(&self, ops: Vec<WriteOp>, audit: AuditRecord, reply: oneshot::Sender<WriteResult>) {
        if let Err(e) = self.tx.try_send(Job { ops, audit, reply }) {
            let (why, job) = match e {
                mpsc::error::TrySendError::Full(j) => ("the store's write queue is full", j),
                mpsc::error::TrySendError::Closed(j) => ("writer stopped", j),
            };
            let _ = job.reply.send(Err(StoreError::Unavailable(why.into())));
        }
    }

    /// Announces one write that will be submitted soon (its signature is queued). The
    /// writer holds a batch open, up to its hold, while announced writes are outstanding;
    /// the announcement ends when the write is submitted through it or it is dropped (the
    /// signature failed or was given up).
    pub fn announce(self) -> Announced {
        self.hold.coming.fetch_add(1, Ordering::AcqRel);
        Announced(Some(self))
    }

    /// Writes queued and not yet taken by the writer.
    fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}

/// A write announced and not yet submitted ([`WriteQueue::announce`]).
pub struct Announced(Option<WriteQueue>);

impl Announced {
    /// Submits the announced write ([`WriteQueue::submit`]). The announcement ends first, so
    /// a writer that sees the write never waits for it as one still to come.
    pub fn submit(mut self, ops: Vec<WriteOp>, audit: AuditRecord, reply: oneshot::Sender<WriteResult>) {
        if let Some(q) = self.0.take() {
            q.hold.coming.fetch_sub(1, Ordering::AcqRel);
            q.submit(ops, audit, reply);
            q.hold.check(q.queued());
        }
    }
}

impl Drop for Announced {
    fn drop(&mut self) {
        if let Some(q) = self.0.take() {
            q.hold.coming.fetch_sub(1, Ordering::AcqRel);
            q.hold.check(q.queued());
        }
    }
}

/// Fills `batch` (holding at least one job) with the writes that are ready, then, while
/// writes are announced, with those that arrive within `hold` of now, until it has
/// [`HOLD_WRITES`]. The writer sleeps meanwhile and is woken once, by the write that
/// completes the batch or by the last announced one.
pub(super) async fn gather(
    rx: &mut mpsc::Receiver<Job>,
    batch: &mut Vec<Job>,
    shared: &Hold,
    hold: Duration,
) {
    // Let the requests that are ready to write (their signatures done) queue up first: one
    // commit for all of them instead of one each. Costs no wait when nothing else is
    // runnable.
    if batch.len() < MAX_BATCH {
        tokio::task::yield_now().await;
        drain(rx, batch);
    }
    let until = Instant::now() + hold;
    while batch.len() < HOLD_WRITES && shared.coming.load(Ordering::Acquire) > 0 {
        let Some(left) = until
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
        else {
            break;
        };
        shared.wanted.store(HOLD_WRITES - batch.len(), Ordering::Release);
        // what arrived, or stopped being announced, before `wanted` was set
        shared.check(rx.len());
        let _ = tokio::time::timeout(left, shared.wake.notified()).await;
        shared.wanted.store(0, Ordering::Release);
        drain(rx, batch);
    }
}

/// Moves the jobs already queued into `batch`, up to [`MAX_BATCH`].
fn drain(rx: &mut mpsc::Receiver<Job>, batch: &mut Vec<Job>) {
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::oneshot;

    use super::super::{Store, StoreOptions, WriteResult};
    use crate::audit::AuditRecord;

    /// A store whose writer holds a batch for up to `hold`.
    async fn store(dir: &tempfile::TempDir, hold: Duration) -> Store {
        let url = format!("sqlite://{}", dir.path().join("k.db").display());
        let mut opts = StoreOptions::new(&url).unwrap();
        opts.batch_hold = hold;
        Store::open(&opts).await.unwrap()
    }

    fn record(n: usize) -> AuditRecord {
        AuditRecord::new("test", "test.write", &n.to_string(), "success", "local")
    }

    /// Waits for a reply, failing the test (not hanging it) past 5 s.
    async fn answered(rx: oneshot::Receiver<WriteResult>) {
        tokio::time::timeout(Duration::from_secs(5), rx)
            .await
            .expect("answered within 5 s")
            .unwrap()
            .unwrap();
    }

    /// Writes announced before they exist share one commit, however far apart they arrive
    /// within the hold; the batch is committed as soon as the last one is in, not at the
    /// end of the hold (here 60 s, which would fail the test's 5 s wait).
    #[tokio::test]
    async fn announced_writes_share_one_commit() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(&dir, Duration::from_secs(60)).await;
        let q = s.write_queue();
        let before = s.commits();
        let mut replies = Vec::new();
        let mut announced: Vec<_> = (0..3).map(|_| q.clone().announce()).collect();
        for n in 0..3 {
            let (tx, rx) = oneshot::channel();
            replies.push(rx);
            let e = announced.remove(0);
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(40 * n as u64));
                e.submit(Vec::new(), record(n), tx);
            });
        }
        for rx in replies {
            answered(rx).await;
        }
        assert_eq!(s.commits() - before, 1, "three announced writes, one commit");
        s.close().await;
    }

    /// With nothing announced, a write is committed at once (the 60 s hold never starts),
    /// and an announcement given up (its signature failed) ends the hold for the others.
    #[tokio::test]
    async fn a_lone_write_or_a_dropped_announcement_does_not_wait() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(&dir, Duration::from_secs(60)).await;
        tokio::time::timeout(Duration::from_secs(5), s.audit(record(0)))
            .await
            .expect("a lone write is not held")
            .unwrap();
        let q = s.write_queue();
        let (first, second) = (q.clone().announce(), q.announce());
        let (tx, rx) = oneshot::channel();
        first.submit(Vec::new(), record(1), tx);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            drop(second);
        });
        answered(rx).await;
        s.close().await;
    }
}
