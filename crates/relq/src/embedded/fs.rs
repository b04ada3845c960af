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
