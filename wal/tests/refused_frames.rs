//! Frames whose checksum is valid but which the log cannot accept, at the end of the last
//! segment, and records the reader would reject, at append time.
//!
//! Scenario: a log whose last frame is complete and CRC-valid but holds the wrong offset, an
//! undecodable payload, GTID number 0, or more payload than `record_bytes_max` allows. Each is
//! opened read-write and read-only.
//!
//! Guards against: recovery taking such a frame for a torn write and cutting it (a torn write
//! cannot produce a whole frame with a matching checksum: this is corruption, a bug in the
//! writer, or a log written with other settings, and the operator must decide), and an append
//! accepting a record that every reader would then refuse, which would stop recovery or a tail.

mod common;

use std::sync::Arc;

use tideline_wal::record::{self, FRAME_HEADER_BYTES};
use tideline_wal::segment;
use tideline_wal::{
    Error, Gtid, GtidSet, MemStorage, NewTransaction, Offset, Op, Storage, Wal, WalOptions,
};

use common::{UUID, opts, txn_for};

fn frame(offset: u64, txn: &NewTransaction) -> Vec<u8> {
    let mut out = Vec::new();
    record::encode_frame(Offset::new(offset).expect("offset >= 1"), txn, &mut out).expect("encode");
    out
}

/// A frame for `offset` around `payload`, with a correct checksum (what `record.rs` computes:
/// CRC32C over the length field, then everything from the offset field to the frame end).
fn frame_with_payload(offset: u64, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("small payload");
    let mut out = Vec::new();
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(payload);
    out.resize(record::frame_bytes(len), 0);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&out[0..4]), &out[8..]);
    out[4..8].copy_from_slice(&crc.to_le_bytes());
    out
}

/// A one-segment log holding records 1..=5 and then `last` as its final frame. Returns the
/// storage, the segment name and the byte where `last` starts.
fn log_ending_with(last: &[u8]) -> (MemStorage, String, u64) {
    let storage = MemStorage::new();
    let mut bytes = segment::encode_header(Offset::FIRST, UUID, 0, &GtidSet::new());
    for seq in 1..=5 {
        bytes.extend_from_slice(&frame(seq, &txn_for(seq)));
    }
    let at = bytes.len() as u64;
    bytes.extend_from_slice(last);
    let name = segment::file_name(Offset::FIRST);
    let f = storage.create(&name).expect("create");
    f.write_all_at(&bytes, 0).expect("write");
    f.sync_data().expect("sync");
    storage.sync_dir().expect("sync dir");
    (storage, name, at)
}

/// Opens the log read-write and read-only; both must fail with `Corrupt` naming `name` at
/// `at`, and nothing may be cut.
fn assert_refused(case: &str, last: &[u8], opts: &WalOptions) {
    let (storage, name, at) = log_ending_with(last);
    let len = storage.file_len(&name).expect("len");
    for read_only in [false, true] {
        let o = WalOptions {
            read_only,
            ..opts.clone()
        };
        match Wal::open(Arc::new(storage.clone()), o) {
            Err(Error::Corrupt { file, byte, reason }) => {
                assert_eq!(file, storage.describe(&name), "{case}: {reason}");
                assert_eq!(byte, at, "{case}: {reason}");
            }
            Ok(wal) => panic!(
                "{case} (read_only {read_only}): opened, cutting {} bytes as a torn tail",
                wal.recovery_report().truncated_bytes
            ),
            Err(e) => panic!("{case} (read_only {read_only}): expected Corrupt, got {e}"),
        }
        assert_eq!(
            storage.file_len(&name).expect("len"),
            len,
            "{case}: a refused open must not cut anything"
        );
    }
}

#[test]
fn a_crc_valid_last_frame_with_the_wrong_offset_is_refused() {
    assert_refused("offset 9 at 6", &frame(9, &txn_for(6)), &opts(1 << 20));
}

#[test]
fn a_crc_valid_last_frame_with_gtid_number_zero_is_refused() {
    let txn = NewTransaction {
        gtid: Gtid { uuid: UUID, seq: 0 },
        ..txn_for(6)
    };
    assert_refused("GTID number 0", &frame(6, &txn), &opts(1 << 20));
}

#[test]
fn a_crc_valid_last_frame_with_an_undecodable_payload_is_refused() {
    assert_refused(
        "undecodable payload",
        &frame_with_payload(6, &[0xff; 40]),
        &opts(1 << 20),
    );
}

#[test]
fn a_crc_valid_last_frame_above_the_record_limit_is_refused() {
    // Record 6 is larger than any of records 1..=5, so only it is above the limit.
    let big = NewTransaction {
        ops: vec![Op::Put {
            tree: "t".into(),
            key: b"big".to_vec(),
            value: vec![7; 4096],
            before: None,
        }],
        ..txn_for(6)
    };
    let last = frame(6, &big);
    let payload = (last.len() - FRAME_HEADER_BYTES) as u32;
    let o = WalOptions {
        record_bytes_max: payload - 8,
        ..opts(1 << 20)
    };
    assert_refused("record above record_bytes_max", &last, &o);
}

#[test]
fn a_torn_last_frame_is_still_cut() {
    // The other side of the line: a frame short of its length, or failing its checksum, is
    // what a torn write leaves, and is cut with the records before it kept.
    let whole = frame(6, &txn_for(6));
    let mut bad_crc = whole.clone();
    bad_crc[FRAME_HEADER_BYTES] ^= 1;
    for (case, last) in [
        ("short", whole[..whole.len() - 8].to_vec()),
        ("crc", bad_crc),
    ] {
        let (storage, _, _) = log_ending_with(&last);
        let wal = Wal::open(Arc::new(storage), opts(1 << 20)).expect(case);
        assert_eq!(
            wal.recovery_report().truncated_bytes,
            last.len() as u64,
            "{case}"
        );
        assert_eq!(wal.visible_offset(), 5, "{case}");
    }
}

#[test]
fn append_refuses_gtid_number_zero() {
    let storage = MemStorage::new();
    let wal = Wal::open(Arc::new(storage.clone()), opts(1 << 20)).expect("open");
    wal.append(txn_for(1)).expect("append 1");
    let zero = NewTransaction {
        gtid: Gtid { uuid: UUID, seq: 0 },
        ..txn_for(2)
    };
    match wal.submit(zero) {
        Err(Error::InvalidRecord { .. }) => {}
        Err(e) => panic!("expected InvalidRecord, got {e}"),
        Ok(a) => panic!(
            "a record with GTID number 0 was accepted (offset {}); no reader can read it",
            a.offset()
        ),
    }
    // The refusal cost nothing: the log goes on at the next offset and reopens cleanly.
    assert_eq!(wal.append(txn_for(2)).expect("append 2").get(), 2);
    wal.close().expect("close");
    let wal = Wal::open(Arc::new(storage), opts(1 << 20)).expect("reopen");
    assert_eq!(common::check_log(&wal, 2), Ok(2));
}
