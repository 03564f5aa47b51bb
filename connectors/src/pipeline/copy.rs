//! One connection's worth of a bootstrap copy: the source's ordered stream of chunks and live
//! records turned into batches, each stored by the sink with the copy's progress as checkpoint.
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

use super::drive::Driver;
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
    mut b: Bootstrap,
    trees: &mut CopiedTrees,
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
        let (items, completes_chunk): (Vec<Item>, bool) = match step {
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
            BootstrapStep::Ops(mut ops) => {
                ops.retain(|op| filter.passes(op));
                let items = if ops.is_empty() {
                    vec![]
                } else {
                    vec![Item::Ops(ops)]
                };
                (items, false)
            }
            BootstrapStep::Chunk {
                tree,
                merge_operator,
                from,
                to,
                mut entries,
                completes_chunk,
            } => {
                let item = filter.tree_passes(&tree).then(|| {
                    if filter.prefix.is_some() {
                        entries.retain(|k| filter.key_passes(k));
                    }
                    Item::Chunk {
                        tree,
                        merge_operator,
                        from,
                        to,
                        entries,
                    }
                });
                (item.into_iter().collect(), completes_chunk)
            }
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
        d.write(sink, batch).await.map_err(CopyStop::Sink)?;
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
