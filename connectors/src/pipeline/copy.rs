//! One connection's worth of a bootstrap copy: the source's ordered stream of chunks and live
//! records turned into batches, each stored by the sink with the copy's progress as checkpoint
//! (a tree's definitions in the batch of the chunk they come before, see [`StepItems`]).
//! Shared by every pipeline that bootstraps and by the replica (whose sink is the engine).
//!
//! Receiving and storing overlap: a task reads steps off the stream (up to
//! [`STEPS_AHEAD`] ahead) while the sink stores the previous one, so the copy runs at the
//! slower of the two, not at their sum. A process killed at any point resumes from the last
//! step the sink stored, so at most the steps in flight are sent again.
//!
//! Every copy checkpoint also names the trees the copy's stored steps wrote ([`CopiedTrees`]):
//! when a copy must begin again from scratch, the sink is told what the earlier one left
//! ([`EarlierCopy`]) and clears it with the new copy's first checkpoint.
//!
//! Owns: the order of copy steps, when a copy begins from scratch ([`Sink::begin_copy`]) and
//! what the sink holds then, the chunk acknowledgements to the source. Must never: acknowledge
//! a chunk before the sink stored it, or move the checkpoint past a step not stored.

use std::collections::BTreeSet;

use tideline_consumers::{Bootstrap, BootstrapError, BootstrapProgress, BootstrapStep, Position};
use tideline_stream::ClientError;
use tideline_wal::{Op, PackedEntries};

use super::drive::{Driver, Relearn};
use super::{Filter, PipelineCheckpoint, PipelineError};
use crate::sink::{Batch, EarlierCopy, Item, Sink};

/// The trees the copy steps a sink stored have written, as its last stored checkpoint records
/// them; `None` when they are not known (a checkpoint stored by an earlier build). Kept across
/// the copies of one pipeline run, so that a copy begun again from scratch (after one that
/// cannot resume) knows what the sink holds.
pub(crate) type CopiedTrees = Option<BTreeSet<String>>;

/// Steps received ahead of the sink.
const STEPS_AHEAD: usize = 4;

/// Why a copy stopped before its end.
pub(crate) enum CopyStop {
    /// The source's stream ended, failed, or refused an acknowledgement; `saved` is the last
    /// progress the sink stored on this connection (`None`: none yet).
    Source(SourceEnd, Option<BootstrapProgress>),
    /// The sink refused for good.
    Sink(PipelineError),
}

/// How the source's side of a copy ended.
pub(crate) enum SourceEnd {
    /// The stream ended before the copy was complete.
    Ended,
    /// The stream failed.
    Failed(BootstrapError),
    /// A chunk acknowledgement could not be sent.
    Ack(ClientError),
}

/// Aborts the receiving task when the copy ends, however it ends (a dropped future included).
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

type Received = Result<Option<(BootstrapStep, BootstrapProgress, f64)>, BootstrapError>;

/// Copies from `b` into `sink` until the copy is complete; returns the position the live tail
/// takes over at. A copy that starts from scratch (`resumes == 0`) first calls
/// [`Sink::begin_copy`], naming what `trees` says the sink holds of an earlier copy; `trees`
/// then follows what the stored steps write. `filter` keeps only the changes that pass.
pub(crate) async fn copy(
    d: &Driver<'_>,
    filter: &Filter,
    sink: &mut dyn Sink,
    b: Bootstrap,
    trees: &mut CopiedTrees,
) -> Result<Position, CopyStop> {
    copy_learning(d, filter, sink, b, trees, None).await
}

/// [`copy`], with each step written as [`Driver::write_learning`] says: a step that holds
/// first asks `source` for what the source's `status` says of its trees again.
pub(crate) async fn copy_learning(
    d: &Driver<'_>,
    filter: &Filter,
    sink: &mut dyn Sink,
    mut b: Bootstrap,
    trees: &mut CopiedTrees,
    source: Option<&dyn Relearn>,
) -> Result<Position, CopyStop> {
    let server_uuid = b.progress().server_uuid;
    if b.progress().resumes == 0 {
        let earlier = match trees.as_ref() {
            Some(t) if t.is_empty() => EarlierCopy::None,
            Some(t) => EarlierCopy::Trees {
                trees: t.iter().cloned().collect(),
                prefix: filter.prefix.clone(),
            },
            None => EarlierCopy::Unrecorded,
        };
        let none = BTreeSet::new();
        let start = PipelineCheckpoint::encode_copy(b.progress(), Some(&none));
        d.begin_copy(sink, &start, &earlier)
            .await
            .map_err(CopyStop::Sink)?;
        *trees = Some(none);
    }
    let mut acker = b.take_acker();
    let mut chunks_stored = 0u64;
    let mut saved: Option<BootstrapProgress> = None;
    let mut to_store = StepItems::default();

    let (tx, mut rx) = tokio::sync::mpsc::channel::<Received>(STEPS_AHEAD);
    let receiver = tokio::spawn(async move {
        loop {
            let step = b.next().await;
            let done = matches!(step, Ok(None) | Err(_));
            let item = step.map(|s| s.map(|s| (s, b.progress().clone(), b.rate())));
            if tx.send(item).await.is_err() || done {
                return;
            }
        }
    });
    let _receiver = AbortOnDrop(receiver.abort_handle());
    loop {
        let (step, progress, rate) = match rx.recv().await {
            Some(Ok(Some(x))) => x,
            None | Some(Ok(None)) => return Err(CopyStop::Source(SourceEnd::Ended, saved)),
            Some(Err(e)) => return Err(CopyStop::Source(SourceEnd::Failed(e), saved)),
        };
        let (items, completes_chunk) = match step {
            BootstrapStep::Done {
                offset,
                gtid_executed,
            } => {
                let pos = Position {
                    server_uuid,
                    offset,
                    gtids: gtid_executed,
                    epoch: progress.epoch.map(tideline_wal::Epoch::new),
                };
                let batch = Batch {
                    source: server_uuid,
                    items: vec![],
                    checkpoint: PipelineCheckpoint::Tail(pos.clone()).encode(),
                };
                d.write(sink, batch).await.map_err(CopyStop::Sink)?;
                d.report.copy_done(&pos, &progress, rate);
                return Ok(pos);
            }
            step => match to_store.items(step, filter) {
                Some(x) => x,
                None => continue,
            },
        };
        // The step's trees go into the checkpoint stored with it. A write that fails for good
        // ends the pipeline run, and `trees` with it.
        if let Some(t) = trees.as_mut() {
            let mut note = |tree: &str| {
                if !t.contains(tree) {
                    t.insert(tree.to_owned());
                }
            };
            for item in &items {
                match item {
                    Item::Chunk { tree, .. } => note(tree),
                    Item::Record(r) => r.txn.ops.iter().for_each(|op| note(op.tree())),
                    Item::Ops(ops) => ops.iter().for_each(|op| note(op.tree())),
                    Item::Txn(_) => {}
                }
            }
        }
        let batch = Batch {
            source: server_uuid,
            items,
            checkpoint: PipelineCheckpoint::encode_copy(&progress, trees.as_ref()),
        };
        d.write_learning(sink, batch, source)
            .await
            .map_err(CopyStop::Sink)?;
        d.report.copy_step(&progress, rate);
        saved = Some(progress);
        if completes_chunk && let Some(a) = acker.as_mut() {
            chunks_stored += 1;
            if let Err(e) = a.stored(chunks_stored).await {
                return Err(CopyStop::Source(SourceEnd::Ack(e), saved));
            }
        }
    }
}

/// What the copy's steps give the sink, in batches: one per step, except the definitions
/// of a tree (its `create_tree` and `create_index`, sent before each of its chunks), which
/// are stored in the same batch as the chunk that follows them. The first chunk of a tree
/// makes the engine sink replace what it holds of the tree (what a copy cut short left,
/// possibly from another state of the source) with what the batch defines, so the
/// definitions must come in that batch: stored on their own, with the progress still
/// before the tree, they would be dropped by the chunk, or, left by a copy cut short, would
/// outlive a source that dropped or re-created the tree.
#[derive(Default)]
struct StepItems {
    /// Definitions received, waiting for their chunk.
    definitions: Vec<Op>,
}

impl StepItems {
    /// The items to store for `step` under `filter`, and whether the step completes a chunk;
    /// `None` when there is nothing to store yet (definitions, held for their chunk) or
    /// here at all (the handover, which the caller stores).
    fn items(&mut self, step: BootstrapStep, filter: &Filter) -> Option<(Vec<Item>, bool)> {
        let (step_items, completes_chunk): (Vec<Item>, bool) = match step {
            BootstrapStep::Ops(mut ops) => {
                ops.retain(|op| filter.passes(op));
                self.definitions.extend(ops);
                return None;
            }
            BootstrapStep::Done { .. } => return None,
            BootstrapStep::Records(records) => {
                // One item per record that keeps an op, so that each keeps its GTID.
                let items = records
                    .into_iter()
                    .filter_map(|mut r| {
                        r.retain(|op| filter.passes(op));
                        (!r.txn.ops.is_empty()).then_some(Item::Record(r))
                    })
                    .collect();
                (items, false)
            }
            BootstrapStep::Chunk {
                tree,
                merge_operator,
                from,
                to,
                entries,
                completes_chunk,
            } => {
                let item = chunk_item(filter, tree, merge_operator, from, to, entries);
                (item.into_iter().collect(), completes_chunk)
            }
        };
        // Definitions come right before their chunk (the consumer refuses anything else).
        let mut items = Vec::with_capacity(step_items.len() + 1);
        if !self.definitions.is_empty() {
            items.push(Item::Ops(std::mem::take(&mut self.definitions)));
        }
        items.extend(step_items);
        Some((items, completes_chunk))
    }
}

/// The item a chunk gives a sink under `filter`; `None` when its tree does not pass, or when
/// its range holds no key of the filter's prefix. With a prefix, the range shrinks to the
/// prefix's part of it: the source cuts chunks over the whole tree, and the sink clears each
/// chunk's range, which must spare the rows of other prefixes (another pipeline's, in a
/// shared destination) and may not name a key outside the prefix (it may not be text).
fn chunk_item(
    filter: &Filter,
    tree: String,
    merge_operator: Option<String>,
    from: Vec<u8>,
    to: Option<Vec<u8>>,
    mut entries: PackedEntries,
) -> Option<Item> {
    if !filter.tree_passes(&tree) {
        return None;
    }
    let (from, to) = match filter.prefix.as_deref() {
        None => (from, to),
        Some(prefix) => {
            entries.retain(|k| filter.key_passes(k));
            prefix_part(prefix, from, to)?
        }
    };
    Some(Item::Chunk {
        tree,
        merge_operator,
        from,
        to,
        entries,
    })
}

/// The part of `[from, to)` (`to: None`: the tree's end) whose keys start with `prefix`,
/// `None` when there is none. Its end is the first key after the prefix's keys, as text when
/// the prefix is text (a configured prefix always is): a sink keyed by text can name it, and
/// it spares every key of another text prefix (a key between the two ends is not UTF-8).
fn prefix_part(
    prefix: &[u8],
    from: Vec<u8>,
    to: Option<Vec<u8>>,
) -> Option<(Vec<u8>, Option<Vec<u8>>)> {
    let end = bytes_after(prefix);
    let from = from.max(prefix.to_vec());
    if end.as_ref().is_some_and(|e| from >= *e) {
        return None;
    }
    let to = match to {
        Some(t) if t <= from => return None,
        Some(t) if end.as_ref().is_none_or(|e| t < *e) => Some(t),
        _ => end.map(|e| text_after(prefix).unwrap_or(e)),
    };
    Some((from, to))
}

/// The first key after every key that starts with `prefix`; `None`: there is none.
fn bytes_after(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// The first text after every text that starts with `prefix` (its last character moved to
/// the next one); `None` when `prefix` is not text or there is no such text.
fn text_after(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut chars: Vec<char> = std::str::from_utf8(prefix).ok()?.chars().collect();
    while let Some(last) = chars.pop() {
        if let Some(next) = (u32::from(last) + 1..=u32::from(char::MAX)).find_map(char::from_u32) {
            chars.push(next);
            return Some(chars.into_iter().collect::<String>().into_bytes());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    //! A copy with a `prefix` filter: the source cuts its chunks over the whole tree, at any
    //! key, so a chunk's range reaches past the prefix. What the sink gets must stay inside
    //! the prefix (the sink clears each chunk's range: rows of other prefixes, another
    //! pipeline's in a shared destination, must stay, and a boundary key outside the prefix
    //! may not even be text), and the ranges together must still cover the whole prefix (so
    //! that every stale row of it is cleared). Guards against a prefixed copy that deleted
    //! another pipeline's rows. And a tree's definitions, which come before its chunk, are
    //! stored in the chunk's batch: guards against definitions that a copy cut short left
    //! behind, or that the engine sink dropped with the tree at its first chunk.

    use super::*;

    fn entries(keys: &[&[u8]]) -> PackedEntries {
        PackedEntries::from_pairs(keys.iter().map(|k| (k.to_vec(), b"v".to_vec())))
            .expect("ascending keys")
    }

    #[test]
    fn the_chunks_of_a_prefixed_copy_stay_inside_the_prefix_and_cover_it() {
        let filter = Filter {
            prefix: Some(b"eu:".to_vec()),
            ..Filter::default()
        };
        let keys: [&[u8]; 7] = [
            b"au:1", b"eu:1", b"eu:2", b"eu:9", b"us:1", b"us:\xff", b"zz",
        ];
        // The source's chunks of the tree, cut anywhere: before, across, inside and after the
        // prefix, at a boundary key that is not UTF-8.
        let cuts: [(&[u8], Option<&[u8]>); 5] = [
            (b"", Some(b"au:2")),
            (b"au:2", Some(b"eu:2")),
            (b"eu:2", Some(b"eu:5")),
            (b"eu:5", Some(b"us:\xff")),
            (b"us:\xff", None),
        ];
        let (start, end) = (b"eu:".to_vec(), b"eu;".to_vec());
        let mut covered = start.clone();
        let mut kept = Vec::new();
        for (from, to) in cuts {
            let inside: Vec<&[u8]> = keys
                .iter()
                .copied()
                .filter(|k| *k >= from && to.is_none_or(|to| *k < to))
                .collect();
            let item = chunk_item(
                &filter,
                "t".into(),
                None,
                from.to_vec(),
                to.map(<[u8]>::to_vec),
                entries(&inside),
            );
            let Some(Item::Chunk {
                from, to, entries, ..
            }) = item
            else {
                assert!(item.is_none(), "a chunk gives a chunk or nothing: {item:?}");
                continue;
            };
            let to = to.unwrap_or_else(|| panic!("chunk from {from:?} reaches the tree's end"));
            assert!(
                start <= from && from < to && to <= end,
                "chunk [{from:?}, {to:?}) is not inside the prefix's [{start:?}, {end:?})"
            );
            assert_eq!(from, covered, "the chunks leave a gap in the prefix");
            covered = to;
            kept.extend(entries.iter().map(|(k, _)| k.to_vec()));
        }
        assert_eq!(covered, end, "the chunks do not cover the whole prefix");
        assert_eq!(
            kept,
            [b"eu:1".to_vec(), b"eu:2".to_vec(), b"eu:9".to_vec()],
            "the keys of the prefix, and only those"
        );
    }

    /// A prefix whose next byte string is not text (it ends in U+007F, or in a character
    /// whose last byte is 0xBF): the range ends at the next text, which a sink keyed by text
    /// can name, still past every key of the prefix and before every other text prefix.
    #[test]
    fn a_prefixed_chunk_ends_at_text_whatever_the_prefix_ends_with() {
        for (prefix, end) in [
            ("a\u{7f}", "a\u{80}"),
            ("\u{ff}", "\u{100}"),
            ("eu:", "eu;"),
        ] {
            let (from, to) = prefix_part(prefix.as_bytes(), Vec::new(), None)
                .expect("the whole tree holds the prefix");
            assert_eq!(from, prefix.as_bytes());
            assert_eq!(to.as_deref(), Some(end.as_bytes()), "prefix {prefix:?}");
            let last = [prefix.as_bytes(), &[0xff; 4]].concat();
            assert!(last < end.as_bytes().to_vec(), "prefix {prefix:?}");
        }
        assert_eq!(
            prefix_part(b"", b"a".to_vec(), None),
            Some((b"a".to_vec(), None))
        );
        assert_eq!(prefix_part(b"eu:", b"us:".to_vec(), None), None);
        assert_eq!(prefix_part(b"eu:", Vec::new(), Some(b"eu:".to_vec())), None);
    }

    /// A tree's definitions (sent before its chunk) are stored in the chunk's batch, before
    /// it: the engine sink drops what it holds of a tree at the tree's first chunk, so
    /// definitions stored on their own would be lost (and, left by a copy cut short, would
    /// outlive a source that dropped the tree).
    #[test]
    fn a_trees_definitions_are_stored_with_the_chunk_that_follows_them() {
        let filter = Filter::default();
        let mut to_store = StepItems::default();
        let definitions = vec![
            Op::CreateTree {
                tree: "t".into(),
                merge_operator: Some("add".into()),
            },
            Op::CreateIndex {
                tree: "t".into(),
                name: "i".into(),
                paths: vec!["/a".into()],
                unique: false,
            },
        ];
        assert_eq!(
            to_store.items(BootstrapStep::Ops(definitions.clone()), &filter),
            None,
            "nothing is stored before the chunk"
        );
        let chunk = |from: &[u8]| BootstrapStep::Chunk {
            tree: "t".into(),
            merge_operator: Some("add".into()),
            from: from.to_vec(),
            to: Some(b"m".to_vec()),
            entries: entries(&[]),
            completes_chunk: true,
        };
        let (items, completes_chunk) = to_store
            .items(chunk(b""), &filter)
            .expect("the chunk's batch");
        assert!(completes_chunk);
        assert_eq!(items.len(), 2, "{items:?}");
        assert_eq!(items[0], Item::Ops(definitions));
        assert!(matches!(&items[1], Item::Chunk { from, .. } if from.is_empty()));
        // The next chunk, without definitions before it, is stored alone.
        let (items, _) = to_store
            .items(chunk(b"a"), &filter)
            .expect("the next chunk's batch");
        assert!(
            matches!(items.as_slice(), [Item::Chunk { .. }]),
            "{items:?}"
        );
    }

    #[test]
    fn without_a_prefix_a_chunk_keeps_its_range() {
        let item = chunk_item(
            &Filter::default(),
            "t".into(),
            None,
            b"a".to_vec(),
            Some(b"c".to_vec()),
            entries(&[b"b"]),
        );
        let Some(Item::Chunk { from, to, .. }) = item else {
            panic!("a chunk of an unfiltered copy: {item:?}");
        };
        assert_eq!((from, to), (b"a".to_vec(), Some(b"c".to_vec())));
    }
}
