//! Dedicated signing threads: one per backend session, fed by one queue.
//!
//! A signature on a fresh `spawn_blocking` thread costs a thread hand-off before and after
//! the device call, and with one session the device sits idle during each hand-off. Here N
//! long-lived threads take jobs from a shared queue: while work is queued a thread signs
//! back to back without sleeping. A caller waits at most `wait` (the backend's acquire
//! timeout) for its result and then gets [`KeyError::Busy`] (a 503); a job still queued at
//! its deadline is dropped unrun, so a stalled device does not build up a backlog.

use std::time::{Duration, Instant};

use super::KeyError;

struct Job {
    deadline: Instant,
    run: Box<dyn FnOnce() + Send>,
}

/// A pool of named signing threads. Dropping it lets the threads finish their queue and exit.
pub struct SignQueue {
    tx: flume::Sender<Job>,
    wait: Duration,
}

impl std::fmt::Debug for SignQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignQueue")
            .field("queued", &self.tx.len())
            .field("wait", &self.wait)
            .finish()
    }
}

impl SignQueue {
    /// Starts `threads` signing threads (at least one).
    pub fn start(threads: usize, wait: Duration) -> Result<SignQueue, KeyError> {
        let (tx, rx) = flume::unbounded::<Job>();
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("keygate-sign-{i}"))
                .spawn(move || {
                    while let Ok(job) = rx.recv() {
                        if Instant::now() <= job.deadline {
                            (job.run)();
                        }
                    }
                })
                .map_err(|e| KeyError::Config(format!("cannot start a signing thread: {e}")))?;
        }
        Ok(SignQueue { tx, wait })
    }

    /// Runs `f` on a signing thread and returns its result, or [`KeyError::Busy`] when it
    /// has not finished within the wait.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, KeyError> {
        let busy = || KeyError::Busy(self.wait.as_millis() as u64);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job = Job {
            deadline: Instant::now() + self.wait,
            run: Box::new(move || {
                let _ = tx.send(f());
            }),
        };
        self.tx.send(job).map_err(|_| busy())?;
        match tokio::time::timeout(self.wait, rx).await {
            Ok(Ok(v)) => Ok(v),
            _ => Err(busy()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_jobs_and_times_out_when_stalled() {
        let q = SignQueue::start(1, Duration::from_millis(200)).unwrap();
        assert_eq!(q.run(|| 41 + 1).await.unwrap(), 42);
        // A job that stalls the only thread: it and the one queued behind it come back Busy
        // within the wait; the queued one is never run.
        let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let r2 = ran.clone();
        let started = Instant::now();
        let (a, b) = tokio::join!(
            q.run(|| std::thread::sleep(Duration::from_millis(400))),
            q.run(move || r2.store(true, std::sync::atomic::Ordering::SeqCst))
        );
        assert!(matches!(a, Err(KeyError::Busy(200))) && matches!(b, Err(KeyError::Busy(200))));
        assert!(started.elapsed() < Duration::from_millis(350));
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            !ran.load(std::sync::atomic::Ordering::SeqCst),
            "a job past its deadline ran"
        );
        assert_eq!(q.run(|| 7).await.unwrap(), 7, "the queue works again");
    }
}
