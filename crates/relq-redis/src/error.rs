//! Redis errors as relq's: what is transient, what is damage, what a script's error code means.

use ::redis::RedisError;

use relq_core::{BackendError, BackendErrorKind, Limit};

use super::NAME;

pub(crate) fn err(kind: BackendErrorKind, message: impl Into<String>) -> BackendError {
    BackendError::new(NAME, kind, message)
}

pub(crate) fn corrupt(what: impl std::fmt::Display) -> BackendError {
    err(
        BackendErrorKind::Corrupt,
        format!("unexpected reply from Redis: {what}"),
    )
}

/// Whether a failed call may succeed if tried again.
fn transient(e: &RedisError) -> bool {
    if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() || e.is_connection_refusal() {
        return true;
    }
    matches!(
        e.code(),
        Some("LOADING" | "TRYAGAIN" | "BUSY" | "CLUSTERDOWN" | "MASTERDOWN" | "READONLY")
    )
}

/// The error code scripts reply with when the topic was terminated (`redis.error_reply`).
const TERMINATED_CODE: &str = "RELQ_TERMINATED";
/// The scripts' error code for a group an operator deleted.
const GROUP_DELETED_CODE: &str = "RELQ_GROUP_DELETED";

/// The Redis error code behind a mapped error, if it came from a server reply.
pub(crate) fn redis_code(e: &BackendError) -> Option<&str> {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<RedisError>())
        .and_then(RedisError::code)
}

pub(crate) fn map_err(e: RedisError) -> BackendError {
    let text = e.to_string();
    // The scripts' own error code; matched as the code, never searched for in the text, which
    // can hold key names (a topic may be called RELQ_TERMINATED).
    if e.code() == Some(TERMINATED_CODE) {
        return err(BackendErrorKind::Terminated, "the topic was terminated");
    }
    if e.code() == Some(GROUP_DELETED_CODE) {
        return err(BackendErrorKind::GroupDeleted, "the group was deleted");
    }
    // A MULTI/EXEC aborted by an error inside reports EXECABORT; then look at the cause in the
    // text (only then: elsewhere the text can hold key names such as a topic called "ROOM").
    let aborted = e.code() == Some("EXECABORT") || text.starts_with("EXECABORT");
    let has = |code: &str| e.code() == Some(code) || (aborted && text.contains(code));
    // A cluster slot that moved, seen inside a transaction (the client follows a redirect for a
    // single command or script, not for an aborted MULTI/EXEC): the next call, a script, is
    // redirected and refreshes the slot map. Matched as a word of the reply.
    let redirected = matches!(e.code(), Some("MOVED" | "ASK"))
        || (aborted
            && text
                .split_whitespace()
                .any(|w| matches!(w, "MOVED" | "ASK" | "-MOVED" | "-ASK")));
    let kind = if has("OOM") {
        BackendErrorKind::Full
    } else if transient(&e)
        || redirected
        || [
            "LOADING",
            "READONLY",
            "MASTERDOWN",
            "CLUSTERDOWN",
            "TRYAGAIN",
        ]
        .iter()
        .any(|c| has(c))
    {
        BackendErrorKind::Unavailable
    } else if has("WRONGTYPE") {
        BackendErrorKind::Corrupt
    } else if e.code().is_some() {
        // Any other server error (NOPERM, NOAUTH, ERR from a command or a script) is not going
        // to go away by itself: retrying would spin.
        BackendErrorKind::Invalid
    } else {
        BackendErrorKind::Unavailable
    };
    if kind == BackendErrorKind::Full {
        let message = format!("Redis is out of memory (maxmemory reached): {text}");
        return BackendError::full(NAME, Limit::Memory, message).with_source(e);
    }
    err(kind, text).with_source(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_classified_by_their_code_not_their_text() {
        let terminated = ::redis::make_extension_error(
            TERMINATED_CODE.into(),
            Some("the topic was terminated".into()),
        );
        assert_eq!(map_err(terminated).kind, BackendErrorKind::Terminated);
        // A key name in the text (a topic called RELQ_TERMINATED or OOM) says nothing.
        let nogroup = ::redis::make_extension_error(
            "NOGROUP".into(),
            Some("No such key 'relq:{RELQ_TERMINATED}:s' or consumer group 'OOM'".into()),
        );
        let e = map_err(nogroup);
        assert_eq!(e.kind, BackendErrorKind::Invalid);
        assert_eq!(redis_code(&e), Some("NOGROUP"));
        let noperm = ::redis::make_extension_error(
            "NOPERM".into(),
            Some("User x has no permissions to run the 'info' command".into()),
        );
        assert_eq!(redis_code(&map_err(noperm)), Some("NOPERM"));
        // A slot that moved during a transaction: transient, the next call is redirected.
        let moved = ::redis::make_extension_error(
            "EXECABORT".into(),
            Some("Transaction discarded because of: MOVED 3999 127.0.0.1:7002".into()),
        );
        assert_eq!(map_err(moved).kind, BackendErrorKind::Unavailable);
        let ask = ::redis::make_extension_error("ASK".into(), Some("3999 127.0.0.1:7002".into()));
        assert_eq!(map_err(ask).kind, BackendErrorKind::Unavailable);
        // A key named like a redirect in another aborted transaction's text is not one.
        let wrongtype = ::redis::make_extension_error(
            "EXECABORT".into(),
            Some("Transaction discarded because of: WRONGTYPE key relq:{MOVEDASK}:s".into()),
        );
        assert_eq!(map_err(wrongtype).kind, BackendErrorKind::Corrupt);
    }
}
