//! `WaitFor` (a read fence) on the engine node: a waiter is woken by the apply it waits
//! for, not by a timer. Guards against the fence polling the engine for up to an hour.

use super::*;

/// The runtime's clock is paused and never advances (a task that always yields keeps the
/// runtime from idling, which is when a paused clock jumps). A fence that only re-checks
/// on a timer therefore never sees the commit; one woken by the apply does. The loop
/// below is bounded by a real-time limit that only a broken fence reaches.
#[test]
fn wait_for_is_woken_by_the_apply_not_by_a_timer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = open_engine(dir.path(), Durability::Sync, false).expect("open engine");
    let node = Arc::new(EngineNode::new(
        engine.clone(),
        Vec::new(),
        Arc::new(Observer::new()),
    ));
    let want: GtidSet = format!("{}:1", engine.server_uuid())
        .parse()
        .expect("gtid set");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    rt.block_on(async {
        let busy = tokio::spawn(async {
            loop {
                tokio::task::yield_now().await;
            }
        });
        let fence = {
            let (node, want) = (node.clone(), want.clone());
            tokio::spawn(async move { node.wait_for(want, Duration::from_secs(3600)).await })
        };
        // Let the fence check once and start waiting.
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert!(!fence.is_finished(), "nothing was committed yet");
        let writer = {
            let engine = engine.clone();
            std::thread::spawn(move || engine.put("default", b"k", b"v"))
        };
        let limit = std::time::Instant::now() + Duration::from_secs(30);
        while !fence.is_finished() && std::time::Instant::now() < limit {
            tokio::task::yield_now().await;
        }
        writer.join().expect("writer thread").expect("put");
        assert!(
            fence.is_finished(),
            "the fence was not woken by the apply of the GTID it waits for"
        );
        let (reached, executed) = fence.await.expect("fence task");
        assert!(reached);
        assert!(want.is_subset(&executed));
        busy.abort();
    });
}
