//! The receiving end of a bootstrap as a state machine (no I/O): DBLog's watermarks, with the
//! server placing each chunk in the ordered stream at the log position it was read at.
//!
//! The consumer applies one ordered stream. A live record's op on a key the copy has already
//! passed (before the [`Cursor`]) is applied; an op on a key not yet copied is dropped, because
//! the chunk that copies that key is read later and already contains it. A chunk replaces its
//! key range and moves the cursor past it. Since every record up to a chunk's position arrives
//! before the chunk and every later one after it, no event is lost or overwritten by an older
//! chunk.

use tideline_wal::{Op, PackedEntries, Transaction};

use super::ProtoError;
pub use super::messages::Cursor;

/// A key and its value.
pub type Entry = (Vec<u8>, Vec<u8>);

use tideline_wal::packed::entry_at;
pub use tideline_wal::packed::{ENTRY_HEADER_BYTES, pack_entry};

/// Splits a packed chunk body into parts of about `part_bytes` at entry boundaries: per part,
/// its byte range and its first key. Stops at the first malformed entry (the body is the
/// server's own; this never panics on a bad one).
pub fn packed_parts(body: &[u8], part_bytes: usize) -> Vec<(std::ops::Range<usize>, Vec<u8>)> {
    let mut parts: Vec<(std::ops::Range<usize>, Vec<u8>)> = Vec::new();
    let mut at = 0usize;
    while let Some((key, _, end)) = entry_at(body, at) {
        match parts.last_mut() {
            Some((range, _)) if range.end - range.start < part_bytes => range.end = end,
            _ => parts.push((at..end, key.to_vec())),
        }
        at = end;
    }
    parts
}

/// The entries of a packed chunk body (peer data), checked: lengths inside the body, keys
/// strictly ascending, all inside `[from, to)`. Kept packed: the replica's pipeline hands them
/// to its engine as they came.
pub fn checked_entries(
    body: Vec<u8>,
    from: &[u8],
    to: Option<&[u8]>,
) -> Result<PackedEntries, ProtoError> {
    let bad = |why: String| ProtoError::BadMessage(format!("chunk entries: {why}"));
    let entries = PackedEntries::from_body(body).map_err(|e| bad(e.to_string()))?;
    if let Some(key) = entries.key_outside(from, to) {
        return Err(bad(format!("key {key:?} outside the chunk's range")));
    }
    Ok(entries)
}

/// [`checked_entries`], each entry copied out.
pub fn unpack_entries(
    body: &[u8],
    from: &[u8],
    to: Option<&[u8]>,
) -> Result<Vec<Entry>, ProtoError> {
    Ok(checked_entries(body.to_vec(), from, to)?
        .iter()
        .map(|(k, v)| (k.to_vec(), v.to_vec()))
        .collect())
}

impl Cursor {
    /// Whether the copy has passed `(tree, key)`: the key's current value is in the copy, so a
    /// live op on it must be applied.
    pub fn covers_key(&self, tree: &str, key: &[u8]) -> bool {
        tree < self.tree.as_str() || (tree == self.tree && (self.tree_done || key < &self.key[..]))
    }

    /// Whether a live create/drop of `tree` must be applied: the copy has started on it (a
    /// tree not reached yet is copied later as it then is).
    pub fn covers_tree(&self, tree: &str) -> bool {
        tree <= self.tree.as_str()
    }

    /// Whether the copy has passed every op of `op`.
    pub fn covers(&self, op: &Op) -> bool {
        match op.key() {
            Some(k) => self.covers_key(op.tree(), k),
            None => self.covers_tree(op.tree()),
        }
    }
}

/// A live record received during a copy, reduced to the ops the copy applies: those on ranges
/// it has passed (possibly none). It keeps the record's GTID, offset and commit time, and each
/// op's index in the record as logged, so that what a consumer makes of an op is named by the
/// record however the copy was cut: a copy resumed from stored progress receives the record
/// again with its cursor where that progress left it, so it may apply fewer of the record's
/// ops than the attempt it repeats, and a count of the ops it applies would name them
/// differently.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyRecord {
    /// The record, its ops reduced to the ones that apply, in log order.
    pub txn: Transaction,
    /// Per op of `txn.ops`, its index among the record's ops as logged (ascending).
    pub op_indexes: Vec<usize>,
}

impl CopyRecord {
    /// `txn` reduced to the ops `keep` accepts, each with its index in `txn`.
    pub fn filtered(txn: Transaction, keep: impl FnMut(&Op) -> bool) -> CopyRecord {
        let op_indexes = (0..txn.ops.len()).collect();
        let mut record = CopyRecord { txn, op_indexes };
        record.retain(keep);
        record
    }

    /// Keeps only the ops `keep` accepts (a consumer's own filter), with their indexes.
    pub fn retain(&mut self, mut keep: impl FnMut(&Op) -> bool) {
        let ops = std::mem::take(&mut self.txn.ops);
        let indexes = std::mem::take(&mut self.op_indexes);
        for (i, op) in indexes.into_iter().zip(ops) {
            if keep(&op) {
                self.op_indexes.push(i);
                self.txn.ops.push(op);
            }
        }
    }

    /// The ops that apply, each with its index in the record as logged.
    pub fn indexed_ops(&self) -> impl Iterator<Item = (usize, &Op)> {
        self.op_indexes.iter().copied().zip(&self.txn.ops)
    }
}

/// Where a bootstrap stands: the last live offset received and the copy's cursor. Persist it
/// atomically with what was applied; it is all a resume needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootstrapPosition {
    /// Every live record up to this offset was received (and handled).
    pub after_offset: u64,
    /// Everything before this point was copied.
    pub cursor: Cursor,
}

impl BootstrapPosition {
    /// Takes a batch of live records: they must continue exactly after `after_offset` (the
    /// server reads its log densely; records already received after a resume are dropped).
    /// Returns each record reduced to the ops to apply (possibly none).
    pub fn on_records(&mut self, txns: Vec<Transaction>) -> Result<Vec<CopyRecord>, ProtoError> {
        let mut out = Vec::with_capacity(txns.len());
        for txn in txns {
            let o = txn.offset.get();
            if o <= self.after_offset {
                continue;
            }
            if o != self.after_offset + 1 {
                return Err(ProtoError::Violation(format!(
                    "bootstrap stream jumped from offset {} to {o}",
                    self.after_offset
                )));
            }
            self.after_offset = o;
            out.push(CopyRecord::filtered(txn, |op| self.cursor.covers(op)));
        }
        Ok(out)
    }

    /// Takes a chunk header: it must start at the cursor (the next tree from its first key,
    /// or the current tree at the cursor's key) and be read no earlier than the records
    /// received. Moves the cursor past it.
    pub fn on_chunk(
        &mut self,
        tree: &str,
        from: &[u8],
        to: Option<&[u8]>,
        offset: u64,
        last: bool,
    ) -> Result<(), ProtoError> {
        if !last && to.is_none() {
            return Err(ProtoError::Violation(
                "a chunk part that is not the last one ends at the end of its tree".into(),
            ));
        }
        let starts_here = if tree == self.cursor.tree {
            !self.cursor.tree_done && from == &self.cursor.key[..]
        } else {
            tree > self.cursor.tree.as_str() && from.is_empty()
        };
        if !starts_here {
            return Err(ProtoError::Violation(format!(
                "chunk of tree `{tree}` from {from:?} does not start at the cursor ({:?})",
                self.cursor
            )));
        }
        if to.is_some_and(|t| t <= from) {
            return Err(ProtoError::Violation(format!(
                "chunk range from {from:?} to {to:?} is empty"
            )));
        }
        if offset != self.after_offset {
            return Err(ProtoError::Violation(format!(
                "chunk read at offset {offset} but the stream is at offset {}",
                self.after_offset
            )));
        }
        self.cursor = match to {
            Some(t) => Cursor {
                tree: tree.to_string(),
                key: t.to_vec(),
                tree_done: false,
            },
            None => Cursor {
                tree: tree.to_string(),
                key: Vec::new(),
                tree_done: true,
            },
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use tideline_wal::{Gtid, Offset};

    fn put(tree: &str, key: &str, value: &str) -> Op {
        Op::Put {
            tree: tree.into(),
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
            before: None,
        }
    }

    fn record(offset: u64, ops: Vec<Op>) -> Transaction {
        Transaction {
            offset: Offset::new(offset).unwrap(),
            gtid: Gtid::new(uuid::Uuid::nil(), offset).unwrap(),
            timestamp_us: 0,
            ops,
        }
    }

    type State = BTreeMap<(String, Vec<u8>), Vec<u8>>;

    fn apply_op(state: &mut State, op: &Op) {
        if let Op::Put {
            tree, key, value, ..
        } = op
        {
            state.insert((tree.clone(), key.clone()), value.clone());
        }
    }

    /// A writer keeps writing while the copy goes on: the merged result equals the source's
    /// final state. The op on a copied key must be applied (the chunk that held that key
    /// came before it); the op on a key not yet copied is dropped (the later chunk has it).
    #[test]
    fn chunks_merged_with_live_records_equal_the_source() {
        let mut source: State = BTreeMap::new();
        for k in 0..10 {
            source.insert(("a".into(), vec![b'0' + k]), b"v0".to_vec());
        }
        let mut replica: State = BTreeMap::new();
        let mut pos = BootstrapPosition::default();
        let mut offset = 0;
        let mut write = |source: &mut State, key: u8, v: &str| {
            offset += 1;
            let op = put("a", std::str::from_utf8(&[key]).unwrap(), v);
            apply_op(source, &op);
            record(offset, vec![op])
        };
        // Chunk 1 covers keys 0..5 at offset 0.
        let chunk = |source: &State, from: u8, to: Option<u8>| -> Vec<(Vec<u8>, Vec<u8>)> {
            source
                .iter()
                .filter(|((_, k), _)| k[0] >= from && to.is_none_or(|t| k[0] < t))
                .map(|((_, k), v)| (k.clone(), v.clone()))
                .collect()
        };
        let c1 = chunk(&source, b'0', Some(b'5'));
        pos.on_chunk("a", b"0", Some(b"5"), 0, true).unwrap_err(); // must start at the tree's first key
        pos.on_chunk("a", b"", Some(b"5"), 0, true).unwrap();
        for (k, v) in c1 {
            replica.insert(("a".into(), k), v);
        }
        // Writes to a copied key (1) and a not-yet-copied key (7).
        let r1 = write(&mut source, b'1', "v1");
        let r2 = write(&mut source, b'7', "v1");
        for r in pos.on_records(vec![r1, r2]).unwrap() {
            for op in &r.txn.ops {
                apply_op(&mut replica, op);
            }
        }
        // Chunk 2 covers the rest at offset 2 and includes key 7's new value.
        let c2 = chunk(&source, b'5', None);
        pos.on_chunk("a", b"5", None, 2, true).unwrap();
        for (k, v) in c2 {
            replica.insert(("a".into(), k), v);
        }
        let r3 = write(&mut source, b'8', "v2");
        for r in pos.on_records(vec![r3]).unwrap() {
            for op in &r.txn.ops {
                apply_op(&mut replica, op);
            }
        }
        assert_eq!(replica, source);
        assert!(pos.cursor.tree_done);
    }

    /// A record keeps its GTID, offset and time, and each op it applies keeps its index in
    /// the record as logged, through the cursor and a consumer's own filter.
    #[test]
    fn a_record_keeps_its_identity_and_each_op_its_index() {
        let mut pos = BootstrapPosition::default();
        pos.on_chunk("b", b"", Some(b"m"), 0, true).unwrap();
        let mut r = record(
            1,
            vec![put("b", "z", "1"), put("a", "x", "1"), put("b", "c", "1")],
        );
        r.timestamp_us = 42;
        let mut got = pos.on_records(vec![r.clone()]).unwrap();
        let mut got = got.pop().unwrap();
        assert_eq!(
            (got.txn.gtid, got.txn.offset, got.txn.timestamp_us),
            (r.gtid, r.offset, 42)
        );
        assert_eq!(got.op_indexes, [1, 2], "`b/z` is not copied yet");
        assert_eq!(got.txn.ops, r.ops[1..]);
        got.retain(|op| op.tree() == "b");
        let kept: Vec<_> = got.indexed_ops().collect();
        assert_eq!(kept, [(2, &r.ops[2])]);
    }

    #[test]
    fn out_of_order_input_is_refused() {
        let mut pos = BootstrapPosition::default();
        assert!(pos.on_records(vec![record(2, vec![])]).is_err(), "gap");
        pos.on_records(vec![record(1, vec![])]).unwrap();
        assert_eq!(pos.on_records(vec![record(1, vec![])]).unwrap(), vec![]);
        assert!(
            pos.on_chunk("a", b"", None, 0, true).is_err(),
            "older than the records"
        );
        pos.on_chunk("b", b"", None, 1, true).unwrap();
        assert!(
            pos.on_chunk("a", b"", None, 1, true).is_err(),
            "tree behind the cursor"
        );
        assert!(
            pos.on_chunk("b", b"", None, 1, true).is_err(),
            "tree already done"
        );
    }

    #[test]
    fn a_chunk_in_parts_moves_the_cursor_part_by_part() {
        let mut pos = BootstrapPosition::default();
        assert!(
            pos.on_chunk("a", b"", None, 0, false).is_err(),
            "open-ended part"
        );
        pos.on_chunk("a", b"", Some(b"m"), 0, false).unwrap();
        assert!(pos.cursor.covers_key("a", b"c"));
        pos.on_chunk("a", b"m", None, 0, true).unwrap();
        assert!(pos.cursor.tree_done);
        let mut body = Vec::new();
        for k in [b"a", b"b", b"c", b"d"] {
            pack_entry(&mut body, k, &[0; 10]);
        }
        let parts = packed_parts(&body, 30);
        let firsts: Vec<&[u8]> = parts.iter().map(|(_, k)| k.as_slice()).collect();
        assert_eq!(firsts, vec![&b"a"[..], &b"c"[..]]);
        assert_eq!(parts[1].0.end, body.len());
        assert_eq!(parts[0].0.end, parts[1].0.start);
    }

    #[test]
    fn packed_entries_round_trip_and_bad_bodies_are_refused() {
        let mut body = Vec::new();
        pack_entry(&mut body, b"k1", b"v1");
        pack_entry(&mut body, b"k2", b"");
        let got = unpack_entries(&body, b"k", None).unwrap();
        assert_eq!(
            got,
            vec![(b"k1".to_vec(), b"v1".to_vec()), (b"k2".to_vec(), vec![])]
        );
        assert!(
            unpack_entries(&body, b"k", Some(b"k2")).is_err(),
            "past the range"
        );
        assert!(
            unpack_entries(&body, b"k2", None).is_err(),
            "before the range"
        );
        assert_eq!(
            checked_entries(body.clone(), b"k1", Some(b"k3"))
                .unwrap()
                .len(),
            2,
            "the bounds are inclusive and exclusive"
        );
        assert!(
            unpack_entries(&body[..body.len() - 1], b"", None).is_err(),
            "cut"
        );
        let mut unsorted = Vec::new();
        pack_entry(&mut unsorted, b"b", b"");
        pack_entry(&mut unsorted, b"a", b"");
        assert!(unpack_entries(&unsorted, b"", None).is_err());
        let mut huge = Vec::new();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        huge.extend_from_slice(&0u32.to_le_bytes());
        assert!(unpack_entries(&huge, b"", None).is_err());
    }
}
