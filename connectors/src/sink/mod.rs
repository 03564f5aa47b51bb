//! The sink contract: how a stream of transactions reaches anything downstream.
//!
//! # The contract
//!
//! 1. **Input.** A sink receives [`Batch`]es of [`Item`]s in the source's log order, **at least
//!    once**: after a crash or a retry, items it already wrote may come again. Every live item
//!    carries its source position: a [`Item::Txn`] has its origin GTID and the source node's
//!    offset; a bootstrap step ([`Item::Chunk`], [`Item::Record`], [`Item::Ops`]) belongs to
//!    the copy whose progress the batch's checkpoint records, and a [`Item::Record`] also
//!    keeps its record's GTID and offset (a copy resumed after a crash sends it again, perhaps
//!    with fewer of its ops, never more).
//! 2. **Exactly-once effect.** A sink stores the batch's [`Batch::checkpoint`] **with** its data:
//!    in the same transaction (a database), or written only after the data is durable (a file,
//!    a message broker that acknowledged). [`Sink::open`] returns the last checkpoint stored,
//!    and the pipeline resumes right after it, so what was written is not repeated and what
//!    was not is not lost. A sink that cannot make data and checkpoint atomic must make a
//!    repeated item harmless: idempotent by GTID (an upsert of the same value; a broker's
//!    de-duplication keyed by the GTID; a file cut back to the length stored beside the
//!    checkpoint). A sink whose writes can outlive the call that made them (a database
//!    session still committing after its connector died, an answer lost after the server
//!    applied the batch) also checks, where it stores the checkpoint, that the stored one is
//!    the one it last read or wrote: the batch's own means it is already stored; any other,
//!    that another writer has the pipeline.
//! 3. **Errors say what happens next** ([`SinkError`]): `Retry` — a passing fault (network,
//!    server restarting, timeout); the pipeline retries the same batch with jittered backoff
//!    and reports the outage. `Hold` — needs an operator (refused credentials, a 4xx answer,
//!    a schema that does not fit); the pipeline stops writing, shows the error in `status`,
//!    and tries again only after a long pause. `Fatal` — the pipeline stops.
//! 4. **Back-pressure.** [`Sink::write`] returns when the batch is stored; the pipeline does
//!    not read further ahead than one batch plus what the tail buffers, so a slow sink slows
//!    its own pipeline and nothing else (the source node never waits on a consumer).
//! 5. **Order.** A sink applies the items of a batch in order; a later item on the same key
//!    wins. It never reorders across batches.
//! 6. **A copy that starts again.** A bootstrap copy that cannot be resumed starts again from
//!    scratch; [`Sink::begin_copy`] says which trees the earlier copy wrote ([`EarlierCopy`]).
//!    A sink that stores values clears them with the new copy's first checkpoint, or holds
//!    the pipeline for an operator when it cannot do so safely: its content must end equal to
//!    the source's, and the new copy only rewrites the trees the source has now.
//!
//! What a sink must never do: move its stored checkpoint past data it has not stored, keep
//! the checkpoint in a place other than beside its data, or read the source itself.
//!
//! Each sink lives in a module of its own below this one.

pub mod engine;
pub mod file;
pub(crate) mod fold;
pub mod nats;
pub mod postgres;
pub mod redis;
pub mod webhook;

use std::collections::{BTreeMap, BTreeSet};

/// Test-only switch (feature `testing`, env `TIDELINE_TESTING_POSITION_APART`): a value sink
/// stores the position in a step of its own after the data, so that a kill between the two
/// repeats the batch. The canary of the exactly-once kill tests; announced on stderr.
#[cfg(feature = "testing")]
pub(crate) fn position_apart() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        let on = std::env::var_os("TIDELINE_TESTING_POSITION_APART").is_some();
        if on {
            eprintln!("TESTING SWITCH ON: sinks store positions apart from their data");
        }
        on
    })
}

#[cfg(not(feature = "testing"))]
pub(crate) fn position_apart() -> bool {
    false
}

use std::future::Future;
use std::pin::Pin;

/// What a sink returns when its stored position (`position` names it and where it is kept)
/// is neither the one it last read or wrote nor the batch's own: another writer has the
/// pipeline (contract item 2).
pub(crate) fn position_moved(position: &str) -> SinkError {
    SinkError::Fatal(format!(
        "{position} is not the one this connector last read or wrote: another connector wrote \
         this pipeline meanwhile. Run one connector per pipeline; restart this one and it \
         resumes from the stored position"
    ))
}

/// Takes `lock` (created if absent) for the one sink writing the files beside it: an `flock`
/// held as long as the returned file lives and released by the kernel when the process dies,
/// with the holder's PID written in it for the next one's message. A second sink gets `Retry`
/// naming the holder: it waits (shown in `status`) until the first has stopped. `what` names
/// the files in that message.
pub(crate) fn lock_beside(lock: &std::path::Path, what: &str) -> Result<std::fs::File, SinkError> {
    use std::os::unix::fs::FileExt;
    let io = |doing: &str, e: std::io::Error| {
        SinkError::Hold(format!(
            "{doing} {}: {e}; check the directory's permissions",
            lock.display()
        ))
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(lock)
        .map_err(|e| io("open", e))?;
    match file.try_lock() {
        Ok(()) => {
            let pid = format!("{}\n", std::process::id());
            file.set_len(0)
                .and_then(|()| file.write_all_at(pid.as_bytes(), 0))
                .map_err(|e| io("write", e))?;
            Ok(file)
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut buf = [0u8; 32];
            let n = file.read_at(&mut buf, 0).unwrap_or(0);
            let holder = std::str::from_utf8(&buf[..n])
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
                .map_or_else(|| "another process".to_owned(), |p| format!("PID {p}"));
            Err(SinkError::Retry(format!(
                "{what} is written by another connector ({holder}, holding {}); a connector \
                 waits until it stops. Give each pipeline its own files",
                lock.display()
            )))
        }
        Err(std::fs::TryLockError::Error(e)) => Err(io("lock", e)),
    }
}

pub use tideline_stream::proto::CopyRecord;
use tideline_wal::{Op, PackedEntries, Transaction};

/// What a sink's async methods return: boxed, so that a pipeline can hold any sink as
/// `Box<dyn Sink>` (chosen from a configuration file at run time).
pub type SinkFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One step of the source, in log order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A committed transaction of the source, with its GTID and source offset.
    Txn(Transaction),
    /// Bootstrap: replace `[from, to)` of `tree` (`to: None` = to its end) with `entries`, the
    /// range's rows as of the source position the chunk was read at. A sink that cannot
    /// remove a key range writes the entries as upserts (a copy runs only into a sink that
    /// holds nothing of the pipeline's, or that cleared an earlier copy's trees in
    /// [`Sink::begin_copy`], so the range holds nothing else).
    Chunk {
        /// Tree.
        tree: String,
        /// Its merge operator, if any.
        merge_operator: Option<String>,
        /// First key of the range.
        from: Vec<u8>,
        /// End of the range, exclusive.
        to: Option<Vec<u8>>,
        /// Ascending `(key, value)` rows.
        entries: PackedEntries,
    },
    /// Bootstrap: a live record of the source received while the copy runs, reduced to its
    /// ops on ranges already copied that pass the pipeline's filter. Apply its ops as those
    /// of [`Item::Ops`], without marking its GTID executed: the copy ends at a GTID set that
    /// holds it (the checkpoint after the copy), where the live tail takes over. Sinks that
    /// ship changes name them by the record ([`CopyRecord::indexed_ops`] gives each op's
    /// index in the record as logged), so that a receiver de-duplicates them as live ones.
    Record(CopyRecord),
    /// Bootstrap: changes that belong to no record, in log order: the `create_tree` and
    /// `create_index` declared before each chunk of a tree with indexes (no-ops when they
    /// exist, and sent again with every such chunk).
    Ops(Vec<Op>),
}

/// What a sink holds of an earlier copy when a copy begins from scratch ([`Sink::begin_copy`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EarlierCopy {
    /// Nothing: a sink that stored no checkpoint (or whose earlier copy stored no row yet).
    None,
    /// Rows of these trees (and of no other), written by an earlier copy that cannot be
    /// resumed: it was interrupted, and the source has since purged the log it needs, or is
    /// another node, or its history was replaced. The copy's checkpoints record them.
    Trees {
        /// The trees.
        trees: Vec<String>,
        /// Only keys starting with this passed the pipeline's filter: the copy wrote no others
        /// (rows of other keys, another pipeline's, stay).
        prefix: Option<Vec<u8>>,
    },
    /// Rows of an earlier copy whose checkpoint does not record its trees: stored by a build
    /// that did not record them, for a pipeline that names no `trees` (for one that does, the
    /// pipeline passes those as [`EarlierCopy::Trees`]).
    Unrecorded,
}

/// A batch for [`Sink::write`].
#[derive(Debug, Clone)]
pub struct Batch {
    /// The source node (`server_uuid`), for envelopes and logs.
    pub source: uuid::Uuid,
    /// The items, in log order.
    pub items: Vec<Item>,
    /// Where the pipeline stands after the last item: opaque bytes the sink stores with the
    /// data (contract item 2) and gives back from [`Sink::open`].
    pub checkpoint: Vec<u8>,
}

impl Batch {
    /// The transactions of this batch (live items only).
    pub fn txns(&self) -> impl Iterator<Item = &Transaction> {
        self.items.iter().filter_map(|i| match i {
            Item::Txn(t) => Some(t),
            _ => None,
        })
    }

    /// How many changes (ops and chunk rows) the batch carries, for rates and counters.
    pub fn changes(&self) -> usize {
        self.items
            .iter()
            .map(|i| match i {
                Item::Txn(t) | Item::Record(CopyRecord { txn: t, .. }) => t.ops.len(),
                Item::Chunk { entries, .. } => entries.len(),
                Item::Ops(ops) => ops.len(),
            })
            .sum()
    }
}

/// Why a sink could not store a batch, and what the pipeline does about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SinkError {
    /// A passing fault: the pipeline retries the same batch after a jittered backoff.
    #[error("{0} (retrying)")]
    Retry(String),
    /// Needs an operator: shown in `status`; tried again only after a long pause.
    #[error("{0} (held for an operator)")]
    Hold(String),
    /// The pipeline stops.
    #[error("{0}")]
    Fatal(String),
}

impl SinkError {
    /// The message without the pipeline's note on what happens next.
    pub fn message(&self) -> &str {
        match self {
            SinkError::Retry(m) | SinkError::Hold(m) | SinkError::Fatal(m) => m,
        }
    }
}

/// A destination of a pipeline. See the module docs for the contract every sink keeps.
pub trait Sink: Send {
    /// What this sink writes to, for `status` and logs (`postgres 127.0.0.1:5432/test`).
    /// Never includes a password.
    fn describe(&self) -> String;

    /// Reaches the destination, creates what it needs (tables, streams, files) and returns the
    /// checkpoint stored with the data, `None` when the sink holds none (it starts empty). Also
    /// what `tideline connect --check` calls to test reachability; it moves no data.
    fn open(&mut self) -> SinkFuture<'_, Result<Option<Vec<u8>>, SinkError>>;

    /// Stores `batch` and its checkpoint, exactly once in effect (contract item 2). Returns
    /// when both are stored.
    fn write<'a>(&'a mut self, batch: &'a Batch) -> SinkFuture<'a, Result<(), SinkError>>;

    /// [`Sink::write`] of a batch the caller gives up: a sink that would copy the items out
    /// of a borrowed batch (the engine sink) moves them instead. A write that failed with
    /// [`SinkError::Retry`] or [`SinkError::Hold`] hands the batch back as it came, for the
    /// retry (after [`SinkError::Fatal`] the pipeline stops, and what comes back may lack the
    /// items). Default: [`Sink::write`] on the batch.
    fn write_owned(&mut self, batch: Batch) -> SinkFuture<'_, Result<(), (SinkError, Batch)>> {
        Box::pin(async move {
            match self.write(&batch).await {
                Ok(()) => Ok(()),
                Err(e) => Err((e, batch)),
            }
        })
    }

    /// A copy of the source starts from scratch (a fresh bootstrap, or one that cannot resume),
    /// before its first [`Sink::write`]; `checkpoint` is the copy's starting point, and
    /// `earlier` what the sink holds of an earlier copy of this pipeline that the new one
    /// replaces (see [`EarlierCopy`]). The chunks of the new copy replace only the ranges of
    /// the trees the source has now, so a sink that stores values must first remove what the
    /// earlier copy left, atomically with storing `checkpoint` (a crash in between leaves the
    /// earlier checkpoint, and the next start clears again): rows since deleted at the source,
    /// and trees since dropped, would otherwise stay for good. One that cannot do so safely
    /// holds the pipeline ([`SinkError::Hold`]) with a message saying what to clear, and checks
    /// again when tried again (an operator who emptied it and removed its position has
    /// started the pipeline over). The engine sink wipes the engine whatever `earlier` says.
    /// Default: nothing (a sink that ships changes rather than storing values: what it sent
    /// stays sent, and the new copy's rows follow).
    fn begin_copy<'a>(
        &'a mut self,
        checkpoint: &'a [u8],
        earlier: &'a EarlierCopy,
    ) -> SinkFuture<'a, Result<(), SinkError>> {
        let _ = (checkpoint, earlier);
        Box::pin(async { Ok(()) })
    }

    /// The source's merge operators (tree → operator name) as its `status` names them: when
    /// the pipeline starts, before the first [`Sink::write`], and again, read anew, before a
    /// write that held is tried again. A sink that stores values rather than the log's
    /// operands resolves merges with them (ops in the stream — `create_tree`, a bootstrap
    /// chunk — override them). Default: ignored.
    fn set_merge_operators(&mut self, operators: &BTreeMap<String, String>) {
        let _ = operators;
    }

    /// Every tree the source has, as its `status` lists them no earlier than the source offset
    /// `as_of_offset` (its `last_offset`); handed right after [`Sink::set_merge_operators`],
    /// from the same read, and only by a pipeline whose filter lets `drop_tree` through. A
    /// merge in the stream at or before `as_of_offset` on a tree the list lacks was followed
    /// by the tree's drop, which comes later in the stream and removes whatever the merge
    /// would leave: a sink of values that does not know the tree's operator skips the merge
    /// rather than hold. Default: ignored.
    fn set_source_trees(&mut self, trees: &BTreeSet<String>, as_of_offset: u64) {
        let _ = (trees, as_of_offset);
    }
}

/// `url` as the webhook and NATS sinks' messages show it before it is parsed: scheme, host,
/// port and path, without user info, query or fragment (where credentials and tokens travel).
pub(crate) fn shown_url(url: &str) -> String {
    let url = url.find(['?', '#']).map_or(url, |i| &url[..i]);
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    match scheme {
        Some(scheme) => format!("{scheme}://{host}{path}"),
        None => format!("{host}{path}"),
    }
}
