//! What the server needs from the node it serves: the [`Node`] and [`BootstrapView`] traits,
//! the error a node answers with, and the bounds of a scan page.
//!
//! Owns: the contract between the QUIC server and node state (the `tideline` package implements
//! it with the engine, [`crate::log_node`] with a bare log). Must never do I/O, hold a
//! connection, or depend on another module of the server: every serving module depends on
//! this one, so the arrows run one way.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tideline_wal::{Epoch, Gtid, GtidSet, Offset, Wal};

use crate::proto::{ErrorCode, IndexDef, IndexQuery, WriteOp};

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
    /// Most bytes of rows in the page, each row counted as its key, its value and the 16 bytes
    /// that frame them in an answer: the page stops before the row that would pass it, unless
    /// that row is the first (a page is never empty while keys are left).
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

/// Largest page a scan answer holds, in bytes of rows (see [`ScanPage::bytes_max`]). A page
/// of several rows stays within it, and a page of one row (at most a 64 KiB key and a 16 MiB
/// value) fits one message too; the server holds one page per request.
pub const SCAN_PAGE_BYTES_MAX: u64 = 1 << 20;

/// Bytes a row takes in a `Rows` answer besides its key and value: the archived key and value
/// vectors, 4 bytes of position and 4 of length each. Counted so that a page of many small
/// rows stays within its bound as sent, not only as keys and values.
const ROW_ENVELOPE_BYTES: u64 = 16;

/// Builds a page from rows in key order, applying `page`'s bounds: it stops before the row
/// that would take it past `limit` rows or `bytes_max` bytes, but always holds the first row.
pub fn collect_page<E>(
    rows: impl Iterator<Item = Result<(Vec<u8>, Vec<u8>), E>>,
    page: ScanPage<'_>,
) -> Result<Page, E> {
    let mut out = Page::default();
    let mut bytes = 0u64;
    for row in rows {
        let (k, v) = row?;
        let row_bytes = (k.len() as u64) + (v.len() as u64) + ROW_ENVELOPE_BYTES;
        if out.rows.len() as u64 >= page.limit
            || (!out.rows.is_empty() && bytes.saturating_add(row_bytes) > page.bytes_max)
        {
            out.more = true;
            break;
        }
        bytes += row_bytes;
        out.rows.push((k, v));
    }
    Ok(out)
}

/// One page of a secondary index read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IndexPage {
    /// Documents (primary key, value) in index order.
    pub rows: Rows,
    /// The entry key to resume after; `None`: no more.
    pub next: Option<Vec<u8>>,
}

/// What the server needs from the node it serves. The `tideline` package implements it with
/// the engine; tests implement it with a bare log.
pub trait Node: Send + Sync + 'static {
    /// The node's log.
    fn wal(&self) -> &Wal;
    /// Reads one key.
    fn get(&self, tree: &str, key: &[u8]) -> Result<Option<Vec<u8>>, NodeError>;
    /// Reads one page of keys starting with `prefix`, in key order, strictly after `after`,
    /// within `page`'s bounds ([`collect_page`] applies them; the first row always counts, so
    /// a page is never empty while keys are left). The server holds at most one page per
    /// request, and answers `Range` with a page of the empty prefix.
    fn scan(&self, tree: &str, prefix: &[u8], page: ScanPage<'_>) -> Result<Page, NodeError>;
    /// Commits `ops` atomically; resolves once acknowledged (durable under sync durability).
    fn commit(
        &self,
        ops: Vec<WriteOp>,
    ) -> impl Future<Output = Result<(Offset, Gtid), NodeError>> + Send;
    /// Resolves once this node's reads show its own commit at `offset` (`true`), or at
    /// `timeout` (`false`). The server awaits it before a read on a connection that
    /// committed, so a client reads its own writes: under async durability a commit is
    /// acknowledged once written, before the fsync and the apply that show it. A node whose
    /// commits are visible when acknowledged keeps this default.
    fn read_fence(&self, _offset: Offset, _timeout: Duration) -> impl Future<Output = bool> + Send {
        async { true }
    }
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
    /// Reads one page of a secondary index from one snapshot, after waiting for the query's
    /// fence (see [`IndexQuery`]). `bytes_max` is already capped by the server. Nodes
    /// without indexes refuse.
    fn index_query(
        &self,
        _query: IndexQuery,
    ) -> impl Future<Output = Result<IndexPage, NodeError>> + Send {
        async {
            Err(NodeError::new(
                ErrorCode::InvalidRequest,
                "this node has no secondary indexes; query a node that runs the engine",
            ))
        }
    }
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
    /// The secondary indexes of `tree` in this view, by name (none by default).
    fn indexes(&self, _tree: &str) -> Vec<IndexDef> {
        Vec::new()
    }
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
        // 121 bytes per row with its envelope: a third would pass 250 bytes.
        let p = collect_page(rows(10, 100).into_iter(), page(100, 250)).unwrap();
        assert_eq!((p.rows.len(), p.more), (2, true));
        let p = collect_page(rows(10, 100).into_iter(), page(100, 242)).unwrap();
        assert_eq!((p.rows.len(), p.more), (2, true));
        // One row larger than the bound still makes a page.
        let p = collect_page(rows(2, 10_000).into_iter(), page(100, 250)).unwrap();
        assert_eq!((p.rows.len(), p.more), (1, true));
        let p = collect_page(rows(2, 1).into_iter(), page(100, 1 << 20)).unwrap();
        assert_eq!((p.rows.len(), p.more), (2, false));
    }

    /// Bytes of `rows` as a `Rows` answer, past the answer's own fixed envelope.
    fn encoded(rows: &Rows) -> u64 {
        let size = |rows: Rows| {
            let mut out = Vec::new();
            crate::proto::encode_message(&crate::proto::Response::Rows { rows }, &mut out).unwrap();
            out.len() as u64
        };
        size(rows.clone()) - size(Vec::new())
    }

    #[test]
    fn a_page_of_several_rows_stays_within_its_bound_as_encoded() {
        let page = |bytes_max| ScanPage {
            after: None,
            limit: u64::MAX,
            bytes_max,
        };
        // Small rows: their envelopes outweigh their keys.
        let p = collect_page(rows(1000, 0).into_iter(), page(1000)).unwrap();
        assert!(p.more && p.rows.len() > 1);
        assert!(encoded(&p.rows) <= 1000, "{} bytes", encoded(&p.rows));
        // Just under the bound, then the largest row there is: the page stops before it, and
        // that row alone is the next page, which fits a message.
        let largest = (vec![b'k'; 64 << 10], vec![b'v'; 16 << 20]);
        let two: Vec<Row> = vec![
            Ok((b"a".to_vec(), vec![b'v'; 1000 - 64])),
            Ok(largest.clone()),
        ];
        let p = collect_page(two.into_iter(), page(1000)).unwrap();
        assert_eq!((p.rows.len(), p.more), (1, true));
        let p = collect_page(vec![Ok::<_, ()>(largest)].into_iter(), page(1000)).unwrap();
        assert_eq!((p.rows.len(), p.more), (1, false));
        let limit = u64::from(crate::proto::Limits::default().message_bytes_max);
        assert!(encoded(&p.rows) + 64 <= limit);
    }
}
