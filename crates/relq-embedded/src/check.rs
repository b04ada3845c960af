//! A read-only check of a data directory: the library side of `relq check DIR`.
//!
//! It reads every segment of every topic (checksums, offsets, and every byte after each
//! segment's end, as recovery does) and a copy of the state database held in memory, and reports
//! damage and the state database's consistency with the logs. It changes nothing on disk: files
//! are opened read-only, the directory lock is not taken, nothing is synced, and the state
//! database is opened (and, if redb must, repaired) as an in-memory copy. So it works while
//! another process has the directory open; what that process writes during the check can show up
//! as a difference (the report says when the state database changed while it was read).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::fs::{MemoryCopy, ReadOnlyFs};
use super::log::{self, LastSession, TailVerdict};
use super::recovery::referenced_offsets;
use super::state::{self, Loaded};
use super::{catch_db, db_error, NAME};
use relq_core::{BackendError, BackendErrorKind};

/// What [`EmbeddedBackend::check`](super::EmbeddedBackend::check) found in a data directory.
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct CheckReport {
    /// The data directory checked.
    pub path: PathBuf,
    /// What is wrong with the state database (`state.redb`): unreadable, damaged, or entries that
    /// do not decode. Empty when it read back whole.
    pub state_db: Vec<String>,
    /// The state database changed while it was read (another process has the directory open and
    /// wrote): what the check saw of it may be a mix. Run the check again.
    pub state_db_changed: bool,
    /// Set when the state database kept changing while it was read and the copy read did not
    /// pass redb's checks: the check is inconclusive about it (a copy taken mid-commit is no
    /// evidence of damage), and this says what the copy showed. Not damage: `state_db` stays
    /// empty then. Run the check again, or with the directory's writer stopped.
    pub state_db_inconclusive: Option<String>,
    /// One entry per topic directory.
    pub topics: Vec<TopicCheck>,
    /// Topic directories the state database does not know (left by a crash between a
    /// terminate's commit and the directory's removal, or a creation that never committed; an
    /// open removes them). Not damage.
    pub unknown_dirs: Vec<PathBuf>,
}

impl CheckReport {
    /// Whether nothing is damaged or inconsistent.
    pub fn is_ok(&self) -> bool {
        self.state_db.is_empty() && self.topics.iter().all(TopicCheck::is_ok)
    }
}

/// One topic's log and its consistency with the state database.
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct TopicCheck {
    /// The topic (from its directory name when the state database is unreadable).
    pub topic: String,
    /// Its log directory.
    pub directory: PathBuf,
    /// Segment files read.
    pub segments: u64,
    /// Valid records in them, up to the first damage in each.
    pub records: u64,
    /// Bytes of those records.
    pub bytes: u64,
    /// The first offset stored (the oldest segment's first).
    pub first_offset: u64,
    /// The offset after the last record stored: where the next publish goes (at least).
    pub end_offset: u64,
    /// Offsets between `first_offset` and `end_offset` that hold no record by design: skipped
    /// by a recovery so that offsets handed out before damage are never handed out again.
    pub skipped_offsets: u64,
    /// Damage found in the segments.
    pub damage: Vec<SegmentDamage>,
    /// Inconsistencies between the state database and this log: group positions and
    /// redelivery rows referring to offsets the log does not have.
    pub state_problems: Vec<String>,
    /// Redelivery rows below the first stored offset: messages retention removed, whose rows
    /// go at the group's next read. Harmless.
    pub stale_rows: u64,
    /// The state database refers past the log's end, and the last session crashed in periodic
    /// mode: acknowledgements are committed before the log is synced there, so after a power
    /// loss that is expected (publishes up to the interval old are lost, as documented), and
    /// the next open handles it (marks those offsets done, never reuses them). Not a problem:
    /// `state_problems` holds it only when it is not expected.
    pub expected_state_ahead: Vec<String>,
}

impl TopicCheck {
    /// Whether nothing is damaged or inconsistent.
    pub fn is_ok(&self) -> bool {
        self.damage.is_empty() && self.state_problems.is_empty()
    }
}

/// A damaged place in a segment file.
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct SegmentDamage {
    /// The segment file.
    pub segment: PathBuf,
    /// The byte position where the valid records stop.
    pub position: u64,
    /// The offset of the last valid record before it in this segment, if any.
    pub last_good_offset: Option<u64>,
    /// What is wrong there.
    pub what: String,
    /// Valid records found after the damage.
    pub records_after: u64,
    /// The first of them: its offset.
    pub first_offset_after: Option<u64>,
    /// The highest offset among them.
    pub last_offset_after: Option<u64>,
    /// What it is, and so what an open does with it.
    pub kind: DamageKind,
}

/// What a damaged place is, and what an open of the directory does with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum DamageKind {
    /// The end of the active segment holds a partial record or garbage with nothing valid
    /// after it: the unsynced end of the log. An open cuts it (logged).
    TornTail,
    /// Valid records follow the damage, but they can be the unsynced writes of the session that
    /// crashed (see `docs/design.md`). An open cuts them (logged); they were never acknowledged in
    /// sync mode, and their offsets are not reused.
    TornUnsynced,
    /// Corruption: valid records follow the damage (or it is in a sealed segment, or a segment
    /// does not end where the next begins). An open refuses a damaged active segment unless the
    /// operator chooses `Recovery::CutDamagedTail`; reads of a damaged sealed segment fail.
    Corruption,
}

/// The state database as the check could read it.
struct StateView {
    loaded: Loaded,
    referenced: HashMap<String, u64>,
    /// Per (topic, group): the highest spilled offset.
    spill_max: BTreeMap<(String, String), u64>,
}

fn io_failure(what: &str, path: &Path, e: std::io::Error) -> BackendError {
    BackendError::new(
        NAME,
        BackendErrorKind::Unavailable,
        format!("{what} {}: {e}", path.display()),
    )
    .with_source(e)
}

/// Reads `path` until two reads in a row agree (a writer may be committing); returns the bytes
/// and whether they never settled. Under steady commits two equal reads may take a while: it
/// tries for about a second, pausing a little longer each time.
fn read_stable(path: &Path) -> std::io::Result<(Vec<u8>, bool)> {
    let mut last = std::fs::read(path)?;
    for i in 0..20u64 {
        let again = std::fs::read(path)?;
        if again == last {
            return Ok((last, false));
        }
        last = again;
        std::thread::sleep(std::time::Duration::from_millis(i * 5));
    }
    Ok((last, true))
}

/// Opens an in-memory copy of the state database and reads what the check needs.
fn read_state(
    db_path: &Path,
    problems: &mut Vec<String>,
    inconclusive: &mut Option<String>,
) -> Result<(Option<StateView>, bool), BackendError> {
    let (bytes, changed) = match read_stable(db_path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            problems.push(format!("{} is missing", db_path.display()));
            return Ok((None, false));
        }
        Err(e) => return Err(io_failure("reading", db_path, e)),
    };
    if bytes.is_empty() {
        problems.push(format!("{} is empty", db_path.display()));
        return Ok((None, changed));
    }
    let view = catch_db(|| {
        let db = redb::Database::builder()
            // Reports damage as an error rather than trusting (and possibly panicking on) it.
            .set_check_integrity_on_open(true)
            .create_with_backend(MemoryCopy::new(bytes))
            .map_err(db_error)?;
        let loaded = state::load(&db, super::fs::system_boot_id())?;
        let referenced = referenced_offsets(&db, &loaded)?;
        let mut spill_max = BTreeMap::new();
        for (t, g) in loaded.groups.keys() {
            if let Some(o) = state::spilled_offset(&db, t, g, true)? {
                spill_max.insert((t.clone(), g.clone()), o);
            }
        }
        problems.extend(state::verify_unloaded(&db)?);
        Ok(StateView {
            loaded,
            referenced,
            spill_max,
        })
    });
    match view {
        Ok(v) => Ok((Some(v), changed)),
        // A copy of a database that kept changing may be a mix of two commits: no evidence.
        Err(e) if changed => {
            *inconclusive = Some(format!(
                "{} kept changing while it was read (in use), and the copy read failed its \
                 checks: {}",
                db_path.display(),
                e.message
            ));
            Ok((None, changed))
        }
        Err(e) => {
            problems.push(format!("{} is damaged: {}", db_path.display(), e.message));
            Ok((None, changed))
        }
    }
}

/// Checks the data directory `root` (see the module docs).
pub(crate) fn check(root: &Path) -> Result<CheckReport, BackendError> {
    let meta = std::fs::metadata(root).map_err(|e| io_failure("reading", root, e))?;
    if !meta.is_dir() {
        return Err(BackendError::new(
            NAME,
            BackendErrorKind::Invalid,
            format!("{} is not a data directory", root.display()),
        ));
    }
    let topics_dir = root.join("topics");
    let db_path = root.join("state.redb");
    let mut report = CheckReport {
        path: root.to_owned(),
        state_db: Vec::new(),
        state_db_changed: false,
        state_db_inconclusive: None,
        topics: Vec::new(),
        unknown_dirs: Vec::new(),
    };
    let (view, changed) = read_state(
        &db_path,
        &mut report.state_db,
        &mut report.state_db_inconclusive,
    )?;
    report.state_db_changed = changed;
    let dirs = match std::fs::read_dir(&topics_dir) {
        Ok(entries) => {
            let mut names = Vec::new();
            for e in entries {
                let e = e.map_err(|e| io_failure("listing", &topics_dir, e))?;
                names.push(e.file_name().to_string_lossy().into_owned());
            }
            names.sort();
            names
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io_failure("listing", &topics_dir, e)),
    };
    let last = view
        .as_ref()
        .map_or(LastSession::Unknown, |v| v.loaded.last_session);
    // Which directory each known topic lives in.
    let mut known: BTreeMap<String, String> = BTreeMap::new();
    if let Some(v) = &view {
        for (t, rec) in &v.loaded.topics {
            let name = format!("{t}@{}", rec.epoch);
            if !dirs.contains(&name) {
                report.topics.push(TopicCheck {
                    topic: t.clone(),
                    directory: topics_dir.join(&name),
                    segments: 0,
                    records: 0,
                    bytes: 0,
                    first_offset: 0,
                    end_offset: 0,
                    skipped_offsets: 0,
                    damage: Vec::new(),
                    expected_state_ahead: Vec::new(),
                    state_problems: vec![format!(
                        "the state database knows topic {t:?} (generation {}) but its log \
                         directory {} is missing",
                        rec.epoch,
                        topics_dir.join(&name).display()
                    )],
                    stale_rows: 0,
                });
            }
            known.insert(name, t.clone());
        }
    }
    for name in dirs {
        let dir = topics_dir.join(&name);
        let topic = match (&view, known.get(&name)) {
            (Some(_), Some(t)) => t.clone(),
            (Some(_), None) => {
                report.unknown_dirs.push(dir);
                continue;
            }
            // Without the state database, every directory is looked at.
            (None, _) => name
                .rsplit_once('@')
                .map_or(name.as_str(), |(t, _)| t)
                .to_owned(),
        };
        let referenced = view
            .as_ref()
            .and_then(|v| v.referenced.get(&topic).copied())
            .unwrap_or(0);
        let found = log::inspect(&ReadOnlyFs, &dir, last, referenced)?;
        let first_offset = found.segments.first().map_or(0, |(_, b)| *b);
        let mut tc = TopicCheck {
            topic: topic.clone(),
            directory: dir,
            segments: found.segments.len() as u64,
            records: found.records,
            bytes: found.bytes,
            first_offset,
            end_offset: found.end,
            skipped_offsets: found
                .gaps
                .iter()
                .map(|(a, b)| (*b).min(found.end).saturating_sub((*a).max(first_offset)))
                .sum(),
            damage: found
                .damage
                .into_iter()
                .map(|d| SegmentDamage {
                    segment: d.segment,
                    position: d.position,
                    last_good_offset: d.last_good,
                    what: d.what,
                    records_after: d.beyond.records,
                    first_offset_after: d.beyond.first.map(|(_, o)| o),
                    last_offset_after: (d.beyond.records > 0).then_some(d.beyond.max_offset),
                    kind: match d.verdict {
                        TailVerdict::Torn => DamageKind::TornTail,
                        TailVerdict::TornUnsynced => DamageKind::TornUnsynced,
                        TailVerdict::Corrupt | TailVerdict::Clean => DamageKind::Corruption,
                    },
                })
                .collect(),
            state_problems: Vec::new(),
            stale_rows: 0,
            expected_state_ahead: Vec::new(),
        };
        if tc.segments == 0 {
            tc.state_problems
                .push("the topic directory has no segment files".to_owned());
        }
        if let Some(v) = &view {
            consistency(v, &mut tc);
            // Periodic mode commits acknowledgements before the log's sync: after a crash the
            // state being ahead of the log is expected, and open deals with it.
            if matches!(
                v.loaded.last_session,
                LastSession::Crashed { sync: false, .. }
            ) {
                tc.expected_state_ahead = std::mem::take(&mut tc.state_problems);
            }
        }
        report.topics.push(tc);
    }
    Ok(report)
}

/// Compares what the state database holds about `tc`'s topic with its log.
fn consistency(v: &StateView, tc: &mut TopicCheck) {
    let t = tc.topic.as_str();
    let end = tc.end_offset;
    if let Some(rec) = v.loaded.topics.get(t) {
        if rec.start > end {
            tc.state_problems.push(format!(
                "the topic's retention start is offset {} but the log ends at offset {end}",
                rec.start
            ));
        }
    }
    for ((gt, g), rec) in &v.loaded.groups {
        if gt != t {
            continue;
        }
        let done = rec.done.iter().map(|(_, b)| *b).max().unwrap_or(0);
        let read = rec.cursor.max(rec.floor).max(done);
        if read > end {
            tc.state_problems.push(format!(
                "group {g:?} has read up to offset {} but the log ends at offset {end}: {} \
                 messages it read are not stored",
                read - 1,
                read - end
            ));
        }
        let rows: Vec<u64> = v
            .loaded
            .rows
            .keys()
            .filter(|(rt, rg, _)| rt == t && rg == g)
            .map(|(_, _, o)| *o)
            .collect();
        let beyond = rows.iter().filter(|o| **o >= end).count();
        if beyond > 0 {
            tc.state_problems.push(format!(
                "group {g:?} has {beyond} redelivery rows (retries, delayed or parked messages) \
                 at offsets the log does not have (at or past offset {end})"
            ));
        }
        tc.stale_rows += rows.iter().filter(|o| **o < tc.first_offset).count() as u64;
        if let Some(o) = v.spill_max.get(&(t.to_owned(), g.clone())) {
            if *o >= end {
                tc.state_problems.push(format!(
                    "group {g:?} has spilled rows up to offset {o}, past the log's end at offset \
                     {end}"
                ));
            }
        }
    }
}
