//! The wire protocol, with no I/O: frames, messages and the two ends of a subscription as
//! state machines. Time is an argument; nothing here touches sockets, clocks or tokio.
//!
//! Every QUIC stream carries a sequence of frames in each direction:
//!
//! ```text
//!  0        4      5
//!  +--------+------+------------------------------+
//!  | len    | kind | body (len bytes)             |
//!  | u32 LE | u8   |                              |
//!  +--------+------+------------------------------+
//! ```
//! `kind` 1 is a message (an rkyv archive of [`Request`] or [`Response`]); `kind` 2 is a
//! batch of log records: `u32 LE count` followed by `count` log frames exactly as the log
//! stores them (length, CRC32C, offset, payload; see `docs/FORMAT.md`), so every record is
//! checksummed end to end. `len` is checked against the limit for its kind before anything is
//! allocated. See `docs/PROTOCOL.md`.

use bytes::{Buf, BytesMut};
use rkyv::rancor;
use tideline_wal::record;
use tideline_wal::{Gtid, GtidSet, Offset, Transaction};

/// ALPN protocol id.
pub const ALPN: &[u8] = b"tideline/1";
/// Protocol version sent in [`Request::Hello`] and [`Response::Welcome`]; both ends refuse
/// another one. 2: `Subscribed` carries `gtids_before` and the history `epoch`, filtered
/// subscriptions get `Progress`, `BootstrapStarted` and `BootstrapResume` carry the epoch.
pub const PROTOCOL_VERSION: u32 = 2;
/// Bytes of a frame header.
pub const FRAME_HEADER_BYTES: usize = 5;
/// Frame kind: a message.
pub const KIND_MESSAGE: u8 = 1;
/// Frame kind: a batch of log records.
pub const KIND_BATCH: u8 = 2;

/// Size limits, enforced before allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest message body. Default 17 MiB: a 16 MiB value plus its key and envelope.
    pub message_bytes_max: u32,
    /// Largest batch body. Default 64 MiB (one record may be that large).
    pub batch_bytes_max: u32,
    /// Largest single record inside a batch. Default 64 MiB, as in the log.
    pub record_bytes_max: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            message_bytes_max: 17 << 20,
            batch_bytes_max: 64 << 20,
            record_bytes_max: record::DEFAULT_RECORD_BYTES_MAX,
        }
    }
}

mod batch;
pub mod bootstrap;
mod messages;
pub use batch::{BATCH_PREFIX_BYTES, BatchBuilder, RawBatch, RawRecord, decode_batch};
pub use bootstrap::{
    BootstrapPosition, CopyRecord, Cursor, checked_entries, pack_entry, packed_parts,
    unpack_entries,
};
pub use messages::{
    BootstrapResume, Chunk, ErrorCode, IndexDef, IndexQuery, MonitorEvent, Request, Response,
    Start, WriteOp,
};

/// Protocol violations and decoding failures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    /// A frame header announced more bytes than the limit allows.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes for its kind")]
    FrameTooLarge {
        /// Announced length.
        len: u32,
        /// Limit.
        max: u32,
    },
    /// Unknown frame kind.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// A message body did not validate.
    #[error("malformed message: {0}")]
    BadMessage(String),
    /// A batch did not decode.
    #[error("malformed batch: {0}")]
    BadBatch(String),
    /// The peer sent something out of order.
    #[error("protocol violation: {0}")]
    Violation(String),
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame")]
    Truncated,
}

/// A decoded frame. `B` is how a batch's records come: owned transactions, or a [`RawBatch`]
/// read in place ([`FrameDecoder::next_raw_frame`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<M, B = Vec<Transaction>> {
    /// A message.
    Message(M),
    /// Records of a batch.
    Batch(B),
}

/// Appends a message frame to `out`.
pub fn encode_message<M>(msg: &M, out: &mut Vec<u8>) -> Result<(), ProtoError>
where
    M: for<'a> rkyv::Serialize<
            rkyv::api::high::HighSerializer<
                rkyv::util::AlignedVec,
                rkyv::ser::allocator::ArenaHandle<'a>,
                rancor::Error,
            >,
        >,
{
    let body =
        rkyv::to_bytes::<rancor::Error>(msg).map_err(|e| ProtoError::BadMessage(e.to_string()))?;
    let len = u32::try_from(body.len()).map_err(|_| ProtoError::FrameTooLarge {
        len: u32::MAX,
        max: u32::MAX,
    })?;
    out.extend_from_slice(&len.to_le_bytes());
    out.push(KIND_MESSAGE);
    out.extend_from_slice(&body);
    Ok(())
}

/// Decodes one message body.
pub fn decode_message<M>(body: &[u8]) -> Result<M, ProtoError>
where
    M: rkyv::Archive,
    M::Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rancor::Error>>
        + rkyv::Deserialize<M, rkyv::api::high::HighDeserializer<rancor::Error>>,
{
    rkyv::from_bytes::<M, rancor::Error>(body)
        .map_err(|e| ProtoError::BadMessage(without_addresses(&e.to_string())))
}

/// `text` with every hexadecimal number of 8 digits or more replaced by `<addr>`. rkyv's
/// validation errors name addresses of the buffer they check, and a peer gets the error text
/// back (even an unauthenticated one, for a malformed `Hello`): it must learn nothing about
/// the node's memory layout.
fn without_addresses(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("0x") {
        let digits = rest[at + 2..]
            .bytes()
            .take_while(u8::is_ascii_hexdigit)
            .count();
        let end = at + 2 + digits;
        out.push_str(&rest[..at]);
        out.push_str(if digits >= 8 {
            "<addr>"
        } else {
            &rest[at..end]
        });
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// Incremental frame decoder: feed bytes as they arrive, take whole frames out.
#[derive(Debug)]
pub struct FrameDecoder {
    /// Received bytes not yet taken out as frames, from the start of the next frame.
    buf: BytesMut,
    limits: Limits,
}

impl FrameDecoder {
    /// A decoder enforcing `limits`.
    pub fn new(limits: Limits) -> Self {
        FrameDecoder {
            buf: BytesMut::new(),
            limits,
        }
    }

    /// Adds received bytes.
    pub fn feed(&mut self, data: &[u8]) {
        // Room for the whole frame at once, once its header is checked: a large batch is
        // gathered into one buffer without growing it step by step (and it is that buffer a
        // `RawBatch` keeps). The buffer never holds more than one frame plus one chunk.
        if let Ok(more) = self.needed()
            && self.buf.len() >= FRAME_HEADER_BYTES
        {
            self.buf.reserve(more.max(data.len()));
        }
        self.buf.extend_from_slice(data);
    }

    /// Bytes buffered and not yet consumed.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// How many more bytes the next frame needs (0 if one is complete); lets the I/O shell
    /// read exactly that much. Fails at once on an oversized or unknown frame header.
    pub fn needed(&self) -> Result<usize, ProtoError> {
        let avail = self.buffered();
        if avail < FRAME_HEADER_BYTES {
            return Ok(FRAME_HEADER_BYTES - avail);
        }
        let h = &self.buf[..];
        let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        let max = match h[4] {
            KIND_MESSAGE => self.limits.message_bytes_max,
            KIND_BATCH => self.limits.batch_bytes_max,
            other => return Err(ProtoError::UnknownKind(other)),
        };
        if len > max {
            return Err(ProtoError::FrameTooLarge { len, max });
        }
        Ok((FRAME_HEADER_BYTES + len as usize).saturating_sub(avail))
    }

    /// The next complete frame, if any, with a batch decoded into owned transactions.
    pub fn next_frame<M>(&mut self) -> Result<Option<Frame<M>>, ProtoError>
    where
        M: rkyv::Archive,
        M::Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rancor::Error>>
            + rkyv::Deserialize<M, rkyv::api::high::HighDeserializer<rancor::Error>>,
    {
        Ok(match self.next_raw_frame::<M>()? {
            None => None,
            Some(Frame::Message(m)) => Some(Frame::Message(m)),
            Some(Frame::Batch(b)) => Some(Frame::Batch(b.decode()?)),
        })
    }

    /// The next complete frame, if any, with a batch kept as the buffer it arrived in (every
    /// record's frame checked, nothing decoded): no copy and no allocation per record.
    pub fn next_raw_frame<M>(&mut self) -> Result<Option<Frame<M, RawBatch>>, ProtoError>
    where
        M: rkyv::Archive,
        M::Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rancor::Error>>
            + rkyv::Deserialize<M, rkyv::api::high::HighDeserializer<rancor::Error>>,
    {
        if self.needed()? > 0 {
            return Ok(None);
        }
        let h = &self.buf[..];
        let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
        let frame = match h[4] {
            KIND_MESSAGE => {
                let m = decode_message::<M>(&h[FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + len])?;
                self.buf.advance(FRAME_HEADER_BYTES + len);
                Frame::Message(m)
            }
            _ => {
                // The frame's bytes leave the buffer as they are: the batch keeps them.
                let mut whole = self.buf.split_to(FRAME_HEADER_BYTES + len);
                whole.advance(FRAME_HEADER_BYTES);
                Frame::Batch(RawBatch::check(whole.freeze(), &self.limits)?)
            }
        };
        Ok(Some(frame))
    }
}

/// The server's side of one subscription: what to send next, when a heartbeat or a progress
/// report is due, what the consumer acknowledged.
#[derive(Debug)]
pub struct ServerSubscription {
    next_offset: u64,
    acked: u64,
    last_sent_us: i64,
    heartbeat_every_us: i64,
    /// Filtered subscriptions only: what progress reports need.
    progress: Option<ProgressState>,
}

#[derive(Debug)]
struct ProgressState {
    /// Every GTID before `next_offset`: the start's covered set plus each record considered.
    covered: GtidSet,
    /// Highest offset the consumer knows was considered (a record sent, or a report).
    announced: u64,
}

impl ServerSubscription {
    /// A subscription whose first candidate record is `next_offset`, at time `now_us`.
    pub fn new(next_offset: u64, heartbeat_every_us: i64, now_us: i64) -> Self {
        ServerSubscription {
            next_offset,
            acked: next_offset.saturating_sub(1),
            last_sent_us: now_us,
            heartbeat_every_us,
            progress: None,
        }
    }

    /// Makes this a filtered subscription that reports progress; `covered` is every GTID
    /// before `next_offset` (what `Subscribed` announced). Records considered must then be
    /// passed to [`ServerSubscription::on_considered`].
    pub fn with_progress(mut self, covered: GtidSet) -> Self {
        self.progress = Some(ProgressState {
            covered,
            announced: self.next_offset.saturating_sub(1),
        });
        self
    }

    /// Records that the record at `offset` with `gtid` was considered (sent or filtered out).
    pub fn on_considered(&mut self, offset: u64, gtid: Gtid) {
        self.next_offset = self.next_offset.max(offset + 1);
        if let Some(p) = &mut self.progress {
            p.covered.insert(gtid);
        }
    }

    /// A progress report to send now, if the filter dropped records after the last one the
    /// consumer heard of. Counts as something sent (it postpones the next heartbeat).
    pub fn poll_progress(&mut self, now_us: i64) -> Option<Response> {
        let through = self.next_offset.saturating_sub(1);
        let p = self.progress.as_mut()?;
        if through <= p.announced {
            return None;
        }
        p.announced = through;
        self.last_sent_us = now_us;
        Some(Response::Progress {
            through,
            gtids: p.covered.to_string(),
        })
    }

    /// The next offset the server will consider.
    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }

    /// Highest offset the consumer acknowledged.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Records that a batch whose last record is `last_sent` went out at `now_us`.
    pub fn on_sent(&mut self, last_sent: u64, now_us: i64) {
        self.next_offset = self.next_offset.max(last_sent + 1);
        self.last_sent_us = now_us;
        if let Some(p) = &mut self.progress {
            p.announced = p.announced.max(last_sent);
        }
    }

    /// Records that records up to `through` were considered but filtered out (nothing sent).
    pub fn on_skipped(&mut self, through: u64) {
        self.next_offset = self.next_offset.max(through + 1);
    }

    /// A heartbeat to send now, if one is due.
    pub fn poll_heartbeat(&mut self, head: u64, now_us: i64) -> Option<Response> {
        if now_us - self.last_sent_us >= self.heartbeat_every_us {
            self.last_sent_us = now_us;
            return Some(Response::Heartbeat {
                head,
                server_time_us: now_us,
            });
        }
        None
    }

    /// When the next heartbeat is due.
    pub fn heartbeat_due_us(&self) -> i64 {
        self.last_sent_us + self.heartbeat_every_us
    }

    /// Handles a consumer's ack. An ack past what was sent is a violation.
    pub fn handle_ack(&mut self, offset: u64) -> Result<(), ProtoError> {
        if offset >= self.next_offset {
            return Err(ProtoError::Violation(format!(
                "ack of offset {offset} but only offsets before {} were sent",
                self.next_offset
            )));
        }
        self.acked = self.acked.max(offset);
        Ok(())
    }
}

/// The consumer's side of one subscription: checks that records arrive in order, once, and
/// knows where to resume.
#[derive(Debug, Clone)]
pub struct ClientSubscription {
    /// Highest offset delivered to the application.
    last_offset: Option<u64>,
    /// GTIDs delivered (or known before the subscription started).
    seen: GtidSet,
    /// Server's last reported head.
    head: u64,
    /// Server clock at the last heartbeat, microseconds.
    last_heartbeat_us: Option<i64>,
}

impl ClientSubscription {
    /// A fresh subscription that has delivered nothing, knowing `seen` GTIDs already.
    pub fn new(seen: GtidSet) -> Self {
        ClientSubscription {
            last_offset: None,
            seen,
            head: 0,
            last_heartbeat_us: None,
        }
    }

    /// The same subscription resumed on the same server after `offset` was delivered.
    pub fn resuming_after(mut self, offset: u64) -> Self {
        self.last_offset = Some(offset);
        self
    }

    /// Highest offset delivered.
    pub fn last_offset(&self) -> Option<u64> {
        self.last_offset
    }

    /// GTIDs delivered, plus those known at the start.
    pub fn seen(&self) -> &GtidSet {
        &self.seen
    }

    /// The server's last reported head.
    pub fn head(&self) -> u64 {
        self.head
    }

    /// Where to resume after a reconnect to the same server: right after the last delivered
    /// offset, or `fallback` if nothing was delivered yet.
    pub fn resume_start(&self, fallback: Start) -> Start {
        match self.last_offset {
            Some(o) => Start::Offset(o + 1),
            None => fallback,
        }
    }

    /// Handles a `Subscribed` answer: the server must start at or before the resume point.
    /// `gtids_before` (everything covered before the start) counts as seen, so a failover
    /// never replays history from before the start point.
    pub fn handle_subscribed(
        &mut self,
        next_offset: u64,
        head: u64,
        gtids_before: &GtidSet,
    ) -> Result<(), ProtoError> {
        self.head = head;
        if let Some(last) = self.last_offset
            && next_offset > last + 1
        {
            return Err(ProtoError::Violation(format!(
                "server resumes at offset {next_offset} but offset {} was expected next",
                last + 1
            )));
        }
        self.seen.union_with(gtids_before);
        Ok(())
    }

    /// Handles a progress report of a filtered subscription: everything through `through`
    /// was considered and `gtids` is covered. The position moves past records the filter
    /// dropped; nothing is delivered.
    pub fn handle_progress(&mut self, through: u64, gtids: &GtidSet) {
        if self.last_offset.is_none_or(|l| through > l) {
            self.last_offset = Some(through);
        }
        self.head = self.head.max(through);
        self.seen.union_with(gtids);
    }

    /// Handles a heartbeat.
    pub fn handle_heartbeat(&mut self, head: u64, server_time_us: i64) {
        self.head = self.head.max(head);
        self.last_heartbeat_us = Some(server_time_us);
    }

    /// Checks a batch and returns the records to deliver: offsets strictly increasing,
    /// nothing delivered twice. Records at or before the last delivered offset are dropped
    /// (a server may resend them after a reconnect); a GTID already seen is dropped too.
    pub fn handle_batch(&mut self, txns: Vec<Transaction>) -> Result<Vec<Transaction>, ProtoError> {
        let mut out = Vec::with_capacity(txns.len());
        let mut prev: Option<u64> = None;
        for txn in txns {
            let o = txn.offset.get();
            if prev.is_some_and(|p| o <= p) {
                return Err(ProtoError::Violation(format!(
                    "offset {o} arrived after offset {}",
                    prev.unwrap_or(0)
                )));
            }
            prev = Some(o);
            if self.last_offset.is_some_and(|l| o <= l) {
                continue;
            }
            self.last_offset = Some(o);
            self.head = self.head.max(o);
            if !self.seen.insert(txn.gtid) {
                continue;
            }
            out.push(txn);
        }
        Ok(out)
    }
}

/// Parses a start position from its wire form into a log position request.
pub fn start_gtids(start: &Start) -> Result<Option<GtidSet>, ProtoError> {
    match start {
        Start::Gtid(text) => text
            .parse::<GtidSet>()
            .map(Some)
            .map_err(|e| ProtoError::Violation(e.to_string())),
        _ => Ok(None),
    }
}

/// An offset from its wire form.
pub fn wire_offset(n: u64) -> Result<Offset, ProtoError> {
    Offset::new(n).ok_or_else(|| ProtoError::Violation("offset 0 does not exist".into()))
}

#[cfg(test)]
mod tests;
