//! The handshake: the first stream of a connection, read by the server from a peer that has
//! not proved it holds the token yet, with the small limits of an unauthenticated peer
//! (`hello_bytes_max`, 4 KiB by default; no batches). Promises: no panic; a frame over the
//! limit, a batch or an unknown kind is refused from its 5-byte header, before any body byte
//! is buffered for it; a `Hello` decoded re-encodes to the same `Hello`.
//!
//! The first byte picks the mode: raw bytes, or a framed `Hello` built from the input and
//! then edited (header included).

#![no_main]

use libfuzzer_sys::fuzz_target;
use tideline_fuzz::{Parts, edit, sample_request};
use tideline_stream::Limits;
use tideline_stream::proto::{self, Frame, FrameDecoder, ProtoError, Request};

/// The server's default `hello_bytes_max`.
const HELLO_BYTES_MAX: u32 = 4 << 10;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let bytes = if mode % 2 == 0 {
        rest.to_vec()
    } else {
        let mut p = Parts::new(rest);
        let mut out = Vec::new();
        proto::encode_message(&sample_request(0, &mut p), &mut out)
            .expect("a Hello built in memory encodes");
        edit(&mut out, p.rest());
        out
    };
    let limits = Limits {
        message_bytes_max: HELLO_BYTES_MAX,
        batch_bytes_max: 0,
        ..Limits::default()
    };
    let mut dec = FrameDecoder::new(limits);
    // As the server reads: exactly what the decoder says it needs, never more.
    let mut at = 0;
    loop {
        let need = match dec.needed() {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                // Refused from the header alone: nothing past it was asked for.
                assert_eq!(dec.buffered(), proto::FRAME_HEADER_BYTES);
                assert!(matches!(
                    e,
                    ProtoError::FrameTooLarge { .. } | ProtoError::UnknownKind(_)
                ));
                let kind = bytes[4];
                let len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
                assert!(
                    kind != proto::KIND_MESSAGE || len > HELLO_BYTES_MAX,
                    "a message within the limit was refused: {e}"
                );
                return;
            }
        };
        assert!(dec.buffered() + need <= proto::FRAME_HEADER_BYTES + HELLO_BYTES_MAX as usize);
        if at + need > bytes.len() {
            return; // the peer stopped sending: the server's handshake timeout ends it
        }
        dec.feed(&bytes[at..at + need]);
        at += need;
    }
    match dec.next_frame::<Request>() {
        Ok(Some(Frame::Message(req))) => tideline_fuzz::request_round_trips(&req),
        Ok(Some(Frame::Batch(txns))) => {
            // Only an empty batch body fits a limit of 0, and it has no count: refused.
            panic!(
                "a batch of {} records passed the handshake limits",
                txns.len()
            )
        }
        Ok(None) => panic!("needed() said a frame was complete"),
        Err(_) => {}
    }
});
