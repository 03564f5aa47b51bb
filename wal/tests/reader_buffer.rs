//! What a log reader holds in memory: its buffer grows to the size of a record larger than
//! its chunk (1 MiB) while it reads that record, and gives the memory back once the record is
//! behind it. Guards against one large record (a legal 8 MiB value) leaving every reader that
//! passed it, i.e. every live subscription of the node, holding that many bytes for the rest of
//! its life, and against small records pushing the buffer past the chunk that
//! `docs/PROTOCOL.md` counts for each consumer ("its log reader's chunk (1 MiB)").

use std::sync::Arc;

use tideline_wal::{Gtid, MemStorage, NewTransaction, Offset, Op, Reader, Wal, WalOptions};

/// The reader's chunk as `docs/PROTOCOL.md` and `docs/OPERATIONS.md` count it per consumer.
const READER_CHUNK_BYTES: usize = 1 << 20;

fn txn(wal: &Wal, seq: u64, value_bytes: usize) -> NewTransaction {
    NewTransaction {
        gtid: Gtid::new(wal.server_uuid(), seq).expect("seq >= 1"),
        timestamp_us: seq as i64,
        ops: vec![Op::Put {
            tree: "default".into(),
            key: format!("k{seq}").into_bytes(),
            value: vec![seq as u8; value_bytes],
            before: None,
        }],
    }
}

/// Reads the next record as a tail server does (the frame as stored) and returns its offset.
fn next(reader: &mut Reader, out: &mut Vec<u8>) -> u64 {
    out.clear();
    reader
        .next_raw(out)
        .unwrap()
        .expect("a record is visible")
        .get()
}

#[test]
fn a_reader_gives_back_what_a_large_record_grew_its_buffer_to() {
    let wal = Wal::open(Arc::new(MemStorage::new()), WalOptions::default()).unwrap();
    wal.append(txn(&wal, 1, 100)).unwrap();
    wal.append(txn(&wal, 2, 8 << 20)).unwrap();
    for seq in 3..=2_000 {
        wal.append(txn(&wal, seq, 1_000)).unwrap();
    }
    let mut reader = wal.read_from(Offset::FIRST).unwrap();
    let mut out = Vec::new();
    assert_eq!(next(&mut reader, &mut out), 1);
    assert_eq!(next(&mut reader, &mut out), 2);
    // Sanity: the whole record was in the reader's buffer while it was read.
    assert!(
        reader.buffer_capacity() >= 8 << 20,
        "the reader read an 8 MiB record with a buffer of {} bytes",
        reader.buffer_capacity()
    );
    let mut largest_after = 0;
    for seq in 3..=2_000 {
        assert_eq!(next(&mut reader, &mut out), seq);
        largest_after = largest_after.max(reader.buffer_capacity());
    }
    assert!(
        reader.buffer_capacity() <= READER_CHUNK_BYTES,
        "after an 8 MiB record and 2 MB of small ones the reader still holds a buffer of {} \
         bytes (the largest since the record: {largest_after}); a consumer is counted for a \
         {READER_CHUNK_BYTES}-byte chunk",
        reader.buffer_capacity()
    );
}

#[test]
fn small_records_keep_a_reader_within_its_chunk() {
    let wal = Wal::open(Arc::new(MemStorage::new()), WalOptions::default()).unwrap();
    // About 4 MiB of records that do not divide the chunk: refills start mid-frame.
    for seq in 1..=1_400 {
        wal.append(txn(&wal, seq, 3_000)).unwrap();
    }
    let mut reader = wal.read_from(Offset::FIRST).unwrap();
    let mut out = Vec::new();
    let mut largest = 0;
    for seq in 1..=1_400 {
        assert_eq!(next(&mut reader, &mut out), seq);
        largest = largest.max(reader.buffer_capacity());
    }
    assert!(
        largest <= READER_CHUNK_BYTES,
        "reading 3 KB records, the reader's buffer reached {largest} bytes; a consumer is \
         counted for a {READER_CHUNK_BYTES}-byte chunk"
    );
}
