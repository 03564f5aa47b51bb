//! Chunked bootstrap merged with the live tail: the receiving end, with a position to persist.
//!
//! [`Bootstrap`] turns a node's bootstrap stream into [`BootstrapStep`]s to apply in order:
//! live records reduced to their ops that fall in ranges already copied (each keeping its
//! GTID, offset and time), the trees and indexes to declare before a chunk, chunks that
//! replace their key range, and the final handover. After each step,
//! [`Bootstrap::progress`] is the position to store atomically with what the step wrote;
//! passing it back to [`Bootstrap::start`] resumes from the last finished step, so a killed
//! consumer re-receives at most the step in flight.
//!
//! The merge rule and why it is safe are in `tideline_stream::proto::bootstrap`.

use std::time::Instant;

use tideline_stream::proto::{
    BootstrapPosition, BootstrapResume, Chunk, CopyRecord, Cursor, ProtoError,
};
use tideline_stream::{
    BootstrapEvent, BootstrapStream, ChunkAcker, Client, ClientError, ErrorCode,
};
use tideline_wal::{GtidSet, Op, PackedEntries};
use uuid::Uuid;

/// Where a bootstrap stands, with counters for progress reports. Store it (as JSON, see
/// [`BootstrapProgress::to_json`]) atomically with what each step wrote.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BootstrapProgress {
    /// The node copied from (live offsets are its offsets).
    pub server_uuid: Uuid,
    /// Every live record up to this offset of that node was handled.
    pub after_offset: u64,
    /// The node's history epoch the copy is taken in (its offsets are that history's).
    /// `None` in progress stored before epochs were recorded: such a copy starts again.
    #[serde(default)]
    pub epoch: Option<u64>,
    /// Tree being copied ("" before the first).
    pub tree: String,
    /// First key of `tree` not yet copied, hex.
    pub key_hex: String,
    /// `tree` is copied completely.
    pub tree_done: bool,
    /// Trees copied completely.
    pub trees_done: u64,
    /// Chunks applied.
    pub chunks: u64,
    /// Keys copied by chunks.
    pub keys: u64,
    /// Bytes of keys and values copied by chunks.
    pub bytes: u64,
    /// The node's estimate of keys in all trees when the bootstrap began.
    pub keys_estimate: u64,
    /// The node's estimate of bytes in all trees when the bootstrap began.
    pub bytes_estimate: u64,
    /// Live records received.
    pub records: u64,
    /// Times this bootstrap was resumed after an interruption.
    pub resumes: u64,
}

impl BootstrapProgress {
    /// The persisted form.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads the persisted form; `None` (start again) if it does not decode.
    pub fn from_json(bytes: &[u8]) -> Option<BootstrapProgress> {
        let p: BootstrapProgress = serde_json::from_slice(bytes).ok()?;
        hex_decode(&p.key_hex)?;
        Some(p)
    }

    fn position(&self) -> Option<BootstrapPosition> {
        Some(BootstrapPosition {
            after_offset: self.after_offset,
            cursor: Cursor {
                tree: self.tree.clone(),
                key: hex_decode(&self.key_hex)?,
                tree_done: self.tree_done,
            },
        })
    }

    fn set_position(&mut self, pos: &BootstrapPosition) {
        self.after_offset = pos.after_offset;
        self.tree.clone_from(&pos.cursor.tree);
        self.key_hex = hex_encode(&pos.cursor.key);
        self.tree_done = pos.cursor.tree_done;
    }

    /// Estimated bytes of the whole copy: the node's figure if it gave one, else its key
    /// estimate times the average entry size copied so far (0 before the first chunk).
    pub fn bytes_estimate_now(&self) -> u64 {
        if self.bytes_estimate > 0 || self.keys == 0 {
            return self.bytes_estimate.max(self.bytes);
        }
        let per_key = self.bytes as f64 / self.keys as f64;
        ((self.keys_estimate as f64 * per_key) as u64).max(self.bytes)
    }

    /// Share of the copy done, 0.0-1.0, from the node's estimates (which may be off).
    pub fn fraction(&self) -> f64 {
        if self.keys_estimate > 0 {
            return (self.keys as f64 / self.keys_estimate as f64).min(1.0);
        }
        match self.bytes_estimate_now() {
            0 => 0.0,
            total => (self.bytes as f64 / total as f64).min(1.0),
        }
    }
}

/// One thing to apply, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootstrapStep {
    /// Live records of the node received during the copy, each reduced to its ops on ranges
    /// already copied (possibly none: the position still moved). Apply their ops in order;
    /// their GTIDs are not executed here (the copy's end GTID set holds them).
    Records(Vec<CopyRecord>),
    /// Ops that belong to no record: the `create_tree` and `create_index` that come before each
    /// chunk of a tree with indexes, always followed by that chunk. Store them with the
    /// chunk's first part, in one step: a tree's first chunk (`from` empty) begins its copy,
    /// and what a consumer holds of the tree then (left by an attempt cut short, possibly
    /// from another state of the node) is to be replaced by what this step defines. The
    /// position does not move.
    Ops(Vec<Op>),
    /// Replace `[from, to)` of `tree` (`to: None` = to its end) with `entries`, creating the
    /// tree with `merge_operator` if it does not exist. One part of a chunk.
    Chunk {
        /// Tree.
        tree: String,
        /// Its merge operator.
        merge_operator: Option<String>,
        /// First key of the range.
        from: Vec<u8>,
        /// End of the range, exclusive.
        to: Option<Vec<u8>>,
        /// Ascending entries, all inside the range, packed as they came.
        entries: PackedEntries,
        /// This part ends its chunk: once it is stored, report the chunk stored (see
        /// [`Bootstrap::take_acker`]). A chunk travels in parts so that one part is stored
        /// while the next arrives; the progress moves only with the last.
        completes_chunk: bool,
    },
    /// The copy equals the node's state at `offset`, where it had executed `gtid_executed`.
    Done {
        /// The node's handover offset.
        offset: u64,
        /// GTIDs the copy contains.
        gtid_executed: GtidSet,
    },
}

/// Why a bootstrap stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BootstrapError {
    /// The stored position cannot be resumed here (another node, or its log moved past it),
    /// or the node ended the copy because it cannot go on with it (its history was replaced:
    /// it was bootstrapped itself): wipe what was copied and start from scratch.
    #[error("the bootstrap cannot resume: {0}; it must start again from scratch")]
    Restart(String),
    /// The connection failed; retry with the same progress if [`ClientError::is_retryable`].
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The node broke the protocol.
    #[error("the node broke the bootstrap protocol: {0}")]
    Protocol(#[from] ProtoError),
}

/// A bootstrap in progress on one connection.
#[derive(Debug)]
pub struct Bootstrap {
    stream: BootstrapStream,
    pos: BootstrapPosition,
    progress: BootstrapProgress,
    done: bool,
    started: Instant,
    bytes_at_start: u64,
    /// Keys and bytes of the parts of the chunk in progress.
    part_keys: u64,
    part_bytes: u64,
    /// The tree whose definitions came last: its chunk must come next.
    defined: Option<String>,
}

impl Bootstrap {
    /// Starts a bootstrap from `client`'s node, or resumes `resume` (a progress stored after an
    /// earlier step). `chunk_bytes` is the chunk size asked for.
    pub async fn start(
        client: &Client,
        resume: Option<BootstrapProgress>,
        chunk_bytes: u64,
    ) -> Result<Bootstrap, BootstrapError> {
        let resume = match resume {
            Some(p) if p.server_uuid != client.server_uuid() => {
                return Err(BootstrapError::Restart(format!(
                    "it was begun from node {}, and {} is node {}",
                    p.server_uuid,
                    client.addr(),
                    client.server_uuid()
                )));
            }
            Some(p) => {
                let pos = p.position().ok_or_else(|| {
                    BootstrapError::Restart("the stored position does not decode".into())
                })?;
                if p.epoch.is_none() {
                    return Err(BootstrapError::Restart(
                        "the stored progress names no history epoch of the node".into(),
                    ));
                }
                Some((p, pos))
            }
            None => None,
        };
        let wire_resume = resume.as_ref().map(|(p, pos)| BootstrapResume {
            server_uuid: *p.server_uuid.as_bytes(),
            after_offset: pos.after_offset,
            cursor: pos.cursor.clone(),
            epoch: p.epoch.unwrap_or_default(),
        });
        let stream = match client.bootstrap(wire_resume, chunk_bytes).await {
            Ok(s) => s,
            Err(ClientError::Server {
                code: ErrorCode::PositionUnavailable,
                message,
            }) => return Err(BootstrapError::Restart(message)),
            Err(e) => return Err(e.into()),
        };
        let (progress, pos) = match resume {
            Some((mut p, pos)) => {
                p.resumes += 1;
                (p, pos)
            }
            None => {
                let pos = BootstrapPosition {
                    after_offset: stream.after_offset,
                    cursor: Cursor::default(),
                };
                let mut p = BootstrapProgress {
                    server_uuid: stream.server_uuid,
                    after_offset: 0,
                    epoch: Some(stream.epoch.get()),
                    tree: String::new(),
                    key_hex: String::new(),
                    tree_done: false,
                    trees_done: 0,
                    chunks: 0,
                    keys: 0,
                    bytes: 0,
                    keys_estimate: stream.keys_estimate,
                    bytes_estimate: stream.bytes_estimate,
                    records: 0,
                    resumes: 0,
                };
                p.set_position(&pos);
                (p, pos)
            }
        };
        if progress.epoch != Some(stream.epoch.get()) {
            return Err(ProtoError::Violation(format!(
                "asked to resume in history epoch {:?}, the node answers in epoch {}",
                progress.epoch, stream.epoch
            ))
            .into());
        }
        if stream.after_offset != pos.after_offset {
            return Err(ProtoError::Violation(format!(
                "asked to resume after offset {}, the node starts after {}",
                pos.after_offset, stream.after_offset
            ))
            .into());
        }
        Ok(Bootstrap {
            bytes_at_start: progress.bytes,
            stream,
            pos,
            progress,
            done: false,
            part_keys: 0,
            part_bytes: 0,
            defined: None,
            started: Instant::now(),
        })
    }

    /// The half that reports stored chunks to the node (see [`ChunkAcker`]): after storing
    /// the n-th chunk of this connection, call `stored(n)`; the node sends the next chunk only
    /// then (or, with `serve --bootstrap-chunks-in-flight 2`, once the one before is stored),
    /// so a consumer killed at any moment loses at most one chunk (two). Taken once.
    pub fn take_acker(&mut self) -> Option<ChunkAcker> {
        self.stream.take_acker()
    }

    /// The position to store with the last step returned.
    pub fn progress(&self) -> &BootstrapProgress {
        &self.progress
    }

    /// Bytes per second copied by chunks on this connection.
    pub fn rate(&self) -> f64 {
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        (self.progress.bytes - self.bytes_at_start) as f64 / secs
    }

    /// The next step; `None` after [`BootstrapStep::Done`].
    pub async fn next(&mut self) -> Result<Option<BootstrapStep>, BootstrapError> {
        if self.done {
            return Ok(None);
        }
        let event = match self.stream.next().await {
            Ok(Some(event)) => event,
            Ok(None) => {
                return Err(ClientError::Unexpected(
                    "the node ended the bootstrap stream early".into(),
                )
                .into());
            }
            // The node cannot go on with this copy (its history was replaced, or its log can
            // no longer be read from the copy's position): no resume of it will be served.
            Err(ClientError::Server {
                code: ErrorCode::PositionUnavailable,
                message,
            }) => return Err(BootstrapError::Restart(message)),
            Err(e) => return Err(e.into()),
        };
        let defined = self.defined.take();
        match (&defined, &event) {
            (None, _) => {}
            (Some(t), BootstrapEvent::Chunk(c)) if c.tree == *t => {}
            (Some(t), _) => {
                return Err(ProtoError::Violation(format!(
                    "the definitions of tree `{t}` are not followed by its chunk"
                ))
                .into());
            }
        }
        let step = match event {
            BootstrapEvent::Records(txns) => {
                let n = txns.len() as u64;
                let records = self.pos.on_records(txns)?;
                self.progress.records += n;
                BootstrapStep::Records(records)
            }
            BootstrapEvent::Indexes {
                tree,
                merge_operator,
                indexes,
            } => {
                // The tree first (its chunk follows), then its indexes. The position does not
                // move.
                self.defined = Some(tree.clone());
                let mut ops = vec![Op::CreateTree {
                    tree: tree.clone(),
                    merge_operator,
                }];
                ops.extend(indexes.into_iter().map(|i| Op::CreateIndex {
                    tree: tree.clone(),
                    name: i.name,
                    paths: i.paths,
                    unique: i.unique,
                }));
                BootstrapStep::Ops(ops)
            }
            BootstrapEvent::Chunk(Chunk {
                tree,
                merge_operator,
                from,
                to,
                entries,
                offset,
                last,
            }) => {
                let entries =
                    tideline_stream::proto::checked_entries(entries, &from, to.as_deref())?;
                self.pos
                    .on_chunk(&tree, &from, to.as_deref(), offset, last)?;
                self.part_keys += entries.len() as u64;
                self.part_bytes += entries.data_bytes() as u64;
                let tree_done = to.is_none();
                let step = BootstrapStep::Chunk {
                    tree,
                    merge_operator,
                    from,
                    to,
                    entries,
                    completes_chunk: last,
                };
                if !last {
                    // The stored position stays at the chunk's start until its last part.
                    return Ok(Some(step));
                }
                self.progress.chunks += 1;
                self.progress.trees_done += u64::from(tree_done);
                self.progress.keys += std::mem::take(&mut self.part_keys);
                self.progress.bytes += std::mem::take(&mut self.part_bytes);
                step
            }
            BootstrapEvent::Done {
                offset,
                gtid_executed,
            } => {
                if offset != self.pos.after_offset {
                    return Err(ProtoError::Violation(format!(
                        "handover at offset {offset} but the stream is at offset {}",
                        self.pos.after_offset
                    ))
                    .into());
                }
                let gtid_executed = gtid_executed
                    .parse::<GtidSet>()
                    .map_err(|e| ProtoError::BadMessage(format!("handover GTID set: {e}")))?;
                self.done = true;
                BootstrapStep::Done {
                    offset,
                    gtid_executed,
                }
            }
        };
        self.progress.set_position(&self.pos);
        Ok(Some(step))
    }
}

fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hex_decode(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_round_trips_and_bad_records_are_refused() {
        let p = BootstrapProgress {
            server_uuid: Uuid::from_bytes([3; 16]),
            after_offset: 42,
            epoch: Some(5),
            tree: "users".into(),
            key_hex: hex_encode(&[0, 255, 16]),
            tree_done: false,
            trees_done: 2,
            chunks: 7,
            keys: 700,
            bytes: 70_000,
            keys_estimate: 1000,
            bytes_estimate: 100_000,
            records: 5,
            resumes: 1,
        };
        let back = BootstrapProgress::from_json(&p.to_json()).unwrap();
        assert_eq!(back, p);
        // Progress stored before history epochs: it decodes, and a resume starts again.
        let mut old: serde_json::Value = serde_json::from_slice(&p.to_json()).unwrap();
        old.as_object_mut().unwrap().remove("epoch");
        let old = BootstrapProgress::from_json(&serde_json::to_vec(&old).unwrap()).unwrap();
        assert_eq!(old.epoch, None);
        assert_eq!(back.position().unwrap().cursor.key, vec![0, 255, 16]);
        assert!(BootstrapProgress::from_json(b"{").is_none());
        let mut bad = p;
        bad.key_hex = "zz".into();
        assert!(BootstrapProgress::from_json(&bad.to_json()).is_none());
    }
}
