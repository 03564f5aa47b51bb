//! Segment files and their header.
//!
//! A segment is named `{first_offset:020}.wal` and starts with a header, followed by frames
//! (see [`crate::record`]) with dense offsets from `first_offset`.
//!
//! ```text
//!  0         8        10       12        16             24            40          48
//!  +---------+--------+--------+---------+--------------+-------------+-----------+
//!  | magic   | format | rkyv   | header  | first_offset | server_uuid | created_us|
//!  | 8 bytes | u16 LE | u16 LE | u32 LE  | u64 LE       | 16 bytes    | i64 LE    |
//!  +---------+--------+--------+---------+--------------+-------------+-----------+
//!  48            52        56              64                          header_bytes
//!  +-------------+---------+---------------+---------------------------+
//!  | gtid_len    | crc     | history_epoch | gtids_before (UTF-8 text) | zero pad to 8
//!  | u32 LE      | u32 LE  | u64 LE        | gtid_len bytes            |
//!  +-------------+---------+---------------+---------------------------+
//! ```
//! `crc` is CRC32C over the whole header (padding included) with the crc field taken as zero.
//! `gtids_before` is the canonical text of every GTID in the log before this segment, which
//! lets a reader asking for "everything not in S" pick its first segment from headers alone.
//! `history_epoch` names the log's history (see [`Epoch`]): every segment of one history
//! carries the same value; a history reset writes its first segment with a new one.
//!
//! Format 1 (read, no longer written) is the same without `history_epoch`: its GTID text
//! starts at byte 56 and its epoch is [`Epoch::INITIAL`].

use uuid::Uuid;

use crate::gtid::GtidSet;
use crate::{Epoch, Offset};

/// The first eight bytes of every segment.
pub const MAGIC: [u8; 8] = *b"TIDELOG\0";
/// Version of the segment and frame layout written by this build.
pub const FORMAT_VERSION: u16 = 3;
/// Oldest segment format this build reads (format 1 has no `history_epoch`).
pub const FORMAT_VERSION_MIN: u16 = 1;
/// Identifies the pinned rkyv format: bit 0 little-endian, bit 1 unaligned primitives,
/// bits 2..4 pointer width (1 = 32 bits). A reader refuses any other value.
pub const RKYV_FORMAT: u16 = 0b0111;
/// Bytes of the fixed part of the header common to every format (enough to read its length).
pub const HEADER_FIXED_BYTES: usize = 56;
/// Bytes of the fixed part of a format 2 or 3 header (with `history_epoch`; format 3 adds the
/// index ops to the records, not to the header).
pub const HEADER_FIXED_BYTES_V2: usize = 64;
/// Largest header accepted when reading: bounds what a corrupt length can make us allocate.
pub const HEADER_BYTES_MAX: u32 = 16 << 20;
/// File name suffix of segments.
pub const SUFFIX: &str = ".wal";

/// A decoded segment header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Offset of the first record in the segment.
    pub first_offset: Offset,
    /// The node that wrote this log.
    pub server_uuid: Uuid,
    /// When the segment was created, microseconds since the Unix epoch.
    pub created_us: i64,
    /// Every GTID in the log before this segment.
    pub gtids_before: GtidSet,
    /// The history this segment belongs to ([`Epoch::INITIAL`] for format 1).
    pub epoch: Epoch,
    /// Total bytes of the header, padding included; the first frame starts here.
    pub header_bytes: u32,
}

/// The file name of the segment starting at `first`.
pub fn file_name(first: Offset) -> String {
    format!("{:020}{SUFFIX}", first.get())
}

/// The first offset encoded in a segment file name, or `None` if `name` is not a segment.
pub fn parse_file_name(name: &str) -> Option<Offset> {
    let stem = name.strip_suffix(SUFFIX)?;
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Offset::new(stem.parse().ok()?)
}

/// Encodes a header of a log that was never reset ([`Epoch::INITIAL`]).
pub fn encode_header(
    first_offset: Offset,
    server_uuid: Uuid,
    created_us: i64,
    gtids_before: &GtidSet,
) -> Vec<u8> {
    encode_header_in_epoch(
        first_offset,
        server_uuid,
        created_us,
        gtids_before,
        Epoch::INITIAL,
    )
}

/// Encodes a header (current format) of a segment of history `epoch`.
pub fn encode_header_in_epoch(
    first_offset: Offset,
    server_uuid: Uuid,
    created_us: i64,
    gtids_before: &GtidSet,
    epoch: Epoch,
) -> Vec<u8> {
    let text = gtids_before.to_string();
    let total = (HEADER_FIXED_BYTES_V2 + text.len()).next_multiple_of(8);
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&RKYV_FORMAT.to_le_bytes());
    out.extend_from_slice(&(total as u32).to_le_bytes());
    out.extend_from_slice(&first_offset.get().to_le_bytes());
    out.extend_from_slice(server_uuid.as_bytes());
    out.extend_from_slice(&created_us.to_le_bytes());
    out.extend_from_slice(&(text.len() as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&epoch.get().to_le_bytes());
    out.extend_from_slice(text.as_bytes());
    out.resize(total, 0);
    let crc = crc32c::crc32c(&out);
    out[52..56].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Why a segment header did not decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderError {
    /// Fewer bytes than the header needs.
    Truncated {
        /// Bytes needed.
        needed: usize,
        /// Bytes available.
        available: usize,
    },
    /// Not a Tideline segment.
    BadMagic,
    /// Written by a newer Tideline (a format above [`FORMAT_VERSION`]) or by a build with
    /// other rkyv features: whole and checksum-valid, so not damage. A format below
    /// [`FORMAT_VERSION_MIN`], which no Tideline writes, is [`HeaderError::Invalid`] instead.
    UnsupportedVersion {
        /// Segment format version found.
        format: u16,
        /// rkyv format id found.
        rkyv: u16,
    },
    /// A field is out of range.
    Invalid(&'static str),
    /// The checksum does not match.
    Checksum,
}

impl std::fmt::Display for HeaderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderError::Truncated { needed, available } => write!(
                f,
                "segment header truncated: needs {needed} bytes, {available} present"
            ),
            HeaderError::BadMagic => f.write_str("not a Tideline log segment (bad magic)"),
            HeaderError::UnsupportedVersion { format, rkyv } => write!(
                f,
                "segment format {format} / rkyv format {rkyv:#06b} is not readable by this \
                 build (it reads formats {FORMAT_VERSION_MIN}-{FORMAT_VERSION}, rkyv \
                 {RKYV_FORMAT:#06b})"
            ),
            HeaderError::Invalid(why) => write!(f, "segment header invalid: {why}"),
            HeaderError::Checksum => f.write_str("segment header checksum mismatch"),
        }
    }
}

/// Reads the total header length from its first bytes, so a caller can read exactly that much.
pub fn header_len(prefix: &[u8]) -> Result<u32, HeaderError> {
    if prefix.len() < HEADER_FIXED_BYTES {
        return Err(HeaderError::Truncated {
            needed: HEADER_FIXED_BYTES,
            available: prefix.len(),
        });
    }
    if prefix[0..8] != MAGIC {
        return Err(HeaderError::BadMagic);
    }
    let total = u32::from_le_bytes([prefix[12], prefix[13], prefix[14], prefix[15]]);
    if (total as usize) < HEADER_FIXED_BYTES || total > HEADER_BYTES_MAX || !total.is_multiple_of(8)
    {
        return Err(HeaderError::Invalid("header length out of range"));
    }
    Ok(total)
}

/// Whether a header's length field (read by [`header_len`]) is the length its format's fixed
/// part and its GTID text make: true of a header cut short while it was written (its first
/// bytes are whole), false of one whose length field was damaged. `prefix` holds at least
/// [`HEADER_FIXED_BYTES`] bytes.
pub fn header_len_is_consistent(prefix: &[u8]) -> bool {
    let (Some(format), Some(total), Some(text)) =
        (prefix.get(8..10), prefix.get(12..16), prefix.get(48..52))
    else {
        return false;
    };
    let fixed = match u16::from_le_bytes([format[0], format[1]]) {
        1 => HEADER_FIXED_BYTES,
        _ => HEADER_FIXED_BYTES_V2,
    };
    let total = u32::from_le_bytes([total[0], total[1], total[2], total[3]]) as usize;
    let text = u32::from_le_bytes([text[0], text[1], text[2], text[3]]) as usize;
    fixed
        .checked_add(text)
        .map(|n| n.next_multiple_of(8))
        .is_some_and(|n| n == total)
}

/// Decodes a header from the start of `buf`.
pub fn decode_header(buf: &[u8]) -> Result<SegmentHeader, HeaderError> {
    let total = header_len(buf)? as usize;
    if buf.len() < total {
        return Err(HeaderError::Truncated {
            needed: total,
            available: buf.len(),
        });
    }
    let h = &buf[..total];
    let stored = u32::from_le_bytes([h[52], h[53], h[54], h[55]]);
    let mut c = crc32c::crc32c(&h[..52]);
    c = crc32c::crc32c_append(c, &[0; 4]);
    c = crc32c::crc32c_append(c, &h[56..]);
    if c != stored {
        return Err(HeaderError::Checksum);
    }
    let u16_at = |i: usize| u16::from_le_bytes([h[i], h[i + 1]]);
    let u64_at = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&h[i..i + 8]);
        u64::from_le_bytes(b)
    };
    let (format, rkyv) = (u16_at(8), u16_at(10));
    // Checked after the checksum, so that a format this build does not know is one a
    // Tideline wrote, not a damaged field: the caller reports it as such, not as corruption.
    if format < FORMAT_VERSION_MIN {
        return Err(HeaderError::Invalid(
            "segment format below the oldest any Tideline wrote",
        ));
    }
    if format > FORMAT_VERSION || rkyv != RKYV_FORMAT {
        return Err(HeaderError::UnsupportedVersion { format, rkyv });
    }
    let (fixed, epoch) = if format == 1 {
        (HEADER_FIXED_BYTES, Epoch::INITIAL)
    } else {
        if total < HEADER_FIXED_BYTES_V2 {
            return Err(HeaderError::Invalid(
                "header shorter than its format's fixed part",
            ));
        }
        (HEADER_FIXED_BYTES_V2, Epoch::new(u64_at(56)))
    };
    let first_offset = Offset::new(u64_at(16)).ok_or(HeaderError::Invalid("first offset is 0"))?;
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&h[24..40]);
    let created_us = u64_at(40) as i64;
    let gtid_len = u32::from_le_bytes([h[48], h[49], h[50], h[51]]) as usize;
    if fixed + gtid_len > total {
        return Err(HeaderError::Invalid("GTID text runs past the header"));
    }
    if h[fixed + gtid_len..].iter().any(|&b| b != 0) {
        return Err(HeaderError::Invalid("non-zero header padding"));
    }
    let text = std::str::from_utf8(&h[fixed..fixed + gtid_len])
        .map_err(|_| HeaderError::Invalid("GTID text is not UTF-8"))?;
    let gtids_before: GtidSet = text
        .parse()
        .map_err(|_| HeaderError::Invalid("GTID text does not parse"))?;
    Ok(SegmentHeader {
        first_offset,
        server_uuid: Uuid::from_bytes(uuid),
        created_us,
        gtids_before,
        epoch,
        header_bytes: total as u32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_detects_every_bit_flip() {
        let gtids: GtidSet = "3e11fa47-71ca-11e1-9e33-c80aa9429562:1-5:9"
            .parse()
            .unwrap();
        let uuid = Uuid::from_bytes([3; 16]);
        let h = encode_header(Offset::new(77).unwrap(), uuid, 123, &gtids);
        let d = decode_header(&h).unwrap();
        assert_eq!(d.first_offset.get(), 77);
        assert_eq!(d.server_uuid, uuid);
        assert_eq!(d.created_us, 123);
        assert_eq!(d.gtids_before, gtids);
        assert_eq!(d.header_bytes as usize, h.len());
        for bit in 0..h.len() * 8 {
            let mut bad = h.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(decode_header(&bad).is_err(), "bit {bit}");
        }
    }

    #[test]
    fn epochs_round_trip_and_format_1_headers_still_read() {
        let gtids: GtidSet = "3e11fa47-71ca-11e1-9e33-c80aa9429562:1-5".parse().unwrap();
        let uuid = Uuid::from_bytes([3; 16]);
        let first = Offset::new(9).unwrap();
        let h = encode_header_in_epoch(first, uuid, 5, &gtids, Epoch::new(42));
        assert_eq!(decode_header(&h).unwrap().epoch, Epoch::new(42));
        assert_eq!(
            decode_header(&encode_header(first, uuid, 5, &gtids))
                .unwrap()
                .epoch,
            Epoch::INITIAL
        );
        // A format 1 header, as builds before epochs wrote it.
        let text = gtids.to_string();
        let total = (HEADER_FIXED_BYTES + text.len()).next_multiple_of(8);
        let mut v1 = Vec::new();
        v1.extend_from_slice(&MAGIC);
        v1.extend_from_slice(&1u16.to_le_bytes());
        v1.extend_from_slice(&RKYV_FORMAT.to_le_bytes());
        v1.extend_from_slice(&(total as u32).to_le_bytes());
        v1.extend_from_slice(&first.get().to_le_bytes());
        v1.extend_from_slice(uuid.as_bytes());
        v1.extend_from_slice(&5i64.to_le_bytes());
        v1.extend_from_slice(&(text.len() as u32).to_le_bytes());
        v1.extend_from_slice(&[0; 4]);
        v1.extend_from_slice(text.as_bytes());
        v1.resize(total, 0);
        let crc = crc32c::crc32c(&v1);
        v1[52..56].copy_from_slice(&crc.to_le_bytes());
        let d = decode_header(&v1).unwrap();
        assert_eq!(
            (d.first_offset, d.gtids_before, d.epoch),
            (first, gtids, Epoch::INITIAL)
        );
    }

    #[test]
    fn file_names_sort_by_offset() {
        let a = file_name(Offset::new(9).unwrap());
        let b = file_name(Offset::new(10).unwrap());
        assert!(a < b);
        assert_eq!(parse_file_name(&b).unwrap().get(), 10);
        assert!(parse_file_name("slots.json").is_none());
        assert!(parse_file_name("00000000000000000000.wal").is_none());
    }
}
