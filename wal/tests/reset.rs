//! `Wal::reset_history`: what a node bootstrapped from a copy of another node's state relies on.
//! The log's GTID set becomes the copy's, offsets go on, readers opened before refuse to go on,
//! a downstream lacking the copied GTIDs is told they were purged, and a crash part-way through
//! leaves either the old history or the new one.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Hooked, UUID, opts, segment_names, txn_for};
use tideline_wal::{
    Epoch, Error, Gtid, GtidSet, MemStorage, Offset, Storage, Wal, WalOptions, segment,
};

fn small_segments() -> WalOptions {
    opts(4096)
}

/// GTIDs of another node, as a bootstrap would have copied them.
fn copied_set() -> GtidSet {
    "4f22ab58-82db-12f2-8f44-d91bb0530673:1-1000"
        .parse()
        .unwrap()
}

/// A log of 200 records over several segments; returns its storage and server uuid.
fn log_with_history() -> (Arc<dyn Storage>, uuid::Uuid) {
    let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let wal = Wal::open(storage.clone(), small_segments()).unwrap();
    for seq in 1..=200 {
        wal.append(txn_for(seq)).unwrap();
    }
    assert!(wal.stats().segments.len() > 3);
    (storage, UUID)
}

#[test]
fn reset_replaces_history_and_offsets_go_on() {
    let (storage, uuid) = log_with_history();
    let wal = Wal::open(storage.clone(), small_segments()).unwrap();
    let mut old_reader = wal.read_from(Offset::FIRST).unwrap();
    assert!(old_reader.next_txn().unwrap().is_some());

    let copied = copied_set();
    let epoch_before = wal.history_epoch();
    assert_eq!(epoch_before, Epoch::INITIAL);
    wal.reset_history(&copied).unwrap();
    let epoch = wal.history_epoch();
    assert_ne!(epoch, epoch_before, "a reset starts a new history epoch");

    assert_eq!(wal.gtids(), copied);
    assert_eq!(wal.first_offset().get(), 201);
    assert_eq!(wal.visible_offset(), 200);
    assert_eq!(wal.stats().segments.len(), 1);
    // The reader opened before must not go on as if nothing happened.
    assert!(matches!(
        old_reader.next_txn(),
        Err(Error::HistoryReset { gtids_before }) if gtids_before == copied
    ));
    // Offsets and this node's own GTIDs go on.
    assert_eq!(wal.append(txn_for(201)).unwrap().get(), 201);
    assert!(matches!(
        wal.read_from(Offset::new(200).unwrap()),
        Err(Error::OffsetUnavailable { .. })
    ));
    // A downstream lacking the copied GTIDs is told they are gone; one that has them reads on.
    assert!(matches!(
        wal.read_missing(&GtidSet::new()),
        Err(Error::GtidsPurged { missing }) if missing == copied
    ));
    let got: Vec<u64> = wal
        .read_missing(&copied)
        .unwrap()
        .map(|t| t.unwrap().gtid.seq)
        .collect();
    assert_eq!(got, vec![201]);
    drop(wal);

    let wal = Wal::open(storage.clone(), small_segments()).unwrap();
    assert_eq!(wal.history_epoch(), epoch, "the epoch is persisted");
    // Segments rolled after the reset stay in its epoch.
    for seq in 202..=400 {
        wal.append(txn_for(seq)).unwrap();
    }
    assert!(wal.stats().segments.len() > 1);
    drop(wal);
    let wal = Wal::open(storage, small_segments()).unwrap();
    assert_eq!(wal.history_epoch(), epoch);
    let mut expect = copied.clone();
    for seq in 201..=400 {
        expect.insert(Gtid::new(uuid, seq).unwrap());
    }
    assert_eq!(wal.gtids(), expect);
    assert_eq!(wal.first_offset().get(), 201);
    assert_eq!(wal.visible_offset(), 400);
    assert_eq!(wal.server_uuid(), uuid);
}

#[test]
fn reset_of_an_empty_log_is_repeatable() {
    let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let wal = Wal::open(storage.clone(), opts(64 << 20)).unwrap();
    let uuid = wal.server_uuid();
    let copied = copied_set();
    wal.reset_history(&copied).unwrap();
    wal.reset_history(&copied).unwrap();
    assert_eq!(wal.gtids(), copied);
    assert_eq!(wal.first_offset(), Offset::FIRST);
    assert_eq!(wal.append(txn_for(1)).unwrap(), Offset::FIRST);
    drop(wal);
    let wal = Wal::open(storage, opts(64 << 20)).unwrap();
    assert_eq!(wal.server_uuid(), uuid);
    assert_eq!(wal.visible_offset(), 1);
    assert!(wal.gtids().contains(&Gtid::new(uuid, 1).unwrap()));
    assert!(copied.is_subset(&wal.gtids()));
}

/// What a reset interrupted after its rename leaves: the log of [`log_with_history`] with its
/// older segments removed, the old active one still there, and after it the new history's
/// empty first segment (GTIDs before: [`copied_set`]). Returns the storage and that set.
fn reset_interrupted_after_the_rename() -> (Arc<dyn Storage>, GtidSet) {
    let (storage, uuid) = log_with_history();
    let names = segment_names(&*storage);
    for n in &names[..names.len() - 1] {
        storage.remove(n).unwrap();
    }
    let copied = copied_set();
    write_empty_segment(&*storage, uuid, Offset::new(201).unwrap(), &copied);
    (storage, copied)
}

/// The crash window between renaming the new first segment into place and removing the old
/// active one: an old segment followed by an empty one whose GTID set lacks the old one's.
/// Open must finish the reset (without that rule it reports the log corrupt).
#[test]
fn open_finishes_a_reset_interrupted_after_the_rename() {
    let (storage, copied) = reset_interrupted_after_the_rename();
    let wal = Wal::open(storage.clone(), small_segments()).unwrap();
    assert_eq!(wal.gtids(), copied);
    assert_eq!(wal.first_offset().get(), 201);
    assert_eq!(wal.visible_offset(), 200);
    assert_eq!(segment_names(&*storage).len(), 1);
    assert_eq!(wal.append(txn_for(201)).unwrap().get(), 201);
}

/// The same crash window seen by a read-only open (`tideline log info|verify`, or a reader
/// beside a live node in the middle of its reset): it shows the log as the next read-write
/// open will make it, and removes nothing; it does not report the log corrupt.
#[test]
fn a_read_only_open_reads_a_reset_interrupted_after_the_rename_as_finished() {
    let (storage, copied) = reset_interrupted_after_the_rename();
    let read_only = WalOptions {
        read_only: true,
        ..small_segments()
    };
    let wal = Wal::open(storage.clone(), read_only)
        .unwrap_or_else(|e| panic!("a read-only open of an interrupted reset failed: {e}"));
    assert_eq!(wal.gtids(), copied);
    assert_eq!(wal.first_offset().get(), 201);
    drop(wal);
    assert_eq!(
        segment_names(&*storage).len(),
        2,
        "a read-only open removed a segment"
    );
}

/// The same crash window when the copy's GTID set contains the old history's (a replica that
/// was only behind): only the new segment's history epoch tells the two histories apart.
/// Without it, open would keep the old records as if they preceded the copy.
#[test]
fn open_finishes_an_interrupted_reset_to_a_larger_set_by_its_epoch() {
    let (storage, uuid) = log_with_history();
    let names = segment_names(&*storage);
    for n in &names[..names.len() - 1] {
        storage.remove(n).unwrap();
    }
    let mut copied = copied_set();
    for seq in 1..=200 {
        copied.insert(Gtid::new(uuid, seq).unwrap());
    }
    let first = Offset::new(201).unwrap();
    let header = segment::encode_header_in_epoch(first, uuid, 0, &copied, Epoch::new(7));
    let f = storage.create(&segment::file_name(first)).unwrap();
    f.write_all_at(&header, 0).unwrap();
    f.sync_data().unwrap();

    let wal = Wal::open(storage.clone(), small_segments()).unwrap();
    assert_eq!(segment_names(&*storage).len(), 1, "the old history is gone");
    assert_eq!(wal.history_epoch(), Epoch::new(7));
    assert_eq!(wal.gtids(), copied);
    assert_eq!(wal.first_offset().get(), 201);
}

/// The crash window before the rename: the old history stays whole and the temporary file goes.
#[test]
fn open_keeps_the_old_history_when_the_reset_did_not_get_renamed() {
    let (storage, uuid) = log_with_history();
    let before = segment_names(&*storage);
    let name = format!("{}.reset", segment::file_name(Offset::new(201).unwrap()));
    let header = segment::encode_header(Offset::new(201).unwrap(), uuid, 0, &copied_set());
    storage
        .create(&name)
        .unwrap()
        .write_all_at(&header, 0)
        .unwrap();

    let wal = Wal::open(storage.clone(), small_segments()).unwrap();
    assert_eq!(wal.gtids().to_string(), format!("{uuid}:1-200"));
    assert_eq!(wal.verify().unwrap(), 200);
    assert_eq!(segment_names(&*storage), before);
    assert!(!storage.list().unwrap().contains(&name));
}

fn write_empty_segment(storage: &dyn Storage, uuid: uuid::Uuid, first: Offset, gtids: &GtidSet) {
    let header = segment::encode_header(first, uuid, 0, gtids);
    let f = storage.create(&segment::file_name(first)).unwrap();
    f.write_all_at(&header, 0).unwrap();
    f.sync_data().unwrap();
}

/// Holds whoever calls [`Gate::hold`] (a storage hook) until the test releases it, at most
/// 10 s.
#[derive(Default)]
struct Gate {
    held: AtomicBool,
    release: AtomicBool,
}

impl Gate {
    fn hold(&self) {
        self.held.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.release.load(Ordering::SeqCst) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Waits until a caller is held; fails with `never` after 10 s.
    fn wait_held(&self, never: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.held.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "{never}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn release(&self) {
        self.release.store(true, Ordering::SeqCst);
    }
}

/// A downstream that subscribes by GTID set while a reset is under way (a fresh replica of a
/// node that is finishing its own bootstrap) is told the copied GTIDs are gone, or its reader
/// reports the reset: it never reads on in the new history with the copied GTIDs missing. The
/// reset is held in its rename of the new segment: the moment in which the log's history
/// epoch is already the new one and its segments are still the old ones.
#[test]
fn a_subscription_by_gtid_set_during_a_reset_never_skips_the_copied_gtids() {
    let gate = Arc::new(Gate::default());
    let storage = Hooked::default().before_rename({
        let gate = gate.clone();
        move |from, _| {
            if from.ends_with(".reset") {
                gate.hold();
            }
        }
    });
    let wal = Arc::new(Wal::open(Arc::new(storage), opts(64 << 20)).unwrap());
    let copied = copied_set();
    let reset = {
        let (wal, copied) = (wal.clone(), copied.clone());
        std::thread::spawn(move || wal.reset_history(&copied))
    };
    gate.wait_held("the reset never renamed");
    let subscribed = wal.read_missing(&GtidSet::new());
    gate.release();
    reset.join().unwrap().unwrap();
    assert_eq!(wal.gtids(), copied);
    wal.append(txn_for(1)).unwrap();
    match subscribed {
        Err(Error::GtidsPurged { .. }) => {}
        Err(e) => panic!("{e}"),
        Ok(mut reader) => match reader.next_txn() {
            Err(Error::HistoryReset { .. }) => {}
            other => panic!(
                "a reader opened against the old history read on in the new one, without the \
                 copied GTIDs: {other:?}"
            ),
        },
    }
}

/// A reader by GTID set that is skipping GTIDs its downstream has, part-way through the active
/// segment when a reset replaces the history, must report the reset when it reaches the end
/// of the old segment: it never goes on into the new history's first segment (whose first
/// offset follows the old history's last), without the copied GTIDs. The reader is held at
/// its second read of the segment, which is larger than one read.
#[test]
fn a_reader_skipping_through_a_reset_reports_it_and_never_reads_the_new_history() {
    let gate = Arc::new(Gate::default());
    let armed = Arc::new(AtomicBool::new(false));
    let storage = Hooked::default().before_read({
        let (gate, armed, reads) = (gate.clone(), armed.clone(), AtomicU64::new(0));
        move |_| {
            if armed.load(Ordering::SeqCst) && reads.fetch_add(1, Ordering::SeqCst) == 1 {
                gate.hold();
            }
        }
    });
    let wal = Arc::new(Wal::open(Arc::new(storage), opts(64 << 20)).unwrap());
    // ~3 MiB in one segment: more than one read of the reader.
    let value = vec![7u8; 16 << 10];
    let mut have = GtidSet::new();
    for seq in 1..=200 {
        let gtid = Gtid::new(UUID, seq).unwrap();
        wal.append(tideline_wal::NewTransaction {
            gtid,
            timestamp_us: 0,
            ops: vec![tideline_wal::Op::Put {
                tree: "t".into(),
                key: seq.to_be_bytes().to_vec(),
                value: value.clone(),
                before: None,
            }],
        })
        .unwrap();
        have.insert(gtid);
    }
    assert_eq!(wal.stats().segments.len(), 1);
    let mut reader = wal.read_missing(&have).unwrap();
    armed.store(true, Ordering::SeqCst);
    let read = std::thread::spawn(move || reader.next_txn().map(|t| t.map(|t| t.gtid)));
    gate.wait_held("the reader never read twice");
    let copied = copied_set();
    wal.reset_history(&copied).unwrap();
    let new = Gtid::new(UUID, 201).unwrap();
    wal.append(tideline_wal::NewTransaction {
        gtid: new,
        timestamp_us: 0,
        ops: vec![],
    })
    .unwrap();
    gate.release();
    match read.join().unwrap() {
        Err(Error::HistoryReset { .. }) => {}
        other => panic!(
            "a reader of the old history read on into the new one, without the copied GTIDs: \
             {other:?}"
        ),
    }
}
