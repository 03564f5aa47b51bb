//! A node's reads block (a point read or a scan that misses the block cache reads the disk;
//! `status` waits on the log's slots while retention fsyncs), so the server runs them off
//! the async workers that serve QUIC (docs/ENGINE.md: "from async code call it with
//! `spawn_blocking`"; docs/OPERATIONS.md: log reads stay off the workers that serve QUIC).
//!
//! Scenario: the server runs on a runtime of 2 workers (a 2-core machine) over a node whose
//! `get` blocks its thread until the test releases it, as a read stuck on a slow disk. Two
//! clients each send a `get`; once both reads are blocked inside the node, a third connection
//! asks for `status`. It must be answered while both reads are still blocked.
//!
//! Guards against: reads run on the workers themselves, so that two slow reads freeze every
//! connection of the node (commits, subscriptions, heartbeats, `status`) until they return.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tideline_stream::log_node::LogNode;
use tideline_stream::proto::WriteOp;
use tideline_stream::{Client, ClientConfig, Node, NodeError, Page, ScanPage, ServerConfig, tls};
use tideline_wal::{Gtid, GtidSet, MemStorage, Offset, Wal, WalOptions};

/// Longest a blocked read waits for the test to release it (a guard against a hang).
const HOLD_MAX: Duration = Duration::from_secs(60);

/// A [`LogNode`] whose `get` blocks its thread until [`SlowNode::release`].
struct SlowNode {
    log: LogNode,
    /// Reads currently blocked inside `get`.
    blocked: AtomicUsize,
    released: Mutex<bool>,
    wake: Condvar,
}

impl SlowNode {
    fn release(&self) {
        *self.released.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.wake.notify_all();
    }
}

impl Node for SlowNode {
    fn wal(&self) -> &Wal {
        self.log.wal()
    }
    fn get(&self, tree: &str, key: &[u8]) -> Result<Option<Vec<u8>>, NodeError> {
        self.blocked.fetch_add(1, Ordering::SeqCst);
        let released = self.released.lock().unwrap_or_else(|p| p.into_inner());
        let _released = self
            .wake
            .wait_timeout_while(released, HOLD_MAX, |r| !*r)
            .unwrap_or_else(|p| p.into_inner());
        self.blocked.fetch_sub(1, Ordering::SeqCst);
        self.log.get(tree, key)
    }
    fn scan(&self, tree: &str, prefix: &[u8], page: ScanPage<'_>) -> Result<Page, NodeError> {
        self.log.scan(tree, prefix, page)
    }
    async fn commit(&self, ops: Vec<WriteOp>) -> Result<(Offset, Gtid), NodeError> {
        self.log.commit(ops).await
    }
    fn status_json(&self) -> String {
        self.log.status_json()
    }
    async fn wait_for(&self, gtids: GtidSet, timeout: Duration) -> (bool, GtidSet) {
        self.log.wait_for(gtids, timeout).await
    }
}

#[test]
fn status_is_answered_while_two_reads_block_on_a_two_worker_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    tls::ensure_secrets(dir.path()).expect("secrets");
    let secrets = tls::load_server(dir.path()).expect("server secrets");
    let client_cfg = ClientConfig::new(tls::load_client_dir(dir.path()).expect("client secrets"));
    let node = Arc::new(SlowNode {
        log: LogNode::new(
            Wal::open(Arc::new(MemStorage::new()), WalOptions::default()).expect("open log"),
        ),
        blocked: AtomicUsize::new(0),
        released: Mutex::new(false),
        wake: Condvar::new(),
    });
    // The server's own runtime, two workers; the clients run on another one, so that only the
    // server's workers can be blocked.
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("server runtime");
    let server = {
        let _in_server_rt = server_rt.enter();
        tideline_stream::serve(
            ServerConfig::new("127.0.0.1:0".parse().expect("address")),
            secrets,
            node.clone(),
        )
        .expect("serve")
    };
    let addr = server.local_addr().to_string();
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("client runtime");
    let answered = client_rt.block_on(async {
        let mut clients = Vec::new();
        for _ in 0..3 {
            clients.push(
                Client::connect(&addr, client_cfg.clone())
                    .await
                    .expect("connect"),
            );
        }
        let watcher = clients.pop().expect("three clients");
        let gets: Vec<_> = clients
            .into_iter()
            .map(|c| tokio::spawn(async move { c.get("t", b"k").await }))
            .collect();
        // Both reads are inside the node, each holding the thread it runs on.
        let limit = tokio::time::Instant::now() + Duration::from_secs(10);
        while node.blocked.load(Ordering::SeqCst) < 2 {
            assert!(
                tokio::time::Instant::now() < limit,
                "the two gets never reached the node"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let status = tokio::time::timeout(Duration::from_secs(5), watcher.status()).await;
        let still_blocked = node.blocked.load(Ordering::SeqCst);
        node.release();
        let mut got = Vec::new();
        for get in gets {
            got.push(get.await.expect("get task"));
        }
        (status, still_blocked, got)
    });
    let (status, still_blocked, got) = answered;
    assert_eq!(
        still_blocked, 2,
        "the reads were released before status was asked"
    );
    if let Err(e) | Ok(Err(e)) = status
        .map_err(|_| "no answer within 5 s".to_string())
        .map(|r| r.map_err(|e| e.to_string()))
    {
        panic!(
            "status was not answered while two reads blocked inside the node ({e}): the \
             server runs reads on its async workers, so two slow reads freeze every connection"
        );
    }
    for get in got {
        assert_eq!(get.expect("get answered once released"), None);
    }
    server_rt.shutdown_background();
}
