//! The writer's `store commit failed` lines. While the database is down or unreachable
//! every batch fails, the same way, and under load that is hundreds of batches a second:
//! one ERROR line each would flood the log exactly when an operator reads it. So a failure
//! is written the first time its text is seen in a window of 10 s; the batches that fail
//! the same way after it are counted, and one more line says how many (`repeated`, with
//! the writes they held) when the window ends with another failure, or at the first batch
//! that commits again. A failure with another text is written at once. Every caller of a
//! failed batch still gets its 503 (counted in `keygate_requests_failed_total`).

use std::time::{Duration, Instant};

use super::StoreError;

/// How long the repeats of one failure are counted before their summary line.
const WINDOW: Duration = Duration::from_secs(10);

/// A failure written, and what has failed the same way since.
struct Open {
    text: String,
    since: Instant,
    repeated: u64,
    writes: u64,
}

/// The summary of the batches that failed like the one written before them.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Repeated {
    pub(super) text: String,
    pub(super) batches: u64,
    pub(super) writes: u64,
    pub(super) secs: u64,
}

/// What the writer has written about its failed commits.
#[derive(Default)]
pub(super) struct CommitFailures {
    open: Option<Open>,
}

impl CommitFailures {
    /// A batch of `writes` failed with `e`: writes the failure when it is new (another text,
    /// or its window ended), after the summary of the window before; counts it otherwise.
    pub(super) fn failed(&mut self, e: &StoreError, writes: usize) {
        let (summary, new) = self.note(e.to_string(), writes as u64, Instant::now());
        if let Some(r) = summary {
            log(&r);
        }
        if new {
            tracing::error!(error = %e, writes, "store commit failed");
        }
    }

    /// A batch committed: the summary of the failures counted since the last line, if any.
    pub(super) fn committed(&mut self) {
        if self.open.is_some()
            && let Some(r) = self.close(Instant::now())
        {
            log(&r);
        }
    }

    /// (the summary to write first, whether to write this failure)
    fn note(&mut self, text: String, writes: u64, now: Instant) -> (Option<Repeated>, bool) {
        if let Some(o) = &mut self.open
            && o.text == text
            && now.duration_since(o.since) < WINDOW
        {
            o.repeated += 1;
            o.writes += writes;
            return (None, false);
        }
        let summary = self.close(now);
        self.open = Some(Open {
            text,
            since: now,
            repeated: 0,
            writes: 0,
        });
        (summary, true)
    }

    fn close(&mut self, now: Instant) -> Option<Repeated> {
        let o = self.open.take()?;
        (o.repeated > 0).then(|| Repeated {
            text: o.text,
            batches: o.repeated,
            writes: o.writes,
            secs: now.duration_since(o.since).as_secs().max(1),
        })
    }
}

fn log(r: &Repeated) {
    tracing::error!(
        error = %r.text,
        repeated = r.batches,
        writes = r.writes,
        seconds = r.secs,
        "store commit failed"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_failure_is_written_once_a_window_and_summed_up_after() {
        let mut f = CommitFailures::default();
        let t0 = Instant::now();
        let down = || "store unavailable: connection refused".to_owned();
        assert_eq!(f.note(down(), 3, t0), (None, true), "the first is written");
        for i in 1..=4 {
            let at = t0 + Duration::from_millis(i * 100);
            assert_eq!(f.note(down(), 2, at), (None, false), "a repeat is counted");
        }
        // another failure: the repeats are summed up first, and it is written at once
        let (summary, new) = f.note(
            "store unavailable: disk full".into(),
            1,
            t0 + Duration::from_secs(1),
        );
        assert!(new);
        assert_eq!(
            summary,
            Some(Repeated {
                text: down(),
                batches: 4,
                writes: 8,
                secs: 1
            })
        );
        // the same failure after its window: written again; a window without repeats has
        // no summary
        assert_eq!(
            f.note(
                "store unavailable: disk full".into(),
                1,
                t0 + Duration::from_secs(12)
            ),
            (None, true)
        );
        f.note(
            "store unavailable: disk full".into(),
            5,
            t0 + Duration::from_secs(13),
        );
        // a commit that succeeds ends the window with its summary, and the next failure
        // is written
        let summary = f.close(t0 + Duration::from_secs(15)).unwrap();
        assert_eq!((summary.batches, summary.writes, summary.secs), (1, 5, 3));
        assert!(f.close(t0 + Duration::from_secs(16)).is_none());
        assert_eq!(f.note(down(), 1, t0 + Duration::from_secs(17)), (None, true));
    }
}
