//! Why a replication or bootstrap session ended, and what the replica does next: retry after a
//! pause, hold for an operator, or stop.
//!
//! Owns: [`Stop`] and the classification of client errors into it. Must never: decide the
//! backoff or touch the status (the replication loop in `replica` does both), so that the
//! bootstrap and the live replication end their sessions the same way.

use tideline_stream::{ClientError, ErrorCode};

/// Why one replication session ended.
pub(crate) enum Stop {
    /// Reconnect after a pause.
    Retry(String),
    /// Needs an operator.
    Fatal(String),
    /// A connection error that waiting cannot fix (another cluster's certificate): needs an
    /// operator unless the upstream was reached before.
    Permanent(String),
    /// Needs an operator, or a change on the upstream or another upstream (a multi-source
    /// replica waiting for GTIDs this upstream purged): shown as `error`, checked again after
    /// a pause (the longest backoff).
    Held(String),
}

/// Classifies a client error. A position the upstream no longer has mid-stream (its history
/// was replaced by its own bootstrap) is retried: the next subscription finds out what to do.
pub(crate) fn classify(e: ClientError) -> Stop {
    match &e {
        ClientError::Unauthorized { .. } => Stop::Fatal(e.to_string()),
        ClientError::WrongCluster { .. } => Stop::Permanent(e.to_string()),
        ClientError::Server {
            code: ErrorCode::PositionUnavailable | ErrorCode::Unavailable,
            ..
        } => Stop::Retry(e.to_string()),
        _ if e.is_retryable() => Stop::Retry(e.to_string()),
        _ => Stop::Fatal(e.to_string()),
    }
}
