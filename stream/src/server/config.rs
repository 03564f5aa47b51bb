//! What every serving module shares: the server's settings ([`ServerConfig`]), the close
//! codes it ends connections with, the `Error` answer, and the clock.
//!
//! Owns: settings and the small helpers the other modules of the server use. Must never hold
//! state, do I/O, or depend on another module of the server (admission, dispatch,
//! subscriptions, the monitor feed and bootstrap all depend on it, never the reverse).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::observe::Observer;
use crate::proto::{ErrorCode, Limits, Response};

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
    /// Once the node's side of TLS has finished, the peer's whole `Hello` must have arrived
    /// within this (and within `handshake_timeout` of the first packet): a real client sends
    /// it with its last handshake packet, so only a peer that trickles or withholds it waits
    /// here, and every packet it trickles costs the node a receive and an acknowledgement.
    pub hello_timeout: Duration,
    /// Most concurrent authenticated connections; more are refused.
    pub max_connections: usize,
    /// Most concurrent streams per authenticated connection (an unauthenticated one gets one).
    pub max_streams_per_connection: u32,
    /// Most connections between their first packet and their `Hello` (TLS handshake and
    /// token), counted apart from `max_connections`. When full, a new one evicts the oldest
    /// if that one has been in progress for `handshake_grace`, and is refused otherwise.
    pub handshakes_max: usize,
    /// How long a handshake in progress is safe from eviction by newer ones: long enough for
    /// a real client to finish TLS and send its `Hello`, so that no flood of handshakes,
    /// however fast, can push it out first. Zero: the oldest is always evicted.
    pub handshake_grace: Duration,
    /// Once this many handshakes are in progress, a peer whose address is not yet validated
    /// gets a QUIC Retry (stateless) and must come back from the address it claims. 0: always.
    pub handshakes_before_retry: usize,
    /// Largest first message (`Hello`) of an unauthenticated connection, in bytes.
    pub hello_bytes_max: u32,
    /// Test-only: give unauthenticated peers the limits of authenticated ones and count them
    /// toward `max_connections`, with no Retry and no eviction (the lockout the handshake
    /// budget prevents). Exists so the flood tests can prove they catch it.
    #[cfg(feature = "testing")]
    #[doc(hidden)]
    pub unsafe_no_handshake_budget: bool,
    /// Test-only: a subscription with a slot waits for a notification here once its slot is
    /// created or taken, before it answers `Subscribed`. Exists so the slot tests can send a
    /// `DropSlot` while a subscription is in that window.
    #[cfg(feature = "testing")]
    #[doc(hidden)]
    pub unsafe_pause_after_slot_attach: Option<Arc<tokio::sync::Notify>>,
    /// Test-only: leave the server's UDP socket without its filter of datagrams that cannot
    /// be QUIC for the node (`crate::udp::attach_server_filter`). Exists so the filter's test
    /// can prove it catches garbage reaching the node.
    #[cfg(feature = "testing")]
    #[doc(hidden)]
    pub unsafe_no_datagram_filter: bool,
    /// Heartbeat interval on idle subscriptions.
    pub heartbeat: Duration,
    /// A subscription sends a batch once it holds this many bytes of records.
    pub batch_bytes_target: usize,
    /// Most memory the server holds for one consumer that stops reading (or acknowledging):
    /// its log reader's chunk (`READER_CHUNK_BYTES`, 1 MiB), the batch being prepared and the
    /// one in flight (room for twice `batch_bytes_target` each), the connection's own state
    /// (`CONNECTION_STATE_BYTES`, 256 KiB) and the data written to it and not yet acknowledged by the
    /// peer (the connection's send window: the rest of this figure, shared by the streams of
    /// one connection). One transaction larger than a batch makes that batch larger while it
    /// is sent. At least [`ServerConfig::consumer_buffer_bytes_min`].
    pub consumer_buffer_bytes: usize,
    /// UDP send and receive buffer size (0: the kernel's default).
    pub udp_buffer_bytes: usize,
    /// Chunks a bootstrap stream keeps sent and not yet reported stored (`ChunksStored`), at
    /// least 1. With 1 (the default) a chunk goes out only once the one before it is stored,
    /// so a replica killed mid-copy fetches at most one chunk again. With 2, chunk k+1
    /// crosses the network while the replica stores chunk k: a faster copy (+45–65% on a
    /// 2-core machine, docs/benchmarks.md), at the cost of up to two chunks fetched again
    /// per kill and a second chunk held in flight.
    pub bootstrap_chunks_in_flight: u64,
    /// Counters, the subscription registry and the monitor feed; the node reads them.
    pub observer: Arc<Observer>,
}

impl ServerConfig {
    /// Whether the handshake budget is off: never, unless a test turned it off.
    pub(crate) fn no_handshake_budget(&self) -> bool {
        #[cfg(feature = "testing")]
        return self.unsafe_no_handshake_budget;
        #[cfg(not(feature = "testing"))]
        false
    }

    /// Whether the server's socket filters out datagrams that cannot be QUIC for the node:
    /// always, unless a test turned it off.
    pub(crate) fn datagram_filter(&self) -> bool {
        #[cfg(feature = "testing")]
        return !self.unsafe_no_datagram_filter;
        #[cfg(not(feature = "testing"))]
        true
    }

    /// Defaults for `listen`.
    pub fn new(listen: SocketAddr) -> Self {
        ServerConfig {
            listen,
            limits: Limits::default(),
            idle_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(5),
            hello_timeout: Duration::from_secs(1),
            max_connections: 1024,
            max_streams_per_connection: 256,
            handshakes_max: 256,
            handshake_grace: Duration::from_secs(1),
            handshakes_before_retry: 32,
            hello_bytes_max: 4 << 10,
            #[cfg(feature = "testing")]
            unsafe_no_handshake_budget: false,
            #[cfg(feature = "testing")]
            unsafe_pause_after_slot_attach: None,
            #[cfg(feature = "testing")]
            unsafe_no_datagram_filter: false,
            heartbeat: Duration::from_millis(500),
            batch_bytes_target: 256 << 10,
            consumer_buffer_bytes: CONSUMER_BUFFER_BYTES_DEFAULT,
            udp_buffer_bytes: crate::udp::UDP_BUFFER_BYTES_DEFAULT,
            bootstrap_chunks_in_flight: 1,
            observer: Arc::new(Observer::new()),
        }
    }

    /// What a consumer holds besides its send window: the reader's chunk, the batch being
    /// prepared and the one in flight (a subscription is two batches deep; the one in flight
    /// keeps its whole buffer until quinn has taken it and the peer acknowledged all of it),
    /// the connection's state.
    fn consumer_fixed_bytes(&self) -> usize {
        READER_CHUNK_BYTES + 2 * 2 * self.batch_bytes_target + CONNECTION_STATE_BYTES
    }

    /// The smallest `consumer_buffer_bytes` this configuration accepts: what a consumer holds
    /// besides its send window, and a send window of two batches (below that a tail waits on
    /// acknowledgements between batches).
    pub fn consumer_buffer_bytes_min(&self) -> usize {
        self.consumer_fixed_bytes() + 2 * self.batch_bytes_target
    }

    /// The connection's send window: what `consumer_buffer_bytes` leaves once the reader's
    /// chunk, the two batches and the connection's state are taken out. `None` when
    /// the buffer is smaller than [`ServerConfig::consumer_buffer_bytes_min`].
    pub(crate) fn send_window_bytes(&self) -> Option<u64> {
        (self.consumer_buffer_bytes >= self.consumer_buffer_bytes_min())
            .then(|| (self.consumer_buffer_bytes - self.consumer_fixed_bytes()) as u64)
    }
}

/// What one open log reader holds: `tideline_wal`'s reader reads a segment 1 MiB at a time
/// (its `READ_CHUNK_BYTES`; more only for a larger record).
pub const READER_CHUNK_BYTES: usize = 1 << 20;

/// What one connection's TLS session and quinn state (packet and stream bookkeeping, receive
/// buffers of its requests) take, counted in a consumer's buffer: an estimate, measured
/// together with the rest in `integration/tests/stalled_consumers.rs`.
pub const CONNECTION_STATE_BYTES: usize = 256 << 10;

/// Default [`ServerConfig::consumer_buffer_bytes`]: 4 MiB per consumer that stops reading, so
/// a thousand of them hold at most 4 GiB; a reading tail on loopback or a LAN needs far less
/// than the 1.75 MiB of send window it leaves (raise it for links whose bandwidth times round
/// trip exceeds that).
pub const CONSUMER_BUFFER_BYTES_DEFAULT: usize = 4 << 20;

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

/// An `Error` answer.
pub(crate) fn error(code: ErrorCode, message: impl Into<String>) -> Response {
    Response::Error {
        code,
        message: message.into(),
    }
}

/// Microseconds since the Unix epoch, for heartbeats and monitor events (0 if the clock is
/// before it).
pub(super) fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}
