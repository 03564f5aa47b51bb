//! Decoding log records into owned transactions, as every reader of the log does (recovery,
//! the stream's owned batches, a replica's apply path): `record::decode_payload` beside
//! validation alone (`rkyv::access`, what a reader in place pays), on the same frames, in
//! alternating rounds. The difference is what building owned ops costs (their allocations and
//! copies), the gap between a consumer's `Subscription::next` and `next_raw`.
//!
//! Records: `BENCH_RECORDS` (200000) one-put transactions of a 16-byte key and a
//! `BENCH_VALUE_BYTES` (100) value, over `BENCH_ROUNDS` (5) rounds of each decoder.
//!
//! `cargo bench -p tideline-wal --bench decode`

use std::hint::black_box;
use std::time::Instant;

use rkyv::rancor;
use tideline_wal::record::{self, FRAME_HEADER_BYTES};
use tideline_wal::{Gtid, NewTransaction, Offset, Op};
use uuid::Uuid;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

/// Frames back to back, as a log segment or a received batch holds them.
fn frames(records: usize, value_bytes: usize) -> Vec<u8> {
    let uuid = Uuid::from_bytes([9; 16]);
    let mut out = Vec::new();
    for i in 1..=records as u64 {
        let mut key = [0u8; 16];
        key[..8].copy_from_slice(&i.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_be_bytes());
        key[8..].copy_from_slice(&i.to_be_bytes());
        let txn = NewTransaction {
            gtid: Gtid { uuid, seq: i },
            timestamp_us: 1_700_000_000_000_000 + i as i64,
            ops: vec![Op::Put {
                tree: "default".into(),
                key: key.to_vec(),
                value: vec![i as u8; value_bytes],
                before: None,
            }],
        };
        let offset = Offset::new(i).expect("offsets start at 1");
        record::encode_frame(offset, &txn, &mut out).expect("encode a frame");
    }
    out
}

/// Every payload of `buf`, passed to `f`; returns the records seen.
fn each_payload(buf: &[u8], mut f: impl FnMut(Offset, &[u8])) -> usize {
    let (mut pos, mut n) = (0, 0);
    while pos < buf.len() {
        let raw = record::check_frame(&buf[pos..], u32::MAX).expect("a frame this bench wrote");
        f(raw.offset, raw.payload);
        pos += raw.frame_bytes;
        n += 1;
    }
    n
}

fn main() {
    let records = env("BENCH_RECORDS", 200_000);
    let value_bytes = env("BENCH_VALUE_BYTES", 100);
    let rounds = env("BENCH_ROUNDS", 5);
    let buf = frames(records, value_bytes);
    println!(
        "decode {records} one-put records ({value_bytes}-byte values, {} bytes of frames \
         with {FRAME_HEADER_BYTES}-byte headers), {rounds} alternating rounds; records/s:",
        buf.len()
    );
    type Decoder = (&'static str, fn(Offset, &[u8]) -> usize);
    let decoders: [Decoder; 2] = [
        ("decode_payload (owned)", |offset, payload| {
            let txn = record::decode_payload(offset, payload).expect("decode");
            black_box(&txn);
            txn.ops.len()
        }),
        ("validation only", |_, payload| {
            let txn = rkyv::access::<rkyv::Archived<NewTransaction>, rancor::Error>(payload)
                .expect("validate");
            black_box(txn);
            txn.ops.len()
        }),
    ];
    let mut best = [0f64; 2];
    for round in 1..=rounds {
        let mut line = format!("  round {round}:");
        for (i, (name, decode)) in decoders.iter().enumerate() {
            let mut ops = 0;
            let started = Instant::now();
            let n = each_payload(&buf, |offset, payload| ops += decode(offset, payload));
            let rate = n as f64 / started.elapsed().as_secs_f64();
            assert_eq!(ops, records, "{name} saw {ops} ops in {records} records");
            best[i] = best[i].max(rate);
            line.push_str(&format!("  {name} {rate:>11.0}"));
        }
        println!("{line}");
    }
    println!(
        "  best: owned {:.0}, validation only {:.0} (owned takes {:.2}x the time)",
        best[0],
        best[1],
        best[1] / best[0]
    );
    println!(
        "{{\"records\":{records},\"value_bytes\":{value_bytes},\"owned_records_s\":{:.0},\
         \"validation_only_records_s\":{:.0}}}",
        best[0], best[1]
    );
}
