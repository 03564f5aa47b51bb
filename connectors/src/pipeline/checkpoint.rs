//! What a pipeline asks its sink to store with the data: where it stands.
//!
//! persisted (in every sink): changes must stay backward compatible. The bytes are JSON:
//! `{"tail":{"server_uuid":..,"offset":N,"gtids":"SET","epoch":N}}` while following the log,
//! `{"bootstrap":{...progress...}}` while copying.

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
}
