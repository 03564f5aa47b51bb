//! # tideline-engine: the embedded engine on top of the log
//!
//! This crate is what applications write to. It keeps named **trees** of ordered key-value
//! pairs, runs **serializable multi-key transactions** over them with **merge operators**,
//! serves **consistent snapshots** tagged with their log position, and applies transactions
//! received from an **upstream** node. It sits directly on [`tideline_wal`]: the log *is* the
//! engine's journal. Every commit is exactly one log record, stamped with a GTID; there is no
//! second log to keep in step.
//!
//! ## How a commit works
//! A commit is validated (conflicts, trees, limits), appended to the log (group commit: many
//! committers share one fsync), then applied to the state store, a [fjall] LSM tree, in log
//! order. The store batch that applies offset *n* also records `applied = n` and
//! `gtid_executed`, atomically. The store does not sync each batch: the log's durability
//! covers it. On open, recovery replays every log record after the store's applied offset,
//! so a crash at any point loses no acknowledged transaction and applies none twice. A
//! checkpoint syncs the store every second and only then lets log retention drop what the
//! store has persisted.
//!
//! A transaction that returns `Ok` is durable (under sync durability) and visible to every
//! later read: instant finality. A poisoned log (failed fsync) makes the engine refuse writes
//! ([`WriteError::FailStop`]); it never retries and acknowledges.
//!
//! ## Key types
//! - [`Engine`]: open/recover, point reads and scans, single-op writes, helpers (counters,
//!   JSON documents, compare-and-swap), trees, snapshots, upstream apply, read-only mode.
//! - [`Txn`]: a transaction (reads see one snapshot plus own writes; optimistic conflict
//!   check on commit; [`Engine::transaction`] retries conflicts).
//! - [`Snapshot`]: one committed state with its [`Position`] (offset and GTID set).
//! - [`MergeOperator`]: the built-ins `add`, `append`, `json-merge-patch`, `max`.
//! - [`OpenError`], [`ReadError`], [`WriteError`]: what went wrong and what to do.
//! - [`StoreError`]: a failure of the state store, inside [`OpenError::Store`] and
//!   [`ReadError::Store`]. The store sits behind a small crate-private trait (`store`), with
//!   fjall as its one implementation; no store type is part of the API.
//!
//! ## What it does not do
//! No networking, no CLI, no replication transport: the stream and connector crates feed
//! [`Engine::apply_upstream`]. It does not own log retention policy or slots (the [`Wal`]
//! does); it only sets the log's retention floor. Its API is blocking: from async code call
//! it through `spawn_blocking`.
//!
//! Limits (configurable in [`EngineOptions`]): keys 1 byte to 64 KiB − 1 (65,535 bytes, the store's hard limit), values and merge
//! operands up to 16 MiB; tree names 1-128 characters of `[A-Za-z0-9_.:-]`.
//!
//! ## Example
//! ```
//! use std::sync::Arc;
//! use tideline_engine::{Engine, EngineOptions};
//! use tideline_wal::{MemStorage, Wal, WalOptions};
//!
//! let dir = tempfile::tempdir()?;
//! let wal = Arc::new(Wal::open(Arc::new(MemStorage::new()), WalOptions::default())?);
//! let engine = Engine::open(dir.path(), wal.clone(), EngineOptions::default())?;
//!
//! // The first commit of a fresh node is offset 1 / GTID uuid:1, and it creates the
//! // `default` tree inside the same transaction.
//! let c = engine.put("default", b"greeting", b"hello")?;
//! assert_eq!((c.offset.get(), c.gtid.seq), (1, 1));
//! assert_eq!(engine.get("default", b"greeting")?.as_deref(), Some(&b"hello"[..]));
//!
//! // A tree with a merge operator; merges are logged as operands.
//! engine.create_tree("counters", Some("add"))?;
//! engine.merge("counters", b"visits", b"2")?;
//! engine.merge("counters", b"visits", b"3")?;
//! assert_eq!(engine.get("counters", b"visits")?.as_deref(), Some(&b"5"[..]));
//!
//! // A serializable transaction across trees, retried on conflict.
//! let out = engine.transaction(|tx| {
//!     let v = tx.get("default", b"greeting")?.unwrap_or_default();
//!     tx.put("default", b"copy", &v)?;
//!     tx.merge("counters", b"visits", b"1")?;
//!     Ok(v.len())
//! })?;
//! assert_eq!(out.value, 5);
//!
//! // A snapshot keeps reading the state it was taken at.
//! let snap = engine.snapshot();
//! engine.delete("default", b"greeting")?;
//! assert!(snap.get("default", b"greeting")?.is_some());
//! assert_eq!(snap.offset().map(|o| o.get()), Some(5));
//! assert_eq!(engine.gtid_executed().to_string(), format!("{}:1-6", wal.server_uuid()));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod applier;
mod apply;
mod backfill;
mod bootstrap;
mod catalog;
mod commit;
mod engine;
mod error;
mod fields;
mod index;
mod merge;
mod open;
mod packed;
mod read;
mod snapshot;
mod state;
mod store;
mod trees;
mod txn;

pub use backfill::IndexPage;
pub use bootstrap::RestoreOp;
pub use catalog::{DEFAULT_TREE, TREE_NAME_BYTES_MAX, TreeInfo, is_valid_tree_name};
pub use commit::{Applied, Refused};
pub use engine::{CasOutcome, Engine, Outcome};
pub use error::{OpenError, ReadError, WriteError};
pub use index::{IndexInfo, IndexState, is_valid_index_name, is_valid_json_pointer, value_prefix};
pub use merge::{MergeOperator, merge_patch};
pub use snapshot::{KeyValue, Position, Scan, Snapshot};
pub use state::{
    CommitInfo, EngineOptions, KEY_BYTES_MAX_DEFAULT, KEY_BYTES_MAX_LIMIT, VALUE_BYTES_MAX_DEFAULT,
};
#[cfg(feature = "testing")]
#[doc(hidden)]
pub use store::StoreFaults;
pub use store::{StoreError, StoreStats};
pub use tideline_wal::{Gtid, GtidSet, Offset, Wal};
pub use txn::Txn;
