//! Append-only data files: where blocks go when memory is short, and where a
//! graceful shutdown leaves everything.
//!
//! A [`DataFile`] is written only at its end (by one flush at a time, which
//! the owning storage serialises) and read with positioned reads by any
//! number of readers at once. It is never truncated or rewritten, so a range
//! once written stays valid for as long as anyone holds the file — readers
//! in this process, or same-host clients handed its descriptor. Nothing is
//! memory-mapped by the server: disk reads land in buffers that the reading
//! stream accounts for in the memory budget.

use std::{
    fs::File,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
};

use bytes::Bytes;
use shuffle_protocol::ServiceError;

use crate::disk;

/// One append-only file of blocks.
#[derive(Debug)]
pub struct DataFile {
    /// Where it lives (for messages and removal).
    path: PathBuf,
    /// Open for reading and writing.
    file: File,
    /// Bytes written: the offset of the next append.
    len: AtomicU64,
    /// Set once the file is deleted (its handle stays readable for those holding it).
    deleted: AtomicBool,
    /// Identifies the file in offset-ordered read scheduling.
    key: u64,
}

/// Source of file keys, unique within the process.
static NEXT_FILE_KEY: AtomicU64 = AtomicU64::new(1);

impl DataFile {
    /// Creates (or truncates) the file at `path`.
    pub fn create(path: PathBuf) -> Result<Self, ServiceError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| disk::io_error(&path, "creating", e))?;
        Ok(Self::from_file(path, file, 0))
    }

    /// Opens an existing file of `len` bytes (recovery after a restart).
    pub fn open(path: PathBuf, len: u64) -> Result<Self, ServiceError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| disk::io_error(&path, "opening", e))?;
        let on_disk = file.metadata().map_err(|e| disk::io_error(&path, "reading the size of", e))?.len();
        if on_disk < len {
            return Err(ServiceError::new(
                shuffle_protocol::ErrorKind::Io,
                format!("{} holds {on_disk} bytes, its manifest says {len}", path.display()),
            ));
        }
        Ok(Self::from_file(path, file, len))
    }

    fn from_file(path: PathBuf, file: File, len: u64) -> Self {
        Self {
            path,
            file,
            len: AtomicU64::new(len),
            deleted: AtomicBool::new(false),
            key: NEXT_FILE_KEY.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes written.
    pub fn len(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Identifies the file for read scheduling.
    pub fn key(&self) -> u64 {
        self.key
    }

    /// The open file, for same-host readers that are handed its descriptor.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Appends `chunks` at the end after checking the disk reserve; returns
    /// the offset they start at. The caller serialises appends to one file.
    /// On error nothing is considered written (the length does not move).
    pub fn append(&self, chunks: &[Bytes], reserve: u64) -> Result<u64, ServiceError> {
        let total: u64 = chunks.iter().map(|b| b.len() as u64).sum();
        let dir = self.path.parent().unwrap_or(Path::new("."));
        disk::check_reserve(dir, total, reserve)?;
        let start = self.len();
        let mut at = start;
        for chunk in chunks {
            self.file.write_all_at(chunk, at).map_err(|e| disk::io_error(&self.path, "writing", e))?;
            at += chunk.len() as u64;
        }
        self.len.store(at, Ordering::Release);
        Ok(start)
    }

    /// Reads `len` bytes at `offset` into a new buffer. Blocking I/O.
    pub fn read(&self, offset: u64, len: usize) -> Result<Bytes, ServiceError> {
        let buf = read_new_at(&self.file, offset, len).map_err(|e| disk::io_error(&self.path, "reading", e))?;
        Ok(Bytes::from(buf))
    }

    /// Forces what was written to disk. Blocking I/O.
    pub fn sync(&self) -> Result<(), ServiceError> {
        self.file.sync_data().map_err(|e| disk::io_error(&self.path, "syncing", e))
    }

    /// Whether the file was deleted.
    pub fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::Acquire)
    }

    /// Unlinks the file; handles already open keep reading it.
    pub fn delete(&self) {
        if !self.deleted.swap(true, Ordering::AcqRel) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Reads exactly `len` bytes at `offset` into a new buffer, without first
/// zeroing it (the kernel writes every byte the buffer ends up holding).
pub(crate) fn read_new_at(file: &File, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(len);
    while buf.len() < len {
        let at = offset + buf.len() as u64;
        let n = rustix::io::pread(file, rustix::buffer::spare_capacity(&mut buf), at)?;
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the file ends before the range does"));
        }
    }
    buf.truncate(len);
    Ok(buf)
}

/// Writes `bytes` to `path` durably: to a temporary file, synced, renamed
/// over `path`, and the directory synced, so `path` holds either the old or
/// the new contents after a crash. Blocking I/O.
pub fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), ServiceError> {
    let tmp = path.with_extension("tmp");
    let io = |what: &str, p: &Path, e: std::io::Error| disk::io_error(p, what, e);
    {
        let file = File::create(&tmp).map_err(|e| io("creating", &tmp, e))?;
        file.write_all_at(bytes, 0).map_err(|e| io("writing", &tmp, e))?;
        file.sync_all().map_err(|e| io("syncing", &tmp, e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| io("renaming into place", path, e))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Syncs a directory, so the names created or removed in it are durable.
pub fn sync_dir(dir: &Path) -> Result<(), ServiceError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| disk::io_error(dir, "syncing directory", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_are_read_back_by_offset_and_survive_deletion_of_the_name() {
        let dir = tempfile::tempdir().unwrap();
        let file = DataFile::create(dir.path().join("a.data")).unwrap();
        let first = file.append(&[Bytes::from_static(b"hello "), Bytes::from_static(b"world")], 0).unwrap();
        let second = file.append(&[Bytes::from_static(b"!")], 0).unwrap();
        assert_eq!((first, second, file.len()), (0, 11, 12));
        file.delete();
        assert!(!dir.path().join("a.data").exists());
        assert_eq!(&file.read(6, 6).unwrap()[..], b"world!");
    }

    #[test]
    fn a_write_that_would_eat_into_the_reserve_fails_as_disk_full_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let file = DataFile::create(dir.path().join("a.data")).unwrap();
        let err = file.append(&[Bytes::from_static(b"x")], u64::MAX / 2).unwrap_err();
        assert_eq!(err.kind, shuffle_protocol::ErrorKind::DiskFull);
        assert_eq!(file.len(), 0);
    }

    #[test]
    fn durable_writes_replace_the_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("manifest.bin");
        write_durably(&path, b"one").unwrap();
        write_durably(&path, b"two!").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two!");
        assert!(!path.with_extension("tmp").exists());
    }
}
