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
use crate::error::BackendError;

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

impl StorageFile for RealFile {
    fn read_at(&self, buf: &mut [u8], pos: u64) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.0.read_at(&mut buf[done..], pos + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
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
        let mut done = 0;
        while done < buf.len() {
            match self.0.read_at(&mut buf[done..], pos + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
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
