//! Batches of log records on the wire: building one on the server ([`BatchBuilder`]) and
//! reading one on the client, either into owned transactions ([`decode_batch`]) or as one
//! checked buffer whose records are read in place ([`RawBatch`]).
//!
//! ```text
//!  frame header      body
//!  +--------+------+-----------+----------------------+-----+----------------------+
//!  | len    | kind | count     | log frame 1          | ... | log frame count      |
//!  | u32 LE | 2    | u32 LE    | (docs/FORMAT.md)     |     |                      |
//!  +--------+------+-----------+----------------------+-----+----------------------+
//! ```
//! Owns: the batch body's layout. Must never hand a record to a caller before its frame's
//! length bound and CRC32C were checked.

use bytes::Bytes;
use tideline_wal::record::{self, FrameError, NewTransaction, RawFrame};
use tideline_wal::{Gtid, Offset, Transaction};

use super::{FRAME_HEADER_BYTES, KIND_BATCH, Limits, ProtoError, without_addresses};

/// Bytes a batch frame holds before its records: the frame header and the record count.
pub const BATCH_PREFIX_BYTES: usize = FRAME_HEADER_BYTES + 4;

/// Builds one batch frame from log records in a single buffer: room for the frame header and
/// the record count first, then the records, so that the finished frame is handed on as it is
/// ([`BatchBuilder::take_frame`]) with no copy.
#[derive(Debug)]
pub struct BatchBuilder {
    /// `BATCH_PREFIX_BYTES` reserved for the header, then the record frames.
    buf: Vec<u8>,
    count: u32,
}

impl Default for BatchBuilder {
    fn default() -> Self {
        Self::with_capacity(0)
    }
}

impl BatchBuilder {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty batch with room for `bytes` of records before it reallocates.
    pub fn with_capacity(bytes: usize) -> Self {
        let mut buf = Vec::with_capacity(BATCH_PREFIX_BYTES + bytes);
        buf.resize(BATCH_PREFIX_BYTES, 0);
        BatchBuilder { buf, count: 0 }
    }

    /// Adds one record (re-framed exactly as the log frames it).
    pub fn push(&mut self, txn: &Transaction) -> Result<(), ProtoError> {
        let new = tideline_wal::NewTransaction {
            gtid: txn.gtid,
            timestamp_us: txn.timestamp_us,
            ops: txn.ops.clone(),
        };
        record::encode_frame(txn.offset, &new, &mut self.buf)
            .map_err(|e| ProtoError::BadBatch(e.to_string()))?;
        self.count += 1;
        Ok(())
    }

    /// Adds one record whose frame `fill` appends as the log stores it (no re-encoding);
    /// `fill` returns whether it appended one.
    pub fn push_frame_with<E>(
        &mut self,
        fill: impl FnOnce(&mut Vec<u8>) -> Result<bool, E>,
    ) -> Result<bool, E> {
        let added = fill(&mut self.buf)?;
        if added {
            self.count += 1;
        }
        Ok(added)
    }

    /// Records in the batch.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes of record frames so far.
    pub fn bytes(&self) -> usize {
        self.buf.len() - BATCH_PREFIX_BYTES
    }

    /// Writes the frame header and record count in front of the records.
    fn seal(&mut self) {
        let len = (self.buf.len() - FRAME_HEADER_BYTES) as u32;
        self.buf[..4].copy_from_slice(&len.to_le_bytes());
        self.buf[4] = KIND_BATCH;
        self.buf[FRAME_HEADER_BYTES..BATCH_PREFIX_BYTES].copy_from_slice(&self.count.to_le_bytes());
    }

    /// The finished batch frame (header, count, records) as one buffer, handed over without a
    /// copy; the builder starts again empty with room for `next_capacity` bytes of records.
    pub fn take_frame(&mut self, next_capacity: usize) -> bytes::Bytes {
        self.seal();
        let mut frame = std::mem::replace(&mut self.buf, Self::with_capacity(next_capacity).buf);
        self.count = 0;
        // The frame may be held until its last byte is acknowledged: it keeps no spare room
        // (shrinking in place moves nothing).
        frame.shrink_to_fit();
        bytes::Bytes::from(frame)
    }

    /// Appends the batch frame to `out` and empties the builder (keeping its buffer).
    pub fn finish_into(&mut self, out: &mut Vec<u8>) {
        self.seal();
        out.extend_from_slice(&self.buf);
        self.buf.truncate(BATCH_PREFIX_BYTES);
        self.count = 0;
    }
}

/// Checks every log frame of a batch body (a count and that many frames): length bounds and
/// CRC32C, count, no stray bytes. Calls `each` with every checked frame, in order.
fn check_body<'a>(
    body: &'a [u8],
    limits: &Limits,
    mut each: impl FnMut(usize, RawFrame<'a>) -> Result<(), ProtoError>,
) -> Result<u32, ProtoError> {
    if body.len() < 4 {
        return Err(ProtoError::BadBatch("shorter than its count".into()));
    }
    let count = u32::from_le_bytes([body[0], body[1], body[2], body[3]]);
    let mut pos = 4;
    for i in 0..count as usize {
        let raw = record::check_frame(&body[pos..], limits.record_bytes_max)
            .map_err(|e: FrameError| ProtoError::BadBatch(format!("record {i}: {e}")))?;
        pos += raw.frame_bytes;
        each(i, raw)?;
    }
    if pos != body.len() {
        return Err(ProtoError::BadBatch(format!(
            "{} stray bytes after {count} records",
            body.len() - pos
        )));
    }
    Ok(count)
}

/// Decodes a batch body: a count and that many log frames, into owned transactions.
pub fn decode_batch(body: &[u8], limits: &Limits) -> Result<Vec<Transaction>, ProtoError> {
    // Each frame is at least 16 bytes: bound the allocation by what the body can hold.
    let hint = body
        .get(..4)
        .map_or(0, |c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize);
    let mut out = Vec::with_capacity(hint.min(body.len() / record::FRAME_HEADER_BYTES));
    check_body(body, limits, |i, raw| {
        out.push(decode_record(i, raw)?);
        Ok(())
    })?;
    Ok(out)
}

fn decode_record(i: usize, raw: RawFrame<'_>) -> Result<Transaction, ProtoError> {
    record::decode_payload(raw.offset, raw.payload)
        .map_err(|e| bad_payload(format!("record {i}"), &e))
}

/// A record whose payload failed validation, said without the addresses rkyv's error names
/// (the text may go back to the peer that sent the batch).
fn bad_payload(which: String, e: &dyn std::fmt::Display) -> ProtoError {
    ProtoError::BadBatch(without_addresses(&format!("{which}: {e}")))
}

/// A received batch kept as the one buffer it arrived in: every record's frame is checked
/// (length bound and CRC32C) when the batch is built, and nothing is decoded until asked. For
/// consumers that forward records or read a few fields: no allocation per record.
#[derive(Debug, Clone)]
pub struct RawBatch {
    /// The batch body: the count, then the log frames.
    body: Bytes,
    count: u32,
}

impl RawBatch {
    /// Checks a batch body (a count and that many log frames, as they arrived).
    pub fn check(body: Bytes, limits: &Limits) -> Result<RawBatch, ProtoError> {
        let count = check_body(&body, limits, |_, _| Ok(()))?;
        Ok(RawBatch { body, count })
    }

    /// Records in the batch.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Whether the batch holds no record.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The records' log frames back to back, exactly as the log stores them (a view of the
    /// received buffer, no copy): what a consumer that forwards records passes on.
    pub fn frames(&self) -> Bytes {
        self.body.slice(4..)
    }

    /// The records, in order, read in place.
    pub fn records(&self) -> impl Iterator<Item = RawRecord<'_>> {
        let mut pos = 4;
        (0..self.count).map(move |_| {
            // `check` walked these frames already: the header is there and bounded.
            let len = u32::from_le_bytes([
                self.body[pos],
                self.body[pos + 1],
                self.body[pos + 2],
                self.body[pos + 3],
            ]);
            let total = record::frame_bytes(len);
            let frame = &self.body[pos..pos + total];
            pos += total;
            let mut off = [0u8; 8];
            off.copy_from_slice(&frame[8..16]);
            RawRecord {
                // `check_frame` refused offset 0 when the batch was built.
                offset: Offset::new(u64::from_le_bytes(off)).unwrap_or(Offset::FIRST),
                frame,
                payload: &frame
                    [record::FRAME_HEADER_BYTES..record::FRAME_HEADER_BYTES + len as usize],
            }
        })
    }

    /// Every record decoded into owned transactions (what [`decode_batch`] gives).
    pub fn decode(&self) -> Result<Vec<Transaction>, ProtoError> {
        let mut out = Vec::with_capacity(self.len());
        for r in self.records() {
            out.push(r.decode()?);
        }
        Ok(out)
    }
}

/// One record of a [`RawBatch`]: its frame was checked (CRC32C); its payload is validated only
/// when read.
#[derive(Debug, Clone, Copy)]
pub struct RawRecord<'a> {
    /// The record's offset in the server's log.
    pub offset: Offset,
    frame: &'a [u8],
    payload: &'a [u8],
}

impl<'a> RawRecord<'a> {
    /// The record's log frame, exactly as the log stores it.
    pub fn frame(&self) -> &'a [u8] {
        self.frame
    }

    /// The record validated and read in place (rkyv's archived form: strings and byte
    /// strings borrowed from the batch, nothing allocated).
    pub fn archived(&self) -> Result<&'a rkyv::Archived<NewTransaction>, ProtoError> {
        rkyv::access::<rkyv::Archived<NewTransaction>, rkyv::rancor::Error>(self.payload)
            .map_err(|e| bad_payload(format!("offset {}", self.offset.get()), &e))
    }

    /// The record's GTID (validates the payload, builds nothing else).
    pub fn gtid(&self) -> Result<Gtid, ProtoError> {
        record::payload_gtid(self.payload)
            .map_err(|e| bad_payload(format!("offset {}", self.offset.get()), &e))
    }

    /// The record decoded into an owned transaction.
    pub fn decode(&self) -> Result<Transaction, ProtoError> {
        record::decode_payload(self.offset, self.payload)
            .map_err(|e| bad_payload(format!("offset {}", self.offset.get()), &e))
    }
}
