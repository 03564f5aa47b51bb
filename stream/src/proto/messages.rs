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
    /// Declare a secondary index over JSON pointers of the tree's values (a logged op).
    CreateIndex {
        /// Tree.
        tree: String,
        /// Index name.
        name: String,
        /// JSON pointers, one per component.
        paths: Vec<String>,
        /// Refuse a second key for one value once live.
        unique: bool,
    },
    /// Drop a secondary index (a logged op).
    DropIndex {
        /// Tree.
        tree: String,
        /// Index name.
        name: String,
    },
}

/// A secondary index's definition.
///
/// persisted: wire type; changes must stay backward compatible.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct IndexDef {
    /// Index name.
    pub name: String,
    /// JSON pointers, one per component.
    pub paths: Vec<String>,
    /// Whether it is unique.
    pub unique: bool,
}

/// A read of a secondary index: documents whose leading components equal `values` and
/// whose next component starts with `prefix`, in index order, strictly after entry key
/// `after`, from one snapshot of the node. With `fence`, the node first waits (at most
/// `timeout_ms`) until it has applied that GTID set and the index is live.
///
/// persisted: wire type; changes must stay backward compatible.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct IndexQuery {
    /// Tree.
    pub tree: String,
    /// Index name.
    pub index: String,
    /// Exact values of the leading components (empty: all).
    pub values: Vec<Vec<u8>>,
    /// Prefix of the next component's value (empty: any).
    pub prefix: Vec<u8>,
    /// Exclusive lower bound: the `next` of the previous page.
    pub after: Option<Vec<u8>>,
    /// Most rows.
    pub limit: u64,
    /// Target size of the page's keys and values, in bytes (the server caps it).
    pub bytes_max: u64,
    /// GTID set text to wait for before reading.
    pub fence: Option<String>,
    /// How long to wait for the fence (and for the index to be live).
    pub timeout_ms: u64,
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
    /// Start (or resume) a bootstrap on this stream: the server sends one ordered stream of
    /// live log batches and [`Response::Chunk`]s, each chunk placed at the log position it was
    /// read at, and ends with [`Response::BootstrapDone`].
    Bootstrap {
        /// Where a previous bootstrap from this server stopped; `None` starts from scratch.
        resume: Option<BootstrapResume>,
        /// Target size of a chunk's entries, in bytes (the server caps it).
        chunk_bytes: u64,
    },
    /// On a bootstrap stream: the consumer has stored this many chunks of the stream. The
    /// server sends a chunk only once every earlier one is stored, so a consumer killed at
    /// any moment loses at most one chunk.
    ChunksStored {
        /// Chunks stored since this stream began.
        chunks: u64,
    },
    /// Read one page of keys starting with `prefix`, in key order, strictly after `after`
    /// (from the first such key when `None`). Answered with `Rows`: at most `limit` rows and
    /// about `bytes_max` bytes (the server caps both; a page holds at least one row when any
    /// is left). An empty page ends the scan. A client pages by passing the last key it got.
    ScanPage {
        /// Tree.
        tree: String,
        /// Key prefix (empty: all).
        prefix: Vec<u8>,
        /// Exclusive lower bound: the last key of the previous page.
        after: Option<Vec<u8>>,
        /// Most rows in this page.
        limit: u64,
        /// Target size of the page's keys and values, in bytes.
        bytes_max: u64,
    },
    /// Attach a live monitor (like Redis MONITOR): the server answers `MonitorStarted`, then
    /// streams `Monitor { events }` with every request it serves (or a sample of them) until
    /// the client closes the stream.
    Monitor {
        /// Only requests on this tree.
        tree: Option<String>,
        /// Share of requests to report, in parts per million (1,000,000 = every request).
        sample_ppm: u32,
    },
    /// Read a secondary index (answered with [`Response::IndexRows`]).
    IndexQuery(IndexQuery),
    /// Remove the consumer slot `name`, so that it holds the log no longer (answered with
    /// [`Response::SlotDropped`]). Refused while a live subscription uses the slot.
    DropSlot {
        /// Slot name.
        name: String,
    },
}

impl Request {
    /// The message's name, as docs/PROTOCOL.md names it: for the error that refuses a request
    /// sent on a stream that does not take it.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Hello { .. } => "Hello",
            Request::Subscribe { .. } => "Subscribe",
            Request::Ack { .. } => "Ack",
            Request::Get { .. } => "Get",
            Request::Scan { .. } => "Scan",
            Request::Commit { .. } => "Commit",
            Request::Status => "Status",
            Request::WaitFor { .. } => "WaitFor",
            Request::Range { .. } => "Range",
            Request::Bootstrap { .. } => "Bootstrap",
            Request::ChunksStored { .. } => "ChunksStored",
            Request::ScanPage { .. } => "ScanPage",
            Request::Monitor { .. } => "Monitor",
            Request::IndexQuery(_) => "IndexQuery",
            Request::DropSlot { .. } => "DropSlot",
        }
    }
}

/// Where to resume a bootstrap.
///
/// persisted: wire type; changes must stay backward compatible.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct BootstrapResume {
    /// The server the earlier part came from (offsets are that server's).
    pub server_uuid: [u8; 16],
    /// Every live record up to and including this offset was already received.
    pub after_offset: u64,
    /// Everything before this point of the (tree, key) order was already copied.
    pub cursor: Cursor,
    /// The server's history epoch the earlier part was copied in (from
    /// [`Response::BootstrapStarted`]); the server refuses to resume in another one.
    pub epoch: u64,
}

/// A point in the (tree name, key) order that a bootstrap copies in.
///
/// persisted: wire type; changes must stay backward compatible.
#[derive(
    Debug, Clone, Default, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct Cursor {
    /// Tree being copied ("" before the first tree).
    pub tree: String,
    /// First key of `tree` not yet copied.
    pub key: Vec<u8>,
    /// `tree` is copied completely.
    pub tree_done: bool,
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
        /// GTID set text: every GTID covered before `next_offset` (the history before the
        /// start point, purged or not; for a GTID start, the client's own set). A client adds
        /// it to its seen set, so that after a failover it asks only for what came later.
        gtids_before: String,
        /// The server's history epoch: offsets of this subscription are meaningful only
        /// within it. A client resuming by offset checks it and falls back to its GTID set
        /// when the server's history was replaced.
        epoch: u64,
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
    /// A bootstrap stream begins; live records after `after_offset` follow, mixed with chunks.
    BootstrapStarted {
        /// The server's `server_uuid`.
        server_uuid: [u8; 16],
        /// Live records after this offset follow.
        after_offset: u64,
        /// Estimated keys in the server's trees (for progress; may be off).
        keys_estimate: u64,
        /// Estimated bytes of keys and values (for progress; may be off).
        bytes_estimate: u64,
        /// The server's history epoch the copy is taken in; needed to resume it. If the
        /// epoch changes while the copy is served, the server ends the stream with an error.
        epoch: u64,
    },
    /// A part of a chunk of a tree (see [`Chunk`]).
    Chunk(Chunk),
    /// The bootstrap is complete: the copy equals the server's state at `offset`.
    BootstrapDone {
        /// The handover position.
        offset: u64,
        /// The server's `gtid_executed` at `offset`.
        gtid_executed: String,
    },
    /// On a filtered subscription: every record up to and including `through` was considered
    /// (sent or dropped by the filter), and `gtids` is every GTID covered through it (the
    /// start's covered set and all records considered). Lets the consumer's checkpoint and
    /// slot move past records its filter dropped. Sent at the end of a batch and before a
    /// heartbeat whenever the filter dropped records after the last one sent.
    Progress {
        /// Last offset considered.
        through: u64,
        /// GTID set text covered through `through`.
        gtids: String,
    },
    /// A monitor is attached; events follow.
    MonitorStarted,
    /// Requests the node served since the last `Monitor` message, oldest first. `dropped`
    /// counts events this monitor missed because it read too slowly.
    Monitor {
        /// The events.
        events: Vec<MonitorEvent>,
        /// Events lost to a slow monitor since the previous message.
        dropped: u64,
    },
    /// On a bootstrap stream, right before the first part of each chunk of a tree that has
    /// secondary indexes: the tree's index definitions in the view the chunk is read from.
    /// The consumer declares them (creating the tree first if needed) and builds their
    /// entries from its own copy; live index ops of the tree follow as log records.
    BootstrapIndexes {
        /// The tree.
        tree: String,
        /// Its merge operator (to create the tree before its first chunk).
        merge_operator: Option<String>,
        /// The definitions, by name.
        indexes: Vec<IndexDef>,
    },
    /// Answer to [`Request::IndexQuery`]: documents (primary key, value) in index order.
    IndexRows {
        /// Key-value pairs of the documents.
        rows: Vec<(Vec<u8>, Vec<u8>)>,
        /// Pass as `after` to read the next page; `None`: no more.
        next: Option<Vec<u8>>,
    },
    /// Answer to [`Request::DropSlot`]: the slot is gone (and its removal saved).
    SlotDropped {
        /// The restart offset the slot held when it was dropped.
        restart_offset: u64,
    },
}

/// A part of a chunk of a tree, read from a snapshot at `offset`: it replaces the key range
/// `[from, to)` (`to: None` = to the end of the tree). Every live record up to `offset` was
/// sent before the chunk's first part; every later one comes after its last.
///
/// persisted: wire type; changes must stay backward compatible.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Chunk {
    /// Tree.
    pub tree: String,
    /// The tree's merge operator, if any.
    pub merge_operator: Option<String>,
    /// First key of the range (inclusive).
    pub from: Vec<u8>,
    /// End of the range (exclusive); `None` = end of the tree.
    pub to: Option<Vec<u8>>,
    /// The entries, packed: per entry `u32` key length, `u32` value length (little endian),
    /// key bytes, value bytes; ascending keys. See [`super::pack_entry`].
    pub entries: Vec<u8>,
    /// Snapshot position (last applied offset) the chunk was read at.
    pub offset: u64,
    /// Whether this message ends the chunk. A chunk travels as consecutive parts (each with
    /// its own sub-range, so the receiver can store each as it arrives); its progress counts
    /// only once its last part is stored.
    pub last: bool,
}

/// One request a node served, as a monitor reports it.
///
/// persisted: wire type; changes must stay backward compatible.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct MonitorEvent {
    /// When it finished, microseconds since the Unix epoch.
    pub ts_us: i64,
    /// The client's address.
    pub remote: String,
    /// The request: `get`, `scan` (`Scan` and `ScanPage`), `range`, `commit`, `index`
    /// (`IndexQuery`), `status`, `wait_for`, `subscribe`, `bootstrap` or `drop_slot`.
    pub kind: String,
    /// The tree (empty where the request has none): the one read, the first op's of a
    /// commit, the one queried, or a subscription's tree filter.
    pub tree: String,
    /// What the request names besides its tree (empty where it names nothing): `get` the
    /// key; `scan` the prefix; `range` the `after` key (empty from the first key); `commit`
    /// its first op's key, or the index name of a first `CreateIndex` or `DropIndex`; `index`
    /// the index name; `wait_for` the GTID set; `subscribe` its prefix filter; `drop_slot`
    /// the slot name; `status` and `bootstrap` nothing.
    pub key: Vec<u8>,
    /// How long the node took to answer, in microseconds.
    pub latency_us: u64,
    /// Whether the answer was a success.
    pub ok: bool,
}
