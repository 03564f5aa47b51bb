//! The JSON-lines file sink: one change envelope ([`crate::envelope`]) per line, appended to
//! a file that rotates by size, with the pipeline's position kept beside it.
//!
//! # Files
//!
//! For `path = changes.jsonl`:
//! - `changes.jsonl`: the live file, appended to.
//! - `changes.jsonl.1`, `changes.jsonl.2`, ...: rotated files, oldest first. Once the live
//!   file holds `rotate_bytes` or more, it is renamed to the next number and a new live file
//!   starts (rotation happens between batches, so a batch never spans two files). Reading
//!   `.1`, `.2`, ..., `.N`, then the live file gives every change in log order.
//! - `changes.jsonl.position`: which rotated file is the last, how many bytes of the live file
//!   hold stored envelopes, and the pipeline's checkpoint (format in `position.rs`). It names
//!   the pipeline that wrote it; a sink of any other pipeline refuses the files on open.
//! - `changes.jsonl.lock`: `flock`ed by the one sink writing these files (it holds its PID);
//!   a second one waits, retrying, until the first has stopped.
//!
//! # Exactly once
//!
//! A batch is appended, then synced (`fdatasync`), and only then is the position replaced
//! (write a temporary file, sync, rename) with the new length and the batch's checkpoint. On
//! open, the live file is cut back to the stored length: whatever a crash left after it (a
//! torn line, or whole lines whose position was never stored) is removed, and the pipeline
//! sends those changes again from the stored checkpoint. So after `kill -9` at any point no
//! envelope is missing and none is written twice.
//!
//! A rotation renames the live file, syncs the directory, stores the position with the new
//! segment number, then creates the new live file. If syncing or storing fails, the rename is
//! undone (and the directory synced) before the error is returned, so a rotated file shows
//! only once the position records it; a crash between the rename and the stored position is
//! undone on open (the renamed file becomes the live file again).
//!
//! Owns: the files and the position beside them. Must never: store a position that covers
//! bytes not yet synced, write into a file it did not create (a data file without a
//! position beside it is refused, never cut), or resume from another pipeline's position.

mod position;

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use position::FilePosition;

use crate::sink::{Batch, Sink, SinkError, SinkFuture};

/// The `[sink]` table of a pipeline whose `kind = "file"`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The live file envelopes are appended to (`changes.jsonl`). Its directory must exist.
    /// Rotated files are named after it (`changes.jsonl.1`, ...), and so is the position file
    /// (`changes.jsonl.position`).
    pub path: PathBuf,
    /// Rotate the live file once it holds at least this many bytes; 0 never rotates.
    /// Default 256 MiB.
    #[serde(default = "FileConfig::rotate_bytes_default")]
    pub rotate_bytes: u64,
}

impl FileConfig {
    /// 256 MiB.
    pub const ROTATE_BYTES_DEFAULT: u64 = 256 << 20;

    fn rotate_bytes_default() -> u64 {
        Self::ROTATE_BYTES_DEFAULT
    }

    /// A configuration writing to `path` with the default rotation.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        FileConfig {
            path: path.into(),
            rotate_bytes: Self::ROTATE_BYTES_DEFAULT,
        }
    }
}

/// See the module documentation.
#[derive(Debug)]
pub struct FileSink {
    cfg: FileConfig,
    pipeline: String,
    /// The live file, once opened.
    file: Option<File>,
    /// Rotated files before the live one.
    segment: u64,
    /// Bytes of the live file covered by the stored position.
    stored_bytes: u64,
    /// The stored checkpoint.
    checkpoint: Option<Vec<u8>>,
    /// A failed write may have left bytes after `stored_bytes`: cut them before the next.
    dirty: bool,
    /// The encoded batch (kept to reuse its allocation).
    buf: Vec<u8>,
    /// `changes.jsonl.lock`, `flock`ed while this sink has the files (released by the kernel
    /// when the process dies).
    lock: Option<File>,
    /// Test-only switches (the crash tests' canaries).
    #[cfg(feature = "testing")]
    testing: Testing,
}

/// Test-only switches of the file sink.
#[cfg(feature = "testing")]
#[derive(Debug, Default)]
struct Testing {
    /// Do not cut the live file back to the stored length on open (the protection off).
    no_cut: bool,
    /// The next write syncs its data, then fails as if the process died before storing the
    /// position.
    crash_before_position: bool,
}

fn io_error(what: &str, path: &Path, e: &std::io::Error) -> SinkError {
    let m = format!("{what} {}: {e}", path.display());
    match e.kind() {
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => SinkError::Hold(
            format!("{m}; free space on its disk (the sink goes on where it stopped)"),
        ),
        std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem => {
            SinkError::Hold(format!("{m}; give this process write access to it"))
        }
        _ => SinkError::Retry(m),
    }
}

/// Refuses a `path` that names a directory: one ending in `/` (or `/.`), or one that is a
/// directory now. The sink's other files are named by appending to `path` (`PATH.lock`,
/// `PATH.position`), which for a directory would put `DIR.lock` beside it or `DIR/.lock`
/// inside it, and the directory would then be refused as a file this sink did not write.
fn refuse_directory(path: &Path) -> Result<(), SinkError> {
    let raw = path.as_os_str().as_encoded_bytes();
    let lexical = raw.ends_with(b"/") || raw.ends_with(b"/.");
    if lexical || path.is_dir() {
        let shown = path.display().to_string();
        let dir = shown
            .strip_suffix("/.")
            .unwrap_or(&shown)
            .trim_end_matches('/');
        return Err(SinkError::Fatal(format!(
            "{} is a directory; give a file path such as {dir}/changes.jsonl",
            path.display()
        )));
    }
    Ok(())
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

impl FileSink {
    /// A sink writing to `cfg.path` for pipeline `pipeline`; touches no file until
    /// [`Sink::open`]. A path that names no file, or names a directory, is refused here, so
    /// that a runner checking its sinks before it starts any refuses it too.
    pub fn new(cfg: FileConfig, pipeline: &str) -> Result<FileSink, SinkError> {
        if cfg.path.as_os_str().is_empty() || cfg.path.file_name().is_none() {
            return Err(SinkError::Fatal(format!(
                "path {:?} names no file; give a file path such as changes.jsonl",
                cfg.path
            )));
        }
        refuse_directory(&cfg.path)?;
        Ok(FileSink {
            cfg,
            pipeline: pipeline.to_string(),
            file: None,
            segment: 0,
            stored_bytes: 0,
            checkpoint: None,
            dirty: false,
            buf: Vec::new(),
            lock: None,
            #[cfg(feature = "testing")]
            testing: Testing::default(),
        })
    }

    /// Takes the files for this sink (`PATH.lock`, [`crate::sink::lock_beside`]): a second
    /// connector writing the same file would cut back and interleave the first one's lines.
    fn lock_files(&mut self) -> Result<(), SinkError> {
        if self.lock.is_none() {
            let lock = position::suffixed(&self.cfg.path, "lock");
            let what = self.cfg.path.display().to_string();
            self.lock = Some(crate::sink::lock_beside(&lock, &what)?);
        }
        Ok(())
    }

    /// Test only: open without cutting the live file back to the stored length (the
    /// protection against duplicates after a crash, off).
    #[cfg(feature = "testing")]
    pub fn without_cut_on_open(mut self) -> Self {
        self.testing.no_cut = true;
        self
    }

    /// Test only: the next write appends and syncs its data, then fails with `Fatal` without
    /// storing its position, as a process killed at that point would leave the files.
    #[cfg(feature = "testing")]
    pub fn crash_before_next_position(&mut self) {
        self.testing.crash_before_position = true;
    }

    /// The live file's path.
    pub fn path(&self) -> &Path {
        &self.cfg.path
    }

    fn position_path(&self) -> PathBuf {
        position::path_of(&self.cfg.path)
    }

    fn rotated(&self, n: u64) -> PathBuf {
        position::suffixed(&self.cfg.path, &n.to_string())
    }

    fn store_position(
        &self,
        bytes: u64,
        segment: u64,
        checkpoint: Option<&[u8]>,
    ) -> Result<(), SinkError> {
        let pos = FilePosition {
            pipeline: self.pipeline.clone(),
            segment,
            bytes,
            checkpoint: checkpoint.map(<[u8]>::to_vec),
        };
        let path = self.position_path();
        position::store(&path, &pos).map_err(|e| io_error("store the position in", &path, &e))
    }

    fn open_sync(&mut self) -> Result<Option<Vec<u8>>, SinkError> {
        let path = self.cfg.path.clone();
        let fatal = |m: String| SinkError::Fatal(m);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
            && !dir.is_dir()
        {
            return Err(fatal(format!(
                "directory {} does not exist; create it first",
                dir.display()
            )));
        }
        // Again here: the directory may have appeared since `new`. Before the lock, which
        // would be created beside (or inside) it.
        refuse_directory(&path)?;
        self.lock_files()?;
        let pos_path = self.position_path();
        let stored = position::load(&pos_path).map_err(|e| io_error("read", &pos_path, &e))?;
        let pos = match stored {
            Some(bytes) => FilePosition::decode(&bytes).map_err(|why| {
                fatal(format!(
                    "position file {} is damaged ({why}); to start over, move \
                     {} and its rotated files away together with it",
                    pos_path.display(),
                    path.display()
                ))
            })?,
            None => {
                // A new sink. Refuse to take over files it did not write.
                for p in [path.clone(), self.rotated(1)] {
                    if p.exists() {
                        return Err(fatal(format!(
                            "{} exists but {} does not, so it was not written by \
                             this sink (or its position was deleted); move it away or choose \
                             another file",
                            p.display(),
                            pos_path.display()
                        )));
                    }
                }
                // The position goes first: from now on, the files are this sink's.
                let fresh = FilePosition {
                    pipeline: self.pipeline.clone(),
                    segment: 0,
                    bytes: 0,
                    checkpoint: None,
                };
                position::store(&pos_path, &fresh)
                    .and_then(|()| sync_dir(&pos_path))
                    .map_err(|e| io_error("create", &pos_path, &e))?;
                fresh
            }
        };
        // The stored checkpoint is its pipeline's: another pipeline resuming from it would
        // skip what that one filtered out or had not reached. Checked before anything is
        // cut or renamed, and the lock let go, so the owner can still run.
        if pos.pipeline != self.pipeline {
            self.lock = None;
            return Err(fatal(format!(
                "{} was written by pipeline `{}`, not by this pipeline `{}`: its position is \
                 that pipeline's, and resuming from it could skip changes; nothing was \
                 touched. Give pipeline `{}` its own file; or, if this is pipeline `{}` \
                 renamed, name it `{}` again; or, to have `{}` write here from its `from`, \
                 move {}, its rotated files and {} away first",
                pos_path.display(),
                pos.pipeline,
                self.pipeline,
                self.pipeline,
                pos.pipeline,
                pos.pipeline,
                self.pipeline,
                path.display(),
                pos_path.display(),
            )));
        }
        // A crash after a rotation's rename, before its position: undo the rename.
        let next = self.rotated(pos.segment + 1);
        if next.exists() {
            match std::fs::metadata(&path) {
                Ok(m) if m.len() > 0 => {
                    return Err(fatal(format!(
                        "both {} and {} hold data, but the position ({}) names \
                         neither as rotated; the files were changed by something else",
                        next.display(),
                        path.display(),
                        pos_path.display()
                    )));
                }
                Ok(_) => std::fs::remove_file(&path).map_err(|e| io_error("remove", &path, &e))?,
                Err(_) => {}
            }
            std::fs::rename(&next, &path)
                .and_then(|()| sync_dir(&path))
                .map_err(|e| io_error("rename back", &next, &e))?;
            tracing::info!(file = %path.display(), "undid a rotation the position did not record");
        }
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| io_error("open", &path, &e))?;
        let len = file
            .metadata()
            .map_err(|e| io_error("read the length of", &path, &e))?
            .len();
        if len < pos.bytes {
            return Err(fatal(format!(
                "{} holds {len} bytes but its position ({}) says {} were stored: \
                 the file was cut or replaced; restore it, or move it, its rotated files and \
                 the position away to start over",
                path.display(),
                pos_path.display(),
                pos.bytes
            )));
        }
        #[cfg(feature = "testing")]
        let cut = !self.testing.no_cut;
        #[cfg(not(feature = "testing"))]
        let cut = true;
        if len > pos.bytes && cut {
            tracing::info!(
                file = %path.display(),
                bytes = len - pos.bytes,
                "cutting what the last run wrote after its stored position"
            );
            file.set_len(pos.bytes)
                .and_then(|()| file.sync_all())
                .map_err(|e| io_error("cut", &path, &e))?;
        }
        let end = if cut { pos.bytes } else { len };
        file.seek(SeekFrom::Start(end))
            .map_err(|e| io_error("seek in", &path, &e))?;
        sync_dir(&path).map_err(|e| io_error("sync the directory of", &path, &e))?;
        self.file = Some(file);
        self.segment = pos.segment;
        self.stored_bytes = end;
        self.checkpoint = pos.checkpoint.clone();
        self.dirty = false;
        Ok(pos.checkpoint)
    }

    /// Renames the live file to the next rotated number and starts a new one. Until the
    /// position records the rotation, `.N+1` is the live file under another name: if that
    /// record fails (a full disk holds the sink right here), the rename is undone before the
    /// error is returned, so that no rotated file an operator may compress, ship or delete
    /// meanwhile holds what the sink still counts as live. Only a crash in between leaves
    /// it, and open undoes it.
    fn rotate(&mut self) -> Result<(), SinkError> {
        let path = self.cfg.path.clone();
        let next = self.segment + 1;
        let to = self.rotated(next);
        self.file = None;
        std::fs::rename(&path, &to).map_err(|e| io_error("rotate", &path, &e))?;
        let recorded = sync_dir(&path)
            .map_err(|e| io_error("rotate", &path, &e))
            .and_then(|()| self.store_position(0, next, self.checkpoint.as_deref()));
        if let Err(e) = recorded {
            return Err(
                match std::fs::rename(&to, &path).and_then(|()| sync_dir(&path)) {
                    Ok(()) => e,
                    // Open undoes it (the position does not name `.N+1`), before it writes.
                    Err(back) => {
                        let m = format!(
                            "{}; renaming {} back to {} failed too ({back}): it is still the live \
                         file, and the next attempt renames it back first, so leave it where \
                         it is",
                            e.message(),
                            to.display(),
                            path.display(),
                        );
                        match e {
                            SinkError::Retry(_) => SinkError::Retry(m),
                            SinkError::Hold(_) => SinkError::Hold(m),
                            SinkError::Fatal(_) => SinkError::Fatal(m),
                        }
                    }
                },
            );
        }
        self.segment = next;
        self.stored_bytes = 0;
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| io_error("create", &path, &e))?;
        sync_dir(&path).map_err(|e| io_error("sync the directory of", &path, &e))?;
        self.file = Some(file);
        tracing::info!(file = %to.display(), "rotated");
        Ok(())
    }

    fn write_sync(&mut self, batch: &Batch) -> Result<(), SinkError> {
        let path = self.cfg.path.clone();
        if self.file.is_none() {
            // A failed rotation left no live file: open again (which also repairs it).
            self.open_sync()?;
        }
        if self.dirty {
            let file = self
                .file
                .as_mut()
                .ok_or_else(|| SinkError::Fatal("written before it was opened".into()))?;
            file.set_len(self.stored_bytes)
                .and_then(|()| file.seek(SeekFrom::Start(self.stored_bytes)).map(drop))
                .map_err(|e| io_error("cut a failed write from", &path, &e))?;
            self.dirty = false;
        }
        if self.cfg.rotate_bytes > 0 && self.stored_bytes >= self.cfg.rotate_bytes {
            self.rotate()?;
        }
        self.buf.clear();
        for item in &batch.items {
            crate::envelope::write_lines(item, batch.source, &mut self.buf);
        }
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| SinkError::Fatal("written before it was opened".into()))?;
        if !self.buf.is_empty() {
            self.dirty = true;
            file.write_all(&self.buf)
                .map_err(|e| io_error("append to", &path, &e))?;
            // After a failed fsync the kernel may have dropped the data and forgotten the
            // error: retrying it could report success over lost bytes. Stop; a restart cuts
            // the file back to the stored position and writes them again.
            file.sync_data().map_err(|e| {
                SinkError::Fatal(format!(
                    "fsync of {} failed: {e}; restart the sink (it cuts the file \
                     back to its stored position and writes again from there)",
                    path.display()
                ))
            })?;
        }
        #[cfg(feature = "testing")]
        if std::mem::take(&mut self.testing.crash_before_position) {
            return Err(SinkError::Fatal(
                "simulated crash before the position".into(),
            ));
        }
        let bytes = self.stored_bytes + self.buf.len() as u64;
        self.store_position(bytes, self.segment, Some(&batch.checkpoint))?;
        self.stored_bytes = bytes;
        self.checkpoint = Some(batch.checkpoint.clone());
        self.dirty = false;
        Ok(())
    }
}

/// Runs file system calls (writes, fsyncs: short, but blocking) without stalling the other
/// tasks of a multi-threaded runtime's worker.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

impl Sink for FileSink {
    fn describe(&self) -> String {
        format!("file {}", self.cfg.path.display())
    }

    fn open(&mut self) -> SinkFuture<'_, Result<Option<Vec<u8>>, SinkError>> {
        // Local file system calls: short, and a pipeline owns its task.
        Box::pin(async move { blocking(|| self.open_sync()) })
    }

    fn write<'a>(&'a mut self, batch: &'a Batch) -> SinkFuture<'a, Result<(), SinkError>> {
        Box::pin(async move { blocking(|| self.write_sync(batch)) })
    }
}

#[cfg(test)]
mod tests;
