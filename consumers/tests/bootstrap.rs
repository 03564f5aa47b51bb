//! A bootstrap whose node replaces its history while the copy runs (the node was bootstrapped
//! itself: new state, a new history epoch). The node ends the stream with
//! `PositionUnavailable`, and PROTOCOL.md promises that the consumer starts the copy over from
//! scratch: [`Bootstrap::next`] must say so ([`BootstrapError::Restart`]), not pass the node's
//! error on as a failed connection. Guards against pipelines that ended failed for good
//! instead of copying again.

use std::sync::Arc;
use std::time::Duration;

use tideline_consumers::{Bootstrap, BootstrapError, BootstrapStep};
use tideline_stream::log_node::LogNode;
use tideline_stream::proto::{WriteOp, pack_entry};
use tideline_stream::{
    BootstrapView, Client, ClientConfig, Node, NodeError, ServerConfig, ServerHandle, tls,
};
use tideline_wal::{Epoch, Gtid, GtidSet, MemStorage, Offset, Wal, WalOptions};

/// Keys of the one tree, each with a 1 KiB value: about 100 KiB, several 16 KiB chunks.
const KEYS: u32 = 100;

/// A log-only node whose state is tree `t`, served in views of the log's current history.
struct TwoHistories {
    log: LogNode,
}

struct View {
    epoch: Epoch,
}

impl BootstrapView for View {
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
        (u64::from(KEYS), u64::from(KEYS) * 1024)
    }
    fn chunk(
        &self,
        _tree: &str,
        from: &[u8],
        bytes_max: usize,
        out: &mut Vec<u8>,
    ) -> Result<Option<Vec<u8>>, NodeError> {
        for i in 0..KEYS {
            let key = format!("k{i:03}").into_bytes();
            if key.as_slice() < from {
                continue;
            }
            if out.len() >= bytes_max {
                return Ok(Some(key));
            }
            pack_entry(out, &key, &[b'v'; 1024]);
        }
        Ok(None)
    }
}

impl Node for TwoHistories {
    fn wal(&self) -> &Wal {
        self.log.wal()
    }
    fn get(&self, tree: &str, key: &[u8]) -> Result<Option<Vec<u8>>, NodeError> {
        self.log.get(tree, key)
    }
    fn scan(
        &self,
        tree: &str,
        prefix: &[u8],
        page: tideline_stream::ScanPage<'_>,
    ) -> Result<tideline_stream::Page, NodeError> {
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
    fn bootstrap_view(&self) -> Result<Arc<dyn BootstrapView>, NodeError> {
        Ok(Arc::new(View {
            epoch: self.log.wal().history_epoch(),
        }))
    }
}

/// The node, its server and a client connected to it (the directory holds the secrets).
async fn start() -> (tempfile::TempDir, Arc<TwoHistories>, ServerHandle, Client) {
    let dir = tempfile::tempdir().expect("tempdir");
    tls::ensure_secrets(dir.path()).expect("secrets");
    let wal = Wal::open(Arc::new(MemStorage::new()), WalOptions::default()).expect("open log");
    let node = Arc::new(TwoHistories {
        log: LogNode::new(wal),
    });
    let cfg = ServerConfig::new("127.0.0.1:0".parse().expect("address"));
    let tls = tls::load_server(dir.path()).expect("server secrets");
    let server = tideline_stream::serve(cfg, tls, node.clone()).expect("serve");
    let addr = server.local_addr().to_string();
    let cfg = ClientConfig::new(tls::load_client_dir(dir.path()).expect("client secrets"));
    let client = Client::connect(&addr, cfg).await.expect("connect");
    (dir, node, server, client)
}

async fn next(b: &mut Bootstrap) -> Result<Option<BootstrapStep>, BootstrapError> {
    tokio::time::timeout(Duration::from_secs(10), b.next())
        .await
        .expect("the node answers within 10 s")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_reset_of_the_node_during_a_copy_asks_for_a_copy_from_scratch() {
    let (_dir, node, server, client) = start().await;
    let mut b = Bootstrap::start(&client, None, 16 << 10)
        .await
        .expect("the copy starts");
    let mut acker = b.take_acker().expect("the acker, taken once");
    match next(&mut b).await {
        Ok(Some(BootstrapStep::Chunk {
            completes_chunk: true,
            to: Some(_),
            ..
        })) => {}
        other => panic!("expected the first chunk, whole and not the end, got {other:?}"),
    }

    // The node is bootstrapped itself (new history epoch); then the first chunk is stored.
    tokio::task::block_in_place(|| node.wal().reset_history(&GtidSet::new()))
        .expect("reset the node's history");
    acker
        .stored(1)
        .await
        .expect("report the first chunk stored");
    let mut chunks = 1u64;
    let end = loop {
        match next(&mut b).await {
            // A chunk read before the reset may still come; the end follows.
            Ok(Some(BootstrapStep::Chunk {
                completes_chunk, ..
            })) => {
                if completes_chunk {
                    chunks += 1;
                    // The node may have ended the stream already (its error follows).
                    let _ = acker.stored(chunks).await;
                }
            }
            Ok(Some(BootstrapStep::Records(_) | BootstrapStep::Ops(_))) => {}
            other => break other,
        }
    };
    assert!(
        matches!(&end, Err(BootstrapError::Restart(why)) if why.contains("history was replaced")),
        "a copy whose node replaced its history must start again from scratch; got {end:?}"
    );
    server.shutdown().await;
}
