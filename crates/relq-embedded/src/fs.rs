//! The file layer the engine's log writes through.
//!
//! [`RealFs`] is the operating system's file system. The crash tests put a simulated layer beside
//! it (in `sim.rs`) that can forget, reorder or tear every write that was not synced, so the same
//! engine code runs against both.

use std::any::Any;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use super::db_error;
use relq_core::BackendError;

/// The state database's page cache. redb's default (1 GiB) would let a large spill or dead-letter
/// table take that much memory; the state a commit cycle touches is far smaller.
const STATE_CACHE: usize = 64 << 20;

/// A directory tree of files.
pub(crate) trait Storage: Send + Sync + 'static {
    /// Opens `path` for reading and writing, creating it (empty) when `create` is set.
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn StorageFile>>;
    /// Creates a directory and its parents.
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// The names of the entries of a directory.
    fn list(&self, path: &Path) -> io::Result<Vec<String>>;
    /// Removes a file.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Removes an (empty) directory.
    fn remove_dir(&self, path: &Path) -> io::Result<()>;
    /// Makes the directory's entries (creations, removals) durable.
    fn sync_dir(&self, path: &Path) -> io::Result<()>;
    /// Opens (creating if needed) the state database at `path`.
    fn open_db(&self, path: &Path) -> Result<redb::Database, BackendError>;
    /// Takes the data directory's exclusive lock, held while the guard lives; `None` when
    /// another holder has it.
    fn lock_dir(&self, root: &Path) -> io::Result<Option<Box<dyn Any + Send + Sync>>>;
    /// The running machine's boot id: it changes at every boot, so a session recorded with the
    /// same one ended without a power loss (a process kill leaves the page cache, and every
    /// write in it, intact). `None` when unknown.
    fn boot_id(&self) -> Option<u64> {
        system_boot_id()
    }
}

/// The kernel's boot id (`/proc/sys/kernel/random/boot_id`, a random UUID per boot) as a number:
/// its first 64 bits. `None` where there is none (not Linux) or it cannot be read.
pub(crate) fn system_boot_id() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    parse_boot_id(&text)
}

/// The first 64 bits of a boot id's hex digits; `None` for anything that is not one.
fn parse_boot_id(text: &str) -> Option<u64> {
    let hex: String = text.trim().chars().filter(|c| *c != '-').collect();
    if hex.len() < 16 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    // Never 0: the state database stores 0 for "unknown".
    u64::from_str_radix(&hex[..16], 16).ok().filter(|v| *v != 0)
}

/// One open file.
pub(crate) trait StorageFile: Send + Sync + 'static {
    /// Reads into `buf` at `pos`; returns the bytes read (fewer only at the end of the file).
    fn read_at(&self, buf: &mut [u8], pos: u64) -> io::Result<usize>;
    /// Writes all of `buf` at `pos`.
    fn write_at(&self, buf: &[u8], pos: u64) -> io::Result<()>;
    /// Makes the written data durable (`fdatasync`).
    fn sync_data(&self) -> io::Result<()>;
    /// The file's length.
    fn len(&self) -> io::Result<u64>;
    /// Extends the file to `len` bytes of zeros, reserving the space where the file system can.
    fn allocate(&self, len: u64) -> io::Result<()>;
}

/// The operating system's file system.
#[derive(Debug, Default)]
pub(crate) struct RealFs;

struct RealFile(File);

impl Storage for RealFs {
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn StorageFile>> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(path)?;
        Ok(Arc::new(RealFile(f)))
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }

    fn list(&self, path: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for e in std::fs::read_dir(path)? {
            names.push(e?.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        Ok(names)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_dir(path)
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        File::open(path)?.sync_all()
    }

    fn open_db(&self, path: &Path) -> Result<redb::Database, BackendError> {
        redb::Database::builder()
            .set_cache_size(STATE_CACHE)
            .create(path)
            .map_err(db_error)
    }

    fn lock_dir(&self, root: &Path) -> io::Result<Option<Box<dyn Any + Send + Sync>>> {
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(root.join("LOCK"))?;
        match f.try_lock() {
            Ok(()) => Ok(Some(Box::new(f))),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(e),
        }
    }
}

/// Reads into `buf` from `pos` until it is full or the file ends; returns the bytes read.
fn read_full(file: &std::fs::File, buf: &mut [u8], pos: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], pos + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

impl StorageFile for RealFile {
    fn read_at(&self, buf: &mut [u8], pos: u64) -> io::Result<usize> {
        read_full(&self.0, buf, pos)
    }

    fn write_at(&self, buf: &[u8], pos: u64) -> io::Result<()> {
        self.0.write_all_at(buf, pos)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        let current = self.len()?;
        if len <= current {
            return Ok(());
        }
        // Reserving the blocks up front means a later fdatasync need not journal a size change.
        match rustix::fs::fallocate(&self.0, rustix::fs::FallocateFlags::empty(), 0, len) {
            Ok(()) => Ok(()),
            Err(_) => self.0.set_len(len),
        }
    }
}

/// The operating system's file system, read-only: files open for reading only, and everything
/// that would change the disk fails. `relq check` reads a data directory through it, so it
/// cannot modify what it inspects (and needs no lock or write access).
#[derive(Debug, Default)]
pub(crate) struct ReadOnlyFs;

struct ReadOnlyFile(File);

fn read_only() -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, "opened read-only")
}

impl Storage for ReadOnlyFs {
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn StorageFile>> {
        if create {
            return Err(read_only());
        }
        Ok(Arc::new(ReadOnlyFile(File::open(path)?)))
    }

    fn create_dir_all(&self, _path: &Path) -> io::Result<()> {
        Err(read_only())
    }

    fn list(&self, path: &Path) -> io::Result<Vec<String>> {
        RealFs.list(path)
    }

    fn remove_file(&self, _path: &Path) -> io::Result<()> {
        Err(read_only())
    }

    fn remove_dir(&self, _path: &Path) -> io::Result<()> {
        Err(read_only())
    }

    fn sync_dir(&self, _path: &Path) -> io::Result<()> {
        Err(read_only())
    }

    fn open_db(&self, path: &Path) -> Result<redb::Database, BackendError> {
        Err(super::io_error("opening the state database")(
            io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{} is opened read-only", path.display()),
            ),
        ))
    }

    fn lock_dir(&self, _root: &Path) -> io::Result<Option<Box<dyn Any + Send + Sync>>> {
        Err(read_only())
    }
}

impl StorageFile for ReadOnlyFile {
    fn read_at(&self, buf: &mut [u8], pos: u64) -> io::Result<usize> {
        read_full(&self.0, buf, pos)
    }

    fn write_at(&self, _buf: &[u8], _pos: u64) -> io::Result<()> {
        Err(read_only())
    }

    fn sync_data(&self) -> io::Result<()> {
        Err(read_only())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }

    fn allocate(&self, _len: u64) -> io::Result<()> {
        Err(read_only())
    }
}

/// Opens an in-memory copy of the state database at `path` (an empty database when `exists` is
/// false), for a read-only open: the file is only read, so neither redb's lock nor its recovery
/// of a database that was not closed (a running writer's) touches it. The file is read until
/// two reads agree, so a commit a running writer makes meanwhile is not seen half-done.
pub(crate) fn open_db_copy(
    storage: &dyn Storage,
    path: &Path,
    exists: bool,
) -> Result<redb::Database, BackendError> {
    let read = || -> io::Result<Vec<u8>> {
        let f = storage.open(path, false)?;
        let len = usize::try_from(f.len()?)
            .map_err(|_| io::Error::new(io::ErrorKind::OutOfMemory, "too large to copy"))?;
        let mut buf = vec![0; len];
        let n = f.read_at(&mut buf, 0)?;
        buf.truncate(n);
        Ok(buf)
    };
    let bytes = if exists {
        let copy = || -> io::Result<Vec<u8>> {
            let mut last = read()?;
            for _ in 0..3 {
                let again = read()?;
                if again == last {
                    break;
                }
                last = again;
            }
            Ok(last)
        };
        copy().map_err(|e| {
            BackendError::new(
                super::NAME,
                relq_core::BackendErrorKind::Unavailable,
                format!("reading the state database {}: {e}", path.display()),
            )
            .with_source(e)
        })?
    } else {
        Vec::new()
    };
    redb::Database::builder()
        .set_cache_size(STATE_CACHE)
        .create_with_backend(MemoryCopy::new(bytes))
        .map_err(db_error)
}

#[cfg(test)]
mod boot_tests {
    #[test]
    fn boot_ids_parse_and_garbage_does_not() {
        assert_eq!(
            super::parse_boot_id("0123abcd-0000-4000-8000-00000000ffff\n"),
            Some(0x0123_abcd_0000_4000)
        );
        assert_eq!(super::parse_boot_id(""), None);
        assert_eq!(super::parse_boot_id("not-a-uuid"), None);
        #[cfg(target_os = "linux")]
        assert!(super::system_boot_id().is_some(), "Linux has a boot id");
    }
}

/// A copy of a redb file held in memory: the check opens (and, if redb must, repairs) the
/// copy, never the file.
#[derive(Debug)]
pub(crate) struct MemoryCopy(std::sync::RwLock<Vec<u8>>);

impl MemoryCopy {
    pub(crate) fn new(bytes: Vec<u8>) -> MemoryCopy {
        MemoryCopy(std::sync::RwLock::new(bytes))
    }
}

impl redb::StorageBackend for MemoryCopy {
    fn len(&self) -> Result<u64, io::Error> {
        Ok(self.0.read().unwrap_or_else(|e| e.into_inner()).len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        let data = self.0.read().unwrap_or_else(|e| e.into_inner());
        let start = usize::try_from(offset).map_err(|_| past_end())?;
        let end = start.checked_add(out.len()).ok_or_else(past_end)?;
        out.copy_from_slice(data.get(start..end).ok_or_else(past_end)?);
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        let len = usize::try_from(len).map_err(|_| past_end())?;
        self.0
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .resize(len, 0);
        Ok(())
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        let mut buf = self.0.write().unwrap_or_else(|e| e.into_inner());
        let start = usize::try_from(offset).map_err(|_| past_end())?;
        let end = start.checked_add(data.len()).ok_or_else(past_end)?;
        buf.get_mut(start..end)
            .ok_or_else(past_end)?
            .copy_from_slice(data);
        Ok(())
    }
}

fn past_end() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "past the end of the database")
}
