//! # tideline-wal: the GTID-stamped logical log
//!
//! Everything in Tideline stands on this crate. Every committed transaction is one record in
//! one log, stamped with a [`Gtid`] (who committed it first) and an [`Offset`] (where it sits in
//! this node's log). The engine's journal *is* this log; replication, tails, indexes and sinks
//! all read it.
//!
//! ## What it does
//! - **Append with group commit** ([`Wal::submit`]): concurrent writers share one `fdatasync`.
//!   Under [`Durability::Sync`] an append is acknowledged after its bytes are durable; under
//!   [`Durability::Async`] after they are written, with a sync every few milliseconds.
//!   A caller that orders its own submissions can encode first, many records into one buffer
//!   ([`Wal::encode_into`]), and submit them without an acknowledgement channel
//!   ([`Wal::submit_encoded_with`]), learning their fate from the visible head.
//! - **Written vs durable**: [`Wal::written_offset`] and [`Wal::durable_offset`] are kept
//!   apart. Readers (readers, [`Wal::wait_visible`], and through them tails, replicas and the
//!   engine's applier) see up to [`Wal::visible_offset`], which is the durable head in both
//!   modes: nothing a reader saw can be taken back by a power cut, so the log never reissues
//!   an offset or GTID number a reader saw. Under `Async` readers therefore lag acknowledged
//!   appends by up to the sync interval.
//! - **Fail-stop**: a failed write or fsync poisons the log. Every later append fails with
//!   [`Error::Poisoned`]; the owner must stop. Nothing is retried and acknowledged. The
//!   active segment is cut back to the last good sync, but the outcome of the appends that
//!   failed is unknown: part of their batch may have reached the disk and come back after a
//!   power cut (as whole records only).
//! - **Readers** ([`Wal::read_from`], [`Wal::read_missing`]) from an offset or from
//!   "everything not in this [`GtidSet`]" (auto-positioning: the first segment is found from
//!   segment headers), and [`Wal::wait_visible`] to await new records without polling.
//! - **Recovery** ([`Wal::open`]): only a torn tail of the last segment is truncated, at a
//!   record boundary; damage anywhere else is [`Error::Corrupt`] naming file and byte offset.
//! - **Retention** ([`Wal::run_retention`]): named slots hold segments; a size/age cap keeps
//!   a dead slot from filling the disk by invalidating it, loudly.
//! - **Storage** behind [`Storage`], with [`FileStorage`] and [`MemStorage`], which simulates
//!   crashes (unsynced data lost or torn) and failing syncs.
//!
//! ## What it does not do
//! It does not assign GTIDs, check that they are dense, or know about trees and keys: the
//! engine does. It has no network code.
//!
//! ## Example
//! ```
//! use tideline_wal::{Gtid, MemStorage, NewTransaction, Op, Offset, Wal, WalOptions};
//! use std::sync::Arc;
//!
//! let wal = Wal::open(Arc::new(MemStorage::new()), WalOptions::default())?;
//! let gtid = Gtid::new(wal.server_uuid(), 1)?;
//! let op = Op::Put { tree: "default".into(), key: b"k".to_vec(), value: b"v".to_vec(), before: None };
//! let offset = wal.submit(NewTransaction { gtid, timestamp_us: 0, ops: vec![op] })?.wait()?;
//! assert_eq!(offset, Offset::FIRST);
//!
//! let mut reader = wal.read_from(Offset::FIRST)?;
//! let txn = reader.next_txn()?.expect("the record is durable, so it is visible");
//! assert_eq!(txn.gtid.to_string(), format!("{}:1", wal.server_uuid()));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod error;
mod gtid;
mod log;
mod offset;
mod op;
pub mod packed;
pub mod record;
pub mod segment;
mod slots;
mod storage;

pub use error::Error;
pub use gtid::{Gtid, GtidParseError, GtidSet, Interval};
pub use log::{
    Appended, Durability, Encoded, LogStats, Reader, RecoveryReport, RetentionPolicy,
    RetentionReport, SegmentInfo, Wal, WalOptions,
};
pub use offset::{Epoch, Offset};
pub use packed::{PackedEntries, PackedError};
pub use record::{NewTransaction, Op, Transaction};
pub use slots::{SlotInfo, SlotState};
pub use storage::{
    CrashMode, FileStorage, LOCK_FILE_NAME, MemStorage, Storage, StorageFile, WriterLock,
};
