//! The engine sink: a node's own engine as the destination of a pipeline. A replica is the
//! pipeline whose sink this is (see `replica`); nothing else writes replicated transactions or
//! bootstrap steps into the engine.
//!
//! # How it keeps the contract
//!
//! - **Idempotent by GTID.** A live [`Item::Txn`] is handed to
//!   [`Engine::apply_upstream_batch`]: it keeps its origin GTID and gets the next local offset,
//!   or is a no-op when its GTID is already in `gtid_executed` (re-delivery, multi-source and
//!   circular paths are safe).
//! - **Position with the data.** While following a log the sink's position *is* the engine's
//!   `gtid_executed`, which the engine's applier writes in the same store batch as the
//!   transactions' effects; the [`PipelineCheckpoint::Tail`] of a batch is therefore not stored
//!   separately (a resume goes by GTID set: auto-positioning). While copying, the bootstrap
//!   progress ([`PipelineCheckpoint::Bootstrap`]) is stored by [`Engine::bootstrap_apply`] in
//!   the same atomic store batch as the chunk or ops it follows.
//! - **Bootstrap.** [`Sink::begin_copy`] wipes the engine and records the starting progress
//!   ([`Engine::bootstrap_begin`]); every copy batch becomes one [`Engine::bootstrap_apply`]
//!   call ([`Item::Chunk`] → [`RestoreOp::Chunk`], the ops of [`Item::Record`] and
//!   [`Item::Ops`] → [`RestoreOp::Op`], no GTID marked executed); the
//!   first empty batch with a tail checkpoint of the copy's source ends the copy at that
//!   checkpoint's GTID set ([`Engine::bootstrap_finish`]). Live transactions that meet a copy
//!   they are not part of (another upstream of a multi-source replica) wait ([`SinkError::Retry`]).
//!
//! The progress record is stored in the engine as [`BootstrapProgress::to_json`] (not wrapped
//! in the pipeline's checkpoint JSON), so that a bootstrap interrupted by an older version of
//! the node resumes here, and [`Engine::bootstrap_progress`] stays readable as it was.
//!
//! Errors: a store failure is fail-stop in the engine and [`SinkError::Fatal`] here; a write
//! refused because another copy into this engine is running, or a copy begun while a local
//! commit is in flight, is [`SinkError::Retry`]; input the engine refuses (an unknown tree, a
//! key over the limit) is [`SinkError::Fatal`]: replaying it would be refused again, and
//! skipping it would diverge from the source.
//!
//! Owns: the mapping of batches onto the engine's upstream-apply and bootstrap calls. Must
//! never: assign GTIDs or offsets, apply a GTID already executed, or record bootstrap progress
//! or a GTID set over state it has not stored.

#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use tideline_consumers::{BootstrapProgress, Position};
use tideline_engine::{Applied, Engine, RestoreOp, WriteError};
use tideline_wal::{NewTransaction, Transaction};

use crate::pipeline::PipelineCheckpoint;
use crate::sink::{Batch, EarlierCopy, Item, Sink, SinkError, SinkFuture};

/// A pipeline's destination that is this node's engine.
pub struct EngineSink {
    engine: Arc<Engine>,
    /// Transactions the last [`Sink::write`] committed (not counting GTIDs already executed).
    last_committed: u64,
    /// The source of the copy this sink began or continued, if any: only a tail checkpoint of
    /// that source ends it (a live batch of another upstream of a multi-source replica meets a
    /// running copy and waits; it never finishes a copy it did not make).
    copying: Option<uuid::Uuid>,
}

impl EngineSink {
    /// A sink into `engine`. A copy stored in the engine is this sink's to continue (a resumed
    /// copy begins nothing), whether or not the caller opens the sink (the replica does not):
    /// its done batch must end it, even when it is the first batch written. A progress that
    /// does not decode is left to [`Sink::open`] to report.
    pub fn new(engine: Arc<Engine>) -> Self {
        let copying = engine
            .is_bootstrapping()
            .then(|| engine.bootstrap_progress())
            .flatten()
            .and_then(|p| BootstrapProgress::from_json(&p))
            .map(|p| p.server_uuid);
        EngineSink {
            engine,
            last_committed: 0,
            copying,
        }
    }

    /// How many transactions the last successful write committed; the rest of its
    /// transactions were already executed here.
    pub fn last_committed(&self) -> u64 {
        self.last_committed
    }

    /// Ends the copy this sink made when `batch` is the empty batch with the tail checkpoint
    /// of its source (the engine then holds exactly `pos.gtids`); `Ok(false)`: not such a batch.
    async fn finishes_copy(&mut self, batch: &Batch, pos: &Position) -> Result<bool, SinkError> {
        if !(self.engine.is_bootstrapping()
            && batch.items.is_empty()
            && self.copying == Some(pos.server_uuid))
        {
            return Ok(false);
        }
        let (engine, set) = (self.engine.clone(), pos.gtids.clone());
        blocking(move || engine.bootstrap_finish(&set)).await?;
        self.copying = None;
        Ok(true)
    }

    fn count_committed(&mut self, applied: &[Applied]) {
        self.last_committed = applied
            .iter()
            .filter(|a| matches!(a, Applied::Committed(_)))
            .count() as u64;
    }

    /// The checkpoint the engine holds: the stored bootstrap progress while copying, its
    /// `gtid_executed` otherwise, `None` when it holds nothing at all.
    fn stored(&self) -> Result<Option<PipelineCheckpoint>, SinkError> {
        let engine = &self.engine;
        if engine.is_bootstrapping() {
            let stored = engine.bootstrap_progress().unwrap_or_default();
            let progress = BootstrapProgress::from_json(&stored).ok_or_else(|| {
                SinkError::Fatal(
                    "the engine is in the middle of a bootstrap whose stored progress does not \
                     decode: restart the node with one --upstream to copy that one from scratch"
                        .into(),
                )
            })?;
            return Ok(Some(PipelineCheckpoint::Bootstrap(progress)));
        }
        let gtids = engine.gtid_executed();
        if gtids.is_empty() && engine.trees().is_empty() {
            return Ok(None);
        }
        // No epoch: the resume goes by GTID set, whatever node it meets.
        Ok(Some(PipelineCheckpoint::Tail(Position {
            server_uuid: engine.server_uuid(),
            offset: 0,
            gtids,
            epoch: None,
        })))
    }
}

/// How long [`Sink::open`] waits for the engine to apply what it logged: at most
/// `async_unapplied_max` transactions (65,536 by default; see
/// [`Engine::apply_upstream_logged`]), well under a second at the apply's rate.
const APPLY_WAIT: Duration = Duration::from_secs(60);

/// Runs a blocking engine call off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, WriteError> + Send + 'static,
) -> Result<T, SinkError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SinkError::Fatal(format!("engine task failed: {e}")))?
        .map_err(write_error)
}

fn write_error(e: WriteError) -> SinkError {
    match e {
        WriteError::Bootstrapping => SinkError::Retry(format!(
            "{e}: another copy into this node is running; waiting until it has finished"
        )),
        // Passing: the commit finishes. The replica pauses local writes before it decides to
        // copy and begins (`replica::LocalWritesPaused`), so it does not meet this.
        WriteError::CommitsInFlight { applied, submitted } => SinkError::Retry(format!(
            "a transaction committed on this read-write node is still in flight (applied \
             offset {applied}, submitted {submitted}): the copy begins once it is applied"
        )),
        e => SinkError::Fatal(e.to_string()),
    }
}

fn copy_step_with_tail() -> SinkError {
    SinkError::Fatal("internal: a copy step with a tail position".into())
}

fn new_transaction(t: &Transaction) -> NewTransaction {
    NewTransaction {
        gtid: t.gtid,
        timestamp_us: t.timestamp_us,
        ops: t.ops.clone(),
    }
}

impl EngineSink {
    /// One copy step: `items` (chunks and ops of the copy, nothing live) and the progress
    /// after them, stored together by one [`Engine::bootstrap_apply`].
    async fn copy_step(
        &mut self,
        items: Vec<Item>,
        progress: BootstrapProgress,
    ) -> Result<(), SinkError> {
        if !self.engine.is_bootstrapping() {
            return Err(SinkError::Fatal(
                "internal: a copy step for an engine that is not bootstrapping (the copy was \
                 not begun)"
                    .into(),
            ));
        }
        let mut ops = Vec::with_capacity(items.len());
        for item in items {
            match item {
                // A record's GTID is not executed here: the copy's end GTID set holds it.
                Item::Record(r) => ops.extend(r.txn.ops.into_iter().map(RestoreOp::Op)),
                Item::Ops(o) => ops.extend(o.into_iter().map(RestoreOp::Op)),
                Item::Chunk {
                    tree,
                    merge_operator,
                    from,
                    to,
                    entries,
                } => ops.push(RestoreOp::Chunk {
                    tree,
                    merge_operator,
                    from,
                    to,
                    entries,
                }),
                Item::Txn(t) => {
                    return Err(SinkError::Fatal(format!(
                        "internal: live transaction {} inside a copy step",
                        t.gtid
                    )));
                }
            }
        }
        let engine = self.engine.clone();
        let source = progress.server_uuid;
        let progress = progress.to_json();
        blocking(move || engine.bootstrap_apply(ops, &progress)).await?;
        self.copying = Some(source);
        Ok(())
    }
}

impl Sink for EngineSink {
    fn describe(&self) -> String {
        format!("engine {}", self.engine.server_uuid())
    }

    fn open(&mut self) -> SinkFuture<'_, Result<Option<Vec<u8>>, SinkError>> {
        Box::pin(async move {
            // A live batch's write returns once it is in the log, before its apply; the
            // checkpoint (`gtid_executed`, what is applied) holds every batch written once the
            // applier caught up.
            let engine = self.engine.clone();
            if !blocking(move || engine.wait_all_visible(APPLY_WAIT)).await? {
                return Err(SinkError::Retry(format!(
                    "the engine has not applied the transactions it logged within {APPLY_WAIT:?}"
                )));
            }
            let stored = self.stored()?;
            // As in `new`: a copy stored in the engine is this sink's to continue.
            if let Some(PipelineCheckpoint::Bootstrap(p)) = &stored {
                self.copying = Some(p.server_uuid);
            }
            Ok(stored.map(|c| c.encode()))
        })
    }

    /// Wipes the engine (whatever `earlier` names: nothing of an earlier copy stays).
    fn begin_copy<'a>(
        &'a mut self,
        checkpoint: &'a [u8],
        _earlier: &'a EarlierCopy,
    ) -> SinkFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            let progress = match PipelineCheckpoint::decode(checkpoint) {
                Ok(PipelineCheckpoint::Bootstrap(p)) => p,
                Ok(PipelineCheckpoint::Tail(_)) => {
                    return Err(SinkError::Fatal(
                        "internal: a copy begun with a tail position".into(),
                    ));
                }
                Err(e) => return Err(SinkError::Fatal(format!("internal: {e}"))),
            };
            let engine = self.engine.clone();
            let source = progress.server_uuid;
            blocking(move || engine.bootstrap_begin(&progress.to_json())).await?;
            self.copying = Some(source);
            Ok(())
        })
    }

    fn write<'a>(&'a mut self, batch: &'a Batch) -> SinkFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            self.last_committed = 0;
            let checkpoint = PipelineCheckpoint::decode(&batch.checkpoint)
                .map_err(|e| SinkError::Fatal(format!("internal: {e}")))?;
            match checkpoint {
                PipelineCheckpoint::Bootstrap(progress) => {
                    self.copy_step(batch.items.clone(), progress).await
                }
                PipelineCheckpoint::Tail(pos) => {
                    if self.finishes_copy(batch, &pos).await? {
                        return Ok(());
                    }
                    let mut txns = Vec::with_capacity(batch.items.len());
                    for item in &batch.items {
                        match item {
                            Item::Txn(t) => txns.push(new_transaction(t)),
                            _ => return Err(copy_step_with_tail()),
                        }
                    }
                    if txns.is_empty() {
                        // Nothing to apply; the position is `gtid_executed`, already stored.
                        return Ok(());
                    }
                    let engine = self.engine.clone();
                    let applied = blocking(move || engine.apply_upstream_batch(txns)).await?;
                    self.count_committed(&applied);
                    Ok(())
                }
            }
        })
    }

    /// The replica's path: live transactions move into the engine without a copy; a batch
    /// the engine refuses because a copy is running comes back whole (the engine hands the
    /// transactions back). A copy step's chunks and ops move into the engine too; every error
    /// of a copy step is fatal, so its batch comes back emptied, never to be retried. The
    /// other kinds of batch go through [`Sink::write`].
    fn write_owned(&mut self, batch: Batch) -> SinkFuture<'_, Result<(), (SinkError, Batch)>> {
        Box::pin(async move {
            let live = batch.items.iter().all(|i| matches!(i, Item::Txn(_)));
            let pos = match PipelineCheckpoint::decode(&batch.checkpoint) {
                Ok(PipelineCheckpoint::Tail(pos)) if live => pos,
                Ok(PipelineCheckpoint::Bootstrap(progress)) => {
                    self.last_committed = 0;
                    let Batch {
                        source,
                        items,
                        checkpoint,
                    } = batch;
                    return self.copy_step(items, progress).await.map_err(|e| {
                        let emptied = Batch {
                            source,
                            items: Vec::new(),
                            checkpoint,
                        };
                        (SinkError::Fatal(e.message().to_string()), emptied)
                    });
                }
                _ => {
                    return match self.write(&batch).await {
                        Ok(()) => Ok(()),
                        Err(e) => Err((e, batch)),
                    };
                }
            };
            self.last_committed = 0;
            match self.finishes_copy(&batch, &pos).await {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => return Err((e, batch)),
            }
            if batch.items.is_empty() {
                return Ok(());
            }
            let Batch {
                source,
                items,
                checkpoint,
            } = batch;
            // The engine keeps no source offsets: a batch handed back gets them from here.
            let mut offsets = Vec::with_capacity(items.len());
            let txns: Vec<NewTransaction> = items
                .into_iter()
                .filter_map(|i| match i {
                    Item::Txn(t) => {
                        offsets.push(t.offset);
                        Some(NewTransaction {
                            gtid: t.gtid,
                            timestamp_us: t.timestamp_us,
                            ops: t.ops,
                        })
                    }
                    _ => None,
                })
                .collect();
            let engine = self.engine.clone();
            // Returns once the batch is durable in the log, with the applier at most
            // `async_unapplied_max` transactions behind: the next batches are received and
            // prepared while the applier applies this one.
            let result = tokio::task::spawn_blocking(move || engine.apply_upstream_logged(txns))
                .await
                .map_err(|e| SinkError::Fatal(format!("engine task failed: {e}")));
            // Whole after a refusal because a copy runs (the only `Retry`); emptied after a
            // fatal error, which ends the pipeline.
            let back = |txns: Vec<NewTransaction>| Batch {
                source,
                items: txns
                    .into_iter()
                    .zip(offsets)
                    .map(|(t, offset)| {
                        Item::Txn(Transaction {
                            offset,
                            gtid: t.gtid,
                            timestamp_us: t.timestamp_us,
                            ops: t.ops,
                        })
                    })
                    .collect(),
                checkpoint,
            };
            match result {
                Err(e) => Err((e, back(Vec::new()))),
                Ok(Ok(applied)) => {
                    self.count_committed(&applied);
                    Ok(())
                }
                Ok(Err(refused)) => Err((write_error(refused.error), back(refused.txns))),
            }
        })
    }
}
