//! A read-only open for inspection (`WalOptions::inspect_damaged`, what `tideline log dump|info`
//! use) of a log damaged inside its last segment: a record whose checksum fails with valid
//! records after it, which is not a torn tail.
//!
//! Scenario: 12 records, a byte of record 10 flipped (and variants: the damaged record first in
//! the last of several segments; a torn tail for contrast). The inspecting open must serve the
//! records before the damage as the log, name the damage (file, byte), fail `verify` with it,
//! and write nothing, on a directory where writing is refused. Every other open keeps refusing
//! the log as `Corrupt` (fail-stop: no silent cut of damage).
//!
//! Guards against the read-only open refusing the whole log, so that the tools the corruption
//! error points to could read nothing of it, and against an inspecting open that hides the
//! damage (a log that looks whole and shorter) or repairs it.

mod common;

use std::sync::Arc;

use tideline_wal::record::{self, FRAME_HEADER_BYTES};
use tideline_wal::{Error, MemStorage, Offset, Storage, Wal, WalOptions, segment};

use common::{check_log, opts, read_file, segment_names, txn_for};

/// Writes records `1..=n` and closes the log.
fn write_log(storage: &MemStorage, n: u64, segment_bytes_max: u64) {
    let wal = Wal::open(Arc::new(storage.clone()), opts(segment_bytes_max)).expect("open");
    for seq in 1..=n {
        wal.append(txn_for(seq)).expect("append");
    }
    wal.close().expect("close");
}

/// Where the frame of `offset` starts in segment `name`.
fn frame_start(storage: &MemStorage, name: &str, offset: u64) -> u64 {
    let bytes = read_file(storage, name);
    let mut pos = segment::header_len(&bytes).expect("header") as usize;
    loop {
        let raw = record::check_frame(&bytes[pos..], record::DEFAULT_RECORD_BYTES_MAX)
            .unwrap_or_else(|e| panic!("frame at {pos}: {e}"));
        if raw.offset.get() == offset {
            return pos as u64;
        }
        pos += raw.frame_bytes;
    }
}

/// Flips a byte inside the payload of record `offset` in segment `name`; returns the byte
/// where its frame starts (what the damage is reported at).
fn damage(storage: &MemStorage, name: &str, offset: u64) -> u64 {
    let at = frame_start(storage, name, offset);
    let byte = at + FRAME_HEADER_BYTES as u64 + 2;
    for bit in 0..8 {
        storage.flip_bit(name, byte * 8 + bit).expect("flip");
    }
    at
}

fn inspecting(segment_bytes_max: u64) -> WalOptions {
    WalOptions {
        read_only: true,
        inspect_damaged: true,
        ..opts(segment_bytes_max)
    }
}

/// Every open but the inspecting one refuses the log with `Corrupt` at `at` of `name`.
fn assert_refused_elsewhere(storage: &MemStorage, name: &str, at: u64, max: u64) {
    let cases = [
        ("read-write", opts(max)),
        (
            "read-only",
            WalOptions {
                read_only: true,
                ..opts(max)
            },
        ),
        (
            "read-write with inspect_damaged",
            WalOptions {
                inspect_damaged: true,
                ..opts(max)
            },
        ),
    ];
    for (case, o) in cases {
        match Wal::open(Arc::new(storage.clone()), o) {
            Err(Error::Corrupt { file, byte, .. }) => {
                assert_eq!((file, byte), (storage.describe(name), at), "{case}");
            }
            Ok(wal) => panic!(
                "{case}: opened a damaged log (visible offset {}, {} bytes cut)",
                wal.visible_offset(),
                wal.recovery_report().truncated_bytes
            ),
            Err(e) => panic!("{case}: expected Corrupt, got {e}"),
        }
    }
}

#[test]
fn an_inspecting_open_serves_the_records_before_damage_in_the_last_segment() {
    let storage = MemStorage::new();
    write_log(&storage, 12, 1 << 20);
    let names = segment_names(&storage);
    assert_eq!(names.len(), 1);
    let name = &names[0];
    let at = damage(&storage, name, 10);
    let image = read_file(&storage, name);

    assert_refused_elsewhere(&storage, name, at, 1 << 20);

    // Where nothing may be written: the inspecting open must not try.
    storage.mount_read_only();
    let writes = storage.write_count();
    let wal = Wal::open(Arc::new(storage.clone()), inspecting(1 << 20))
        .unwrap_or_else(|e| panic!("the inspecting open refused the damaged log: {e}"));
    assert_eq!(check_log(&wal, 9), Ok(9), "the records before the damage");
    assert_eq!(wal.visible_offset(), 9);
    assert_eq!(
        wal.recovery_report().truncated_bytes,
        0,
        "damage is not a torn tail"
    );
    match wal.damage() {
        Some(Error::Corrupt { file, byte, reason }) => {
            assert_eq!((file, byte), (storage.describe(name), at), "{reason}");
            assert!(reason.contains("a valid record follows"), "{reason}");
        }
        other => panic!("damage() = {other:?}"),
    }
    // A reader past the damage has nothing to read there.
    assert!(matches!(
        wal.read_from(Offset::new(11).unwrap()),
        Err(Error::OffsetUnavailable { last: 9, .. })
    ));
    match wal.verify() {
        Err(Error::Corrupt { file, byte, .. }) => {
            assert_eq!((file, byte), (storage.describe(name), at));
        }
        other => panic!("verify of a damaged log: {other:?}"),
    }
    assert!(matches!(wal.append(txn_for(10)), Err(Error::ReadOnly)));
    wal.close().expect("close");
    drop(wal);
    assert_eq!(storage.write_count(), writes, "the inspecting open wrote");
    assert_eq!(
        read_file(&storage, name),
        image,
        "the inspecting open changed the segment"
    );
}

#[test]
fn damage_at_the_first_record_of_the_last_segment_leaves_the_segments_before() {
    let storage = MemStorage::new();
    write_log(&storage, 60, 1024);
    let names = segment_names(&storage);
    assert!(names.len() >= 3, "{names:?}");
    let last = names.last().unwrap();
    let first = segment::parse_file_name(last).unwrap().get();
    let at = damage(&storage, last, first);
    assert_refused_elsewhere(&storage, last, at, 1024);

    let wal = Wal::open(Arc::new(storage.clone()), inspecting(1024)).expect("inspecting open");
    assert_eq!(check_log(&wal, first - 1), Ok(first - 1));
    assert!(matches!(wal.damage(), Some(Error::Corrupt { byte, .. }) if byte == at));
    assert_eq!(wal.stats().segments.len(), names.len());
}

#[test]
fn a_torn_tail_is_not_damage_to_an_inspecting_open() {
    // The last record cut short, as a crash mid-write leaves it: what a read-write open cuts.
    let storage = MemStorage::new();
    write_log(&storage, 12, 1 << 20);
    let name = &segment_names(&storage)[0];
    let at = frame_start(&storage, name, 12);
    let len = storage.file_len(name).unwrap();
    let bytes = read_file(&storage, name);
    let torn = MemStorage::new();
    let f = torn.create(name).unwrap();
    f.write_all_at(&bytes[..(at as usize + (len - at) as usize / 2)], 0)
        .unwrap();
    f.sync_data().unwrap();
    torn.sync_dir().unwrap();

    let wal = Wal::open(Arc::new(torn), inspecting(1 << 20)).expect("inspecting open");
    assert_eq!(check_log(&wal, 11), Ok(11));
    assert!(wal.damage().is_none(), "{:?}", wal.damage());
    assert_eq!(wal.verify().expect("verify"), 11);
}
