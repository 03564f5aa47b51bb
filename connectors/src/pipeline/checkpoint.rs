//! What a pipeline asks its sink to store with the data: where it stands.
//!
//! persisted (in every sink): changes must stay backward compatible. The bytes are JSON:
//! `{"tail":{"server_uuid":..,"offset":N,"gtids":"SET","epoch":N}}` while following the log,
//! `{"bootstrap":{...progress...},"trees":["a",..]}` while copying. `trees` names every tree
//! the copy's stored steps wrote into the sink, so that a copy that must start again from
//! scratch can have them cleared ([`crate::sink::EarlierCopy`]); progress stored by builds
//! before it has none (its trees are unrecorded).
//!
//! Every checkpoint a pipeline writes also records its filter, `"filter":{"trees":[..],
//! "prefix_b64":"..","ops":[..]}` (no `prefix_b64`: no prefix), so that a restart with a filter
//! that lets through what the stored position went past unwritten is refused
//! ([`widened`]). Checkpoints of builds before it, and those the replica's engine sink builds
//! from engine state, record none: nothing is checked. Builds before it ignore the field.

use std::collections::BTreeSet;

use base64::Engine as _;
use serde_json::{Value, json};
use tideline_consumers::{BootstrapProgress, Position};

use super::Filter;

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

    /// `bytes` (what [`PipelineCheckpoint::encode`] or [`PipelineCheckpoint::encode_copy`]
    /// wrote) recording `filter` as the filter of the pipeline that stores them. Bytes that
    /// are not a JSON object (never the pipeline's own) are returned as they are.
    pub(crate) fn with_filter(bytes: Vec<u8>, filter: &Filter) -> Vec<u8> {
        let Ok(Value::Object(mut v)) = serde_json::from_slice::<Value>(&bytes) else {
            return bytes;
        };
        let mut f = json!({ "trees": filter.trees, "ops": filter.ops });
        if let Some(p) = &filter.prefix {
            f["prefix_b64"] = Value::String(base64::engine::general_purpose::STANDARD.encode(p));
        }
        v.insert("filter".into(), f);
        Value::Object(v).to_string().into_bytes()
    }

    /// The filter a checkpoint records (written by `with_filter`); `None` when it
    /// records none (stored by an earlier build, or built by the replica's engine sink). The
    /// error says what is wrong with a recorded one.
    pub fn stored_filter(bytes: &[u8]) -> Result<Option<Filter>, String> {
        let v: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
        let Some(f) = v.get("filter") else {
            return Ok(None);
        };
        let names = |field: &str| -> Result<Vec<String>, String> {
            match f.get(field) {
                None => Ok(Vec::new()),
                Some(list) => serde_json::from_value(list.clone())
                    .map_err(|e| format!("bad filter: `{field}` is not a list of names ({e})")),
            }
        };
        let prefix = match f.get("prefix_b64") {
            None => None,
            Some(p) => Some(
                p.as_str()
                    .and_then(|p| base64::engine::general_purpose::STANDARD.decode(p).ok())
                    .ok_or_else(|| "bad filter: `prefix_b64` is not base64".to_string())?,
            ),
        };
        Ok(Some(Filter {
            trees: names("trees")?,
            prefix,
            ops: names("ops")?,
        }))
    }
}

/// Whether filter `now` lets through a change that filter `stored` dropped: a tree not in the
/// stored list (when it had one), keys outside the stored prefix (no prefix, or one that does
/// not start with it), an op kind not in the stored list (when it had one). A pipeline that
/// resumed so would never write such changes up to its stored position. A narrower filter (or
/// the same) is not wider.
pub(crate) fn widened(stored: &Filter, now: &Filter) -> bool {
    let wider_list = |stored: &[String], now: &[String]| {
        !stored.is_empty() && (now.is_empty() || now.iter().any(|n| !stored.contains(n)))
    };
    let wider_prefix = match (&stored.prefix, &now.prefix) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(s), Some(n)) => !n.starts_with(s),
    };
    wider_list(&stored.trees, &now.trees) || wider_prefix || wider_list(&stored.ops, &now.ops)
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

    fn filter(trees: &[&str], prefix: Option<&str>, ops: &[&str]) -> Filter {
        Filter {
            trees: trees.iter().map(|t| t.to_string()).collect(),
            prefix: prefix.map(|p| p.as_bytes().to_vec()),
            ops: ops.iter().map(|o| o.to_string()).collect(),
        }
    }

    #[test]
    fn a_checkpoint_records_its_filter_and_reads_as_before() {
        let uuid = uuid::Uuid::from_bytes([3; 16]);
        let tail = PipelineCheckpoint::Tail(Position {
            server_uuid: uuid,
            offset: 9,
            gtids: format!("{uuid}:1-9").parse().unwrap(),
            epoch: Some(tideline_wal::Epoch::new(4)),
        });
        let mut f = filter(&["a", "b"], None, &["put"]);
        f.prefix = Some(vec![0xff, b'u']);
        let bytes = PipelineCheckpoint::with_filter(tail.encode(), &f);
        assert_eq!(PipelineCheckpoint::decode(&bytes).unwrap(), tail);
        assert_eq!(PipelineCheckpoint::stored_filter(&bytes).unwrap(), Some(f));
        let none = PipelineCheckpoint::with_filter(tail.encode(), &Filter::default());
        assert_eq!(
            PipelineCheckpoint::stored_filter(&none).unwrap(),
            Some(Filter::default())
        );
        // A copy's checkpoint keeps its trees beside the filter's.
        let trees: BTreeSet<String> = ["x".to_string()].into();
        let progress = BootstrapProgress {
            server_uuid: uuid,
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
        let copy = PipelineCheckpoint::with_filter(
            PipelineCheckpoint::encode_copy(&progress, Some(&trees)),
            &filter(&["a"], None, &[]),
        );
        assert_eq!(
            PipelineCheckpoint::decode(&copy).unwrap(),
            PipelineCheckpoint::Bootstrap(progress)
        );
        assert_eq!(PipelineCheckpoint::copied_trees(&copy), Some(trees));
        assert_eq!(
            PipelineCheckpoint::stored_filter(&copy).unwrap(),
            Some(filter(&["a"], None, &[]))
        );
        // Stored by an earlier build (or the engine sink): no filter, nothing to check.
        assert_eq!(
            PipelineCheckpoint::stored_filter(&tail.encode()).unwrap(),
            None
        );
        let bad = PipelineCheckpoint::stored_filter(b"{\"tail\":{},\"filter\":{\"trees\":3}}");
        assert!(bad.unwrap_err().contains("trees"));
    }

    #[test]
    fn a_wider_tree_list_is_refused_and_a_narrower_one_is_not() {
        let stored = filter(&["a", "b"], None, &[]);
        assert!(widened(&stored, &filter(&["a", "c"], None, &[])));
        assert!(widened(&stored, &filter(&[], None, &[])), "every tree");
        assert!(!widened(&stored, &filter(&["b", "a"], None, &[])));
        assert!(!widened(&stored, &filter(&["a"], None, &[])));
        assert!(!widened(
            &filter(&[], None, &[]),
            &filter(&["a"], None, &[])
        ));
    }

    #[test]
    fn a_wider_prefix_is_refused_and_a_longer_one_is_not() {
        let stored = filter(&[], Some("us"), &[]);
        assert!(widened(&stored, &filter(&[], None, &[])), "no prefix");
        assert!(widened(&stored, &filter(&[], Some("u"), &[])));
        assert!(widened(&stored, &filter(&[], Some("ox"), &[])));
        assert!(!widened(&stored, &filter(&[], Some("us"), &[])));
        assert!(!widened(&stored, &filter(&[], Some("user"), &[])));
        assert!(!widened(
            &filter(&[], None, &[]),
            &filter(&[], Some("u"), &[])
        ));
    }

    #[test]
    fn a_wider_op_list_is_refused_and_a_narrower_one_is_not() {
        let stored = filter(&[], None, &["put", "delete"]);
        assert!(widened(&stored, &filter(&[], None, &["put", "merge"])));
        assert!(widened(&stored, &filter(&[], None, &[])), "every op");
        assert!(!widened(&stored, &filter(&[], None, &["delete"])));
        assert!(!widened(&stored, &filter(&[], None, &["delete", "put"])));
        assert!(!widened(
            &filter(&[], None, &[]),
            &filter(&[], None, &["put"])
        ));
        // Each part on its own: narrowing one does not make up for widening another.
        assert!(widened(
            &filter(&["a"], Some("us"), &["put"]),
            &filter(&["a"], Some("user"), &[])
        ));
    }
}
