//! Test-only (feature `testing`): a fake node that serves bootstrap copies, for the tests of
//! the server, the consumer and the pipelines that need a node with a state to copy but no
//! engine.
//!
//! [`BootstrapNode`] is a [`LogNode`] (its log, reads and writes) whose bootstrap views come
//! from a [`Views`]: [`FixedKeys`] serves a fixed state of the log's current history, and a
//! test with a state of its own (or faults to inject) implements [`Views`] itself. A test
//! changes the node's history through its log (`node.wal().reset_history(..)`): every view
//! taken after names the new history epoch.
//!
//! ```
//! use std::sync::Arc;
//! use tideline_stream::Node;
//! use tideline_stream::testing::{BootstrapNode, FixedKeys};
//! use tideline_wal::{Epoch, MemStorage, Wal, WalOptions};
//!
//! let wal = Wal::open(Arc::new(MemStorage::new()), WalOptions::default())?;
//! let node = BootstrapNode::new(wal, FixedKeys::new(100, 1024, |_| b'v'));
//! let view = node.bootstrap_view().expect("a view");
//! assert_eq!(view.epoch(), Epoch::INITIAL);
//! assert_eq!(view.estimate(), (100, 100 * 1024));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tideline_wal::{Epoch, Gtid, GtidSet, Offset, Wal};

use crate::log_node::LogNode;
use crate::proto::{ErrorCode, WriteOp, pack_entry};
use crate::server::{BootstrapView, Node, NodeError, Page, ScanPage, ServerConfig, ServerHandle};
use crate::{ClientConfig, tls};

/// Makes the bootstrap views a [`BootstrapNode`] serves.
pub trait Views: Send + Sync + 'static {
    /// A view of the node's current state; `wal` is the node's log (its history epoch, its
    /// server UUID).
    fn view(&self, wal: &Wal) -> Result<Arc<dyn BootstrapView>, NodeError>;
}

/// A log-only node ([`LogNode`]) that serves bootstraps from views `V` makes. Everything
/// but [`Node::bootstrap_view`] (and, with [`Self::refusing_wire_writes`], [`Node::commit`])
/// is the log node's.
pub struct BootstrapNode<V> {
    log: LogNode,
    /// What makes the views; public so that a test reaches its own state and faults.
    pub views: V,
    wire_writes: bool,
}

impl<V: Views> BootstrapNode<V> {
    /// A node over `wal` serving views of `views`; it takes writes over the wire (into its
    /// log, not into the views' state).
    pub fn new(wal: Wal, views: V) -> Self {
        BootstrapNode {
            log: LogNode::new(wal),
            views,
            wire_writes: true,
        }
    }

    /// The same node refusing writes over the wire (`InvalidRequest`): for a test that writes
    /// its log and its state itself, under one lock, so that a wire write cannot split them.
    pub fn refusing_wire_writes(mut self) -> Self {
        self.wire_writes = false;
        self
    }
}

impl<V: Views> Node for BootstrapNode<V> {
    fn wal(&self) -> &Wal {
        self.log.wal()
    }
    fn get(&self, tree: &str, key: &[u8]) -> Result<Option<Vec<u8>>, NodeError> {
        self.log.get(tree, key)
    }
    fn scan(&self, tree: &str, prefix: &[u8], page: ScanPage<'_>) -> Result<Page, NodeError> {
        self.log.scan(tree, prefix, page)
    }
    async fn commit(&self, ops: Vec<WriteOp>) -> Result<(Offset, Gtid), NodeError> {
        if !self.wire_writes {
            return Err(NodeError::new(
                ErrorCode::InvalidRequest,
                "this test node takes no writes over the wire",
            ));
        }
        self.log.commit(ops).await
    }
    fn status_json(&self) -> String {
        self.log.status_json()
    }
    async fn wait_for(&self, gtids: GtidSet, timeout: Duration) -> (bool, GtidSet) {
        self.log.wait_for(gtids, timeout).await
    }
    fn bootstrap_view(&self) -> Result<Arc<dyn BootstrapView>, NodeError> {
        self.views.view(self.log.wal())
    }
}

/// A fixed state in views of the log's current history: tree `t` holding keys `k000`,
/// `k001`, ... (`keys` of them), each value `value_len` bytes that all read `value(epoch)`, so
/// that a test can tell the state of one history from another's. Offset 0, no GTIDs.
#[derive(Debug, Clone, Copy)]
pub struct FixedKeys {
    keys: u32,
    value_len: usize,
    value: fn(Epoch) -> u8,
}

impl FixedKeys {
    /// `keys` keys of `value_len` bytes each, every byte `value(epoch)` in a view of `epoch`.
    pub fn new(keys: u32, value_len: usize, value: fn(Epoch) -> u8) -> Self {
        FixedKeys {
            keys,
            value_len,
            value,
        }
    }
}

impl Views for FixedKeys {
    fn view(&self, wal: &Wal) -> Result<Arc<dyn BootstrapView>, NodeError> {
        Ok(Arc::new(FixedKeysView {
            state: *self,
            epoch: wal.history_epoch(),
        }))
    }
}

/// One view of a [`FixedKeys`] state, in one history epoch.
struct FixedKeysView {
    state: FixedKeys,
    epoch: Epoch,
}

impl BootstrapView for FixedKeysView {
    fn offset(&self) -> u64 {
        0
    }
    fn epoch(&self) -> Epoch {
        self.epoch
    }
    fn gtid_executed(&self) -> GtidSet {
        GtidSet::new()
    }
    fn trees(&self) -> Vec<(String, Option<String>)> {
        vec![("t".into(), None)]
    }
    fn estimate(&self) -> (u64, u64) {
        let keys = u64::from(self.state.keys);
        (keys, keys * self.state.value_len as u64)
    }
    /// Whole entries until `bytes_max` is reached or passed.
    fn chunk(
        &self,
        _tree: &str,
        from: &[u8],
        bytes_max: usize,
        out: &mut Vec<u8>,
    ) -> Result<Option<Vec<u8>>, NodeError> {
        let value = vec![(self.state.value)(self.epoch); self.state.value_len];
        for i in 0..self.state.keys {
            let key = format!("k{i:03}").into_bytes();
            if key.as_slice() < from {
                continue;
            }
            if out.len() >= bytes_max {
                return Ok(Some(key));
            }
            pack_entry(out, &key, &value);
        }
        Ok(None)
    }
}

/// Serves `node` on a loopback port with the cluster secrets in `dir` (created if missing),
/// configured by `configure`; returns the server and a client configuration for it.
///
/// # Panics
///
/// If the secrets cannot be created or loaded, or the server cannot start.
pub fn serve_local<N: Node>(
    dir: &Path,
    node: Arc<N>,
    configure: impl FnOnce(&mut ServerConfig),
) -> (ServerHandle, ClientConfig) {
    tls::ensure_secrets(dir).expect("secrets");
    let mut cfg = ServerConfig::new(([127, 0, 0, 1], 0).into());
    configure(&mut cfg);
    let tls = tls::load_server(dir).expect("server secrets");
    let server = crate::serve(cfg, tls, node).expect("serve");
    let client = ClientConfig::new(tls::load_client_dir(dir).expect("client secrets"));
    (server, client)
}
