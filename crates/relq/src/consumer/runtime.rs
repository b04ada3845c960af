//! The consumer runtime: the fetch loop, handler tasks, the watchdog, batchers and the settler.
//!
//! ```text
//! fetch loop ── recover own pending ─▶ claim idle ─▶ read new ──┐ (permits taken in bulk, one per message)
//!      │                                                         ▼
//!      ├──────────────▶ handler task (one per message: panics caught; settles its outcome) ─┐
//!      │                   ▲ watchdog: cuts off a handler past its timeout (even one that     │
//!      │                   │ blocks its thread) and settles it as a timeout; aborts at shutdown│
//!      └──────────────▶ batcher per batch type ─▶ batch task ───────────────────────────────┤
//!                                                                                         ▼
//!                                       settler: batches ack / retry / dead-letter into one backend call
//! ```
//! A failure becomes a `Settlement::Retry` (scheduled in the backend) or a
//! `Settlement::DeadLetter`; no task sleeps on a retry. A message whose settlement never reaches
//! the backend stays pending there and is delivered again: at-least-once.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{mpsc, watch, Notify};

use super::slots::{Permit, Slots};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::nack::{nack, Nack};
use super::{Config, Counters, ShutdownReport, StopReason};
use crate::compression;
use crate::fast_hash::{IdSet, KindMap};
use crate::handler::{BatchConfig, BatchHandler, Handler, HandlerError, CAPTURE_BACKTRACE};
use crate::retry::Failure;
use relq_core::DeadLetter;
use relq_core::{instant_after, MessageId, Outgoing, Timestamp, HEADER_REPLAY_GROUP};
use relq_core::{AttemptFailure, Backend, Delivery, FailureKind, Settlement, Subscription};
use relq_core::{BackendError, BackendErrorKind, RateLimit};

/// The error category of a payload that could not be decoded (decompressed, or decoded by a
/// typed handler).
pub(crate) const DECODE_CATEGORY: &str = "decode";

/// Settlements flushed per backend call.
const SETTLE_BATCH: usize = 512;
/// Attempts to apply one settlement batch while the backend is unavailable before leaving the
/// messages pending (they are then delivered again).
const SETTLE_ATTEMPTS: u32 = 12;
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Retry due times this consumer stored (ms since the epoch), recorded by the settler once a
/// batch is applied, so the fetch loop reads when each falls due even while a read waits for
/// new messages (a backend's blocking read may not see a retry that fell due during it, e.g.
/// Redis's `XREADGROUP BLOCK`). At most [`RETRY_TIMES`] are kept, the earliest.
struct RetryClock {
    times: Mutex<std::collections::BTreeSet<u64>>,
    /// The first of `times` (`u64::MAX`: none), read without the lock on every turn of the
    /// fetch loop.
    first: std::sync::atomic::AtomicU64,
    changed: Notify,
}

/// Most retry due times a consumer keeps (a later one past the cap is seen when a read's wait
/// ends, at most `poll_wait` late).
const RETRY_TIMES: usize = 4096;

impl RetryClock {
    fn new() -> RetryClock {
        RetryClock {
            times: Mutex::new(std::collections::BTreeSet::new()),
            first: std::sync::atomic::AtomicU64::new(u64::MAX),
            changed: Notify::new(),
        }
    }

    fn times(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeSet<u64>> {
        self.times.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records stored retries due at `at`.
    fn scheduled(&self, at: impl IntoIterator<Item = Timestamp>) {
        let mut times = self.times();
        let before = times.first().copied();
        times.extend(at.into_iter().map(|t| t.0));
        while times.len() > RETRY_TIMES {
            times.pop_last();
        }
        let first = times.first().copied();
        if first != before {
            self.first
                .store(first.unwrap_or(u64::MAX), Ordering::Release);
            drop(times);
            self.changed.notify_one();
        }
    }

    /// How long until the earliest recorded retry is due (zero: due now).
    fn due_in(&self) -> Option<Duration> {
        let first = self.first.load(Ordering::Acquire);
        (first != u64::MAX).then(|| Timestamp(first).since(Timestamp::now()))
    }

    /// Forgets every retry due by now: a read that starts now delivers them.
    fn taken(&self) {
        let now = Timestamp::now().0;
        let mut times = self.times();
        while times.first().is_some_and(|t| *t <= now) {
            times.pop_first();
        }
        self.first.store(
            times.first().copied().unwrap_or(u64::MAX),
            Ordering::Release,
        );
    }
}

pub(crate) struct Ctx {
    backend: Arc<dyn Backend>,
    config: Arc<Config>,
    sub: Subscription,
    counters: Arc<Counters>,
    settle: mpsc::Sender<Settlement>,
    abort: watch::Receiver<bool>,
    /// Ids this consumer is processing, or whose ack it has queued: see [`Held`].
    held: Arc<std::sync::Mutex<Held>>,
    meters: Meters,
    watchdog: Watchdog,
    /// Each handler's route by message type, with the type as a shared string.
    routes: KindMap<(Arc<str>, Arc<Route>)>,
    fallback: Option<Arc<Route>>,
    retries: Arc<RetryClock>,
    /// The topic, shared with every message handed to a handler.
    topic: Arc<str>,
}

/// The consumer's metric handles, registered once (not looked up per message).
struct Meters {
    in_flight: metrics::Gauge,
    delivered: metrics::Counter,
    handler_seconds: metrics::Histogram,
    acked: metrics::Counter,
    publish_to_handled: metrics::Histogram,
    retried: metrics::Counter,
    dead_lettered: metrics::Counter,
    filtered: metrics::Counter,
    already_processed: metrics::Counter,
    rate_wait: metrics::Histogram,
}

impl Meters {
    fn new(topic: &str, group: &str) -> Meters {
        let labels = [("topic", topic.to_owned()), ("group", group.to_owned())];
        Meters {
            in_flight: metrics::gauge!("relq_in_flight", &labels),
            delivered: metrics::counter!("relq_delivered_total", &labels),
            handler_seconds: metrics::histogram!("relq_handler_seconds", &labels),
            acked: metrics::counter!("relq_acked_total", &labels),
            publish_to_handled: metrics::histogram!("relq_publish_to_handled_seconds", &labels),
            retried: metrics::counter!("relq_retried_total", &labels),
            dead_lettered: metrics::counter!("relq_dead_lettered_total", &labels),
            filtered: metrics::counter!("relq_filtered_total", &labels),
            already_processed: metrics::counter!("relq_already_processed_total", &labels),
            rate_wait: metrics::histogram!("relq_rate_limit_wait_seconds", &labels),
        }
    }
}

/// What this consumer holds, so a message it delivered again to itself is not run twice:
/// - `running`: in a handler, a batch, or on the way to the settler. A claim can return one of
///   them (it sat idle past `claim_after`, e.g. in a slow batch).
/// - `acking`: handled successfully, its ack queued in the settler but not yet applied (the
///   backend may be down). After an outage the fetch loop recovers this consumer's pending
///   messages, and these are among them: the queued ack settles them (an ack always applies),
///   so running them again would be a needless duplicate. The settler removes them once their
///   batch was applied or given up (then they stay pending and come back by recovery or claim).
///
/// A message whose retry or dead letter is queued is not held: a retry that is due at once may
/// come back as soon as it is applied, and that delivery must run.
///
/// A message delivered again while its ack is queued is `missed`: if that ack was applied
/// before the new delivery (a group moved back meanwhile), nothing settles the new one, so once
/// the ack's batch is done the fetch loop recovers this consumer's pending messages (`recover`)
/// instead of leaving it until a claim.
#[derive(Default)]
struct Held {
    running: IdSet,
    acking: IdSet,
    missed: IdSet,
    recover: bool,
}

fn held(h: &std::sync::Mutex<Held>) -> std::sync::MutexGuard<'_, Held> {
    h.lock().unwrap_or_else(|e| e.into_inner())
}

impl Ctx {
    /// Deliveries entering processing: those this consumer is not processing already and has
    /// no ack queued for (a claim or recovery can return those; the run in progress settles
    /// them).
    fn enter(&self, deliveries: &mut Vec<Delivery>) {
        let mut h = held(&self.held);
        // `retain` moves nothing while everything is kept (the common case).
        deliveries.retain(|d| {
            let id = d.message.id;
            if h.acking.contains(&id) {
                h.missed.insert(id);
            } else if h.running.insert(id) {
                return true;
            }
            tracing::debug!(%id, "delivered a message this consumer is still processing; not running it twice");
            false
        });
        drop(h);
        let n = deliveries.len();
        self.counters
            .in_flight
            .fetch_add(n as u64, Ordering::Relaxed);
        self.meters.in_flight.increment(n as f64);
    }

    /// Messages left processing (handed to the settler, or abandoned at shutdown); `acking`: an
    /// ack of theirs is about to be queued.
    fn leave_as(&self, ids: impl IntoIterator<Item = MessageId>, acking: bool) {
        let mut h = held(&self.held);
        let mut n = 0;
        for id in ids {
            if h.running.remove(&id) {
                n += 1;
                if acking {
                    h.acking.insert(id);
                }
            }
        }
        drop(h);
        self.counters.in_flight.fetch_sub(n, Ordering::Relaxed);
        self.meters.in_flight.decrement(n as f64);
    }

    fn leave(&self, ids: impl IntoIterator<Item = MessageId>) {
        self.leave_as(ids, false);
    }
}

enum Outcome {
    Ok,
    Failed {
        kind: FailureKind,
        chain: Vec<String>,
        category: Option<String>,
        backtrace: Option<String>,
    },
}

impl Outcome {
    fn from_error(e: HandlerError) -> Outcome {
        Outcome::Failed {
            kind: if e.is_permanent() {
                FailureKind::Permanent
            } else {
                FailureKind::Retryable
            },
            chain: e.chain(),
            category: e.category_name().map(str::to_owned),
            backtrace: e.backtrace(),
        }
    }

    /// A payload that could not be decoded: permanent, category `decode`.
    fn decode(e: impl std::fmt::Display) -> Outcome {
        Outcome::Failed {
            kind: FailureKind::Permanent,
            chain: vec![e.to_string()],
            category: Some(DECODE_CATEGORY.to_owned()),
            backtrace: None,
        }
    }

    fn simple(kind: FailureKind, error: String) -> Outcome {
        Outcome::Failed {
            kind,
            chain: vec![error],
            category: None,
            backtrace: None,
        }
    }
}

fn panic_message(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(p) => panic_text(p),
        Err(e) => format!("handler task failed: {e}"),
    }
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    match p.downcast::<String>() {
        Ok(s) => format!("handler panicked: {s}"),
        Err(p) => match p.downcast::<&'static str>() {
            Ok(s) => format!("handler panicked: {s}"),
            Err(_) => "handler panicked".to_owned(),
        },
    }
}

/// Polls a handler's (pinned, so `Unpin`) future, turning a panic into an `Err` with its text.
struct CatchUnwind<F>(F);

impl<F: Future + Unpin> Future for CatchUnwind<F> {
    type Output = Result<F::Output, String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = &mut self.0;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Pin::new(inner).poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Err(p) => Poll::Ready(Err(panic_text(p))),
        }
    }
}

/// One message in a handler: what settles it, taken by whichever finishes it first, the
/// worker that runs it or the watchdog (at the timeout, or at a shutdown abort).
struct Job {
    slot: Mutex<Slot>,
    /// Set once the slot was taken (read by the watchdog without the lock).
    done: std::sync::atomic::AtomicBool,
    /// The watchdog tells the worker to drop the handler's future.
    cancel: Notify,
}

struct Slot {
    held: Option<(Kept, Permit)>,
    /// The message, until the worker that runs the handler takes it.
    message: Option<relq_core::Message>,
    /// The watchdog cut the handler off at its timeout and started another worker: the one
    /// running it retires when (if ever) the handler gives its thread back.
    replaced: bool,
}

/// What a job keeps of its delivery while the handler owns the message: enough to settle it,
/// and to rebuild the message for a dead letter. The payload and headers are shared or cheap
/// to copy, and the type is the handler map's own key, so nothing here allocates per message
/// (headers aside).
struct Kept {
    id: MessageId,
    kind: Arc<str>,
    payload: bytes::Bytes,
    headers: std::collections::BTreeMap<String, String>,
    published_at: Timestamp,
    deliver_at: Option<Timestamp>,
    attempt: u32,
    failures: Vec<AttemptFailure>,
}

impl Kept {
    /// Splits a delivery into what the job keeps and the message for the handler; `kind` is
    /// the message's type.
    fn split(d: Delivery, kind: Arc<str>) -> (Kept, relq_core::Message) {
        debug_assert_eq!(*kind, *d.message.kind);
        let m = d.message;
        let kept = Kept {
            id: m.id,
            kind,
            payload: m.payload.clone(),
            headers: m.headers.clone(),
            published_at: m.published_at,
            deliver_at: m.deliver_at,
            attempt: m.attempt,
            failures: d.failures,
        };
        (kept, m)
    }

    /// The delivery again, message and all.
    fn into_delivery(self) -> Delivery {
        let out = Outgoing {
            kind: self.kind.to_string(),
            payload: self.payload,
            headers: self.headers,
            deliver_at: self.deliver_at,
            dedup_window: None,
        };
        Delivery::new(
            relq_core::Message::new(self.id, out, self.published_at, self.attempt),
            self.failures,
        )
    }
}

impl Job {
    fn new(d: Delivery, kind: Arc<str>, permit: Permit) -> Job {
        let (kept, message) = Kept::split(d, kind);
        Job {
            slot: Mutex::new(Slot {
                held: Some((kept, permit)),
                message: Some(message),
                replaced: false,
            }),
            done: std::sync::atomic::AtomicBool::new(false),
            cancel: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes what settles the job; `replace`: the watchdog cuts it off and replaces its worker.
    fn take(&self, replace: bool) -> Option<(Delivery, Permit)> {
        let mut slot = self.lock();
        let (kept, permit) = slot.held.take()?;
        slot.replaced = replace;
        self.done.store(true, Ordering::Release);
        drop(slot);
        Some((kept.into_delivery(), permit))
    }

    /// The handler's copy of the message; `None` if the job was settled while it waited.
    fn message(&self) -> Option<relq_core::Message> {
        let mut slot = self.lock();
        match slot.held {
            Some(_) => slot.message.take(),
            None => None,
        }
    }

    /// Takes what settles a job whose handler succeeded: only the message's id and publish
    /// time are needed.
    fn take_ok(&self) -> Option<(MessageId, Timestamp, Permit)> {
        let mut slot = self.lock();
        let (kept, permit) = slot.held.take()?;
        self.done.store(true, Ordering::Release);
        drop(slot);
        Some((kept.id, kept.published_at, permit))
    }

    fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    fn replaced(&self) -> bool {
        self.lock().replaced
    }
}

/// A message for a handler's workers: its job (which holds the message).
struct Task {
    job: Arc<Job>,
    name: HandlerName,
}

/// A registered handler with its type erased. It starts workers that run the concrete type, so
/// a handler's future is polled where it is (not boxed per message).
pub(crate) trait Runner: Send + Sync + 'static {
    /// Starts a worker taking messages from `work`.
    fn spawn_worker(self: Arc<Self>, work: Arc<Work>, ctx: std::sync::Weak<Ctx>, capture: bool);
}

struct Typed<H>(H);

impl<H: Handler> Runner for Typed<H> {
    fn spawn_worker(self: Arc<Self>, work: Arc<Work>, ctx: std::sync::Weak<Ctx>, capture: bool) {
        tokio::spawn(worker(self, work, ctx, capture));
    }
}

/// `handler`, ready to be registered with a consumer.
pub(crate) fn runner(handler: impl Handler) -> Arc<dyn Runner> {
    Arc::new(Typed(handler))
}

/// A handler of this consumer run and the queue its workers take messages from.
struct Route {
    runner: Arc<dyn Runner>,
    work: Arc<Work>,
}

impl Route {
    fn new(runner: &Arc<dyn Runner>) -> Arc<Route> {
        Arc::new(Route {
            runner: runner.clone(),
            work: Arc::default(),
        })
    }

    /// Starts a worker for this handler.
    fn spawn_worker(&self, ctx: &Arc<Ctx>) {
        self.runner.clone().spawn_worker(
            self.work.clone(),
            Arc::downgrade(ctx),
            ctx.config.include_stack_trace,
        );
    }
}

/// The queue one handler's workers take messages from. Workers are long-lived tasks (spawned as
/// needed, at most `concurrency` per handler), so a message costs no task spawn: a worker runs
/// its handler inline, settles it and takes the next.
#[derive(Default)]
pub(crate) struct Work {
    queue: Mutex<WorkQueue>,
    ready: Notify,
    /// Workers started by the fetch loop (at most `concurrency`; replacements not counted).
    workers: std::sync::atomic::AtomicUsize,
}

#[derive(Default)]
struct WorkQueue {
    tasks: VecDeque<Task>,
    /// Workers waiting for a task.
    idle: usize,
    closed: bool,
}

impl Work {
    fn lock(&self) -> std::sync::MutexGuard<'_, WorkQueue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues tasks; returns how many no idle worker will take (start that many more).
    fn push(&self, tasks: impl IntoIterator<Item = Task>) -> usize {
        let mut q = self.lock();
        let before = q.tasks.len();
        q.tasks.extend(tasks);
        let added = q.tasks.len() - before;
        let (queued, idle) = (q.tasks.len(), q.idle);
        drop(q);
        // Idle workers registered their wake-up before counting themselves idle, so this
        // reaches one (or is kept for the next to wait); it passes the wake-up on while tasks
        // are left (`next`).
        if added > 0 && idle > 0 {
            self.ready.notify_one();
        }
        queued.saturating_sub(idle)
    }

    /// The next task, and whether the worker waited for it or woke another worker for the
    /// tasks after it; `None` once closed.
    async fn next(&self) -> Option<(Task, bool, bool)> {
        let mut waited = false;
        let mut passed = false;
        loop {
            // Looked at first without registering for a wake-up: a busy worker finds a task.
            {
                let mut q = self.lock();
                if q.closed {
                    return None;
                }
                if let Some(t) = q.tasks.pop_front() {
                    return Some((t, waited, passed));
                }
            }
            let ready = self.ready.notified();
            tokio::pin!(ready);
            // Registered before looking again, so a task pushed in between wakes it.
            ready.as_mut().enable();
            {
                let mut q = self.lock();
                if q.closed {
                    return None;
                }
                if let Some(t) = q.tasks.pop_front() {
                    return Some((t, waited, passed));
                }
                q.idle += 1;
            }
            ready.await;
            waited = true;
            let mut q = self.lock();
            q.idle -= 1;
            // Woken for a task: if more wait and another worker is idle, pass the wake-up on.
            // (`push` wakes one worker, not one per task: a handler that finishes at once
            // takes the next task itself, and the others are woken one by one only while tasks
            // are left.)
            if q.tasks.len() > 1 && q.idle > 0 {
                drop(q);
                self.ready.notify_one();
                passed = true;
            }
        }
    }

    fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_waiters();
    }
}

/// A handler worker: runs tasks until the queue closes or the consumer is gone. It holds the
/// consumer only weakly while a handler runs, so a handler that never gives its thread back
/// does not keep a stopped consumer alive.
async fn worker<H: Handler>(
    handler: Arc<Typed<H>>,
    work: Arc<Work>,
    ctx: std::sync::Weak<Ctx>,
    capture: bool,
) {
    // A worker that dies of a panic outside the handler (a bug) no longer counts, so another
    // can be started in its place.
    struct Counted(Arc<Work>);
    impl Drop for Counted {
        fn drop(&mut self) {
            if std::thread::panicking() {
                self.0.workers.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
    let _counted = Counted(work.clone());
    // Read once: the consumer's config does not change.
    let skip = ctx.upgrade().and_then(|c| Skip::of(&c));
    let mut ran = false;
    // Only a multi-threaded runtime keeps a woken task in a slot of the waking thread.
    let lifo = tokio::runtime::Handle::current().runtime_flavor()
        != tokio::runtime::RuntimeFlavor::CurrentThread;
    while let Some((Task { job, name }, waited, passed)) = work.next().await {
        let Some(message) = job.message() else {
            // Timed out or left pending while it waited in the queue: not run.
            if job.replaced() {
                return;
            }
            continue;
        };
        if ((ran && !waited) || passed) && lifo {
            // Taken without waiting, right after the last one: let whatever that one woke on
            // this thread (the settler, the fetch loop, a task the handler woke) run first.
            // Tokio keeps such a task in this thread's own slot, which other threads do not
            // take, so a handler that then blocks the thread would strand it. (Whether the
            // last message woke anything cannot be told reliably: a channel's receiver can be
            // woken by a send long after it stopped waiting on it.) The same for the worker
            // this one woke for the tasks after it.
            yield_stealable().await;
        }
        if let Some(outcome) = expired(&message) {
            // It expired while it waited in the queue: not run.
            if !settle_unrun(&job, &ctx, HandlerName::None, outcome).await {
                return;
            }
            continue;
        }
        // A compressed payload is decompressed here, in the worker (not in the fetch loop).
        let message = if compression::is_encoded(&message) {
            match decoded(message, &ctx) {
                Ok(message) => message,
                Err(outcome) => {
                    if !settle_unrun(&job, &ctx, name, outcome).await {
                        return;
                    }
                    continue;
                }
            }
        } else {
            message
        };
        // With `skip_processed`: a message whose key a handler of this group already
        // processed is acknowledged without running again.
        let processed_key = match &skip {
            Some(skip) => {
                let key = processed_key(&message);
                match skip.check(&job, &ctx, &key).await {
                    Checked::Run => Some(key),
                    Checked::Done => continue,
                    Checked::Stop => return,
                }
            }
            None => None,
        };
        ran = true;
        let started = Instant::now();
        let span = tracing::debug_span!("relq.handle", id = %message.id, kind = %message.kind, attempt = message.attempt);
        // A handler may panic while making its future, too.
        let made =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler.0.handle(message)));
        let result = match made {
            Err(p) => Some(Err(panic_text(p))),
            Ok(fut) => {
                let run = CatchUnwind(std::pin::pin!(fut));
                // The backtrace flag is a task-local only when backtraces are on (off, the
                // handler errors capture none, as outside the scope); the span only when it is
                // enabled.
                match (capture, span.is_disabled()) {
                    (false, true) => until_cancelled(run, &job.cancel).await,
                    (capture, _) => {
                        let run = tracing::Instrument::instrument(
                            CAPTURE_BACKTRACE.scope(capture, run),
                            span,
                        );
                        until_cancelled(run, &job.cancel).await
                    }
                }
            }
        };
        let ended = Instant::now();
        // With `skip_processed`, a success's key is recorded before its ack. The record counts
        // against the handler's time (the watchdog may time it out, or an abort leave it
        // pending: then the wait for it ends, and the job is not taken below).
        if let (Some(skip), Some(key), Some(Ok(Ok(())))) = (&skip, &processed_key, &result) {
            until_cancelled(skip.record(key), &job.cancel).await;
        }
        let Some(ctx) = ctx.upgrade() else {
            return;
        };
        // A success needs only the id and publish time from the job; a failure the delivery.
        let settled = match result {
            Some(Ok(Ok(()))) => job
                .take_ok()
                .map(|(id, published_at, permit)| (ack(&ctx, id, published_at, ended), permit)),
            Some(r) => job.take(false).map(|(d, permit)| {
                let outcome = match r {
                    Ok(Ok(())) => Outcome::Ok,
                    Ok(Err(e)) => Outcome::from_error(e),
                    Err(panic) => Outcome::simple(FailureKind::Panic, panic),
                };
                (settlement(&ctx, d, name, outcome, ended), permit)
            }),
            None => None,
        };
        let Some((settlement, permit)) = settled else {
            // The watchdog settled it (timed out) or left it pending (shutdown abort).
            if job.replaced() {
                return;
            }
            continue;
        };
        ctx.meters
            .handler_seconds
            .record(ended.saturating_duration_since(started).as_secs_f64());
        queue(&ctx, settlement).await;
        drop(permit);
    }
}

/// A worker's `skip_processed` setting, with what its backend calls need (so no `Ctx` is held
/// across them: a shutdown must not wait for a backend call to give up).
struct Skip {
    backend: Arc<dyn Backend>,
    sub: Subscription,
    ttl: Duration,
    record_failures: metrics::Counter,
}

impl Skip {
    fn of(ctx: &Ctx) -> Option<Skip> {
        let ttl = ctx.config.skip_processed?;
        Some(Skip {
            backend: ctx.backend.clone(),
            sub: ctx.sub.clone(),
            ttl,
            record_failures: metrics::counter!(
                "relq_processed_record_failures_total",
                "topic" => ctx.sub.topic.clone(),
                "group" => ctx.sub.group.clone()
            ),
        })
    }

    /// Checks a message's processed record. A recorded one is acknowledged without running; a
    /// failed check is a retryable failure (category `processed_check`): running the handler
    /// then could repeat work already done. A job the watchdog settled meanwhile (timed out, or
    /// left pending at an abort) is not run.
    async fn check(&self, job: &Job, ctx: &std::sync::Weak<Ctx>, key: &str) -> Checked {
        let found = self
            .backend
            .processed(&self.sub.topic, &self.sub.group, key)
            .await;
        if job.is_done() {
            return Checked::settled_elsewhere(job);
        }
        match found {
            Ok(false) => Checked::Run,
            Ok(true) => {
                let Some(c) = ctx.upgrade() else {
                    return Checked::Stop;
                };
                let Some((id, _, permit)) = job.take_ok() else {
                    return Checked::settled_elsewhere(job);
                };
                c.counters.already_processed.fetch_add(1, Ordering::Relaxed);
                c.meters.already_processed.increment(1);
                queue(&c, Settlement::Ack(id)).await;
                drop(permit);
                Checked::Done
            }
            Err(e) => {
                let outcome = Outcome::Failed {
                    kind: FailureKind::Retryable,
                    chain: vec![format!("checking whether it was already processed: {e}")],
                    category: Some("processed_check".to_owned()),
                    backtrace: None,
                };
                if settle_unrun(job, ctx, HandlerName::None, outcome).await {
                    Checked::Done
                } else {
                    Checked::Stop
                }
            }
        }
    }

    /// Records a handled message's key (before its ack is queued). A failure is logged and
    /// counted, and the message acknowledged anyway: the handler's work is done, and a
    /// redelivery would repeat it (what the record only narrows).
    async fn record(&self, key: &str) {
        if let Err(e) = self
            .backend
            .record_processed(&self.sub, key, self.ttl)
            .await
        {
            self.record_failures.increment(1);
            tracing::warn!(error = %e, topic = %self.sub.topic, group = %self.sub.group, key, "recording a processed key failed; acknowledging anyway (a redelivery would run it again)");
        }
    }
}

/// The key a message is recorded as processed under: its idempotency key (so a message
/// published twice counts once), else (also for an empty key) its id (a redelivery of the same
/// message).
fn processed_key(m: &relq_core::Message) -> String {
    match m
        .header(relq_core::HEADER_IDEMPOTENCY_KEY)
        .filter(|k| !k.is_empty())
    {
        Some(k) => format!("k:{k}"),
        None => format!("i:{}", m.id),
    }
}

/// What `Skip::check` found.
enum Checked {
    /// Not recorded: run the handler.
    Run,
    /// Recorded (acknowledged unrun, counted), the check failed (a retry scheduled), or the
    /// watchdog settled the job meanwhile: next.
    Done,
    /// The consumer is gone, or this worker was replaced.
    Stop,
}

impl Checked {
    /// A job the watchdog settled: this worker goes on, unless it was replaced meanwhile.
    fn settled_elsewhere(job: &Job) -> Checked {
        if job.replaced() {
            Checked::Stop
        } else {
            Checked::Done
        }
    }
}

/// Whether `m` passes the group's filters. Filters on the type and headers judge the message as
/// stored; filters on the payload judge it as the handler would see it (a compressed one is
/// decompressed, a copy). A payload that does not decompress passes the payload filters, so it
/// becomes a `decode` dead letter of a group it is otherwise for instead of vanishing as
/// filtered.
fn filters_pass(c: &Config, m: &relq_core::Message) -> bool {
    use crate::filter::Filter;
    if !c.filters.iter().all(|f| f.reads_payload() || f.passes(m)) {
        return false;
    }
    let payload_filters = || c.filters.iter().filter(|f| f.reads_payload());
    if payload_filters().next().is_none() {
        return true;
    }
    if !compression::is_encoded(m) {
        return payload_filters().all(|f| f.passes(m));
    }
    let mut copy = m.clone();
    match compression::decode_message(&mut copy, c.max_payload) {
        Ok(()) => payload_filters().all(|f: &Filter| f.passes(&copy)),
        Err(_) => true,
    }
}

/// Settles a job whose handler is not run (`outcome` says why). `false`: the worker retires
/// (the consumer is gone, or the watchdog took the job past its deadline and replaced it).
async fn settle_unrun(
    job: &Job,
    ctx: &std::sync::Weak<Ctx>,
    name: HandlerName,
    outcome: Outcome,
) -> bool {
    let Some(ctx) = ctx.upgrade() else {
        return false;
    };
    match job.take(false) {
        Some((d, permit)) => {
            finish(&ctx, d, name, outcome, Instant::now()).await;
            drop(permit);
            true
        }
        None => !job.replaced(),
    }
}

/// A message stored compressed as its handler sees it: decompressed. A payload
/// that does not decompress (or expands past the consumer's payload limit) is a permanent
/// failure with category `decode`; its dead letter keeps the stored bytes.
fn decoded(
    mut m: relq_core::Message,
    ctx: &std::sync::Weak<Ctx>,
) -> Result<relq_core::Message, Outcome> {
    let limit = match ctx.upgrade() {
        Some(ctx) => ctx.config.max_payload,
        None => return Err(Outcome::simple(FailureKind::Permanent, String::new())),
    };
    match compression::decode_message(&mut m, limit) {
        Ok(()) => Ok(m),
        Err(e) => Err(Outcome::decode(e)),
    }
}

/// Lets the other tasks of this thread run first, as `tokio::task::yield_now` does, but where
/// other threads can take this task: it wakes itself, and tokio puts a task woken while it runs
/// at the back of the thread's run queue, which other threads steal from. (`yield_now` parks
/// the task on a list of the thread's own, run only when the thread next idles or every 61
/// polls: workers yielding there before a handler that blocks the thread would wait for it.)
async fn yield_stealable() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            return Poll::Ready(());
        }
        yielded = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await
}

/// Runs `fut` until it finishes (`Some`) or `cancel` is notified (`None`). It is polled once
/// first on its own: most handlers finish without waiting, and then nothing registers with
/// `cancel`.
async fn until_cancelled<F: Future>(fut: F, cancel: &Notify) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    if let Poll::Ready(v) = std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await {
        return Some(v);
    }
    tokio::select! {
        biased;
        r = fut => Some(r),
        () = cancel.notified() => None,
    }
}

/// Which handler ran a message (a dead letter records it): its type's, the fallback, or none
/// (not run: no handler, over the delivery limit, or expired).
#[derive(Clone, Copy)]
enum HandlerName {
    Kind,
    Fallback,
    None,
}

impl HandlerName {
    fn of(self, m: &relq_core::Message) -> &str {
        match self {
            HandlerName::Kind => &m.kind,
            HandlerName::Fallback => "fallback",
            HandlerName::None => "none",
        }
    }
}

struct Watched {
    deadline: Instant,
    job: Arc<Job>,
    name: HandlerName,
    /// The handler's route: a job cut off at its timeout gets its worker replaced there.
    route: Arc<Route>,
}

/// The per-consumer watchdog's queue. Every handler has the same timeout, so deadlines come in
/// start order: the front is always the next to expire. Finished jobs are dropped from the
/// front as they come up, and the queue is compacted when it outgrows the jobs that can be
/// running (at most `concurrency`).
#[derive(Default)]
struct WatchQueue {
    jobs: VecDeque<Watched>,
}

struct Watchdog {
    queue: Mutex<WatchQueue>,
    wake: Notify,
    limit: usize,
}

impl Watchdog {
    fn new(concurrency: usize) -> Watchdog {
        Watchdog {
            queue: Mutex::new(WatchQueue::default()),
            wake: Notify::new(),
            limit: concurrency.saturating_mul(2).saturating_add(64),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WatchQueue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn watch(&self, jobs: impl IntoIterator<Item = Watched>) {
        let mut q = self.lock();
        // Jobs mostly end in the order they started: drop the finished ones at the front.
        while q.jobs.front().is_some_and(|w| w.job.is_done()) {
            q.jobs.pop_front();
        }
        let was_empty = q.jobs.is_empty();
        q.jobs.extend(jobs);
        if q.jobs.len() > self.limit {
            q.jobs.retain(|w| !w.job.is_done());
        }
        drop(q);
        if was_empty {
            self.wake.notify_one();
        }
    }
}

/// Cuts off handlers past their timeout: settles the attempt as a timeout, aborts the task
/// (a handler that blocks its thread runs on, but its outcome is ignored), and frees its
/// permit. At a shutdown abort, leaves every running message pending instead.
async fn watchdog(ctx: Arc<Ctx>) {
    let mut abort = ctx.abort.clone();
    let timeout = ctx.config.handler_timeout;
    loop {
        let next = {
            let mut q = ctx.watchdog.lock();
            while q.jobs.front().is_some_and(|w| w.job.is_done()) {
                q.jobs.pop_front();
            }
            q.jobs.front().map(|w| w.deadline)
        };
        if *abort.borrow() {
            let all: Vec<Watched> = ctx.watchdog.lock().jobs.drain(..).collect();
            for w in all {
                if let Some((d, permit)) = w.job.take(false) {
                    w.job.cancel.notify_one();
                    ctx.leave([d.message.id]);
                    drop(permit);
                }
            }
            // New jobs may still come from a dispatch in progress: look again when woken.
            // `run` ends this task once every permit is back.
            ctx.watchdog.wake.notified().await;
            continue;
        }
        let expired = match next {
            None => {
                tokio::select! {
                    _ = ctx.watchdog.wake.notified() => continue,
                    _ = changed(&mut abort) => continue,
                }
            }
            Some(deadline) => {
                tokio::select! {
                    () = tokio::time::sleep_until(deadline) => {}
                    _ = changed(&mut abort) => continue,
                }
                let now = Instant::now();
                let mut q = ctx.watchdog.lock();
                let mut expired = Vec::new();
                while q.jobs.front().is_some_and(|w| w.deadline <= now) {
                    expired.extend(q.jobs.pop_front());
                }
                expired
            }
        };
        for w in expired {
            if let Some((d, permit)) = w.job.take(true) {
                // Its worker drops the handler's future at its next await, or stays stuck
                // in a handler that blocks its thread: either way another worker takes over.
                w.job.cancel.notify_one();
                w.route.spawn_worker(&ctx);
                let outcome = Outcome::simple(
                    FailureKind::Timeout,
                    format!("handler did not finish within {timeout:?}"),
                );
                ctx.meters.handler_seconds.record(timeout.as_secs_f64());
                // In a task of its own: with the settle queue full (a backend outage) the
                // watchdog must not wait, other handlers' timeouts are due too.
                let ctx = ctx.clone();
                let name = w.name;
                tokio::spawn(async move {
                    finish(&ctx, d, name, outcome, Instant::now()).await;
                    drop(permit);
                });
            }
        }
    }
}

pub(crate) async fn run(
    backend: Arc<dyn Backend>,
    config: Arc<Config>,
    sub: Subscription,
    counters: Arc<Counters>,
    mut stop: watch::Receiver<Option<Duration>>,
    done: watch::Sender<Option<StopReason>>,
    report: watch::Sender<Option<ShutdownReport>>,
) {
    let permits = Slots::new(config.concurrency, config.shared_slots.clone());
    let (settle_tx, settle_rx) = mpsc::channel(config.concurrency.max(SETTLE_BATCH) * 2);
    let held_ids = Arc::new(std::sync::Mutex::new(Held::default()));
    let (abort_tx, abort_rx) = watch::channel(false);
    let (fatal_tx, mut fatal_rx) = watch::channel(None::<StopReason>);
    let retries = Arc::new(RetryClock::new());
    let settler = tokio::spawn(settler(
        backend.clone(),
        sub.clone(),
        config.forward.clone().map(|f| (f, config.max_payload)),
        settle_rx,
        fatal_tx,
        abort_rx.clone(),
        held_ids.clone(),
        retries.clone(),
    ));
    let ctx = Arc::new(Ctx {
        backend,
        config: config.clone(),
        sub,
        counters: counters.clone(),
        settle: settle_tx,
        abort: abort_rx,
        held: held_ids,
        meters: Meters::new(&config.topic, &config.group),
        topic: Arc::from(config.topic.as_str()),
        watchdog: Watchdog::new(config.concurrency),
        routes: config
            .handlers
            .iter()
            .map(|(kind, (shared, runner))| (kind.clone(), (shared.clone(), Route::new(runner))))
            .collect(),
        fallback: config.fallback.as_ref().map(Route::new),
        retries,
    });
    let watchdog_task = tokio::spawn(watchdog(ctx.clone()));
    let mut batchers = KindMap::default();
    let mut batcher_tasks: Vec<JoinHandle<()>> = Vec::new();
    for (kind, (cfg, handler)) in &config.batch_handlers {
        let (tx, rx) = mpsc::channel(cfg.size * 2);
        batchers.insert(kind.clone(), tx);
        batcher_tasks.push(tokio::spawn(batcher(
            ctx.clone(),
            *cfg,
            handler.clone(),
            rx,
        )));
    }

    let reason = fetch_loop(&ctx, &permits, &batchers, &mut stop, &mut fatal_rx).await;
    permits.backlog(false);
    tracing::info!(reason = ?reason, "consumer stopping");

    // Drain: batchers run what they hold; handlers get until the deadline.
    drop(batchers);
    let deadline = match (&reason, *stop.borrow()) {
        (StopReason::Shutdown, Some(d)) => d,
        _ => Duration::ZERO,
    };
    let deadline_at = instant_after(Instant::now(), deadline);
    let all = u32::try_from(config.concurrency).unwrap_or(u32::MAX);
    let mut abandoned = 0;
    if tokio::time::timeout_at(deadline_at, permits.drain(all))
        .await
        .is_err()
    {
        // This run's own (the counters may be shared with other topics' runs).
        abandoned = permits.in_use(all as usize) as u64;
        if abandoned > 0 {
            tracing::warn!(
                abandoned,
                "shutdown deadline reached; cancelled handlers' messages stay pending"
            );
        }
        let _ = abort_tx.send(true);
        permits.drain(all).await;
    }
    for t in batcher_tasks {
        let _ = t.await;
    }
    // Every permit is back: no handler runs, and the watchdog has finished what it took.
    watchdog_task.abort();
    let _ = watchdog_task.await;
    for (_, route) in ctx.routes.values() {
        route.work.close();
    }
    if let Some(route) = &ctx.fallback {
        route.work.close();
    }
    drop(ctx);
    // The settler flushes what the handlers settled, until the deadline; past it, a failing
    // backend is not waited for (those messages stay pending and are delivered again).
    let mut settler = settler;
    if tokio::time::timeout_at(deadline_at, &mut settler)
        .await
        .is_err()
    {
        let _ = abort_tx.send(true);
        let _ = settler.await;
    }
    let _ = report.send(Some(ShutdownReport {
        abandoned,
        stats: counters.snapshot(),
    }));
    let _ = done.send(Some(reason));
}

/// What the fetch loop asked the backend for.
enum Fetch {
    Read,
    Recover,
    Claim,
}

/// A read in flight: the permits it holds and its result.
type Read = Pin<Box<dyn Future<Output = (Permit, Fetched)> + Send>>;
type Fetched = Result<Vec<Delivery>, BackendError>;

/// Reads kept in flight at most. With a backlog, a second read goes out while the first is
/// still on its way, so the backend's round trip overlaps the handling of the read before; a
/// network backend, whose reads are mostly waiting, then runs about twice the messages.
const READS_IN_FLIGHT: usize = 2;

/// Awaits the read in `slot` and empties it; never resolves for an empty slot. Cancel-safe: the
/// read stays in the slot if this is dropped first.
async fn read_done(slot: &mut Option<Read>) -> (Permit, Fetched) {
    let Some(read) = slot.as_mut() else {
        return std::future::pending().await;
    };
    let out = read.await;
    *slot = None;
    out
}

fn start_read(ctx: &Arc<Ctx>, permit: Permit, wait: Duration) -> Read {
    let ctx = ctx.clone();
    Box::pin(async move {
        let r = ctx.backend.read(&ctx.sub, permit.num_permits(), wait).await;
        (permit, r)
    })
}

/// The most permits a read takes: a read's size, less one permit when the read may wait for new
/// messages (no backlog) and more than one message may run at once, so a retry that falls due
/// meanwhile can be read at once (see `RetryClock`). With a backlog a read returns at once.
/// With slots shared by priority levels, a read that may wait takes one slot (an idle level
/// does not sit on the slots of busy ones); one that comes back full makes the next one large.
fn read_permits(c: &Config, backlog: bool) -> usize {
    if backlog {
        c.read_batch
    } else if c.shared_slots.is_some() {
        1
    } else {
        c.read_batch.min(c.concurrency.saturating_sub(1).max(1))
    }
}

async fn fetch_loop(
    ctx: &Arc<Ctx>,
    permits: &Slots,
    batchers: &KindMap<mpsc::Sender<(Delivery, Permit)>>,
    stop: &mut watch::Receiver<Option<Duration>>,
    fatal: &mut watch::Receiver<Option<StopReason>>,
) -> StopReason {
    let c = &ctx.config;
    let mut backoff = Duration::from_millis(50);
    let mut recovering = true;
    let mut recovered_up_to = MessageId::ZERO;
    let mut next_claim = Instant::now();
    // Plain reads in flight (recovery and claims run one at a time, with no read out). A read
    // dropped here (at a stop) leaves what it took pending: recovered or claimed later.
    let mut reads: [Option<Read>; READS_IN_FLIGHT] = [None, None];
    // The last read came back full: more is waiting, so a second read may go out.
    let mut backlog = false;
    // A second read waits for a quarter of a read's worth of free permits, so reads stay large.
    let ahead_at = c.read_batch.min(c.concurrency).div_ceil(4).max(1);
    // Rate limited: the tokens the fetch out was granted, and those granted earlier and not
    // used (a fetch that found fewer messages), put back at the next take.
    let mut charged: Option<usize> = None;
    let mut unused_tokens: u32 = 0;
    loop {
        if stop.borrow().is_some() {
            return StopReason::Shutdown;
        }
        if let Some(r) = fatal.borrow().clone() {
            return r;
        }
        let in_flight = reads.iter().filter(|r| r.is_some()).count();
        let (permit, fetched, kind) = if in_flight > 0 {
            // No read ahead once recovery or a claim is due: the reads out drain first.
            // A rate-limited consumer takes its tokens before each fetch, one fetch at a time.
            let another = in_flight < READS_IN_FLIGHT
                && c.rate_limit.is_none()
                && !recovering
                && Instant::now() < next_claim
                && !held(&ctx.held).recover;
            let ahead = backlog && another;
            // A retry this consumer stored falls due: a read for it, without waiting (the one
            // out may be waiting for new messages, and a backend's wait may not see it). A
            // waiting read leaves a permit free for it (`read_permits`); with every permit in
            // a handler, the read after that handler's takes the retry. Not once recovery or a
            // claim is due (as for a read ahead: the reads out drain first).
            let retry = ctx.retries.due_in();
            let retry_read = retry.is_some() && another;
            let retry_at = instant_after(Instant::now(), retry.unwrap_or_default());
            let [first, second] = &mut reads;
            tokio::select! {
                (p, r) = read_done(first) => (p, r, Fetch::Read),
                (p, r) = read_done(second) => (p, r, Fetch::Read),
                p = async {
                    tokio::time::sleep_until(retry_at).await;
                    permits.acquire(1, read_permits(c, true)).await
                }, if retry_read => {
                    let Ok(permit) = p else {
                        return StopReason::runtime_failure("permit semaphore closed");
                    };
                    ctx.retries.taken();
                    if let Some(slot) = reads.iter_mut().find(|r| r.is_none()) {
                        *slot = Some(start_read(ctx, permit, Duration::ZERO));
                    }
                    continue;
                }
                () = ctx.retries.changed.notified() => continue,
                p = permits.acquire(ahead_at, read_permits(c, true)), if ahead => {
                    let Ok(permit) = p else {
                        return StopReason::runtime_failure("permit semaphore closed");
                    };
                    let wait = c.poll_wait.min(next_claim.saturating_duration_since(Instant::now()));
                    if let Some(slot) = reads.iter_mut().find(|r| r.is_none()) {
                        *slot = Some(start_read(ctx, permit, wait));
                    }
                    continue;
                }
                _ = changed(stop) => continue,
                _ = changed(fatal) => continue,
            }
        } else {
            // Every free permit (up to a read's size) is taken, so a read asks for as many
            // messages as can start, and each starts without waiting on the semaphore again.
            let mut permit = tokio::select! {
                p = permits.acquire(1, read_permits(c, backlog)) => match p {
                    Ok(p) => p,
                    Err(_) => return StopReason::runtime_failure("permit semaphore closed"),
                },
                _ = changed(stop) => continue,
                _ = changed(fatal) => continue,
            };
            if !recovering && std::mem::take(&mut held(&ctx.held).recover) {
                recovering = true;
                recovered_up_to = MessageId::ZERO;
            }
            if let Some(limit) = c.rate_limit {
                // Fetch only as many messages as the group's rate limit has tokens for; with
                // none, wait (nothing is fetched, so nothing burns an attempt).
                let want = permit.num_permits();
                match take_tokens(ctx, limit, want, &mut unused_tokens, stop, fatal).await {
                    Tokens::Granted(n) => {
                        if n < want {
                            if let Some(keep) = permit.split(n) {
                                drop(permit);
                                permit = keep;
                            }
                        }
                        charged = Some(n.min(want));
                    }
                    Tokens::Again => continue,
                }
            }
            let max = permit.num_permits();
            let now = Instant::now();
            let claiming = !recovering && now >= next_claim;
            if recovering {
                let r = ctx.backend.recover(&ctx.sub, recovered_up_to, max).await;
                (permit, r, Fetch::Recover)
            } else if claiming {
                let r = ctx.backend.claim(&ctx.sub, c.claim_after, max).await;
                (permit, r, Fetch::Claim)
            } else {
                let mut wait = c.poll_wait.min(next_claim.saturating_duration_since(now));
                // A read that starts once a retry is due delivers it; one before waits no longer.
                match ctx.retries.due_in() {
                    Some(d) if d.is_zero() => ctx.retries.taken(),
                    Some(d) => wait = wait.min(d),
                    None => {}
                }
                reads[0] = Some(start_read(ctx, permit, wait));
                continue;
            }
        };
        let max = permit.num_permits();
        if let Some(n) = charged.take() {
            // What the fetch did not use goes back at the next take (all of it when it failed).
            let used = fetched.as_ref().map_or(0, Vec::len);
            unused_tokens = unused_tokens
                .saturating_add(u32::try_from(n.saturating_sub(used)).unwrap_or(u32::MAX));
        }
        let mut deliveries = match fetched {
            Ok(d) => {
                backoff = Duration::from_millis(50);
                d
            }
            Err(e) => match e.kind {
                BackendErrorKind::Terminated => return StopReason::TopicTerminated,
                BackendErrorKind::GroupDeleted => return StopReason::GroupDeleted,
                _ if e.is_transient() => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "backend unavailable; retrying");
                    drop(permit);
                    backlog = false;
                    permits.backlog(false);
                    // The failed call may have been applied with its reply lost (a read or claim
                    // whose connection dropped leaves messages pending for this consumer), so
                    // recover this consumer's pending messages before reading on. Messages it is
                    // processing, or whose ack it has queued, are in `held` and are not run
                    // twice.
                    recovering = true;
                    recovered_up_to = MessageId::ZERO;
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = changed(stop) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
                _ => return StopReason::Failed(Arc::new(e)),
            },
        };
        match kind {
            // Page until a page comes back empty: a short page does not mean the end (a backend
            // may skip stopped or trimmed entries within a page).
            Fetch::Recover => match deliveries.last() {
                Some(d) => recovered_up_to = d.message.id,
                None => recovering = false,
            },
            Fetch::Claim if deliveries.len() < max => {
                next_claim = instant_after(
                    Instant::now(),
                    (c.claim_after / 2).max(Duration::from_millis(10)),
                );
            }
            Fetch::Claim => {}
            Fetch::Read => {
                backlog = deliveries.len() >= max;
                permits.backlog(backlog);
            }
        }
        let mut permit = permit;
        let mut staged = Vec::with_capacity(deliveries.len());
        ctx.enter(&mut deliveries);
        for d in deliveries {
            let p = match permit.split(1) {
                Some(p) => p,
                // A backend returned more than asked for.
                None => {
                    start(ctx, &mut staged);
                    match permits.acquire(1, 1).await {
                        Ok(p) => p,
                        Err(_) => return StopReason::runtime_failure("permit semaphore closed"),
                    }
                }
            };
            dispatch(ctx, batchers, d, p, &mut staged).await;
        }
        start(ctx, &mut staged);
    }
}

/// What `take_tokens` got.
enum Tokens {
    /// Fetch at most this many (at least one).
    Granted(usize),
    /// None (it waited, or a stop came): back to the top of the fetch loop.
    Again,
}

/// Takes up to `want` tokens of the group's rate limit, putting back `unused` (then zero). With
/// none, waits until one should be there and answers `Again`; so does a backend failure (the
/// fetch would likely fail too), after a moment. A stop or a fatal stop ends the wait, and the
/// backend call, at once.
async fn take_tokens(
    ctx: &Ctx,
    limit: RateLimit,
    want: usize,
    unused: &mut u32,
    stop: &mut watch::Receiver<Option<Duration>>,
    fatal: &mut watch::Receiver<Option<StopReason>>,
) -> Tokens {
    let want = u32::try_from(want).unwrap_or(u32::MAX);
    let taken = tokio::select! {
        r = ctx.backend.take_tokens(&ctx.sub.topic, &ctx.sub.group, want, *unused, limit) => r,
        _ = changed(stop) => return Tokens::Again,
        _ = changed(fatal) => return Tokens::Again,
    };
    let wait = match taken {
        Ok(g) => {
            *unused = 0;
            if g.granted > 0 {
                return Tokens::Granted(g.granted as usize);
            }
            g.retry_after
                .clamp(Duration::from_millis(1), Duration::from_secs(1))
        }
        Err(e) => {
            tracing::warn!(error = %e, "taking rate limit tokens failed; retrying");
            Duration::from_millis(200)
        }
    };
    ctx.meters.rate_wait.record(wait.as_secs_f64());
    tokio::select! {
        () = tokio::time::sleep(wait) => {}
        _ = changed(stop) => {}
        _ = changed(fatal) => {}
    }
    Tokens::Again
}

/// Resolves when `rx` changes; never, once its sender is gone (a dropped `ConsumerHandle` must not
/// make the fetch loop spin).
async fn changed<T>(rx: &mut watch::Receiver<T>) {
    if rx.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Hands the staged tasks to the workers (one lock of the watchdog's queue and one of the
/// workers' queue for a whole read), starting workers where none is idle.
fn start(ctx: &Arc<Ctx>, staged: &mut Vec<(Arc<Route>, Task)>) {
    if staged.is_empty() {
        return;
    }
    let c = &ctx.config;
    let deadline = instant_after(Instant::now(), c.handler_timeout);
    ctx.watchdog.watch(staged.iter().map(|(route, t)| Watched {
        deadline,
        job: t.job.clone(),
        name: t.name,
        route: route.clone(),
    }));
    let mut tasks = staged.drain(..).peekable();
    while let Some((route, first)) = tasks.next() {
        // A run of tasks for the same handler goes into its queue under one lock.
        let mut run = vec![first];
        while let Some((_, t)) = tasks.next_if(|(r, _)| Arc::ptr_eq(r, &route)) {
            run.push(t);
        }
        let short = route.work.push(run);
        for _ in 0..short {
            if route.work.workers.load(Ordering::Relaxed) >= c.concurrency {
                break;
            }
            route.work.workers.fetch_add(1, Ordering::Relaxed);
            route.spawn_worker(ctx);
        }
    }
}

/// Routes an entered delivery: to a batcher, to the settler (not for this group, over the
/// delivery limit, no handler), or into `staged` for the workers. Staged tasks are started
/// before anything here waits.
async fn dispatch(
    ctx: &Arc<Ctx>,
    batchers: &KindMap<mpsc::Sender<(Delivery, Permit)>>,
    d: Delivery,
    permit: Permit,
    staged: &mut Vec<(Arc<Route>, Task)>,
) {
    let c = &ctx.config;
    ctx.meters.delivered.increment(1);
    let mut d = d;
    d.message.set_topic(ctx.topic.clone());
    let m = &d.message;
    if let Some(target) = m.header(HEADER_REPLAY_GROUP) {
        if target != c.group {
            start(ctx, staged);
            // A dead letter replayed for another group of this topic. Its ack is marked as
            // queued (a recovery meanwhile does not hand it over again).
            queue(ctx, Settlement::Ack(m.id)).await;
            return;
        }
    }
    if !c.filters.is_empty() && !filters_pass(c, m) {
        start(ctx, staged);
        // Not for this group: acknowledged unhandled, counted.
        ctx.counters.filtered.fetch_add(1, Ordering::Relaxed);
        ctx.meters.filtered.increment(1);
        queue(ctx, Settlement::Ack(m.id)).await;
        return;
    }
    if m.attempt > c.retry.max_attempts() {
        start(ctx, staged);
        let error = format!(
            "delivered {} times without being settled (limit {}): its consumers crashed or hung while holding it",
            m.attempt,
            c.retry.max_attempts()
        );
        finish(
            ctx,
            d,
            HandlerName::None,
            Outcome::simple(FailureKind::DeliveryLimit, error),
            Instant::now(),
        )
        .await;
        drop(permit);
        return;
    }
    if let Some(expired) = expired(m) {
        start(ctx, staged);
        finish(ctx, d, HandlerName::None, expired, Instant::now()).await;
        drop(permit);
        return;
    }
    if let Some(tx) = batchers.get(&m.kind) {
        start(ctx, staged);
        if let Err(mpsc::error::SendError((d, _permit))) = tx.send((d, permit)).await {
            // Batcher gone (only during shutdown): leave it pending, it is delivered again.
            tracing::debug!(id = %d.message.id, "batcher closed; message stays pending");
            ctx.leave([d.message.id]);
        }
        return;
    }
    let (name, kind, route) = match ctx.routes.get(&m.kind) {
        Some((kind, route)) => (HandlerName::Kind, kind.clone(), route.clone()),
        None => match &ctx.fallback {
            Some(route) => (
                HandlerName::Fallback,
                Arc::from(m.kind.as_str()),
                route.clone(),
            ),
            None => {
                start(ctx, staged);
                let error = format!("no handler registered for message type {:?}", m.kind);
                finish(
                    ctx,
                    d,
                    HandlerName::None,
                    Outcome::simple(FailureKind::NoHandler, error),
                    Instant::now(),
                )
                .await;
                drop(permit);
                return;
            }
        },
    };
    staged.push((
        route,
        Task {
            job: Arc::new(Job::new(d, kind, permit)),
            name,
        },
    ));
}

async fn batcher(
    ctx: Arc<Ctx>,
    cfg: BatchConfig,
    handler: Arc<dyn BatchHandler>,
    mut rx: mpsc::Receiver<(Delivery, Permit)>,
) {
    while let Some(first) = rx.recv().await {
        let started = Instant::now();
        let mut batch = vec![first];
        while batch.len() < cfg.size {
            let until = instant_after(Instant::now(), cfg.timeout)
                .min(instant_after(started, cfg.max_wait));
            match tokio::time::timeout_at(until, rx.recv()).await {
                Ok(Some(x)) => batch.push(x),
                Ok(None) | Err(_) => break,
            }
        }
        tokio::spawn(run_batch(ctx.clone(), handler.clone(), batch));
    }
}

async fn run_batch(ctx: Arc<Ctx>, handler: Arc<dyn BatchHandler>, batch: Vec<(Delivery, Permit)>) {
    // A message may have expired while the batch filled; a compressed one is decompressed for
    // the handler (its delivery keeps the stored bytes, for a dead letter).
    let mut kept = Vec::with_capacity(batch.len());
    let mut messages = Vec::with_capacity(batch.len());
    for (d, permit) in batch {
        let unrun = match expired(&d.message) {
            Some(outcome) => Some((HandlerName::None, outcome)),
            None => {
                let mut m = d.message.clone();
                match compression::decode_message(&mut m, ctx.config.max_payload) {
                    Ok(()) => {
                        messages.push(m);
                        None
                    }
                    Err(e) => Some((HandlerName::Kind, Outcome::decode(e))),
                }
            }
        };
        match unrun {
            Some((name, outcome)) => {
                finish(&ctx, d, name, outcome, Instant::now()).await;
                drop(permit);
            }
            None => kept.push((d, permit)),
        }
    }
    let batch = kept;
    if batch.is_empty() {
        return;
    }
    let n = batch.len();
    let capture = ctx.config.include_stack_trace;
    let mut task = tokio::spawn(
        CAPTURE_BACKTRACE.scope(capture, async move { handler.handle_batch(messages).await }),
    );
    let mut abort = ctx.abort.clone();
    let outcomes: Vec<Outcome> = tokio::select! {
        biased;
        r = tokio::time::timeout(ctx.config.handler_timeout, &mut task) => match r {
            Ok(Ok(results)) if results.len() == n => results
                .into_iter()
                .map(|r| match r { Ok(()) => Outcome::Ok, Err(e) => Outcome::from_error(e) })
                .collect(),
            Ok(Ok(results)) => {
                let error = format!("batch handler returned {} results for {n} messages", results.len());
                (0..n).map(|_| Outcome::simple(FailureKind::Retryable, error.clone())).collect()
            }
            Ok(Err(join)) => {
                let error = panic_message(join);
                (0..n).map(|_| Outcome::simple(FailureKind::Panic, error.clone())).collect()
            }
            Err(_) => {
                task.abort();
                let error = format!("batch handler did not finish within {:?}", ctx.config.handler_timeout);
                (0..n).map(|_| Outcome::simple(FailureKind::Timeout, error.clone())).collect()
            }
        },
        _ = abort.wait_for(|a| *a) => {
            task.abort();
            ctx.leave(batch.iter().map(|(d, _)| d.message.id));
            return;
        }
    };
    for ((d, permit), outcome) in batch.into_iter().zip(outcomes) {
        finish(&ctx, d, HandlerName::Kind, outcome, Instant::now()).await;
        drop(permit);
    }
}

/// The outcome of a message whose time to live has ended by now (checked as a consumer takes it,
/// and again right before its handler or batch runs): never handled.
fn expired(m: &relq_core::Message) -> Option<Outcome> {
    let at = m.expires_at()?;
    (at <= Timestamp::now()).then(|| {
        Outcome::simple(
            FailureKind::Expired,
            format!("its time to live ended at {at}, before it was handled"),
        )
    })
}

/// Turns an outcome (reached at `ended`) into a settlement and queues it.
async fn finish(ctx: &Ctx, d: Delivery, handler: HandlerName, outcome: Outcome, ended: Instant) {
    let s = settlement(ctx, d, handler, outcome, ended);
    queue(ctx, s).await;
}

/// The ack of a message handled successfully at `ended`, counted.
fn ack(ctx: &Ctx, id: MessageId, published_at: Timestamp, ended: Instant) -> Settlement {
    ctx.counters.processed.fetch_add(1, Ordering::Relaxed);
    ctx.meters.acked.increment(1);
    ctx.meters
        .publish_to_handled
        .record(Timestamp::at(ended).since(published_at).as_secs_f64());
    Settlement::Ack(id)
}

/// The settlement of an outcome (reached at `ended`): an ack, or the retry or dead letter the
/// retry policy decides on, counted and logged.
fn settlement(
    ctx: &Ctx,
    d: Delivery,
    handler: HandlerName,
    outcome: Outcome,
    ended: Instant,
) -> Settlement {
    let c = &ctx.config;
    let counters = &ctx.counters;
    match outcome {
        Outcome::Ok => ack(ctx, d.message.id, d.message.published_at, ended),
        Outcome::Failed {
            kind,
            chain,
            category,
            backtrace,
        } => {
            // An expired message was not attempted: not a failure of its handler.
            if kind != FailureKind::Expired {
                counters.failed.fetch_add(1, Ordering::Relaxed);
                // Looked up per failure (not registered once): the reason and the handler's
                // category are labels. Categories are the application's own small set.
                metrics::counter!("relq_failed_total",
                    "topic" => ctx.sub.topic.clone(),
                    "group" => ctx.sub.group.clone(),
                    "reason" => kind.as_str(),
                    "category" => category.clone().unwrap_or_else(|| "none".to_owned()),
                )
                .increment(1);
            }
            let now = Timestamp::now();
            let attempt = d.message.attempt;
            let error = chain.first().cloned().unwrap_or_default();
            let decision = nack(
                &*c.retry,
                &Failure {
                    attempt,
                    kind,
                    error: &error,
                    category: category.as_deref(),
                },
                now,
                d.message.expires_at(),
            );
            if decision
                == (Nack::DeadLetter {
                    reason: FailureKind::Expired,
                })
            {
                counters.expired.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("relq_expired_total",
                    "topic" => ctx.sub.topic.clone(),
                    "group" => ctx.sub.group.clone(),
                    "action" => match c.on_expired {
                        super::OnExpired::DeadLetter => "dead_letter",
                        super::OnExpired::Drop => "drop",
                    },
                )
                .increment(1);
                if c.on_expired == super::OnExpired::Drop {
                    tracing::debug!(id = %d.message.id, attempt, error = %error, "expired; dropped");
                    return Settlement::Ack(d.message.id);
                }
            }
            let failure = AttemptFailure {
                attempt,
                at: now,
                consumer: c.consumer.clone(),
                kind,
                error,
            };
            match decision {
                Nack::Retry { at } => {
                    counters.retried.fetch_add(1, Ordering::Relaxed);
                    ctx.meters.retried.increment(1);
                    tracing::debug!(id = %d.message.id, attempt, due = %at, error = %failure.error, "retry scheduled");
                    Settlement::Retry {
                        id: d.message.id,
                        at,
                        failure,
                        release_key: c.key_retries == super::KeyRetries::SkipAhead
                            && d.message.ordering_key().is_some(),
                    }
                }
                Nack::DeadLetter { reason } => {
                    counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
                    ctx.meters.dead_lettered.increment(1);
                    tracing::warn!(id = %d.message.id, attempt, reason = reason.as_str(), error = %failure.error, "dead-lettered");
                    let mut failures = d.failures;
                    failures.push(failure);
                    let first_failed_at = failures.first().map_or(now, |f| f.at);
                    Settlement::DeadLetter(Box::new(DeadLetter {
                        id: MessageId::ZERO,
                        topic: c.topic.clone(),
                        group: c.group.clone(),
                        consumer: c.consumer.clone(),
                        handler: handler.of(&d.message).to_owned(),
                        reason,
                        category,
                        error_chain: chain,
                        backtrace: if c.include_stack_trace {
                            backtrace
                        } else {
                            None
                        },
                        attempts: attempt,
                        first_failed_at,
                        last_failed_at: now,
                        failures,
                        message: d.message,
                    }))
                }
            }
        }
    }
}

/// Queues a settlement of a message this consumer was processing (which it then no longer is).
async fn queue(ctx: &Ctx, settlement: Settlement) {
    let id = settlement.id();
    let acking = matches!(settlement, Settlement::Ack(_));
    // Marked before it is queued: the settler may apply it (and unmark it) at once.
    ctx.leave_as([id], acking);
    if !send_settlement(ctx, settlement).await && acking {
        held(&ctx.held).acking.remove(&id);
    }
}

/// Queues a settlement; false if the settler is gone.
async fn send_settlement(ctx: &Ctx, s: Settlement) -> bool {
    // Without waiting when there is room (the common case), else wait for room.
    let s = match ctx.settle.try_send(s) {
        Ok(()) => return true,
        Err(mpsc::error::TrySendError::Full(s)) => s,
        Err(mpsc::error::TrySendError::Closed(_)) => {
            tracing::debug!("settler stopped; settlement dropped, message stays pending");
            return false;
        }
    };
    if ctx.settle.send(s).await.is_err() {
        // The settler stopped (topic terminated or backend failed): the message stays pending.
        tracing::debug!("settler stopped; settlement dropped, message stays pending");
        return false;
    }
    true
}

#[allow(clippy::too_many_arguments)]
async fn settler(
    backend: Arc<dyn Backend>,
    sub: Subscription,
    // Where dead letters are forwarded, and the payload limit their decompression keeps to.
    forward: Option<(super::Forwarding, usize)>,
    mut rx: mpsc::Receiver<Settlement>,
    fatal: watch::Sender<Option<StopReason>>,
    mut abort: watch::Receiver<bool>,
    held_ids: Arc<std::sync::Mutex<Held>>,
    retries: Arc<RetryClock>,
) {
    // A panic here (a backend bug) must stop the consumer: without a settler nothing it handles
    // would ever be settled, and its messages would come back forever.
    struct StopOnPanic<'a>(&'a watch::Sender<Option<StopReason>>);
    impl Drop for StopOnPanic<'_> {
        fn drop(&mut self) {
            if std::thread::panicking() {
                let _ = self.0.send(Some(StopReason::runtime_failure(
                    "the settler panicked; unsettled messages stay pending",
                )));
            }
        }
    }
    let _stop_on_panic = StopOnPanic(&fatal);
    let mut buf = Vec::with_capacity(SETTLE_BATCH);
    while rx.recv_many(&mut buf, SETTLE_BATCH).await > 0 {
        let mut delay = Duration::from_millis(50);
        for attempt in 1..=SETTLE_ATTEMPTS {
            match backend.settle(&sub, &buf).await {
                Ok(()) => {
                    retries.scheduled(buf.iter().filter_map(|s| match s {
                        Settlement::Retry { at, .. } => Some(*at),
                        _ => None,
                    }));
                    if let Some((f, limit)) = &forward {
                        for s in &buf {
                            if let Settlement::DeadLetter(d) = s {
                                tokio::spawn(forward_dead_letter(
                                    backend.clone(),
                                    f.clone(),
                                    *limit,
                                    d.clone(),
                                ));
                            }
                        }
                    }
                    break;
                }
                Err(e) => {
                    if !handle_settle_error(&e, attempt, &fatal) {
                        break;
                    }
                    if *abort.borrow() {
                        // Past the shutdown deadline: no more waiting. The messages stay
                        // pending and are delivered again.
                        tracing::warn!(error = %e, "shutdown deadline passed while settling failed; messages stay pending");
                        break;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = abort.wait_for(|a| *a) => {}
                    }
                    delay = (delay * 2).min(MAX_BACKOFF);
                }
            }
        }
        // Applied, or given up (left pending, to be delivered again): not held any longer.
        let mut h = held(&held_ids);
        for s in &buf {
            if let Settlement::Ack(id) = s {
                if h.acking.remove(id) && h.missed.remove(id) {
                    h.recover = true;
                }
            }
        }
        drop(h);
        buf.clear();
    }
}

/// The failure record a forwarded dead letter carries as its payload (documented in
/// docs/design.md, "Dead-letter forwarding").
pub(crate) fn failure_record(d: &DeadLetter) -> serde_json::Value {
    let (payload, encoding) = match std::str::from_utf8(&d.message.payload) {
        Ok(t) => (t.to_owned(), "utf8"),
        Err(_) => (
            d.message
                .payload
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
            "hex",
        ),
    };
    serde_json::json!({
        "version": 1,
        "topic": d.topic,
        "group": d.group,
        "consumer": d.consumer,
        "handler": d.handler,
        "reason": d.reason.as_str(),
        "category": d.category,
        "error_chain": d.error_chain,
        "backtrace": d.backtrace,
        "attempts": d.attempts,
        "first_failed_at": d.first_failed_at.to_string(),
        "last_failed_at": d.last_failed_at.to_string(),
        "message": {
            "id": d.message.id.to_string(),
            "type": d.message.kind,
            "payload": payload,
            "payload_encoding": encoding,
            "headers": d.message.headers,
            "published_at": d.message.published_at.to_string(),
        },
    })
}

/// Publishes a stored dead letter's failure record on `<topic><suffix>`, trying `attempts`
/// times; a failure is logged and counted (the dead letter itself is stored already).
async fn forward_dead_letter(
    backend: Arc<dyn Backend>,
    f: super::Forwarding,
    limit: usize,
    mut d: Box<DeadLetter>,
) {
    // The record shows the payload as published (decompressed where it decompresses, as stored
    // where it does not).
    if compression::is_encoded(&d.message) {
        let _ = compression::decode_message(&mut d.message, limit);
    }
    let target = format!("{}{}", d.topic, f.suffix);
    let mut headers = std::collections::BTreeMap::new();
    headers.insert(
        relq_core::HEADER_ORIGINAL_ID.to_owned(),
        d.message.id.to_string(),
    );
    let out = Outgoing {
        kind: "relq.dead_letter".to_owned(),
        payload: bytes::Bytes::from(failure_record(&d).to_string()),
        headers,
        deliver_at: None,
        dedup_window: None,
    };
    let mut last = None;
    for attempt in 1..=f.attempts {
        match backend.publish(&target, vec![out.clone()]).await {
            Ok(_) => {
                metrics::counter!("relq_forwarded_total", "topic" => d.topic.clone()).increment(1);
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, attempt, topic = %target, id = %d.message.id, "forwarding a dead letter failed");
                last = Some(e);
            }
        }
        if attempt < f.attempts {
            tokio::time::sleep(f.delay).await;
        }
    }
    metrics::counter!("relq_forward_failed_total", "topic" => d.topic.clone()).increment(1);
    if let Some(e) = last {
        tracing::error!(error = %e, topic = %target, id = %d.message.id, attempts = f.attempts,
            "dead letter not forwarded; it stays in the dead letters");
    }
}

/// Logs a settle failure; returns whether to try again.
fn handle_settle_error(
    e: &BackendError,
    attempt: u32,
    fatal: &watch::Sender<Option<StopReason>>,
) -> bool {
    match e.kind {
        BackendErrorKind::Terminated => {
            let _ = fatal.send(Some(StopReason::TopicTerminated));
            return false;
        }
        BackendErrorKind::GroupDeleted => {
            let _ = fatal.send(Some(StopReason::GroupDeleted));
            return false;
        }
        _ => {}
    }
    if e.is_transient() && attempt < SETTLE_ATTEMPTS {
        tracing::warn!(error = %e, attempt, "settling failed; retrying");
        return true;
    }
    tracing::error!(error = %e, "settling failed; the messages stay pending and will be delivered again");
    if !e.is_transient() {
        // The error is kept (kind, backend, message) for whoever reads the stop reason.
        let kept = BackendError::new(e.backend, e.kind, e.message.clone());
        let _ = fatal.send(Some(StopReason::Failed(Arc::new(kept))));
    }
    false
}
