//! A topic's segmented, append-only message log.
//!
//! A topic directory holds segment files named by the offset of their first record
//! (`00000000000000000000.seg`). Segments are preallocated; records are framed by
//! [`codec`](super::codec). Only the committer appends. Readers see offsets below `visible`: records
//! whose commit cycle completed.
//!
//! # Recovery
//! Opening scans the newest (active) segment. A segment is sealed only after it was synced, so
//! every older segment is complete; a bad record inside one is reported as corruption when read,
//! never cut off. Every segment is fsynced at open, because a killed process can leave written
//! but unsynced data in the page cache that later reads would otherwise trust.
//!
//! The scan of the active segment stops at the first record that is short, fails its checksum,
//! has the wrong offset or an older `gen`, or at a zero length (the end of the data). Then it looks
//! at every byte after that point for a *later valid record*: a frame with a good checksum, an
//! offset at or above the one expected next and a `gen` no older than the last good record's.
//! (Frames with older offsets or `gen`s are leftovers from before an earlier cut: ignored.)
//!
//! - Nothing past the records (zeros only): clean.
//! - Damage and nothing valid after it: a **torn tail**, the unsynced end of the log, if the
//!   last session ([`LastSession`]) can have torn a write: after a power loss (its boot id is
//!   not this boot's, or unknown), any write may be torn; after a kill in this boot the page
//!   cache kept every write whole, except one a fatal signal stopped between two pages, so only
//!   damage of that shape ([`kill_tear_shape`]) is a torn tail; after a clean close nothing is.
//!   Otherwise it is corruption. A torn tail is cut: the bytes from the stop to the last non-zero
//!   byte are zeroed and synced, and the cut is logged at warn level with the topic, segment,
//!   position and bytes cut.
//! - Valid records after the stop: **corruption**, unless they can be the torn, unsynced writes
//!   of the session that crashed in a power loss. A power loss can tear a write in any order of
//!   its sectors (the crash simulator does), so a sector in the middle of a batch may be lost
//!   while a later one, holding whole records with the right offsets and `gen`, lands. That is
//!   told apart by what the state database recorded about the last session:
//!   - it closed cleanly: everything it wrote was synced, so no torn write exists: corruption;
//!   - it was killed in this boot: nothing lands out of order without a power loss: corruption;
//!   - it did not close, in another boot: the later records are torn unsynced writes only if
//!     every one of them carries that session's `gen` (older data was synced by that session's
//!     open) and, in sync mode, no committed state refers to an offset at or past the damage
//!     (sync mode commits state only about synced records). Otherwise: corruption;
//!   - not recorded (a directory from an older build): treated as possibly torn.
//!
//! A session that closes cleanly records where each topic's records end (`high_water`); the
//! next open reads nothing past that point when the records end exactly there.
//!
//!   Corruption fails the open with [`BackendErrorKind::Corrupt`](relq_core::BackendErrorKind),
//!   naming the topic, segment, position and offsets, and changes nothing, unless the operator
//!   chose [`Recovery::CutDamagedTail`](super::Recovery): then the damaged record and everything
//!   after it in the segment is cut, logged at error level with what was dropped.
//!
//! Every cut zeroes all non-zero bytes after the new end, so after an open the active segment
//! holds its records followed by zeros only; the next open can trust that anything valid it finds
//! past a stop was written after that open.
//!
//! # Offsets are never reused
//! The log's next offset after open is at least every offset the committed state refers to
//! (group cursors, done ranges, redelivery rows), above every record a cut dropped, and above
//! every record the cut bytes could have held (a periodic-mode publish is answered before its
//! sync, so a torn record's offset may have been handed out). Offsets beyond [`MAX_OFFSET`]
//! (a damaged name, marker or record) are refused as corruption. When that
//! is past the log's end, the active segment is sealed and a new one starts at that offset; an
//! empty marker file `<from>-<to>.gap` (created, and its directory synced, before the new
//! segment) records that offsets `from..to` were never stored, so reads and the sealed-segment
//! checks step over exactly that gap and nothing else.
//!
//! # Index
//! Each segment has a sparse in-memory index (offset, position) every [`INDEX_EVERY`] bytes, built
//! by the writer as it appends and, for segments found at open, by a full scan of the segment on
//! first use. It is derived from the log and never overrides it: a read checks every record's
//! offset.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use super::codec::{self, decode, Decoded, Record, HEADER, MAX_BODY};
use super::fs::{Storage, StorageFile};
use super::{corrupt, io_error, NAME};
use relq_core::Outgoing;
use relq_core::{BackendError, BackendErrorKind};

/// Bytes between two sparse index entries.
pub(crate) const INDEX_EVERY: u64 = 32 * 1024;
/// Bytes read per call when scanning.
const CHUNK: usize = 256 * 1024;
/// The smallest first read of a `read`.
const MIN_READ: usize = 4 * 1024;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One segment file.
pub(crate) struct Segment {
    pub(crate) base: u64,
    path: PathBuf,
    file: Arc<dyn StorageFile>,
    index: Mutex<SegIndex>,
}

#[derive(Default)]
struct SegIndex {
    /// (offset, position) pairs in order; the first is always (base, 0) once built.
    entries: Vec<(u64, u64)>,
    /// Whether `entries` covers the whole segment (always true for the active one).
    built: bool,
}

impl Segment {
    fn name(base: u64) -> String {
        format!("{base:020}.seg")
    }
}

/// Where the next read of a group continues, to skip the index lookup.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ReadHint {
    offset: u64,
    base: u64,
    pos: u64,
}

struct Writer {
    active: Arc<Segment>,
    pos: u64,
    capacity: u64,
    next_offset: u64,
    last_ms: u64,
    last_index_pos: u64,
    dirty: bool,
    buf: Vec<u8>,
}

struct Tail {
    records: VecDeque<Arc<Record>>,
    bytes: usize,
}

/// A topic's log.
pub(crate) struct TopicLog {
    storage: Arc<dyn Storage>,
    dir: PathBuf,
    segment_size: u64,
    tail_bytes: usize,
    gen: u32,
    segments: RwLock<BTreeMap<u64, Arc<Segment>>>,
    writer: Mutex<Writer>,
    visible: AtomicU64,
    tail: Mutex<Tail>,
    /// Offset ranges `[from, to)` never stored (see "Offsets are never reused"): between a
    /// segment ending at `from` and the next one starting at `to`. Only open adds to it.
    gaps: BTreeSet<(u64, u64)>,
}

/// How the log is laid out.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LogConfig {
    pub(crate) segment_size: u64,
    pub(crate) tail_bytes: usize,
    pub(crate) gen: u32,
}

/// Why a scan stopped.
#[derive(Debug, PartialEq, Eq)]
enum ScanEnd {
    /// Zeros or the end of the file: clean.
    Clean,
    /// Something that is not the next record.
    Bad(String),
}

struct Scan {
    /// Position after the last good record.
    end: u64,
    /// Offset the next record would have.
    next_offset: u64,
    last_ms: u64,
    /// The `gen` of the last good record (0 when there is none).
    last_gen: u32,
    entries: Vec<(u64, u64)>,
    how: ScanEnd,
    /// It stopped at a frame that does not decode (a checksum, a length, a short frame), not
    /// at an intact frame with the wrong offset or `gen`.
    torn_frame: bool,
}

/// Reads every record of `file` from the start, checking offsets (from `base`) and `gen` order.
fn scan(file: &dyn StorageFile, base: u64) -> Result<Scan, BackendError> {
    let len = file.len().map_err(io_error("reading a segment's length"))?;
    let mut s = Scan {
        end: 0,
        next_offset: base,
        last_ms: 0,
        last_gen: 0,
        entries: Vec::new(),
        how: ScanEnd::Clean,
        torn_frame: false,
    };
    let mut last_index_pos = 0u64;
    let mut buf = vec![0u8; CHUNK];
    let mut buf_pos = 0u64; // file position of buf[0]
    let mut filled = 0usize;
    let mut at = 0usize; // cursor in buf
    loop {
        let pos = buf_pos + at as u64;
        if pos + HEADER as u64 > len {
            return Ok(s); // the end of the file
        }
        match decode(&buf[at..filled]) {
            Decoded::Record(r, n) => {
                if r.offset != s.next_offset {
                    s.how = ScanEnd::Bad(format!(
                        "record at position {pos} has offset {}, expected {}",
                        r.offset, s.next_offset
                    ));
                    return Ok(s);
                }
                if r.gen < s.last_gen {
                    s.how = ScanEnd::Bad(format!("stale record at position {pos}"));
                    return Ok(s);
                }
                s.last_gen = r.gen;
                if s.entries.is_empty() || pos - last_index_pos >= INDEX_EVERY {
                    s.entries.push((r.offset, pos));
                    last_index_pos = pos;
                }
                s.next_offset += 1;
                s.last_ms = s.last_ms.max(r.ms);
                at += n;
                s.end = pos + n as u64;
            }
            Decoded::End => return Ok(s),
            Decoded::Invalid(why) => {
                s.how = ScanEnd::Bad(format!("{why} at position {pos}"));
                s.torn_frame = true;
                return Ok(s);
            }
            Decoded::Incomplete { need } => {
                if pos + need as u64 > len {
                    s.how = ScanEnd::Bad(format!("record at position {pos} runs past the file"));
                    s.torn_frame = true;
                    return Ok(s);
                }
                // Refill from `pos`, with room for the whole record.
                if need > buf.len() {
                    buf.resize(need, 0);
                }
                buf_pos = pos;
                at = 0;
                let want = buf.len().min((len - pos) as usize);
                filled = file
                    .read_at(&mut buf[..want], pos)
                    .map_err(io_error("reading a segment"))?;
                if filled < need {
                    s.how = ScanEnd::Bad(format!("short read at position {pos}"));
                    s.torn_frame = true;
                    return Ok(s);
                }
            }
        }
    }
}

/// The smallest encoded record: header, offset, ms, gen, flags, kind and header counts, payload
/// length.
const MIN_RECORD: u64 = HEADER as u64 + 8 + 8 + 4 + 1 + 2 + 2 + 4;

/// What lies past the point where a scan stopped.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Beyond {
    /// Valid records found past the stop (see [`look_past`]).
    pub(crate) records: u64,
    /// The first one: (position, offset).
    pub(crate) first: Option<(u64, u64)>,
    /// The highest offset among them.
    pub(crate) max_offset: u64,
    /// The lowest and highest `gen` among them.
    pub(crate) gens: Option<(u32, u32)>,
    /// Position after the last non-zero byte at or past the stop (the stop itself when there is
    /// none).
    pub(crate) dirty_end: u64,
}

/// Looks at every position of `file` from `from` on for valid records that a writer could have
/// put there after the stop: a good checksum, an offset of at least `expect` (and no more than
/// the records that fit before it allow) and a `gen` of at least `min_gen`. After a valid record
/// the search continues after it, so `records` counts a run of records, not overlapping frames.
/// Cheap field checks come before the checksum, so garbage costs a few comparisons a byte.
pub(crate) fn look_past(
    file: &dyn StorageFile,
    base: u64,
    from: u64,
    expect: u64,
    min_gen: u32,
) -> Result<Beyond, BackendError> {
    let len = file.len().map_err(io_error("reading a segment's length"))?;
    let mut out = Beyond {
        dirty_end: from,
        ..Beyond::default()
    };
    let mut buf = vec![0u8; CHUNK];
    let mut buf_pos = from;
    let mut filled = 0usize;
    let mut q = from;
    // Enough bytes to read a header and the body's offset and gen.
    const PEEK: usize = HEADER + 8 + 8 + 4;
    while q < len {
        if q + PEEK as u64 > buf_pos + filled as u64 && buf_pos + (filled as u64) < len {
            // Refill from q.
            buf_pos = q;
            let want = buf.len().min((len - q) as usize);
            filled = file
                .read_at(&mut buf[..want], q)
                .map_err(io_error("reading a segment"))?;
            if filled == 0 {
                break;
            }
        }
        // Within the buffer by the refill above (q < len <= buf_pos + filled, or refilled at q).
        let window = match usize::try_from(q - buf_pos)
            .ok()
            .and_then(|at| buf.get(at..filled))
        {
            Some(w) if !w.is_empty() => w,
            _ => break,
        };
        if window[0] == 0 {
            // Skip a run of zeros in one step: a record's length has a non-zero byte among its
            // four, so no record starts more than 3 bytes before the next non-zero byte. (One
            // may start right here: a length whose low byte is zero.)
            let z = first_nonzero(window).unwrap_or(window.len());
            if z > 3 {
                q += (z - 3) as u64;
                continue;
            }
        } else {
            out.dirty_end = out.dirty_end.max(q + 1);
        }
        if window.len() < PEEK {
            q += 1;
            continue;
        }
        let word = |i: usize, n: usize| -> u64 {
            window[i..i + n]
                .iter()
                .rev()
                .fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
        };
        let body = word(0, 4);
        let offset = word(HEADER, 8);
        let gen = word(HEADER + 16, 4);
        let plausible = body + HEADER as u64 >= MIN_RECORD
            && body <= MAX_BODY as u64
            && q + HEADER as u64 + body <= len
            && offset >= expect
            && offset <= base.saturating_add(q / MIN_RECORD)
            && gen >= u64::from(min_gen);
        if !plausible {
            q += 1;
            continue;
        }
        let n = HEADER + body as usize;
        let owned;
        let frame: &[u8] = if window.len() >= n {
            &window[..n]
        } else {
            let mut v = vec![0u8; n];
            let got = file
                .read_at(&mut v, q)
                .map_err(io_error("reading a segment"))?;
            v.truncate(got);
            owned = v;
            &owned
        };
        match decode(frame) {
            Decoded::Record(r, n) => {
                out.records += 1;
                if out.first.is_none() {
                    out.first = Some((q, r.offset));
                }
                out.max_offset = out.max_offset.max(r.offset);
                out.gens = Some(match out.gens {
                    Some((lo, hi)) => (lo.min(r.gen), hi.max(r.gen)),
                    None => (r.gen, r.gen),
                });
                q += n as u64;
                out.dirty_end = out.dirty_end.max(q);
            }
            Decoded::End | Decoded::Incomplete { .. } | Decoded::Invalid(_) => q += 1,
        }
    }
    Ok(out)
}

/// How the session that last opened the data directory for writing ended, as the state database
/// recorded it (see the module docs on recovery).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LastSession {
    /// It closed after its final sync: nothing it wrote can be torn.
    Clean,
    /// It did not close (killed, crashed, power loss): its unsynced writes may be torn.
    Crashed {
        /// Its `gen`: the records it wrote carry it.
        gen: u32,
        /// It ran in sync mode: committed state referred only to synced records.
        sync: bool,
        /// Whether it ran in this boot of the machine (its boot id is this one's): then it
        /// ended without a power loss (a kill, a crash of the process), the page cache kept
        /// every write it made, and the only damage that can explain is a write cut short at a
        /// page boundary by the kill. `None` when a boot id is unknown.
        same_boot: Option<bool>,
    },
    /// Not recorded (a data directory written by an older build).
    Unknown,
}

/// What open knows beyond the segment files.
#[derive(Clone, Copy, Debug)]
pub(crate) struct OpenContext<'a> {
    /// The topic, for messages.
    pub(crate) topic: &'a str,
    /// How the last session ended.
    pub(crate) last: LastSession,
    /// Offsets below this were handed out: committed state refers to them.
    pub(crate) referenced: u64,
    /// The operator chose to cut a damaged tail ([`Recovery::CutDamagedTail`](super::Recovery)).
    pub(crate) repair: bool,
    /// Opened for inspection only
    /// ([`EmbeddedBackend::open_read_only`](super::EmbeddedBackend::open_read_only)): nothing is
    /// synced, cut or created. A torn tail is where the records served end (it may be a running
    /// writer's write in progress); corruption fails as it does for a writer; offsets past the
    /// end are not skipped (nothing is handed out).
    pub(crate) read_only: bool,
    /// Where the last session, which closed cleanly, left this topic's active segment: (its
    /// base offset, the position after its last record). When the newest segment's records end
    /// exactly there, nothing past it is read.
    pub(crate) high_water: Option<(u64, u64)>,
}

/// An opened log and what open found.
pub(crate) struct Opened {
    pub(crate) log: TopicLog,
    /// The end of the stored records (after any cut), before skipping offsets handed out.
    pub(crate) found_end: u64,
}

/// What recovery concluded about the active segment's end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TailVerdict {
    /// Records, then zeros.
    Clean,
    /// Bytes to cut that hold no valid record (a torn write, or garbage past the end).
    Torn,
    /// Valid records after the damage that can be the crashed session's unsynced writes.
    TornUnsynced,
    /// Valid records after the damage that were synced: corruption.
    Corrupt,
}

/// Judges the active segment's end (see the module docs on recovery). `kill_tear` says whether
/// the damage has the shape a process kill can leave (see [`kill_tear_shape`]); `live` that a
/// writer may be running (a read-only open), so a damaged end may be a write in progress.
fn verdict(
    s: &Scan,
    beyond: &Beyond,
    last: LastSession,
    referenced: u64,
    kill_tear: bool,
    live: bool,
) -> TailVerdict {
    let bad = matches!(s.how, ScanEnd::Bad(_));
    if beyond.records == 0 {
        if !bad && beyond.dirty_end <= s.end {
            return TailVerdict::Clean;
        }
        // Bytes past the last good record and nothing valid after them: a torn write, if the
        // last session could have left one.
        let torn_possible = live
            || match last {
                // Everything it wrote was synced before it closed: nothing can be torn.
                LastSession::Clean => false,
                // Killed in this boot: the page cache kept its writes whole, except one a
                // fatal signal cut short at a page boundary.
                LastSession::Crashed {
                    same_boot: Some(true),
                    ..
                } => kill_tear,
                // A power loss (or no way to tell): any unsynced write may be torn.
                LastSession::Crashed { .. } | LastSession::Unknown => true,
            };
        return if torn_possible {
            TailVerdict::Torn
        } else {
            TailVerdict::Corrupt
        };
    }
    let torn_possible = match last {
        LastSession::Clean => false,
        LastSession::Unknown => true,
        // Without a power loss nothing lands out of order: a kill keeps every write before
        // the last whole.
        LastSession::Crashed {
            same_boot: Some(true),
            ..
        } => false,
        LastSession::Crashed { gen, sync, .. } => {
            beyond.gens == Some((gen, gen)) && !(sync && referenced > s.next_offset)
        }
    };
    if torn_possible {
        TailVerdict::TornUnsynced
    } else {
        TailVerdict::Corrupt
    }
}

/// The page size a write is cut at when a fatal signal interrupts it (a multiple of every page
/// size Linux uses is a multiple of this).
const PAGE: u64 = 4096;

/// Whether the damage at the end of a scan has the shape a process killed in the middle of a
/// write can leave: Linux copies a write into the page cache page by page and stops between
/// pages when a fatal signal is pending, so the write's bytes are kept up to a page boundary
/// and the rest of the (preallocated, zeroed) space stays zero. So: the scan stopped at a frame
/// that does not decode (not an intact frame with a wrong offset or `gen`), and its non-zero
/// bytes end before a page boundary that lies inside the frame its length announces.
fn kill_tear_shape(
    file: &dyn StorageFile,
    s: &Scan,
    beyond: &Beyond,
) -> Result<bool, BackendError> {
    if !s.torn_frame {
        return Ok(false);
    }
    let mut len = [0u8; 4];
    let got = file
        .read_at(&mut len, s.end)
        .map_err(io_error("reading a segment"))?;
    len[got.min(4)..].fill(0);
    let announced = s.end + HEADER as u64 + u64::from(u32::from_le_bytes(len));
    let boundary = beyond.dirty_end.div_ceil(PAGE).saturating_mul(PAGE);
    Ok(beyond.dirty_end > s.end && boundary < announced)
}

/// The position of the first non-zero byte of `buf`. Whole blocks are compared with a block of
/// zeros (a `memcmp`), so the zeros after a segment's data cost little to pass over.
fn first_nonzero(buf: &[u8]) -> Option<usize> {
    const BLOCK: usize = 4096;
    static ZEROS: [u8; BLOCK] = [0; BLOCK];
    let mut at = 0;
    for block in buf.chunks(BLOCK) {
        if block != &ZEROS[..block.len()] {
            return block.iter().position(|b| *b != 0).map(|i| at + i);
        }
        at += block.len();
    }
    None
}

/// How many tails each recovery verdict judged on this thread (an open runs on its caller's),
/// for tests that must see a path taken.
#[cfg(test)]
pub(crate) mod test_counts {
    use std::cell::Cell;

    use super::TailVerdict;

    thread_local! {
        /// Torn tails and torn unsynced writes cut.
        pub(crate) static TORN: Cell<u64> = const { Cell::new(0) };
    }

    pub(crate) fn count(v: &TailVerdict) {
        if matches!(v, TailVerdict::Torn | TailVerdict::TornUnsynced) {
            TORN.with(|c| c.set(c.get() + 1));
        }
    }
}

/// Writes zeros over `from..to` of `file`, from the end backwards, one page (or less) at a
/// time, each within one page. A kill can stop a write only between pages, so a kill during a
/// cut leaves the damaged bytes' beginning as it was, followed by zeros: the same shape (a
/// write cut at a page boundary) the next open accepts as a torn tail again.
fn zero(file: &dyn StorageFile, from: u64, to: u64) -> Result<(), BackendError> {
    let zeros = vec![0u8; PAGE as usize];
    let mut end = to;
    while end > from {
        let start = ((end - 1) / PAGE * PAGE).max(from);
        file.write_at(&zeros[..(end - start) as usize], start)
            .map_err(io_error("cutting a segment's damaged tail"))?;
        end = start;
    }
    Ok(())
}

/// Parses a gap marker's name: `<from>-<to>.gap`.
fn parse_gap(name: &str) -> Option<(u64, u64)> {
    let (a, b) = name.strip_suffix(".gap")?.split_once('-')?;
    let (a, b) = (a.parse().ok()?, b.parse().ok()?);
    (a < b).then_some((a, b))
}

/// What a read-only look at a topic directory found (see [`inspect`]).
#[derive(Debug, Default)]
pub(crate) struct Inspection {
    /// Segment files and their base offsets, in order.
    pub(crate) segments: Vec<(PathBuf, u64)>,
    pub(crate) gaps: BTreeSet<(u64, u64)>,
    pub(crate) records: u64,
    pub(crate) bytes: u64,
    /// The offset after the last stored record.
    pub(crate) end: u64,
    /// Damage found: (segment, position, last good offset, what, what lies beyond, verdict).
    pub(crate) damage: Vec<InspectedDamage>,
}

/// One damaged place in a segment.
#[derive(Debug)]
pub(crate) struct InspectedDamage {
    pub(crate) segment: PathBuf,
    pub(crate) position: u64,
    pub(crate) last_good: Option<u64>,
    pub(crate) what: String,
    pub(crate) beyond: Beyond,
    pub(crate) verdict: TailVerdict,
}

/// Reads every segment of a topic directory and reports damage, changing nothing (the files are
/// opened through `storage`, which for `relq check` opens them read-only).
pub(crate) fn inspect(
    storage: &dyn Storage,
    dir: &Path,
    last: LastSession,
    referenced: u64,
) -> Result<Inspection, BackendError> {
    let mut out = Inspection::default();
    for name in storage
        .list(dir)
        .map_err(io_error("listing a topic directory"))?
    {
        if let Some(g) = parse_gap(&name) {
            out.gaps.insert(g);
        } else if let Some(base) = name
            .strip_suffix(".seg")
            .and_then(|b| b.parse::<u64>().ok())
        {
            out.segments.push((dir.join(&name), base));
        }
    }
    out.segments.sort_by_key(|(_, b)| *b);
    // A segment retention removes between the listing and its opening (the directory may be in
    // use) is no damage: it is left out.
    let mut files = Vec::with_capacity(out.segments.len());
    for (path, base) in std::mem::take(&mut out.segments) {
        match storage.open(&path, false) {
            Ok(f) => files.push((path, base, f)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("opening a segment")(e)),
        }
    }
    out.segments = files.iter().map(|(p, b, _)| (p.clone(), *b)).collect();
    // Gap markers wholly below the oldest segment are leftovers of retention: not counted.
    if let Some((_, first)) = out.segments.first() {
        out.gaps.retain(|(_, to)| to > first);
    }
    let n = out.segments.len();
    for (i, (path, base, file)) in files.iter().enumerate() {
        if *base > MAX_OFFSET || out.gaps.iter().any(|(_, to)| *to > MAX_OFFSET) {
            out.damage.push(InspectedDamage {
                segment: path.clone(),
                position: 0,
                last_good: None,
                what: format!(
                    "the segment's name or a gap marker names an offset beyond {MAX_OFFSET}, \
                     which no log reaches: an open refuses the topic"
                ),
                beyond: Beyond::default(),
                verdict: TailVerdict::Corrupt,
            });
            break;
        }
        let s = scan(&**file, *base)?;
        out.records += s.next_offset - base;
        out.bytes += s.end;
        out.end = s.next_offset;
        let active = i + 1 == n;
        let beyond = look_past(&**file, *base, s.end, s.next_offset, s.last_gen)?;
        let v = if active {
            let kill_tear = kill_tear_shape(&**file, &s, &beyond)?;
            verdict(&s, &beyond, last, referenced, kill_tear, false)
        } else if matches!(s.how, ScanEnd::Bad(_)) || beyond.records > 0 {
            // A sealed segment was synced whole: anything wrong in it is corruption.
            TailVerdict::Corrupt
        } else {
            TailVerdict::Clean
        };
        let what = match &s.how {
            ScanEnd::Bad(why) => why.clone(),
            ScanEnd::Clean if beyond.records > 0 => format!(
                "a zero length at position {} where a record should be",
                s.end
            ),
            ScanEnd::Clean => format!("non-zero bytes after the end at position {}", s.end),
        };
        if v != TailVerdict::Clean {
            out.damage.push(InspectedDamage {
                segment: path.clone(),
                position: s.end,
                last_good: s.next_offset.checked_sub(1).filter(|o| *o >= *base),
                what,
                beyond,
                verdict: v,
            });
        }
        if let Some((_, next)) = out.segments.get(i + 1) {
            if *next != s.next_offset && !out.gaps.contains(&(s.next_offset, *next)) {
                out.damage.push(InspectedDamage {
                    segment: path.clone(),
                    position: s.end,
                    last_good: s.next_offset.checked_sub(1),
                    what: format!(
                        "the segment ends at offset {} but the next one starts at {next}",
                        s.next_offset
                    ),
                    beyond: Beyond::default(),
                    verdict: TailVerdict::Corrupt,
                });
            }
        }
    }
    if let Some((_, base)) = out.segments.last() {
        out.end = out.end.max(*base);
    }
    Ok(out)
}

/// Describes damage followed by valid records, for the error and the log.
fn damage_detail(
    ctx: &OpenContext<'_>,
    path: &Path,
    s: &Scan,
    beyond: &Beyond,
    why: &str,
) -> String {
    let last_good = match s.next_offset.checked_sub(1) {
        Some(o) if s.end > 0 => format!("the last good record before it is offset {o}"),
        _ => "no good record precedes it in this segment".to_owned(),
    };
    let (first_pos, first_offset) = beyond.first.unwrap_or((s.end, s.next_offset));
    format!(
        "topic {:?}: the active segment {} is damaged at position {} ({why}); {last_good}, \
         and {} valid records follow the damage, from offset {first_offset} (position \
         {first_pos}) to offset {}",
        ctx.topic,
        path.display(),
        s.end,
        beyond.records,
        beyond.max_offset
    )
}

/// Describes damage at the active segment's end with nothing valid after it, when the last
/// session cannot have torn it (it closed cleanly, or was killed in this boot and the damage
/// is not a write cut at a page boundary).
fn tail_detail(ctx: &OpenContext<'_>, path: &Path, s: &Scan, beyond: &Beyond, why: &str) -> String {
    let last_good = match s.next_offset.checked_sub(1) {
        Some(o) if s.end > 0 => format!("the last good record before it is offset {o}"),
        _ => "no good record precedes it in this segment".to_owned(),
    };
    let session = match ctx.last {
        LastSession::Clean => "the last session closed cleanly (everything it wrote was synced)",
        _ => {
            "the last session ended in this boot of the machine (a kill or crash of the process \
             keeps every write whole, except one cut at a page boundary, which this is not)"
        }
    };
    format!(
        "topic {:?}: the active segment {} is damaged at position {} ({why}), {} bytes up to \
         position {}; {last_good}. No write can have been torn there: {session}",
        ctx.topic,
        path.display(),
        s.end,
        beyond.dirty_end.saturating_sub(s.end),
        beyond.dirty_end,
    )
}

/// Offsets above this are refused as damage: at a million records a second, 2^62 lasts over
/// 146,000 years, so a value past it comes from a damaged file, and the arithmetic on offsets
/// stays far from overflowing.
pub(crate) const MAX_OFFSET: u64 = 1 << 62;

/// The error for offsets too large to be real (a damaged gap marker, segment name or record).
fn implausible(ctx: &OpenContext<'_>) -> BackendError {
    corrupt(format!(
        "topic {:?}: its log or the state database refers to offsets beyond {MAX_OFFSET}, which \
         no log reaches: a damaged segment name, gap marker, record or group record. Run `relq \
         check` on the data directory",
        ctx.topic
    ))
}

impl TopicLog {
    fn new(
        storage: Arc<dyn Storage>,
        dir: PathBuf,
        config: LogConfig,
        segments: BTreeMap<u64, Arc<Segment>>,
        writer: Writer,
    ) -> TopicLog {
        let next = writer.next_offset;
        TopicLog {
            storage,
            dir,
            segment_size: config.segment_size,
            tail_bytes: config.tail_bytes,
            gen: config.gen,
            segments: RwLock::new(segments),
            writer: Mutex::new(writer),
            visible: AtomicU64::new(next),
            tail: Mutex::new(Tail {
                records: VecDeque::new(),
                bytes: 0,
            }),
            gaps: BTreeSet::new(),
        }
    }

    /// Creates the directory and the first segment, durably.
    pub(crate) fn create(
        storage: Arc<dyn Storage>,
        dir: PathBuf,
        config: LogConfig,
    ) -> Result<TopicLog, BackendError> {
        storage
            .create_dir_all(&dir)
            .map_err(io_error("creating a topic directory"))?;
        if let Some(parent) = dir.parent() {
            storage
                .sync_dir(parent)
                .map_err(io_error("syncing the topics directory"))?;
        }
        let seg = new_segment(&*storage, &dir, 0, config.segment_size)?;
        let writer = Writer {
            capacity: config.segment_size,
            active: seg.clone(),
            pos: 0,
            next_offset: 0,
            last_ms: 0,
            last_index_pos: 0,
            dirty: false,
            buf: Vec::new(),
        };
        let segments = BTreeMap::from([(0, seg)]);
        Ok(TopicLog::new(storage, dir, config, segments, writer))
    }

    /// Opens an existing topic directory: recovers the newest segment (see the module docs),
    /// syncs every segment, and starts the next offset after every offset handed out.
    ///
    /// # Errors
    /// [`Corrupt`](relq_core::BackendErrorKind::Corrupt) when valid records follow damage in the
    /// active segment (and `ctx.repair` is not set), or the directory has no segment; I/O errors.
    pub(crate) fn open(
        storage: Arc<dyn Storage>,
        dir: PathBuf,
        config: LogConfig,
        ctx: &OpenContext<'_>,
    ) -> Result<Opened, BackendError> {
        let names = storage
            .list(&dir)
            .map_err(io_error("listing a topic directory"))?;
        let mut segments = BTreeMap::new();
        let mut gaps = BTreeSet::new();
        if ctx.referenced > MAX_OFFSET {
            return Err(implausible(ctx));
        }
        for name in names {
            if let Some(g) = parse_gap(&name) {
                if g.1 > MAX_OFFSET {
                    return Err(implausible(ctx));
                }
                gaps.insert(g);
                continue;
            }
            let Some(base) = name
                .strip_suffix(".seg")
                .and_then(|b| b.parse::<u64>().ok())
            else {
                continue;
            };
            if base > MAX_OFFSET {
                return Err(implausible(ctx));
            }
            let path = dir.join(&name);
            let file = storage
                .open(&path, false)
                .map_err(io_error("opening a segment"))?;
            if !ctx.read_only {
                file.sync_data().map_err(io_error("syncing a segment"))?;
            }
            segments.insert(
                base,
                Arc::new(Segment {
                    base,
                    path,
                    file,
                    index: Mutex::new(SegIndex::default()),
                }),
            );
        }
        let Some((_, newest)) = segments.last_key_value() else {
            return Err(corrupt(format!(
                "topic directory {} has no segment files",
                dir.display()
            )));
        };
        let newest = newest.clone();
        let s = scan(&*newest.file, newest.base)?;
        // A session that closed cleanly recorded where its records end: when they end exactly
        // there, the rest of the preallocated segment was never written (an earlier open's cut
        // zeroed what lay past the end before), so it is not read.
        let closed_at_end =
            matches!(s.how, ScanEnd::Clean) && ctx.high_water == Some((newest.base, s.end));
        let beyond = if closed_at_end {
            Beyond {
                dirty_end: s.end,
                ..Beyond::default()
            }
        } else {
            look_past(&*newest.file, newest.base, s.end, s.next_offset, s.last_gen)?
        };
        let why = match &s.how {
            ScanEnd::Bad(why) => why.clone(),
            ScanEnd::Clean => format!("a zero length at position {}", s.end),
        };
        let cut_bytes = beyond.dirty_end.saturating_sub(s.end);
        let segment = newest.path.display();
        let topic = ctx.topic;
        let kill_tear = kill_tear_shape(&*newest.file, &s, &beyond)?;
        let v = verdict(
            &s,
            &beyond,
            ctx.last,
            ctx.referenced,
            kill_tear,
            ctx.read_only,
        );
        #[cfg(test)]
        test_counts::count(&v);
        match v {
            TailVerdict::Clean => {}
            // Read-only, a torn tail (or a running writer's write in progress) is where the
            // records served end; nothing is cut.
            TailVerdict::Torn | TailVerdict::TornUnsynced if ctx.read_only => tracing::debug!(
                topic,
                segment = %segment,
                position = s.end,
                next_offset = s.next_offset,
                "opened read-only: serving the records up to a torn tail ({why}), cutting nothing"
            ),
            TailVerdict::Torn => tracing::warn!(
                topic,
                segment = %segment,
                position = s.end,
                bytes = cut_bytes,
                next_offset = s.next_offset,
                "cutting a torn tail (no valid record after it) left by {}: {why}; the offsets                  its bytes could have held are not reused",
                match ctx.last {
                    LastSession::Crashed {
                        same_boot: Some(true),
                        ..
                    } => "a write the killed process did not finish",
                    _ => "a power loss",
                }
            ),
            TailVerdict::TornUnsynced => tracing::warn!(
                topic,
                segment = %segment,
                position = s.end,
                bytes = cut_bytes,
                dropped_records = beyond.records,
                dropped_up_to_offset = beyond.max_offset,
                "cutting a torn tail: {why}; {} records after it are unsynced writes of the session \
                 that crashed (never acknowledged in sync mode); their offsets are not reused",
                beyond.records
            ),
            TailVerdict::Corrupt => {
                let detail = if beyond.records > 0 {
                    damage_detail(ctx, &newest.path, &s, &beyond, &why)
                } else {
                    tail_detail(ctx, &newest.path, &s, &beyond, &why)
                };
                if !ctx.repair || ctx.read_only {
                    let root = dir
                        .parent()
                        .and_then(Path::parent)
                        .map_or_else(|| dir.display().to_string(), |r| r.display().to_string());
                    return Err(corrupt(format!(
                        "{detail}. This is corruption, not a torn write: relq changed nothing and \
                         will not drop anything on its own. Run `relq check {root}` to see all \
                         damage; restore the data directory from a backup; or, to drop the \
                         damaged record and everything after it in this segment knowingly, open \
                         with `EmbeddedConfig::recovery(Recovery::CutDamagedTail)`"
                    )));
                }
                tracing::error!(
                    topic,
                    segment = %segment,
                    position = s.end,
                    bytes = cut_bytes,
                    dropped_records = beyond.records,
                    "{detail}; cutting it as the operator chose (Recovery::CutDamagedTail): the \
                     damaged record and the {} valid records after it are dropped; their offsets \
                     are not reused",
                    beyond.records
                );
            }
        }
        if (matches!(s.how, ScanEnd::Bad(_)) || cut_bytes > 0) && !ctx.read_only {
            // Zeros from the new end to the last non-zero byte: nothing stale stays behind for a
            // later open to mistake for records written after it.
            let to = beyond.dirty_end.max(s.end + HEADER as u64);
            zero(&*newest.file, s.end, to)?;
            newest
                .file
                .sync_data()
                .map_err(io_error("syncing a segment"))?;
        }
        let capacity = newest
            .file
            .len()
            .map_err(io_error("reading a segment's length"))?;
        {
            let mut idx = lock(&newest.index);
            idx.entries = s.entries;
            idx.built = true;
        }
        let found_end = s.next_offset;
        // Offsets handed out: referred to by committed state, dropped by the cut, or skipped by
        // an earlier open (whose new segment a crash may have kept from being made).
        let dropped = if beyond.records > 0 {
            beyond
                .max_offset
                .checked_add(1)
                .ok_or_else(|| implausible(ctx))?
        } else {
            0
        };
        // The cut bytes held records whose offsets may have been handed out (a periodic-mode
        // publish is answered before its sync): none of them is reused, however many the
        // damaged bytes could have held.
        let torn = if matches!(s.how, ScanEnd::Bad(_)) || cut_bytes > 0 {
            s.next_offset
                .checked_add(cut_bytes.div_ceil(MIN_RECORD).max(1))
                .ok_or_else(|| implausible(ctx))?
        } else {
            0
        };
        let skipped = gaps.iter().map(|(_, to)| *to).max().unwrap_or(0);
        let next = found_end
            .max(ctx.referenced)
            .max(dropped)
            .max(torn)
            .max(skipped);
        if next > MAX_OFFSET {
            return Err(implausible(ctx));
        }
        let writer = Writer {
            capacity,
            active: newest,
            pos: s.end,
            next_offset: s.next_offset,
            last_ms: s.last_ms,
            last_index_pos: s.end,
            dirty: false,
            buf: Vec::new(),
        };
        let mut log = TopicLog::new(storage, dir, config, segments, writer);
        log.gaps = gaps;
        if next > found_end && !ctx.read_only {
            log.skip_to(next)?;
        }
        Ok(Opened { log, found_end })
    }

    /// Seals the active segment and starts the next one at `to`, recording the gap first (open
    /// only, before anyone reads).
    fn skip_to(&mut self, to: u64) -> Result<(), BackendError> {
        let from = lock(&self.writer).next_offset;
        let marker = self.dir.join(format!("{from:020}-{to:020}.gap"));
        self.storage
            .open(&marker, true)
            .map_err(io_error("creating a gap marker"))?;
        self.storage
            .sync_dir(&self.dir)
            .map_err(io_error("syncing a topic directory"))?;
        self.gaps.insert((from, to));
        let mut w = lock(&self.writer);
        w.next_offset = to;
        self.roll(&mut w, HEADER as u64)?;
        drop(w);
        self.visible.store(to, Ordering::Release);
        Ok(())
    }

    /// The first stored offset at or after `offset`'s gap, if it falls into one.
    pub(crate) fn past_gaps(&self, mut offset: u64) -> u64 {
        while let Some((_, to)) = self
            .gaps
            .range(..=(offset, u64::MAX))
            .rev()
            .find(|(from, to)| *from <= offset && offset < *to)
        {
            offset = *to;
        }
        offset
    }

    /// The highest offset below `offset` that is not in a gap.
    pub(crate) fn stored_before(&self, offset: u64) -> Option<u64> {
        let mut o = offset.checked_sub(1)?;
        while let Some((from, _)) = self.gaps.iter().find(|(from, to)| *from <= o && o < *to) {
            o = from.checked_sub(1)?;
        }
        Some(o)
    }

    /// The highest offset `t <= end` with at most `n` stored records in `t..end`, counting
    /// across gaps (so `max_len` retention keeps `n` records, not `n` offsets).
    pub(crate) fn keeping(&self, end: u64, n: u64) -> u64 {
        let mut t = end;
        let mut left = n;
        for (a, b) in self.gaps.iter().rev() {
            let b = (*b).min(t);
            if b <= *a {
                continue;
            }
            let stored = t - b;
            if left <= stored {
                return t - left;
            }
            left -= stored;
            t = *a;
        }
        t.saturating_sub(left)
    }

    /// How many offsets in `from..to` can hold a record (those not in a gap).
    pub(crate) fn stored_between(&self, from: u64, to: u64) -> u64 {
        let skipped: u64 = self
            .gaps
            .iter()
            .map(|(a, b)| (*b).min(to).saturating_sub((*a).max(from)))
            .sum();
        to.saturating_sub(from).saturating_sub(skipped)
    }

    /// The active segment's base offset and the position after its last record written (the
    /// committer's; at close, where the records end).
    pub(crate) fn high_water(&self) -> (u64, u64) {
        let w = lock(&self.writer);
        (w.active.base, w.pos)
    }

    /// The first offset not yet readable (the number of records ever appended and committed).
    pub(crate) fn visible(&self) -> u64 {
        self.visible.load(Ordering::Acquire)
    }

    /// The offset of the oldest record still on disk.
    pub(crate) fn first_offset(&self) -> u64 {
        self.segments
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .next()
            .copied()
            .unwrap_or(0)
    }

    /// Appends messages (committer only): assigns offsets and times, writes them to the page
    /// cache. They become readable with [`make_visible`](Self::make_visible) after a sync.
    pub(crate) fn append(
        &self,
        batch: Vec<Outgoing>,
        now_ms: u64,
        out: &mut Vec<Arc<Record>>,
    ) -> Result<(), BackendError> {
        // Nothing of a batch is written unless every message fits the record format (the engine's
        // publish refused such messages already; this keeps a bad one from reaching a file by any
        // other path, e.g. a replayed dead letter).
        for (i, m) in batch.iter().enumerate() {
            codec::check(&m.kind, &m.headers, m.payload.len(), m.deliver_at.is_some())
                .map_err(|why| not_storable(i, batch.len(), &why))?;
        }
        let mut w = lock(&self.writer);
        let w = &mut *w;
        w.buf.clear();
        // A batch goes into one segment: if it does not fit, the next segment is started before
        // anything is written, so a failure to create it (a full disk) leaves no partial batch.
        let ms = now_ms.max(w.last_ms);
        let records: Vec<Record> = batch
            .into_iter()
            .enumerate()
            .map(|(i, m)| Record {
                offset: w.next_offset + i as u64,
                ms,
                gen: self.gen,
                deliver_at: m.deliver_at.map(|t| t.0),
                kind: m.kind,
                headers: m.headers,
                payload: m.payload,
            })
            .collect();
        let total: u64 = records.iter().map(|r| r.encoded_len() as u64).sum();
        if w.pos + total + HEADER as u64 > w.capacity {
            self.roll(w, total + HEADER as u64)?;
        }
        let mut buf_start = w.pos;
        for rec in records {
            let len = rec.encoded_len() as u64;
            if buf_start + w.buf.len() as u64 + len + HEADER as u64 > w.capacity {
                self.flush(w, buf_start)?;
                self.roll(w, len + HEADER as u64)?;
                buf_start = w.pos;
            }
            let pos = buf_start + w.buf.len() as u64;
            // Checked above, so this cannot fail (and it writes nothing when it does).
            rec.encode(&mut w.buf)
                .map_err(|why| not_storable(0, 1, &why))?;
            if pos == 0 || pos - w.last_index_pos >= INDEX_EVERY {
                lock(&w.active.index).entries.push((rec.offset, pos));
                w.last_index_pos = pos;
            }
            w.next_offset += 1;
            w.last_ms = rec.ms;
            out.push(Arc::new(rec));
        }
        self.flush(w, buf_start)
    }

    fn flush(&self, w: &mut Writer, at: u64) -> Result<(), BackendError> {
        if w.buf.is_empty() {
            return Ok(());
        }
        w.active
            .file
            .write_at(&w.buf, at)
            .map_err(io_error("writing to a segment"))?;
        w.pos = at + w.buf.len() as u64;
        w.buf.clear();
        w.dirty = true;
        Ok(())
    }

    /// Seals the active segment (synced first, so a newer segment implies a complete older one)
    /// and starts a new one with room for at least `need` bytes.
    fn roll(&self, w: &mut Writer, need: u64) -> Result<(), BackendError> {
        // An explicit end marker: bytes a crash left beyond the recovered end (from before the
        // last open) must not follow the data of a sealed segment.
        if w.pos + HEADER as u64 <= w.capacity {
            w.active
                .file
                .write_at(&[0; HEADER], w.pos)
                .map_err(io_error("writing to a segment"))?;
        }
        w.active
            .file
            .sync_data()
            .map_err(io_error("syncing a segment"))?;
        w.dirty = false;
        let size = self.segment_size.max(need);
        let seg = new_segment(&*self.storage, &self.dir, w.next_offset, size)?;
        self.segments
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(seg.base, seg.clone());
        w.active = seg;
        w.pos = 0;
        w.capacity = size;
        w.last_index_pos = 0;
        Ok(())
    }

    /// Syncs the active segment now, leaving the dirty flag for the syncer (whose round may
    /// still be answering for earlier writes).
    pub(crate) fn sync_now(&self) -> Result<(), BackendError> {
        let w = lock(&self.writer);
        w.active
            .file
            .sync_data()
            .map_err(io_error("syncing a segment"))
    }

    /// The segment written since the last sync, if any (committer only).
    pub(crate) fn take_dirty(&self) -> Option<Arc<dyn StorageFile>> {
        let mut w = lock(&self.writer);
        std::mem::take(&mut w.dirty).then(|| w.active.file.clone())
    }

    /// Makes appended (and synced) records readable.
    pub(crate) fn make_visible(&self, records: &[Arc<Record>]) {
        let Some(last) = records.last() else {
            return;
        };
        {
            let mut tail = lock(&self.tail);
            for r in records {
                tail.bytes += r.payload.len() + 64;
                tail.records.push_back(r.clone());
            }
            while tail.bytes > self.tail_bytes && tail.records.len() > 1 {
                if let Some(r) = tail.records.pop_front() {
                    tail.bytes -= r.payload.len() + 64;
                }
            }
        }
        self.visible.store(last.offset + 1, Ordering::Release);
    }

    /// Whether a read from `offset` is served from memory (the tail cache, or nothing to read
    /// yet) rather than from the segment files.
    pub(crate) fn in_memory(&self, offset: u64) -> bool {
        offset >= self.visible()
            || lock(&self.tail)
                .records
                .front()
                .is_some_and(|first| offset >= first.offset)
    }

    /// What [`read`](Self::read) returns, if it can be served from memory (the tail cache, or
    /// nothing to read yet); `None` if it needs the segment files.
    pub(crate) fn read_cached(&self, from: u64, max: usize) -> Option<Vec<Arc<Record>>> {
        if from >= self.visible() || max == 0 {
            return Some(Vec::new());
        }
        let tail = lock(&self.tail);
        let first = tail.records.front()?.offset;
        (from >= first).then(|| {
            let skip = (from - first) as usize;
            tail.records.iter().skip(skip).take(max).cloned().collect()
        })
    }

    /// Up to `max` readable records from offset `from` on, in order. Offsets below the oldest
    /// segment are skipped.
    pub(crate) fn read(
        &self,
        from: u64,
        max: usize,
        hint: &mut Option<ReadHint>,
    ) -> Result<Vec<Arc<Record>>, BackendError> {
        if let Some(out) = self.read_cached(from, max) {
            return Ok(out);
        }
        let visible = self.visible();
        let mut out = Vec::new();
        let mut offset = self.past_gaps(from.max(self.first_offset()));
        while out.len() < max && offset < visible {
            let seg = {
                let segs = self.segments.read().unwrap_or_else(|e| e.into_inner());
                match segs.range(..=offset).next_back() {
                    Some((_, s)) => s.clone(),
                    None => break,
                }
            };
            let (pos, exact) = match hint {
                Some(h) if h.offset == offset && h.base == seg.base => (h.pos, true),
                _ => (self.locate(&seg, offset)?, false),
            };
            let (next, pos) =
                self.read_segment(&seg, pos, exact, offset, max, visible, &mut out)?;
            *hint = Some(ReadHint {
                offset: next,
                base: seg.base,
                pos,
            });
            if out.len() >= max || next >= visible {
                break;
            }
            // The segment ended: the next one must start where it stopped, or after a gap
            // recorded as starting there.
            let following = self.base_after(seg.base);
            match following {
                Some(base) if base == next || self.gaps.contains(&(next, base)) => offset = base,
                Some(base) => {
                    return Err(corrupt(format!(
                        "segment {} ends at offset {next} but the next segment starts at {base}",
                        seg.path.display()
                    )))
                }
                None => break,
            }
        }
        Ok(out)
    }

    /// One record, if it is readable and still stored.
    pub(crate) fn get(&self, offset: u64) -> Result<Option<Arc<Record>>, BackendError> {
        Ok(one(self.read(offset, 1, &mut None)?, offset))
    }

    /// What [`get`](Self::get) returns, if it can be served from memory.
    pub(crate) fn get_cached(&self, offset: u64) -> Option<Option<Arc<Record>>> {
        self.read_cached(offset, 1).map(|recs| one(recs, offset))
    }

    /// The base offset of the segment after the one starting at `base`.
    fn base_after(&self, base: u64) -> Option<u64> {
        self.segments
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .range((std::ops::Bound::Excluded(base), std::ops::Bound::Unbounded))
            .next()
            .map(|(b, _)| *b)
    }

    /// The position to start reading `offset` from.
    fn locate(&self, seg: &Segment, offset: u64) -> Result<u64, BackendError> {
        let mut idx = lock(&seg.index);
        if !idx.built {
            let s = scan(&*seg.file, seg.base)?;
            let next_base = self.base_after(seg.base);
            match (&s.how, next_base) {
                (ScanEnd::Bad(why), _) => {
                    return Err(corrupt(format!(
                        "sealed segment {} is corrupt: {why}",
                        seg.path.display()
                    )))
                }
                (ScanEnd::Clean, Some(next))
                    if next != s.next_offset && !self.gaps.contains(&(s.next_offset, next)) =>
                {
                    return Err(corrupt(format!(
                        "sealed segment {} ends at offset {} but the next segment starts at {next}",
                        seg.path.display(),
                        s.next_offset
                    )))
                }
                _ => {}
            }
            idx.entries = s.entries;
            idx.built = true;
        }
        let i = idx.entries.partition_point(|(o, _)| *o <= offset);
        Ok(if i == 0 { 0 } else { idx.entries[i - 1].1 })
    }

    /// Reads records of `seg` from `pos`, keeping those at or after `want`, until `max` are in
    /// `out`, `visible` is reached or the segment ends. Returns the next offset and position.
    #[allow(clippy::too_many_arguments)]
    fn read_segment(
        &self,
        seg: &Segment,
        mut pos: u64,
        exact: bool,
        want: u64,
        max: usize,
        visible: u64,
        out: &mut Vec<Arc<Record>>,
    ) -> Result<(u64, u64), BackendError> {
        let len = seg
            .file
            .len()
            .map_err(io_error("reading a segment's length"))?;
        let mut next = want;
        // The first read is sized for the records wanted, at the average size of those before
        // them in the segment, with a quarter more (plus one index interval when `pos` is an
        // index entry before `want`, not its exact position): reading a whole chunk for a few
        // records copies and zeroes a quarter megabyte per read. The buffer grows when a
        // record does not fit, and a short read reads on.
        let before = want.saturating_sub(seg.base);
        let average = if before > 0 && pos > 0 {
            usize::try_from(pos / before).unwrap_or(CHUNK)
        } else {
            1024
        };
        let records = (max - out.len()).saturating_mul(average).saturating_mul(5) / 4;
        let skip = if exact { 0 } else { INDEX_EVERY as usize };
        let first = records.saturating_add(skip).clamp(MIN_READ, CHUNK);
        let mut buf = vec![0u8; first];
        loop {
            if pos + HEADER as u64 > len || out.len() >= max || next >= visible {
                return Ok((next, pos));
            }
            let want_len = buf.len().min((len - pos) as usize);
            let filled = seg
                .file
                .read_at(&mut buf[..want_len], pos)
                .map_err(io_error("reading a segment"))?;
            let mut at = 0;
            loop {
                if out.len() >= max || next >= visible {
                    return Ok((next, pos));
                }
                match decode(&buf[at..filled]) {
                    Decoded::Record(r, n) => {
                        if r.offset > next {
                            return Err(corrupt(format!(
                                "{} at position {pos}: offset {}, expected {next}",
                                seg.path.display(),
                                r.offset
                            )));
                        }
                        at += n;
                        pos += n as u64;
                        if r.offset == next {
                            out.push(Arc::new(r));
                            next += 1;
                        }
                    }
                    Decoded::End => return Ok((next, pos)),
                    Decoded::Invalid(why) => {
                        return Err(corrupt(format!(
                            "{} at position {pos}: {why}",
                            seg.path.display()
                        )))
                    }
                    Decoded::Incomplete { need } => {
                        if at == 0 {
                            if pos + need as u64 > len {
                                return Err(corrupt(format!(
                                    "{} at position {pos}: record runs past the file",
                                    seg.path.display()
                                )));
                            }
                            buf.resize(need.max(buf.len()), 0);
                        }
                        break;
                    }
                }
            }
        }
    }

    /// Deletes segments whose every record is below `start`, except the active one, and gap
    /// markers wholly below the oldest segment kept; syncs the directory. Returns how many
    /// segment files were removed.
    pub(crate) fn remove_below(&self, start: u64) -> Result<usize, BackendError> {
        let doomed: Vec<Arc<Segment>> = {
            let segs = self.segments.read().unwrap_or_else(|e| e.into_inner());
            let bases: Vec<u64> = segs.keys().copied().collect();
            bases
                .windows(2)
                .filter(|w| w[1] <= start)
                .map(|w| segs[&w[0]].clone())
                .collect()
        };
        if doomed.is_empty() {
            return Ok(0);
        }
        let first_kept = {
            let mut segs = self.segments.write().unwrap_or_else(|e| e.into_inner());
            for s in &doomed {
                segs.remove(&s.base);
            }
            segs.keys().next().copied().unwrap_or(0)
        };
        for s in &doomed {
            self.storage
                .remove_file(&s.path)
                .map_err(io_error("removing a segment"))?;
        }
        // A gap ending at or below the oldest segment kept separates nothing any more. (The
        // in-memory set keeps it: reads never go below the oldest segment.)
        for (from, to) in self.gaps.iter().filter(|(_, to)| *to <= first_kept) {
            let marker = self.dir.join(format!("{from:020}-{to:020}.gap"));
            match self.storage.remove_file(&marker) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error("removing a gap marker")(e)),
            }
        }
        self.storage
            .sync_dir(&self.dir)
            .map_err(io_error("syncing a topic directory"))?;
        Ok(doomed.len())
    }

    /// Removes every file and the directory itself.
    pub(crate) fn destroy(&self) -> Result<(), BackendError> {
        destroy_dir(&*self.storage, &self.dir)
    }
}

/// Removes a topic directory and its files, then syncs its parent.
pub(crate) fn destroy_dir(storage: &dyn Storage, dir: &Path) -> Result<(), BackendError> {
    for name in storage
        .list(dir)
        .map_err(io_error("listing a topic directory"))?
    {
        storage
            .remove_file(&dir.join(name))
            .map_err(io_error("removing a segment"))?;
    }
    storage
        .remove_dir(dir)
        .map_err(io_error("removing a topic directory"))?;
    if let Some(parent) = dir.parent() {
        storage
            .sync_dir(parent)
            .map_err(io_error("syncing the topics directory"))?;
    }
    Ok(())
}

/// The error for message `i` of a batch of `n` that does not fit the record format.
fn not_storable(i: usize, n: usize, why: &str) -> BackendError {
    let which = match n {
        1 => "the message".to_owned(),
        _ => format!("message {} of the batch of {n}", i + 1),
    };
    BackendError::new(
        NAME,
        BackendErrorKind::Invalid,
        format!("{which} cannot be stored: {why}; nothing was published"),
    )
}

/// The record at `offset`, if `recs` (read from it) starts with it.
fn one(recs: Vec<Arc<Record>>, offset: u64) -> Option<Arc<Record>> {
    recs.into_iter().next().filter(|r| r.offset == offset)
}

fn new_segment(
    storage: &dyn Storage,
    dir: &Path,
    base: u64,
    size: u64,
) -> Result<Arc<Segment>, BackendError> {
    let path = dir.join(Segment::name(base));
    let file = storage
        .open(&path, true)
        .map_err(io_error("creating a segment"))?;
    if let Err(e) = file.allocate(size) {
        let full = e.kind() == std::io::ErrorKind::StorageFull || e.raw_os_error() == Some(28);
        if full {
            // Nothing was written: take the empty file back and refuse this batch only.
            drop(file);
            let _ = storage.remove_file(&path);
            let _ = storage.sync_dir(dir);
            return Err(BackendError::full(
                super::NAME,
                relq_core::Limit::Disk,
                format!(
                    "the disk is full: no room for a new {size}-byte log segment in {}",
                    dir.display()
                ),
            )
            .with_source(e));
        }
        return Err(io_error("preallocating a segment")(e));
    }
    file.sync_data().map_err(io_error("syncing a segment"))?;
    storage
        .sync_dir(dir)
        .map_err(io_error("syncing a topic directory"))?;
    Ok(Arc::new(Segment {
        base,
        path,
        file,
        index: Mutex::new(SegIndex {
            entries: Vec::new(),
            built: true,
        }),
    }))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use proptest::prelude::*;

    use super::*;
    use crate::fs::RealFs;

    fn message(i: usize, size: usize) -> Outgoing {
        Outgoing {
            kind: "job".into(),
            payload: bytes::Bytes::from(vec![b'a' + (i % 26) as u8; size]),
            headers: Default::default(),
            deliver_at: None,
            dedup_window: None,
        }
    }

    fn config(gen: u32) -> LogConfig {
        LogConfig {
            segment_size: 4096,
            tail_bytes: 0,
            gen,
        }
    }

    /// The newest segment's path and first offset.
    fn newest(dir: &Path) -> (PathBuf, u64) {
        std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| {
                let path = e.unwrap().path();
                let base = path.file_stem()?.to_str()?.parse::<u64>().ok()?;
                Some((path, base))
            })
            .max_by_key(|(_, base)| *base)
            .expect("a segment")
    }

    /// A context for tests: the topic `t`, nothing referenced.
    fn ctx(last: LastSession, repair: bool) -> OpenContext<'static> {
        OpenContext {
            topic: "t",
            last,
            referenced: 0,
            repair,
            read_only: false,
            high_water: None,
        }
    }

    fn reopen(
        storage: &Arc<dyn Storage>,
        dir: &Path,
        gen: u32,
        c: &OpenContext<'_>,
    ) -> Result<TopicLog, BackendError> {
        TopicLog::open(storage.clone(), dir.to_owned(), config(gen), c).map(|o| o.log)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// Reads from the segment files (no tail cache) return exactly the records asked for,
        /// in order, whatever their sizes: the first read of a segment is sized from the
        /// average record before the one wanted, so a large record after small ones must grow
        /// the buffer or read on; with the hint a sequential reader carries and without it
        /// (from a sparse index entry), across segment ends.
        #[test]
        fn reads_from_disk_return_exactly_the_records_asked_for(
            sizes in proptest::collection::vec(
                prop_oneof![4 => 0usize..200, 1 => 1_000usize..300_000],
                1..50,
            ),
            starts in proptest::collection::vec(any::<prop::sample::Index>(), 1..6),
            max in 1usize..40,
            segment_size in prop_oneof![Just(4096u64), Just(1u64 << 20)],
        ) {
            static N: AtomicUsize = AtomicUsize::new(0);
            let root = Removed(std::env::temp_dir().join(format!(
                "relq-read-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            )));
            let dir = root.0.join("topics").join("t@1");
            let storage: Arc<dyn Storage> = Arc::new(RealFs);
            let config = LogConfig { segment_size, ..config(1) };
            let log = TopicLog::create(storage, dir, config).unwrap();
            let mut written = Vec::new();
            for (i, size) in sizes.iter().enumerate() {
                log.append(vec![message(i, *size)], 1000 + i as u64, &mut written).unwrap();
            }
            log.sync_now().unwrap();
            log.make_visible(&written);
            let first = written[0].offset;
            for start in starts {
                let from = start.index(written.len());
                // A reader starting cold, then reading on with its hint to the end.
                let mut hint = None;
                let mut at = from;
                while at < written.len() {
                    let got = log.read(first + at as u64, max, &mut hint).unwrap();
                    prop_assert!(!got.is_empty(), "nothing read at {at}");
                    prop_assert!(got.len() <= max);
                    for r in &got {
                        let want = &written[at];
                        prop_assert_eq!(r.offset, want.offset);
                        prop_assert_eq!(&r.payload, &want.payload);
                        at += 1;
                    }
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever damage the newest segment takes (garbage or zeros, written at any position
        /// of the preallocated file: over its records, right after them, or further on past a
        /// run of zeros), after a session that closed cleanly, crashed in a power loss, or was
        /// killed in this boot:
        /// - when the damage leaves nothing past the records before it, nothing is cut;
        /// - after a clean close any damage is corruption: open fails and changes nothing; with
        ///   the operator's repair it cuts the damaged tail;
        /// - after a power loss, damage with nothing intact after it is a torn tail, and intact
        ///   records after it carrying the crashed session's `gen` are its torn unsynced writes:
        ///   both cut;
        /// - after a kill in this boot, intact records after damage are corruption (a kill
        ///   tears nothing out of order);
        /// - whatever is cut, recovery keeps exactly the records before the first damaged byte,
        ///   byte for byte, appending resumes after every offset the cut bytes could have held
        ///   (never reusing one), and survives another reopen.
        #[test]
        fn recovery_keeps_exactly_the_records_before_the_damage(
            sizes in proptest::collection::vec(0usize..700, 1..40),
            at in any::<prop::sample::Index>(),
            junk in proptest::collection::vec(any::<u8>(), 1..64),
            zeros in any::<bool>(),
            anywhere in any::<bool>(),
            how in 0u8..3,
        ) {
            static N: AtomicUsize = AtomicUsize::new(0);
            let root = Removed(std::env::temp_dir().join(format!(
                "relq-scan-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            )));
            let dir = root.0.join("topics").join("t@1");
            let storage: Arc<dyn Storage> = Arc::new(RealFs);
            let log = TopicLog::create(storage.clone(), dir.clone(), config(1)).unwrap();
            let mut written = Vec::new();
            for (i, size) in sizes.iter().enumerate() {
                log.append(vec![message(i, *size)], 1000 + i as u64, &mut written).unwrap();
            }
            log.sync_now().unwrap();
            drop(log);

            // Damage the newest segment at a position over or just after its records.
            let (path, base) = newest(&dir);
            let ends: Vec<usize> = written
                .iter()
                .filter(|r| r.offset >= base)
                .scan(0, |pos, r| {
                    *pos += r.encoded_len();
                    Some(*pos)
                })
                .collect();
            let before = std::fs::read(&path).unwrap();
            // Half the cases within the records or just after them, half anywhere in the file.
            let used = ends.last().copied().unwrap_or(0);
            let p = if anywhere { at.index(before.len()) } else { at.index(used + 1) };
            // Within the preallocated file: a crash tears writes, it does not grow the file.
            let n = junk.len().min(before.len() - p);
            let bytes = if zeros { vec![0; n] } else { junk[..n].to_vec() };
            {
                use std::os::unix::fs::FileExt;
                let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
                f.write_all_at(&bytes, p as u64).unwrap();
            }
            let after = std::fs::read(&path).unwrap();
            // The records of the newest segment, as (start, end) positions, and which of them
            // the damage changed.
            let changed: Vec<usize> = (0..before.len())
                .filter(|i| before[*i] != after[*i])
                .collect();
            let spans: Vec<(usize, usize)> = std::iter::once(0)
                .chain(ends.iter().copied())
                .zip(ends.iter().copied())
                .collect();
            let damaged: Vec<bool> = spans
                .iter()
                .map(|(a, b)| changed.iter().any(|c| a <= c && c < b))
                .collect();
            let k = damaged.iter().position(|d| *d).unwrap_or(spans.len());
            let kept = base + k as u64;
            let kept_end = spans.get(k).map_or(used, |(a, _)| *a);
            // Anything but zeros past the records kept: something to cut.
            let dirty = after[kept_end..].iter().any(|b| *b != 0);
            // The last intact record after the first damaged one, if any.
            let intact_after = (k + 1..spans.len()).rev().find(|j| !damaged[*j]);
            // Appending resumes after every record the cut dropped, and past the offset of the
            // damaged record at least.
            let resume_min = match (dirty, intact_after) {
                (false, _) => kept,
                (true, None) => kept + 1,
                (true, Some(j)) => base + j as u64 + 1,
            };
            let last_session = match how {
                0 => LastSession::Clean,
                1 => LastSession::Crashed { gen: 1, sync: true, same_boot: Some(false) },
                _ => LastSession::Crashed { gen: 1, sync: true, same_boot: Some(true) },
            };
            let must_refuse = dirty && (how == 0 || (how == 2 && intact_after.is_some()));
            let first = reopen(&storage, &dir, 2, &ctx(last_session, false));
            if must_refuse || (how == 2 && first.is_err()) {
                prop_assert!(first.is_err(), "damage after a clean close or kill was cut silently");
                let e = first.err().unwrap();
                prop_assert_eq!(e.kind, relq_core::BackendErrorKind::Corrupt);
                prop_assert!(e.message.contains("This is corruption"), "{}", e.message);
                prop_assert_eq!(std::fs::read(&path).unwrap(), after, "nothing changed");
            } else {
                prop_assert!(first.is_ok(), "{:?}", first.err());
                drop(first);
            }
            // (Opened again when the first open succeeded: it cut already, so this one finds
            // a clean end, and the offsets it skipped are in a gap marker.)
            let log = reopen(&storage, &dir, 3, &ctx(last_session, true)).unwrap();
            let resume = log.visible();
            prop_assert!(resume >= resume_min, "offset {resume} < {resume_min} reused");
            if !dirty {
                prop_assert_eq!(resume, kept);
            }
            let back = log.read(log.first_offset(), usize::MAX, &mut None).unwrap();
            let want: Vec<&Record> = written
                .iter()
                .map(|r| &**r)
                .filter(|r| r.offset >= log.first_offset() && r.offset < kept)
                .collect();
            prop_assert_eq!(back.iter().map(|r| &**r).collect::<Vec<_>>(), want.clone());
            // Appending resumes after the cut (and what it dropped), and survives another
            // reopen; reads step over the skipped offsets.
            let mut more = Vec::new();
            log.append(vec![message(99, 10)], 5000, &mut more).unwrap();
            log.sync_now().unwrap();
            prop_assert_eq!(more[0].offset, resume);
            drop(log);
            let log = reopen(&storage, &dir, 4, &ctx(LastSession::Clean, false)).unwrap();
            prop_assert_eq!(log.visible(), resume + 1);
            let again = log.get(resume).unwrap();
            prop_assert_eq!(again.as_deref(), Some(&*more[0]));
            let back = log.read(log.first_offset(), usize::MAX, &mut None).unwrap();
            let mut want = want;
            want.push(&*more[0]);
            prop_assert_eq!(back.iter().map(|r| &**r).collect::<Vec<_>>(), want);
            prop_assert_eq!(
                log.stored_between(log.first_offset(), log.visible()),
                kept + 1 - log.first_offset()
            );
        }
    }

    /// A directory removed when dropped, also when a case fails.
    struct Removed(PathBuf);

    impl Drop for Removed {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
