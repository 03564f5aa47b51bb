//! One writer per log directory: a second writer — in this process or another — is refused
//! with `Error::InUse` naming the holder, before it reads or repairs anything; read-only opens
//! work beside the writer; the lock goes with the writer (drop, or the process dying).
//! Guards against two writers appending to one log and reusing offsets and GTIDs.

use std::sync::Arc;

use tideline_wal::{Error, FileStorage, Gtid, NewTransaction, Op, Wal, WalOptions};

fn open(dir: &std::path::Path, read_only: bool) -> Result<Wal, Error> {
    let storage = Arc::new(FileStorage::new(dir).expect("log directory"));
    Wal::open(
        storage,
        WalOptions {
            read_only,
            ..WalOptions::default()
        },
    )
}

fn put(wal: &Wal, seq: u64) {
    let gtid = Gtid::new(wal.server_uuid(), seq).expect("seq >= 1");
    let op = Op::Put {
        tree: "t".into(),
        key: b"k".to_vec(),
        value: b"v".to_vec(),
        before: None,
    };
    wal.append(NewTransaction {
        gtid,
        timestamp_us: 0,
        ops: vec![op],
    })
    .expect("append");
}

#[test]
fn a_second_writer_is_refused_until_the_first_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let first = open(dir.path(), false).unwrap();
    put(&first, 1);

    match open(dir.path(), false) {
        Err(Error::InUse { holder, .. }) => {
            assert_eq!(holder, format!("PID {}", std::process::id()));
        }
        other => panic!("a second writer must be refused, got {other:?}"),
    }

    // A reader opens beside the writer and sees its record.
    let reader = open(dir.path(), true).unwrap();
    assert_eq!(reader.stats().visible_offset, 1);
    drop(reader);

    // Once the writer is gone the next one takes over and continues the numbering.
    drop(first);
    let second = open(dir.path(), false).unwrap();
    assert_eq!(second.visible_offset(), 1);
    put(&second, 2);
    assert_eq!(second.visible_offset(), 2);
}
