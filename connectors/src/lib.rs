//! `tideline-connectors`: pipelines that drive a source tail into a sink.
//!
//! Where it sits: above `tideline-consumers` (the smart client), `tideline-engine` and
//! `tideline-wal`; below the `tideline` node, which only wires pipelines up from its
//! configuration (`--upstream`) and shows their [`UpstreamStatus`] in `status`.
//!
//! What it holds today: the [`Sink`] contract ([`sink`]) that everything downstream keeps, and
//! the [`pipeline`] that drives a source node's log (and its bootstrap) into a sink, with the
//! change [`envelope`] the JSON sinks share; replication, the pipeline whose source is an
//! upstream node's tail (by GTID auto-positioning, [`spawn`]) and whose sink is the local
//! engine ([`EngineSink`]), with its chunked bootstrap that copies the upstream's state when the
//! replica is empty or the upstream purged what it needs; and the sinks, one module each below
//! [`sink`]: [`sink::engine`] (the replica's), [`sink::file`] (JSON lines), [`sink::postgres`],
//! [`sink::redis`], [`sink::nats`] (JetStream, de-duplicated by GTID) and [`sink::webhook`]
//! (HTTP POSTs).
//!
//! What it does not do: open or own an engine (the node passes one in), serve anything, parse
//! a command line, or write the log by any path other than the engine's commit (a replicated
//! transaction keeps its origin GTID and gets the next local offset).
//!
//! Key types: [`spawn`] starts one upstream's replication task; [`ReplicaOptions`] and
//! [`BootstrapMode`] say how; [`SharedStatus`] is what `status` reads.
//!
//! ```
//! use tideline_connectors::{UpstreamState, UpstreamStatus};
//!
//! // What `status` shows of an upstream before its first connection.
//! let s = UpstreamStatus::new("127.0.0.1:7400");
//! assert_eq!(s.state, UpstreamState::Connecting);
//! assert_eq!(s.to_json()["addr"], "127.0.0.1:7400");
//! ```

mod bootstrap;
pub mod config;
pub mod envelope;
pub mod pipeline;
mod replica;
pub mod sink;
mod status;
mod stop;

pub use pipeline::{
    Filter, PipelineCheckpoint, PipelineConfig, PipelineError, PipelineState, PipelineStatus,
    SharedPipelineStatus, StartFrom,
};
pub use replica::{BootstrapMode, ReplicaOptions, spawn};
pub use sink::engine::EngineSink;
pub use sink::{Batch, CopyRecord, EarlierCopy, Item, Sink, SinkError, SinkFuture};
pub use status::{SharedStatus, UpstreamState, UpstreamStatus};

/// Microseconds since the Unix epoch, for lag figures.
fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}
