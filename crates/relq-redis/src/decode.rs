//! Decoding replies: stream entries into messages and deliveries, stored dead letters, and
//! whatever a damaged key or a hostile server returns instead (an error, never a panic).

use std::collections::{BTreeMap, HashMap};

use ::redis::Value;
use bytes::Bytes;

use relq_core::{
    BackendError, BackendErrorKind, DeadLetter, Delivery, Message, MessageId, Outgoing, Timestamp,
};

use super::error::{corrupt, err};

/// Header set on a message whose stored entry could not be decoded.
const HEADER_MALFORMED: &str = "relq-malformed";
/// The message type given to an entry without a readable `type` field; no handler is registered
/// for it unless the user does so, so it is dead-lettered with the reason in its headers.
const MALFORMED_KIND: &str = "relq.malformed";

/// The `host:port` of every primary in a `CLUSTER NODES` reply (flags include `master`, not
/// `fail`).
pub(crate) fn cluster_primaries(nodes: &str) -> Vec<(String, u16)> {
    nodes
        .lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let (_id, addr, flags) = (f.next()?, f.next()?, f.next()?);
            let flags: Vec<&str> = flags.split(',').collect();
            if !flags.contains(&"master") || flags.iter().any(|f| f.starts_with("fail")) {
                return None;
            }
            // host:port@cport[,hostname]
            let hostport = addr.split(['@', ',']).next()?;
            let (host, port) = hostport.rsplit_once(':')?;
            Some((host.trim_matches(['[', ']']).to_owned(), port.parse().ok()?))
        })
        .collect()
}

pub(crate) fn items(v: Value) -> Vec<Value> {
    match v {
        Value::Array(a) | Value::Set(a) => a,
        Value::Map(m) => m.into_iter().flat_map(|(k, v)| [k, v]).collect(),
        _ => Vec::new(),
    }
}

pub(crate) fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        Value::Okay => Some("OK".into()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

/// Every text in a reply, through nested arrays and maps.
pub(crate) fn flatten_text(v: Value, out: &mut Vec<String>) {
    match v {
        Value::Array(_) | Value::Set(_) | Value::Map(_) => {
            for v in items(v) {
                flatten_text(v, out);
            }
        }
        other => out.extend(text(&other)),
    }
}

pub(crate) fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        other => text(other)?.parse().ok(),
    }
}

pub(crate) fn id_of(v: &Value) -> Result<MessageId, BackendError> {
    let s = text(v).ok_or_else(|| corrupt(format!("{v:?} is not an id")))?;
    s.parse()
        .map_err(|_| corrupt(format!("{s:?} is not an id")))
}

/// A key/value reply (RESP2 flat array or RESP3 map) as a map by key name.
pub(crate) fn fields_map(v: Value) -> HashMap<String, Value> {
    let mut out = HashMap::new();
    let mut it = items(v).into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        if let Some(k) = text(&k) {
            out.insert(k, v);
        }
    }
    out
}

/// Decodes a stream entry's fields into a message. An entry that cannot be decoded becomes a
/// message of type [`MALFORMED_KIND`] with the reason in a header, so it is dead-lettered and
/// visible rather than lost or looping.
pub(crate) fn message_of(id: MessageId, fields: Value, attempt: u32) -> Message {
    let mut kind = None;
    let mut payload = Bytes::new();
    let mut headers = BTreeMap::new();
    let mut deliver_at = None;
    let mut problems = Vec::new();
    let mut it = items(fields).into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        // Field names compared as bytes: no allocation per field.
        let key: &[u8] = match &k {
            Value::BulkString(b) => b,
            Value::SimpleString(s) => s.as_bytes(),
            _ => b"",
        };
        match key {
            b"type" => {
                kind = match v {
                    Value::BulkString(b) => String::from_utf8(b).ok(),
                    other => text(&other),
                }
            }
            b"data" => {
                if let Value::BulkString(b) = v {
                    payload = Bytes::from(b);
                }
            }
            b"headers" => match text(&v).map(|s| serde_json::from_str(&s)) {
                Some(Ok(h)) => headers = h,
                _ => problems.push("the headers field is not a JSON object of strings"),
            },
            b"deliver_at" => match int(&v) {
                Some(ms) if ms >= 0 => deliver_at = Some(Timestamp(ms as u64)),
                _ => problems.push("the deliver_at field is not a number of milliseconds"),
            },
            _ => {}
        }
    }
    let kind = match kind {
        Some(k) if relq_core::validate_kind(&k).is_ok() => k,
        _ => {
            problems.push("the type field is missing or invalid");
            MALFORMED_KIND.to_owned()
        }
    };
    let kind = if problems.is_empty() {
        kind
    } else {
        headers.insert(HEADER_MALFORMED.to_owned(), problems.join("; "));
        MALFORMED_KIND.to_owned()
    };
    let stored = Outgoing {
        kind,
        payload,
        headers,
        deliver_at,
        dedup_window: None,
    };
    Message::new(id, stored, Timestamp(id.ms), attempt)
}

/// Parses `{id, deliveries, fields, failures|false}` entries.
pub(crate) fn deliveries(v: Value) -> Result<Vec<Delivery>, BackendError> {
    items(v)
        .into_iter()
        .map(|d| {
            let mut parts = items(d).into_iter();
            let (Some(id), Some(n), Some(fields)) = (parts.next(), parts.next(), parts.next())
            else {
                return Err(corrupt("a delivery with fewer than 3 parts"));
            };
            let id = id_of(&id)?;
            let attempt = int(&n).ok_or_else(|| corrupt("a delivery count"))? as u32;
            let failures = match parts.next().as_ref().and_then(text) {
                Some(json) => serde_json::from_str(&json).unwrap_or_else(|e| {
                    tracing::warn!(%id, error = %e, "unreadable failure history; delivering without it");
                    Vec::new()
                }),
                None => Vec::new(),
            };
            Ok(Delivery {
                message: message_of(id, fields, attempt),
                failures,
            })
        })
        .collect()
}

/// Decodes `[id, fields]` stream entries (XRANGE) as messages with attempt 0.
pub(crate) fn stream_messages(v: Value) -> Result<Vec<Message>, BackendError> {
    items(v)
        .into_iter()
        .map(|e| {
            let mut parts = items(e).into_iter();
            let (Some(id), Some(fields)) = (parts.next(), parts.next()) else {
                return Err(corrupt("a stream entry without id and fields"));
            };
            Ok(message_of(id_of(&id)?, fields, 0))
        })
        .collect()
}

/// Decodes a dead-letter stream entry.
pub(crate) fn dead_letter_of(entry: Value) -> Result<DeadLetter, BackendError> {
    let mut parts = items(entry).into_iter();
    let (Some(id), Some(fields)) = (parts.next(), parts.next()) else {
        return Err(corrupt("a dead-letter entry"));
    };
    let id = id_of(&id)?;
    let mut f = fields_map(fields);
    let record = f
        .remove("record")
        .and_then(|v| text(&v))
        .ok_or_else(|| corrupt(format!("dead letter {id} has no record field")))?;
    let mut dl: DeadLetter = serde_json::from_str(&record).map_err(|e| {
        err(
            BackendErrorKind::Corrupt,
            format!("dead letter {id} has an unreadable record: {e}"),
        )
    })?;
    dl.id = id;
    if let Some(Value::BulkString(b)) = f.remove("data") {
        dl.message.payload = Bytes::from(b);
    }
    Ok(dl)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Any reply shape, nested: what a damaged key, another client or a hostile server can send.
    fn any_value() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Nil),
            any::<i64>().prop_map(Value::Int),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(Value::BulkString),
            // Field names and ids relq looks for, so decoding gets past the first checks.
            prop_oneof![
                Just("type"),
                Just("data"),
                Just("headers"),
                Just("deliver_at"),
                Just("record"),
                Just("1-0"),
                Just("{}"),
                Just("[]"),
                Just("job"),
                Just("18446744073709551615-18446744073709551615"),
                Just("{\"id\":\"1-0\",\"attempts\":1}"),
            ]
            .prop_map(|s| Value::BulkString(s.as_bytes().to_vec())),
            ".{0,20}".prop_map(Value::SimpleString),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                proptest::collection::vec((inner.clone(), inner), 0..4).prop_map(Value::Map),
            ]
        })
    }

    proptest::proptest! {
        /// Stored entries and replies of any shape decode to a value or an error, never a panic.
        #[test]
        fn decoders_never_panic(v in any_value(), id in proptest::prelude::any::<(u64, u64)>(), n in proptest::prelude::any::<u32>()) {
            let _ = deliveries(v.clone());
            let _ = dead_letter_of(v.clone());
            let _ = fields_map(v.clone());
            let _ = id_of(&v);
            let m = message_of(MessageId::new(id.0, id.1), v, n);
            let _ = m.published_at.to_string();
        }

        /// A dead-letter record of arbitrary JSON is an error or a dead letter, never a panic.
        #[test]
        fn dead_letter_records_never_panic(record in ".{0,200}") {
            let entry = Value::Array(vec![
                Value::BulkString(b"5-1".to_vec()),
                Value::Array(vec![
                    Value::BulkString(b"record".to_vec()),
                    Value::BulkString(record.into_bytes()),
                ]),
            ]);
            if let Ok(dl) = dead_letter_of(entry) {
                let _ = (dl.first_failed_at.to_string(), dl.message.published_at.to_string());
            }
        }
    }

    #[test]
    fn malformed_entries_become_visible_messages() {
        let fields = Value::Array(vec![
            Value::BulkString(b"data".to_vec()),
            Value::BulkString(b"x".to_vec()),
            Value::BulkString(b"headers".to_vec()),
            Value::BulkString(b"not json".to_vec()),
        ]);
        let m = message_of(MessageId::new(5, 1), fields, 1);
        assert_eq!(m.kind, MALFORMED_KIND);
        let why = m.header(HEADER_MALFORMED).unwrap();
        assert!(why.contains("headers") && why.contains("type"), "{why}");
        assert_eq!(m.payload.as_ref(), b"x");
        assert_eq!(m.published_at, Timestamp(5));
    }

    #[test]
    fn well_formed_entry_decodes() {
        let fields = Value::Array(vec![
            Value::BulkString(b"type".to_vec()),
            Value::BulkString(b"order.created".to_vec()),
            Value::BulkString(b"data".to_vec()),
            Value::BulkString(vec![0, 255]),
            Value::BulkString(b"headers".to_vec()),
            Value::BulkString(br#"{"a":"b"}"#.to_vec()),
            Value::BulkString(b"deliver_at".to_vec()),
            Value::BulkString(b"77".to_vec()),
        ]);
        let m = message_of(MessageId::new(5, 1), fields, 3);
        assert_eq!(m.kind, "order.created");
        assert_eq!(m.payload.as_ref(), &[0, 255]);
        assert_eq!(m.header("a"), Some("b"));
        assert_eq!(m.deliver_at, Some(Timestamp(77)));
        assert_eq!(m.attempt, 3);
    }
}
