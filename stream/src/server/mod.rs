//! The QUIC server: authenticates connections, serves subscriptions from the log and key-value
//! requests through the [`Node`] trait, each on its own stream.
//!
//! This module is the public facade; the work is split along what happens to a connection:
//!
//! - `node`: what the server needs from the node ([`Node`], [`BootstrapView`], [`NodeError`]).
//! - `config`: settings ([`ServerConfig`]), [`close_code`]s, and helpers every module shares.
//! - `admission`: the accept loop ([`serve`]), the handshake budget, `Hello`.
//! - `dispatch`: one request per stream, the key-value answers, the monitor hook.
//! - `subscription`: tails of the log, filters ([`filter_txn`]), progress, acks.
//! - `bootstrap`: chunks merged with the live log for a new replica.
//! - `monitor`: the feed of requests served, for `tideline monitor` and `top`.
//!
//! Arrows run one way: admission → dispatch → subscription / bootstrap / monitor, and all of
//! them → config and node, which depend on no other module of the server.
//!
//! Admission: a peer is *unauthenticated* from its first packet until its `Hello` carried the
//! cluster token. Unauthenticated peers have their own budget, apart from the authenticated
//! connections: at most `handshakes_max` at once (a new one evicts the oldest, so peers that
//! never finish cannot lock real clients out, but only one in progress for `handshake_grace`:
//! while all are younger the newcomer is refused, so a burst cannot push out a real client
//! in the round trips of its handshake; evicted ones are closed with code 3 at any stage), a QUIC Retry (address validation, no state
//! kept) once `handshakes_before_retry` are in progress, one stream, and a first message of at
//! most `hello_bytes_max`. Only after `Hello` does a connection count toward
//! `max_connections` and get `max_streams_per_connection` streams and the full frame limits.
//!
//! Back-pressure: a subscription task hands each batch to quinn whole (`outbox`) and waits,
//! before it hands the next, for QUIC flow control credit and room in the connection's send
//! window to take the previous one. A consumer that stops reading stalls only its own
//! stream's task; the server holds at most `consumer_buffer_bytes` for it (its log reader's
//! chunk, the batch being prepared and the one in flight, the connection's state, and the send
//! window: data written and not yet acknowledged), so memory stays bounded and writers and
//! other tails are not slowed.

mod admission;
mod bootstrap;
mod config;
mod dispatch;
mod monitor;
mod node;
mod outbox;
mod subscription;

pub use admission::{ServeError, ServerHandle, serve, welcome_uuid};
pub use config::{CONSUMER_BUFFER_BYTES_DEFAULT, ServerConfig, close_code};
pub use node::{
    BootstrapView, IndexPage, Node, NodeError, Page, Rows, SCAN_PAGE_BYTES_MAX, ScanPage,
    collect_page,
};
pub use subscription::filter_txn;
