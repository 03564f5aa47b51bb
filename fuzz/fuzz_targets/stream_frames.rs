//! Feeds arbitrary bytes, cut into arbitrary pieces, to the stream's incremental frame
//! decoder ([`FrameDecoder`]) as both ends read them: requests on the server, responses and
//! batches of log records on the client. The decoder promises:
//! - no panic, and a header over the limit for its kind (or of an unknown kind) is refused
//!   before its body is buffered: it never asks for more than one frame of the limit;
//! - the frames decoded, and the error that ends them, do not depend on how the bytes were
//!   cut into pieces (nor on where the buffer lies: no error text names an address);
//! - every frame decoded re-encodes (message, or batch rebuilt with `BatchBuilder`) to bytes
//!   that decode to the same frame.
//!
//! The first byte picks the mode: raw bytes, or valid frames (a message and a batch) built
//! from the input and then edited, so that runs reach validation past the frame header.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tideline_fuzz::{Parts, edit, sample_request, sample_response};
use tideline_stream::Limits;
use tideline_stream::proto::{
    self, BatchBuilder, Frame, FrameDecoder, ProtoError, Request, Response,
};
use tideline_wal::{Gtid, Offset, Op, Transaction};

/// Small limits, so that oversized headers are common and each input stays cheap.
const LIMITS: Limits = Limits {
    message_bytes_max: 1 << 16,
    batch_bytes_max: 1 << 17,
    record_bytes_max: 1 << 16,
};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Some((&cut, rest)) = rest.split_first() else {
        return;
    };
    let bytes = match mode % 3 {
        0 => rest.to_vec(),
        1 => built(rest, true),
        _ => built(rest, false),
    };
    let piece = usize::from(cut).max(1);
    if mode & 0x80 == 0 {
        check::<Request>(&bytes, piece, tideline_fuzz::request_round_trips);
    } else {
        check::<Response>(&bytes, piece, tideline_fuzz::response_round_trips);
    }
});

/// The frames of `bytes` fed in pieces of `piece` bytes, and how decoding ended.
fn decode_in_pieces<M>(bytes: &[u8], piece: usize) -> (Vec<Frame<M>>, Result<(), ProtoError>)
where
    M: rkyv::Archive,
    M::Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rkyv::rancor::Error>>
        + rkyv::Deserialize<M, rkyv::api::high::HighDeserializer<rkyv::rancor::Error>>,
{
    let frame_max =
        proto::FRAME_HEADER_BYTES + LIMITS.message_bytes_max.max(LIMITS.batch_bytes_max) as usize;
    let mut dec = FrameDecoder::new(LIMITS);
    let mut frames = Vec::new();
    for chunk in bytes.chunks(piece) {
        dec.feed(chunk);
        // One unfinished frame plus one piece at most.
        assert!(dec.buffered() <= frame_max + chunk.len());
        loop {
            match dec.needed() {
                Ok(n) => assert!(dec.buffered() + n <= frame_max, "asks beyond the limit"),
                Err(e) => {
                    assert!(matches!(
                        e,
                        ProtoError::FrameTooLarge { .. } | ProtoError::UnknownKind(_)
                    ));
                    return (frames, Err(e));
                }
            }
            match dec.next_frame::<M>() {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(e) => return (frames, Err(e)),
            }
        }
    }
    (frames, Ok(()))
}

fn check<M>(bytes: &[u8], piece: usize, round_trip: impl Fn(&M))
where
    M: rkyv::Archive + PartialEq + std::fmt::Debug,
    M::Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rkyv::rancor::Error>>
        + rkyv::Deserialize<M, rkyv::api::high::HighDeserializer<rkyv::rancor::Error>>,
{
    let whole = decode_in_pieces::<M>(bytes, bytes.len().max(1));
    let pieces = decode_in_pieces::<M>(bytes, piece);
    // Same frames and the same error, text included: the two decoders' buffers lie at
    // different addresses, so an error naming one (sent back to the peer) shows up here.
    assert_eq!(whole, pieces, "frames depend on how the bytes arrived");
    for f in &whole.0 {
        match f {
            Frame::Message(m) => round_trip(m),
            Frame::Batch(txns) => {
                let mut b = BatchBuilder::new();
                for t in txns {
                    b.push(t).expect("a decoded record re-encodes");
                }
                let mut out = Vec::new();
                b.finish_into(&mut out);
                let (back, end) = decode_in_pieces::<M>(&out, out.len());
                assert_eq!(end, Ok(()), "a rebuilt batch decodes");
                assert_eq!(back.len(), 1);
                match &back[0] {
                    Frame::Batch(again) => assert_eq!(again, txns),
                    Frame::Message(_) => panic!("a batch decoded as a message"),
                }
            }
        }
    }
}

/// A message frame and a batch frame built from `input`, then edited by what is left.
fn built(input: &[u8], request: bool) -> Vec<u8> {
    let mut p = Parts::new(input);
    let pick = p.bytes(1).first().copied().unwrap_or(0);
    let mut out = Vec::new();
    if request {
        proto::encode_message(&sample_request(pick, &mut p), &mut out)
    } else {
        proto::encode_message(&sample_response(pick, &mut p), &mut out)
    }
    .expect("a message built in memory encodes");
    let mut b = BatchBuilder::new();
    for i in 0..u64::from(pick % 3) {
        let txn = Transaction {
            offset: Offset::new(1 + i + p.u64() % 1000).expect("offsets from 1 are valid"),
            gtid: Gtid::new(uuid::Uuid::from_bytes(p.uuid()), 1 + p.u64() % 1000)
                .expect("seq from 1 is valid"),
            timestamp_us: 7,
            ops: vec![
                Op::Put {
                    tree: "t".into(),
                    key: p.bytes(4),
                    value: p.bytes(8),
                    before: None,
                },
                Op::Delete {
                    tree: "t".into(),
                    key: p.bytes(4),
                    before: None,
                },
            ],
        };
        b.push(&txn).expect("a record built in memory encodes");
    }
    if !b.is_empty() {
        b.finish_into(&mut out);
    }
    edit(&mut out, p.rest());
    out
}
