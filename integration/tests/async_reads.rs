//! A client of a node under `--durability async` reads its own writes. The node acknowledges
//! a commit once its log record is written, before the interval's fsync and the apply that
//! show it (DESIGN: "`async` acks after write"), and fences every later read on the same
//! connection on that commit (docs/PROTOCOL.md, "Reading one's own writes"). Guards against a
//! read on the committing connection that misses the write it just had acknowledged.

use std::time::Duration;

use tideline_stream::{Client, ClientConfig, WriteOp};

mod common;

use common::Node;

fn put(key: &str, value: &str) -> WriteOp {
    WriteOp::Put {
        tree: "default".into(),
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
    }
}

/// 300 rounds of commit, then get and scan on the same connection: each read sees the value
/// just acknowledged, never the one before it. (With the connection's fence switched off the
/// reads land inside the fsync interval and miss: this test failed that way.)
#[test]
fn a_connection_reads_its_own_writes_under_async() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = Node::start_with(&dir.path().join("n"), 0, &["--durability", "async"]);
    let secrets = tideline_stream::tls::load_client_dir(&node.secrets()).expect("secrets");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let client = Client::connect(&node.addr, ClientConfig::new(secrets))
            .await
            .expect("connect");
        // The first commit creates nothing (`default` is created implicitly by it): later
        // rounds are the plain writes async acknowledges early.
        client.commit(vec![put("k", "v0")]).await.expect("commit");
        for i in 1..=300u32 {
            let want = format!("v{i}");
            client
                .commit(vec![put("k", &want)])
                .await
                .unwrap_or_else(|e| panic!("round {i}: commit: {e}"));
            let got = client
                .get("default", b"k")
                .await
                .unwrap_or_else(|e| panic!("round {i}: get: {e}"));
            assert_eq!(
                got.as_deref(),
                Some(want.as_bytes()),
                "round {i}: a get on the committing connection missed its acknowledged write"
            );
            let rows =
                tokio::time::timeout(Duration::from_secs(30), client.scan("default", b"k", 10))
                    .await
                    .expect("scan answered")
                    .unwrap_or_else(|e| panic!("round {i}: scan: {e}"));
            assert_eq!(
                rows,
                vec![(b"k".to_vec(), want.as_bytes().to_vec())],
                "round {i}: a scan on the committing connection missed its acknowledged write"
            );
        }
    });
}

/// Across processes: `tideline put` prints the commit's GTID, and `tideline get --after GTID`
/// from another process waits until the node shows it, then prints the value, 20 times. A
/// GTID set that is not one, and one the node never reaches, are refused with what to do.
#[test]
fn get_after_the_gtid_put_printed_reads_the_write_from_another_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = Node::start_with(&dir.path().join("n"), 0, &["--durability", "async"]);
    let mut gtid = String::new();
    for i in 0..20u32 {
        let want = format!("v{i}");
        let out = node.run(&["put", "k", &want]);
        assert!(
            out.status.success(),
            "put: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let printed: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("put prints JSON");
        gtid = printed["gtid"]
            .as_str()
            .expect("put prints the gtid")
            .to_string();
        let out = node.run(&["get", "--after", &gtid, "k"]);
        assert!(
            out.status.success(),
            "get: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            want,
            "round {i}: get --after {gtid} missed the write"
        );
    }
    let out = node.run(&["get", "--after", "not-a-set", "k"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not a GTID set"), "{err}");
    // The next GTID number of the node's own origin: never committed.
    let (uuid, n) = gtid.rsplit_once(':').expect("uuid:n");
    let ahead = format!("{uuid}:{}", n.parse::<u64>().expect("a GTID number") + 1);
    let out = node.run(&["get", "--after", &ahead, "--after-timeout-ms", "200", "k"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("did not show --after"), "{err}");
}
