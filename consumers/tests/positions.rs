//! A tail's position is exact, so that sinks can be built on it: what it saves and acks is what
//! a restarted or failed-over tail resumes from, with no replay of history from before its
//! start point and no gap.
//!
//! Scenarios (issue 10, items 3, 4, 6 and 8), each on real QUIC with bare logs as nodes. A
//! failover moves the address the tail dials to another node (as a virtual IP or a DNS change
//! would); the tail notices the other `server_uuid` and resumes by GTID set:
//! - a tail of a bootstrapped replica fails over to the primary: it gets only what is new, not
//!   the history that was in place before it started (the `Subscribed` reply's covered set);
//! - a filtered tail whose filter dropped 10,000 transactions fails over to a node that purged
//!   them: it resumes with no error (progress moved its position past them);
//! - a consumer dropped without saving its checkpoint restarts after retention ran: its slot
//!   did not run ahead of what the checkpoint stored, so it resumes;
//! - a `latest` tail fails over: a commit that landed just before its subscription was in place
//!   is not replayed (the start set comes from the subscription itself).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use tideline_consumers::{
    Checkpoint, CheckpointError, FileCheckpoint, Position, TailConfig, TailError, TailStart, tail,
};
use tideline_stream::log_node::LogNode;
use tideline_stream::proto::WriteOp;
use tideline_stream::{
    ClientConfig, Node, NodeError, Page, ScanPage, ServerConfig, ServerHandle, tls,
};
use tideline_wal::{
    Gtid, GtidSet, MemStorage, NewTransaction, Offset, Op, RetentionPolicy, Transaction, Wal,
    WalOptions,
};
use tokio::sync::{mpsc, watch};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(20);

fn mem_wal(opts: WalOptions) -> Wal {
    Wal::open(Arc::new(MemStorage::new()), opts).unwrap()
}

/// Small segments and no minimum retention: `run_retention` removes every closed segment no
/// slot needs.
fn small_segments() -> WalOptions {
    WalOptions {
        segment_bytes_max: 4 << 10,
        retention: RetentionPolicy {
            retain_bytes_min: 0,
            slot_bytes_max: None,
            slot_age_max: None,
        },
        ..WalOptions::default()
    }
}

fn serve_at<N: Node>(node: Arc<N>, secrets: &Path, listen: SocketAddr) -> ServerHandle {
    // An in-process move of the address may find the old socket not yet released: retry
    // briefly (a real failover is another process or host).
    for _ in 0..100 {
        match tideline_stream::serve(
            ServerConfig::new(listen),
            tls::load_server(secrets).unwrap(),
            node.clone(),
        ) {
            Ok(h) => return h,
            Err(tideline_stream::ServeError::Bind { .. }) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("{e}"),
        }
    }
    panic!("could not bind {listen} again");
}

fn client_cfg(secrets: &Path) -> ClientConfig {
    let mut cfg = ClientConfig::new(tls::load_client_dir(secrets).unwrap());
    cfg.connect_timeout = Duration::from_secs(2);
    cfg.idle_timeout = Duration::from_secs(2);
    cfg
}

fn tail_cfg(addr: &str, secrets: &Path, start: TailStart) -> TailConfig {
    let mut t = TailConfig::new(addr, client_cfg(secrets), start);
    t.backoff_min = Duration::from_millis(20);
    t.backoff_max = Duration::from_millis(200);
    t
}

fn put(gtid: Gtid, tree: &str, key: &str) -> NewTransaction {
    NewTransaction {
        gtid,
        timestamp_us: 0,
        ops: vec![Op::Put {
            tree: tree.into(),
            key: key.as_bytes().to_vec(),
            value: vec![b'v'; 100],
            before: None,
        }],
    }
}

/// Appends `txn` to each log (a replica keeps the origin GTID) and waits until durable.
async fn append_all(wals: &[&Wal], txn: NewTransaction) {
    for wal in wals {
        wal.submit(txn.clone()).unwrap().await.unwrap();
    }
}

fn gtid(uuid: Uuid, seq: u64) -> Gtid {
    Gtid::new(uuid, seq).unwrap()
}

/// Runs a tail in its own task (so that it keeps reading while the test waits on something
/// else) and hands out what it yields.
fn spawn_tail(
    cfg: TailConfig,
    checkpoint: Option<Box<dyn Checkpoint>>,
) -> (
    mpsc::UnboundedReceiver<Result<Transaction, TailError>>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let mut t = tail(cfg, checkpoint);
        while let Some(item) = t.next().await {
            let end = item.is_err();
            if tx.send(item).is_err() || end {
                return;
            }
        }
    });
    (rx, task)
}

async fn recv(rx: &mut mpsc::UnboundedReceiver<Result<Transaction, TailError>>) -> Transaction {
    match tokio::time::timeout(WAIT, rx.recv()).await {
        Ok(Some(Ok(t))) => t,
        other => panic!("the tail ended or stalled: {other:?}"),
    }
}

/// A checkpoint in memory that publishes every save, so a test can wait for one.
#[derive(Clone)]
struct WatchCheckpoint {
    tx: Arc<watch::Sender<Option<Position>>>,
}

impl WatchCheckpoint {
    fn new() -> (Self, watch::Receiver<Option<Position>>) {
        let (tx, rx) = watch::channel(None);
        (WatchCheckpoint { tx: Arc::new(tx) }, rx)
    }
}

impl Checkpoint for WatchCheckpoint {
    fn load(&self) -> Result<Option<Position>, CheckpointError> {
        Ok(self.tx.borrow().clone())
    }
    fn save(&mut self, pos: &Position) -> Result<(), CheckpointError> {
        self.tx.send_replace(Some(pos.clone()));
        Ok(())
    }
}

/// Polls `cond` until it holds, for at most `WAIT`.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Item 3: P has 100 transactions; R was bootstrapped from P (its log starts with P:1-100 as
/// history before its first segment). A tail of R from `earliest` gets P's next 10 from R;
/// R dies and the address now leads to P: the tail gets exactly the new ones, once — not
/// P:1-100, which were before its start point.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tail_of_a_bootstrapped_replica_fails_over_without_replaying_history() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    tls::ensure_secrets(&secrets).unwrap();
    let p_wal = mem_wal(WalOptions::default());
    let p = p_wal.server_uuid();
    for i in 1..=100 {
        append_all(&[&p_wal], put(gtid(p, i), "default", &format!("k{i}"))).await;
    }
    let r_wal = mem_wal(WalOptions::default());
    let copied: GtidSet = format!("{p}:1-100").parse().unwrap();
    tokio::task::block_in_place(|| r_wal.reset_history(&copied)).unwrap();
    let (p_node, r_node) = (Arc::new(LogNode::new(p_wal)), Arc::new(LogNode::new(r_wal)));

    let r_server = serve_at(r_node.clone(), &secrets, "127.0.0.1:0".parse().unwrap());
    let listen = r_server.local_addr();
    let (mut rx, task) = spawn_tail(
        tail_cfg(&listen.to_string(), &secrets, TailStart::Earliest),
        None,
    );
    for i in 101..=110 {
        append_all(
            &[p_node.wal(), r_node.wal()],
            put(gtid(p, i), "default", &format!("k{i}")),
        )
        .await;
    }
    let mut got: Vec<Gtid> = Vec::new();
    for _ in 101..=110 {
        got.push(recv(&mut rx).await.gtid);
    }
    assert_eq!(got, (101..=110).map(|i| gtid(p, i)).collect::<Vec<_>>());

    // R dies; the address now leads to P, which writes one more.
    r_server.shutdown().await;
    let p_server = serve_at(p_node.clone(), &secrets, listen);
    append_all(&[p_node.wal()], put(gtid(p, 111), "default", "k111")).await;
    let next = recv(&mut rx).await;
    assert_eq!(
        next.gtid,
        gtid(p, 111),
        "after failover the tail must deliver only what it has not seen; it replayed history \
         from before its start point"
    );
    task.abort();
    p_server.shutdown().await;
}

/// Item 3, the tail has received nothing yet: it subscribed to R (bootstrapped from P:1-100),
/// P writes 10 more that R never gets, R dies and the address leads to P. Exactly the 10 new
/// ones arrive, once: a reconnect before the first record resumes from the subscription's
/// covered set, not from `earliest` again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tail_that_has_received_nothing_fails_over_without_replaying_history() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    tls::ensure_secrets(&secrets).unwrap();
    let p_wal = mem_wal(WalOptions::default());
    let p = p_wal.server_uuid();
    for i in 1..=100 {
        append_all(&[&p_wal], put(gtid(p, i), "default", &format!("k{i}"))).await;
    }
    let r_wal = mem_wal(WalOptions::default());
    let copied: GtidSet = format!("{p}:1-100").parse().unwrap();
    tokio::task::block_in_place(|| r_wal.reset_history(&copied)).unwrap();
    let (p_node, r_node) = (Arc::new(LogNode::new(p_wal)), Arc::new(LogNode::new(r_wal)));

    let r_server = serve_at(r_node.clone(), &secrets, "127.0.0.1:0".parse().unwrap());
    let listen = r_server.local_addr();
    let mut cfg = tail_cfg(&listen.to_string(), &secrets, TailStart::Earliest);
    cfg.slot = Some("sink".into());
    let (mut rx, task) = spawn_tail(cfg, None);
    // The slot exists once the subscription on R is in place.
    wait_until("the subscription on R is in place", || {
        r_node.wal().slot("sink").is_some()
    })
    .await;
    for i in 101..=110 {
        append_all(
            &[p_node.wal()],
            put(gtid(p, i), "default", &format!("k{i}")),
        )
        .await;
    }
    r_server.shutdown().await;
    let p_server = serve_at(p_node.clone(), &secrets, listen);
    let mut got: Vec<Gtid> = Vec::new();
    for _ in 101..=110 {
        got.push(recv(&mut rx).await.gtid);
    }
    assert_eq!(
        got,
        (101..=110).map(|i| gtid(p, i)).collect::<Vec<_>>(),
        "after failover the tail must deliver only what came after its start point"
    );
    append_all(&[p_node.wal()], put(gtid(p, 111), "default", "k111")).await;
    assert_eq!(recv(&mut rx).await.gtid, gtid(p, 111), "delivered once");
    task.abort();
    p_server.shutdown().await;
}

/// Item 4: a tail of tree `users` gets one match, then 10,000 transactions on other trees
/// that its filter drops. The failover target B holds the same transactions and ran
/// retention, purging them. The tail's saved position and its slot move past the dropped
/// transactions (progress), and after failover it resumes with no error and no gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filtered_tail_moves_past_dropped_transactions_and_fails_over_to_a_purged_node() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    tls::ensure_secrets(&secrets).unwrap();
    let a_wal = mem_wal(WalOptions::default());
    let a = a_wal.server_uuid();
    let b_wal = mem_wal(small_segments());
    append_all(&[&a_wal, &b_wal], put(gtid(a, 1), "users", "u:1")).await;
    for i in 2..=10_001 {
        let txn = put(gtid(a, i), "orders", &format!("o:{i}"));
        // Acknowledged with the last one below (appends are acknowledged in order).
        drop(a_wal.submit(txn.clone()).unwrap());
        drop(b_wal.submit(txn).unwrap());
    }
    let last = put(gtid(a, 10_002), "orders", "o:last");
    append_all(&[&a_wal, &b_wal], last).await;
    let (a_node, b_node) = (Arc::new(LogNode::new(a_wal)), Arc::new(LogNode::new(b_wal)));

    let a_server = serve_at(a_node.clone(), &secrets, "127.0.0.1:0".parse().unwrap());
    let listen = a_server.local_addr();
    let mut cfg = tail_cfg(&listen.to_string(), &secrets, TailStart::Earliest);
    cfg.tree = Some("users".into());
    cfg.slot = Some("users-sink".into());
    cfg.checkpoint_interval = Duration::ZERO;
    let (checkpoint, mut saved) = WatchCheckpoint::new();
    let (mut rx, task) = spawn_tail(cfg, Some(Box::new(checkpoint)));
    assert_eq!(recv(&mut rx).await.gtid, gtid(a, 1));

    // The filter dropped everything after offset 1; the saved position must still move on.
    let reached = tokio::time::timeout(
        WAIT,
        saved.wait_for(|p| p.as_ref().is_some_and(|p| p.offset >= 10_002)),
    )
    .await
    .map(|r| r.map(|p| p.clone()));
    let pos = match reached {
        Ok(Ok(Some(p))) => p,
        _ => panic!(
            "the checkpoint never moved past the transactions the filter dropped: {:?}",
            saved.borrow().clone()
        ),
    };
    let all_a: GtidSet = format!("{a}:1-10002").parse().unwrap();
    assert!(all_a.is_subset(&pos.gtids), "saved {}", pos.gtids);
    // The slot follows the saved position, so A's log is not pinned by the dropped ones.
    wait_until("the slot moves past the dropped transactions", || {
        let slot = a_node.wal().slot("users-sink");
        slot.is_some_and(|s| s.restart_offset == 10_003)
    })
    .await;

    // A dies; B (which purged what A's tail dropped) takes the address and commits a match.
    a_server.shutdown().await;
    let report = tokio::task::block_in_place(|| b_node.wal().run_retention()).unwrap();
    assert!(
        b_node.wal().first_offset().get() > 2,
        "retention on B must purge the dropped transactions for this test to mean anything: \
         {report:?}"
    );
    let b_server = serve_at(b_node.clone(), &secrets, listen);
    let client = tideline_stream::Client::connect(&listen.to_string(), client_cfg(&secrets))
        .await
        .unwrap();
    let (_, committed) = client
        .commit(vec![WriteOp::Put {
            tree: "users".into(),
            key: b"u:2".to_vec(),
            value: b"2".to_vec(),
        }])
        .await
        .unwrap();
    let next = recv(&mut rx).await;
    assert_eq!(next.gtid.to_string(), committed);
    task.abort();
    client.close().await;
    b_server.shutdown().await;
}

/// Item 6: a consumer with a 10 s checkpoint interval takes two batches (only the first is
/// saved at once) and is dropped without a commit, as a crash would. Retention then runs with
/// no minimum on small segments. The slot must not have gone past what the checkpoint stored,
/// so the restarted consumer resumes from its checkpoint with nothing missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_never_runs_ahead_of_the_saved_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    tls::ensure_secrets(&secrets).unwrap();
    let wal = mem_wal(small_segments());
    let uuid = wal.server_uuid();
    let node = Arc::new(LogNode::new(wal));
    let server = serve_at(node.clone(), &secrets, "127.0.0.1:0".parse().unwrap());
    let addr = server.local_addr().to_string();
    let checkpoint = dir.path().join("tail.checkpoint");
    let mut cfg = tail_cfg(&addr, &secrets, TailStart::Earliest);
    cfg.slot = Some("sink".into());
    cfg.checkpoint_interval = Duration::from_secs(10);

    for i in 1..=100 {
        append_all(
            &[node.wal()],
            put(gtid(uuid, i), "default", &format!("k{i}")),
        )
        .await;
    }
    let mut t = tail(
        cfg.clone(),
        Some(Box::new(FileCheckpoint::new(&checkpoint))),
    );
    let mut next = async || match tokio::time::timeout(WAIT, t.next()).await {
        Ok(Some(Ok(txn))) => txn.offset.get(),
        other => panic!("the tail ended or stalled: {other:?}"),
    };
    for i in 1..=100 {
        assert_eq!(next().await, i);
    }
    for i in 101..=200 {
        append_all(
            &[node.wal()],
            put(gtid(uuid, i), "default", &format!("k{i}")),
        )
        .await;
    }
    for i in 101..=200 {
        assert_eq!(next().await, i);
    }
    // Asking for the next one ends the second batch (the tail acks then, if it does); the
    // write of 201 then needs a new connection's handshake, so such an ack reaches the node
    // first.
    let (got, ()) = tokio::join!(next(), async {
        append_all(&[node.wal()], put(gtid(uuid, 201), "default", "k201")).await;
    });
    assert_eq!(got, 201);
    let stored = FileCheckpoint::new(&checkpoint).load().unwrap().unwrap();
    assert!(
        stored.offset < 200,
        "the 10 s interval saved only the first batch: {stored:?}"
    );
    wait_until("the slot holds at least what the checkpoint stored", || {
        node.wal()
            .slot("sink")
            .is_some_and(|s| s.restart_offset > 1)
    })
    .await;
    drop(t);

    let _ = tokio::task::block_in_place(|| node.wal().run_retention()).unwrap();
    let slot = node.wal().slot("sink").unwrap();
    assert!(
        slot.restart_offset <= stored.offset + 1,
        "the slot ({slot:?}) ran ahead of the checkpoint (offset {})",
        stored.offset
    );
    let mut t = tail(cfg, Some(Box::new(FileCheckpoint::new(&checkpoint))));
    for i in stored.offset + 1..=201 {
        match tokio::time::timeout(WAIT, t.next()).await {
            Ok(Some(Ok(txn))) => assert_eq!(txn.offset.get(), i),
            other => panic!("the restarted consumer could not resume at {i}: {other:?}"),
        }
    }
    server.shutdown().await;
}

/// A node whose `wait_for` lets one transaction commit right after it read `gtid_executed`,
/// as a concurrent writer may: the commit lands between what a client learns and the
/// subscription it opens next.
struct CommitAfterRead {
    inner: LogNode,
    replica: Arc<LogNode>,
    armed: AtomicBool,
}

impl Node for CommitAfterRead {
    fn wal(&self) -> &Wal {
        self.inner.wal()
    }
    fn get(&self, tree: &str, key: &[u8]) -> Result<Option<Vec<u8>>, NodeError> {
        self.inner.get(tree, key)
    }
    fn scan(&self, tree: &str, prefix: &[u8], page: ScanPage<'_>) -> Result<Page, NodeError> {
        self.inner.scan(tree, prefix, page)
    }
    async fn commit(&self, ops: Vec<WriteOp>) -> Result<(Offset, Gtid), NodeError> {
        self.inner.commit(ops).await
    }
    fn status_json(&self) -> String {
        self.inner.status_json()
    }
    async fn wait_for(&self, gtids: GtidSet, timeout: Duration) -> (bool, GtidSet) {
        let answer = self.inner.wait_for(gtids, timeout).await;
        if self.armed.swap(false, Ordering::SeqCst) {
            let wal = self.inner.wal();
            let seq = wal.gtids().last_seq(&wal.server_uuid()).unwrap_or(0) + 1;
            let txn = put(gtid(wal.server_uuid(), seq), "default", "in-the-gap");
            append_all(&[wal, self.replica.wal()], txn).await;
        }
        answer
    }
}

/// Item 8: a `latest` tail must count everything committed before its subscription is in
/// place as seen, even a commit racing its start, so a failover does not replay it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_latest_tail_takes_its_start_set_from_the_subscription() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    tls::ensure_secrets(&secrets).unwrap();
    let a_wal = mem_wal(WalOptions::default());
    let a = a_wal.server_uuid();
    let b_wal = mem_wal(WalOptions::default());
    for i in 1..=20 {
        append_all(
            &[&a_wal, &b_wal],
            put(gtid(a, i), "default", &format!("k{i}")),
        )
        .await;
    }
    let b_node = Arc::new(LogNode::new(b_wal));
    let a_node = Arc::new(CommitAfterRead {
        inner: LogNode::new(a_wal),
        replica: b_node.clone(),
        armed: AtomicBool::new(true),
    });
    let a_server = serve_at(a_node.clone(), &secrets, "127.0.0.1:0".parse().unwrap());
    let listen = a_server.local_addr();
    let mut cfg = tail_cfg(&listen.to_string(), &secrets, TailStart::Latest);
    cfg.slot = Some("latest".into());
    let (mut rx, task) = spawn_tail(cfg, None);
    // The slot exists once the subscription is in place; what is written after it must come.
    wait_until("the subscription is in place", || {
        a_node.wal().slot("latest").is_some()
    })
    .await;
    let after = a_node.wal().gtids().last_seq(&a).unwrap_or(0) + 1;
    append_all(
        &[a_node.wal(), b_node.wal()],
        put(gtid(a, after), "default", "after"),
    )
    .await;
    assert_eq!(recv(&mut rx).await.gtid, gtid(a, after));

    // A dies; B (a replica holding the same transactions) takes the address and commits.
    a_server.shutdown().await;
    let b_server = serve_at(b_node.clone(), &secrets, listen);
    let client = tideline_stream::Client::connect(&listen.to_string(), client_cfg(&secrets))
        .await
        .unwrap();
    let (_, committed) = client
        .commit(vec![WriteOp::Put {
            tree: "default".into(),
            key: b"on-b".to_vec(),
            value: b"1".to_vec(),
        }])
        .await
        .unwrap();
    let next = recv(&mut rx).await;
    assert_eq!(
        next.gtid.to_string(),
        committed,
        "a transaction committed before the subscription was in place was replayed"
    );
    task.abort();
    client.close().await;
    b_server.shutdown().await;
}
