use super::*;
use tideline_wal::{Gtid, Op};
use uuid::Uuid;

fn txn(offset: u64, seq: u64) -> Transaction {
    Transaction {
        offset: Offset::new(offset).unwrap(),
        gtid: Gtid::new(Uuid::from_bytes([1; 16]), seq).unwrap(),
        timestamp_us: 0,
        ops: vec![Op::Put {
            tree: "default".into(),
            key: format!("k{seq}").into_bytes(),
            value: vec![7; 100],
            before: None,
        }],
    }
}

#[test]
fn messages_and_batches_round_trip_in_arbitrary_chunks() {
    let mut wire = Vec::new();
    encode_message(
        &Response::Subscribed {
            next_offset: 1,
            head: 3,
            gtids_before: String::new(),
            epoch: 9,
        },
        &mut wire,
    )
    .unwrap();
    let mut b = BatchBuilder::new();
    for i in 1..=3 {
        b.push(&txn(i, i)).unwrap();
    }
    b.finish_into(&mut wire);
    encode_message(
        &Response::Heartbeat {
            head: 3,
            server_time_us: 9,
        },
        &mut wire,
    )
    .unwrap();
    for chunk in [1, 2, 7, 64, wire.len()] {
        let mut d = FrameDecoder::new(Limits::default());
        let mut frames = Vec::new();
        for piece in wire.chunks(chunk) {
            d.feed(piece);
            while let Some(f) = d.next_frame::<Response>().unwrap() {
                frames.push(f);
            }
        }
        assert_eq!(frames.len(), 3, "chunk {chunk}");
        match &frames[1] {
            Frame::Batch(txns) => assert_eq!(txns, &vec![txn(1, 1), txn(2, 2), txn(3, 3)]),
            other => panic!("expected a batch, got {other:?}"),
        }
    }
}

#[test]
fn the_buffer_stays_bounded_when_chunks_never_end_on_a_frame() {
    let mut wire = Vec::new();
    let mut b = BatchBuilder::new();
    b.push(&txn(1, 1)).unwrap();
    b.finish_into(&mut wire);
    let frame = wire.len();
    let mut d = FrameDecoder::new(Limits::default());
    let mut seen = 0;
    // 1,000 frames fed in chunks of 7 bytes: no chunk boundary is a frame boundary for long.
    let stream: Vec<u8> = wire.iter().copied().cycle().take(frame * 1000).collect();
    for chunk in stream.chunks(7) {
        d.feed(chunk);
        while let Some(Frame::Batch(_)) = d.next_frame::<Response>().unwrap() {
            seen += 1;
        }
        assert!(d.buf.len() <= frame + 7, "buffer grew to {}", d.buf.len());
    }
    assert_eq!(seen, 1000);
}

#[test]
fn oversized_and_unknown_frames_are_refused_before_allocation() {
    let mut d = FrameDecoder::new(Limits::default());
    d.feed(&u32::MAX.to_le_bytes());
    d.feed(&[KIND_MESSAGE]);
    assert!(matches!(
        d.next_frame::<Request>(),
        Err(ProtoError::FrameTooLarge { .. })
    ));
    let mut d = FrameDecoder::new(Limits::default());
    d.feed(&[1, 0, 0, 0, 9, 0]);
    assert_eq!(d.next_frame::<Request>(), Err(ProtoError::UnknownKind(9)));
    // A batch whose count claims billions of records but holds none.
    let mut d = FrameDecoder::new(Limits::default());
    d.feed(&[4, 0, 0, 0, KIND_BATCH, 0xff, 0xff, 0xff, 0xff]);
    assert!(matches!(
        d.next_frame::<Request>(),
        Err(ProtoError::BadBatch(_))
    ));
    // Garbage where a message should be.
    let mut d = FrameDecoder::new(Limits::default());
    d.feed(&[3, 0, 0, 0, KIND_MESSAGE, 1, 2, 3]);
    assert!(matches!(
        d.next_frame::<Request>(),
        Err(ProtoError::BadMessage(_))
    ));
}

/// Whether `text` holds a hexadecimal number long enough to be a memory address.
fn names_an_address(text: &str) -> bool {
    text.match_indices("0x").any(|(at, _)| {
        text[at + 2..]
            .chars()
            .take_while(char::is_ascii_hexdigit)
            .count()
            >= 8
    })
}

/// Found by the `stream_frames` fuzz target: rkyv's validation errors name addresses of
/// the decoder's buffer, and the server sends the error text back to the peer, even to one
/// that has not authenticated (a malformed `Hello`): a free hint for defeating ASLR.
#[test]
fn malformed_messages_name_no_memory_address() {
    let hello = Request::Hello {
        token: "t".repeat(40),
        client: "a client with a long name".into(),
        protocol: PROTOCOL_VERSION,
    };
    let mut frame = Vec::new();
    encode_message(&hello, &mut frame).unwrap();
    let body = &frame[FRAME_HEADER_BYTES..];
    let mut refused = 0;
    for at in 0..body.len() {
        for mask in [0x01u8, 0x10, 0x80, 0xff] {
            let mut bad = body.to_vec();
            bad[at] ^= mask;
            if let Err(e) = decode_message::<Request>(&bad) {
                refused += 1;
                let text = e.to_string();
                assert!(!names_an_address(&text), "byte {at} ^ {mask:#x}: {text}");
            }
        }
    }
    assert!(refused > 0, "no edit was refused: the test proves nothing");
}

/// Found by a third code review: a peer can send a batch frame (where the node expects a
/// request) whose record passes its checksum but holds a corrupt payload; the node decoded it
/// and sent rkyv's error text back, with the addresses of its buffer. Every way of reading
/// such a batch must refuse it without naming a memory address.
#[test]
fn malformed_batch_records_name_no_memory_address() {
    let mut b = BatchBuilder::new();
    b.push(&txn(1, 1)).unwrap();
    let mut wire = Vec::new();
    b.finish_into(&mut wire);
    // The one log frame: len, crc, offset, payload, padding.
    let frame_at = BATCH_PREFIX_BYTES;
    let reframe = |wire: &mut Vec<u8>| {
        let frame = &wire[frame_at..];
        let crc = crc32c::crc32c(&[&frame[..4], &frame[8..]].concat());
        wire[frame_at + 4..frame_at + 8].copy_from_slice(&crc.to_le_bytes());
    };
    let mut same = wire.clone();
    reframe(&mut same);
    assert_eq!(same, wire, "the test's CRC32C is not the log's");
    let len = u32::from_le_bytes(wire[frame_at..frame_at + 4].try_into().unwrap()) as usize;
    let payload_at = frame_at + record::FRAME_HEADER_BYTES;
    let mut refused = 0;
    for at in payload_at..payload_at + len {
        for mask in [0x01u8, 0x10, 0x80, 0xff] {
            let mut bad = wire.clone();
            bad[at] ^= mask;
            reframe(&mut bad);
            let mut texts = Vec::new();
            // As a request stream reads it, and as a subscription reads it.
            let mut d = FrameDecoder::new(Limits::default());
            d.feed(&bad);
            if let Err(e) = d.next_frame::<Request>() {
                texts.push(e.to_string());
            }
            if let Err(e) = decode_batch(&bad[FRAME_HEADER_BYTES..], &Limits::default()) {
                texts.push(e.to_string());
            }
            let mut d = FrameDecoder::new(Limits::default());
            d.feed(&bad);
            let Some(Frame::Batch(raw)) = d.next_raw_frame::<Response>().unwrap() else {
                panic!("the checksum was recomputed: the batch must pass its check");
            };
            texts.extend(raw.decode().err().map(|e| e.to_string()));
            for r in raw.records() {
                texts.extend(r.gtid().err().map(|e| e.to_string()));
                texts.extend(r.archived().err().map(|e| e.to_string()));
                texts.extend(r.decode().err().map(|e| e.to_string()));
            }
            refused += texts.len();
            for text in texts {
                assert!(!names_an_address(&text), "byte {at} ^ {mask:#x}: {text}");
            }
        }
    }
    assert!(refused > 0, "no edit was refused: the test proves nothing");
}

/// Drives a server and a client subscription against each other across a reconnect, on a
/// virtual clock: heartbeats when idle, resume without gap or duplicate.
#[test]
fn server_and_client_state_machines_resume_without_gap_or_duplicate() {
    let log: Vec<Transaction> = (1..=10).map(|i| txn(i, i)).collect();
    let mut now = 1_000_000i64;
    let mut client = ClientSubscription::new(GtidSet::new());
    let mut server = ServerSubscription::new(1, 500_000, now);
    client
        .handle_subscribed(server.next_offset(), 10, &GtidSet::new())
        .unwrap();
    let mut delivered = Vec::new();
    // First connection: records 1..=4, then the connection drops mid-batch (5..=6 lost).
    for chunk in [&log[0..2], &log[2..4]] {
        let got = client.handle_batch(chunk.to_vec()).unwrap();
        server.on_sent(chunk[chunk.len() - 1].offset.get(), now);
        delivered.extend(got);
        now += 1_000;
    }
    server.handle_ack(4).unwrap();
    assert!(server.handle_ack(9).is_err(), "ack past what was sent");
    // Reconnect: the client asks to resume after what it delivered.
    let resume = client.resume_start(Start::Earliest);
    assert_eq!(resume, Start::Offset(5));
    let mut server = ServerSubscription::new(5, 500_000, now);
    client
        .handle_subscribed(server.next_offset(), 10, &GtidSet::new())
        .unwrap();
    // The server re-sends 4 (harmless) and then 5..=10.
    let got = client.handle_batch(log[3..10].to_vec()).unwrap();
    server.on_sent(10, now);
    delivered.extend(got);
    let offsets: Vec<u64> = delivered.iter().map(|t| t.offset.get()).collect();
    assert_eq!(offsets, (1..=10).collect::<Vec<_>>());
    // Idle: no heartbeat before it is due, one when it is.
    assert!(server.poll_heartbeat(10, now + 499_999).is_none());
    let hb = server.poll_heartbeat(10, now + 500_000);
    assert!(matches!(hb, Some(Response::Heartbeat { head: 10, .. })));
    // A server that skips ahead on resume is caught.
    let mut c2 = client.clone();
    assert!(c2.handle_subscribed(12, 12, &GtidSet::new()).is_err());
    // Out-of-order offsets are a violation.
    let mut c3 = ClientSubscription::new(GtidSet::new());
    assert!(c3.handle_batch(vec![txn(3, 3), txn(2, 2)]).is_err());
}

/// A filtered subscription reports what its filter dropped, and the client's position and
/// seen set move past it: the start's covered set, then records considered but not sent.
#[test]
fn progress_moves_a_filtered_position_past_dropped_records() {
    let uuid = Uuid::from_bytes([1; 16]);
    let covered: GtidSet = format!("{uuid}:1-10").parse().unwrap();
    let mut server = ServerSubscription::new(11, 500_000, 0).with_progress(covered.clone());
    let mut client = ClientSubscription::new(GtidSet::new());
    client.handle_subscribed(11, 20, &covered).unwrap();
    assert!(client.seen().is_subset(&covered) && covered.is_subset(client.seen()));
    // Nothing considered yet: nothing to report.
    assert_eq!(server.poll_progress(1), None);
    // 11 is sent, 12..=20 are dropped by the filter.
    server.on_considered(11, txn(11, 11).gtid);
    client.handle_batch(vec![txn(11, 11)]).unwrap();
    server.on_sent(11, 2);
    assert_eq!(
        server.poll_progress(3),
        None,
        "the batch told the client everything"
    );
    for o in 12..=20 {
        server.on_considered(o, txn(o, o).gtid);
    }
    let Some(Response::Progress { through, gtids }) = server.poll_progress(4) else {
        panic!("expected a progress report");
    };
    assert_eq!(
        (through, gtids.as_str()),
        (20, format!("{uuid}:1-20").as_str())
    );
    assert_eq!(server.poll_progress(5), None, "reported once");
    client.handle_progress(through, &gtids.parse().unwrap());
    assert_eq!(client.last_offset(), Some(20));
    assert_eq!(client.resume_start(Start::Earliest), Start::Offset(21));
    assert_eq!(client.seen().to_string(), format!("{uuid}:1-20"));
    // A record already covered by progress is not delivered again after a resend.
    assert!(client.handle_batch(vec![txn(20, 20)]).unwrap().is_empty());
}

/// The index messages (a query with a fence, its page, index definitions inside a commit)
/// decode to what was sent, also when they arrive byte by byte.
#[test]
fn index_messages_round_trip() {
    let query = Request::IndexQuery(IndexQuery {
        tree: "users".into(),
        index: "by_email".into(),
        values: vec![b"a@x\0".to_vec()],
        prefix: b"pre".to_vec(),
        after: Some(b"a@x\0\xff\0\x01u1".to_vec()),
        limit: 100,
        bytes_max: 1 << 20,
        fence: Some(format!("{}:1-5", Uuid::from_bytes([1; 16]))),
        timeout_ms: 5000,
    });
    let commit = Request::Commit {
        ops: vec![
            WriteOp::CreateIndex {
                tree: "users".into(),
                name: "by_email".into(),
                paths: vec!["/email".into(), "/a~1b".into()],
                unique: true,
            },
            WriteOp::DropIndex {
                tree: "users".into(),
                name: "old".into(),
            },
        ],
    };
    let rows = Response::IndexRows {
        rows: vec![(b"u1".to_vec(), br#"{"email":"a@x"}"#.to_vec())],
        next: Some(b"entry".to_vec()),
    };
    let mut wire = Vec::new();
    encode_message(&query, &mut wire).unwrap();
    encode_message(&commit, &mut wire).unwrap();
    let split = wire.len();
    encode_message(&rows, &mut wire).unwrap();
    let mut d = FrameDecoder::new(Limits::default());
    let mut requests = Vec::new();
    for b in &wire[..split] {
        d.feed(std::slice::from_ref(b));
        while let Some(Frame::Message(m)) = d.next_frame::<Request>().unwrap() {
            requests.push(m);
        }
    }
    assert_eq!(requests, vec![query, commit]);
    d.feed(&wire[split..]);
    match d.next_frame::<Response>().unwrap() {
        Some(Frame::Message(m)) => assert_eq!(m, rows),
        other => panic!("expected the rows, got {other:?}"),
    }
}

/// A batch read in place gives the records the owned decoder gives, its frames exactly as the
/// log stores them, and nothing of a batch whose record fails its checksum.
#[test]
fn a_raw_batch_reads_records_in_place_and_refuses_a_bad_checksum() {
    let mut b = BatchBuilder::new();
    for i in 1..=3 {
        b.push(&txn(i, i)).unwrap();
    }
    let mut wire = Vec::new();
    b.finish_into(&mut wire);
    let mut d = FrameDecoder::new(Limits::default());
    d.feed(&wire);
    let Some(Frame::Batch(raw)) = d.next_raw_frame::<Response>().unwrap() else {
        panic!("expected a batch");
    };
    assert_eq!(raw.len(), 3);
    assert_eq!(raw.decode().unwrap(), vec![txn(1, 1), txn(2, 2), txn(3, 3)]);
    assert_eq!(&raw.frames()[..], &wire[BATCH_PREFIX_BYTES..]);
    for (r, i) in raw.records().zip(1u64..) {
        assert_eq!(r.offset.get(), i);
        assert_eq!(r.gtid().unwrap(), txn(i, i).gtid);
        assert_eq!(r.archived().unwrap().ops.len(), 1);
        assert_eq!(r.decode().unwrap(), txn(i, i));
    }
    // One bit of the last record's value flipped: the batch never reaches the caller.
    let mut bad = wire.clone();
    let at = bad.len() - 20;
    bad[at] ^= 1;
    let mut d = FrameDecoder::new(Limits::default());
    d.feed(&bad);
    let err = d.next_raw_frame::<Response>().unwrap_err();
    assert!(
        matches!(err, ProtoError::BadBatch(ref m) if m.contains("checksum")),
        "{err}"
    );
}

/// The builder hands its frame over whole (header, count, records) and starts again empty.
#[test]
fn a_taken_batch_frame_is_what_finish_into_writes() {
    let mut b = BatchBuilder::with_capacity(64);
    b.push(&txn(1, 1)).unwrap();
    b.push(&txn(2, 2)).unwrap();
    let mut clone = BatchBuilder::new();
    clone.push(&txn(1, 1)).unwrap();
    clone.push(&txn(2, 2)).unwrap();
    let mut wire = Vec::new();
    clone.finish_into(&mut wire);
    assert_eq!(&b.take_frame(64)[..], &wire[..]);
    assert!(b.is_empty());
    assert_eq!(b.bytes(), 0);
}
