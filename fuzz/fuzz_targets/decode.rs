//! Feeds arbitrary bytes to the frame and segment-header decoders, which read whatever is on
//! disk: they must return an error, never panic, never read out of bounds, and never allocate
//! what a length field claims before checking it.
//!
//! The first byte picks a mode. Raw bytes mostly stop at a checksum, so the other modes first
//! write a valid checksum over the fuzzed bytes, or edit the payload of a valid record and then
//! fix its checksum, to reach the payload validation (rkyv) and the GTID-set parser behind it.
//! Whatever decodes must re-encode and decode to the same value.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tideline_wal::record::{self, FRAME_ALIGN, FRAME_HEADER_BYTES, NewTransaction, Op};
use tideline_wal::{Gtid, Offset, segment};

/// Largest payload accepted in these runs: bounds the work per input, like the log's limit.
const RECORD_BYTES_MAX: u32 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 4 {
        0 => {
            frame(rest);
            header(rest);
        }
        1 => frame(&framed(rest)),
        2 => frame(&edited_record(rest)),
        _ => header(&with_header_crc(rest)),
    }
});

fn frame(bytes: &[u8]) {
    let _ = record::check_frame(bytes, u32::MAX);
    let Ok((txn, used)) = record::decode_frame(bytes, RECORD_BYTES_MAX) else {
        return;
    };
    assert!(used <= bytes.len() && used % FRAME_ALIGN == 0);
    let again = NewTransaction {
        gtid: txn.gtid,
        timestamp_us: txn.timestamp_us,
        ops: txn.ops.clone(),
    };
    let mut out = Vec::new();
    record::encode_frame(txn.offset, &again, &mut out).expect("a decoded record re-encodes");
    let (back, _) = record::decode_frame(&out, u32::MAX).expect("a re-encoded record decodes");
    assert_eq!(back, txn);
}

fn header(bytes: &[u8]) {
    let _ = segment::header_len(bytes);
    let Ok(h) = segment::decode_header(bytes) else {
        return;
    };
    assert!(h.header_bytes as usize <= bytes.len());
    let out = segment::encode_header_in_epoch(
        h.first_offset,
        h.server_uuid,
        h.created_us,
        &h.gtids_before,
        h.epoch,
    );
    let back = segment::decode_header(&out).expect("a re-encoded header decodes");
    // The length may differ: the input may pad more, spell the GTID set non-canonically, or
    // be format 1 (re-encoded as the current format, same epoch).
    assert_eq!(
        (
            back.first_offset,
            back.server_uuid,
            back.created_us,
            &back.gtids_before,
            back.epoch
        ),
        (
            h.first_offset,
            h.server_uuid,
            h.created_us,
            &h.gtids_before,
            h.epoch
        )
    );
}

/// `payload` framed as offset 1 with a valid length and checksum.
fn framed(payload: &[u8]) -> Vec<u8> {
    let len = payload.len().min(RECORD_BYTES_MAX as usize);
    let total = (FRAME_HEADER_BYTES + len).next_multiple_of(FRAME_ALIGN);
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&1u64.to_le_bytes());
    out.extend_from_slice(&payload[..len]);
    out.resize(total, 0);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&out[0..4]), &out[8..]);
    out[4..8].copy_from_slice(&crc.to_le_bytes());
    out
}

/// A valid record built from the first bytes, its payload then edited by the rest (pairs of
/// position and XOR mask), re-framed with a valid checksum.
fn edited_record(bytes: &[u8]) -> Vec<u8> {
    let (seed, edits) = bytes.split_at(bytes.len().min(24));
    let (key, value) = seed.split_at(seed.len() / 2);
    let txn = NewTransaction {
        gtid: Gtid {
            uuid: Default::default(),
            seq: 1 + u64::from(seed.first().copied().unwrap_or(0)),
        },
        timestamp_us: 7,
        ops: vec![
            Op::Put {
                tree: "t".into(),
                key: key.to_vec(),
                value: value.to_vec(),
                before: (seed.len() % 2 == 1).then(|| value.to_vec()),
            },
            Op::Merge {
                tree: "m".into(),
                key: value.to_vec(),
                operand: key.to_vec(),
            },
            Op::CreateTree {
                tree: "c".into(),
                merge_operator: None,
            },
        ],
    };
    let mut out = Vec::new();
    record::encode_frame(Offset::FIRST, &txn, &mut out).expect("a record encodes");
    let len = u32::from_le_bytes([out[0], out[1], out[2], out[3]]) as usize;
    let payload = &mut out[FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + len];
    for edit in edits.chunks_exact(2) {
        let at = usize::from(edit[0]) % payload.len();
        payload[at] ^= edit[1];
    }
    let payload = payload.to_vec();
    framed(&payload)
}

/// `bytes` with the header checksum field (bytes 52..56) made valid for the header length the
/// bytes claim, when that length fits.
fn with_header_crc(bytes: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    if let Ok(total) = segment::header_len(&out) {
        let total = total as usize;
        if out.len() >= total {
            out[52..56].fill(0);
            let crc = crc32c::crc32c(&out[..total]);
            out[52..56].copy_from_slice(&crc.to_le_bytes());
        }
    }
    out
}
