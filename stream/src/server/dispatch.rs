//! Request dispatch: reads the first message of an authenticated stream and answers it. The
//! small key-value requests (get, scan and paged scan, range, commit, status, read fences) are
//! answered here through the [`Node`] trait; a subscription, a bootstrap or a monitor hands its
//! stream to [`super::subscription`], [`super::bootstrap`] or [`super::monitor`].
//!
//! Owns: the request-to-answer mapping, the bounds on what one answer may hold (a page at most
//! [`SCAN_PAGE_BYTES_MAX`]), and the monitor hook (every request served is published to the
//! monitor feed once its answer is known). Must never authenticate (admission did), must
//! never hold more than one page of a scan in memory, and must never make a blocking node call
//! (a read, `status`, a slot drop) on an async worker: those run on the blocking pool.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tideline_wal::{Epoch, GtidSet, Offset};

use super::config::{ServerConfig, error, now_us};
use super::monitor::{cut_bytes, cut_text};
use super::node::{Node, SCAN_PAGE_BYTES_MAX, ScanPage};
use super::subscription::{SubscriptionRequest, serve_subscription};
use crate::observe::Peer;
use crate::proto::{ErrorCode, Limits, MonitorEvent, Request, Response, WriteOp};
use crate::wire::{FramedRecv, WireError, send_message};

/// How long a read waits for its connection's last commit to become visible before it is
/// answered `Unavailable`. Under async durability that takes one fsync interval and an apply;
/// longer means the node is failing.
const OWN_WRITES_FENCE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the streams of one connection share: the last commit acknowledged on it (the log's
/// history epoch then, and its offset). Reads on the connection wait until it is visible, so
/// a client reads its own writes although under async durability a commit is acknowledged
/// once written, before it is shown.
#[derive(Debug, Default)]
pub(super) struct ConnSession {
    last_commit: Mutex<Option<(Epoch, Offset)>>,
}

impl ConnSession {
    fn committed(&self, epoch: Epoch, offset: Offset) {
        let mut last = self.last_commit.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|(e, o)| e != epoch || o < offset) {
            *last = Some((epoch, offset));
        }
    }

    fn last_commit(&self) -> Option<(Epoch, Offset)> {
        *self.last_commit.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Waits until the connection's last commit is visible; the refusal to send when it does not
/// become visible in time. A commit from before a bootstrap replaced the node's history is
/// not waited for (its offset means nothing in the new history).
async fn own_writes_fence<N: Node>(node: &N, session: &ConnSession) -> Option<Response> {
    let (epoch, offset) = session.last_commit()?;
    if epoch != node.wal().history_epoch()
        || node.read_fence(offset, OWN_WRITES_FENCE_TIMEOUT).await
    {
        return None;
    }
    Some(error(
        ErrorCode::Unavailable,
        format!(
            "this connection's commit at offset {offset} is still not visible after {}s, so \
             a read could miss it; the node may be failing: check `tideline status`",
            OWN_WRITES_FENCE_TIMEOUT.as_secs()
        ),
    ))
}

/// Serves one authenticated stream: one request, or one subscription, bootstrap or monitor.
/// `session` is shared by the streams of the stream's connection.
pub(super) async fn handle_stream<N: Node>(
    node: Arc<N>,
    cfg: Arc<ServerConfig>,
    peer: Peer,
    session: Arc<ConnSession>,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
) -> Result<(), WireError> {
    // A client sends messages only, on every stream (requests, acks, stored-chunk reports):
    // no room for a batch, so one is refused at its header, before its body (up to
    // `batch_bytes_max`) is gathered or its records checked.
    let mut recv = FramedRecv::new(
        recv,
        Limits {
            batch_bytes_max: 0,
            ..cfg.limits
        },
    );
    let req = match recv.next_message::<Request>().await {
        Ok(Some(r)) => r,
        Ok(None) => return Ok(()),
        Err(e) => {
            let _ = send_message(&mut send, &error(ErrorCode::InvalidRequest, e.to_string())).await;
            let _ = send.finish();
            return Err(e);
        }
    };
    let started = std::time::Instant::now();
    if let Some(kind) = request_kind(&req) {
        cfg.observer.on_request(kind);
    }
    // Copied only while a monitor is attached: with none, a request pays one atomic load here.
    let seen = if cfg.observer.monitoring() {
        Seen::of(&req)
    } else {
        None
    };
    // Published once the answer is known (subscriptions and bootstraps when they start).
    let report = |seen: Option<Seen>, cfg: &ServerConfig, peer: &Peer, ok: bool| {
        if let Some(seen) = seen {
            cfg.observer
                .publish(seen.event(peer, started.elapsed(), ok));
        }
    };
    let reads = matches!(
        req,
        Request::Get { .. }
            | Request::Scan { .. }
            | Request::ScanPage { .. }
            | Request::Range { .. }
            | Request::IndexQuery(_)
    );
    if reads && let Some(refused) = own_writes_fence(&*node, &session).await {
        report(seen, &cfg, &peer, false);
        send_message(&mut send, &refused).await?;
        let _ = send.finish();
        return Ok(());
    }
    let resp = match req {
        Request::Subscribe {
            start,
            tree,
            prefix,
            slot,
        } => {
            report(seen, &cfg, &peer, true);
            let sub = SubscriptionRequest {
                start,
                tree,
                prefix,
                slot,
            };
            return serve_subscription(node, cfg, peer, send, recv, sub).await;
        }
        Request::Monitor { tree, sample_ppm } => {
            return super::monitor::serve_monitor(cfg, send, recv, tree, sample_ppm).await;
        }
        Request::Get { tree, key } => {
            let node = node.clone();
            off_the_workers("get", move || match node.get(&tree, &key) {
                Ok(value) => Response::Value { value },
                Err(e) => error(e.code, e.message),
            })
            .await
        }
        Request::Scan {
            tree,
            prefix,
            limit,
        } => {
            let (node, cfg) = (node.clone(), cfg.clone());
            off_the_workers("scan", move || {
                legacy_rows(&*node, &cfg, &tree, &prefix, None, limit)
            })
            .await
        }
        Request::ScanPage {
            tree,
            prefix,
            after,
            limit,
            bytes_max,
        } => {
            let node = node.clone();
            off_the_workers("scan", move || {
                let page = ScanPage {
                    after: after.as_deref(),
                    limit,
                    bytes_max: bytes_max.clamp(1, SCAN_PAGE_BYTES_MAX),
                };
                match node.scan(&tree, &prefix, page) {
                    Ok(p) => Response::Rows { rows: p.rows },
                    Err(e) => error(e.code, e.message),
                }
            })
            .await
        }
        Request::Commit { ops } => match node.commit(ops).await {
            Ok((offset, gtid)) => {
                session.committed(node.wal().history_epoch(), offset);
                Response::Committed {
                    offset: offset.get(),
                    gtid: gtid.to_string(),
                }
            }
            Err(e) => error(e.code, e.message),
        },
        Request::Range { tree, after, limit } => {
            let (node, cfg) = (node.clone(), cfg.clone());
            off_the_workers("range", move || {
                legacy_rows(&*node, &cfg, &tree, b"", after.as_deref(), limit)
            })
            .await
        }
        Request::Status => {
            let node = node.clone();
            off_the_workers("status", move || Response::Status {
                json: node.status_json(),
            })
            .await
        }
        Request::WaitFor { gtids, timeout_ms } => match gtids.parse::<GtidSet>() {
            Ok(set) => {
                let (reached, executed) = node
                    .wait_for(set, Duration::from_millis(timeout_ms.min(3_600_000)))
                    .await;
                Response::Fenced {
                    reached,
                    gtid_executed: executed.to_string(),
                }
            }
            Err(e) => error(ErrorCode::InvalidRequest, e.to_string()),
        },
        Request::Bootstrap {
            resume,
            chunk_bytes,
        } => {
            report(seen, &cfg, &peer, true);
            return super::bootstrap::serve_bootstrap(node, cfg, send, recv, resume, chunk_bytes)
                .await;
        }
        Request::IndexQuery(mut q) => {
            q.bytes_max = q.bytes_max.clamp(1, SCAN_PAGE_BYTES_MAX);
            q.timeout_ms = q.timeout_ms.min(3_600_000);
            match node.index_query(q).await {
                Ok(p) => Response::IndexRows {
                    rows: p.rows,
                    next: p.next,
                },
                Err(e) => error(e.code, e.message),
            }
        }
        Request::DropSlot { name } => {
            let (node, cfg) = (node.clone(), cfg.clone());
            off_the_workers("drop_slot", move || drop_slot(&*node, &cfg, &name)).await
        }
        Request::Hello { .. } => error(ErrorCode::InvalidRequest, "already authenticated"),
        Request::Ack { .. } | Request::ChunksStored { .. } => error(
            ErrorCode::InvalidRequest,
            "ack outside a subscription stream",
        ),
    };
    report(seen, &cfg, &peer, !matches!(resp, Response::Error { .. }));
    send_message(&mut send, &resp).await?;
    let _ = send.finish();
    Ok(())
}

/// Answers a request whose node call blocks (a read that misses the block cache reads the
/// disk; `status` and a slot drop wait on the log's slots while retention fsyncs) on the
/// blocking pool, so that the async workers go on serving every other connection meanwhile.
async fn off_the_workers(
    what: &'static str,
    answer: impl FnOnce() -> Response + Send + 'static,
) -> Response {
    tokio::task::spawn_blocking(answer)
        .await
        .unwrap_or_else(|e| error(ErrorCode::Internal, format!("the {what} task failed: {e}")))
}

/// Answers the single-answer reads of older clients, `Scan` and `Range` (a `Range` is a scan
/// of the empty prefix): one page of at most `limit` rows and half a message (a single larger
/// row still fits a message). An answer that would not hold its `limit` rows within that is
/// refused rather than cut short: these clients take a short answer for the end of the scan
/// (the older `verify` pages with `Range` and stops at the first page short of its size).
fn legacy_rows<N: Node>(
    node: &N,
    cfg: &ServerConfig,
    tree: &str,
    prefix: &[u8],
    after: Option<&[u8]>,
    limit: u64,
) -> Response {
    let page = ScanPage {
        after,
        limit,
        bytes_max: u64::from(cfg.limits.message_bytes_max) / 2,
    };
    match node.scan(tree, prefix, page) {
        Ok(p) if p.more && (p.rows.len() as u64) < limit => error(
            ErrorCode::TooLarge,
            format!(
                "the answer holds more than {} bytes: use a client of this version (it reads \
                 in pages bounded in bytes), or pass a smaller --limit (`scan`) or --page \
                 (`verify`)",
                page.bytes_max
            ),
        ),
        Ok(p) => Response::Rows { rows: p.rows },
        Err(e) => error(e.code, e.message),
    }
}

/// Drops slot `name` unless a live subscription of this server uses it (that consumer would
/// go on acking into a slot that no longer holds its log; stop it first). A subscription
/// counts from before it creates or takes its slot, and none can start with the slot until
/// the drop is done (the claim), so no subscription is left with a dropped slot. A
/// subscription naming the slot after the drop creates it again where it starts, as any new
/// slot.
fn drop_slot<N: Node>(node: &N, cfg: &ServerConfig, name: &str) -> Response {
    let _claim = match cfg.observer.claim_slot_drop(name) {
        Ok(claim) => claim,
        Err(users) => {
            let users: Vec<String> = users
                .iter()
                .map(|s| format!("{} ({})", s.client, s.remote))
                .collect();
            return error(
                ErrorCode::InvalidRequest,
                format!(
                    "slot {name} is in use by a live subscription of {}: stop that consumer, \
                     then drop the slot",
                    users.join(", ")
                ),
            );
        }
    };
    let wal = node.wal();
    let Some(slot) = wal.slot(name) else {
        let names: Vec<String> = wal.slots().into_iter().map(|s| s.name).collect();
        return error(
            ErrorCode::InvalidRequest,
            if names.is_empty() {
                format!("no slot named {name}: this node holds no slots")
            } else {
                format!(
                    "no slot named {name}; this node's slots: {}",
                    names.join(", ")
                )
            },
        );
    };
    match wal.drop_slot(name) {
        Ok(()) => Response::SlotDropped {
            restart_offset: slot.restart_offset,
        },
        Err(e) => error(ErrorCode::Unavailable, format!("dropping slot {name}: {e}")),
    }
}

/// What a monitor reports of a request, taken before the request is consumed: its tree and
/// key cut to [`super::monitor::EVENT_FIELD_BYTES_MAX`] (a request's key may be as large as a
/// message before any node checks it). What `tree` and `key` hold for each kind is documented
/// on [`MonitorEvent`] and in docs/PROTOCOL.md (`Monitor`): a change here changes both.
struct Seen {
    kind: &'static str,
    tree: String,
    key: Vec<u8>,
}

/// The kind a request is counted and monitored as; `None` for the messages that are not
/// requests of their own (`Hello`, acks, the monitor itself).
fn request_kind(req: &Request) -> Option<&'static str> {
    Some(match req {
        Request::Get { .. } => "get",
        Request::Scan { .. } | Request::ScanPage { .. } => "scan",
        Request::Range { .. } => "range",
        Request::Commit { .. } => "commit",
        Request::Status => "status",
        Request::WaitFor { .. } => "wait_for",
        Request::Subscribe { .. } => "subscribe",
        Request::Bootstrap { .. } => "bootstrap",
        Request::IndexQuery(_) => "index",
        Request::DropSlot { .. } => "drop_slot",
        Request::Hello { .. }
        | Request::Ack { .. }
        | Request::ChunksStored { .. }
        | Request::Monitor { .. } => return None,
    })
}

impl Seen {
    fn of(req: &Request) -> Option<Seen> {
        let kind = request_kind(req)?;
        let (tree, key): (&str, &[u8]) = match req {
            Request::Get { tree, key } => (tree, key),
            Request::Scan { tree, prefix, .. } | Request::ScanPage { tree, prefix, .. } => {
                (tree, prefix)
            }
            Request::Range { tree, after, .. } => (tree, after.as_deref().unwrap_or_default()),
            Request::Commit { ops } => match ops.first() {
                Some(WriteOp::Put { tree, key, .. })
                | Some(WriteOp::Delete { tree, key })
                | Some(WriteOp::Merge { tree, key, .. }) => (tree, key),
                Some(WriteOp::CreateIndex { tree, name, .. })
                | Some(WriteOp::DropIndex { tree, name }) => (tree, name.as_bytes()),
                None => ("", b""),
            },
            Request::WaitFor { gtids, .. } => ("", gtids.as_bytes()),
            Request::IndexQuery(q) => (q.tree.as_str(), q.index.as_bytes()),
            Request::DropSlot { name } => ("", name.as_bytes()),
            Request::Subscribe { tree, prefix, .. } => (
                tree.as_deref().unwrap_or_default(),
                prefix.as_deref().unwrap_or_default(),
            ),
            _ => ("", b""),
        };
        Some(Seen {
            kind,
            tree: cut_text(tree),
            key: cut_bytes(key),
        })
    }

    fn event(self, peer: &Peer, latency: Duration, ok: bool) -> MonitorEvent {
        MonitorEvent {
            ts_us: now_us(),
            remote: peer.remote.to_string(),
            kind: self.kind.to_string(),
            tree: self.tree,
            key: self.key,
            latency_us: latency.as_micros().min(u64::MAX as u128) as u64,
            ok,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_monitor_event_copies_at_most_a_kib_of_a_key_tree_or_gtid_set() {
        let mark = "…".as_bytes();
        let wait = Request::WaitFor {
            gtids: "x".repeat(1 << 20),
            timeout_ms: 0,
        };
        let seen = Seen::of(&wait).unwrap();
        assert_eq!(seen.key.len(), 1024 + mark.len());
        assert!(seen.key.starts_with(&[b'x'; 1024]) && seen.key.ends_with(mark));
        // A tree name is cut on a character boundary; a key of 1 KiB is whole.
        let get = Request::Get {
            tree: "é".repeat(1 << 19),
            key: vec![b'k'; 1024],
        };
        let seen = Seen::of(&get).unwrap();
        assert_eq!(seen.tree, format!("{}…", "é".repeat(512)));
        assert_eq!(seen.key, vec![b'k'; 1024]);
    }
}
