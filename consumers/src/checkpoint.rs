//! Where a consumer is, kept across its own restarts: the [`Checkpoint`] trait and its file
//! and in-memory stores.
//!
//! Owns: storing and loading a [`Position`] (the file format, written atomically). Must never
//! connect to a node or decide where a tail resumes: that is [`crate::position`] and the tail.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tideline_wal::Epoch;
use uuid::Uuid;

use crate::position::Position;

// The checkpoint file format belongs here, beside the checkpoints that store it.
impl Position {
    /// Reads a checkpoint file's bytes (what [`FileCheckpoint`] stores; pure, for tests and
    /// fuzzing). The error says what is wrong with them.
    pub fn parse(bytes: &[u8]) -> Result<Position, String> {
        let f: PositionFile = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        Ok(Position {
            server_uuid: Uuid::try_parse(&f.server_uuid).map_err(|e| e.to_string())?,
            offset: f.offset,
            gtids: f.gtids.parse().map_err(|e| format!("{e}"))?,
            epoch: f.epoch.map(Epoch::new),
        })
    }

    /// The checkpoint file's bytes for this position; [`Position::parse`] reads them back.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&PositionFile {
            server_uuid: self.server_uuid.to_string(),
            offset: self.offset,
            gtids: self.gtids.to_string(),
            epoch: self.epoch.map(Epoch::get),
        })
        .expect("a struct of strings and integers always serialises to JSON")
    }
}

#[derive(Serialize, Deserialize)]
struct PositionFile {
    server_uuid: String,
    offset: u64,
    gtids: String,
    /// Absent in files written before history epochs.
    #[serde(default)]
    epoch: Option<u64>,
}

/// Why a checkpoint could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// File I/O failed.
    #[error("checkpoint {path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file does not hold a checkpoint.
    #[error("checkpoint {path} is damaged ({reason}); remove it to start over from --from")]
    Corrupt {
        /// File.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Stores a consumer's position.
pub trait Checkpoint: Send {
    /// The saved position, if any.
    fn load(&self) -> Result<Option<Position>, CheckpointError>;
    /// Saves `pos` durably.
    fn save(&mut self, pos: &Position) -> Result<(), CheckpointError>;
}

/// A checkpoint in a JSON file, replaced atomically (temporary file `PATH.tmp`, fsync, rename,
/// fsync of the directory).
#[derive(Debug, Clone)]
pub struct FileCheckpoint {
    path: PathBuf,
}

impl FileCheckpoint {
    /// A checkpoint at `path` (created on the first save).
    pub fn new(path: impl AsRef<Path>) -> Self {
        FileCheckpoint {
            path: path.as_ref().to_path_buf(),
        }
    }
}

impl Checkpoint for FileCheckpoint {
    fn load(&self) -> Result<Option<Position>, CheckpointError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(CheckpointError::Io {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        Position::parse(&bytes)
            .map(Some)
            .map_err(|reason| CheckpointError::Corrupt {
                path: self.path.clone(),
                reason,
            })
    }

    fn save(&mut self, pos: &Position) -> Result<(), CheckpointError> {
        use std::io::Write;
        let io = |source| CheckpointError::Io {
            path: self.path.clone(),
            source,
        };
        let body = pos.to_bytes();
        let tmp = temp_path_of(&self.path);
        {
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            f.write_all(&body).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, &self.path).map_err(io)?;
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        Ok(())
    }
}

/// Where [`FileCheckpoint::save`] writes before the rename: `.tmp` appended to the whole file
/// name (`orders.json` → `orders.json.tmp`), never replacing its extension: so it is never the
/// checkpoint itself (`cp.tmp`), and two checkpoints in one directory (`orders.json`,
/// `orders.pos`) never share it.
fn temp_path_of(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

/// A checkpoint in memory, shared by clones (for tests and for applications that keep the
/// position in their own database).
#[derive(Debug, Clone, Default)]
pub struct MemoryCheckpoint {
    pos: Arc<Mutex<Option<Position>>>,
}

impl Checkpoint for MemoryCheckpoint {
    fn load(&self) -> Result<Option<Position>, CheckpointError> {
        Ok(self.pos.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }
    fn save(&mut self, pos: &Position) -> Result<(), CheckpointError> {
        *self.pos.lock().unwrap_or_else(|p| p.into_inner()) = Some(pos.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::position::TailStart;

    #[test]
    fn file_checkpoint_round_trips_and_reports_damage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cp.json");
        let mut cp = FileCheckpoint::new(&path);
        assert_eq!(cp.load().unwrap(), None);
        let uuid = Uuid::from_bytes([9; 16]);
        let pos = Position {
            server_uuid: uuid,
            offset: 7,
            gtids: format!("{uuid}:1-7").parse().unwrap(),
            epoch: Some(Epoch::new(3)),
        };
        cp.save(&pos).unwrap();
        assert_eq!(cp.load().unwrap(), Some(pos.clone()));
        // A file written before history epochs loads with none, and resumes by GTID set.
        std::fs::write(
            &path,
            format!(r#"{{"server_uuid":"{uuid}","offset":7,"gtids":"{uuid}:1-7"}}"#),
        )
        .unwrap();
        let old = cp.load().unwrap().unwrap();
        assert_eq!(old.epoch, None);
        assert_eq!(old.resume_on(uuid), TailStart::Gtid(pos.gtids.clone()));
        std::fs::write(&path, b"{not json").unwrap();
        let e = cp.load().unwrap_err();
        assert!(e.to_string().contains("remove it"), "{e}");
    }

    fn position(offset: u64) -> Position {
        let uuid = Uuid::from_bytes([9; 16]);
        Position {
            server_uuid: uuid,
            offset,
            gtids: format!("{uuid}:1-{offset}").parse().unwrap(),
            epoch: Some(Epoch::new(1)),
        }
    }

    /// A save replaces the file (a new one renamed over it), whatever the checkpoint is
    /// called: a save that rewrote it in place would leave it empty or half-written if the
    /// process died during the write. A hard link to the old file shows which happened: a
    /// replace leaves the old bytes under it. `cp.tmp` was saved in place (its temporary
    /// name was itself).
    #[test]
    fn a_save_replaces_the_file_never_rewrites_it_in_place() {
        for name in ["cp.json", "cp.tmp", "cp", "cp.json.tmp"] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(name);
            let mut cp = FileCheckpoint::new(&path);
            cp.save(&position(1)).unwrap();
            let witness = dir.path().join(format!("{name}.witness"));
            std::fs::hard_link(&path, &witness).unwrap();
            cp.save(&position(2)).unwrap();
            assert_eq!(cp.load().unwrap(), Some(position(2)), "{name}");
            assert_eq!(
                Position::parse(&std::fs::read(&witness).unwrap()).unwrap(),
                position(1),
                "{name}: the save rewrote the checkpoint in place"
            );
        }
    }

    /// Checkpoints in one directory never share a temporary file (two consumers saving at
    /// once would rename each other's bytes into place), and none writes to itself.
    #[test]
    fn checkpoints_in_one_directory_have_their_own_temporary_files() {
        let names = [
            "orders.json",
            "orders.pos",
            "orders",
            "orders.tmp",
            "o.rders",
        ];
        let dir = Path::new("/d");
        let temps: Vec<PathBuf> = names.iter().map(|n| temp_path_of(&dir.join(n))).collect();
        for (i, (name, temp)) in names.iter().zip(&temps).enumerate() {
            assert_ne!(temp, &dir.join(name), "{name} is its own temporary file");
            for (other, other_temp) in names.iter().zip(&temps).skip(i + 1) {
                assert_ne!(
                    temp,
                    other_temp,
                    "{name} and {other} share the temporary file {}",
                    temp.display()
                );
            }
        }
    }
}
