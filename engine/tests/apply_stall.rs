//! The applier against a state store that stalls writes or fails (fjall halts writes while
//! its flushes fall behind; a failed flush or fsync poisons it). Uses the test-only
//! `EngineOptions::unsafe_store_faults` to hold the store in a stall and to make its sync fail
//! at a moment the test picks.
//!
//! Guards against: readers (`position`, `snapshot`, reads) waiting for a stalled applier
//! (ENGINE.md: "Readers never wait for writers"), which the applier caused by committing its
//! batch, and so sleeping in the store's backpressure, under the lock readers take; and a
//! store failure (fail-stop) that leaves committers waiting for ever for an apply that will
//! never come, and an engine whose close never returns because it joins the stuck applier.
//! The node turns fail-stop into exit code 2 only if both return.

use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use tideline_engine::{Engine, EngineOptions, StoreFaults, WriteError};
use tideline_wal::{MemStorage, Wal, WalOptions};

/// How long a reader may take while the store stalls: far above a read's cost, far below
/// the stall (which lasts until the test ends it).
const READ_WAIT: Duration = Duration::from_millis(100);

/// How long a committer or `close` may take to return once the engine failed.
const RELEASE_WAIT: Duration = Duration::from_secs(10);

struct Node {
    engine: Arc<Engine>,
    faults: Arc<StoreFaults>,
    _dir: tempfile::TempDir,
}

fn node() -> Node {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = Wal::open(Arc::new(MemStorage::new()), WalOptions::default()).expect("open log");
    let faults = Arc::new(StoreFaults::default());
    let opts = EngineOptions {
        unsafe_store_faults: Some(faults.clone()),
        // The test syncs the store itself, at the moment it picks.
        checkpoint_interval: Duration::from_secs(3600),
        ..EngineOptions::default()
    };
    let engine = Engine::open(dir.path(), Arc::new(wal), opts).expect("open engine");
    Node {
        engine: Arc::new(engine),
        faults,
        _dir: dir,
    }
}

/// Ends every stall when dropped, also when an assertion failed, so that the threads the
/// test left waiting (and the engine's drop) can end.
struct EndStalls(Arc<StoreFaults>);

impl Drop for EndStalls {
    fn drop(&mut self) {
        self.0.set_write_stall(false);
        self.0.set_unreported_write_stall(false);
    }
}

/// Commits `k = value` on a thread of its own; its outcome arrives on the receiver.
fn put_in_background(
    e: &Arc<Engine>,
    value: &'static [u8],
) -> mpsc::Receiver<Result<tideline_engine::CommitInfo, WriteError>> {
    let (tx, rx) = mpsc::channel();
    let e = e.clone();
    std::thread::spawn(move || {
        let _ = tx.send(e.put("default", b"k", value));
    });
    rx
}

/// Waits until the applier is held in the store's stall.
fn wait_for_stall(faults: &StoreFaults) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while faults.stalls_seen() == 0 {
        assert!(
            Instant::now() < deadline,
            "the applier never reached the store's write stall"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Runs `read` on a thread of its own and returns its answer, or `None` if it gave none
/// within [`READ_WAIT`].
fn answer_within<T: Send + 'static>(
    e: &Arc<Engine>,
    read: impl FnOnce(&Engine) -> T + Send + 'static,
) -> Option<T> {
    let (tx, rx) = mpsc::channel();
    let e = e.clone();
    std::thread::spawn(move || {
        let _ = tx.send(read(&e));
    });
    rx.recv_timeout(READ_WAIT).ok()
}

/// While the store stalls writes (the applier holds a group it cannot write yet), the
/// applied position, snapshots and reads answer at once, and show the state before the
/// stalled group. Once the stall ends, the commit returns and its write is shown.
#[test]
fn readers_answer_while_the_store_stalls_writes() {
    let n = node();
    let e = &n.engine;
    let before = e.put("default", b"k", b"v0").expect("put v0");
    let _end = EndStalls(n.faults.clone());
    n.faults.set_write_stall(true);
    let commit = put_in_background(e, b"v1");
    wait_for_stall(&n.faults);

    let position = answer_within(e, |e| e.position()).unwrap_or_else(|| {
        panic!(
            "position() gave no answer within {READ_WAIT:?} while the store stalls writes: \
             readers wait for the stalled applier"
        )
    });
    assert_eq!(
        position.offset,
        Some(before.offset),
        "the stalled group is not shown"
    );
    let seen = answer_within(e, |e| {
        let snap = e.snapshot();
        let v = snap.get("default", b"k").expect("snapshot read");
        (snap.offset(), v)
    })
    .unwrap_or_else(|| {
        panic!(
            "snapshot() gave no answer within {READ_WAIT:?} while the store stalls writes: \
             readers wait for the stalled applier"
        )
    });
    assert_eq!(seen, (Some(before.offset), Some(b"v0".to_vec())));
    let got = answer_within(e, |e| e.get("default", b"k").expect("get")).unwrap_or_else(|| {
        panic!("get() gave no answer within {READ_WAIT:?} while the store stalls writes")
    });
    assert_eq!(got.as_deref(), Some(&b"v0"[..]));
    assert!(
        matches!(commit.try_recv(), Err(mpsc::TryRecvError::Empty)),
        "the commit waits for its apply while the store stalls"
    );

    n.faults.set_write_stall(false);
    let info = commit
        .recv_timeout(RELEASE_WAIT)
        .expect("the commit returns once the stall ended")
        .expect("the commit succeeds");
    assert!(info.offset > before.offset);
    assert_eq!(
        e.get("default", b"k").expect("get").as_deref(),
        Some(&b"v1"[..])
    );
}

/// The store stalls writes and then fails (its sync fails and poisons it: fjall after a
/// failed flush, whose stall then never ends). The engine fails (fail-stop); the committer
/// waiting for the stalled group gets an error, and `close` returns.
#[test]
fn a_store_failure_during_a_stall_releases_the_committer_and_close_returns() {
    let n = node();
    let e = &n.engine;
    e.put("default", b"k", b"v0").expect("put v0");
    let _end = EndStalls(n.faults.clone());
    n.faults.set_write_stall(true);
    let commit = put_in_background(e, b"v1");
    wait_for_stall(&n.faults);

    n.faults.fail_syncs();
    assert!(e.checkpoint().is_err(), "the store's sync fails");
    assert_released(&commit);
    assert_close_returns(e);
}

/// The same failure while the applier is held in a stall the store did not report before
/// the commit (one that began while the batch committed): the applier is stuck inside the
/// store, and still the committer gets an error and `close` returns.
#[test]
fn a_store_failure_releases_the_committer_and_close_returns_with_the_applier_stuck() {
    let n = node();
    let e = &n.engine;
    e.put("default", b"k", b"v0").expect("put v0");
    let _end = EndStalls(n.faults.clone());
    n.faults.set_unreported_write_stall(true);
    let commit = put_in_background(e, b"v1");
    wait_for_stall(&n.faults);

    n.faults.fail_syncs();
    assert!(e.checkpoint().is_err(), "the store's sync fails");
    assert_released(&commit);
    assert_close_returns(e);
}

fn assert_released(commit: &mpsc::Receiver<Result<tideline_engine::CommitInfo, WriteError>>) {
    match commit.recv_timeout(RELEASE_WAIT) {
        Ok(Err(WriteError::FailStop { .. })) => {}
        Ok(other) => panic!("the waiting committer got {other:?}, not a fail-stop error"),
        Err(RecvTimeoutError::Timeout) => panic!(
            "the committer still waits {RELEASE_WAIT:?} after the engine failed: a fail-stop \
             must release every committer waiting for an apply"
        ),
        Err(RecvTimeoutError::Disconnected) => panic!("the committer's thread died"),
    }
}

fn assert_close_returns(e: &Arc<Engine>) {
    let (tx, rx) = mpsc::channel();
    let closing = e.clone();
    std::thread::spawn(move || {
        let _ = tx.send(closing.close());
    });
    if let Err(RecvTimeoutError::Timeout) = rx.recv_timeout(RELEASE_WAIT) {
        panic!(
            "Engine::close did not return within {RELEASE_WAIT:?} after the engine failed: it \
             joins an applier stuck in the store"
        );
    }
    assert!(
        e.put("default", b"k", b"v2").is_err(),
        "a failed engine refuses writes"
    );
}
