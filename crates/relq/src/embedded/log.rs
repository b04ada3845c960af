//! A topic's segmented, append-only message log.
//!
//! A topic directory holds segment files named by the offset of their first record
//! (`00000000000000000000.seg`). Segments are preallocated; records are framed by
//! [`codec`](super::codec). Only the committer appends. Readers see offsets below `visible`: records
//! whose commit cycle completed.
//!
//! # Recovery
//! Opening scans only the newest segment and cuts a torn tail at the first record that is short,
//! fails its checksum, has the wrong offset or an older `gen`. A segment is sealed only after it was
//! synced, so every older segment is complete; a bad record inside one is reported as corruption
//! when read, never cut off. Every segment is fsynced at open, because a killed process can leave
//! written but unsynced data in the page cache that later reads would otherwise trust.
//!
//! # Index
//! Each segment has a sparse in-memory index (offset, position) every [`INDEX_EVERY`] bytes, built
//! by the writer as it appends and, for segments found at open, by a full scan of the segment on
//! first use. It is derived from the log and never overrides it: a read checks every record's
//! offset.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use super::codec::{decode, Decoded, Record, HEADER};
use super::fs::{Storage, StorageFile};
use super::{corrupt, io_error};
use crate::error::BackendError;
use crate::model::Outgoing;

/// Bytes between two sparse index entries.
pub(crate) const INDEX_EVERY: u64 = 32 * 1024;
/// Bytes read per call when scanning.
const CHUNK: usize = 256 * 1024;
/// The first read of a small `read` (up to 16 records): the sparse index interval plus room.
const SMALL_READ: usize = 48 * 1024;

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
    entries: Vec<(u64, u64)>,
    how: ScanEnd,
}

/// Reads every record of `file` from the start, checking offsets (from `base`) and `gen` order.
fn scan(file: &dyn StorageFile, base: u64) -> Result<Scan, BackendError> {
    let len = file.len().map_err(io_error("reading a segment's length"))?;
    let mut s = Scan {
        end: 0,
        next_offset: base,
        last_ms: 0,
        entries: Vec::new(),
        how: ScanEnd::Clean,
    };
    let mut last_gen = 0u32;
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
                if r.gen < last_gen {
                    s.how = ScanEnd::Bad(format!("stale record at position {pos}"));
                    return Ok(s);
                }
                last_gen = r.gen;
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
                return Ok(s);
            }
            Decoded::Incomplete { need } => {
                if pos + need as u64 > len {
                    s.how = ScanEnd::Bad(format!("record at position {pos} runs past the file"));
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
                    return Ok(s);
                }
            }
        }
    }
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

    /// Opens an existing topic directory: recovers the newest segment and syncs every segment.
    pub(crate) fn open(
        storage: Arc<dyn Storage>,
        dir: PathBuf,
        config: LogConfig,
    ) -> Result<TopicLog, BackendError> {
        let names = storage
            .list(&dir)
            .map_err(io_error("listing a topic directory"))?;
        let mut segments = BTreeMap::new();
        for name in names {
            let Some(base) = name
                .strip_suffix(".seg")
                .and_then(|b| b.parse::<u64>().ok())
            else {
                continue;
            };
            let path = dir.join(&name);
            let file = storage
                .open(&path, false)
                .map_err(io_error("opening a segment"))?;
            file.sync_data().map_err(io_error("syncing a segment"))?;
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
        if let ScanEnd::Bad(why) = &s.how {
            tracing::warn!(
                segment = %newest.path.display(),
                end = s.end,
                "cutting a torn tail left by a crash: {why}"
            );
            newest
                .file
                .write_at(&[0; HEADER], s.end)
                .map_err(io_error("cutting a torn tail"))?;
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
        Ok(TopicLog::new(storage, dir, config, segments, writer))
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
            if pos == 0 || pos - w.last_index_pos >= INDEX_EVERY {
                lock(&w.active.index).entries.push((rec.offset, pos));
                w.last_index_pos = pos;
            }
            rec.encode(&mut w.buf);
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
        let mut offset = from.max(self.first_offset());
        while out.len() < max && offset < visible {
            let seg = {
                let segs = self.segments.read().unwrap_or_else(|e| e.into_inner());
                match segs.range(..=offset).next_back() {
                    Some((_, s)) => s.clone(),
                    None => break,
                }
            };
            let pos = match hint {
                Some(h) if h.offset == offset && h.base == seg.base => h.pos,
                _ => self.locate(&seg, offset)?,
            };
            let (next, pos) = self.read_segment(&seg, pos, offset, max, visible, &mut out)?;
            *hint = Some(ReadHint {
                offset: next,
                base: seg.base,
                pos,
            });
            if out.len() >= max || next >= visible {
                break;
            }
            // The segment ended: the next one must start where it stopped.
            let following = self.base_after(seg.base);
            match following {
                Some(base) if base == next => offset = next,
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
            .range(base + 1..)
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
                (ScanEnd::Clean, Some(next)) if next != s.next_offset => {
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
    fn read_segment(
        &self,
        seg: &Segment,
        mut pos: u64,
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
        // A few records (one for `get`) sit within one index interval of `pos`: a small first
        // read; the buffer grows when a record does not fit.
        let first = if max <= 16 { SMALL_READ } else { CHUNK };
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

    /// Deletes segments whose every record is below `start`, except the active one; syncs the
    /// directory. Returns how many files were removed.
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
        {
            let mut segs = self.segments.write().unwrap_or_else(|e| e.into_inner());
            for s in &doomed {
                segs.remove(&s.base);
            }
        }
        for s in &doomed {
            self.storage
                .remove_file(&s.path)
                .map_err(io_error("removing a segment"))?;
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
            return Err(BackendError::new(
                super::NAME,
                crate::error::BackendErrorKind::Full,
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
    use crate::embedded::fs::RealFs;

    fn message(i: usize, size: usize) -> Outgoing {
        Outgoing {
            kind: "job".into(),
            payload: bytes::Bytes::from(vec![b'a' + (i % 26) as u8; size]),
            headers: Default::default(),
            deliver_at: None,
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

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever a crash leaves in the newest segment (garbage or zeros, written at any
        /// position of the preallocated file: over its records, right after them, or further on
        /// past a run of zeros), recovery keeps exactly the records before the first damaged
        /// byte, byte for byte, and appending goes on from there.
        #[test]
        fn recovery_keeps_exactly_the_records_before_the_damage(
            sizes in proptest::collection::vec(0usize..700, 1..40),
            at in any::<prop::sample::Index>(),
            junk in proptest::collection::vec(any::<u8>(), 1..64),
            zeros in any::<bool>(),
            anywhere in any::<bool>(),
        ) {
            static N: AtomicUsize = AtomicUsize::new(0);
            let root = Removed(std::env::temp_dir().join(format!(
                "relq-scan-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            )));
            let dir = root.0.join("t@1");
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
            // The first byte the damage changed; records ending at or before it are intact.
            let changed = (0..before.len().max(after.len()))
                .find(|i| before.get(*i) != after.get(*i))
                .unwrap_or(usize::MAX);
            let kept = base + ends.iter().filter(|e| **e <= changed).count() as u64;

            let log = TopicLog::open(storage.clone(), dir.clone(), config(2)).unwrap();
            prop_assert_eq!(log.visible(), kept);
            let back = log.read(log.first_offset(), usize::MAX, &mut None).unwrap();
            let want: Vec<&Record> = written
                .iter()
                .map(|r| &**r)
                .filter(|r| r.offset >= log.first_offset() && r.offset < kept)
                .collect();
            prop_assert_eq!(back.iter().map(|r| &**r).collect::<Vec<_>>(), want);
            // Appending resumes at the cut, and survives another reopen.
            let mut more = Vec::new();
            log.append(vec![message(99, 10)], 5000, &mut more).unwrap();
            log.sync_now().unwrap();
            prop_assert_eq!(more[0].offset, kept);
            drop(log);
            let log = TopicLog::open(storage, dir, config(3)).unwrap();
            prop_assert_eq!(log.visible(), kept + 1);
            let again = log.get(kept).unwrap();
            prop_assert_eq!(again.as_deref(), Some(&*more[0]));
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
