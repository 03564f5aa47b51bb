//! Subscriptions: a tail of the log on one stream, from a start position, through optional
//! tree and prefix filters, with heartbeats, progress reports and acks that move a slot.
//!
//! Owns: opening a reader at a start (with the GTID set covered before it), batching records
//! (unfiltered ones go out as the log stores them), filters, progress, and the acks of the
//! stream. Must never:
//! - hold more than the batch being prepared and the one in flight (`super::outbox`), room
//!   for twice `batch_bytes_target` each (as `ServerConfig::consumer_buffer_bytes` counts
//!   them), plus one pending record (read and not yet in a batch, `Pending`): a slow
//!   consumer stalls only its own stream, through QUIC flow control;
//! - let an ack move a slot past what was sent;
//! - let two live subscriptions share a slot (the second is refused);
//! - take an ack into a slot that is gone in silence (the subscription ends with an error:
//!   its consumer would believe its position held);
//! - stop reading acks while it goes on sending (a bad frame or another request on the stream
//!   ends the subscription with an error).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tideline_wal::{GtidSet, NewTransaction, Offset, Op, Reader, Transaction, Wal, record};

use super::config::{ServerConfig, close_code, error, now_us};
use super::monitor::cut_text;
use super::node::Node;
use super::outbox::Outbox;
use crate::observe::{Peer, SlotBusy, SubscriptionInfo};
use crate::proto::{
    BATCH_PREFIX_BYTES, BatchBuilder, ErrorCode, FRAME_HEADER_BYTES, Request, Response,
    ServerSubscription, Start,
};
use crate::wire::{FramedRecv, WireError, send_message};

/// What a `Subscribe` asked for.
pub(super) struct SubscriptionRequest {
    pub(super) start: Start,
    pub(super) tree: Option<String>,
    pub(super) prefix: Option<Vec<u8>>,
    pub(super) slot: Option<String>,
}

/// Most records a filtered subscription reads before it ends a batch (and reports progress),
/// so that a long stretch the filter drops still moves the consumer's position as it goes.
const CONSIDERED_PER_BATCH_MAX: usize = 4096;

/// Keeps only the ops matching the filters; `None` if nothing is left. Tree-level ops
/// (`CreateTree`, `DropTree`) of a tree the filter lets through pass whatever the prefix: a
/// consumer of some keys of a tree must see that tree dropped, or it keeps stale keys.
pub fn filter_txn(
    txn: Transaction,
    tree: Option<&str>,
    prefix: Option<&[u8]>,
) -> Option<Transaction> {
    if tree.is_none() && prefix.is_none() {
        return Some(txn);
    }
    let keep = |op: &Op| {
        tree.is_none_or(|t| op.tree() == t)
            && prefix.is_none_or(|p| op.key().is_none_or(|k| k.starts_with(p)))
    };
    let ops: Vec<Op> = txn.ops.into_iter().filter(keep).collect();
    if ops.is_empty() {
        return None;
    }
    Some(Transaction { ops, ..txn })
}

/// How often opening a reader retries when retention removes the segment it was about to
/// read between the look at the segment list and the open.
const OPEN_ATTEMPTS_MAX: u32 = 8;

/// A record read from the log and not yet in a batch: the one at the start, read when the
/// reader was opened, or one that would have taken the batch it came to past the size limit.
enum Pending {
    /// An unfiltered subscription's record: its frame as the log stores it.
    Frame { offset: u64, frame: Vec<u8> },
    /// A filtered subscription's record, not yet considered.
    Txn(Transaction),
}

/// A reader opened at a subscription's start.
struct Opened {
    reader: Reader,
    /// The first offset the subscription considers (`Subscribed.next_offset`).
    start: Offset,
    /// Every GTID covered before `start`.
    covered: GtidSet,
    /// The record at `start` when the reader has read it already (see [`open_reader`]).
    first: Option<Pending>,
}

/// Opens a reader at `start`, with the GTID set covered before its first record: for an
/// offset start (`earliest`, `latest`, `offset:N`), the `gtids_before` of the segment holding
/// the start plus the GTIDs of that segment's records before it (read once, so the start and
/// the set come from one look at the log and nothing falls between them); for a GTID start,
/// the client's own set (the reader skips exactly those).
///
/// An offset start leaves the reader holding the start's segment open: a reader opens its
/// segment at its first read and keeps reading it once retention removes it, so when the
/// start is a segment's first record, that record is read here (as its frame when `raw`, else
/// decoded) and handed back in [`Opened::first`]. Retention can then no longer take the start
/// away before the stream's first read, which would end a fresh `earliest` subscription at
/// once with `PositionUnavailable`.
fn open_reader(wal: &Wal, start: &Start, raw: bool) -> Result<Opened, Box<Response>> {
    let unavailable =
        |e: tideline_wal::Error| Box::new(error(ErrorCode::PositionUnavailable, e.to_string()));
    let requested = match start {
        Start::Gtid(text) => {
            let set: GtidSet = text.parse().map_err(|e: tideline_wal::GtidParseError| {
                Box::new(error(ErrorCode::InvalidRequest, e.to_string()))
            })?;
            let reader = wal.read_missing(&set).map_err(unavailable)?;
            return Ok(Opened {
                start: reader.next_offset(),
                reader,
                covered: set,
                first: None,
            });
        }
        Start::Offset(0) => {
            return Err(Box::new(error(
                ErrorCode::InvalidRequest,
                "offset 0 does not exist",
            )));
        }
        Start::Offset(n) => Some(*n),
        Start::Earliest | Start::Latest => None,
    };
    let mut attempt = 0;
    loop {
        attempt += 1;
        let stats = wal.stats();
        let next = match (requested, start) {
            (Some(n), _) => n,
            (None, Start::Latest) => stats.visible_offset + 1,
            (None, _) => stats.first_offset.get(),
        };
        let at = Offset::new(next).unwrap_or(Offset::FIRST);
        // The segment holding `next`; none when retention removed it (or `next` is before the
        // log): `read_from` names what is missing.
        let Some(seg) = stats
            .segments
            .iter()
            .rev()
            .find(|s| s.first_offset <= at)
            .filter(|_| next <= stats.visible_offset + 1)
        else {
            return Err(wal.read_from(at).map_or_else(unavailable, |_| {
                Box::new(error(
                    ErrorCode::PositionUnavailable,
                    format!("offset {next} is not in the log"),
                ))
            }));
        };
        let retry = |e: &tideline_wal::Error| {
            matches!(e, tideline_wal::Error::OffsetUnavailable { .. })
                && attempt < OPEN_ATTEMPTS_MAX
        };
        let mut reader = match wal.read_from(seg.first_offset) {
            Ok(r) => r,
            Err(e) if retry(&e) => continue,
            Err(e) => return Err(unavailable(e)),
        };
        let mut covered = seg.gtids_before.clone();
        while reader.next_offset() < at {
            match reader.next_txn() {
                Ok(Some(txn)) => {
                    covered.insert(txn.gtid);
                }
                Ok(None) => {
                    return Err(Box::new(error(
                        ErrorCode::Internal,
                        format!(
                            "the log ended at offset {} before the start {next}; retry",
                            reader.next_offset()
                        ),
                    )));
                }
                Err(e) if retry(&e) => break,
                Err(e) => return Err(unavailable(e)),
            }
        }
        if reader.next_offset() < at {
            continue;
        }
        // Nothing read yet (the start is the segment's first record): read that record now.
        // None visible (a `latest` start on a new segment) leaves the reader on the segment
        // being written, which retention never removes.
        let first = if at == seg.first_offset {
            let read = if raw {
                let mut frame = Vec::new();
                reader.next_raw(&mut frame).map(|o| {
                    o.map(|o| Pending::Frame {
                        offset: o.get(),
                        frame,
                    })
                })
            } else {
                reader.next_txn().map(|t| t.map(Pending::Txn))
            };
            match read {
                Ok(first) => first,
                Err(e) if retry(&e) => continue,
                Err(e) => return Err(unavailable(e)),
            }
        } else {
            None
        };
        return Ok(Opened {
            reader,
            start: at,
            covered,
            first,
        });
    }
}

/// What filling a batch with the next record did.
enum Fill {
    /// The record at this offset went into the batch.
    Added(u64),
    /// The filter dropped the record at this offset.
    Dropped(u64),
    /// The next record would take the batch past its size limit: it waits for the next one.
    Full,
    /// No record is visible after the reader.
    CaughtUp,
}

/// The error of a record pending in the wrong form: never, since the form is picked once per
/// subscription; should it happen, the subscription ends saying so rather than skip it.
fn pending_mismatch(offset: u64) -> tideline_wal::Error {
    tideline_wal::Error::Encode {
        reason: format!("internal: the record at offset {offset} was read in the wrong form"),
    }
}

/// Adds the next record to `batch` as the log stores it (an unfiltered subscription). A
/// record that would take a batch that holds others past `records_bytes_max` is kept in
/// `pending` and goes first in the next batch, alone if it is that large.
fn fill_frame(
    reader: &mut Reader,
    pending: &mut Option<Pending>,
    batch: &mut BatchBuilder,
    records_bytes_max: usize,
) -> Result<Fill, tideline_wal::Error> {
    match pending.take() {
        Some(Pending::Frame { offset, frame }) => {
            batch.push_frame_with(|buf| {
                buf.extend_from_slice(&frame);
                Ok::<_, tideline_wal::Error>(true)
            })?;
            return Ok(Fill::Added(offset));
        }
        Some(Pending::Txn(t)) => return Err(pending_mismatch(t.offset.get())),
        None => {}
    }
    let before = batch.bytes();
    let mut fill = Fill::CaughtUp;
    batch.push_frame_with(|buf| {
        let at = buf.len();
        let Some(offset) = reader.next_raw(buf)? else {
            return Ok(false);
        };
        if before > 0 && before + (buf.len() - at) > records_bytes_max {
            *pending = Some(Pending::Frame {
                offset: offset.get(),
                frame: buf.split_off(at),
            });
            fill = Fill::Full;
            return Ok(false);
        }
        fill = Fill::Added(offset.get());
        Ok::<_, tideline_wal::Error>(true)
    })?;
    Ok(fill)
}

/// Considers the next record for a filtered subscription: adds what the filters keep of it to
/// `batch` (re-framed as the log frames it), or drops it. A record that would take a batch
/// that holds others past `records_bytes_max` is kept in `pending`, not yet considered, and
/// goes first in the next batch.
fn fill_filtered(
    reader: &mut Reader,
    pending: &mut Option<Pending>,
    batch: &mut BatchBuilder,
    records_bytes_max: usize,
    filters: (Option<&str>, Option<&[u8]>),
    sub: &mut ServerSubscription,
) -> Result<Fill, tideline_wal::Error> {
    let txn = match pending.take() {
        Some(Pending::Txn(t)) => t,
        Some(Pending::Frame { offset, .. }) => return Err(pending_mismatch(offset)),
        None => match reader.next_txn()? {
            Some(t) => t,
            None => return Ok(Fill::CaughtUp),
        },
    };
    let (offset, gtid) = (txn.offset, txn.gtid);
    let Some(kept) = filter_txn(txn, filters.0, filters.1) else {
        sub.on_considered(offset.get(), gtid);
        return Ok(Fill::Dropped(offset.get()));
    };
    let new = NewTransaction {
        gtid,
        timestamp_us: kept.timestamp_us,
        ops: kept.ops,
    };
    let before = batch.bytes();
    let added = batch.push_frame_with(|buf| {
        let at = buf.len();
        record::encode_frame(offset, &new, buf)?;
        if before > 0 && before + (buf.len() - at) > records_bytes_max {
            buf.truncate(at);
            return Ok(false);
        }
        Ok::<_, tideline_wal::Error>(true)
    })?;
    if !added {
        *pending = Some(Pending::Txn(Transaction {
            offset,
            gtid,
            timestamp_us: new.timestamp_us,
            ops: new.ops,
        }));
        return Ok(Fill::Full);
    }
    sub.on_considered(offset.get(), gtid);
    Ok(Fill::Added(offset.get()))
}

/// Serves one subscription until the consumer leaves or the stream breaks.
pub(super) async fn serve_subscription<N: Node>(
    node: Arc<N>,
    cfg: Arc<ServerConfig>,
    peer: Peer,
    mut send: quinn::SendStream,
    mut recv: FramedRecv,
    req: SubscriptionRequest,
) -> Result<(), WireError> {
    let SubscriptionRequest {
        start,
        tree,
        prefix,
        slot,
    } = req;
    let wal = node.wal();
    // Without filters, records go out as the log stores them: no decode, no re-encode, and
    // no progress reports (every record considered is sent).
    let pass_through = tree.is_none() && prefix.is_none();
    let mut opened = match open_reader(wal, &start, pass_through) {
        Ok(r) => r,
        Err(resp) => {
            send_message(&mut send, &*resp).await?;
            let _ = send.finish();
            return Ok(());
        }
    };
    // Registered before the slot is created or taken: from here on a `DropSlot` of it is
    // refused as in use, so the slot cannot be dropped between its creation and the first ack.
    let sent_through = Arc::new(std::sync::atomic::AtomicU64::new(opened.start.get() - 1));
    let info = SubscriptionInfo {
        remote: peer.remote.to_string(),
        client: peer.client.to_string(),
        // Cut as monitor events cut keys: `status` lists every live subscription in one
        // message, and a client's GTID set may be as large as a message.
        start: match &start {
            Start::Earliest => "earliest".to_string(),
            Start::Latest => "latest".to_string(),
            Start::Offset(n) => format!("offset:{n}"),
            Start::Gtid(set) => cut_text(&format!("gtid:{set}")),
        },
        tree: tree.clone(),
        prefix: prefix
            .as_deref()
            .map(|p| String::from_utf8_lossy(p).into_owned()),
        slot: slot.clone(),
        sent_through: 0,
        since_us: now_us(),
    };
    let _listed = match cfg.observer.subscription(info, sent_through.clone()) {
        Ok(listed) => listed,
        Err(busy) => {
            let name = slot.as_deref().unwrap_or_default();
            let message = match busy {
                SlotBusy::Dropping => format!(
                    "slot {name} is being dropped by a DropSlot request; subscribe again once \
                     it is done (the slot is then created anew where the subscription starts)"
                ),
                SlotBusy::InUse(user) => format!(
                    "slot {name} is in use by a live subscription of {} ({}): a slot holds one \
                     consumer's position, and another consumer's acks would move it past what \
                     this one still needs. Stop that consumer, or give this one another slot \
                     name. A consumer that lost its connection keeps the slot until this node \
                     notices it is gone (within the idle timeout, {} s at most)",
                    user.client,
                    user.remote,
                    cfg.idle_timeout.as_secs_f64()
                ),
            };
            send_message(&mut send, &error(ErrorCode::Conflict, message)).await?;
            let _ = send.finish();
            return Ok(());
        }
    };
    // A new slot starts where the subscription starts; an existing one stays where the
    // consumer's acks put it (a resume may start past what its checkpoint stored, and the
    // slot must keep holding that). Retention may have removed an `earliest` start since the
    // reader was opened (the reader still holds it, a new slot cannot): such a start moves on
    // to where the log starts now.
    let mut attempt = 0;
    while let Some(name) = &slot {
        attempt += 1;
        match wal.create_slot(name, opened.start) {
            Ok(_) => break,
            Err(tideline_wal::Error::OffsetUnavailable { .. })
                if matches!(start, Start::Earliest) && attempt < OPEN_ATTEMPTS_MAX =>
            {
                opened = match open_reader(wal, &start, pass_through) {
                    Ok(r) => r,
                    Err(resp) => {
                        send_message(&mut send, &*resp).await?;
                        let _ = send.finish();
                        return Ok(());
                    }
                };
                sent_through.store(opened.start.get() - 1, Ordering::SeqCst);
            }
            Err(e) => {
                send_message(&mut send, &error(ErrorCode::InvalidRequest, e.to_string())).await?;
                let _ = send.finish();
                return Ok(());
            }
        }
    }
    let Opened {
        mut reader,
        start: first_offset,
        covered,
        first,
    } = opened;
    #[cfg(feature = "testing")]
    if slot.is_some()
        && let Some(pause) = &cfg.unsafe_pause_after_slot_attach
    {
        pause.notified().await;
    }
    let head = wal.visible_offset();
    let filters = (tree.as_deref(), prefix.as_deref());
    let gtids_before = covered.to_string();
    let mut sub = ServerSubscription::new(
        first_offset.get(),
        cfg.heartbeat.as_micros() as i64,
        now_us(),
    );
    if !pass_through {
        sub = sub.with_progress(covered);
    }
    send_message(
        &mut send,
        &Response::Subscribed {
            next_offset: sub.next_offset(),
            head,
            gtids_before,
            epoch: reader.epoch().get(),
        },
    )
    .await?;

    // Acks arrive on the receive side; handle them in their own task so a consumer's acks
    // never wait behind our sends. What this task cannot take hands the answer that ends the
    // subscription to the send loop, which sends it and ends the stream (were the task only
    // to end, the subscription would go on sending while no later ack is read: the slot would
    // stop moving without a word):
    // - a bad frame, or a request other than `Ack` (only acks follow `Subscribe` on its
    //   stream): `InvalidRequest` naming it, as the first frame of a stream would get;
    // - an ack past what was sent or reported: the consumer is wrong about its position;
    // - an ack that finds the slot gone (removed through the log, not by `DropSlot`, which a
    //   live subscription refuses): its consumer must not believe its position is held.
    // A consumer that ends its side of the stream, or whose stream or connection breaks,
    // sends no more acks; the subscription goes on until the send side notices.
    let (ending_tx, mut ending) = tokio::sync::mpsc::channel::<Response>(1);
    let ack_task = {
        let sent_through = sent_through.clone();
        let node = node.clone();
        let slot = slot.clone();
        tokio::spawn(async move {
            let message = loop {
                let offset = match recv.next_message::<Request>().await {
                    Ok(Some(Request::Ack { offset })) => offset,
                    Ok(None) | Err(WireError::Read(_)) => return,
                    Ok(Some(other)) => {
                        let name = other.name();
                        tracing::warn!(
                            request = name,
                            "request on a subscription stream; ending the subscription"
                        );
                        break format!(
                            "a {name} request on a subscription stream, which takes only acks \
                             after its Subscribe: this is a client bug. Send each request on a \
                             stream of its own, and subscribe again"
                        );
                    }
                    Err(e) => {
                        tracing::warn!(
                            error = %e,
                            "bad frame on a subscription stream; ending the subscription"
                        );
                        break format!(
                            "{e}, on a subscription stream (it takes only acks after its \
                             Subscribe): this is a client bug; subscribe again"
                        );
                    }
                };
                let sent = sent_through.load(Ordering::SeqCst);
                if offset > sent {
                    tracing::warn!(
                        offset,
                        sent,
                        "ack past what was sent; ending the subscription"
                    );
                    break format!(
                        "ack of offset {offset} past what this subscription has sent or \
                         reported (through offset {sent}): a consumer acks only what it \
                         received. The consumer is wrong about its position; subscribe \
                         again from the position it has"
                    );
                }
                if let (Some(name), Some(next)) = (&slot, Offset::new(offset + 1))
                    && let Err(e) = node.wal().advance_slot(name, next)
                {
                    tracing::warn!(
                        slot = %name,
                        "ack into a slot that is gone ({e}); ending the subscription"
                    );
                    break match e {
                        // Retention's cap took it: the error says where the log stands.
                        tideline_wal::Error::SlotInvalidated { .. } => e.to_string(),
                        _ => format!(
                            "slot {name} was dropped while this subscription used it: it no \
                             longer holds this consumer's position, and retention may \
                             remove the log from offset {next} on. Resume from the \
                             consumer's checkpoint (the slot is created anew where it \
                             starts), or re-bootstrap the consumer if that is no longer in \
                             the log"
                        ),
                    };
                }
            };
            let _ = ending_tx
                .send(error(ErrorCode::InvalidRequest, message))
                .await;
            recv.stop(close_code::PROTOCOL);
        })
    };

    // Room for the records of one batch and the one that passes the target, as a rule, so a
    // batch seldom reallocates while it is read.
    let batch_capacity = cfg.batch_bytes_target + (cfg.batch_bytes_target >> 2);
    let mut batch = BatchBuilder::with_capacity(batch_capacity);
    // The most record bytes a batch may carry: the receiver refuses a batch whose body (the
    // record count and the records) passes `batch_bytes_max`.
    let records_bytes_max = (cfg.limits.batch_bytes_max as usize)
        .saturating_sub(BATCH_PREFIX_BYTES - FRAME_HEADER_BYTES);
    let mut pending = first;
    let mut send = Outbox::new(send);
    let result = loop {
        if let Ok(end) = ending.try_recv() {
            let _ = send.message(&end).await;
            break Ok(());
        }
        let mut through = None;
        let mut last_pushed = None;
        let mut considered = 0usize;
        while batch.bytes() < cfg.batch_bytes_target
            && (pass_through || considered < CONSIDERED_PER_BATCH_MAX)
        {
            considered += 1;
            let next = if pass_through {
                fill_frame(&mut reader, &mut pending, &mut batch, records_bytes_max)
            } else {
                fill_filtered(
                    &mut reader,
                    &mut pending,
                    &mut batch,
                    records_bytes_max,
                    filters,
                    &mut sub,
                )
            };
            let offset = match next {
                Ok(Fill::Added(o)) => {
                    last_pushed = Some(o);
                    o
                }
                Ok(Fill::Dropped(o)) => o,
                Ok(Fill::Full | Fill::CaughtUp) => break,
                Err(e) => {
                    let _ = send
                        .message(&error(ErrorCode::PositionUnavailable, e.to_string()))
                        .await;
                    send.finish().await;
                    ack_task.abort();
                    return Ok(());
                }
            };
            through = Some(offset);
        }
        if !batch.is_empty() {
            let t = through.unwrap_or(sub.next_offset());
            // Before the write: the consumer may ack the batch before `write_all` returns.
            sent_through.store(t, Ordering::SeqCst);
            // The frame (header, count, records: one buffer) goes to quinn as it is, no copy.
            // This waits only for the previous batch to be taken whole (flow-control credit
            // and room in the send window: back-pressure from a slow consumer stops there);
            // what the window cannot take of this one yet goes while the next one is read.
            // A transaction much larger than a batch leaves with its batch (alone, if it would
            // take a batch past `batch_bytes_max`): the builder starts each batch at the
            // everyday size.
            if let Err(e) = send.send_batch(batch.take_frame(batch_capacity)).await {
                break Err(e);
            }
            sub.on_sent(last_pushed.unwrap_or(t), now_us());
            sub.on_skipped(t);
        } else if let Some(t) = through {
            sub.on_skipped(t);
            sent_through.store(t, Ordering::SeqCst);
        }
        // A filtered tail hears how far the server got, so its position passes what the
        // filter dropped (sent at every batch end where that is news).
        if let Some(p) = sub.poll_progress(now_us())
            && let Err(e) = send.message(&p).await
        {
            break Err(e);
        }
        if through.is_some() {
            continue;
        }
        // Caught up: the last batch goes out whole before the wait.
        if let Err(e) = send.flush().await {
            break Err(e);
        }
        // Caught up: wait for new records, a heartbeat, or the consumer leaving.
        let due = sub.heartbeat_due_us() - now_us();
        let sleep = tokio::time::sleep(Duration::from_micros(due.max(0) as u64));
        tokio::select! {
            r = reader.wait() => {
                if let Err(e) = r {
                    let _ = send.message(&error(ErrorCode::Unavailable, e.to_string())).await;
                    break Ok(());
                }
            }
            () = sleep => {
                if let Some(p) = sub.poll_progress(now_us())
                    && let Err(e) = send.message(&p).await {
                        break Err(e);
                    }
                if let Some(hb) = sub.poll_heartbeat(wal.visible_offset(), now_us())
                    && let Err(e) = send.message(&hb).await {
                        break Err(e);
                    }
            }
            Some(end) = ending.recv() => {
                let _ = send.message(&end).await;
                break Ok(());
            }
            () = send.stopped() => break Ok(()),
        }
    };
    ack_task.abort();
    send.finish().await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use tideline_wal::Gtid;
    use uuid::Uuid;

    #[test]
    fn filters_keep_matching_ops_only() {
        let put = |tree: &str, key: &str| Op::Put {
            tree: tree.into(),
            key: key.as_bytes().to_vec(),
            value: vec![],
            before: None,
        };
        let txn = Transaction {
            offset: Offset::FIRST,
            gtid: Gtid::new(Uuid::from_bytes([1; 16]), 1).unwrap(),
            timestamp_us: 0,
            ops: vec![put("a", "user:1"), put("b", "user:2"), put("a", "order:1")],
        };
        let t = filter_txn(txn.clone(), Some("a"), Some(b"user:")).unwrap();
        assert_eq!(t.ops, vec![put("a", "user:1")]);
        assert!(filter_txn(txn.clone(), Some("c"), None).is_none());
        assert_eq!(filter_txn(txn.clone(), None, None).unwrap(), txn);
    }

    /// A consumer of `tree=users, prefix=u:` must see its tree created and dropped, or it keeps
    /// stale keys after a drop. Tree-level ops of other trees stay out.
    #[test]
    fn a_prefix_filter_keeps_tree_level_ops_of_the_filtered_tree() {
        let txn = |ops: Vec<Op>| Transaction {
            offset: Offset::FIRST,
            gtid: Gtid::new(Uuid::from_bytes([1; 16]), 1).unwrap(),
            timestamp_us: 0,
            ops,
        };
        let create = |tree: &str| Op::CreateTree {
            tree: tree.into(),
            merge_operator: None,
        };
        let drop = |tree: &str| Op::DropTree { tree: tree.into() };
        let t = txn(vec![create("users"), create("orders")]);
        let kept = filter_txn(t.clone(), Some("users"), Some(b"u:"));
        assert_eq!(kept.map(|t| t.ops), Some(vec![create("users")]));
        let t = txn(vec![drop("users"), drop("orders")]);
        let kept = filter_txn(t.clone(), Some("users"), Some(b"u:"));
        assert_eq!(kept.map(|t| t.ops), Some(vec![drop("users")]));
        // A prefix without a tree filters every tree: every tree's tree-level ops pass.
        let kept = filter_txn(t.clone(), None, Some(b"u:"));
        assert_eq!(kept.map(|t| t.ops), Some(t.ops));
    }
}
