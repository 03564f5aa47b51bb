//! What a replica shows of each upstream: the state machine `status` reports and the shared,
//! lock-protected record the replication and bootstrap tasks update.
//!
//! Owns: [`UpstreamState`], [`UpstreamStatus`] and its `status` JSON, [`SharedStatus`].
//! Must never: talk to the network or the engine, or hold its lock across an `.await` (the
//! node's `status` and HTTP admin read it while replication runs).

use std::sync::{Arc, Mutex};

use serde_json::json;
use tideline_wal::GtidSet;

/// Connection state of one upstream, as `status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamState {
    /// Dialling, or waiting to dial again.
    Connecting,
    /// Subscribed and applying.
    Connected,
    /// Copying the upstream's state in chunks (see `bootstrap`).
    Bootstrapping,
    /// Stopped on an error that needs an operator (see `error`).
    Error,
}

/// What a replica knows about one upstream.
#[derive(Debug, Clone)]
pub struct UpstreamStatus {
    /// Address as configured.
    pub addr: String,
    /// Connection state.
    pub state: UpstreamState,
    /// The upstream's `server_uuid`, once connected.
    pub server_uuid: Option<String>,
    /// GTIDs received from this upstream since start (applied or already present).
    pub received: GtidSet,
    /// Transactions applied from this upstream since start.
    pub applied: u64,
    /// The upstream's head (its local offset), from batches and heartbeats.
    pub upstream_head: u64,
    /// Upstream offset of the last transaction applied here.
    pub applied_offset: u64,
    /// Upstream head minus the upstream offset of the last transaction applied here.
    pub lag_txns: u64,
    /// Age of the last applied transaction while behind; 0 when caught up.
    pub lag_seconds: f64,
    /// Local GTIDs the upstream does not have (written here, or diverged), named.
    pub errant: GtidSet,
    /// The last error, if any.
    pub error: Option<String>,
    /// Progress of the running or last bootstrap from this upstream.
    pub bootstrap: Option<serde_json::Value>,
}

impl UpstreamStatus {
    /// A new upstream's status: connecting, nothing received.
    ///
    /// ```
    /// use tideline_connectors::{UpstreamState, UpstreamStatus};
    ///
    /// let s = UpstreamStatus::new("127.0.0.1:7400");
    /// assert_eq!(s.state, UpstreamState::Connecting);
    /// assert_eq!(s.to_json()["state"], "connecting");
    /// ```
    pub fn new(addr: &str) -> Self {
        UpstreamStatus {
            addr: addr.to_string(),
            state: UpstreamState::Connecting,
            server_uuid: None,
            received: GtidSet::new(),
            applied: 0,
            upstream_head: 0,
            applied_offset: 0,
            lag_txns: 0,
            lag_seconds: 0.0,
            errant: GtidSet::new(),
            error: None,
            bootstrap: None,
        }
    }

    /// The `status` JSON of this upstream.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "addr": self.addr,
            "state": match self.state {
                UpstreamState::Connecting => "connecting",
                UpstreamState::Connected => "connected",
                UpstreamState::Bootstrapping => "bootstrapping",
                UpstreamState::Error => "error",
            },
            "server_uuid": self.server_uuid,
            "received": self.received.to_string(),
            "applied": self.applied,
            "lag_txns": self.lag_txns,
            "lag_seconds": self.lag_seconds,
            "errant": self.errant.to_string(),
            "error": self.error,
            "bootstrap": self.bootstrap,
        })
    }
}

/// A shared, updatable upstream status.
pub type SharedStatus = Arc<Mutex<UpstreamStatus>>;

/// Applies `f` to the status under its lock (a poisoned lock still holds a usable status).
pub(crate) fn update(status: &SharedStatus, f: impl FnOnce(&mut UpstreamStatus)) {
    f(&mut status.lock().unwrap_or_else(|p| p.into_inner()));
}
