//! Errors of the engine: one enum per operation family (open, read, write). Each message
//! says what happened and what to do about it.

use crate::store::StoreError;

/// Opening or recovering an engine failed. Nothing was changed in the log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The state store could not be opened or read.
    #[error(
        "cannot open the state store in {path}: {source}; check that the directory exists, is \
         writable and is not used by another process"
    )]
    Store {
        /// The store directory.
        path: String,
        /// The store's error.
        source: StoreError,
    },
    /// The store holds bytes that do not decode.
    #[error("the state store in {path} is damaged: {what}")]
    CorruptStore {
        /// The store directory.
        path: String,
        /// What did not decode, then what to do: [`crate::Engine::open`] advises deleting the
        /// store only when its log can rebuild it (the log still starts at offset 1 with no
        /// history before it), else restoring the store or bootstrapping the node again.
        what: String,
    },
    /// The store was built from another node's log.
    #[error(
        "the state store belongs to server {store_uuid} but the log is server {log_uuid}; \
         point --data at the matching log and store, or {remedy}"
    )]
    WrongLog {
        /// server_uuid recorded in the store.
        store_uuid: uuid::Uuid,
        /// server_uuid of the log.
        log_uuid: uuid::Uuid,
        /// What to do otherwise: delete the store only when this log can rebuild it.
        remedy: String,
    },
    /// The store lacks GTIDs the log counts as executed before its first record (a bootstrap
    /// copy, or records retention removed): it was deleted, or replaced by an older copy, and
    /// the log cannot rebuild what is missing.
    #[error(
        "the state store in {path} lacks GTIDs {missing} that the log counts as executed but \
         cannot replay (a bootstrap copy, or records retention removed): the store was \
         deleted or replaced by an older copy; restore the store from a backup taken since, \
         or empty the node's data directory (log and store) and bootstrap the node again \
         from a replica"
    )]
    StoreLacksLogHistory {
        /// The store directory.
        path: String,
        /// The GTIDs the store lacks.
        missing: tideline_wal::GtidSet,
    },
    /// The store has applied records the log does not hold: the log lost durable records.
    #[error(
        "the state store has applied offset {store_offset} but the log ends at \
         {log_offset}; the log lost acknowledged records: restore this node from a replica"
    )]
    StoreAheadOfLog {
        /// Offset applied by the store.
        store_offset: u64,
        /// Last visible offset of the log.
        log_offset: u64,
    },
    /// The store needs records that retention already removed from the log.
    #[error(
        "the state store has applied up to offset {store_offset}, but the log starts at \
         {first_offset}; records in between are gone: restore the store from a more recent \
         backup, or empty the node's data directory (log and store) and bootstrap the node \
         again from a replica"
    )]
    LogMissing {
        /// Offset applied by the store.
        store_offset: u64,
        /// First offset still in the log.
        first_offset: u64,
    },
    /// Reading the log during replay failed.
    #[error("replaying the log into the store failed: {0}")]
    Log(#[from] tideline_wal::Error),
    /// Applying a replayed record to the store failed.
    #[error(
        "applying log record {offset} to the store failed: {reason}; fix what it names (a \
         failed write: check the disk) and restart (replay resumes from the store's last \
         applied offset)"
    )]
    Apply {
        /// The record's offset.
        offset: u64,
        /// What failed.
        reason: String,
    },
    /// Syncing the store after recovery failed.
    #[error(
        "syncing the state store in {path} after recovery failed: {source}; check the disk \
         and restart (recovery applies the log again)"
    )]
    StoreSync {
        /// The store directory.
        path: String,
        /// The store's error.
        source: StoreError,
    },
    /// A setting is out of range.
    #[error("invalid engine option: {0}")]
    BadOption(String),
}

/// A read failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// No tree has this name.
    #[error(
        "no tree named `{0}`; create it first (Engine::create_tree) or list trees with \
         Engine::trees"
    )]
    UnknownTree(String),
    /// The state store failed.
    #[error("reading the state store failed: {0}; check the disk, then retry")]
    Store(#[from] StoreError),
    /// No index has this name on this tree.
    #[error(
        "no index named `{name}` on tree `{tree}`; list indexes with `tideline index list` \
         (Engine::indexes)"
    )]
    UnknownIndex {
        /// Tree.
        tree: String,
        /// Index name.
        name: String,
    },
    /// The index is not live yet (backfilling) or failed: its entries are incomplete.
    #[error(
        "index `{name}` on tree `{tree}` is {state}; query it once it is live (see \
         `tideline index status`), or pass a fence (`--after`) to wait for it"
    )]
    IndexNotLive {
        /// Tree.
        tree: String,
        /// Index name.
        name: String,
        /// Its state, e.g. `backfilling (42.0%)`.
        state: String,
    },
    /// A query gave more values than the index has paths: nothing the index holds can match.
    #[error(
        "index `{name}` on tree `{tree}` has {paths} {} but the query gave {values} values; give \
         at most one value per path, in the order of the paths (see `tideline index list`)",
        if *.paths == 1 { "path" } else { "paths" }
    )]
    IndexTooManyValues {
        /// Tree.
        tree: String,
        /// Index name.
        name: String,
        /// How many paths the index has.
        paths: usize,
        /// How many values the query gave.
        values: usize,
    },
    /// An index entry does not match its document: the index is damaged.
    #[error(
        "index `{name}` on tree `{tree}` has an entry for key {key:?} that does not match the \
         document; drop the index and create it again, and report this as a bug"
    )]
    IndexDamaged {
        /// Tree.
        tree: String,
        /// Index name.
        name: String,
        /// The key, lossily as text.
        key: String,
    },
    /// A JSON helper found a value that is not JSON.
    #[error(
        "value of key {key:?} in tree `{tree}` is not JSON ({reason}); read it with get() \
         instead of get_json()"
    )]
    NotJson {
        /// Tree.
        tree: String,
        /// Key, lossily as text.
        key: String,
        /// Parser's message.
        reason: String,
    },
}

/// A transaction (or a single write, which is a transaction of one op) was not committed.
/// Nothing it wrote reached the log or the store, except where a variant says otherwise.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WriteError {
    /// No tree has this name.
    #[error(
        "no tree named `{0}`; create it first (Engine::create_tree) or list trees with \
         Engine::trees"
    )]
    UnknownTree(String),
    /// A tree with this name already exists, with another merge operator.
    #[error(
        "tree `{tree}` already exists with merge operator {existing}; drop it first or use \
         another name"
    )]
    TreeExists {
        /// Tree.
        tree: String,
        /// Its operator (`none` if none).
        existing: String,
    },
    /// A tree name is not acceptable.
    #[error("invalid tree name `{0}`: use 1-128 characters from [A-Za-z0-9_.:-]")]
    BadTreeName(String),
    /// No built-in merge operator has this name.
    #[error("unknown merge operator `{name}`; built-ins are {known}")]
    UnknownMergeOperator {
        /// The name asked for.
        name: String,
        /// The known names.
        known: String,
    },
    /// A merge on a tree created without a merge operator.
    #[error("tree `{0}` has no merge operator; create the tree with one (e.g. `add`) or use put")]
    NoMergeOperator(String),
    /// A merge operand the tree's operator cannot use.
    #[error("bad operand for merge operator `{operator}` in tree `{tree}`: {reason}")]
    BadOperand {
        /// Tree.
        tree: String,
        /// Operator name.
        operator: String,
        /// What is wrong.
        reason: String,
    },
    /// Keys must not be empty.
    #[error("empty key in tree `{0}`: keys must be 1 byte or longer")]
    EmptyKey(String),
    /// A key over the limit.
    #[error(
        "key of {bytes} bytes exceeds the limit of {max} bytes; use a shorter key (or raise \
         the limit, at most 65535: `serve --key-bytes-max`, EngineOptions::key_bytes_max)"
    )]
    KeyTooLarge {
        /// Key length.
        bytes: usize,
        /// Limit.
        max: usize,
    },
    /// A value or merge operand over the limit, or a merge that would leave a value over it.
    #[error(
        "value of {bytes} bytes (for a merge: the value it would leave under its key) exceeds \
         the limit of {max} bytes; nothing was written: split the value across keys, or raise \
         the limit (`serve --value-bytes-max`, EngineOptions::value_bytes_max)"
    )]
    ValueTooLarge {
        /// Value length (for a merge: of the value it would leave).
        bytes: usize,
        /// Limit.
        max: usize,
    },
    /// A JSON helper was given text that is not JSON.
    #[error("malformed JSON for key {key:?} in tree `{tree}`: {reason}; nothing was written")]
    MalformedJson {
        /// Tree.
        tree: String,
        /// Key, lossily as text.
        key: String,
        /// Parser's message.
        reason: String,
    },
    /// A counter helper found a value that is not a decimal integer.
    #[error(
        "value of key {key:?} in tree `{tree}` is not a decimal integer; overwrite it with put \
         before counting"
    )]
    NotAnInteger {
        /// Tree.
        tree: String,
        /// Key, lossily as text.
        key: String,
    },
    /// A counter would overflow.
    #[error("counter {key:?} in tree `{tree}` would overflow i64; nothing was written")]
    Overflow {
        /// Tree.
        tree: String,
        /// Key, lossily as text.
        key: String,
    },
    /// Another transaction committed a write to something this one read. Retryable: run the
    /// transaction again (Engine::transaction does so itself).
    #[error(
        "transaction conflict: {0}; nothing was written, run the transaction again \
         (Engine::transaction retries automatically)"
    )]
    Conflict(String),
    /// The engine is read-only (a replica). Local writes are refused.
    #[error(
        "this node is read-only (a replica); send writes to the primary, or promote this node \
         (Engine::set_read_only(false))"
    )]
    ReadOnly,
    /// The engine stopped accepting writes after a failure it cannot recover from at run time
    /// (a failed log fsync, or a store write that failed after the log accepted a record).
    /// The outcome of the transaction that got this error is unknown: its record may have
    /// reached the disk before the failure, and then it is committed after the restart (look
    /// for its GTID in `gtid_executed`, or read its keys back). Transactions refused after the
    /// failure are not committed.
    #[error(
        "the engine refuses writes after a fatal failure ({reason}); stop the node, check the \
         disk and restart it: recovery keeps every acknowledged transaction, and one that \
         failed with this error may or may not be there"
    )]
    FailStop {
        /// The original failure.
        reason: String,
    },
    /// Every GTID number of this node's server uuid is taken (the last one, 2^64 - 1, came
    /// from an upstream or a peer using this node's uuid): a local commit has no number left.
    /// Not retryable.
    #[error(
        "this node cannot number a local transaction: GTID {server_uuid}:18446744073709551615,          the last number of its server uuid, is already taken (an upstream or a peer used          this node's uuid); nothing was written. Give the writes to a node with another uuid,          or bootstrap this one as a new node"
    )]
    GtidsExhausted {
        /// This node's server uuid.
        server_uuid: uuid::Uuid,
    },
    /// The engine was closed.
    #[error("the engine is closed; open it again to write")]
    Closed,
    /// The transaction does not fit into one log record.
    #[error(
        "the transaction encodes to {bytes} bytes, over the log's record limit of {max}; \
         split it into smaller transactions"
    )]
    TooLarge {
        /// Encoded size.
        bytes: u64,
        /// Limit.
        max: u32,
    },
    /// The log refused the record for another reason.
    #[error("the log refused the transaction: {0}")]
    Log(tideline_wal::Error),
    /// A read inside the transaction failed.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// A bootstrap is replacing this node's state: local commits and upstream apply wait
    /// until it finishes.
    #[error(
        "this node is being bootstrapped from its upstream; writes are refused until it \
         finishes (see `tideline status`)"
    )]
    Bootstrapping,
    /// A bootstrap call other than `bootstrap_begin` while no bootstrap runs.
    #[error(
        "no bootstrap is in progress on this node; start one with Engine::bootstrap_begin \
         (nothing was written)"
    )]
    NotBootstrapping,
    /// A bootstrap would wipe a read-write node under local writers.
    #[error(
        "cannot bootstrap: this read-write node has local transactions in flight (applied \
         offset {applied}, submitted {submitted}); stop local writers and make the node \
         read-only (Engine::set_read_only(true)) first"
    )]
    CommitsInFlight {
        /// Last applied offset.
        applied: u64,
        /// Last submitted offset.
        submitted: u64,
    },
    /// An index definition is not acceptable.
    #[error("invalid index: {0}")]
    BadIndex(String),
    /// An index with this name exists on the tree.
    #[error(
        "index `{name}` already exists on tree `{tree}`; drop it first (`tideline index drop`) \
         or use another name"
    )]
    IndexExists {
        /// Tree.
        tree: String,
        /// Index name.
        name: String,
    },
    /// No index has this name on this tree.
    #[error("no index named `{name}` on tree `{tree}`; list indexes with `tideline index list`")]
    UnknownIndex {
        /// Tree.
        tree: String,
        /// Index name.
        name: String,
    },
    /// A write would give a second key the value a live unique index already maps to another.
    #[error(
        "unique index `{index}` on tree `{tree}` already maps value {value:?} to key \
         {existing_key:?}; nothing was written: change or delete that document first, or drop \
         the index and create it without --unique"
    )]
    UniqueViolation {
        /// Tree.
        tree: String,
        /// Index name.
        index: String,
        /// The value, lossily as text (components joined by `, `).
        value: String,
        /// The key that holds it, lossily as text.
        existing_key: String,
        /// The key this transaction wrote, lossily as text.
        key: String,
    },
    /// A bootstrap chunk or op from the upstream is malformed (peer data). Nothing of the
    /// `bootstrap_apply` call was written; the progress record is unchanged.
    #[error(
        "bad bootstrap data for tree `{tree}`: {reason}; nothing was written: the upstream \
         sent inconsistent data, resume the bootstrap (or restart it with bootstrap_begin)"
    )]
    BadChunk {
        /// Tree.
        tree: String,
        /// What is wrong.
        reason: String,
    },
}

impl WriteError {
    /// Whether running the same transaction again may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, WriteError::Conflict(_))
    }
}

impl From<tideline_wal::Error> for WriteError {
    fn from(e: tideline_wal::Error) -> Self {
        match e {
            tideline_wal::Error::Poisoned { reason } => WriteError::FailStop { reason },
            tideline_wal::Error::RecordTooLarge { bytes, max } => {
                WriteError::TooLarge { bytes, max }
            }
            other => WriteError::Log(other),
        }
    }
}

/// Text form of a key for error messages (lossy, truncated).
pub(crate) fn key_text(key: &[u8]) -> String {
    let s = String::from_utf8_lossy(&key[..key.len().min(64)]).into_owned();
    if key.len() > 64 { format!("{s}…") } else { s }
}
