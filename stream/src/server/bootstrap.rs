//! The sending end of a bootstrap: one ordered stream of live log records and chunks, each
//! chunk read from a fresh view of the node's state and placed right after the last record
//! that view contains (DBLog's watermarks, done by the server). See `proto::bootstrap` for the
//! receiving end and `docs/PROTOCOL.md` for the messages.
//!
//! Every view and the log reader belong to one history epoch of this node, named in
//! `BootstrapStarted`. A resume must name the same epoch; if the node's history is replaced
//! while the copy is served (the node is bootstrapped itself), the stream ends with
//! `PositionUnavailable`: offsets and chunks of two histories must never be mixed.
//!
//! Owns: the bootstrap stream of one consumer, from `Bootstrap` to `BootstrapDone`. Must never
//! have more than `ServerConfig::bootstrap_chunks_in_flight` chunks sent and not yet stored
//! (`ChunksStored`), never send the handover before every chunk is stored, never end a copy
//! without an `Error` when the consumer sent what the stream does not take (a bad frame,
//! another request), and never write to the node: it reads views and the log only.

use std::sync::Arc;
use std::time::Duration;

use tideline_wal::{Epoch, Offset};
use uuid::Uuid;

use super::config::{ServerConfig, close_code, error};
use super::node::{BootstrapView, Node};
use crate::proto::{
    BatchBuilder, BootstrapResume, Chunk, Cursor, ErrorCode, Request, Response, packed_parts,
};
use crate::wire::{FramedRecv, WireError, send_message};

/// Smallest and largest chunk a client may ask for. The largest stays well inside the message
/// limit (a chunk also holds at least one entry, which may be a 16 MiB value).
pub(crate) const CHUNK_BYTES_MIN: usize = 16 << 10;
/// See [`CHUNK_BYTES_MIN`].
pub(crate) const CHUNK_BYTES_MAX: usize = 8 << 20;
/// Size of the parts a chunk is sent in. One part per chunk for now: on the 2-core machines
/// measured, storing 512 KiB or 2 MiB parts while the next arrives was slower than whole
/// chunks (the copy is CPU-bound there, and every part is a store call of its own). The
/// protocol and the consumer handle parts, for machines where overlapping pays.
const PART_BYTES: usize = CHUNK_BYTES_MAX;

pub(super) async fn serve_bootstrap<N: Node>(
    node: Arc<N>,
    cfg: Arc<ServerConfig>,
    mut send: quinn::SendStream,
    mut recv: FramedRecv,
    resume: Option<BootstrapResume>,
    chunk_bytes: u64,
) -> Result<(), WireError> {
    // The consumer reports the chunks it has stored; a chunk goes out only once every
    // earlier one is stored. Only those reports follow `Bootstrap` on its stream: a bad frame
    // or another request ends the copy with `InvalidRequest` naming it (`Reports::Broken`),
    // as the first frame of a stream would get, not with a stream cut short without a word.
    // A consumer that ends its side of the stream, or whose stream or connection breaks,
    // reports no more: a copy waiting for its report ends (`Stop::Gone`).
    let (reports_tx, reports_rx) = tokio::sync::watch::channel(Reports::Stored(0));
    let acks = tokio::spawn(async move {
        let reason = loop {
            match recv.next_message::<Request>().await {
                Ok(Some(Request::ChunksStored { chunks })) => {
                    reports_tx.send_replace(Reports::Stored(chunks));
                }
                Ok(None) | Err(WireError::Read(_)) => return,
                Ok(Some(other)) => {
                    let name = other.name();
                    tracing::warn!(
                        request = name,
                        "request on a bootstrap stream; ending the copy"
                    );
                    break format!(
                        "a {name} request on a bootstrap stream, which takes only ChunksStored \
                         after its Bootstrap: this is a client bug. Send each request on a \
                         stream of its own, and resume the bootstrap"
                    );
                }
                Err(e) => {
                    tracing::warn!(error = %e, "bad frame on a bootstrap stream; ending the copy");
                    break format!(
                        "{e}, on a bootstrap stream (it takes only ChunksStored after its \
                         Bootstrap): this is a client bug; resume the bootstrap"
                    );
                }
            }
        };
        reports_tx.send_replace(Reports::Broken(reason));
        recv.stop(close_code::PROTOCOL);
    });
    let result = run(&*node, &cfg, &mut send, reports_rx, resume, chunk_bytes).await;
    acks.abort();
    match result {
        Ok(()) => {}
        Err(Stop::Refused(resp)) => send_message(&mut send, &*resp).await?,
        Err(Stop::Wire(e)) => return Err(e),
        Err(Stop::Gone) => {}
    }
    let _ = send.finish();
    Ok(())
}

enum Stop {
    /// Tell the client why, then end the stream.
    Refused(Box<Response>),
    /// The stream broke.
    Wire(WireError),
    /// The consumer went away.
    Gone,
}

/// What the consumer has reported on its bootstrap stream.
#[derive(Debug, Clone)]
enum Reports {
    /// It has stored this many chunks of the stream.
    Stored(u64),
    /// It sent what the stream does not take (a bad frame, another request): the copy ends
    /// with `InvalidRequest` and this text.
    Broken(String),
}

/// Ends the copy if the consumer has broken the protocol on its side of the stream.
fn check_reports(reports: &tokio::sync::watch::Receiver<Reports>) -> Result<(), Stop> {
    match &*reports.borrow() {
        Reports::Broken(reason) => Err(refused(ErrorCode::InvalidRequest, reason.clone())),
        Reports::Stored(_) => Ok(()),
    }
}

impl From<WireError> for Stop {
    fn from(e: WireError) -> Self {
        Stop::Wire(e)
    }
}

fn refused(code: ErrorCode, message: impl Into<String>) -> Stop {
    Stop::Refused(Box::new(error(code, message)))
}

/// The node's history was replaced while a bootstrap was served.
fn epoch_changed(was: Epoch, now: Epoch) -> Stop {
    refused(
        ErrorCode::PositionUnavailable,
        format!(
            "this node's history was replaced while the bootstrap was served (epoch {was}, now \
             {now}: the node was bootstrapped itself); start the bootstrap again from scratch"
        ),
    )
}

/// What comes after the live records of one view.
enum Piece {
    Chunk {
        tree: String,
        merge_operator: Option<String>,
        from: Vec<u8>,
        to: Option<Vec<u8>>,
        entries: Vec<u8>,
    },
    Done {
        gtid_executed: String,
    },
}

/// Reads the next chunk after `cursor` from `view` (blocking).
fn next_piece(
    view: &dyn BootstrapView,
    cursor: &Cursor,
    chunk_bytes: usize,
) -> Result<Piece, Stop> {
    let next_tree = view.trees().into_iter().find(|(name, _)| {
        (*name == cursor.tree && !cursor.tree_done) || name.as_str() > cursor.tree.as_str()
    });
    let Some((tree, merge_operator)) = next_tree else {
        return Ok(Piece::Done {
            gtid_executed: view.gtid_executed().to_string(),
        });
    };
    let from = if tree == cursor.tree {
        cursor.key.clone()
    } else {
        Vec::new()
    };
    let mut entries = Vec::with_capacity(chunk_bytes + (64 << 10));
    let to = view
        .chunk(&tree, &from, chunk_bytes, &mut entries)
        .map_err(|e| refused(e.code, e.message))?;
    Ok(Piece::Chunk {
        tree,
        merge_operator,
        from,
        to,
        entries,
    })
}

/// Waits until fewer than `window` of the `sent` chunks are not reported stored. A consumer
/// that reports more chunks stored than were sent breaks the protocol (its count is of no use
/// for the window) and is refused, as is one that sent what the stream does not take; one
/// that went away ends the copy.
async fn wait_stored(
    reports: &mut tokio::sync::watch::Receiver<Reports>,
    sent: u64,
    window: u64,
) -> Result<(), Stop> {
    // The acks task sets `Broken` before it ends: `wait_for` sees the last value before it
    // reports the sender gone, so a broken stream is refused, not taken for a consumer gone.
    let report = reports
        .wait_for(|r| match r {
            Reports::Stored(n) => n.saturating_add(window) > sent,
            Reports::Broken(_) => true,
        })
        .await
        .map_err(|_| Stop::Gone)?
        .clone();
    let reported = match report {
        Reports::Stored(n) => n,
        Reports::Broken(reason) => return Err(refused(ErrorCode::InvalidRequest, reason)),
    };
    if reported > sent {
        return Err(refused(
            ErrorCode::InvalidRequest,
            format!(
                "the consumer reported {reported} chunks stored, but this stream has sent \
                 {sent} chunk(s); this is a client bug: bootstrap again from scratch with a \
                 client of this node's release"
            ),
        ));
    }
    Ok(())
}

async fn run<N: Node>(
    node: &N,
    cfg: &ServerConfig,
    send: &mut quinn::SendStream,
    mut reports: tokio::sync::watch::Receiver<Reports>,
    resume: Option<BootstrapResume>,
    chunk_bytes: u64,
) -> Result<(), Stop> {
    let chunk_bytes = usize::try_from(chunk_bytes).map_or(CHUNK_BYTES_MAX, |b| {
        b.clamp(CHUNK_BYTES_MIN, CHUNK_BYTES_MAX)
    });
    let wal = node.wal();
    let ours = wal.server_uuid();
    let first = node
        .bootstrap_view()
        .map_err(|e| refused(e.code, e.message))?;
    let epoch = first.epoch();
    let (after, mut cursor) = match resume {
        None => (first.offset(), Cursor::default()),
        Some(r) if Uuid::from_bytes(r.server_uuid) == ours && r.epoch == epoch.get() => {
            (r.after_offset, r.cursor)
        }
        Some(r) if Uuid::from_bytes(r.server_uuid) == ours => {
            return Err(refused(
                ErrorCode::PositionUnavailable,
                format!(
                    "this bootstrap was begun in history epoch {} of node {ours}, whose history \
                     has since been replaced (epoch {epoch}, the node was bootstrapped itself); \
                     start it again from scratch",
                    r.epoch
                ),
            ));
        }
        Some(r) => {
            return Err(refused(
                ErrorCode::InvalidRequest,
                format!(
                    "this bootstrap was begun from node {}, not {ours}; start it again from \
                     scratch",
                    Uuid::from_bytes(r.server_uuid)
                ),
            ));
        }
    };
    let next = Offset::new(after + 1).unwrap_or(Offset::FIRST);
    let mut reader = wal.read_from(next).map_err(|e| {
        refused(
            ErrorCode::PositionUnavailable,
            format!("cannot resume this bootstrap: {e}"),
        )
    })?;
    if reader.epoch() != epoch {
        return Err(epoch_changed(epoch, reader.epoch()));
    }
    let (keys_estimate, bytes_estimate) = first.estimate();
    send_message(
        send,
        &Response::BootstrapStarted {
            server_uuid: *ours.as_bytes(),
            after_offset: after,
            keys_estimate,
            bytes_estimate,
            epoch: epoch.get(),
        },
    )
    .await?;

    let mut view: Option<Arc<dyn BootstrapView>> = Some(first);
    let mut batch = BatchBuilder::new();
    let mut out = Vec::with_capacity(cfg.batch_bytes_target + 4096);
    let mut chunks_sent = 0u64;
    let window = cfg.bootstrap_chunks_in_flight.max(1);
    loop {
        check_reports(&reports)?;
        let v = match view.take() {
            Some(v) => v,
            None => node
                .bootstrap_view()
                .map_err(|e| refused(e.code, e.message))?,
        };
        if v.epoch() != epoch {
            return Err(epoch_changed(epoch, v.epoch()));
        }
        let at = v.offset();
        if at + 1 < reader.next_offset().get() {
            // The view lags what was already sent (a restart's replay finishing): wait for
            // the state to catch up rather than place a chunk before records it lacks.
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        // Read the chunk while the records before it go out (and the consumer stores the
        // previous chunk).
        let reading = {
            let (v, c) = (v.clone(), cursor.clone());
            tokio::task::spawn_blocking(move || next_piece(&*v, &c, chunk_bytes))
        };
        // Every live record the view contains goes out before the chunk read from it.
        while reader.next_offset().get() <= at {
            while batch.bytes() < cfg.batch_bytes_target && reader.next_offset().get() <= at {
                match batch.push_frame_with(|buf| reader.next_raw(buf).map(|o| o.is_some())) {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => {
                        return Err(refused(
                            ErrorCode::PositionUnavailable,
                            format!("reading the log for this bootstrap failed: {e}"),
                        ));
                    }
                }
            }
            if batch.is_empty() {
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
            out.clear();
            batch.finish_into(&mut out);
            send.write_all(&out)
                .await
                .map_err(|e| Stop::Wire(e.into()))?;
        }
        let piece = reading
            .await
            .map_err(|e| refused(ErrorCode::Internal, format!("chunk reader failed: {e}")))??;
        let (tree, merge_operator, from, to, entries) = match piece {
            Piece::Chunk {
                tree,
                merge_operator,
                from,
                to,
                entries,
            } => (tree, merge_operator, from, to, entries),
            Piece::Done { gtid_executed } => {
                // The handover follows the last chunk's storing, so the consumer's last
                // report still finds this end listening.
                wait_stored(&mut reports, chunks_sent, 1).await?;
                send_message(
                    send,
                    &Response::BootstrapDone {
                        offset: at,
                        gtid_executed,
                    },
                )
                .await?;
                return Ok(());
            }
        };
        wait_stored(&mut reports, chunks_sent, window).await?;
        let bytes = entries.len();
        cursor = match &to {
            Some(k) => Cursor {
                tree: tree.clone(),
                key: k.clone(),
                tree_done: false,
            },
            None => Cursor {
                tree: tree.clone(),
                key: Vec::new(),
                tree_done: true,
            },
        };
        node.on_bootstrap_chunk(bytes);
        // Index definitions travel with every chunk of their tree, read from the chunk's
        // view: declaring one again is a no-op, so a resume anywhere in the tree keeps them.
        let indexes = v.indexes(&tree);
        if !indexes.is_empty() {
            send_message(
                send,
                &Response::BootstrapIndexes {
                    tree: tree.clone(),
                    merge_operator: merge_operator.clone(),
                    indexes,
                },
            )
            .await?;
        }
        // The chunk goes out in parts, each with its own sub-range, so the consumer stores
        // one part while the next arrives. It counts as stored after its last part.
        let parts = packed_parts(&entries, PART_BYTES);
        let n = parts.len().max(1);
        for i in 0..n {
            let last = i + 1 == n;
            let (range, part_from) = match parts.get(i) {
                Some((r, k)) if i > 0 => (r.clone(), k.clone()),
                Some((r, _)) => (r.clone(), from.clone()),
                None => (0..0, from.clone()),
            };
            let part_to = if last {
                to.clone()
            } else {
                parts.get(i + 1).map(|(_, k)| k.clone())
            };
            send_message(
                send,
                &Response::Chunk(Chunk {
                    tree: tree.clone(),
                    merge_operator: merge_operator.clone(),
                    from: part_from,
                    to: part_to,
                    entries: entries.get(range).unwrap_or_default().to_vec(),
                    offset: at,
                    last,
                }),
            )
            .await?;
        }
        chunks_sent += 1;
    }
}
