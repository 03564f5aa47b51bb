//! Disk access behind a small trait, with a file implementation ([`FileStorage`]) and an
//! in-memory one ([`MemStorage`], in `mem`) that can simulate a crash and inject faults.
//!
//! The log only ever appends to files, truncates the tail of the last one, creates, renames and
//! removes whole files, and syncs file data and the directory.

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::Error;

mod mem;

pub use mem::{CrashMode, MemStorage};

/// A directory of files.
pub trait Storage: Send + Sync + fmt::Debug {
    /// Names of the files in the directory.
    fn list(&self) -> io::Result<Vec<String>>;
    /// Creates a new empty file; fails if it exists.
    fn create(&self, name: &str) -> io::Result<Box<dyn StorageFile>>;
    /// Opens an existing file for reading and writing.
    fn open(&self, name: &str) -> io::Result<Box<dyn StorageFile>>;
    /// Opens an existing file for reading only; writes through it fail. What a read-only log
    /// and every reader use, so that they work where the process may not write (a read-only
    /// mount, files the user can only read).
    fn open_read(&self, name: &str) -> io::Result<Box<dyn StorageFile>>;
    /// Removes a file.
    fn remove(&self, name: &str) -> io::Result<()>;
    /// Atomically replaces `to` with `from`.
    fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    /// Makes creations, renames and removals durable.
    fn sync_dir(&self) -> io::Result<()>;
    /// A human-readable location for `name`, used in error messages.
    fn describe(&self, name: &str) -> String;
    /// Takes the directory for one writer. The returned guard holds it until dropped; while it
    /// is held, another `lock_writer` on the same directory — from this process or another —
    /// fails with [`Error::InUse`]. Read-only users never take it. The default takes nothing:
    /// an in-memory directory belongs to whoever holds the value.
    fn lock_writer(&self) -> Result<WriterLock, Error> {
        Ok(WriterLock(None))
    }
}

/// Held by the one writer of a log directory; dropping it releases the directory.
#[derive(Debug)]
pub struct WriterLock(
    #[expect(dead_code, reason = "held for its drop, which unlocks")] Option<fs::File>,
);

/// The lock file in a log directory. It holds the PID of the writer, for error messages; the
/// lock itself is an `flock` on it, released by the kernel when the process dies, so a crashed
/// writer never leaves a stale lock behind.
pub const LOCK_FILE_NAME: &str = "LOCK";

/// One open file.
#[expect(
    clippy::len_without_is_empty,
    reason = "a file's length is a position to append at, not a collection size"
)]
pub trait StorageFile: Send + Sync {
    /// Reads at `pos`; returns fewer bytes only at end of file.
    fn read_at(&self, buf: &mut [u8], pos: u64) -> io::Result<usize>;
    /// Writes all of `buf` at `pos`.
    fn write_all_at(&self, buf: &[u8], pos: u64) -> io::Result<()>;
    /// Makes the file's data durable (fdatasync).
    fn sync_data(&self) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Truncates or extends to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;

    /// Reads until `buf` is full or end of file; returns the bytes read.
    fn read_full_at(&self, buf: &mut [u8], pos: u64) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            let n = self.read_at(&mut buf[done..], pos + done as u64)?;
            if n == 0 {
                break;
            }
            done += n;
        }
        Ok(done)
    }
}

/// Files in a directory on the real file system.
#[derive(Debug, Clone)]
pub struct FileStorage {
    dir: PathBuf,
}

impl FileStorage {
    /// Uses `dir`, creating it (and its parents) if needed.
    pub fn new(dir: impl AsRef<Path>) -> io::Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir)?;
        Ok(FileStorage { dir })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

struct RealFile(fs::File);

impl StorageFile for RealFile {
    fn read_at(&self, buf: &mut [u8], pos: u64) -> io::Result<usize> {
        self.0.read_at(buf, pos)
    }
    fn write_all_at(&self, buf: &[u8], pos: u64) -> io::Result<()> {
        self.0.write_all_at(buf, pos)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
}

impl Storage for FileStorage {
    fn list(&self) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file()
                && let Ok(name) = entry.file_name().into_string()
            {
                out.push(name);
            }
        }
        Ok(out)
    }
    fn create(&self, name: &str) -> io::Result<Box<dyn StorageFile>> {
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(self.dir.join(name))?;
        Ok(Box::new(RealFile(f)))
    }
    fn open(&self, name: &str) -> io::Result<Box<dyn StorageFile>> {
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.dir.join(name))?;
        Ok(Box::new(RealFile(f)))
    }
    fn open_read(&self, name: &str) -> io::Result<Box<dyn StorageFile>> {
        let f = fs::OpenOptions::new()
            .read(true)
            .open(self.dir.join(name))?;
        Ok(Box::new(RealFile(f)))
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        fs::remove_file(self.dir.join(name))
    }
    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        fs::rename(self.dir.join(from), self.dir.join(to))
    }
    fn sync_dir(&self) -> io::Result<()> {
        fs::File::open(&self.dir)?.sync_all()
    }
    fn describe(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
    fn lock_writer(&self) -> Result<WriterLock, Error> {
        let path = self.dir.join(LOCK_FILE_NAME);
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(format!("open {}", path.display()), e))?;
        match file.try_lock() {
            Ok(()) => {
                // The PID is only a hint for the error message of the next would-be writer.
                let pid = format!("{}\n", std::process::id());
                file.set_len(0)
                    .and_then(|()| file.write_all_at(pid.as_bytes(), 0))
                    .map_err(|e| Error::io(format!("write {}", path.display()), e))?;
                Ok(WriterLock(Some(file)))
            }
            Err(fs::TryLockError::WouldBlock) => {
                let mut buf = [0u8; 32];
                let n = file.read_at(&mut buf, 0).unwrap_or(0);
                let pid = std::str::from_utf8(&buf[..n])
                    .ok()
                    .and_then(|s| s.trim().parse::<u32>().ok());
                Err(Error::InUse {
                    dir: self.dir.display().to_string(),
                    holder: pid
                        .map_or_else(|| "another process".to_string(), |p| format!("PID {p}")),
                })
            }
            Err(fs::TryLockError::Error(e)) => {
                Err(Error::io(format!("lock {}", path.display()), e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::mem::{EBADF, EROFS};
    use super::*;

    #[test]
    fn crash_keeps_synced_data_and_synced_names_only() {
        let s = MemStorage::new();
        let a = s.create("a").unwrap();
        a.write_all_at(b"hello", 0).unwrap();
        a.sync_data().unwrap();
        s.sync_dir().unwrap();
        a.write_all_at(b" world", 5).unwrap();
        let b = s.create("b").unwrap();
        b.sync_data().unwrap();
        let after = s.crash(CrashMode::DropUnsynced);
        assert_eq!(after.list().unwrap(), vec!["a".to_string()]);
        let a2 = after.open("a").unwrap();
        let mut buf = vec![0; 32];
        let n = a2.read_full_at(&mut buf, 0).unwrap();
        assert_eq!(&buf[..n], b"hello");
    }

    #[test]
    fn a_truncation_is_durable_only_at_the_next_sync() {
        let s = MemStorage::new();
        let a = s.create("a").unwrap();
        s.sync_dir().unwrap();
        a.write_all_at(b"hello world", 0).unwrap();
        a.sync_data().unwrap();
        a.set_len(5).unwrap();
        let mut buf = vec![0; 32];
        let crashed = s.crash(CrashMode::DropUnsynced).open("a").unwrap();
        let n = crashed.read_full_at(&mut buf, 0).unwrap();
        assert_eq!(&buf[..n], b"hello world", "the cut was not synced");
        a.write_all_at(b"!", 5).unwrap();
        a.sync_data().unwrap();
        let crashed = s.crash(CrashMode::DropUnsynced).open("a").unwrap();
        let n = crashed.read_full_at(&mut buf, 0).unwrap();
        assert_eq!(&buf[..n], b"hello!");
    }

    #[test]
    fn a_failed_sync_may_persist_a_prefix() {
        let mut kept = std::collections::BTreeSet::new();
        for seed in 0..64 {
            let s = MemStorage::new();
            s.persist_on_failed_sync(seed);
            let a = s.create("a").unwrap();
            s.sync_dir().unwrap();
            a.write_all_at(b"durable", 0).unwrap();
            a.sync_data().unwrap();
            a.write_all_at(b"-maybe", 7).unwrap();
            s.fail_syncs_from(s.sync_count() + 1);
            assert!(a.sync_data().is_err());
            let mut buf = vec![0; 32];
            let crashed = s.crash(CrashMode::DropUnsynced).open("a").unwrap();
            let n = crashed.read_full_at(&mut buf, 0).unwrap();
            assert_eq!(n, 13, "the file keeps the page cache's length");
            let prefix = buf[7..13].iter().take_while(|&&b| b != 0).count();
            assert_eq!(&buf[..7 + prefix], &b"durable-maybe"[..7 + prefix]);
            assert!(buf[7 + prefix..13].iter().all(|&b| b == 0));
            kept.insert(prefix);
        }
        assert!(
            kept.contains(&0) && kept.contains(&6),
            "prefixes seen: {kept:?}"
        );
    }

    /// The file implementation's read-only open asks for no write access: writes through it
    /// fail even for root, to whom the permission bits would not show it.
    #[test]
    fn a_file_opened_for_reading_refuses_writes_and_reads_what_was_written() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStorage::new(dir.path()).unwrap();
        let a = s.create("a").unwrap();
        a.write_all_at(b"hello", 0).unwrap();
        let r = s.open_read("a").unwrap();
        let mut buf = vec![0; 8];
        let n = r.read_full_at(&mut buf, 0).unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(
            r.write_all_at(b"x", 0).unwrap_err().raw_os_error(),
            Some(EBADF)
        );
        assert!(r.set_len(0).is_err());
    }

    #[test]
    fn a_read_only_mount_refuses_write_access_and_reads_go_on() {
        let s = MemStorage::new();
        let a = s.create("a").unwrap();
        a.write_all_at(b"hello", 0).unwrap();
        s.mount_read_only();
        let erofs = |r: io::Result<()>| r.unwrap_err().raw_os_error() == Some(EROFS);
        assert!(erofs(s.open("a").map(drop)));
        assert!(erofs(s.create("b").map(drop)));
        assert!(erofs(s.remove("a")));
        assert!(erofs(s.rename("a", "b")));
        assert!(erofs(s.sync_dir()));
        let r = s.open_read("a").unwrap();
        let mut buf = vec![0; 8];
        let n = r.read_full_at(&mut buf, 0).unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(
            r.write_all_at(b"x", 0).unwrap_err().raw_os_error(),
            Some(EBADF)
        );
    }

    #[test]
    fn failed_sync_loses_dirty_data_for_good() {
        let s = MemStorage::new();
        let a = s.create("a").unwrap();
        s.sync_dir().unwrap();
        a.write_all_at(b"lost", 0).unwrap();
        s.fail_syncs_from(s.sync_count() + 1);
        assert!(a.sync_data().is_err());
        s.fail_syncs_from(0);
        a.write_all_at(b"kept", 4).unwrap();
        a.sync_data().unwrap();
        let after = s.crash(CrashMode::DropUnsynced);
        let mut buf = vec![0; 8];
        after.open("a").unwrap().read_full_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"\0\0\0\0kept");
    }
}
