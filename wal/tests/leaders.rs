//! Under `Async`, a committer waiting on [`Appended::wait`] for a record queued with
//! `submit_encoded_acked` writes the pending group itself (the combining leader) instead of
//! waking the writer thread. These tests hold what that must not change: every acknowledged
//! record becomes durable and visible (after the next sync), in offset order, whether one
//! thread or many commit, whether the writer thread is asleep or busy, and whether the
//! acknowledgement is waited for, awaited or dropped.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tideline_wal::{Durability, Encoded, MemStorage, Offset, Wal, WalOptions};

use common::{opts, txn_for};

const INTERVAL: Duration = Duration::from_millis(5);

/// How long a test waits for an acknowledged record to be shown: the interval plus one sync,
/// with room for a loaded machine. A record nobody syncs is never shown, whatever the bound.
const SHOWN_MAX: Duration = Duration::from_secs(5);

fn async_wal(segment_bytes_max: u64) -> Arc<Wal> {
    let storage = Arc::new(MemStorage::new());
    let wal = Wal::open(
        storage,
        WalOptions {
            durability: Durability::Async { interval: INTERVAL },
            ..opts(segment_bytes_max)
        },
    )
    .expect("open");
    Arc::new(wal)
}

/// Queues GTID number `seq` as the engine does (encoded, then `submit_encoded_acked`).
fn queue(wal: &Wal, seq: u64) -> tideline_wal::Appended {
    let mut encoded = Encoded::with_capacity(1);
    let i = wal
        .encode_into(&txn_for(seq), &mut encoded)
        .expect("encode");
    let (a, ()) = wal
        .submit_encoded_acked(&encoded, i, |_| ())
        .expect("submit");
    a
}

/// Waits (bounded) until the log shows `last`; fails with the heads if it does not.
fn shown_within(wal: &Wal, last: u64, within: Duration) {
    let started = Instant::now();
    let shown = wal
        .wait_visible_blocking(Offset::new(last).expect("offset"), within)
        .expect("wait");
    assert!(
        shown,
        "offset {last} was not shown {within:?} after the last acknowledgement: written {}, \
         durable {}, visible {} (waited {:?})",
        wal.written_offset(),
        wal.durable_offset(),
        wal.visible_offset(),
        started.elapsed()
    );
}

#[test]
fn one_committer_alone_is_synced_and_shown() {
    let wal = async_wal(1 << 20);
    for seq in 1..=2_000 {
        let offset = queue(&wal, seq).wait().expect("ack");
        assert_eq!(offset.get(), seq);
        if seq % 500 == 0 {
            // Idle for longer than the interval: the writer thread goes back to sleep.
            std::thread::sleep(INTERVAL * 3);
            shown_within(&wal, seq, SHOWN_MAX);
        }
    }
    shown_within(&wal, 2_000, SHOWN_MAX);
    common::check_log(&wal, 2_000).expect("the log");
}

#[test]
fn many_committers_across_segment_rolls_keep_order_and_are_shown() {
    // Small segments: the writer thread rolls while committers lead.
    let wal = async_wal(16 << 10);
    let next = Arc::new(std::sync::Mutex::new(1u64));
    let threads: Vec<_> = (0..6)
        .map(|_| {
            let (wal, next) = (wal.clone(), next.clone());
            std::thread::spawn(move || {
                for _ in 0..1_000 {
                    let (seq, a) = {
                        let mut n = next.lock().unwrap_or_else(|p| p.into_inner());
                        let seq = *n;
                        *n += 1;
                        (seq, queue(&wal, seq))
                    };
                    assert_eq!(a.wait().expect("ack").get(), seq);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a committer panicked");
    }
    shown_within(&wal, 6_000, SHOWN_MAX);
    assert!(wal.stats().segments.len() > 2, "the test meant to roll");
    common::check_log(&wal, 6_000).expect("the log");
}

#[test]
fn an_acknowledgement_awaited_or_dropped_hands_the_record_to_the_writer() {
    let wal = async_wal(1 << 20);
    // Dropped without waiting: still written, synced and shown.
    drop(queue(&wal, 1));
    shown_within(&wal, 1, SHOWN_MAX);
    // Awaited in a task: answered by the writer thread.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let offset = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(5), queue(&wal, 2)).await })
        .expect("the awaited acknowledgement came")
        .expect("ack");
    assert_eq!(offset.get(), 2);
    shown_within(&wal, 2, SHOWN_MAX);
}

#[test]
fn commits_are_acknowledged_while_the_interval_sync_is_held_and_shown_only_after_it() {
    let storage = MemStorage::new();
    let wal = Arc::new(
        Wal::open(
            Arc::new(storage.clone()),
            WalOptions {
                durability: Durability::Async { interval: INTERVAL },
                ..opts(1 << 20)
            },
        )
        .expect("open"),
    );
    storage.hold_syncs();
    queue(&wal, 1).wait().expect("ack");
    assert!(
        storage.wait_syncs_waiting(1, Duration::from_secs(10)),
        "the interval sync of record 1 never started"
    );
    // The writer thread is stuck in that sync: 500 commits on another thread must still be
    // acknowledged (each written by its own committer), and none shown.
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let committer = {
        let wal = wal.clone();
        std::thread::spawn(move || {
            for seq in 2..=501 {
                assert_eq!(queue(&wal, seq).wait().expect("ack").get(), seq);
            }
            let _ = done_tx.send(());
        })
    };
    let acked = done_rx.recv_timeout(Duration::from_secs(10)).is_ok();
    let (written, visible) = (wal.written_offset(), wal.visible_offset());
    storage.release_syncs();
    assert!(
        acked,
        "commits were not acknowledged while an fsync was held (written {written})"
    );
    committer.join().expect("the committer panicked");
    assert_eq!(written, 501);
    assert_eq!(visible, 0, "a record was shown before any sync completed");
    // Once the gate opens: the held sync completes, the next covers the rest.
    shown_within(&wal, 501, Duration::from_secs(10));
    let image = storage.crash(tideline_wal::CrashMode::DropUnsynced);
    let reopened = Wal::open(Arc::new(image), opts(1 << 20)).expect("the power-cut image opens");
    common::check_log(&reopened, 501).expect("every shown record survives a power cut");
}
