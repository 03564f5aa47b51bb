//! What `status`, `/metrics` and the overview page show of a pipeline.
//!
//! Owns: [`PipelineStatus`] and its JSON. Must never: hold its lock across an `.await`.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::json;
use tideline_consumers::Position;

use crate::sink::SinkError;

/// A pipeline's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PipelineState {
    /// Opening the sink, or connecting to the source.
    Starting,
    /// Copying the source's state.
    Bootstrapping,
    /// Following the source's log.
    Running,
    /// The sink failed with a passing fault, or the source is out of reach; retrying with
    /// backoff.
    Retrying,
    /// The sink needs an operator; tried again after a long pause.
    Held,
    /// Stopped on an error (see `last_error`).
    Failed,
}

impl PipelineState {
    /// Every state, for metrics that export one series per state.
    pub const ALL: [PipelineState; 6] = [
        PipelineState::Starting,
        PipelineState::Bootstrapping,
        PipelineState::Running,
        PipelineState::Retrying,
        PipelineState::Held,
        PipelineState::Failed,
    ];

    /// The name `status` uses.
    pub fn as_str(self) -> &'static str {
        match self {
            PipelineState::Starting => "starting",
            PipelineState::Bootstrapping => "bootstrapping",
            PipelineState::Running => "running",
            PipelineState::Retrying => "retrying",
            PipelineState::Held => "held",
            PipelineState::Failed => "failed",
        }
    }
}

/// Counters and state of one pipeline.
#[derive(Debug, Clone)]
pub struct PipelineStatus {
    /// Its name.
    pub name: String,
    /// The source node's address.
    pub source: String,
    /// What the sink writes to.
    pub sink: String,
    /// State.
    pub state: PipelineState,
    /// The last position stored by the sink.
    pub position: Option<Position>,
    /// The source's head offset, as last reported by the node the tail is subscribed to.
    pub source_head: u64,
    /// Source transactions not yet stored by the sink.
    pub lag_txns: u64,
    /// While behind: the age of the last stored transaction, or, while a write is failing,
    /// held or slow, of the oldest transaction not yet stored; 0 when caught up.
    pub lag_seconds: f64,
    /// Transactions stored since start.
    pub txns_total: u64,
    /// Changes (ops, bootstrap rows) stored since start.
    pub changes_total: u64,
    /// Batches stored since start.
    pub batches_total: u64,
    /// Failed sink calls, lost source connections and failed reconnects, since start.
    pub errors_total: u64,
    /// Separate outages (runs of failures ended by a success, or still going).
    pub outages_total: u64,
    /// The last error, cleared when the sink stores again (a source out of reach: once it is
    /// back).
    pub last_error: Option<String>,
    /// Bootstrap progress, while and after copying.
    pub bootstrap: Option<serde_json::Value>,
    /// Changes per second over the last few seconds.
    pub rate: f64,
    rate_window: (Instant, u64),
    /// What the pipeline is doing, failures aside (`Starting`, `Bootstrapping` or `Running`):
    /// the state it returns to once a failure is over.
    phase: PipelineState,
}

/// A status shared between a pipeline's task and its readers.
#[derive(Debug, Clone)]
pub struct SharedPipelineStatus(Arc<Mutex<PipelineStatus>>);

impl SharedPipelineStatus {
    /// A copy of the status now.
    pub fn get(&self) -> PipelineStatus {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Applies `f` under the lock.
    pub fn update(&self, f: impl FnOnce(&mut PipelineStatus)) {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

impl PipelineStatus {
    /// A new pipeline's shared status.
    pub fn shared(name: &str, source: &str, sink: &str) -> SharedPipelineStatus {
        SharedPipelineStatus(Arc::new(Mutex::new(PipelineStatus {
            name: name.into(),
            source: source.into(),
            sink: sink.into(),
            state: PipelineState::Starting,
            position: None,
            source_head: 0,
            lag_txns: 0,
            lag_seconds: 0.0,
            txns_total: 0,
            changes_total: 0,
            batches_total: 0,
            errors_total: 0,
            outages_total: 0,
            last_error: None,
            bootstrap: None,
            rate: 0.0,
            rate_window: (Instant::now(), 0),
            phase: PipelineState::Starting,
        })))
    }

    /// The pipeline begins `phase` (copying: `Bootstrapping`, following the log: `Running`),
    /// shown as its state from now on, and again after each failure that ends.
    pub(crate) fn enter(&mut self, phase: PipelineState) {
        debug_assert!(
            matches!(
                phase,
                PipelineState::Starting | PipelineState::Bootstrapping | PipelineState::Running
            ),
            "a phase, not a failure: {phase:?}"
        );
        self.phase = phase;
        self.state = phase;
    }

    pub(crate) fn failed(&mut self, e: &SinkError, first: bool) {
        self.errors_total += 1;
        if first {
            self.outages_total += 1;
        }
        self.state = match e {
            SinkError::Hold(_) => PipelineState::Held,
            _ => PipelineState::Retrying,
        };
        self.last_error = Some(e.to_string());
    }

    /// A failure is over: the state is the pipeline's phase again (a copy whose first write
    /// was retried is still `bootstrapping`, though it has stored no progress yet).
    pub(crate) fn recovered(&mut self) {
        self.last_error = None;
        if matches!(self.state, PipelineState::Retrying | PipelineState::Held) {
            self.state = self.phase;
        }
    }

    pub(crate) fn wrote(&mut self, txns: u64, changes: u64, last_ts_us: Option<i64>) {
        // The sink stores again: whatever the last error was (the sink's, or the source's
        // during a copy), it is over. A source still out of reach is shown again by the
        // pipeline's next look at its tail.
        self.last_error = None;
        self.txns_total += txns;
        self.changes_total += changes;
        self.batches_total += 1;
        if let Some(ts) = last_ts_us {
            self.lag_seconds = ((crate::now_us() - ts).max(0) as f64) / 1e6;
        }
        let (since, base) = self.rate_window;
        let secs = since.elapsed().as_secs_f64();
        if secs >= 2.0 {
            self.rate = (self.changes_total - base) as f64 / secs;
            self.rate_window = (Instant::now(), self.changes_total);
        }
    }

    pub(crate) fn caught_up_to(&mut self, pos: &Position, head: u64) {
        self.position = Some(pos.clone());
        // As reported for the tail's current subscription, not a maximum: after a failover the
        // new node's offsets may all lie below the old one's.
        self.source_head = head;
        self.lag_txns = head.saturating_sub(pos.offset);
        if self.lag_txns == 0 {
            self.lag_seconds = 0.0;
        }
    }

    /// A write has gone on for a while (retried, held or slow) and the source has moved on:
    /// the lag as it grows, not as it was when the sink last stored. `head` is the source's
    /// head now, `stored_offset` the offset on that node that the lag counts from (`None`
    /// when it is not known there: the head is not shown then, as measured against another
    /// node's log), `oldest_unstored_ts_us` the commit time of the first transaction the sink
    /// has not stored.
    pub(crate) fn behind(
        &mut self,
        head: u64,
        stored_offset: Option<u64>,
        oldest_unstored_ts_us: Option<i64>,
    ) {
        if let Some(stored) = stored_offset {
            self.source_head = head;
            self.lag_txns = head.saturating_sub(stored);
        }
        if let Some(ts) = oldest_unstored_ts_us {
            self.lag_seconds = ((crate::now_us() - ts).max(0) as f64) / 1e6;
        }
    }

    /// The `status` JSON of this pipeline.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "name": self.name,
            "source": self.source,
            "sink": self.sink,
            "state": self.state.as_str(),
            "offset": self.position.as_ref().map(|p| p.offset),
            "gtids": self.position.as_ref().map(|p| p.gtids.to_string()),
            "source_head": self.source_head,
            "lag_txns": self.lag_txns,
            "lag_seconds": self.lag_seconds,
            "txns": self.txns_total,
            "changes": self.changes_total,
            "batches": self.batches_total,
            "rate_changes_per_s": self.rate.round(),
            "errors": self.errors_total,
            "outages": self.outages_total,
            "last_error": self.last_error,
            "bootstrap": self.bootstrap,
        })
    }
}

#[cfg(test)]
mod tests {
    use tideline_wal::GtidSet;

    use super::*;

    fn at(node: u8, offset: u64) -> Position {
        Position {
            server_uuid: uuid::Uuid::from_bytes([node; 16]),
            offset,
            gtids: GtidSet::new(),
            epoch: None,
        }
    }

    /// Offsets are per node: after a failover to a node whose log is shorter, the lag is that
    /// node's head less the position there, not the old node's head less it.
    #[test]
    fn the_lag_after_a_failover_is_measured_on_the_new_node() {
        let st = PipelineStatus::shared("p", "source", "sink");
        st.update(|s| s.caught_up_to(&at(0xA, 999_990), 1_000_000));
        assert_eq!(st.get().lag_txns, 10);
        st.update(|s| s.caught_up_to(&at(0xB, 50), 60));
        let s = st.get();
        assert_eq!((s.source_head, s.lag_txns), (60, 10), "{}", s.to_json());
        // A position past the head as last reported is no lag, never an underflow.
        st.update(|s| s.caught_up_to(&at(0xB, 70), 60));
        assert_eq!(st.get().lag_txns, 0);
    }

    /// While a write goes on, the lag follows the source from the stored position, and its age
    /// is that of the oldest transaction not stored; a head on another node's log (no stored
    /// offset there) leaves the head and `lag_txns` as they were. Once stored, it is 0 again.
    #[test]
    fn the_lag_while_a_write_goes_on_grows_from_the_stored_position() {
        let st = PipelineStatus::shared("p", "source", "sink");
        st.update(|s| s.caught_up_to(&at(0xA, 10), 10));
        let oldest_us = crate::now_us() - 5_000_000;
        st.update(|s| s.behind(40, Some(10), Some(oldest_us)));
        let s = st.get();
        assert_eq!((s.source_head, s.lag_txns), (40, 30), "{}", s.to_json());
        assert!(s.lag_seconds >= 5.0, "{}", s.to_json());
        st.update(|s| s.behind(7, None, Some(oldest_us)));
        let s = st.get();
        assert_eq!((s.source_head, s.lag_txns), (40, 30), "{}", s.to_json());
        st.update(|s| s.caught_up_to(&at(0xA, 40), 40));
        let s = st.get();
        assert_eq!((s.lag_txns, s.lag_seconds), (0, 0.0), "{}", s.to_json());
    }
}
