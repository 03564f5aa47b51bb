//! What a pipeline asks its sink to store with the data: where it stands.
//!
//! persisted (in every sink): changes must stay backward compatible. The bytes are JSON:
//! `{"tail":{"server_uuid":..,"offset":N,"gtids":"SET","epoch":N}}` while following the log,
//! `{"bootstrap":{...progress...},"trees":["a",..]}` while copying. `trees` names every tree
//! the copy's stored steps wrote into the sink, so that a copy that must start again from
//! scratch can have them cleared ([`crate::sink::EarlierCopy`]); progress stored by builds
//! before it has none (its trees are unrecorded).

use std::collections::BTreeSet;

use serde_json::{Value, json};
use tideline_consumers::{BootstrapProgress, Position};

/// Where a pipeline stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PipelineCheckpoint {
    /// Following the log: the last transaction stored.
    Tail(Position),
    /// Copying: the last bootstrap step stored.
    Bootstrap(BootstrapProgress),
}

impl PipelineCheckpoint {
    /// The bytes a sink stores.
    pub fn encode(&self) -> Vec<u8> {
        let v = match self {
            PipelineCheckpoint::Tail(p) => {
                json!({ "tail": serde_json::from_slice::<Value>(&p.to_bytes()).unwrap_or(Value::Null) })
            }
            PipelineCheckpoint::Bootstrap(b) => json!({ "bootstrap": b }),
        };
        v.to_string().into_bytes()
    }

    /// A copy's checkpoint: its progress and the trees its stored steps wrote so far (`None`:
    /// not recorded, as in progress stored by an earlier build; the bytes then name none).
    pub fn encode_copy(progress: &BootstrapProgress, trees: Option<&BTreeSet<String>>) -> Vec<u8> {
        let v = match trees {
            Some(t) => json!({ "bootstrap": progress, "trees": t }),
            None => json!({ "bootstrap": progress }),
        };
        v.to_string().into_bytes()
    }

    /// The trees a copy's checkpoint records as written ([`PipelineCheckpoint::encode_copy`]);
    /// `None` when it records none (stored by an earlier build, or not a copy's checkpoint).
    pub fn copied_trees(bytes: &[u8]) -> Option<BTreeSet<String>> {
        let v: Value = serde_json::from_slice(bytes).ok()?;
        v.get("bootstrap")?;
        serde_json::from_value(v.get("trees")?.clone()).ok()
    }

    /// Reads what [`PipelineCheckpoint::encode`] wrote; the error says what is wrong.
    pub fn decode(bytes: &[u8]) -> Result<PipelineCheckpoint, String> {
        let v: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
        if let Some(t) = v.get("tail") {
            return Position::parse(t.to_string().as_bytes())
                .map(PipelineCheckpoint::Tail)
                .map_err(|e| format!("bad tail position: {e}"));
        }
        if let Some(b) = v.get("bootstrap") {
            return BootstrapProgress::from_json(b.to_string().as_bytes())
                .map(PipelineCheckpoint::Bootstrap)
                .ok_or_else(|| "bad bootstrap progress".to_string());
        }
        Err("neither a tail position nor a bootstrap progress".into())
    }

    /// The offset of the source it stands at (a bootstrap: the last live record handled).
    pub fn offset(&self) -> u64 {
        match self {
            PipelineCheckpoint::Tail(p) => p.offset,
            PipelineCheckpoint::Bootstrap(b) => b.after_offset,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_round_trip_and_garbage_is_named() {
        let uuid = uuid::Uuid::from_bytes([3; 16]);
        let tail = PipelineCheckpoint::Tail(Position {
            server_uuid: uuid,
            offset: 9,
            gtids: format!("{uuid}:1-9").parse().unwrap(),
            epoch: Some(tideline_wal::Epoch::new(4)),
        });
        assert_eq!(PipelineCheckpoint::decode(&tail.encode()).unwrap(), tail);
        assert!(
            PipelineCheckpoint::decode(b"{\"x\":1}")
                .unwrap_err()
                .contains("neither")
        );
        assert!(
            PipelineCheckpoint::decode(b"\xff")
                .unwrap_err()
                .contains("not JSON")
        );
    }

    #[test]
    fn a_copy_checkpoint_records_its_trees_and_an_earlier_one_records_none() {
        let progress = BootstrapProgress {
            server_uuid: uuid::Uuid::from_bytes([5; 16]),
            after_offset: 7,
            epoch: Some(2),
            tree: "b".into(),
            key_hex: "6b31".into(),
            tree_done: false,
            trees_done: 1,
            chunks: 3,
            keys: 30,
            bytes: 300,
            keys_estimate: 90,
            bytes_estimate: 0,
            records: 4,
            resumes: 0,
        };
        let trees: BTreeSet<String> = ["a".to_string(), "b".to_string()].into();
        let bytes = PipelineCheckpoint::encode_copy(&progress, Some(&trees));
        assert_eq!(
            PipelineCheckpoint::decode(&bytes).unwrap(),
            PipelineCheckpoint::Bootstrap(progress.clone()),
            "the progress reads as before"
        );
        assert_eq!(PipelineCheckpoint::copied_trees(&bytes), Some(trees));
        let empty = PipelineCheckpoint::encode_copy(&progress, Some(&BTreeSet::new()));
        assert_eq!(
            PipelineCheckpoint::copied_trees(&empty),
            Some(BTreeSet::new())
        );
        // Stored by an earlier build: the trees are unknown, not none.
        let earlier = PipelineCheckpoint::Bootstrap(progress.clone()).encode();
        assert_eq!(PipelineCheckpoint::copied_trees(&earlier), None);
        assert_eq!(PipelineCheckpoint::encode_copy(&progress, None), earlier);
        assert_eq!(PipelineCheckpoint::copied_trees(b"{\"tail\":{}}"), None);
    }
}
