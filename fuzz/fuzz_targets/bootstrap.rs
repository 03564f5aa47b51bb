//! Bootstrap messages and the packed entries of a chunk, as a replica receives them from the
//! node it copies: `Response::Chunk` and `Response::BootstrapStarted`/`BootstrapDone` bodies,
//! `Request::Bootstrap` (with its resume point) on the server, then [`unpack_entries`] and
//! [`packed_parts`] on the chunk body. Promises: no panic; entries unpacked lie inside the
//! chunk's range in strictly ascending order and pack back to exactly the body; the parts of a
//! well-formed body are contiguous, cover it, and each starts at an entry whose key it names.
//!
//! The first byte picks the mode: a raw packed body (range from the input), a valid chunk
//! built from the input then edited (body and envelope), or a bootstrap request or response.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tideline_fuzz::{Parts, edit, message_body, sample_chunk, sample_request, sample_response};
use tideline_stream::proto::{self, Request, Response, packed_parts, unpack_entries};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut p = Parts::new(rest);
    match mode % 4 {
        0 => {
            let from = p.bytes(usize::from(mode >> 4));
            let to = (mode & 8 != 0).then(|| p.bytes(2));
            let part_bytes = usize::from(p.bytes(1).first().copied().unwrap_or(0));
            entries(p.rest(), &from, to.as_deref(), part_bytes);
        }
        1 => {
            let mut chunk = sample_chunk(&mut p);
            let edits = p.rest();
            let (on_body, on_envelope) = edits.split_at(edits.len() / 2);
            edit(&mut chunk.entries, on_body);
            let part_bytes = usize::from(mode >> 2);
            entries(&chunk.entries, &chunk.from, chunk.to.as_deref(), part_bytes);
            let mut body = message_body(&Response::Chunk(chunk));
            edit(&mut body, on_envelope);
            response(&body);
        }
        2 => {
            let pick = [9u8, 10, 11][usize::from(mode >> 2) % 3];
            let mut body = message_body(&sample_response(pick, &mut p));
            edit(&mut body, p.rest());
            response(&body);
        }
        _ => {
            let pick = [9u8, 10][usize::from(mode >> 2) % 2];
            let mut body = message_body(&sample_request(pick, &mut p));
            edit(&mut body, p.rest());
            if let Ok(req) = proto::decode_message::<Request>(&body) {
                tideline_fuzz::request_round_trips(&req);
            }
        }
    }
});

fn response(body: &[u8]) {
    let Ok(resp) = proto::decode_message::<Response>(body) else {
        return;
    };
    tideline_fuzz::response_round_trips(&resp);
    if let Response::Chunk(c) = &resp {
        entries(&c.entries, &c.from, c.to.as_deref(), 64);
    }
}

fn entries(body: &[u8], from: &[u8], to: Option<&[u8]>, part_bytes: usize) {
    let parts = packed_parts(body, part_bytes);
    for (range, _) in &parts {
        assert!(range.start <= range.end && range.end <= body.len());
    }
    let Ok(list) = unpack_entries(body, from, to) else {
        return;
    };
    let mut again = Vec::with_capacity(body.len());
    for (i, (k, v)) in list.iter().enumerate() {
        assert!(k.as_slice() >= from && to.is_none_or(|t| k.as_slice() < t));
        assert!(i == 0 || list[i - 1].0 < *k, "keys not strictly ascending");
        proto::pack_entry(&mut again, k, v);
    }
    assert_eq!(again, body, "unpacked entries do not pack back to the body");
    // The parts of a well-formed body: contiguous from 0 to its end, each naming its first key.
    let mut at = 0;
    let mut starts = Vec::new();
    let mut pos = 0;
    for (k, v) in &list {
        starts.push((pos, k.clone()));
        pos += proto::bootstrap::ENTRY_HEADER_BYTES + k.len() + v.len();
    }
    for (range, first_key) in &parts {
        assert_eq!(range.start, at, "parts leave a gap or overlap");
        assert!(
            starts
                .iter()
                .any(|(s, k)| *s == range.start && k == first_key),
            "a part does not start at an entry with its key"
        );
        at = range.end;
    }
    assert_eq!(at, body.len(), "parts do not cover the body");
}
