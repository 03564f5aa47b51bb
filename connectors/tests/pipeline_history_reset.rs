//! A pipeline follows a node whose log history is reset while it serves (every bootstrap of a
//! node ends with that): the pipeline's live tail sees its subscription end with
//! `PositionUnavailable` mid-stream. Guards against a pipeline that turns that into `Failed`
//! and stays failed until its node restarts, and against a gap or a duplicate in the sink
//! across the reset.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tideline_connectors::sink::file::{FileConfig, FileSink};
use tideline_connectors::{PipelineConfig, PipelineState};
use tideline_stream::log_node::LogNode;
use tideline_stream::{ClientConfig, Node, ServerConfig, ServerHandle, tls};
use tideline_wal::{FileStorage, Gtid, GtidSet, NewTransaction, Op, Wal, WalOptions};

/// A node serving a log the test writes into directly (origin GTIDs, history resets), as a
/// bootstrapped replica's log is written.
fn start_log_node(data: &Path, secrets: &Path) -> (ServerHandle, Arc<LogNode>) {
    let wal = Wal::open(
        Arc::new(FileStorage::new(data).unwrap()),
        WalOptions::default(),
    )
    .unwrap();
    let node = Arc::new(LogNode::new(wal));
    let server = tideline_stream::serve(
        ServerConfig::new("127.0.0.1:0".parse().unwrap()),
        tls::load_server(secrets).unwrap(),
        node.clone(),
    )
    .unwrap();
    (server, node)
}

/// Appends `origin:range` (one put each) to `wal`, keeping their GTIDs.
fn append(wal: &Wal, origin: uuid::Uuid, range: std::ops::RangeInclusive<u64>) {
    tokio::task::block_in_place(|| {
        for n in range {
            wal.append(NewTransaction {
                gtid: Gtid::new(origin, n).unwrap(),
                timestamp_us: 0,
                ops: vec![Op::Put {
                    tree: "default".into(),
                    key: format!("k{n}").into_bytes(),
                    value: n.to_string().into_bytes(),
                    before: None,
                }],
            })
            .unwrap();
        }
    })
}

/// The `source.gtid` of every line of the sink's file, in order.
fn gtids_in(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            v["source"]["gtid"].as_str().unwrap_or_default().to_owned()
        })
        .collect()
}

/// Waits until the sink's file holds `n` lines, failing at once if the pipeline stops.
async fn wait_for_lines(
    path: &Path,
    n: usize,
    status: &tideline_connectors::SharedPipelineStatus,
) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let lines = gtids_in(path);
        if lines.len() >= n {
            return lines;
        }
        let s = status.get();
        assert!(
            s.state != PipelineState::Failed,
            "the pipeline failed with {} lines of {n} in the sink: {:?}",
            lines.len(),
            s.last_error
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} lines of {n} in the sink after 20 s (state {:?}, last error {:?})",
            lines.len(),
            s.state,
            s.last_error
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_goes_on_across_a_history_reset_of_its_source() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    tls::ensure_secrets(&secrets).unwrap();
    let (server, u) = start_log_node(&dir.path().join("u"), &secrets);
    let origin = uuid::Uuid::new_v4();
    append(u.wal(), origin, 1..=100);

    let mut client = ClientConfig::new(tls::load_client_dir(&secrets).unwrap());
    client.connect_timeout = Duration::from_secs(2);
    let mut cfg = PipelineConfig::new("reset", server.local_addr().to_string(), client);
    cfg.retry_min = Duration::from_millis(20);
    cfg.retry_max = Duration::from_millis(200);
    let out = dir.path().join("changes.jsonl");
    let sink = FileSink::new(FileConfig::new(&out), "reset").unwrap();
    let (status, task) = tideline_connectors::pipeline::spawn(cfg, Box::new(sink));

    // The pipeline has everything and its tail waits on the node for more.
    wait_for_lines(&out, 100, &status).await;
    // The node's history is replaced by a copy holding exactly what the pipeline has.
    let copied: GtidSet = format!("{origin}:1-100").parse().unwrap();
    tokio::task::block_in_place(|| u.wal().reset_history(&copied)).unwrap();
    append(u.wal(), origin, 101..=110);

    let lines = wait_for_lines(&out, 110, &status).await;
    let expected: Vec<String> = (1..=110).map(|n| format!("{origin}:{n}")).collect();
    assert_eq!(lines, expected, "a gap or a duplicate across the reset");
    assert_ne!(status.get().state, PipelineState::Failed);
    task.abort();
    server.shutdown().await;
}
