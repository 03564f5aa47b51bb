//! Calling a sink: opening it, beginning a copy and writing batches, each retried as the
//! sink's error says, with the outcome reported. Shared by every pipeline and by the replica
//! (whose sink is the engine), so that there is one retry policy for all of them.
//!
//! Owns: [`Driver`] (retry settings and whom to report to), [`Report`], [`Relearn`] (what a
//! held write asks the source again), the jittered backoff.
//! Must never: change a batch between retries, or report a batch written before the sink
//! returned.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tideline_consumers::{BootstrapProgress, Position};

use super::{Filter, PipelineCheckpoint, PipelineConfig, PipelineError, SharedPipelineStatus};
use crate::sink::{Batch, EarlierCopy, Sink, SinkError, SinkFuture};

/// Where the shared steps report what happened: a pipeline's status, or a replica's upstream
/// status. Called without any lock held; implementations must not block.
pub(crate) trait Report: Sync {
    /// A sink call failed and will be tried again (`first`: the first failure of an outage).
    fn sink_failed(&self, e: &SinkError, first: bool);
    /// A sink call succeeded after failures.
    fn sink_recovered(&self);
    /// A batch was stored.
    fn wrote(&self, txns: u64, changes: u64, last_ts_us: Option<i64>);
    /// A copy step was stored; `rate` in bytes per second.
    fn copy_step(&self, progress: &BootstrapProgress, rate: f64);
    /// The copy is complete and stored; the live tail takes over at `pos`.
    fn copy_done(&self, pos: &Position, progress: &BootstrapProgress, rate: f64);
}

/// What the source's `status` says of its trees, for a sink that stores values: handed to it
/// when the pipeline starts and again before a held write is retried ([`Relearn`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct SourceTrees {
    /// Tree → merge operator name, for trees that have one (`merge_operators`).
    pub operators: BTreeMap<String, String>,
    /// Every tree the source has (`trees`), listed no earlier than the source offset beside it
    /// (`last_offset`); `None` when the status does not say, or when the pipeline's filter
    /// keeps `drop_tree` from the sink (a tree the list lacks then has no drop to follow).
    pub trees: Option<(BTreeSet<String>, u64)>,
}

impl SourceTrees {
    /// Hands these to `sink` ([`Sink::set_merge_operators`], [`Sink::set_source_trees`]).
    pub(crate) fn hand_to(&self, sink: &mut dyn Sink) {
        sink.set_merge_operators(&self.operators);
        if let Some((trees, as_of_offset)) = &self.trees {
            sink.set_source_trees(trees, *as_of_offset);
        }
    }

    /// Whether the trees or operators differ from `other`'s (where the list was read aside).
    pub(crate) fn differs(&self, other: &SourceTrees) -> bool {
        self.operators != other.operators
            || self.trees.as_ref().map(|t| &t.0) != other.trees.as_ref().map(|t| &t.0)
    }
}

/// Where a write that holds can learn again what the source says of its trees: a sink of
/// values holds a merge on a tree whose operator it was not told (a tree created after the
/// pipeline read the source's `status`, whose `create_tree` the filter left out), and the
/// source may name it now; or on a tree the source no longer has, dropped after the merge,
/// which a status read after the merge no longer lists. A pipeline's reads the source's
/// `status`.
pub(crate) trait Relearn: Sync {
    /// What the source's `status` says of its trees now, and whether its trees or merge
    /// operators differ from the ones last handed to the sink; `None` when the source cannot
    /// be asked now.
    fn read_again(&self) -> SinkFuture<'_, Option<(SourceTrees, bool)>>;
}

/// How the shared steps retry, and whom they report to.
pub(crate) struct Driver<'a> {
    /// Name for logs (a pipeline's name, a replica's upstream address).
    pub name: &'a str,
    /// First retry delay after a `Retry` error (doubles, with jitter, up to `retry_max`).
    pub retry_min: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// Pause before a held sink is tried again.
    pub hold_pause: Duration,
    /// Where outcomes go.
    pub report: &'a dyn Report,
    /// The filter recorded in every checkpoint handed to the sink (a pipeline's, see
    /// [`PipelineCheckpoint::with_filter`]); `None` for a replica, whose engine sink builds its
    /// checkpoints from engine state.
    pub stamp: Option<&'a Filter>,
}

impl<'a> Driver<'a> {
    /// The driver of pipeline `cfg`, reporting to `st`.
    pub(crate) fn of(cfg: &'a PipelineConfig, st: &'a SharedPipelineStatus) -> Self {
        Driver {
            name: &cfg.name,
            retry_min: cfg.retry_min,
            retry_max: cfg.retry_max,
            hold_pause: cfg.hold_pause,
            report: st,
            stamp: Some(&cfg.filter),
        }
    }

    /// `checkpoint` with the filter to record in it, if any.
    fn stamped(&self, checkpoint: Vec<u8>) -> Vec<u8> {
        match self.stamp {
            Some(f) => PipelineCheckpoint::with_filter(checkpoint, f),
            None => checkpoint,
        }
    }

    /// The pause before retry number `failures + 1`.
    pub(crate) fn backoff(&self, failures: u32) -> Duration {
        let base = self
            .retry_min
            .saturating_mul(1u32 << failures.min(16))
            .min(self.retry_max);
        // ±25% so that the pipelines of one restarted server do not retry in lockstep.
        base.mul_f64(rand::random_range(0.75..1.25))
    }

    /// What to do after a failed sink call: the pause before trying again, or the error that
    /// stops the caller. `Retry` waits with jittered backoff, `Hold` waits `hold_pause`,
    /// `Fatal` stops.
    fn after_failure(
        &self,
        sink: &dyn Sink,
        e: SinkError,
        failures: &mut u32,
    ) -> Result<Duration, PipelineError> {
        if let SinkError::Fatal(message) = e {
            return Err(PipelineError::Sink {
                sink: sink.describe(),
                message,
            });
        }
        tracing::warn!(pipeline = %self.name, sink = %sink.describe(), error = %e, "sink failed");
        self.report.sink_failed(&e, *failures == 0);
        let delay = match e {
            SinkError::Hold(_) => self.hold_pause,
            _ => self.backoff(*failures),
        };
        *failures += 1;
        Ok(delay)
    }

    fn after_success(&self, sink: &dyn Sink, failures: u32) {
        if failures > 0 {
            tracing::info!(pipeline = %self.name, sink = %sink.describe(), "sink reachable again");
            self.report.sink_recovered();
        }
    }

    /// Opens the sink, retrying as its errors say; returns the checkpoint it holds.
    pub(crate) async fn open(&self, sink: &mut dyn Sink) -> Result<Option<Vec<u8>>, PipelineError> {
        let mut failures = 0;
        loop {
            match sink.open().await {
                Ok(v) => {
                    self.after_success(sink, failures);
                    return Ok(v);
                }
                Err(e) => {
                    let delay = self.after_failure(sink, e, &mut failures)?;
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Tells the sink a copy starts from scratch at `checkpoint`, replacing `earlier`,
    /// retrying as it says.
    pub(crate) async fn begin_copy(
        &self,
        sink: &mut dyn Sink,
        checkpoint: &[u8],
        earlier: &EarlierCopy,
    ) -> Result<(), PipelineError> {
        let checkpoint = self.stamped(checkpoint.to_vec());
        let mut failures = 0;
        loop {
            match sink.begin_copy(&checkpoint, earlier).await {
                Ok(()) => {
                    self.after_success(sink, failures);
                    return Ok(());
                }
                Err(e) => {
                    let delay = self.after_failure(sink, e, &mut failures)?;
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Writes `batch` (handed to the sink by value, back on a failure), retrying as the
    /// error says; reports it once stored.
    pub(crate) async fn write(
        &self,
        sink: &mut dyn Sink,
        batch: Batch,
    ) -> Result<(), PipelineError> {
        self.write_learning(sink, batch, None).await
    }

    /// [`Driver::write`]; and before a `Hold` pauses it, reads what `source` says of its trees
    /// again and hands it to the sink (the retry after the pause uses it): if the trees or
    /// merge operators changed, the sink is tried again at once, with nothing held or
    /// counted. Held only when they did not (or the source cannot be asked).
    pub(crate) async fn write_learning(
        &self,
        sink: &mut dyn Sink,
        mut batch: Batch,
        source: Option<&dyn Relearn>,
    ) -> Result<(), PipelineError> {
        let last_ts = batch.txns().last().map(|t| t.timestamp_us);
        let (txns, changes) = (batch.txns().count() as u64, batch.changes() as u64);
        // Once, before the first try: every retry hands the sink the same bytes.
        batch.checkpoint = self.stamped(std::mem::take(&mut batch.checkpoint));
        let mut failures = 0;
        loop {
            match sink.write_owned(batch).await {
                Ok(()) => break self.after_success(sink, failures),
                Err((e, back)) => {
                    batch = back;
                    // Tried again at once only when the source's trees or operators changed
                    // since the sink was last handed them, so this cannot spin.
                    if let (SinkError::Hold(why), Some(source)) = (&e, source)
                        && let Some((now, changed)) = source.read_again().await
                    {
                        now.hand_to(sink);
                        if changed {
                            tracing::info!(pipeline = %self.name, sink = %sink.describe(), held = %why, "the source's trees or merge operators changed; trying the batch again with them");
                            continue;
                        }
                    }
                    let delay = self.after_failure(sink, e, &mut failures)?;
                    tokio::time::sleep(delay).await;
                }
            }
        }
        self.report.wrote(txns, changes, last_ts);
        Ok(())
    }
}

impl Report for SharedPipelineStatus {
    fn sink_failed(&self, e: &SinkError, first: bool) {
        self.update(|s| s.failed(e, first));
    }

    fn sink_recovered(&self) {
        self.update(|s| s.recovered());
    }

    fn wrote(&self, txns: u64, changes: u64, last_ts_us: Option<i64>) {
        self.update(|s| s.wrote(txns, changes, last_ts_us));
    }

    fn copy_step(&self, progress: &BootstrapProgress, rate: f64) {
        self.update(|s| s.bootstrap = Some(crate::bootstrap::progress_json(progress, rate)));
    }

    fn copy_done(&self, pos: &Position, progress: &BootstrapProgress, rate: f64) {
        self.update(|s| {
            s.bootstrap = Some(crate::bootstrap::progress_json(progress, rate));
            s.position = Some(pos.clone());
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::SinkFuture;
    use crate::{PipelineState, PipelineStatus};

    /// A driver that retries and pauses for a millisecond, reporting to `report`.
    fn quick<'a>(report: &'a dyn Report, stamp: Option<&'a Filter>) -> Driver<'a> {
        Driver {
            name: "p",
            retry_min: Duration::from_millis(1),
            retry_max: Duration::from_millis(1),
            hold_pause: Duration::from_millis(1),
            report,
            stamp,
        }
    }

    /// A batch of nothing, carrying `checkpoint`.
    fn empty(checkpoint: &[u8]) -> Batch {
        Batch {
            source: uuid::Uuid::nil(),
            items: vec![],
            checkpoint: checkpoint.to_vec(),
        }
    }

    /// A sink that stores everything.
    struct Stores;

    impl Sink for Stores {
        fn describe(&self) -> String {
            "test".into()
        }
        fn open(&mut self) -> SinkFuture<'_, Result<Option<Vec<u8>>, SinkError>> {
            Box::pin(async { Ok(None) })
        }
        fn write<'a>(&'a mut self, _: &'a Batch) -> SinkFuture<'a, Result<(), SinkError>> {
            Box::pin(async { Ok(()) })
        }
    }

    /// `last_error` is cleared once the sink stores again (docs/OPERATIONS.md, "Status"),
    /// whoever set it: an error of the source (a bootstrap stream that ended early) must not
    /// stay on a pipeline whose sink has stored since, though no sink call failed.
    #[tokio::test]
    async fn a_stored_batch_clears_an_error_of_the_source() {
        let st = PipelineStatus::shared("p", "source", "sink");
        st.update(|s| {
            s.state = PipelineState::Bootstrapping;
            s.last_error = Some("the bootstrap stream ended early".into());
        });
        let d = quick(&st, None);
        let batch = empty(b"step");
        d.write(&mut Stores, batch).await.unwrap();
        let s = st.get();
        assert_eq!(s.last_error, None, "{}", s.to_json());
        assert_eq!(s.state, PipelineState::Bootstrapping);
    }

    /// A sink that fails its first write and records every checkpoint it is handed.
    #[derive(Default)]
    struct Records {
        seen: Vec<Vec<u8>>,
    }

    impl Sink for Records {
        fn describe(&self) -> String {
            "test".into()
        }
        fn open(&mut self) -> SinkFuture<'_, Result<Option<Vec<u8>>, SinkError>> {
            Box::pin(async { Ok(None) })
        }
        fn write<'a>(&'a mut self, batch: &'a Batch) -> SinkFuture<'a, Result<(), SinkError>> {
            self.seen.push(batch.checkpoint.clone());
            let first = self.seen.len() == 1;
            Box::pin(async move {
                if first {
                    Err(SinkError::Retry("once".into()))
                } else {
                    Ok(())
                }
            })
        }
    }

    /// A copy whose first write fails (PostgreSQL restarting, say) has stored no step yet, so
    /// the status holds no copy progress; once the write is stored the state must be the
    /// copy's again (`bootstrapping`), not `running`: automation that waits for `running`
    /// takes the copy for finished (docs/reliability.md, fourth code review).
    #[tokio::test]
    async fn a_copy_recovered_from_a_failed_first_write_still_shows_bootstrapping() {
        let st = PipelineStatus::shared("p", "source", "sink");
        st.update(|s| s.enter(PipelineState::Bootstrapping));
        let d = quick(&st, None);
        let batch = empty(b"first step");
        d.write(&mut Records::default(), batch).await.unwrap();
        let s = st.get();
        assert_eq!(s.bootstrap, None, "no copy step reported");
        assert_eq!(
            s.state,
            PipelineState::Bootstrapping,
            "after a retried first copy write: {}",
            s.to_json()
        );
    }

    /// A sink of values that holds every write until it is told tree `late`'s operator.
    #[derive(Default)]
    struct NeedsLate {
        told: BTreeMap<String, String>,
        tries: u32,
    }

    impl Sink for NeedsLate {
        fn describe(&self) -> String {
            "test".into()
        }
        fn open(&mut self) -> SinkFuture<'_, Result<Option<Vec<u8>>, SinkError>> {
            Box::pin(async { Ok(None) })
        }
        fn write<'a>(&'a mut self, _: &'a Batch) -> SinkFuture<'a, Result<(), SinkError>> {
            self.tries += 1;
            let known = self.told.contains_key("late");
            Box::pin(async move {
                if known {
                    Ok(())
                } else {
                    Err(SinkError::Hold("a merge on tree `late`".into()))
                }
            })
        }
        fn set_merge_operators(&mut self, operators: &BTreeMap<String, String>) {
            self.told.extend(operators.clone());
        }
    }

    /// Answers `read_again` from a list (an operator map: changed; `None`: unchanged), then
    /// with "unchanged".
    struct Answers(std::sync::Mutex<Vec<Option<BTreeMap<String, String>>>>);

    impl Relearn for Answers {
        fn read_again(&self) -> SinkFuture<'_, Option<(SourceTrees, bool)>> {
            let next = {
                let mut a = self.0.lock().unwrap();
                if a.is_empty() { None } else { a.remove(0) }
            };
            let answer = match next {
                Some(operators) => (
                    SourceTrees {
                        operators,
                        trees: None,
                    },
                    true,
                ),
                None => (SourceTrees::default(), false),
            };
            Box::pin(async move { Some(answer) })
        }
    }

    /// A merge on a tree created after the pipeline read the source's operators (its
    /// `create_tree` filtered out) is stored once the source names the tree's operator:
    /// read again before the write holds, and tried again at once, never shown as `held`;
    /// held only while the source's operators are what the sink already has.
    #[tokio::test]
    async fn a_held_write_is_tried_again_at_once_with_operators_the_source_names_now() {
        let late = || Some(BTreeMap::from([("late".to_string(), "add".to_string())]));
        for (answers, holds) in [(vec![late()], 0), (vec![None, late()], 1)] {
            let st = PipelineStatus::shared("p", "source", "sink");
            st.update(|s| s.enter(PipelineState::Running));
            let d = quick(&st, None);
            let batch = empty(b"batch");
            let mut sink = NeedsLate::default();
            let source = Answers(std::sync::Mutex::new(answers));
            d.write_learning(&mut sink, batch, Some(&source))
                .await
                .unwrap();
            let s = st.get();
            assert_eq!(s.errors_total, holds, "{}", s.to_json());
            assert_eq!(
                (s.state, sink.tries),
                (PipelineState::Running, holds as u32 + 2)
            );
        }
    }

    /// A pipeline's checkpoints record its filter, the same bytes on every retry; the
    /// replica's driver (no filter to record) hands them on as they are.
    #[tokio::test]
    async fn a_pipeline_driver_records_its_filter_in_every_checkpoint() {
        let st = PipelineStatus::shared("p", "source", "sink");
        let filter = Filter {
            trees: vec!["a".into()],
            prefix: None,
            ops: vec![],
        };
        let checkpoint = PipelineCheckpoint::Tail(Position {
            server_uuid: uuid::Uuid::from_bytes([1; 16]),
            offset: 3,
            gtids: Default::default(),
            epoch: None,
        })
        .encode();
        for stamp in [Some(&filter), None] {
            let d = quick(&st, stamp);
            let mut sink = Records::default();
            let batch = Batch {
                source: uuid::Uuid::nil(),
                items: vec![],
                checkpoint: checkpoint.clone(),
            };
            d.write(&mut sink, batch).await.unwrap();
            assert_eq!(sink.seen.len(), 2, "one failure, one retry");
            assert_eq!(sink.seen[0], sink.seen[1], "a retry hands the same bytes");
            assert_eq!(
                PipelineCheckpoint::stored_filter(&sink.seen[1]).unwrap(),
                stamp.cloned()
            );
            assert_eq!(
                PipelineCheckpoint::decode(&sink.seen[1]).unwrap(),
                PipelineCheckpoint::decode(&checkpoint).unwrap()
            );
            if stamp.is_none() {
                assert_eq!(sink.seen[1], checkpoint);
            }
        }
    }
}
