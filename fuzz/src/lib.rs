//! Helpers shared by the fuzz targets: valid messages built from fuzzed bytes (so that edits
//! of them reach the decoders' validation past the first bytes), byte edits, and the round
//! trips every target asserts.

use tideline_stream::proto::{
    self, BootstrapResume, Chunk, Cursor, ErrorCode, MonitorEvent, Request, Response, Start,
    WriteOp,
};

/// Splits the fuzzed bytes into a few strings and byte strings for a template message.
pub struct Parts<'a> {
    rest: &'a [u8],
}

impl<'a> Parts<'a> {
    /// Parts of `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Parts { rest: data }
    }

    /// The next up to `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let (a, b) = self.rest.split_at(self.rest.len().min(n));
        self.rest = b;
        a.to_vec()
    }

    /// The next up to `n` bytes as text (lossy).
    pub fn text(&mut self, n: usize) -> String {
        String::from_utf8_lossy(&self.bytes(n)).into_owned()
    }

    /// A number from the next 8 bytes (zero-padded).
    pub fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        let got = self.bytes(8);
        b[..got.len()].copy_from_slice(&got);
        u64::from_le_bytes(b)
    }

    /// A flag from the next byte.
    pub fn flag(&mut self) -> bool {
        self.bytes(1).first().is_some_and(|b| b & 1 == 1)
    }

    /// 16 bytes (a uuid).
    pub fn uuid(&mut self) -> [u8; 16] {
        let mut b = [0u8; 16];
        let got = self.bytes(16);
        b[..got.len()].copy_from_slice(&got);
        b
    }

    /// What is left.
    pub fn rest(self) -> &'a [u8] {
        self.rest
    }
}

/// A request of kind `pick` (every variant is reachable) filled from `p`.
pub fn sample_request(pick: u8, p: &mut Parts<'_>) -> Request {
    match pick % 14 {
        0 => Request::Hello {
            token: p.text(40),
            client: p.text(12),
            protocol: p.u64() as u32,
        },
        1 => Request::Subscribe {
            start: match p.u64() % 4 {
                0 => Start::Earliest,
                1 => Start::Latest,
                2 => Start::Offset(p.u64()),
                _ => Start::Gtid(p.text(50)),
            },
            tree: p.flag().then(|| p.text(6)),
            prefix: p.flag().then(|| p.bytes(6)),
            slot: p.flag().then(|| p.text(6)),
        },
        2 => Request::Ack { offset: p.u64() },
        3 => Request::Get {
            tree: p.text(6),
            key: p.bytes(10),
        },
        4 => Request::Scan {
            tree: p.text(6),
            prefix: p.bytes(6),
            limit: p.u64(),
        },
        5 => Request::Commit {
            ops: vec![
                WriteOp::Put {
                    tree: p.text(4),
                    key: p.bytes(6),
                    value: p.bytes(10),
                },
                WriteOp::Delete {
                    tree: p.text(4),
                    key: p.bytes(6),
                },
                WriteOp::Merge {
                    tree: p.text(4),
                    key: p.bytes(6),
                    operand: p.bytes(8),
                },
            ],
        },
        6 => Request::Status,
        7 => Request::WaitFor {
            gtids: p.text(50),
            timeout_ms: p.u64(),
        },
        8 => Request::Range {
            tree: p.text(6),
            after: p.flag().then(|| p.bytes(6)),
            limit: p.u64(),
        },
        9 => Request::Bootstrap {
            resume: p.flag().then(|| BootstrapResume {
                server_uuid: p.uuid(),
                after_offset: p.u64(),
                cursor: Cursor {
                    tree: p.text(6),
                    key: p.bytes(6),
                    tree_done: p.flag(),
                },
                epoch: p.u64(),
            }),
            chunk_bytes: p.u64(),
        },
        10 => Request::ChunksStored { chunks: p.u64() },
        11 => Request::ScanPage {
            tree: p.text(6),
            prefix: p.bytes(6),
            after: p.flag().then(|| p.bytes(6)),
            limit: p.u64(),
            bytes_max: p.u64(),
        },
        12 => Request::Monitor {
            tree: p.flag().then(|| p.text(6)),
            sample_ppm: p.u64() as u32,
        },
        _ => Request::Status,
    }
}

/// A chunk filled from `p`, its entries packed from the rest of `p` as the server packs them.
pub fn sample_chunk(p: &mut Parts<'_>) -> Chunk {
    let tree = p.text(6);
    let merge_operator = p.flag().then(|| p.text(6));
    let from = p.bytes(2);
    let to = p.flag().then(|| p.bytes(2));
    let offset = p.u64();
    let last = p.flag();
    let mut entries = Vec::new();
    let mut keys: Vec<Vec<u8>> = (0..4).map(|_| p.bytes(3)).collect();
    keys.sort();
    keys.dedup();
    for k in keys {
        let v = p.bytes(5);
        proto::pack_entry(&mut entries, &k, &v);
    }
    Chunk {
        tree,
        merge_operator,
        from,
        to,
        entries,
        offset,
        last,
    }
}

/// A response of kind `pick` (every variant is reachable) filled from `p`.
pub fn sample_response(pick: u8, p: &mut Parts<'_>) -> Response {
    match pick % 16 {
        0 => Response::Welcome {
            server_uuid: p.uuid(),
            protocol: p.u64() as u32,
        },
        1 => Response::Subscribed {
            next_offset: p.u64(),
            head: p.u64(),
            gtids_before: p.text(50),
            epoch: p.u64(),
        },
        2 => Response::Heartbeat {
            head: p.u64(),
            server_time_us: p.u64() as i64,
        },
        3 => Response::Value {
            value: p.flag().then(|| p.bytes(10)),
        },
        4 => Response::Rows {
            rows: (0..3).map(|_| (p.bytes(4), p.bytes(6))).collect(),
        },
        5 => Response::Committed {
            offset: p.u64(),
            gtid: p.text(40),
        },
        6 => Response::Status { json: p.text(40) },
        7 => Response::Fenced {
            reached: p.flag(),
            gtid_executed: p.text(50),
        },
        8 => Response::Error {
            code: match p.u64() % 8 {
                0 => ErrorCode::Unauthorized,
                1 => ErrorCode::InvalidRequest,
                2 => ErrorCode::PositionUnavailable,
                3 => ErrorCode::ReadOnly,
                4 => ErrorCode::TooLarge,
                5 => ErrorCode::Conflict,
                6 => ErrorCode::Unavailable,
                _ => ErrorCode::Internal,
            },
            message: p.text(30),
        },
        9 => Response::BootstrapStarted {
            server_uuid: p.uuid(),
            after_offset: p.u64(),
            keys_estimate: p.u64(),
            bytes_estimate: p.u64(),
            epoch: p.u64(),
        },
        10 => Response::Chunk(sample_chunk(p)),
        11 => Response::BootstrapDone {
            offset: p.u64(),
            gtid_executed: p.text(50),
        },
        12 => Response::Progress {
            through: p.u64(),
            gtids: p.text(50),
        },
        13 => Response::MonitorStarted,
        14 => Response::Monitor {
            events: (0..2)
                .map(|_| MonitorEvent {
                    ts_us: p.u64() as i64,
                    remote: p.text(8),
                    kind: p.text(4),
                    tree: p.text(4),
                    key: p.bytes(4),
                    latency_us: p.u64(),
                    ok: p.flag(),
                })
                .collect(),
            dropped: p.u64(),
        },
        _ => Response::MonitorStarted,
    }
}

/// Applies `edits` to `body`: triples of a little-endian `u16` position (modulo the length)
/// and an XOR mask.
pub fn edit(body: &mut [u8], edits: &[u8]) {
    if body.is_empty() {
        return;
    }
    for e in edits.chunks_exact(3) {
        let at = usize::from(u16::from_le_bytes([e[0], e[1]])) % body.len();
        body[at] ^= e[2];
    }
}

/// The body of `msg`'s frame (without the 5-byte frame header).
pub fn message_body<M>(msg: &M) -> Vec<u8>
where
    M: for<'a> rkyv::Serialize<
            rkyv::api::high::HighSerializer<
                rkyv::util::AlignedVec,
                rkyv::ser::allocator::ArenaHandle<'a>,
                rkyv::rancor::Error,
            >,
        >,
{
    let mut out = Vec::new();
    proto::encode_message(msg, &mut out).expect("a message built in memory encodes");
    out.split_off(proto::FRAME_HEADER_BYTES)
}

/// Asserts that a decoded request re-encodes to a frame that decodes to the same request.
pub fn request_round_trips(req: &Request) {
    let body = message_body(req);
    let back: Request = proto::decode_message(&body).expect("a re-encoded request decodes");
    assert_eq!(&back, req);
}

/// Asserts that a decoded response re-encodes to a frame that decodes to the same response.
pub fn response_round_trips(resp: &Response) {
    let body = message_body(resp);
    let back: Response = proto::decode_message(&body).expect("a re-encoded response decodes");
    assert_eq!(&back, resp);
}
