//! # tideline-consumers: the smart client
//!
//! Reliable watches need a client that remembers where it was. [`tail`] turns a node's log into
//! an async `Stream` of transactions that survives network errors and node restarts: it
//! reconnects by itself with exponential backoff (re-resolving the hostname every time) and
//! resumes right after the last transaction it delivered — no gap, no duplicate. A
//! [`Checkpoint`] (the file one is [`FileCheckpoint`]) carries that position across the
//! application's own restarts.
//!
//! Position loss is loud: a purged position, or a node whose history lacks what the consumer
//! already saw, ends the stream with a typed [`TailError`], never a silent skip.
//!
//! Read fences ([`Session::wait_for`]): after writing on one node, a client can wait until any
//! other node has applied and made durable the GTIDs it wrote, then read its own writes there
//! (the etcd / ZooKeeper lesson).
//!
//! [`Bootstrap`] copies a node's state in resumable chunks merged with its live log (DBLog's
//! watermarks, placed by the server), for new replicas and indexes.
//!
//! It does not apply transactions anywhere: sinks and replicas are `tideline-connectors`.
//!
//! ```
//! use tideline_consumers::{Position, TailStart};
//! // Resuming after offset 41 of node `uuid` (in its history epoch 0), having seen these GTIDs:
//! let uuid = uuid::Uuid::from_bytes([7; 16]);
//! let epoch = Some(tideline_wal::Epoch::INITIAL);
//! let pos = Position { server_uuid: uuid, offset: 41, gtids: format!("{uuid}:1-41").parse()?, epoch };
//! // On the same node the tail resumes at offset 42; on another node, by GTID set.
//! assert_eq!(pos.resume_on(uuid), TailStart::Offset(42));
//! assert!(matches!(pos.resume_on(uuid::Uuid::nil()), TailStart::Gtid(_)));
//! // If that node's history was replaced since (it was bootstrapped), offset 41 means
//! // nothing any more: the tail notices the new epoch and resumes by GTID set.
//! assert!(!pos.offset_valid_in(uuid, tideline_wal::Epoch::new(99)));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod bootstrap;
mod checkpoint;
mod position;
mod session;
mod tail;

pub use bootstrap::{Bootstrap, BootstrapError, BootstrapProgress, BootstrapStep};
pub use checkpoint::{Checkpoint, CheckpointError, FileCheckpoint, MemoryCheckpoint};
pub use position::{Position, TailStart};
pub use session::Session;
pub use tail::{Disconnected, Tail, TailConfig, TailError, tail};
