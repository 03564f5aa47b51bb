//! Damaged bytes on disk: flipped bits in closed segments, damage inside the last segment, and a
//! frame claiming a 4 GiB payload.
//!
//! Scenario: 1,000 seeded cases, each flipping one bit of a closed segment of a multi-segment
//! log (in the segment header, a frame header, a payload or padding, or anywhere), then
//! reopening. The damage must be reported as `Error::Corrupt` naming the damaged file, by `open`
//! or by reading the log; with `verify_on_open`, by `open` itself.
//!
//! Guards against: damage accepted silently (wrong records served as good), damage in the middle
//! of the last segment mistaken for a torn tail and cut away with the records after it, and a
//! corrupt length making the reader allocate what it claims before checking it. Canary: a
//! payload changed *with its checksum recomputed* (damage the checksum cannot see) must be
//! reported by the same checker as accepted silently.

mod common;

use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tideline_wal::record::{self, FRAME_HEADER_BYTES, FrameError};
use tideline_wal::segment;
use tideline_wal::{
    CrashMode, Error, GtidSet, MemStorage, NewTransaction, Offset, Storage, Wal, WalOptions,
};

use common::{UUID, check_log, opts, read_file, segment_names, txn_for};

/// Records the largest single allocation made by each thread, so a test can show a bogus
/// length was refused before anything of that size was allocated. Per thread, because the
/// tests of this binary run in parallel and each reads the log on its own thread.
mod alloc_probe {
    #![expect(
        unsafe_code,
        reason = "a global allocator that measures allocations needs `unsafe impl GlobalAlloc`"
    )]

    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    thread_local! {
        // Const-initialised and without a destructor: using it never allocates.
        static LARGEST: Cell<usize> = const { Cell::new(0) };
    }

    fn note(bytes: usize) {
        let _ = LARGEST.try_with(|l| l.set(l.get().max(bytes)));
    }

    pub struct Probe;

    // SAFETY: every call is forwarded unchanged to the system allocator.
    unsafe impl GlobalAlloc for Probe {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            note(layout.size());
            // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which we pass on.
            unsafe { System.alloc(layout) }
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            note(layout.size());
            // SAFETY: as for `alloc`.
            unsafe { System.alloc_zeroed(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: `ptr` came from this allocator, that is from `System`, with `layout`.
            unsafe { System.dealloc(ptr, layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            note(new_size);
            // SAFETY: as for `dealloc`, and the caller upholds `realloc`'s contract.
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }

    #[global_allocator]
    static GLOBAL: Probe = Probe;

    /// Largest allocation so far on this thread, in bytes.
    pub fn largest_bytes() -> usize {
        LARGEST.with(Cell::get)
    }
}

/// Far below the bogus lengths used here, and above anything reading these small logs needs
/// (the reader's chunk is 1 MiB).
const ALLOC_LIMIT_BYTES: usize = 8 << 20;

fn assert_no_huge_allocation() {
    let largest = alloc_probe::largest_bytes();
    assert!(
        largest < ALLOC_LIMIT_BYTES,
        "an allocation of {largest} bytes happened: a length was trusted before it was checked"
    );
}

/// A closed log of `records` records in small segments, built once and copied per case.
fn build_log(segment_bytes_max: u64, records: u64) -> MemStorage {
    let storage = MemStorage::new();
    let wal = Wal::open(Arc::new(storage.clone()), opts(segment_bytes_max)).expect("open");
    for seq in 1..=records {
        wal.append(txn_for(seq)).expect("append");
    }
    wal.close().expect("close");
    storage
}

/// A copy of a closed log (everything is synced, so the crash image is the whole log).
fn copy(storage: &MemStorage) -> MemStorage {
    storage.crash(CrashMode::DropUnsynced)
}

/// Where the bytes of a segment belong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Region {
    Header,
    FrameHeader,
    Payload,
    Padding,
}

/// One region of one segment: `[start, end)`, plus the start of the frame it belongs to.
#[derive(Clone, Debug)]
struct Span {
    name: String,
    region: Region,
    start: u64,
    end: u64,
}

fn spans_of(name: &str, bytes: &[u8]) -> Vec<Span> {
    let header = segment::decode_header(bytes).expect("an undamaged header");
    let span = |region, start: usize, end: usize| Span {
        name: name.to_owned(),
        region,
        start: start as u64,
        end: end as u64,
    };
    let mut out = vec![span(Region::Header, 0, header.header_bytes as usize)];
    let mut pos = header.header_bytes as usize;
    while pos < bytes.len() {
        let raw = record::check_frame(&bytes[pos..], u32::MAX).expect("an undamaged frame");
        let payload_end = pos + FRAME_HEADER_BYTES + raw.payload.len();
        out.push(span(Region::FrameHeader, pos, pos + FRAME_HEADER_BYTES));
        if !raw.payload.is_empty() {
            out.push(span(Region::Payload, pos + FRAME_HEADER_BYTES, payload_end));
        }
        if payload_end < pos + raw.frame_bytes {
            out.push(span(Region::Padding, payload_end, pos + raw.frame_bytes));
        }
        pos += raw.frame_bytes;
    }
    out
}

/// Opens a damaged log and says how the damage in `name` at `byte` was detected, or why it
/// was not. Never panics: the canary needs the "not detected" answer.
fn detect(
    image: &MemStorage,
    name: &str,
    byte: u64,
    opts: &WalOptions,
) -> Result<&'static str, String> {
    let want_file = image.describe(name);
    let check_corrupt = |e: Error, when: &'static str| match e {
        Error::Corrupt { file, byte: at, .. } if file == want_file && at <= byte => Ok(when),
        Error::Corrupt {
            file,
            byte: at,
            reason,
        } => Err(format!(
            "{when}: Corrupt names {file} at byte {at} ({reason}), but the damage is in \
             {want_file} at byte {byte}"
        )),
        other => Err(format!("{when}: failed with `{other}`, not Error::Corrupt")),
    };
    let wal = match Wal::open(Arc::new(image.clone()), opts.clone()) {
        Ok(wal) => wal,
        Err(e) => return check_corrupt(e, "open"),
    };
    if let Err(e) = wal.verify() {
        if opts.verify_on_open {
            return Err(format!(
                "open with verify_on_open accepted it; verify then said `{e}`"
            ));
        }
        return check_corrupt(e, "verify");
    }
    match check_log(&wal, 0) {
        Ok(n) => Err(format!(
            "ACCEPTED SILENTLY: all {n} records read back as written"
        )),
        Err(e) => Err(format!("ACCEPTED SILENTLY, and served wrong data: {e}")),
    }
}

#[test]
fn every_flipped_bit_in_a_closed_segment_is_detected() {
    // A few base logs with different segment sizes, hence different layouts.
    let bases: Vec<MemStorage> = (0..6).map(|i| build_log(600 + 300 * i, 40)).collect();
    let spans: Vec<Vec<Span>> = bases
        .iter()
        .map(|b| {
            let names = segment_names(b);
            assert!(names.len() >= 3, "the base log must have closed segments");
            names[..names.len() - 1]
                .iter()
                .flat_map(|n| spans_of(n, &read_file(b, n)))
                .collect()
        })
        .collect();
    let mut rng = StdRng::seed_from_u64(0x7D1E);
    let mut hits = [0u32; 5];
    for case in 0..1000u64 {
        let base = case as usize % bases.len();
        let all = &spans[base];
        // Cycle through the regions, and every fifth case pick any bit of any closed segment.
        let kind = (case / bases.len() as u64) % 5;
        let (name, bit) = if kind == 4 {
            let names = segment_names(&bases[base]);
            let name = names[rng.random_range(0..names.len() - 1)].clone();
            let bits = bases[base].file_len(&name).expect("len") * 8;
            (name, rng.random_range(0..bits))
        } else {
            let region = [
                Region::Header,
                Region::FrameHeader,
                Region::Payload,
                Region::Padding,
            ][kind as usize];
            let of_kind: Vec<&Span> = all.iter().filter(|s| s.region == region).collect();
            let s = of_kind[rng.random_range(0..of_kind.len())];
            (s.name.clone(), rng.random_range(s.start * 8..s.end * 8))
        };
        hits[kind as usize] += 1;
        let image = copy(&bases[base]);
        image.flip_bit(&name, bit).expect("flip");
        let verify_on_open = case % 2 == 1;
        let opts = WalOptions {
            verify_on_open,
            ..opts(600)
        };
        if let Err(e) = detect(&image, &name, bit / 8, &opts) {
            panic!(
                "case {case}: bit {bit} (byte {}) of {name} in base log {base}, \
                 verify_on_open={verify_on_open}: {e}",
                bit / 8
            );
        }
    }
    assert!(hits.iter().all(|&h| h >= 150), "regions hit: {hits:?}");
}

#[test]
fn canary_checksum_blind_damage_is_reported_as_accepted() {
    // The checker must notice damage that slipped past the log: change one record's value and
    // re-frame it with a valid checksum, in a closed segment.
    let base = build_log(600, 40);
    let names = segment_names(&base);
    let name = &names[1];
    let bytes = read_file(&base, name);
    let header = segment::decode_header(&bytes).expect("header");
    let pos = header.header_bytes as usize;
    let (txn, used) = record::decode_frame(&bytes[pos..], u32::MAX).expect("first frame");
    let mut changed = NewTransaction {
        gtid: txn.gtid,
        timestamp_us: txn.timestamp_us,
        ops: txn.ops.clone(),
    };
    changed.timestamp_us ^= 1;
    let mut frame = Vec::new();
    record::encode_frame(txn.offset, &changed, &mut frame).expect("encode");
    assert_eq!(frame.len(), used, "same shape, same frame size");
    let image = copy(&base);
    image
        .open(name)
        .and_then(|f| f.write_all_at(&frame, pos as u64))
        .expect("tamper");
    for verify_on_open in [false, true] {
        let opts = WalOptions {
            verify_on_open,
            ..opts(600)
        };
        let err = detect(&image, name, pos as u64, &opts)
            .expect_err("checksum-blind damage must be reported as accepted");
        assert!(err.contains("ACCEPTED SILENTLY"), "unexpected: {err}");
    }
}

/// The byte positions of the frames of a single-segment log's segment.
fn frame_starts(bytes: &[u8]) -> Vec<usize> {
    spans_of("", bytes)
        .into_iter()
        .filter(|s| s.region == Region::FrameHeader)
        .map(|s| s.start as usize)
        .collect()
}

#[test]
fn damage_inside_the_last_segment_is_an_error_not_a_torn_tail() {
    let base = build_log(1 << 20, 12);
    let names = segment_names(&base);
    assert_eq!(names.len(), 1);
    let name = &names[0];
    let bytes = read_file(&base, name);
    let starts = frame_starts(&bytes);
    assert_eq!(starts.len(), 12);
    let len = bytes.len() as u64;
    // Damage record 1 (its header), 5 (its payload) and 11 (its last byte): each has valid
    // records after it.
    for (record, byte) in [
        (1, starts[0] + 2),
        (5, starts[4] + FRAME_HEADER_BYTES + 3),
        (11, starts[11] - 1),
    ] {
        let image = copy(&base);
        image.flip_bit(name, byte as u64 * 8 + 5).expect("flip");
        for _ in 0..2 {
            match Wal::open(Arc::new(image.clone()), opts(1 << 20)) {
                Err(Error::Corrupt {
                    file,
                    byte: at,
                    reason,
                }) => {
                    assert_eq!(file, image.describe(name));
                    assert_eq!(at as usize, starts[record - 1], "{reason}");
                }
                other => panic!("record {record} damaged: expected Corrupt, got {other:?}"),
            }
            // Nothing was cut: a refused open changes nothing, and opening again says the same.
            assert_eq!(image.file_len(name).expect("len"), len);
        }
    }
}

#[test]
fn damage_in_the_final_record_of_the_last_segment_is_cut_as_a_torn_tail() {
    // The documented limit of torn-tail recovery: damage in the very last frame looks exactly
    // like a torn write, so it is cut and the records before it are kept.
    let base = build_log(1 << 20, 12);
    let name = &segment_names(&base)[0];
    let bytes = read_file(&base, name);
    let last = *frame_starts(&bytes).last().expect("frames");
    let image = copy(&base);
    image
        .flip_bit(name, (last + FRAME_HEADER_BYTES) as u64 * 8)
        .expect("flip");
    let wal = Wal::open(Arc::new(image.clone()), opts(1 << 20)).expect("open");
    assert_eq!(
        wal.recovery_report().truncated_bytes,
        (bytes.len() - last) as u64
    );
    assert_eq!(check_log(&wal, 11), Ok(11));
    drop(wal);
    assert_eq!(image.file_len(name).expect("len"), last as u64);
}

/// A frame header claiming a payload of `len` bytes, for offset `offset`.
fn bogus_frame_header(len: u32, offset: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(FRAME_HEADER_BYTES);
    h.extend_from_slice(&len.to_le_bytes());
    h.extend_from_slice(&0xdead_beefu32.to_le_bytes());
    h.extend_from_slice(&offset.to_le_bytes());
    h
}

#[test]
fn four_gib_length_is_rejected_by_the_decoder_before_allocation() {
    let mut buf = bogus_frame_header(u32::MAX, 1);
    buf.extend_from_slice(&[0xab; 4096]);
    assert_eq!(
        record::check_frame(&buf, record::DEFAULT_RECORD_BYTES_MAX).map(|r| r.frame_bytes),
        Err(FrameError::TooLarge {
            len: u32::MAX,
            max: record::DEFAULT_RECORD_BYTES_MAX
        })
    );
    assert!(matches!(
        record::decode_frame(&buf, record::DEFAULT_RECORD_BYTES_MAX),
        Err(FrameError::TooLarge { .. })
    ));
    // With the limit lifted, the length is still checked against the bytes present, not
    // allocated.
    assert!(matches!(
        record::decode_frame(&buf, u32::MAX),
        Err(FrameError::Truncated {
            available: 4112,
            ..
        })
    ));
    assert_no_huge_allocation();
}

/// Writes a segment file by hand: header, then `body`.
fn write_segment(storage: &MemStorage, first: u64, gtids_before: &GtidSet, body: &[u8]) -> String {
    let first = Offset::new(first).expect("first >= 1");
    let name = segment::file_name(first);
    let mut bytes = segment::encode_header(first, UUID, 0, gtids_before);
    bytes.extend_from_slice(body);
    let f = storage.create(&name).expect("create");
    f.write_all_at(&bytes, 0).expect("write");
    f.sync_data().expect("sync");
    storage.sync_dir().expect("sync dir");
    name
}

fn frame(seq: u64) -> Vec<u8> {
    let mut out = Vec::new();
    record::encode_frame(Offset::new(seq).expect("seq >= 1"), &txn_for(seq), &mut out)
        .expect("encode");
    out
}

fn gtids_through(n: u64) -> GtidSet {
    format!("{UUID}:1-{n}").parse().expect("a GTID set")
}

#[test]
fn four_gib_length_in_a_segment_is_rejected_before_allocation() {
    // A 4 GiB claim, with the default record limit and with the limit lifted; and a claim just
    // under the default limit (60 MiB), which only the bytes present can refute.
    for (len, max) in [
        (u32::MAX, record::DEFAULT_RECORD_BYTES_MAX),
        (u32::MAX, u32::MAX),
        (60 << 20, record::DEFAULT_RECORD_BYTES_MAX),
    ] {
        bogus_length_in_segments(len, max);
    }
    assert_no_huge_allocation();
}

fn bogus_length_in_segments(len: u32, max: u32) {
    let seg_opts = |verify_on_open| WalOptions {
        verify_on_open,
        record_bytes_max: max,
        ..opts(1 << 20)
    };
    let case = format!("length {len}, limit {max}");
    let bad_at =
        segment::encode_header(Offset::FIRST, UUID, 0, &GtidSet::new()).len() + frame(1).len();

    // In a closed segment: record 1, then a frame for record 2 claiming `len` bytes.
    let storage = MemStorage::new();
    let mut body = frame(1);
    body.extend_from_slice(&bogus_frame_header(len, 2));
    let closed = write_segment(&storage, 1, &GtidSet::new(), &body);
    let mut tail = frame(3);
    tail.extend_from_slice(&frame(4));
    write_segment(&storage, 3, &gtids_through(2), &tail);
    match Wal::open(Arc::new(storage.clone()), seg_opts(true)) {
        Err(Error::Corrupt { file, byte, .. }) => {
            assert_eq!((file, byte as usize), (storage.describe(&closed), bad_at));
        }
        other => panic!("{case}: expected Corrupt from open, got {other:?}"),
    }
    let wal = Wal::open(Arc::new(storage.clone()), seg_opts(false)).expect("open");
    match wal.verify() {
        Err(Error::Corrupt { file, byte, .. }) => {
            assert_eq!((file, byte as usize), (storage.describe(&closed), bad_at));
        }
        other => panic!("{case}: expected Corrupt from verify, got {other:?}"),
    }
    drop(wal);

    // In the last segment, with a valid record after it: damage, not a torn tail.
    let storage = MemStorage::new();
    let mut body = frame(1);
    body.extend_from_slice(&bogus_frame_header(len, 2));
    body.extend_from_slice(&frame(2));
    let last = write_segment(&storage, 1, &GtidSet::new(), &body);
    match Wal::open(Arc::new(storage.clone()), seg_opts(false)) {
        Err(Error::Corrupt { file, byte, .. }) => {
            assert_eq!((file, byte as usize), (storage.describe(&last), bad_at));
        }
        other => panic!("{case}: expected Corrupt, got {other:?}"),
    }

    // At the very end of the last segment it is a torn tail: cut, record 1 kept.
    let storage = MemStorage::new();
    let mut body = frame(1);
    body.extend_from_slice(&bogus_frame_header(len, 2));
    write_segment(&storage, 1, &GtidSet::new(), &body);
    let wal = Wal::open(Arc::new(storage.clone()), seg_opts(false)).expect("open");
    assert_eq!(
        wal.recovery_report().truncated_bytes,
        FRAME_HEADER_BYTES as u64,
        "{case}"
    );
    assert_eq!(check_log(&wal, 1), Ok(1), "{case}");
}

#[test]
fn canary_alloc_probe_sees_a_large_allocation() {
    // The probe itself must work, or the tests above could not fail.
    let big: Vec<u8> = Vec::with_capacity(ALLOC_LIMIT_BYTES + 1);
    assert!(alloc_probe::largest_bytes() > ALLOC_LIMIT_BYTES);
    drop(big);
}

/// Opens `image`, read-write and read-only, expecting `Corrupt` at the header's length field
/// of `name`, and checks the file is still there, whole.
fn expect_header_length_corrupt(image: &MemStorage, name: &str, max: u64) {
    let len = image.file_len(name).expect("len");
    for read_only in [false, true] {
        let o = WalOptions {
            read_only,
            ..opts(max)
        };
        match Wal::open(Arc::new(image.clone()), o) {
            Err(Error::Corrupt { file, .. }) => assert_eq!(file, image.describe(name)),
            Ok(wal) => panic!(
                "read_only {read_only}: a damaged header length was accepted: the log opened \
                 at offset {} with {:?} removed",
                wal.visible_offset(),
                wal.recovery_report().removed_torn_segment
            ),
            Err(other) => panic!("read_only {read_only}: expected Corrupt, got {other:?}"),
        }
        assert_eq!(
            image.file_len(name).expect("the segment is still there"),
            len,
            "read_only {read_only}: a refused open changed the segment"
        );
    }
}

#[test]
fn a_damaged_length_in_the_last_segments_header_is_corruption_not_a_torn_creation() {
    // The header's length field (bytes 12..16) damaged so that it claims more than the file
    // holds: the segment holds acknowledged records, so it must never be taken for one torn
    // while it was being created (and removed with them).
    for bit in [4, 12, 20] {
        // One segment only, and the last of several.
        for (max, records) in [(1 << 20, 12), (600, 40)] {
            let base = build_log(max, records);
            let names = segment_names(&base);
            let name = names.last().expect("segments");
            let image = copy(&base);
            image.flip_bit(name, 12 * 8 + bit).expect("flip");
            expect_header_length_corrupt(&image, name, max);
        }
    }
}

#[test]
fn a_last_segment_torn_while_its_header_was_written_is_removed() {
    // The writer syncs a new segment's header before it writes a record there, so a last
    // segment holding only part of its header never held a record: it is removed and the log
    // opens with everything before it.
    let base = build_log(600, 40);
    let names = segment_names(&base);
    let before = names.len();
    let wal = Wal::open(Arc::new(copy(&base)), opts(600)).expect("open");
    let next = wal.visible_offset() + 1;
    drop(wal);
    let first = Offset::new(next).expect("offset");
    let header = segment::encode_header(first, UUID, 0, &gtids_through(40));
    for keep in [segment::HEADER_FIXED_BYTES, header.len() - 1] {
        let image = copy(&base);
        let name = segment::file_name(first);
        let f = image.create(&name).expect("create");
        f.write_all_at(&header[..keep], 0).expect("write");
        let wal = Wal::open(Arc::new(image.clone()), opts(600)).expect("open");
        assert_eq!(
            wal.recovery_report().removed_torn_segment.as_deref(),
            Some(name.as_str())
        );
        assert_eq!(check_log(&wal, 40), Ok(40));
        drop(wal);
        assert_eq!(segment_names(&image).len(), before);
    }
}
