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
    /// A connection error that waiting cannot fix (another cluster's certificate, a refused
    /// token): needs an operator unless the upstream was reached before in this process, in
    /// which case the upstream may be mid-redeploy or mid-rotation of the token, and the
    /// replica checks again after the longest backoff.
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
        ClientError::Unauthorized { .. } | ClientError::WrongCluster { .. } => {
            Stop::Permanent(e.to_string())
        }
        ClientError::Server {
            code: ErrorCode::PositionUnavailable | ErrorCode::Unavailable,
            ..
        } => Stop::Retry(e.to_string()),
        _ if e.is_retryable() => Stop::Retry(e.to_string()),
        _ => Stop::Fatal(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A token refused by an upstream that accepted it before (a rotation of the token, its
    /// upstream restarted first) must not stop the replica for good.
    #[test]
    fn a_refused_token_is_not_fatal() {
        let stop = classify(ClientError::Unauthorized {
            addr: "127.0.0.1:7400".into(),
        });
        assert!(
            matches!(stop, Stop::Permanent(_)),
            "a refused token must be retried once its upstream was reached"
        );
    }
}
