//! Key names and the protocol's ids: streams, groups, the topic registry, cursors.

use std::time::Duration;

use relq_core::{MessageId, StartPosition};

/// The set listing topic names.
pub(crate) const REGISTRY: &str = "relq:topics";

pub(crate) fn prefix(topic: &str) -> String {
    format!("relq:{{{topic}}}:")
}

/// The prefix of group `group`'s keys under topic prefix `pre` (the scripts' `gk`).
pub(crate) fn group_prefix(pre: &str, group: &str) -> String {
    format!("{pre}g:{group}:")
}

/// A `SCAN MATCH` pattern for every topic's stream key (braces are literal in Redis globs).
pub(crate) const STREAM_KEY_PATTERN: &str = "relq:{*}:s";

pub(crate) fn stream_key(topic: &str) -> String {
    format!("relq:{{{topic}}}:s")
}

/// A message id as a command argument, written straight into the command (no `String` per
/// id on the ack path).
pub(crate) struct IdArg(pub(crate) MessageId);

impl ::redis::ToRedisArgs for IdArg {
    fn write_redis_args<W>(&self, out: &mut W)
    where
        W: ?Sized + ::redis::RedisWrite,
    {
        use std::io::Write as _;
        // Writing into the command's own buffer cannot fail.
        let _ = write!(out.writer_for_next_arg(), "{}-{}", self.0.ms, self.0.seq);
    }
}

/// `XREADGROUP`'s id for "messages never delivered to this group".
pub(crate) const NEVER_DELIVERED: &str = ">";
/// `XGROUP CREATE`'s id for "after the last entry" (the stream's end).
const STREAM_END: &str = "$";
/// The id before every entry (a group created here reads from the start); also `SCAN`'s first
/// and last cursor.
pub(crate) const ORIGIN: &str = "0";

/// The cursor that makes `id` the next id read (`XGROUP CREATE` takes the last id read).
pub(crate) fn before(id: MessageId) -> String {
    if id.seq > 0 {
        MessageId::new(id.ms, id.seq - 1).to_string()
    } else if id.ms > 0 {
        format!("{}-{}", id.ms - 1, u64::MAX)
    } else {
        ORIGIN.to_owned()
    }
}

/// The id `XGROUP` takes for a start position: the last id already read.
pub(crate) fn start_id(start: StartPosition) -> String {
    match start {
        StartPosition::Latest => STREAM_END.to_owned(),
        StartPosition::Earliest => ORIGIN.to_owned(),
        StartPosition::From(id) => before(id),
    }
}

/// A duration as the whole milliseconds Redis takes (a signed 64-bit count), saturating: a
/// caller's `Duration::MAX` is "forever", not an overflow or a rejected command.
pub(crate) fn redis_millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).map_or(i64::MAX as u64, |ms| ms.min(i64::MAX as u64))
}
