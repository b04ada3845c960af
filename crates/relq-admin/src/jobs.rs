//! Background jobs: long operations (a rate-limited or large replay) run on the server while
//! the client follows their progress (`GET /api/jobs/{id}`) and may cancel them. Jobs live in the
//! server's memory; the work they do is durable as it goes (a replayed dead letter is gone from
//! the dead letters), so running the same request again after a restart continues it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use relq::Timestamp;
use serde::Serialize;
use tokio::sync::Notify;
use utoipa::ToSchema;

/// Finished jobs kept for their clients to read.
const KEEP: usize = 100;

/// A job's progress, as the API shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(crate) struct JobView {
    /// Its id.
    pub(crate) id: String,
    /// What it does (`replay`).
    pub(crate) kind: String,
    /// The topic.
    pub(crate) topic: String,
    /// Who started it (the token's name).
    pub(crate) actor: String,
    /// `running`, `finished`, `failed` or `cancelled`.
    pub(crate) state: String,
    /// Items to process.
    pub(crate) total: u64,
    /// Items processed so far.
    pub(crate) done: u64,
    /// Items per second at most, when rate-limited.
    pub(crate) rate: Option<u32>,
    /// Why it failed.
    pub(crate) error: Option<String>,
    /// When it started (RFC 3339).
    pub(crate) started_at: String,
    /// When it ended.
    pub(crate) finished_at: Option<String>,
}

/// One job.
#[derive(Debug)]
pub(crate) struct Job {
    view: Mutex<JobView>,
    done: AtomicU64,
    cancelled: AtomicBool,
    wake: Notify,
}

impl Job {
    /// Counts `n` more items done.
    pub(crate) fn progress(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    /// Resolves when the job is cancelled.
    pub(crate) async fn cancelled(&self) {
        while !self.is_cancelled() {
            self.wake.notified().await;
        }
    }

    /// Marks the end: failed with `error`, cancelled, or finished.
    pub(crate) fn end(&self, error: Option<String>) {
        let mut v = self.view.lock().unwrap_or_else(|e| e.into_inner());
        v.state = match (&error, self.is_cancelled()) {
            (Some(_), _) => "failed",
            (None, true) => "cancelled",
            (None, false) => "finished",
        }
        .into();
        v.error = error;
        v.finished_at = Some(Timestamp::now().to_string());
    }

    pub(crate) fn view(&self) -> JobView {
        let mut v = self.view.lock().unwrap_or_else(|e| e.into_inner()).clone();
        v.done = self.done.load(Ordering::Relaxed);
        v
    }
}

/// The server's jobs.
#[derive(Debug, Default)]
pub(crate) struct Jobs {
    next: AtomicU64,
    jobs: Mutex<BTreeMap<u64, Arc<Job>>>,
}

impl Jobs {
    /// Registers a running job.
    pub(crate) fn start(
        &self,
        kind: &str,
        topic: &str,
        actor: &str,
        total: u64,
        rate: Option<u32>,
    ) -> Arc<Job> {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let job = Arc::new(Job {
            view: Mutex::new(JobView {
                id: id.to_string(),
                kind: kind.into(),
                topic: topic.into(),
                actor: actor.into(),
                state: "running".into(),
                total,
                done: 0,
                rate,
                error: None,
                started_at: Timestamp::now().to_string(),
                finished_at: None,
            }),
            done: AtomicU64::new(0),
            cancelled: AtomicBool::new(false),
            wake: Notify::new(),
        });
        let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        jobs.insert(id, job.clone());
        // Forget the oldest finished jobs beyond the limit (running ones stay).
        while jobs.len() > KEEP {
            let oldest_done = jobs
                .iter()
                .find(|(_, j)| j.view().state != "running")
                .map(|(id, _)| *id);
            match oldest_done {
                Some(id) => {
                    jobs.remove(&id);
                }
                None => break,
            }
        }
        job
    }

    pub(crate) fn get(&self, id: u64) -> Option<Arc<Job>> {
        self.jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
    }

    /// Every job kept, newest first.
    pub(crate) fn list(&self) -> Vec<JobView> {
        self.jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .rev()
            .map(|j| j.view())
            .collect()
    }

    /// Asks a job to stop after its current batch.
    pub(crate) fn cancel(&self, job: &Job) {
        job.cancelled.store(true, Ordering::Release);
        job.wake.notify_waiters();
        job.wake.notify_one();
    }
}
