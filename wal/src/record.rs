//! Log records: one committed transaction each, and their frame on disk.
//!
//! ```text
//!  0        4        8                16                        16+len      frame end
//!  +--------+--------+----------------+-------------------------+-----------+
//!  | len    | crc    | offset         | payload (rkyv NewTxn)   | zero pad  |
//!  | u32 LE | u32 LE | u64 LE         | len bytes               | to 8      |
//!  +--------+--------+----------------+-------------------------+-----------+
//! ```
//! `crc` is CRC32C over `len` (4 bytes) followed by every byte from `offset` to the frame end,
//! padding included, so every bit of a frame is covered. A frame is `16 + len` rounded up to a
//! multiple of 8 bytes. `len` is checked against the configured maximum before anything is
//! allocated. See `docs/FORMAT.md`.

use rkyv::rancor;

use crate::gtid::Gtid;
pub use crate::op::Op;
use crate::{Error, Offset};

/// Size of the frame header in bytes.
pub const FRAME_HEADER_BYTES: usize = 16;
/// Frames are padded to a multiple of this many bytes.
pub const FRAME_ALIGN: usize = 8;
/// Default upper bound on one record's payload: 64 MiB.
pub const DEFAULT_RECORD_BYTES_MAX: u32 = 64 << 20;

/// A committed transaction as it is stored in the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transaction {
    /// Local position in this node's log, dense from 1.
    pub offset: Offset,
    /// Origin GTID, kept unchanged by every node that applies the transaction.
    pub gtid: Gtid,
    /// Commit time on the origin node, microseconds since the Unix epoch.
    pub timestamp_us: i64,
    /// The changes, in order.
    pub ops: Vec<Op>,
}

/// What a writer hands to the log: everything but the offset, which the log assigns. This is
/// also the archived payload of a frame.
///
/// persisted: changes must stay backward compatible.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct NewTransaction {
    /// Origin GTID.
    pub gtid: Gtid,
    /// Commit time on the origin node, microseconds since the Unix epoch.
    pub timestamp_us: i64,
    /// The changes, in order.
    pub ops: Vec<Op>,
}

/// Encodes one frame for `txn` at `offset`, appending it to `out` (what the log writes; also
/// handy for tests and tools that build segments by hand).
pub fn encode_frame(offset: Offset, txn: &NewTransaction, out: &mut Vec<u8>) -> Result<(), Error> {
    let payload = rkyv::to_bytes::<rancor::Error>(txn).map_err(|e| Error::Encode {
        reason: e.to_string(),
    })?;
    append_frame(offset, &payload, out)
}

/// Frames an already encoded payload.
pub(crate) fn append_frame(offset: Offset, payload: &[u8], out: &mut Vec<u8>) -> Result<(), Error> {
    let len = u32::try_from(payload.len()).map_err(|_| Error::RecordTooLarge {
        bytes: payload.len() as u64,
        max: u32::MAX,
    })?;
    let start = out.len();
    let total = frame_bytes(len);
    out.reserve(total);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&offset.get().to_le_bytes());
    out.extend_from_slice(payload);
    out.resize(start + total, 0);
    let crc = frame_crc(&out[start..start + total]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Total bytes of a frame whose payload is `len` bytes.
pub fn frame_bytes(len: u32) -> usize {
    (FRAME_HEADER_BYTES + len as usize).next_multiple_of(FRAME_ALIGN)
}

fn frame_crc(frame: &[u8]) -> u32 {
    let c = crc32c::crc32c(&frame[0..4]);
    crc32c::crc32c_append(c, &frame[8..])
}

/// Why bytes did not decode as a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// Fewer bytes than a header, or than the header's length needs. At the end of the last
    /// segment this is a torn tail.
    Truncated {
        /// Bytes the frame needs.
        needed: usize,
        /// Bytes available.
        available: usize,
    },
    /// The length field exceeds the maximum record size.
    TooLarge {
        /// Payload length claimed by the header.
        len: u32,
        /// Configured maximum.
        max: u32,
    },
    /// The checksum does not match.
    Checksum,
    /// The checksum matches but the payload is not a valid record.
    Payload(String),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Truncated { needed, available } => {
                write!(
                    f,
                    "frame truncated: needs {needed} bytes, {available} present"
                )
            }
            FrameError::TooLarge { len, max } => {
                write!(
                    f,
                    "frame claims {len} payload bytes, more than the limit of {max}"
                )
            }
            FrameError::Checksum => f.write_str("frame checksum mismatch"),
            FrameError::Payload(e) => write!(f, "frame payload is not a valid record: {e}"),
        }
    }
}

/// A frame whose header and checksum were checked; the payload is not decoded yet.
#[derive(Debug, Clone, Copy)]
pub struct RawFrame<'a> {
    /// Offset written in the frame header.
    pub offset: Offset,
    /// The rkyv payload.
    pub payload: &'a [u8],
    /// Bytes the whole frame occupies, padding included.
    pub frame_bytes: usize,
}

/// Checks the frame at the start of `buf`: length bound (before touching the payload), size,
/// checksum and offset. Does not decode the payload.
pub fn check_frame(buf: &[u8], record_bytes_max: u32) -> Result<RawFrame<'_>, FrameError> {
    if buf.len() < FRAME_HEADER_BYTES {
        return Err(FrameError::Truncated {
            needed: FRAME_HEADER_BYTES,
            available: buf.len(),
        });
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len > record_bytes_max {
        return Err(FrameError::TooLarge {
            len,
            max: record_bytes_max,
        });
    }
    let total = frame_bytes(len);
    if buf.len() < total {
        return Err(FrameError::Truncated {
            needed: total,
            available: buf.len(),
        });
    }
    let stored = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    if frame_crc(&buf[..total]) != stored {
        return Err(FrameError::Checksum);
    }
    let mut off = [0u8; 8];
    off.copy_from_slice(&buf[8..16]);
    let offset = Offset::new(u64::from_le_bytes(off))
        .ok_or_else(|| FrameError::Payload("offset 0 in frame header".into()))?;
    Ok(RawFrame {
        offset,
        payload: &buf[FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + len as usize],
        frame_bytes: total,
    })
}

// Frames sit at any address in read and network buffers; decoding them in place relies on the
// pinned `unaligned` rkyv format. A build with other format features fails here.
const _: () = assert!(std::mem::align_of::<rkyv::Archived<NewTransaction>>() == 1);

/// Validates an rkyv payload and turns it into a [`Transaction`].
pub fn decode_payload(offset: Offset, payload: &[u8]) -> Result<Transaction, FrameError> {
    // The pinned `unaligned` format gives every archived type alignment 1 (checked at compile
    // time above), so a payload validates in place at any address: no copy.
    let body = rkyv::from_bytes::<NewTransaction, rancor::Error>(payload)
        .map_err(|e| FrameError::Payload(e.to_string()))?;
    if body.gtid.seq == 0 {
        return Err(FrameError::Payload("GTID number 0".into()));
    }
    Ok(Transaction {
        offset,
        gtid: body.gtid,
        timestamp_us: body.timestamp_us,
        ops: body.ops,
    })
}

/// Validates an rkyv payload and returns only its GTID, without building the transaction
/// (for passing frames on unchanged).
pub fn payload_gtid(payload: &[u8]) -> Result<Gtid, FrameError> {
    let archived = rkyv::access::<rkyv::Archived<NewTransaction>, rancor::Error>(payload)
        .map_err(|e| FrameError::Payload(e.to_string()))?;
    let seq = archived.gtid.seq.to_native();
    if seq == 0 {
        return Err(FrameError::Payload("GTID number 0".into()));
    }
    Ok(Gtid {
        uuid: archived.gtid.uuid,
        seq,
    })
}

/// Checks and decodes the frame at the start of `buf`. Returns the transaction and the number
/// of bytes the frame occupies. Never panics and never allocates more than the frame's checked
/// length, whatever `buf` holds.
pub fn decode_frame(buf: &[u8], record_bytes_max: u32) -> Result<(Transaction, usize), FrameError> {
    let raw = check_frame(buf, record_bytes_max)?;
    let txn = decode_payload(raw.offset, raw.payload)?;
    Ok((txn, raw.frame_bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn sample() -> NewTransaction {
        NewTransaction {
            gtid: Gtid {
                uuid: Uuid::from_bytes([7; 16]),
                seq: 42,
            },
            timestamp_us: 1_700_000_000_000_000,
            ops: vec![
                Op::Put {
                    tree: "default".into(),
                    key: b"k".to_vec(),
                    value: vec![1; 100],
                    before: Some(b"old".to_vec()),
                },
                Op::Delete {
                    tree: "t".into(),
                    key: vec![0xff, 0],
                    before: None,
                },
                Op::Merge {
                    tree: "c".into(),
                    key: b"n".to_vec(),
                    operand: b"1".to_vec(),
                },
                Op::CreateTree {
                    tree: "x".into(),
                    merge_operator: Some("add".into()),
                },
                Op::DropTree { tree: "y".into() },
            ],
        }
    }

    #[test]
    fn frame_round_trips_at_any_alignment() {
        let mut buf = Vec::new();
        encode_frame(Offset::new(9).unwrap(), &sample(), &mut buf).unwrap();
        assert_eq!(buf.len() % FRAME_ALIGN, 0);
        for shift in 0..8 {
            let mut shifted = vec![0u8; shift];
            shifted.extend_from_slice(&buf);
            let (txn, used) = decode_frame(&shifted[shift..], DEFAULT_RECORD_BYTES_MAX).unwrap();
            assert_eq!(used, buf.len());
            assert_eq!(txn.offset.get(), 9);
            assert_eq!(txn.gtid, sample().gtid);
            assert_eq!(txn.ops, sample().ops);
        }
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let mut buf = Vec::new();
        encode_frame(Offset::new(1).unwrap(), &sample(), &mut buf).unwrap();
        for bit in 0..buf.len() * 8 {
            let mut bad = buf.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(
                decode_frame(&bad, DEFAULT_RECORD_BYTES_MAX).is_err(),
                "bit {bit} flipped went unnoticed"
            );
        }
    }

    #[test]
    fn four_gib_length_is_refused_before_allocation() {
        let mut buf = vec![0u8; 64];
        buf[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            decode_frame(&buf, DEFAULT_RECORD_BYTES_MAX).unwrap_err(),
            FrameError::TooLarge {
                len: u32::MAX,
                max: DEFAULT_RECORD_BYTES_MAX
            }
        );
        // Even with the limit lifted, a length past the buffer is "truncated", not a read.
        assert!(matches!(
            decode_frame(&buf, u32::MAX).unwrap_err(),
            FrameError::Truncated { .. }
        ));
    }
}
