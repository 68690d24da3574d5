//! Dedicated signing threads: one per backend session, fed by one queue.
//!
//! A signature on a fresh `spawn_blocking` thread costs a thread hand-off before and after
//! the device call, and with one session the device sits idle during each hand-off. Here N
//! long-lived threads take jobs from a shared queue: while work is queued a thread signs
//! back to back without sleeping. A caller waits at most `wait` (the backend's acquire
//! timeout) for its result and then gets [`KeyError::Busy`] (a 503); a job still queued at
//! its deadline is dropped unrun, so a stalled device does not build up a backlog.
//!
//! A job can also hand its result on instead of waking its caller ([`SignQueue::submit`]):
//! issuance signs on the signing thread and passes the token straight to the store's
//! writer, so the request task is woken once, after the commit, not once per hand-off. A
//! [`Ticket`] keeps the wait promise for such jobs: the caller gives up at the wait unless
//! the job has [`Handoff::finish`]ed by then, and a job given up on does not hand anything on.
//!
//! Load shedding: the queue keeps a moving average of how long a job takes. A new job that
//! would, by that average, wait longer than `wait` behind the jobs already queued is
//! refused at once with [`KeyError::Busy`] (a fast 503 with `Retry-After`) instead of
//! joining a queue it could only time out in. So under a burst the device stays busy,
//! admitted requests wait at most about `wait`, and the others learn it in microseconds.
//! A long device operation (a key proof) runs with a wait of its own
//! ([`SignQueue::run_long`]) and is left out of the average.

use std::future::Future;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use super::KeyError;

struct Job {
    deadline: Instant,
    state: Arc<Shared>,
    run: Box<dyn FnOnce(&Handoff) + Send>,
    /// Whether its run time teaches the moving average (a signature's does; a key proof's,
    /// seconds long and rare, would make the queue refuse signatures after it).
    sampled: bool,
}

/// A job's state and when its device work finished, shared by its signing thread and its
/// caller.
struct Shared {
    state: AtomicU8,
    finished_at: OnceLock<Instant>,
}

/// A job's state.
const QUEUED: u8 = 0;
const RUNNING: u8 = 1;
/// It finished its device work and may hand its result on.
const FINISHED: u8 = 2;
/// Its caller gave up (the wait passed): its result goes nowhere.
const ABANDONED: u8 = 3;

/// What a running job holds: the right to hand its result on.
pub struct Handoff {
    state: Arc<Shared>,
}

impl Handoff {
    /// Marks the device work done. True when the caller still waits: the job may now hand
    /// its result on, and the caller waits for it past the wait. False when the caller gave
    /// up: the result must be dropped.
    pub fn finish(&self) -> bool {
        // the time first: a caller that sees the job finished finds when
        let _ = self.state.finished_at.set(Instant::now());
        self.state
            .state
            .compare_exchange(RUNNING, FINISHED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

/// A queued job, seen from its caller.
#[must_use = "a ticket is how the caller learns that the wait passed"]
pub struct Ticket {
    state: Arc<Shared>,
    deadline: Instant,
    /// The wait, in milliseconds (for [`KeyError::Busy`]).
    wait_ms: u64,
}

impl Ticket {
    /// Waits for `answer`: to its end once the job has [`Handoff::finish`]ed, else at most
    /// until the wait passes, and then the job is given up ([`KeyError::Busy`]; a job not
    /// yet run never runs, a running one hands nothing on). A ticket dropped before (its
    /// request cancelled: the client left, or the request timed out) gives the job up too.
    pub async fn wait<T>(self, answer: impl Future<Output = T>) -> Result<T, KeyError> {
        let mut answer = std::pin::pin!(answer);
        match tokio::time::timeout_at(self.deadline.into(), &mut answer).await {
            Ok(v) => Ok(v),
            Err(_) => {
                if self.abandon() {
                    Err(KeyError::Busy(self.wait_ms))
                } else {
                    Ok(answer.await)
                }
            }
        }
    }

    /// When the job's device work finished, read at any time (None: not yet).
    pub fn finished(&self) -> Finished {
        Finished(self.state.clone())
    }

    /// Gives the job up unless it has finished; true when it was given up now.
    fn abandon(&self) -> bool {
        [QUEUED, RUNNING].into_iter().any(|from| {
            self.state
                .state
                .compare_exchange(from, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        })
    }
}

/// When a job finished its device work ([`Ticket::finished`]): a job that hands its result
/// on does so right after, so this is when the next stage got it.
pub struct Finished(Arc<Shared>);

impl Finished {
    /// None while the job is queued or in the device.
    pub fn at(&self) -> Option<Instant> {
        self.0.finished_at.get().copied()
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.abandon();
    }
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
                        let claimed = || {
                            job.state
                                .state
                                .compare_exchange(QUEUED, RUNNING, Ordering::AcqRel, Ordering::Acquire)
                                .is_ok()
                        };
                        if Instant::now() <= job.deadline && claimed() {
                            let started = Instant::now();
                            (job.run)(&Handoff {
                                state: job.state.clone(),
                            });
                            if !job.sampled {
                                continue;
                            }
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

    /// How long a caller waits for its job.
    pub fn wait(&self) -> Duration {
        self.wait
    }

    /// How long a caller waits for its job, in milliseconds.
    pub fn wait_ms(&self) -> u64 {
        self.wait.as_millis() as u64
    }

    /// Runs `f` on a signing thread and returns its result, or [`KeyError::Busy`] when it
    /// has not finished within the wait.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, KeyError> {
        self.run_within(self.wait, true, f).await
    }

    /// Runs a long device operation (a key proof: the TPM creates keys) that may take up to
    /// `wait`, rather than a signature's wait, and whose run time is left out of the average
    /// that load shedding uses. Signatures queued behind it wait for it like for any job.
    pub async fn run_long<T: Send + 'static>(
        &self,
        wait: Duration,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, KeyError> {
        self.run_within(wait, false, f).await
    }

    async fn run_within<T: Send + 'static>(
        &self,
        wait: Duration,
        sampled: bool,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, KeyError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let ticket = self.queue(
            Box::new(move |h: &Handoff| {
                let v = f();
                if h.finish() {
                    let _ = tx.send(v);
                }
            }),
            wait,
            sampled,
        )?;
        // a closed channel: the job was dropped unrun (the queue is shutting down)
        let wait_ms = ticket.wait_ms;
        ticket.wait(rx).await?.map_err(|_| KeyError::Busy(wait_ms))
    }

    /// Queues `f` to run on a signing thread and returns at once; `f` hands its result on
    /// itself, after [`Handoff::finish`]. The caller waits with the [`Ticket`]. Refused
    /// ([`KeyError::Busy`]) when the queue could not run it within the wait.
    pub fn submit(&self, f: impl FnOnce(&Handoff) + Send + 'static) -> Result<Ticket, KeyError> {
        self.queue(Box::new(f), self.wait, true)
    }

    fn queue(
        &self,
        run: Box<dyn FnOnce(&Handoff) + Send>,
        wait: Duration,
        sampled: bool,
    ) -> Result<Ticket, KeyError> {
        let wait_ms = wait.as_millis() as u64;
        // queued jobs, one running on each thread, and this one; against 90% of the wait,
        // so that an admitted job is not refused by its own deadline on a jittery machine
        let ahead = self.tx.len() as u64 + self.threads + 1;
        let expected = Duration::from_nanos(ahead * self.job_ns.load(Ordering::Relaxed) / self.threads);
        // An empty queue always admits: the average must keep learning after a stall.
        if !self.tx.is_empty() && expected > wait.mul_f32(0.9) {
            metrics::counter!("keygate_backend_shed_total").increment(1);
            return Err(KeyError::Busy(wait_ms));
        }
        let state = Arc::new(Shared {
            state: AtomicU8::new(QUEUED),
            finished_at: OnceLock::new(),
        });
        let deadline = Instant::now() + wait;
        let job = Job {
            deadline,
            state: state.clone(),
            run,
            sampled,
        };
        self.tx.try_send(job).map_err(|_| KeyError::Busy(wait_ms))?;
        Ok(Ticket {
            state,
            deadline,
            wait_ms,
        })
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

    #[tokio::test]
    async fn a_job_handing_on_keeps_its_caller_past_the_wait_once_finished() {
        let q = SignQueue::start(1, Duration::from_millis(100)).unwrap();
        // finished at once, hands on after 300 ms (a slow store): the caller gets the answer
        let (tx, rx) = tokio::sync::oneshot::channel();
        let ticket = q
            .submit(move |h: &Handoff| {
                assert!(h.finish());
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(300));
                    tx.send(5).unwrap();
                });
            })
            .unwrap();
        let finished = ticket.finished();
        assert_eq!(ticket.wait(rx).await.unwrap(), Ok(5));
        // it finished at once, and the caller can tell when (the hand-on took 300 ms more)
        let at = finished.at().expect("a finished job has its time");
        assert!(at.elapsed() >= Duration::from_millis(250), "{:?}", at.elapsed());
        // still in the device at the wait: the caller hears Busy, the job may not hand on
        let finished = Arc::new(std::sync::Mutex::new(None));
        let f2 = finished.clone();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let ticket = q
            .submit(move |h: &Handoff| {
                std::thread::sleep(Duration::from_millis(300));
                *f2.lock().unwrap() = Some(h.finish());
                drop(tx);
            })
            .unwrap();
        let (started, done) = (Instant::now(), ticket.finished());
        assert!(matches!(ticket.wait(rx).await, Err(KeyError::Busy(100))));
        assert!(done.at().is_none(), "still in the device");
        assert!(started.elapsed() < Duration::from_millis(250));
        std::thread::sleep(Duration::from_millis(350));
        assert_eq!(
            *finished.lock().unwrap(),
            Some(false),
            "a job given up on handed on"
        );
        // a ticket dropped (its request cancelled) gives up its queued job: it never runs
        let (slow, ran) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let s2 = slow.clone();
        let blocker = q
            .submit(move |_: &Handoff| {
                std::thread::sleep(Duration::from_millis(50));
                s2.fetch_add(1, Ordering::SeqCst);
            })
            .unwrap();
        let r2 = ran.clone();
        drop(
            q.submit(move |_: &Handoff| {
                r2.fetch_add(1, Ordering::SeqCst);
            })
            .unwrap(),
        );
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!((slow.load(Ordering::SeqCst), ran.load(Ordering::SeqCst)), (1, 0));
        drop(blocker);
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

    #[tokio::test]
    async fn a_long_job_gets_its_own_wait_and_does_not_teach_the_average() {
        let q = SignQueue::start(1, Duration::from_millis(50)).unwrap();
        q.run(|| std::thread::sleep(Duration::from_millis(1)))
            .await
            .unwrap();
        // far past a signature's wait, within its own
        let v = q
            .run_long(Duration::from_secs(5), || {
                std::thread::sleep(Duration::from_millis(300));
                9
            })
            .await
            .unwrap();
        assert_eq!(v, 9);
        // a long job past its own wait is given up like any other
        let late = q
            .run_long(Duration::from_millis(100), || {
                std::thread::sleep(Duration::from_millis(300))
            })
            .await;
        assert!(matches!(late, Err(KeyError::Busy(100))), "{late:?}");
        std::thread::sleep(Duration::from_millis(250));
        // the average still describes a signature, so signatures are not shed after a proof
        let avg = Duration::from_nanos(q.job_ns.load(Ordering::Relaxed));
        assert!(avg < Duration::from_millis(20), "average {avg:?}");
    }
}
