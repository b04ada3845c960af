//! The local admin socket of a held data directory.
//!
//! The embedded engine keeps its single-writer lock: one process opens a data directory. That
//! process (a service, `relq consume`, `relq serve`) also serves the [`Backend`] calls of other
//! processes on a Unix socket, so `relq info`, `relq publish`, `relq dlq ...` or a second
//! service given the same directory work through the holder instead of failing with "in use".
//!
//! - The socket is `<dir>/admin.sock` (absolute); `<dir>/ADMIN` records its path (written
//!   atomically after the socket listens). Only the owner may connect (mode 0600). A directory
//!   whose socket path would be too long for a Unix socket is not shared.
//! - One request per connection: a JSON line naming the call and its arguments. The holder
//!   answers `+` once it took the request (before that the call is certainly not applied, so a
//!   client may send it again elsewhere), then one JSON line, `{"ok": ...}` or
//!   `{"err": {"kind", "message", "limit"}}`.
//! - A record left by a killed holder is never trusted: a process that gets the directory's lock
//!   is the holder (the old one is gone), and replaces the record; a process that does not get
//!   the lock uses the record only if the socket answers.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::{EmbeddedBackend, EmbeddedConfig};
use relq_core::{
    Backend, Browse, CleanupReport, Delivery, GroupPlacement, Health, Retention, Settlement,
    Subscription, TopicInfo,
};
use relq_core::{BackendError, BackendErrorKind, Limit};
use relq_core::{DeadLetter, DeadLetterId, DeadLetterQuery, DeadLetterStats};
use relq_core::{Message, MessageId, Outgoing, StartPosition, Timestamp};

/// What the holder writes once it has read a request and is about to act on it.
const TAKEN: &[u8] = b"+\n";
/// How long the holder waits for a request's line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client waits for an answer once its request was taken (a read waits at most
/// 5 s; a large publish batch takes a commit).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);

/// The file in a data directory that records where its holder's socket is.
pub(crate) const RECORD: &str = "ADMIN";
/// The largest request or answer line (a publish batch of large payloads fits).
const MAX_LINE: u64 = 512 << 20;
/// Longest socket path the platform takes (sun_path is 108 bytes on Linux, 104 elsewhere).
const MAX_SOCKET_PATH: usize = 100;

/// One call of the [`Backend`] trait.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Request {
    Publish {
        topic: String,
        batch: Vec<Outgoing>,
    },
    Join {
        topic: String,
        group: String,
        consumer: String,
        start: StartPosition,
    },
    Recover {
        sub: Subscription,
        after: MessageId,
        max: usize,
    },
    Claim {
        sub: Subscription,
        min_idle_ms: u64,
        max: usize,
    },
    Read {
        sub: Subscription,
        max: usize,
        wait_ms: u64,
    },
    Settle {
        sub: Subscription,
        batch: Vec<Settlement>,
    },
    StopMessage {
        topic: String,
        id: MessageId,
    },
    ResumeMessage {
        topic: String,
        id: MessageId,
    },
    Terminate {
        topic: String,
    },
    CreateGroup {
        topic: String,
        group: String,
        start: StartPosition,
    },
    DeleteGroup {
        topic: String,
        group: String,
    },
    MoveGroup {
        topic: String,
        group: String,
        to: StartPosition,
    },
    Cleanup {
        topic: String,
        retention: Retention,
    },
    /// A cleanup's dry run: its own operation, so a holder that does not know dry runs refuses
    /// it instead of cleaning up.
    CleanupPreview {
        topic: String,
        retention: Retention,
    },
    Browse {
        topic: String,
        query: Browse,
    },
    Locate {
        topic: String,
        id: MessageId,
    },
    Health,
    Topics,
    TopicInfo {
        topic: String,
    },
    DeadLetters {
        topic: String,
        query: DeadLetterQuery,
    },
    DeadLetter {
        topic: String,
        id: DeadLetterId,
    },
    ReplayDeadLetters {
        topic: String,
        ids: Vec<DeadLetterId>,
    },
    DeleteDeadLetters {
        topic: String,
        ids: Vec<DeadLetterId>,
    },
    PurgeDeadLetters {
        topic: String,
        before: Timestamp,
    },
    Processed {
        topic: String,
        group: String,
        key: String,
    },
    RecordProcessed {
        sub: Subscription,
        key: String,
        ttl_ms: u64,
    },
    TakeTokens {
        topic: String,
        group: String,
        want: u32,
        give_back: u32,
        limit: relq_core::RateLimit,
    },
    DeadLetterStats {
        topic: String,
    },
}

/// An error on the wire.
#[derive(Debug, Serialize, Deserialize)]
struct WireError {
    kind: String,
    message: String,
    limit: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Answer {
    Ok(serde_json::Value),
    Err(WireError),
}

fn kind_name(k: BackendErrorKind) -> &'static str {
    match k {
        BackendErrorKind::Unavailable => "unavailable",
        BackendErrorKind::Terminated => "terminated",
        BackendErrorKind::GroupDeleted => "group_deleted",
        BackendErrorKind::Full => "full",
        BackendErrorKind::Corrupt => "corrupt",
        BackendErrorKind::Invalid => "invalid",
        _ => "fatal",
    }
}

fn to_wire(e: &BackendError) -> WireError {
    WireError {
        kind: kind_name(e.kind).into(),
        message: e.message.clone(),
        limit: e.limit().map(|l| match l {
            Limit::Disk => "disk".into(),
            Limit::Capacity => "capacity".into(),
            Limit::Memory => "memory".into(),
        }),
    }
}

fn from_wire(w: WireError) -> BackendError {
    let kind = match w.kind.as_str() {
        "unavailable" => BackendErrorKind::Unavailable,
        "terminated" => BackendErrorKind::Terminated,
        "group_deleted" => BackendErrorKind::GroupDeleted,
        "full" => BackendErrorKind::Full,
        "corrupt" => BackendErrorKind::Corrupt,
        "invalid" => BackendErrorKind::Invalid,
        _ => BackendErrorKind::Fatal,
    };
    let limit = match w.limit.as_deref() {
        Some("disk") => Some(Limit::Disk),
        Some("capacity") => Some(Limit::Capacity),
        Some("memory") => Some(Limit::Memory),
        _ => None,
    };
    match (kind, limit) {
        (BackendErrorKind::Full, Some(l)) => BackendError::full(NAME, l, w.message),
        _ => BackendError::new(NAME, kind, w.message),
    }
}

const NAME: &str = "embedded";

fn unavailable(message: impl Into<String>) -> BackendError {
    BackendError::new(NAME, BackendErrorKind::Unavailable, message)
}

/// Serves the socket while it lives; dropping it stops serving and removes the record.
#[derive(Debug)]
pub(crate) struct LocalServer {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// Requests accepted and not answered yet.
    inflight: Arc<Counter>,
    socket: PathBuf,
    record: PathBuf,
}

impl LocalServer {
    /// Stops accepting requests and waits (at most 5 s) until those accepted are answered.
    pub(crate) async fn drain(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let idle = self.inflight.idle.notified();
                if self.inflight.n.load(Ordering::Acquire) == 0 {
                    return;
                }
                idle.await;
            }
        })
        .await;
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        // Answers being written are let out (bounded): a request that ended this process (a
        // terminate that stops its consumer) still gets its answer. On a single-threaded
        // runtime dropping this on its own thread, the tasks cannot run: the wait just ends.
        let until = std::time::Instant::now() + Duration::from_secs(2);
        while self.inflight.n.load(Ordering::Acquire) > 0 && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = std::fs::remove_file(&self.record);
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Where the socket of `dir` goes: `<dir>/admin.sock`, as an absolute path (clients may run in
/// another working directory); none when that is too long for a Unix socket (a socket in a
/// shared temporary directory could be taken over by another user: not shared then).
fn socket_path(dir: &Path) -> io::Result<PathBuf> {
    let inside = std::fs::canonicalize(dir)?.join("admin.sock");
    if inside.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(io::Error::other(format!(
            "{} is too long for a Unix socket",
            inside.display()
        )));
    }
    Ok(inside)
}

/// Starts serving `backend`'s calls for the data directory `dir`, which this process holds.
/// Needs a tokio runtime (none: `Err`, and the directory is simply not shared).
pub(crate) fn serve(dir: &Path, backend: Weak<dyn Backend>) -> io::Result<LocalServer> {
    let handle = tokio::runtime::Handle::try_current()
        .map_err(|_| io::Error::other("no tokio runtime to serve the admin socket on"))?;
    let socket = socket_path(dir)?;
    // A socket left by a holder that died: this process holds the lock now.
    let _ = std::fs::remove_file(&socket);
    let listener = {
        let _guard = handle.enter();
        UnixListener::bind(&socket)?
    };
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;
    let record = dir.join(RECORD);
    let tmp = dir.join(format!("{RECORD}.tmp"));
    std::fs::write(&tmp, socket.as_os_str().as_encoded_bytes())?;
    std::fs::rename(&tmp, &record)?;
    let (stop, mut stopped) = tokio::sync::oneshot::channel();
    let inflight = Arc::new(Counter::default());
    let counting = inflight.clone();
    handle.spawn(async move {
        loop {
            tokio::select! {
                _ = &mut stopped => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let guard = InFlight::new(&counting);
                        let backend = backend.clone();
                        tokio::spawn(answer(stream, backend, guard));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "admin socket: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
    });
    Ok(LocalServer {
        stop: Some(stop),
        inflight,
        socket,
        record,
    })
}

/// Requests in flight, and a wake-up when none are left.
#[derive(Debug, Default)]
struct Counter {
    n: AtomicUsize,
    idle: tokio::sync::Notify,
}

/// Counts a request as in flight while it lives.
struct InFlight(Arc<Counter>);

impl InFlight {
    fn new(c: &Arc<Counter>) -> InFlight {
        c.n.fetch_add(1, Ordering::AcqRel);
        InFlight(c.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.n.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Answers one request. The backend is kept until the answer is written and the request no
/// longer counts as in flight: the last handle of a backend may be this one (its process let
/// go of it meanwhile), and closing it waits for the requests in flight.
async fn answer(stream: UnixStream, backend: Weak<dyn Backend>, inflight: InFlight) {
    let mut held = None;
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_LINE));
    // A client that sends nothing for this long is dropped (it counts as in flight meanwhile).
    let read = tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await;
    let answer = match read
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "no request")))
    {
        Ok(0) => return,
        Ok(_) => match serde_json::from_str::<Request>(&line) {
            Ok(req) => match backend.upgrade() {
                Some(b) => {
                    // Taken: from here on the call may be applied. Before this line the client
                    // knows it was not (and may send it again elsewhere).
                    if write.write_all(TAKEN).await.is_err() {
                        return;
                    }
                    dispatch(&**held.insert(b), req).await
                }
                None => Answer::Err(WireError {
                    kind: CLOSING.into(),
                    message: "the holder is closing the directory; the call was not applied".into(),
                    limit: None,
                }),
            },
            Err(e) => Answer::Err(to_wire(&BackendError::new(
                NAME,
                BackendErrorKind::Invalid,
                format!("admin socket: unreadable request: {e}"),
            ))),
        },
        Err(e) => {
            tracing::debug!(error = %e, "admin socket: reading a request failed");
            return;
        }
    };
    let mut text = serde_json::to_string(&answer).unwrap_or_else(|e| {
        format!("{{\"err\":{{\"kind\":\"fatal\",\"message\":\"encoding the answer: {e}\",\"limit\":null}}}}")
    });
    text.push('\n');
    let _ = write.write_all(text.as_bytes()).await;
    let _ = write.shutdown().await;
    drop(inflight);
    drop(held);
}

fn ok<T: Serialize>(r: Result<T, BackendError>) -> Answer {
    match r {
        Ok(v) => match serde_json::to_value(v) {
            Ok(v) => Answer::Ok(v),
            Err(e) => Answer::Err(to_wire(&BackendError::new(
                NAME,
                BackendErrorKind::Fatal,
                format!("encoding the answer: {e}"),
            ))),
        },
        Err(e) => Answer::Err(to_wire(&e)),
    }
}

async fn dispatch(b: &dyn Backend, req: Request) -> Answer {
    use Request as R;
    match req {
        R::Publish { topic, batch } => ok(b.publish(&topic, batch).await),
        R::Join {
            topic,
            group,
            consumer,
            start,
        } => ok(b.join(&topic, &group, &consumer, start).await),
        R::Recover { sub, after, max } => ok(b.recover(&sub, after, max).await),
        R::Claim {
            sub,
            min_idle_ms,
            max,
        } => ok(b.claim(&sub, Duration::from_millis(min_idle_ms), max).await),
        R::Read { sub, max, wait_ms } => {
            // A remote read waits at most 5 s: the caller's connection is held meanwhile.
            let wait = Duration::from_millis(wait_ms).min(Duration::from_secs(5));
            ok(b.read(&sub, max, wait).await)
        }
        R::Settle { sub, batch } => ok(b.settle(&sub, &batch).await),
        R::StopMessage { topic, id } => ok(b.stop_message(&topic, id).await),
        R::ResumeMessage { topic, id } => ok(b.resume_message(&topic, id).await),
        R::Terminate { topic } => ok(b.terminate(&topic).await),
        R::CreateGroup {
            topic,
            group,
            start,
        } => ok(b.create_group(&topic, &group, start).await),
        R::DeleteGroup { topic, group } => ok(b.delete_group(&topic, &group).await),
        R::MoveGroup { topic, group, to } => ok(b.move_group(&topic, &group, to).await),
        R::Cleanup { topic, retention } => ok(b.cleanup(&topic, &retention.dry_run(false)).await),
        R::CleanupPreview { topic, retention } => {
            ok(b.cleanup(&topic, &retention.dry_run(true)).await)
        }
        R::Browse { topic, query } => ok(b.browse(&topic, &query).await),
        R::Locate { topic, id } => ok(b.locate(&topic, id).await),
        R::Health => ok(Ok::<_, BackendError>(b.health().await)),
        R::Topics => ok(b.topics().await),
        R::TopicInfo { topic } => ok(b.topic_info(&topic).await),
        R::DeadLetters { topic, query } => ok(b.dead_letters(&topic, &query).await),
        R::DeadLetter { topic, id } => ok(b.dead_letter(&topic, id).await),
        R::ReplayDeadLetters { topic, ids } => ok(b.replay_dead_letters(&topic, &ids).await),
        R::DeleteDeadLetters { topic, ids } => ok(b.delete_dead_letters(&topic, &ids).await),
        R::PurgeDeadLetters { topic, before } => ok(b.purge_dead_letters(&topic, before).await),
        R::DeadLetterStats { topic } => ok(b.dead_letter_stats(&topic).await),
        R::Processed { topic, group, key } => ok(b.processed(&topic, &group, &key).await),
        R::TakeTokens {
            topic,
            group,
            want,
            give_back,
            limit,
        } => ok(b.take_tokens(&topic, &group, want, give_back, limit).await),
        R::RecordProcessed { sub, key, ttl_ms } => ok(b
            .record_processed(&sub, &key, Duration::from_millis(ttl_ms))
            .await),
    }
}

/// A backend that forwards every call to the process holding a data directory. When that
/// process goes away (its socket refuses, or it answers that it is closing: the call was not
/// applied), this one takes the directory over (or finds the next holder) and carries on, so
/// short-lived processes sharing a directory never see "in use".
pub(crate) struct LocalClient {
    dir: PathBuf,
    config: EmbeddedConfig,
    socket: std::sync::Mutex<PathBuf>,
    /// The directory, once this process took it over.
    own: std::sync::Mutex<Option<Arc<dyn Backend>>>,
}

impl std::fmt::Debug for LocalClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalClient")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// What sending a request to the holder came to.
enum Sent<T> {
    /// An answer, or a failure after which the call may have been applied.
    Done(Result<T, BackendError>),
    /// Not applied: nobody listened, or the holder is closing.
    NotApplied(BackendError),
}

type Local<'a, T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, BackendError>> + Send + 'a>>;

fn recorded_socket(dir: &Path) -> Option<PathBuf> {
    let recorded = std::fs::read(dir.join(RECORD)).ok()?;
    Some(PathBuf::from(String::from_utf8(recorded).ok()?))
}

impl LocalClient {
    /// The holder of `dir`, if its record names a socket that answers.
    pub(crate) fn connect(dir: &Path, config: EmbeddedConfig) -> Option<LocalClient> {
        let socket = recorded_socket(dir)?;
        // A stale record (the holder was killed): nobody listens.
        std::os::unix::net::UnixStream::connect(&socket).ok()?;
        Some(LocalClient {
            dir: dir.to_owned(),
            config,
            socket: std::sync::Mutex::new(socket),
            own: std::sync::Mutex::new(None),
        })
    }

    fn own(&self) -> Option<Arc<dyn Backend>> {
        self.own.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Runs a call: on the holder, or on the directory itself once this process took it over.
    async fn run<'a, T: serde::de::DeserializeOwned>(
        &'a self,
        req: Request,
        local: impl FnOnce(Arc<dyn Backend>) -> Local<'a, T>,
    ) -> Result<T, BackendError> {
        let mut pause = Duration::from_millis(2);
        let mut last = None;
        for _ in 0..40 {
            if let Some(b) = self.own() {
                return local(b).await;
            }
            match self.send(&req).await {
                Sent::Done(r) => return r,
                Sent::NotApplied(e) => last = Some(e),
            }
            // The holder went away: take the directory over, or find who did.
            match EmbeddedBackend::open_with(&self.dir, self.config.clone()) {
                Ok(e) => {
                    tracing::debug!(dir = %self.dir.display(), "the holder went away; this process holds the directory now");
                    *self.own.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(e).share());
                }
                Err(_) => {
                    if let Some(s) = recorded_socket(&self.dir) {
                        *self.socket.lock().unwrap_or_else(|e| e.into_inner()) = s;
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(100));
                }
            }
        }
        Err(last.unwrap_or_else(|| unavailable("the data directory's holder could not be reached")))
    }

    async fn send<T: serde::de::DeserializeOwned>(&self, req: &Request) -> Sent<T> {
        let socket = self
            .socket
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let lost = |e: io::Error| {
            unavailable(format!(
                "the process holding the data directory did not answer on {}: {e}",
                socket.display()
            ))
        };
        let mut stream = match UnixStream::connect(&socket).await {
            Ok(s) => s,
            Err(e) => return Sent::NotApplied(lost(e)),
        };
        let mut text = match serde_json::to_string(req) {
            Ok(t) => t,
            Err(e) => {
                return Sent::Done(Err(BackendError::new(
                    NAME,
                    BackendErrorKind::Invalid,
                    format!("encoding a request: {e}"),
                )))
            }
        };
        text.push('\n');
        // A request the holder did not read whole is not applied (it acts on whole lines).
        if let Err(e) = stream.write_all(text.as_bytes()).await {
            return Sent::NotApplied(lost(e));
        }
        let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(stream, MAX_LINE));
        let mut line = String::new();
        // First the holder says it took the request (or answers at once: an error it did not
        // act on). Nothing before that: not applied.
        match tokio::time::timeout(ANSWER_TIMEOUT, reader.read_line(&mut line)).await {
            Ok(Ok(n)) if n > 0 => {}
            Ok(Ok(_)) => {
                return Sent::NotApplied(lost(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed before taking the request",
                )))
            }
            Ok(Err(e)) => return Sent::NotApplied(lost(e)),
            Err(_) => {
                return Sent::NotApplied(lost(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "did not take the request",
                )))
            }
        }
        if line.as_bytes() == TAKEN {
            line.clear();
            let n = match tokio::time::timeout(ANSWER_TIMEOUT, reader.read_line(&mut line)).await {
                Ok(Ok(n)) => n,
                Ok(Err(e)) => return Sent::Done(Err(lost(e))),
                Err(_) => 0,
            };
            if n == 0 {
                return Sent::Done(Err(unavailable(format!(
                    "the process holding the data directory took the call but gave no answer on {}; it may or may not have been applied",
                    socket.display()
                ))));
            }
        }
        let n = line.len();
        if n == 0 {
            return Sent::Done(Err(unavailable(format!(
                "the process holding the data directory stopped before answering on {}; the call may or may not have been applied",
                socket.display()
            ))));
        }
        let corrupt = |e: serde_json::Error| {
            BackendError::new(
                NAME,
                BackendErrorKind::Fatal,
                format!("unreadable answer from the holder: {e}"),
            )
        };
        match serde_json::from_str::<Answer>(&line) {
            Ok(Answer::Ok(v)) => Sent::Done(serde_json::from_value(v).map_err(corrupt)),
            Ok(Answer::Err(w)) if w.kind == CLOSING => Sent::NotApplied(unavailable(w.message)),
            Ok(Answer::Err(w)) => Sent::Done(Err(from_wire(w))),
            Err(e) => Sent::Done(Err(corrupt(e))),
        }
    }
}

/// The kind of the answer of a holder that is closing: the request was not applied.
const CLOSING: &str = "closing";

#[async_trait]
impl Backend for LocalClient {
    fn name(&self) -> &'static str {
        "embedded (through the process holding the directory)"
    }
    async fn publish(
        &self,
        topic: &str,
        batch: Vec<Outgoing>,
    ) -> Result<Vec<MessageId>, BackendError> {
        let req = Request::Publish {
            topic: topic.into(),
            batch: batch.clone(),
        };
        self.run(req, move |b| {
            Box::pin(async move { b.publish(topic, batch).await })
        })
        .await
    }
    async fn join(
        &self,
        topic: &str,
        group: &str,
        consumer: &str,
        start: StartPosition,
    ) -> Result<Subscription, BackendError> {
        let req = Request::Join {
            topic: topic.into(),
            group: group.into(),
            consumer: consumer.into(),
            start,
        };
        self.run(req, move |b| {
            Box::pin(async move { b.join(topic, group, consumer, start).await })
        })
        .await
    }
    async fn recover(
        &self,
        sub: &Subscription,
        after: MessageId,
        max: usize,
    ) -> Result<Vec<Delivery>, BackendError> {
        let req = Request::Recover {
            sub: sub.clone(),
            after,
            max,
        };
        self.run(req, move |b| {
            Box::pin(async move { b.recover(sub, after, max).await })
        })
        .await
    }
    async fn claim(
        &self,
        sub: &Subscription,
        min_idle: Duration,
        max: usize,
    ) -> Result<Vec<Delivery>, BackendError> {
        let min_idle_ms = u64::try_from(min_idle.as_millis()).unwrap_or(u64::MAX);
        let req = Request::Claim {
            sub: sub.clone(),
            min_idle_ms,
            max,
        };
        self.run(req, move |b| {
            Box::pin(async move { b.claim(sub, min_idle, max).await })
        })
        .await
    }
    async fn read(
        &self,
        sub: &Subscription,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Delivery>, BackendError> {
        let wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
        let req = Request::Read {
            sub: sub.clone(),
            max,
            wait_ms,
        };
        self.run(req, move |b| {
            Box::pin(async move { b.read(sub, max, wait).await })
        })
        .await
    }
    async fn settle(&self, sub: &Subscription, batch: &[Settlement]) -> Result<(), BackendError> {
        let req = Request::Settle {
            sub: sub.clone(),
            batch: batch.to_vec(),
        };
        self.run(req, move |b| {
            Box::pin(async move { b.settle(sub, batch).await })
        })
        .await
    }
    async fn stop_message(&self, topic: &str, id: MessageId) -> Result<bool, BackendError> {
        let req = Request::StopMessage {
            topic: topic.into(),
            id,
        };
        self.run(req, move |b| {
            Box::pin(async move { b.stop_message(topic, id).await })
        })
        .await
    }
    async fn resume_message(&self, topic: &str, id: MessageId) -> Result<bool, BackendError> {
        let req = Request::ResumeMessage {
            topic: topic.into(),
            id,
        };
        self.run(req, move |b| {
            Box::pin(async move { b.resume_message(topic, id).await })
        })
        .await
    }
    async fn terminate(&self, topic: &str) -> Result<bool, BackendError> {
        let req = Request::Terminate {
            topic: topic.into(),
        };
        self.run(req, move |b| {
            Box::pin(async move { b.terminate(topic).await })
        })
        .await
    }
    async fn create_group(
        &self,
        topic: &str,
        group: &str,
        start: StartPosition,
    ) -> Result<bool, BackendError> {
        let req = Request::CreateGroup {
            topic: topic.into(),
            group: group.into(),
            start,
        };
        self.run(req, move |b| {
            Box::pin(async move { b.create_group(topic, group, start).await })
        })
        .await
    }
    async fn delete_group(&self, topic: &str, group: &str) -> Result<bool, BackendError> {
        let req = Request::DeleteGroup {
            topic: topic.into(),
            group: group.into(),
        };
        self.run(req, move |b| {
            Box::pin(async move { b.delete_group(topic, group).await })
        })
        .await
    }
    async fn move_group(
        &self,
        topic: &str,
        group: &str,
        to: StartPosition,
    ) -> Result<bool, BackendError> {
        let req = Request::MoveGroup {
            topic: topic.into(),
            group: group.into(),
            to,
        };
        self.run(req, move |b| {
            Box::pin(async move { b.move_group(topic, group, to).await })
        })
        .await
    }
    async fn cleanup(
        &self,
        topic: &str,
        retention: &Retention,
    ) -> Result<CleanupReport, BackendError> {
        let req = match retention.dry_run {
            true => Request::CleanupPreview {
                topic: topic.into(),
                retention: retention.clone(),
            },
            false => Request::Cleanup {
                topic: topic.into(),
                retention: retention.clone(),
            },
        };
        self.run(req, move |b| {
            Box::pin(async move { b.cleanup(topic, retention).await })
        })
        .await
    }
    async fn browse(
        &self,
        topic: &str,
        query: &Browse,
    ) -> Result<Option<Vec<Message>>, BackendError> {
        let req = Request::Browse {
            topic: topic.into(),
            query: *query,
        };
        self.run(req, move |b| {
            Box::pin(async move { b.browse(topic, query).await })
        })
        .await
    }
    async fn locate(
        &self,
        topic: &str,
        id: MessageId,
    ) -> Result<Option<Vec<GroupPlacement>>, BackendError> {
        let req = Request::Locate {
            topic: topic.into(),
            id,
        };
        self.run(req, move |b| {
            Box::pin(async move { b.locate(topic, id).await })
        })
        .await
    }
    async fn health(&self) -> Health {
        let r = self
            .run(Request::Health, |b| {
                Box::pin(async move { Ok(b.health().await) })
            })
            .await;
        r.unwrap_or_else(|e| {
            Health::new(
                "embedded",
                vec![relq_core::HealthCheck::new("backend", false, e.to_string())],
            )
        })
    }
    async fn close(&self) {
        let own = self.own.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(b) = own {
            b.close().await;
        }
    }
    async fn topics(&self) -> Result<Vec<String>, BackendError> {
        self.run(Request::Topics, |b| {
            Box::pin(async move { b.topics().await })
        })
        .await
    }
    async fn topic_info(&self, topic: &str) -> Result<Option<TopicInfo>, BackendError> {
        let req = Request::TopicInfo {
            topic: topic.into(),
        };
        self.run(req, move |b| {
            Box::pin(async move { b.topic_info(topic).await })
        })
        .await
    }
    async fn dead_letters(
        &self,
        topic: &str,
        query: &DeadLetterQuery,
    ) -> Result<Vec<DeadLetter>, BackendError> {
        let req = Request::DeadLetters {
            topic: topic.into(),
            query: query.clone(),
        };
        self.run(req, move |b| {
            Box::pin(async move { b.dead_letters(topic, query).await })
        })
        .await
    }
    async fn dead_letter(
        &self,
        topic: &str,
        id: DeadLetterId,
    ) -> Result<Option<DeadLetter>, BackendError> {
        let req = Request::DeadLetter {
            topic: topic.into(),
            id,
        };
        self.run(req, move |b| {
            Box::pin(async move { b.dead_letter(topic, id).await })
        })
        .await
    }
    async fn replay_dead_letters(
        &self,
        topic: &str,
        ids: &[DeadLetterId],
    ) -> Result<Vec<(DeadLetterId, MessageId)>, BackendError> {
        let req = Request::ReplayDeadLetters {
            topic: topic.into(),
            ids: ids.to_vec(),
        };
        self.run(req, move |b| {
            Box::pin(async move { b.replay_dead_letters(topic, ids).await })
        })
        .await
    }
    async fn delete_dead_letters(
        &self,
        topic: &str,
        ids: &[DeadLetterId],
    ) -> Result<u64, BackendError> {
        let req = Request::DeleteDeadLetters {
            topic: topic.into(),
            ids: ids.to_vec(),
        };
        self.run(req, move |b| {
            Box::pin(async move { b.delete_dead_letters(topic, ids).await })
        })
        .await
    }
    async fn purge_dead_letters(
        &self,
        topic: &str,
        before: Timestamp,
    ) -> Result<u64, BackendError> {
        let req = Request::PurgeDeadLetters {
            topic: topic.into(),
            before,
        };
        self.run(req, move |b| {
            Box::pin(async move { b.purge_dead_letters(topic, before).await })
        })
        .await
    }
    async fn dead_letter_stats(&self, topic: &str) -> Result<DeadLetterStats, BackendError> {
        let req = Request::DeadLetterStats {
            topic: topic.into(),
        };
        self.run(req, move |b| {
            Box::pin(async move { b.dead_letter_stats(topic).await })
        })
        .await
    }
    async fn processed(&self, topic: &str, group: &str, key: &str) -> Result<bool, BackendError> {
        let req = Request::Processed {
            topic: topic.into(),
            group: group.into(),
            key: key.into(),
        };
        self.run(req, move |b| {
            Box::pin(async move { b.processed(topic, group, key).await })
        })
        .await
    }
    async fn record_processed(
        &self,
        sub: &Subscription,
        key: &str,
        ttl: Duration,
    ) -> Result<(), BackendError> {
        let req = Request::RecordProcessed {
            sub: sub.clone(),
            key: key.into(),
            ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
        };
        self.run(req, move |b| {
            Box::pin(async move { b.record_processed(sub, key, ttl).await })
        })
        .await
    }
    async fn take_tokens(
        &self,
        topic: &str,
        group: &str,
        want: u32,
        give_back: u32,
        limit: relq_core::RateLimit,
    ) -> Result<relq_core::Grant, BackendError> {
        let req = Request::TakeTokens {
            topic: topic.into(),
            group: group.into(),
            want,
            give_back,
            limit,
        };
        self.run(req, move |b| {
            Box::pin(async move { b.take_tokens(topic, group, want, give_back, limit).await })
        })
        .await
    }
}
