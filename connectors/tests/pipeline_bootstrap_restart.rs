//! A pipeline's bootstrap copy that the source node refuses to go on with
//! (`PositionUnavailable`, which the consumer reads as "start the copy again from scratch"):
//!
//! - mid-copy, on a connection that resumed an earlier run's stored progress, after the sink
//!   stored live records (merges) received on it. The node's history is unchanged (as when a
//!   log read fails), so it would accept that older progress again. Guards against a pipeline
//!   that resumed from the progress its connection started from: the records stored since
//!   came again and every merge among them was counted twice.
//! - at the start of a fresh copy (as when a history reset lands between the node's state
//!   view and its log). Guards against a pipeline that ended `Failed` for good instead of
//!   trying again.
//!
//! Both end with the sink holding exactly the source's state, following its log, and the
//! pipeline never `Failed`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tideline_connectors::sink::{Batch, EarlierCopy, Item, Sink, SinkError, SinkFuture};
use tideline_connectors::{
    PipelineCheckpoint, PipelineConfig, PipelineState, SharedPipelineStatus, StartFrom,
};
use tideline_stream::proto::pack_entry;
use tideline_stream::testing::{BootstrapNode, Views, serve_local};
use tideline_stream::{BootstrapView, ClientConfig, ErrorCode, Node, NodeError, ServerHandle};
use tideline_wal::{Epoch, Gtid, GtidSet, MemStorage, NewTransaction, Op, Wal, WalOptions};
use tokio::sync::Semaphore;

/// The one tree copied.
const TREE: &str = "t";
/// The counter key: copied by the first chunk, and merged into during the copy.
const COUNTER: &[u8] = b"c";
/// Keys besides the counter, each with a 1 KiB value: about 100 KiB, several 16 KiB chunks.
const KEYS: u32 = 100;

type Rows = BTreeMap<Vec<u8>, Vec<u8>>;

/// A counter's value after adding `operand` (both decimal text).
fn add(value: Option<&[u8]>, operand: &[u8]) -> Vec<u8> {
    let n = |b: &[u8]| -> u64 {
        std::str::from_utf8(b)
            .expect("a counter is text")
            .parse()
            .expect("a counter is a number")
    };
    (value.map_or(0, n) + n(operand)).to_string().into_bytes()
}

/// Applies a data op of tree [`TREE`] to `rows` (merges add).
fn apply(rows: &mut Rows, op: &Op) {
    match op {
        Op::Put { key, value, .. } => {
            rows.insert(key.clone(), value.clone());
        }
        Op::Delete { key, .. } => {
            rows.remove(key);
        }
        Op::Merge { key, operand, .. } => {
            let v = add(rows.get(key).map(Vec::as_slice), operand);
            rows.insert(key.clone(), v);
        }
        Op::DropTree { .. } => rows.clear(),
        _ => {}
    }
}

/// The node's state: the rows of [`TREE`] and the log offset and GTIDs they hold.
#[derive(Clone, Default)]
struct State {
    offset: u64,
    seq: u64,
    rows: Rows,
}

/// A log node with a state the test writes (log and state under one lock, so it takes no
/// writes over the wire), served to bootstraps in views; each fault is injected once.
type CopyNode = BootstrapNode<Copied>;

/// The state of a [`CopyNode`], which its views copy, and the faults they inject.
#[derive(Default)]
struct Copied {
    state: Mutex<State>,
    /// The next read of the chunk from this key, in a view at this offset or later, fails
    /// with `PositionUnavailable`, the history unchanged (as a failed log read ends a copy).
    /// Both, so that no other copy's read (a stopped run's, still served) takes the fault.
    fail_chunk: FailChunk,
    /// The next view names another history epoch than the log's (as when a history reset
    /// lands between taking the view and opening the log).
    stale_next_view: AtomicBool,
}

/// Commits `op` to the node's log and state.
fn commit(node: &CopyNode, op: Op) {
    let wal = node.wal();
    let mut state = node.views.state.lock().expect("state lock");
    state.seq += 1;
    let gtid = Gtid::new(wal.server_uuid(), state.seq).expect("a GTID");
    let offset = tokio::task::block_in_place(|| {
        wal.append(NewTransaction {
            gtid,
            timestamp_us: 0,
            ops: vec![op.clone()],
        })
    })
    .expect("append to the log");
    apply(&mut state.rows, &op);
    state.offset = offset.get();
}

impl Copied {
    fn rows(&self) -> Rows {
        self.state.lock().expect("state lock").rows.clone()
    }

    fn last_offset(&self) -> u64 {
        self.state.lock().expect("state lock").offset
    }
}

/// See [`Copied::fail_chunk`]: `(offset, key)`.
type FailChunk = Arc<Mutex<Option<(u64, Vec<u8>)>>>;

struct View {
    state: State,
    uuid: uuid::Uuid,
    epoch: Epoch,
    fail_chunk: FailChunk,
}

impl BootstrapView for View {
    fn offset(&self) -> u64 {
        self.state.offset
    }
    fn epoch(&self) -> Epoch {
        self.epoch
    }
    fn gtid_executed(&self) -> GtidSet {
        if self.state.seq == 0 {
            return GtidSet::new();
        }
        format!("{}:1-{}", self.uuid, self.state.seq)
            .parse()
            .expect("a GTID set")
    }
    fn trees(&self) -> Vec<(String, Option<String>)> {
        vec![(TREE.into(), None)]
    }
    fn estimate(&self) -> (u64, u64) {
        (self.state.rows.len() as u64, u64::from(KEYS) * 1024)
    }
    fn chunk(
        &self,
        _tree: &str,
        from: &[u8],
        bytes_max: usize,
        out: &mut Vec<u8>,
    ) -> Result<Option<Vec<u8>>, NodeError> {
        let mut fail = self.fail_chunk.lock().expect("fault lock");
        if fail
            .take_if(|(offset, key)| self.state.offset >= *offset && key.as_slice() == from)
            .is_some()
        {
            return Err(NodeError::new(
                ErrorCode::PositionUnavailable,
                "reading the log for this bootstrap failed (injected by the test)",
            ));
        }
        for (key, value) in self.state.rows.range(from.to_vec()..) {
            if !out.is_empty() && out.len() + 8 + key.len() + value.len() > bytes_max {
                return Ok(Some(key.clone()));
            }
            pack_entry(out, key, value);
        }
        Ok(None)
    }
}

impl Views for Copied {
    fn view(&self, wal: &Wal) -> Result<Arc<dyn BootstrapView>, NodeError> {
        let mut epoch = wal.history_epoch();
        if self.stale_next_view.swap(false, Ordering::SeqCst) {
            epoch = Epoch::new(epoch.get() + 1);
        }
        Ok(Arc::new(View {
            state: self.state.lock().expect("state lock").clone(),
            uuid: wal.server_uuid(),
            epoch,
            fail_chunk: self.fail_chunk.clone(),
        }))
    }
}

/// The node holding the counter (at 0) and [`KEYS`] keys, its server, and a client
/// configuration for it (the directory holds the secrets).
fn start_node() -> (tempfile::TempDir, Arc<CopyNode>, ServerHandle, ClientConfig) {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = Wal::open(Arc::new(MemStorage::new()), WalOptions::default()).expect("open log");
    let node = Arc::new(BootstrapNode::new(wal, Copied::default()).refusing_wire_writes());
    commit(
        &node,
        Op::Put {
            tree: TREE.into(),
            key: COUNTER.to_vec(),
            value: b"0".to_vec(),
            before: None,
        },
    );
    for i in 0..KEYS {
        commit(
            &node,
            Op::Put {
                tree: TREE.into(),
                key: format!("k{i:03}").into_bytes(),
                value: vec![b'v'; 1024],
                before: None,
            },
        );
    }
    let (server, mut client) = serve_local(dir.path(), node.clone(), |_| {});
    client.connect_timeout = Duration::from_secs(2);
    (dir, node, server, client)
}

/// What the sink holds: shared by the sinks of the test's pipeline runs, as a database is.
#[derive(Default)]
struct Stored {
    rows: Rows,
    checkpoint: Option<Vec<u8>>,
    /// What every [`Sink::begin_copy`] was told.
    begun: Vec<EarlierCopy>,
}

/// A sink storing rows in memory (merges add), each batch with its checkpoint at once; a
/// write waits for a permit, so that the test can hold a copy between two steps.
struct MemSink {
    stored: Arc<Mutex<Stored>>,
    permits: Arc<Semaphore>,
}

impl Sink for MemSink {
    fn describe(&self) -> String {
        "memory".into()
    }

    fn open(&mut self) -> SinkFuture<'_, Result<Option<Vec<u8>>, SinkError>> {
        let checkpoint = self.stored.lock().expect("sink lock").checkpoint.clone();
        Box::pin(async move { Ok(checkpoint) })
    }

    fn write<'a>(&'a mut self, batch: &'a Batch) -> SinkFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            self.permits
                .acquire()
                .await
                .map_err(|e| SinkError::Fatal(e.to_string()))?
                .forget();
            let mut s = self.stored.lock().expect("sink lock");
            for item in &batch.items {
                match item {
                    Item::Txn(t) => t.ops.iter().for_each(|op| apply(&mut s.rows, op)),
                    Item::Record(r) => r.txn.ops.iter().for_each(|op| apply(&mut s.rows, op)),
                    Item::Ops(ops) => ops.iter().for_each(|op| apply(&mut s.rows, op)),
                    Item::Chunk {
                        from, to, entries, ..
                    } => {
                        s.rows
                            .retain(|k, _| k < from || to.as_ref().is_some_and(|t| k >= t));
                        for (k, v) in entries.iter() {
                            s.rows.insert(k.to_vec(), v.to_vec());
                        }
                    }
                }
            }
            s.checkpoint = Some(batch.checkpoint.clone());
            Ok(())
        })
    }

    fn begin_copy<'a>(
        &'a mut self,
        checkpoint: &'a [u8],
        earlier: &'a EarlierCopy,
    ) -> SinkFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            let mut s = self.stored.lock().expect("sink lock");
            match earlier {
                EarlierCopy::None => {}
                EarlierCopy::Trees { trees, .. } if !trees.iter().any(|t| t == TREE) => {}
                EarlierCopy::Trees { .. } | EarlierCopy::Unrecorded => s.rows.clear(),
            }
            s.begun.push(earlier.clone());
            s.checkpoint = Some(checkpoint.to_vec());
            Ok(())
        })
    }
}

/// A pipeline from the node into `stored`, copying first, with writes limited to `permits`.
fn spawn_pipeline(
    addr: &str,
    client: &ClientConfig,
    stored: &Arc<Mutex<Stored>>,
    permits: usize,
) -> (
    SharedPipelineStatus,
    tokio::task::JoinHandle<Result<(), tideline_connectors::PipelineError>>,
) {
    let mut cfg = PipelineConfig::new("restart", addr, client.clone());
    cfg.from = StartFrom::Bootstrap;
    cfg.chunk_bytes = 16 << 10;
    cfg.retry_min = Duration::from_millis(20);
    cfg.retry_max = Duration::from_millis(200);
    let sink = MemSink {
        stored: stored.clone(),
        permits: Arc::new(Semaphore::new(permits)),
    };
    tideline_connectors::pipeline::spawn(cfg, Box::new(sink))
}

/// The checkpoint the sink holds, decoded.
fn checkpoint(stored: &Arc<Mutex<Stored>>) -> Option<PipelineCheckpoint> {
    let bytes = stored.lock().expect("sink lock").checkpoint.clone()?;
    Some(PipelineCheckpoint::decode(&bytes).expect("the pipeline's own checkpoint"))
}

/// Waits until `done` holds of the sink's checkpoint, failing at once if the pipeline stops.
async fn wait_for(
    what: &str,
    stored: &Arc<Mutex<Stored>>,
    status: &SharedPipelineStatus,
    done: impl Fn(&PipelineCheckpoint) -> bool,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let cp = checkpoint(stored);
        if cp.as_ref().is_some_and(&done) {
            return;
        }
        let s = status.get();
        assert!(
            s.state != PipelineState::Failed,
            "the pipeline failed before {what}: {:?}",
            s.last_error
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {what} after 20 s (state {:?}, last error {:?}, checkpoint {cp:?})",
            s.state,
            s.last_error
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the sink follows the node's log at its last offset, then checks that it
/// holds exactly the node's state.
async fn assert_caught_up(
    node: &CopyNode,
    stored: &Arc<Mutex<Stored>>,
    status: &SharedPipelineStatus,
) {
    let last = node.views.last_offset();
    wait_for(
        &format!("the live tail at offset {last}"),
        stored,
        status,
        |cp| matches!(cp, PipelineCheckpoint::Tail(p) if p.offset >= last),
    )
    .await;
    let rows = stored.lock().expect("sink lock").rows.clone();
    let counter = |rows: &Rows| {
        rows.get(COUNTER)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    assert_eq!(
        counter(&rows),
        counter(&node.views.rows()),
        "the sink's counter against the node's: every copy-time merge must count once"
    );
    assert!(
        rows == node.views.rows(),
        "the sink's rows differ from the node's"
    );
    assert_ne!(status.get().state, PipelineState::Failed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_copy_the_node_ends_midway_starts_again_from_scratch_and_counts_each_merge_once()
{
    let (_dir, node, server, client) = start_node();
    let addr = server.local_addr().to_string();
    let stored = Arc::new(Mutex::new(Stored::default()));

    // A first run stores two chunks (the counter's among them) and is stopped in the third.
    let (status, task) = spawn_pipeline(&addr, &client, &stored, 2);
    wait_for(
        "two chunks stored",
        &stored,
        &status,
        |cp| matches!(cp, PipelineCheckpoint::Bootstrap(p) if p.chunks == 2),
    )
    .await;
    task.abort();
    let _ = task.await;
    let Some(PipelineCheckpoint::Bootstrap(first)) = checkpoint(&stored) else {
        panic!("the first run left its copy's progress");
    };
    assert_eq!(first.chunks, 2, "the first run's third write was held");

    // Merges into the copied counter; the next run resumes the copy and receives them as
    // live records, stores them, and then the node ends the copy (history unchanged).
    for _ in 0..5 {
        commit(
            &node,
            Op::Merge {
                tree: TREE.into(),
                key: COUNTER.to_vec(),
                operand: b"1".to_vec(),
            },
        );
    }
    let cursor: Vec<u8> = (0..first.key_hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&first.key_hex[i..i + 2], 16).expect("hex"))
        .collect();
    *node.views.fail_chunk.lock().expect("fault lock") = Some((node.views.last_offset(), cursor));
    let (status, task) = spawn_pipeline(&addr, &client, &stored, Semaphore::MAX_PERMITS);
    assert_caught_up(&node, &stored, &status).await;
    assert!(
        node.views.fail_chunk.lock().expect("fault lock").is_none(),
        "the node ended the resumed copy midway"
    );
    let begun = stored.lock().expect("sink lock").begun.clone();
    assert_eq!(
        begun.last(),
        Some(&EarlierCopy::Trees {
            trees: vec![TREE.into()],
            prefix: None
        }),
        "the copy started again from scratch, clearing what the earlier one wrote: {begun:?}"
    );
    task.abort();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_copy_the_node_refuses_at_its_start_is_tried_again() {
    let (_dir, node, server, client) = start_node();
    let addr = server.local_addr().to_string();
    let stored = Arc::new(Mutex::new(Stored::default()));

    node.views.stale_next_view.store(true, Ordering::SeqCst);
    let (status, task) = spawn_pipeline(&addr, &client, &stored, Semaphore::MAX_PERMITS);
    assert_caught_up(&node, &stored, &status).await;
    assert!(
        !node.views.stale_next_view.load(Ordering::SeqCst),
        "the node refused a copy at its start"
    );
    task.abort();
    server.shutdown().await;
}
