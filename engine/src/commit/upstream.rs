//! Upstream apply: transactions received from an upstream keep their origin GTID and go
//! through the commit pipeline in batches, checked as a whole before any is submitted.
//!
//! Owns: [`Engine::apply_upstream`], [`Engine::apply_upstream_batch`],
//! [`Engine::apply_upstream_owned`], [`Engine::apply_upstream_logged`] and what they report
//! ([`Applied`], [`Refused`]).
//!
//! Must never: submit part of a batch while a bootstrap runs; report a transaction
//! committed before it is durable in the log; return from the applying calls before the
//! applier applied what they report, or from the logged call with more than
//! `async_unapplied_max` transactions logged and not applied.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tideline_wal::{Encoded, NewTransaction};

use super::{Origin, Prepared, Submitted};
use crate::engine::Engine;
use crate::error::WriteError;
use crate::packed::PackedOps;
use crate::state::{CommitInfo, KeysRef, WrittenKeys, lock};

/// What [`Engine::apply_upstream`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The transaction was logged at a local offset and applied.
    Committed(CommitInfo),
    /// Its GTID was already executed (or in flight) here: nothing was done.
    AlreadyExecuted,
}

impl Engine {
    /// Applies a transaction received from an upstream: it keeps its origin GTID and gets
    /// the next local offset, or is skipped when its GTID is already executed here. Allowed
    /// in read-only mode.
    pub fn apply_upstream(&self, txn: NewTransaction) -> Result<Applied, WriteError> {
        let mut out = self.apply_upstream_batch(vec![txn])?;
        Ok(out.pop().unwrap_or(Applied::AlreadyExecuted))
    }

    /// [`Engine::apply_upstream`] for many transactions in order, sharing group commits.
    /// Keys and values of the whole batch are checked before anything is submitted; on a
    /// later error (an unknown tree), the transactions before the failing one are applied
    /// (the call waits for them, so `gtid_executed` shows them when it returns) and nothing
    /// from the failing one on is. The error returned is the first in batch order: a failure
    /// to apply an earlier transaction (fail-stop) comes before the later one's refusal.
    pub fn apply_upstream_batch(
        &self,
        txns: Vec<NewTransaction>,
    ) -> Result<Vec<Applied>, WriteError> {
        self.apply_upstream_owned(txns).map_err(|r| r.error)
    }

    /// [`Engine::apply_upstream_batch`] for a caller that owns its transactions and would
    /// otherwise keep a copy to retry with: when the engine refuses the whole batch because a
    /// bootstrap is running ([`WriteError::Bootstrapping`], nothing applied), the transactions
    /// come back untouched in [`Refused::txns`]; after any other error that list is empty.
    pub fn apply_upstream_owned(
        &self,
        txns: Vec<NewTransaction>,
    ) -> Result<Vec<Applied>, Box<Refused>> {
        self.apply_upstream_until(txns, Until::Applied)
    }

    /// [`Engine::apply_upstream_owned`] for a replica that applies a stream batch after batch
    /// (what the replication task does): it returns once the batch is **durable in this
    /// node's log** and the applier is at most `async_unapplied_max` transactions (65,536 by
    /// default) behind its end, without waiting for the applier to apply it. The caller
    /// prepares its next batches (checks, encoding) while the applier works.
    ///
    /// `gtid_executed`, reads and read fences show the batch once it is applied; a crash
    /// before that loses nothing, since the engine replays its log past the store's applied
    /// offset on open. A GTID logged here and not yet applied is in flight, so a resend of it
    /// is [`Applied::AlreadyExecuted`]. A refusal part-way, a bootstrap refusal and failures
    /// are as for [`Engine::apply_upstream_owned`] (after a refusal part-way the call waits
    /// for the prefix to be applied, so `gtid_executed` shows it on return).
    pub fn apply_upstream_logged(
        &self,
        txns: Vec<NewTransaction>,
    ) -> Result<Vec<Applied>, Box<Refused>> {
        self.apply_upstream_until(txns, Until::Logged)
    }

    fn apply_upstream_until(
        &self,
        txns: Vec<NewTransaction>,
        until: Until,
    ) -> Result<Vec<Applied>, Box<Refused>> {
        let refused = |error| {
            Box::new(Refused {
                error,
                txns: Vec::new(),
            })
        };
        let mut results = Vec::with_capacity(txns.len());
        let mut pending = Vec::with_capacity(txns.len());
        let inner = &self.inner;
        inner.check_not_failed().map_err(refused)?;
        // Limits are checked for the whole batch before anything is submitted. The batch's
        // ops are packed into one copy and its keys into one buffer (allocations per batch,
        // not per transaction), and each record is encoded here, outside the commit lock.
        let mut packed = PackedOps::default();
        packed.reserve(txns.iter().flat_map(|t| &t.ops));
        let mut keys = WrittenKeys::default();
        let mut encoded = Encoded::with_capacity(txns.len());
        let mut parts = Vec::with_capacity(txns.len());
        for t in &txns {
            let first_key = keys.len();
            inner
                .collect_keys(&t.ops, true, &mut keys)
                .map_err(refused)?;
            let index = inner
                .wal
                .encode_into(t, &mut encoded)
                .map_err(|e| refused(e.into()))?;
            parts.push((index, packed.push(&t.ops), first_key..keys.len()));
        }
        let (packed, keys, encoded) = (Arc::new(packed), Arc::new(keys), Arc::new(encoded));
        let prepared = txns
            .into_iter()
            .zip(parts)
            .map(|(t, (index, ops, key_range))| {
                let p = Prepared {
                    ops: t.ops,
                    packed: (packed.clone(), ops),
                    keys: KeysRef::Shared(keys.clone(), key_range),
                    encoded: Some((encoded.clone(), index)),
                };
                (p, t.gtid, t.timestamp_us)
            })
            .collect::<Vec<_>>();
        drop((packed, keys, encoded));
        let mut refusal = None;
        {
            let mut st = lock(&inner.commit);
            // The flag changes only under the commit lock (`bootstrap_begin`), which this
            // loop holds throughout: a running bootstrap refuses the whole batch or none of it.
            if inner.bootstrapping.load(Ordering::SeqCst) {
                return Err(Box::new(Refused {
                    error: WriteError::Bootstrapping,
                    txns: prepared
                        .into_iter()
                        .map(|(p, gtid, timestamp_us)| NewTransaction {
                            gtid,
                            timestamp_us,
                            ops: p.ops,
                        })
                        .collect(),
                }));
            }
            for (p, gtid, timestamp_us) in prepared {
                let origin = Origin::Upstream { gtid, timestamp_us };
                results.push(Applied::AlreadyExecuted);
                match inner.submit_locked(&mut st, p, None, origin) {
                    Ok(Submitted::Logged(f)) => pending.push((results.len() - 1, f)),
                    Ok(Submitted::Nothing { .. }) => {}
                    Err(e) => {
                        refusal = Some(e);
                        break;
                    }
                }
            }
        }
        for (_, f) in &mut pending {
            f.release_spent();
        }
        if let (Until::Logged, None, Some((_, last))) = (until, &refusal, pending.last()) {
            // The applier at most `async_unapplied_max` transactions behind this batch's end
            // (back-pressure), then this batch durable.
            let behind = last
                .offset
                .get()
                .saturating_sub(inner.opts.async_unapplied_max);
            inner.wait_outcome(behind).map_err(refused)?;
            inner.wait_logged(last.offset).map_err(refused)?;
            for (i, f) in pending {
                results[i] = Applied::Committed(f.logged());
            }
            return Ok(results);
        }
        // Submitted transactions are in the log: wait for them even when a later one was
        // refused. A failure here means every later offset fails too (fail-stop).
        for (i, f) in pending {
            results[i] = Applied::Committed(self.inner.finish(f).map_err(refused)?);
        }
        match refusal {
            Some(e) => Err(refused(e)),
            None => Ok(results),
        }
    }
}

/// When an upstream batch's call returns.
#[derive(Debug, Clone, Copy)]
enum Until {
    /// Once the applier applied every transaction of the batch.
    Applied,
    /// Once the batch is durable in the log and the applier at most `async_unapplied_max`
    /// transactions behind its end.
    Logged,
}

/// Why [`Engine::apply_upstream_owned`] applied nothing (or not all), and the transactions it
/// hands back.
#[derive(Debug)]
pub struct Refused {
    /// The refusal, as [`Engine::apply_upstream_batch`] reports it.
    pub error: WriteError,
    /// The batch, untouched, when `error` is [`WriteError::Bootstrapping`]; else empty.
    pub txns: Vec<NewTransaction>,
}
