//! Append, read, roll, reopen and auto-position on a small log: the everyday path that every
//! other crate relies on. Guards against lost, reordered or duplicated records across segment
//! boundaries and restarts.

use std::sync::Arc;

use tideline_wal::{
    Durability, Error, Gtid, GtidSet, MemStorage, NewTransaction, Offset, Op, Storage, Wal,
    WalOptions,
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
