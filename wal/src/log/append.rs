//! Appending: [`Wal::submit`] and its variants check and encode a transaction, give it its
//! offset and queue its frame for the next group; `create_segment` makes a new segment file.
//! What happens to a queued group (written, synced, acknowledged, shown) is `writer.rs`'s.
//!
//! Must never: give two records one offset, or queue a record after the log closed or failed.

use std::sync::atomic::Ordering;

use tokio::sync::oneshot;
use uuid::Uuid;

use crate::gtid::{Gtid, GtidSet};
use crate::record::{self, NewTransaction};
use crate::segment;
use crate::storage::Storage;
use crate::{Epoch, Error, Offset};

use super::{Ack, Appended, Durability, Encoded, SegmentMeta, Wal, WalOptions, lock, now_us};

impl Wal {
    /// Queues `txn` for the next group commit and returns at once with its offset-to-be.
    /// Offsets are assigned in call order. Wait on the returned [`Appended`] for the
    /// acknowledgement.
    pub fn submit(&self, txn: NewTransaction) -> Result<Appended, Error> {
        self.submit_with(txn, |_| ()).map(|(a, ())| a)
    }

    /// Like [`Wal::submit`], and calls `assigned` with the offset while still holding the
    /// ordering lock, so a caller can record offset order atomically with its own state.
    pub fn submit_with<R>(
        &self,
        txn: NewTransaction,
        assigned: impl FnOnce(Offset) -> R,
    ) -> Result<(Appended, R), Error>
    where
        R: Sized,
    {
        let mut encoded = Encoded::with_capacity(1);
        self.encode_into(&txn, &mut encoded)?;
        let (tx, rx) = oneshot::channel();
        let (offset, r) = self.queue(encoded.gtid(0), encoded.payload(0), Some(tx), assigned)?;
        Ok((
            Appended {
                offset,
                rx,
                lead: None,
            },
            r,
        ))
    }

    /// Checks and encodes `txn` at the end of `encoded`, for [`Wal::submit_encoded_with`];
    /// returns its index there. Needs no lock of the log's (or of the caller's), so a caller
    /// that orders its submissions under a lock of its own can encode before taking it, and
    /// a caller with many transactions can encode them all into one buffer.
    pub fn encode_into(&self, txn: &NewTransaction, encoded: &mut Encoded) -> Result<usize, Error> {
        // The readers refuse a record with GTID number 0 (`record::decode_payload`): one
        // written would stop recovery and every tail at it.
        if txn.gtid.seq == 0 {
            return Err(Error::InvalidRecord {
                reason: format!("GTID {}:0 (GTID numbers start at 1)", txn.gtid.uuid),
            });
        }
        let start = encoded.buf.len();
        // Sized up front: growing a large record's buffer by doubling copies it several times.
        encoded.buf.reserve(encoded_size_hint(txn));
        // Appended after the records already there: the archive's relative pointers stay
        // within its own bytes, and the pinned `unaligned` format needs no padding, so the
        // range reads back on its own (`record::decode_payload`).
        if let Err(e) =
            rkyv::api::high::to_bytes_in::<_, rkyv::rancor::Error>(txn, &mut encoded.buf)
        {
            encoded.buf.resize(start, 0);
            return Err(Error::Encode {
                reason: e.to_string(),
            });
        }
        let end = encoded.buf.len();
        let max = self.shared.opts.record_bytes_max;
        if (end - start) as u64 > u64::from(max) {
            encoded.buf.resize(start, 0);
            return Err(Error::RecordTooLarge {
                bytes: (end - start) as u64,
                max,
            });
        }
        encoded.items.push((txn.gtid, end));
        Ok(encoded.items.len() - 1)
    }

    /// Queues record `index` of `encoded` (from [`Wal::encode_into`]) like
    /// [`Wal::submit_with`], without an acknowledgement to wait on: for a caller that learns
    /// of its records' fate from the visible head ([`Wal::wait_visible_blocking`]), which moves
    /// past a record only once it is durable and fails with the poison error if the log
    /// fails. Saves the channel and the writer's send per record.
    ///
    /// # Panics
    /// If `index` is not one `encode_into` returned for `encoded`.
    pub fn submit_encoded_with<R>(
        &self,
        encoded: &Encoded,
        index: usize,
        assigned: impl FnOnce(Offset) -> R,
    ) -> Result<(Offset, R), Error> {
        self.queue(encoded.gtid(index), encoded.payload(index), None, assigned)
    }

    /// Like [`Wal::submit_encoded_with`], with an acknowledgement to wait on: the
    /// [`Appended`] resolves once the record is written under [`Durability::Async`] (before
    /// its sync, before readers see it), once durable under [`Durability::Sync`].
    ///
    /// Under `Async` the writer thread is not woken for the record: [`Appended::wait`] writes
    /// the pending group on the calling thread unless another caller is already doing so (a
    /// combining leader), which saves the hand-off to the writer thread and back. Awaiting or
    /// dropping the [`Appended`] instead hands the record to the writer thread.
    ///
    /// # Panics
    /// If `index` is not one `encode_into` returned for `encoded`.
    pub fn submit_encoded_acked<R>(
        &self,
        encoded: &Encoded,
        index: usize,
        assigned: impl FnOnce(Offset) -> R,
    ) -> Result<(Appended, R), Error> {
        let (tx, rx) = oneshot::channel();
        // Under `Async` the waiting committer writes its group itself (see [`lead`]).
        let deferred = matches!(self.shared.opts.durability, Durability::Async { .. });
        let (offset, r) = self.queue_for(
            encoded.gtid(index),
            encoded.payload(index),
            Some(tx),
            deferred,
            assigned,
        )?;
        let lead = deferred.then(|| self.shared.clone());
        Ok((Appended { offset, rx, lead }, r))
    }

    fn queue<R>(
        &self,
        gtid: Gtid,
        payload: &[u8],
        ack: Option<Ack>,
        assigned: impl FnOnce(Offset) -> R,
    ) -> Result<(Offset, R), Error> {
        self.queue_for(gtid, payload, ack, false, assigned)
    }

    /// Queues one frame. `deferred`: the caller waits on the acknowledgement with
    /// [`Appended::wait`], which writes the pending group itself (see [`lead`]), so the writer
    /// thread is not woken for it.
    fn queue_for<R>(
        &self,
        gtid: Gtid,
        payload: &[u8],
        ack: Option<Ack>,
        deferred: bool,
        assigned: impl FnOnce(Offset) -> R,
    ) -> Result<(Offset, R), Error> {
        let shared = &*self.shared;
        if shared.poisoned.load(Ordering::SeqCst) {
            return Err(shared.poison_error());
        }
        if shared.opts.read_only {
            return Err(Error::ReadOnly);
        }
        let mut st = lock(&shared.state);
        if st.closing {
            return Err(Error::Closed);
        }
        let offset = Offset::new(st.next_offset).ok_or(Error::Closed)?;
        record::append_frame(offset, payload, &mut st.pending.bytes)?;
        st.next_offset += 1;
        st.pending.count += 1;
        if let Some(ack) = ack {
            st.pending.acks.push(ack);
        }
        st.pending.gtids.push(gtid);
        let r = assigned(offset);
        if !deferred {
            shared.wake_writer_if_waiting(st);
        }
        Ok((offset, r))
    }

    /// Appends and waits: [`Wal::submit`] then [`Appended::wait`]. Blocking.
    pub fn append(&self, txn: NewTransaction) -> Result<Offset, Error> {
        self.submit(txn)?.wait()
    }
}

/// Creates segment `first`: its header written and synced, and the directory synced. On a
/// failure after the file was created, the file is removed again ([`discard_new_segment`]).
pub(super) fn create_segment(
    st: &dyn Storage,
    opts: &WalOptions,
    server_uuid: Uuid,
    first: Offset,
    gtids_before: &GtidSet,
    epoch: Epoch,
) -> Result<SegmentMeta, Error> {
    let name = segment::file_name(first);
    let created_us = now_us();
    let header =
        segment::encode_header_in_epoch(first, server_uuid, created_us, gtids_before, epoch);
    let ctx = |what: &str| format!("{what} {}", st.describe(&name));
    let file = st.create(&name).map_err(|e| Error::io(ctx("create"), e))?;
    let written = file
        .write_all_at(&header, 0)
        .map_err(|e| Error::io(ctx("write header of"), e))
        .and_then(|()| {
            if opts.skip_fsync() {
                return Ok(());
            }
            file.sync_data().map_err(|e| Error::io(ctx("sync"), e))?;
            st.sync_dir()
                .map_err(|e| Error::io("sync log directory", e))
        });
    if let Err(e) = written {
        drop(file);
        discard_new_segment(st, opts, &name);
        return Err(e);
    }
    Ok(SegmentMeta {
        name,
        first: first.get(),
        gtids_before: gtids_before.clone(),
        epoch,
        header_bytes: header.len() as u32,
        created_us,
        bytes: header.len() as u64,
    })
}

/// Removes segment `name`, just created, after creating or opening it failed: the log is
/// poisoned, and the file must not outlive it. Its header's fsync may have failed, and Linux
/// then shows the header from the page cache without ever writing it: a restart without a
/// reboot would append acknowledged records behind a header the disk lacks, and the next power
/// cut would leave a segment that starts with zeros (an unopenable log). Best effort, errors
/// logged: should the file stay, recovery rewrites the header of a last segment that holds
/// nothing else before it syncs it.
pub(super) fn discard_new_segment(st: &dyn Storage, opts: &WalOptions, name: &str) {
    if let Err(e) = st.remove(name) {
        tracing::error!(file = %st.describe(name), error = %e, "cannot remove a segment whose creation failed");
        return;
    }
    if !opts.skip_fsync()
        && let Err(e) = st.sync_dir()
    {
        tracing::error!(file = %st.describe(name), error = %e, "cannot sync the log directory after removing a segment whose creation failed");
    }
}

/// A close upper estimate of a transaction's archived size.
fn encoded_size_hint(txn: &NewTransaction) -> usize {
    let ops: usize = txn
        .ops
        .iter()
        .map(|op| {
            let bytes = match op {
                crate::Op::Put {
                    tree,
                    key,
                    value,
                    before,
                } => tree.len() + key.len() + value.len() + before.as_ref().map_or(0, Vec::len),
                crate::Op::Delete { tree, key, before } => {
                    tree.len() + key.len() + before.as_ref().map_or(0, Vec::len)
                }
                crate::Op::Merge { tree, key, operand } => tree.len() + key.len() + operand.len(),
                crate::Op::CreateTree {
                    tree,
                    merge_operator,
                } => tree.len() + merge_operator.as_ref().map_or(0, String::len),
                crate::Op::DropTree { tree } => tree.len(),
                crate::Op::CreateIndex {
                    tree, name, paths, ..
                } => tree.len() + name.len() + paths.iter().map(String::len).sum::<usize>(),
                crate::Op::DropIndex { tree, name } => tree.len() + name.len(),
            };
            bytes + 48
        })
        .sum();
    ops + 64
}
