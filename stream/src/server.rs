//! The QUIC server: authenticates connections, serves subscriptions from the log and key-value
//! requests through the [`Node`] trait, each on its own stream.
//!
//! Back-pressure: a subscription task writes with `write_all`, which waits for QUIC flow
//! control credit. A consumer that stops reading stalls only its own stream's task; the server
//! holds at most one batch (`batch_bytes_target`) plus the stream's send window for it, so
//! memory stays bounded and writers and other tails are not slowed.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tideline_wal::{Epoch, Gtid, GtidSet, Offset, Op, Reader, Transaction, Wal};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::proto::{
    self, BatchBuilder, ErrorCode, Limits, PROTOCOL_VERSION, Request, Response, ServerSubscription,
    Start, WriteOp,
};
use crate::tls::{self, ServerSecrets};
use crate::wire::{FramedRecv, WireError, send_message};

/// A failed node operation, with its class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeError {
    /// Class (tells the client whether to retry).
    pub code: ErrorCode,
    /// What happened and what to do.
    pub message: String,
}

impl NodeError {
    /// Builds an error.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        NodeError {
            code,
            message: message.into(),
        }
    }
}

/// Key-value pairs in key order.
pub type Rows = Vec<(Vec<u8>, Vec<u8>)>;

/// What the server needs from the node it serves. The `tideline` package implements it with
/// the engine; tests implement it with a bare log.
pub trait Node: Send + Sync + 'static {
    /// The node's log.
    fn wal(&self) -> &Wal;
    /// Reads one key.
    fn get(&self, tree: &str, key: &[u8]) -> Result<Option<Vec<u8>>, NodeError>;
    /// Reads up to `limit` keys starting with `prefix`, in key order.
    fn scan(&self, tree: &str, prefix: &[u8], limit: u64) -> Result<Rows, NodeError>;
    /// Reads up to `limit` keys strictly after `after` (all keys when `None`), in key order.
    fn range_after(&self, tree: &str, after: Option<&[u8]>, limit: u64) -> Result<Rows, NodeError>;
    /// Commits `ops` atomically; resolves once acknowledged (durable under sync durability).
    fn commit(
        &self,
        ops: Vec<WriteOp>,
    ) -> impl Future<Output = Result<(Offset, Gtid), NodeError>> + Send;
    /// The status document (JSON).
    fn status_json(&self) -> String;
    /// Resolves once `gtids` are applied and durable, or at the timeout; returns whether they
    /// were reached and the node's `gtid_executed`.
    fn wait_for(
        &self,
        gtids: GtidSet,
        timeout: Duration,
    ) -> impl Future<Output = (bool, GtidSet)> + Send;
    /// A consistent read view of the node's current state, for bootstrap chunks. Nodes
    /// without a state (a bare log) refuse.
    fn bootstrap_view(&self) -> Result<Arc<dyn BootstrapView>, NodeError> {
        Err(NodeError::new(
            ErrorCode::InvalidRequest,
            "this node has no state to bootstrap from; pick a node that runs the engine",
        ))
    }
    /// Called for every chunk served (for status and metrics).
    fn on_bootstrap_chunk(&self, _bytes: usize) {}
}

/// One committed state of a node, to copy chunks from. Reads never wait for writers.
pub trait BootstrapView: Send + Sync + 'static {
    /// Last log offset applied in this view (0: none).
    fn offset(&self) -> u64;
    /// The node's history epoch this view belongs to (see [`tideline_wal::Epoch`]).
    fn epoch(&self) -> Epoch;
    /// GTIDs executed in this view.
    fn gtid_executed(&self) -> GtidSet;
    /// Trees in name order, with their merge operators.
    fn trees(&self) -> Vec<(String, Option<String>)>;
    /// Rough size of the state: (keys, bytes of keys and values), for progress.
    fn estimate(&self) -> (u64, u64);
    /// Packs entries of `tree` from `from` (inclusive) in key order into `out` (see
    /// [`crate::proto::pack_entry`]) until about `bytes_max` bytes, at least one entry when
    /// any is left; returns the first key not packed (`None`: the tree is done). Blocking.
    fn chunk(
        &self,
        tree: &str,
        from: &[u8],
        bytes_max: usize,
        out: &mut Vec<u8>,
    ) -> Result<Option<Vec<u8>>, NodeError>;
}

/// Server settings. Every limit is documented in `docs/PROTOCOL.md`.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// Frame limits.
    pub limits: Limits,
    /// A connection with no traffic (keep-alives count) for this long is closed.
    pub idle_timeout: Duration,
    /// A connection must finish TLS and present its token within this.
    pub handshake_timeout: Duration,
    /// Most concurrent connections; more are refused.
    pub max_connections: usize,
    /// Most concurrent streams per connection.
    pub max_streams_per_connection: u32,
    /// Heartbeat interval on idle subscriptions.
    pub heartbeat: Duration,
    /// A subscription sends a batch once it holds this many bytes of records.
    pub batch_bytes_target: usize,
    /// UDP send and receive buffer size (0: the kernel's default).
    pub udp_buffer_bytes: usize,
}

impl ServerConfig {
    /// Defaults for `listen`.
    pub fn new(listen: SocketAddr) -> Self {
        ServerConfig {
            listen,
            limits: Limits::default(),
            idle_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(5),
            max_connections: 1024,
            max_streams_per_connection: 256,
            heartbeat: Duration::from_millis(500),
            batch_bytes_target: 256 << 10,
            udp_buffer_bytes: crate::udp::UDP_BUFFER_BYTES_DEFAULT,
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// TLS setup failed.
    #[error(transparent)]
    Secrets(#[from] tls::SecretsError),
    /// Binding the socket failed.
    #[error("cannot listen on {addr}: {source} (is another node using the port?)")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
}

/// A running server. Dropping it does not stop it; call [`ServerHandle::shutdown`].
pub struct ServerHandle {
    endpoint: quinn::Endpoint,
    local_addr: SocketAddr,
    task: JoinHandle<()>,
}

impl ServerHandle {
    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Whether the accept loop has ended (it only ends at shutdown; anything else is a
    /// failure the node must stop for).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Stops accepting, closes connections, and waits for the accept loop to end.
    pub async fn shutdown(self) {
        self.endpoint
            .close(quinn::VarInt::from_u32(0), b"server shutting down");
        let _ = self.task.await;
        self.endpoint.wait_idle().await;
        drop(self.endpoint);
        // Let quinn's endpoint driver see the last handle go and release the socket.
        tokio::task::yield_now().await;
    }
}

fn transport(idle: Duration, streams: u32) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(quinn::IdleTimeout::try_from(idle).ok());
    t.keep_alive_interval(Some((idle / 4).max(Duration::from_millis(100))));
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(streams));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    t
}

/// Starts serving `node` with `secrets`. Must be called inside a tokio runtime.
pub fn serve<N: Node>(
    cfg: ServerConfig,
    secrets: ServerSecrets,
    node: Arc<N>,
) -> Result<ServerHandle, ServeError> {
    let tls_err = |e: rustls::Error| tls::SecretsError::Tls(e.to_string());
    let mut tls_cfg = rustls::ServerConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_no_client_auth()
        .with_single_cert(secrets.chain.clone(), secrets.key.clone_key())
        .map_err(tls_err)?;
    tls_cfg.alpn_protocols = vec![proto::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls_cfg)
        .map_err(|e| tls::SecretsError::Tls(e.to_string()))?;
    let mut server_cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    server_cfg.transport_config(Arc::new(transport(
        cfg.idle_timeout,
        cfg.max_streams_per_connection,
    )));
    let endpoint = crate::udp::bind(cfg.listen, cfg.udp_buffer_bytes)
        .and_then(|socket| crate::udp::endpoint(socket, Some(server_cfg)))
        .map_err(|source| ServeError::Bind {
            addr: cfg.listen,
            source,
        })?;
    let local_addr = endpoint.local_addr().map_err(|source| ServeError::Bind {
        addr: cfg.listen,
        source,
    })?;
    let ep = endpoint.clone();
    let token: Arc<str> = secrets.token.into();
    let cfg = Arc::new(cfg);
    let active = Arc::new(AtomicUsize::new(0));
    let task = tokio::spawn(async move {
        // Connection tasks live in a JoinSet so that shutdown ends every one of them (and,
        // through their own JoinSets, every stream task), releasing the socket.
        let mut connections = tokio::task::JoinSet::new();
        while let Some(incoming) = ep.accept().await {
            while connections.try_join_next().is_some() {}
            if active.load(Ordering::SeqCst) >= cfg.max_connections {
                tracing::warn!(remote = %incoming.remote_address(), "refusing connection: max_connections reached");
                incoming.refuse();
                continue;
            }
            active.fetch_add(1, Ordering::SeqCst);
            let (node, cfg, token, active) =
                (node.clone(), cfg.clone(), token.clone(), active.clone());
            connections.spawn(async move {
                let remote = incoming.remote_address();
                if let Err(e) = handle_connection(incoming, node, cfg, token).await {
                    tracing::debug!(%remote, error = %e, "connection ended");
                }
                active.fetch_sub(1, Ordering::SeqCst);
            });
        }
        connections.shutdown().await;
    });
    Ok(ServerHandle {
        endpoint,
        local_addr,
        task,
    })
}

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("handshake timed out")]
    Timeout,
    #[error(transparent)]
    Connection(#[from] quinn::ConnectionError),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("unauthorized")]
    Unauthorized,
}

/// Application close codes.
pub mod close_code {
    /// Normal close.
    pub const OK: u32 = 0;
    /// Wrong or missing token.
    pub const UNAUTHORIZED: u32 = 1;
    /// Protocol violation.
    pub const PROTOCOL: u32 = 2;
}

async fn handle_connection<N: Node>(
    incoming: quinn::Incoming,
    node: Arc<N>,
    cfg: Arc<ServerConfig>,
    token: Arc<str>,
) -> Result<(), ConnError> {
    let deadline = tokio::time::Instant::now() + cfg.handshake_timeout;
    let conn = tokio::time::timeout_at(deadline, incoming)
        .await
        .map_err(|_| ConnError::Timeout)??;
    // Authentication: the first stream must carry Hello with the cluster token.
    let (mut send, recv) = tokio::time::timeout_at(deadline, conn.accept_bi())
        .await
        .map_err(|_| ConnError::Timeout)??;
    let mut recv = FramedRecv::new(recv, cfg.limits);
    let hello = tokio::time::timeout_at(deadline, recv.next_message::<Request>())
        .await
        .map_err(|_| ConnError::Timeout)?;
    match hello {
        Ok(Some(Request::Hello {
            token: offered,
            protocol,
            ..
        })) if tls::token_eq(&offered, &token) && protocol != PROTOCOL_VERSION => {
            tracing::warn!(remote = %conn.remote_address(), protocol, "refusing connection: other protocol version");
            let _ = send_message(
                &mut send,
                &Response::Error {
                    code: ErrorCode::InvalidRequest,
                    message: format!(
                        "this node speaks protocol {PROTOCOL_VERSION} and the client \
                         {protocol}: run the same Tideline version on both ends"
                    ),
                },
            )
            .await;
            let _ = send.finish();
            tokio::time::sleep(Duration::from_millis(50)).await;
            conn.close(quinn::VarInt::from_u32(0), b"protocol version");
            return Ok(());
        }
        Ok(Some(Request::Hello {
            token: offered,
            client,
            ..
        })) if tls::token_eq(&offered, &token) => {
            tracing::debug!(remote = %conn.remote_address(), %client, "client authenticated");
            send_message(
                &mut send,
                &Response::Welcome {
                    server_uuid: *node.wal().server_uuid().as_bytes(),
                    protocol: PROTOCOL_VERSION,
                },
            )
            .await?;
            let _ = send.finish();
        }
        _ => {
            tracing::warn!(remote = %conn.remote_address(), "refusing connection: bad or missing token");
            let _ = send_message(
                &mut send,
                &Response::Error {
                    code: ErrorCode::Unauthorized,
                    message: "wrong cluster token: pass the --secrets DIR (or --token-file) \
                              of this cluster"
                        .into(),
                },
            )
            .await;
            let _ = send.finish();
            // Give the error a moment to reach the client before closing.
            tokio::time::sleep(Duration::from_millis(50)).await;
            conn.close(
                quinn::VarInt::from_u32(close_code::UNAUTHORIZED),
                b"unauthorized",
            );
            return Err(ConnError::Unauthorized);
        }
    }
    let mut streams = tokio::task::JoinSet::new();
    loop {
        let (send, recv) = conn.accept_bi().await?;
        while streams.try_join_next().is_some() {}
        let (node, cfg) = (node.clone(), cfg.clone());
        streams.spawn(async move {
            if let Err(e) = handle_stream(node, cfg, send, recv).await {
                tracing::debug!(error = %e, "stream ended with an error");
            }
        });
    }
}

pub(crate) fn error(code: ErrorCode, message: impl Into<String>) -> Response {
    Response::Error {
        code,
        message: message.into(),
    }
}

async fn handle_stream<N: Node>(
    node: Arc<N>,
    cfg: Arc<ServerConfig>,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
) -> Result<(), WireError> {
    let mut recv = FramedRecv::new(recv, cfg.limits);
    let req = match recv.next_message::<Request>().await {
        Ok(Some(r)) => r,
        Ok(None) => return Ok(()),
        Err(e) => {
            let _ = send_message(&mut send, &error(ErrorCode::InvalidRequest, e.to_string())).await;
            let _ = send.finish();
            return Err(e);
        }
    };
    let resp = match req {
        Request::Subscribe {
            start,
            tree,
            prefix,
            slot,
        } => {
            return serve_subscription(node, cfg, send, recv, start, tree, prefix, slot).await;
        }
        Request::Get { tree, key } => match node.get(&tree, &key) {
            Ok(value) => Response::Value { value },
            Err(e) => error(e.code, e.message),
        },
        Request::Scan {
            tree,
            prefix,
            limit,
        } => match node.scan(&tree, &prefix, limit) {
            Ok(rows) => Response::Rows { rows },
            Err(e) => error(e.code, e.message),
        },
        Request::Commit { ops } => match node.commit(ops).await {
            Ok((offset, gtid)) => Response::Committed {
                offset: offset.get(),
                gtid: gtid.to_string(),
            },
            Err(e) => error(e.code, e.message),
        },
        Request::Range { tree, after, limit } => {
            match node.range_after(&tree, after.as_deref(), limit) {
                Ok(rows) => Response::Rows { rows },
                Err(e) => error(e.code, e.message),
            }
        }
        Request::Status => Response::Status {
            json: node.status_json(),
        },
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
            return crate::serve_bootstrap::serve_bootstrap(
                node,
                cfg,
                send,
                recv,
                resume,
                chunk_bytes,
            )
            .await;
        }
        Request::Hello { .. } => error(ErrorCode::InvalidRequest, "already authenticated"),
        Request::Ack { .. } | Request::ChunksStored { .. } => error(
            ErrorCode::InvalidRequest,
            "ack outside a subscription stream",
        ),
    };
    send_message(&mut send, &resp).await?;
    let _ = send.finish();
    Ok(())
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// Keeps only the ops matching the filters; `None` if nothing is left.
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
            && prefix.is_none_or(|p| op.key().is_some_and(|k| k.starts_with(p)))
    };
    let ops: Vec<Op> = txn.ops.into_iter().filter(keep).collect();
    if ops.is_empty() {
        return None;
    }
    Some(Transaction { ops, ..txn })
}

fn open_reader(wal: &Wal, start: &Start) -> Result<Reader, Box<Response>> {
    let unavailable =
        |e: tideline_wal::Error| Box::new(error(ErrorCode::PositionUnavailable, e.to_string()));
    match start {
        Start::Earliest => wal.read_from(wal.first_offset()).map_err(unavailable),
        Start::Latest => {
            let next = Offset::new(wal.visible_offset() + 1).unwrap_or(Offset::FIRST);
            wal.read_from(next).map_err(unavailable)
        }
        Start::Offset(n) => {
            let o = Offset::new(*n).ok_or_else(|| {
                Box::new(error(ErrorCode::InvalidRequest, "offset 0 does not exist"))
            })?;
            wal.read_from(o).map_err(unavailable)
        }
        Start::Gtid(text) => {
            let set: GtidSet = text.parse().map_err(|e: tideline_wal::GtidParseError| {
                Box::new(error(ErrorCode::InvalidRequest, e.to_string()))
            })?;
            wal.read_missing(&set).map_err(unavailable)
        }
    }
}

#[expect(
    clippy::too_many_arguments,
    reason = "one subscription's whole context"
)]
async fn serve_subscription<N: Node>(
    node: Arc<N>,
    cfg: Arc<ServerConfig>,
    mut send: quinn::SendStream,
    mut recv: FramedRecv,
    start: Start,
    tree: Option<String>,
    prefix: Option<Vec<u8>>,
    slot: Option<String>,
) -> Result<(), WireError> {
    let wal = node.wal();
    let mut reader = match open_reader(wal, &start) {
        Ok(r) => r,
        Err(resp) => {
            send_message(&mut send, &*resp).await?;
            let _ = send.finish();
            return Ok(());
        }
    };
    if let Some(name) = &slot
        && let Err(e) = wal
            .create_slot(name, reader.next_offset())
            .and_then(|_| wal.advance_slot(name, reader.next_offset()))
    {
        send_message(&mut send, &error(ErrorCode::InvalidRequest, e.to_string())).await?;
        let _ = send.finish();
        return Ok(());
    }
    let head = wal.visible_offset();
    let mut sub = ServerSubscription::new(
        reader.next_offset().get(),
        cfg.heartbeat.as_micros() as i64,
        now_us(),
    );
    send_message(
        &mut send,
        &Response::Subscribed {
            next_offset: sub.next_offset(),
            head,
            epoch: reader.epoch().get(),
        },
    )
    .await?;

    // Acks arrive on the receive side; handle them in their own task so a consumer's acks
    // never wait behind our sends.
    let sent_through = Arc::new(std::sync::atomic::AtomicU64::new(sub.next_offset() - 1));
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
                    if let (Some(name), Some(next)) = (&slot, Offset::new(offset + 1)) {
                        let _ = node.wal().advance_slot(name, next);
                    }
                }
            }
        })
    };

    let (tree, prefix) = (tree.as_deref(), prefix.as_deref());
    // Without filters, records go out as the log stores them: no decode, no re-encode.
    let pass_through = tree.is_none() && prefix.is_none();
    let mut batch = BatchBuilder::new();
    let mut out = Vec::with_capacity(cfg.batch_bytes_target + 4096);
    let result = loop {
        let mut through = None;
        while batch.bytes() < cfg.batch_bytes_target {
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
                            if let Some(t) = filter_txn(txn, tree, prefix) {
                                batch.push(&t).map_err(|e| tideline_wal::Error::Encode {
                                    reason: e.to_string(),
                                })?;
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
                    let _ = send_message(
                        &mut send,
                        &error(ErrorCode::PositionUnavailable, e.to_string()),
                    )
                    .await;
                    let _ = send.finish();
                    ack_task.abort();
                    return Ok(());
                }
            };
            through = Some(offset);
        }
        if !batch.is_empty() {
            out.clear();
            batch.finish_into(&mut out);
            let t = through.unwrap_or(sub.next_offset());
            // Waits for flow-control credit: back-pressure from a slow consumer stops here.
            if let Err(e) = send.write_all(&out).await {
                break Err(e.into());
            }
            sub.on_sent(t, now_us());
            sent_through.store(t, Ordering::SeqCst);
            continue;
        }
        if let Some(t) = through {
            sub.on_skipped(t);
            sent_through.store(t, Ordering::SeqCst);
            continue;
        }
        // Caught up: wait for new records, a heartbeat, or the consumer leaving.
        let due = sub.heartbeat_due_us() - now_us();
        let sleep = tokio::time::sleep(Duration::from_micros(due.max(0) as u64));
        tokio::select! {
            r = reader.wait() => {
                if let Err(e) = r {
                    let _ = send_message(&mut send, &error(ErrorCode::Unavailable, e.to_string())).await;
                    break Ok(());
                }
            }
            () = sleep => {
                if let Some(hb) = sub.poll_heartbeat(wal.visible_offset(), now_us())
                    && let Err(e) = send_message(&mut send, &hb).await {
                        break Err(e);
                    }
            }
            _ = send.stopped() => break Ok(()),
        }
    };
    ack_task.abort();
    let _ = send.finish();
    result
}

/// The uuid of a `Welcome`.
pub fn welcome_uuid(bytes: [u8; 16]) -> Uuid {
    Uuid::from_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tideline_wal::Gtid;

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
}
