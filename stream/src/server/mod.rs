//! The QUIC server: authenticates connections, serves subscriptions from the log and key-value
//! requests through the [`Node`] trait, each on its own stream.
//!
//! Admission: a peer is *unauthenticated* from its first packet until its `Hello` carried the
//! cluster token. Unauthenticated peers have their own budget, apart from the authenticated
//! connections: at most `handshakes_max` at once (a new one evicts the oldest, so peers that
//! never finish cannot lock real clients out), a QUIC Retry (address validation, no state
//! kept) once `handshakes_before_retry` are in progress, one stream, and a first message of at
//! most `hello_bytes_max`. Only after `Hello` does a connection count toward
//! `max_connections` and get `max_streams_per_connection` streams and the full frame limits.
//!
//! Back-pressure: a subscription task writes with `write_all`, which waits for QUIC flow
//! control credit. A consumer that stops reading stalls only its own stream's task; the server
//! holds at most one batch (`batch_bytes_target`) plus the stream's send window for it, so
//! memory stays bounded and writers and other tails are not slowed.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tideline_wal::{Epoch, Gtid, GtidSet, Offset, Op, Reader, Transaction, Wal};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::observe::{Observer, Peer, RefuseReason, SubscriptionInfo};
use crate::proto::{
    self, BatchBuilder, ErrorCode, Limits, MonitorEvent, PROTOCOL_VERSION, Request, Response,
    ServerSubscription, Start, WriteOp,
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

/// Bounds of one page of a scan.
#[derive(Debug, Clone, Copy)]
pub struct ScanPage<'a> {
    /// Exclusive lower bound (the last key of the previous page); `None`: from the start.
    pub after: Option<&'a [u8]>,
    /// Most rows.
    pub limit: u64,
    /// Stop adding rows once this many bytes of keys and values are in the page.
    pub bytes_max: u64,
}

/// One page of a scan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    /// Rows in key order.
    pub rows: Rows,
    /// Whether rows are left after this page (the page stopped at a bound).
    pub more: bool,
}

/// Largest page a scan answer holds, in bytes of keys and values: a page (plus one row of at
/// most a 64 KiB key and a 16 MiB value) stays within one message, and the server holds one
/// page per request.
pub const SCAN_PAGE_BYTES_MAX: u64 = 1 << 20;

/// Builds a page from rows in key order, applying `page`'s bounds.
pub fn collect_page<E>(
    rows: impl Iterator<Item = Result<(Vec<u8>, Vec<u8>), E>>,
    page: ScanPage<'_>,
) -> Result<Page, E> {
    let mut out = Page::default();
    let mut bytes = 0u64;
    for row in rows {
        let (k, v) = row?;
        if out.rows.len() as u64 >= page.limit || (!out.rows.is_empty() && bytes >= page.bytes_max)
        {
            out.more = true;
            break;
        }
        bytes += (k.len() + v.len()) as u64;
        out.rows.push((k, v));
    }
    Ok(out)
}

/// What the server needs from the node it serves. The `tideline` package implements it with
/// the engine; tests implement it with a bare log.
pub trait Node: Send + Sync + 'static {
    /// The node's log.
    fn wal(&self) -> &Wal;
    /// Reads one key.
    fn get(&self, tree: &str, key: &[u8]) -> Result<Option<Vec<u8>>, NodeError>;
    /// Reads one page of keys starting with `prefix`, in key order, strictly after `after`:
    /// at most `limit` rows, and no more rows once their keys and values pass `bytes_max`
    /// (the first row always counts, so a page is never empty while keys are left). The
    /// server holds at most one page per request.
    fn scan(&self, tree: &str, prefix: &[u8], page: ScanPage<'_>) -> Result<Page, NodeError>;
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
    /// Most concurrent authenticated connections; more are refused.
    pub max_connections: usize,
    /// Most concurrent streams per authenticated connection (an unauthenticated one gets one).
    pub max_streams_per_connection: u32,
    /// Most connections between their first packet and their `Hello` (TLS handshake and
    /// token), counted apart from `max_connections`. When full, a new one evicts the oldest.
    pub handshakes_max: usize,
    /// Once this many handshakes are in progress, a peer whose address is not yet validated
    /// gets a QUIC Retry (stateless) and must come back from the address it claims. 0: always.
    pub handshakes_before_retry: usize,
    /// Largest first message (`Hello`) of an unauthenticated connection, in bytes.
    pub hello_bytes_max: u32,
    /// Test-only: give unauthenticated peers the limits of authenticated ones and count them
    /// toward `max_connections`, with no Retry and no eviction (the lockout the handshake
    /// budget prevents). Exists so the flood tests can prove they catch it.
    #[doc(hidden)]
    pub unsafe_no_handshake_budget: bool,
    /// Heartbeat interval on idle subscriptions.
    pub heartbeat: Duration,
    /// A subscription sends a batch once it holds this many bytes of records.
    pub batch_bytes_target: usize,
    /// UDP send and receive buffer size (0: the kernel's default).
    pub udp_buffer_bytes: usize,
    /// Counters, the subscription registry and the monitor feed; the node reads them.
    pub observer: Arc<Observer>,
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
            handshakes_max: 256,
            handshakes_before_retry: 32,
            hello_bytes_max: 4 << 10,
            unsafe_no_handshake_budget: false,
            heartbeat: Duration::from_millis(500),
            batch_bytes_target: 256 << 10,
            udp_buffer_bytes: crate::udp::UDP_BUFFER_BYTES_DEFAULT,
            observer: Arc::new(Observer::new()),
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
    /// Binding the socket failed. The cause is `source()`, printed once by a chain printer.
    #[error("cannot listen on {addr} (is another node using the port? pass another --listen)")]
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

/// Bytes of stream data (all streams together) an unauthenticated peer may have in flight:
/// room for its `Hello`; raised to unlimited (per-stream windows still apply) after it.
const UNAUTHENTICATED_RECEIVE_WINDOW_BYTES: u32 = 64 << 10;

/// The transport of every connection as it starts, unauthenticated: one stream and a small
/// connection receive window, both raised after `Hello`.
fn transport(cfg: &ServerConfig) -> quinn::TransportConfig {
    let idle = cfg.idle_timeout;
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(quinn::IdleTimeout::try_from(idle).ok());
    t.keep_alive_interval(Some((idle / 4).max(Duration::from_millis(100))));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    if cfg.unsafe_no_handshake_budget {
        t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(cfg.max_streams_per_connection));
        return t;
    }
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(1));
    t.receive_window(quinn::VarInt::from_u32(
        UNAUTHENTICATED_RECEIVE_WINDOW_BYTES,
    ));
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
    server_cfg.transport_config(Arc::new(transport(&cfg)));
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
    let handshakes = Arc::new(Mutex::new(Handshakes::default()));
    let task = tokio::spawn(async move {
        // Connection tasks live in a JoinSet so that shutdown ends every one of them (and,
        // through their own JoinSets, every stream task), releasing the socket.
        let mut connections = tokio::task::JoinSet::new();
        while let Some(incoming) = ep.accept().await {
            while connections.try_join_next().is_some() {}
            let remote = incoming.remote_address();
            let legacy = cfg.unsafe_no_handshake_budget;
            let in_progress = lock(&handshakes).pending.len();
            if !legacy
                && in_progress >= cfg.handshakes_before_retry
                && !incoming.remote_address_validated()
                && incoming.may_retry()
            {
                // Under load: the peer must prove its address before it gets any state.
                if let Err(e) = incoming.retry() {
                    e.into_incoming().ignore();
                }
                continue;
            }
            if active.load(Ordering::SeqCst) >= cfg.max_connections {
                tracing::warn!(%remote, "refusing connection: max_connections reached");
                cfg.observer.on_refused(RefuseReason::MaxConnections);
                incoming.refuse();
                continue;
            }
            // Test-only legacy admission: the place is taken before the token is seen.
            let pre_active = legacy.then(|| {
                active.fetch_add(1, Ordering::SeqCst);
                ActiveSlot(active.clone())
            });
            let handshakes_max = if legacy {
                usize::MAX
            } else {
                cfg.handshakes_max
            };
            let (slot, evicted) = Handshakes::enter(&handshakes, handshakes_max);
            let conn = Conn {
                node: node.clone(),
                cfg: cfg.clone(),
                token: token.clone(),
                active: active.clone(),
            };
            let observer = cfg.observer.clone();
            connections.spawn(async move {
                let _open = observer.connection();
                if let Err(e) = handle_connection(incoming, conn, slot, evicted, pre_active).await {
                    let refused = match e {
                        ConnError::Timeout => Some(RefuseReason::HandshakeTimeout),
                        ConnError::Evicted => Some(RefuseReason::HandshakeEvicted),
                        ConnError::Full => Some(RefuseReason::MaxConnections),
                        ConnError::Unauthorized => Some(RefuseReason::Unauthorized),
                        ConnError::BadHello | ConnError::Version(_) => Some(RefuseReason::BadHello),
                        ConnError::Connection(_) | ConnError::Wire(_) => None,
                    };
                    if let Some(reason) = refused {
                        observer.on_refused(reason);
                    }
                    tracing::debug!(%remote, error = %e, "connection ended");
                }
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Critical sections below leave the map consistent before anything that can panic.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Connections that have not authenticated yet, oldest first; each can be told to give up.
#[derive(Default)]
struct Handshakes {
    next_id: u64,
    pending: BTreeMap<u64, tokio::sync::oneshot::Sender<()>>,
}

impl Handshakes {
    /// Registers a new handshake, evicting the oldest when `max` are in progress. The
    /// receiver resolves when this one is evicted.
    fn enter(
        this: &Arc<Mutex<Handshakes>>,
        max: usize,
    ) -> (HandshakeSlot, tokio::sync::oneshot::Receiver<()>) {
        let mut h = lock(this);
        while h.pending.len() >= max.max(1) {
            let Some((_, evict)) = h.pending.pop_first() else {
                break;
            };
            // The oldest unauthenticated peer makes room: a real client finishes in a round
            // trip or two, a peer that never finishes would otherwise hold its place until
            // the handshake timeout.
            let _ = evict.send(());
        }
        let id = h.next_id;
        h.next_id += 1;
        let (tx, rx) = tokio::sync::oneshot::channel();
        h.pending.insert(id, tx);
        (
            HandshakeSlot {
                id,
                handshakes: this.clone(),
            },
            rx,
        )
    }
}

/// A place among the handshakes in progress, given back on drop.
struct HandshakeSlot {
    id: u64,
    handshakes: Arc<Mutex<Handshakes>>,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        lock(&self.handshakes).pending.remove(&self.id);
    }
}

/// A place among the authenticated connections, given back on drop.
struct ActiveSlot(Arc<AtomicUsize>);

impl Drop for ActiveSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What a connection task shares with the server.
struct Conn<N> {
    node: Arc<N>,
    cfg: Arc<ServerConfig>,
    token: Arc<str>,
    active: Arc<AtomicUsize>,
}

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("handshake timed out")]
    Timeout,
    #[error("evicted by newer handshakes (handshakes_max reached)")]
    Evicted,
    #[error("refused: max_connections reached")]
    Full,
    #[error("the first message was not a valid Hello")]
    BadHello,
    #[error(transparent)]
    Connection(#[from] quinn::ConnectionError),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("unauthorized")]
    Unauthorized,
    #[error("client speaks protocol {0}")]
    Version(u32),
}

/// Application close codes.
pub mod close_code {
    /// Normal close.
    pub const OK: u32 = 0;
    /// Wrong or missing token.
    pub const UNAUTHORIZED: u32 = 1;
    /// Protocol violation.
    pub const PROTOCOL: u32 = 2;
    /// Too many connections: authenticated ones at `max_connections`, or this one evicted
    /// before it authenticated by newer handshakes. Try again later.
    pub const BUSY: u32 = 3;
}

async fn handle_connection<N: Node>(
    incoming: quinn::Incoming,
    c: Conn<N>,
    slot: HandshakeSlot,
    mut evicted: tokio::sync::oneshot::Receiver<()>,
    pre_active: Option<ActiveSlot>,
) -> Result<(), ConnError> {
    let deadline = tokio::time::Instant::now() + c.cfg.handshake_timeout;
    let connecting = incoming.accept()?;
    let conn = tokio::select! {
        r = tokio::time::timeout_at(deadline, connecting) => r.map_err(|_| ConnError::Timeout)??,
        _ = &mut evicted => return Err(ConnError::Evicted),
    };
    let authenticated = tokio::select! {
        r = tokio::time::timeout_at(deadline, authenticate(&conn, &c, pre_active)) => {
            r.unwrap_or(Err(ConnError::Timeout))
        }
        _ = &mut evicted => Err(ConnError::Evicted),
    };
    let (_active, client) = match authenticated {
        Ok(a) => a,
        Err(e) => {
            let code = match e {
                ConnError::Unauthorized => close_code::UNAUTHORIZED,
                ConnError::Evicted | ConnError::Full => close_code::BUSY,
                _ => close_code::PROTOCOL,
            };
            conn.close(quinn::VarInt::from_u32(code), e.to_string().as_bytes());
            return Err(e);
        }
    };
    drop(slot);
    conn.set_max_concurrent_bi_streams(quinn::VarInt::from_u32(c.cfg.max_streams_per_connection));
    conn.set_receive_window(quinn::VarInt::MAX);
    let peer = Peer {
        remote: conn.remote_address(),
        client,
    };
    let mut streams = tokio::task::JoinSet::new();
    loop {
        let (send, recv) = conn.accept_bi().await?;
        while streams.try_join_next().is_some() {}
        let (node, cfg, peer) = (c.node.clone(), c.cfg.clone(), peer.clone());
        streams.spawn(async move {
            let _open = cfg.observer.stream();
            if let Err(e) = handle_stream(node, cfg, peer, send, recv).await {
                tracing::debug!(error = %e, "stream ended with an error");
            }
        });
    }
}

/// Reads the first stream's `Hello` (with the small limits of an unauthenticated peer) and
/// checks its token; on success takes a place among the authenticated connections and answers
/// `Welcome`; returns that place and the name the client gave. A client of another protocol
/// version is refused with words naming both. On failure the peer gets an `Error` saying why,
/// and the caller closes.
async fn authenticate<N: Node>(
    conn: &quinn::Connection,
    c: &Conn<N>,
    pre_active: Option<ActiveSlot>,
) -> Result<(ActiveSlot, Arc<str>), ConnError> {
    let (mut send, recv) = conn.accept_bi().await?;
    let hello_limits = if c.cfg.unsafe_no_handshake_budget {
        c.cfg.limits
    } else {
        Limits {
            message_bytes_max: c.cfg.hello_bytes_max,
            batch_bytes_max: 0,
            ..c.cfg.limits
        }
    };
    let mut recv = FramedRecv::new(recv, hello_limits);
    let refusal = match recv.next_message::<Request>().await {
        Ok(Some(Request::Hello {
            token: offered,
            protocol,
            ..
        })) if tls::token_eq(&offered, &c.token) && protocol != PROTOCOL_VERSION => {
            tracing::warn!(remote = %conn.remote_address(), protocol, "refusing connection: other protocol version");
            (
                ConnError::Version(protocol),
                error(
                    ErrorCode::InvalidRequest,
                    format!(
                        "this node speaks protocol {PROTOCOL_VERSION}, the client {protocol}: \
                         use a tideline client of the node's version"
                    ),
                ),
            )
        }
        Ok(Some(Request::Hello {
            token: offered,
            client,
            ..
        })) if tls::token_eq(&offered, &c.token) => {
            let client: Arc<str> = client.as_str().into();
            if let Some(active) = pre_active {
                send_message(
                    &mut send,
                    &Response::Welcome {
                        server_uuid: *c.node.wal().server_uuid().as_bytes(),
                        protocol: PROTOCOL_VERSION,
                    },
                )
                .await?;
                let _ = send.finish();
                return Ok((active, client));
            }
            if c.active.fetch_add(1, Ordering::SeqCst) >= c.cfg.max_connections {
                c.active.fetch_sub(1, Ordering::SeqCst);
                tracing::warn!(remote = %conn.remote_address(), "refusing connection: max_connections reached");
                (
                    ConnError::Full,
                    error(
                        ErrorCode::Unavailable,
                        format!(
                            "this node serves {} connections already; try again later",
                            c.cfg.max_connections
                        ),
                    ),
                )
            } else {
                let active = ActiveSlot(c.active.clone());
                tracing::debug!(remote = %conn.remote_address(), %client, "client authenticated");
                send_message(
                    &mut send,
                    &Response::Welcome {
                        server_uuid: *c.node.wal().server_uuid().as_bytes(),
                        protocol: PROTOCOL_VERSION,
                    },
                )
                .await?;
                let _ = send.finish();
                return Ok((active, client));
            }
        }
        Ok(None) => return Err(ConnError::Unauthorized),
        Ok(Some(_)) => {
            tracing::warn!(remote = %conn.remote_address(), "refusing connection: bad or missing token");
            (
                ConnError::Unauthorized,
                error(
                    ErrorCode::Unauthorized,
                    "wrong cluster token: pass the --secrets DIR (or --token-file) of this \
                     cluster",
                ),
            )
        }
        Err(e) => {
            tracing::warn!(remote = %conn.remote_address(), error = %e, "refusing connection: bad first message");
            (
                ConnError::BadHello,
                error(
                    ErrorCode::InvalidRequest,
                    format!(
                        "the first message of a connection must be Hello, at most {} bytes: {e}",
                        c.cfg.hello_bytes_max
                    ),
                ),
            )
        }
    };
    let _ = send_message(&mut send, &refusal.1).await;
    let _ = send.finish();
    // Give the error a moment to reach the client before the caller closes.
    tokio::time::sleep(Duration::from_millis(50)).await;
    Err(refusal.0)
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
    peer: Peer,
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
    let started = std::time::Instant::now();
    let seen = Seen::of(&req);
    if let Some(seen) = &seen {
        cfg.observer.on_request(seen.kind);
    }
    // Published once the answer is known (subscriptions and bootstraps when they start).
    let peer_for_sub = peer.clone();
    let observer = cfg.observer.clone();
    let report = move |ok: bool| {
        if let Some(seen) = seen
            && observer.monitoring()
        {
            observer.publish(seen.event(&peer, started.elapsed(), ok));
        }
    };
    let resp = match req {
        Request::Subscribe {
            start,
            tree,
            prefix,
            slot,
        } => {
            report(true);
            let sub = SubscriptionRequest {
                start,
                tree,
                prefix,
                slot,
            };
            return serve_subscription(node, cfg, peer_for_sub, send, recv, sub).await;
        }
        Request::Monitor { tree, sample_ppm } => {
            return serve_monitor(cfg, send, recv, tree, sample_ppm).await;
        }
        Request::Get { tree, key } => match node.get(&tree, &key) {
            Ok(value) => Response::Value { value },
            Err(e) => error(e.code, e.message),
        },
        // The single-answer scan of older clients: bounded like a page; an answer that would
        // not fit one message is refused rather than built.
        Request::Scan {
            tree,
            prefix,
            limit,
        } => {
            let page = ScanPage {
                after: None,
                limit,
                bytes_max: u64::from(cfg.limits.message_bytes_max) / 2,
            };
            match node.scan(&tree, &prefix, page) {
                Ok(p) if p.more && (p.rows.len() as u64) < limit => error(
                    ErrorCode::TooLarge,
                    format!(
                        "the answer holds more than {} bytes: use a client of this version \
                         (it scans in pages), or pass a smaller --limit",
                        page.bytes_max
                    ),
                ),
                Ok(p) => Response::Rows { rows: p.rows },
                Err(e) => error(e.code, e.message),
            }
        }
        Request::ScanPage {
            tree,
            prefix,
            after,
            limit,
            bytes_max,
        } => {
            let page = ScanPage {
                after: after.as_deref(),
                limit,
                bytes_max: bytes_max.clamp(1, SCAN_PAGE_BYTES_MAX),
            };
            match node.scan(&tree, &prefix, page) {
                Ok(p) => Response::Rows { rows: p.rows },
                Err(e) => error(e.code, e.message),
            }
        }
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
            report(true);
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
    report(!matches!(resp, Response::Error { .. }));
    send_message(&mut send, &resp).await?;
    let _ = send.finish();
    Ok(())
}

/// What a monitor reports of a request, taken before the request is consumed.
struct Seen {
    kind: &'static str,
    tree: String,
    key: Vec<u8>,
}

impl Seen {
    fn of(req: &Request) -> Option<Seen> {
        let seen = |kind, tree: &str, key: &[u8]| {
            Some(Seen {
                kind,
                tree: tree.to_string(),
                key: key.to_vec(),
            })
        };
        match req {
            Request::Get { tree, key } => seen("get", tree, key),
            Request::Scan { tree, prefix, .. } | Request::ScanPage { tree, prefix, .. } => {
                seen("scan", tree, prefix)
            }
            Request::Range { tree, after, .. } => {
                seen("range", tree, after.as_deref().unwrap_or_default())
            }
            Request::Commit { ops } => match ops.first() {
                Some(WriteOp::Put { tree, key, .. })
                | Some(WriteOp::Delete { tree, key })
                | Some(WriteOp::Merge { tree, key, .. }) => seen("commit", tree, key),
                None => seen("commit", "", b""),
            },
            Request::Status => seen("status", "", b""),
            Request::WaitFor { gtids, .. } => seen("wait_for", "", gtids.as_bytes()),
            Request::Subscribe { tree, prefix, .. } => seen(
                "subscribe",
                tree.as_deref().unwrap_or_default(),
                prefix.as_deref().unwrap_or_default(),
            ),
            Request::Bootstrap { .. } => seen("bootstrap", "", b""),
            Request::Hello { .. }
            | Request::Ack { .. }
            | Request::ChunksStored { .. }
            | Request::Monitor { .. } => None,
        }
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

/// Events sent to a monitor in one message at most.
const MONITOR_EVENTS_PER_MESSAGE: usize = 512;

/// Streams the requests this node serves to one monitor until it closes its stream.
async fn serve_monitor(
    cfg: Arc<ServerConfig>,
    mut send: quinn::SendStream,
    mut recv: FramedRecv,
    tree: Option<String>,
    sample_ppm: u32,
) -> Result<(), WireError> {
    use tokio::sync::broadcast::error::RecvError;
    let mut feed = cfg.observer.attach_monitor();
    send_message(&mut send, &Response::MonitorStarted).await?;
    let sample_ppm = sample_ppm.min(1_000_000);
    let mut events = Vec::new();
    let mut dropped = 0u64;
    loop {
        // Wait for one event (or the monitor leaving), then take what else is queued.
        let first = tokio::select! {
            r = feed.rx.recv() => r,
            _ = recv.next_message::<Request>() => break,
            _ = send.stopped() => break,
        };
        let mut next = Some(first);
        while let Some(r) = next.take() {
            match r {
                Ok(e) => {
                    let wanted = tree.as_deref().is_none_or(|t| t == e.tree)
                        && (sample_ppm >= 1_000_000
                            || rand::random_range(0..1_000_000u32) < sample_ppm);
                    if wanted {
                        events.push(e);
                    }
                }
                Err(RecvError::Lagged(n)) => dropped += n,
                Err(RecvError::Closed) => return Ok(()),
            }
            if events.len() < MONITOR_EVENTS_PER_MESSAGE {
                next = feed.rx.try_recv().ok().map(Ok);
            }
        }
        if events.is_empty() && dropped == 0 {
            continue;
        }
        let msg = Response::Monitor {
            events: std::mem::take(&mut events),
            dropped: std::mem::take(&mut dropped),
        };
        send_message(&mut send, &msg).await?;
    }
    let _ = send.finish();
    Ok(())
}

/// What a `Subscribe` asked for.
struct SubscriptionRequest {
    start: Start,
    tree: Option<String>,
    prefix: Option<Vec<u8>>,
    slot: Option<String>,
}

/// Most records a filtered subscription reads before it ends a batch (and reports progress),
/// so that a long stretch the filter drops still moves the consumer's position as it goes.
const CONSIDERED_PER_BATCH_MAX: usize = 4096;

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

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

async fn serve_subscription<N: Node>(
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
    // never wait behind our sends.
    let sent_through = Arc::new(std::sync::atomic::AtomicU64::new(sub.next_offset() - 1));
    let _listed = cfg.observer.subscription(
        SubscriptionInfo {
            remote: peer.remote.to_string(),
            client: peer.client.to_string(),
            start: match &start {
                Start::Earliest => "earliest".to_string(),
                Start::Latest => "latest".to_string(),
                Start::Offset(n) => format!("offset:{n}"),
                Start::Gtid(set) => format!("gtid:{set}"),
            },
            tree: tree.map(str::to_string),
            prefix: prefix.map(|p| String::from_utf8_lossy(p).into_owned()),
            slot: slot.clone(),
            sent_through: 0,
            since_us: now_us(),
        },
        sent_through.clone(),
    );
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

    let mut batch = BatchBuilder::new();
    let mut out = Vec::with_capacity(cfg.batch_bytes_target + 4096);
    let result = loop {
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
            // Before the write: the consumer may ack the batch before `write_all` returns.
            sent_through.store(t, Ordering::SeqCst);
            // Waits for flow-control credit: back-pressure from a slow consumer stops here.
            if let Err(e) = send.write_all(&out).await {
                break Err(e.into());
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
            && let Err(e) = send_message(&mut send, &p).await
        {
            break Err(e);
        }
        if through.is_some() {
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
                if let Some(p) = sub.poll_progress(now_us())
                    && let Err(e) = send_message(&mut send, &p).await {
                        break Err(e);
                    }
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

#[cfg(test)]
mod page_tests {
    use super::*;

    type Row = Result<(Vec<u8>, Vec<u8>), ()>;

    fn rows(n: usize, value_bytes: usize) -> Vec<Row> {
        (0..n)
            .map(|i| Ok((format!("k{i:04}").into_bytes(), vec![b'v'; value_bytes])))
            .collect()
    }

    #[test]
    fn a_page_stops_at_its_row_and_byte_bounds_but_never_comes_back_empty() {
        let page = |limit, bytes_max| ScanPage {
            after: None,
            limit,
            bytes_max,
        };
        let p = collect_page(rows(10, 100).into_iter(), page(3, 1 << 20)).unwrap();
        assert_eq!((p.rows.len(), p.more), (3, true));
        // 105 bytes per row: the page closes once 250 bytes are in it.
        let p = collect_page(rows(10, 100).into_iter(), page(100, 250)).unwrap();
        assert_eq!((p.rows.len(), p.more), (3, true));
        // One row larger than the bound still makes a page.
        let p = collect_page(rows(2, 10_000).into_iter(), page(100, 250)).unwrap();
        assert_eq!((p.rows.len(), p.more), (1, true));
        let p = collect_page(rows(2, 1).into_iter(), page(100, 1 << 20)).unwrap();
        assert_eq!((p.rows.len(), p.more), (2, false));
    }
}
