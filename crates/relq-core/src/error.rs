//! Errors. Every fallible public operation returns [`Error`]; backends return [`BackendError`].

/// A name (topic, group, consumer, message type) was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} name {:?}: {reason}", crate::model::shorten(name))]
pub struct NameError {
    pub(crate) what: &'static str,
    pub(crate) name: String,
    pub(crate) reason: &'static str,
}

/// A configuration value was rejected by a builder.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {field}: {reason}")]
pub struct ConfigError {
    pub(crate) field: &'static str,
    pub(crate) reason: String,
}

impl ConfigError {
    /// `field` (as a user writes it: a builder method or a configuration key) was rejected
    /// because of `reason`.
    pub fn new(field: &'static str, reason: impl Into<String>) -> ConfigError {
        ConfigError {
            field,
            reason: reason.into(),
        }
    }

    /// The rejected field, as a user writes it.
    pub fn field(&self) -> &'static str {
        self.field
    }

    /// Why it was rejected.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

/// What kind of backend failure happened; decides what the caller can do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BackendErrorKind {
    /// The backend cannot be reached or refused the operation for now; retrying may succeed.
    Unavailable,
    /// The topic was terminated while the operation ran (or the caller's view of it is from before
    /// a terminate).
    Terminated,
    /// The consumer's group was deleted while it ran (see `Broker::delete_group`).
    GroupDeleted,
    /// The backend is at capacity.
    Full,
    /// Stored data failed validation.
    Corrupt,
    /// The backend refused the request as invalid.
    Invalid,
    /// The backend is poisoned after a fatal error and must be reopened.
    Fatal,
}

/// Which limit a full backend reached ([`BackendErrorKind::Full`], [`Error::Full`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Limit {
    /// The disk under the data directory has no room (the embedded engine).
    Disk,
    /// The backend's configured message capacity (the in-memory backend's `capacity`).
    Capacity,
    /// The server's memory limit (Redis `maxmemory`).
    Memory,
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Limit::Disk => "disk space",
            Limit::Capacity => "message capacity",
            Limit::Memory => "server memory",
        })
    }
}

/// An error reported by a backend.
#[derive(Debug, thiserror::Error)]
#[error("{backend} backend: {message}")]
pub struct BackendError {
    /// What kind of failure it is.
    pub kind: BackendErrorKind,
    /// The backend's name.
    pub backend: &'static str,
    /// What happened, for a human.
    pub message: String,
    limit: Option<Limit>,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl BackendError {
    /// Creates an error.
    pub fn new(backend: &'static str, kind: BackendErrorKind, message: impl Into<String>) -> Self {
        BackendError {
            kind,
            backend,
            message: message.into(),
            limit: None,
            source: None,
        }
    }

    /// A [`Full`](BackendErrorKind::Full) error: `limit` was reached.
    pub fn full(backend: &'static str, limit: Limit, message: impl Into<String>) -> Self {
        BackendError {
            limit: Some(limit),
            ..BackendError::new(backend, BackendErrorKind::Full, message)
        }
    }

    /// For a [`Full`](BackendErrorKind::Full) error, which limit was reached.
    pub fn limit(&self) -> Option<Limit> {
        self.limit
    }

    /// Attaches the underlying cause.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Whether retrying the same operation later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self.kind,
            BackendErrorKind::Unavailable | BackendErrorKind::Full
        )
    }
}

/// The error of every relq operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A topic, group, consumer or message-type name was rejected.
    #[error(transparent)]
    Name(#[from] NameError),
    /// A configuration value was rejected.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A message id could not be parsed; ids look like `1700000000000-0`.
    #[error("invalid message id {0:?}: expected <milliseconds>-<sequence>, e.g. 1700000000000-0")]
    InvalidId(String),
    /// A header name uses the `relq-` prefix, which relq reserves.
    #[error("header {0:?} uses the reserved prefix \"relq-\"")]
    ReservedHeader(String),
    /// The payload is larger than the broker accepts; nothing was published.
    #[error("payload of {size} bytes exceeds the limit of {max} bytes; nothing was published")]
    PayloadTooLarge {
        /// The payload size.
        size: usize,
        /// The configured limit.
        max: usize,
    },
    /// The backend reached a limit (and, where it waits for room, stayed full for the whole
    /// publish timeout); nothing was published.
    #[error("topic {topic:?} is full ({detail}); nothing was published: consume or clean up the topic, or raise the limit")]
    Full {
        /// The topic.
        topic: String,
        /// Which limit, when the backend says.
        limit: Option<Limit>,
        /// The backend's account of the limit and how long it waited.
        detail: String,
    },
    /// The topic was terminated.
    #[error("topic {0:?} was terminated")]
    Terminated(String),
    /// A header is invalid or over a limit (see [`MAX_HEADERS`](crate::MAX_HEADERS)); nothing
    /// was published.
    #[error("invalid header {name:?}: {reason}; nothing was published")]
    InvalidHeader {
        /// The header's name (shortened when long; empty when the headers as a whole are over
        /// a limit).
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A payload could not be encoded (a typed publish's codec, or its compression failed);
    /// nothing was published.
    #[error("the payload could not be encoded: {0}; nothing was published")]
    Encode(String),
    /// No such item.
    #[error("{0} not found")]
    NotFound(NotFound),
    /// The URL names no backend this build supports.
    #[error("unsupported backend URL {url:?}: {reason}")]
    UnsupportedUrl {
        /// The URL given.
        url: String,
        /// Why it is not supported.
        reason: String,
    },
    /// The backend failed.
    #[error(transparent)]
    Backend(BackendError),
}

impl From<BackendError> for Error {
    fn from(e: BackendError) -> Self {
        Error::Backend(e)
    }
}

/// What [`Error::NotFound`] did not find.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum NotFound {
    /// The topic does not exist (never published to, or terminated).
    Topic(String),
    /// No dead letter with this id in the topic.
    DeadLetter {
        /// The topic.
        topic: String,
        /// The dead letter's id.
        id: crate::DeadLetterId,
    },
    /// No stored message with this id in the topic (never published, or removed by retention).
    Message {
        /// The topic.
        topic: String,
        /// The message id.
        id: crate::MessageId,
    },
}

impl std::fmt::Display for NotFound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotFound::Topic(t) => write!(f, "topic {:?}", crate::model::shorten(t)),
            NotFound::DeadLetter { topic, id } => {
                write!(
                    f,
                    "dead letter {id} in topic {:?}",
                    crate::model::shorten(topic)
                )
            }
            NotFound::Message { topic, id } => {
                write!(
                    f,
                    "message {id} in topic {:?}",
                    crate::model::shorten(topic)
                )
            }
        }
    }
}

/// `Result<T, relq::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;
