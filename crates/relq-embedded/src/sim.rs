//! A crash-simulating file layer for the engine's tests, in the style of SQLite's crash-test VFS.
//!
//! [`SimFs`] keeps each file in memory as what the disk holds (`durable`: the content as of the
//! last sync) plus what was written since (`pending`: writes and length changes, in order). Reads
//! see the pending changes. [`SimFs::crash`] is a power loss: every unsynced write is
//! independently kept, dropped or torn, every unsynced directory change (creation or removal, of a
//! file or a directory) independently happened or not, and every open handle goes stale, so the
//! engine must reopen. [`SimRedbFile`] puts redb's database file on the same layer.
//!
//! Model notes:
//! - Only the normal components of a path count (`/a/b` and `a/b` are the same); the root always
//!   exists. A directory made by `create_dir_all` is, like a file, linked durably only once its
//!   parent is synced; [`SimFs::create_dir_all_durable`] sets up a test's data directory that is.
//! - A removed file stays readable through handles already open, until the next crash.
//! - A failed sync (see [`SimFs::fail_next_sync`]) leaves the writes pending: a crash may still
//!   drop them, a later successful sync makes them durable.
//! - The switches ([`SimFs::set_sync_disabled`], [`SimFs::fail_next_sync`],
//!   [`SimFs::panic_next`]) outlive a crash.
#![allow(dead_code)] // a test utility: not every test uses every helper

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::fs::{Storage, StorageFile};

/// The unit a torn write is split into when it is torn by sectors.
const SECTOR: usize = 512;
/// The root directory's id.
const ROOT: u64 = 0;

/// A storage call [`SimFs::panic_next`] can make panic: of a log file, of the state database's
/// file (`Db*`), or a directory sync.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PanicAt {
    Write,
    Sync,
    Read,
    DbWrite,
    DbSync,
    DbRead,
    SyncDir,
}

/// The message of an injected panic.
pub(crate) const INJECTED_PANIC: &str = "injected panic (simulated)";

/// An unsynced change to a file.
#[derive(Clone, Debug)]
enum Op {
    Write { pos: u64, data: Vec<u8> },
    SetLen(u64),
}

/// A file's content: durable, pending, and (cached) durable with pending applied.
#[derive(Debug, Default)]
struct Inode {
    durable: Vec<u8>,
    pending: Vec<Op>,
    visible: Vec<u8>,
}

/// What a directory entry names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Entry {
    File(u64),
    Dir(u64),
}

/// A directory's entries as of its last sync, and as they are now.
#[derive(Debug, Default)]
struct Dir {
    durable: BTreeMap<String, Entry>,
    visible: BTreeMap<String, Entry>,
}

#[derive(Debug)]
struct State {
    /// Bumped by every crash; a handle opened in an older epoch is stale.
    epoch: u64,
    /// Set by a crash or a kill, cleared when an engine takes the directory again (`lock_dir`):
    /// meanwhile the dead process's engine, still running in the test, opens, creates, removes
    /// and syncs nothing (it would otherwise go on in new files, as no dead process can).
    down: bool,
    next_id: u64,
    // BTreeMaps, so that a crash with a given seed is reproducible.
    files: BTreeMap<u64, Inode>,
    dirs: BTreeMap<u64, Dir>,
    sync_disabled: bool,
    fail_next_sync: bool,
    /// When set, preallocating a file fails with "no space left" (a full disk).
    disk_full: bool,
    /// The next call of this kind panics.
    panic_next: Option<PanicAt>,
    /// When set, `sync_data` of files other than the state database succeeds without making
    /// anything durable (the state database and directories still sync).
    log_sync_disabled: bool,
    /// The simulated machine's boot: a power loss ([`SimFs::crash`]) reboots it, a process kill
    /// ([`SimFs::kill`]) does not.
    boot: u64,
    /// The last write to a log file (not the state database): its inode and length.
    last_log_write: Option<(u64, usize)>,
}

impl State {
    fn new_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn dir(&self, id: u64) -> &Dir {
        self.dirs.get(&id).expect("a linked directory exists")
    }

    fn dir_mut(&mut self, id: u64) -> &mut Dir {
        self.dirs.get_mut(&id).expect("a linked directory exists")
    }

    /// The directory at `names` (as visible now).
    fn find_dir(&self, path: &Path, names: &[String]) -> io::Result<u64> {
        let mut id = ROOT;
        for n in names {
            id = match self.dir(id).visible.get(n) {
                Some(Entry::Dir(d)) => *d,
                Some(Entry::File(_)) => {
                    return Err(error(io::ErrorKind::NotADirectory, path, "not a directory"))
                }
                None => return Err(error(io::ErrorKind::NotFound, path, "no such directory")),
            };
        }
        Ok(id)
    }

    /// The directory holding `path`, and the last component of `path`.
    fn parent_of(&self, path: &Path) -> io::Result<(u64, String)> {
        let mut names = components(path)?;
        let Some(name) = names.pop() else {
            return Err(error(io::ErrorKind::InvalidInput, path, "is the root"));
        };
        Ok((self.find_dir(path, &names)?, name))
    }
}

fn components(path: &Path) -> io::Result<Vec<String>> {
    let mut names = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(s) => names.push(s.to_string_lossy().into_owned()),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => {
                return Err(error(
                    io::ErrorKind::InvalidInput,
                    path,
                    "`..` is not supported",
                ))
            }
        }
    }
    Ok(names)
}

fn error(kind: io::ErrorKind, path: &Path, what: &str) -> io::Error {
    io::Error::new(kind, format!("{}: {what} (simulated)", path.display()))
}

fn stale() -> io::Error {
    io::Error::other("stale handle after crash")
}

/// Writes `data` at `pos`, extending `buf` with zeros as needed.
fn apply_write(buf: &mut Vec<u8>, pos: u64, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    let start = pos as usize;
    let end = start + data.len();
    if buf.len() < end {
        buf.resize(end, 0);
    }
    buf[start..end].copy_from_slice(data);
}

/// What a power loss leaves of a file: each pending write kept, dropped or torn, each length
/// change kept or lost, independently.
fn settle(durable: &[u8], pending: &[Op], rng: &mut fastrand::Rng) -> Vec<u8> {
    let mut out = durable.to_vec();
    for op in pending {
        match op {
            Op::Write { pos, data } => match rng.u8(0..3) {
                0 => apply_write(&mut out, *pos, data),
                1 => {}
                _ => tear(&mut out, *pos, data, rng),
            },
            Op::SetLen(len) => {
                if rng.bool() {
                    out.resize(*len as usize, 0);
                }
            }
        }
    }
    out
}

/// Applies part of a write: a strict prefix, or (for writes over a sector) a random subset of its
/// sectors, as a disk that reorders its sector writes leaves it.
fn tear(out: &mut Vec<u8>, pos: u64, data: &[u8], rng: &mut fastrand::Rng) {
    if data.len() > SECTOR && rng.bool() {
        let mut start = 0;
        while start < data.len() {
            let at = pos + start as u64;
            let end = (start + SECTOR - (at % SECTOR as u64) as usize).min(data.len());
            if rng.bool() {
                apply_write(out, at, &data[start..end]);
            }
            start = end;
        }
    } else if !data.is_empty() {
        let n = rng.usize(..data.len());
        apply_write(out, pos, &data[..n]);
    }
}

/// An in-memory file system that can lose whatever was not synced (see the module docs).
/// Clones share the same files.
#[derive(Clone)]
pub(crate) struct SimFs {
    state: Arc<Mutex<State>>,
    /// While true, reads of files wait (a slow disk, for tests of what waits for it).
    reads_paused: Arc<(Mutex<bool>, Condvar)>,
}

impl fmt::Debug for SimFs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimFs").finish_non_exhaustive()
    }
}

impl Default for SimFs {
    fn default() -> Self {
        Self::new()
    }
}

impl SimFs {
    /// An empty file system (just the root directory).
    pub(crate) fn new() -> Self {
        let state = State {
            epoch: 0,
            down: false,
            next_id: ROOT + 1,
            files: BTreeMap::new(),
            dirs: BTreeMap::from([(ROOT, Dir::default())]),
            sync_disabled: false,
            fail_next_sync: false,
            disk_full: false,
            panic_next: None,
            log_sync_disabled: false,
            boot: 1,
            last_log_write: None,
        };
        SimFs {
            state: Arc::new(Mutex::new(state)),
            reads_paused: Arc::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// When set, `sync_data` and `sync_dir` succeed without making anything durable (the
    /// control: a crash must then be able to lose acknowledged data).
    pub(crate) fn set_sync_disabled(&self, disabled: bool) {
        self.lock().sync_disabled = disabled;
    }

    /// When set, `sync_data` of the log segments succeeds without making anything durable, while
    /// the state database and directories still sync: a crash can then lose acknowledged records
    /// the (intact) state database refers to.
    pub(crate) fn set_log_sync_disabled(&self, disabled: bool) {
        self.lock().log_sync_disabled = disabled;
    }

    /// Makes the next `sync_data` on any file (log segment or database) fail.
    pub(crate) fn fail_next_sync(&self) {
        self.lock().fail_next_sync = true;
    }

    /// Makes reads of files wait until set back (a disk that stalls).
    pub(crate) fn set_reads_paused(&self, paused: bool) {
        let (m, cv) = &*self.reads_paused;
        *m.lock().unwrap_or_else(|e| e.into_inner()) = paused;
        cv.notify_all();
    }

    /// Makes the next storage call of kind `at` panic (a bug, or a library that panics on what
    /// it reads), on whichever thread makes it.
    pub(crate) fn panic_next(&self, at: PanicAt) {
        self.lock().panic_next = Some(at);
    }

    /// Panics if the next call of kind `at` was asked to (the state lock is released first, so
    /// the file system stays usable).
    fn maybe_panic(&self, at: PanicAt) {
        let armed = {
            let mut st = self.lock();
            let armed = st.panic_next == Some(at);
            if armed {
                st.panic_next = None;
            }
            armed
        };
        if armed {
            panic!("{INJECTED_PANIC}: {at:?}");
        }
    }

    /// Makes every later preallocation fail as on a full disk (until set back).
    pub(crate) fn set_disk_full(&self, full: bool) {
        self.lock().disk_full = full;
    }

    /// Creates `path` and its parents and links each durably, so it survives any crash (for a
    /// test's data directory; the directory's own entries still need `sync_dir`).
    pub(crate) fn create_dir_all_durable(&self, path: &Path) -> io::Result<()> {
        self.create_dir_all(path)?;
        let mut st = self.lock();
        let mut id = ROOT;
        for name in components(path)? {
            let dir = st.dir_mut(id);
            let entry = dir.visible[&name];
            dir.durable.insert(name, entry);
            let Entry::Dir(next) = entry else {
                unreachable!("create_dir_all made a directory");
            };
            id = next;
        }
        Ok(())
    }

    /// Opens (creating it, empty, when missing) `path` as a redb storage backend.
    pub(crate) fn redb_file(&self, path: &Path) -> io::Result<SimRedbFile> {
        let mut file = self.open_file(path, true)?;
        file.db = true;
        Ok(SimRedbFile {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Simulates a power loss (see the module docs). Open handles go stale.
    pub(crate) fn crash(&self, rng: &mut fastrand::Rng) {
        let mut guard = self.lock();
        let st = &mut *guard;
        for f in st.files.values_mut() {
            let settled = settle(&f.durable, &f.pending, rng);
            f.pending.clear();
            f.visible.clone_from(&settled);
            f.durable = settled;
        }
        for d in st.dirs.values_mut() {
            let names: BTreeSet<String> =
                d.durable.keys().chain(d.visible.keys()).cloned().collect();
            let mut after = BTreeMap::new();
            for name in names {
                let kept = match (d.durable.get(&name), d.visible.get(&name)) {
                    (Some(old), Some(new)) if old == new => Some(*old),
                    // Removed and made again: either one.
                    (Some(old), Some(new)) => Some(if rng.bool() { *old } else { *new }),
                    // An unsynced removal or creation: it happened or it did not.
                    (Some(one), None) | (None, Some(one)) => rng.bool().then_some(*one),
                    (None, None) => None,
                };
                if let Some(e) = kept {
                    after.insert(name, e);
                }
            }
            d.visible.clone_from(&after);
            d.durable = after;
        }
        // Forget what is no longer reachable from the root.
        let mut live_dirs = BTreeSet::new();
        let mut live_files = BTreeSet::new();
        let mut stack = vec![ROOT];
        while let Some(id) = stack.pop() {
            if !live_dirs.insert(id) {
                continue;
            }
            for e in st.dirs[&id].durable.values() {
                match *e {
                    Entry::Dir(d) => stack.push(d),
                    Entry::File(f) => {
                        live_files.insert(f);
                    }
                }
            }
        }
        st.dirs.retain(|id, _| live_dirs.contains(id));
        st.files.retain(|id, _| live_files.contains(id));
        st.epoch += 1;
        st.boot += 1;
        st.down = true;
    }

    /// The process is killed (kill -9), the machine stays up: the page cache survives, so every
    /// write and directory change made so far stays, synced or not; open handles go stale (the
    /// engine must reopen); the boot id does not change. With `mid_write`, the last write to a
    /// log file was still being copied when the kill landed (Linux stops a write between pages
    /// when a fatal signal is pending): only its part up to a 4 KiB page boundary of the file
    /// is kept (the first boundary after its start; all of it when it does not cross one, less
    /// its last byte).
    pub(crate) fn kill(&self, mid_write: bool) {
        let mut guard = self.lock();
        let st = &mut *guard;
        let last = mid_write
            .then_some(st.last_log_write)
            .flatten()
            .filter(|(ino, _)| st.files.contains_key(ino));
        if let Some((ino, n)) = last {
            let f = st.files.get_mut(&ino).expect("checked");
            // The last write of this file: cut it at the first page boundary after its start.
            if let Some(Op::Write { pos, data }) = f
                .pending
                .iter_mut()
                .rev()
                .find(|op| matches!(op, Op::Write { .. }))
            {
                if data.len() == n {
                    let keep = ((*pos / 4096 + 1) * 4096 - *pos) as usize;
                    data.truncate(keep.min(n.saturating_sub(1)));
                }
            }
            let durable = f.durable.clone();
            let pending = std::mem::take(&mut f.pending);
            let mut out = durable;
            for op in &pending {
                match op {
                    Op::Write { pos, data } => apply_write(&mut out, *pos, data),
                    Op::SetLen(len) => out.resize(*len as usize, 0),
                }
            }
            f.visible.clone_from(&out);
            f.durable = out;
        }
        // Everything else the page cache holds survives as it is (it reaches the disk later).
        for f in st.files.values_mut() {
            if !f.pending.is_empty() {
                f.durable.clone_from(&f.visible);
                f.pending.clear();
            }
        }
        for d in st.dirs.values_mut() {
            d.durable.clone_from(&d.visible);
        }
        st.last_log_write = None;
        st.epoch += 1;
        st.down = true;
    }

    /// Overwrites bytes of the file at `path` on the disk itself (a bad sector, a stray write):
    /// durable at once, whatever was pending there stays pending.
    pub(crate) fn damage(&self, path: &Path, pos: u64, bytes: &[u8]) -> io::Result<()> {
        let mut st = self.lock();
        let (parent, name) = st.parent_of(path)?;
        let Some(Entry::File(ino)) = st.dir(parent).visible.get(&name).copied() else {
            return Err(error(io::ErrorKind::NotFound, path, "no such file"));
        };
        let f = st.files.get_mut(&ino).expect("a linked file exists");
        apply_write(&mut f.durable, pos, bytes);
        apply_write(&mut f.visible, pos, bytes);
        Ok(())
    }

    /// The content of the file at `path` as the engine reads it now.
    pub(crate) fn read_file(&self, path: &Path) -> io::Result<Vec<u8>> {
        let st = self.lock();
        let (parent, name) = st.parent_of(path)?;
        let Some(Entry::File(ino)) = st.dir(parent).visible.get(&name).copied() else {
            return Err(error(io::ErrorKind::NotFound, path, "no such file"));
        };
        Ok(st.files[&ino].visible.clone())
    }

    /// The simulated machine's boot id (changed by every power loss).
    /// The machine is back and a new process uses the disk directly (the engine's own reopen
    /// does this by taking the directory's lock).
    pub(crate) fn restart(&self) {
        self.lock().down = false;
    }

    pub(crate) fn boot(&self) -> u64 {
        self.lock().boot
    }

    fn open_file(&self, path: &Path, create: bool) -> io::Result<SimFile> {
        let mut st = self.lock();
        if st.down {
            return Err(stale());
        }
        let (parent, name) = st.parent_of(path)?;
        let existing = st.dir(parent).visible.get(&name).copied();
        let ino = match existing {
            Some(Entry::File(ino)) => ino,
            Some(Entry::Dir(_)) => {
                return Err(error(io::ErrorKind::IsADirectory, path, "is a directory"))
            }
            None if create => {
                let ino = st.new_id();
                st.files.insert(ino, Inode::default());
                st.dir_mut(parent).visible.insert(name, Entry::File(ino));
                ino
            }
            None => return Err(error(io::ErrorKind::NotFound, path, "no such file")),
        };
        Ok(SimFile {
            fs: self.clone(),
            ino,
            epoch: st.epoch,
            db: false,
        })
    }

    /// Removes the entry `path` (an empty directory when `dir`, else a file). The file's or
    /// directory's record stays until the next crash, which may undo the removal.
    fn unlink(&self, path: &Path, dir: bool) -> io::Result<()> {
        let mut st = self.lock();
        if st.down {
            return Err(stale());
        }
        let (parent, name) = st.parent_of(path)?;
        let existing = st.dir(parent).visible.get(&name).copied();
        match (existing, dir) {
            (None, _) => Err(error(io::ErrorKind::NotFound, path, "no such entry")),
            (Some(Entry::Dir(_)), false) => {
                Err(error(io::ErrorKind::IsADirectory, path, "is a directory"))
            }
            (Some(Entry::File(_)), true) => {
                Err(error(io::ErrorKind::NotADirectory, path, "not a directory"))
            }
            (Some(Entry::Dir(d)), true) if !st.dir(d).visible.is_empty() => Err(error(
                io::ErrorKind::DirectoryNotEmpty,
                path,
                "directory not empty",
            )),
            (Some(_), _) => {
                st.dir_mut(parent).visible.remove(&name);
                Ok(())
            }
        }
    }
}

impl Storage for SimFs {
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn StorageFile>> {
        Ok(Arc::new(self.open_file(path, create)?))
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let names = components(path)?;
        let mut st = self.lock();
        let mut id = ROOT;
        for name in names {
            let existing = st.dir(id).visible.get(&name).copied();
            id = match existing {
                Some(Entry::Dir(d)) => d,
                Some(Entry::File(_)) => {
                    return Err(error(io::ErrorKind::NotADirectory, path, "not a directory"))
                }
                None => {
                    let d = st.new_id();
                    st.dirs.insert(d, Dir::default());
                    st.dir_mut(id).visible.insert(name, Entry::Dir(d));
                    d
                }
            };
        }
        Ok(())
    }

    fn list(&self, path: &Path) -> io::Result<Vec<String>> {
        let st = self.lock();
        let id = st.find_dir(path, &components(path)?)?;
        Ok(st.dir(id).visible.keys().cloned().collect())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.unlink(path, false)
    }

    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        self.unlink(path, true)
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        self.maybe_panic(PanicAt::SyncDir);
        let mut st = self.lock();
        if st.down {
            return Err(stale());
        }
        let id = st.find_dir(path, &components(path)?)?;
        if st.sync_disabled {
            return Ok(());
        }
        let d = st.dir_mut(id);
        d.durable.clone_from(&d.visible);
        Ok(())
    }

    fn open_db(&self, path: &Path) -> Result<redb::Database, relq_core::BackendError> {
        let file = self
            .redb_file(path)
            .map_err(super::io_error("opening the state database"))?;
        redb::Database::builder()
            .create_with_backend(file)
            .map_err(super::db_error)
    }

    fn lock_dir(&self, _root: &Path) -> io::Result<Option<Box<dyn std::any::Any + Send + Sync>>> {
        // One simulated machine, one engine at a time: the tests hold it by construction. The
        // engine opening now is the restarted process.
        self.lock().down = false;
        Ok(Some(Box::new(())))
    }

    fn boot_id(&self) -> Option<u64> {
        Some(self.boot())
    }
}

/// An open file of a [`SimFs`]; stale once the file system crashes.
struct SimFile {
    fs: SimFs,
    ino: u64,
    epoch: u64,
    /// The state database's file (for [`PanicAt`]).
    db: bool,
}

impl SimFile {
    /// Panics if the next call of this kind, on this kind of file, was asked to.
    fn maybe_panic(&self, log: PanicAt, db: PanicAt) {
        self.fs.maybe_panic(if self.db { db } else { log });
    }

    fn inode<'a>(&self, st: &'a mut State) -> io::Result<&'a mut Inode> {
        if st.epoch != self.epoch {
            return Err(stale());
        }
        st.files.get_mut(&self.ino).ok_or_else(stale)
    }

    /// Sets the length to `len` (growing with zeros, or truncating unless `grow_only`).
    fn set_len(&self, len: u64, grow_only: bool) -> io::Result<()> {
        let mut st = self.fs.lock();
        let f = self.inode(&mut st)?;
        let cur = f.visible.len() as u64;
        if len > cur || (len < cur && !grow_only) {
            f.visible.resize(len as usize, 0);
            f.pending.push(Op::SetLen(len));
        }
        Ok(())
    }
}

impl StorageFile for SimFile {
    fn read_at(&self, buf: &mut [u8], pos: u64) -> io::Result<usize> {
        self.maybe_panic(PanicAt::Read, PanicAt::DbRead);
        {
            let (m, cv) = &*self.fs.reads_paused;
            let mut paused = m.lock().unwrap_or_else(|e| e.into_inner());
            while *paused {
                paused = cv.wait(paused).unwrap_or_else(|e| e.into_inner());
            }
        }
        let mut st = self.fs.lock();
        let f = self.inode(&mut st)?;
        let len = f.visible.len();
        if pos >= len as u64 {
            return Ok(0);
        }
        let start = pos as usize;
        let n = buf.len().min(len - start);
        buf[..n].copy_from_slice(&f.visible[start..start + n]);
        Ok(n)
    }

    fn write_at(&self, buf: &[u8], pos: u64) -> io::Result<()> {
        self.maybe_panic(PanicAt::Write, PanicAt::DbWrite);
        let mut st = self.fs.lock();
        let f = self.inode(&mut st)?;
        if !buf.is_empty() {
            apply_write(&mut f.visible, pos, buf);
            f.pending.push(Op::Write {
                pos,
                data: buf.to_vec(),
            });
            if !self.db {
                st.last_log_write = Some((self.ino, buf.len()));
            }
        }
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        self.maybe_panic(PanicAt::Sync, PanicAt::DbSync);
        let mut st = self.fs.lock();
        if st.epoch != self.epoch {
            return Err(stale());
        }
        if st.fail_next_sync {
            st.fail_next_sync = false;
            return Err(io::Error::other("injected sync failure (simulated)"));
        }
        if st.sync_disabled || (st.log_sync_disabled && !self.db) {
            return Ok(());
        }
        let f = self.inode(&mut st)?;
        f.durable.clone_from(&f.visible);
        f.pending.clear();
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        let mut st = self.fs.lock();
        Ok(self.inode(&mut st)?.visible.len() as u64)
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        if self.fs.lock().disk_full {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "no space left on device (simulated)",
            ));
        }
        self.set_len(len, true)
    }
}

/// redb's database file on a [`SimFs`], so a crash drops and tears its unsynced writes too.
/// Stale (every call fails) once the file system crashes: reopen the database on a new one.
pub(crate) struct SimRedbFile {
    file: SimFile,
    path: PathBuf,
}

impl fmt::Debug for SimRedbFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimRedbFile")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SimRedbFile {
    /// On a full disk the database file cannot grow.
    fn refuse_growth(&self, len: u64) -> io::Result<()> {
        let full = self.file.fs.lock().disk_full;
        if full && len > StorageFile::len(&self.file)? {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "no space left on device (simulated)",
            ));
        }
        Ok(())
    }
}

impl redb::StorageBackend for SimRedbFile {
    fn len(&self) -> Result<u64, io::Error> {
        StorageFile::len(&self.file)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        let n = self.file.read_at(out, offset)?;
        if n < out.len() {
            return Err(error(
                io::ErrorKind::UnexpectedEof,
                &self.path,
                "read past the end",
            ));
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        self.refuse_growth(len)?;
        self.file.set_len(len, false)
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        StorageFile::sync_data(&self.file)
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        self.refuse_growth(offset + data.len() as u64)?;
        self.file.write_at(data, offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: u64) -> fastrand::Rng {
        fastrand::Rng::with_seed(seed)
    }

    /// The whole visible content, or `None` when the file does not exist.
    fn read_all(fs: &SimFs, path: &str) -> Option<Vec<u8>> {
        let f = fs.open(Path::new(path), false).ok()?;
        let mut buf = vec![0; f.len().unwrap() as usize];
        assert_eq!(f.read_at(&mut buf, 0).unwrap(), buf.len());
        Some(buf)
    }

    /// A new file whose creation is durable.
    fn durable_file(fs: &SimFs, path: &str) -> Arc<dyn StorageFile> {
        let path = Path::new(path);
        let dir = path.parent().unwrap();
        fs.create_dir_all_durable(dir).unwrap();
        let f = fs.open(path, true).unwrap();
        fs.sync_dir(dir).unwrap();
        f
    }

    #[test]
    fn synced_data_survives_every_crash() {
        for seed in 0..64 {
            let fs = SimFs::new();
            let f = durable_file(&fs, "/d/a");
            f.write_at(b"hello", 0).unwrap();
            f.allocate(4096).unwrap();
            f.write_at(&[7; 1500], 100).unwrap();
            f.sync_data().unwrap();
            f.write_at(b"later", 5000).unwrap(); // unsynced: may or may not survive
            fs.crash(&mut rng(seed));
            fs.restart();
            let got = read_all(&fs, "/d/a").expect("a durably created file survives");
            assert!(got.len() >= 4096, "seed {seed}: length {}", got.len());
            assert_eq!(&got[..5], b"hello", "seed {seed}");
            assert!(got[100..1600].iter().all(|&b| b == 7), "seed {seed}");
            assert!(got[1600..4096].iter().all(|&b| b == 0), "seed {seed}");
        }
    }

    #[test]
    fn unsynced_writes_may_be_kept_dropped_or_torn() {
        let data: Vec<u8> = (0..2000u32).map(|i| (i % 251) as u8 + 1).collect();
        let (mut kept, mut lost, mut torn) = (0, 0, 0);
        for seed in 0..64 {
            let fs = SimFs::new();
            let f = durable_file(&fs, "/d/a");
            f.write_at(&data, 0).unwrap();
            assert_eq!(
                read_all(&fs, "/d/a").unwrap(),
                data,
                "reads see unsynced writes"
            );
            fs.crash(&mut rng(seed));
            fs.restart();
            let got = read_all(&fs, "/d/a").unwrap();
            assert!(got.len() <= data.len());
            // Whatever survived is the written byte in its place.
            assert!(got.iter().zip(&data).all(|(g, d)| *g == 0 || g == d));
            if got == data {
                kept += 1;
            } else if got.iter().all(|&b| b == 0) {
                lost += 1;
            } else {
                torn += 1;
            }
        }
        assert!(
            kept > 0 && lost > 0 && torn > 0,
            "kept {kept}, lost {lost}, torn {torn}"
        );
    }

    #[test]
    fn with_syncs_disabled_a_crash_loses_synced_looking_data() {
        let mut lost = 0;
        for seed in 0..64 {
            let fs = SimFs::new();
            fs.create_dir_all_durable(Path::new("/d")).unwrap();
            fs.set_sync_disabled(true);
            let f = fs.open(Path::new("/d/a"), true).unwrap();
            f.write_at(b"acknowledged", 0).unwrap();
            f.sync_data().unwrap();
            fs.sync_dir(Path::new("/d")).unwrap();
            fs.crash(&mut rng(seed));
            fs.restart();
            if read_all(&fs, "/d/a").as_deref() != Some(&b"acknowledged"[..]) {
                lost += 1;
            }
        }
        assert!(lost > 0);
    }

    #[test]
    fn an_unsynced_creation_may_vanish_unless_its_directory_is_synced() {
        let (mut vanished, mut survived) = (0, 0);
        for seed in 0..64 {
            for sync_dir in [false, true] {
                let fs = SimFs::new();
                fs.create_dir_all_durable(Path::new("/d")).unwrap();
                let f = fs.open(Path::new("/d/new"), true).unwrap();
                f.write_at(b"x", 0).unwrap();
                f.sync_data().unwrap();
                if sync_dir {
                    fs.sync_dir(Path::new("/d")).unwrap();
                }
                fs.crash(&mut rng(seed));
                fs.restart();
                match read_all(&fs, "/d/new") {
                    Some(got) => {
                        assert_eq!(got, b"x");
                        if !sync_dir {
                            survived += 1;
                        }
                    }
                    None => {
                        assert!(!sync_dir, "seed {seed}: a synced creation vanished");
                        vanished += 1;
                    }
                }
            }
        }
        assert!(
            vanished > 0 && survived > 0,
            "{vanished} vanished, {survived} survived"
        );
    }

    #[test]
    fn an_unsynced_removal_may_be_undone() {
        let (mut back, mut gone) = (0, 0);
        for seed in 0..64 {
            let fs = SimFs::new();
            let f = durable_file(&fs, "/d/a");
            f.write_at(b"old", 0).unwrap();
            f.sync_data().unwrap();
            fs.remove_file(Path::new("/d/a")).unwrap();
            assert!(fs.list(Path::new("/d")).unwrap().is_empty());
            fs.crash(&mut rng(seed));
            fs.restart();
            match read_all(&fs, "/d/a") {
                Some(got) => {
                    assert_eq!(got, b"old");
                    back += 1;
                }
                None => gone += 1,
            }
        }
        assert!(back > 0 && gone > 0, "{back} back, {gone} gone");
    }

    #[test]
    fn handles_go_stale_at_a_crash() {
        let fs = SimFs::new();
        let f = durable_file(&fs, "/d/a");
        f.write_at(b"abc", 0).unwrap();
        f.sync_data().unwrap();
        fs.crash(&mut rng(1));
        fs.restart();
        let e = f.read_at(&mut [0; 3], 0).unwrap_err();
        assert!(e.to_string().contains("stale handle after crash"), "{e}");
        assert!(f.write_at(b"x", 0).is_err());
        assert!(f.sync_data().is_err());
        assert!(f.len().is_err());
        assert!(f.allocate(10).is_err());
        assert_eq!(read_all(&fs, "/d/a").unwrap(), b"abc");
    }

    #[test]
    fn an_injected_failure_fails_one_sync() {
        let fs = SimFs::new();
        let f = durable_file(&fs, "/d/a");
        f.write_at(b"abc", 0).unwrap();
        fs.fail_next_sync();
        assert!(f.sync_data().is_err());
        f.sync_data().unwrap();
    }

    #[test]
    fn a_committed_redb_transaction_survives_a_crash() {
        use redb::{ReadableDatabase, TableDefinition};
        const T: TableDefinition<'_, &str, u64> = TableDefinition::new("t");
        let path = Path::new("/d/state.redb");
        for seed in 0..8 {
            let fs = SimFs::new();
            fs.create_dir_all_durable(Path::new("/d")).unwrap();
            let db = redb::Database::builder()
                .create_with_backend(fs.redb_file(path).unwrap())
                .unwrap();
            fs.sync_dir(Path::new("/d")).unwrap();
            let tx = db.begin_write().unwrap();
            {
                let mut t = tx.open_table(T).unwrap();
                t.insert("k", 42u64).unwrap();
            }
            tx.commit().unwrap();
            fs.crash(&mut rng(seed));
            fs.restart();
            drop(db); // its handle is stale: closing fails quietly
            let db = redb::Database::builder()
                .create_with_backend(fs.redb_file(path).unwrap())
                .unwrap();
            let rtx = db.begin_read().unwrap();
            let t = rtx.open_table(T).unwrap();
            assert_eq!(
                t.get("k").unwrap().map(|v| v.value()),
                Some(42),
                "seed {seed}"
            );
        }
    }
}
