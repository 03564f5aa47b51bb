//! What a tail is asked to do ([`TailConfig`]), how it waits between reconnects, and why it
//! ends ([`TailError`]).

use std::time::Duration;

use tideline_stream::{ClientConfig, ClientError};

use crate::checkpoint::CheckpointError;
use crate::position::TailStart;

/// Settings of a tail.
#[derive(Debug, Clone)]
pub struct TailConfig {
    /// `host:port` of the node; resolved again at every reconnect.
    pub addr: String,
    /// Connection settings.
    pub client: ClientConfig,
    /// Start position when there is no checkpoint.
    pub start: TailStart,
    /// Only this tree.
    pub tree: Option<String>,
    /// Only keys with this prefix.
    pub prefix: Option<Vec<u8>>,
    /// A named slot on the node holding the log for this consumer (acked after each batch).
    pub slot: Option<String>,
    /// First reconnect delay; doubles up to `backoff_max`, with jitter.
    pub backoff_min: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
    /// Give up after this many failed reconnects in a row (`None`: never).
    pub reconnect_attempts_max: Option<u32>,
    /// How long the node may refuse `slot` as in use by another live subscription, from the
    /// first refusal with no subscription since, before the tail ends with
    /// [`TailError::SlotInUse`]. Default 20 s (`SLOT_IN_USE_WAIT`): longer than a consumer whose
    /// connection died keeps the slot. Raise it for a node run with a longer idle timeout
    /// (`serve --idle-timeout-ms`); `Duration::ZERO` ends the tail at the first refusal.
    pub slot_in_use_wait: Duration,
    /// Least time between two automatic checkpoint saves (each syncs a file). A crash of the
    /// consumer re-delivers what it took since the last save: the batch in progress and the
    /// batches taken within this interval. Default 200 ms.
    pub checkpoint_interval: Duration,
}

impl TailConfig {
    /// A tail of `addr` from `start`, reconnecting forever.
    pub fn new(addr: impl Into<String>, client: ClientConfig, start: TailStart) -> Self {
        TailConfig {
            addr: addr.into(),
            client,
            start,
            tree: None,
            prefix: None,
            slot: None,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            reconnect_attempts_max: None,
            slot_in_use_wait: SLOT_IN_USE_WAIT,
            checkpoint_interval: Duration::from_millis(200),
        }
    }
}

/// Default of [`TailConfig::slot_in_use_wait`]. A consumer whose connection died keeps its
/// slot until the node notices, within the connection's idle timeout (the shorter of the
/// node's, 10 s by default, and the client's): a refusal that lasts longer comes from a
/// consumer that is live, and retrying it would never end. 10 s of margin covers a node
/// slow to notice and the tail's last backoff.
const SLOT_IN_USE_WAIT: Duration = Duration::from_secs(20);

/// Why a tail ended. Network trouble never ends a tail by itself (it reconnects); these do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TailError {
    /// The start or resume position is gone (purged by retention, or past the end).
    #[error("position unavailable: {0}")]
    PositionUnavailable(String),
    /// The node's history lacks what this consumer already saw (it lost data, or is a
    /// different node under the same id). Re-bootstrap the consumer.
    #[error(
        "node {server_uuid} has history only up to offset {node_head}, but this consumer already \
         saw offset {seen}: the node lost transactions; re-bootstrap the consumer"
    )]
    Diverged {
        /// The node.
        server_uuid: uuid::Uuid,
        /// Its head now.
        node_head: u64,
        /// What the consumer saw.
        seen: u64,
    },
    /// The node refused the credentials.
    #[error(transparent)]
    Unauthorized(ClientError),
    /// Reading or writing the checkpoint failed.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The node refused the slot as in use (by another live subscription, or being dropped)
    /// for [`TailConfig::slot_in_use_wait`] and more: stop that consumer, or give this one
    /// another slot name.
    #[error(
        "{message}; still refused after {} s of retries, longer than a consumer whose \
         connection died keeps its slot",
        waited.as_secs()
    )]
    SlotInUse {
        /// The node's last refusal, naming the slot and its holder.
        message: String,
        /// From the first refusal to the last.
        waited: Duration,
    },
    /// Reconnecting failed too many times in a row.
    #[error("gave up after {attempts} failed reconnects; last error: {last}")]
    GaveUp {
        /// Attempts made.
        attempts: u32,
        /// The last error.
        last: ClientError,
    },
    /// The node answered with a non-retryable error or broke the protocol.
    #[error(transparent)]
    Client(ClientError),
}

pub(super) fn backoff(cfg: &TailConfig, attempt: u32) -> Duration {
    let base = cfg
        .backoff_min
        .saturating_mul(1u32 << attempt.min(16))
        .min(cfg.backoff_max);
    // ±20% jitter so that many consumers of a restarted node do not reconnect in lockstep.
    let jitter = rand::random_range(0.8..1.2);
    base.mul_f64(jitter)
}
