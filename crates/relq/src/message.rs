//! A message to publish, and its checks before a backend sees it.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;

use relq_core::{
    shorten, validate_headers, validate_kind, Outgoing, Timestamp, RESERVED_HEADER_PREFIX,
};
use relq_core::{Error, Result};

/// A message to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use = "a message does nothing until it is published"]
pub struct NewMessage {
    pub(crate) kind: String,
    pub(crate) payload: Bytes,
    pub(crate) headers: BTreeMap<String, String>,
    pub(crate) deliver_at: Option<Timestamp>,
    pub(crate) delay: Option<Duration>,
}

impl NewMessage {
    /// A message of type `kind` (which routes it to a handler) carrying `payload`.
    pub fn new(kind: impl Into<String>, payload: impl Into<Bytes>) -> NewMessage {
        NewMessage {
            kind: kind.into(),
            payload: payload.into(),
            headers: BTreeMap::new(),
            deliver_at: None,
            delay: None,
        }
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> NewMessage {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Delivers the message at or after `at`.
    pub fn deliver_at(mut self, at: Timestamp) -> NewMessage {
        self.deliver_at = Some(at);
        self
    }

    /// Delivers the message at or after `delay` from the moment it is published.
    pub fn delay(mut self, delay: Duration) -> NewMessage {
        self.delay = Some(delay);
        self
    }

    /// The message type.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The payload.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// The headers.
    pub fn headers(&self) -> &BTreeMap<String, String> {
        &self.headers
    }
}

impl NewMessage {
    /// The message as a backend stores it, once checked: a valid type, a payload of at most
    /// `max_payload` bytes, valid headers none of which is reserved; a delay becomes a time.
    pub(crate) fn prepare(self, max_payload: usize) -> Result<Outgoing> {
        validate_kind(&self.kind)?;
        if self.payload.len() > max_payload {
            return Err(Error::PayloadTooLarge {
                size: self.payload.len(),
                max: max_payload,
            });
        }
        if let Some(h) = self
            .headers
            .keys()
            .find(|h| h.starts_with(RESERVED_HEADER_PREFIX))
        {
            return Err(Error::ReservedHeader(shorten(h)));
        }
        validate_headers(&self.headers)?;
        let deliver_at = match (self.deliver_at, self.delay) {
            (Some(at), _) => Some(at),
            (None, Some(d)) => Some(Timestamp::now().plus(d)),
            (None, None) => None,
        };
        Ok(Outgoing {
            kind: self.kind,
            payload: self.payload,
            headers: self.headers,
            deliver_at,
        })
    }
}
