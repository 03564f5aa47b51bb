//! Append, read, roll, reopen and auto-position on a small log: the everyday path that every
//! other crate relies on. Guards against lost, reordered or duplicated records across segment
//! boundaries and restarts, against a reader that retention overtakes being told the log is
//! corrupt (rather than that its position is gone) while a real gap is still corruption, and
//! against acks into a slot the retention cap invalidated being taken as if it held the log.

use std::sync::Arc;

use tideline_wal::{
    Durability, Error, Gtid, GtidSet, MemStorage, NewTransaction, Offset, Op, RetentionPolicy,
    Storage, Wal, WalOptions,
};

fn txn(wal: &Wal, seq: u64) -> NewTransaction {
    NewTransaction {
        gtid: Gtid::new(wal.server_uuid(), seq).expect("seq >= 1"),
        timestamp_us: seq as i64,
        ops: vec![Op::Put {
            tree: "default".into(),
            key: format!("k{seq}").into_bytes(),
            value: vec![seq as u8; 100],
            before: None,
        }],
    }
}

fn small_segments() -> WalOptions {
    WalOptions {
        segment_bytes_max: 4096,
        ..WalOptions::default()
    }
}

#[test]
fn append_read_roll_reopen() {
    let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let uuid;
    {
        let wal = Wal::open(storage.clone(), small_segments()).unwrap();
        uuid = wal.server_uuid();
        for seq in 1..=500 {
            let off = wal.append(txn(&wal, seq)).unwrap();
            assert_eq!(off.get(), seq);
        }
        assert!(wal.stats().segments.len() > 5, "small segments must roll");
        let seqs: Vec<u64> = wal
            .read_from(Offset::FIRST)
            .unwrap()
            .map(|t| t.unwrap().gtid.seq)
            .collect();
        assert_eq!(seqs, (1..=500).collect::<Vec<_>>());
        assert_eq!(wal.verify().unwrap(), 500);
    }
    let wal = Wal::open(storage, small_segments()).unwrap();
    assert_eq!(wal.server_uuid(), uuid);
    assert_eq!(wal.visible_offset(), 500);
    assert_eq!(wal.gtids().to_string(), format!("{uuid}:1-500"));
    let off = wal.append(txn(&wal, 501)).unwrap();
    assert_eq!(off.get(), 501);
    let mut r = wal.read_from(Offset::new(499).unwrap()).unwrap();
    let got: Vec<u64> = r.by_ref().map(|t| t.unwrap().offset.get()).collect();
    assert_eq!(got, vec![499, 500, 501]);
}

#[test]
fn read_missing_sends_exactly_what_is_lacking() {
    let wal = Wal::open(Arc::new(MemStorage::new()), small_segments()).unwrap();
    for seq in 1..=300 {
        wal.append(txn(&wal, seq)).unwrap();
    }
    let u = wal.server_uuid();
    let have: GtidSet = format!("{u}:1-200:250-260").parse().unwrap();
    let got: Vec<u64> = wal
        .read_missing(&have)
        .unwrap()
        .map(|t| t.unwrap().gtid.seq)
        .collect();
    let want: Vec<u64> = (201..250).chain(261..=300).collect();
    assert_eq!(got, want);
    // Everything already there: nothing to send.
    let all: GtidSet = format!("{u}:1-300").parse().unwrap();
    assert_eq!(wal.read_missing(&all).unwrap().count(), 0);
}

#[test]
fn retention_purges_and_positions_become_unavailable() {
    let opts = WalOptions {
        retention: tideline_wal::RetentionPolicy {
            retain_bytes_min: 0,
            slot_bytes_max: Some(8192),
            slot_age_max: None,
        },
        ..small_segments()
    };
    let wal = Wal::open(Arc::new(MemStorage::new()), opts).unwrap();
    wal.create_slot("replica-b", Offset::FIRST).unwrap();
    for seq in 1..=300 {
        wal.append(txn(&wal, seq)).unwrap();
    }
    let report = wal.run_retention().unwrap();
    assert!(!report.removed_segments.is_empty());
    assert_eq!(report.invalidated_slots, vec!["replica-b".to_string()]);
    let first = wal.first_offset();
    assert!(first.get() > 1);
    match wal.read_from(Offset::FIRST) {
        Err(Error::OffsetUnavailable {
            first_available, ..
        }) => assert_eq!(first_available, first),
        other => panic!("expected OffsetUnavailable, got {other:?}"),
    }
    match wal.read_missing(&GtidSet::new()) {
        Err(Error::GtidsPurged { missing }) => {
            assert_eq!(missing.count(), first.get() - 1)
        }
        other => panic!("expected GtidsPurged, got {:?}", other.map(|_| ())),
    }
}

/// `async` as README "Durability, stated plainly" states it: an append is acknowledged once its
/// record is written, before any fsync; readers see it only after the fsync; and the fsync
/// comes from the interval timer by itself, with no later write or close to trigger it.
/// Checked with `MemStorage`'s sync counter, not with a clock.
#[test]
fn async_durability_acks_before_the_fsync_and_the_interval_syncs() {
    // An interval that never elapses during the test: no fsync may come at all.
    let storage = MemStorage::new();
    let opts = WalOptions {
        durability: Durability::Async {
            interval: std::time::Duration::from_secs(24 * 3600),
        },
        ..WalOptions::default()
    };
    let wal = Wal::open(Arc::new(storage.clone()), opts).unwrap();
    let syncs_at_open = storage.sync_count();
    for seq in 1..=50 {
        assert_eq!(wal.append(txn(&wal, seq)).unwrap().get(), seq);
    }
    assert_eq!(wal.written_offset(), 50);
    assert_eq!(
        storage.sync_count(),
        syncs_at_open,
        "50 acknowledged appends must not have waited for an fsync"
    );
    assert_eq!(wal.durable_offset(), 0, "nothing was synced");
    assert_eq!(wal.visible_offset(), 0, "readers see only durable records");
    assert_eq!(
        wal.read_from(Offset::FIRST).unwrap().count(),
        0,
        "a reader must not see unsynced records"
    );
    // Closing syncs what was acknowledged.
    wal.close().unwrap();
    assert!(storage.sync_count() > syncs_at_open);

    // A short interval: the timer's fsync makes everything durable and visible, with no
    // further write or close to trigger it (the bounded wait fails only when it never comes).
    let storage = MemStorage::new();
    let opts = WalOptions {
        durability: Durability::Async {
            interval: std::time::Duration::from_millis(5),
        },
        ..WalOptions::default()
    };
    let wal = Wal::open(Arc::new(storage.clone()), opts).unwrap();
    let syncs_at_open = storage.sync_count();
    for seq in 1..=50 {
        wal.append(txn(&wal, seq)).unwrap();
    }
    let visible = wal
        .wait_visible_blocking(Offset::new(50).unwrap(), std::time::Duration::from_secs(30))
        .unwrap();
    assert!(
        visible,
        "the interval sync must make the records durable and visible"
    );
    assert_eq!(wal.durable_offset(), 50);
    assert_eq!(wal.visible_offset(), 50);
    let syncs = storage.sync_count() - syncs_at_open;
    assert!(syncs >= 1, "visible without an fsync");
}

/// Transactions encoded into one buffer (`encode_into`) and submitted one by one without an
/// acknowledgement (`submit_encoded_with`) read back as themselves, in order, after a
/// reopen; a refused record (GTID number 0, too large) leaves the buffer as it was. Guards
/// the batch encoding of upstream apply: a payload that read another's bytes, or a refused
/// encoding that left a torn record behind, would show here.
#[test]
fn records_encoded_into_one_buffer_read_back_each_as_itself() {
    let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let opts = || WalOptions {
        record_bytes_max: 4096,
        ..small_segments()
    };
    let wal = Wal::open(storage.clone(), opts()).unwrap();
    let mut encoded = tideline_wal::Encoded::with_capacity(3);
    let mut want = Vec::new();
    for seq in 1..=40 {
        let mut t = txn(&wal, seq);
        // Sizes differ from record to record, so that no payload boundary is regular.
        t.ops.push(Op::Delete {
            tree: format!("t{}", seq % 7),
            key: vec![seq as u8; seq as usize],
            before: None,
        });
        assert_eq!(wal.encode_into(&t, &mut encoded).unwrap(), want.len());
        want.push(t);
        if seq == 20 {
            let zero = NewTransaction {
                gtid: Gtid {
                    uuid: wal.server_uuid(),
                    seq: 0,
                },
                ..txn(&wal, 1)
            };
            assert!(wal.encode_into(&zero, &mut encoded).is_err());
            let mut huge = txn(&wal, 99);
            huge.ops.push(Op::Put {
                tree: "default".into(),
                key: b"big".to_vec(),
                value: vec![7; 8192],
                before: None,
            });
            assert!(matches!(
                wal.encode_into(&huge, &mut encoded),
                Err(Error::RecordTooLarge { .. })
            ));
        }
    }
    assert_eq!(encoded.len(), want.len());
    let mut assigned = Vec::new();
    for (i, t) in want.iter().enumerate() {
        assert_eq!(encoded.gtid(i), t.gtid);
        let (off, ()) = wal
            .submit_encoded_with(&encoded, i, |o| assigned.push(o.get()))
            .unwrap();
        assert_eq!(off.get(), i as u64 + 1);
    }
    assert_eq!(assigned, (1..=40).collect::<Vec<_>>());
    // No acknowledgement to wait on: the visible head tells (Sync durability here).
    assert!(
        wal.wait_visible_blocking(Offset::new(40).unwrap(), std::time::Duration::from_secs(10))
            .unwrap()
    );
    drop(wal);
    let wal = Wal::open(storage, opts()).unwrap();
    let got: Vec<NewTransaction> = wal
        .read_from(Offset::FIRST)
        .unwrap()
        .map(|t| {
            let t = t.unwrap();
            NewTransaction {
                gtid: t.gtid,
                timestamp_us: t.timestamp_us,
                ops: t.ops,
            }
        })
        .collect();
    assert_eq!(got, want);
}

/// Reads `r` until it fails; panics if it catches up with the head instead.
fn read_until_error(r: &mut tideline_wal::Reader) -> Error {
    loop {
        match r.next_txn() {
            Ok(Some(_)) => {}
            Ok(None) => panic!("the reader caught up without an error: {r:?}"),
            Err(e) => return e,
        }
    }
}

fn retain_nothing(slot_bytes_max: Option<u64>) -> WalOptions {
    WalOptions {
        retention: RetentionPolicy {
            retain_bytes_min: 0,
            slot_bytes_max,
            slot_age_max: None,
        },
        ..small_segments()
    }
}

/// A reader in the middle of a segment that retention then removes, together with the
/// segments after it, reads to the end of its (still open) segment and then learns that its
/// next position is gone, with the range the log holds: the same answer a reader gets that
/// asks for that position afresh. Saying "corrupt" there would tell the operator to restore a
/// healthy node from a replica.
#[test]
fn a_reader_overtaken_by_retention_by_several_segments_is_told_its_position_is_gone() {
    let wal = Wal::open(Arc::new(MemStorage::new()), retain_nothing(None)).unwrap();
    for seq in 1..=300 {
        wal.append(txn(&wal, seq)).unwrap();
    }
    let mut r = wal.read_from(wal.first_offset()).unwrap();
    assert_eq!(r.next_txn().unwrap().unwrap().offset, Offset::FIRST);
    let report = wal.run_retention().unwrap();
    assert!(
        report.removed_segments.len() >= 2,
        "retention must remove the reader's segment and the next: {report:?}"
    );
    match read_until_error(&mut r) {
        Error::OffsetUnavailable {
            requested,
            first_available,
            last,
        } => {
            assert_eq!(first_available, wal.first_offset());
            assert!(requested < first_available, "{requested} {first_available}");
            assert_eq!(last, 300);
        }
        other => panic!("expected OffsetUnavailable, got {other:?}: {other}"),
    }
}

/// A segment that ends (at a record boundary) before the next segment begins, inside the log
/// retention kept, is a hole in the log: corruption, not an unavailable position.
#[test]
fn a_segment_that_ends_before_the_next_one_begins_is_corruption() {
    let storage = MemStorage::new();
    let wal = Wal::open(Arc::new(storage.clone()), small_segments()).unwrap();
    // The length of each segment's file after each of its records.
    let mut lengths: Vec<(String, Vec<u64>)> = Vec::new();
    for seq in 1..=300 {
        wal.append(txn(&wal, seq)).unwrap();
        let active = wal.stats().segments.last().unwrap().name.clone();
        let len = storage.file_len(&active).unwrap();
        match lengths.last_mut() {
            Some((name, lens)) if *name == active => lens.push(len),
            _ => lengths.push((active, vec![len])),
        }
    }
    // Cut the last record off the third segment.
    let (name, lens) = &lengths[2];
    assert!(lens.len() >= 2, "{name} holds one record");
    storage
        .open(name)
        .unwrap()
        .set_len(lens[lens.len() - 2])
        .unwrap();
    let mut r = wal.read_from(Offset::FIRST).unwrap();
    match read_until_error(&mut r) {
        Error::Corrupt { reason, .. } => {
            assert!(reason.contains("segment ends before offset"), "{reason}")
        }
        other => panic!("expected Corrupt, got {other:?}: {other}"),
    }
}

/// Once the retention cap invalidated a slot, an ack into it (a live subscription's consumer
/// moving it on) fails: the slot holds no log, and a consumer whose acks are taken believes
/// its position is kept.
#[test]
fn an_ack_into_a_slot_the_retention_cap_invalidated_is_refused() {
    let wal = Wal::open(Arc::new(MemStorage::new()), retain_nothing(Some(8192))).unwrap();
    wal.create_slot("replica-b", Offset::FIRST).unwrap();
    for seq in 1..=300 {
        wal.append(txn(&wal, seq)).unwrap();
    }
    let report = wal.run_retention().unwrap();
    assert_eq!(report.invalidated_slots, vec!["replica-b".to_string()]);
    match wal.advance_slot("replica-b", Offset::new(300).unwrap()) {
        Err(Error::SlotInvalidated { name, .. }) => assert_eq!(name, "replica-b"),
        other => panic!("an ack into an invalidated slot was answered {other:?}"),
    }
    let slot = wal.slot("replica-b").unwrap();
    assert_eq!(slot.restart_offset, 1, "the refused ack moved the slot");
}

/// The refusal of an invalidated slot says what its consumer must do by where the consumer
/// stands: a position the log still holds needs no re-bootstrap (drop and re-create the slot,
/// or go on without it), one the log no longer holds does.
#[test]
fn an_invalidated_slot_advises_re_bootstrap_only_when_the_log_lacks_the_position() {
    let wal = Wal::open(Arc::new(MemStorage::new()), retain_nothing(Some(8192))).unwrap();
    wal.create_slot("replica-b", Offset::FIRST).unwrap();
    for seq in 1..=300 {
        wal.append(txn(&wal, seq)).unwrap();
    }
    wal.run_retention().unwrap();
    let first = wal.first_offset();
    assert!(first.get() > 2);
    let held = [
        wal.advance_slot("replica-b", first).unwrap_err(),
        wal.create_slot("replica-b", first).unwrap_err(),
    ];
    for e in held {
        let text = e.to_string();
        assert!(matches!(e, Error::SlotInvalidated { .. }), "{e:?}");
        assert!(
            !text.contains("re-bootstrap the consumer,") && text.contains("still holds"),
            "the log still holds the consumer's position, yet: {text}"
        );
        assert!(text.contains("drop and re-create"), "{text}");
    }
    let gone = wal
        .advance_slot("replica-b", Offset::new(2).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        gone.contains("re-bootstrap") && gone.contains("no longer holds"),
        "the log no longer holds the consumer's position, yet: {gone}"
    );
}
