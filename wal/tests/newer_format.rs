//! Segments written in a format this build does not read.
//!
//! Scenario: a log whose segment header (checksum valid) carries a segment format above
//! [`segment::FORMAT_VERSION`] — what a newer Tideline writes — alone or as the last segment
//! after one this build reads; and one whose rkyv format differs. Each is opened read-write,
//! read-only, and read-only for inspection (what `tideline log dump|info|verify` do).
//!
//! Guards against: reporting such a log as `Corrupt` ("log corrupt ... restore this node from
//! a replica or backup"), which sends an operator to replace a healthy log instead of running
//! a newer binary; and against recovery removing or cutting anything of it (a last segment
//! whose header it cannot read is not one torn at creation when its checksum is valid).

mod common;

use std::sync::Arc;

use tideline_wal::record;
use tideline_wal::segment::{self, FORMAT_VERSION, FORMAT_VERSION_MIN, RKYV_FORMAT};
use tideline_wal::{Error, GtidSet, MemStorage, Offset, Storage, Wal, WalOptions};

use common::{UUID, opts, txn_for};

/// A header of the current format with its `format` and `rkyv` fields replaced, the checksum
/// recomputed (CRC32C over the header with the crc field taken as zero).
fn header_as(first: u64, gtids_before: &GtidSet, format: u16, rkyv: u16) -> Vec<u8> {
    let first = Offset::new(first).expect("offset >= 1");
    let mut h = segment::encode_header(first, UUID, 0, gtids_before);
    h[8..10].copy_from_slice(&format.to_le_bytes());
    h[10..12].copy_from_slice(&rkyv.to_le_bytes());
    h[52..56].copy_from_slice(&[0; 4]);
    let crc = crc32c::crc32c(&h);
    h[52..56].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Writes segment `first` with `header` and records `first..=last`; returns its name.
fn write_segment(storage: &MemStorage, header: Vec<u8>, first: u64, last: u64) -> String {
    let mut bytes = header;
    for seq in first..=last {
        let offset = Offset::new(seq).expect("offset >= 1");
        record::encode_frame(offset, &txn_for(seq), &mut bytes).expect("encode");
    }
    let name = segment::file_name(Offset::new(first).expect("offset >= 1"));
    let f = storage.create(&name).expect("create");
    f.write_all_at(&bytes, 0).expect("write");
    f.sync_data().expect("sync");
    storage.sync_dir().expect("sync dir");
    name
}

/// Every file of `storage` with its bytes, to show that a refused open changed nothing.
fn image(storage: &MemStorage) -> Vec<(String, Vec<u8>)> {
    let mut names = storage.list().expect("list");
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let f = storage.open_read(&n).expect("open");
            let mut buf = vec![0u8; storage.file_len(&n).expect("len") as usize];
            let got = f.read_full_at(&mut buf, 0).expect("read");
            buf.truncate(got);
            (n, buf)
        })
        .collect()
}

/// The three ways the log is opened: by a node (read-write), by `log verify` (read-only), by
/// `log dump|info` (read-only, inspecting damage).
fn every_open() -> Vec<(&'static str, WalOptions)> {
    let base = opts(1 << 20);
    vec![
        ("read-write", base.clone()),
        (
            "read-only",
            WalOptions {
                read_only: true,
                verify_on_open: true,
                ..base.clone()
            },
        ),
        (
            "inspecting",
            WalOptions {
                read_only: true,
                inspect_damaged: true,
                ..base
            },
        ),
    ]
}

/// Opens `storage` every way; each must fail with an error that is not `Corrupt`, whose text
/// names `name`, says neither "corrupt" nor "restore" and contains every one of `says`;
/// nothing may change. Returns the errors.
fn assert_refused_intact(storage: &MemStorage, name: &str, says: &[&str]) -> Vec<Error> {
    let before = image(storage);
    let mut errors = Vec::new();
    for (how, o) in every_open() {
        let e = match Wal::open(Arc::new(storage.clone()), o) {
            Ok(wal) => panic!(
                "{how}: opened a log this build cannot read ({} segments)",
                wal.stats().segments.len()
            ),
            Err(e) => e,
        };
        let text = e.to_string();
        assert!(
            !matches!(e, Error::Corrupt { .. }),
            "{how}: reported as Corrupt: {text}"
        );
        let lower = text.to_lowercase();
        for word in ["corrupt", "restore"] {
            assert!(!lower.contains(word), "{how}: says {word:?}: {text}");
        }
        assert!(
            text.contains(&storage.describe(name)),
            "{how}: does not name {name}: {text}"
        );
        for s in says {
            assert!(text.contains(s), "{how}: does not say {s:?}: {text}");
        }
        assert_eq!(
            image(storage),
            before,
            "{how}: a refused open changed the log"
        );
        errors.push(e);
    }
    errors
}

fn newer_words() -> Vec<String> {
    vec![
        "newer Tideline".into(),
        format!("format {}", FORMAT_VERSION + 1),
        format!("{FORMAT_VERSION_MIN}-{FORMAT_VERSION}"),
        "not damaged".into(),
    ]
}

#[test]
fn a_log_written_in_a_newer_format_is_refused_as_newer_not_corrupt() {
    let storage = MemStorage::new();
    let newer = FORMAT_VERSION + 1;
    let name = write_segment(
        &storage,
        header_as(1, &GtidSet::new(), newer, RKYV_FORMAT),
        1,
        5,
    );
    let words = newer_words();
    let says: Vec<&str> = words.iter().map(String::as_str).collect();
    for e in assert_refused_intact(&storage, &name, &says) {
        assert!(
            matches!(
                &e,
                Error::UnsupportedFormat { file, format, rkyv }
                    if *file == storage.describe(&name) && *format == newer && *rkyv == RKYV_FORMAT
            ),
            "{e:?}"
        );
    }
}

/// A newer build that ran on the log rolled to a new segment: the older segments are
/// readable, the last is not. It is not a segment torn at creation (its header is whole and
/// its checksum valid), so it must be neither removed nor skipped.
#[test]
fn a_last_segment_in_a_newer_format_is_refused_and_kept() {
    let storage = MemStorage::new();
    write_segment(
        &storage,
        header_as(1, &GtidSet::new(), FORMAT_VERSION, RKYV_FORMAT),
        1,
        5,
    );
    let mut before = GtidSet::new();
    for seq in 1..=5 {
        before.insert(txn_for(seq).gtid);
    }
    let newer = FORMAT_VERSION + 1;
    let name = write_segment(&storage, header_as(6, &before, newer, RKYV_FORMAT), 6, 6);
    let words = newer_words();
    let says: Vec<&str> = words.iter().map(String::as_str).collect();
    assert_refused_intact(&storage, &name, &says);
}

/// Another rkyv format in a format this build knows: written by a build with other rkyv
/// features. Not damage either, and not "newer".
#[test]
fn a_log_with_another_rkyv_format_is_refused_as_another_build() {
    let storage = MemStorage::new();
    let other = RKYV_FORMAT ^ 0b0001;
    let name = write_segment(
        &storage,
        header_as(1, &GtidSet::new(), FORMAT_VERSION, other),
        1,
        5,
    );
    for e in assert_refused_intact(&storage, &name, &["rkyv", "not damaged"]) {
        assert!(
            !e.to_string().contains("newer"),
            "says newer for another rkyv format: {e}"
        );
        assert!(
            matches!(e, Error::UnsupportedFormat { rkyv, .. } if rkyv == other),
            "{e:?}"
        );
    }
}

/// A format below the oldest ever written is no Tideline's: that one stays `Corrupt`.
#[test]
fn a_format_below_the_oldest_is_still_corrupt() {
    let storage = MemStorage::new();
    let name = write_segment(
        &storage,
        header_as(1, &GtidSet::new(), FORMAT_VERSION_MIN - 1, RKYV_FORMAT),
        1,
        5,
    );
    for (how, o) in every_open() {
        match Wal::open(Arc::new(storage.clone()), o) {
            Err(Error::Corrupt { file, byte: 0, .. }) => {
                assert_eq!(file, storage.describe(&name), "{how}")
            }
            Err(e) => panic!("{how}: expected Corrupt at byte 0, got {e:?}"),
            Ok(_) => panic!("{how}: opened a segment of format 0"),
        }
    }
}
