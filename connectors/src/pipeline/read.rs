//! The pipeline's reading side: batches taken from the tail (filtered here for what the source
//! cannot filter), and, while a write goes on past a second, the next batch read ahead and the
//! lag shown as it grows.
//!
//! Owns: [`Reader`], [`ReadAhead`], [`Unstored`]. Must never: hold more than one batch read
//! ahead of the sink, or store anything (the sink does, with its data).

use std::time::Duration;

use futures_util::StreamExt;
use tideline_consumers::{Position, Tail};
use tideline_wal::Transaction;

use super::drive::{Driver, Relearn};
use super::{Filter, PipelineConfig, PipelineError, SharedPipelineStatus};
use crate::sink::{Batch, Item, Sink};

/// How often a write that goes on (failing, held, slow) shows the lag as it grows.
const LAG_REFRESH: Duration = Duration::from_secs(1);

/// The pipeline's side of the tail: batches read from it, and what was read on from it while
/// a write went on.
pub(super) struct Reader<'a> {
    pub(super) cfg: &'a PipelineConfig,
    pub(super) tail: Tail,
    pub(super) ahead: ReadAhead,
}

/// What the pipeline read from the tail while a write went on ([`Reader::write_watching`]):
/// the start of the next batch. At most one batch (`batch_changes` changes, plus the
/// transaction that passes it), so a sink that is down holds no more than that in memory.
#[derive(Default)]
pub(super) struct ReadAhead {
    /// The transactions that passed the filter, in log order.
    items: Vec<Item>,
    changes: usize,
    /// When the first transaction was read (filtered out or not): the next batch closes
    /// `batch_delay` after it, as if read then.
    first_at: Option<tokio::time::Instant>,
    /// How the tail ended, read after `items`: the next batch ends with it.
    end: Option<TailEnd>,
}

enum TailEnd {
    /// The tail's stream ended.
    Ended,
    /// The tail failed for good.
    Failed(PipelineError),
}

impl ReadAhead {
    /// Whether to read on: not past one batch, nor past the tail's end.
    fn has_room(&self, batch_changes: usize) -> bool {
        self.end.is_none() && self.changes < batch_changes
    }
}

/// What a batch being written leaves unstored, to show the lag while its write goes on.
pub(super) struct Unstored {
    /// The node (and history) the batch was read from: the source head is measured on it.
    node: uuid::Uuid,
    epoch: Option<tideline_wal::Epoch>,
    /// The offset on that node the lag counts from: the position the sink stored, if it is
    /// on that node (and history); else the one before the batch's first transaction.
    stored_offset: u64,
    /// The commit time of the batch's first transaction, the oldest the sink has not stored.
    oldest_ts_us: Option<i64>,
}

impl Unstored {
    pub(super) fn of(written: Option<&Position>, pos: &Position, items: &[Item]) -> Self {
        let first = items.iter().find_map(|i| match i {
            Item::Txn(t) => Some(t),
            _ => None,
        });
        let stored_offset = match written {
            Some(w) if w.server_uuid == pos.server_uuid && w.epoch == pos.epoch => w.offset,
            _ => first.map_or(pos.offset, |t| t.offset.get().saturating_sub(1)),
        };
        Unstored {
            node: pos.server_uuid,
            epoch: pos.epoch,
            stored_offset,
            oldest_ts_us: first.map(|t| t.timestamp_us),
        }
    }

    /// Whether `tail` is still on the batch's node and history: its head counts only then,
    /// as offsets elsewhere do not compare with the stored one.
    pub(super) fn is_on(&self, tail: &Tail) -> bool {
        tail.position()
            .is_some_and(|p| p.server_uuid == self.node && p.epoch == self.epoch)
    }
}

impl Reader<'_> {
    /// Reads up to one batch (what was read ahead first): returns once it holds
    /// `batch_changes` changes, or `batch_delay` after its first transaction, or on an idle
    /// second (to store a position that moved by filtered transactions). `true` when the tail
    /// has ended.
    pub(super) async fn next_batch(&mut self) -> Result<(Vec<Item>, bool), PipelineError> {
        let cfg = self.cfg;
        let ReadAhead {
            mut items,
            mut changes,
            first_at,
            end,
        } = std::mem::take(&mut self.ahead);
        match end {
            Some(TailEnd::Ended) => return Ok((items, true)),
            Some(TailEnd::Failed(e)) => return Err(e),
            None => {}
        }
        let mut deadline = match first_at {
            Some(at) => at + cfg.batch_delay,
            None => tokio::time::Instant::now() + Duration::from_secs(1),
        };
        let mut first = first_at.is_none();
        while changes < cfg.batch_changes {
            let next = match tokio::time::timeout_at(deadline, self.tail.next()).await {
                Err(_) => break,
                Ok(n) => n,
            };
            let txn = match next {
                None => return Ok((items, true)),
                Some(Err(e)) => return Err(self.failed(&e)),
                Some(Ok(t)) => t,
            };
            if first {
                first = false;
                deadline = tokio::time::Instant::now() + cfg.batch_delay;
            }
            if let Some(t) = filtered(&cfg.filter, txn) {
                changes += t.ops.len().max(1);
                items.push(Item::Txn(t));
            }
        }
        Ok((items, false))
    }

    fn failed(&self, e: &tideline_consumers::TailError) -> PipelineError {
        PipelineError::Source {
            addr: self.cfg.addr.clone(),
            message: e.to_string(),
        }
    }

    /// Keeps what the tail returned while a write went on, for the next batch.
    fn keep(&mut self, next: Option<Result<Transaction, tideline_consumers::TailError>>) {
        match next {
            None => self.ahead.end = Some(TailEnd::Ended),
            Some(Err(e)) => self.ahead.end = Some(TailEnd::Failed(self.failed(&e))),
            Some(Ok(txn)) => {
                self.ahead
                    .first_at
                    .get_or_insert_with(tokio::time::Instant::now);
                if let Some(t) = filtered(&self.cfg.filter, txn) {
                    self.ahead.changes += t.ops.len().max(1);
                    self.ahead.items.push(Item::Txn(t));
                }
            }
        }
    }

    /// Writes `batch` as [`Driver::write_learning`] does, `unstored` saying what it leaves
    /// unstored until it returns. A write that goes on past [`LAG_REFRESH`] (the sink fails,
    /// holds or is slow) is watched: the tail is read on meanwhile, up to one batch kept for
    /// the next write (the tail learns the source's head only as it is read: from its
    /// batches, and from its heartbeats once the source has sent it everything), and every
    /// [`LAG_REFRESH`] the status shows the lag as it grows, not as it was when the sink last
    /// stored. A write that returns sooner is neither watched nor read past.
    pub(super) async fn write_watching(
        &mut self,
        d: &Driver<'_>,
        source: &dyn Relearn,
        st: &SharedPipelineStatus,
        sink: &mut dyn Sink,
        batch: Batch,
        unstored: &Unstored,
    ) -> Result<(), PipelineError> {
        let write = d.write_learning(sink, batch, Some(source));
        tokio::pin!(write);
        let mut tick =
            tokio::time::interval_at(tokio::time::Instant::now() + LAG_REFRESH, LAG_REFRESH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut watching = false;
        loop {
            let read_on = watching && self.ahead.has_room(self.cfg.batch_changes);
            tokio::select! {
                biased;
                r = &mut write => return r,
                _ = tick.tick() => {
                    watching = true;
                    let here = unstored.is_on(&self.tail);
                    let head = self.tail.head();
                    st.update(|s| {
                        s.behind(
                            head,
                            here.then_some(unstored.stored_offset),
                            unstored.oldest_ts_us,
                        );
                    });
                }
                // Cancel-safe: a transaction the tail has not returned stays in it.
                next = self.tail.next(), if read_on => self.keep(next),
            }
        }
    }
}

/// The transaction with only the ops that pass; `None` when none does.
fn filtered(filter: &Filter, mut txn: Transaction) -> Option<Transaction> {
    if !filter.is_empty() {
        txn.ops.retain(|op| filter.passes(op));
    }
    (!txn.ops.is_empty()).then_some(txn)
}
