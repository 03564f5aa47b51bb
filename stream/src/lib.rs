//! # tideline-stream: the wire protocol and its QUIC server and client
//!
//! Tideline serves resumable tails of its log, and key-value requests, over QUIC (quinn,
//! ALPN `tideline/1`, TLS 1.3 with a cluster CA, a cluster token on every connection). One
//! subscription per bidirectional stream, so a slow tail never blocks another; every request
//! gets its own stream too.
//!
//! - [`proto`]: frames, messages, and the two ends of a subscription as state machines — no
//!   sockets, no clocks, no tokio. Records travel as the log's own checksummed frames.
//! - [`server`]: the quinn server; it reaches the node through the [`Node`] trait.
//! - [`client`]: the quinn client, one request or subscription per stream.
//! - [`tls`]: creating and loading the cluster secrets.
//! - `testing` (feature `testing`, tests only): a fake node serving bootstrap copies.
//!
//! It does not reconnect, checkpoint or fence by itself: that is the smart client in
//! `tideline-consumers`. See `docs/PROTOCOL.md` for every message and a resume timeline.
//!
//! ```
//! use tideline_stream::proto::{encode_message, FrameDecoder, Frame, Limits, Request, Start};
//! let mut wire = Vec::new();
//! encode_message(&Request::Subscribe { start: Start::Earliest, tree: None, prefix: None, slot: None }, &mut wire)?;
//! let mut dec = FrameDecoder::new(Limits::default());
//! dec.feed(&wire);
//! assert!(matches!(dec.next_frame::<Request>()?, Some(Frame::Message(Request::Subscribe { .. }))));
//! # Ok::<(), tideline_stream::proto::ProtoError>(())
//! ```

#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod client;
pub mod log_node;
pub mod observe;
pub mod proto;
pub mod server;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tls;
pub mod udp;
mod wire;

pub use client::{
    BootstrapEvent, BootstrapStream, ChunkAcker, Client, ClientConfig, ClientError, Event,
    MonitorStream, Subscription,
};
pub use observe::{Observer, RefuseReason, SubscriptionInfo};
pub use proto::{
    ErrorCode, IndexDef, IndexQuery, Limits, MonitorEvent, RawBatch, RawRecord, Start, WriteOp,
};
pub use server::{
    BootstrapView, CONSUMER_BUFFER_BYTES_DEFAULT, IndexPage, Node, NodeError, Page,
    SCAN_PAGE_BYTES_MAX, ScanPage, ServeError, ServerConfig, ServerHandle, serve,
};
pub use tls::{ClientSecrets, SecretsError, ServerSecrets, ensure_secrets};
pub use wire::WireError;
