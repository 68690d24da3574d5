//! Dedicated signing threads: one per backend session, fed by one queue.
//!
//! A signature on a fresh `spawn_blocking` thread costs a thread hand-off before and after
//! the device call, and with one session the device sits idle during each hand-off. Here N
//! long-lived threads take jobs from a shared queue: while work is queued a thread signs
//! back to back without sleeping. A caller waits at most `wait` (the backend's acquire
//! timeout) for its result and then gets [`KeyError::Busy`] (a 503); a job still queued at
//! its deadline is dropped unrun, so a stalled device does not build up a backlog.
//!
//! Load shedding: the queue keeps a moving average of how long a job takes. A new job that
//! would, by that average, wait longer than `wait` behind the jobs already queued is
//! refused at once with [`KeyError::Busy`] (a fast 503 with `Retry-After`) instead of
//! joining a queue it could only time out in. So under a burst the device stays busy,
//! admitted requests wait at most about `wait`, and the others learn it in microseconds.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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
    threads: u64,
    /// Moving average of one job's run time, in nanoseconds (0: none measured yet).
    job_ns: Arc<AtomicU64>,
}

/// Jobs queued at most, whatever the average says (memory bound).
const MAX_QUEUED: usize = 4096;

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
        let (tx, rx) = flume::bounded::<Job>(MAX_QUEUED);
        let job_ns = Arc::new(AtomicU64::new(0));
        for i in 0..threads.max(1) {
            let (rx, job_ns) = (rx.clone(), job_ns.clone());
            std::thread::Builder::new()
                .name(format!("keygate-sign-{i}"))
                .spawn(move || {
                    while let Ok(job) = rx.recv() {
                        if Instant::now() <= job.deadline {
                            let started = Instant::now();
                            (job.run)();
                            let took = started.elapsed().as_nanos().min(u64::MAX as u128) as u64;
                            // an eighth of the new sample: follows a slowing device in a few jobs
                            let old = job_ns.load(Ordering::Relaxed);
                            let avg = if old == 0 { took } else { old - old / 8 + took / 8 };
                            job_ns.store(avg, Ordering::Relaxed);
                        }
                    }
                })
                .map_err(|e| KeyError::Config(format!("cannot start a signing thread: {e}")))?;
        }
        Ok(SignQueue {
            tx,
            wait,
            threads: threads.max(1) as u64,
            job_ns,
        })
    }

    /// Runs `f` on a signing thread and returns its result, or [`KeyError::Busy`] when it
    /// has not finished within the wait.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, KeyError> {
        let busy = || KeyError::Busy(self.wait.as_millis() as u64);
        // queued jobs, one running on each thread, and this one; against 90% of the wait,
        // so that an admitted job is not refused by its own deadline on a jittery machine
        let ahead = self.tx.len() as u64 + self.threads + 1;
        let expected = Duration::from_nanos(ahead * self.job_ns.load(Ordering::Relaxed) / self.threads);
        // An empty queue always admits: the average must keep learning after a stall.
        if !self.tx.is_empty() && expected > self.wait.mul_f32(0.9) {
            metrics::counter!("keygate_backend_shed_total").increment(1);
            return Err(busy());
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job = Job {
            deadline: Instant::now() + self.wait,
            run: Box::new(move || {
                let _ = tx.send(f());
            }),
        };
        self.tx.try_send(job).map_err(|_| busy())?;
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

    #[tokio::test(flavor = "multi_thread")]
    async fn a_burst_past_what_the_wait_allows_is_refused_at_once_and_never_run() {
        // one thread, 20 ms a job, 200 ms of wait: about 10 jobs fit
        let q = std::sync::Arc::new(SignQueue::start(1, Duration::from_millis(200)).unwrap());
        q.run(|| std::thread::sleep(Duration::from_millis(20)))
            .await
            .unwrap();
        let ran = std::sync::Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..60 {
            let (q, ran) = (q.clone(), ran.clone());
            tasks.push(tokio::spawn(async move {
                q.run(move || {
                    std::thread::sleep(Duration::from_millis(20));
                    ran.fetch_add(1, Ordering::SeqCst);
                })
                .await
            }));
        }
        let mut ok = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(()) => ok += 1,
                Err(e) => assert!(matches!(e, KeyError::Busy(200))),
            }
        }
        std::thread::sleep(Duration::from_millis(300));
        // admitted jobs ran (within their wait); the others were refused, not queued to die
        assert!((5..=14).contains(&ok), "{ok} of 60 admitted");
        assert_eq!(
            ran.load(Ordering::SeqCst),
            ok,
            "a refused job ran, or an admitted one timed out"
        );
    }
}
