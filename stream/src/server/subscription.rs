//! Subscriptions: a tail of the log on one stream, from a start position, through optional
//! tree and prefix filters, with heartbeats, progress reports and acks that move a slot.
//!
//! Owns: opening a reader at a start (with the GTID set covered before it), batching records
//! (unfiltered ones go out as the log stores them), filters, progress, and the acks of the
//! stream. Must never buffer more than one batch (`batch_bytes_target`) per subscription — a
//! slow consumer stalls only its own stream through QUIC flow control — must never let an
//! ack move a slot past what was sent, must never let two live subscriptions share a slot
//! (the second is refused), and must never take an ack into a slot that is gone in silence
//! (the subscription ends with an error: its consumer would believe its position held).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tideline_wal::{GtidSet, Offset, Op, Reader, Transaction, Wal};

use super::config::{ServerConfig, close_code, error, now_us};
use super::monitor::cut_text;
use super::node::Node;
use super::outbox::Outbox;
use crate::observe::{Peer, SlotBusy, SubscriptionInfo};
use crate::proto::{BatchBuilder, ErrorCode, Request, Response, ServerSubscription, Start};
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

/// Opens a reader at `start`, with the GTID set covered before its first record: for an
/// offset start (`earliest`, `latest`, `offset:N`), the `gtids_before` of the segment holding
/// the start plus the GTIDs of that segment's records before it (read once, so the start and
/// the set come from one look at the log and nothing falls between them); for a GTID start,
/// the client's own set (the reader skips exactly those).
fn open_reader(wal: &Wal, start: &Start) -> Result<(Reader, GtidSet), Box<Response>> {
    let unavailable =
        |e: tideline_wal::Error| Box::new(error(ErrorCode::PositionUnavailable, e.to_string()));
    let requested = match start {
        Start::Gtid(text) => {
            let set: GtidSet = text.parse().map_err(|e: tideline_wal::GtidParseError| {
                Box::new(error(ErrorCode::InvalidRequest, e.to_string()))
            })?;
            let reader = wal.read_missing(&set).map_err(unavailable)?;
            return Ok((reader, set));
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
        let mut reader = match wal.read_from(seg.first_offset) {
            Ok(r) => r,
            Err(tideline_wal::Error::OffsetUnavailable { .. }) if attempt < OPEN_ATTEMPTS_MAX => {
                continue;
            }
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
                Err(e) => return Err(unavailable(e)),
            }
        }
        return Ok((reader, covered));
    }
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
    let (mut reader, covered) = match open_reader(wal, &start) {
        Ok(r) => r,
        Err(resp) => {
            send_message(&mut send, &*resp).await?;
            let _ = send.finish();
            return Ok(());
        }
    };
    // Registered before the slot is created or taken: from here on a `DropSlot` of it is
    // refused as in use, so the slot cannot be dropped between its creation and the first ack.
    let sent_through = Arc::new(std::sync::atomic::AtomicU64::new(
        reader.next_offset().get() - 1,
    ));
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
    // slot must keep holding that).
    if let Some(name) = &slot
        && let Err(e) = wal.create_slot(name, reader.next_offset())
    {
        send_message(&mut send, &error(ErrorCode::InvalidRequest, e.to_string())).await?;
        let _ = send.finish();
        return Ok(());
    }
    #[cfg(feature = "testing")]
    if slot.is_some()
        && let Some(pause) = &cfg.unsafe_pause_after_slot_attach
    {
        pause.notified().await;
    }
    let head = wal.visible_offset();
    let (tree, prefix) = (tree.as_deref(), prefix.as_deref());
    // Without filters, records go out as the log stores them: no decode, no re-encode, and
    // no progress reports (every record considered is sent).
    let pass_through = tree.is_none() && prefix.is_none();
    let gtids_before = covered.to_string();
    let mut sub = ServerSubscription::new(
        reader.next_offset().get(),
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
    // never wait behind our sends. An ack that finds the slot gone (removed through the log,
    // not by `DropSlot`, which a live subscription refuses) hands the answer that ends the
    // subscription to the send loop: its consumer must not believe its position is held.
    let (slot_lost_tx, mut slot_lost) = tokio::sync::mpsc::channel::<Response>(1);
    let ack_task = {
        let sent_through = sent_through.clone();
        let node = node.clone();
        let slot = slot.clone();
        tokio::spawn(async move {
            while let Ok(Some(req)) = recv.next_message::<Request>().await {
                if let Request::Ack { offset } = req {
                    if offset > sent_through.load(Ordering::SeqCst) {
                        tracing::warn!(offset, "ack past what was sent; closing subscription");
                        recv.stop(close_code::PROTOCOL);
                        return;
                    }
                    if let (Some(name), Some(next)) = (&slot, Offset::new(offset + 1))
                        && let Err(e) = node.wal().advance_slot(name, next)
                    {
                        tracing::warn!(
                            slot = %name,
                            "ack into a slot that is gone ({e}); ending the subscription"
                        );
                        let message = match e {
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
                        let _ = slot_lost_tx
                            .send(error(ErrorCode::InvalidRequest, message))
                            .await;
                        return;
                    }
                }
            }
        })
    };

    // Room for the records of one batch and the one that passes the target, as a rule, so a
    // batch seldom reallocates while it is read.
    let batch_capacity = cfg.batch_bytes_target + (cfg.batch_bytes_target >> 2);
    let mut batch = BatchBuilder::with_capacity(batch_capacity);
    let mut send = Outbox::new(send);
    let result = loop {
        if let Ok(lost) = slot_lost.try_recv() {
            let _ = send.message(&lost).await;
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
                let mut offset = None;
                batch
                    .push_frame_with(|buf| {
                        offset = reader.next_raw(buf)?;
                        Ok::<_, tideline_wal::Error>(offset.is_some())
                    })
                    .map(|_| offset.map(Offset::get))
            } else {
                reader.next_txn().and_then(|t| {
                    Ok(match t {
                        None => None,
                        Some(txn) => {
                            let o = txn.offset.get();
                            sub.on_considered(o, txn.gtid);
                            if let Some(t) = filter_txn(txn, tree, prefix) {
                                batch.push(&t).map_err(|e| tideline_wal::Error::Encode {
                                    reason: e.to_string(),
                                })?;
                                last_pushed = Some(o);
                            }
                            Some(o)
                        }
                    })
                })
            };
            let offset = match next {
                Ok(Some(o)) => o,
                Ok(None) => break,
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
            // A transaction much larger than a batch leaves with its batch: the builder starts
            // each batch at the everyday size.
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
            Some(lost) = slot_lost.recv() => {
                let _ = send.message(&lost).await;
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
