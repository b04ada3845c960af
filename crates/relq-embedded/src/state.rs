//! The engine's state database (redb): topics, groups, redelivery rows, stop markers and dead
//! letters. Message bodies live in the log; this holds what changes when messages are read and
//! settled. The committer writes one transaction per commit cycle.
//!
//! | table | key | value |
//! |---|---|---|
//! | `meta` | name | u64 (`next_epoch`, `gen`, `format`, `session_gen`, `session_end`, `session_boot`) |
//! | `high_water` | topic directory name (`<topic>@<epoch>`) | (active segment's base, end of its records), written at a clean close |
//! | `topics` | topic | [`TopicRecord`] (JSON) |
//! | `groups` | (topic, group) | [`GroupRecord`] (binary: cursor, floor, done ranges) |
//! | `rows` | (topic, group, offset) | [`Row`] (JSON: due, deliveries, failures, parked) |
//! | `spill` | (topic, group, due, offset) | [`Row`] (JSON), a row due later than the window |
//! | `spill_at` | (topic, group, offset) | its due time in `spill` |
//! | `spill_count` | (topic, group) | entries in `spill` |
//! | `stopped` | (topic, offset) | the message id's milliseconds |
//! | `dead` | (topic, ms, seq) | dead letter: u32 JSON length, JSON without the payload, payload |

use std::collections::BTreeMap;

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::log::LastSession;
use super::{corrupt, db_error};
use relq_core::AttemptFailure;
use relq_core::BackendError;
use relq_core::DeadLetter;
use relq_core::MessageId;

pub(crate) const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");
pub(crate) const TOPICS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("topics");
pub(crate) const GROUPS: TableDefinition<'_, (&str, &str), &[u8]> = TableDefinition::new("groups");
pub(crate) const ROWS: TableDefinition<'_, (&str, &str, u64), &[u8]> = TableDefinition::new("rows");
pub(crate) const STOPPED: TableDefinition<'_, (&str, u64), u64> = TableDefinition::new("stopped");
pub(crate) const DEAD: TableDefinition<'_, (&str, u64, u64), &[u8]> = TableDefinition::new("dead");
/// Rows waiting for a time beyond the resident window, ordered by due time. They are not loaded
/// at open and not held in memory; reads take the due ones out in order.
pub(crate) const SPILL: TableDefinition<'_, (&str, &str, u64, u64), &[u8]> =
    TableDefinition::new("spill");
/// The due time of each `spill` entry, by offset (lookups by message, retention).
pub(crate) const SPILL_AT: TableDefinition<'_, (&str, &str, u64), u64> =
    TableDefinition::new("spill_at");
/// How many `spill` entries each group has.
pub(crate) const SPILL_COUNT: TableDefinition<'_, (&str, &str), u64> =
    TableDefinition::new("spill_count");

/// Each topic's idempotency keys published within their window: (topic, key) -> (the id's ms,
/// its offset, the end of the window in ms, the topic's epoch). A new entry is committed in a
/// transaction of its own before the log of its cycle is synced; removals go with the state.
/// Open keeps an entry only if its window has not ended, its epoch is the topic's (a terminate
/// leaves its entries to open) and its offset is below the log's end (else its message never
/// became durable).
pub(crate) const DEDUP: TableDefinition<'_, (&str, &str), (u64, u64, u64, u64)> =
    TableDefinition::new("dedup_keys");

/// Processed-key records of each group: (topic, group, key) -> the end of the record, in ms.
pub(crate) const PROCESSED: TableDefinition<'_, (&str, &str, &str), u64> =
    TableDefinition::new("processed");

/// `meta` key: the `gen` of the last session that opened the directory for writing.
pub(crate) const SESSION_GEN: &str = "session_gen";
/// `meta` key: how that session ended, one of the `SESSION_*` values.
pub(crate) const SESSION_END: &str = "session_end";
/// It is running (or crashed) in sync mode.
pub(crate) const SESSION_RUNNING_SYNC: u64 = 0;
/// It is running (or crashed) in periodic mode.
pub(crate) const SESSION_RUNNING_PERIODIC: u64 = 1;
/// It closed after its final sync.
pub(crate) const SESSION_CLOSED: u64 = 2;
/// `meta` key: the boot id (see [`Storage::boot_id`](super::fs::Storage::boot_id)) of the machine
/// that session ran on; 0 or absent when unknown.
pub(crate) const SESSION_BOOT: &str = "session_boot";
/// Per topic directory, where a session that closed cleanly left its active segment: (its base
/// offset, the position after its last record). Open scans that segment only up to there (see
/// `log`, "Recovery"). Replaced at every clean close; trusted only when the last session closed.
pub(crate) const HIGH_WATER: TableDefinition<'_, &str, (u64, u64)> =
    TableDefinition::new("high_water");

/// Sorts after every valid name (names use `[A-Za-z0-9_.-]`).
pub(crate) const NAME_MAX: &str = "~";

/// A topic's durable record.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct TopicRecord {
    /// The generation; the log lives in `topics/<name>@<epoch>`.
    pub(crate) epoch: u64,
    /// The first offset retention kept.
    pub(crate) start: u64,
    /// The last dead-letter id assigned.
    pub(crate) last_dead: MessageId,
    /// Dead letters stored.
    pub(crate) dead_count: u64,
}

/// A group's durable record.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct GroupRecord {
    /// Offsets below it were read (delivered, scheduled or parked).
    pub(crate) cursor: u64,
    /// The id of the record before `cursor`.
    pub(crate) cursor_ms: u64,
    /// Offsets below it are done with their first delivery (acked or handed to a row or a dead
    /// letter).
    pub(crate) floor: u64,
    /// Done ranges `[start, end)` above `floor`.
    pub(crate) done: Vec<(u64, u64)>,
}

impl GroupRecord {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + 16 * self.done.len());
        for n in [
            self.cursor,
            self.cursor_ms,
            self.floor,
            self.done.len() as u64,
        ] {
            out.extend_from_slice(&n.to_le_bytes());
        }
        for (a, b) in &self.done {
            out.extend_from_slice(&a.to_le_bytes());
            out.extend_from_slice(&b.to_le_bytes());
        }
        out
    }

    /// Decodes a stored record; `None` for anything malformed (never a panic: stored bytes may
    /// be damaged).
    pub(crate) fn decode(buf: &[u8]) -> Option<GroupRecord> {
        let word = |i: usize| -> Option<u64> {
            let b: [u8; 8] = buf.get(i * 8..i * 8 + 8)?.try_into().ok()?;
            Some(u64::from_le_bytes(b))
        };
        let n = usize::try_from(word(3)?).ok()?;
        // Checked: a damaged count must not overflow (a panic in debug builds).
        if Some(buf.len()) != n.checked_mul(16).and_then(|b| b.checked_add(32)) {
            return None;
        }
        let mut done = Vec::with_capacity(n);
        for i in 0..n {
            done.push((word(4 + 2 * i)?, word(5 + 2 * i)?));
        }
        Some(GroupRecord {
            cursor: word(0)?,
            cursor_ms: word(1)?,
            floor: word(2)?,
            done,
        })
    }
}

/// A message a group delivers again: a retry, a delayed message, a parked (stopped) message, a
/// redelivery after a claim or a crash, or a message waiting behind its ordering key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Row {
    /// When it is due (ms); for a waiting row, not before this once its key passes to it.
    pub(crate) due: u64,
    /// Deliveries made so far.
    pub(crate) deliveries: u32,
    /// Failures of earlier attempts.
    pub(crate) failures: Vec<AttemptFailure>,
    /// Held back by a stop marker.
    pub(crate) parked: bool,
    /// The message's ordering key, while it holds or waits for it (a row with a key is never
    /// spilled, so every keyed row is in memory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) key: Option<String>,
    /// Waiting behind an earlier message of its key: not due until the key passes to it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) waiting: bool,
}

impl Row {
    /// Whether it may leave memory for the `spill` table: not parked, not keyed (the ordering
    /// keys are all in memory), not waiting.
    pub(crate) fn spillable(&self) -> bool {
        !self.parked && !self.waiting && self.key.is_none()
    }

    /// A row of a message not delivered yet, due at `due`.
    pub(crate) fn fresh(due: u64) -> Row {
        Row {
            due,
            ..Row::default()
        }
    }
}

pub(crate) fn encode_json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("state records serialize")
}

pub(crate) fn decode_json<'a, T: Deserialize<'a>>(
    what: &str,
    buf: &'a [u8],
) -> Result<T, BackendError> {
    serde_json::from_slice(buf).map_err(|e| corrupt(format!("malformed {what} record: {e}")))
}

/// Encodes a dead letter: the JSON of everything but the payload, then the raw payload.
pub(crate) fn encode_dead(dl: &DeadLetter) -> Vec<u8> {
    let mut head = dl.clone();
    head.message.payload = bytes::Bytes::new();
    let json = encode_json(&head);
    let mut out = Vec::with_capacity(4 + json.len() + dl.message.payload.len());
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&dl.message.payload);
    out
}

pub(crate) fn decode_dead(buf: &[u8]) -> Result<DeadLetter, BackendError> {
    let bad = || corrupt("malformed dead letter record".to_owned());
    let (len, rest) = buf.split_first_chunk::<4>().ok_or_else(bad)?;
    let n = usize::try_from(u32::from_le_bytes(*len)).map_err(|_| bad())?;
    if rest.len() < n {
        return Err(bad());
    }
    let (json, payload) = rest.split_at(n);
    let mut dl: DeadLetter = decode_json("dead letter", json)?;
    dl.message.payload = bytes::Bytes::copy_from_slice(payload);
    Ok(dl)
}

/// Everything the state database holds, loaded at open (dead letters excepted).
#[derive(Debug)]
pub(crate) struct Loaded {
    pub(crate) next_epoch: u64,
    pub(crate) gen: u32,
    /// How the last session that wrote ended (recorded by this build; `Unknown` before).
    pub(crate) last_session: LastSession,
    /// Where the last session left each topic's active segment, when it closed cleanly:
    /// directory name -> (segment base, end of its records).
    pub(crate) high_water: BTreeMap<String, (u64, u64)>,
    pub(crate) topics: BTreeMap<String, TopicRecord>,
    pub(crate) groups: BTreeMap<(String, String), GroupRecord>,
    pub(crate) rows: BTreeMap<(String, String, u64), Row>,
    pub(crate) stopped: BTreeMap<(String, u64), u64>,
    /// Per group: spilled rows and the earliest due time among them.
    pub(crate) spilled: BTreeMap<(String, String), (u64, Option<u64>)>,
    /// Idempotency keys: (topic, key, id ms, offset, end of the window, epoch).
    pub(crate) dedup: Vec<(String, String, u64, u64, u64, u64)>,
    /// Processed-key records: (topic, group, key, end).
    pub(crate) processed: Vec<(String, String, String, u64)>,
}

/// A new entry of the `dedup` table.
#[derive(Debug)]
pub(crate) struct DedupPut {
    pub(crate) topic: String,
    pub(crate) key: String,
    pub(crate) ms: u64,
    pub(crate) offset: u64,
    pub(crate) until: u64,
    pub(crate) epoch: u64,
}

/// Commits new `dedup` entries in a transaction of their own (durable when `sync`).
pub(crate) fn commit_dedup(
    db: &redb::Database,
    puts: &[DedupPut],
    sync: bool,
) -> Result<(), BackendError> {
    let mut tx = db.begin_write().map_err(db_error)?;
    if !sync {
        tx.set_durability(redb::Durability::None)
            .map_err(|e| db_error(redb::Error::from(e)))?;
    }
    {
        let mut t = tx.open_table(DEDUP).map_err(db_error)?;
        for p in puts {
            t.insert(
                (p.topic.as_str(), p.key.as_str()),
                (p.ms, p.offset, p.until, p.epoch),
            )
            .map_err(db_error)?;
        }
    }
    tx.commit().map_err(db_error)
}

/// The format version this build writes. Formats 1 (no spill tables) and 2 (no deduplication
/// or processed-key tables) are upgraded in place: this build reads everything they hold. A
/// build of format 2 refuses format 3, since it would not keep the new tables.
const FORMAT: u64 = 3;

/// Creates missing tables, checks the format, bumps `gen` and loads the state. `boot` is this
/// machine's boot id (see [`Storage::boot_id`](super::fs::Storage::boot_id)), to tell whether
/// the last session ended by a power loss.
pub(crate) fn load(db: &redb::Database, boot: Option<u64>) -> Result<Loaded, BackendError> {
    let tx = db.begin_write().map_err(db_error)?;
    let mut out = Loaded {
        next_epoch: 0,
        gen: 0,
        last_session: LastSession::Unknown,
        high_water: BTreeMap::new(),
        topics: BTreeMap::new(),
        groups: BTreeMap::new(),
        rows: BTreeMap::new(),
        stopped: BTreeMap::new(),
        spilled: BTreeMap::new(),
        dedup: Vec::new(),
        processed: Vec::new(),
    };
    {
        let mut meta = tx.open_table(META).map_err(db_error)?;
        let format = meta.get("format").map_err(db_error)?.map(|v| v.value());
        match format {
            None => {
                meta.insert("format", FORMAT).map_err(db_error)?;
            }
            Some(FORMAT) => {}
            Some(1 | 2) => {
                meta.insert("format", FORMAT).map_err(db_error)?;
            }
            Some(other) => {
                return Err(corrupt(format!(
                    "the data directory has state format {other}; this build reads format {FORMAT}"
                )))
            }
        }
        let gen = meta.get("gen").map_err(db_error)?.map_or(0, |v| v.value()) + 1;
        meta.insert("gen", gen).map_err(db_error)?;
        out.gen = u32::try_from(gen).map_err(|_| corrupt("open count overflow".into()))?;
        out.next_epoch = meta
            .get("next_epoch")
            .map_err(db_error)?
            .map_or(1, |v| v.value());
        // Left as it is: open records its own session only once every log is recovered, so an
        // open that fails halfway leaves the verdict on the last writer's data unchanged.
        let session_gen = meta.get(SESSION_GEN).map_err(db_error)?.map(|v| v.value());
        let session_end = meta.get(SESSION_END).map_err(db_error)?.map(|v| v.value());
        let session_boot = meta
            .get(SESSION_BOOT)
            .map_err(db_error)?
            .map(|v| v.value())
            .filter(|b| *b != 0);
        out.last_session = match (session_gen, session_end) {
            (Some(_), Some(SESSION_CLOSED)) => LastSession::Clean,
            (Some(g), Some(end)) => LastSession::Crashed {
                gen: u32::try_from(g).map_err(|_| corrupt(format!("session gen {g}")))?,
                sync: end == SESSION_RUNNING_SYNC,
                same_boot: match (session_boot, boot) {
                    (Some(a), Some(b)) => Some(a == b),
                    _ => None,
                },
            },
            _ => LastSession::Unknown,
        };
        if out.last_session == LastSession::Clean {
            let hw = tx.open_table(HIGH_WATER).map_err(db_error)?;
            for e in hw.iter().map_err(db_error)? {
                let (k, v) = e.map_err(db_error)?;
                out.high_water.insert(k.value().to_owned(), v.value());
            }
        }
        let topics = tx.open_table(TOPICS).map_err(db_error)?;
        for e in topics.iter().map_err(db_error)? {
            let (k, v) = e.map_err(db_error)?;
            out.topics
                .insert(k.value().to_owned(), decode_json("topic", v.value())?);
        }
        let groups = tx.open_table(GROUPS).map_err(db_error)?;
        for e in groups.iter().map_err(db_error)? {
            let (k, v) = e.map_err(db_error)?;
            let (t, g) = k.value();
            let rec = GroupRecord::decode(v.value())
                .ok_or_else(|| corrupt(format!("malformed group record {t}/{g}")))?;
            out.groups.insert((t.to_owned(), g.to_owned()), rec);
        }
        let rows = tx.open_table(ROWS).map_err(db_error)?;
        for e in rows.iter().map_err(db_error)? {
            let (k, v) = e.map_err(db_error)?;
            let (t, g, o) = k.value();
            out.rows.insert(
                (t.to_owned(), g.to_owned(), o),
                decode_json("row", v.value())?,
            );
        }
        let stopped = tx.open_table(STOPPED).map_err(db_error)?;
        for e in stopped.iter().map_err(db_error)? {
            let (k, v) = e.map_err(db_error)?;
            let (t, o) = k.value();
            out.stopped.insert((t.to_owned(), o), v.value());
        }
        let dedup = tx.open_table(DEDUP).map_err(db_error)?;
        for e in dedup.iter().map_err(db_error)? {
            let (k, v) = e.map_err(db_error)?;
            let (t, key) = k.value();
            let (ms, o, until, epoch) = v.value();
            out.dedup
                .push((t.to_owned(), key.to_owned(), ms, o, until, epoch));
        }
        let processed = tx.open_table(PROCESSED).map_err(db_error)?;
        for e in processed.iter().map_err(db_error)? {
            let (k, v) = e.map_err(db_error)?;
            let (t, g, key) = k.value();
            out.processed
                .push((t.to_owned(), g.to_owned(), key.to_owned(), v.value()));
        }
        tx.open_table(DEAD).map_err(db_error)?;
        tx.open_table(SPILL_AT).map_err(db_error)?;
        let spill = tx.open_table(SPILL).map_err(db_error)?;
        let counts = tx.open_table(SPILL_COUNT).map_err(db_error)?;
        for e in counts.iter().map_err(db_error)? {
            let (k, v) = e.map_err(db_error)?;
            let (t, g) = k.value();
            let first = first_due(&spill, t, g)?;
            out.spilled
                .insert((t.to_owned(), g.to_owned()), (v.value(), first));
        }
    }
    tx.commit().map_err(db_error)?;
    Ok(out)
}

/// Encodes a spilled row: empty for a message not delivered yet (a delayed message a group read
/// past: most of them, and the due time is in the key), else the row's JSON.
pub(crate) fn encode_spilled(row: &Row) -> Vec<u8> {
    if row.deliveries == 0 && row.failures.is_empty() && !row.parked && row.key.is_none() {
        Vec::new()
    } else {
        encode_json(row)
    }
}

fn decode_spilled(due: u64, buf: &[u8]) -> Result<Row, BackendError> {
    if buf.is_empty() {
        return Ok(Row::fresh(due));
    }
    let row: Row = decode_json("spilled row", buf)?;
    if row.due != due {
        return Err(corrupt(format!(
            "spilled row due at {} is filed under {due}",
            row.due
        )));
    }
    Ok(row)
}

/// The earliest due time among `t`/`g`'s spilled rows.
fn first_due(
    spill: &impl ReadableTable<(&'static str, &'static str, u64, u64), &'static [u8]>,
    t: &str,
    g: &str,
) -> Result<Option<u64>, BackendError> {
    let mut range = spill
        .range((t, g, 0, 0)..=(t, g, u64::MAX, u64::MAX))
        .map_err(db_error)?;
    match range.next() {
        Some(e) => Ok(Some(e.map_err(db_error)?.0.value().2)),
        None => Ok(None),
    }
}

/// Spilled rows taken back: (offset, row), and the due time of the first one left behind.
pub(crate) type DueRows = (Vec<(u64, Row)>, Option<u64>);

/// Spilled rows of `t`/`g` due at `now` or earlier, in due order, at most `max` of them, passing
/// over offsets `skip` rejects. Also returns the due time of the first entry left behind (a row
/// not yet due, or one past `max`), `None` if there is none.
pub(crate) fn spilled_due(
    db: &redb::Database,
    t: &str,
    g: &str,
    now: u64,
    max: usize,
    skip: impl Fn(u64) -> bool,
) -> Result<DueRows, BackendError> {
    let tx = db.begin_read().map_err(db_error)?;
    let spill = tx.open_table(SPILL).map_err(db_error)?;
    let mut out = Vec::new();
    for e in spill
        .range((t, g, 0, 0)..=(t, g, u64::MAX, u64::MAX))
        .map_err(db_error)?
    {
        let (k, v) = e.map_err(db_error)?;
        let (_, _, due, o) = k.value();
        if due > now || out.len() >= max {
            return Ok((out, Some(due)));
        }
        if skip(o) {
            continue;
        }
        out.push((o, decode_spilled(due, v.value())?));
    }
    Ok((out, None))
}

/// The spilled row of `t`/`g` at offset `o`, with its due time.
pub(crate) fn spilled_row(
    db: &redb::Database,
    t: &str,
    g: &str,
    o: u64,
) -> Result<Option<Row>, BackendError> {
    let tx = db.begin_read().map_err(db_error)?;
    let at = tx.open_table(SPILL_AT).map_err(db_error)?;
    let Some(due) = at.get((t, g, o)).map_err(db_error)?.map(|v| v.value()) else {
        return Ok(None);
    };
    let spill = tx.open_table(SPILL).map_err(db_error)?;
    match spill.get((t, g, due, o)).map_err(db_error)? {
        Some(v) => Ok(Some(decode_spilled(due, v.value())?)),
        None => Err(corrupt(format!(
            "spilled row {t}/{g}/{o} is indexed at {due} but missing"
        ))),
    }
}

/// The offsets of `t`/`g`'s committed spilled rows in `from..to`.
pub(crate) fn spilled_offsets(
    db: &redb::Database,
    t: &str,
    g: &str,
    from: u64,
    to: u64,
) -> Result<Vec<u64>, BackendError> {
    let tx = db.begin_read().map_err(db_error)?;
    let at = tx.open_table(SPILL_AT).map_err(db_error)?;
    let mut out = Vec::new();
    for e in at.range((t, g, from)..(t, g, to)).map_err(db_error)? {
        out.push(e.map_err(db_error)?.0.value().2);
    }
    Ok(out)
}

/// The highest (or, with `highest` false, the lowest) offset among `t`/`g`'s spilled rows.
pub(crate) fn spilled_offset(
    db: &redb::Database,
    t: &str,
    g: &str,
    highest: bool,
) -> Result<Option<u64>, BackendError> {
    let tx = db.begin_read().map_err(db_error)?;
    let at = tx.open_table(SPILL_AT).map_err(db_error)?;
    let mut range = at.range((t, g, 0)..=(t, g, u64::MAX)).map_err(db_error)?;
    let edge = if highest {
        range.next_back()
    } else {
        range.next()
    };
    match edge {
        Some(e) => Ok(Some(e.map_err(db_error)?.0.value().2)),
        None => Ok(None),
    }
}

/// Removes `t`/`g`'s spilled rows at offsets in `from..to`; returns how many there were.
fn drop_spilled(
    tx: &redb::WriteTransaction,
    t: &str,
    g: &str,
    from: u64,
    to: u64,
) -> Result<u64, BackendError> {
    let mut at = tx.open_table(SPILL_AT).map_err(db_error)?;
    let mut spill = tx.open_table(SPILL).map_err(db_error)?;
    let mut gone = Vec::new();
    at.retain_in((t, g, from)..(t, g, to), |k, due| {
        gone.push((k.2, due));
        false
    })
    .map_err(db_error)?;
    for (o, due) in &gone {
        spill.remove((t, g, *due, *o)).map_err(db_error)?;
    }
    let n = gone.len() as u64;
    if n > 0 {
        let mut counts = tx.open_table(SPILL_COUNT).map_err(db_error)?;
        let left = counts
            .get((t, g))
            .map_err(db_error)?
            .map_or(0, |v| v.value())
            .saturating_sub(n);
        if left == 0 {
            counts.remove((t, g)).map_err(db_error)?;
        } else {
            counts.insert((t, g), left).map_err(db_error)?;
        }
    }
    Ok(n)
}

/// Key of a redelivery row: (topic, group, offset).
pub(crate) type RowKey = (String, String, u64);
/// Spilled rows of a group at offsets `from..to`: (topic, group, from, to).
pub(crate) type SpillRange = (String, String, u64, u64);
/// Key of a dead letter: (topic, id ms, id seq).
pub(crate) type DeadKey = (String, u64, u64);

/// One commit cycle's state changes, encoded.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    /// Topics whose every row goes (terminated), applied first.
    pub(crate) drop_topics: Vec<String>,
    /// Groups whose record, rows and spilled rows go (deleted), applied after `drop_topics`.
    pub(crate) drop_groups: Vec<(String, String)>,
    pub(crate) next_epoch: Option<u64>,
    pub(crate) topics: Vec<(String, Option<Vec<u8>>)>,
    pub(crate) groups: Vec<((String, String), Vec<u8>)>,
    pub(crate) rows: Vec<(RowKey, Option<Vec<u8>>)>,
    /// Spilled rows to remove: key and due time. Applied before `spill`.
    pub(crate) unspill: Vec<(RowKey, u64)>,
    /// Rows to spill (written to `spill`, removed from `rows`): key, due time, the row encoded
    /// by [`encode_spilled`].
    pub(crate) spill: Vec<(RowKey, u64, Vec<u8>)>,
    /// Spilled rows to remove by offset range: retention's trim below the new start, and rows
    /// past the log's end after a power loss in periodic mode.
    pub(crate) trim_spill: Vec<SpillRange>,
    pub(crate) stopped: Vec<((String, u64), Option<u64>)>,
    pub(crate) dead: Vec<(DeadKey, Option<Vec<u8>>)>,
    /// This session's `gen`, `SESSION_*` state and boot id (0: unknown), recorded by open.
    pub(crate) session: Option<(u64, u64, u64)>,
    /// Processed-key records to write (`Some(end)`) or remove.
    pub(crate) processed: Vec<((String, String, String), Option<u64>)>,
    /// `dedup` entries to remove: topic, key, and the time they were found ended (an entry
    /// written since, ending later, stays).
    pub(crate) dedup_remove: Vec<(String, String, u64)>,
    /// Rows waiting for an ordering key that passed to them with this batch (an ack or a dead
    /// letter of the key's holder): made due once the batch is durable, so the key's next
    /// message never runs before the settlement of the one before it survives a crash. Not
    /// written (a reopen passes a key whose holder is gone to its first waiting row).
    pub(crate) promote: Vec<RowKey>,
}

impl Batch {
    pub(crate) fn is_empty(&self) -> bool {
        self.drop_topics.is_empty()
            && self.drop_groups.is_empty()
            && self.next_epoch.is_none()
            && self.topics.is_empty()
            && self.groups.is_empty()
            && self.rows.is_empty()
            && self.unspill.is_empty()
            && self.spill.is_empty()
            && self.trim_spill.is_empty()
            && self.stopped.is_empty()
            && self.dead.is_empty()
            && self.session.is_none()
            && self.processed.is_empty()
            && self.dedup_remove.is_empty()
            && self.promote.is_empty()
    }
}

/// Writes `batch` into `tx`. Returns how many spilled rows each `trim_spill` entry removed.
pub(crate) fn apply(tx: &redb::WriteTransaction, batch: &Batch) -> Result<Vec<u64>, BackendError> {
    // A deleted group's spilled rows go before any spill of this batch is written (the group
    // may have been created again since).
    for (t, g) in &batch.drop_groups {
        drop_spilled(tx, t, g, 0, u64::MAX)?;
    }
    let spills =
        !(batch.drop_topics.is_empty() && batch.unspill.is_empty() && batch.spill.is_empty());
    if spills {
        let mut spill = tx.open_table(SPILL).map_err(db_error)?;
        let mut at = tx.open_table(SPILL_AT).map_err(db_error)?;
        let mut counts = tx.open_table(SPILL_COUNT).map_err(db_error)?;
        for t in &batch.drop_topics {
            let t = t.as_str();
            spill
                .retain_in((t, "", 0, 0)..(t, NAME_MAX, 0, 0), |_, _| false)
                .map_err(db_error)?;
            at.retain_in((t, "", 0)..(t, NAME_MAX, 0), |_, _| false)
                .map_err(db_error)?;
            counts
                .retain_in((t, "")..(t, NAME_MAX), |_, _| false)
                .map_err(db_error)?;
        }
        let mut delta: BTreeMap<(&str, &str), i64> = BTreeMap::new();
        for ((t, g, o), due) in &batch.unspill {
            let (t, g) = (t.as_str(), g.as_str());
            if spill.remove((t, g, *due, *o)).map_err(db_error)?.is_some() {
                *delta.entry((t, g)).or_default() -= 1;
            }
            at.remove((t, g, *o)).map_err(db_error)?;
        }
        for ((t, g, o), due, v) in &batch.spill {
            let (t, g) = (t.as_str(), g.as_str());
            if spill
                .insert((t, g, *due, *o), v.as_slice())
                .map_err(db_error)?
                .is_none()
            {
                *delta.entry((t, g)).or_default() += 1;
            }
            at.insert((t, g, *o), *due).map_err(db_error)?;
        }
        for ((t, g), d) in delta {
            let n = counts
                .get((t, g))
                .map_err(db_error)?
                .map_or(0, |v| v.value());
            let n = n.saturating_add_signed(d);
            if n == 0 {
                counts.remove((t, g)).map_err(db_error)?;
            } else {
                counts.insert((t, g), n).map_err(db_error)?;
            }
        }
    }
    let mut trimmed = Vec::with_capacity(batch.trim_spill.len());
    for (t, g, from, to) in &batch.trim_spill {
        trimmed.push(drop_spilled(tx, t, g, *from, *to)?);
    }
    let mut topics = tx.open_table(TOPICS).map_err(db_error)?;
    let mut groups = tx.open_table(GROUPS).map_err(db_error)?;
    let mut rows = tx.open_table(ROWS).map_err(db_error)?;
    let mut stopped = tx.open_table(STOPPED).map_err(db_error)?;
    let mut dead = tx.open_table(DEAD).map_err(db_error)?;
    let mut processed = tx.open_table(PROCESSED).map_err(db_error)?;
    for t in &batch.drop_topics {
        let t = t.as_str();
        processed
            .retain_in((t, "", "")..(t, NAME_MAX, ""), |_, _| false)
            .map_err(db_error)?;
        topics.remove(t).map_err(db_error)?;
        groups
            .retain_in((t, "")..(t, NAME_MAX), |_, _| false)
            .map_err(db_error)?;
        rows.retain_in((t, "", 0)..(t, NAME_MAX, 0), |_, _| false)
            .map_err(db_error)?;
        stopped
            .retain_in((t, 0)..=(t, u64::MAX), |_, _| false)
            .map_err(db_error)?;
        dead.retain_in((t, 0, 0)..=(t, u64::MAX, u64::MAX), |_, _| false)
            .map_err(db_error)?;
    }
    for (t, g) in &batch.drop_groups {
        // Keys are any text: the range ends at the next possible group name.
        let next = format!("{g}\0");
        processed
            .retain_in(
                (t.as_str(), g.as_str(), "")..(t.as_str(), next.as_str(), ""),
                |_, _| false,
            )
            .map_err(db_error)?;
        let (t, g) = (t.as_str(), g.as_str());
        groups.remove((t, g)).map_err(db_error)?;
        rows.retain_in((t, g, 0)..=(t, g, u64::MAX), |_, _| false)
            .map_err(db_error)?;
    }
    if let Some(n) = batch.next_epoch {
        let mut meta = tx.open_table(META).map_err(db_error)?;
        meta.insert("next_epoch", n).map_err(db_error)?;
    }
    if let Some((gen, end, boot)) = batch.session {
        let mut meta = tx.open_table(META).map_err(db_error)?;
        meta.insert(SESSION_GEN, gen).map_err(db_error)?;
        meta.insert(SESSION_END, end).map_err(db_error)?;
        meta.insert(SESSION_BOOT, boot).map_err(db_error)?;
    }
    for (k, v) in &batch.topics {
        match v {
            Some(v) => topics.insert(k.as_str(), v.as_slice()).map(drop),
            None => topics.remove(k.as_str()).map(drop),
        }
        .map_err(db_error)?;
    }
    for ((t, g), v) in &batch.groups {
        groups
            .insert((t.as_str(), g.as_str()), v.as_slice())
            .map_err(db_error)?;
    }
    for ((t, g, o), v) in &batch.rows {
        let k = (t.as_str(), g.as_str(), *o);
        match v {
            Some(v) => rows.insert(k, v.as_slice()).map(drop),
            None => rows.remove(k).map(drop),
        }
        .map_err(db_error)?;
    }
    for ((t, o), v) in &batch.stopped {
        let k = (t.as_str(), *o);
        match v {
            Some(v) => stopped.insert(k, *v).map(drop),
            None => stopped.remove(k).map(drop),
        }
        .map_err(db_error)?;
    }
    if !batch.dedup_remove.is_empty() {
        let mut dedup = tx.open_table(DEDUP).map_err(db_error)?;
        for (t, k, ended) in &batch.dedup_remove {
            let key = (t.as_str(), k.as_str());
            let until = dedup.get(key).map_err(db_error)?.map(|v| v.value().2);
            if until.is_some_and(|u| u <= *ended) {
                dedup.remove(key).map_err(db_error)?;
            }
        }
    }
    for ((t, g, k), v) in &batch.processed {
        let key = (t.as_str(), g.as_str(), k.as_str());
        match v {
            Some(until) => processed.insert(key, *until).map(drop),
            None => processed.remove(key).map(drop),
        }
        .map_err(db_error)?;
    }
    for ((t, a, b), v) in &batch.dead {
        let k = (t.as_str(), *a, *b);
        match v {
            Some(v) => dead.insert(k, v.as_slice()).map(drop),
            None => dead.remove(k).map(drop),
        }
        .map_err(db_error)?;
    }
    Ok(trimmed)
}

/// Reads every dead letter and spilled row (the entries open does not load) and reports those
/// that do not decode, and groups whose spilled-row count disagrees with the rows (for
/// `relq check`; at most 100 problems).
pub(crate) fn verify_unloaded(db: &redb::Database) -> Result<Vec<String>, BackendError> {
    const MAX: usize = 100;
    let mut out = Vec::new();
    let tx = db.begin_read().map_err(db_error)?;
    let dead = tx.open_table(DEAD).map_err(db_error)?;
    for e in dead.iter().map_err(db_error)? {
        let (k, v) = e.map_err(db_error)?;
        let (t, ms, seq) = k.value();
        if let Err(e) = decode_dead(v.value()) {
            out.push(format!(
                "dead letter {ms}-{seq} of topic {t:?}: {}",
                e.message
            ));
        }
        if out.len() >= MAX {
            return Ok(out);
        }
    }
    let spill = tx.open_table(SPILL).map_err(db_error)?;
    let mut counted: BTreeMap<(String, String), u64> = BTreeMap::new();
    for e in spill.iter().map_err(db_error)? {
        let (k, v) = e.map_err(db_error)?;
        let (t, g, due, o) = k.value();
        *counted.entry((t.to_owned(), g.to_owned())).or_default() += 1;
        if let Err(e) = decode_spilled(due, v.value()) {
            out.push(format!("spilled row {t}/{g}/{o}: {}", e.message));
        }
        if out.len() >= MAX {
            return Ok(out);
        }
    }
    let counts = tx.open_table(SPILL_COUNT).map_err(db_error)?;
    for e in counts.iter().map_err(db_error)? {
        let (k, v) = e.map_err(db_error)?;
        let (t, g) = k.value();
        let rows = counted.remove(&(t.to_owned(), g.to_owned())).unwrap_or(0);
        if rows != v.value() {
            out.push(format!(
                "group {t}/{g} counts {} spilled rows but {rows} are stored",
                v.value()
            ));
        }
    }
    for ((t, g), rows) in counted {
        out.push(format!(
            "group {t}/{g} has {rows} spilled rows but no count of them"
        ));
    }
    out.truncate(MAX);
    Ok(out)
}

/// Records that the session of `gen` closed after its final sync: nothing it wrote is torn;
/// and where it left each topic's active segment (`high_water`: directory name -> (segment
/// base, end of its records)), in the same transaction.
pub(crate) fn mark_closed(
    db: &redb::Database,
    gen: u32,
    high_water: &[(String, (u64, u64))],
) -> Result<(), BackendError> {
    let tx = db.begin_write().map_err(db_error)?;
    {
        let mut meta = tx.open_table(META).map_err(db_error)?;
        // Only this session's own record (one process holds the directory at a time).
        if meta.get(SESSION_GEN).map_err(db_error)?.map(|v| v.value()) == Some(u64::from(gen)) {
            meta.insert(SESSION_END, SESSION_CLOSED).map_err(db_error)?;
            let mut hw = tx.open_table(HIGH_WATER).map_err(db_error)?;
            hw.retain(|_, _| false).map_err(db_error)?;
            for (dir, at) in high_water {
                hw.insert(dir.as_str(), *at).map_err(db_error)?;
            }
        }
    }
    tx.commit().map_err(db_error)
}

/// Reads dead letters of `topic` after `after`, calling `visit` until it returns false.
pub(crate) fn scan_dead(
    db: &redb::Database,
    topic: &str,
    after: Option<MessageId>,
    mut visit: impl FnMut(DeadLetter) -> bool,
) -> Result<(), BackendError> {
    let tx = db.begin_read().map_err(db_error)?;
    let table = tx.open_table(DEAD).map_err(db_error)?;
    let start = match after {
        Some(id) => (topic, id.ms, id.seq),
        None => (topic, 0, 0),
    };
    for e in table
        .range(start..=(topic, u64::MAX, u64::MAX))
        .map_err(db_error)?
    {
        let (k, v) = e.map_err(db_error)?;
        let (_, ms, seq) = k.value();
        if after == Some(MessageId::new(ms, seq)) {
            continue;
        }
        if !visit(decode_dead(v.value())?) {
            break;
        }
    }
    Ok(())
}

/// One dead letter.
pub(crate) fn get_dead(
    db: &redb::Database,
    topic: &str,
    id: MessageId,
) -> Result<Option<DeadLetter>, BackendError> {
    let tx = db.begin_read().map_err(db_error)?;
    let table = tx.open_table(DEAD).map_err(db_error)?;
    match table.get((topic, id.ms, id.seq)).map_err(db_error)? {
        Some(v) => Ok(Some(decode_dead(v.value())?)),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Every decoder of a stored entry answers arbitrary bytes (a damaged database) with a
        /// value or an error, never a panic; what it accepts re-encodes to the same bytes where
        /// the encoding is canonical.
        #[test]
        fn stored_entry_decoders_never_panic(
            buf in proptest::collection::vec(any::<u8>(), 0..200),
            due in any::<u64>(),
        ) {
            if let Some(g) = GroupRecord::decode(&buf) {
                prop_assert_eq!(g.encode(), buf.clone());
            }
            let _ = decode_json::<TopicRecord>("topic", &buf);
            let _ = decode_json::<Row>("row", &buf);
            let _ = decode_dead(&buf);
            let _ = decode_spilled(due, &buf);
        }

        /// A group record whose count claims more ranges than the bytes hold (up to an
        /// overflowing count) is refused.
        #[test]
        fn a_group_record_with_a_wrong_count_is_refused(
            words in proptest::collection::vec(any::<u64>(), 4..12),
            n in any::<u64>(),
        ) {
            let mut buf: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
            buf[24..32].copy_from_slice(&n.to_le_bytes());
            let fits = n.checked_mul(16).and_then(|b| b.checked_add(32)) == Some(buf.len() as u64);
            prop_assert_eq!(GroupRecord::decode(&buf).is_some(), fits);
        }

        /// Bytes that are not a dead letter's encoding are an error.
        #[test]
        fn a_malformed_dead_letter_is_an_error(
            len in any::<u32>(),
            rest in proptest::collection::vec(any::<u8>(), 0..100),
        ) {
            let mut buf = len.to_le_bytes().to_vec();
            buf.extend_from_slice(&rest);
            // Random bytes are not the JSON of a dead letter, whatever the length says.
            prop_assert!(decode_dead(&buf).is_err());
        }
    }

    #[test]
    fn short_or_empty_entries_are_errors() {
        assert!(decode_dead(&[]).is_err());
        assert!(decode_dead(&[1, 0]).is_err());
        assert!(decode_dead(&[10, 0, 0, 0, b'{']).is_err());
        assert!(decode_json::<Row>("row", b"").is_err());
        assert!(decode_json::<TopicRecord>("topic", b"[1,2]").is_err());
        assert_eq!(GroupRecord::decode(&[]), None);
        assert_eq!(GroupRecord::decode(&[0; 31]), None);
        let huge = [0u8; 24]
            .iter()
            .copied()
            .chain(u64::MAX.to_le_bytes())
            .collect::<Vec<u8>>();
        assert_eq!(GroupRecord::decode(&huge), None);
    }

    #[test]
    fn group_record_round_trips_and_rejects_garbage() {
        let r = GroupRecord {
            cursor: 10,
            cursor_ms: 99,
            floor: 3,
            done: vec![(5, 7), (8, 9)],
        };
        assert_eq!(GroupRecord::decode(&r.encode()), Some(r.clone()));
        let mut bad = r.encode();
        bad.pop();
        assert_eq!(GroupRecord::decode(&bad), None);
    }

    #[test]
    fn spilled_rows_round_trip_and_a_misfiled_one_is_refused() {
        let fresh = Row::fresh(77);
        assert!(encode_spilled(&fresh).is_empty(), "the key holds all of it");
        assert_eq!(decode_spilled(77, &encode_spilled(&fresh)).unwrap(), fresh);
        let retried = Row {
            deliveries: 2,
            ..fresh.clone()
        };
        assert_eq!(
            decode_spilled(77, &encode_spilled(&retried)).unwrap(),
            retried
        );
        assert!(decode_spilled(78, &encode_spilled(&retried)).is_err());
        assert!(decode_spilled(77, b"{not json").is_err());
    }
}

#[cfg(test)]
mod db_tests {
    use super::*;

    #[test]
    fn dead_letters_round_trip_through_the_database() {
        let dir = std::env::temp_dir().join(format!("relq-state-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let db = redb::Database::create(dir.join("s.redb")).unwrap();
        load(&db, None).unwrap();
        let now = relq_core::Timestamp(1000);
        let dl = DeadLetter {
            id: MessageId::new(5, 0),
            message: relq_core::Message::new(
                MessageId::new(1, 2),
                relq_core::Outgoing {
                    kind: "k".into(),
                    payload: bytes::Bytes::from_static(b"\x00\xffpayload"),
                    headers: Default::default(),
                    deliver_at: None,
                    dedup_window: None,
                },
                now,
                3,
            ),
            topic: "t".into(),
            group: "g".into(),
            consumer: "c".into(),
            handler: "k".into(),
            reason: relq_core::FailureKind::Panic,
            category: None,
            error_chain: vec!["boom".into()],
            backtrace: None,
            attempts: 3,
            first_failed_at: now,
            last_failed_at: now,
            failures: vec![],
        };
        let batch = Batch {
            dead: vec![(("t".into(), 5, 0), Some(encode_dead(&dl)))],
            ..Batch::default()
        };
        let tx = db.begin_write().unwrap();
        apply(&tx, &batch).unwrap();
        tx.commit().unwrap();
        let mut seen = Vec::new();
        scan_dead(&db, "t", None, |d| {
            seen.push(d);
            true
        })
        .unwrap();
        assert_eq!(seen, vec![dl.clone()]);
        assert_eq!(get_dead(&db, "t", dl.id).unwrap(), Some(dl));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
