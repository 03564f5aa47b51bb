//! Admission: the accept loop, the handshake budget, and `Hello` (the cluster token and the
//! protocol version). A connection ends here or is handed, one stream at a time, to
//! [`super::dispatch`].
//!
//! Owns: [`serve`], [`ServerHandle`], the transport of a connection as it starts, the places
//! among handshakes in progress and among authenticated connections. Must never let an
//! unauthenticated peer open more than its one stream, send more than `hello_bytes_max`, or
//! count toward `max_connections`; must never read node state beyond the `server_uuid` of
//! `Welcome` (requests are dispatch's job).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use uuid::Uuid;

use super::config::{ServerConfig, close_code, error};
use super::dispatch::{ConnSession, handle_stream};
use super::node::Node;
use crate::observe::{Peer, RefuseReason};
use crate::proto::{self, ErrorCode, Limits, PROTOCOL_VERSION, Request, Response};
use crate::tls::{self, ServerSecrets};
use crate::wire::{FramedRecv, WireError, send_message};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// TLS setup failed.
    #[error(transparent)]
    Secrets(#[from] tls::SecretsError),
    /// `consumer_buffer_bytes` is too small for the batch size.
    #[error(
        "the consumer buffer ({buffer_bytes} bytes) must be at least {min_bytes} bytes (a log \
         reader's chunk, the connection's state and four batches of {batch_bytes}): pass a \
         larger --consumer-buffer-bytes"
    )]
    ConsumerBuffer {
        /// The buffer asked for.
        buffer_bytes: usize,
        /// The smallest accepted.
        min_bytes: usize,
        /// The batch size it must hold.
        batch_bytes: usize,
    },
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

#[cfg(feature = "testing")]
impl ServerHandle {
    /// Test-only: ends the accept loop as a bug would (its task aborted, its connections
    /// dropped), so that a test can watch the node's watchdog notice ([`Self::is_finished`]).
    pub fn unsafe_abort_accept_loop(&self) {
        self.task.abort();
    }
}

/// Bytes of stream data (all streams together) an unauthenticated peer may have in flight:
/// room for its `Hello`; raised to unlimited (per-stream windows still apply) after it.
const UNAUTHENTICATED_RECEIVE_WINDOW_BYTES: u32 = 64 << 10;

/// The transport of every connection as it starts, unauthenticated: one stream and a small
/// connection receive window, both raised after `Hello`. The send window is the consumer
/// buffer's share for data written and not yet acknowledged (`send_window` is the caller's
/// [`ServerConfig::send_window_bytes`]).
fn transport(cfg: &ServerConfig, send_window: u64) -> quinn::TransportConfig {
    let idle = cfg.idle_timeout;
    let mut t = quinn::TransportConfig::default();
    // Bounds what the server holds for a peer that stops acknowledging or reading: without
    // it quinn buffers up to 10 MB per connection (its default), whatever the peer's credit.
    t.send_window(send_window);
    t.max_idle_timeout(quinn::IdleTimeout::try_from(idle).ok());
    t.keep_alive_interval(Some((idle / 4).max(Duration::from_millis(100))));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    // No DATAGRAM frames: nothing reads them, and quinn would buffer up to 1.25 MB of them per
    // connection (its default) outside every flow-control window, even before `Hello`. A peer
    // that sends one anyway is closed (PROTOCOL_VIOLATION).
    t.datagram_receive_buffer_size(None);
    if cfg.no_handshake_budget() {
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
    let send_window = cfg.send_window_bytes().ok_or(ServeError::ConsumerBuffer {
        buffer_bytes: cfg.consumer_buffer_bytes,
        min_bytes: cfg.consumer_buffer_bytes_min(),
        batch_bytes: cfg.batch_bytes_target,
    })?;
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
    server_cfg.transport_config(Arc::new(transport(&cfg, send_window)));
    let endpoint = crate::udp::bind(cfg.listen, cfg.udp_buffer_bytes)
        .and_then(|socket| {
            if cfg.datagram_filter() {
                crate::udp::attach_server_filter(&socket);
            }
            crate::udp::endpoint(socket, Some(server_cfg))
        })
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
            let legacy = cfg.no_handshake_budget();
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
            let Some((slot, evicted)) =
                Handshakes::enter(&handshakes, handshakes_max, cfg.handshake_grace)
            else {
                // Every place is held by a handshake younger than the grace period: the
                // newcomer is refused (no state kept; clients retry within their connect
                // timeout) rather than evicting a handshake that may be a real client's.
                tracing::debug!(%remote, "refusing connection: handshakes_max reached");
                cfg.observer.on_refused(RefuseReason::HandshakesFull);
                incoming.refuse();
                continue;
            };
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
    pending: BTreeMap<u64, Pending>,
    /// Places given up for an overdue `Hello` in the current grace period: when it began,
    /// and how many. At most `max` per grace period, so that peers which finish TLS and
    /// hold back their `Hello` cannot make the node run more than twice the handshakes the
    /// grace period alone allows (`max` a grace period): handshakes cost the node CPU.
    overdue_evictions: Option<(Instant, usize)>,
}

/// One handshake in progress.
struct Pending {
    /// When its first packet arrived.
    since: Instant,
    /// Once it has finished TLS: when its `Hello` is overdue (see [`HELLO_ALLOWANCE_MIN`]).
    hello_overdue: Option<Instant>,
    evict: tokio::sync::oneshot::Sender<()>,
}

/// Least time a peer that has finished TLS is given for its `Hello` before a newcomer may
/// take its place when every place is held; the allowance is the larger of this and
/// [`HELLO_ALLOWANCE_RTTS`] of the connection's round-trip time. A real client sends its
/// `Hello` as soon as TLS ends, so it arrives within a round trip; a peer that trickles it
/// or sends none holds its place no longer than this, not for the whole grace period.
const HELLO_ALLOWANCE_MIN: Duration = Duration::from_millis(100);
/// Round trips a peer that finished TLS is given for its `Hello` (at least
/// [`HELLO_ALLOWANCE_MIN`]).
const HELLO_ALLOWANCE_RTTS: u32 = 4;

impl Handshakes {
    /// Registers a new handshake. When `max` are in progress, one makes room: the oldest,
    /// if it has been in progress for `grace` at least, or else the one whose `Hello` is the
    /// most overdue ([`HandshakeSlot::tls_done`]); `None` (the newcomer is refused) when
    /// neither exists. The receiver resolves when this one is evicted.
    fn enter(
        this: &Arc<Mutex<Handshakes>>,
        max: usize,
        grace: Duration,
    ) -> Option<(HandshakeSlot, tokio::sync::oneshot::Receiver<()>)> {
        let mut h = lock(this);
        let now = Instant::now();
        while h.pending.len() >= max.max(1) {
            let (&oldest, first) = h.pending.first_key_value()?;
            // A real client finishes TLS and sends its `Hello` in a round trip or two: within
            // the grace period its place is safe from any flood of newer handshakes, unless
            // it has finished TLS and let its `Hello` become overdue. A peer that never
            // finishes is evicted after the grace period, or ends at the handshake timeout.
            let victim = if now.saturating_duration_since(first.since) >= grace {
                oldest
            } else {
                let window = match h.overdue_evictions {
                    Some((began, n)) if now.saturating_duration_since(began) < grace => (began, n),
                    _ => (now, 0),
                };
                if window.1 >= max.max(1) {
                    return None;
                }
                let overdue = h
                    .pending
                    .iter()
                    .filter_map(|(id, p)| Some((p.hello_overdue?, *id)))
                    .filter(|(at, _)| *at <= now)
                    .min();
                let id = overdue?.1;
                h.overdue_evictions = Some((window.0, window.1 + 1));
                id
            };
            if let Some(p) = h.pending.remove(&victim) {
                let _ = p.evict.send(());
            }
        }
        let id = h.next_id;
        h.next_id += 1;
        let (tx, rx) = tokio::sync::oneshot::channel();
        h.pending.insert(
            id,
            Pending {
                since: now,
                hello_overdue: None,
                evict: tx,
            },
        );
        Some((
            HandshakeSlot {
                id,
                handshakes: this.clone(),
            },
            rx,
        ))
    }
}

/// A place among the handshakes in progress, given back on drop.
struct HandshakeSlot {
    id: u64,
    handshakes: Arc<Mutex<Handshakes>>,
}

impl HandshakeSlot {
    /// This handshake has finished TLS with a round-trip time of `rtt`: its `Hello` is
    /// overdue after the allowance ([`HELLO_ALLOWANCE_MIN`], [`HELLO_ALLOWANCE_RTTS`]), from
    /// when a newcomer may take its place.
    fn tls_done(&self, rtt: Duration) {
        let allowance = HELLO_ALLOWANCE_MIN.max(rtt.saturating_mul(HELLO_ALLOWANCE_RTTS));
        if let Some(p) = lock(&self.handshakes).pending.get_mut(&self.id) {
            p.hello_overdue = Some(Instant::now() + allowance);
        }
    }
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

async fn handle_connection<N: Node>(
    incoming: quinn::Incoming,
    c: Conn<N>,
    slot: HandshakeSlot,
    mut evicted: tokio::sync::oneshot::Receiver<()>,
    pre_active: Option<ActiveSlot>,
) -> Result<(), ConnError> {
    let deadline = tokio::time::Instant::now() + c.cfg.handshake_timeout;
    let connecting = incoming.accept()?;
    // The node's side of the connection exists from the first packet (0.5-RTT: a server
    // always gets it), so a handshake evicted or timed out while TLS is still in progress
    // is closed with its code like any other; nothing is sent on it before `Hello`.
    let conn = match connecting.into_0rtt() {
        Ok((conn, established)) => {
            let ended = tokio::select! {
                r = tokio::time::timeout_at(deadline, established) => match r {
                    Ok(_) => conn.close_reason().map(ConnError::Connection),
                    Err(_) => Some(ConnError::Timeout),
                },
                _ = &mut evicted => Some(ConnError::Evicted),
            };
            if let Some(e) = ended {
                conn.close(
                    quinn::VarInt::from_u32(close_code_of(&e)),
                    e.to_string().as_bytes(),
                );
                return Err(e);
            }
            conn
        }
        Err(connecting) => tokio::select! {
            r = tokio::time::timeout_at(deadline, connecting) => r.map_err(|_| ConnError::Timeout)??,
            _ = &mut evicted => return Err(ConnError::Evicted),
        },
    };
    // TLS has finished on the node's side: the `Hello` is due within `hello_timeout` (a real
    // client sent it with its last handshake packet), not whenever the handshake timeout ends.
    // (The test-only legacy admission keeps the old rule: the whole handshake timeout.)
    let hello_deadline = if c.cfg.no_handshake_budget() {
        deadline
    } else {
        slot.tls_done(conn.rtt());
        deadline.min(tokio::time::Instant::now() + c.cfg.hello_timeout)
    };
    let authenticated = tokio::select! {
        r = tokio::time::timeout_at(hello_deadline, authenticate(&conn, &c, pre_active)) => {
            r.unwrap_or(Err(ConnError::Timeout))
        }
        _ = &mut evicted => Err(ConnError::Evicted),
    };
    let (_active, client) = match authenticated {
        Ok(a) => a,
        Err(e) => {
            conn.close(
                quinn::VarInt::from_u32(close_code_of(&e)),
                e.to_string().as_bytes(),
            );
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
    let session = Arc::new(ConnSession::default());
    let mut streams = tokio::task::JoinSet::new();
    loop {
        let (send, recv) = conn.accept_bi().await?;
        while streams.try_join_next().is_some() {}
        let (node, cfg, peer, session) =
            (c.node.clone(), c.cfg.clone(), peer.clone(), session.clone());
        streams.spawn(async move {
            let _open = cfg.observer.stream();
            if let Err(e) = handle_stream(node, cfg, peer, session, send, recv).await {
                tracing::debug!(error = %e, "stream ended with an error");
            }
        });
    }
}

/// The application code a connection that failed admission with `e` is closed with
/// (docs/PROTOCOL.md).
fn close_code_of(e: &ConnError) -> u32 {
    match e {
        ConnError::Unauthorized => close_code::UNAUTHORIZED,
        ConnError::Evicted | ConnError::Full => close_code::BUSY,
        _ => close_code::PROTOCOL,
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
    let hello_limits = if c.cfg.no_handshake_budget() {
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
            // A place among the authenticated connections (the legacy test admission took it
            // before the token was seen).
            let place = match pre_active {
                Some(active) => Some(active),
                None if c.active.fetch_add(1, Ordering::SeqCst) < c.cfg.max_connections => {
                    Some(ActiveSlot(c.active.clone()))
                }
                None => {
                    c.active.fetch_sub(1, Ordering::SeqCst);
                    None
                }
            };
            match place {
                Some(active) => {
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
                None => {
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
                }
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

/// The uuid of a `Welcome`.
pub fn welcome_uuid(bytes: [u8; 16]) -> Uuid {
    Uuid::from_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Marks `slot`'s `Hello` overdue from now.
    fn overdue(h: &Arc<Mutex<Handshakes>>, slot: &HandshakeSlot) {
        if let Some(p) = lock(h).pending.get_mut(&slot.id) {
            p.hello_overdue = Some(Instant::now());
        }
    }

    #[test]
    fn overdue_hellos_give_up_their_places_at_most_max_per_grace_period() {
        let h = Arc::new(Mutex::new(Handshakes::default()));
        let (max, grace) = (4, Duration::from_secs(60));
        let mut first: Vec<_> = (0..max)
            .map(|_| Handshakes::enter(&h, max, grace).expect("a free place"))
            .collect();
        // Every place held by a young handshake still in TLS: the newcomer is refused.
        assert!(Handshakes::enter(&h, max, grace).is_none());
        // Once their `Hello`s are overdue, newcomers take their places, oldest overdue first.
        for (slot, _) in &first {
            overdue(&h, slot);
        }
        let mut second: Vec<_> = (0..max)
            .map(|_| Handshakes::enter(&h, max, grace).expect("an overdue place"))
            .collect();
        for (i, (_, evicted)) in first.iter_mut().enumerate() {
            assert!(
                evicted.try_recv().is_ok(),
                "handshake {i} was told to give up"
            );
        }
        // At most `max` such evictions a grace period: the next overdue place is kept.
        for (slot, _) in &second {
            overdue(&h, slot);
        }
        assert!(Handshakes::enter(&h, max, grace).is_none());
        for (i, (_, evicted)) in second.iter_mut().enumerate() {
            assert!(evicted.try_recv().is_err(), "handshake {i} keeps its place");
        }
    }
}
