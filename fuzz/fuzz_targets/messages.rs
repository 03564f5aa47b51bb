//! Feeds arbitrary message bodies to the decoders of [`Request`] (what a server reads from
//! any authenticated peer) and [`Response`] (what a client reads from a node), then to what
//! each end does next with the text and packed fields inside (GTID sets, chunk entries).
//! Promises: no panic; every message decoded re-encodes to one that decodes to the same value.
//!
//! The first byte picks the mode: a raw body, or a valid message of every kind built from the
//! input and then edited (raw bytes rarely pass rkyv's validation).

#![no_main]

use libfuzzer_sys::fuzz_target;
use tideline_fuzz::{Parts, edit, message_body, sample_request, sample_response};
use tideline_stream::proto::{self, Request, Response};
use tideline_wal::GtidSet;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let request = mode & 0x80 == 0;
    let body = if mode % 2 == 0 {
        rest.to_vec()
    } else {
        let mut p = Parts::new(rest);
        let pick = p.bytes(1).first().copied().unwrap_or(0);
        let mut body = if request {
            message_body(&sample_request(pick, &mut p))
        } else {
            message_body(&sample_response(pick, &mut p))
        };
        edit(&mut body, p.rest());
        body
    };
    if request {
        if let Ok(req) = proto::decode_message::<Request>(&body) {
            tideline_fuzz::request_round_trips(&req);
            served(&req);
        }
    } else if let Ok(resp) = proto::decode_message::<Response>(&body) {
        tideline_fuzz::response_round_trips(&resp);
        received(&resp);
    }
});

/// What the server parses in a request before acting on it.
fn served(req: &Request) {
    match req {
        Request::Subscribe { start, .. } => {
            if let Ok(Some(set)) = proto::start_gtids(start) {
                gtids_round_trip(&set);
            }
        }
        Request::WaitFor { gtids, .. } => {
            if let Ok(set) = gtids.parse::<GtidSet>() {
                gtids_round_trip(&set);
            }
        }
        Request::IndexQuery(q) => {
            if let Some(Ok(set)) = q.fence.as_deref().map(str::parse::<GtidSet>) {
                gtids_round_trip(&set);
            }
        }
        _ => {}
    }
}

/// What the client parses in a response before acting on it.
fn received(resp: &Response) {
    let text = match resp {
        Response::Subscribed {
            gtids_before: t, ..
        }
        | Response::Fenced {
            gtid_executed: t, ..
        }
        | Response::BootstrapDone {
            gtid_executed: t, ..
        }
        | Response::Progress { gtids: t, .. } => t,
        Response::Chunk(c) => {
            let _ = proto::unpack_entries(&c.entries, &c.from, c.to.as_deref());
            return;
        }
        _ => return,
    };
    if let Ok(set) = text.parse::<GtidSet>() {
        gtids_round_trip(&set);
    }
}

fn gtids_round_trip(set: &GtidSet) {
    let back: GtidSet = set
        .to_string()
        .parse()
        .expect("a formatted GTID set parses");
    assert_eq!(&back, set);
}
