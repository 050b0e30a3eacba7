//! The bounded pool that runs searches (detection, embedding, ANN) off the actix workers.
//!
//! `threads` OS threads take jobs from a queue of at most `queue` waiting jobs. When the
//! queue is full a submission fails at once, and the handler answers 503 with
//! `Retry-After`: under overload the server sheds load instead of letting latency grow
//! without bound.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// The pool refused a job: every thread is busy and the queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy;

/// A job that gave no result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobError {
    /// The job panicked; the message, for the log.
    Panicked(String),
    /// Nobody wanted the result any more when a thread came to it (the client had gone),
    /// so it was not run.
    Abandoned,
    /// The pool shut down before answering.
    Lost,
}

pub struct SearchPool {
    sender: SyncSender<Job>,
    threads: usize,
    queue: usize,
    /// Jobs accepted and not yet taken by a thread.
    waiting: Arc<AtomicUsize>,
}

impl SearchPool {
    pub fn new(threads: usize, queue: usize) -> Self {
        let (sender, receiver) = sync_channel::<Job>(queue);
        let receiver = Arc::new(Mutex::new(receiver));
        let waiting = Arc::new(AtomicUsize::new(0));
        for i in 0..threads.max(1) {
            let receiver = receiver.clone();
            let waiting = waiting.clone();
            std::thread::Builder::new()
                .name(format!("search-{i}"))
                .spawn(move || {
                    loop {
                        // The lock is held only while waiting for the next job.
                        let job = match receiver.lock() {
                            Ok(r) => r.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => {
                                waiting.fetch_sub(1, Ordering::AcqRel);
                                job()
                            }
                            Err(_) => return,
                        }
                    }
                })
                .expect("spawning a search thread");
        }
        Self { sender, threads: threads.max(1), queue, waiting }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    pub fn queue(&self) -> usize {
        self.queue
    }

    /// Jobs waiting for a thread now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// Runs `f` on the pool; `Err(Busy)` at once when the queue is full. A panic in `f`
    /// is caught and returned as [`JobError::Panicked`], so a bad request cannot take a
    /// search thread down.
    pub async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<Result<T, JobError>, Busy> {
        Ok(self.submit(f)?.outcome().await)
    }

    /// Queues `f` now, or refuses it at once when the queue is full. Queuing is
    /// synchronous so that the caller knows, on return, whether the job holds a slot.
    pub fn submit<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<Pending<T>, Busy> {
        self.submit_unless(|| false, f)
    }

    /// As [`Self::submit`], but when a thread comes to the job it first asks `abandoned`,
    /// and skips `f` when the answer is yes: work queued for a client that has gone is
    /// not done.
    pub fn submit_unless<T: Send + 'static>(&self, abandoned: impl FnOnce() -> bool + Send + 'static, f: impl FnOnce() -> T + Send + 'static) -> Result<Pending<T>, Busy> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            if abandoned() {
                let _ = tx.send(Err(JobError::Abandoned));
                return;
            }
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
                JobError::Panicked(p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_else(|| "search panicked".into()))
            });
            let _ = tx.send(result);
        });
        // Counted before it is sent, so that a thread taking it at once never counts below 0.
        self.waiting.fetch_add(1, Ordering::AcqRel);
        match self.sender.try_send(job) {
            Ok(()) => Ok(Pending(rx)),
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.waiting.fetch_sub(1, Ordering::AcqRel);
                Err(Busy)
            }
        }
    }
}

/// A job that holds a place on the pool; awaiting it yields the job's result.
pub struct Pending<T>(oneshot::Receiver<Result<T, JobError>>);

impl<T> Pending<T> {
    pub async fn outcome(self) -> Result<T, JobError> {
        self.0.await.unwrap_or(Err(JobError::Lost))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    #[tokio::test]
    async fn runs_jobs_sheds_load_and_survives_panics() {
        let pool = SearchPool::new(1, 1);
        assert_eq!(pool.run(|| 2 + 2).await, Ok(Ok(4)));
        let panicked = pool.run(|| -> u32 { panic!("bad input") }).await.unwrap();
        assert_eq!(panicked, Err(JobError::Panicked("bad input".to_string())));
        // Occupy the thread (it says when it started), fill the one queue slot, and the
        // next job is refused; channels, not sleeps, order the steps.
        let (started_tx, started) = mpsc::channel();
        let (release, released) = mpsc::channel::<()>();
        let blocker = pool
            .submit(move || {
                started_tx.send(()).unwrap();
                released.recv().unwrap();
            })
            .unwrap();
        started.recv().unwrap();
        let queued = pool.submit(|| 1).unwrap();
        assert_eq!(pool.waiting(), 1);
        assert!(matches!(pool.submit(|| 0), Err(Busy)));
        assert_eq!(pool.waiting(), 1);
        release.send(()).unwrap();
        assert_eq!(blocker.outcome().await, Ok(()));
        assert_eq!(queued.outcome().await, Ok(1));
        assert_eq!(pool.run(|| 3).await, Ok(Ok(3)));
    }

    #[tokio::test]
    async fn an_abandoned_job_is_not_run() {
        let pool = SearchPool::new(1, 2);
        let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = ran.clone();
        let skipped = pool.submit_unless(|| true, move || flag.store(true, std::sync::atomic::Ordering::SeqCst)).unwrap();
        assert_eq!(skipped.outcome().await, Err(JobError::Abandoned));
        assert!(!ran.load(std::sync::atomic::Ordering::SeqCst));
        assert_eq!(pool.submit_unless(|| false, || 7).unwrap().outcome().await, Ok(7));
    }
}
