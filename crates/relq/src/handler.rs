//! Handlers and their typed errors.

use std::backtrace::{Backtrace, BacktraceStatus};
use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;

use relq_core::Message;

type BoxError = Box<dyn StdError + Send + Sync + 'static>;

tokio::task_local! {
    /// Set by the runtime around a handler when the consumer has `include_stack_trace` on, so a
    /// `HandlerError` created inside captures a backtrace; otherwise none is captured (capturing
    /// costs microseconds to milliseconds per error).
    pub(crate) static CAPTURE_BACKTRACE: bool;
}

fn capture() -> Backtrace {
    if CAPTURE_BACKTRACE.try_with(|c| *c).unwrap_or(false) {
        Backtrace::force_capture()
    } else {
        Backtrace::disabled()
    }
}

/// Why a handler failed: decides between "retry" and "dead-letter at once".
///
/// Any `std::error::Error` converts into a *retryable* `HandlerError` with `?`. Use
/// [`HandlerError::permanent`] for failures a retry cannot fix (validation, a malformed payload).
pub struct HandlerError {
    permanent: bool,
    error: BoxError,
    category: Option<String>,
    backtrace: Backtrace,
}

impl HandlerError {
    /// A failure that may succeed on retry.
    pub fn retryable(error: impl Into<BoxError>) -> HandlerError {
        HandlerError {
            permanent: false,
            error: error.into(),
            category: None,
            backtrace: capture(),
        }
    }

    /// A failure no retry can fix: the message is dead-lettered at once.
    pub fn permanent(error: impl Into<BoxError>) -> HandlerError {
        HandlerError {
            permanent: true,
            ..HandlerError::retryable(error)
        }
    }

    /// Tags the failure with a category ("database", "external_api", ...) that dead-letter
    /// statistics and filters group by.
    pub fn category(mut self, category: impl Into<String>) -> HandlerError {
        self.category = Some(category.into());
        self
    }

    /// Whether the failure is permanent.
    pub fn is_permanent(&self) -> bool {
        self.permanent
    }

    /// The category, if set.
    pub fn category_name(&self) -> Option<&str> {
        self.category.as_deref()
    }

    /// The error and its sources, outermost first.
    pub fn chain(&self) -> Vec<String> {
        let mut out = vec![self.error.to_string()];
        let mut cur = self.error.source();
        while let Some(e) = cur {
            out.push(e.to_string());
            cur = e.source();
        }
        out
    }

    /// The backtrace captured when the error was created inside a handler of a consumer with
    /// `include_stack_trace` on.
    pub fn backtrace(&self) -> Option<String> {
        (self.backtrace.status() == BacktraceStatus::Captured).then(|| self.backtrace.to_string())
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("permanent", &self.permanent)
            .field("error", &self.error)
            .field("category", &self.category)
            .finish()
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.error, f)
    }
}

impl<E: StdError + Send + Sync + 'static> From<E> for HandlerError {
    fn from(e: E) -> Self {
        HandlerError::retryable(e)
    }
}

/// Processes one message. Closures `Fn(Message) -> impl Future<Output = Result<(), HandlerError>>`
/// implement it; a type of your own implements it with an `async fn handle`:
///
/// ```
/// use relq::{Broker, Handler, HandlerError, Message};
///
/// struct Orders {
///     min_len: usize,
/// }
///
/// impl Handler for Orders {
///     async fn handle(&self, message: Message) -> Result<(), HandlerError> {
///         if message.payload.len() < self.min_len {
///             return Err(HandlerError::permanent(std::io::Error::other("too short")));
///         }
///         Ok(())
///     }
/// }
///
/// # fn main() -> Result<(), relq::Error> {
/// let consumer = Broker::memory()
///     .consumer("orders", "billing")
///     .handler("order.created", Orders { min_len: 2 })
///     .build()?;
/// # let _ = consumer;
/// # Ok(())
/// # }
/// ```
///
/// The consumer polls each handler's futures where they are (no box per message), so a
/// handler's future must be `Send`.
pub trait Handler: Send + Sync + 'static {
    /// Handles `message`. `Ok` acknowledges it.
    fn handle(&self, message: Message) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

impl<F, Fut> Handler for F
where
    F: Fn(Message) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    fn handle(&self, message: Message) -> impl Future<Output = Result<(), HandlerError>> + Send {
        self(message)
    }
}

/// Processes messages of one type in batches. Returns one result per message, in order, so one
/// bad message does not fail the others. Closures
/// `Fn(Vec<Message>) -> impl Future<Output = Vec<Result<(), HandlerError>>>` implement it.
#[async_trait]
pub trait BatchHandler: Send + Sync + 'static {
    /// Handles `messages`; returns a result for each.
    async fn handle_batch(&self, messages: Vec<Message>) -> Vec<Result<(), HandlerError>>;
}

#[async_trait]
impl<F, Fut> BatchHandler for F
where
    F: Fn(Vec<Message>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Vec<Result<(), HandlerError>>> + Send + 'static,
{
    async fn handle_batch(&self, messages: Vec<Message>) -> Vec<Result<(), HandlerError>> {
        self(messages).await
    }
}

/// How a batch handler's batches are formed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct BatchConfig {
    /// A batch runs as soon as it holds this many messages. Default 10.
    pub size: usize,
    /// A partial batch runs when no message joined it for this long. Default 500 ms.
    pub timeout: Duration,
    /// A partial batch runs at the latest this long after its first message. Default 2 s.
    pub max_wait: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            size: 10,
            timeout: Duration::from_millis(500),
            max_wait: Duration::from_secs(2),
        }
    }
}

impl BatchConfig {
    /// Sets the batch size.
    pub fn size(mut self, size: usize) -> Self {
        self.size = size;
        self
    }
    /// Sets the idle timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
    /// Sets the maximum wait.
    pub fn max_wait(mut self, max_wait: Duration) -> Self {
        self.max_wait = max_wait;
        self
    }
}
