//! The position file kept beside the data (`changes.jsonl.position`): which rotated segment
//! is current, how many bytes of the live file it covers, and the pipeline's checkpoint.
//!
//! persisted: changes must stay backward compatible. One JSON object:
//!
//! ```json
//! {"version":1,"pipeline":"file","segment":3,"bytes":104857,"checkpoint":"{\"tail\":{...}}"}
//! ```
//!
//! - `segment`: how many rotated files (`changes.jsonl.1` .. `changes.jsonl.N`) precede the
//!   live file; `bytes`: the length of the live file that holds stored envelopes (anything
//!   after it is a torn or unstored tail, cut on open).
//! - `pipeline`: the name of the pipeline whose checkpoint this is; the sink of any other
//!   pipeline refuses the files rather than resume from it.
//! - `checkpoint` (or `checkpoint_b64` when not UTF-8): the pipeline's checkpoint, `null`
//!   before the first batch.
//!
//! Written by replacing: a temporary file is written and synced, then renamed over the old
//! one, so a reader finds the old or the new position whole, never a mix. Whichever survives
//! a crash covers only data that was synced before it was written.
//!
//! Owns: the encoding and the atomic replace. Must never: be written before the data it
//! covers is synced (the sink's job, which calls [`store`] only after `sync_data`).

use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde_json::{Map, Value};

/// The version this code writes and reads.
const VERSION: u64 = 1;

/// What a position file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FilePosition {
    pub(crate) pipeline: String,
    pub(crate) segment: u64,
    pub(crate) bytes: u64,
    pub(crate) checkpoint: Option<Vec<u8>>,
}

/// `changes.jsonl` → `changes.jsonl.position`.
pub(crate) fn path_of(data: &Path) -> PathBuf {
    suffixed(data, "position")
}

/// `changes.jsonl` + `3` → `changes.jsonl.3`.
pub(crate) fn suffixed(data: &Path, suffix: &str) -> PathBuf {
    let mut s = data.as_os_str().to_owned();
    s.push(".");
    s.push(suffix);
    PathBuf::from(s)
}

impl FilePosition {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut obj = Map::new();
        obj.insert("version".into(), VERSION.into());
        obj.insert("pipeline".into(), self.pipeline.clone().into());
        obj.insert("segment".into(), self.segment.into());
        obj.insert("bytes".into(), self.bytes.into());
        match &self.checkpoint {
            None => {
                obj.insert("checkpoint".into(), Value::Null);
            }
            Some(c) => crate::envelope::put_bytes(&mut obj, "checkpoint", c),
        }
        let mut out = Value::Object(obj).to_string().into_bytes();
        out.push(b'\n');
        out
    }

    /// Reads what [`FilePosition::encode`] wrote; the error says what is wrong.
    pub(crate) fn decode(bytes: &[u8]) -> Result<FilePosition, String> {
        let v: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
        let num = |k: &str| {
            v.get(k)
                .and_then(Value::as_u64)
                .ok_or_else(|| format!("no number `{k}`"))
        };
        let version = num("version")?;
        if version != VERSION {
            return Err(format!(
                "version {version}, this build reads version {VERSION}"
            ));
        }
        let checkpoint = match (v.get("checkpoint"), v.get("checkpoint_b64")) {
            (Some(Value::String(s)), _) => Some(s.as_bytes().to_vec()),
            (_, Some(Value::String(s))) => Some(
                base64::engine::general_purpose::STANDARD
                    .decode(s)
                    .map_err(|e| format!("checkpoint_b64 is not base64: {e}"))?,
            ),
            (Some(Value::Null), None) => None,
            _ => return Err("no `checkpoint`".into()),
        };
        Ok(FilePosition {
            pipeline: v
                .get("pipeline")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            segment: num("segment")?,
            bytes: num("bytes")?,
            checkpoint,
        })
    }
}

/// Replaces the position file at `path` with `pos` (write a temporary file, sync it, rename).
pub(crate) fn store(path: &Path, pos: &FilePosition) -> std::io::Result<()> {
    let tmp = suffixed(path, "tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&pos.encode())?;
    f.sync_data()?;
    std::fs::rename(&tmp, path)
}

/// Reads the position file at `path`; `Ok(None)` when there is none.
pub(crate) fn load(path: &Path) -> std::io::Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip_and_damage_is_named() {
        for checkpoint in [None, Some(b"{\"tail\":1}".to_vec()), Some(vec![0xff, 1])] {
            let p = FilePosition {
                pipeline: "p".into(),
                segment: 3,
                bytes: 99,
                checkpoint,
            };
            assert_eq!(FilePosition::decode(&p.encode()).unwrap(), p);
        }
        assert!(FilePosition::decode(b"{").unwrap_err().contains("not JSON"));
        let e = FilePosition::decode(br#"{"version":9,"segment":0,"bytes":0,"checkpoint":null}"#)
            .unwrap_err();
        assert!(e.contains("version 9"), "{e}");
        assert!(
            FilePosition::decode(br#"{"version":1,"segment":0,"checkpoint":null}"#)
                .unwrap_err()
                .contains("bytes")
        );
    }

    #[test]
    fn suffixes_append_to_the_whole_name() {
        assert_eq!(
            suffixed(Path::new("/d/changes.jsonl"), "2"),
            PathBuf::from("/d/changes.jsonl.2")
        );
        assert_eq!(path_of(Path::new("out")), PathBuf::from("out.position"));
    }
}
