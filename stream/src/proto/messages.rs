//! The messages of the protocol (rkyv archives on the wire).
#![allow(
    missing_docs,
    reason = "rkyv's derive generates undocumented resolver types for enum variants"
)]

/// Where a subscription starts.
///
/// persisted: wire type; changes must stay backward compatible.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum Start {
    /// The oldest record still held.
    Earliest,
    /// The first record committed after the subscription is in place.
    Latest,
    /// A local offset of the server's log.
    Offset(u64),
    /// Every record whose GTID is not in this set (text form).
    Gtid(String),
}

/// One write of a client transaction.
///
/// persisted: wire type; changes must stay backward compatible.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum WriteOp {
    /// Set a key.
    Put {
        /// Tree.
        tree: String,
        /// Key.
        key: Vec<u8>,
        /// Value.
        value: Vec<u8>,
    },
    /// Remove a key.
    Delete {
        /// Tree.
        tree: String,
        /// Key.
        key: Vec<u8>,
    },
    /// Merge an operand with the tree's merge operator.
    Merge {
        /// Tree.
        tree: String,
        /// Key.
        key: Vec<u8>,
        /// Operand.
        operand: Vec<u8>,
    },
}

/// Client to server.
///
/// persisted: wire type; changes must stay backward compatible (add variants at the end).
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum Request {
    /// First message of a connection, on its first stream: the cluster token.
    Hello {
        /// Shared secret from the secrets directory.
        token: String,
        /// Free-form client name, for logs and the overview page.
        client: String,
        /// [`PROTOCOL_VERSION`](super::PROTOCOL_VERSION).
        protocol: u32,
    },
    /// Start a subscription on this stream.
    Subscribe {
        /// Start position.
        start: Start,
        /// Only ops on this tree.
        tree: Option<String>,
        /// Only ops whose key starts with this.
        prefix: Option<Vec<u8>>,
        /// Named slot holding the log for this consumer.
        slot: Option<String>,
    },
    /// The consumer has processed everything up to and including `offset`.
    Ack {
        /// Offset processed.
        offset: u64,
    },
    /// Read one key.
    Get {
        /// Tree.
        tree: String,
        /// Key.
        key: Vec<u8>,
    },
    /// Read keys in order.
    Scan {
        /// Tree.
        tree: String,
        /// Key prefix (empty: all).
        prefix: Vec<u8>,
        /// Most rows.
        limit: u64,
    },
    /// Commit writes atomically.
    Commit {
        /// The writes.
        ops: Vec<WriteOp>,
    },
    /// The node's status as JSON.
    Status,
    /// Wait until the node has applied and made durable every GTID of `gtids` (a read fence).
    WaitFor {
        /// GTID set text.
        gtids: String,
        /// Give up after this long.
        timeout_ms: u64,
    },
    /// Read keys in order strictly after `after` (from the first key when `None`), for
    /// paging through a whole tree. Answered with `Rows`.
    Range {
        /// Tree.
        tree: String,
        /// Exclusive lower bound.
        after: Option<Vec<u8>>,
        /// Most rows.
        limit: u64,
    },
}

/// Error classes, so a client knows whether to retry.
///
/// persisted: wire type; changes must stay backward compatible.
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum ErrorCode {
    /// Wrong or missing token: fix the client's secrets.
    Unauthorized,
    /// The request was malformed or not allowed here.
    InvalidRequest,
    /// The requested position was purged or does not exist.
    PositionUnavailable,
    /// The node is read-only (a replica).
    ReadOnly,
    /// The request exceeds a size limit.
    TooLarge,
    /// A transaction conflict: retry.
    Conflict,
    /// The node cannot serve now (stopping, poisoned): try another node or later.
    Unavailable,
    /// Anything else.
    Internal,
}

/// Server to client.
///
/// persisted: wire type; changes must stay backward compatible (add variants at the end).
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum Response {
    /// Answer to a good [`Request::Hello`].
    Welcome {
        /// The server's `server_uuid`.
        server_uuid: [u8; 16],
        /// Server protocol version.
        protocol: u32,
    },
    /// The subscription is in place; records follow from `next_offset` on.
    Subscribed {
        /// Offset of the first record the server will consider.
        next_offset: u64,
        /// The visible head at the time.
        head: u64,
    },
    /// Sent on an idle subscription: the server's visible head.
    Heartbeat {
        /// Visible (durable under sync durability) head.
        head: u64,
        /// Server clock, microseconds since the Unix epoch.
        server_time_us: i64,
    },
    /// Answer to [`Request::Get`].
    Value {
        /// The value, or `None` when the key is absent.
        value: Option<Vec<u8>>,
    },
    /// Answer to [`Request::Scan`].
    Rows {
        /// Key-value pairs in key order.
        rows: Vec<(Vec<u8>, Vec<u8>)>,
    },
    /// Answer to [`Request::Commit`].
    Committed {
        /// Local offset of the transaction.
        offset: u64,
        /// Its GTID, text form.
        gtid: String,
    },
    /// Answer to [`Request::Status`].
    Status {
        /// The status document.
        json: String,
    },
    /// Answer to [`Request::WaitFor`].
    Fenced {
        /// Whether the set was reached before the timeout.
        reached: bool,
        /// The node's `gtid_executed` at the time.
        gtid_executed: String,
    },
    /// The request failed.
    Error {
        /// Class.
        code: ErrorCode,
        /// What happened and what to do.
        message: String,
    },
}
